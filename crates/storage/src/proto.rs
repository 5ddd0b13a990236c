//! Wire protocol between the volume client (writer/reader instances) and storage
//! nodes, and between storage nodes (gossip, rebuild).
//!
//! ```text
//!   frame := len:u32 | request_id:u64 | kind:u8 | body      (len counts id+kind+body)
//! ```
//!
//! Every frame is bounded by [`MAX_FRAME_BYTES`] (configurable per node, never above
//! it); a frame whose length is out of bounds or whose body does not decode exactly is
//! malformed: the receiver logs it and closes that connection (invariant 10). All
//! integers are little-endian. Redo records travel in their own CRC32C-protected
//! encoding ([`borealis_redo::Record::encode`]) and are CRC-checked by the receiver
//! before they touch a log. Responses echo the request id so the client can pipeline.
//!
//! This module is pure data + codec (no I/O) so the deterministic simulation and the
//! tokio drivers exchange exactly the same messages.

use borealis_common::{Epoch, Lsn, PageNo, PgId};
use bytes::Bytes;

/// Hard upper bound on one frame (a GetPage reply is ~8 KiB; append batches and log
/// chunks are cut well below this by their senders).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Bound on list lengths inside one message (records per batch, PGs per node, ...).
pub const MAX_LIST: usize = 1 << 20;
/// Bound on the epoch history a node keeps and sends (one entry per recovery).
pub const MAX_HISTORY: usize = 4096;

/// One recovery's truncation: the writer of `epoch` kept exactly the records at or
/// below `vdl` of every earlier epoch. A record written under epoch `e` is valid iff
/// for every entry with `entry.epoch > e`, `record.lsn <= entry.vdl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub epoch: Epoch,
    pub vdl: Lsn,
}

/// Whether a record with `lsn`, written under `epoch`, survives `history`.
pub fn record_survives(history: &[Truncation], epoch: Epoch, lsn: Lsn) -> bool {
    history.iter().all(|t| t.epoch <= epoch || lsn <= t.vdl)
}

/// The records of one PG inside an append batch, plus what the writer knows about
/// completeness: every record of the PG at or below `complete_to` (a volume LSN) is
/// `pg_last` or earlier in the backlink chain. A segment whose chain reaches `pg_last`
/// may therefore raise its SCL to `complete_to` (it serves reads up to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBatch {
    pub pg: PgId,
    /// The PG's membership epoch as the writer knows it (bumped by the control plane
    /// at each step of a segment replacement). A segment that has seen a newer one
    /// refuses the whole append with [`ErrorCode::StaleMembership`]: a writer still
    /// counting acks against an old segment set must not get writes accepted.
    pub membership_epoch: u64,
    pub complete_to: Lsn,
    pub pg_last: Lsn,
    /// Encoded redo records (each CRC-protected), in LSN order. Shared buffers: the
    /// writer sends one record to up to six segments, and a copy per segment (an
    /// allocation, a copy and a free each) cost it more than the wire encoding did.
    /// A decoded record owns its buffer alone, so the node takes it as a `Vec`
    /// without another copy.
    pub records: Vec<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Append {
    pub epoch: Epoch,
    /// The writer's VDL when the batch was built: persisted by the segment so that
    /// recovery only scans the tail above it (invariant 8).
    pub vdl_hint: Lsn,
    /// PGMRPL: lowest read point any instance still needs; segments GC below it.
    pub pgmrpl: Lsn,
    pub pgs: Vec<PgBatch>,
}

