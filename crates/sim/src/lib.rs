//! Deterministic simulation of six storage nodes and the volume client under faults.
//!
//! # Why our own harness
//!
//! The storage node ([`borealis_storage::Node`]) and the writer's quorum logic
//! ([`borealis_volume::quorum::WriterCore`], [`borealis_volume::recovery::plan`]) are
//! written as sans-I/O state machines: requests in, responses out, a [`Disk`] trait
//! underneath. The tokio drivers around them are thin. So the simulation needs no
//! runtime interception at all: it is a single-threaded discrete-event loop that owns
//! every node, every simulated disk ([`MemDisk`], which tears unsynced writes on a
//! crash), every writer, and a network queue ordered by (virtual time, sequence). One
//! seeded PRNG (splitmix64) makes every choice, so a seed replays bit for bit. Turmoil
//! or madsim would have simulated our tokio drivers too, but they pull a large
//! dependency tree (madsim replaces tokio itself) for a layer that holds no protocol
//! logic, and they are slower per simulated step; the drivers are covered by the
//! integration test with real sockets and real files instead.
//!
//! # What it does
//!
//! Each step may: append an MTR, pump append batches, deliver (or drop, duplicate,
//! delay and thereby reorder) messages, complete a node's fdatasync, crash a node
//! (torn tail) and restart it, partition an AZ, crash the writer (it lives on as a
//! zombie that keeps sending) and recover a new writer under a higher epoch, move
//! PGMRPL (so segments GC), and read a page at a random read point from one segment.
//! A dropped message breaks its connection, as with TCP: both sides reset and the
//! writer re-sends what was not acknowledged after reconnecting.
//!
//! It also replaces segments, as the control plane does for a node gone for good:
//! a new node joins in the victim's AZ, the default membership moves to a
//! transitional epoch (write quorum over the old six and the new six), the active
//! writer adopts it after a random delay (as the real one polls the topology), the
//! new segment is rebuilt by gossip and snapshots, and once its SCL reaches the
//! writer's catch-up point the membership moves to the new six and the victim is
//! destroyed. The victim is either dead from the start (gone for good) or still
//! serving until the end (a planned move); replacements start at random, and also
//! right when an AZ partition begins, so some run entirely under a partition, with
//! crashes, zombie writers and recoveries in the middle of them.
//!
//! # What it checks
//!
//! * VDL never goes backward, within a writer and across recoveries: a new writer's
//!   recovered VDL is at least every VDL any earlier writer reached (nothing
//!   acknowledged is lost), and recovery brings back exactly the records written.
//! * GetPage at read point L, from whichever segment serves it, equals applying
//!   exactly the model's records of that page up to L; after healing, every page is
//!   readable at the final VDL.
//! * A writer with an old epoch never gets a write accepted by a write quorum after a
//!   newer writer has recovered (its VDL never passes the new writer's recovery point
//!   and none of its later records reaches 4 acks).
//! * No segment accepts an append carrying an older membership epoch than one it
//!   has already seen.
//!
//! `SimConfig::transition_quorum = NewSetOnly` (counting only the new six during a
//! replacement) is deliberately broken; `tests/sim.rs` checks that some seed fails.
//!
//! Failures are returned as `Err` with the seed in the message; `cargo test` runs a
//! bounded number of seeds, `SIM_SEEDS=1000` more (see `tests/sim.rs`).

use borealis_common::{Epoch, Geometry, Lsn, PageNo, PgId};
use borealis_redo::{apply, Op, Page, Record};
use borealis_storage::disk::MemDisk;
use borealis_storage::node::{merge_history, Handled, Node, NodeLimits};
use borealis_storage::proto::{self, Request, Response, Truncation};
use borealis_volume::quorum::{
    Membership, Placement, QuorumConfig, TransitionQuorum, WriterCore, READ_QUORUM, SEGMENTS,
    WRITE_QUORUM,
};
use borealis_volume::recovery::{plan, TailAnswer};
use std::collections::{BTreeMap, BinaryHeap, HashSet};

