//! The quorum backend's tokio driver: recovery, one connection task per storage
//! node (pipelined append batches, acks, page reads), and the futures the engine
//! awaits. All decisions live in [`crate::quorum::WriterCore`] and
//! [`crate::recovery`]; this file only moves bytes and wakes tasks.
//!
//! ```text
//!   append() ──lock core──> records queued ──notify──> node task i ──frames──> storage node i
//!   wait_durable(lsn) <── watch(VDL) <── core.on_response <── acks ──────────────┘
//!   get_page() ──> node task of the best segment (hedged to a second after `hedge_after`)
//! ```
//!
//! The core sits behind a std mutex that is never held across an await. Commit
//! waiters share one `watch` channel of VDL: no task or thread per transaction.

use crate::quorum::{
    Placement, QuorumConfig, Recovered, TransitionStatus, WriterCore, MAX_STORAGE_NODES,
    READ_QUORUM, SEGMENTS, WRITE_QUORUM,
};
use crate::recovery::{plan, TailAnswer};
use crate::{Topology, VolumeConfig, VolumeError, VolumeStatus};
use borealis_common::{Epoch, Lsn, PageNo, PgId};
use borealis_redo::{Op, Page, Record};
use borealis_storage::client::Client;
use borealis_storage::node::merge_history;
use borealis_storage::proto::{
    decode_response, encode_request, frame_len, ErrorCode, Request, Response, Truncation,
    MAX_FRAME_BYTES,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

type PageReq = (Request, oneshot::Sender<Response>);

struct NodeConn {
    wake: Notify,
    reads: mpsc::Sender<PageReq>,
}

struct Shared {
    core: Mutex<WriterCore>,
    /// (VDL, fenced) for waiters.
    vdl: watch::Sender<(Lsn, bool)>,
    /// One per possible node index (`MAX_STORAGE_NODES`), so that nodes joining
    /// through a membership change need no resizing on the hot path; a node's task
    /// is started when the placement first names it.
    nodes: Vec<NodeConn>,
    /// Signalled when records become unflushed: the flusher sends them after
    /// `FLUSH_DELAY` if no commit asked for them first.
    unflushed: Notify,
    /// Read-queue receivers of nodes whose task has not started yet.
    idle_reads: Mutex<Vec<Option<mpsc::Receiver<PageReq>>>>,
    cfg: QuorumConfig,
    gather: Gather,
}

/// # Commit gathering
///
/// Every group commit costs the same fixed work whatever its size: a message to
/// each of six nodes and an ack from each, an fdatasync on each of four, and the
/// wake-ups of all of them. On a machine whose cores are busy (the writer and its
/// storage nodes sharing a host, the laptop cluster), sending each commit as soon
/// as it asks makes groups of about one, and that fixed work is most of a
/// transaction's storage CPU.
///
/// So a commit does not flush at once. The first one leads: it yields to the
/// writer's other ready tasks for up to [`QuorumConfig::commit_gather_rounds`]
/// scheduler rounds, and then sends everything appended meanwhile as one batch.
/// Commits arriving during those rounds join. When it stops:
/// - other write transactions were open when it committed (explicit blocks): once
///   that many have joined;
/// - none were (single-statement transactions, which are open only while they
///   run, so they never see each other open): after the first round in which
///   nobody joined. Each round also polls the sockets, so a round picks up the
///   statements other clients have sent meanwhile, and their commits join.
///
/// A round takes as long as the writer's other ready work, so the wait grows with
/// load; on an idle writer (one client) a round is one look at the sockets that
/// finds nothing, and the commit is sent. This is PostgreSQL's `commit_delay` with
/// `commit_siblings`, measured in work the writer has to do instead of in time.
#[derive(Default)]
struct Gather {
    /// A leader is gathering. Changed only under the core lock (see `send_for`).
    leading: AtomicBool,
    /// Commits that joined the current gathering.
    joined: AtomicUsize,
}

/// A gathering's leader: ends the gathering and sends what it gathered when
/// dropped, however the leading commit ends.
struct Leader<'a>(&'a Shared);

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let wake = {
            let mut core = self.0.lock();
            self.0.gather.leading.store(false, Ordering::Relaxed);
            self.0.gather.joined.store(0, Ordering::Relaxed);
            let last = core.last_lsn();
            core.request_flush(last)
        };
        self.0.wake(wake);
    }
}

/// What [`RemoteVolume::send_for`] did.
enum Sent {
    /// Already durable.
    Durable,
    /// Flushed, or in a gathering someone else leads: wait for VDL.
    OnItsWay,
    /// The caller leads a new gathering.
    Leading,
}

