//! The writer's quorum bookkeeping as a state machine with no I/O: LSN allocation,
//! per-node send queues, acks, PGCL/VCL/VDL, LAL backpressure and read routing.
//! The tokio driver (`remote.rs`) and the simulation (`borealis-sim`) both
//! drive it with the same calls.
//!
//! ```text
//!  append(mtr) ──> records (dense LSNs, backlinks, CPL on the last)
//!                    │ kept in `outstanding` until acked by all 6 (or retired)
//!                    └─> queued to each of the PG's 6 nodes
//!  next_batch(node) ──> Append { epoch, vdl_hint, pgmrpl, per-PG records + completeness }
//!  on_response(node, Appended { lsns }) ──> ack bits ──> VCL: longest prefix of LSNs
//!        each acked by 4 of its PG's 6 segments;  VDL: highest CPL <= VCL
//! ```
//!
//! A record is "durable" when 4 of its PG's 6 segments acked it (write quorum), so
//! VCL advances over a dense LSN prefix without any segment having to be complete:
//! no consensus on the I/O path (invariant 5), storage nodes never vote.
//! The writer never allocates beyond VDL + LAL, which is also what bounds the tail
//! recovery must scan above the VDL hint the segments persist (invariant 8). LAL
//! and what is kept for segments that have not acked are bounded in records and in
//! bytes (`lal_bytes`, `retain_acked_bytes`), since a record may be 64 KiB.
//!
//! # Segment replacement (membership epochs)
//!
//! A PG's segment set is a [`Membership`]: six nodes and a membership epoch. To
//! replace a segment the control plane moves the PG through two epochs:
//!
//! ```text
//!   E     segments = {A,B,C,D,E,X}                     write quorum 4/6 of it
//!   E+1   segments = {A,B,C,D,E,X}, next = {A,B,C,D,E,N}
//!         write quorum: 4/6 of the old six AND 4/6 of the new six (I/O never stops:
//!         A..E alone satisfy both); read quorum (recovery): 3/6 of the old six,
//!         since what was acknowledged under E alone may be on only 3 of the new
//!         six; N is rebuilt from peers meanwhile and gets every new record
//!   E+2   segments = {A,B,C,D,E,N}    once N's SCL reached the PG's tail as of
//!         the writer adopting E+1 (every record acknowledged under E alone)
//! ```
//!
//! Acks are kept per node index (not per slot), so a record's quorum can be judged
//! against whichever membership is current when its acks arrive. Every append
//! carries the PG's membership epoch and segments refuse older ones.

use crate::{Topology, VolumeError};
use borealis_common::{Epoch, Geometry, Lsn, PageNo, PgId};
use borealis_redo::{Op, Record, CPL_FLAG};
use borealis_storage::proto::{Append, ErrorCode, PgBatch, Request, Response, Truncation};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// Segments per PG and the quorums over them.
pub const SEGMENTS: usize = 6;
pub const WRITE_QUORUM: u32 = 4;
pub const READ_QUORUM: usize = 3;

/// Limits and timeouts of the quorum backend (invariant 9).
#[derive(Debug, Clone)]
pub struct QuorumConfig {
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    /// Append batches in flight per node before the sender waits for acks.
    pub max_inflight_batches: usize,
    /// Records already at VDL kept for nodes that have not acked them yet; beyond
    /// this the oldest are retired and laggards catch up by gossip.
    pub retain_acked_records: usize,
    /// The same bound in bytes: records are up to 64 KiB, so a count alone would
    /// let the writer hold gigabytes for a slow segment during a bulk load.
    pub retain_acked_bytes: usize,
    /// LAL in bytes: the writer stops allocating while the records not yet at
    /// write quorum (above VCL) hold this many bytes, whatever their count.
    pub lal_bytes: usize,
    pub connect_timeout: Duration,
    /// A node that has not answered an outstanding request for this long is
    /// disconnected and its unacked records re-sent after reconnecting.
    pub request_timeout: Duration,
    /// A read not answered within this is also sent to a second segment.
    pub hedge_after: Duration,
    pub reconnect_backoff_max: Duration,
    /// Bound on the whole recovery.
    pub recovery_timeout: Duration,
    pub tail_chunk_bytes: u32,
    /// Read attempts (over all candidate segments) before giving up.
    pub max_read_attempts: usize,
    /// Queued page reads per node.
    pub read_queue_depth: usize,
    /// Appended records are held back (not sent) until someone waits for them to be
    /// durable (a commit) or this many bytes / records are unsent: a transaction's
    /// statements then reach the six segments as one batch with one fdatasync each,
    /// instead of one network round and one fdatasync per statement per node.
    pub auto_flush_bytes: usize,
    pub auto_flush_records: u64,
    /// Segments of each PG that get flushed records only at lazy flushes
    /// ([`WriterCore::flush_lazy`], every few milliseconds) while the other four are
    /// healthy: see "Eager four" on [`WriterCore`]. 0 sends every flush to all six.
    pub lazy_segments: usize,
    /// A commit still not durable this long after it asked for its flush also sends
    /// the records to the lazy segments at once ([`WriterCore::hedge_commit`]): any
    /// four acks count, so one slow eager segment then costs a commit this much
    /// (plus up to 1 ms: tokio's timers tick in milliseconds) instead of up to a
    /// whole lazy-flush interval. Under load with 8 clients about 1% of commits
    /// wait this long; a lower bound would make the lazy two busy again.
    pub commit_hedge_after: Duration,
    /// Scheduler rounds a commit may wait for other commits to join its batch (see
    /// "Commit gathering" in `remote.rs`); 0 sends every commit at once.
    pub commit_gather_rounds: u32,
    /// How a PG in a segment replacement counts its write quorum. Always
    /// [`TransitionQuorum::BothSets`] outside tests.
    pub transition_quorum: TransitionQuorum,
}

/// Write quorum of a PG whose membership is in transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionQuorum {
    /// 4/6 of the old six and 4/6 of the new six: correct.
    BothSets,
    /// 4/6 of the new six only. Deliberately wrong (a record can then sit on only 3
    /// of the old six, and a read quorum of the old six misses it); exists so the
    /// simulation can show that its invariants catch a broken transition.
    NewSetOnly,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            max_batch_records: 4096,
            max_batch_bytes: 4 << 20,
            max_inflight_batches: 64,
            retain_acked_records: 100_000,
            retain_acked_bytes: 64 << 20,
            lal_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            hedge_after: Duration::from_millis(20),
            commit_hedge_after: Duration::from_micros(1500),
            reconnect_backoff_max: Duration::from_millis(500),
            recovery_timeout: Duration::from_secs(30),
            tail_chunk_bytes: 4 << 20,
            max_read_attempts: 24,
            read_queue_depth: 1024,
            auto_flush_bytes: 256 << 10,
            auto_flush_records: 2048,
            lazy_segments: 2,
            commit_gather_rounds: 8,
            transition_quorum: TransitionQuorum::BothSets,
        }
    }
}

