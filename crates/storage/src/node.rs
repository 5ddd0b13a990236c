//! The storage node as a state machine with no I/O of its own: it is handed decoded
//! requests and a [`Disk`], and answers either at once (reads, errors) or after the
//! next sync (appends: acknowledged only once durable).
//!
//! ```text
//!   requests ──> Node::handle ──> Reply(now)            (GetPage, Hello, Tail, errors)
//!                     │
//!                     └─> log bytes appended to Disk ──> AfterSync(reply)
//!   driver: when no sync runs and something is dirty: job = Node::take_sync();
//!           run job (fdatasync) ──> release every AfterSync reply taken before it
//! ```
//!
//! Group commit falls out of this shape: while one fdatasync runs, everything that
//! arrives is appended to the files and waits for the next one, which covers all of
//! it. Only append-and-ack is on the latency path; coalescing and compaction run in
//! [`Node::tick`].
//!
//! Epochs are node-wide (the volume epoch): the node keeps the current epoch and the
//! truncation history in a small metadata file replaced atomically, and applies the
//! history to every segment on install and on replay.

use crate::disk::{Disk, SyncJob};
use crate::proto::{
    Append, ErrorCode, PgAck, Request, Response, SegmentInfo, Truncation, MAX_HISTORY,
};
use crate::segment::{
    entries_buffer, membership_entry, scan_log, vdl_hint_entry, Inserted, ReadError, Segment,
    IMAGE_CACHE_PAGES,
};
use borealis_common::{Epoch, Lsn, PgId};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::Duration;

/// Limits of a node's background work (invariant 9).
#[derive(Debug, Clone)]
pub struct NodeLimits {
    /// Records folded into page images per segment per tick.
    pub coalesce_per_tick: usize,
    /// Compact a log once it exceeds this many bytes and twice its live data.
    pub compact_min_bytes: u64,
    /// Largest ReadLog/Tail/Snapshot chunk served.
    pub max_chunk_bytes: usize,
    /// Log bytes re-read and CRC-checked per scrub step (bounds the step's time on
    /// the node loop; must exceed the largest entry).
    pub scrub_step_bytes: usize,
    /// Page images (8 KiB each) a node keeps in memory over all its segments; the
    /// rest stay in the segment log files and are read back when a read or a fold
    /// needs them. Images not yet in a log file (dirty) cannot be dropped: when they
    /// take over half the budget, segments with many of them append them to their
    /// log as a checkpoint (see `Node::tick`).
    pub max_resident_images: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            coalesce_per_tick: 10_000,
            compact_min_bytes: 64 << 20,
            max_chunk_bytes: 4 << 20,
            scrub_step_bytes: 1 << 20,
            // 1 GiB of images per node.
            max_resident_images: 131_072,
        }
    }
}

/// What to do with a request's reply.
#[derive(Debug)]
pub enum Handled {
    Reply(Response),
    /// Send only after the next sync job completes successfully.
    AfterSync(Response),
}

#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    pub appends: u64,
    pub records_appended: u64,
    pub bytes_appended: u64,
    pub fsyncs: u64,
    pub fsync_seconds_sum: f64,
    pub fsync_seconds_max: f64,
    pub torn_tails_cut: u64,
    /// Evicted page images read back from segment log files.
    pub image_reads: u64,
    /// Page images dropped from memory (they stay in the log files).
    pub images_evicted: u64,
    /// Page image checkpoints appended to segment logs under memory pressure.
    pub image_checkpoints: u64,
    pub fenced_requests: u64,
    pub stale_membership_requests: u64,
    pub scrub_bytes_total: u64,
    pub scrub_passes_total: u64,
    pub scrub_corruptions_total: u64,
    pub scrub_repairs_total: u64,
    /// The last damage scrubbing found, for `/health`.
    pub scrub_last_corruption: Option<String>,
    pub snapshots_served: u64,
    pub snapshots_installed: u64,
}

/// Background scrub position and the repairs it asked for.
#[derive(Default)]
struct ScrubState {
    /// The segment being scrubbed and the offset of the next entry to check.
    pg: Option<PgId>,
    offset: u64,
    /// Damaged logs waiting for a repair: PG -> last record LSN known good before
    /// the damage (the repair asks a peer for the records after it).
    pending: BTreeMap<PgId, Lsn>,
}

pub struct Node<D: Disk> {
    pub name: String,
    disk: D,
    epoch: Epoch,
    history: Vec<Truncation>,
    segments: BTreeMap<PgId, Segment>,
    dirty: BTreeSet<PgId>,
    pgmrpl: Lsn,
    failed: Option<String>,
    limits: NodeLimits,
    pub stats: NodeStats,
    /// Gossip peers as the writer last told us (the driver merges them with its
    /// configured ones).
    pub peers: Vec<std::net::SocketAddr>,
    scrub: ScrubState,
    /// Highest record LSN checked good in the current scrub pass over a log.
    scrub_last_good: Lsn,
    /// Snapshots being read by rebuilding peers: PG -> (id, bytes, tick of the last
    /// read). One per PG; dropped after its last chunk, or when left unread for
    /// `SNAPSHOT_IDLE_TICKS` (a reader that died mid-transfer).
    snapshots: BTreeMap<PgId, (u64, Vec<u8>, u64)>,
    next_snapshot_id: u64,
    ticks: u64,
    /// Per segment: the SCL as of the last completed sync, i.e. what a crash now
    /// would still find. The control plane completes a segment replacement on this,
    /// not on the in-memory SCL (gossiped records are durable only at the next sync).
    durable_scl: BTreeMap<PgId, Lsn>,
    /// SCLs when the sync job in flight was taken; durable once it completes.
    sync_scl: Vec<(PgId, Lsn)>,
    /// Segments whose damaged log could not be rewritten from this node (an
    /// evicted page image in the damaged stretch): gossip installs a peer's
    /// snapshot instead, with this node's records on top.
    snapshot_wanted: BTreeSet<PgId>,
}

