//! One segment: the part of a protection group (PG) a storage node hosts.
//!
//! # Log format
//!
//! A segment is one append-only file of entries:
//!
//! ```text
//!   entry := len:u32 | crc32c:u32 | type:u8 | payload        (len = 1 + payload length)
//!   type 1 RECORD     epoch:u64 | encoded redo record (itself CRC-protected)
//!   type 2 VDL_HINT   lsn:u64           (the writer's VDL, bounds recovery's tail scan)
//!   type 3 PAGE_IMAGE page:u64 | 8192 bytes      (by compaction and checkpoints)
//!   type 4 FLOOR      gc_floor:u64 | chain_anchor:u64 | scl:u64
//!                     (compaction header, or the start of a page image checkpoint)
//!   type 5 MEMBERSHIP membership_epoch:u64   (the PG's segment-set version, see below)
//! ```
//!
//! Replay reads entries until the first one that is short or fails its CRC: that is
//! a torn tail (a crash during an unsynced append) and everything from there on is cut.
//! Records lost that way were never acknowledged (acks follow the fdatasync), and
//! gossip or the writer's resend fills them back in.
//!
//! # Completeness (SCL)
//!
//! Each record carries a backlink (`prev_lsn`: the previous record of the same PG).
//! Starting from the chain anchor (LSN 0, or the last record folded into page images)
//! the segment follows backlinks forward: `scl_record` is the last record reached; a
//! record whose backlink points at a missing record sits behind a hole. The writer
//! additionally tells the segment "every record of this PG at or below volume LSN
//! `complete_to` ends at `pg_last`", which lets the SCL advance past LSNs that belong
//! to other PGs: `scl` is a volume LSN up to which this segment holds every record of
//! its PG, so it can serve GetPage at any read point at or below it.
//!
//! # Epochs
//!
//! Every stored record remembers the volume epoch it was written under. A recovery at
//! epoch E keeps exactly the records at or below its VDL; the node's durable
//! truncation history (see [`crate::proto::Truncation`]) is applied to the segment on
//! every epoch install and on replay, so a record is dropped iff some later epoch's
//! recovery truncated above it, even if this node slept through that recovery.
//!
//! # Membership epochs
//!
//! A PG's segment set changes when a segment is replaced (the control plane bumps
//! the PG's membership epoch at each step). Appends carry the writer's view of it;
//! the segment keeps the highest it has seen (durably, as a MEMBERSHIP entry written
//! with the append that raised it) and the node refuses appends below it, as it
//! refuses an older volume epoch.
//!
//! # Scrubbing
//!
//! [`scan_log`] re-reads a stretch of the log file and checks every entry's CRC; the
//! node runs it in the background over all segments ([`crate::node::Node::scrub_step`])
//! and rewrites a damaged log from its in-memory state plus what a peer holds for
//! the damaged range.
//!
//! # Pages and GC
//!
//! Records at or below `gc_floor` (min of PGMRPL, SCL and the VDL hint) are folded into
//! page images with [`borealis_redo::apply`] (the only function that changes pages)
//! and dropped from memory; GetPage below the floor is refused. Compaction rewrites
//! the file as FLOOR + PAGE_IMAGEs + live records so the log does not grow forever.
//!
//! # Bounded memory
//!
//! Page images at the floor are clean (also in the log file, at an offset kept in
//! `images_at`), dirty (folded into since) or evicted (file only). The node evicts
//! clean ones to stay within its budget and passes a [`LoadImage`] to everything
//! that may need an evicted image back. Dirty images become clean through a
//! compaction or a checkpoint appended to the log: a FLOOR entry then the dirty
//! images. Replay drops the records at or below any FLOOR it meets: each of them is
//! folded into an image in the file, either one following that FLOOR or an earlier
//! one of a page nothing was folded into since.

use crate::proto::{record_survives, EpochRecord, Truncation};
use borealis_common::IdHashMap;
use borealis_common::{Epoch, Lsn, PageNo, PgId, PAGE_SIZE};
use borealis_redo::{apply, decode_header, Page, Record};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

const ENTRY_RECORD: u8 = 1;
const ENTRY_VDL_HINT: u8 = 2;
const ENTRY_PAGE_IMAGE: u8 = 3;
const ENTRY_FLOOR: u8 = 4;
const ENTRY_MEMBERSHIP: u8 = 5;
/// Largest payload of one log entry (a page image or a maximal record).
pub const MAX_ENTRY_BYTES: usize = borealis_redo::record::MAX_RECORD_BYTES + 64;

#[derive(Clone, Debug)]
struct Stored {
    epoch: Epoch,
    prev: Lsn,
    page: PageNo,
    bytes: Vec<u8>,
}

/// What inserting a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// New (or a newer-epoch version): must be appended to the log.
    New(Lsn),
    /// Already held (or already folded into page images): nothing to write.
    Duplicate(Lsn),
}

impl Inserted {
    pub fn lsn(self) -> Lsn {
        match self {
            Inserted::New(lsn) | Inserted::Duplicate(lsn) => lsn,
        }
    }
}