/// How long appended records may wait for a commit to flush them before they are
/// sent anyway (aborts, sequence advances, long transactions): the bound on how far
/// storage lags the writer when nobody waits, like PostgreSQL's WAL writer delay.
const FLUSH_DELAY: Duration = Duration::from_millis(10);
/// How often the lazy segments get what was flushed (see "Eager four" at
/// [`WriterCore`]): the most a slow eager segment can add to a commit.
const LAZY_FLUSH_INTERVAL: Duration = Duration::from_millis(4);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn wake(&self, nodes: BTreeSet<usize>) {
        for n in nodes {
            if let Some(c) = self.nodes.get(n) {
                c.wake.notify_one();
            }
        }
    }
    fn publish(&self, core: &WriterCore) {
        let state = (core.vdl(), core.fenced().is_some());
        self.vdl.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }
}

/// The quorum-replicated volume, writer side.
pub struct RemoteVolume {
    shared: Arc<Shared>,
    /// Dropping the volume stops every node task.
    _shutdown: watch::Sender<()>,
    shutdown_rx: watch::Receiver<()>,
}

fn unavailable(pg: PgId, why: impl Into<String>) -> VolumeError {
    VolumeError::Unavailable {
        pg,
        why: why.into(),
    }
}

impl RemoteVolume {
    /// Recovers the volume under `epoch` and starts the write path. See
    /// [`crate::recovery`] for the steps.
    pub async fn open_writer(
        topology: Topology,
        epoch: Epoch,
        config: VolumeConfig,
        qcfg: QuorumConfig,
    ) -> Result<RemoteVolume, VolumeError> {
        let placement = Placement::from_topology(&topology)?;
        let geometry = topology.geometry;
        if geometry != config.geometry {
            log::warn!(
                "volume geometry from topology {geometry:?} overrides the configured {:?}",
                config.geometry
            );
        }
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + qcfg.recovery_timeout;
        let recovered =
            tokio::time::timeout_at(deadline, recover(&placement, geometry, epoch, &qcfg))
                .await
                .map_err(|_| unavailable(PgId(0), "recovery timed out"))??;
        log::info!(
            "volume recovered at epoch {epoch}: VDL {}, {} PGs, {} records to re-replicate",
            recovered.vdl,
            recovered.pg_tails.len(),
            recovered.replicate.len()
        );
        let vdl0 = recovered.vdl;
        let core = WriterCore::new(
            geometry,
            placement.clone(),
            config.lal,
            epoch,
            recovered,
            qcfg.clone(),
        );
        let (vdl_tx, _) = watch::channel((vdl0, false));
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let mut nodes = Vec::new();
        let mut read_rxs = Vec::new();
        for _ in 0..MAX_STORAGE_NODES {
            let (tx, rx) = mpsc::channel(qcfg.read_queue_depth);
            nodes.push(NodeConn {
                wake: Notify::new(),
                reads: tx,
            });
            read_rxs.push(Some(rx));
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            vdl: vdl_tx,
            nodes,
            unflushed: Notify::new(),
            idle_reads: Mutex::new(read_rxs),
            cfg: qcfg.clone(),
            gather: Gather::default(),
        });
        tokio::spawn(flusher(shared.clone(), shutdown_rx.clone()));
        tokio::spawn(lazy_flusher(shared.clone(), shutdown_rx.clone()));
        start_node_tasks(&shared, placement.node_count(), &shutdown_rx);
        // Serve only once the recovered tail is at write quorum under our epoch:
        // otherwise a crash now could lose what we are about to build on.
        let mut rx = shared.vdl.subscribe();
        let wait = async {
            loop {
                if shared.lock().rereplication_done() {
                    return Ok(());
                }
                if rx.borrow().1 {
                    return Err(VolumeError::Fenced {
                        ours: epoch,
                        theirs: shared.lock().fenced().unwrap_or(epoch),
                    });
                }
                let _ = tokio::time::timeout(Duration::from_millis(5), rx.changed()).await;
            }
        };
        tokio::time::timeout_at(deadline, wait)
            .await
            .map_err(|_| unavailable(PgId(0), "re-replication timed out"))??;
        log::info!(
            "volume open at epoch {epoch} after {:.1} ms (recovery + re-replication)",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(RemoteVolume {
            shared,
            _shutdown: shutdown_tx,
            shutdown_rx,
        })
    }