const META_MAGIC: &[u8; 8] = b"BRLSNOD1";

/// Ticks (200 ms each by default) an unread snapshot is kept.
const SNAPSHOT_IDLE_TICKS: u64 = 50;

fn encode_meta(epoch: Epoch, history: &[Truncation]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + history.len() * 16);
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&epoch.0.to_le_bytes());
    out.extend_from_slice(&(history.len() as u32).to_le_bytes());
    for t in history {
        out.extend_from_slice(&t.epoch.0.to_le_bytes());
        out.extend_from_slice(&t.vdl.0.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_meta(b: &[u8]) -> Result<(Epoch, Vec<Truncation>), String> {
    let u64_at = |at: usize| -> Result<u64, String> {
        let s = b.get(at..at + 8).ok_or("short node meta")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    };
    if b.get(0..8) != Some(&META_MAGIC[..]) || b.len() < 24 {
        return Err("bad node meta header".into());
    }
    let stored = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if crc32c::crc32c(&b[12..]) != stored {
        return Err("node meta CRC mismatch".into());
    }
    let epoch = Epoch(u64_at(12)?);
    let n = u32::from_le_bytes([b[20], b[21], b[22], b[23]]) as usize;
    if n > MAX_HISTORY || b.len() != 24 + n * 16 {
        return Err("bad node meta history length".into());
    }
    let mut history = Vec::with_capacity(n);
    for i in 0..n {
        history.push(Truncation {
            epoch: Epoch(u64_at(24 + i * 16)?),
            vdl: Lsn(u64_at(32 + i * 16)?),
        });
    }
    Ok((epoch, history))
}

/// Union of two histories keyed by epoch (entries of one epoch are identical by
/// construction: one recovery per epoch), newest `MAX_HISTORY` kept.
pub fn merge_history(a: &[Truncation], b: &[Truncation]) -> Vec<Truncation> {
    let mut m: BTreeMap<Epoch, Lsn> = BTreeMap::new();
    for t in a.iter().chain(b) {
        m.insert(t.epoch, t.vdl);
    }
    let mut v: Vec<Truncation> = m
        .into_iter()
        .map(|(epoch, vdl)| Truncation { epoch, vdl })
        .collect();
    if v.len() > MAX_HISTORY {
        v.drain(..v.len() - MAX_HISTORY);
    }
    v
}

/// Reads evicted page images of `pg` back from its log file.
fn image_loader<'a, D: Disk>(
    disk: &'a mut D,
    pg: PgId,
    reads: &'a mut u64,
) -> impl FnMut(u64, u64) -> Result<borealis_redo::Page, String> + 'a {
    move |page, offset| {
        *reads += 1;
        let buf = disk
            .read_log_at(pg, offset, crate::segment::IMAGE_ENTRY_BYTES)
            .map_err(|e| format!("reading the image of page {page} at offset {offset}: {e}"))?;
        crate::segment::decode_image_entry(&buf, page)
    }
}

/// `seg`'s compacted log, its evicted images read back from its file.
fn compacted<D: Disk>(
    disk: &mut D,
    seg: &Segment,
    reads: &mut u64,
) -> Result<crate::segment::CompactedLog, String> {
    seg.compacted_log(&mut image_loader(disk, seg.pg, reads))
}