/// Why a segment could not serve a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    NotComplete { scl: Lsn },
    BelowGcFloor { floor: Lsn },
    Corrupt(String),
}

pub struct Segment {
    pub pg: PgId,
    records: BTreeMap<Lsn, Stored>,
    /// prev_lsn -> lsn of the records above the chain's end (`scl_record`): walks
    /// the backlink chain forward when a hole is filled.
    next_in_chain: IdHashMap<Lsn, Lsn>,
    by_page: BTreeSet<(PageNo, Lsn)>,
    chain_anchor: Lsn,
    scl_record: Lsn,
    scl: Lsn,
    /// A completeness claim (pg_last, complete_to) waiting for the chain to reach
    /// pg_last.
    claim: Option<(Lsn, Lsn)>,
    /// Page images at the GC floor held in memory. With `images_at` (below) they
    /// make the page store: see "Bounded memory" in the module docs.
    base: IdHashMap<PageNo, Page>,
    /// Offset in the current log file of the PAGE_IMAGE entry that holds a page's
    /// image at the GC floor. A page in both maps is clean (the two copies are
    /// equal) and may be evicted from `base`; a page only in `base` is dirty
    /// (records were folded into it since the file was written); a page only here
    /// is evicted and read back from the file when needed.
    images_at: IdHashMap<PageNo, u64>,
    gc_floor: Lsn,
    /// The highest VDL the writer has told this segment of. Held in memory for
    /// every batch (folding may go up to it), but logged only with new records:
    /// see `hint_to_log`.
    vdl_hint: Lsn,
    /// The highest VDL hint in the log file (an older one is a valid lower bound
    /// after a restart).
    vdl_hint_logged: Lsn,
    /// Bytes in the log file (for compaction decisions and metrics).
    pub log_bytes: u64,
    /// Materialized page images at recent read points, so a read applies only the
    /// records since the last one rather than the page's history since the floor.
    cache: std::cell::RefCell<ImageCache>,
    live_bytes: u64,
    pub corrupt_records: u64,
    membership_epoch: u64,
    /// Pages in `base` without a copy in the file (see `images_at`).
    dirty_images: usize,
}

/// Reads an evicted page image back from the segment's log file: (page, offset of
/// its PAGE_IMAGE entry) -> image. The node passes its file access in; the segment
/// itself does no I/O.
pub type LoadImage<'a> = &'a mut dyn FnMut(PageNo, u64) -> Result<Page, String>;

/// A [`LoadImage`] for a segment that never evicted anything (tests, the
/// simulation's checks): every image is in memory, so a load is an error.
pub fn resident_only(page: PageNo, offset: u64) -> Result<Page, String> {
    Err(format!(
        "page {page}'s image (log offset {offset}) is not in memory"
    ))
}

/// A compacted log and where in it each page image landed.
pub struct CompactedLog {
    pub bytes: Vec<u8>,
    pub images: Vec<(PageNo, u64)>,
}

/// What a segment holds in memory, for metrics and eviction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentMemory {
    /// Page images at the GC floor held in memory.
    pub resident_images: usize,
    /// Of those, images not yet written to the log file (evictable only after the
    /// next compaction or checkpoint).
    pub dirty_images: usize,
    /// Page images only in the log file.
    pub evicted_images: usize,
    /// Materialized images at later read points (the node's share of its budget,
    /// at most [`IMAGE_CACHE_PAGES`]).
    pub cached_images: usize,
    /// Bytes of records not yet folded.
    pub record_bytes: u64,
}

/// Decodes the PAGE_IMAGE entry of `page` at the start of `buf` (a read at the
/// offset `images_at` names), checking its CRC and that it is that page's image.
pub fn decode_image_entry(buf: &[u8], page: PageNo) -> Result<Page, String> {
    let header = buf.get(0..8).ok_or("short page image entry")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let body = buf
        .get(8..8 + len)
        .ok_or_else(|| format!("page image entry of page {page} is cut short"))?;
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if crc32c::crc32c(body) != stored {
        return Err(format!("page image entry of page {page} fails its CRC"));
    }
    if body.first() != Some(&ENTRY_PAGE_IMAGE) || u64_at(body, 1) != Some(page) {
        return Err(format!("no page image of page {page} at that offset"));
    }
    body.get(9..)
        .and_then(Page::from_bytes)
        .ok_or_else(|| format!("page image of page {page} has a bad size"))
}

/// Bytes of one PAGE_IMAGE entry in a log file.
pub const IMAGE_ENTRY_BYTES: usize = 8 + 1 + 8 + PAGE_SIZE;

/// Page images per segment kept by the materialization cache.
pub const IMAGE_CACHE_PAGES: usize = 1024;

/// A bounded cache of materialized page images: page -> (LSN it is "as of", image).
/// An image as of L stays valid while L <= SCL: no record at or below the SCL can
/// arrive later, except through a truncation, which calls `forget_above`.
struct ImageCache {
    images: IdHashMap<PageNo, (Lsn, Page)>,
    /// Insertion order for eviction (entries may be stale; checked on eviction).
    order: std::collections::VecDeque<PageNo>,
    /// Most images held (the node sets it from its memory budget).
    capacity: usize,
}

