//! End-to-end through the real SQL engine: binary and text formats for the common
//! types, COPY in both directions, portals with row limits, psql scripts.

mod support;

use borealis_pgwire_server::ServerConfig;
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use std::error::Error;
use support::*;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type as PgType};

/// A value passed through as its raw binary wire form, so the test can check types
/// tokio-postgres only supports behind optional features (numeric, date, uuid, ...).
#[derive(Debug, Clone, PartialEq)]
struct Raw(Vec<u8>);

impl ToSql for Raw {
    fn to_sql(
        &self,
        _ty: &PgType,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_ty: &PgType) -> bool {
        true
    }
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_ty: &PgType, raw: &'a [u8]) -> Result<Raw, Box<dyn Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_ty: &PgType) -> bool {
        true
    }
}

fn numeric_wire(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [ndigits as u16, weight as u16, sign, dscale] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    for d in digits {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v
}

#[tokio::test]
async fn common_types_roundtrip_in_binary_through_the_engine() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, b boolean, s smallint, i integer, l bigint, r real, \
             d double precision, n numeric(10,3), tx text, vc varchar(10), c char(4), by bytea, \
             dt date, ts timestamp, tz timestamptz, u uuid)",
        )
        .await
        .expect("create table");
    let insert = client
        .prepare("INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
        .await
        .expect("prepare insert");
    let expected_types = [
        PgType::INT4,
        PgType::BOOL,
        PgType::INT2,
        PgType::INT4,
        PgType::INT8,
        PgType::FLOAT4,
        PgType::FLOAT8,
        PgType::NUMERIC,
        PgType::TEXT,
        PgType::VARCHAR,
        PgType::BPCHAR,
        PgType::BYTEA,
        PgType::DATE,
        PgType::TIMESTAMP,
        PgType::TIMESTAMPTZ,
        PgType::UUID,
    ];
    assert_eq!(
        insert.params(),
        &expected_types,
        "parameter types inferred from the table"
    );
    // 12345.678 as numeric_send writes it; 2000-01-11; 1 second after 2000-01-01.
    let numeric = Raw(numeric_wire(3, 1, 0, 3, &[1, 2345, 6780]));
    let date = Raw(10i32.to_be_bytes().to_vec());
    let ts = Raw(1_000_000i64.to_be_bytes().to_vec());
    let tz = Raw((-1_000_000i64).to_be_bytes().to_vec());
    let uuid = Raw((0u8..16).collect());
    let bytes: Vec<u8> = vec![0, 1, 255];
    let n = client
        .execute(
            &insert,
            &[
                &1i32,
                &true,
                &-2i16,
                &3i32,
                &(1i64 << 40),
                &1.5f32,
                &-2.25f64,
                &numeric,
                &"text",
                &"varchar",
                &"ab",
                &bytes,
                &date,
                &ts,
                &tz,
                &uuid,
            ],
        )
        .await
        .expect("insert");
    assert_eq!(n, 1);

    let row = client
        .query_one("SELECT * FROM t WHERE id = $1", &[&1i32])
        .await
        .expect("select");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i16>(2), -2);
    assert_eq!(row.get::<_, i32>(3), 3);
    assert_eq!(row.get::<_, i64>(4), 1 << 40);
    assert_eq!(row.get::<_, f32>(5), 1.5);
    assert_eq!(row.get::<_, f64>(6), -2.25);
    assert_eq!(row.get::<_, Raw>(7), numeric);
    assert_eq!(row.get::<_, String>(8), "text");
    assert_eq!(row.get::<_, String>(9), "varchar");
    assert_eq!(row.get::<_, String>(10), "ab  ", "char(4) is blank-padded");
    assert_eq!(row.get::<_, Vec<u8>>(11), bytes);
    assert_eq!(row.get::<_, Raw>(12), date);
    assert_eq!(row.get::<_, Raw>(13), ts);
    assert_eq!(row.get::<_, Raw>(14), tz);
    assert_eq!(row.get::<_, Raw>(15), uuid);

    // The same row in text form (simple protocol).
    let msgs = client
        .simple_query("SELECT n, dt, ts, tz, u, by FROM t")
        .await
        .expect("text select");
    let text: Vec<String> = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..6)
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .expect("a row");
    assert_eq!(
        text,
        [
            "12345.678",
            "2000-01-11",
            "2000-01-01 00:00:01",
            "1999-12-31 23:59:59+00",
            "00010203-0405-0607-0809-0a0b0c0d0e0f",
            "\\x0001ff"
        ]
    );
}