/// A stored record with the epoch it was written under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    pub epoch: Epoch,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Append(Append),
    /// Fence everything older than `epoch` and truncate per `history`.
    InstallEpoch {
        epoch: Epoch,
        history: Vec<Truncation>,
    },
    /// Node-level summary: epoch, history, per-segment SCL and VDL hint.
    Hello,
    /// Recovery: records of `pg` above `from` that survive `history` (at most
    /// `max_bytes`), and the highest surviving record at or below `from`.
    Tail {
        pg: PgId,
        from: Lsn,
        history: Vec<Truncation>,
        max_bytes: u32,
    },
    GetPage {
        pg: PgId,
        page: PageNo,
        read_lsn: Lsn,
    },
    /// Gossip / rebuild: records of `pg` with LSN > `after`, in LSN order.
    /// The other storage nodes (storage protocol addresses) to gossip with; sent
    /// by the writer, which knows the topology. Replaces the previous list.
    SetPeers {
        peers: Vec<String>,
    },
    ReadLog {
        pg: PgId,
        after: Lsn,
        max_bytes: u32,
    },
    /// Rebuild: a consistent snapshot of the sender's segment of `pg` in the segment
    /// log format (FLOOR, page images, live records; see `segment.rs`), read in
    /// chunks. `offset == 0` takes a fresh snapshot; later offsets read the same one
    /// (one kept per PG, replaced by the next offset-0 request). Needed because a
    /// peer that garbage-collected its log can no longer hand out the records below
    /// its GC floor, only the page images they were folded into.
    Snapshot {
        pg: PgId,
        offset: u64,
        max_bytes: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgAck {
    pub pg: PgId,
    /// LSNs of the batch that are now durable on this segment.
    pub lsns: Vec<Lsn>,
    /// The segment's SCL (volume LSN up to which it holds every record of its PG).
    pub scl: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub pg: PgId,
    pub scl: Lsn,
    pub vdl_hint: Lsn,
    pub gc_floor: Lsn,
    pub max_lsn: Lsn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The request carried an older epoch than the node's (`detail` = node epoch).
    Fenced = 1,
    /// The request carried a newer epoch the node has not installed yet.
    NeedEpoch = 2,
    /// The segment is not complete up to the read point (`detail` = its SCL).
    NotComplete = 3,
    /// The read point is below the GC floor (`detail` = floor).
    BelowGcFloor = 4,
    /// Disk full or I/O error: the node stopped acknowledging.
    Unhealthy = 5,
    Corrupt = 6,
    BadRequest = 7,
    /// The node does not host a segment of that PG.
    NoSegment = 8,
    /// The append carried an older membership epoch for a PG than the segment has
    /// seen (`detail` = the segment's): the writer must refresh its placement.
    StaleMembership = 9,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::Fenced,
            2 => ErrorCode::NeedEpoch,
            3 => ErrorCode::NotComplete,
            4 => ErrorCode::BelowGcFloor,
            5 => ErrorCode::Unhealthy,
            6 => ErrorCode::Corrupt,
            7 => ErrorCode::BadRequest,
            8 => ErrorCode::NoSegment,
            9 => ErrorCode::StaleMembership,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Appended {
        epoch: Epoch,
        pgs: Vec<PgAck>,
    },
    EpochInstalled {
        epoch: Epoch,
    },
    Hello {
        name: String,
        epoch: Epoch,
        history: Vec<Truncation>,
        segments: Vec<SegmentInfo>,
    },
    Tail {
        pg: PgId,
        epoch: Epoch,
        last_at_or_below: Lsn,
        records: Vec<EpochRecord>,
        more: bool,
    },
    Page {
        bytes: Vec<u8>,
    },
    /// `scl_last` is the highest record at or below `scl` on the sender, and `epoch`
    /// the sender's: a peer at the same epoch whose chain reaches `scl_last` is
    /// complete to `scl` too.
    LogChunk {
        pg: PgId,
        epoch: Epoch,
        scl: Lsn,
        scl_last: Lsn,
        records: Vec<EpochRecord>,
        more: bool,
    },
    Error {
        code: ErrorCode,
        detail: u64,
        message: String,
    },
    /// Acknowledges a request that returns nothing (SetPeers).
    Done,
    /// A chunk of a segment snapshot: `bytes` at `offset` of `total`; `id` names the
    /// snapshot so a reader notices when it was replaced between chunks.
    SnapshotChunk {
        pg: PgId,
        id: u64,
        total: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
}

impl Response {
    pub fn error(code: ErrorCode, detail: u64, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            detail,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame length {0} out of bounds")]
    FrameLength(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

// ---- encoding -------------------------------------------------------------------

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn history(&mut self, h: &[Truncation]) {
        self.u32(h.len() as u32);
        for t in h {
            self.u64(t.epoch.0);
            self.u64(t.vdl.0);
        }
    }
    fn epoch_records(&mut self, rs: &[EpochRecord]) {
        self.u32(rs.len() as u32);
        for r in rs {
            self.u64(r.epoch.0);
            self.bytes(&r.bytes);
        }
    }
}

struct R<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            ProtoError::Malformed(format!("needs {n} bytes at offset {}", self.at))
        })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST || n > self.buf.len() - self.at {
            return Err(ProtoError::Malformed(format!(
                "list/bytes length {n} out of bounds"
            )));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }
    /// A byte string bounded only by the frame (snapshot chunks are up to a few MiB,
    /// more than `MAX_LIST`; the frame itself is bounded by `MAX_FRAME_BYTES`).
    fn chunk(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        if n > self.buf.len() - self.at {
            return Err(ProtoError::Malformed(format!(
                "chunk length {n} out of bounds"
            )));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        String::from_utf8(self.bytes()?).map_err(|_| ProtoError::Malformed("invalid utf-8".into()))
    }
    fn history(&mut self) -> Result<Vec<Truncation>, ProtoError> {
        let n = self.len()?;
        if n > MAX_HISTORY {
            return Err(ProtoError::Malformed(format!("history of {n} entries")));
        }
        let mut h = Vec::with_capacity(n);
        for _ in 0..n {
            h.push(Truncation {
                epoch: Epoch(self.u64()?),
                vdl: Lsn(self.u64()?),
            });
        }
        Ok(h)
    }
    fn epoch_records(&mut self) -> Result<Vec<EpochRecord>, ProtoError> {
        let n = self.len()?;
        let mut v = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let epoch = Epoch(self.u64()?);
            v.push(EpochRecord {
                epoch,
                bytes: self.bytes()?,
            });
        }
        Ok(v)
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.at != self.buf.len() {
            return Err(ProtoError::Malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.at
            )));
        }
        Ok(())
    }
}

