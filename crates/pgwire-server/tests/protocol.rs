//! Raw protocol tests: ReadyForQuery status bytes, extended-protocol error recovery,
//! malformed input, limits, cancel requests.

mod support;

use borealis_pgwire_server::ServerConfig;
use support::*;

fn status(msgs: &[(u8, Vec<u8>)]) -> u8 {
    let last = msgs.last().expect("no messages");
    assert_eq!(last.0, b'Z', "expected ReadyForQuery last: {}", types(msgs));
    last.1[0]
}

/// The server is still healthy: a fresh connection runs SELECT 1.
async fn assert_serves(addr: std::net::SocketAddr) {
    let mut raw = Raw::connect(addr).await;
    raw.send(&query("SELECT 1")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "TDCZ");
}

#[tokio::test]
async fn ready_for_query_carries_the_session_transaction_status() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(&query("BEGIN")).await;
    assert_eq!(status(&raw.until_ready().await), b'T');
    raw.send(&query("SELEC oops")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs[0].1), "42601");
    assert_eq!(status(&msgs), b'E');
    raw.send(&query("SELECT 1")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(sqlstate(&msgs[0].1), "25P02");
    assert_eq!(status(&msgs), b'E');
    raw.send(&query("ROLLBACK")).await;
    assert_eq!(status(&raw.until_ready().await), b'I');
    raw.send(&query("SELECT 1")).await;
    assert_eq!(types(&raw.until_ready().await), "TDCZ");
}

#[tokio::test]
async fn simple_query_with_several_statements_and_empty_query() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(&query("BEGIN; SELECT 1; COMMIT")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "CTDCCZ");
    assert_eq!(status(&msgs), b'I');
    raw.send(&query("")).await;
    assert_eq!(types(&raw.until_ready().await), "IZ");
    // Unsupported statements are 0A000, and later statements do not run.
    raw.send(&query(
        "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql; SELECT 1",
    ))
    .await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs[0].1), "0A000");
}

#[tokio::test]
async fn extended_error_discards_until_sync_then_recovers() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    let mut batch = parse("", "SELEC bad");
    batch.extend(bind("", ""));
    batch.extend(execute(""));
    batch.extend(sync());
    raw.send(&batch).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "EZ", "one ErrorResponse, then ReadyForQuery");
    assert_eq!(sqlstate(&msgs[0].1), "42601");
    assert_eq!(status(&msgs), b'I');
    // A good pipeline right after works.
    let mut batch = parse("s1", "BEGIN");
    batch.extend(bind("", "s1"));
    batch.extend(execute(""));
    batch.extend(sync());
    raw.send(&batch).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "12CZ");
    assert_eq!(status(&msgs), b'T');
    // An execute-time error inside the block: E, then Z('E'); the rest is skipped.
    let mut batch = parse("", "SELECT 1/0");
    batch.extend(bind("", ""));
    batch.extend(execute(""));
    batch.extend(bind("", "s1"));
    batch.extend(execute(""));
    batch.extend(sync());
    raw.send(&batch).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "12EZ");
    assert_eq!(status(&msgs), b'E');
    raw.send(&query("ROLLBACK")).await;
    assert_eq!(status(&raw.until_ready().await), b'I');
    assert_serves(server.addr).await;
}

#[tokio::test]
async fn extended_protocol_reference_errors_are_not_fatal() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    // Unknown statement, then unknown portal (skipped: still before Sync).
    let mut batch = bind("", "nope");
    batch.extend(execute("nope"));
    batch.extend(sync());
    raw.send(&batch).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs[0].1), "26000");
    raw.send(&[execute("nope"), sync()].concat()).await;
    let msgs = raw.until_ready().await;
    assert_eq!(sqlstate(&msgs[0].1), "34000");
    // Bind with the wrong number of parameters: 08P01 as an ERROR, connection stays.
    let mut b = vec![0u8, 0u8];
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&1i32.to_be_bytes());
    b.push(b'1');
    b.extend_from_slice(&0u16.to_be_bytes());
    raw.send(&[parse("", "BEGIN"), message(b'B', &b), sync()].concat())
        .await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "1EZ");
    assert_eq!(sqlstate(&msgs[1].1), "08P01");
    assert_eq!(field(&msgs[1].1, b'S'), "ERROR");
    // Describe of a statement: ParameterDescription then NoData for BEGIN.
    let mut d = vec![b'S'];
    d.extend_from_slice(b"\0");
    raw.send(&[parse("", "BEGIN"), message(b'D', &d), sync()].concat())
        .await;
    assert_eq!(types(&raw.until_ready().await), "1tnZ");
    // Close of something that does not exist is fine; stray CopyData is dropped.
    let mut c = vec![b'S'];
    c.extend_from_slice(b"ghost\0");
    raw.send(&[message(b'd', b"junk"), message(b'C', &c), sync()].concat())
        .await;
    assert_eq!(types(&raw.until_ready().await), "3Z");
}