    /// See [`crate::Volume::update_topology`].
    pub fn update_topology(&self, topology: &Topology) -> Result<bool, VolumeError> {
        let (count, wake) = {
            let mut core = self.shared.lock();
            let placement = Placement::from_topology_keeping(topology, Some(&core.placement))?;
            if placement == core.placement {
                return Ok(false);
            }
            for (group, m) in placement.memberships() {
                log::info!(
                    "volume: adopting membership epoch {} of {} ({} -> {})",
                    m.epoch,
                    group
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "the default segments".into()),
                    names(&placement, &m.segments),
                    m.next
                        .map(|n| names(&placement, &n))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            let wake = core.update_placement(placement);
            self.shared.publish(&core);
            (core.placement.node_count(), wake)
        };
        start_node_tasks(&self.shared, count, &self.shutdown_rx);
        for n in wake {
            if let Some(c) = self.shared.nodes.get(n) {
                c.wake.notify_one();
            }
        }
        Ok(true)
    }

    pub fn transitions(&self) -> Vec<TransitionStatus> {
        self.shared.lock().transitions()
    }

    pub fn membership_epochs(&self) -> Vec<(Option<PgId>, u64)> {
        self.shared
            .lock()
            .placement
            .memberships()
            .into_iter()
            .map(|(g, m)| (g, m.epoch))
            .collect()
    }

    pub fn geometry(&self) -> borealis_common::Geometry {
        self.shared.lock().geometry
    }

    pub async fn append(&self, mtr: Vec<(PageNo, Op)>) -> Result<Vec<Record>, VolumeError> {
        let mut rx = self.shared.vdl.subscribe();
        let mut mtr = Some(mtr);
        loop {
            {
                let mut core = self.shared.lock();
                if let Some(theirs) = core.fenced() {
                    return Err(VolumeError::Fenced {
                        ours: core.epoch(),
                        theirs,
                    });
                }
                let n = mtr.as_ref().map(Vec::len).unwrap_or(0);
                if core.has_room(n) {
                    let was_flushed = core.flush_lsn() == core.last_lsn();
                    let (records, wake) = core.append(mtr.take().unwrap_or_default())?;
                    let unflushed = core.flush_lsn() < core.last_lsn();
                    drop(core);
                    self.wake(wake);
                    if was_flushed && unflushed {
                        self.shared.unflushed.notify_one();
                    }
                    return Ok(records);
                }
                // Everything allocated must be on its way for VDL to move.
                let last = core.last_lsn();
                let wake = core.request_flush(last);
                drop(core);
                self.wake(wake);
            }
            // LAL backpressure: wait for VDL to move.
            if rx.changed().await.is_err() {
                return Err(VolumeError::Closed);
            }
        }
    }

    fn wake(&self, nodes: BTreeSet<usize>) {
        self.shared.wake(nodes);
    }

    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), VolumeError> {
        match self.send_for(lsn, false)? {
            Sent::Durable => Ok(()),
            _ => self.await_vdl(lsn).await,
        }
    }

    /// [`wait_durable`](Self::wait_durable) for a commit made while `others_open`
    /// other write transactions were open: see "Commit gathering" at [`Gather`].
    pub async fn wait_commit(&self, lsn: Lsn, others_open: usize) -> Result<(), VolumeError> {
        let rounds = self.shared.cfg.commit_gather_rounds;
        if rounds == 0 {
            return self.wait_durable(lsn).await;
        }
        match self.send_for(lsn, true)? {
            Sent::Durable => return Ok(()),
            Sent::Leading => {
                // Flushes when dropped: also if this future is dropped mid-gathering
                // (a session torn down), or the joiners would wait for the flusher.
                let lead = Leader(&self.shared);
                let mut before = 0;
                for round in 0..rounds {
                    let joined = lead.0.gather.joined.load(Ordering::Relaxed);
                    // Every transaction that was open has joined; or, none being
                    // open, a round brought nobody new (the first round always runs:
                    // it is the look at the sockets).
                    let settled = if others_open > 0 {
                        joined >= others_open
                    } else {
                        round > 0 && joined == before
                    };
                    if settled {
                        break;
                    }
                    before = joined;
                    tokio::task::yield_now().await;
                }
                drop(lead);
            }
            Sent::OnItsWay => {}
        }
        self.await_vdl(lsn).await
    }

    /// Checks `lsn` against the volume and, unless it is durable already, has it
    /// sent: at once, or (`gather`) by joining or leading a commit gathering.
    fn send_for(&self, lsn: Lsn, gather: bool) -> Result<Sent, VolumeError> {
        let mut core = self.shared.lock();
        if lsn > core.last_lsn() {
            return Err(VolumeError::ReadPoint {
                read: lsn,
                why: format!("beyond last LSN {}", core.last_lsn()),
            });
        }
        if lsn <= core.vdl() {
            return Ok(Sent::Durable);
        }
        if gather {
            // `leading` changes only under the core lock: a joiner's records were
            // appended before the leader's final flush reads the last LSN.
            let g = &self.shared.gather;
            if g.leading.swap(true, Ordering::Relaxed) {
                g.joined.fetch_add(1, Ordering::Relaxed);
                return Ok(Sent::OnItsWay);
            }
            return Ok(Sent::Leading);
        }
        let wake = core.request_flush(lsn);
        drop(core);
        self.wake(wake);
        Ok(Sent::OnItsWay)
    }