mod kind {
    pub const APPEND: u8 = 1;
    pub const INSTALL_EPOCH: u8 = 2;
    pub const HELLO: u8 = 3;
    pub const TAIL: u8 = 4;
    pub const GET_PAGE: u8 = 5;
    pub const READ_LOG: u8 = 6;
    pub const SET_PEERS: u8 = 7;
    pub const SNAPSHOT: u8 = 8;
    pub const R_SNAPSHOT_CHUNK: u8 = 109;
    pub const R_DONE: u8 = 108;
    pub const R_APPENDED: u8 = 101;
    pub const R_EPOCH_INSTALLED: u8 = 102;
    pub const R_HELLO: u8 = 103;
    pub const R_TAIL: u8 = 104;
    pub const R_PAGE: u8 = 105;
    pub const R_LOG_CHUNK: u8 = 106;
    pub const R_ERROR: u8 = 107;
}

fn start_frame(id: u64, kind: u8) -> W {
    let mut w = W(Vec::with_capacity(64));
    w.u32(0); // length, patched by finish_frame
    w.u64(id);
    w.u8(kind);
    w
}

fn finish_frame(mut w: W) -> Vec<u8> {
    let len = (w.0.len() - 4) as u32;
    w.0[0..4].copy_from_slice(&len.to_le_bytes());
    w.0
}

