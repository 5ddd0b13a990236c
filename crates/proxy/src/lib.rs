//! Endpoints: a TCP proxy that follows the current writer (later pooling, TLS).
//!
//! One proxy process serves one endpoint: the writer endpoint (port P) or the reader
//! endpoint (P+1). For each client connection it asks the control plane where the
//! target instance is (`GET /v1/endpoints`, cached for [`ProxyConfig::route_ttl`]),
//! connects, and splices bytes both ways. The proxy speaks no PostgreSQL: it does not
//! need to, because a connection is routed once, at connect time, which is also when
//! a client notices a failover (its old connection breaks; the new one goes to the
//! new writer).
//!
//! * While the control plane reports no available target (a writer restarting or
//!   failing over), a new connection waits up to [`ProxyConfig::connect_wait`],
//!   refreshing the route, instead of failing at once: clients see a slow connect
//!   rather than an error during a short outage.
//! * The reader endpoint spreads connections round-robin over available readers and
//!   falls back to the writer when there are none (what Aurora's reader endpoint
//!   does for a cluster without replicas).
//! * When the control plane reports a handoff socket for the target (an instance on
//!   this host), the proxy passes the client socket itself to the instance
//!   (`borealis_common::handoff`) and is out of the data path from then on; it
//!   splices bytes only when that is impossible (another host, no socket).
//! * Connections are bounded ([`ProxyConfig::max_connections`]); beyond that new
//!   clients wait in the accept queue (backpressure, invariant 9).

use borealis_common::handoff;
use borealis_common::http::{self, Request, Response};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Writer,
    Reader,
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writer" => Ok(Endpoint::Writer),
            "reader" => Ok(Endpoint::Reader),
            other => Err(format!("unknown endpoint role {other:?} (writer, reader)")),
        }
    }
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Writer => "writer",
            Endpoint::Reader => "reader",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// `/health` and `/metrics`.
    pub http: Option<SocketAddr>,
    /// The control API.
    pub control: SocketAddr,
    pub endpoint: Endpoint,
    pub max_connections: usize,
    /// How long a looked-up route is trusted before asking the control plane again.
    pub route_ttl: Duration,
    /// How long a new client connection may wait for a target to become reachable.
    pub connect_wait: Duration,
    pub connect_timeout: Duration,
}

