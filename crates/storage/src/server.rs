//! The tokio driver of a storage node: sockets, the node's event loop, group commit,
//! background ticks, and `/health` + `/metrics`.
//!
//! ```text
//!   conn task (1 per client) ──frames──> node loop (owns Node<FileDisk>) ──> fdatasync (inline)
//!        ^                                   │  replies that wait for durability
//!        └──────── bounded reply queue <─────┘  are released when that sync returns
//! ```
//!
//! One task owns the node state, so no lock is held across an await. Appends are
//! buffered as they arrive; after each drain of the incoming queue one journal write
//! and fdatasync (run inline, see `node_loop`) covers everything appended so far, and
//! whatever arrives meanwhile forms the next group commit.

use crate::disk::FileDisk;
use crate::node::{Handled, Node, NodeLimits};
use crate::proto::{decode_request, encode_response, frame_len, Request, Response};
use borealis_common::{Lsn, PgId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub az: String,
    /// Storage protocol address (port 0 picks one; see [`NodeHandle::addr`]).
    pub listen: SocketAddr,
    /// `/health` and `/metrics`.
    pub http: Option<SocketAddr>,
    /// Largest frame accepted from a peer.
    pub max_frame_bytes: usize,
    /// Requests queued from all connections to the node loop.
    pub queue_depth: usize,
    /// Replies queued per connection; a client that does not read them is cut off.
    pub reply_queue_depth: usize,
    pub max_connections: usize,
    /// Requests handled between two looks at the sync state (bounds a batch).
    pub max_batch_requests: usize,
    pub tick_interval: Duration,
    pub limits: NodeLimits,
    /// Storage protocol addresses of the other storage nodes, for gossip (filling
    /// holes, catching up after an outage, rebuilding a replaced segment). Empty:
    /// no gossip.
    pub peers: Vec<SocketAddr>,
    /// Our own bound address (filled in by `start`; gossip skips it).
    pub listen_addr: Option<SocketAddr>,
    /// Pause between gossip rounds that found nothing to fetch.
    pub gossip_interval: Duration,
    /// Bytes asked for per gossip ReadLog.
    pub gossip_chunk_bytes: u32,
    /// Pause between two background scrub steps (each re-reads at most
    /// `limits.scrub_step_bytes` of one segment log and checks its CRCs).
    pub scrub_interval: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf, name: &str, az: &str, listen: SocketAddr) -> NodeConfig {
        NodeConfig {
            data_dir,
            name: name.to_string(),
            az: az.to_string(),
            listen,
            http: None,
            max_frame_bytes: crate::proto::MAX_FRAME_BYTES,
            queue_depth: 4096,
            reply_queue_depth: 4096,
            max_connections: 1024,
            max_batch_requests: 1024,
            tick_interval: Duration::from_millis(200),
            peers: Vec::new(),
            listen_addr: None,
            gossip_interval: Duration::from_millis(200),
            gossip_chunk_bytes: 4 << 20,
            // 1 MiB per step: 2 MB/s per node, a 1 GB node checked every ~9 min,
            // without taking a noticeable share of a busy node's CPU and disk.
            scrub_interval: Duration::from_millis(500),
            limits: NodeLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open data directory {dir}: {source}")]
    Open { dir: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running node. Dropping the handle (or [`NodeHandle::kill`]) stops every task of
/// the node at its next await point, like a process kill without the page cache loss.
pub struct NodeHandle {
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    shutdown: Option<watch::Sender<bool>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl NodeHandle {
    pub async fn kill(mut self) {
        self.shutdown.take();
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
    /// Resolves when the node loop exits (it only does on shutdown).
    pub async fn wait(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.shutdown.take();
    }
}

/// Runs a storage node until the process is killed (SIGTERM handling belongs to the
/// binary: dropping this future stops the node).
pub async fn run(config: NodeConfig) -> Result<(), StorageError> {
    let handle = start(config).await?;
    handle.wait().await;
    Ok(())
}

enum Incoming {
    Request {
        conn: Arc<Conn>,
        id: u64,
        req: Request,
    },
    Health(oneshot::Sender<serde_json::Value>),
    Metrics(oneshot::Sender<String>),
    /// Gossip: should we fetch `pg` from a peer at `peer_scl`, and after which LSN.
    GossipFrom {
        pg: borealis_common::PgId,
        peer_scl: borealis_common::Lsn,
        reply: oneshot::Sender<Option<borealis_common::Lsn>>,
    },
    /// Gossip: the peers the writer told us about.
    Peers(oneshot::Sender<Vec<SocketAddr>>),
    /// Gossip: a peer's LogChunk to take in; replies with the number of new records.
    Absorb {
        chunk: Response,
        reply: oneshot::Sender<usize>,
    },
    /// Rebuild: does `pg` need a snapshot from a peer with this GC floor?
    NeedsSnapshot {
        pg: borealis_common::PgId,
        peer_floor: borealis_common::Lsn,
        reply: oneshot::Sender<bool>,
    },
    /// Rebuild: a peer's whole snapshot of `pg` to install.
    InstallSnapshot {
        pg: borealis_common::PgId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// Scrub: the damaged logs waiting for a repair.
    PendingRepairs(oneshot::Sender<Vec<(borealis_common::PgId, borealis_common::Lsn)>>),
    /// Scrub: rewrite a damaged log, with a peer's records for the damaged range.
    Repair {
        pg: borealis_common::PgId,
        chunks: Vec<Response>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

struct Conn {
    peer: SocketAddr,
    replies: mpsc::Sender<Vec<u8>>,
    kill: Notify,
}

impl Conn {
    fn send(&self, id: u64, resp: &Response) {
        if self.replies.try_send(encode_response(id, resp)).is_err() {
            log::warn!(
                "{}: reply queue full or closed; closing the connection",
                self.peer
            );
            self.kill.notify_one();
        }
    }
}

/// Binds the sockets, opens the data directory and starts the node's tasks.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, StorageError> {
    let dir = config.data_dir.display().to_string();
    let disk = FileDisk::open(&config.data_dir).map_err(|source| StorageError::Open {
        dir: dir.clone(),
        source,
    })?;
    let node = Node::open(&config.name, disk, config.limits.clone()).map_err(|source| {
        StorageError::Open {
            dir: dir.clone(),
            source,
        }
    })?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| StorageError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StorageError::Listen {
            addr: config.listen,
            source,
        })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel::<Incoming>(config.queue_depth);

    let mut http_addr = None;
    if let Some(http) = config.http {
        let l = TcpListener::bind(http)
            .await
            .map_err(|source| StorageError::Listen { addr: http, source })?;
        http_addr = l.local_addr().ok();
        let tx = tx.clone();
        let mut sd = shutdown_rx.clone();
        tokio::spawn(async move {
            let serve = borealis_common::http::serve(l, move |req| {
                let tx = tx.clone();
                async move { http_handler(tx, req).await }
            });
            tokio::select! { _ = serve => {}, _ = sd.changed() => {} }
        });
    }

    log::info!(
        "{}: storage node ({}) serving on {addr}, data in {dir}",
        config.name,
        config.az
    );
    let accept_cfg = config.clone();
    let sd = shutdown_rx.clone();
    {
        let mut cfg = config.clone();
        cfg.listen_addr = Some(addr);
        tokio::spawn(gossip_loop(tx.clone(), shutdown_rx.clone(), cfg));
    }
    tokio::spawn(accept_loop(listener, tx, sd, accept_cfg));
    let done = tokio::spawn(node_loop(node, rx, shutdown_rx, config));
    Ok(NodeHandle {
        addr,
        http_addr,
        shutdown: Some(shutdown_tx),
        done: Some(done),
    })
}

async fn http_handler(
    tx: mpsc::Sender<Incoming>,
    req: borealis_common::http::Request,
) -> borealis_common::http::Response {
    use borealis_common::http::Response as H;
    match req.path.as_str() {
        "/health" => {
            let (otx, orx) = oneshot::channel();
            if tx.send(Incoming::Health(otx)).await.is_err() {
                return H::error(503, "node stopped");
            }
            match orx.await {
                Ok(v) => {
                    let ok = v.get("state").and_then(|s| s.as_str()) == Some("available");
                    H::json(if ok { 200 } else { 503 }, &v)
                }
                Err(_) => H::error(503, "node stopped"),
            }
        }
        "/metrics" => {
            let (otx, orx) = oneshot::channel();
            if tx.send(Incoming::Metrics(otx)).await.is_err() {
                return H::error(503, "node stopped");
            }
            match orx.await {
                Ok(s) => H::text(200, s),
                Err(_) => H::error(503, "node stopped"),
            }
        }
        _ => H::error(404, "not found"),
    }
}

async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Incoming>,
    mut shutdown: watch::Receiver<bool>,
    config: NodeConfig,
) {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                log::warn!("{}: accept failed: {e}", config.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.load(std::sync::atomic::Ordering::Relaxed) >= config.max_connections {
            log::warn!(
                "{}: refusing {peer}: {} connections open",
                config.name,
                config.max_connections
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let live = live.clone();
        let tx = tx.clone();
        let sd = shutdown.clone();
        let cfg = config.clone();
        tokio::spawn(async move {
            serve_conn(stream, peer, tx, sd, cfg).await;
            live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Incoming>,
    mut shutdown: watch::Receiver<bool>,
    config: NodeConfig,
) {
    let (rd, wr) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(config.reply_queue_depth);
    let conn = Arc::new(Conn {
        peer,
        replies: reply_tx,
        kill: Notify::new(),
    });
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::with_capacity(64 << 10, wr);
        while let Some(frame) = reply_rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
            // Coalesce replies that are already queued into one write.
            while let Ok(frame) = reply_rx.try_recv() {
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
    });
    // Frames arrive back to back: one read fills the buffer with several.
    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; 4];
        let read = tokio::select! {
            r = rd.read_exact(&mut prefix) => r,
            _ = conn.kill.notified() => break,
            _ = shutdown.changed() => break,
        };
        if read.is_err() {
            break; // peer closed
        }
        let len = match frame_len(prefix, config.max_frame_bytes) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("{}: closing connection from {peer}: {e}", config.name);
                break;
            }
        };
        body.resize(len, 0);
        if rd.read_exact(&mut body).await.is_err() {
            break;
        }
        let (id, req) = match decode_request(&body) {
            Ok(x) => x,
            Err(e) => {
                log::warn!("{}: closing connection from {peer}: {e}", config.name);
                break;
            }
        };
        if tx
            .send(Incoming::Request {
                conn: conn.clone(),
                id,
                req,
            })
            .await
            .is_err()
        {
            break;
        }
    }
    drop(conn);
    writer.abort();
}

async fn node_loop(
    mut node: Node<FileDisk>,
    mut rx: mpsc::Receiver<Incoming>,
    mut shutdown: watch::Receiver<bool>,
    config: NodeConfig,
) {
    // Replies waiting for the next sync.
    let mut waiting: Vec<(Arc<Conn>, u64, Response)> = Vec::new();
    let mut tick = tokio::time::interval(config.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scrub = tokio::time::interval(config.scrub_interval);
    scrub.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                handle(&mut node, msg, &mut waiting);
                // Drain what else has arrived: it all joins the next group commit.
                for _ in 0..config.max_batch_requests {
                    match rx.try_recv() {
                        Ok(msg) => handle(&mut node, msg, &mut waiting),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => node.tick(),
            _ = scrub.tick() => node.scrub_step(),
            _ = shutdown.changed() => return,
        }
        if let Some(job) = node.take_sync() {
            // The group commit's fdatasync runs right here, blocking this (the node's
            // only) runtime thread. Handing it to a blocking-pool thread and back cost
            // about five futex wake-ups and context switches per group commit, the
            // largest share of a storage node's CPU under TPC-B. Frames that arrive
            // meanwhile wait in the socket buffers and form the next group commit;
            // reads wait at most one fdatasync.
            let replies = std::mem::take(&mut waiting);
            let started = Instant::now();
            let res = job();
            node.sync_done(&res, started.elapsed());
            for (conn, id, resp) in replies {
                match &res {
                    Ok(()) => conn.send(id, &node.release(resp)),
                    Err(e) => conn.send(
                        id,
                        &Response::error(crate::proto::ErrorCode::Unhealthy, 0, e.to_string()),
                    ),
                }
            }
        } else if !waiting.is_empty() {
            // Nothing dirty (e.g. the batch failed before writing): answer now.
            for (conn, id, resp) in waiting.drain(..) {
                conn.send(id, &node.release(resp));
            }
        }
    }
}

fn handle(node: &mut Node<FileDisk>, msg: Incoming, waiting: &mut Vec<(Arc<Conn>, u64, Response)>) {
    match msg {
        Incoming::Request { conn, id, req } => match node.handle(req) {
            Handled::Reply(resp) => conn.send(id, &resp),
            Handled::AfterSync(resp) => waiting.push((conn, id, resp)),
        },
        Incoming::Health(tx) => {
            let _ = tx.send(node.health());
        }
        Incoming::Metrics(tx) => {
            let _ = tx.send(node.metrics());
        }
        Incoming::GossipFrom {
            pg,
            peer_scl,
            reply,
        } => {
            let _ = reply.send(node.gossip_from(pg, peer_scl));
        }
        Incoming::Peers(reply) => {
            let _ = reply.send(node.peers.clone());
        }
        Incoming::Absorb { chunk, reply } => {
            let _ = reply.send(node.absorb(&chunk));
        }
        Incoming::NeedsSnapshot {
            pg,
            peer_floor,
            reply,
        } => {
            let _ = reply.send(node.needs_snapshot(pg, peer_floor));
        }
        Incoming::InstallSnapshot { pg, bytes, reply } => {
            let _ = reply.send(node.install_snapshot(pg, &bytes));
        }
        Incoming::PendingRepairs(reply) => {
            let _ = reply.send(node.pending_repairs());
        }
        Incoming::Repair { pg, chunks, reply } => {
            let _ = reply.send(node.repair(pg, &chunks));
        }
    }
}

/// Gossip with peers: for every PG a peer hosts, if the peer is further along or we
/// have a hole, pull its records after the end of our chain. Runs off the latency
/// path (its records are synced by the next group commit, never acknowledged).
/// A gossip round that fetched at least this many records starts the next one at
/// once: the node is rebuilding, not filling the odd hole.
const REBUILD_RECORDS_PER_ROUND: usize = 1000;

async fn gossip_loop(
    tx: mpsc::Sender<Incoming>,
    mut shutdown: watch::Receiver<bool>,
    config: NodeConfig,
) {
    use crate::client::Client;
    use crate::proto::Request;
    let timeout = Duration::from_secs(5);
    let mut peers: Vec<SocketAddr> = config.peers.clone();
    let mut clients: Vec<Option<Client>> = peers.iter().map(|_| None).collect();
    // Each peer's SCL per PG as of the previous round. Under load every peer is a
    // few records ahead of us at any instant (the writer's batches reach the six
    // segments at slightly different times), and chasing that made every node pull
    // each batch from five peers as well. Only a lag that outlives a round (a hole,
    // a restart, a rebuild) is fetched.
    let mut seen: HashMap<(SocketAddr, PgId), Lsn> = HashMap::new();
    loop {
        // Configured peers plus those the writer named (from the topology).
        let (otx, orx) = oneshot::channel();
        if tx.send(Incoming::Peers(otx)).await.is_err() {
            return;
        }
        let mut wanted = config.peers.clone();
        for p in orx.await.unwrap_or_default() {
            if !wanted.contains(&p) && Some(p) != config.listen_addr {
                wanted.push(p);
            }
        }
        if wanted != peers {
            peers = wanted;
            clients = peers.iter().map(|_| None).collect();
        }
        let mut fetched = 0usize;
        // Damaged logs found by scrubbing: repaired from the first peer that hosts
        // the PG, or from our own state alone when no peer answers.
        let mut repairs: Vec<(borealis_common::PgId, borealis_common::Lsn)> = {
            let (otx, orx) = oneshot::channel();
            if tx.send(Incoming::PendingRepairs(otx)).await.is_err() {
                return;
            }
            orx.await.unwrap_or_default()
        };
        for (i, addr) in peers.iter().enumerate() {
            if clients[i].is_none() {
                clients[i] = Client::connect(*addr, timeout).await.ok();
            }
            let Some(c) = clients[i].as_mut() else {
                continue;
            };
            let segments = match c.call(&Request::Hello).await {
                Ok(Response::Hello { segments, .. }) => segments,
                _ => {
                    clients[i] = None;
                    continue;
                }
            };
            let mut repaired = Vec::new();
            for (pg, good) in &repairs {
                if !segments.iter().any(|s| s.pg == *pg) {
                    continue;
                }
                let chunks = read_log_range(c, *pg, *good, config.gossip_chunk_bytes).await;
                let (otx, orx) = oneshot::channel();
                if tx
                    .send(Incoming::Repair {
                        pg: *pg,
                        chunks,
                        reply: otx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                match orx.await {
                    Ok(Ok(_)) => repaired.push(*pg),
                    Ok(Err(e)) => log::warn!("{}: repair of {pg} failed: {e}", config.name),
                    Err(_) => return,
                }
            }
            repairs.retain(|(pg, _)| !repaired.contains(pg));
            let mut broken = false;
            for seg in &segments {
                let (otx, orx) = oneshot::channel();
                let ask = Incoming::NeedsSnapshot {
                    pg: seg.pg,
                    peer_floor: seg.gc_floor,
                    reply: otx,
                };
                if tx.send(ask).await.is_err() {
                    return;
                }
                if orx.await.unwrap_or(false) {
                    match fetch_snapshot(c, seg.pg, config.gossip_chunk_bytes).await {
                        Ok(bytes) => {
                            let started = Instant::now();
                            let len = bytes.len();
                            let (otx, orx) = oneshot::channel();
                            let install = Incoming::InstallSnapshot {
                                pg: seg.pg,
                                bytes,
                                reply: otx,
                            };
                            if tx.send(install).await.is_err() {
                                return;
                            }
                            match orx.await {
                                Ok(Ok(n)) => {
                                    fetched += n.max(1);
                                    log::info!(
                                        "{}: {}: rebuilt from a snapshot of {addr} ({len} bytes, installed in {:?})",
                                        config.name,
                                        seg.pg,
                                        started.elapsed()
                                    );
                                }
                                Ok(Err(e)) => log::warn!(
                                    "{}: {}: snapshot from {addr} refused: {e}",
                                    config.name,
                                    seg.pg
                                ),
                                Err(_) => return,
                            }
                        }
                        Err(e) => {
                            log::warn!("{}: {}: snapshot from {addr}: {e}", config.name, seg.pg);
                            broken = true;
                            break;
                        }
                    }
                }
            }
            if broken {
                clients[i] = None;
                continue;
            }
            let Some(c) = clients[i].as_mut() else {
                continue;
            };
            for seg in segments {
                let Some(prev) = seen.insert((*addr, seg.pg), seg.scl) else {
                    continue; // first sight of this peer's segment
                };
                let (otx, orx) = oneshot::channel();
                if tx
                    .send(Incoming::GossipFrom {
                        pg: seg.pg,
                        peer_scl: prev,
                        reply: otx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                let Ok(Some(mut after)) = orx.await else {
                    continue;
                };
                // Bounded per round; the next round resumes where this one stopped.
                for _ in 0..64 {
                    let req = Request::ReadLog {
                        pg: seg.pg,
                        after,
                        max_bytes: config.gossip_chunk_bytes,
                    };
                    let chunk = match c.call(&req).await {
                        Ok(chunk @ Response::LogChunk { .. }) => chunk,
                        _ => {
                            broken = true;
                            break;
                        }
                    };
                    let Response::LogChunk { records, more, .. } = &chunk else {
                        break;
                    };
                    let more = *more;
                    let last = records
                        .last()
                        .and_then(|r| borealis_redo::decode_header(&r.bytes).ok())
                        .map(|h| h.lsn);
                    let (otx, orx) = oneshot::channel();
                    if tx
                        .send(Incoming::Absorb { chunk, reply: otx })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    fetched += orx.await.unwrap_or(0);
                    match last {
                        Some(l) if more => after = l,
                        _ => break,
                    }
                }
                if broken {
                    break;
                }
            }
            if broken {
                clients[i] = None;
            }
        }
        for (pg, _) in repairs {
            // No reachable peer hosts it: rewrite the log from our own state, which
            // is all the damaged bytes held (it was checked when it was loaded).
            let (otx, orx) = oneshot::channel();
            let repair = Incoming::Repair {
                pg,
                chunks: Vec::new(),
                reply: otx,
            };
            if tx.send(repair).await.is_err() {
                return;
            }
            let _ = orx.await;
        }
        // Keep going without a pause only while catching up on a lot (a rebuild).
        if fetched < REBUILD_RECORDS_PER_ROUND {
            tokio::select! {
                _ = tokio::time::sleep(config.gossip_interval) => {}
                _ = shutdown.changed() => return,
            }
        } else if shutdown.has_changed().unwrap_or(true) {
            return;
        }
    }
}

/// Records of `pg` after `after` from a peer, for a scrub repair (bounded chunks).
async fn read_log_range(
    c: &mut crate::client::Client,
    pg: borealis_common::PgId,
    mut after: borealis_common::Lsn,
    chunk_bytes: u32,
) -> Vec<Response> {
    let mut out = Vec::new();
    for _ in 0..256 {
        let req = crate::proto::Request::ReadLog {
            pg,
            after,
            max_bytes: chunk_bytes,
        };
        let Ok(chunk @ Response::LogChunk { .. }) = c.call(&req).await else {
            break;
        };
        let Response::LogChunk { records, more, .. } = &chunk else {
            break;
        };
        let last = records
            .last()
            .and_then(|r| borealis_redo::decode_header(&r.bytes).ok())
            .map(|h| h.lsn);
        let more = *more;
        out.push(chunk);
        match last {
            Some(l) if more => after = l,
            _ => break,
        }
    }
    out
}

/// Largest snapshot a rebuild accepts (a PG's page images plus its live records).
const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

/// Reads a whole snapshot of `pg` from a peer, chunk by chunk; starts over (a
/// bounded number of times) if the peer replaced the snapshot meanwhile.
async fn fetch_snapshot(
    c: &mut crate::client::Client,
    pg: borealis_common::PgId,
    chunk_bytes: u32,
) -> Result<Vec<u8>, String> {
    for _attempt in 0..3 {
        let mut bytes: Vec<u8> = Vec::new();
        let mut snapshot_id = None;
        // Every exit from this loop but a return means "start over".
        loop {
            let req = crate::proto::Request::Snapshot {
                pg,
                offset: bytes.len() as u64,
                max_bytes: chunk_bytes,
            };
            match c.call(&req).await.map_err(|e| e.to_string())? {
                Response::SnapshotChunk {
                    id,
                    total,
                    offset,
                    bytes: chunk,
                    ..
                } => {
                    if total > MAX_SNAPSHOT_BYTES {
                        return Err(format!("snapshot of {total} bytes is over the limit"));
                    }
                    if snapshot_id.is_some_and(|s| s != id) || offset != bytes.len() as u64 {
                        break; // replaced by another reader's snapshot
                    }
                    snapshot_id = Some(id);
                    if chunk.is_empty() && (bytes.len() as u64) < total {
                        return Err("empty snapshot chunk".into());
                    }
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() as u64 >= total {
                        return Ok(bytes);
                    }
                }
                Response::Error { message, .. } if snapshot_id.is_some() => {
                    log::debug!("snapshot of {pg} restarted: {message}");
                    break;
                }
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
    }
    Err("snapshot kept changing under the reader".into())
}