/// Encodes a request as a complete frame.
pub fn encode_request(id: u64, req: &Request) -> Vec<u8> {
    let mut w;
    match req {
        Request::Append(a) => {
            w = start_frame(id, kind::APPEND);
            // Sized once: a bulk load's batch is megabytes, and growing the frame by
            // doubling copied it about twice more. Layout as written below: epoch,
            // VDL hint, PGMRPL and a PG count, then per PG its id, membership epoch,
            // complete_to, pg_last and a record count, then length-prefixed records.
            const APPEND_HEAD: usize = 3 * 8 + 4;
            const PG_HEAD: usize = 4 + 3 * 8 + 4;
            let body: usize = a
                .pgs
                .iter()
                .map(|b| PG_HEAD + b.records.iter().map(|r| 4 + r.len()).sum::<usize>())
                .sum();
            w.0.reserve(APPEND_HEAD + body);
            w.u64(a.epoch.0);
            w.u64(a.vdl_hint.0);
            w.u64(a.pgmrpl.0);
            w.u32(a.pgs.len() as u32);
            for b in &a.pgs {
                w.u32(b.pg.0);
                w.u64(b.membership_epoch);
                w.u64(b.complete_to.0);
                w.u64(b.pg_last.0);
                w.u32(b.records.len() as u32);
                for r in &b.records {
                    w.bytes(r);
                }
            }
        }
        Request::InstallEpoch { epoch, history } => {
            w = start_frame(id, kind::INSTALL_EPOCH);
            w.u64(epoch.0);
            w.history(history);
        }
        Request::Hello => w = start_frame(id, kind::HELLO),
        Request::Tail {
            pg,
            from,
            history,
            max_bytes,
        } => {
            w = start_frame(id, kind::TAIL);
            w.u32(pg.0);
            w.u64(from.0);
            w.history(history);
            w.u32(*max_bytes);
        }
        Request::GetPage { pg, page, read_lsn } => {
            w = start_frame(id, kind::GET_PAGE);
            w.u32(pg.0);
            w.u64(*page);
            w.u64(read_lsn.0);
        }
        Request::SetPeers { peers } => {
            w = start_frame(id, kind::SET_PEERS);
            w.u32(peers.len() as u32);
            for p in peers {
                w.bytes(p.as_bytes());
            }
        }
        Request::ReadLog {
            pg,
            after,
            max_bytes,
        } => {
            w = start_frame(id, kind::READ_LOG);
            w.u32(pg.0);
            w.u64(after.0);
            w.u32(*max_bytes);
        }
        Request::Snapshot {
            pg,
            offset,
            max_bytes,
        } => {
            w = start_frame(id, kind::SNAPSHOT);
            w.u32(pg.0);
            w.u64(*offset);
            w.u32(*max_bytes);
        }
    }
    finish_frame(w)
}