/// Most storage nodes a writer tracks (acks are a bitmask over node indices).
pub const MAX_STORAGE_NODES: usize = 64;

/// A PG's segment set, versioned by its membership epoch. During a segment
/// replacement `next` is the set being moved to; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub epoch: u64,
    pub segments: [usize; SEGMENTS],
    pub next: Option<[usize; SEGMENTS]>,
}

impl Membership {
    pub fn stable(epoch: u64, segments: [usize; SEGMENTS]) -> Membership {
        Membership {
            epoch,
            segments,
            next: None,
        }
    }

    /// Every node that must get the PG's records: the old six and the new six.
    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        let segments = self.segments;
        self.segments.into_iter().chain(
            self.next
                .into_iter()
                .flatten()
                .filter(move |n| !segments.contains(n)),
        )
    }

    pub fn contains(&self, node: usize) -> bool {
        self.segments.contains(&node) || self.next.is_some_and(|n| n.contains(&node))
    }

    /// The segment sets each of which must hold a write quorum (one, or two during
    /// a replacement) under `rule`.
    fn write_sets(&self, rule: TransitionQuorum) -> [Option<&[usize; SEGMENTS]>; 2] {
        match (&self.next, rule) {
            (None, _) => [Some(&self.segments), None],
            (Some(next), TransitionQuorum::BothSets) => [Some(&self.segments), Some(next)],
            (Some(next), TransitionQuorum::NewSetOnly) => [Some(next), None],
        }
    }

    /// Whether the nodes in the `acked` bitmask make a write quorum.
    pub fn write_quorum(&self, acked: u64, rule: TransitionQuorum) -> bool {
        self.write_sets(rule)
            .into_iter()
            .flatten()
            .all(|set| count_in(set, acked) >= WRITE_QUORUM)
    }

    /// Whether answers from `nodes` make a read quorum: 3 of the (old) six. Not 3 of
    /// the new six during a replacement: a record acknowledged before the writer
    /// adopted the transition sits on 4 of the old six only, which may leave just
    /// 3 of the new six holding it, and the joining segment may not have it yet.
    /// The old six cover everything: transitional writes need 4 of them too.
    pub fn read_quorum(&self, nodes: &[usize]) -> bool {
        let mask = nodes
            .iter()
            .filter(|n| **n < MAX_STORAGE_NODES)
            .fold(0u64, |m, n| m | 1 << n);
        count_in(&self.segments, mask) as usize >= READ_QUORUM
    }

    /// Whether every member acked.
    fn all_acked(&self, acked: u64) -> bool {
        self.members().all(|n| acked & (1 << n) != 0)
    }
}

fn count_in(set: &[usize; SEGMENTS], acked: u64) -> u32 {
    set.iter().filter(|n| acked & (1u64 << **n) != 0).count() as u32
}

/// Topology resolved to node indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub names: Vec<String>,
    pub azs: Vec<String>,
    pub addrs: Vec<SocketAddr>,
    default: Membership,
    explicit: HashMap<PgId, Membership>,
}

impl Placement {
    pub fn from_topology(t: &Topology) -> Result<Placement, VolumeError> {
        Self::from_topology_keeping(t, None)
    }

