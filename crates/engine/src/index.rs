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
pub(crate) fn version_conflict(
    st: &State,
    txn: &Txn,
    v: &Version,
) -> Result<Conflict, EngineError> {
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
    let mut leaf_no = btree::leaf_of(&st.store, index.root, key)?;
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
    let mut entries = Vec::new();
    let next = btree::leaf_range(page, leaf_no, resume, from, to, |key, payload| {
        entries.push((key.to_vec(), payload.to_vec()));
        Ok(())
    })?;
    Ok(EntryBatch {
        entries,
        next_leaf: next.unwrap_or(0),
        done: next.is_none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnDef, RelKind, TableDef};
    use crate::row::encode_key;
    use crate::{Engine, Isolation, RowAction, RowOutcome};
    use borealis_volume::{Volume, VolumeConfig};
    use std::time::Duration;

    /// An engine with table t(id int primary key, k int, v text) and an index on k
    /// (unique if asked).
    async fn setup(unique: bool) -> (Engine, TableDef) {
        let engine = Engine::open(Volume::in_memory(VolumeConfig::default()), 1024)
            .await
            .unwrap();
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        let (oid, root) = engine.allocate_relation(&mut txn).await.unwrap();
        let index_root = engine.new_root(&mut txn).await.unwrap();
        let col = |name: &str, type_oid| ColumnDef {
            name: name.into(),
            type_oid,
            typmod: -1,
            not_null: false,
            default: None,
        };
        let table = TableDef {
            oid,
            name: "t".into(),
            kind: RelKind::Table,
            columns: vec![col("id", 23), col("k", 23), col("v", 25)],
            pk: vec![0],
            pk_name: None,
            root,
            indexes: vec![IndexDef {
                oid: 0,
                name: "t_k".into(),
                columns: vec![1],
                unique,
                primary: false,
                root: index_root,
                constraint: false,
            }],
            checks: vec![],
            rowid_seq: None,
            sequence: None,
            stats: None,
        };
        engine.commit(txn).await.unwrap();
        (engine, table)
    }

    fn row(id: i32, k: Option<i32>, v: &str) -> Vec<Datum> {
        vec![
            Datum::Int4(id),
            k.map(Datum::Int4).unwrap_or(Datum::Null),
            Datum::Text(v.into()),
        ]
    }

    fn pk(id: i32) -> Vec<u8> {
        encode_key(&[Datum::Int4(id)]).unwrap()
    }

    async fn insert(engine: &Engine, table: &TableDef, r: Vec<Datum>) -> Result<(), EngineError> {
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let key = encode_key(&r[..1]).unwrap();
        engine
            .insert_row(&mut txn, table, &key, &r, "t_pkey")
            .await?;
        engine.commit(txn).await.map(|_| ())
    }

    async fn update(engine: &Engine, table: &TableDef, id: i32, new: Option<Vec<Datum>>) {
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let mut action = Some(match new {
            Some(r) => RowAction::Update(r),
            None => RowAction::Delete,
        });
        let out = engine
            .modify_row(&mut txn, table, &pk(id), &mut |_| {
                Ok(action.take().unwrap_or(RowAction::Skip))
            })
            .await
            .unwrap();
        assert!(matches!(out, RowOutcome::Done(_)));
        engine.commit(txn).await.unwrap();
    }

    /// Ids found through the index for k in [lo, hi] (with the recheck).
    async fn ids_by_k(engine: &Engine, table: &TableDef, lo: i32, hi: i32) -> Vec<i32> {
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let from = encode_key(&[Datum::Int4(lo)]).unwrap();
        let to = prefix_end(&encode_key(&[Datum::Int4(hi)]).unwrap()).unwrap();
        let mut out = Vec::new();
        engine
            .index_scan(
                &txn,
                table,
                &table.indexes[0],
                Bound::Included(from),
                Bound::Excluded(to),
                &mut |_, r| {
                    if let Datum::Int4(id) = r[0] {
                        out.push(id);
                    }
                    Ok(true)
                },
            )
            .await
            .unwrap();
        out
    }

    /// Every entry key of the index tree.
    async fn entries(engine: &Engine, table: &TableDef) -> Vec<Vec<u8>> {
        let mut st = engine.lock().await;
        let mut out = Vec::new();
        let mut leaf = None;
        loop {
            let batch = match leaf {
                None => btree::scan_leaf_from(&st.store, table.indexes[0].root, None),
                Some(p) => btree::read_leaf(&st.store, p, None),
            };
            let batch = match batch {
                Err(EngineError::PageMiss(p)) => {
                    st.store.load(p).await.unwrap();
                    continue;
                }
                other => other.unwrap(),
            };
            out.extend(batch.items.iter().map(|(k, _)| k.clone()));
            if batch.next_leaf == 0 {
                return out;
            }
            leaf = Some(batch.next_leaf);
        }
    }

    #[tokio::test]
    async fn writes_maintain_the_index_and_vacuum_removes_dead_entries() {
        let (engine, table) = setup(false).await;
        for id in 0..600 {
            insert(&engine, &table, row(id, Some(id % 10), "x"))
                .await
                .unwrap();
        }
        assert_eq!(entries(&engine, &table).await.len(), 600);
        assert_eq!(ids_by_k(&engine, &table, 3, 3).await.len(), 60);
        // Updating a non-indexed column adds no entry.
        for id in 0..100 {
            update(&engine, &table, id, Some(row(id, Some(id % 10), "changed"))).await;
        }
        assert_eq!(entries(&engine, &table).await.len(), 600);
        // Changing the key adds one; the old entry stays, but the row is only found
        // under its new key.
        update(&engine, &table, 3, Some(row(3, Some(42), "moved"))).await;
        assert_eq!(entries(&engine, &table).await.len(), 601);
        assert_eq!(ids_by_k(&engine, &table, 42, 42).await, [3]);
        assert!(!ids_by_k(&engine, &table, 3, 3).await.contains(&3));
        assert_eq!(ids_by_k(&engine, &table, 3, 3).await.len(), 59);
        // Deleting adds nothing and hides the row.
        update(&engine, &table, 13, None).await;
        assert_eq!(ids_by_k(&engine, &table, 3, 3).await.len(), 58);
        // An aborted insert leaves an entry that no reader returns.
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let r = row(1000, Some(3), "aborted");
        engine
            .insert_row(&mut txn, &table, &pk(1000), &r, "t_pkey")
            .await
            .unwrap();
        engine.rollback(txn).await.unwrap();
        assert_eq!(ids_by_k(&engine, &table, 3, 3).await.len(), 58);
        assert_eq!(entries(&engine, &table).await.len(), 602);
        // VACUUM: the moved row's old entry, the deleted row's and the aborted
        // row's go; every live row keeps exactly one.
        let stats = engine.vacuum_table(&table).await.unwrap();
        assert_eq!(stats.index_entries_removed, 3);
        assert_eq!(entries(&engine, &table).await.len(), 599);
        assert_eq!(ids_by_k(&engine, &table, 0, 100).await.len(), 599);
        assert_eq!(ids_by_k(&engine, &table, 42, 42).await, [3]);
        // The index is in the volume (redo only): a cold engine reads it back.
        let cold = Engine::open(engine.volume().clone(), 256).await.unwrap();
        assert_eq!(ids_by_k(&cold, &table, 0, 100).await.len(), 599);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_keep_index_and_rows_in_agreement() {
        let (engine, table) = setup(false).await;
        let mut tasks = Vec::new();
        for seed in 1..=4u64 {
            let (engine, table) = (engine.clone(), table.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut next = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % n) as i32
                };
                for _ in 0..400 {
                    let id = next(150);
                    let k = next(12);
                    let mut txn = engine.begin(Isolation::ReadCommitted, false);
                    engine.start_statement(&mut txn);
                    let r = match next(4) {
                        0 => {
                            let r = row(id, Some(k), "ins");
                            engine
                                .insert_row(&mut txn, &table, &pk(id), &r, "t_pkey")
                                .await
                                .map(|_| ())
                        }
                        op => {
                            let mut action = Some(match op {
                                1 => RowAction::Update(row(id, Some(k), "k changed")),
                                2 => RowAction::Delete,
                                _ => RowAction::Lock,
                            });
                            engine
                                .modify_row(&mut txn, &table, &pk(id), &mut |cur| {
                                    Ok(match action.take() {
                                        Some(RowAction::Lock) => RowAction::Update(vec![
                                            cur[0].clone(),
                                            cur[1].clone(),
                                            Datum::Text("v changed".into()),
                                        ]),
                                        Some(a) => a,
                                        None => RowAction::Skip,
                                    })
                                })
                                .await
                                .map(|_| ())
                        }
                    };
                    // Every fourth transaction rolls back; duplicates are expected.
                    match r {
                        Ok(()) if next(4) == 0 => engine.rollback(txn).await.unwrap(),
                        Ok(()) => {
                            engine.commit(txn).await.unwrap();
                        }
                        Err(EngineError::UniqueViolation { .. } | EngineError::Deadlock { .. }) => {
                            engine.rollback(txn).await.unwrap()
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // What the clustered tree says, per k ...
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let mut expected: Vec<Vec<i32>> = vec![Vec::new(); 12];
        let mut live = 0;
        engine
            .scan(
                &txn,
                table.root,
                Bound::Unbounded,
                Bound::Unbounded,
                &mut |_, r| {
                    if let (Datum::Int4(id), Datum::Int4(k)) = (&r[0], &r[1]) {
                        expected[*k as usize].push(*id);
                        live += 1;
                    }
                    Ok(true)
                },
            )
            .await
            .unwrap();
        // ... is what the index finds, before and after VACUUM.
        for round in 0..2 {
            for (k, ids) in expected.iter().enumerate() {
                let mut found = ids_by_k(&engine, &table, k as i32, k as i32).await;
                found.sort_unstable();
                assert_eq!(&found, ids, "k={k} round={round}");
            }
            engine.vacuum_table(&table).await.unwrap();
        }
        assert!(live > 20, "too few rows survived to test anything: {live}");
        assert_eq!(entries(&engine, &table).await.len(), live);
    }

    #[tokio::test]
    async fn unique_index_waits_for_in_progress_inserters() {
        let (engine, table) = setup(true).await;
        insert(&engine, &table, row(1, Some(1), "a")).await.unwrap();
        let dup = insert(&engine, &table, row(2, Some(1), "b")).await;
        assert!(matches!(dup, Err(EngineError::UniqueViolation { key, .. }) if key == pk(1)));
        // NULLs do not conflict.
        insert(&engine, &table, row(3, None, "n")).await.unwrap();
        insert(&engine, &table, row(4, None, "n")).await.unwrap();
        // An in-progress inserter makes the second one wait; its rollback lets it in.
        let mut t1 = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut t1);
        let r = row(5, Some(5), "t1");
        engine
            .insert_row(&mut t1, &table, &pk(5), &r, "t_pkey")
            .await
            .unwrap();
        let (e2, tb2) = (engine.clone(), table.clone());
        let waiter = tokio::spawn(async move { insert(&e2, &tb2, row(6, Some(5), "t2")).await });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished(), "second inserter did not wait");
        engine.rollback(t1).await.unwrap();
        waiter.await.unwrap().unwrap();
        // ... and a commit makes it fail.
        let mut t1 = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut t1);
        let r = row(7, Some(7), "t1");
        engine
            .insert_row(&mut t1, &table, &pk(7), &r, "t_pkey")
            .await
            .unwrap();
        let (e2, tb2) = (engine.clone(), table.clone());
        let waiter = tokio::spawn(async move { insert(&e2, &tb2, row(8, Some(7), "t2")).await });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished(), "second inserter did not wait");
        engine.commit(t1).await.unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(EngineError::UniqueViolation { .. })
        ));
        // A value freed by a committed update or delete is free again.
        update(&engine, &table, 7, Some(row(7, Some(70), "moved"))).await;
        insert(&engine, &table, row(9, Some(7), "reuse"))
            .await
            .unwrap();
        update(&engine, &table, 9, None).await;
        insert(&engine, &table, row(10, Some(7), "reuse again"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn build_indexes_every_live_version_and_checks_uniqueness() {
        let (engine, mut table) = setup(false).await;
        let unbuilt = table.indexes.pop().unwrap();
        for id in 0..300 {
            insert(&engine, &table, row(id, Some(id), "x"))
                .await
                .unwrap();
        }
        // An open snapshot keeps old versions alive across an update.
        let mut old = engine.begin(Isolation::RepeatableRead, false);
        engine.start_statement(&mut old);
        update(&engine, &table, 5, Some(row(5, Some(500), "new"))).await;
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let root = engine
            .build_index(&mut txn, &table, &unbuilt)
            .await
            .unwrap();
        engine.commit(txn).await.unwrap();
        table.indexes.push(IndexDef {
            root,
            ..unbuilt.clone()
        });
        // Both versions of row 5 are indexed: the old snapshot finds it under 5,
        // new ones under 500.
        assert_eq!(entries(&engine, &table).await.len(), 301);
        assert_eq!(ids_by_k(&engine, &table, 500, 500).await, [5]);
        assert!(ids_by_k(&engine, &table, 5, 5).await.is_empty());
        let mut seen = Vec::new();
        engine
            .index_scan(
                &old,
                &table,
                &table.indexes[0],
                Bound::Included(encode_key(&[Datum::Int4(5)]).unwrap()),
                Bound::Excluded(prefix_end(&encode_key(&[Datum::Int4(5)]).unwrap()).unwrap()),
                &mut |_, r| {
                    seen.push(r[0].clone());
                    Ok(true)
                },
            )
            .await
            .unwrap();
        assert_eq!(seen, [Datum::Int4(5)]);
        engine.commit(old).await.unwrap();
        // A unique build over a duplicate refuses.
        insert(&engine, &table, row(1000, Some(7), "dup"))
            .await
            .unwrap();
        let mut txn = engine.begin(Isolation::ReadCommitted, false);
        engine.start_statement(&mut txn);
        let unique = IndexDef {
            unique: true,
            ..unbuilt
        };
        let r = engine.build_index(&mut txn, &table, &unique).await;
        assert!(matches!(r, Err(EngineError::UniqueViolation { .. })));
        engine.rollback(txn).await.unwrap();
    }

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