    /// Waits for VDL to reach `lsn`, hedging a slow commit to the lazy segments.
    async fn await_vdl(&self, lsn: Lsn) -> Result<(), VolumeError> {
        let mut rx = self.shared.vdl.subscribe();
        let done = |s: &(Lsn, bool)| s.0 >= lsn || s.1;
        let hedge_after = self.shared.cfg.commit_hedge_after;
        if tokio::time::timeout(hedge_after, rx.wait_for(done))
            .await
            .is_err()
        {
            // Slow: hedge to the lazy segments, then wait for any four.
            let wake = self.shared.lock().hedge_commit(lsn);
            self.wake(wake);
        }
        // Returns at once when the wait above already saw it.
        if rx.wait_for(done).await.map_err(|_| VolumeError::Closed)?.0 >= lsn {
            return Ok(());
        }
        let core = self.shared.lock();
        Err(VolumeError::Fenced {
            ours: core.epoch(),
            theirs: core.fenced().unwrap_or(core.epoch()),
        })
    }

    pub async fn get_page(&self, page: PageNo, read_lsn: Lsn) -> Result<Page, VolumeError> {
        let (pg, candidates) = {
            let core = self.shared.lock();
            if page >= core.geometry.max_pages() {
                return Err(VolumeError::PageOutOfRange(page));
            }
            let pg = core.geometry.pg_of(page);
            if core.pg_tail(pg).is_none() {
                // The PG has never been written: every page of it is zeroed.
                return Ok(Page::zeroed());
            }
            (pg, core.read_candidates(pg, read_lsn))
        };
        read_page(&self.shared, pg, page, read_lsn, candidates).await
    }

    pub fn set_min_read_point(&self, lsn: Lsn) {
        self.shared.lock().set_pgmrpl(lsn);
    }

    pub fn status(&self) -> VolumeStatus {
        let core = self.shared.lock();
        VolumeStatus {
            epoch: core.epoch(),
            vcl: core.vcl(),
            vdl: core.vdl(),
            last_lsn: core.last_lsn(),
            protection_groups: core.pg_count() as u32,
            commit_hedges: core.commit_hedges(),
            flushes: core.flushes(),
            retained_bytes: core.outstanding_bytes() as u64,
        }
    }
}