/// Sends `bytes` on a fresh authenticated connection and expects FATAL 08P01 and a close.
async fn expect_protocol_fatal(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut raw = Raw::connect(addr).await;
    raw.send(bytes).await;
    let msgs = raw.until_closed().await;
    let err = msgs
        .iter()
        .find(|m| m.0 == b'E')
        .unwrap_or_else(|| panic!("no error in {}", types(&msgs)));
    assert_eq!(sqlstate(&err.1), "08P01");
    assert_eq!(field(&err.1, b'S'), "FATAL");
    assert_serves(addr).await;
}

#[tokio::test]
async fn malformed_messages_close_only_that_connection() {
    let config = ServerConfig {
        max_message_bytes: 1024 * 1024,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    // A length below 4.
    expect_protocol_fatal(server.addr, &[b'Q', 0, 0, 0, 2]).await;
    // A negative length.
    expect_protocol_fatal(server.addr, &[b'Q', 0xff, 0xff, 0xff, 0xf0]).await;
    // An unknown message type.
    expect_protocol_fatal(server.addr, &message(b'!', b"x")).await;
    // Oversized: the header alone must be refused, without waiting for 100 MiB.
    expect_protocol_fatal(server.addr, &[b'Q', 0x06, 0x40, 0x00, 0x00]).await;
    // A Bind whose body is truncated inside a valid frame.
    expect_protocol_fatal(server.addr, &message(b'B', &[0, 0, 0, 5])).await;
    // A Query without its terminating NUL.
    expect_protocol_fatal(server.addr, &message(b'Q', b"SELECT 1")).await;
    // A password message after authentication.
    expect_protocol_fatal(server.addr, &message(b'p', b"pw\0")).await;
}

#[tokio::test]
async fn garbage_startup_is_dropped_and_the_server_goes_on() {
    let server = start(ServerConfig::default()).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0, 0, 0, 3][..],
        &[0x7f, 0xff, 0xff, 0xff, 1, 2, 3, 4][..],
        &[0, 0, 0, 12, 0, 2, 0, 0, b'u', 0, 0, 0][..],
    ] {
        let mut raw = Raw::connect_only(server.addr).await;
        raw.send(garbage).await;
        let msgs = raw.until_closed().await;
        assert!(msgs.iter().all(|m| m.0 == b'E'), "{}", types(&msgs));
    }
    // A client that connects and says nothing, then leaves.
    drop(Raw::connect_only(server.addr).await);
    assert_serves(server.addr).await;
}

#[tokio::test]
async fn startup_without_user_is_28000() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect_only(server.addr).await;
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"database\0postgres\0\0");
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    raw.send(&p).await;
    let msgs = raw.until_closed().await;
    assert_eq!(types(&msgs), "E");
    assert_eq!(sqlstate(&msgs[0].1), "28000");
}

#[tokio::test]
async fn ssl_request_is_refused_without_tls_and_startup_continues() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect_only(server.addr).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut answer = [0u8; 1];
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut answer),
    )
    .await
    .expect("timeout")
    .expect("read");
    assert_eq!(&answer, b"N");
    raw.send(&startup_packet("postgres")).await;
    assert_eq!(status(&raw.until_ready().await), b'I');
}

#[tokio::test]
async fn newer_protocol_minor_is_negotiated_down() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect_only(server.addr).await;
    let mut p = startup_packet("postgres");
    p[6..8].copy_from_slice(&2u16.to_be_bytes());
    raw.send(&p).await;
    let msgs = raw.until_ready().await;
    assert_eq!(msgs[0].0, b'v', "{}", types(&msgs));
    assert_eq!(status(&msgs), b'I');
}

#[tokio::test]
async fn vanished_client_mid_transaction_does_not_disturb_others() {
    let server = start(ServerConfig::default()).await;
    let mut other = Raw::connect(server.addr).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(&query("BEGIN")).await;
    assert_eq!(status(&raw.until_ready().await), b'T');
    // Half a message, then gone.
    raw.send(&[b'Q', 0, 0, 0, 100, b'S']).await;
    drop(raw);
    other.send(&query("SELECT 1")).await;
    assert_eq!(types(&other.until_ready().await), "TDCZ");
    assert_serves(server.addr).await;
}