impl<D: Disk> Node<D> {
    /// Opens a node: reads the metadata, replays every segment log and cuts torn tails.
    /// A metadata file that fails its CRC is an error (the epoch must not regress).
    pub fn open(name: &str, mut disk: D, limits: NodeLimits) -> io::Result<Node<D>> {
        let (epoch, history) = match disk.read_meta()? {
            Some(b) => {
                decode_meta(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            }
            None => (Epoch(0), Vec::new()),
        };
        let mut stats = NodeStats::default();
        let mut segments = BTreeMap::new();
        let pgs = disk.list_segments()?;
        let share = limits.max_resident_images / pgs.len().max(1);
        for pg in pgs {
            let bytes = disk.read_log(pg)?;
            let replayed = Segment::replay(pg, &bytes, &history);
            if let Some(why) = &replayed.torn {
                log::warn!(
                    "{name}: {pg}: log tail cut ({why}); peers and the writer fill it back in"
                );
                stats.torn_tails_cut += 1;
            }
            if replayed.valid_len < bytes.len() {
                // A torn tail, or the zero-filled space of a preallocated log.
                disk.truncate_log(pg, replayed.valid_len as u64)?;
            }
            let mut segment = replayed.segment;
            // Bounded from the start: a restart must not need the whole database
            // in memory (each log is read whole, one at a time, to replay it).
            stats.images_evicted += segment.evict(share) as u64;
            segments.insert(pg, segment);
        }
        let mut node = Node {
            name: name.to_string(),
            disk,
            epoch,
            history,
            segments,
            dirty: BTreeSet::new(),
            pgmrpl: Lsn::ZERO,
            failed: None,
            limits,
            stats,
            peers: Vec::new(),
            scrub: ScrubState::default(),
            scrub_last_good: Lsn::ZERO,
            snapshots: BTreeMap::new(),
            next_snapshot_id: 1,
            ticks: 0,
            durable_scl: BTreeMap::new(),
            sync_scl: Vec::new(),
            snapshot_wanted: BTreeSet::new(),
        };
        node.evict_images();
        Ok(node)
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn is_healthy(&self) -> bool {
        self.failed.is_none()
    }
    pub fn segment(&self, pg: PgId) -> Option<&Segment> {
        self.segments.get(&pg)
    }

    fn fail(&mut self, what: &str, e: &io::Error) -> Response {
        let msg = format!("{what}: {e}");
        if self.failed.is_none() {
            log::error!(
                "{}: disk failure, no longer acknowledging writes: {msg}",
                self.name
            );
            self.failed = Some(msg.clone());
        }
        Response::error(ErrorCode::Unhealthy, 0, msg)
    }

    pub fn handle(&mut self, req: Request) -> Handled {
        match req {
            Request::Append(a) => self.append(a),
            Request::InstallEpoch { epoch, history } => {
                Handled::Reply(self.install_epoch(epoch, &history))
            }
            Request::SetPeers { peers } => {
                self.peers = peers.iter().filter_map(|p| p.parse().ok()).collect();
                Handled::Reply(Response::Done)
            }
            Request::Hello => Handled::Reply(Response::Hello {
                name: self.name.clone(),
                epoch: self.epoch,
                history: self.history.clone(),
                segments: self
                    .segments
                    .values()
                    .map(|s| SegmentInfo {
                        pg: s.pg,
                        scl: s.scl(),
                        vdl_hint: s.vdl_hint(),
                        gc_floor: s.gc_floor(),
                        max_lsn: s.max_lsn(),
                    })
                    .collect(),
            }),
            Request::Tail {
                pg,
                from,
                history,
                max_bytes,
            } => {
                let max = (max_bytes as usize).min(self.limits.max_chunk_bytes);
                let (last_at_or_below, records, more) = match self.segments.get(&pg) {
                    Some(s) => s.tail(from, &merge_history(&self.history, &history), max),
                    None => (Lsn::ZERO, Vec::new(), false),
                };
                Handled::Reply(Response::Tail {
                    pg,
                    epoch: self.epoch,
                    last_at_or_below,
                    records,
                    more,
                })
            }
            Request::GetPage { pg, page, read_lsn } => {
                Handled::Reply(match self.segments.get(&pg) {
                    None => {
                        Response::error(ErrorCode::NoSegment, 0, format!("no segment of {pg} here"))
                    }
                    Some(s) => match s.get_page(
                        page,
                        read_lsn,
                        &mut image_loader(&mut self.disk, pg, &mut self.stats.image_reads),
                    ) {
                        Ok(p) => Response::Page {
                            bytes: p.as_bytes().to_vec(),
                        },
                        Err(ReadError::NotComplete { scl }) => Response::error(
                            ErrorCode::NotComplete,
                            scl.0,
                            format!("{pg} complete to {scl}, read point {read_lsn}"),
                        ),
                        Err(ReadError::BelowGcFloor { floor }) => Response::error(
                            ErrorCode::BelowGcFloor,
                            floor.0,
                            format!("{pg} GC floor {floor} above read point {read_lsn}"),
                        ),
                        Err(ReadError::Corrupt(why)) => {
                            log::error!(
                                "{}: {pg}: corrupt data serving page {page}: {why}",
                                self.name
                            );
                            Response::error(ErrorCode::Corrupt, 0, why)
                        }
                    },
                })
            }
            Request::ReadLog {
                pg,
                after,
                max_bytes,
            } => {
                let max = (max_bytes as usize).min(self.limits.max_chunk_bytes);
                Handled::Reply(match self.segments.get(&pg) {
                    Some(s) => {
                        let (records, more) = s.read_log(after, max);
                        let scl = s.scl();
                        let scl_last = s.last_record_at_or_below(scl);
                        Response::LogChunk {
                            pg,
                            epoch: self.epoch,
                            scl,
                            scl_last,
                            records,
                            more,
                        }
                    }
                    None => Response::LogChunk {
                        pg,
                        epoch: self.epoch,
                        scl: Lsn::ZERO,
                        scl_last: Lsn::ZERO,
                        records: Vec::new(),
                        more: false,
                    },
                })
            }
            Request::Snapshot {
                pg,
                offset,
                max_bytes,
            } => Handled::Reply(self.snapshot_chunk(pg, offset, max_bytes)),
        }
    }

    /// Serves a chunk of a consistent snapshot of `pg`'s segment (see
    /// [`Request::Snapshot`]). Memory is bounded by one snapshot per PG, dropped once
    /// its last chunk has been read.
    fn snapshot_chunk(&mut self, pg: PgId, offset: u64, max_bytes: u32) -> Response {
        if offset == 0 {
            let Some(seg) = self.segments.get(&pg) else {
                return Response::error(
                    ErrorCode::NoSegment,
                    0,
                    format!("no segment of {pg} here"),
                );
            };
            let log = match compacted(&mut self.disk, seg, &mut self.stats.image_reads) {
                Ok(log) => log,
                Err(why) => {
                    log::error!("{}: {pg}: cannot build a snapshot: {why}", self.name);
                    return Response::error(ErrorCode::Corrupt, 0, why);
                }
            };
            let id = self.next_snapshot_id;
            self.next_snapshot_id += 1;
            self.snapshots.insert(pg, (id, log.bytes, self.ticks));
            self.stats.snapshots_served += 1;
        }
        let ticks = self.ticks;
        let Some((id, bytes, last_read)) = self.snapshots.get_mut(&pg) else {
            return Response::error(
                ErrorCode::BadRequest,
                0,
                format!("no snapshot of {pg} in progress (start again at offset 0)"),
            );
        };
        *last_read = ticks;
        let max = (max_bytes as usize).clamp(1, self.limits.max_chunk_bytes);
        let from = (offset as usize).min(bytes.len());
        let to = from.saturating_add(max).min(bytes.len());
        let chunk = Response::SnapshotChunk {
            pg,
            id: *id,
            total: bytes.len() as u64,
            offset: from as u64,
            bytes: bytes[from..to].to_vec(),
        };
        if to == bytes.len() {
            self.snapshots.remove(&pg);
        }
        chunk
    }

    /// Whether rebuilding `pg` needs a snapshot from a peer whose GC floor is
    /// `peer_floor`: the records after the end of our chain were folded into page
    /// images there, so record gossip alone would leave a hole forever.
    pub fn needs_snapshot(&self, pg: PgId, peer_floor: Lsn) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.snapshot_wanted.contains(&pg) {
            return true;
        }
        if peer_floor == Lsn::ZERO {
            return false;
        }
        match self.segments.get(&pg) {
            None => true,
            Some(s) => s.scl_record() < peer_floor && s.gc_floor() < peer_floor,
        }
    }

    /// Installs a peer's snapshot of `pg` (the bytes of a compacted log): replays
    /// it (every entry CRC-checked), adds the records this segment already held on
    /// top, and replaces the log durably. Returns the records the segment now holds.
    pub fn install_snapshot(&mut self, pg: PgId, bytes: &[u8]) -> Result<usize, String> {
        if self.failed.is_some() {
            return Err("node is unhealthy".into());
        }
        let replayed = Segment::replay(pg, bytes, &self.history);
        if let Some(why) = replayed.torn {
            return Err(format!("snapshot of {pg} is damaged: {why}"));
        }
        let mut seg = replayed.segment;
        let mut log = bytes[..replayed.valid_len].to_vec();
        if let Some(local) = self.segments.get(&pg) {
            if !self.needs_snapshot(pg, seg.gc_floor()) {
                return Ok(local.record_count()); // caught up meanwhile
            }
            let (held, _) = local.read_log(Lsn::ZERO, usize::MAX);
            for r in held {
                let _ = seg.insert(r.epoch, r.bytes, Some(&mut log));
            }
            seg.note_vdl_hint(local.vdl_hint());
            // The writer sends a completeness claim once; one still waiting for
            // the chain must survive the swap.
            if let Some((last, to)) = local.pending_claim() {
                seg.note_complete(last, to);
            }
            if seg.note_membership(local.membership_epoch()) {
                log.extend_from_slice(&membership_entry(seg.membership_epoch()));
            }
        }
        if let Err(e) = self.disk.replace_log(pg, &log) {
            self.fail("installing a snapshot", &e);
            return Err(e.to_string());
        }
        seg.log_bytes = log.len() as u64;
        let n = seg.record_count();
        log::info!(
            "{}: {pg}: installed a peer's snapshot (floor {}, {} bytes, SCL {})",
            self.name,
            seg.gc_floor(),
            log.len(),
            seg.scl()
        );
        // replace_log was durable: so is everything the new segment holds.
        let scl = seg.scl();
        self.segments.insert(pg, seg);
        self.note_durable_scl(pg, scl);
        if self.scrub.pg == Some(pg) {
            self.scrub.offset = 0;
        }
        self.stats.snapshots_installed += 1;
        self.snapshot_wanted.remove(&pg);
        Ok(n)
    }

    /// Whether gossip with a peer whose SCL for `pg` is `peer_scl` can help, and if
    /// so after which LSN to ask: when the peer is further along, or when this
    /// segment holds records beyond the end of its backlink chain (a hole, which
    /// any peer may be able to fill, whatever its own SCL).
    pub fn gossip_from(&self, pg: PgId, peer_scl: Lsn) -> Option<Lsn> {
        match self.segments.get(&pg) {
            None => (peer_scl > Lsn::ZERO).then_some(Lsn::ZERO),
            Some(s) => {
                (peer_scl > s.scl() || s.max_lsn() > s.scl_record()).then_some(s.scl_record())
            }
        }
    }

    /// Where gossip should resume for `pg`: (SCL, last record of the chain).
    pub fn progress(&self, pg: PgId) -> (Lsn, Lsn) {
        self.segments
            .get(&pg)
            .map(|s| (s.scl(), s.scl_record()))
            .unwrap_or_default()
    }

    /// Gossip: takes records of `pg` from a peer's [`Response::LogChunk`]. Records
    /// that do not survive this node's truncation history are refused; completeness
    /// is taken over only from a peer at the same epoch (an older peer may still
    /// hold records a newer recovery truncated). Durable with the next sync; nothing
    /// is acknowledged for gossip. Returns how many records were new.
    pub fn absorb(&mut self, chunk: &Response) -> usize {
        let Response::LogChunk {
            pg,
            epoch,
            scl,
            scl_last,
            records,
            ..
        } = chunk
        else {
            return 0;
        };
        if self.failed.is_some() {
            return 0;
        }
        let history = &self.history;
        let seg = self
            .segments
            .entry(*pg)
            .or_insert_with(|| Segment::new(*pg));
        let mut out = entries_buffer(records.iter().map(|r| r.bytes.len()));
        let mut new = 0;
        for r in records {
            let Ok(h) = borealis_redo::decode_header(&r.bytes) else {
                log::warn!("{}: {pg}: corrupt record from a peer ignored", self.name);
                continue;
            };
            if !crate::proto::record_survives(history, r.epoch, h.lsn) {
                continue;
            }
            if let Ok(Inserted::New(_)) = seg.insert(r.epoch, r.bytes.clone(), Some(&mut out)) {
                new += 1;
            }
        }
        if *epoch == self.epoch {
            seg.note_complete(*scl_last, *scl);
        }
        if !out.is_empty() {
            seg.log_bytes += out.len() as u64;
            self.stats.bytes_appended += out.len() as u64;
            if let Err(e) = self.disk.append_log(*pg, out) {
                self.fail("log append (gossip)", &e);
                return 0;
            }
            self.dirty.insert(*pg);
        }
        new
    }

    /// PGs hosted here.
    pub fn pgs(&self) -> Vec<PgId> {
        self.segments.keys().copied().collect()
    }

    fn check_epoch(&mut self, epoch: Epoch) -> Option<Response> {
        if epoch < self.epoch {
            self.stats.fenced_requests += 1;
            return Some(Response::error(
                ErrorCode::Fenced,
                self.epoch.0,
                format!("epoch {epoch} is fenced by epoch {}", self.epoch),
            ));
        }
        if epoch > self.epoch {
            return Some(Response::error(
                ErrorCode::NeedEpoch,
                self.epoch.0,
                format!("epoch {epoch} not installed"),
            ));
        }
        None
    }

    fn append(&mut self, a: Append) -> Handled {
        if self.failed.is_some() {
            return Handled::Reply(Response::error(
                ErrorCode::Unhealthy,
                0,
                "node is unhealthy",
            ));
        }
        if let Some(r) = self.check_epoch(a.epoch) {
            return Handled::Reply(r);
        }
        // Membership first, before anything is written: a stale batch refuses the
        // whole append so that no part of it is acknowledged.
        for batch in &a.pgs {
            let ours = self
                .segments
                .get(&batch.pg)
                .map(Segment::membership_epoch)
                .unwrap_or(0);
            if batch.membership_epoch < ours {
                self.stats.stale_membership_requests += 1;
                return Handled::Reply(Response::error(
                    ErrorCode::StaleMembership,
                    ours,
                    format!(
                        "{}: membership epoch {} is older than the segment's {ours}",
                        batch.pg, batch.membership_epoch
                    ),
                ));
            }
        }
        self.stats.appends += 1;
        self.pgmrpl = self.pgmrpl.max(a.pgmrpl);
        let mut acks = Vec::with_capacity(a.pgs.len());
        for batch in a.pgs {
            let seg = self
                .segments
                .entry(batch.pg)
                .or_insert_with(|| Segment::new(batch.pg));
            let mut lsns = Vec::with_capacity(batch.records.len());
            let mut out = entries_buffer(batch.records.iter().map(|r| r.len()));
            // Durable with this batch (it syncs before the ack), so a restart keeps
            // refusing older memberships.
            let membership_moved = seg.note_membership(batch.membership_epoch);
            if membership_moved {
                out.extend_from_slice(&membership_entry(batch.membership_epoch));
            }
            let has_records = !batch.records.is_empty();
            for bytes in batch.records {
                match seg.insert(a.epoch, Vec::from(bytes), Some(&mut out)) {
                    Ok(inserted) => {
                        lsns.push(inserted.lsn());
                        if let Inserted::New(_) = inserted {
                            self.stats.records_appended += 1;
                        }
                    }
                    Err(e) => {
                        log::warn!(
                            "{}: {}: rejecting malformed record: {e}",
                            self.name,
                            batch.pg
                        );
                        return Handled::Reply(Response::error(ErrorCode::BadRequest, 0, e));
                    }
                }
            }
            // Every batch moves the segment's VDL hint in memory, so a segment the
            // writer stopped writing still folds its last records. It is logged with
            // new records only: writers send a batch for every PG with each append
            // (to move its completeness claim), and logging the hint in all of them
            // made every group commit fdatasync every segment file. After a restart
            // such a segment has the older logged hint, still a valid lower bound,
            // and its tail above it holds nothing new.
            seg.note_vdl_hint(a.vdl_hint);
            if !out.is_empty() {
                if let Some(hint) = seg.hint_to_log() {
                    out.extend_from_slice(&vdl_hint_entry(hint));
                }
            }
            seg.note_complete(batch.pg_last, batch.complete_to);
            let scl = seg.scl();
            if !out.is_empty() {
                seg.log_bytes += out.len() as u64;
                self.stats.bytes_appended += out.len() as u64;
                if let Err(e) = self.disk.append_log(batch.pg, out) {
                    return Handled::Reply(self.fail("log append", &e));
                }
            }
            // Even an all-duplicate batch is acked after the next sync: the earlier
            // copy may itself still be waiting for its fdatasync. A batch without
            // records (a completeness claim only) has nothing to make durable.
            if has_records || membership_moved {
                self.dirty.insert(batch.pg);
            }
            acks.push(PgAck {
                pg: batch.pg,
                lsns,
                scl,
            });
        }
        Handled::AfterSync(Response::Appended {
            epoch: self.epoch,
            pgs: acks,
        })
    }

    fn install_epoch(&mut self, epoch: Epoch, history: &[Truncation]) -> Response {
        if epoch < self.epoch {
            self.stats.fenced_requests += 1;
            return Response::error(
                ErrorCode::Fenced,
                self.epoch.0,
                format!("epoch {epoch} is fenced by epoch {}", self.epoch),
            );
        }
        let merged = merge_history(&self.history, history);
        if epoch == self.epoch && merged == self.history {
            return Response::EpochInstalled { epoch };
        }
        if self.failed.is_some() {
            return Response::error(ErrorCode::Unhealthy, 0, "node is unhealthy");
        }
        // Durable before it takes effect: a node that restarts must not forget it was
        // fenced.
        if let Err(e) = self.disk.write_meta(&encode_meta(epoch, &merged)) {
            return self.fail("writing node metadata", &e);
        }
        log::info!(
            "{}: installed volume epoch {epoch} (was {})",
            self.name,
            self.epoch
        );
        let new: Vec<Truncation> = merged
            .iter()
            .filter(|t| !self.history.contains(t))
            .copied()
            .collect();
        self.epoch = epoch;
        self.history = merged;
        for seg in self.segments.values_mut() {
            let n = seg.truncate(&self.history, &new);
            if n > 0 {
                log::info!(
                    "{}: {}: truncated {n} records above the recovery point",
                    self.name,
                    seg.pg
                );
            }
        }
        Response::EpochInstalled { epoch }
    }

    /// A job making every append so far durable, or `None` if nothing is dirty.
    ///
    /// Drivers call this only while no sync job is in flight, so with nothing dirty
    /// every byte written is on disk and the current SCLs are durable.
    pub fn take_sync(&mut self) -> Option<SyncJob> {
        let scls: Vec<(PgId, Lsn)> = self.segments.values().map(|s| (s.pg, s.scl())).collect();
        if self.dirty.is_empty() {
            for (pg, scl) in scls {
                self.note_durable_scl(pg, scl);
            }
            return None;
        }
        self.sync_scl = scls;
        let pgs: Vec<PgId> = std::mem::take(&mut self.dirty).into_iter().collect();
        match self.disk.sync_job(&pgs) {
            Ok(job) => Some(job),
            Err(e) => {
                self.fail("preparing fdatasync", &e);
                Some(Box::new(move || Err(io::Error::other(e.to_string()))))
            }
        }
    }

    /// Turns a reply that waited for a sync into what may be sent now. An ack for
    /// an append of an older epoch is never released after a newer epoch was
    /// installed: the new epoch's recovery may have truncated those very records, and
    /// a late ack would let the fenced writer count them toward its write quorum.
    pub fn release(&self, resp: Response) -> Response {
        match resp {
            Response::Appended { epoch, .. } if epoch < self.epoch => Response::error(
                ErrorCode::Fenced,
                self.epoch.0,
                format!(
                    "epoch {epoch} was fenced by epoch {} before its append became durable",
                    self.epoch
                ),
            ),
            other => other,
        }
    }

    /// Reports a sync job's outcome. On error the node is unhealthy from then on and
    /// the replies that waited for the job must not be sent as acks.
    pub fn sync_done(&mut self, result: &io::Result<()>, took: Duration) {
        self.stats.fsyncs += 1;
        let s = took.as_secs_f64();
        self.stats.fsync_seconds_sum += s;
        self.stats.fsync_seconds_max = self.stats.fsync_seconds_max.max(s);
        match result {
            Ok(()) => {
                for (pg, scl) in std::mem::take(&mut self.sync_scl) {
                    self.note_durable_scl(pg, scl);
                }
            }
            Err(e) => {
                self.sync_scl.clear();
                self.fail("fdatasync", e);
            }
        }
    }

    fn note_durable_scl(&mut self, pg: PgId, scl: Lsn) {
        let d = self.durable_scl.entry(pg).or_default();
        *d = (*d).max(scl);
    }

    /// The SCL of `pg`'s segment that a crash now would not take back: as of the
    /// last completed sync, and never above the current one (a truncation lowers it).
    pub fn durable_scl(&self, pg: PgId) -> Lsn {
        let current = self
            .segments
            .get(&pg)
            .map(Segment::scl)
            .unwrap_or(Lsn::ZERO);
        self.durable_scl
            .get(&pg)
            .copied()
            .unwrap_or(Lsn::ZERO)
            .min(current)
    }

    /// One bounded scrub step: re-reads the next stretch of the current segment's
    /// log file and checks every entry's CRC (records, page images, hints). Damage is
    /// counted, logged, shown in `/health` and `/metrics`, and queued for
    /// [`Node::repair`]; the position moves on to the next segment at the end of a
    /// log. The in-memory state was CRC-checked when it was loaded or received, so
    /// it (plus a peer's copy of the damaged range) is what a repair rewrites from.
    pub fn scrub_step(&mut self) {
        if self.failed.is_some() || self.segments.is_empty() {
            return;
        }
        let pg = match self.scrub.pg {
            Some(pg)
                if self.segments.contains_key(&pg) && !self.scrub.pending.contains_key(&pg) =>
            {
                pg
            }
            _ => {
                self.scrub_next_segment();
                match self.scrub.pg {
                    Some(pg) if !self.scrub.pending.contains_key(&pg) => pg,
                    _ => return,
                }
            }
        };
        let written = self.segments.get(&pg).map(|s| s.log_bytes).unwrap_or(0);
        if self.scrub.offset >= written {
            self.scrub_next_segment();
            return;
        }
        let min_step = crate::segment::MAX_ENTRY_BYTES + 8;
        let want = (self.limits.scrub_step_bytes.max(min_step) as u64)
            .min(written - self.scrub.offset) as usize;
        let buf = match self.disk.read_log_at(pg, self.scrub.offset, want) {
            Ok(b) => b,
            Err(e) => {
                self.fail("scrub read", &e);
                return;
            }
        };
        self.stats.scrub_bytes_total += buf.len() as u64;
        let reaches_end = self.scrub.offset + want as u64 >= written;
        let scan = if buf.len() < want {
            crate::segment::LogScan {
                valid_len: 0,
                last_record: Lsn::ZERO,
                damage: Some((
                    buf.len(),
                    format!("log file ends before its written length {written}"),
                )),
            }
        } else {
            scan_log(&buf, reaches_end)
        };
        match scan.damage {
            Some((at, why)) => {
                let offset = self.scrub.offset + at as u64;
                let msg = format!("{pg}: {why} at log offset {offset}");
                log::error!(
                    "{}: scrub found corruption: {msg}; repairing from a peer",
                    self.name
                );
                self.stats.scrub_corruptions_total += 1;
                self.stats.scrub_last_corruption = Some(msg);
                // Records after the last good one before the damage are what a peer
                // is asked for.
                let good = self.scrub_last_good.max(scan.last_record);
                self.scrub.pending.insert(pg, good);
                self.scrub_next_segment();
            }
            None if scan.valid_len == 0 => {
                // Cannot happen with a step larger than any entry; move on rather
                // than spin.
                self.scrub_next_segment();
            }
            None => {
                self.scrub_last_good = self.scrub_last_good.max(scan.last_record);
                self.scrub.offset += scan.valid_len as u64;
            }
        }
    }

    fn scrub_next_segment(&mut self) {
        let next = match self.scrub.pg {
            Some(cur) => self
                .segments
                .range(PgId(cur.0.saturating_add(1))..)
                .next()
                .map(|(p, _)| *p),
            None => None,
        };
        let next = next.or_else(|| {
            self.stats.scrub_passes_total += 1;
            self.segments.keys().next().copied()
        });
        self.scrub.pg = next;
        self.scrub.offset = 0;
        self.scrub_last_good = Lsn::ZERO;
    }

    /// Damaged segment logs waiting for a repair: (PG, last good record before the
    /// damage).
    pub fn pending_repairs(&self) -> Vec<(PgId, Lsn)> {
        self.scrub.pending.iter().map(|(p, l)| (*p, *l)).collect()
    }

    /// Repairs a damaged log: takes the records a peer sent for the damaged range
    /// (`chunks`, LogChunks; CRC-checked like any gossip, completeness claims
    /// ignored) into the segment, then rewrites the whole log from the segment
    /// durably (write, fsync, rename), which also replaces the damaged bytes.
    /// Returns how many records the peer added.
    pub fn repair(&mut self, pg: PgId, chunks: &[Response]) -> Result<usize, String> {
        if self.failed.is_some() {
            return Err("node is unhealthy".into());
        }
        let history = &self.history;
        let Some(seg) = self.segments.get_mut(&pg) else {
            self.scrub.pending.remove(&pg);
            return Ok(0);
        };
        let mut added = 0;
        for chunk in chunks {
            let Response::LogChunk {
                pg: cpg, records, ..
            } = chunk
            else {
                continue;
            };
            if *cpg != pg {
                continue;
            }
            for r in records {
                let Ok(h) = borealis_redo::decode_header(&r.bytes) else {
                    continue;
                };
                if !crate::proto::record_survives(history, r.epoch, h.lsn) {
                    continue;
                }
                if let Ok(Inserted::New(_)) = seg.insert(r.epoch, r.bytes.clone(), None) {
                    added += 1;
                }
            }
        }
        // An evicted image whose entry is in the damaged stretch cannot be read
        // back: the log is then rebuilt from a peer's snapshot instead (gossip asks
        // `needs_snapshot`), which replaces every image and keeps our records.
        let log = match compacted(&mut self.disk, seg, &mut self.stats.image_reads) {
            Ok(log) => log,
            Err(why) => {
                log::error!(
                    "{}: {pg}: cannot rewrite the damaged log from this node ({why}); rebuilding it from a peer's snapshot",
                    self.name
                );
                self.scrub.pending.remove(&pg);
                self.snapshot_wanted.insert(pg);
                return Err(why);
            }
        };
        if let Err(e) = self.disk.replace_log(pg, &log.bytes) {
            self.fail("rewriting a damaged log", &e);
            return Err(e.to_string());
        }
        seg.compacted(&log);
        let bytes = log.bytes;
        self.scrub.pending.remove(&pg);
        if self.scrub.pg == Some(pg) {
            self.scrub.offset = 0;
        }
        self.stats.scrub_repairs_total += 1;
        log::warn!(
            "{}: {pg}: damaged log rewritten ({} bytes; {added} records from a peer)",
            self.name,
            bytes.len()
        );
        Ok(added)
    }

    /// Background work: fold records below PGMRPL into page images, compact logs,
    /// drop abandoned snapshots.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let now = self.ticks;
        self.snapshots
            .retain(|_, (_, _, last)| now.saturating_sub(*last) <= SNAPSHOT_IDLE_TICKS);
        if self.failed.is_some() {
            return;
        }
        for seg in self.segments.values_mut() {
            let pg = seg.pg;
            seg.coalesce(
                self.pgmrpl,
                self.limits.coalesce_per_tick,
                &mut image_loader(&mut self.disk, pg, &mut self.stats.image_reads),
            );
        }
        // Under memory pressure (dirty images, which exist only in memory, take
        // over half the budget), a segment with many dirty images appends them to
        // its log as a page image checkpoint: clean from then on, so the eviction
        // below can drop them. Without pressure they stay dirty until compaction.
        let dirty: usize = self
            .segments
            .values()
            .map(|s| s.memory().dirty_images)
            .sum();
        let pressure = dirty > self.limits.max_resident_images / 2;
        let dirty_limit = (self.limits.max_resident_images / 4 / self.segments.len().max(1)).max(2);
        let mut compact = Vec::new();
        for seg in self.segments.values_mut() {
            let pg = seg.pg;
            if seg.log_bytes > self.limits.compact_min_bytes && seg.log_bytes > 2 * seg.live_bytes()
            {
                compact.push(pg);
                continue;
            }
            if !pressure || seg.memory().dirty_images <= dirty_limit {
                continue;
            }
            let ck = match seg.checkpoint() {
                Ok(ck) => ck,
                Err(why) => {
                    log::error!("{}: {pg}: cannot checkpoint page images: {why}", self.name);
                    continue;
                }
            };
            match self.disk.append_durable(pg, &ck.bytes) {
                Ok(Some(offset)) => {
                    seg.checkpointed(offset, &ck);
                    self.stats.image_checkpoints += 1;
                }
                Ok(None) => {} // appends waiting for their sync: next tick
                Err(e) => {
                    self.fail("page image checkpoint", &e);
                    return;
                }
            }
        }
        for pg in compact {
            let Some(seg) = self.segments.get_mut(&pg) else {
                continue;
            };
            let log = match compacted(&mut self.disk, seg, &mut self.stats.image_reads) {
                Ok(log) => log,
                Err(why) => {
                    // The old log stays (and scrubbing will find the damage).
                    log::error!("{}: {pg}: cannot compact: {why}", self.name);
                    continue;
                }
            };
            match self.disk.replace_log(pg, &log.bytes) {
                Ok(()) => {
                    log::info!(
                        "{}: {pg}: compacted log {} -> {} bytes",
                        self.name,
                        seg.log_bytes,
                        log.bytes.len()
                    );
                    seg.compacted(&log);
                    if self.scrub.pg == Some(pg) {
                        self.scrub.offset = 0; // offsets of the old file mean nothing now
                    }
                }
                Err(e) => {
                    self.fail("compaction", &e);
                    return;
                }
            }
        }
        self.evict_images();
    }