fn names(p: &Placement, set: &[usize; SEGMENTS]) -> String {
    set.iter()
        .map(|n| p.names.get(*n).map(String::as_str).unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts the connection tasks of nodes `0..count` that have none yet.
fn start_node_tasks(shared: &Arc<Shared>, count: usize, shutdown: &watch::Receiver<()>) {
    let mut idle = shared.idle_reads.lock().unwrap_or_else(|p| p.into_inner());
    for (i, slot) in idle.iter_mut().enumerate().take(count) {
        if let Some(rx) = slot.take() {
            tokio::spawn(node_task(shared.clone(), i, rx, shutdown.clone()));
        }
    }
}

/// One GetPage, sent to the best candidate and hedged to the next one if slow;
/// segments that cannot serve are skipped. Bounded by `max_read_attempts`.
async fn read_page(
    shared: &Arc<Shared>,
    pg: PgId,
    page: PageNo,
    read_lsn: Lsn,
    candidates: Vec<usize>,
) -> Result<Page, VolumeError> {
    let cfg = &shared.cfg;
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut attempts = 0usize;
    let mut last_err = String::from("no segment answered");
    let send = |tasks: &mut tokio::task::JoinSet<Result<Response, String>>, node: usize| {
        let shared = shared.clone();
        let timeout = cfg.request_timeout;
        tasks.spawn(async move {
            let (tx, rx) = oneshot::channel();
            let conn = shared.nodes.get(node).ok_or("no such node")?;
            conn.reads
                .try_send((Request::GetPage { pg, page, read_lsn }, tx))
                .map_err(|_| format!("read queue of node {node} full or closed"))?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Err(format!("node {node} connection lost")),
                Err(_) => Err(format!("node {node} timed out")),
            }
        });
    };
    while attempts < cfg.max_read_attempts {
        if tasks.is_empty() {
            if next > 0 && next.is_multiple_of(candidates.len().max(1)) {
                // Went round every segment: give them a moment to catch up.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let node = candidates[next % candidates.len().max(1)];
            next += 1;
            attempts += 1;
            send(&mut tasks, node);
        }
        let joined = tokio::time::timeout(cfg.hedge_after, tasks.join_next()).await;
        let result = match joined {
            Err(_) => {
                // Slow: hedge to the next segment, keep waiting for both.
                if tasks.len() < 2 && candidates.len() > 1 {
                    let node = candidates[next % candidates.len()];
                    next += 1;
                    attempts += 1;
                    send(&mut tasks, node);
                }
                continue;
            }
            Ok(None) => continue,
            Ok(Some(Err(e))) => Err(e.to_string()),
            Ok(Some(Ok(r))) => r,
        };
        match result {
            Ok(Response::Page { bytes }) => {
                let p = Page::from_bytes(&bytes).ok_or_else(|| {
                    VolumeError::Corrupt(format!("page {page}: {} bytes", bytes.len()))
                })?;
                if p.lsn() > read_lsn {
                    return Err(VolumeError::Corrupt(format!(
                        "page {page} at LSN {} for read point {read_lsn}",
                        p.lsn()
                    )));
                }
                return Ok(p);
            }
            Ok(Response::Error {
                code: ErrorCode::BelowGcFloor,
                detail,
                ..
            }) => {
                return Err(VolumeError::ReadPoint {
                    read: read_lsn,
                    why: format!("below the GC floor {detail}"),
                });
            }
            Ok(Response::Error { code, message, .. }) => last_err = format!("{code:?}: {message}"),
            Ok(other) => last_err = format!("unexpected response {other:?}"),
            Err(e) => last_err = e,
        }
    }
    Err(unavailable(pg, last_err))
}

async fn recover(
    placement: &Placement,
    geometry: borealis_common::Geometry,
    epoch: Epoch,
    cfg: &QuorumConfig,
) -> Result<Recovered, VolumeError> {
    let t0 = std::time::Instant::now();
    let n = placement.node_count();
    let mut clients: Vec<Option<Client>> = Vec::new();
    let mut hellos = Vec::new();
    // 1. Hello to every node, in parallel, each bounded.
    let mut set = tokio::task::JoinSet::new();
    for (i, addr) in placement.addrs.iter().enumerate() {
        let (addr, ct, rt) = (*addr, cfg.connect_timeout, cfg.request_timeout);
        set.spawn(async move {
            let r = async {
                let mut c = Client::connect(addr, ct).await.map_err(|e| e.to_string())?;
                let _ = rt;
                let resp = c.call(&Request::Hello).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((c, resp))
            }
            .await;
            (i, r)
        });
    }
    clients.resize_with(n, || None);
    hellos.resize_with(n, || None);
    while let Some(j) = set.join_next().await {
        let Ok((i, r)) = j else { continue };
        match r {
            Ok((
                c,
                Response::Hello {
                    epoch: e,
                    history,
                    segments,
                    ..
                },
            )) => {
                clients[i] = Some(c);
                hellos[i] = Some((e, history, segments));
            }
            Ok((_, other)) => log::warn!(
                "recovery: {} answered Hello with {other:?}",
                placement.names[i]
            ),
            Err(e) => log::warn!("recovery: {} unreachable: {e}", placement.names[i]),
        }
    }
    for group in placement.groups() {
        let up = group.iter().filter(|i| hellos[**i].is_some()).count();
        if up < READ_QUORUM {
            return Err(unavailable(
                PgId(0),
                format!("only {up} of a PG's {SEGMENTS} segments reachable, need {READ_QUORUM}"),
            ));
        }
    }
    let mut history: Vec<Truncation> = Vec::new();
    let mut start = Lsn::ZERO;
    let mut pgs: BTreeSet<PgId> = BTreeSet::new();
    for (e, h, segs) in hellos.iter().flatten() {
        if *e > epoch {
            return Err(VolumeError::Fenced {
                ours: epoch,
                theirs: *e,
            });
        }
        history = merge_history(&history, h);
        for s in segs {
            start = start.max(s.vdl_hint);
            pgs.insert(s.pg);
        }
    }
    // 2. Fence first: install the epoch (without a new truncation yet) on every
    // reachable node and require a write quorum of every PG. From then on the old
    // writer can add acks only from the <= 2 nodes that missed it, so any record it
    // could still bring to write quorum is on enough fenced nodes that a read quorum
    // of them sees it (|I| - 2 holders among the fenced set I; 3 readers miss at
    // most |I| - 3). Reading tails before fencing would let a zombie writer complete
    // a record recovery then truncates.
    log::debug!("recovery: hello done after {:?}", t0.elapsed());
    let fenced = install_everywhere(&mut clients, placement, epoch, &history).await?;
    for (i, c) in clients.iter_mut().enumerate() {
        if !fenced[i] {
            *c = None;
        }
    }
    log::debug!("recovery: fenced after {:?}", t0.elapsed());
    // 3. Tails of each PG from every fenced segment (at least a read quorum), the
    // nodes in parallel.
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let Some(c) = c.take() else { continue };
        let mine: Vec<PgId> = pgs
            .iter()
            .copied()
            .filter(|pg| placement.is_member(*pg, i))
            .collect();
        let (history, chunk) = (history.clone(), cfg.tail_chunk_bytes);
        set.spawn(async move {
            let (c, tails) = fetch_tails(c, mine, start, history, chunk).await;
            (i, c, tails)
        });
    }
    let mut answers = Vec::new();
    let mut got: BTreeMap<PgId, Vec<usize>> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let Ok((i, c, tails)) = joined else { continue };
        clients[i] = Some(c);
        for (pg, answer) in tails {
            match answer {
                Ok(a) => {
                    got.entry(pg).or_default().push(i);
                    answers.push(a);
                }
                Err(e) => log::warn!("recovery: tail of {pg} from {}: {e}", placement.names[i]),
            }
        }
    }
    for pg in &pgs {
        // A read quorum is 3 of the PG's six (the old six during a segment
        // replacement: see `Membership::read_quorum`).
        let from = got.get(pg).cloned().unwrap_or_default();
        if !placement.membership(*pg).read_quorum(&from) {
            return Err(unavailable(
                *pg,
                format!(
                    "only {} tails, need {READ_QUORUM} of one segment set",
                    from.len()
                ),
            ));
        }
    }
    let (vcl, recovered) = plan(geometry, epoch, start, &history, &answers);
    log::info!("recovery: start {start}, VCL {vcl}, VDL {}", recovered.vdl);
    log::debug!("recovery: tails planned after {:?}", t0.elapsed());
    // 4. Install the truncation point (records above VDL from older epochs go).
    install_everywhere(&mut clients, placement, epoch, &recovered.history).await?;
    Ok(recovered)
}

