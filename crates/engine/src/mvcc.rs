//! MVCC: row versions, transaction status, visibility.
//!
//! # Versions
//! A table row is one B+tree leaf item keyed by the primary key (or a hidden row
//! id). Its payload is the row's version chain, newest first:
//!
//! ```text
//!   [n u16] { [xmin u64][xmin_cid u32][xmax u64][xmax_cid u32][flags u8][len u32][row] } * n
//! ```
//!
//! `xmin` created the version, `xmax` (0 = none) deleted or superseded it; the `cid`s
//! are command ids within those transactions, so a statement never sees its own
//! changes (and can be retried after a lock wait without updating a row twice).
//!
//! # A snapshot is an LSN
//! A transaction's commit record stamps its own LSN into its slot of the transaction
//! status pages (the CLOG). A snapshot is an LSN S: a transaction is visible to it iff
//! its commit LSN is <= S. On the writer S is VDL when the snapshot is taken, so
//! nothing that could still be lost in a crash is ever visible, and every commit that
//! was acknowledged (acknowledgement waits for VDL) is. (A writer resolving a row
//! conflict may build on a commit that is not durable yet: see early lock release at
//! `Engine::check_write`.) Readers and point-in-time
//! restore use the same rule with their own read points (invariant 3).
//!
//! Aborted transactions need no undo: their versions are never visible and are
//! pruned when the chain is next rewritten. Versions no snapshot can see any more
//! (superseded by a commit at or below the oldest read point in use) are pruned the
//! same way.

use crate::row::{corrupt, Cursor};
use crate::EngineError;
use borealis_common::Lsn;

pub type TxnId = u64;
pub type CommandId = u32;

/// Transaction status stored in the CLOG: 0 = in progress (or crashed), MAX = aborted,
/// anything else = commit LSN.
pub const CLOG_ABORTED: u64 = u64::MAX;

/// Version flag: xmax only locks the row (SELECT ... FOR UPDATE), it does not delete.
pub const FLAG_LOCK_ONLY: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub xmin: TxnId,
    pub xmin_cid: CommandId,
    pub xmax: TxnId,
    pub xmax_cid: CommandId,
    pub flags: u8,
    pub row: Vec<u8>,
}

/// Bytes of a version before its row: xmin, xmin_cid, xmax, xmax_cid, flags, len.
pub const VERSION_HEADER_BYTES: usize = 8 + 4 + 8 + 4 + 1 + 4;

pub fn encode_versions(versions: &[Version]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        2 + versions
            .iter()
            .map(|v| VERSION_HEADER_BYTES + v.row.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&(versions.len() as u16).to_le_bytes());
    for v in versions {
        out.extend_from_slice(&v.xmin.to_le_bytes());
        out.extend_from_slice(&v.xmin_cid.to_le_bytes());
        out.extend_from_slice(&v.xmax.to_le_bytes());
        out.extend_from_slice(&v.xmax_cid.to_le_bytes());
        out.push(v.flags);
        out.extend_from_slice(&(v.row.len() as u32).to_le_bytes());
        out.extend_from_slice(&v.row);
    }
    out
}

pub fn decode_versions(buf: &[u8]) -> Result<Vec<Version>, EngineError> {
    Ok(decode_version_refs(buf)?
        .into_iter()
        .map(|v| Version {
            xmin: v.xmin,
            xmin_cid: v.xmin_cid,
            xmax: v.xmax,
            xmax_cid: v.xmax_cid,
            flags: v.flags,
            row: v.row.to_vec(),
        })
        .collect())
}

/// A version read in place from its chain's bytes: what readers need to pick the
/// visible version and decode only that one row, without copying the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRef<'a> {
    pub xmin: TxnId,
    pub xmin_cid: CommandId,
    pub xmax: TxnId,
    pub xmax_cid: CommandId,
    pub flags: u8,
    pub row: &'a [u8],
}