impl Default for ImageCache {
    fn default() -> Self {
        ImageCache {
            images: IdHashMap::default(),
            order: std::collections::VecDeque::new(),
            capacity: IMAGE_CACHE_PAGES,
        }
    }
}

impl ImageCache {
    fn get(&self, page: PageNo, floor: Lsn, read_lsn: Lsn) -> Option<(Lsn, Page)> {
        self.images
            .get(&page)
            .filter(|(l, _)| *l >= floor && *l <= read_lsn)
            .map(|(l, p)| (*l, p.clone()))
    }

    fn put(&mut self, page: PageNo, lsn: Lsn, image: &Page) {
        match self.images.get_mut(&page) {
            Some(entry) if entry.0 >= lsn => {}
            Some(entry) => *entry = (lsn, image.clone()),
            None => {
                // Bounded: room for one more, evicting in insertion order.
                self.shrink_to(self.capacity.max(1) - 1);
                self.images.insert(page, (lsn, image.clone()));
                self.order.push_back(page);
            }
        }
        if self.order.len() > 4 * self.capacity.max(1) {
            let images = &self.images;
            self.order.retain(|p| images.contains_key(p));
        }
    }

    fn forget_above(&mut self, lsn: Lsn) {
        self.images.retain(|_, (l, _)| *l <= lsn);
    }

    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.shrink_to(capacity.max(1));
    }

    /// Evicts in insertion order until at most `n` images are held.
    fn shrink_to(&mut self, n: usize) {
        while self.images.len() > n {
            match self.order.pop_front() {
                Some(old) => {
                    self.images.remove(&old);
                }
                None => break,
            }
        }
    }
}