/// Recovery's Tail requests to one node for each of `pgs`, paging through chunks.
async fn fetch_tails(
    mut c: Client,
    pgs: Vec<PgId>,
    start: Lsn,
    history: Vec<Truncation>,
    chunk: u32,
) -> (Client, Vec<(PgId, Result<TailAnswer, String>)>) {
    let mut out = Vec::with_capacity(pgs.len());
    for pg in pgs {
        let mut from = start;
        let mut answer = TailAnswer {
            pg,
            last_at_or_below: Lsn::ZERO,
            records: Vec::new(),
        };
        let mut result = Ok(());
        // Bounded: the tail above the VDL hint holds about LAL records.
        for _ in 0..100_000 {
            let req = Request::Tail {
                pg,
                from,
                history: history.clone(),
                max_bytes: chunk,
            };
            match c.call(&req).await {
                Ok(Response::Tail {
                    last_at_or_below,
                    records,
                    more,
                    ..
                }) => {
                    if from == start {
                        answer.last_at_or_below = last_at_or_below;
                    }
                    if let Some(last) = records
                        .last()
                        .and_then(|r| borealis_redo::decode_header(&r.bytes).ok())
                    {
                        from = last.lsn;
                    }
                    let done = !more || records.is_empty();
                    answer.records.extend(records);
                    if done {
                        break;
                    }
                }
                other => {
                    result = Err(format!("{other:?}"));
                    break;
                }
            }
        }
        out.push((pg, result.map(|()| answer)));
    }
    (c, out)
}

