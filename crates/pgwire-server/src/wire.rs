//! Framing: reads whole frontend frames with their length checked before any body is
//! buffered, and buffers backend messages (encoded with pgwire's types) until a flush.

use crate::frontend::{ProtocolViolation, MAX_STARTUP_PACKET_BYTES};
use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::PgWireBackendMessage;
use pgwire::tokio::server::MaybeTls;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection at a message boundary.
    Closed,
    Io(io::Error),
    Protocol(ProtocolViolation),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

pub struct Wire {
    stream: MaybeTls,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_message_bytes: usize,
    flush_bytes: usize,
    pub is_tls: bool,
}

impl Wire {
    pub fn new(
        stream: MaybeTls,
        is_tls: bool,
        max_message_bytes: usize,
        flush_bytes: usize,
    ) -> Wire {
        Wire {
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            write_buf: BytesMut::with_capacity(8 * 1024),
            max_message_bytes,
            flush_bytes,
            is_tls,
        }
    }

    /// One untyped startup packet's body (after the length word).
    pub async fn read_startup(&mut self) -> Result<Bytes, ReadError> {
        self.read_frame_inner(0, 8, MAX_STARTUP_PACKET_BYTES)
            .await
            .map(|(_, body)| body)
    }

    /// One typed message: its type byte and body (after the length word).
    pub async fn read_message(&mut self) -> Result<(u8, Bytes), ReadError> {
        self.read_frame_inner(1, 4, self.max_message_bytes).await
    }

    async fn read_frame_inner(
        &mut self,
        header: usize,
        min: usize,
        max: usize,
    ) -> Result<(u8, Bytes), ReadError> {
        loop {
            if self.read_buf.len() >= header + 4 {
                let mut len_bytes = [0u8; 4];
                len_bytes.copy_from_slice(&self.read_buf[header..header + 4]);
                let len = i32::from_be_bytes(len_bytes);
                // Checked before the body is read: an oversized length must not make
                // the server buffer (or wait for) gigabytes.
                if len < min as i32 || len as usize > max {
                    return Err(ReadError::Protocol(ProtocolViolation::new(format!(
                        "invalid message length {len}"
                    ))));
                }
                let total = header + len as usize;
                if self.read_buf.len() >= total {
                    let mut frame = self.read_buf.split_to(total);
                    let ty = if header == 1 { frame[0] } else { 0 };
                    let body = frame.split_off(header + 4).freeze();
                    return Ok((ty, body));
                }
                self.read_buf.reserve(total - self.read_buf.len());
            }
            // About to wait for the client: whatever we owe it must be on the wire
            // first, or a client that waits for our answer would deadlock with us.
            self.flush().await?;
            let n = self.stream.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(if self.read_buf.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-message",
                    ))
                });
            }
        }
    }

    /// Queues a message; writes once the buffer is past the flush threshold.
    pub async fn send(&mut self, message: PgWireBackendMessage) -> io::Result<()> {
        message
            .encode(&mut self.write_buf)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if self.write_buf.len() >= self.flush_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    /// Queues a DataRow ('D') of `field_count` values that `encode` appends in place,
    /// with no buffer or message value per row (see `send_encoded`).
    pub async fn send_data_row<E: From<io::Error>>(
        &mut self,
        field_count: i16,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), E> {
        self.send_encoded(b'D', |out| {
            out.put_i16(field_count);
            encode(out)
        })
        .await
    }

    /// Queues a backend message of type `ty` whose body `encode` appends in place;
    /// the length word is filled in afterwards. If `encode` fails, nothing of the
    /// message is queued. Writes once the buffer is past the flush threshold, as
    /// `send` does.
    pub async fn send_encoded<E: From<io::Error>>(
        &mut self,
        ty: u8,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.write_buf.len();
        self.write_buf.put_u8(ty);
        self.write_buf.put_i32(0); // length, filled in below
        if let Err(e) = encode(&mut self.write_buf) {
            self.write_buf.truncate(start);
            return Err(e);
        }
        let Ok(len) = i32::try_from(self.write_buf.len() - start - 1) else {
            self.write_buf.truncate(start);
            return Err(io::Error::other("message too large").into());
        };
        self.write_buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        if self.write_buf.len() >= self.flush_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            self.stream.flush().await?;
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
