//! Real clients against the front end: psql (password auth, SCRAM) and
//! tokio-postgres (simple and extended protocol).

mod support;

use borealis_pgwire_server::{Auth, ServerConfig};
use std::process::{Command, Stdio};
use support::*;

fn password_config() -> ServerConfig {
    ServerConfig {
        auth: Auth::scram("postgres", "s3cret"),
        ..ServerConfig::default()
    }
}

/// Runs psql (blocking, in a thread) with a hard timeout; returns (success, stdout, stderr).
async fn psql(port: u16, password: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("psql");
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
        ])
        .args(["-v", "ON_ERROR_STOP=1"])
        .args(args)
        .stdin(Stdio::null());
    let out = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("psql timed out")
        .expect("join")
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn psql_connects_with_scram_password_and_selects_1() {
    let server = start(password_config()).await;
    let (ok, out, err) = psql(server.addr.port(), "s3cret", &["-c", "SELECT 1"]).await;
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "1");
}

#[tokio::test]
async fn psql_with_wrong_password_is_refused_with_28p01() {
    let server = start(password_config()).await;
    let (ok, _, err) = psql(server.addr.port(), "wrong", &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(
        err.contains("password authentication failed for user \"postgres\""),
        "{err}"
    );
    // The server still serves the right password afterwards.
    let (ok, out, err) = psql(server.addr.port(), "s3cret", &["-c", "SELECT 1"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");
}

#[tokio::test]
async fn psql_on_error_stop_reports_sqlstate_and_exits_nonzero() {
    let server = start(password_config()).await;
    let (ok, _, err) = psql(
        server.addr.port(),
        "s3cret",
        &["-v", "VERBOSITY=verbose", "-c", "SELEC 1"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("42601"), "{err}");
}

#[tokio::test]
async fn psql_script_with_transaction_block() {
    let server = start(password_config()).await;
    let (ok, out, err) = psql(
        server.addr.port(),
        "s3cret",
        &["-c", "BEGIN", "-c", "SELECT 1", "-c", "COMMIT"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains('1'), "{out}");
}

#[tokio::test]
async fn tokio_postgres_password_and_simple_query() {
    let server = start(password_config()).await;
    assert!(tokio_pg(server.addr, Some("nope")).await.is_err());
    let client = tokio_pg(server.addr, Some("s3cret"))
        .await
        .expect("connect");
    let msgs = client.simple_query("SELECT 1").await.expect("select 1");
    let row = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten();
    assert_eq!(row.as_deref(), Some("1"));
}

#[tokio::test]
async fn tokio_postgres_errors_carry_sqlstate_and_session_stays_usable() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    let e = client.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"), "{e:?}");
    // Extended protocol: a bad statement fails at prepare with the same code.
    let e = client.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"), "{e:?}");
    // And the connection goes on.
    client
        .batch_execute("BEGIN; COMMIT")
        .await
        .expect("begin/commit");
    assert_eq!(
        client.simple_query("SELECT 1").await.expect("select").len(),
        3
    );
}

#[tokio::test]
async fn tokio_postgres_extended_protocol_commands() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    // BEGIN/COMMIT through Parse/Describe/Bind/Execute/Sync: NoData, CommandComplete.
    let begin = client.prepare("BEGIN").await.expect("prepare");
    assert!(begin.columns().is_empty());
    assert_eq!(client.execute(&begin, &[]).await.expect("execute"), 0);
    client.execute("COMMIT", &[]).await.expect("commit");
    // An error inside the block fails it; ROLLBACK recovers. (An execute-time error:
    // the session does not yet fail the block on a Parse-time error.)
    client.execute("BEGIN", &[]).await.expect("begin");
    let e = client.execute("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e:?}");
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e:?}");
    client.execute("ROLLBACK", &[]).await.expect("rollback");
    client
        .simple_query("SELECT 1")
        .await
        .expect("usable after rollback");
}

#[tokio::test]
async fn psql_over_tls_with_scram() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(made.success());
    let acceptor = borealis_pgwire_server::tls_acceptor_from_pem(
        &std::fs::read(&cert).expect("cert"),
        &std::fs::read(&key).expect("key"),
    )
    .expect("acceptor");
    let config = ServerConfig {
        tls: Some(acceptor),
        require_tls: true,
        ..password_config()
    };
    let server = start(config).await;
    let port = server.addr.port().to_string();
    let run = |sslmode: &'static str| {
        let port = port.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("psql")
                .env("PGPASSWORD", "s3cret")
                .env("PGSSLMODE", sslmode)
                .env("PGCONNECT_TIMEOUT", "10")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-X",
                    "-A",
                    "-t",
                ])
                .args(["-c", "SELECT 1"])
                .stdin(Stdio::null())
                .output()
        })
    };
    let out = tokio::time::timeout(WAIT, run("require"))
        .await
        .expect("timeout")
        .expect("join")
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // require_tls: a plain connection is refused.
    let out = tokio::time::timeout(WAIT, run("disable"))
        .await
        .expect("timeout")
        .expect("join")
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SSL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tokio_postgres_binary_parameters_are_decoded() {
    use tokio_postgres::types::Type as PgType;
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    // BEGIN ignores its parameters, but every one goes through the
    // binary decoder (tokio-postgres always binds in binary) with the Parse types.
    let types = [
        PgType::BOOL,
        PgType::INT2,
        PgType::INT4,
        PgType::INT8,
        PgType::FLOAT4,
        PgType::FLOAT8,
        PgType::TEXT,
        PgType::VARCHAR,
        PgType::BYTEA,
    ];
    let stmt = client
        .prepare_typed("BEGIN", &types)
        .await
        .expect("prepare");
    assert_eq!(stmt.params(), &types);
    let bytes: &[u8] = &[1, 2, 3];
    let n = client
        .execute(
            &stmt,
            &[
                &true,
                &7i16,
                &-8i32,
                &(1i64 << 40),
                &1.5f32,
                &-2.5f64,
                &"text",
                &"vc",
                &bytes,
            ],
        )
        .await
        .expect("execute with binary params");
    assert_eq!(n, 0);
    let null: Option<i32> = None;
    let stmt = client
        .prepare_typed("COMMIT", &[PgType::INT4])
        .await
        .expect("prepare");
    client
        .execute(&stmt, &[&null])
        .await
        .expect("NULL parameter");
}

#[tokio::test]
async fn tokio_postgres_query_gets_binary_results() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    let stmt = client.prepare("SELECT 1").await.expect("prepare");
    assert_eq!(
        stmt.columns().len(),
        1,
        "Describe reports the result column before Execute"
    );
    let row = client.query_one(&stmt, &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn unknown_user_fails_like_a_wrong_password() {
    let server = start(password_config()).await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(server.addr.port())
        .user("mallory")
        .password("s3cret")
        .connect_timeout(WAIT);
    let e = tokio::time::timeout(WAIT, cfg.connect(tokio_postgres::NoTls))
        .await
        .expect("timeout")
        .err()
        .expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e:?}");
}