impl ProxyConfig {
    pub fn new(listen: SocketAddr, control: SocketAddr, endpoint: Endpoint) -> ProxyConfig {
        ProxyConfig {
            listen,
            http: None,
            control,
            endpoint,
            max_connections: 1024,
            route_ttl: Duration::from_secs(1),
            connect_wait: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// An instance a connection can be routed to.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    /// The instance's handoff socket, when it is on this host.
    handoff: Option<std::path::PathBuf>,
}

/// Where a client connection went.
enum Backend {
    /// Spliced over a TCP connection of our own.
    Tcp(TcpStream),
    /// Handed to the instance over this Unix connection.
    Handoff(tokio::net::UnixStream),
}

/// A route: where new connections go, and when we learned it.
#[derive(Debug, Clone)]
struct Route {
    targets: Vec<Target>,
    fetched: Instant,
}

struct Proxy {
    config: ProxyConfig,
    route: Mutex<Option<Route>>,
    round_robin: AtomicUsize,
    connections: Arc<Semaphore>,
    active: AtomicUsize,
    accepted_total: AtomicU64,
    failed_total: AtomicU64,
    bytes_total: AtomicU64,
    handed_off_total: AtomicU64,
}

impl Proxy {
    /// Asks the control plane for the current targets of this endpoint.
    async fn fetch_route(&self) -> Result<Route, String> {
        let (status, body) =
            http::get_json(self.config.control, "/v1/endpoints", Duration::from_secs(2))
                .await
                .map_err(|e| format!("control plane unreachable: {e}"))?;
        if status != 200 {
            return Err(format!("control plane answered {status}"));
        }
        let parse = |v: &Value| -> Option<Target> {
            Some(Target {
                name: v.get("name")?.as_str()?.to_string(),
                addr: v.get("addr")?.as_str()?.parse().ok()?,
                handoff: v
                    .get("handoff")
                    .and_then(|h| h.as_str())
                    .map(std::path::PathBuf::from),
            })
        };
        let writer: Vec<Target> = body.get("writer").and_then(parse).into_iter().collect();
        let readers: Vec<Target> = body
            .get("readers")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(parse).collect())
            .unwrap_or_default();
        let targets = match self.config.endpoint {
            Endpoint::Writer => writer,
            Endpoint::Reader if readers.is_empty() => writer,
            Endpoint::Reader => readers,
        };
        Ok(Route {
            targets,
            fetched: Instant::now(),
        })
    }

    /// Picks a target: the cached route while fresh, else a new one.
    async fn pick(&self, force_refresh: bool) -> Result<Target, String> {
        let cached = self.route.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let route = match cached {
            Some(r)
                if !force_refresh
                    && r.fetched.elapsed() < self.config.route_ttl
                    && !r.targets.is_empty() =>
            {
                r
            }
            _ => {
                let r = self.fetch_route().await?;
                *self.route.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
                r
            }
        };
        if route.targets.is_empty() {
            return Err(format!(
                "no available {} instance",
                self.config.endpoint.as_str()
            ));
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % route.targets.len();
        Ok(route.targets[i].clone())
    }

    /// Connects to a target (its handoff socket when it has one, else its TCP port),
    /// retrying with fresh routes until `connect_wait`.
    async fn connect_backend(&self) -> Result<(String, Backend), String> {
        let deadline = Instant::now() + self.config.connect_wait;
        let mut refresh = false;
        let mut pause = Duration::from_millis(50);
        loop {
            let last_error = match self.pick(refresh).await {
                Ok(t) => {
                    let handoff = match &t.handoff {
                        Some(path) => tokio::time::timeout(
                            self.config.connect_timeout,
                            tokio::net::UnixStream::connect(path),
                        )
                        .await
                        .ok()
                        .and_then(|r| {
                            r.map_err(|e| log::debug!("{}: handoff socket: {e}", t.name))
                                .ok()
                        }),
                        None => None,
                    };
                    if let Some(sock) = handoff {
                        return Ok((t.name, Backend::Handoff(sock)));
                    }
                    match tokio::time::timeout(
                        self.config.connect_timeout,
                        TcpStream::connect(t.addr),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => return Ok((t.name, Backend::Tcp(stream))),
                        Ok(Err(e)) => format!("{} at {}: {e}", t.name, t.addr),
                        Err(_) => format!("{} at {}: connect timed out", t.name, t.addr),
                    }
                }
                Err(e) => e,
            };
            if Instant::now() + pause >= deadline {
                return Err(last_error);
            }
            log::debug!("backend not reachable yet ({last_error}); retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            refresh = true;
        }
    }

    async fn serve_client(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let (name, backend) = match self.connect_backend().await {
            Ok(b) => b,
            Err(e) => {
                self.failed_total.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "client {peer}: no backend for the {} endpoint: {e}",
                    self.config.endpoint.as_str()
                );
                let message = format!(
                    "no {} instance is available right now ({e})",
                    self.config.endpoint.as_str()
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    refuse_startup(&mut client, &message),
                )
                .await;
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let mut backend = match backend {
            Backend::Handoff(sock) => {
                use std::os::fd::AsRawFd;
                let sent = tokio::time::timeout(
                    self.config.connect_timeout,
                    handoff::send_fd(&sock, client.as_raw_fd()),
                )
                .await;
                match sent {
                    Ok(Ok(())) => {
                        // The instance holds its own copy of the socket now; ours
                        // closes when `client` drops.
                        self.handed_off_total.fetch_add(1, Ordering::Relaxed);
                        log::debug!("client {peer} handed to {name}");
                        return;
                    }
                    Ok(Err(e)) => log::warn!("client {peer}: handoff to {name} failed: {e}"),
                    Err(_) => log::warn!("client {peer}: handoff to {name} timed out"),
                }
                // Nothing was read from the client yet: splicing is still possible.
                match self.connect_backend_tcp(&name).await {
                    Some(b) => b,
                    None => return,
                }
            }
            Backend::Tcp(b) => b,
        };
        let _ = backend.set_nodelay(true);
        log::debug!("client {peer} -> {name}");
        match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
            Ok((up, down)) => {
                self.bytes_total.fetch_add(up + down, Ordering::Relaxed);
            }
            Err(e) => log::debug!("client {peer} -> {name}: {e}"),
        }
    }

    /// The TCP fallback after a failed handoff to `name`.
    async fn connect_backend_tcp(&self, name: &str) -> Option<TcpStream> {
        let route = self.route.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let addr = route?.targets.into_iter().find(|t| t.name == name)?.addr;
        tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()
    }

    fn health(&self) -> Value {
        let route = self.route.lock().unwrap_or_else(|p| p.into_inner()).clone();
        json!({
            "status": "ok",
            "role": format!("proxy-{}", self.config.endpoint.as_str()),
            "listen": self.config.listen.to_string(),
            "targets": route.map(|r| r.targets.iter().map(|t| json!({"name": t.name, "addr": t.addr.to_string(), "handoff": t.handoff.is_some()})).collect::<Vec<_>>()),
            "connections": self.active.load(Ordering::Relaxed),
            "max_connections": self.config.max_connections,
        })
    }

    fn metrics(&self) -> String {
        let e = self.config.endpoint.as_str();
        format!(
            "# TYPE borealis_proxy_connections gauge\nborealis_proxy_connections{{endpoint=\"{e}\"}} {}\n\
             # TYPE borealis_proxy_connections_accepted_total counter\nborealis_proxy_connections_accepted_total{{endpoint=\"{e}\"}} {}\n\
             # TYPE borealis_proxy_connections_failed_total counter\nborealis_proxy_connections_failed_total{{endpoint=\"{e}\"}} {}\n\
             # TYPE borealis_proxy_bytes_total counter\nborealis_proxy_bytes_total{{endpoint=\"{e}\"}} {}\n\
             # TYPE borealis_proxy_connections_handed_off_total counter\nborealis_proxy_connections_handed_off_total{{endpoint=\"{e}\"}} {}\n",
            self.active.load(Ordering::Relaxed),
            self.accepted_total.load(Ordering::Relaxed),
            self.failed_total.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
            self.handed_off_total.load(Ordering::Relaxed),
        )
    }
}

/// Tells a PostgreSQL client why it cannot be served, in its own protocol: reads
/// its startup packet (declining SSL/GSS encryption requests first) and answers
/// with a FATAL ErrorResponse, SQLSTATE 57P03 (cannot connect now), so psql and
/// drivers print a real reason instead of "server closed the connection".
async fn refuse_startup(client: &mut TcpStream, message: &str) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SSL_REQUEST: u32 = 80877103;
    const GSSENC_REQUEST: u32 = 80877104;
    const CANCEL_REQUEST: u32 = 80877102;
    const MAX_STARTUP_BYTES: u32 = 10_000;
    for _ in 0..3 {
        let len = client.read_u32().await?;
        if !(8..=MAX_STARTUP_BYTES).contains(&len) {
            return Ok(());
        }
        let code = client.read_u32().await?;
        let mut rest = vec![0u8; len as usize - 8];
        client.read_exact(&mut rest).await?;
        match code {
            SSL_REQUEST | GSSENC_REQUEST => client.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(()),
            _ => {
                let mut fields = Vec::new();
                for (tag, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "57P03"),
                    (b'M', message),
                ] {
                    fields.push(tag);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut msg = vec![b'E'];
                msg.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                msg.extend_from_slice(&fields);
                client.write_all(&msg).await?;
                return client.flush().await;
            }
        }
    }
    Ok(())
}

/// Runs the proxy until the returned future is dropped (the binary drops it on
/// SIGTERM/SIGINT).
pub async fn run(config: ProxyConfig) -> Result<(), ProxyError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
    let http_listener = match config.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { addr, source })?,
        ),
        None => None,
    };
    let proxy = Arc::new(Proxy {
        connections: Arc::new(Semaphore::new(config.max_connections)),
        config,
        route: Mutex::new(None),
        round_robin: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        accepted_total: AtomicU64::new(0),
        failed_total: AtomicU64::new(0),
        bytes_total: AtomicU64::new(0),
        handed_off_total: AtomicU64::new(0),
    });
    if let Some(l) = http_listener {
        let p = proxy.clone();
        tokio::spawn(http::serve(l, move |req: Request| {
            let p = p.clone();
            async move {
                match req.path.as_str() {
                    "/health" => Response::json(200, &p.health()),
                    "/metrics" => Response::text(200, p.metrics()),
                    _ => Response::error(404, "no such path"),
                }
            }
        }));
    }
    log::info!(
        "{} endpoint listening on {}",
        proxy.config.endpoint.as_str(),
        proxy.config.listen
    );
    loop {
        // Take a connection slot before accepting: at the limit, clients queue in the
        // kernel's backlog instead of in our memory.
        let Ok(permit) = proxy.connections.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        proxy.accepted_total.fetch_add(1, Ordering::Relaxed);
        let p = proxy.clone();
        tokio::spawn(async move {
            p.active.fetch_add(1, Ordering::Relaxed);
            p.clone().serve_client(stream, peer).await;
            p.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Echoes whatever arrives on `s` until it closes.
    async fn echo(mut s: TcpStream) {
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }

    /// A loopback address nothing listens on yet.
    fn free_addr() -> SocketAddr {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr")
    }

    /// A control plane answering every request with `endpoints`.
    async fn fake_control(endpoints: Value) -> SocketAddr {
        let control = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = control.local_addr().expect("addr");
        tokio::spawn(http::serve(control, move |_req: Request| {
            let v = endpoints.clone();
            async move { Response::json(200, &v) }
        }));
        addr
    }

    /// Connects to the proxy under test once it listens (it starts in a task).
    async fn connect_when_listening(listen: SocketAddr) -> TcpStream {
        for _ in 0..100 {
            if let Ok(c) = TcpStream::connect(listen).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("proxy not listening on {listen}");
    }

    /// A fake control plane that points the writer endpoint at `backend`, and an echo
    /// server as the backend: bytes go through the proxy both ways.
    #[tokio::test]
    async fn splices_to_the_writer_reported_by_the_control_plane() {
        let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend_addr = backend.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = backend.accept().await {
                tokio::spawn(echo(s));
            }
        });
        let control_addr = fake_control(json!({"writer": {"name": "instance-1", "addr": backend_addr.to_string()}, "readers": []})).await;
        let listen = free_addr();
        // The reader endpoint falls back to the writer when there are no readers.
        let proxy = tokio::spawn(run(ProxyConfig::new(
            listen,
            control_addr,
            Endpoint::Reader,
        )));
        let mut client = connect_when_listening(listen).await;
        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        proxy.abort();
    }

    /// A target with a handoff socket gets the client socket itself: the echo server
    /// below answers on the very descriptor the proxy accepted.
    #[tokio::test]
    async fn hands_the_client_socket_to_a_local_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        let unix = tokio::net::UnixListener::bind(&path).expect("bind unix");
        tokio::spawn(async move {
            while let Ok((sock, _)) = unix.accept().await {
                let fd = handoff::recv_fd(&sock).await.expect("descriptor");
                let std_stream = std::net::TcpStream::from(fd);
                std_stream.set_nonblocking(true).expect("nonblocking");
                let s = TcpStream::from_std(std_stream).expect("tokio stream");
                tokio::spawn(echo(s));
            }
        });
        // The TCP address is unreachable: only the handoff can work.
        let control_addr = fake_control(json!({"writer": {"name": "instance-1", "addr": "127.0.0.1:1", "handoff": path.display().to_string()}, "readers": []})).await;
        let listen = free_addr();
        let proxy = tokio::spawn(run(ProxyConfig::new(
            listen,
            control_addr,
            Endpoint::Writer,
        )));
        let mut client = connect_when_listening(listen).await;
        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        proxy.abort();
    }

    /// With no writer to route to, the client gets a PostgreSQL FATAL error
    /// (after its SSL request is declined), not a silently closed socket.
    #[tokio::test]
    async fn without_a_writer_clients_get_a_protocol_error() {
        let control_addr = fake_control(json!({"writer": null, "readers": []})).await;
        let listen = free_addr();
        let mut config = ProxyConfig::new(listen, control_addr, Endpoint::Writer);
        config.connect_wait = Duration::from_millis(200);
        let proxy = tokio::spawn(run(config));
        let mut client = connect_when_listening(listen).await;
        client
            .write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
            .await
            .expect("ssl request");
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.expect("ssl answer");
        assert_eq!(&n, b"N");
        let mut startup = vec![0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0\0");
        let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&startup);
        client.write_all(&packet).await.expect("startup");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer.first(), Some(&b'E'));
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains("57P03") && text.contains("no writer instance is available"),
            "{text}"
        );
        proxy.abort();
    }
}
