//! A minimal one-request-at-a-time client of the storage protocol: used by recovery,
//! tests, gossip and the benchmark's rebuild. The volume's write path has its own
//! pipelined driver over the same frames.

use crate::proto::{
    decode_response, encode_request, frame_len, Request, Response, MAX_FRAME_BYTES,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out talking to {0}")]
    Timeout(SocketAddr),
    #[error("protocol error from {addr}: {why}")]
    Protocol { addr: SocketAddr, why: String },
}

pub struct Client {
    addr: SocketAddr,
    stream: TcpStream,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(addr))?
            .map_err(|source| ClientError::Io { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            addr,
            stream,
            next_id: 1,
            timeout,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and waits (bounded by the timeout) for its response.
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let addr = self.addr;
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_request(id, req);
        let io = |source| ClientError::Io { addr, source };
        let fut = async {
            self.stream.write_all(&frame).await.map_err(io)?;
            let mut prefix = [0u8; 4];
            self.stream.read_exact(&mut prefix).await.map_err(io)?;
            let len = frame_len(prefix, MAX_FRAME_BYTES).map_err(|e| ClientError::Protocol {
                addr,
                why: e.to_string(),
            })?;
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).await.map_err(io)?;
            let (rid, resp) = decode_response(&body).map_err(|e| ClientError::Protocol {
                addr,
                why: e.to_string(),
            })?;
            if rid != id {
                return Err(ClientError::Protocol {
                    addr,
                    why: format!("response id {rid} for request {id}"),
                });
            }
            Ok(resp)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(addr))?
    }
}