/// Installs `epoch` with `history` on every node we hold a client for; fails unless
/// a write quorum of every PG took it. Returns which nodes did.
async fn install_everywhere(
    clients: &mut [Option<Client>],
    placement: &Placement,
    epoch: Epoch,
    history: &[Truncation],
) -> Result<Vec<bool>, VolumeError> {
    let mut installed = vec![false; clients.len()];
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let Some(mut c) = c.take() else { continue };
        let req = Request::InstallEpoch {
            epoch,
            history: history.to_vec(),
        };
        set.spawn(async move {
            let r = c.call(&req).await;
            (i, c, r)
        });
    }
    let mut fenced_by = None;
    while let Some(joined) = set.join_next().await {
        let Ok((i, c, r)) = joined else { continue };
        clients[i] = Some(c);
        match r {
            Ok(Response::EpochInstalled { .. }) => installed[i] = true,
            Ok(Response::Error {
                code: ErrorCode::Fenced,
                detail,
                ..
            }) => fenced_by = Some(Epoch(detail)),
            other => log::warn!(
                "recovery: installing epoch {epoch} on {}: {other:?}",
                placement.names[i]
            ),
        }
    }
    if let Some(theirs) = fenced_by {
        return Err(VolumeError::Fenced {
            ours: epoch,
            theirs,
        });
    }
    for group in placement.groups() {
        let ok = group.iter().filter(|i| installed[**i]).count();
        if (ok as u32) < WRITE_QUORUM {
            return Err(unavailable(
                PgId(0),
                format!("epoch {epoch} installed on {ok} of {SEGMENTS} segments"),
            ));
        }
    }
    Ok(installed)
}

/// One storage node's connection: (re)connects, installs the epoch, then pipelines
/// append batches and page reads and feeds responses to the core.
/// Lets the lazy segments have what was flushed, every [`LAZY_FLUSH_INTERVAL`]
/// (see "Eager four" at [`WriterCore`]); an idle volume sends nothing.
async fn lazy_flusher(shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(LAZY_FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let wake = shared.lock().flush_lazy();
        shared.wake(wake);
    }
}

