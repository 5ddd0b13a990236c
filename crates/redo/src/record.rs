//! Redo record format, on the wire and on disk.
//!
//! ```text
//!  0      4      8      16         24      32     33   34
//!  | len  | crc  | lsn  | prev_lsn | page  | flags| tag | op payload ...
//! ```
//!
//! `len` counts the whole record; `crc` is CRC32C over bytes `8..len`. All integers
//! are little-endian. `prev_lsn` is the backlink: the LSN of the previous record of
//! the same protection group (0 for the first), which is how a segment detects holes.
//! `flags & CPL_FLAG` marks the last record of a mini-transaction (a consistency point).

use borealis_common::{Lsn, PageNo};

/// Fixed header: len, crc, lsn, prev_lsn, page, flags. The op (tag + payload) follows.
pub const HEADER_BYTES: usize = 33;
/// Upper bound on one encoded record; anything larger is malformed.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
pub const CPL_FLAG: u8 = 1;

/// What a record does to its page. See [`crate::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Formats the page as an empty page of `kind`.
    Init {
        kind: u16,
    },
    /// Inserts an item at slot index `slot`, shifting later slots right.
    InsertItem {
        slot: u16,
        data: Vec<u8>,
    },
    DeleteItem {
        slot: u16,
    },
    ReplaceItem {
        slot: u16,
        data: Vec<u8>,
    },
    /// Keeps the first `keep` items (the left half of a split).
    TruncateItems {
        keep: u16,
    },
    SetLinks {
        next: u64,
        aux: u64,
    },
    /// Formats the page and fills it with `items` in order (the right half of a split).
    InitWithItems {
        kind: u16,
        next: u64,
        aux: u64,
        items: Vec<Vec<u8>>,
    },
    /// Writes bytes into the 32-byte special area of the header.
    WriteSpecial {
        offset: u8,
        data: Vec<u8>,
    },
    /// Writes the record's own LSN (8 bytes, LE) into the special area: a commit
    /// record does not know its LSN until the volume assigns it.
    StampLsn {
        offset: u8,
    },
    /// Writes bytes into a raw page's body.
    WriteBody {
        offset: u16,
        data: Vec<u8>,
    },
    /// Writes the record's own LSN into a raw page's body.
    StampLsnBody {
        offset: u16,
    },
    /// Changes nothing but the page LSN.
    Noop,
    /// Cuts items to a prefix and rewrites one u16 inside each: how the engine
    /// drops the dead tail of row version chains across a leaf (page pruning, like
    /// PostgreSQL's `heap_page_prune`) in 8 bytes of redo per row instead of the
    /// rows themselves. Generic on purpose: the chain format stays the engine's.
    ShrinkItems {
        items: Vec<ItemShrink>,
    },
}

/// One item of [`Op::ShrinkItems`]: keep its first `len` bytes, then write `patch`
/// (little-endian) at byte `patch_at` of what was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemShrink {
    pub slot: u16,
    pub len: u16,
    pub patch_at: u16,
    pub patch: u16,
}

mod tag {
    pub const INIT: u8 = 1;
    pub const INSERT_ITEM: u8 = 2;
    pub const DELETE_ITEM: u8 = 3;
    pub const REPLACE_ITEM: u8 = 4;
    pub const TRUNCATE_ITEMS: u8 = 5;
    pub const SET_LINKS: u8 = 6;
    pub const INIT_WITH_ITEMS: u8 = 7;
    pub const WRITE_SPECIAL: u8 = 8;
    pub const STAMP_LSN: u8 = 9;
    pub const WRITE_BODY: u8 = 10;
    pub const STAMP_LSN_BODY: u8 = 11;
    pub const NOOP: u8 = 12;
    pub const SHRINK_ITEMS: u8 = 13;
}

/// A redo record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    /// Backlink: previous record of the same PG, or `Lsn(0)`.
    pub prev_lsn: Lsn,
    pub page: PageNo,
    pub flags: u8,
    pub op: Op,
}

/// The fixed part of a record, readable without decoding the op (storage nodes
/// index and route records by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub len: u32,
    pub lsn: Lsn,
    pub prev_lsn: Lsn,
    pub page: PageNo,
    pub flags: u8,
}

impl RecordHeader {
    pub fn is_cpl(&self) -> bool {
        self.flags & CPL_FLAG != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("record length {0} out of range")]
    BadLength(u32),
    #[error("record CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("malformed op: {0}")]
    BadOp(String),
}

impl Record {
    pub fn is_cpl(&self) -> bool {
        self.flags & CPL_FLAG != 0
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]); // len + crc, filled below
        out.extend_from_slice(&self.lsn.0.to_le_bytes());
        out.extend_from_slice(&self.prev_lsn.0.to_le_bytes());
        out.extend_from_slice(&self.page.to_le_bytes());
        out.push(self.flags);
        encode_op(&self.op, out);
        let len = (out.len() - start) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&out[start + 8..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 16);
        self.encode_into(&mut out);
        out
    }

    /// Decodes one record from the front of `buf`, returning it and its length.
    /// Checks length bounds and the CRC; never panics on arbitrary bytes.
    pub fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        let header = decode_header(buf)?;
        let len = header.len as usize;
        let mut r = Reader {
            buf: &buf[HEADER_BYTES..len],
            at: 0,
        };
        let op = decode_op(&mut r)?;
        if r.at != r.buf.len() {
            return Err(DecodeError::BadOp(format!(
                "{} trailing bytes",
                r.buf.len() - r.at
            )));
        }
        Ok((
            Record {
                lsn: header.lsn,
                prev_lsn: header.prev_lsn,
                page: header.page,
                flags: header.flags,
                op,
            },
            len,
        ))
    }

    /// Encoded size of this record in bytes.
    pub fn encoded_len(&self) -> usize {
        // Cheap enough for sizing decisions; not on the append path.
        self.encode().len()
    }
}