    /// Resolves `t`, keeping the node indices of `previous` (a writer that learns a
    /// new topology keeps its per-node state; new nodes are appended, nodes that
    /// left keep their index and simply host nothing).
    pub fn from_topology_keeping(
        t: &Topology,
        previous: Option<&Placement>,
    ) -> Result<Placement, VolumeError> {
        let bad = |why: String| VolumeError::Unavailable {
            pg: PgId(0),
            why: format!("topology: {why}"),
        };
        let (mut names, mut azs, mut addrs) = match previous {
            Some(p) => (p.names.clone(), p.azs.clone(), p.addrs.clone()),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        for n in &t.nodes {
            match names.iter().position(|x| *x == n.name) {
                Some(i) => {
                    azs[i] = n.az.clone();
                    addrs[i] = n.addr;
                }
                None => {
                    names.push(n.name.clone());
                    azs.push(n.az.clone());
                    addrs.push(n.addr);
                }
            }
        }
        if names.len() > MAX_STORAGE_NODES {
            return Err(bad(format!(
                "{} storage nodes, at most {MAX_STORAGE_NODES}",
                names.len()
            )));
        }
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let resolve = |names: &[String], what: &str| -> Result<[usize; SEGMENTS], VolumeError> {
            if names.len() != SEGMENTS {
                return Err(bad(format!(
                    "{what}: {} segments, need {SEGMENTS}",
                    names.len()
                )));
            }
            let mut out = [0usize; SEGMENTS];
            for (i, n) in names.iter().enumerate() {
                out[i] = *index
                    .get(n.as_str())
                    .ok_or_else(|| bad(format!("{what}: unknown node {n}")))?;
            }
            let distinct: BTreeSet<usize> = out.iter().copied().collect();
            if distinct.len() != SEGMENTS {
                return Err(bad(format!("{what}: segments must be on 6 distinct nodes")));
            }
            Ok(out)
        };
        let membership = |epoch: u64, segments: &[String], next: &[String], what: &str| {
            Ok::<_, VolumeError>(Membership {
                epoch,
                segments: resolve(segments, what)?,
                next: if next.is_empty() {
                    None
                } else {
                    Some(resolve(next, what)?)
                },
            })
        };
        let default = membership(
            t.default_membership_epoch,
            &t.default_segments,
            &t.default_next_segments,
            "default_segments",
        )?;
        let mut explicit = HashMap::new();
        for p in &t.protection_groups {
            explicit.insert(
                p.pg,
                membership(
                    p.membership_epoch,
                    &p.segments,
                    &p.next_segments,
                    &p.pg.to_string(),
                )?,
            );
        }
        Ok(Placement {
            names,
            azs,
            addrs,
            default,
            explicit,
        })
    }

    /// A placement over nodes `0..6` for every PG (the simulation's).
    pub fn uniform(names: Vec<String>, azs: Vec<String>, addrs: Vec<SocketAddr>) -> Placement {
        Placement {
            names,
            azs,
            addrs,
            default: Membership::stable(0, [0, 1, 2, 3, 4, 5]),
            explicit: HashMap::new(),
        }
    }

    /// Adds a node (the simulation's control plane); returns its index.
    pub fn add_node(&mut self, name: String, az: String, addr: SocketAddr) -> usize {
        self.names.push(name);
        self.azs.push(az);
        self.addrs.push(addr);
        self.names.len() - 1
    }

    pub fn default_membership(&self) -> Membership {
        self.default
    }

    /// Replaces the membership PGs without an explicit placement use.
    pub fn set_default_membership(&mut self, m: Membership) {
        self.default = m;
    }

    pub fn node_count(&self) -> usize {
        self.names.len()
    }

    pub fn membership(&self, pg: PgId) -> Membership {
        if self.explicit.is_empty() {
            return self.default; // the common case, on the ack path
        }
        self.explicit.get(&pg).copied().unwrap_or(self.default)
    }

    /// The nodes hosting `pg`'s six (current) segments: its explicit placement, or
    /// the default segments (a PG grows into existence there on its first record).
    pub fn segments(&self, pg: PgId) -> [usize; SEGMENTS] {
        self.membership(pg).segments
    }

    /// Whether `node` hosts any segment (old or new) of any PG.
    pub fn hosts_segments(&self, node: usize) -> bool {
        self.default.contains(node) || self.explicit.values().any(|m| m.contains(node))
    }

    /// Whether `node` hosts a segment of `pg`, old or new.
    pub fn is_member(&self, pg: PgId, node: usize) -> bool {
        self.membership(pg).contains(node)
    }

    /// Every node that must get `pg`'s records (up to 12 during a replacement).
    pub fn members(&self, pg: PgId) -> impl Iterator<Item = usize> {
        let m = self.membership(pg);
        let segments = m.segments;
        m.segments.into_iter().chain(
            m.next
                .into_iter()
                .flatten()
                .filter(move |n| !segments.contains(n)),
        )
    }

    /// Every distinct segment set (the default one and each explicit placement, old
    /// and new sets of those in transition): recovery needs its quorums in each.
    pub fn groups(&self) -> Vec<[usize; SEGMENTS]> {
        let mut v: Vec<[usize; SEGMENTS]> = Vec::new();
        for m in std::iter::once(&self.default).chain(self.explicit.values()) {
            for s in std::iter::once(m.segments).chain(m.next) {
                if !v.contains(&s) {
                    v.push(s);
                }
            }
        }
        v
    }

    /// Memberships by group: `None` is the default one.
    pub fn memberships(&self) -> Vec<(Option<PgId>, Membership)> {
        let mut v = vec![(None, self.default)];
        let mut explicit: Vec<_> = self.explicit.iter().map(|(p, m)| (Some(*p), *m)).collect();
        explicit.sort_by_key(|(p, _)| *p);
        v.extend(explicit);
        v
    }

    /// The group `pg` belongs to: its own explicit placement, or the default.
    pub fn group_of(&self, pg: PgId) -> Option<PgId> {
        self.explicit.contains_key(&pg).then_some(pg)
    }
}

/// A segment replacement as the writer sees it, for the control plane: the
/// replacement may complete once every joining node's segment of each of `pgs`
/// has an SCL of at least `catch_up_lsn`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TransitionStatus {
    /// The explicit placement's PG, or `None` for the default segments.
    pub group: Option<PgId>,
    pub membership_epoch: u64,
    /// Nodes in the new set but not the old one.
    pub joining: Vec<String>,
    /// The writer's last LSN when it adopted this membership: every record
    /// acknowledged under the old set alone is at or below it.
    pub catch_up_lsn: Lsn,
    /// PGs of the group that have records.
    pub pgs: Vec<PgId>,
}

#[derive(Debug, Clone)]
struct Pending {
    pg: PgId,
    /// Shared with every batch that carries the record (see `PgBatch::records`).
    bytes: Bytes,
    cpl: bool,
    /// Bit n: acked by node n (a node index of the placement, not a slot, so that
    /// a membership change does not reinterpret acks already counted).
    acked: u64,
}

#[derive(Debug, Default)]
struct NodeSend {
    /// LSNs not yet sent on the current connection, in LSN order.
    queue: VecDeque<Lsn>,
    inflight_batches: usize,
    /// Connected and the current epoch installed: batches may flow.
    ready: bool,
    /// Per PG: the segment's SCL as last reported.
    scl: HashMap<PgId, Lsn>,
    /// Per PG: the completeness last sent on this connection.
    sent_complete: HashMap<PgId, Lsn>,
    /// A lazy node may send a batch of completeness claims alone (no records) once
    /// after each lazy flush; otherwise claims ride with records only.
    lazy_kick: bool,
}

/// What an ack changed, for the driver.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckEffect {
    pub vdl_advanced: bool,
    pub fenced: bool,
    /// The node needs the epoch (re)installed: reset its connection.
    pub reset_node: bool,
    /// A segment has seen a newer membership epoch than ours: the writer must learn
    /// the new placement (the driver asks whoever owns the topology).
    pub stale_membership: bool,
}