#[tokio::test]
async fn connection_limit_is_53300_and_frees_up() {
    let server = start(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await;
    let first = Raw::connect(server.addr).await;
    let mut second = Raw::connect_only(server.addr).await;
    second.send(&startup_packet("postgres")).await;
    let msgs = second.until_closed().await;
    assert_eq!(types(&msgs), "E");
    assert_eq!(sqlstate(&msgs[0].1), "53300");
    drop(first);
    // The slot is released when the first connection's task ends; poll briefly.
    for attempt in 0.. {
        let mut raw = Raw::connect_only(server.addr).await;
        raw.send(&startup_packet("postgres")).await;
        let msgs = raw.until_ready().await;
        if msgs.last().map(|m| m.0) == Some(b'Z') {
            break;
        }
        assert!(attempt < 50, "slot never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cancel_request_is_accepted_and_closes_its_connection() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect_only(server.addr).await;
    raw.send(&startup_packet("postgres")).await;
    let msgs = raw.until_ready().await;
    let key = msgs.iter().find(|m| m.0 == b'K').expect("BackendKeyData");
    assert_eq!(key.1.len(), 8);
    for secret in [[0u8; 4], [key.1[4], key.1[5], key.1[6], key.1[7]]] {
        let mut cancel = Raw::connect_only(server.addr).await;
        let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        p.extend_from_slice(&key.1[..4]);
        p.extend_from_slice(&secret);
        cancel.send(&p).await;
        assert!(cancel.until_closed().await.is_empty());
    }
    // A cancel with nothing running does not break the session.
    raw.send(&query("SELECT 1")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "TDCZ");
}

fn parse_typed(sql: &str, oids: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&(oids.len() as u16).to_be_bytes());
    for oid in oids {
        b.extend_from_slice(&oid.to_be_bytes());
    }
    message(b'P', &b)
}

fn bind_params(formats: &[i16], params: &[Option<&[u8]>], result_formats: &[i16]) -> Vec<u8> {
    let mut b = vec![0u8, 0u8];
    b.extend_from_slice(&(formats.len() as u16).to_be_bytes());
    for f in formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        match p {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b.extend_from_slice(&(result_formats.len() as u16).to_be_bytes());
    for f in result_formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    message(b'B', &b)
}

#[tokio::test]
async fn bad_parameter_values_get_their_sqlstates() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    // (Parse type OIDs, Bind parameter formats, parameters, result formats, SQLSTATE)
    type Case<'a> = (
        &'a [u32],
        &'a [i16],
        &'a [Option<&'a [u8]>],
        &'a [i16],
        &'a str,
    );
    let cases: [Case; 6] = [
        // Binary int4 with two bytes.
        (&[23], &[1], &[Some(&[0, 1])], &[], "22P03"),
        // Text int4 that is not a number, and one out of range for int2.
        (&[23], &[0], &[Some(b"abc")], &[], "22P02"),
        (&[21], &[], &[Some(b"70000")], &[], "22003"),
        // Text that is not UTF-8.
        (&[25], &[0], &[Some(&[0xff, 0xfe])], &[], "22021"),
        // A format code that does not exist, and a format count that does not match.
        (&[23], &[2], &[Some(b"1")], &[], "08P01"),
        (
            &[23, 23],
            &[0, 1, 0],
            &[Some(b"1"), Some(b"2")],
            &[],
            "08P01",
        ),
    ];
    for (oids, formats, params, result_formats, code) in cases {
        raw.send(
            &[
                parse_typed("BEGIN", oids),
                bind_params(formats, params, result_formats),
                execute(""),
                sync(),
            ]
            .concat(),
        )
        .await;
        let msgs = raw.until_ready().await;
        assert_eq!(types(&msgs), "1EZ", "{code}");
        assert_eq!(sqlstate(&msgs[1].1), code);
        assert_eq!(status(&msgs), b'I');
    }
    // A type OID we do not support is refused at Parse.
    raw.send(&[parse_typed("BEGIN", &[600]), sync()].concat())
        .await;
    let msgs = raw.until_ready().await;
    assert_eq!(sqlstate(&msgs[0].1), "0A000");
    // Good values in both formats, including NULL, bind and run.
    raw.send(
        &[
            parse_typed("BEGIN", &[23, 1700, 2950, 1082]),
            bind_params(
                &[1, 0, 1, 0],
                &[
                    Some(&7i32.to_be_bytes()),
                    Some(b"-12.50"),
                    Some(&[7u8; 16]),
                    None,
                ],
                &[],
            ),
            execute(""),
            sync(),
        ]
        .concat(),
    )
    .await;
    let msgs = raw.until_ready().await;
    assert_eq!(types(&msgs), "12CZ");
    assert_eq!(status(&msgs), b'T');
}

#[tokio::test]
async fn flush_delivers_replies_before_sync() {
    let server = start(ServerConfig::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(&[parse("s", "BEGIN"), message(b'H', &[])].concat())
        .await;
    assert_eq!(raw.recv().await.map(|m| m.0), Some(b'1'));
    raw.send(&[bind("", "s"), execute(""), sync()].concat())
        .await;
    assert_eq!(types(&raw.until_ready().await), "2CZ");
}