/// Encodes a response as a complete frame.
pub fn encode_response(id: u64, resp: &Response) -> Vec<u8> {
    let mut w;
    match resp {
        Response::Appended { epoch, pgs } => {
            w = start_frame(id, kind::R_APPENDED);
            w.u64(epoch.0);
            w.u32(pgs.len() as u32);
            for a in pgs {
                w.u32(a.pg.0);
                w.u64(a.scl.0);
                w.u32(a.lsns.len() as u32);
                for l in &a.lsns {
                    w.u64(l.0);
                }
            }
        }
        Response::EpochInstalled { epoch } => {
            w = start_frame(id, kind::R_EPOCH_INSTALLED);
            w.u64(epoch.0);
        }
        Response::Hello {
            name,
            epoch,
            history,
            segments,
        } => {
            w = start_frame(id, kind::R_HELLO);
            w.bytes(name.as_bytes());
            w.u64(epoch.0);
            w.history(history);
            w.u32(segments.len() as u32);
            for s in segments {
                w.u32(s.pg.0);
                w.u64(s.scl.0);
                w.u64(s.vdl_hint.0);
                w.u64(s.gc_floor.0);
                w.u64(s.max_lsn.0);
            }
        }
        Response::Tail {
            pg,
            epoch,
            last_at_or_below,
            records,
            more,
        } => {
            w = start_frame(id, kind::R_TAIL);
            w.u32(pg.0);
            w.u64(epoch.0);
            w.u64(last_at_or_below.0);
            w.epoch_records(records);
            w.u8(*more as u8);
        }
        Response::Page { bytes } => {
            w = start_frame(id, kind::R_PAGE);
            w.bytes(bytes);
        }
        Response::LogChunk {
            pg,
            epoch,
            scl,
            scl_last,
            records,
            more,
        } => {
            w = start_frame(id, kind::R_LOG_CHUNK);
            w.u32(pg.0);
            w.u64(epoch.0);
            w.u64(scl.0);
            w.u64(scl_last.0);
            w.epoch_records(records);
            w.u8(*more as u8);
        }
        Response::Done => w = start_frame(id, kind::R_DONE),
        Response::SnapshotChunk {
            pg,
            id: snap,
            total,
            offset,
            bytes,
        } => {
            w = start_frame(id, kind::R_SNAPSHOT_CHUNK);
            w.u32(pg.0);
            w.u64(*snap);
            w.u64(*total);
            w.u64(*offset);
            w.bytes(bytes);
        }
        Response::Error {
            code,
            detail,
            message,
        } => {
            w = start_frame(id, kind::R_ERROR);
            w.u8(*code as u8);
            w.u64(*detail);
            w.bytes(message.as_bytes());
        }
    }
    finish_frame(w)
}

/// Reads the frame length prefix; `max` is the receiver's bound.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if !(9..=max.min(MAX_FRAME_BYTES)).contains(&len) {
        return Err(ProtoError::FrameLength(len));
    }
    Ok(len)
}

/// Decodes a frame body (everything after the length prefix) into (id, request).
pub fn decode_request(body: &[u8]) -> Result<(u64, Request), ProtoError> {
    let mut r = R { buf: body, at: 0 };
    let id = r.u64()?;
    let req = match r.u8()? {
        kind::APPEND => {
            let epoch = Epoch(r.u64()?);
            let vdl_hint = Lsn(r.u64()?);
            let pgmrpl = Lsn(r.u64()?);
            let n = r.len()?;
            let mut pgs = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let pg = PgId(r.u32()?);
                let membership_epoch = r.u64()?;
                let complete_to = Lsn(r.u64()?);
                let pg_last = Lsn(r.u64()?);
                let m = r.len()?;
                let mut records = Vec::with_capacity(m.min(4096));
                for _ in 0..m {
                    records.push(Bytes::from(r.bytes()?));
                }
                pgs.push(PgBatch {
                    pg,
                    membership_epoch,
                    complete_to,
                    pg_last,
                    records,
                });
            }
            Request::Append(Append {
                epoch,
                vdl_hint,
                pgmrpl,
                pgs,
            })
        }
        kind::INSTALL_EPOCH => Request::InstallEpoch {
            epoch: Epoch(r.u64()?),
            history: r.history()?,
        },
        kind::HELLO => Request::Hello,
        kind::TAIL => Request::Tail {
            pg: PgId(r.u32()?),
            from: Lsn(r.u64()?),
            history: r.history()?,
            max_bytes: r.u32()?,
        },
        kind::GET_PAGE => Request::GetPage {
            pg: PgId(r.u32()?),
            page: r.u64()?,
            read_lsn: Lsn(r.u64()?),
        },
        kind::READ_LOG => Request::ReadLog {
            pg: PgId(r.u32()?),
            after: Lsn(r.u64()?),
            max_bytes: r.u32()?,
        },
        kind::SNAPSHOT => Request::Snapshot {
            pg: PgId(r.u32()?),
            offset: r.u64()?,
            max_bytes: r.u32()?,
        },
        kind::SET_PEERS => {
            let n = r.len()?;
            if n > 1024 {
                return Err(ProtoError::Malformed(format!("{n} peers")));
            }
            let mut peers = Vec::with_capacity(n);
            for _ in 0..n {
                peers.push(r.string()?);
            }
            Request::SetPeers { peers }
        }
        other => {
            return Err(ProtoError::Malformed(format!(
                "unknown request kind {other}"
            )))
        }
    };
    r.finish()?;
    Ok((id, req))
}

