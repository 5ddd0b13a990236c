//! Shared harness for the `.slt` and MVCC runners: a throwaway PostgreSQL 15
//! cluster (the reference), an in-process Borealis server (the system under test),
//! and one way of running SQL that both sides go through, so that any difference in
//! the recorded [`Outcome`] comes from the servers and never from the client code.
//!
//! PostgreSQL is started from `initdb`/`postgres` found in `PATH`,
//! `/usr/local/bin` or `/usr/lib/postgresql/15/bin`. Both refuse to run as root, so
//! as uid 0 the cluster directory is handed to the `postgres` user and the
//! binaries run under its uid (`CommandExt::uid`). A missing binary is a test
//! failure with a message saying so, never a silent pass.
#![allow(dead_code)]

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

/// Every statement, connection and start-up wait is bounded by this.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long PostgreSQL may take to accept connections after it was started.
pub const POSTGRES_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which server a result came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Postgres,
    Borealis,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::Postgres => write!(f, "postgres"),
            Side::Borealis => write!(f, "borealis"),
        }
    }
}

/// What one simple-protocol query string produced, in a form that compares equal
/// exactly when a client could not tell the two servers apart (text values, NULL
/// as `NULL`, column names, per-statement row counts; the error message text is
/// kept for reports but not compared).
#[derive(Clone, Debug)]
pub enum Outcome {
    Ok {
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
        /// Row counts of each CommandComplete (INSERT/UPDATE/DELETE/SELECT n).
        counts: Vec<u64>,
    },
    Error {
        code: String,
        message: String,
    },
    /// The statement did not finish within [`STATEMENT_TIMEOUT`].
    Timeout,
    /// The connection failed without a server error (closed, protocol error).
    Broken(String),
}

impl Outcome {
    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Error { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    /// Sorts the rows (for `rowsort` queries).
    pub fn sort_rows(&mut self) {
        if let Outcome::Ok { rows, .. } = self {
            rows.sort();
        }
    }

    /// Equality as a client sees it (error messages are not compared).
    pub fn same_as(&self, other: &Outcome) -> bool {
        match (self, other) {
            (
                Outcome::Ok {
                    columns: c1,
                    rows: r1,
                    counts: n1,
                },
                Outcome::Ok {
                    columns: c2,
                    rows: r2,
                    counts: n2,
                },
            ) => c1 == c2 && r1 == r2 && n1 == n2,
            (Outcome::Error { code: a, .. }, Outcome::Error { code: b, .. }) => a == b,
            (Outcome::Timeout, Outcome::Timeout) => true,
            (Outcome::Broken(_), Outcome::Broken(_)) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok {
                columns,
                rows,
                counts,
            } => {
                if !columns.is_empty() {
                    writeln!(f, "    columns: {}", columns.join(" | "))?;
                }
                const ROWS_SHOWN_MAX: usize = 40;
                for row in rows.iter().take(ROWS_SHOWN_MAX) {
                    writeln!(f, "    {}", row.join(" | "))?;
                }
                if rows.len() > ROWS_SHOWN_MAX {
                    writeln!(f, "    ... {} rows in all", rows.len())?;
                }
                write!(f, "    ok, counts {counts:?}")
            }
            Outcome::Error { code, message } => write!(f, "    ERROR {code}: {message}"),
            Outcome::Timeout => write!(f, "    TIMEOUT (statement did not finish)"),
            Outcome::Broken(why) => write!(f, "    CONNECTION BROKEN: {why}"),
        }
    }
}

/// Runs `sql` with the simple query protocol and records what came back.
pub async fn run_simple(client: &Client, sql: &str) -> Outcome {
    run_simple_within(client, sql, STATEMENT_TIMEOUT).await
}

/// [`run_simple`] with its own bound; [`Outcome::Timeout`] after `timeout`.
pub async fn run_simple_within(client: &Client, sql: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, client.simple_query(sql)).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) => match e.as_db_error() {
            Some(db) => Outcome::Error {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => Outcome::Broken(e.to_string()),
        },
        Ok(Ok(messages)) => {
            let mut columns = Vec::new();
            let mut rows = Vec::new();
            let mut counts = Vec::new();
            for message in messages {
                match message {
                    SimpleQueryMessage::RowDescription(cols) => {
                        columns = cols.iter().map(|c| c.name().to_string()).collect();
                    }
                    SimpleQueryMessage::Row(row) => {
                        let values = (0..row.len())
                            .map(|i| row.get(i).unwrap_or("NULL").to_string())
                            .collect();
                        rows.push(values);
                    }
                    SimpleQueryMessage::CommandComplete(n) => counts.push(n),
                    _ => {}
                }
            }
            Outcome::Ok {
                columns,
                rows,
                counts,
            }
        }
    }
}