/// Frames a log entry onto the end of `out` (no allocation of its own: the append
/// path frames every record of a batch straight into the batch's buffer).
fn entry_into(out: &mut Vec<u8>, kind: u8, payload: &[&[u8]]) {
    let len: usize = 1 + payload.iter().map(|p| p.len()).sum::<usize>();
    let start = out.len();
    out.reserve(8 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(kind);
    for p in payload {
        out.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes a record's entry adds to the record: length and CRC, type, epoch.
const RECORD_ENTRY_OVERHEAD: usize = 8 + 1 + 8;
/// Bytes of a VDL hint or membership entry: length and CRC, type, a u64.
const SMALL_ENTRY_BYTES: usize = 8 + 1 + 8;

/// An empty buffer with room for the entries of records of these lengths plus a
/// VDL hint and a membership entry, so that framing a batch (megabytes in a bulk
/// load or a gossip catch-up) never grows it.
pub fn entries_buffer(record_lens: impl Iterator<Item = usize>) -> Vec<u8> {
    let records: usize = record_lens.map(|l| l + RECORD_ENTRY_OVERHEAD).sum();
    Vec::with_capacity(records + 2 * SMALL_ENTRY_BYTES)
}

/// Frames a log entry.
fn entry(kind: u8, payload: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    entry_into(&mut out, kind, payload);
    out
}

pub fn record_entry(epoch: Epoch, record: &[u8]) -> Vec<u8> {
    entry(ENTRY_RECORD, &[&epoch.0.to_le_bytes(), record])
}

/// [`record_entry`] appended to `out`.
fn record_entry_into(out: &mut Vec<u8>, epoch: Epoch, record: &[u8]) {
    entry_into(out, ENTRY_RECORD, &[&epoch.0.to_le_bytes(), record]);
}

pub fn vdl_hint_entry(lsn: Lsn) -> Vec<u8> {
    entry(ENTRY_VDL_HINT, &[&lsn.0.to_le_bytes()])
}

pub fn membership_entry(epoch: u64) -> Vec<u8> {
    entry(ENTRY_MEMBERSHIP, &[&epoch.to_le_bytes()])
}

/// What a scrub pass over a stretch of a log file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogScan {
    /// Bytes of whole, CRC-valid entries from the start of the stretch.
    pub valid_len: usize,
    /// The highest record LSN among those entries.
    pub last_record: Lsn,
    /// The first entry that failed its checks before `limit`: (offset, why).
    pub damage: Option<(usize, String)>,
}

/// Checks every entry of `buf`, a stretch of a log file's written part that starts
/// at an entry boundary. `reaches_end`: the stretch ends where the written log ends,
/// so an entry cut off by it is damage (a corrupted length), not the next stretch's.
/// Never panics on arbitrary bytes.
pub fn scan_log(buf: &[u8], reaches_end: bool) -> LogScan {
    let mut at = 0usize;
    let mut last_record = Lsn::ZERO;
    let damage = loop {
        if at >= buf.len() {
            break None;
        }
        let Some(h) = buf.get(at..at + 8) else {
            if reaches_end {
                break Some((at, "short entry header at the end of the log".into()));
            }
            break None; // the header straddles the stretch: next time
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len == 0 || len > MAX_ENTRY_BYTES {
            break Some((at, format!("entry length {len} out of range")));
        }
        let Some(body) = buf.get(at + 8..at + 8 + len) else {
            if reaches_end {
                break Some((at, "entry runs past the written end of the log".into()));
            }
            break None;
        };
        let stored = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if crc32c::crc32c(body) != stored {
            break Some((at, "entry CRC mismatch".into()));
        }
        if body[0] == ENTRY_RECORD {
            if let Some(Ok(rh)) = body.get(9..).map(decode_header) {
                last_record = last_record.max(rh.lsn);
            }
        }
        at += 8 + len;
    };
    LogScan {
        valid_len: at,
        last_record,
        damage,
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Result of replaying a log file.
pub struct Replayed {
    pub segment: Segment,
    /// Length of the valid prefix; the caller cuts the file there.
    pub valid_len: usize,
    /// Why replay stopped before the end of the file, if it did.
    pub torn: Option<String>,
}

impl Segment {
    pub fn new(pg: PgId) -> Segment {
        Segment {
            pg,
            records: BTreeMap::new(),
            next_in_chain: IdHashMap::default(),
            by_page: BTreeSet::new(),
            chain_anchor: Lsn::ZERO,
            scl_record: Lsn::ZERO,
            scl: Lsn::ZERO,
            claim: None,
            base: IdHashMap::default(),
            images_at: IdHashMap::default(),
            gc_floor: Lsn::ZERO,
            vdl_hint: Lsn::ZERO,
            vdl_hint_logged: Lsn::ZERO,
            log_bytes: 0,
            cache: std::cell::RefCell::new(ImageCache::default()),
            live_bytes: 0,
            corrupt_records: 0,
            membership_epoch: 0,
            dirty_images: 0,
        }
    }

    /// Rebuilds a segment from its log bytes, then applies the node's truncation
    /// history. Never panics on arbitrary bytes.
    pub fn replay(pg: PgId, log: &[u8], history: &[Truncation]) -> Replayed {
        let mut seg = Segment::new(pg);
        let mut at = 0usize;
        let mut torn = None;
        while at < log.len() {
            match Self::replay_entry(&mut seg, &log[at..], at as u64) {
                Ok(n) => at += n,
                Err(why) => {
                    // Zeros to the end are the log file's preallocated space: the
                    // clean end of the log, not a torn write.
                    if log[at..].iter().any(|&b| b != 0) {
                        torn = Some(format!("{why} at offset {at} of {}", log.len()));
                    }
                    break;
                }
            }
        }
        seg.log_bytes = at as u64;
        seg.truncate(history, history);
        Replayed {
            segment: seg,
            valid_len: at,
            torn,
        }
    }

    fn replay_entry(seg: &mut Segment, buf: &[u8], offset: u64) -> Result<usize, String> {
        let len = buf
            .get(0..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let len = len.ok_or("short entry header")?;
        if len == 0 || len > MAX_ENTRY_BYTES {
            return Err(format!("entry length {len} out of range"));
        }
        let body = buf.get(8..8 + len).ok_or("short entry")?;
        let stored_crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if crc32c::crc32c(body) != stored_crc {
            return Err("entry CRC mismatch".into());
        }
        let payload = &body[1..];
        match body[0] {
            ENTRY_RECORD => {
                let epoch = Epoch(u64_at(payload, 0).ok_or("short record entry")?);
                seg.insert(epoch, payload[8..].to_vec(), None)
                    .map_err(|e| format!("bad record: {e}"))?;
            }
            ENTRY_VDL_HINT => {
                let lsn = Lsn(u64_at(payload, 0).ok_or("short hint entry")?);
                seg.vdl_hint = seg.vdl_hint.max(lsn);
                seg.vdl_hint_logged = seg.vdl_hint;
            }
            ENTRY_PAGE_IMAGE => {
                let page = u64_at(payload, 0).ok_or("short page entry")?;
                let image = payload
                    .get(8..)
                    .and_then(Page::from_bytes)
                    .ok_or("bad page image size")?;
                seg.base.insert(page, image);
                seg.images_at.insert(page, offset);
            }
            ENTRY_FLOOR => {
                let floor = Lsn(u64_at(payload, 0).ok_or("short floor entry")?);
                let anchor = Lsn(u64_at(payload, 8).ok_or("short floor entry")?);
                let scl = Lsn(u64_at(payload, 16).ok_or("short floor entry")?);
                // A FLOOR in mid-log starts a page image checkpoint: every record at
                // or below it was folded into the images in the file (those that
                // follow, or earlier ones of pages nothing was folded into since).
                let folded: Vec<Lsn> = seg.records.range(..=floor).map(|(l, _)| *l).collect();
                for lsn in folded {
                    seg.remove(lsn);
                }
                seg.gc_floor = seg.gc_floor.max(floor);
                seg.chain_anchor = seg.chain_anchor.max(anchor);
                seg.scl_record = seg.scl_record.max(anchor);
                seg.scl = seg.scl.max(scl).max(anchor);
                seg.advance_chain();
            }
            ENTRY_MEMBERSHIP => {
                let e = u64_at(payload, 0).ok_or("short membership entry")?;
                seg.membership_epoch = seg.membership_epoch.max(e);
            }
            other => return Err(format!("unknown entry type {other}")),
        }
        Ok(8 + len)
    }

    /// Adds a record (CRC-checked) written under `epoch`, taking its bytes as they
    /// are (every record a node receives is held until folded, and a copy per
    /// record was a sizeable share of a node's CPU). With `log`, a new record's
    /// entry is also framed onto the end of it, for the caller to append.
    pub fn insert(
        &mut self,
        epoch: Epoch,
        bytes: Vec<u8>,
        log: Option<&mut Vec<u8>>,
    ) -> Result<Inserted, String> {
        let h = decode_header(&bytes).map_err(|e| e.to_string())?;
        if h.len as usize != bytes.len() {
            return Err(format!("record length {} but {} bytes", h.len, bytes.len()));
        }
        if h.lsn == Lsn::ZERO || h.prev_lsn >= h.lsn {
            return Err(format!("record {} has backlink {}", h.lsn, h.prev_lsn));
        }
        if h.lsn <= self.gc_floor {
            return Ok(Inserted::Duplicate(h.lsn));
        }
        if let Some(old) = self.records.get(&h.lsn) {
            if old.epoch >= epoch {
                return Ok(Inserted::Duplicate(h.lsn));
            }
            self.remove(h.lsn);
        }
        if let Some(log) = log {
            record_entry_into(log, epoch, &bytes);
        }
        self.live_bytes += bytes.len() as u64;
        self.records.insert(
            h.lsn,
            Stored {
                epoch,
                prev: h.prev_lsn,
                page: h.page,
                bytes,
            },
        );
        self.by_page.insert((h.page, h.lsn));
        if h.prev_lsn == self.scl_record {
            // The usual case: records arrive in chain order and this one extends
            // the chain, so it needs no link to be found by later ones.
            self.scl_record = h.lsn;
        } else {
            self.next_in_chain.insert(h.prev_lsn, h.lsn);
        }
        self.advance_chain();
        Ok(Inserted::New(h.lsn))
    }

    fn remove(&mut self, lsn: Lsn) {
        if let Some(old) = self.records.remove(&lsn) {
            self.live_bytes = self.live_bytes.saturating_sub(old.bytes.len() as u64);
            if self.next_in_chain.get(&old.prev) == Some(&lsn) {
                self.next_in_chain.remove(&old.prev);
            }
            self.by_page.remove(&(old.page, lsn));
        }
    }

    fn advance_chain(&mut self) {
        // Bounded by the number of records held. A link followed is dropped:
        // `next_in_chain` only needs the links of records above the chain's end.
        while let Some(&next) = self.next_in_chain.get(&self.scl_record) {
            if !self.records.contains_key(&next) {
                break;
            }
            self.next_in_chain.remove(&self.scl_record);
            self.scl_record = next;
        }
        self.scl = self.scl.max(self.scl_record);
        if let Some((last, to)) = self.claim {
            if last <= self.scl_record
                && (last == self.chain_anchor || self.records.contains_key(&last))
            {
                self.scl = self.scl.max(to);
                self.claim = None;
            }
        }
    }

    /// The writer's statement that the PG's records at or below `complete_to` end
    /// at `pg_last`.
    pub fn note_complete(&mut self, pg_last: Lsn, complete_to: Lsn) {
        // Every append carries a claim for every PG, most of them idle: settle those
        // without a lookup in the record map (the claim adds nothing, or the chain
        // ends exactly at its last record, since `scl_record` is always in the chain).
        if complete_to < pg_last || complete_to <= self.scl {
            return;
        }
        let chain_has_last = pg_last == self.scl_record
            || (pg_last < self.scl_record
                && (pg_last == self.chain_anchor
                    || pg_last <= self.gc_floor
                    || self.records.contains_key(&pg_last)));
        if chain_has_last {
            self.scl = self.scl.max(complete_to);
        } else if self.claim.is_none_or(|(_, to)| to < complete_to) {
            // The claim arrived before the records it covers (reordering, or a hole
            // gossip will fill): keep the strongest one and apply it when the chain
            // gets there.
            self.claim = Some((pg_last, complete_to));
        }
    }

    /// A completeness claim waiting for the chain to reach its `pg_last`:
    /// (pg_last, complete_to). A snapshot install carries it over.
    pub fn pending_claim(&self) -> Option<(Lsn, Lsn)> {
        self.claim
    }

    /// The highest membership epoch any append for this segment carried.
    pub fn membership_epoch(&self) -> u64 {
        self.membership_epoch
    }

    /// Raises the membership epoch; true if it moved (the caller logs it).
    pub fn note_membership(&mut self, epoch: u64) -> bool {
        if epoch > self.membership_epoch {
            self.membership_epoch = epoch;
            true
        } else {
            false
        }
    }

    /// The writer's VDL as of a batch. Every batch brings it, whether or not it
    /// has records for this segment, so that a segment the writer has stopped
    /// writing still folds its last records (before, a quiet segment held them,
    /// unfolded, for good).
    pub fn note_vdl_hint(&mut self, lsn: Lsn) {
        self.vdl_hint = self.vdl_hint.max(lsn);
    }

    /// The VDL hint to log with records being appended, if it is newer than the
    /// one the log has. Only appends with records log it: logging it with every
    /// batch made every group commit fdatasync every segment file.
    pub fn hint_to_log(&mut self) -> Option<Lsn> {
        (self.vdl_hint > self.vdl_hint_logged).then(|| {
            self.vdl_hint_logged = self.vdl_hint;
            self.vdl_hint
        })
    }

    /// Applies newly learned truncations `new` (survival is judged against the whole
    /// `history`) and returns how many records were dropped. The work is bounded by
    /// the records above the lowest new truncation point, about LAL, not by the size
    /// of the segment: an epoch install must not grow with the redo written
    /// (invariant 8).
    pub fn truncate(&mut self, history: &[Truncation], new: &[Truncation]) -> usize {
        // Claims were made by an older writer about LSNs a recovery may reuse.
        self.claim = None;
        let Some(low) = new.iter().map(|t| t.vdl).min() else {
            return 0;
        };
        self.cache.borrow_mut().forget_above(low);
        let above = Lsn(low.0.saturating_add(1));
        let doomed: Vec<Lsn> = self
            .records
            .range(above..)
            .filter(|(lsn, s)| !record_survives(history, s.epoch, **lsn))
            .map(|(lsn, _)| *lsn)
            .collect();
        if doomed.is_empty() && self.scl <= low {
            return 0;
        }
        // Walk the chain back to its last record at or below `low` (untouched by
        // this truncation) before anything above it is removed.
        let mut back = self.scl_record;
        while back > low && back > self.chain_anchor {
            match self.records.get(&back) {
                Some(s) => back = s.prev,
                None => {
                    back = self.chain_anchor;
                    break;
                }
            }
        }
        for lsn in &doomed {
            self.remove(*lsn);
        }
        // Re-link the survivors above `low` (a removed record may have shadowed one
        // with the same backlink), then walk forward again.
        let relink: Vec<(Lsn, Lsn)> = self
            .records
            .range(above..)
            .map(|(l, s)| (s.prev, *l))
            .collect();
        self.next_in_chain.extend(relink);
        self.scl_record = back;
        self.scl = self.scl.min(low).max(back);
        self.advance_chain();
        doomed.len()
    }

    /// The highest record at or below `lsn` this segment holds (or has folded).
    pub fn last_record_at_or_below(&self, lsn: Lsn) -> Lsn {
        match self.records.range(..=lsn).next_back() {
            Some((l, _)) => *l,
            None if self.chain_anchor <= lsn => self.chain_anchor,
            None => Lsn::ZERO,
        }
    }

    /// (LSN, epoch, encoded record) of one page's records held, for diagnostics.
    pub fn page_records(&self, page: PageNo) -> Vec<(Lsn, Epoch, Vec<u8>)> {
        self.by_page
            .range((page, Lsn::ZERO)..=(page, Lsn::MAX))
            .filter_map(|(_, l)| self.records.get(l).map(|s| (*l, s.epoch, s.bytes.clone())))
            .collect()
    }

    /// (LSN, backlink, epoch) of the records held in `from..=to`, for diagnostics.
    pub fn chain_debug(&self, from: Lsn, to: Lsn) -> Vec<(Lsn, Lsn, Epoch)> {
        self.records
            .range(from..=to)
            .map(|(l, s)| (*l, s.prev, s.epoch))
            .collect()
    }

    pub fn scl(&self) -> Lsn {
        self.scl
    }
    pub fn scl_record(&self) -> Lsn {
        self.scl_record
    }
    pub fn gc_floor(&self) -> Lsn {
        self.gc_floor
    }
    pub fn vdl_hint(&self) -> Lsn {
        self.vdl_hint
    }
    pub fn max_lsn(&self) -> Lsn {
        self.records
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.chain_anchor)
    }
    pub fn record_count(&self) -> usize {
        self.records.len()
    }
    /// What this segment holds in memory.
    pub fn memory(&self) -> SegmentMemory {
        SegmentMemory {
            resident_images: self.base.len(),
            dirty_images: self.dirty_images,
            evicted_images: (self.images_at.len() + self.dirty_images)
                .saturating_sub(self.base.len()),
            cached_images: self.cache.borrow().images.len(),
            record_bytes: self.live_bytes,
        }
    }
    /// Where the page's image at the GC floor is in the log file, if it is there
    /// (clean or evicted), for diagnostics and tests.
    pub fn image_offset(&self, page: PageNo) -> Option<u64> {
        self.images_at.get(&page).copied()
    }

    /// Bounds the cache of images materialized at later read points (the node
    /// shares part of its memory budget among its segments).
    pub fn set_image_cache_pages(&mut self, pages: usize) {
        self.cache.borrow_mut().set_capacity(pages);
    }

    /// Page images at the floor, in memory or in the file.
    fn image_count(&self) -> usize {
        self.images_at.len() + self.dirty_images
    }
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes + self.image_count() as u64 * PAGE_SIZE as u64
    }

    /// Drops clean page images from memory (they stay in the log file, see
    /// `images_at`) until at most `keep` are resident. Dirty ones stay: they exist
    /// nowhere else until the next compaction writes them. Returns how many went.
    pub fn evict(&mut self, keep: usize) -> usize {
        let mut excess = self.base.len().saturating_sub(keep);
        if excess == 0 {
            return 0;
        }
        let images_at = &self.images_at;
        let before = self.base.len();
        self.base.retain(|page, _| {
            if excess > 0 && images_at.contains_key(page) {
                excess -= 1;
                false
            } else {
                true
            }
        });
        before - self.base.len()
    }

    /// The page's image at the GC floor: in memory, else read back from the file,
    /// else (never written) zeroed.
    fn floor_image(&self, page: PageNo, load: LoadImage) -> Result<Page, String> {
        if let Some(image) = self.base.get(&page) {
            return Ok(image.clone());
        }
        match self.images_at.get(&page) {
            Some(&offset) => load(page, offset),
            None => Ok(Page::zeroed()),
        }
    }

    /// The page as of `read_lsn`: its image at the GC floor plus its records up to
    /// `read_lsn`, each CRC-checked again on the way (scrubbing what we serve).
    pub fn get_page(
        &self,
        page: PageNo,
        read_lsn: Lsn,
        load: LoadImage,
    ) -> Result<Page, ReadError> {
        if read_lsn < self.gc_floor {
            return Err(ReadError::BelowGcFloor {
                floor: self.gc_floor,
            });
        }
        if read_lsn > self.scl {
            return Err(ReadError::NotComplete { scl: self.scl });
        }
        // Start from the newest materialized image at or below the read point (the
        // cache), else from the page's image at the GC floor.
        let cached = self.cache.borrow().get(page, self.gc_floor, read_lsn);
        let (start, mut image) = match cached {
            Some((lsn, image)) => (lsn, image),
            None => (
                self.gc_floor,
                self.floor_image(page, load).map_err(ReadError::Corrupt)?,
            ),
        };
        let from = (page, Lsn(start.0.saturating_add(1)));
        let to = (page, read_lsn);
        // An empty range (read point at the floor) must not reach BTreeSet::range,
        // which panics on start > end.
        let range = if from <= to {
            Some(self.by_page.range(from..=to))
        } else {
            None
        };
        for (_, lsn) in range.into_iter().flatten() {
            let stored = self
                .records
                .get(lsn)
                .ok_or_else(|| ReadError::Corrupt(format!("index names missing {lsn}")))?;
            let (record, _) = Record::decode(&stored.bytes)
                .map_err(|e| ReadError::Corrupt(format!("{lsn}: {e}")))?;
            apply(&mut image, page, &record).map_err(|e| ReadError::Corrupt(e.to_string()))?;
        }
        if read_lsn > start {
            self.cache.borrow_mut().put(page, read_lsn, &image);
        }
        Ok(image)
    }

    /// Recovery's view: surviving records above `from` (at most `max_bytes`, at least
    /// one), whether more remain, and the highest surviving record at or below `from`.
    pub fn tail(
        &self,
        from: Lsn,
        history: &[Truncation],
        max_bytes: usize,
    ) -> (Lsn, Vec<EpochRecord>, bool) {
        let below = self
            .records
            .range(..=from)
            .rev()
            .find(|(lsn, s)| record_survives(history, s.epoch, **lsn))
            .map(|(lsn, _)| *lsn)
            .unwrap_or(if self.chain_anchor <= from {
                self.chain_anchor
            } else {
                Lsn::ZERO
            });
        let (records, more) = self.collect(from, max_bytes, |lsn, s| {
            record_survives(history, s.epoch, lsn)
        });
        (below, records, more)
    }

    /// Gossip and rebuild: records above `after` in LSN order.
    pub fn read_log(&self, after: Lsn, max_bytes: usize) -> (Vec<EpochRecord>, bool) {
        self.collect(after, max_bytes, |_, _| true)
    }

    fn collect(
        &self,
        after: Lsn,
        max_bytes: usize,
        keep: impl Fn(Lsn, &Stored) -> bool,
    ) -> (Vec<EpochRecord>, bool) {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (lsn, s) in self.records.range(Lsn(after.0.saturating_add(1))..) {
            if !keep(*lsn, s) {
                continue;
            }
            if !out.is_empty() && bytes + s.bytes.len() > max_bytes {
                return (out, true);
            }
            bytes += s.bytes.len() + 12;
            out.push(EpochRecord {
                epoch: s.epoch,
                bytes: s.bytes.clone(),
            });
        }
        (out, false)
    }

    /// Folds records at or below `min(pgmrpl, scl_record, vdl_hint)` into page
    /// images (via `redo::apply`) and drops them. Returns the new floor.
    /// Images evicted from memory are read back (through `load`) to fold into, and
    /// are dirty from then on.
    pub fn coalesce(&mut self, pgmrpl: Lsn, max_records: usize, load: LoadImage) -> Lsn {
        let target = pgmrpl.min(self.scl_record).min(self.vdl_hint);
        let mut folded = 0usize;
        while folded < max_records {
            let Some((&lsn, _)) = self.records.first_key_value() else {
                break;
            };
            if lsn > target {
                break;
            }
            let Some(stored) = self.records.get(&lsn) else {
                break;
            };
            let page = stored.page;
            let resident = self.base.contains_key(&page);
            let in_file = self.images_at.get(&page).copied();
            let result = Record::decode(&stored.bytes)
                .map_err(|e| e.to_string())
                .and_then(|(record, _)| {
                    let image = match self.base.entry(page) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(match in_file {
                            Some(offset) => load(page, offset)?,
                            None => Page::zeroed(),
                        }),
                    };
                    apply(image, page, &record).map_err(|e| e.to_string())
                });
            match &result {
                // Clean, evicted or new until now: from here on only memory has it.
                Ok(()) if !resident || in_file.is_some() => {
                    if in_file.is_some() {
                        self.images_at.remove(&page);
                    }
                    self.dirty_images += 1;
                }
                // Nothing was folded into a page without an image: none, as before.
                Err(_) if !resident && in_file.is_none() => {
                    self.base.remove(&page);
                }
                _ => {}
            }
            if let Err(e) = result {
                // A record that cannot be applied stays in the log (and GetPage
                // reports it); stop folding so nothing after it is lost either.
                log::error!(
                    "{}: cannot fold record {lsn} into page {page}: {e}",
                    self.pg
                );
                self.corrupt_records += 1;
                break;
            }
            self.remove(lsn);
            self.chain_anchor = lsn;
            self.gc_floor = lsn;
            folded += 1;
        }
        if self
            .records
            .first_key_value()
            .is_none_or(|(l, _)| *l > target)
            && target > self.gc_floor
        {
            // No records between the last folded one and the target: the floor can
            // move to the target itself.
            self.gc_floor = target;
        }
        self.gc_floor
    }

    /// A compacted log: FLOOR, page images, VDL hint, live records. Evicted images
    /// are read back through `load`; the result says where each image landed, for
    /// [`Segment::compacted`] once the file is in place.
    pub fn compacted_log(&self, load: LoadImage) -> Result<CompactedLog, String> {
        let mut pages: Vec<PageNo> = self.base.keys().copied().collect();
        pages.extend(self.images_at.keys().filter(|p| !self.base.contains_key(p)));
        let CompactedLog {
            bytes: mut out,
            images,
        } = self.floor_and_images(pages, load)?;
        out.extend_from_slice(&vdl_hint_entry(self.vdl_hint));
        if self.membership_epoch > 0 {
            out.extend_from_slice(&membership_entry(self.membership_epoch));
        }
        for s in self.records.values() {
            record_entry_into(&mut out, s.epoch, &s.bytes);
        }
        Ok(CompactedLog { bytes: out, images })
    }

    /// A page image checkpoint, to append to the log: a FLOOR entry and the dirty
    /// images (as of the GC floor, which every folded record is at or below). With
    /// it in the file they are clean, and evictable, without rewriting the log.
    pub fn checkpoint(&self) -> Result<CompactedLog, String> {
        let dirty: Vec<PageNo> = self
            .base
            .keys()
            .filter(|p| !self.images_at.contains_key(p))
            .copied()
            .collect();
        // Dirty images are all in memory: nothing to read back.
        self.floor_and_images(dirty, &mut resident_only)
    }

    /// A FLOOR entry (the GC floor, chain anchor and SCL) followed by the images at
    /// the floor of `pages` in page order: the head of a compacted log, and a
    /// checkpoint. Says where each image landed.
    fn floor_and_images(
        &self,
        mut pages: Vec<PageNo>,
        load: LoadImage,
    ) -> Result<CompactedLog, String> {
        let mut out = entry(
            ENTRY_FLOOR,
            &[
                &self.gc_floor.0.to_le_bytes(),
                &self.chain_anchor.0.to_le_bytes(),
                &self.scl.min(self.vdl_hint).0.to_le_bytes(),
            ],
        );
        pages.sort_unstable();
        let mut images = Vec::with_capacity(pages.len());
        for page in pages {
            let image = self.floor_image(page, load)?;
            images.push((page, out.len() as u64));
            entry_into(
                &mut out,
                ENTRY_PAGE_IMAGE,
                &[&page.to_le_bytes(), image.as_bytes()],
            );
        }
        Ok(CompactedLog { bytes: out, images })
    }

    /// A [`Segment::checkpoint`] is durable in the log from `offset` on.
    pub fn checkpointed(&mut self, offset: u64, ck: &CompactedLog) {
        for (page, at) in &ck.images {
            if self.images_at.insert(*page, offset + at).is_none() {
                self.dirty_images = self.dirty_images.saturating_sub(1);
            }
        }
        self.log_bytes += ck.bytes.len() as u64;
    }

    /// The log file now holds `log` (written durably): every image is clean, at
    /// the offset the compaction gave it.
    pub fn compacted(&mut self, log: &CompactedLog) {
        self.images_at = log.images.iter().copied().collect();
        self.dirty_images = 0;
        self.log_bytes = log.bytes.len() as u64;
    }
}
