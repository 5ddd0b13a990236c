//! Frontend (client → server) messages: framing limits and a bounds-checked decoder.
//!
//! pgwire 0.42.1 ships decoders for these messages, but they read fields with
//! `bytes::Buf::get_*`, which panics on a short buffer, and they read C strings past
//! the end of the frame. A client that sends `B` with a truncated body would panic the
//! connection task. DESIGN.md invariant 10 forbids that, so the front end decodes
//! frontend messages itself: every read here is checked against the frame, and any
//! inconsistency is a [`ProtocolViolation`] (FATAL 08P01 for the connection).
//! Backend messages are still encoded with pgwire's types.

use bytes::Bytes;

/// A malformed or unexpected message: the connection is closed with FATAL 08P01.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolViolation(pub String);

impl ProtocolViolation {
    pub fn new(message: impl Into<String>) -> ProtocolViolation {
        ProtocolViolation(message.into())
    }
}

/// Startup packets are untyped: a length, then a 32-bit code.
pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// PostgreSQL's own limit for startup packets (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;

/// The first packet on a connection (after an optional SSL/GSS negotiation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        major: u16,
        minor: u16,
        parameters: Vec<(String, String)>,
    },
}

/// Decodes the body of a startup packet (everything after the length word).
pub fn decode_startup(body: Bytes) -> Result<StartupPacket, ProtocolViolation> {
    let mut r = Reader::new(body);
    let code = r.i32()?;
    match code {
        SSL_REQUEST_CODE => {
            r.finish()?;
            Ok(StartupPacket::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            r.finish()?;
            Ok(StartupPacket::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let pid = r.i32()?;
            let secret = r.i32()?;
            // Protocol 3.2 allows longer keys; we only issue 4-byte ones, so a longer
            // key can never match and is refused as malformed.
            r.finish()?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            let mut parameters = Vec::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                parameters.push((name, value));
            }
            r.finish()?;
            Ok(StartupPacket::Startup {
                major,
                minor,
                parameters,
            })
        }
    }
}

/// Messages after startup. `Password` is the raw body of a 'p' message, whose
/// meaning (password, SASLInitialResponse, SASLResponse) depends on the auth state.
#[derive(Debug, Clone, PartialEq)]
pub enum FrontendMessage {
    Query(String),
    Parse {
        name: String,
        sql: String,
        param_oids: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        param_formats: Vec<i16>,
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Sync,
    Flush,
    Terminate,
    CopyData(Bytes),
    CopyDone,
    CopyFail(String),
    Password(Bytes),
}

impl FrontendMessage {
    /// A message of the extended query protocol: errors in these discard input until Sync.
    pub fn is_extended(&self) -> bool {
        matches!(
            self,
            FrontendMessage::Parse { .. }
                | FrontendMessage::Bind { .. }
                | FrontendMessage::Describe { .. }
                | FrontendMessage::Execute { .. }
                | FrontendMessage::Close { .. }
                | FrontendMessage::Sync
                | FrontendMessage::Flush
        )
    }
}

/// Decodes one typed message whose frame (type byte and length) was already checked.
pub fn decode(ty: u8, body: Bytes) -> Result<FrontendMessage, ProtocolViolation> {
    let mut r = Reader::new(body);
    let msg = match ty {
        b'Q' => FrontendMessage::Query(r.cstr()?),
        b'P' => {
            let name = r.cstr()?;
            let sql = r.cstr()?;
            let n = r.count()?;
            let mut param_oids = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                param_oids.push(r.i32()? as u32);
            }
            FrontendMessage::Parse {
                name,
                sql,
                param_oids,
            }
        }
        b'B' => {
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            let n = r.count()?;
            let mut param_formats = Vec::with_capacity(n.min(r.remaining() / 2));
            for _ in 0..n {
                param_formats.push(r.i16()?);
            }
            let n = r.count()?;
            let mut params = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                let len = r.i32()?;
                if len == -1 {
                    params.push(None);
                } else if len < 0 {
                    return Err(ProtocolViolation::new(format!(
                        "invalid parameter length {len}"
                    )));
                } else {
                    params.push(Some(r.bytes(len as usize)?));
                }
            }
            let n = r.count()?;
            let mut result_formats = Vec::with_capacity(n.min(r.remaining() / 2));
            for _ in 0..n {
                result_formats.push(r.i16()?);
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        b'D' | b'C' => {
            let kind = r.u8()?;
            if kind != b'S' && kind != b'P' {
                return Err(ProtocolViolation::new(format!(
                    "invalid {} message subtype {kind}",
                    if ty == b'D' { "DESCRIBE" } else { "CLOSE" }
                )));
            }
            let name = r.cstr()?;
            if ty == b'D' {
                FrontendMessage::Describe { kind, name }
            } else {
                FrontendMessage::Close { kind, name }
            }
        }
        b'E' => {
            let portal = r.cstr()?;
            let max_rows = r.i32()?;
            FrontendMessage::Execute { portal, max_rows }
        }
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'X' => FrontendMessage::Terminate,
        b'd' => FrontendMessage::CopyData(r.rest()),
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail(r.cstr()?),
        b'p' => FrontendMessage::Password(r.rest()),
        other => {
            return Err(ProtocolViolation::new(format!(
                "invalid frontend message type {other}"
            )));
        }
    };
    // PostgreSQL's pq_getmsgend: trailing bytes mean the client and server disagree
    // about the message layout, which is a protocol violation.
    r.finish()?;
    Ok(msg)
}

/// SASLInitialResponse: mechanism name and the optional client-first message.
pub fn decode_sasl_initial(body: Bytes) -> Result<(String, Bytes), ProtocolViolation> {
    let mut r = Reader::new(body);
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        Bytes::new()
    } else {
        r.bytes(len as usize)?
    };
    r.finish()?;
    Ok((mechanism, data))
}

/// A cursor over one frame; every read is checked against what is left.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn short() -> ProtocolViolation {
        ProtocolViolation::new("invalid message format")
    }
    fn u8(&mut self) -> Result<u8, ProtocolViolation> {
        let b = *self.buf.first().ok_or_else(Reader::short)?;
        self.buf = self.buf.slice(1..);
        Ok(b)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolViolation> {
        let head = self.buf.get(..N).ok_or_else(Reader::short)?;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        self.buf = self.buf.slice(N..);
        Ok(out)
    }
    fn i16(&mut self) -> Result<i16, ProtocolViolation> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, ProtocolViolation> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    /// A 16-bit element count (unsigned on the wire, as in PostgreSQL).
    fn count(&mut self) -> Result<usize, ProtocolViolation> {
        Ok(u16::from_be_bytes(self.array()?) as usize)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, ProtocolViolation> {
        if n > self.buf.len() {
            return Err(Reader::short());
        }
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn cstr(&mut self) -> Result<String, ProtocolViolation> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ProtocolViolation::new("invalid string in message"))?;
        let s = self.buf.split_to(end);
        self.buf = self.buf.slice(1..);
        String::from_utf8(s.to_vec())
            .map_err(|_| ProtocolViolation::new("invalid byte sequence for encoding \"UTF8\""))
    }
    fn finish(&self) -> Result<(), ProtocolViolation> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolViolation::new("invalid message format"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_body() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"p1\0s1\0");
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b
    }

    #[test]
    fn decodes_bind() {
        let m = decode(b'B', Bytes::from(bind_body())).unwrap();
        assert_eq!(
            m,
            FrontendMessage::Bind {
                portal: "p1".into(),
                statement: "s1".into(),
                param_formats: vec![1],
                params: vec![Some(Bytes::from_static(&[0, 0, 0, 7])), None],
                result_formats: vec![],
            }
        );
    }

    #[test]
    fn every_truncation_of_bind_is_an_error_not_a_panic() {
        let body = bind_body();
        for cut in 0..body.len() {
            assert!(
                decode(b'B', Bytes::copy_from_slice(&body[..cut])).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn trailing_bytes_and_bad_lengths_are_refused() {
        let mut body = bind_body();
        body.push(0);
        assert!(decode(b'B', Bytes::from(body)).is_err());
        assert!(decode(b'Q', Bytes::from_static(b"SELECT 1")).is_err());
        assert!(decode(b'Q', Bytes::from_static(b"SELECT 1\0x")).is_err());
        assert!(decode(b'D', Bytes::from_static(b"Zname\0")).is_err());
        assert!(decode(b'?', Bytes::new()).is_err());
        let mut neg = Vec::from(&b"\0\0"[..]);
        neg.extend_from_slice(&0u16.to_be_bytes());
        neg.extend_from_slice(&1u16.to_be_bytes());
        neg.extend_from_slice(&(-5i32).to_be_bytes());
        neg.extend_from_slice(&0u16.to_be_bytes());
        assert!(decode(b'B', Bytes::from(neg)).is_err());
    }

    #[test]
    fn decodes_startup_packets() {
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        body.extend_from_slice(b"user\0postgres\0database\0db\0\0");
        assert_eq!(
            decode_startup(Bytes::from(body)).unwrap(),
            StartupPacket::Startup {
                major: 3,
                minor: 0,
                parameters: vec![
                    ("user".into(), "postgres".into()),
                    ("database".into(), "db".into())
                ],
            }
        );
        assert_eq!(
            decode_startup(Bytes::copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes())).unwrap(),
            StartupPacket::SslRequest
        );
        let mut cancel = Vec::new();
        cancel.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        cancel.extend_from_slice(&5i32.to_be_bytes());
        cancel.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            decode_startup(Bytes::from(cancel)).unwrap(),
            StartupPacket::Cancel { pid: 5, secret: 9 }
        );
        // Unterminated parameter list.
        let mut bad = Vec::new();
        bad.extend_from_slice(&196608i32.to_be_bytes());
        bad.extend_from_slice(b"user\0postgres");
        assert!(decode_startup(Bytes::from(bad)).is_err());
        assert!(decode_startup(Bytes::from_static(b"\x00\x03")).is_err());
    }
}