/// Decodes a frame body into (id, response).
pub fn decode_response(body: &[u8]) -> Result<(u64, Response), ProtoError> {
    let mut r = R { buf: body, at: 0 };
    let id = r.u64()?;
    let resp = match r.u8()? {
        kind::R_APPENDED => {
            let epoch = Epoch(r.u64()?);
            let n = r.len()?;
            let mut pgs = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let pg = PgId(r.u32()?);
                let scl = Lsn(r.u64()?);
                let m = r.len()?;
                let mut lsns = Vec::with_capacity(m.min(4096));
                for _ in 0..m {
                    lsns.push(Lsn(r.u64()?));
                }
                pgs.push(PgAck { pg, lsns, scl });
            }
            Response::Appended { epoch, pgs }
        }
        kind::R_EPOCH_INSTALLED => Response::EpochInstalled {
            epoch: Epoch(r.u64()?),
        },
        kind::R_HELLO => {
            let name = r.string()?;
            let epoch = Epoch(r.u64()?);
            let history = r.history()?;
            let n = r.len()?;
            let mut segments = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                segments.push(SegmentInfo {
                    pg: PgId(r.u32()?),
                    scl: Lsn(r.u64()?),
                    vdl_hint: Lsn(r.u64()?),
                    gc_floor: Lsn(r.u64()?),
                    max_lsn: Lsn(r.u64()?),
                });
            }
            Response::Hello {
                name,
                epoch,
                history,
                segments,
            }
        }
        kind::R_TAIL => Response::Tail {
            pg: PgId(r.u32()?),
            epoch: Epoch(r.u64()?),
            last_at_or_below: Lsn(r.u64()?),
            records: r.epoch_records()?,
            more: r.u8()? != 0,
        },
        kind::R_PAGE => Response::Page { bytes: r.bytes()? },
        kind::R_LOG_CHUNK => Response::LogChunk {
            pg: PgId(r.u32()?),
            epoch: Epoch(r.u64()?),
            scl: Lsn(r.u64()?),
            scl_last: Lsn(r.u64()?),
            records: r.epoch_records()?,
            more: r.u8()? != 0,
        },
        kind::R_DONE => Response::Done,
        kind::R_SNAPSHOT_CHUNK => Response::SnapshotChunk {
            pg: PgId(r.u32()?),
            id: r.u64()?,
            total: r.u64()?,
            offset: r.u64()?,
            bytes: r.chunk()?,
        },
        kind::R_ERROR => {
            let code = r.u8()?;
            let code = ErrorCode::from_u8(code)
                .ok_or_else(|| ProtoError::Malformed(format!("error code {code}")))?;
            Response::Error {
                code,
                detail: r.u64()?,
                message: r.string()?,
            }
        }
        other => {
            return Err(ProtoError::Malformed(format!(
                "unknown response kind {other}"
            )))
        }
    };
    r.finish()?;
    Ok((id, resp))
}

