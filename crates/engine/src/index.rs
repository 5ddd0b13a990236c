//! Secondary indexes: B+trees of (indexed columns, clustered key) → clustered key.
//!
//! ```text
//!   index item key:  [encode_key(indexed columns)][clustered key]   (unique per entry)
//!   index payload:   [clustered key]
//! ```
//!
//! The key encoding of one column is prefix-free (fixed width, or escaped with a
//! terminator), so "entry key starts with K" means "the indexed columns equal K".
//!
//! # Maintenance and versions
//! A row is one clustered item holding its version chain; the index has one entry
//! per distinct indexed value among the chain's versions. INSERT adds an entry;
//! UPDATE adds one only when an indexed column changes (so updates of other columns
//! cost nothing); DELETE adds none. Entries are written in the same mini-transaction
//! as the row's new chain (invariant 6: a reader never sees a row without its entry).
//! Entries of superseded, deleted or aborted versions stay until VACUUM finds that
//! no version of the row carries their key any more. Readers therefore re-check: an
//! entry yields a row only if the version visible to the snapshot has the entry's
//! key, which also makes every row appear at most once.
//!
//! # Uniqueness
//! Before an entry with key K (no NULL in it) goes into a unique index, every entry
//! starting with K is followed to its row: a version with key K that is committed
//! and not deleted by a committed transaction is a violation (23505); one whose
//! inserter or deleter is still in progress makes the writer wait and retry, like
//! PostgreSQL. The check and the write happen under one hold of the engine lock.

use crate::btree;
use crate::catalog::IndexDef;
use crate::mvcc::{decode_versions, TxnState, Version, FLAG_LOCK_ONLY};
use crate::row::{decode_row, encode_key_datum};
use crate::types::Datum;
use crate::{EngineError, State, Txn};
use borealis_common::{Lsn, PageNo};
use borealis_redo::PageKind;
use std::ops::Bound;

/// Leaves a uniqueness check may follow (bounds the walk over dead entries).
const MAX_CHECK_LEAVES: usize = 1 << 16;

/// The encoded indexed columns of `row` and whether one of them is NULL. Columns
/// missing from an old, shorter row version count as NULL.
pub fn index_key(index: &IndexDef, row: &[Datum]) -> Result<(Vec<u8>, bool), EngineError> {
    let mut out = Vec::with_capacity(16);
    let mut has_null = false;
    for &c in &index.columns {
        let d = row.get(c).unwrap_or(&Datum::Null);
        has_null |= d.is_null();
        encode_key_datum(d, &mut out)?;
    }
    Ok((out, has_null))
}

/// Whether the indexed columns of two rows are equal (no encoding: the cheap test
/// that keeps updates of non-indexed columns free).
pub fn same_key(index: &IndexDef, a: &[Datum], b: &[Datum]) -> bool {
    index.columns.iter().all(|&c| a.get(c) == b.get(c))
}

pub fn entry_key(index_key: &[u8], clustered_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(index_key.len() + clustered_key.len());
    k.extend_from_slice(index_key);
    k.extend_from_slice(clustered_key);
    k
}