/// Connects with tokio-postgres (no TLS, trust auth) and drives the connection in
/// a background task.
pub async fn connect(addr: SocketAddr, dbname: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user("postgres")
        .dbname(dbname)
        .connect_timeout(STATEMENT_TIMEOUT);
    let (client, connection) = match tokio::time::timeout(
        STATEMENT_TIMEOUT,
        config.connect(tokio_postgres::NoTls),
    )
    .await
    {
        Ok(result) => result?,
        Err(_) => panic!("connecting to {addr} timed out after {STATEMENT_TIMEOUT:?}"),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An in-process Borealis server over a fresh in-memory volume.
pub struct BorealisServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl BorealisServer {
    pub async fn start() -> BorealisServer {
        let volume = borealis_volume::Volume::in_memory(borealis_volume::VolumeConfig::default());
        let db = borealis_sql::Database::open(volume)
            .await
            .expect("open an in-memory Borealis database");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(borealis_pgwire_server::serve(
            listener,
            db,
            borealis_pgwire_server::ServerConfig::default(),
        ));
        BorealisServer { addr, task }
    }
}

impl Drop for BorealisServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A throwaway PostgreSQL 15 cluster: stopped (SIGQUIT, then SIGKILL) and its
/// directory removed on drop, also when a test panics.
pub struct PostgresCluster {
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Removed on drop, after the server is gone.
    dir: Option<tempfile::TempDir>,
}

fn find_binary(name: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.push(Path::new("/usr/local/bin").join(name));
    candidates.push(Path::new("/usr/lib/postgresql/15/bin").join(name));
    match candidates.into_iter().find(|p| p.is_file()) {
        Some(p) => p,
        None => panic!(
            "PostgreSQL 15 binary `{name}` not found in PATH, /usr/local/bin or \
             /usr/lib/postgresql/15/bin: these tests compare Borealis with a real \
             PostgreSQL and cannot run without it (Debian: apt-get install postgresql-15)"
        ),
    }
}

/// Under uid 0, the (uid, gid) of the `postgres` user the binaries must run as.
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam gets a valid C string; the returned record is read at once,
    // before any other call that could overwrite it (tests here are single-threaded
    // at this point).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!(
            "running as root but there is no `postgres` user: initdb and postgres refuse \
             to run as root (create the user, or run the tests as a normal user)"
        );
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    assert_eq!(
        rc,
        0,
        "chown {} to the postgres user failed",
        path.display()
    );
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

impl PostgresCluster {
    pub async fn start() -> PostgresCluster {
        let initdb = find_binary("initdb");
        let postgres = find_binary("postgres");
        let user = postgres_user();
        let dir = tempfile::Builder::new()
            .prefix("borealis-sqllogic-pg-")
            .tempdir()
            .expect("create a temporary directory");
        if let Some((uid, gid)) = user {
            chown_tree(dir.path(), uid, gid);
        }
        let data = dir.path().join("data");
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--locale=C",
                "--encoding=UTF8",
            ])
            .arg("--no-sync")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let output = cmd.output().expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("create log");
        if let Some((uid, gid)) = user {
            chown_tree(&dir.path().join("postgres.log"), uid, gid);
        }
        let mut cmd = Command::new(&postgres);
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().expect("start postgres");
        let mut cluster = PostgresCluster {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir: Some(dir),
        };
        cluster.wait_until_accepting().await;
        cluster
    }

    async fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + POSTGRES_START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "postgres exited during start-up ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), connect(self.addr, "postgres")).await
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres did not accept connections within {POSTGRES_START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("postgres.log")).ok())
            .unwrap_or_default()
    }

    /// A fresh, empty database on this cluster.
    pub async fn create_database(&self, name: &str) -> Client {
        let admin = connect(self.addr, "postgres")
            .await
            .expect("connect to PostgreSQL");
        let drop = format!("DROP DATABASE IF EXISTS {name}");
        admin.simple_query(&drop).await.expect("drop database");
        let create = format!("CREATE DATABASE {name} TEMPLATE template0");
        admin.simple_query(&create).await.expect("create database");
        connect(self.addr, name)
            .await
            .expect("connect to the new database")
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the postmaster takes its backends with it.
            // SAFETY: kill with a pid we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGQUIT);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        drop(self.dir.take());
    }
}