/// Splits a complete encoded frame into its body (for tests and the simulation,
/// which pass frames around without a socket).
pub fn frame_body(frame: &[u8]) -> Result<&[u8], ProtoError> {
    let prefix: [u8; 4] = frame
        .get(0..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ProtoError::Malformed("short frame".into()))?;
    let len = frame_len(prefix, MAX_FRAME_BYTES)?;
    frame.get(4..4 + len).ok_or(ProtoError::FrameLength(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let reqs = [
            Request::Append(Append {
                epoch: Epoch(3),
                vdl_hint: Lsn(7),
                pgmrpl: Lsn(2),
                pgs: vec![PgBatch {
                    pg: PgId(1),
                    membership_epoch: 2,
                    complete_to: Lsn(9),
                    pg_last: Lsn(8),
                    records: vec![Bytes::from_static(&[1, 2, 3])],
                }],
            }),
            Request::InstallEpoch {
                epoch: Epoch(4),
                history: vec![Truncation {
                    epoch: Epoch(4),
                    vdl: Lsn(10),
                }],
            },
            Request::Hello,
            Request::Tail {
                pg: PgId(2),
                from: Lsn(5),
                history: vec![],
                max_bytes: 100,
            },
            Request::GetPage {
                pg: PgId(0),
                page: 42,
                read_lsn: Lsn(9),
            },
            Request::ReadLog {
                pg: PgId(0),
                after: Lsn(1),
                max_bytes: 10,
            },
            Request::SetPeers {
                peers: vec!["127.0.0.1:1".into()],
            },
            Request::Snapshot {
                pg: PgId(3),
                offset: 77,
                max_bytes: 5,
            },
        ];
        for (i, req) in reqs.iter().enumerate() {
            let frame = encode_request(i as u64, req);
            let (id, back) = decode_request(frame_body(&frame).unwrap()).unwrap();
            assert_eq!((id, &back), (i as u64, req));
        }
        let resps = [
            Response::Appended {
                epoch: Epoch(1),
                pgs: vec![PgAck {
                    pg: PgId(0),
                    lsns: vec![Lsn(1), Lsn(2)],
                    scl: Lsn(2),
                }],
            },
            Response::EpochInstalled { epoch: Epoch(2) },
            Response::Hello {
                name: "n".into(),
                epoch: Epoch(1),
                history: vec![],
                segments: vec![SegmentInfo {
                    pg: PgId(0),
                    scl: Lsn(1),
                    vdl_hint: Lsn(1),
                    gc_floor: Lsn(0),
                    max_lsn: Lsn(3),
                }],
            },
            Response::Tail {
                pg: PgId(0),
                epoch: Epoch(1),
                last_at_or_below: Lsn(3),
                records: vec![EpochRecord {
                    epoch: Epoch(1),
                    bytes: vec![9],
                }],
                more: true,
            },
            Response::Page { bytes: vec![0; 16] },
            Response::LogChunk {
                pg: PgId(1),
                epoch: Epoch(2),
                scl: Lsn(4),
                scl_last: Lsn(3),
                records: vec![],
                more: false,
            },
            Response::error(ErrorCode::Fenced, 5, "fenced"),
            Response::error(ErrorCode::StaleMembership, 3, "stale membership"),
            Response::Done,
            Response::SnapshotChunk {
                pg: PgId(1),
                id: 9,
                total: 100,
                offset: 10,
                bytes: vec![4, 5],
            },
            Response::SnapshotChunk {
                pg: PgId(1),
                id: 9,
                total: 8 << 20,
                offset: 0,
                bytes: vec![7; 4 << 20],
            },
        ];
        for (i, resp) in resps.iter().enumerate() {
            let frame = encode_response(i as u64, resp);
            let (id, back) = decode_response(frame_body(&frame).unwrap()).unwrap();
            assert_eq!((id, &back), (i as u64, resp));
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let frame = encode_request(
            1,
            &Request::GetPage {
                pg: PgId(0),
                page: 1,
                read_lsn: Lsn(1),
            },
        );
        let body = frame_body(&frame).unwrap();
        for cut in 0..body.len() {
            assert!(decode_request(&body[..cut]).is_err());
        }
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..2000 {
            let mut junk = Vec::new();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                junk.push(x as u8);
            }
            let _ = decode_request(&junk);
            let _ = decode_response(&junk);
        }
        assert!(frame_len([0, 0, 0, 0], MAX_FRAME_BYTES).is_err());
        assert!(frame_len(u32::MAX.to_le_bytes(), MAX_FRAME_BYTES).is_err());
    }
}