/// Sends records nobody waits for within [`FLUSH_DELAY`] of their append.
async fn flusher(shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    loop {
        tokio::select! {
            _ = shared.unflushed.notified() => {}
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(FLUSH_DELAY).await;
        let wake = {
            let mut core = shared.lock();
            let last = core.last_lsn();
            core.request_flush(last)
        };
        shared.wake(wake);
    }
}

async fn node_task(
    shared: Arc<Shared>,
    idx: usize,
    mut reads: mpsc::Receiver<PageReq>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        // The address as the latest topology has it; a node that hosts nothing (a
        // retired one) is not connected to until a topology names it again.
        let (addr, hosts) = {
            let core = shared.lock();
            (
                core.placement.addrs.get(idx).copied(),
                core.placement.hosts_segments(idx),
            )
        };
        let Some(addr) = addr else { return };
        if !hosts {
            tokio::select! {
                _ = tokio::time::sleep(shared.cfg.reconnect_backoff_max) => continue,
                _ = shutdown.changed() => return,
            }
        }
        let result = tokio::select! {
            r = connection(&shared, idx, addr, &mut reads) => r,
            _ = shutdown.changed() => return,
        };
        {
            let mut core = shared.lock();
            core.node_reset(idx);
            if core.fenced().is_some() {
                shared.publish(&core);
                log::error!("volume fenced; node task {idx} stops");
                return;
            }
            // If an eager segment went away the lazy ones are needed now.
            let lazy = core.lazy_nodes();
            drop(core);
            shared.wake(lazy);
        }
        match result {
            Ok(()) => backoff = Duration::from_millis(10),
            Err(e) => log::debug!("storage node {addr}: {e}; reconnecting"),
        }
        // Fail queued reads fast instead of letting them time out.
        while let Ok((_, tx)) = reads.try_recv() {
            drop(tx);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {},
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(shared.cfg.reconnect_backoff_max);
    }
}

/// Removes one complete frame from the front of `acc`, if there is one.
fn take_frame(acc: &mut Vec<u8>) -> Result<Option<(u64, Response)>, String> {
    let Some(prefix) = acc.get(0..4) else {
        return Ok(None);
    };
    let len = frame_len(
        [prefix[0], prefix[1], prefix[2], prefix[3]],
        MAX_FRAME_BYTES,
    )
    .map_err(|e| e.to_string())?;
    if acc.len() < 4 + len {
        return Ok(None);
    }
    let r = decode_response(&acc[4..4 + len]).map_err(|e| e.to_string());
    acc.drain(..4 + len);
    r.map(Some)
}

async fn read_frame(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> Result<(u64, Response), String> {
    let mut prefix = [0u8; 4];
    rd.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = frame_len(prefix, MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
    buf.resize(len, 0);
    rd.read_exact(buf).await.map_err(|e| e.to_string())?;
    decode_response(buf).map_err(|e| e.to_string())
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

fn lock_pending(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Response>>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connection(
    shared: &Arc<Shared>,
    idx: usize,
    addr: std::net::SocketAddr,
    reads: &mut mpsc::Receiver<PageReq>,
) -> Result<(), String> {
    let cfg = &shared.cfg;
    let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let mut buf = Vec::new();
    // Handshake: install our epoch (idempotent); a newer one means we are fenced.
    let (epoch, history) = {
        let core = shared.lock();
        (core.epoch(), core.history().to_vec())
    };
    wr.write_all(&encode_request(
        0,
        &Request::InstallEpoch { epoch, history },
    ))
    .await
    .map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    let (_, resp) = tokio::time::timeout(cfg.request_timeout, read_frame(&mut rd, &mut buf))
        .await
        .map_err(|_| "epoch install timed out".to_string())??;
    match resp {
        Response::EpochInstalled { .. } => {}
        other => {
            let mut core = shared.lock();
            core.on_response(idx, &other);
            shared.publish(&core);
            return Err(format!("epoch install refused: {other:?}"));
        }
    }
    // Tell the node its peers (the other nodes of the topology) for gossip; the
    // reply (id 0, not an append) is ignored by the reader below.
    let peers: Vec<String> = {
        let core = shared.lock();
        core.placement
            .addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, a)| a.to_string())
            .collect()
    };
    wr.write_all(&encode_request(0, &Request::SetPeers { peers }))
        .await
        .map_err(|e| e.to_string())?;
    shared.lock().node_ready(idx);
    log::debug!("connected to storage node {addr}");

    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let reader = {
        let shared = shared.clone();
        let pending = pending.clone();
        async move {
            let mut acc: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            let mut idle_since = tokio::time::Instant::now();
            loop {
                // Parse a whole frame out of what has arrived; reads below are
                // cancel-safe, so a timeout never loses half a frame.
                let frame = match take_frame(&mut acc)? {
                    Some(f) => f,
                    None => {
                        let tick = tokio::time::sleep(Duration::from_millis(50));
                        tokio::select! {
                            n = rd.read(&mut chunk) => {
                                let n = n.map_err(|e| e.to_string())?;
                                if n == 0 {
                                    return Err("connection closed".to_string());
                                }
                                acc.extend_from_slice(&chunk[..n]);
                                idle_since = tokio::time::Instant::now();
                            }
                            _ = tick => {
                                let awaiting = shared.lock().awaiting_acks(idx) || !lock_pending(&pending).is_empty();
                                if !awaiting {
                                    idle_since = tokio::time::Instant::now();
                                } else if idle_since.elapsed() > shared.cfg.request_timeout {
                                    return Err("no response within the request timeout".to_string());
                                }
                            }
                        }
                        continue;
                    }
                };
                let (id, resp) = frame;
                if let Some(tx) = lock_pending(&pending).remove(&id) {
                    let _ = tx.send(resp);
                    continue;
                }
                let fx = {
                    let mut core = shared.lock();
                    let fx = core.on_response(idx, &resp);
                    shared.publish(&core);
                    fx
                };
                if fx.fenced || fx.reset_node {
                    return Err::<(), String>(format!("node refused: {resp:?}"));
                }
                // Room in flight again: let the writer half send more.
                if let Some(c) = shared.nodes.get(idx) {
                    c.wake.notify_one();
                }
            }
        }
    };
    let writer = async {
        let mut next_id: u64 = 1;
        loop {
            // Append batches first (the latency path), then queued reads.
            let mut wrote = false;
            for _ in 0..cfg.max_inflight_batches {
                let batch = shared.lock().next_batch(idx);
                let Some(req) = batch else { break };
                wr.write_all(&encode_request(next_id, &req))
                    .await
                    .map_err(|e| e.to_string())?;
                next_id += 1;
                wrote = true;
            }
            while let Ok((req, tx)) = reads.try_recv() {
                lock_pending(&pending).insert(next_id, tx);
                wr.write_all(&encode_request(next_id, &req))
                    .await
                    .map_err(|e| e.to_string())?;
                next_id += 1;
                wrote = true;
            }
            if wrote {
                wr.flush().await.map_err(|e| e.to_string())?;
                continue;
            }
            let Some(c) = shared.nodes.get(idx) else {
                return Err("no such node".to_string());
            };
            tokio::select! {
                _ = c.wake.notified() => {}
                r = reads.recv() => {
                    let Some((req, tx)) = r else { return Ok(()) };
                    lock_pending(&pending).insert(next_id, tx);
                    wr.write_all(&encode_request(next_id, &req)).await.map_err(|e| e.to_string())?;
                    next_id += 1;
                    wr.flush().await.map_err(|e| e.to_string())?;
                }
            }
        }
    };
    let r = tokio::select! {
        r = reader => r,
        r = writer => r,
    };
    // Dropping the pending senders fails the reads waiting on this connection.
    lock_pending(&pending).clear();
    r
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send + Sync>() {}
    is_send::<RemoteVolume>();
    let _ = BTreeMap::<u8, u8>::new;
}
