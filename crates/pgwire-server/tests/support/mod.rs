//! Test harness: a server on 127.0.0.1:0 over an in-memory database, and a raw
//! protocol client for what drivers never send (malformed messages).
#![allow(dead_code)]

use borealis_pgwire_server::{serve, ServerConfig};
use borealis_sql::Database;
use borealis_volume::{Volume, VolumeConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start(config: ServerConfig) -> TestServer {
    let db = Database::open(Volume::in_memory(VolumeConfig::default()))
        .await
        .expect("open database");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(serve(listener, db, config));
    TestServer { addr, task }
}

pub async fn tokio_pg(
    addr: SocketAddr,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(addr.port())
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(WAIT);
    if let Some(pw) = password {
        cfg.password(pw);
    }
    let (client, conn) = tokio::time::timeout(WAIT, cfg.connect(tokio_postgres::NoTls))
        .await
        .expect("connect timed out")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A hand-driven protocol client.
pub struct Raw {
    pub stream: TcpStream,
}

pub fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    body.extend_from_slice(b"user\0");
    body.extend_from_slice(user.as_bytes());
    body.extend_from_slice(b"\0database\0postgres\0\0");
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

pub fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    message(b'Q', &b)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &b)
}

pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(portal.as_bytes());
    b.push(0);
    b.extend_from_slice(statement.as_bytes());
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &b)
}

pub fn execute(portal: &str) -> Vec<u8> {
    let mut b = portal.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

impl Raw {
    /// Connects and completes a trust startup (up to the first ReadyForQuery).
    pub async fn connect(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect_only(addr).await;
        raw.send(&startup_packet("postgres")).await;
        let msgs = raw.until_ready().await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "startup: {msgs:?}");
        raw
    }

    pub async fn connect_only(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Raw { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// The next backend message, or None when the server closed the connection.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        match tokio::time::timeout(WAIT, self.stream.read_exact(&mut head))
            .await
            .expect("read timed out")
        {
            Ok(_) => {}
            Err(_) => return None,
        }
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        tokio::time::timeout(WAIT, self.stream.read_exact(&mut body))
            .await
            .expect("read timed out")
            .ok()?;
        Some((head[0], body))
    }

    /// Messages up to and including ReadyForQuery (or until the server closes).
    pub async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Reads until the server closes the connection; returns what it sent.
    pub async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }
}

/// The SQLSTATE ('C' field) of an ErrorResponse or NoticeResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    field(body, b'C')
}

pub fn field(body: &[u8], code: u8) -> String {
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if t == code {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = &tail[(end + 1).min(tail.len())..];
    }
    String::new()
}

/// Message type bytes, for compact assertions.
pub fn types(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}