#[tokio::test]
async fn text_parameters_and_nulls() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    client
        .batch_execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        .await
        .expect("create");
    let none: Option<&str> = None;
    client
        .execute("INSERT INTO p VALUES ($1, $2)", &[&1i32, &none])
        .await
        .expect("insert null");
    let row = client
        .query_one("SELECT v FROM p WHERE id = 1", &[])
        .await
        .expect("select");
    assert_eq!(row.get::<_, Option<String>>(0), None);
    // Duplicate key: 23505 through the extended protocol; the connection goes on.
    let e = client
        .execute("INSERT INTO p VALUES ($1, $2)", &[&1i32, &"x"])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{e:?}");
    assert_eq!(
        client
            .query("SELECT * FROM p", &[])
            .await
            .expect("select")
            .len(),
        1
    );
}

#[tokio::test]
async fn copy_in_and_out_with_tokio_postgres() {
    let server = start(ServerConfig::default()).await;
    let client = tokio_pg(server.addr, None).await.expect("connect");
    client
        .batch_execute("CREATE TABLE c (id int PRIMARY KEY, v text)")
        .await
        .expect("create");
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tone\n2\ttwo\n"))
        .await
        .expect("send");
    sink.send(bytes::Bytes::from_static(b"3\t\\N\n"))
        .await
        .expect("send");
    assert_eq!(sink.finish().await.expect("finish"), 3);
    let stream = client.copy_out("COPY c TO STDOUT").await.expect("copy out");
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("timeout")
    {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(String::from_utf8_lossy(&out), "1\tone\n2\ttwo\n3\t\\N\n");
    // A bad row fails the COPY with the engine's SQLSTATE and the session goes on.
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"x\ty\n"))
        .await
        .expect("send");
    let e = sink.finish().await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22P02"), "{e:?}");
    assert_eq!(
        client
            .query("SELECT * FROM c", &[])
            .await
            .expect("select")
            .len(),
        3
    );
}

#[tokio::test]
async fn portals_with_row_limits() {
    let server = start(ServerConfig::default()).await;
    let mut client = tokio_pg(server.addr, None).await.expect("connect");
    client
        .batch_execute("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .expect("create");
    client
        .batch_execute("INSERT INTO r VALUES (1), (2), (3), (4), (5)")
        .await
        .expect("insert");
    let txn = client.transaction().await.expect("begin");
    let stmt = txn
        .prepare("SELECT id FROM r ORDER BY id")
        .await
        .expect("prepare");
    let portal = txn.bind(&stmt, &[]).await.expect("bind");
    let mut seen = Vec::new();
    for expected in [2, 2, 1, 0] {
        let rows = txn.query_portal(&portal, 2).await.expect("fetch");
        assert_eq!(rows.len(), expected);
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    txn.commit().await.expect("commit");
}

#[tokio::test]
async fn psql_script_with_copy_and_errors() {
    let server = start(ServerConfig::default()).await;
    let script = "CREATE TABLE s (id int PRIMARY KEY, v text);\n\
                  COPY s FROM STDIN;\n1\ta\n2\tb\n\\.\n\
                  SELECT count(*) FROM s;\n\
                  BEGIN;\nINSERT INTO s VALUES (3, 'c');\nSELECT * FROM nope;\nROLLBACK;\n\
                  SELECT id, v FROM s ORDER BY id;\n\
                  COPY s TO STDOUT WITH (FORMAT csv);\n";
    let port = server.addr.port().to_string();
    let out = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = std::process::Command::new("psql")
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
                    "-q",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .map(|mut s| s.write_all(script.as_bytes()));
            child.wait_with_output()
        }),
    )
    .await
    .expect("psql timed out")
    .expect("join")
    .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "2\n1|a\n2|b\n1,a\n2,b\n", "stderr: {stderr}");
    assert!(
        stderr.contains("relation \"nope\" does not exist"),
        "{stderr}"
    );
}