    /// Drops clean page images from memory until the node holds at most
    /// `max_resident_images` (they stay in the segment log files), and shares an
    /// eighth of that budget among the segments' caches of images materialized at
    /// later read points.
    fn evict_images(&mut self) {
        let max = self.limits.max_resident_images;
        let cache = (max / 8 / self.segments.len().max(1)).clamp(16, IMAGE_CACHE_PAGES);
        for seg in self.segments.values_mut() {
            seg.set_image_cache_pages(cache);
        }
        let mut resident: usize = self
            .segments
            .values()
            .map(|s| s.memory().resident_images)
            .sum();
        for seg in self.segments.values_mut() {
            if resident <= max {
                break;
            }
            let mine = seg.memory().resident_images;
            let keep = mine.saturating_sub(resident - max);
            let gone = seg.evict(keep);
            resident -= gone;
            self.stats.images_evicted += gone as u64;
        }
    }

    pub fn health(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "state": if self.failed.is_none() { "available" } else { "failed" },
            "error": self.failed,
            "epoch": self.epoch.0,
            "scrub": {
                "bytes_total": self.stats.scrub_bytes_total,
                "passes_total": self.stats.scrub_passes_total,
                "corruptions_total": self.stats.scrub_corruptions_total,
                "repairs_total": self.stats.scrub_repairs_total,
                "pending_repairs": self.scrub.pending.len(),
                "snapshots_wanted": self.snapshot_wanted.len(),
                "last_corruption": self.stats.scrub_last_corruption,
            },
            "snapshots_installed": self.stats.snapshots_installed,
            "segments": self.segments.values().map(|s| serde_json::json!({
                "pg": s.pg.0,
                "membership_epoch": s.membership_epoch(),
                "scl": s.scl().0,
                "durable_scl": self.durable_scl(s.pg).0,
                "gc_floor": s.gc_floor().0,
                "vdl_hint": s.vdl_hint().0,
                "records": s.record_count(),
                "log_bytes": s.log_bytes,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let n = &self.name;
        let st = &self.stats;
        let mut out = String::new();
        let bytes: u64 = self.segments.values().map(|s| s.log_bytes).sum();
        let _ = writeln!(
            out,
            "# TYPE borealis_storage_bytes gauge\nborealis_storage_bytes{{node=\"{n}\"}} {bytes}"
        );
        let _ = writeln!(out, "# TYPE borealis_storage_segment_scl gauge");
        for s in self.segments.values() {
            let _ = writeln!(
                out,
                "borealis_storage_segment_scl{{node=\"{n}\",pg=\"{}\"}} {}",
                s.pg.0,
                s.scl().0
            );
        }
        // Memory: page images at the GC floor (resident, of them dirty, and evicted
        // to the log files), cached later images and records not yet folded.
        let mut m = crate::segment::SegmentMemory::default();
        for s in self.segments.values() {
            let x = s.memory();
            m.resident_images += x.resident_images;
            m.dirty_images += x.dirty_images;
            m.evicted_images += x.evicted_images;
            m.cached_images += x.cached_images;
            m.record_bytes += x.record_bytes;
        }
        for (metric, kind, value) in [
            ("page_images", "gauge", m.resident_images as u64),
            ("dirty_images", "gauge", m.dirty_images as u64),
            ("evicted_images", "gauge", m.evicted_images as u64),
            ("cached_images", "gauge", m.cached_images as u64),
            ("record_bytes", "gauge", m.record_bytes),
            ("image_reads_total", "counter", st.image_reads),
            ("images_evicted_total", "counter", st.images_evicted),
            ("image_checkpoints_total", "counter", st.image_checkpoints),
        ] {
            let _ = writeln!(
                out,
                "# TYPE borealis_storage_{metric} {kind}\nborealis_storage_{metric}{{node=\"{n}\"}} {value}"
            );
        }
        let _ = writeln!(out, "# TYPE borealis_storage_appends_total counter\nborealis_storage_appends_total{{node=\"{n}\"}} {}", st.appends);
        let _ = writeln!(
            out,
            "# TYPE borealis_storage_records_appended_total counter\nborealis_storage_records_appended_total{{node=\"{n}\"}} {}",
            st.records_appended
        );
        let _ = writeln!(
            out,
            "# TYPE borealis_storage_fsync_seconds summary\nborealis_storage_fsync_seconds_sum{{node=\"{n}\"}} {}\nborealis_storage_fsync_seconds_count{{node=\"{n}\"}} {}",
            st.fsync_seconds_sum, st.fsyncs
        );
        let _ = writeln!(out, "# TYPE borealis_storage_fsync_seconds_max gauge\nborealis_storage_fsync_seconds_max{{node=\"{n}\"}} {}", st.fsync_seconds_max);
        let _ = writeln!(
            out,
            "# TYPE borealis_storage_epoch gauge\nborealis_storage_epoch{{node=\"{n}\"}} {}",
            self.epoch.0
        );
        for (metric, v) in [
            ("borealis_storage_scrub_bytes_total", st.scrub_bytes_total),
            (
                "borealis_storage_scrub_corruptions_total",
                st.scrub_corruptions_total,
            ),
            (
                "borealis_storage_scrub_repairs_total",
                st.scrub_repairs_total,
            ),
            (
                "borealis_storage_stale_membership_requests_total",
                st.stale_membership_requests,
            ),
            (
                "borealis_storage_snapshots_installed_total",
                st.snapshots_installed,
            ),
        ] {
            let _ = writeln!(out, "# TYPE {metric} counter\n{metric}{{node=\"{n}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# TYPE borealis_storage_healthy gauge\nborealis_storage_healthy{{node=\"{n}\"}} {}",
            self.failed.is_none() as u8
        );
        out
    }
}