/// The writer's quorum state: LSN allocation, what each node still needs, acks,
/// VCL/VDL. No I/O; the drivers (`remote`, the simulation) move its batches.
///
/// # Eager four
/// A write is durable at 4 of its PG's 6 segments, so a flush (a commit) goes at
/// once to four of them only, the eager ones; the other two, the lazy ones, get
/// everything flushed so far at each lazy flush, every few milliseconds
/// ([`WriterCore::flush_lazy`]). All six segments of a busy volume used to take a
/// message and an fdatasync for every group commit; the lazy two now take one
/// per lazy flush, which on one shared machine was a third of the storage tier's
/// CPU for nothing a commit waits for. The quorum rules do not change: acks from
/// any four count, and a commit still waits for four. What changes is the
/// fallback: when an eager segment's connection is down, every flush goes to all
/// six at once again (and the lazy ones are woken to catch up), and a slow but
/// connected eager segment delays commits by at most one lazy-flush interval, after
/// which the lazy ones have the records too. While a membership is in transition
/// every flush goes everywhere (the transitional quorum needs 4 of each six).
pub struct WriterCore {
    pub geometry: Geometry,
    pub placement: Placement,
    lal: u64,
    epoch: Epoch,
    history: Vec<Truncation>,
    last_lsn: Lsn,
    pg_tail: BTreeMap<PgId, Lsn>,
    /// Records at or below this may be sent; above it they wait for a flush request
    /// (`request_flush`) or the auto-flush thresholds. VCL/VDL never pass it.
    flush_lsn: Lsn,
    /// Per PG: its last record at or below `flush_lsn` (the `pg_last` of the
    /// completeness claims sent with flushed batches).
    pg_tail_flushed: BTreeMap<PgId, Lsn>,
    /// Bytes of records above `flush_lsn`.
    unflushed_bytes: usize,
    outstanding: BTreeMap<Lsn, Pending>,
    /// Bytes of the records in `outstanding`.
    outstanding_bytes: usize,
    /// Bytes of the records in `outstanding` above VCL (not yet at write quorum).
    unacked_bytes: usize,
    /// Recovered records being re-replicated; new VCL progress waits for them.
    rereplicating: BTreeSet<Lsn>,
    vcl: Lsn,
    vdl: Lsn,
    /// The last VDL known to be at write quorum: the recovery start point until the
    /// recovered tail is re-replicated, VDL after. Only this is sent as the VDL hint,
    /// since the next recovery trusts hints as durable.
    durable_vdl: Lsn,
    pgmrpl: Lsn,
    nodes: Vec<NodeSend>,
    fenced: Option<Epoch>,
    cfg: QuorumConfig,
    /// Memberships in transition: group -> (membership epoch, catch-up LSN).
    catch_up: HashMap<Option<PgId>, (u64, Lsn)>,
    /// Lazy nodes (bit n = node n), see "Eager four" above; 0 when every flush goes
    /// to every segment (a membership in transition, or lazy segments turned off).
    lazy: u64,
    /// Records at or below this may go to lazy nodes.
    lazy_flush_lsn: Lsn,
    commit_hedges: u64,
    flushes: u64,
}

/// Where recovery left the volume: the writer starts from here.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The VDL hint recovery started from: known complete at write quorum.
    pub start: Lsn,
    pub vdl: Lsn,
    pub pg_tails: BTreeMap<PgId, Lsn>,
    /// Records in (start, VDL] to re-replicate to every segment: (pg, lsn, bytes).
    pub replicate: Vec<(PgId, Lsn, Vec<u8>)>,
    /// History including this epoch's truncation.
    pub history: Vec<Truncation>,
}

