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
//! recovery must scan above the VDL hint the segments persist (invariant 8).

use crate::{Topology, VolumeError};
use borealis_common::{Epoch, Geometry, Lsn, PageNo, PgId};
use borealis_redo::{Op, Record, CPL_FLAG};
use borealis_storage::proto::{Append, ErrorCode, PgBatch, Request, Response, Truncation};
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
}

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            max_batch_records: 4096,
            max_batch_bytes: 4 << 20,
            max_inflight_batches: 64,
            retain_acked_records: 100_000,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            hedge_after: Duration::from_millis(20),
            reconnect_backoff_max: Duration::from_millis(500),
            recovery_timeout: Duration::from_secs(30),
            tail_chunk_bytes: 4 << 20,
            max_read_attempts: 24,
            read_queue_depth: 1024,
            auto_flush_bytes: 256 << 10,
            auto_flush_records: 2048,
        }
    }
}

/// Topology resolved to node indices.
#[derive(Debug, Clone)]
pub struct Placement {
    pub names: Vec<String>,
    pub azs: Vec<String>,
    pub addrs: Vec<SocketAddr>,
    default: [usize; SEGMENTS],
    explicit: HashMap<PgId, [usize; SEGMENTS]>,
}

impl Placement {
    pub fn from_topology(t: &Topology) -> Result<Placement, VolumeError> {
        let index: HashMap<&str, usize> = t
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let resolve = |names: &[String], what: &str| -> Result<[usize; SEGMENTS], VolumeError> {
            let bad = |why: String| VolumeError::Unavailable {
                pg: PgId(0),
                why: format!("topology: {what}: {why}"),
            };
            if names.len() != SEGMENTS {
                return Err(bad(format!("{} segments, need {SEGMENTS}", names.len())));
            }
            let mut out = [0usize; SEGMENTS];
            for (i, n) in names.iter().enumerate() {
                out[i] = *index
                    .get(n.as_str())
                    .ok_or_else(|| bad(format!("unknown node {n}")))?;
            }
            let distinct: BTreeSet<usize> = out.iter().copied().collect();
            if distinct.len() != SEGMENTS {
                return Err(bad("segments must be on 6 distinct nodes".into()));
            }
            Ok(out)
        };
        let default = resolve(&t.default_segments, "default_segments")?;
        let mut explicit = HashMap::new();
        for p in &t.protection_groups {
            explicit.insert(p.pg, resolve(&p.segments, &p.pg.to_string())?);
        }
        Ok(Placement {
            names: t.nodes.iter().map(|n| n.name.clone()).collect(),
            azs: t.nodes.iter().map(|n| n.az.clone()).collect(),
            addrs: t.nodes.iter().map(|n| n.addr).collect(),
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
            default: [0, 1, 2, 3, 4, 5],
            explicit: HashMap::new(),
        }
    }

    pub fn node_count(&self) -> usize {
        self.names.len()
    }

    /// The nodes hosting `pg`'s six segments: its explicit placement, or the default
    /// segments (a PG grows into existence there on its first record).
    pub fn segments(&self, pg: PgId) -> [usize; SEGMENTS] {
        self.explicit.get(&pg).copied().unwrap_or(self.default)
    }

    pub fn slot(&self, pg: PgId, node: usize) -> Option<usize> {
        self.segments(pg).iter().position(|&n| n == node)
    }

    /// Every distinct segment set (the default one and each explicit placement).
    pub fn groups(&self) -> Vec<[usize; SEGMENTS]> {
        let mut v: Vec<[usize; SEGMENTS]> = vec![self.default];
        for s in self.explicit.values() {
            if !v.contains(s) {
                v.push(*s);
            }
        }
        v
    }
}

#[derive(Debug, Clone)]
struct Pending {
    pg: PgId,
    bytes: Vec<u8>,
    cpl: bool,
    /// Bit i: acked by the PG's segment in slot i.
    acked: u8,
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
}

/// What an ack changed, for the driver.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckEffect {
    pub vdl_advanced: bool,
    pub fenced: bool,
    /// The node needs the epoch (re)installed: reset its connection.
    pub reset_node: bool,
}

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
            rereplicating: BTreeSet::new(),
            vcl: rec.vdl,
            vdl: rec.vdl,
            durable_vdl: rec.start.min(rec.vdl),
            pgmrpl: Lsn::ZERO,
            nodes: (0..n).map(|_| NodeSend::default()).collect(),
            fenced: None,
            cfg,
        };
        for (pg, lsn, bytes) in rec.replicate {
            let cpl = borealis_redo::decode_header(&bytes)
                .map(|h| h.is_cpl())
                .unwrap_or(false);
            core.outstanding.insert(
                lsn,
                Pending {
                    pg,
                    bytes,
                    cpl,
                    acked: 0,
                },
            );
            core.rereplicating.insert(lsn);
            for node in core.placement.segments(pg) {
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

    /// Whether `n` more records fit under VDL + LAL (an MTR larger than LAL still
    /// goes through once nothing else is outstanding).
    pub fn has_room(&self, n: usize) -> bool {
        self.last_lsn <= self.vdl || self.last_lsn.0 + n as u64 <= self.vdl.0 + self.lal
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
            let bytes = record.encode();
            self.unflushed_bytes += bytes.len();
            self.outstanding.insert(
                lsn,
                Pending {
                    pg,
                    bytes,
                    cpl: record.is_cpl(),
                    acked: 0,
                },
            );
            for node in self.placement.segments(pg) {
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
        let from = self.flush_lsn;
        for (l, p) in self.outstanding.range(from.next()..=to) {
            self.unflushed_bytes = self.unflushed_bytes.saturating_sub(p.bytes.len());
            self.pg_tail_flushed.insert(p.pg, *l);
            wake.extend(self.placement.segments(p.pg));
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

    /// The node's connection is up and the epoch installed on it.
    pub fn node_ready(&mut self, node: usize) {
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
            if let Some(slot) = self.placement.slot(p.pg, node) {
                if p.acked & (1 << slot) == 0 {
                    ns.queue.push_back(*lsn);
                }
            }
        }
    }

    /// The next append batch for `node`, if it is ready, has room in flight and there
    /// is anything to say (records, or completeness news for an idle PG).
    pub fn next_batch(&mut self, node: usize) -> Option<Request> {
        if self.fenced.is_some() {
            return None;
        }
        let max_inflight = self.cfg.max_inflight_batches;
        let (max_records, max_bytes) = (self.cfg.max_batch_records, self.cfg.max_batch_bytes);
        let ns = self.nodes.get_mut(node)?;
        if !ns.ready || ns.inflight_batches >= max_inflight {
            return None;
        }
        let flush = self.flush_lsn;
        let mut per_pg: BTreeMap<PgId, Vec<(Lsn, Vec<u8>)>> = BTreeMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        while let Some(&lsn) = ns.queue.front() {
            if lsn > flush {
                break; // held back until a flush request
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
            if !self.placement.segments(*pg).contains(&node) {
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
                complete_to,
                pg_last,
                records: records.into_iter().map(|(_, b)| b).collect(),
            });
        }
        if pgs.is_empty() {
            return None;
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
                for ack in pgs {
                    let Some(slot) = self.placement.slot(ack.pg, node) else {
                        continue;
                    };
                    if let Some(ns) = self.nodes.get_mut(node) {
                        let s = ns.scl.entry(ack.pg).or_default();
                        *s = (*s).max(ack.scl);
                    }
                    for lsn in &ack.lsns {
                        if let Some(p) = self.outstanding.get_mut(lsn) {
                            if p.pg == ack.pg {
                                p.acked |= 1 << slot;
                                if p.acked.count_ones() >= WRITE_QUORUM {
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
            while let Some(p) = self.outstanding.get(&self.vcl.next()) {
                if p.acked.count_ones() < WRITE_QUORUM {
                    break;
                }
                self.vcl = self.vcl.next();
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
            .filter(|(_, p)| p.acked.count_ones() as usize == SEGMENTS)
            .map(|(l, _)| *l)
            .take(self.cfg.max_batch_records * 4)
            .collect();
        for l in done {
            self.outstanding.remove(&l);
        }
        while self.outstanding.len() > self.cfg.retain_acked_records + self.lal as usize {
            match self.outstanding.first_key_value() {
                Some((l, _)) if *l <= vdl => {
                    let l = *l;
                    self.outstanding.remove(&l);
                }
                _ => break,
            }
        }
        self.vdl > before
    }

    /// Nodes to read `pg` at `read_lsn` from, best first: segments whose reported SCL
    /// covers the read point, then the rest of the PG's segments.
    pub fn read_candidates(&self, pg: PgId, read_lsn: Lsn) -> Vec<usize> {
        let segs = self.placement.segments(pg);
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

    /// Segment SCLs as the writer knows them, for status.
    pub fn segment_scl(&self, node: usize, pg: PgId) -> Lsn {
        self.nodes
            .get(node)
            .and_then(|s| s.scl.get(&pg))
            .copied()
            .unwrap_or(Lsn::ZERO)
    }
}