/// Reads and CRC-checks the header of the record at the front of `buf` (the CRC
/// covers the whole record, so a valid header means a valid record body too).
pub fn decode_header(buf: &[u8]) -> Result<RecordHeader, DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Err(DecodeError::Truncated {
            need: HEADER_BYTES,
            have: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (len as usize) <= HEADER_BYTES || len as usize > MAX_RECORD_BYTES {
        return Err(DecodeError::BadLength(len));
    }
    if buf.len() < len as usize {
        return Err(DecodeError::Truncated {
            need: len as usize,
            have: buf.len(),
        });
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let computed = crc32c::crc32c(&buf[8..len as usize]);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(a)
    };
    Ok(RecordHeader {
        len,
        lsn: Lsn(u64_at(8)),
        prev_lsn: Lsn(u64_at(16)),
        page: u64_at(24),
        flags: buf[32],
    })
}

fn put_bytes(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

fn encode_op(op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Init { kind } => {
            out.push(tag::INIT);
            out.extend_from_slice(&kind.to_le_bytes());
        }
        Op::InsertItem { slot, data } => {
            out.push(tag::INSERT_ITEM);
            out.extend_from_slice(&slot.to_le_bytes());
            put_bytes(out, data);
        }
        Op::DeleteItem { slot } => {
            out.push(tag::DELETE_ITEM);
            out.extend_from_slice(&slot.to_le_bytes());
        }
        Op::ReplaceItem { slot, data } => {
            out.push(tag::REPLACE_ITEM);
            out.extend_from_slice(&slot.to_le_bytes());
            put_bytes(out, data);
        }
        Op::TruncateItems { keep } => {
            out.push(tag::TRUNCATE_ITEMS);
            out.extend_from_slice(&keep.to_le_bytes());
        }
        Op::SetLinks { next, aux } => {
            out.push(tag::SET_LINKS);
            out.extend_from_slice(&next.to_le_bytes());
            out.extend_from_slice(&aux.to_le_bytes());
        }
        Op::InitWithItems {
            kind,
            next,
            aux,
            items,
        } => {
            out.push(tag::INIT_WITH_ITEMS);
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&next.to_le_bytes());
            out.extend_from_slice(&aux.to_le_bytes());
            out.extend_from_slice(&(items.len() as u16).to_le_bytes());
            for item in items {
                put_bytes(out, item);
            }
        }
        Op::WriteSpecial { offset, data } => {
            out.push(tag::WRITE_SPECIAL);
            out.push(*offset);
            put_bytes(out, data);
        }
        Op::StampLsn { offset } => {
            out.push(tag::STAMP_LSN);
            out.push(*offset);
        }
        Op::WriteBody { offset, data } => {
            out.push(tag::WRITE_BODY);
            out.extend_from_slice(&offset.to_le_bytes());
            put_bytes(out, data);
        }
        Op::StampLsnBody { offset } => {
            out.push(tag::STAMP_LSN_BODY);
            out.extend_from_slice(&offset.to_le_bytes());
        }
        Op::Noop => out.push(tag::NOOP),
        Op::ShrinkItems { items } => {
            out.push(tag::SHRINK_ITEMS);
            out.extend_from_slice(&(items.len() as u16).to_le_bytes());
            for i in items {
                for v in [i.slot, i.len, i.patch_at, i.patch] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end =
            end.ok_or_else(|| DecodeError::BadOp(format!("needs {n} bytes at {}", self.at)))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        Ok(self.take(n)?.to_vec())
    }
}

fn decode_op(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
    Ok(match r.u8()? {
        tag::INIT => Op::Init { kind: r.u16()? },
        tag::INSERT_ITEM => Op::InsertItem {
            slot: r.u16()?,
            data: r.bytes()?,
        },
        tag::DELETE_ITEM => Op::DeleteItem { slot: r.u16()? },
        tag::REPLACE_ITEM => Op::ReplaceItem {
            slot: r.u16()?,
            data: r.bytes()?,
        },
        tag::TRUNCATE_ITEMS => Op::TruncateItems { keep: r.u16()? },
        tag::SET_LINKS => Op::SetLinks {
            next: r.u64()?,
            aux: r.u64()?,
        },
        tag::INIT_WITH_ITEMS => {
            let (kind, next, aux) = (r.u16()?, r.u64()?, r.u64()?);
            let n = r.u16()? as usize;
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                items.push(r.bytes()?);
            }
            Op::InitWithItems {
                kind,
                next,
                aux,
                items,
            }
        }
        tag::WRITE_SPECIAL => Op::WriteSpecial {
            offset: r.u8()?,
            data: r.bytes()?,
        },
        tag::STAMP_LSN => Op::StampLsn { offset: r.u8()? },
        tag::WRITE_BODY => Op::WriteBody {
            offset: r.u16()?,
            data: r.bytes()?,
        },
        tag::STAMP_LSN_BODY => Op::StampLsnBody { offset: r.u16()? },
        tag::NOOP => Op::Noop,
        tag::SHRINK_ITEMS => {
            let n = r.u16()? as usize;
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                items.push(ItemShrink {
                    slot: r.u16()?,
                    len: r.u16()?,
                    patch_at: r.u16()?,
                    patch: r.u16()?,
                });
            }
            Op::ShrinkItems { items }
        }
        other => return Err(DecodeError::BadOp(format!("unknown op tag {other}"))),
    })
}