/// splitmix64: tiny, fast, good enough, and fully determined by the seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Fault rates (per mille per step or per message) and run length.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub steps: u64,
    pub pages: u64,
    pub geometry: Geometry,
    pub lal: u64,
    pub drop_per_mille: u64,
    pub dup_per_mille: u64,
    pub max_delay: u64,
    pub crash_per_mille: u64,
    pub partition_per_mille: u64,
    pub writer_crash_per_mille: u64,
    pub append_per_mille: u64,
    pub read_per_mille: u64,
    /// Chance per step of starting a segment replacement (when none is running).
    pub replace_per_mille: u64,
    /// Replacements per run at most (each adds a node).
    pub max_replacements: usize,
    /// The writers' rule during a replacement (`NewSetOnly` is the broken one).
    pub transition_quorum: TransitionQuorum,
    /// A replacement is not completed before a random number of steps up to this.
    pub transition_min_steps_max: u64,
    /// Extra message loss on the link of a replacement's victim while it serves.
    pub victim_drop_per_mille: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            steps: 1500,
            pages: 24,
            geometry: Geometry {
                pages_per_pg: 8,
                max_pgs: 16,
            },
            lal: 64,
            drop_per_mille: 10,
            dup_per_mille: 10,
            max_delay: 6,
            crash_per_mille: 6,
            partition_per_mille: 3,
            writer_crash_per_mille: 2,
            append_per_mille: 500,
            read_per_mille: 150,
            replace_per_mille: 4,
            max_replacements: 3,
            transition_quorum: TransitionQuorum::BothSets,
            transition_min_steps_max: 300,
            victim_drop_per_mille: 200,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct SimStats {
    pub appended_records: u64,
    pub final_vdl: u64,
    pub recoveries: u64,
    pub node_crashes: u64,
    pub partitions: u64,
    pub reads_checked: u64,
    pub messages: u64,
    pub dropped: u64,
    pub replacements_started: u64,
    pub replacements_completed: u64,
    pub replacements_under_partition: u64,
    pub snapshots_installed: u64,
    /// Page images storage nodes evicted from memory, and read back from their logs.
    pub images_evicted: u64,
    pub image_reads: u64,
    pub image_checkpoints: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToNode,
    ToWriter,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Msg {
    writer: usize,
    node: usize,
    gen: u64,
    dir: Dir,
    /// An encoded frame: the simulation exercises the real codec.
    frame: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Deliver(Msg),
    SyncDone { node: usize, incarnation: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConnState {
    Down,
    Handshake,
    Up,
}

/// A reply waiting for a sync: (writer, connection generation, request id, reply).
type Pending = (usize, u64, u64, Response);

struct SimNode {
    az: usize,
    /// Gone for good (a replaced segment's node): never restarts.
    retired: bool,
    disk: MemDisk,
    node: Option<Node<MemDisk>>,
    incarnation: u64,
    down_until: u64,
    waiting: Vec<(usize, u64, u64, Response)>,
    syncing: Option<(borealis_storage::disk::SyncJob, Vec<Pending>)>,
}

/// Storage nodes keep only a few page images in memory, so that reads and folds
/// go through images evicted to the log files and read back, and compactions
/// (which make dirty images evictable) happen all the time.
fn sim_limits() -> NodeLimits {
    NodeLimits {
        max_resident_images: 6,
        ..NodeLimits::default()
    }
}

impl SimNode {
    /// A node on an empty disk, up.
    fn fresh(name: &str, az: usize) -> SimNode {
        let disk = MemDisk::new();
        let node = Node::open(name, disk.clone(), sim_limits()).ok();
        SimNode {
            az,
            retired: false,
            disk,
            node,
            incarnation: 0,
            down_until: 0,
            waiting: Vec::new(),
            syncing: None,
        }
    }
}

struct SimWriter {
    core: WriterCore,
    conns: Vec<(ConnState, u64)>,
    zombie: bool,
    /// LSNs this writer allocated after a newer writer recovered (zombie writes).
    fenced_after: Option<Lsn>,
    /// The VDL of the recovery that fenced this writer: its VDL must never pass it.
    fence_vdl: Lsn,
    max_vdl: Lsn,
}

/// A segment replacement in progress (the simulated control plane's state).
#[derive(Debug, Clone, Copy)]
struct Transition {
    victim: usize,
    new: usize,
    /// The transitional membership epoch.
    epoch: u64,
    /// The control plane looks at the new segment's progress only from here on
    /// (its polls are slow; a rebuild takes a while): transitions last long enough
    /// to meet crashes, partitions and recoveries.
    not_before: u64,
}

pub struct Sim {
    seed: u64,
    transition: Option<Transition>,
    /// When the active writer adopts the control plane's placement.
    adopt_at: u64,
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, Event)>>,
    nodes: Vec<SimNode>,
    writers: Vec<SimWriter>,
    active: Option<usize>,
    next_epoch: u64,
    partition: Option<(usize, u64)>,
    /// The model: every record of the log as the writers built it.
    model: BTreeMap<Lsn, Record>,
    initialized: HashSet<PageNo>,
    acked_vdl: Lsn,
    pgmrpl: Lsn,
    placement: Placement,
    pub stats: SimStats,
}

fn fail<T>(seed: u64, what: String) -> Result<T, String> {
    Err(format!("simulation seed {seed} failed: {what}"))
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        let names: Vec<String> = (0..SEGMENTS).map(|i| format!("storage-{i}")).collect();
        let azs: Vec<String> = (0..SEGMENTS)
            .map(|i| borealis_common::AZS[i / 2].to_string())
            .collect();
        let addrs = (0..SEGMENTS)
            .map(|i| std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)))
            .collect();
        let placement = Placement::uniform(names, azs, addrs);
        let nodes = (0..SEGMENTS)
            .map(|i| SimNode::fresh(&format!("storage-{i}"), i / 2))
            .collect();
        Sim {
            seed,
            transition: None,
            adopt_at: 0,
            rng: Rng::new(seed),
            cfg,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            writers: Vec::new(),
            active: None,
            next_epoch: 1,
            partition: None,
            model: BTreeMap::new(),
            initialized: HashSet::new(),
            acked_vdl: Lsn::ZERO,
            pgmrpl: Lsn::ZERO,
            placement,
            stats: SimStats::default(),
        }
    }

    fn schedule(&mut self, delay: u64, ev: Event) {
        self.seq += 1;
        self.queue
            .push(std::cmp::Reverse((self.now + delay, self.seq, ev)));
    }

    fn reachable(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        n.node.is_some() && !n.retired && self.partition.is_none_or(|(az, _)| az != n.az)
    }

    /// Members of the current segment sets (old and new) that cannot answer.
    fn unavailable_count(&self) -> usize {
        let m = self.placement.default_membership();
        m.members().filter(|i| !self.reachable(*i)).count()
    }

    /// Nodes that exist (not retired).
    fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].retired)
            .collect()
    }

    /// Breaks the (writer, node) connection: both sides forget in-flight state.
    fn break_conn(&mut self, writer: usize, node: usize) {
        let Some(w) = self.writers.get_mut(writer) else {
            return;
        };
        let (state, gen) = &mut w.conns[node];
        if *state != ConnState::Down {
            *state = ConnState::Down;
            *gen += 1;
            w.core.node_reset(node);
        }
    }

    fn send(&mut self, mut msg: Msg) {
        self.stats.messages += 1;
        let node_ok = self.reachable(msg.node);
        // A node being replaced while it still serves is often a flaky one: its
        // link drops far more, so it lags (and tests quorums that lean on it).
        let flaky = self.transition.is_some_and(|t| t.victim == msg.node)
            && self.rng.chance(self.cfg.victim_drop_per_mille);
        if !node_ok || flaky || self.rng.chance(self.cfg.drop_per_mille) {
            // Lost: TCP would surface this as a reset connection.
            self.stats.dropped += 1;
            self.break_conn(msg.writer, msg.node);
            return;
        }
        let delay = 1 + self.rng.below(self.cfg.max_delay);
        if self.rng.chance(self.cfg.dup_per_mille) {
            let d2 = 1 + self.rng.below(self.cfg.max_delay);
            self.schedule(d2, Event::Deliver(msg.clone()));
        }
        msg.frame.shrink_to_fit();
        self.schedule(delay, Event::Deliver(msg));
    }

    // ---- writers --------------------------------------------------------------------

    /// Recovery as in `remote.rs`, against every reachable node (a read quorum of
    /// each PG is required, the epoch must land on a write quorum).
    fn recover(&mut self) -> Result<bool, String> {
        let epoch = Epoch(self.next_epoch);
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.reachable(*i))
            .collect();
        if up.len() < WRITE_QUORUM as usize {
            return Ok(false);
        }
        let mut history: Vec<Truncation> = Vec::new();
        let mut start = Lsn::ZERO;
        let mut pgs = std::collections::BTreeSet::new();
        for &i in &up {
            let Some(node) = self.nodes[i].node.as_mut() else {
                continue;
            };
            if let Handled::Reply(Response::Hello {
                history: h,
                segments,
                ..
            }) = node.handle(Request::Hello)
            {
                history = merge_history(&history, &h);
                for s in segments {
                    start = start.max(s.vdl_hint);
                    pgs.insert(s.pg);
                }
            }
        }
        // Fence first: once the epoch is on a write quorum, the old writer can add
        // acks only from the at most 2 nodes that missed it, so any record it could
        // still complete is already on enough fenced nodes for a read quorum of them
        // to see it.
        let mut fenced = Vec::new();
        for &i in &up {
            let Some(node) = self.nodes[i].node.as_mut() else {
                continue;
            };
            if let Handled::Reply(Response::EpochInstalled { .. }) =
                node.handle(Request::InstallEpoch {
                    epoch,
                    history: history.clone(),
                })
            {
                fenced.push(i);
            }
        }
        // The epoch must be on a write quorum of every segment set (both sets of a
        // replacement: a stale writer may count either).
        let groups = self.placement.groups();
        let quorum_everywhere = |nodes: &[usize]| {
            groups
                .iter()
                .all(|g| g.iter().filter(|n| nodes.contains(n)).count() >= WRITE_QUORUM as usize)
        };
        if !quorum_everywhere(&fenced) {
            return Ok(false);
        }
        self.next_epoch += 1;
        // Read exactly a read quorum: 3 fenced segments of the (old) six, at random
        // or adversarially. That is all the protocol promises to need, so the
        // simulation must not be kinder. (3 of the new six during a replacement
        // would not do: see `Membership::read_quorum`.)
        let m = self.placement.default_membership();
        let mut readers: Vec<usize> = fenced
            .iter()
            .copied()
            .filter(|n| m.segments.contains(n))
            .collect();
        if readers.len() < READ_QUORUM {
            return fail(self.seed, format!("no read quorum among fenced {fenced:?}"));
        }
        if self.rng.chance(500) {
            // Adversarial: the least complete segments of the set (by the records
            // they hold), the quorum most likely to miss something.
            let held = |n: &usize| -> u64 {
                self.nodes[*n]
                    .node
                    .as_ref()
                    .map(|node| {
                        node.pgs()
                            .iter()
                            .filter_map(|pg| node.segment(*pg))
                            .map(|s| s.record_count() as u64 + s.scl().0)
                            .sum()
                    })
                    .unwrap_or(0)
            };
            readers.sort_by_key(held);
            readers.truncate(READ_QUORUM);
        }
        while readers.len() > READ_QUORUM {
            let k = self.rng.below(readers.len() as u64) as usize;
            readers.remove(k);
        }
        let mut answers = Vec::new();
        for pg in &pgs {
            for &i in &readers {
                let Some(node) = self.nodes[i].node.as_mut() else {
                    continue;
                };
                let mut from = start;
                let mut answer = TailAnswer {
                    pg: *pg,
                    last_at_or_below: Lsn::ZERO,
                    records: Vec::new(),
                };
                for round in 0..10_000 {
                    let req = Request::Tail {
                        pg: *pg,
                        from,
                        history: history.clone(),
                        max_bytes: 512,
                    };
                    let Handled::Reply(Response::Tail {
                        last_at_or_below,
                        records,
                        more,
                        ..
                    }) = node.handle(req)
                    else {
                        return fail(self.seed, "tail request failed".into());
                    };
                    if round == 0 {
                        answer.last_at_or_below = last_at_or_below;
                    }
                    if let Some(h) = records
                        .last()
                        .and_then(|r| borealis_redo::decode_header(&r.bytes).ok())
                    {
                        from = h.lsn;
                    }
                    let done = !more || records.is_empty();
                    answer.records.extend(records);
                    if done {
                        break;
                    }
                }
                answers.push(answer);
            }
        }
        let (_vcl, recovered) = plan(self.cfg.geometry, epoch, start, &history, &answers);
        if std::env::var("SIM_DEBUG_RECOVERY").is_ok() {
            eprintln!("t={} recovery {epoch}: start {start} vdl {} tails {:?} readers {readers:?} fenced {fenced:?}", self.now, recovered.vdl, recovered.pg_tails);
            for a in &answers {
                eprintln!(
                    "   answer {} last_at_or_below {} records {}",
                    a.pg,
                    a.last_at_or_below,
                    a.records.len()
                );
            }
        }
        // Durability: nothing any earlier writer acknowledged may be lost.
        if recovered.vdl < self.acked_vdl {
            return fail(
                self.seed,
                format!(
                    "recovery at {epoch} found VDL {} below acknowledged VDL {}",
                    recovered.vdl, self.acked_vdl
                ),
            );
        }
        for (_, lsn, bytes) in &recovered.replicate {
            match self.model.get(lsn) {
                Some(r) if r.encode() == *bytes => {}
                other => {
                    return fail(
                        self.seed,
                        format!(
                        "recovery brought back record {lsn} that differs from the model: {other:?}"
                    ),
                    )
                }
            }
        }
        if let Some(missing) = (1..=recovered.vdl.0).find(|l| !self.model.contains_key(&Lsn(*l))) {
            return fail(
                self.seed,
                format!(
                    "recovered VDL {} but LSN {missing} was never written",
                    recovered.vdl
                ),
            );
        }
        let mut installed = 0;
        for &i in &fenced {
            let Some(node) = self.nodes[i].node.as_mut() else {
                continue;
            };
            if let Handled::Reply(Response::EpochInstalled { .. }) =
                node.handle(Request::InstallEpoch {
                    epoch,
                    history: recovered.history.clone(),
                })
            {
                installed += 1;
            }
        }
        let _ = installed;
        // Installation is what fencing did already (same nodes, same epoch); the
        // history it adds only truncates.
        self.stats.recoveries += 1;
        // The log is what recovery kept.
        let vdl = recovered.vdl;
        self.model.retain(|l, _| *l <= vdl);
        self.initialized = self
            .model
            .values()
            .filter(|r| matches!(r.op, Op::Init { .. }))
            .map(|r| r.page)
            .collect();
        for w in self.writers.iter_mut() {
            if w.fenced_after.is_none() {
                w.fenced_after = Some(w.core.last_lsn());
                w.fence_vdl = vdl;
            }
        }
        let qcfg = QuorumConfig {
            max_batch_records: 16,
            max_inflight_batches: 8,
            retain_acked_records: 1 << 20,
            transition_quorum: self.cfg.transition_quorum,
            // Half the writers keep two segments lazy ("eager four"), flushed to them
            // at random points below.
            lazy_segments: if self.rng.chance(500) { 2 } else { 0 },
            ..QuorumConfig::default()
        };
        let core = WriterCore::new(
            self.cfg.geometry,
            self.placement.clone(),
            self.cfg.lal,
            epoch,
            recovered,
            qcfg,
        );
        self.check_model_chain()?;
        self.writers.push(SimWriter {
            core,
            conns: vec![(ConnState::Down, 0); self.nodes.len()],
            zombie: false,
            fenced_after: None,
            fence_vdl: Lsn::ZERO,
            max_vdl: vdl,
        });
        self.active = Some(self.writers.len() - 1);
        Ok(true)
    }

    /// The model's own consistency: every backlink names the previous record of
    /// the same PG (a wrong PG tail after recovery would fork the chain).
    fn check_model_chain(&self) -> Result<(), String> {
        let mut tails: BTreeMap<PgId, Lsn> = BTreeMap::new();
        for (l, r) in &self.model {
            let pg = self.cfg.geometry.pg_of(r.page);
            let t = tails.insert(pg, *l).unwrap_or(Lsn::ZERO);
            if r.prev_lsn != t {
                return fail(
                    self.seed,
                    format!(
                        "t={} record {l} of {pg} has backlink {} but the previous record is {t}",
                        self.now, r.prev_lsn
                    ),
                );
            }
        }
        Ok(())
    }

    fn append_mtr(&mut self) -> Result<(), String> {
        let Some(w) = self.active else { return Ok(()) };
        let n = 1 + self.rng.below(3) as usize;
        if !self.writers[w].core.has_room(n + 1) || !self.writers[w].core.rereplication_done() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for _ in 0..n {
            let page = self.rng.below(self.cfg.pages);
            if !self.initialized.contains(&page)
                && !ops
                    .iter()
                    .any(|(p, o)| *p == page && matches!(o, Op::Init { .. }))
            {
                ops.push((page, Op::Init { kind: 1 }));
            }
            let v = self.rng.next_u64();
            match v % 3 {
                0 => ops.push((
                    page,
                    Op::StampLsnBody {
                        offset: (v % 1000) as u16 * 8,
                    },
                )),
                _ => ops.push((
                    page,
                    Op::WriteBody {
                        offset: (v % 1000) as u16 * 8,
                        data: v.to_le_bytes().to_vec(),
                    },
                )),
            }
        }
        let (records, _) = match self.writers[w].core.append(ops) {
            Ok(x) => x,
            Err(e) => return fail(self.seed, format!("append: {e}")),
        };
        // The writer holds records back until a commit asks for them (or a
        // threshold/timer sends them): flush after some MTRs only, so batches carry
        // held-back records of several MTRs and completeness stops at the flush point.
        if self.rng.chance(500) {
            let last = self.writers[w].core.last_lsn();
            self.writers[w].core.request_flush(last);
        }
        if self.rng.chance(100) {
            self.writers[w].core.flush_lazy();
        }
        for r in records {
            if matches!(r.op, Op::Init { .. }) {
                self.initialized.insert(r.page);
            }
            self.stats.appended_records += 1;
            self.model.insert(r.lsn, r);
        }
        Ok(())
    }

    fn pump(&mut self) {
        for w in 0..self.writers.len() {
            for node in 0..self.writers[w].conns.len() {
                let (state, gen) = self.writers[w].conns[node];
                match state {
                    ConnState::Down => {
                        if self.rng.chance(300) {
                            let req = Request::InstallEpoch {
                                epoch: self.writers[w].core.epoch(),
                                history: self.writers[w].core.history().to_vec(),
                            };
                            self.writers[w].conns[node].0 = ConnState::Handshake;
                            self.send(Msg {
                                writer: w,
                                node,
                                gen,
                                dir: Dir::ToNode,
                                frame: proto::encode_request(0, &req),
                            });
                        }
                    }
                    ConnState::Handshake => {}
                    ConnState::Up => {
                        for _ in 0..4 {
                            let Some(req) = self.writers[w].core.next_batch(node) else {
                                break;
                            };
                            self.send(Msg {
                                writer: w,
                                node,
                                gen,
                                dir: Dir::ToNode,
                                frame: proto::encode_request(1, &req),
                            });
                            if self.writers[w].conns[node].0 != ConnState::Up {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn on_writer_msg(&mut self, msg: Msg) -> Result<(), String> {
        let w = msg.writer;
        let Some(writer) = self.writers.get(w) else {
            return Ok(());
        };
        if writer.conns[msg.node].1 != msg.gen {
            return Ok(()); // from a connection that no longer exists
        }
        let Ok(body) = proto::frame_body(&msg.frame) else {
            return fail(self.seed, "bad frame".into());
        };
        let (id, resp) = match proto::decode_response(body) {
            Ok(x) => x,
            Err(e) => return fail(self.seed, format!("undecodable response: {e}")),
        };
        let state = self.writers[w].conns[msg.node].0;
        if id == 0 {
            if state == ConnState::Handshake {
                if matches!(resp, Response::EpochInstalled { .. }) {
                    self.writers[w].conns[msg.node].0 = ConnState::Up;
                    self.writers[w].core.node_ready(msg.node);
                } else {
                    self.writers[w].core.on_response(msg.node, &resp);
                    self.break_conn(w, msg.node);
                    self.writers[w].conns[msg.node].0 = ConnState::Down;
                }
            }
            return Ok(());
        }
        if state != ConnState::Up {
            return Ok(());
        }
        let before = self.writers[w].core.vdl();
        let fx = self.writers[w].core.on_response(msg.node, &resp);
        if fx.reset_node || fx.fenced {
            self.break_conn(w, msg.node);
        }
        let writer = &mut self.writers[w];
        let vdl = writer.core.vdl();
        if vdl < before || vdl < writer.max_vdl {
            return fail(
                self.seed,
                format!("VDL went backward: {} -> {vdl}", writer.max_vdl),
            );
        }
        writer.max_vdl = vdl;
        if let Some(fence) = writer.fenced_after {
            // A fenced writer: nothing it wrote after being fenced may reach quorum.
            let writer = &self.writers[w];
            for l in fence.0 + 1..=writer.core.last_lsn().0 {
                if writer.core.at_write_quorum(Lsn(l)) {
                    return fail(
                        self.seed,
                        format!(
                            "fenced writer (epoch {}) got LSN {l} accepted by a write quorum",
                            writer.core.epoch()
                        ),
                    );
                }
            }
            // (A writer whose recovered tail is still being re-replicated has not
            // acknowledged anything yet; its VDL is a plan, not a promise.)
            if writer.core.rereplication_done() && writer.core.vdl() > writer.fence_vdl {
                return fail(
                    self.seed,
                    format!("fenced writer (epoch {}) reached VDL {} beyond the fencing recovery's VDL {}", writer.core.epoch(), writer.core.vdl(), writer.fence_vdl),
                );
            }
        } else if Some(w) == self.active && self.writers[w].core.rereplication_done() {
            // Only now is the recovered tail at write quorum; before, a crash may
            // legitimately lose it (nothing above the old VDL was acknowledged).
            self.acked_vdl = self.acked_vdl.max(vdl);
        }
        Ok(())
    }

    // ---- nodes ----------------------------------------------------------------------

    fn on_node_msg(&mut self, msg: Msg) -> Result<(), String> {
        if !self.reachable(msg.node) {
            self.break_conn(msg.writer, msg.node);
            return Ok(());
        }
        let Ok(body) = proto::frame_body(&msg.frame) else {
            return fail(self.seed, "bad frame".into());
        };
        let (id, req) = match proto::decode_request(body) {
            Ok(x) => x,
            Err(e) => return fail(self.seed, format!("undecodable request: {e}")),
        };
        let Some(node) = self.nodes[msg.node].node.as_mut() else {
            return Ok(());
        };
        // An append carrying an older membership epoch than its segment has seen
        // must be refused.
        let stale = match &req {
            Request::Append(a) => a.pgs.iter().find_map(|b| {
                let seen = node
                    .segment(b.pg)
                    .map(|s| s.membership_epoch())
                    .unwrap_or(0);
                (b.membership_epoch < seen).then_some((b.pg, b.membership_epoch, seen))
            }),
            _ => None,
        };
        let handled = node.handle(req);
        if let (Some((pg, theirs, seen)), Handled::AfterSync(Response::Appended { .. })) =
            (stale, &handled)
        {
            return fail(
                self.seed,
                format!(
                    "storage-{} accepted an append of {pg} at membership epoch {theirs} after seeing {seen}",
                    msg.node
                ),
            );
        }
        match handled {
            Handled::Reply(resp) => {
                let frame = proto::encode_response(id, &resp);
                self.send(Msg {
                    writer: msg.writer,
                    node: msg.node,
                    gen: msg.gen,
                    dir: Dir::ToWriter,
                    frame,
                });
            }
            Handled::AfterSync(resp) => self.nodes[msg.node]
                .waiting
                .push((msg.writer, msg.gen, id, resp)),
        }
        self.maybe_start_sync(msg.node);
        Ok(())
    }

    fn maybe_start_sync(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.syncing.is_some() {
            return;
        }
        let Some(node) = n.node.as_mut() else { return };
        if let Some(job) = node.take_sync() {
            let replies = std::mem::take(&mut n.waiting);
            n.syncing = Some((job, replies));
            let inc = n.incarnation;
            let d = 1 + self.rng.below(3);
            self.schedule(
                d,
                Event::SyncDone {
                    node: i,
                    incarnation: inc,
                },
            );
        }
    }

    fn on_sync_done(&mut self, i: usize, incarnation: u64) {
        let n = &mut self.nodes[i];
        if n.incarnation != incarnation {
            return;
        }
        let Some((job, replies)) = n.syncing.take() else {
            return;
        };
        let r = job();
        let Some(node) = n.node.as_mut() else { return };
        node.sync_done(&r, std::time::Duration::ZERO);
        if r.is_ok() {
            let replies: Vec<_> = replies
                .into_iter()
                .map(|(w, g, id, resp)| (w, g, id, node.release(resp)))
                .collect();
            for (writer, gen, id, resp) in replies {
                let frame = proto::encode_response(id, &resp);
                self.send(Msg {
                    writer,
                    node: i,
                    gen,
                    dir: Dir::ToWriter,
                    frame,
                });
            }
        }
        self.maybe_start_sync(i);
    }

    fn crash_node(&mut self, i: usize) {
        self.stats.node_crashes += 1;
        let n = &mut self.nodes[i];
        if let Some(node) = n.node.take() {
            self.stats.images_evicted += node.stats.images_evicted;
            self.stats.image_reads += node.stats.image_reads;
            self.stats.image_checkpoints += node.stats.image_checkpoints;
        }
        n.incarnation += 1;
        n.waiting.clear();
        n.syncing = None;
        n.down_until = self.now + 20 + self.rng.below(200);
        let mut rng = self.rng.clone();
        n.disk
            .crash(|_, len| (rng.below(len as u64 + 1) as usize, rng.chance(300)));
        self.rng.next_u64();
        for w in 0..self.writers.len() {
            self.break_conn(w, i);
        }
    }

    fn restart_node(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        match Node::open(&format!("storage-{i}"), n.disk.clone(), sim_limits()) {
            Ok(node) => {
                n.node = Some(node);
                Ok(())
            }
            Err(e) => fail(
                self.seed,
                format!("node {i} failed to reopen after a crash: {e}"),
            ),
        }
    }

    /// One gossip round for node `i`: for each PG some peer is further along on,
    /// pull the records after our chain's end from that peer.
    fn gossip(&mut self, i: usize) {
        if !self.reachable(i) {
            return;
        }
        let peers: Vec<usize> = (0..self.nodes.len())
            .filter(|j| *j != i && self.reachable(*j))
            .collect();
        if peers.is_empty() {
            return;
        }
        let j = peers[self.rng.below(peers.len() as u64) as usize];
        let Some(peer_pgs) = self.nodes[j].node.as_ref().map(|n| n.pgs()) else {
            return;
        };
        for pg in peer_pgs {
            let (Some(me), Some(peer)) = (self.nodes[i].node.as_ref(), self.nodes[j].node.as_ref())
            else {
                return;
            };
            let (peer_scl, _) = peer.progress(pg);
            let peer_floor = peer.segment(pg).map(|s| s.gc_floor()).unwrap_or(Lsn::ZERO);
            if me.needs_snapshot(pg, peer_floor) {
                // Rebuilding past the peer's GC floor: take its snapshot, in chunks.
                let mut bytes = Vec::new();
                let Some(peer) = self.nodes[j].node.as_mut() else {
                    return;
                };
                for _ in 0..100_000 {
                    match peer.handle(Request::Snapshot {
                        pg,
                        offset: bytes.len() as u64,
                        max_bytes: 4096,
                    }) {
                        Handled::Reply(Response::SnapshotChunk {
                            total, bytes: b, ..
                        }) => {
                            bytes.extend_from_slice(&b);
                            if bytes.len() as u64 >= total {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
                if let Some(me) = self.nodes[i].node.as_mut() {
                    if me.install_snapshot(pg, &bytes).is_ok() {
                        self.stats.snapshots_installed += 1;
                    }
                }
                continue;
            }
            let Some(my_last) = me.gossip_from(pg, peer_scl) else {
                continue;
            };
            let Some(peer) = self.nodes[j].node.as_mut() else {
                return;
            };
            let Handled::Reply(chunk) = peer.handle(Request::ReadLog {
                pg,
                after: my_last,
                max_bytes: 2048,
            }) else {
                continue;
            };
            if let Some(me) = self.nodes[i].node.as_mut() {
                me.absorb(&chunk);
            }
        }
        self.maybe_start_sync(i);
    }

    // ---- segment replacement ----------------------------------------------------------

    /// The control plane starts replacing one segment of the default set: a new
    /// node joins in the victim's AZ and the membership enters its transitional
    /// epoch (old six and new six). The victim is gone for good now, or keeps
    /// serving until the replacement completes (a planned move).
    fn start_replacement(&mut self) {
        if self.transition.is_some()
            || self.stats.replacements_started as usize >= self.cfg.max_replacements
        {
            return;
        }
        let m = self.placement.default_membership();
        let victim = m.segments[self.rng.below(SEGMENTS as u64) as usize];
        let az = self.nodes[victim].az;
        let new = self.nodes.len();
        let name = format!("storage-{new}");
        self.nodes.push(SimNode::fresh(&name, az));
        for w in self.writers.iter_mut() {
            w.conns.push((ConnState::Down, 0));
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + new as u16));
        self.placement
            .add_node(name, borealis_common::AZS[az].to_string(), addr);
        let mut next = m.segments;
        for n in next.iter_mut() {
            if *n == victim {
                *n = new;
            }
        }
        let epoch = m.epoch + 1;
        self.placement.set_default_membership(Membership {
            epoch,
            segments: m.segments,
            next: Some(next),
        });
        self.transition = Some(Transition {
            victim,
            new,
            epoch,
            not_before: self.now + self.rng.below(self.cfg.transition_min_steps_max + 1),
        });
        self.stats.replacements_started += 1;
        if self.partition.is_some() {
            self.stats.replacements_under_partition += 1;
        }
        if self.rng.chance(500) {
            self.retire(victim);
        }
        self.adopt_at = self.now + self.rng.below(40);
        if std::env::var("SIM_DEBUG_MEMBERSHIP").is_ok() {
            eprintln!(
                "t={} replace storage-{victim} by storage-{new} at membership epoch {epoch}",
                self.now
            );
        }
    }

    /// The victim of a replacement is destroyed: it never comes back.
    fn retire(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.retired = true;
        n.node = None;
        n.incarnation += 1;
        n.waiting.clear();
        n.syncing = None;
        for w in 0..self.writers.len() {
            self.break_conn(w, i);
        }
    }

    /// The active writer adopts the control plane's placement once its poll comes
    /// round; the control plane completes a replacement once the new segment caught
    /// up with what the writer reported when it adopted the transition.
    fn step_replacement(&mut self) {
        if let Some(w) = self.active {
            if self.now >= self.adopt_at && self.writers[w].core.placement != self.placement {
                let wake = self.writers[w]
                    .core
                    .update_placement(self.placement.clone());
                let _ = wake;
            }
        }
        let Some(t) = self.transition else { return };
        let Some(w) = self.active else { return };
        if self.now < t.not_before {
            return;
        }
        let Some(status) = self.writers[w]
            .core
            .transitions()
            .into_iter()
            .find(|s| s.group.is_none() && s.membership_epoch == t.epoch)
        else {
            return;
        };
        let Some(node) = self.nodes[t.new].node.as_ref() else {
            return;
        };
        if !status
            .pgs
            .iter()
            .all(|pg| node.durable_scl(*pg) >= status.catch_up_lsn)
        {
            return;
        }
        let m = self.placement.default_membership();
        let Some(next) = m.next else { return };
        self.placement
            .set_default_membership(Membership::stable(t.epoch + 1, next));
        self.transition = None;
        self.stats.replacements_completed += 1;
        if !self.nodes[t.victim].retired {
            self.retire(t.victim);
        }
        self.adopt_at = self.now + self.rng.below(40);
        if std::env::var("SIM_DEBUG_MEMBERSHIP").is_ok() {
            eprintln!(
                "t={} replacement of storage-{} done at catch-up {} (epoch {})",
                self.now,
                t.victim,
                status.catch_up_lsn,
                t.epoch + 1
            );
        }
    }

    // ---- checks ---------------------------------------------------------------------

    fn model_page(&self, page: PageNo, at: Lsn) -> Result<Page, String> {
        let mut p = Page::zeroed();
        for r in self
            .model
            .range(..=at)
            .map(|(_, r)| r)
            .filter(|r| r.page == page)
        {
            apply(&mut p, page, r).map_err(|e| format!("model apply: {e}"))?;
        }
        Ok(p)
    }

    /// Reads `page` at `at` from segment `i` (directly: reads are single-segment);
    /// `Ok(false)` if the segment cannot serve it.
    fn check_read(&mut self, i: usize, page: PageNo, at: Lsn) -> Result<bool, String> {
        let pg = self.cfg.geometry.pg_of(page);
        let Some(node) = self.nodes[i].node.as_mut() else {
            return Ok(false);
        };
        let got = match node.handle(Request::GetPage {
            pg,
            page,
            read_lsn: at,
        }) {
            Handled::Reply(Response::Page { bytes }) => Page::from_bytes(&bytes),
            _ => return Ok(false),
        };
        let want = self.model_page(page, at).or_else(|e| fail(self.seed, e))?;
        if got.as_ref() != Some(&want) {
            self.check_model_chain()?;
            if let Some(seg) = self.nodes[i].node.as_ref().and_then(|n| n.segment(pg)) {
                eprintln!(
                    "segment scl {} scl_record {} floor {}",
                    seg.scl(),
                    seg.scl_record(),
                    seg.gc_floor()
                );
                for (l, e, b) in seg.page_records(page) {
                    let m = self.model.get(&l).map(|r| r.encode() == b);
                    eprintln!("  held {l} epoch {e} matches model: {m:?}");
                }
                for (l, p, e) in seg.chain_debug(Lsn(at.0.saturating_sub(40)), at) {
                    eprintln!("  seg {l} prev {p} epoch {e}");
                }
                for (l, r) in self.model.range(Lsn(at.0.saturating_sub(40))..=at) {
                    if self.cfg.geometry.pg_of(r.page) == pg {
                        eprintln!("  model {l} prev {} page {}", r.prev_lsn, r.page);
                    }
                }
            }
            return fail(self.seed, format!("GetPage({page} @ {at}) from storage-{i} differs from the model: got {got:?}, want {want:?}"));
        }
        self.stats.reads_checked += 1;
        Ok(true)
    }

    fn random_read(&mut self) -> Result<(), String> {
        let vdl = self.acked_vdl;
        if vdl <= self.pgmrpl {
            return Ok(());
        }
        let at = Lsn(self.pgmrpl.0 + self.rng.below(vdl.0 - self.pgmrpl.0 + 1));
        let page = self.rng.below(self.cfg.pages);
        let live = self.live_nodes();
        let i = live[self.rng.below(live.len() as u64) as usize];
        self.check_read(i, page, at).map(|_| ())
    }

    // ---- the loop -------------------------------------------------------------------

    fn step_faults(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].node.is_none()
                && !self.nodes[i].retired
                && self.now >= self.nodes[i].down_until
            {
                self.restart_node(i)?;
            }
        }
        if self.partition.is_some_and(|(_, until)| self.now >= until) {
            self.partition = None;
        }
        if self.unavailable_count() < 2 && self.rng.chance(self.cfg.crash_per_mille) {
            let live = self.live_nodes();
            let i = live[self.rng.below(live.len() as u64) as usize];
            if self.nodes[i].node.is_some() {
                self.crash_node(i);
            }
        }
        if self.partition.is_none()
            && self.unavailable_count() == 0
            && self.rng.chance(self.cfg.partition_per_mille)
        {
            let az = self.rng.below(3) as usize;
            self.partition = Some((az, self.now + 20 + self.rng.below(150)));
            self.stats.partitions += 1;
            for i in 0..self.nodes.len() {
                if self.nodes[i].az == az {
                    for w in 0..self.writers.len() {
                        self.break_conn(w, i);
                    }
                }
            }
            // A membership change during an AZ partition.
            if self.transition.is_none() && self.rng.chance(500) {
                self.start_replacement();
            }
        }
        if self.transition.is_none() && self.rng.chance(self.cfg.replace_per_mille) {
            self.start_replacement();
        }
        self.step_replacement();
        if self.rng.chance(self.cfg.writer_crash_per_mille) {
            if let Some(w) = self.active.take() {
                // The old writer lives on as a zombie that keeps sending.
                self.writers[w].zombie = true;
            }
        }
        if self.active.is_none() {
            self.recover()?;
        }
        if self.rng.chance(20) {
            // Move PGMRPL a little behind VDL so segments GC.
            let target = Lsn(self.acked_vdl.0.saturating_sub(20));
            if target > self.pgmrpl {
                self.pgmrpl = target;
            }
            if let Some(w) = self.active {
                self.writers[w].core.set_pgmrpl(self.pgmrpl);
            }
        }
        if self.rng.chance(100) {
            let live = self.live_nodes();
            let i = live[self.rng.below(live.len() as u64) as usize];
            self.gossip(i);
        }
        if self.rng.chance(30) {
            if std::env::var("SIM_DEBUG_GC").is_ok() {
                let cur = self.active.map(|w| self.writers[w].core.epoch());
                for i in 0..self.nodes.len() {
                    let Some(node) = self.nodes[i].node.as_ref() else {
                        continue;
                    };
                    if Some(node.epoch()) != cur {
                        continue;
                    }
                    for pg in node.pgs() {
                        let Some(seg) = node.segment(pg) else {
                            continue;
                        };
                        for page in pg.0 as u64 * self.cfg.geometry.pages_per_pg
                            ..(pg.0 as u64 + 1) * self.cfg.geometry.pages_per_pg
                        {
                            if page >= self.cfg.pages {
                                continue;
                            }
                            for at in [seg.gc_floor(), seg.scl_record()] {
                                if let Ok(got) = seg.get_page(
                                    page,
                                    at,
                                    &mut borealis_storage::segment::resident_only,
                                ) {
                                    if got != self.model_page(page, at)? {
                                        return fail(self.seed, format!("t={} pre-tick node {i} page {page} wrong at {at} floor {}", self.now, seg.gc_floor()));
                                    }
                                }
                            }
                        }
                        for (l, prev, e) in seg.chain_debug(Lsn(0), seg.scl_record()) {
                            match self.model.get(&l) {
                                Some(r) if r.prev_lsn == prev => {}
                                other => return fail(self.seed, format!("t={} node {i} holds {l} (prev {prev}, epoch {e}) in its chain; model {:?}", self.now, other.map(|r| (r.prev_lsn, r.page)))),
                            }
                        }
                    }
                }
            }
            for n in self.nodes.iter_mut() {
                if let Some(node) = n.node.as_mut() {
                    node.tick();
                }
            }
            if std::env::var("SIM_DEBUG_GC").is_ok() {
                for i in 0..self.nodes.len() {
                    let Some(node) = self.nodes[i].node.as_ref() else {
                        continue;
                    };
                    for pg in node.pgs() {
                        let Some(seg) = node.segment(pg) else {
                            continue;
                        };
                        let floor = seg.gc_floor();
                        for page in pg.0 as u64 * self.cfg.geometry.pages_per_pg
                            ..(pg.0 as u64 + 1) * self.cfg.geometry.pages_per_pg
                        {
                            if page >= self.cfg.pages {
                                continue;
                            }
                            let got = seg.get_page(
                                page,
                                floor,
                                &mut borealis_storage::segment::resident_only,
                            );
                            let want = self.model_page(page, floor)?;
                            if let Ok(got) = got {
                                if got != want {
                                    return fail(self.seed, format!("t={} node {i} epoch {} page {page} wrong at floor {floor} (hint {}, pgmrpl {}, scl_record {})", self.now, node.epoch(), seg.vdl_hint(), self.pgmrpl, seg.scl_record()));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn drain_until(&mut self, t: u64) -> Result<(), String> {
        while let Some(std::cmp::Reverse((at, _, _))) = self.queue.peek() {
            if *at > t {
                break;
            }
            let Some(std::cmp::Reverse((at, _, ev))) = self.queue.pop() else {
                break;
            };
            self.now = at;
            match ev {
                Event::Deliver(m) if m.dir == Dir::ToNode => self.on_node_msg(m)?,
                Event::Deliver(m) => self.on_writer_msg(m)?,
                Event::SyncDone { node, incarnation } => self.on_sync_done(node, incarnation),
            }
        }
        self.now = t;
        Ok(())
    }

    pub fn run(mut self) -> Result<SimStats, String> {
        self.recover()?;
        for step in 0..self.cfg.steps {
            self.step_faults()?;
            if self.rng.chance(self.cfg.append_per_mille) {
                self.append_mtr()?;
            }
            self.pump();
            if self.rng.chance(self.cfg.read_per_mille) {
                self.random_read()?;
            }
            self.drain_until(step + 1)?;
        }
        self.heal_and_check()
    }

    /// Ends every fault, lets the system quiesce, and checks that the whole log is
    /// durable and every page readable at the final VDL.
    fn heal_and_check(mut self) -> Result<SimStats, String> {
        self.partition = None;
        for i in self.live_nodes() {
            if self.nodes[i].node.is_none() {
                self.restart_node(i)?;
            }
        }
        if self.active.is_none() {
            for _ in 0..3 {
                if self.recover()? {
                    break;
                }
            }
        }
        let Some(w) = self.active else {
            return fail(self.seed, "no writer could recover after healing".into());
        };
        let (saved_drop, saved_dup) = (self.cfg.drop_per_mille, self.cfg.dup_per_mille);
        self.cfg.drop_per_mille = 0;
        self.cfg.dup_per_mille = 0;
        let end = self.now + 2000;
        let last = self.writers[w].core.last_lsn();
        self.writers[w].core.request_flush(last);
        self.writers[w].core.flush_lazy();
        while self.now < end {
            self.pump();
            self.step_replacement();
            for i in self.live_nodes() {
                self.gossip(i);
            }
            let t = self.now + 1;
            self.drain_until(t)?;
            let core = &self.writers[w].core;
            let settled = core.vdl() == core.last_lsn()
                && self.queue.is_empty()
                && (0..self.nodes.len()).all(|i| self.nodes[i].syncing.is_none())
                && self.live_nodes().into_iter().all(|i| {
                    let n = &self.nodes[i];
                    n.node
                        .as_ref()
                        .is_some_and(|n| n.pgs().iter().all(|pg| n.progress(*pg).0 >= core.vdl()))
                });
            if settled {
                break;
            }
        }
        self.cfg.drop_per_mille = saved_drop;
        self.cfg.dup_per_mille = saved_dup;
        let core = &self.writers[w].core;
        if core.vdl() != core.last_lsn() {
            return fail(
                self.seed,
                format!(
                    "after healing VDL {} never reached the last LSN {}",
                    core.vdl(),
                    core.last_lsn()
                ),
            );
        }
        let vdl = core.vdl();
        self.acked_vdl = self.acked_vdl.max(vdl);
        for page in 0..self.cfg.pages {
            let mut served = 0;
            for i in self.live_nodes() {
                if self.check_read(i, page, vdl)? {
                    served += 1;
                }
            }
            if served == 0 {
                let pg = self.cfg.geometry.pg_of(page);
                let progress: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| n.node.as_ref().map(|n| (n.progress(pg), n.epoch())))
                    .collect();
                for i in 0..self.nodes.len() {
                    if let Some(seg) = self.nodes[i].node.as_ref().and_then(|n| n.segment(pg)) {
                        let from = Lsn(seg.scl_record().0.saturating_sub(3));
                        eprintln!(
                            "node {i}: floor {} records {} max {} hint {} first {:?}",
                            seg.gc_floor(),
                            seg.record_count(),
                            seg.max_lsn(),
                            seg.vdl_hint(),
                            seg.chain_debug(Lsn(0), Lsn::MAX).first()
                        );
                        eprintln!("node {i}: {:?}", seg.chain_debug(from, Lsn(from.0 + 30)));
                    }
                }
                let mut missing = Vec::new();
                for (l, rec) in self.model.iter() {
                    if self.cfg.geometry.pg_of(rec.page) != pg {
                        continue;
                    }
                    let held = (0..self.nodes.len())
                        .filter(|i| {
                            self.nodes[*i]
                                .node
                                .as_ref()
                                .and_then(|n| n.segment(pg))
                                .is_some_and(|s| {
                                    *l <= s.gc_floor() || !s.chain_debug(*l, *l).is_empty()
                                })
                        })
                        .count();
                    if held < 4 {
                        missing.push((l.0, held));
                    }
                }
                eprintln!("under-replicated pg records (lsn, holders): {missing:?}");
                let core = &self.writers[w].core;
                return fail(
                    self.seed,
                    format!(
                        "no segment can serve page {page} at the final VDL {vdl}: {pg} tail {:?}, segments (scl, scl_record), epoch: {progress:?}",
                        core.pg_tail(pg)
                    ),
                );
            }
        }
        self.stats.final_vdl = vdl.0;
        for node in self.nodes.iter().filter_map(|n| n.node.as_ref()) {
            self.stats.images_evicted += node.stats.images_evicted;
            self.stats.image_reads += node.stats.image_reads;
            self.stats.image_checkpoints += node.stats.image_checkpoints;
        }
        Ok(self.stats)
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<SimStats, String> {
    Sim::new(seed, cfg.clone()).run()
}

#[allow(dead_code)]
fn _unused(_: PgId) {}
