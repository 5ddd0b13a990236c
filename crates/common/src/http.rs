//! A deliberately tiny HTTP/1.1 server and client over tokio.
//!
//! Every Borealis process serves `/health` and `/metrics` and the control plane serves
//! its JSON API; the CLI is a client. One request per connection (`Connection:
//! close`), bodies bounded by [`MAX_BODY_BYTES`]: this is an operations channel, not a
//! data path, so a full HTTP stack would only add build time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest request or response body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;
const MAX_HEADER_LINES: usize = 100;
const MAX_LINE_BYTES: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; version=0.0.4",
            body: body.into().into_bytes(),
        }
    }
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o error talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out talking to {0}")]
    Timeout(String),
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
}

/// Serves `handler` on an already-bound listener until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve_one(stream, handler)).await;
        });
    }
}

async fn serve_one<H, F>(stream: TcpStream, handler: Arc<H>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let response = match read_request(&mut reader).await {
        Ok(request) => handler(request).await,
        Err(e) => Response::error(400, e.to_string()),
    };
    let _ = write_response(&mut write, &response).await;
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let mut limited = reader.take(MAX_LINE_BYTES as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| HttpError::Malformed(e.to_string()))?;
    if !line.ends_with(b"\n") {
        return Err(HttpError::Malformed("line too long or truncated".into()));
    }
    String::from_utf8(line)
        .map(|s| s.trim_end().to_string())
        .map_err(|_| HttpError::Malformed("header is not UTF-8".into()))
}

/// Reads headers until the blank line; returns Content-Length.
async fn read_headers<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<usize, HttpError> {
    let mut content_length = 0usize;
    for _ in 0..MAX_HEADER_LINES {
        let line = read_line(reader).await?;
        if line.is_empty() {
            if content_length > MAX_BODY_BYTES {
                return Err(HttpError::Malformed(format!(
                    "body of {content_length} bytes is too large"
                )));
            }
            return Ok(content_length);
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad Content-Length".into()))?;
            }
        }
    }
    Err(HttpError::Malformed("too many header lines".into()))
}

async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Request, HttpError> {
    let request_line = read_line(reader).await?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed(format!(
            "bad request line {request_line:?}"
        )));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let content_length = read_headers(reader).await?;
    let mut body = vec![0u8; content_length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| HttpError::Malformed(e.to_string()))?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body,
    })
}

async fn write_response<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    r: &Response,
) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason,
        r.content_type,
        r.body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(&r.body).await?;
    w.flush().await
}

/// Sends one request and returns (status, body). Bounded by `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let who = addr.to_string();
    let fut = async {
        let io = |source| HttpError::Io {
            addr: who.clone(),
            source,
        };
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {who}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body.as_bytes()).await.map_err(io)?;
        let mut reader = BufReader::new(stream);
        let status_line = read_line(&mut reader).await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HttpError::Malformed(format!("bad status line {status_line:?}")))?;
        let content_length = read_headers(&mut reader).await?;
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body).await.map_err(io)?;
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout(addr.to_string()))?
}

/// GET returning parsed JSON (any status; the caller checks `status`).
pub async fn get_json(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), HttpError> {
    let (status, body) = request(addr, "GET", path, None, timeout).await?;
    let value = serde_json::from_slice(&body).map_err(|e| HttpError::Malformed(e.to_string()))?;
    Ok((status, value))
}

/// POST a JSON body, returning parsed JSON.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), HttpError> {
    let (status, body) = request(addr, "POST", path, Some(body), timeout).await?;
    let value = serde_json::from_slice(&body).map_err(|e| HttpError::Malformed(e.to_string()))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_bad_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, |req: Request| async move {
            match req.path.as_str() {
                "/echo" => Response::json(
                    200,
                    &serde_json::json!({ "len": req.body.len(), "q": req.query }),
                ),
                _ => Response::error(404, "no such path"),
            }
        }));
        let (status, v) = post_json(
            addr,
            "/echo?x=1",
            &serde_json::json!({"a": 1}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["q"], "x=1");
        assert_eq!(v["len"], 7);
        let (status, _) = get_json(addr, "/nope", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, 404);
        // Garbage instead of HTTP gets a 400, and the server keeps serving.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        let (status, _) = get_json(addr, "/echo", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, 200);
        server.abort();
    }
}