/// Parses a version chain in place; the same checks as [`decode_versions`].
pub fn decode_version_refs(buf: &[u8]) -> Result<Vec<VersionRef<'_>>, EngineError> {
    let mut c = Cursor::new(buf);
    let n = c.u16()? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let xmin = c.u64()?;
        let xmin_cid = c.u32()?;
        let xmax = c.u64()?;
        let xmax_cid = c.u32()?;
        let flags = c.u8()?;
        let len = c.u32()? as usize;
        out.push(VersionRef {
            xmin,
            xmin_cid,
            xmax,
            xmax_cid,
            flags,
            row: c.take(len)?,
        });
    }
    if c.at != buf.len() {
        return Err(corrupt("trailing bytes after version chain"));
    }
    Ok(out)
}

/// The fields visibility looks at, for owned and in-place versions alike.
pub trait VersionHeader {
    /// (xmin, xmin_cid, xmax, xmax_cid, flags)
    fn header(&self) -> (TxnId, CommandId, TxnId, CommandId, u8);
}

impl VersionHeader for Version {
    fn header(&self) -> (TxnId, CommandId, TxnId, CommandId, u8) {
        (
            self.xmin,
            self.xmin_cid,
            self.xmax,
            self.xmax_cid,
            self.flags,
        )
    }
}

impl VersionHeader for VersionRef<'_> {
    fn header(&self) -> (TxnId, CommandId, TxnId, CommandId, u8) {
        (
            self.xmin,
            self.xmin_cid,
            self.xmax,
            self.xmax_cid,
            self.flags,
        )
    }
}

/// What the transaction-status lookup says about a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    InProgress,
    Committed(Lsn),
    Aborted,
}

/// The viewpoint of one statement: whose changes it sees.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// Own transaction (0 for a read-only viewer with no transaction id).
    pub txid: TxnId,
    /// Current command id: own changes with a smaller cid are visible.
    pub cid: CommandId,
    /// Read point: other transactions' commits at or below it are visible.
    pub lsn: Lsn,
}

impl Snapshot {
    /// Whether a change by (`txid`, `cid`) is visible, given its status.
    pub fn sees(&self, txid: TxnId, cid: CommandId, state: TxnState) -> bool {
        if txid == 0 {
            return false;
        }
        if txid == self.txid {
            return cid < self.cid;
        }
        matches!(state, TxnState::Committed(lsn) if lsn <= self.lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_reject_garbage() {
        let vs = vec![
            Version {
                xmin: 5,
                xmin_cid: 1,
                xmax: 0,
                xmax_cid: 0,
                flags: 0,
                row: b"new".to_vec(),
            },
            Version {
                xmin: 3,
                xmin_cid: 0,
                xmax: 5,
                xmax_cid: 1,
                flags: 0,
                row: b"old".to_vec(),
            },
        ];
        let buf = encode_versions(&vs);
        assert_eq!(decode_versions(&buf).unwrap(), vs);
        let refs = decode_version_refs(&buf).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].row, b"old");
        assert_eq!(refs[1].header(), vs[1].header());
        assert!(decode_version_refs(&buf[..buf.len() - 1]).is_err());
        assert!(decode_versions(&buf[..buf.len() - 1]).is_err());
        assert!(decode_versions(&[9, 0, 1]).is_err());
    }

    #[test]
    fn snapshot_visibility() {
        let s = Snapshot {
            txid: 10,
            cid: 2,
            lsn: Lsn(100),
        };
        assert!(s.sees(10, 1, TxnState::InProgress), "own earlier command");
        assert!(!s.sees(10, 2, TxnState::InProgress), "own current command");
        assert!(s.sees(7, 0, TxnState::Committed(Lsn(100))));
        assert!(
            !s.sees(7, 0, TxnState::Committed(Lsn(101))),
            "committed after the read point"
        );
        assert!(!s.sees(8, 0, TxnState::InProgress), "dirty read");
        assert!(!s.sees(9, 0, TxnState::Aborted));
    }
}