impl WriterCore {
    pub fn new(
        geometry: Geometry,
        placement: Placement,
        lal: u64,
        epoch: Epoch,
        rec: Recovered,
        cfg: QuorumConfig,
    ) -> WriterCore {
        let n = placement.node_count();
        let mut core = WriterCore {
            geometry,
            placement,
            lal: lal.max(1),
            epoch,
            history: rec.history,
            last_lsn: rec.vdl,
            flush_lsn: rec.vdl,
            pg_tail_flushed: rec.pg_tails.clone(),
            unflushed_bytes: 0,
            pg_tail: rec.pg_tails,
            outstanding: BTreeMap::new(),
            outstanding_bytes: 0,
            unacked_bytes: 0,
            rereplicating: BTreeSet::new(),
            vcl: rec.vdl,
            vdl: rec.vdl,
            durable_vdl: rec.start.min(rec.vdl),
            pgmrpl: Lsn::ZERO,
            nodes: (0..n).map(|_| NodeSend::default()).collect(),
            fenced: None,
            cfg,
            catch_up: HashMap::new(),
            lazy: 0,
            lazy_flush_lsn: rec.vdl,
            commit_hedges: 0,
            flushes: 0,
        };
        core.note_transitions();
        for (pg, lsn, bytes) in rec.replicate {
            let cpl = borealis_redo::decode_header(&bytes)
                .map(|h| h.is_cpl())
                .unwrap_or(false);
            core.keep(
                lsn,
                Pending {
                    pg,
                    bytes: bytes.into(),
                    cpl,
                    acked: 0,
                },
            );
            core.rereplicating.insert(lsn);
            for node in core.placement.members(pg) {
                core.nodes[node].queue.push_back(lsn);
            }
        }
        core
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn history(&self) -> &[Truncation] {
        &self.history
    }
    pub fn vdl(&self) -> Lsn {
        self.vdl
    }
    pub fn vcl(&self) -> Lsn {
        self.vcl
    }
    pub fn last_lsn(&self) -> Lsn {
        self.last_lsn
    }
    pub fn fenced(&self) -> Option<Epoch> {
        self.fenced
    }
    pub fn pg_count(&self) -> usize {
        self.pg_tail.len()
    }
    pub fn pg_tail(&self, pg: PgId) -> Option<Lsn> {
        self.pg_tail.get(&pg).copied()
    }
    pub fn rereplication_done(&self) -> bool {
        self.rereplicating.is_empty()
    }
    pub fn set_pgmrpl(&mut self, lsn: Lsn) {
        self.pgmrpl = self.pgmrpl.max(lsn.min(self.vdl));
    }
    pub fn outstanding_len(&self) -> usize {
        self.outstanding.len()
    }
    /// Bytes of the records the writer holds: not yet at quorum, or kept for
    /// segments that have not acked them.
    pub fn outstanding_bytes(&self) -> usize {
        self.outstanding_bytes
    }

    fn keep(&mut self, lsn: Lsn, p: Pending) {
        self.outstanding_bytes += p.bytes.len();
        if let Some(old) = self.outstanding.insert(lsn, p) {
            self.outstanding_bytes -= old.bytes.len();
        }
    }

    fn retire(&mut self, lsn: Lsn) {
        if let Some(p) = self.outstanding.remove(&lsn) {
            self.outstanding_bytes -= p.bytes.len();
        }
    }

    /// Whether `n` more records fit under VDL + LAL, and the records not yet at
    /// quorum under `lal_bytes` (an MTR larger than either still goes through once
    /// nothing else is outstanding).
    pub fn has_room(&self, n: usize) -> bool {
        self.last_lsn <= self.vdl
            || (self.last_lsn.0 + n as u64 <= self.vdl.0 + self.lal
                && self.unacked_bytes < self.cfg.lal_bytes)
    }

    /// Allocates LSNs for one MTR and queues its records. The caller checked
    /// [`WriterCore::has_room`]. Returns the records and the nodes to wake: none
    /// unless the unflushed records crossed an auto-flush threshold (a commit's
    /// [`WriterCore::request_flush`] sends them otherwise).
    pub fn append(
        &mut self,
        mtr: Vec<(PageNo, Op)>,
    ) -> Result<(Vec<Record>, BTreeSet<usize>), VolumeError> {
        if let Some(theirs) = self.fenced {
            return Err(VolumeError::Fenced {
                ours: self.epoch,
                theirs,
            });
        }
        if let Some((page, _)) = mtr.iter().find(|(p, _)| *p >= self.geometry.max_pages()) {
            return Err(VolumeError::PageOutOfRange(*page));
        }
        let n = mtr.len();
        let mut out = Vec::with_capacity(n);
        for (i, (page, op)) in mtr.into_iter().enumerate() {
            self.last_lsn = self.last_lsn.next();
            let lsn = self.last_lsn;
            let pg = self.geometry.pg_of(page);
            let prev_lsn = self.pg_tail.insert(pg, lsn).unwrap_or(Lsn::ZERO);
            let flags = if i + 1 == n { CPL_FLAG } else { 0 };
            let record = Record {
                lsn,
                prev_lsn,
                page,
                flags,
                op,
            };
            let bytes = Bytes::from(record.encode());
            self.unflushed_bytes += bytes.len();
            self.unacked_bytes += bytes.len();
            self.keep(
                lsn,
                Pending {
                    pg,
                    bytes,
                    cpl: record.is_cpl(),
                    acked: 0,
                },
            );
            for node in self.placement.members(pg) {
                self.nodes[node].queue.push_back(lsn);
            }
            out.push(record);
        }
        let wake = if self.unflushed_bytes >= self.cfg.auto_flush_bytes
            || self.last_lsn.0 - self.flush_lsn.0 >= self.cfg.auto_flush_records
        {
            self.request_flush(self.last_lsn)
        } else {
            BTreeSet::new()
        };
        Ok((out, wake))
    }

    /// Lets every record up to `lsn` (clamped to the last LSN) be sent. Returns the
    /// nodes with something newly sendable, to wake. Concurrent commits each ask for
    /// their own LSN; whatever a node has not sent yet goes out in one batch, which
    /// is group commit on the wire.
    pub fn request_flush(&mut self, lsn: Lsn) -> BTreeSet<usize> {
        let to = lsn.min(self.last_lsn);
        let mut wake = BTreeSet::new();
        if to <= self.flush_lsn {
            return wake;
        }
        self.flushes += 1;
        let from = self.flush_lsn;
        let skip = if self.eager_degraded() { 0 } else { self.lazy };
        for (l, p) in self.outstanding.range(from.next()..=to) {
            self.unflushed_bytes = self.unflushed_bytes.saturating_sub(p.bytes.len());
            self.pg_tail_flushed.insert(p.pg, *l);
            wake.extend(
                self.placement
                    .members(p.pg)
                    .filter(|n| skip & (1 << n) == 0),
            );
        }
        self.flush_lsn = to;
        if to == self.last_lsn {
            self.unflushed_bytes = 0;
        }
        wake
    }

    /// The highest LSN allowed on the wire.
    pub fn flush_lsn(&self) -> Lsn {
        self.flush_lsn
    }

    /// Picks the lazy nodes: the last `lazy_segments` of the default six (with the
    /// usual layout, the third AZ's two), and none while any membership is in
    /// transition (a transitional write needs 4 of the old six and 4 of the new).
    fn choose_lazy(&mut self) {
        self.lazy = 0;
        let memberships = self.placement.memberships();
        let [(None, m)] = memberships.as_slice() else {
            return;
        };
        if m.next.is_some() {
            return;
        }
        let n = self.cfg.lazy_segments.min(SEGMENTS - WRITE_QUORUM as usize);
        for &node in m.segments.iter().rev().take(n) {
            if node < MAX_STORAGE_NODES {
                self.lazy |= 1 << node;
            }
        }
    }

    /// An eager segment is not connected: the lazy ones are needed for the write
    /// quorum, so every flush goes to them at once until it is back.
    fn eager_degraded(&self) -> bool {
        self.lazy != 0
            && self
                .placement
                .default_membership()
                .segments
                .iter()
                .any(|&n| self.lazy & (1 << n) == 0 && !self.nodes.get(n).is_some_and(|s| s.ready))
    }

    /// The lazy nodes, to wake when an eager node's connection drops.
    pub fn lazy_nodes(&self) -> BTreeSet<usize> {
        (0..MAX_STORAGE_NODES)
            .filter(|n| self.lazy & (1 << n) != 0)
            .collect()
    }

    /// Lets lazy nodes have everything flushed so far (called every few
    /// milliseconds by the driver, and by the simulation at random). Returns the
    /// nodes to wake: none if nothing was flushed since the last call.
    pub fn flush_lazy(&mut self) -> BTreeSet<usize> {
        if self.lazy == 0 || self.lazy_flush_lsn >= self.flush_lsn {
            return BTreeSet::new();
        }
        self.lazy_flush_lsn = self.flush_lsn;
        let wake = self.lazy_nodes();
        for &n in &wake {
            if let Some(ns) = self.nodes.get_mut(n) {
                ns.lazy_kick = true;
            }
        }
        wake
    }

    /// A commit waiting for `lsn` has waited [`QuorumConfig::commit_hedge_after`]:
    /// an eager segment is slow (descheduled, compacting, a stalled disk), so the
    /// lazy ones get what was flushed now rather than at the next lazy flush, and
    /// the fastest four of all six decide again. Returns the nodes to wake: none if
    /// the lazy nodes already have `lsn` or it is durable.
    pub fn hedge_commit(&mut self, lsn: Lsn) -> BTreeSet<usize> {
        if lsn <= self.vdl || lsn <= self.lazy_flush_lsn {
            return BTreeSet::new();
        }
        let wake = self.flush_lazy();
        if !wake.is_empty() {
            self.commit_hedges += 1;
        }
        wake
    }

    /// How many commits were hedged to the lazy segments so far.
    pub fn commit_hedges(&self) -> u64 {
        self.commit_hedges
    }

    /// How many times records were released to the segments so far.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// The node's connection is up and the epoch installed on it.
    pub fn node_ready(&mut self, node: usize) {
        // A connection may come up before the placement naming the node is adopted
        // (the simulation's control plane is ahead of its writer): remember it, so
        // that adopting the placement later does not find the node "not ready".
        if node < MAX_STORAGE_NODES && self.nodes.len() <= node {
            self.nodes.resize_with(node + 1, NodeSend::default);
        }
        if let Some(ns) = self.nodes.get_mut(node) {
            ns.ready = true;
        }
    }

    /// The node's connection dropped: everything it has not acked is re-sent on the
    /// next connection (TCP gives no partial delivery guarantees across reconnects).
    pub fn node_reset(&mut self, node: usize) {
        let Some(ns) = self.nodes.get_mut(node) else {
            return;
        };
        ns.ready = false;
        ns.inflight_batches = 0;
        ns.sent_complete.clear();
        ns.queue.clear();
        for (lsn, p) in &self.outstanding {
            if self.placement.is_member(p.pg, node) && p.acked & (1 << node) == 0 {
                ns.queue.push_back(*lsn);
            }
        }
    }

    /// Adopts a new placement (a membership change from the control plane). Node
    /// indices must be kept (see [`Placement::from_topology_keeping`]). Nodes that
    /// joined a PG get its outstanding records; a PG entering a transition records
    /// its catch-up point. Returns the nodes to wake (their queues changed).
    pub fn update_placement(&mut self, placement: Placement) -> BTreeSet<usize> {
        let old = std::mem::replace(&mut self.placement, placement);
        while self.nodes.len() < self.placement.node_count() {
            self.nodes.push(NodeSend::default());
        }
        let changed: BTreeSet<usize> = (0..self.placement.node_count())
            .filter(|n| {
                self.pg_tail
                    .keys()
                    .any(|pg| old.is_member(*pg, *n) != self.placement.is_member(*pg, *n))
                    || old.default_membership().contains(*n)
                        != self.placement.default_membership().contains(*n)
            })
            .collect();
        for &n in &changed {
            // Re-queue from scratch in LSN order: whatever it holds is re-sent at
            // worst (segments ack duplicates), and completeness claims go out again.
            let Some(ns) = self.nodes.get_mut(n) else {
                continue;
            };
            ns.queue.clear();
            ns.sent_complete.clear();
            for (lsn, p) in &self.outstanding {
                if self.placement.is_member(p.pg, n) && p.acked & (1 << n) == 0 {
                    ns.queue.push_back(*lsn);
                }
            }
        }
        self.note_transitions();
        // Acks already counted may make a quorum under the new membership.
        self.advance();
        changed
    }

    /// Records the catch-up point of memberships that entered a transition (or a
    /// newer transitional epoch), and forgets those that left it.
    fn note_transitions(&mut self) {
        let mut live = HashMap::new();
        for (group, m) in self.placement.memberships() {
            if m.next.is_none() {
                continue;
            }
            let point = match self.catch_up.get(&group) {
                Some((e, l)) if *e == m.epoch => *l,
                _ => self.last_lsn,
            };
            live.insert(group, (m.epoch, point));
        }
        self.catch_up = live;
        self.choose_lazy();
    }

    /// Segment replacements in progress, for the control plane (see
    /// [`TransitionStatus`]).
    pub fn transitions(&self) -> Vec<TransitionStatus> {
        let mut out = Vec::new();
        for (group, m) in self.placement.memberships() {
            let (Some(next), Some((epoch, lsn))) = (m.next, self.catch_up.get(&group)) else {
                continue;
            };
            if *epoch != m.epoch {
                continue;
            }
            let pgs = self
                .pg_tail
                .keys()
                .copied()
                .filter(|pg| self.placement.group_of(*pg) == group)
                .collect();
            out.push(TransitionStatus {
                group,
                membership_epoch: m.epoch,
                joining: next
                    .iter()
                    .filter(|n| !m.segments.contains(n))
                    .filter_map(|n| self.placement.names.get(*n).cloned())
                    .collect(),
                catch_up_lsn: *lsn,
                pgs,
            });
        }
        out
    }

    /// The next append batch for `node`, if it is ready, has room in flight and there
    /// is anything to say (records, or completeness news for an idle PG).
    pub fn next_batch(&mut self, node: usize) -> Option<Request> {
        if self.fenced.is_some() {
            return None;
        }
        let max_inflight = self.cfg.max_inflight_batches;
        let (max_records, max_bytes) = (self.cfg.max_batch_records, self.cfg.max_batch_bytes);
        let ns = self.nodes.get(node)?;
        if !ns.ready || ns.inflight_batches >= max_inflight {
            return None;
        }
        let flush = self.flush_lsn;
        let lazy_now = self.lazy & (1 << node) != 0 && !self.eager_degraded();
        let limit = if lazy_now {
            self.lazy_flush_lsn.min(flush)
        } else {
            flush
        };
        let ns = self.nodes.get_mut(node)?;
        let mut per_pg: BTreeMap<PgId, Vec<(Lsn, Bytes)>> = BTreeMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        while let Some(&lsn) = ns.queue.front() {
            if lsn > limit {
                break; // held back until a (lazy) flush
            }
            let Some(p) = self.outstanding.get(&lsn) else {
                ns.queue.pop_front(); // retired meanwhile
                continue;
            };
            if count > 0 && (count >= max_records || bytes + p.bytes.len() > max_bytes) {
                break;
            }
            ns.queue.pop_front();
            count += 1;
            bytes += p.bytes.len();
            per_pg.entry(p.pg).or_default().push((lsn, p.bytes.clone()));
        }
        // PGs with flushable records still queued for this node (the batch was full):
        // their completeness only reaches what this batch carries.
        let still_queued: BTreeSet<PgId> = ns
            .queue
            .iter()
            .take_while(|l| **l <= flush)
            .filter_map(|l| self.outstanding.get(l))
            .map(|p| p.pg)
            .collect();
        let mut pgs = Vec::new();
        for (pg, tail) in &self.pg_tail_flushed {
            if !self.placement.is_member(*pg, node) {
                continue;
            }
            let records = per_pg.remove(pg).unwrap_or_default();
            let (complete_to, pg_last) = if still_queued.contains(pg) {
                match records.last() {
                    Some((l, _)) => (*l, *l),
                    None => continue,
                }
            } else {
                // Every record of the PG at or below the flush point is on its way:
                // the segment may serve reads up to it.
                (flush, *tail)
            };
            let news = ns.sent_complete.get(pg).is_none_or(|c| *c < complete_to);
            if records.is_empty() && !news {
                continue;
            }
            ns.sent_complete.insert(*pg, complete_to);
            pgs.push(PgBatch {
                pg: *pg,
                membership_epoch: self.placement.membership(*pg).epoch,
                complete_to,
                pg_last,
                records: records.into_iter().map(|(_, b)| b).collect(),
            });
        }
        if pgs.is_empty() {
            return None;
        }
        if lazy_now {
            // Claims alone go to a lazy node once per lazy flush, not with every
            // eager flush (that would cost it a message per commit after all).
            if count == 0 && !ns.lazy_kick {
                return None;
            }
            ns.lazy_kick = false;
        }
        ns.inflight_batches += 1;
        Some(Request::Append(Append {
            epoch: self.epoch,
            vdl_hint: self.durable_vdl,
            pgmrpl: self.pgmrpl,
            pgs,
        }))
    }

    /// Whether `node` has appends awaiting acks (the driver times those out).
    pub fn awaiting_acks(&self, node: usize) -> bool {
        self.nodes.get(node).is_some_and(|n| n.inflight_batches > 0)
    }

    /// Feeds a response to an append or epoch install from `node`.
    pub fn on_response(&mut self, node: usize, resp: &Response) -> AckEffect {
        let mut fx = AckEffect::default();
        match resp {
            Response::Appended { epoch, pgs } => {
                if let Some(ns) = self.nodes.get_mut(node) {
                    ns.inflight_batches = ns.inflight_batches.saturating_sub(1);
                }
                if *epoch != self.epoch {
                    return fx;
                }
                let rule = self.cfg.transition_quorum;
                for ack in pgs {
                    if !self.placement.is_member(ack.pg, node) {
                        continue;
                    }
                    let membership = self.placement.membership(ack.pg);
                    if let Some(ns) = self.nodes.get_mut(node) {
                        let s = ns.scl.entry(ack.pg).or_default();
                        *s = (*s).max(ack.scl);
                    }
                    for lsn in &ack.lsns {
                        if let Some(p) = self.outstanding.get_mut(lsn) {
                            if p.pg == ack.pg {
                                p.acked |= 1 << node;
                                if membership.write_quorum(p.acked, rule) {
                                    self.rereplicating.remove(lsn);
                                }
                            }
                        }
                    }
                }
                fx.vdl_advanced = self.advance();
            }
            Response::Error {
                code: ErrorCode::Fenced,
                detail,
                message,
            } => {
                log::error!(
                    "volume epoch {} fenced by a storage node at epoch {detail}: {message}",
                    self.epoch
                );
                self.fenced = Some(Epoch(*detail));
                fx.fenced = true;
            }
            Response::Error {
                code: ErrorCode::StaleMembership,
                detail,
                message,
            } => {
                log::warn!(
                    "storage node {} has membership epoch {detail}, newer than ours: {message}",
                    self.placement
                        .names
                        .get(node)
                        .map(String::as_str)
                        .unwrap_or("?")
                );
                fx.stale_membership = true;
                fx.reset_node = true;
            }
            Response::Error { code, message, .. } => {
                log::warn!(
                    "storage node {} refused a write ({code:?}): {message}",
                    self.placement
                        .names
                        .get(node)
                        .map(String::as_str)
                        .unwrap_or("?")
                );
                fx.reset_node = true;
            }
            _ => {}
        }
        fx
    }

    /// Moves VCL over the dense prefix of LSNs at write quorum and VDL to the last
    /// CPL reached; retires records every segment has (or the oldest beyond the cap).
    fn advance(&mut self) -> bool {
        let before = self.vdl;
        if self.rereplicating.is_empty() {
            let rule = self.cfg.transition_quorum;
            while let Some(p) = self.outstanding.get(&self.vcl.next()) {
                if !self.placement.membership(p.pg).write_quorum(p.acked, rule) {
                    break;
                }
                self.vcl = self.vcl.next();
                self.unacked_bytes = self.unacked_bytes.saturating_sub(p.bytes.len());
                if p.cpl {
                    self.vdl = self.vcl;
                }
            }
            self.durable_vdl = self.vdl;
        }
        // Retire: fully acked records at or below VDL, then the oldest over the cap.
        let vdl = self.vdl;
        let done: Vec<Lsn> = self
            .outstanding
            .range(..=vdl)
            .filter(|(_, p)| self.placement.membership(p.pg).all_acked(p.acked))
            .map(|(l, _)| *l)
            .take(self.cfg.max_batch_records * 4)
            .collect();
        for l in done {
            self.retire(l);
        }
        while self.outstanding.len() > self.cfg.retain_acked_records + self.lal as usize
            || self.outstanding_bytes > self.cfg.retain_acked_bytes + self.unacked_bytes
        {
            match self.outstanding.first_key_value() {
                Some((l, _)) if *l <= vdl => {
                    let l = *l;
                    self.retire(l);
                }
                _ => break,
            }
        }
        self.vdl > before
    }

    /// Nodes to read `pg` at `read_lsn` from, best first: segments whose reported SCL
    /// covers the read point, then the rest of the PG's segments.
    pub fn read_candidates(&self, pg: PgId, read_lsn: Lsn) -> Vec<usize> {
        let segs: Vec<usize> = self.placement.members(pg).collect();
        let scl = |n: usize| {
            self.nodes
                .get(n)
                .and_then(|s| s.scl.get(&pg))
                .copied()
                .unwrap_or(Lsn::ZERO)
        };
        let mut good: Vec<usize> = segs
            .iter()
            .copied()
            .filter(|n| scl(*n) >= read_lsn)
            .collect();
        // Prefer the most complete, deterministic order otherwise.
        good.sort_by_key(|n| std::cmp::Reverse(scl(*n)));
        let rest: Vec<usize> = segs.iter().copied().filter(|n| !good.contains(n)).collect();
        good.extend(rest);
        good
    }

    /// How many segments acked `lsn` (if the record is still tracked): the
    /// simulation uses it to check that a fenced writer never reaches write quorum.
    pub fn acks_of(&self, lsn: Lsn) -> Option<u32> {
        self.outstanding.get(&lsn).map(|p| p.acked.count_ones())
    }

    /// Whether `lsn` is tracked and at write quorum under the current membership.
    pub fn at_write_quorum(&self, lsn: Lsn) -> bool {
        self.outstanding.get(&lsn).is_some_and(|p| {
            self.placement
                .membership(p.pg)
                .write_quorum(p.acked, self.cfg.transition_quorum)
        })
    }

    /// Segment SCLs as the writer knows them, for status.
    pub fn segment_scl(&self, node: usize, pg: PgId) -> Lsn {
        self.nodes
            .get(node)
            .and_then(|s| s.scl.get(&pg))
            .copied()
            .unwrap_or(Lsn::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borealis_storage::proto::{PgAck, Request, Response};

    fn core(lazy_segments: usize) -> WriterCore {
        core_with(QuorumConfig {
            lazy_segments,
            ..QuorumConfig::default()
        })
    }

    fn core_with(cfg: QuorumConfig) -> WriterCore {
        let names: Vec<String> = ["a1", "a2", "b1", "b2", "c1", "c2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let azs: Vec<String> = ["a", "a", "b", "b", "c", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let addrs = (0..6)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        let mut c = WriterCore::new(
            Geometry::default(),
            Placement::uniform(names, azs, addrs),
            1000,
            Epoch(1),
            Recovered::default(),
            cfg,
        );
        for n in 0..6 {
            c.node_ready(n);
        }
        c
    }

    /// Appends one single-record MTR and asks for it to be flushed (a commit).
    fn commit(c: &mut WriterCore) -> Lsn {
        commit_mtr(c, vec![(1, Op::Noop)])
    }

    /// Sends `node` its next batch and acks every record in it; whether it had one.
    fn deliver(c: &mut WriterCore, node: usize) -> bool {
        let Some(Request::Append(a)) = c.next_batch(node) else {
            return false;
        };
        let pgs = a
            .pgs
            .iter()
            .map(|b| PgAck {
                pg: b.pg,
                lsns: b
                    .records
                    .iter()
                    .map(|r| borealis_redo::decode_header(r).unwrap().lsn)
                    .collect(),
                scl: Lsn::ZERO,
            })
            .collect();
        c.on_response(
            node,
            &Response::Appended {
                epoch: Epoch(1),
                pgs,
            },
        );
        true
    }

    #[test]
    fn commits_go_to_four_and_the_lazy_two_get_them_at_lazy_flushes() {
        let mut c = core(2);
        let lsn = commit(&mut c);
        // The last two default segments (the third AZ) are lazy: no batch for them.
        for n in 0..4 {
            assert!(deliver(&mut c, n), "eager node {n} got no batch");
        }
        for n in 4..6 {
            assert!(!deliver(&mut c, n), "lazy node {n} got a batch at a commit");
        }
        assert_eq!(c.vdl(), lsn, "four acks make the commit durable");
        // A lazy flush hands them everything flushed so far, claims included.
        assert_eq!(c.flush_lazy(), BTreeSet::from([4, 5]));
        for n in 4..6 {
            assert!(
                deliver(&mut c, n),
                "lazy node {n} got nothing at a lazy flush"
            );
            assert!(!deliver(&mut c, n));
        }
        // Nothing new: the next lazy flush sends nothing.
        assert!(c.flush_lazy().is_empty());
    }

    #[test]
    fn a_lost_eager_segment_makes_every_flush_go_to_all_six() {
        let mut c = core(2);
        c.node_reset(1);
        let lsn = commit(&mut c);
        for n in [0, 2, 3, 4, 5] {
            assert!(
                deliver(&mut c, n),
                "node {n} got no batch with an eager one down"
            );
        }
        assert_eq!(c.vdl(), lsn);
        // Back: lazy again.
        c.node_ready(1);
        let lsn = commit(&mut c);
        assert!(!deliver(&mut c, 5));
        for n in 0..4 {
            assert!(deliver(&mut c, n));
        }
        assert_eq!(c.vdl(), lsn);
    }

    #[test]
    fn a_hedged_commit_is_durable_with_two_eager_and_the_lazy_two() {
        let mut c = core(2);
        let lsn = commit(&mut c);
        // Two eager segments answer, two are slow: no quorum yet.
        for n in 0..2 {
            assert!(deliver(&mut c, n));
        }
        assert!(c.vdl() < lsn);
        // The hedge hands the lazy two the commit at once, without waiting for the
        // lazy-flush interval, and their acks complete the quorum.
        assert_eq!(c.hedge_commit(lsn), BTreeSet::from([4, 5]));
        for n in 4..6 {
            assert!(deliver(&mut c, n), "lazy node {n} got nothing at the hedge");
        }
        assert_eq!(c.vdl(), lsn, "two eager plus two lazy acks make four");
        assert_eq!(c.commit_hedges(), 1);
        // Already durable, or already with the lazy nodes: nothing more to send.
        assert!(c.hedge_commit(lsn).is_empty());
        let next = commit(&mut c);
        assert_eq!(c.hedge_commit(next), BTreeSet::from([4, 5]));
        assert!(
            c.hedge_commit(next).is_empty(),
            "a second hedge resends nothing"
        );
        assert_eq!(c.commit_hedges(), 2);
    }

    /// Records of up to 64 KiB pass byte bounds long before the record counts
    /// (LAL 1000 here, 100,000 retained): both what is not yet at quorum and what
    /// is kept for segments that do not ack are bounded in bytes (invariant 9).
    #[test]
    fn the_writer_holds_a_bounded_number_of_bytes() {
        const KIB: usize = 1 << 10;
        let mut c = core_with(QuorumConfig {
            lazy_segments: 0,
            lal_bytes: 64 * KIB,
            retain_acked_bytes: 128 * KIB,
            ..QuorumConfig::default()
        });
        let page_sized = || {
            vec![(
                1,
                Op::WriteBody {
                    offset: 0,
                    data: vec![7; 8000],
                },
            )]
        };
        // Nothing acks: allocation stops once the unacked records pass lal_bytes.
        let mut appended = 0;
        while c.has_room(1) {
            c.append(page_sized()).unwrap();
            appended += 1;
            assert!(appended < 100, "LAL in bytes never stopped the writer");
        }
        assert!(
            (8..=9).contains(&appended),
            "stopped after {appended} records"
        );
        c.request_flush(c.last_lsn());
        for n in 0..4 {
            assert!(deliver(&mut c, n));
        }
        assert_eq!(c.vdl(), c.last_lsn(), "four acks: at quorum");
        assert!(c.has_room(1), "room again once the records reached quorum");

        // Two segments never ack: what is kept for them stays under the bound.
        for _ in 0..100 {
            let lsn = commit_mtr(&mut c, page_sized());
            for n in 0..4 {
                assert!(deliver(&mut c, n));
            }
            assert_eq!(c.vdl(), lsn);
        }
        assert!(
            c.outstanding_bytes() <= 128 * KIB + 8 * KIB + 100,
            "kept {} bytes for the silent segments",
            c.outstanding_bytes()
        );
        assert!(c.outstanding_len() < 20);
    }

    /// Appends `mtr` and asks for it to be flushed.
    fn commit_mtr(c: &mut WriterCore, mtr: Vec<(PageNo, Op)>) -> Lsn {
        let (records, _) = c.append(mtr).unwrap();
        let lsn = records.last().unwrap().lsn;
        c.request_flush(lsn);
        lsn
    }

    #[test]
    fn without_lazy_segments_every_flush_goes_to_all_six() {
        let mut c = core(0);
        commit(&mut c);
        for n in 0..6 {
            assert!(deliver(&mut c, n), "node {n} got no batch");
        }
        assert!(c.flush_lazy().is_empty());
    }
}