/// The smallest key above every key starting with `prefix` (None: no such key,
/// the range is unbounded above). Unlike `row::prefix_successor` this is exact for
/// any continuation, which index keys need: the columns after a prefix may be
/// NULLs, encoded as 0xff.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut v = prefix.to_vec();
    while let Some(last) = v.pop() {
        if last < 0xff {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

/// What a uniqueness check found.
pub(crate) enum Conflict {
    None,
    /// A transaction that inserted or deleted a version with the key is in progress.
    Wait(u64),
    /// A deletion committed but is not durable yet.
    WaitDurable(Lsn),
    /// A live row holds the key: its clustered key.
    Violation(Vec<u8>),
}

/// Whether version `v` (whose key is the one being inserted) blocks the insert.
fn version_conflict(st: &State, txn: &Txn, v: &Version) -> Result<Conflict, EngineError> {
    if st.owner(v.xmin) != txn.txid {
        match st.txn_state(v.xmin)? {
            TxnState::Aborted => return Ok(Conflict::None),
            TxnState::InProgress => return Ok(Conflict::Wait(v.xmin)),
            TxnState::Committed(_) => {}
        }
    }
    let deleted = if v.xmax == 0 || v.flags & FLAG_LOCK_ONLY != 0 {
        TxnState::Aborted
    } else if st.owner(v.xmax) == txn.txid {
        TxnState::Committed(Lsn::ZERO)
    } else {
        st.txn_state(v.xmax)?
    };
    Ok(match deleted {
        TxnState::Committed(l) if l > st.store.volume.vdl() => Conflict::WaitDurable(l),
        TxnState::Committed(_) => Conflict::None,
        TxnState::InProgress => Conflict::Wait(v.xmax),
        TxnState::Aborted => Conflict::Violation(Vec::new()),
    })
}

/// Looks for a live or in-doubt row other than `own_key` whose indexed columns
/// equal `key` (a synchronous walk: may return `PageMiss`).
pub(crate) fn unique_check(
    st: &State,
    txn: &Txn,
    table_root: PageNo,
    index: &IndexDef,
    key: &[u8],
    own_key: &[u8],
) -> Result<Conflict, EngineError> {
    let (mut leaf_no, _) = btree::find_leaf(&st.store, index.root, key)?;
    let mut first = true;
    for _ in 0..MAX_CHECK_LEAVES {
        let page = st.store.page(leaf_no)?;
        if page.kind() != Some(PageKind::BtreeLeaf) {
            return Err(EngineError::Corrupt(format!(
                "page {leaf_no} in an index leaf chain is not a leaf"
            )));
        }
        let start = if first {
            match btree::search(page, key)? {
                Ok(s) | Err(s) => s,
            }
        } else {
            0
        };
        first = false;
        for slot in start..page.nslots() {
            let item = page
                .item(slot)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
            if !btree::item_key(item)?.starts_with(key) {
                return Ok(Conflict::None);
            }
            let pk = btree::item_payload(item)?;
            if pk == own_key {
                continue;
            }
            let Some(chain) = btree::get(&st.store, table_root, pk)? else {
                continue;
            };
            for v in decode_versions(&chain)? {
                let (k, _) = index_key(index, &decode_row(&v.row)?)?;
                if k != key {
                    continue;
                }
                match version_conflict(st, txn, &v)? {
                    Conflict::None => {}
                    Conflict::Violation(_) => return Ok(Conflict::Violation(pk.to_vec())),
                    other => return Ok(other),
                }
            }
        }
        leaf_no = page.next();
        if leaf_no == 0 {
            return Ok(Conflict::None);
        }
    }
    Err(EngineError::Internal(
        "uniqueness check walked too many index leaves".into(),
    ))
}

/// Index entries of one leaf within the scan bounds: (entry key, clustered key).
pub(crate) struct EntryBatch {
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    pub next_leaf: PageNo,
    pub done: bool,
}

pub(crate) fn entry_batch(
    st: &State,
    leaf_no: PageNo,
    resume: Option<&[u8]>,
    from: &Bound<Vec<u8>>,
    to: &Bound<Vec<u8>>,
) -> Result<EntryBatch, EngineError> {
    let page = st.store.page(leaf_no)?;
    if page.kind() != Some(PageKind::BtreeLeaf) {
        return Err(EngineError::Corrupt(format!(
            "page {leaf_no} in an index leaf chain is not a leaf"
        )));
    }
    let start = match resume {
        Some(k) => match btree::search(page, k)? {
            Ok(s) | Err(s) => s,
        },
        None => 0,
    };
    let mut entries = Vec::new();
    for slot in start..page.nslots() {
        let item = page
            .item(slot)
            .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
        let key = btree::item_key(item)?;
        if let Bound::Excluded(k) = from {
            if key == k.as_slice() {
                continue;
            }
        }
        let past_end = match to {
            Bound::Included(k) => key > k.as_slice(),
            Bound::Excluded(k) => key >= k.as_slice(),
            Bound::Unbounded => false,
        };
        if past_end {
            return Ok(EntryBatch {
                entries,
                next_leaf: 0,
                done: true,
            });
        }
        entries.push((key.to_vec(), btree::item_payload(item)?.to_vec()));
    }
    Ok(EntryBatch {
        entries,
        next_leaf: page.next(),
        done: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_null_continuations() {
        let mut k = Vec::new();
        encode_key_datum(&Datum::Int4(1), &mut k).unwrap();
        let end = prefix_end(&k).unwrap();
        // (1, NULL, NULL, ...) sorts below the end; (2) does not.
        let mut nulls = k.clone();
        nulls.extend_from_slice(&[0xff; 12]);
        assert!(nulls < end);
        let mut two = Vec::new();
        encode_key_datum(&Datum::Int4(2), &mut two).unwrap();
        assert!(two >= end);
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
    }
}
