//! The database engine of an instance: buffer cache, B+trees, catalog, MVCC and
//! transactions, all over the volume. It persists nothing itself: every page change is
//! a redo record from [`borealis_volume::Volume::append`], applied to the cached page
//! with [`borealis_redo::apply`] (invariants 1 and 2).
//!
//! Concurrency: engine state sits behind one async mutex, taken per row operation or
//! per scan batch, never across a wait for another transaction or for durability.
//! Commit appends the commit record under the mutex and waits for VDL outside it, so
//! concurrent commits share storage round trips (group commit, invariant 4).

pub mod btree;
pub mod catalog;
pub mod index;
pub mod mvcc;
pub mod row;
pub mod space;
pub mod store;
pub mod types;

use borealis_common::{IdHashMap, Lsn, PageNo};
use borealis_redo::page::BODY_BYTES;
use borealis_redo::{ItemShrink, Op, PageKind};
use borealis_volume::{Volume, VolumeError};
use catalog::*;
use mvcc::*;
use space::Alloc;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::sync::{Mutex, MutexGuard, Notify};

pub use types::{Datum, Numeric, Type};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Internal to walks over the cache: the page must be loaded, then retry.
    #[error("page {0} is not cached")]
    PageMiss(PageNo),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("corrupt page data: {0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("row is too big: {0} bytes (rows must fit in half a page)")]
    RowTooBig(usize),
    /// A configured bound was reached (SQLSTATE 54000).
    #[error("{0}")]
    LimitExceeded(String),
    /// `key` is the clustered key of the row that holds the value (ON CONFLICT
    /// acts on it).
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    UniqueViolation {
        constraint: String,
        detail: String,
        key: Vec<u8>,
    },
    #[error("could not serialize access due to concurrent update")]
    SerializationFailure,
    #[error("deadlock detected")]
    Deadlock { detail: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("relation \"{0}\" already exists")]
    DuplicateTable(String),
    #[error("{0}")]
    SequenceLimit(String),
    #[error("savepoint \"{0}\" does not exist")]
    NoSavepoint(String),
    #[error("canceling statement due to user request")]
    Canceled,
    /// A statement's first write to a table found DDL on it newer than the
    /// statement's catalog (or waited for such DDL): nothing was written; the SQL
    /// layer re-reads the catalog ([`Engine::refresh_catalog_view`]) and re-runs it.
    #[error("could not serialize access due to concurrent DDL on the table")]
    CatalogChanged,
    #[error("this volume was not written by a compatible Borealis (magic/version mismatch)")]
    IncompatibleVolume,
}

const MAGIC: u64 = u64::from_le_bytes(*b"BOREALIS");
const FORMAT_VERSION: u64 = 1;
/// Transaction ids are reserved in blocks so that begin rarely writes the superblock.
const TXID_BLOCK: u64 = 1024;
const CLOG_PER_PAGE: u64 = (BODY_BYTES / 8) as u64;
/// See `State::txns_keep`.
const TXNS_KEEP: u64 = 1 << 16;
/// Whole pages per MTR during a bulk load (bounds message and batch sizes).
const BULK_PAGES_PER_MTR: usize = 32;
/// Bound on the entries an index build sorts in memory (invariant 9).
const MAX_INDEX_BUILD_ENTRIES: usize = 50_000_000;
/// Hidden row ids reserved per redo record.
const ROWID_BLOCK: i64 = 1024;
/// Bound on memoized catalog entries (invariant 9).
const CATALOG_CACHE_ENTRIES: usize = 4096;
/// How long a row-lock wait sleeps between re-checks if no wake-up arrives.
const LOCK_RECHECK: Duration = Duration::from_millis(100);

// Superblock body offsets.
const SB_MAGIC: u16 = 0;
const SB_VERSION: u16 = 8;
const SB_NEXT_PAGE: u16 = 16;
const SB_TXID_HWM: u16 = 24;
const SB_NEXT_OID: u16 = 32;
/// Free-page list head, free pages in all, garbage-tree root (see `space`). Zero on
/// volumes formatted before they existed, which reads as "none".
const SB_FREE_HEAD: u16 = 40;
const SB_FREE_PAGES: u16 = 48;
const SB_GARBAGE_ROOT: u16 = 56;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    ReadCommitted,
    RepeatableRead,
}

/// An open savepoint.
#[derive(Debug, Clone)]
struct Savepoint {
    name: String,
    /// Stamped on the versions written since (a fresh one after ROLLBACK TO).
    sub: TxnId,
    /// `Txn::read_only` when it was set: ROLLBACK TO restores it.
    read_only: bool,
}

/// A transaction as the SQL layer holds it.
#[derive(Debug, Clone)]
pub struct Txn {
    /// 0 until the first write (read-only transactions never get one).
    pub txid: TxnId,
    pub cid: CommandId,
    pub snapshot: Lsn,
    pub isolation: Isolation,
    pub read_only: bool,
    /// When the transaction began (microseconds since 2000-01-01 UTC): what
    /// PostgreSQL's now() and current_timestamp return for its whole length.
    pub started_at: i64,
    /// Highest LSN this transaction wrote (its commit must cover it).
    last_write: Lsn,
    /// Transaction id stamped on new versions: the top id, or the innermost
    /// savepoint's subtransaction id.
    write_xid: TxnId,
    /// Open savepoints, outermost first.
    savepoints: Vec<Savepoint>,
    /// Subtransaction ids still live (not rolled back); they commit with the top.
    subxids: Vec<TxnId>,
    /// Set by a cancel request; checked by scans and lock waits.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// This transaction changed the catalog (it must not use the shared cache).
    catalog_dirty: bool,
    /// Table locks held until the transaction ends: (table oid, exclusive).
    table_locks: Vec<(u32, bool)>,
    /// The catalog is read at least as of this LSN (raised when DDL committed
    /// after the snapshot of a transaction that then wrote the table).
    catalog_floor: Lsn,
    /// Holds `snapshot` in the engine's read points while this transaction (or a
    /// clone, such as the one describing a statement) may still read at it; `None`
    /// when it has no snapshot (before its first statement, and under READ
    /// COMMITTED between statements).
    read_point: Option<ReadPoint>,
}

/// The snapshots transactions are reading at. Pruning (of a row's chain when it is
/// written, of a leaf before it splits, of storage's page versions through PGMRPL)
/// keeps every version one of these can see. Writing transactions are in
/// `State::active` too, from their first write; this is what covers the ones that
/// only read, such as a REPEATABLE READ transaction that reads while others
/// update the same rows. Shared outside the engine lock: taking a snapshot
/// (`Engine::start_statement`) does not take it.
#[derive(Default)]
struct ReadPoints(std::sync::Mutex<BTreeMap<Lsn, usize>>);

impl ReadPoints {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Lsn, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn hold(self: &Arc<Self>, lsn: Lsn) -> ReadPoint {
        self.hold_now(|| lsn)
    }
    /// Holds the LSN `now` returns, read under this lock: a pruner reads VDL before
    /// it looks here (`State::prune_horizon`), so either it sees this hold or its
    /// VDL is at most the LSN held, even with sessions on several threads.
    fn hold_now(self: &Arc<Self>, now: impl FnOnce() -> Lsn) -> ReadPoint {
        let mut map = self.map();
        let lsn = now();
        *map.entry(lsn).or_insert(0) += 1;
        ReadPoint {
            points: self.clone(),
            lsn,
        }
    }
    fn oldest(&self) -> Option<Lsn> {
        self.map().keys().next().copied()
    }
    fn held(&self) -> u64 {
        self.map().values().sum::<usize>() as u64
    }
}

/// See `State::fate`.
enum Fate {
    /// Aborted: no snapshot ever sees it.
    Dead,
    /// Kept: some snapshot in use may need it.
    Live,
    /// Committed at or below the horizon: kept, and everything older is dead.
    Last,
}

/// One hold on a read point, released when dropped.
struct ReadPoint {
    points: Arc<ReadPoints>,
    lsn: Lsn,
}

impl Clone for ReadPoint {
    fn clone(&self) -> Self {
        self.points.hold(self.lsn)
    }
}

impl Drop for ReadPoint {
    fn drop(&mut self) {
        let mut map = self.points.map();
        if let Some(n) = map.get_mut(&self.lsn) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.lsn);
            }
        }
    }
}

impl std::fmt::Debug for ReadPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadPoint({})", self.lsn.0)
    }
}

impl Txn {
    pub fn snap(&self) -> Snapshot {
        Snapshot {
            txid: self.txid,
            cid: self.cid,
            lsn: self.snapshot,
        }
    }
    /// A version of a row created by this transaction's current command.
    fn new_version(&self, row: Vec<u8>) -> Version {
        Version {
            xmin: self.write_xid,
            xmin_cid: self.cid,
            xmax: 0,
            xmax_cid: 0,
            flags: 0,
            row,
        }
    }

    pub fn has_savepoints(&self) -> bool {
        !self.savepoints.is_empty()
    }

    pub fn has_writes(&self) -> bool {
        self.txid != 0
    }

    /// Whether the transaction holds a lock on table `oid`.
    pub fn holds_table(&self, oid: u32) -> bool {
        self.table_locks.iter().any(|&(o, _)| o == oid)
    }
}

/// A statement's predicate on a row (see `Engine::modify_visible_row`).
pub type RowPredicate<'a> = dyn FnMut(&[Datum]) -> Result<bool, EngineError> + Send + 'a;

/// What an update callback decides for the row it is shown.
pub enum RowAction {
    /// Leave the row alone (the re-checked predicate no longer matches).
    Skip,
    Delete,
    Update(Vec<Datum>),
    /// Lock the row against concurrent writers (SELECT ... FOR UPDATE).
    Lock,
}

pub enum RowOutcome {
    NotFound,
    Skipped,
    Done(Vec<Datum>),
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Decoded catalog entries by their text (see `decode_relation`).
    catalog_cache: std::sync::Mutex<HashMap<String, Arc<TableDef>>>,
    /// How long commits waited for durability (append of the commit record to VDL).
    commit_latency: CommitLatency,
    /// Hidden row ids reserved per row-id sequence: (next, end of reserved block).
    rowid_blocks: std::sync::Mutex<IdHashMap<u32, (i64, i64)>>,
    txn_ended: Notify,
    /// One `reclaim` at a time: two could free the same tree twice.
    reclaiming: Mutex<()>,
    volume: Volume,
    /// The same as `State::read_points`.
    read_points: Arc<ReadPoints>,
}

struct State {
    store: Store,
    next_page: PageNo,
    /// Pages freed for reuse (see `space`).
    free: space::FreeList,
    /// Root of the garbage tree (0: not created yet).
    garbage_root: PageNo,
    /// Makes garbage keys unique within a transaction.
    garbage_seq: u64,
    next_txid: TxnId,
    txid_hwm: TxnId,
    next_oid: u32,
    /// Transactions begun since start-up; older ones are looked up in the CLOG.
    /// The id maps here are keyed by ids the engine hands out itself, never by
    /// client input, so they use the cheap id hash: visibility checks probe
    /// `txns` for every version they look at.
    txns: IdHashMap<TxnId, TxnState>,
    /// `txns` is pruned back to about this many recent entries once it holds twice
    /// as many: decided transactions older than that are read from the CLOG like
    /// those before start-up (about 16 bytes an entry; unpruned it grew by
    /// 170 MB an hour at 2,000 transactions a second).
    txns_keep: u64,
    /// `txns` is pruned when it grows past this: twice `txns_keep`, or `txns_keep`
    /// more than the last pruning left when it could not drop more (an old
    /// transaction still active, CLOG pages not cached). A scan of the map then
    /// comes at most once per `txns_keep` decided transactions, not at every
    /// commit.
    txns_prune_at: u64,
    startup_txid: TxnId,
    /// Active transactions with writes, and their snapshot LSNs (for pruning).
    active: BTreeMap<TxnId, Lsn>,
    /// Every snapshot in use (see [`ReadPoints`]).
    read_points: Arc<ReadPoints>,
    /// Leaves pruned before a split (`State::leaf_prune`).
    leaf_prunes: u64,
    /// Who waits for whom (row and table locks, by top-level id), for deadlock
    /// detection. A table-lock waiter may wait for several holders at once.
    waits_for: IdHashMap<TxnId, Vec<TxnId>>,
    /// Table locks (see `Engine::lock_table`), by table oid; entries with no
    /// holder and no waiter are removed.
    table_locks: IdHashMap<u32, TableLock>,
    /// Commit LSN of the last transaction that held a table's exclusive lock: a
    /// statement whose catalog is older must re-read it.
    table_ddl_lsn: IdHashMap<u32, Lsn>,
    /// Live subtransaction (savepoint) ids and their top-level transaction.
    subxact_parent: IdHashMap<TxnId, TxnId>,
    /// Commit LSN of the latest transaction that changed the catalog.
    catalog_commit_lsn: Lsn,
    /// The committed catalog as of a snapshot at or after `catalog_commit_lsn`:
    /// every such snapshot sees exactly these entries, so statements skip the scan.
    catalog_cached: Option<(Lsn, Arc<Vec<Arc<TableDef>>>)>,
}

/// Retries a synchronous walk after loading whichever page it missed.
macro_rules! walk {
    ($st:expr, $e:expr) => {
        loop {
            match $e {
                Err(EngineError::PageMiss(p)) => $st.store.load(p).await?,
                other => break other,
            }
        }
    };
}

/// About how many pages a bulk build of `items` takes (at least half-full pages,
/// plus the levels above): how much of the free list to mirror before it, so the
/// build can take its pages from the list rather than fresh ones.
fn bulk_pages(items: &[Vec<u8>]) -> usize {
    let bytes: usize = items.iter().map(|i| i.len() + 4).sum();
    bytes / (BODY_BYTES / 2) * 101 / 100 + 8
}

fn u64_at(body: &[u8], off: u16) -> u64 {
    let o = off as usize;
    body.get(o..o + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

impl State {
    fn clog_page(&self, txid: TxnId) -> PageNo {
        self.store.volume.geometry().max_pages() - 1 - txid / CLOG_PER_PAGE
    }

    fn txn_state(&self, txid: TxnId) -> Result<TxnState, EngineError> {
        if txid == 0 {
            return Ok(TxnState::Aborted);
        }
        if let Some(s) = self.txns.get(&txid) {
            return Ok(*s);
        }
        let page = self.store.page(self.clog_page(txid))?;
        let v = if page.kind() == Some(PageKind::Raw) {
            u64_at(page.body(), ((txid % CLOG_PER_PAGE) * 8) as u16)
        } else {
            0
        };
        Ok(match v {
            0 if txid < self.startup_txid => TxnState::Aborted,
            0 => TxnState::InProgress,
            CLOG_ABORTED => TxnState::Aborted,
            lsn => TxnState::Committed(Lsn(lsn)),
        })
    }

    /// Drops decided transactions older than the `txns_keep` most recent (and than
    /// every active one) whose CLOG entry, in a cached page, already says the same:
    /// `txn_state` then reads it there. An entry the CLOG does not confirm (its page
    /// is not cached, or an abort was never recorded) stays.
    fn prune_txns(&mut self) {
        let oldest_active = self.active.keys().next().copied().unwrap_or(self.next_txid);
        let below = self
            .next_txid
            .saturating_sub(self.txns_keep)
            .min(oldest_active);
        let last_page = self.store.volume.geometry().max_pages() - 1;
        let store = &self.store;
        self.txns.retain(|&x, state| {
            if x >= below {
                return true;
            }
            let recorded = match state {
                TxnState::Committed(lsn) => lsn.0,
                TxnState::Aborted => CLOG_ABORTED,
                TxnState::InProgress => return true,
            };
            match store.page(last_page - x / CLOG_PER_PAGE) {
                Ok(page) if page.kind() == Some(PageKind::Raw) => {
                    u64_at(page.body(), ((x % CLOG_PER_PAGE) * 8) as u16) != recorded
                }
                _ => true,
            }
        });
    }

    /// Oldest read point any active transaction may still use: versions superseded
    /// at or below it are invisible to everyone and can be pruned.
    fn prune_horizon(&self) -> Lsn {
        // VDL first, then the read points: see `ReadPoints::hold_now`.
        let vdl = self.store.volume.vdl();
        let oldest_read = self.read_points.oldest();
        self.active
            .values()
            .copied()
            .chain(oldest_read)
            .fold(vdl, Lsn::min)
    }

    /// Removes versions no snapshot can see: after the newest version committed at or
    /// below the horizon, everything older is dead; aborted versions are dead too.
    fn prune(&self, versions: &[Version]) -> Result<Vec<Version>, EngineError> {
        let horizon = self.prune_horizon();
        let mut out = Vec::with_capacity(versions.len());
        for v in versions {
            match self.fate(v.xmin, horizon)? {
                Fate::Dead => {}
                Fate::Live => out.push(v.clone()),
                Fate::Last => {
                    out.push(v.clone());
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The pruning rule, for a chain walked newest first: what becomes of a version
    /// created by `xmin` given the prune `horizon` (and of the older ones after it).
    fn fate(&self, xmin: TxnId, horizon: Lsn) -> Result<Fate, EngineError> {
        Ok(match self.txn_state(xmin)? {
            TxnState::Aborted => Fate::Dead,
            TxnState::Committed(l) if l <= horizon => Fate::Last,
            _ => Fate::Live,
        })
    }

    fn superblock_op(&self, offset: u16, value: u64) -> (PageNo, Op) {
        (
            SUPERBLOCK_PAGE,
            Op::WriteBody {
                offset,
                data: value.to_le_bytes().to_vec(),
            },
        )
    }

    /// Allocates and formats an empty B+tree root for `txn`, recorded as garbage
    /// should the (sub)transaction abort; `extra` ops join the same MTR.
    async fn new_tree(
        &mut self,
        txn: &mut Txn,
        extra: Vec<(PageNo, Op)>,
    ) -> Result<PageNo, EngineError> {
        self.record_garbage(txn, space::When::IfAborted, None, extra)
            .await
    }

    /// Records a garbage entry (see `space`) for `txn`'s current (sub)transaction:
    /// for the tree at `root`, or (None) for a new empty tree allocated and
    /// formatted in the same MTR. Returns the root.
    async fn record_garbage(
        &mut self,
        txn: &mut Txn,
        when: space::When,
        root: Option<PageNo>,
        extra: Vec<(PageNo, Op)>,
    ) -> Result<PageNo, EngineError> {
        self.assign_txid(txn).await?;
        self.ensure_garbage_root(txn).await?;
        let xid = txn.write_xid;
        let seq = self.garbage_seq;
        self.garbage_seq += 1;
        let fresh = root.is_none();
        let (entry_ops, alloc, root) = walk!(self, {
            let mut alloc = self.alloc();
            let root = root.unwrap_or_else(|| btree::PageAllocator::allocate(&mut alloc));
            let (key, payload) = space::garbage_item(xid, seq, when, root);
            btree::put(&self.store, self.garbage_root, &key, &payload, &mut alloc)
                .map(|ops| (ops, alloc, root))
        })?;
        let mut ops = Vec::new();
        if fresh {
            ops.push((
                root,
                Op::Init {
                    kind: PageKind::BtreeLeaf as u16,
                },
            ));
        }
        ops.extend(extra);
        ops.extend(entry_ops);
        self.write_mtr(txn, ops, Some(alloc)).await?;
        Ok(root)
    }

    /// Creates the garbage tree on first use (volumes formatted before it existed
    /// have none either).
    async fn ensure_garbage_root(&mut self, txn: &mut Txn) -> Result<(), EngineError> {
        if self.garbage_root != 0 {
            return Ok(());
        }
        let mut alloc = self.alloc();
        let root = btree::PageAllocator::allocate(&mut alloc);
        let ops = vec![
            (
                root,
                Op::Init {
                    kind: PageKind::BtreeLeaf as u16,
                },
            ),
            self.superblock_op(SB_GARBAGE_ROOT, root),
        ];
        self.write_mtr(txn, ops, Some(alloc)).await?;
        self.garbage_root = root;
        Ok(())
    }

    /// Prunes a row's version chain and writes it back under `key`, together with
    /// the row's new secondary-index entries (index root, entry key), as one MTR
    /// (splitting leaves as needed): the common tail of every row write.
    /// `leaf` is where the caller found `key` under this engine-lock hold, if it
    /// did (see `btree::replace_in_leaf`).
    async fn store_versions(
        &mut self,
        txn: &mut Txn,
        root: PageNo,
        key: &[u8],
        leaf: Option<PageNo>,
        versions: &[Version],
        entries: &[(PageNo, Vec<u8>)],
    ) -> Result<(), EngineError> {
        let versions = walk!(self, self.prune(versions))?;
        let payload = encode_versions(&versions);
        let (mut ops, mut alloc) = walk!(self, self.row_ops(root, key, leaf, &payload, entries))?;
        // A split (in any of the trees) allocates pages: only then can the row's leaf
        // be full, and only then is it looked at again.
        if alloc.taken > 0 {
            let item_len = 2 + key.len() + payload.len();
            if let Some(prune) = walk!(self, self.leaf_prune(root, key, item_len))? {
                self.store.write(vec![prune]).await?;
                self.leaf_prunes += 1;
                (ops, alloc) = walk!(self, self.row_ops(root, key, leaf, &payload, entries))?;
            }
        }
        self.write_mtr(txn, ops, Some(alloc)).await?;
        Ok(())
    }

    /// Page pruning, PostgreSQL's `heap_page_prune_opt`: when writing the item of
    /// `key` (`item_len` bytes) would split its leaf, the op that first cuts the
    /// dead tails off the version chains of every row on that leaf, if any has one.
    ///
    /// Why: a row's chain is pruned when the row itself is next written, and many
    /// rows are not written again for a long time (TPC-B updates each account about
    /// once in six minutes at 2,800 tps). Their superseded versions stayed until
    /// VACUUM, leaves filled with them and split, and redo per transaction doubled
    /// within a minute of a TPC-B run as split records (half a leaf each) took over.
    /// A cut is a prefix (the versions up to the newest one every snapshot sees), so
    /// it costs 8 bytes of redo per row ([`Op::ShrinkItems`]). A chain with an aborted
    /// version before that point is left for its own next write or VACUUM.
    fn leaf_prune(
        &self,
        root: PageNo,
        key: &[u8],
        item_len: usize,
    ) -> Result<Option<(PageNo, Op)>, EngineError> {
        let leaf_no = btree::leaf_of(&self.store, root, key)?;
        let leaf = self.store.page(leaf_no)?;
        let fits = match btree::search(leaf, key)? {
            Ok(slot) => leaf.fits_replace(slot, item_len),
            Err(_) => leaf.fits_insert(item_len),
        };
        if fits {
            return Ok(None);
        }
        let horizon = self.prune_horizon();
        let mut items = Vec::new();
        for slot in 0..leaf.nslots() {
            // An item this cannot read is left as it is: pruning is an optimisation,
            // and the row's own reads report the damage.
            let Some(item) = leaf.item(slot) else {
                continue;
            };
            let Ok(key) = btree::item_key(item) else {
                continue;
            };
            let at = 2 + key.len();
            let Ok(versions) = decode_version_refs(&item[at..]) else {
                continue;
            };
            let (mut kept, mut len) = (0u16, at + 2);
            for v in &versions {
                let fate = self.fate(v.xmin, horizon)?;
                if let Fate::Dead = fate {
                    // Not a prefix cut: left alone.
                    kept = versions.len() as u16;
                    break;
                }
                kept += 1;
                len += VERSION_HEADER_BYTES + v.row.len();
                if let Fate::Last = fate {
                    break;
                }
            }
            if (kept as usize) < versions.len() {
                items.push(ItemShrink {
                    slot,
                    len: len as u16,
                    patch_at: at as u16,
                    patch: kept,
                });
            }
        }
        Ok((!items.is_empty()).then_some((leaf_no, Op::ShrinkItems { items })))
    }

    /// The ops of one row write: the clustered item, then one entry per index.
    /// Each tree gets at most one put, so computing all of them before applying
    /// any is sound (the trees share no pages; only the allocator is shared).
    fn row_ops(
        &self,
        root: PageNo,
        key: &[u8],
        leaf: Option<PageNo>,
        payload: &[u8],
        entries: &[(PageNo, Vec<u8>)],
    ) -> Result<(Vec<(PageNo, Op)>, Alloc), EngineError> {
        let mut alloc = self.alloc();
        let in_place = match leaf {
            Some(leaf) => btree::replace_in_leaf(&self.store, leaf, key, payload)?,
            None => None,
        };
        let mut ops = match in_place {
            Some(ops) => ops,
            None => btree::put(&self.store, root, key, payload, &mut alloc)?,
        };
        for (index_root, entry) in entries {
            ops.extend(btree::put(
                &self.store,
                *index_root,
                entry,
                key,
                &mut alloc,
            )?);
        }
        Ok((ops, alloc))
    }

    /// Whether following waits-for edges from `from` reaches `target` (a cycle if
    /// `target` is about to wait for `from`). Bounded walk.
    fn reaches(&self, from: &[TxnId], target: TxnId) -> bool {
        let mut stack: Vec<TxnId> = from.to_vec();
        let mut seen: Vec<TxnId> = Vec::new();
        for _ in 0..4096 {
            let Some(cur) = stack.pop() else { return false };
            if cur == target {
                return true;
            }
            if seen.contains(&cur) {
                continue;
            }
            seen.push(cur);
            if let Some(next) = self.waits_for.get(&cur) {
                stack.extend(next.iter().copied());
            }
        }
        false
    }

    /// Grants `txn` the table lock if nothing conflicts (and returns None), or
    /// returns the transactions it must wait for (registering it as an exclusive
    /// waiter, so new shared requests queue behind it).
    fn try_table_lock(&mut self, txn: &mut Txn, oid: u32, exclusive: bool) -> Option<Vec<TxnId>> {
        let me = txn.txid;
        let active = &self.active;
        let lock = self.table_locks.entry(oid).or_default();
        // A waiter that gave up without saying so (it ended) no longer counts.
        lock.exclusive_waiters.retain(|x| active.contains_key(x));
        let mut blockers: Vec<TxnId> = lock.exclusive.into_iter().filter(|&x| x != me).collect();
        if exclusive {
            blockers.extend(lock.shared.iter().copied().filter(|&x| x != me));
        } else if !lock.shared.contains(&me) {
            blockers.extend(lock.exclusive_waiters.iter().copied().filter(|&x| x != me));
        }
        if !blockers.is_empty() {
            if exclusive && !lock.exclusive_waiters.contains(&me) {
                lock.exclusive_waiters.push(me);
            }
            return Some(blockers);
        }
        lock.exclusive_waiters.retain(|&x| x != me);
        if exclusive {
            lock.exclusive = Some(me);
        } else if !lock.shared.contains(&me) {
            lock.shared.push(me);
        }
        match txn.table_locks.iter_mut().find(|(o, _)| *o == oid) {
            Some(held) => held.1 |= exclusive,
            None => txn.table_locks.push((oid, exclusive)),
        }
        None
    }

    fn forget_exclusive_waiter(&mut self, oid: u32, txid: TxnId) {
        if let Some(lock) = self.table_locks.get_mut(&oid) {
            lock.exclusive_waiters.retain(|&x| x != txid);
            if lock.is_free() {
                self.table_locks.remove(&oid);
            }
        }
    }

    /// Whether DDL on the table committed after the catalog `txn` reads.
    fn catalog_stale(&self, txn: &Txn, oid: u32) -> bool {
        let ddl = self.table_ddl_lsn.get(&oid).copied().unwrap_or(Lsn::ZERO);
        ddl > txn.snapshot.max(txn.catalog_floor)
    }

    /// Drops `txn`'s table locks (all of them, or only the shared ones), recording
    /// `ddl_lsn` as the tables' last DDL commit for the exclusive ones released.
    fn release_table_locks(&mut self, txn: &Txn, shared_only: bool, ddl_lsn: Option<Lsn>) {
        for &(oid, exclusive) in &txn.table_locks {
            if shared_only && exclusive {
                continue;
            }
            if let Some(lock) = self.table_locks.get_mut(&oid) {
                lock.shared.retain(|&x| x != txn.txid);
                if lock.exclusive == Some(txn.txid) {
                    lock.exclusive = None;
                    if let Some(l) = ddl_lsn {
                        self.table_ddl_lsn.insert(oid, l);
                    }
                }
                if lock.is_free() {
                    self.table_locks.remove(&oid);
                }
            }
        }
    }

    /// A new transaction id, persisting the high-water mark a block at a time.
    async fn new_xid(&mut self) -> Result<TxnId, EngineError> {
        if self.next_txid >= self.txid_hwm {
            let hwm = self.next_txid + TXID_BLOCK;
            self.store
                .write(vec![self.superblock_op(SB_TXID_HWM, hwm)])
                .await?;
            self.txid_hwm = hwm;
        }
        let xid = self.next_txid;
        self.next_txid += 1;
        self.txns.insert(xid, TxnState::InProgress);
        Ok(xid)
    }

    async fn assign_txid(&mut self, txn: &mut Txn) -> Result<(), EngineError> {
        if txn.txid != 0 {
            return Ok(());
        }
        txn.txid = self.new_xid().await?;
        txn.write_xid = txn.txid;
        self.active.insert(txn.txid, txn.snapshot);
        Ok(())
    }

    /// The top-level transaction a version's xid belongs to: a live subtransaction
    /// maps to its parent, anything else to itself.
    fn owner(&self, xid: TxnId) -> TxnId {
        self.subxact_parent.get(&xid).copied().unwrap_or(xid)
    }

    /// CLOG ops for `xid`; the returned index is that of the op that decides it.
    fn clog_ops(
        &self,
        xid: TxnId,
        commit: bool,
        ops: &mut Vec<(PageNo, Op)>,
    ) -> Result<usize, EngineError> {
        let page_no = self.clog_page(xid);
        let formatted = self.store.page(page_no)?.kind() == Some(PageKind::Raw)
            || ops
                .iter()
                .any(|(p, op)| *p == page_no && matches!(op, Op::Init { .. }));
        if !formatted {
            ops.push((
                page_no,
                Op::Init {
                    kind: PageKind::Raw as u16,
                },
            ));
        }
        let offset = ((xid % CLOG_PER_PAGE) * 8) as u16;
        ops.push((
            page_no,
            if commit {
                Op::StampLsnBody { offset }
            } else {
                Op::WriteBody {
                    offset,
                    data: CLOG_ABORTED.to_le_bytes().to_vec(),
                }
            },
        ));
        Ok(ops.len() - 1)
    }

    /// Decides `xids` in one mini-transaction: the commit of a transaction and its
    /// live subtransactions is atomic to every reader, because VDL only ever lands
    /// on the MTR's last record (invariant 6). Returns each xid's commit LSN.
    async fn decide(&mut self, xids: &[TxnId], commit: bool) -> Result<Vec<Lsn>, EngineError> {
        let (ops, idx) = loop {
            let mut ops = Vec::with_capacity(xids.len() + 1);
            let mut idx = Vec::with_capacity(xids.len());
            let mut missing = None;
            for &x in xids {
                match self.clog_ops(x, commit, &mut ops) {
                    Ok(i) => idx.push(i),
                    Err(EngineError::PageMiss(p)) => {
                        missing = Some(p);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match missing {
                Some(p) => self.store.load(p).await?,
                None => break (ops, idx),
            }
        };
        let lsns = self.store.write_all(ops).await?;
        let decided: Vec<Lsn> = idx.iter().map(|&i| lsns[i]).collect();
        for (&x, &lsn) in xids.iter().zip(&decided) {
            let state = if commit {
                TxnState::Committed(lsn)
            } else {
                TxnState::Aborted
            };
            self.txns.insert(x, state);
            self.subxact_parent.remove(&x);
        }
        if self.txns.len() as u64 > self.txns_prune_at {
            self.prune_txns();
            self.txns_prune_at = (2 * self.txns_keep).max(self.txns.len() as u64 + self.txns_keep);
        }
        Ok(decided)
    }

    /// A page allocator for one MTR (see `space::Alloc`).
    fn alloc(&self) -> Alloc {
        Alloc::new(self.next_page, &self.free)
    }

    async fn write_mtr(
        &mut self,
        txn: &mut Txn,
        mut ops: Vec<(PageNo, Op)>,
        alloc: Option<Alloc>,
    ) -> Result<Lsn, EngineError> {
        if let Some(a) = alloc {
            let next = a.next;
            if self.free.consume(a, &mut ops)? {
                ops.push(self.superblock_op(SB_FREE_HEAD, self.free.head));
                ops.push(self.superblock_op(SB_FREE_PAGES, self.free.total));
            }
            if next != self.next_page {
                ops.push(self.superblock_op(SB_NEXT_PAGE, next));
                self.next_page = next;
            }
        }
        let lsn = self.store.write(ops).await?;
        txn.last_write = lsn;
        if self.free.mirror.is_empty() && self.free.head != 0 {
            // The MTR used up the mirrored pages of the list: mirror the new head
            // now, so the next allocation can take from it.
            self.mirror_free(1).await;
        }
        Ok(lsn)
    }

    /// Mirrors free-list pages until `want` free pages can be taken without a read
    /// (or the list ends). A page that cannot be read or is malformed stops the
    /// mirroring: allocation then takes what is mirrored, then fresh pages, and the
    /// rest of the list stays unused (logged), never handed out twice.
    async fn mirror_free(&mut self, want: usize) {
        while self.free.mirrored() < want && !self.free.broken {
            let p = self.free.to_read();
            if p == 0 {
                return;
            }
            let read = match self.store.load(p).await {
                Ok(()) => self
                    .store
                    .page(p)
                    .and_then(|page| space::ListPage::read(p, page, self.next_page)),
                Err(e) => Err(e),
            };
            match read {
                Ok(list_page) => Arc::make_mut(&mut self.free.mirror).push(list_page),
                Err(e @ EngineError::Corrupt(_)) => {
                    log::error!("free-page list: page {p} unusable ({e}); allocating fresh pages");
                    self.free.broken = true;
                    return;
                }
                Err(e) => {
                    // Not readable now (the volume): tried again at the next write.
                    log::warn!("free-page list: reading page {p}: {e}");
                    return;
                }
            }
        }
    }

    /// Writes a bottom-up build: its pages in MTRs of `BULK_PAGES_PER_MTR` (moved,
    /// not copied: a build is the whole table), then the root, which makes the
    /// tree reachable at once.
    async fn write_bulk_build(
        &mut self,
        txn: &mut Txn,
        build: btree::BulkBuild,
        alloc: Alloc,
    ) -> Result<(), EngineError> {
        let mut alloc = Some(alloc);
        let mut pages = build.pages.into_iter();
        loop {
            let chunk: Vec<(PageNo, Op)> = pages.by_ref().take(BULK_PAGES_PER_MTR).collect();
            if chunk.is_empty() {
                break;
            }
            self.write_mtr(txn, chunk, alloc.take()).await?;
        }
        self.write_mtr(txn, vec![build.root], alloc.take()).await?;
        Ok(())
    }

    /// Puts `items` (leaf items sorted by key, keys unique) into the tree at
    /// `root`, one MTR per run of items that lands in one leaf (`btree::put_run`).
    async fn put_items(
        &mut self,
        txn: &mut Txn,
        root: PageNo,
        items: &[Vec<u8>],
    ) -> Result<(), EngineError> {
        let mut at = 0;
        while at < items.len() {
            let (ops, used, alloc) = walk!(self, {
                let mut alloc = self.alloc();
                btree::put_run(&self.store, root, &items[at..], &mut alloc)
                    .map(|(ops, used)| (ops, used, alloc))
            })?;
            if used == 0 {
                return Err(EngineError::Internal("put_run consumed nothing".into()));
            }
            self.write_mtr(txn, ops, Some(alloc)).await?;
            at += used;
        }
        Ok(())
    }

    /// Whether an existing version chain blocks inserting a new row under its key:
    /// the newest version that is not aborted decides (as in `insert_row`).
    fn key_conflict(
        &self,
        txn: &Txn,
        versions: &[Version],
    ) -> Result<index::Conflict, EngineError> {
        for v in versions {
            if self.owner(v.xmin) != txn.txid && self.txn_state(v.xmin)? == TxnState::Aborted {
                continue;
            }
            return index::version_conflict(self, txn, v);
        }
        Ok(index::Conflict::None)
    }
}

/// A batch insert that failed, and the batch row that caused it (if one did).
#[derive(Debug)]
pub struct BatchError {
    pub row: Option<usize>,
    pub error: EngineError,
}

impl From<EngineError> for BatchError {
    fn from(error: EngineError) -> BatchError {
        BatchError { row: None, error }
    }
}

/// Holders of one table's lock. Shared: DML on the table (held until the
/// transaction ends, as PostgreSQL's RowExclusiveLock); exclusive: DDL that changes
/// the table's storage or definition (CREATE/DROP INDEX, TRUNCATE, ALTER, DROP).
#[derive(Default)]
struct TableLock {
    shared: Vec<TxnId>,
    exclusive: Option<TxnId>,
    /// Transactions waiting for the exclusive lock: new shared requests queue
    /// behind them so a stream of writers cannot starve DDL.
    exclusive_waiters: Vec<TxnId>,
}

impl TableLock {
    fn is_free(&self) -> bool {
        self.shared.is_empty() && self.exclusive.is_none() && self.exclusive_waiters.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLockMode {
    Shared,
    Exclusive,
}

/// One leaf's visible rows during a scan.
struct ScanBatch {
    rows: Vec<(Vec<u8>, Vec<Datum>)>,
    next_leaf: PageNo,
    /// The end bound was reached.
    done: bool,
}

/// Result of inspecting a row's version chain for a write.
enum WriteCheck {
    /// Wait for this transaction to finish, then retry.
    Wait(TxnId),
    /// Wait until VDL reaches this LSN (a commit not yet durable), then retry.
    WaitDurable(Lsn),
    /// Operate on version `idx` of the chain (the newest committed or own version).
    Proceed(Option<usize>),
}

impl Engine {
    /// Opens the engine over `volume`, formatting it if it is empty.
    pub async fn open(volume: Volume, cache_pages: usize) -> Result<Engine, EngineError> {
        let mut store = Store::new(volume.clone(), cache_pages);
        store.load(SUPERBLOCK_PAGE).await?;
        let sb = store.page(SUPERBLOCK_PAGE)?.clone();
        let (next_page, txid_hwm, next_oid, free_head, free_total, garbage_root) = match sb.kind() {
            Some(PageKind::Uninit) => {
                let mut ops = vec![(
                    SUPERBLOCK_PAGE,
                    Op::Init {
                        kind: PageKind::Raw as u16,
                    },
                )];
                for (off, v) in [
                    (SB_MAGIC, MAGIC),
                    (SB_VERSION, FORMAT_VERSION),
                    (SB_NEXT_PAGE, FIRST_FREE_PAGE),
                    (SB_TXID_HWM, TXID_BLOCK),
                    (SB_NEXT_OID, FIRST_USER_OID as u64),
                ] {
                    ops.push((
                        SUPERBLOCK_PAGE,
                        Op::WriteBody {
                            offset: off,
                            data: v.to_le_bytes().to_vec(),
                        },
                    ));
                }
                ops.push((
                    CATALOG_ROOT,
                    Op::Init {
                        kind: PageKind::BtreeLeaf as u16,
                    },
                ));
                ops.push((
                    SEQUENCES_ROOT,
                    Op::Init {
                        kind: PageKind::BtreeLeaf as u16,
                    },
                ));
                let lsn = store.write(ops).await?;
                volume.wait_durable(lsn).await?;
                (FIRST_FREE_PAGE, TXID_BLOCK, FIRST_USER_OID, 0, 0, 0)
            }
            Some(PageKind::Raw) => {
                let body = sb.body();
                if u64_at(body, SB_MAGIC) != MAGIC || u64_at(body, SB_VERSION) != FORMAT_VERSION {
                    return Err(EngineError::IncompatibleVolume);
                }
                (
                    u64_at(body, SB_NEXT_PAGE),
                    u64_at(body, SB_TXID_HWM),
                    u64_at(body, SB_NEXT_OID) as u32,
                    u64_at(body, SB_FREE_HEAD),
                    u64_at(body, SB_FREE_PAGES),
                    u64_at(body, SB_GARBAGE_ROOT),
                )
            }
            _ => return Err(EngineError::IncompatibleVolume),
        };
        // Transaction ids from before this start that never committed were cut off by
        // recovery: everything below the persisted high-water mark is decided.
        let read_points = Arc::new(ReadPoints::default());
        if garbage_root != 0 && !(FIRST_FREE_PAGE..next_page).contains(&garbage_root) {
            return Err(EngineError::Corrupt(format!(
                "superblock: garbage tree root {garbage_root} out of range"
            )));
        }
        let mut state = State {
            read_points: read_points.clone(),
            leaf_prunes: 0,
            store,
            next_page,
            free: space::FreeList {
                head: free_head,
                total: free_total,
                ..Default::default()
            },
            garbage_root,
            garbage_seq: 0,
            next_txid: txid_hwm,
            txid_hwm,
            next_oid,
            txns: IdHashMap::default(),
            txns_keep: TXNS_KEEP,
            txns_prune_at: 2 * TXNS_KEEP,
            startup_txid: txid_hwm,
            active: BTreeMap::new(),
            waits_for: IdHashMap::default(),
            table_locks: IdHashMap::default(),
            table_ddl_lsn: IdHashMap::default(),
            subxact_parent: IdHashMap::default(),
            catalog_commit_lsn: Lsn::ZERO,
            catalog_cached: None,
        };
        state.mirror_free(1).await;
        Ok(Engine {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                catalog_cache: std::sync::Mutex::new(HashMap::new()),
                rowid_blocks: std::sync::Mutex::new(IdHashMap::default()),
                commit_latency: CommitLatency::default(),
                txn_ended: Notify::new(),
                reclaiming: Mutex::new(()),
                volume,
                read_points,
            }),
        })
    }

    pub fn volume(&self) -> &Volume {
        &self.inner.volume
    }

    async fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().await
    }

    /// Waits out a write conflict (another transaction holding the row or key, or a
    /// commit not yet durable) and re-takes the engine lock; the caller then
    /// re-checks from scratch. `Proceed` needs no wait.
    async fn wait_out<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        txn: &Txn,
        check: WriteCheck,
    ) -> Result<MutexGuard<'a, State>, EngineError> {
        match check {
            WriteCheck::Wait(holder) => {
                Self::check_cancel(txn)?;
                self.wait_for_txn(st, txn.txid, holder).await?;
            }
            WriteCheck::WaitDurable(lsn) => {
                drop(st);
                self.inner.volume.wait_durable(lsn).await?;
            }
            WriteCheck::Proceed(_) => return Ok(st),
        }
        Ok(self.lock().await)
    }

    /// Starts a transaction. Its snapshot is taken by the first statement.
    pub fn begin(&self, isolation: Isolation, read_only: bool) -> Txn {
        Txn {
            txid: 0,
            cid: 0,
            snapshot: Lsn::ZERO,
            isolation,
            read_only,
            started_at: types::now_timestamp(),
            last_write: Lsn::ZERO,
            write_xid: 0,
            savepoints: Vec::new(),
            subxids: Vec::new(),
            cancel: None,
            catalog_dirty: false,
            table_locks: Vec::new(),
            catalog_floor: Lsn::ZERO,
            read_point: None,
        }
    }

    /// Marks the start of a statement: a new command id, and under READ COMMITTED a
    /// new snapshot (VDL now).
    pub fn start_statement(&self, txn: &mut Txn) {
        txn.cid += 1;
        // A transaction has a snapshot exactly while it holds its read point.
        if txn.read_point.is_none() || txn.isolation == Isolation::ReadCommitted {
            // Held before the old one is let go; the same LSN again is one more hold.
            let volume = &self.inner.volume;
            let point = self.inner.read_points.hold_now(|| volume.vdl());
            txn.snapshot = point.lsn;
            txn.read_point = Some(point);
        }
    }

    /// Marks the end of a statement. Under READ COMMITTED its snapshot is let go
    /// here, as PostgreSQL lets go of a statement's snapshot: the next statement
    /// takes its own, so a transaction idle between statements (an application's
    /// open block, a pooled connection left in BEGIN) holds back no pruning and no
    /// storage GC. A REPEATABLE READ transaction keeps its one snapshot to the end.
    /// Nothing reads at a finished statement's snapshot: portals hold their rows
    /// already read, and describing a statement takes a snapshot of its own.
    pub fn end_statement(&self, txn: &mut Txn) {
        if txn.isolation == Isolation::ReadCommitted {
            // Should the block switch to REPEATABLE READ now, its first statement
            // takes a new (held) snapshot instead of reusing the released one.
            txn.read_point = None;
        }
    }

    /// Commits: appends the commit record and waits until it is durable (VDL).
    pub async fn commit(&self, txn: Txn) -> Result<Lsn, EngineError> {
        if txn.txid == 0 {
            return Ok(Lsn::ZERO);
        }
        let started = std::time::Instant::now();
        let (lsn, others_open) = {
            let mut st = self.lock().await;
            let mut xids = vec![txn.txid];
            xids.extend(&txn.subxids);
            let lsns = st.decide(&xids, true).await?;
            st.active.remove(&txn.txid);
            let lsn = lsns.iter().copied().max().unwrap_or(Lsn::ZERO);
            if txn.catalog_dirty {
                st.catalog_commit_lsn = lsn;
                st.catalog_cached = None;
            }
            st.release_table_locks(&txn, true, None);
            (lsn, st.active.len())
        };
        self.inner.txn_ended.notify_waiters();
        let durable = self.inner.volume.wait_commit(lsn, others_open).await;
        // Exclusive (DDL) locks are released only once the commit is durable, so the
        // writers they held back read the new catalog at VDL.
        if txn.table_locks.iter().any(|&(_, x)| x) {
            self.lock()
                .await
                .release_table_locks(&txn, false, Some(lsn));
            self.inner.txn_ended.notify_waiters();
        }
        durable?;
        self.inner.commit_latency.record(started.elapsed());
        Ok(lsn)
    }

    /// Commit latency so far: (upper bound in seconds, cumulative count) per bucket,
    /// the sum in seconds and the count, as a Prometheus histogram wants them.
    pub fn commit_latency(&self) -> (Vec<(f64, u64)>, f64, u64) {
        self.inner.commit_latency.snapshot()
    }

    /// Aborts: its versions simply never become visible.
    pub async fn rollback(&self, txn: Txn) -> Result<(), EngineError> {
        if txn.txid == 0 {
            return Ok(());
        }
        {
            let mut st = self.lock().await;
            let mut xids = vec![txn.txid];
            xids.extend(&txn.subxids);
            for &x in &xids {
                st.txns.insert(x, TxnState::Aborted);
                st.subxact_parent.remove(&x);
            }
            st.active.remove(&txn.txid);
            st.waits_for.remove(&txn.txid);
            st.release_table_locks(&txn, false, None);
            // Record the abort so that readers and later starts need not guess.
            let r = st.decide(&xids, false).await;
            if let Err(e) = r {
                log::warn!("could not record abort of transaction {}: {e}", txn.txid);
            }
        }
        self.inner.txn_ended.notify_waiters();
        Ok(())
    }

    /// SAVEPOINT: later writes carry a new subtransaction id, so they can be undone
    /// by marking that id aborted.
    pub async fn savepoint(&self, txn: &mut Txn, name: &str) -> Result<(), EngineError> {
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        let sub = st.new_xid().await?;
        st.subxact_parent.insert(sub, txn.txid);
        txn.subxids.push(sub);
        txn.savepoints.push(Savepoint {
            name: name.to_string(),
            sub,
            read_only: txn.read_only,
        });
        txn.write_xid = sub;
        Ok(())
    }

    fn find_savepoint(txn: &Txn, name: &str) -> Result<usize, EngineError> {
        txn.savepoints
            .iter()
            .rposition(|s| s.name == name)
            .ok_or_else(|| EngineError::NoSavepoint(name.to_string()))
    }

    /// RELEASE SAVEPOINT: its changes become part of the enclosing level; the
    /// access mode goes back to what it was at the savepoint, as PostgreSQL's does
    /// when a subtransaction ends either way.
    pub async fn release_savepoint(&self, txn: &mut Txn, name: &str) -> Result<(), EngineError> {
        let i = Self::find_savepoint(txn, name)?;
        txn.read_only = txn.savepoints[i].read_only;
        txn.savepoints.truncate(i);
        txn.write_xid = txn.savepoints.last().map(|s| s.sub).unwrap_or(txn.txid);
        Ok(())
    }

    /// ROLLBACK TO SAVEPOINT: every subtransaction begun at or after the savepoint is
    /// aborted (its versions and row marks stop counting), the transaction's access
    /// mode is what it was at the savepoint, and the savepoint stays open with a
    /// fresh subtransaction.
    pub async fn rollback_to_savepoint(
        &self,
        txn: &mut Txn,
        name: &str,
    ) -> Result<(), EngineError> {
        let i = Self::find_savepoint(txn, name)?;
        let first = txn.savepoints[i].sub;
        let undone: Vec<TxnId> = txn
            .subxids
            .iter()
            .copied()
            .filter(|&x| x >= first)
            .collect();
        {
            let mut st = self.lock().await;
            if !undone.is_empty() {
                st.decide(&undone, false).await?;
            }
            txn.subxids.retain(|x| *x < first);
            let sub = st.new_xid().await?;
            st.subxact_parent.insert(sub, txn.txid);
            txn.subxids.push(sub);
            txn.savepoints.truncate(i + 1);
            txn.savepoints[i].sub = sub;
            // As PostgreSQL's does when a subtransaction ends.
            txn.read_only = txn.savepoints[i].read_only;
            txn.write_xid = sub;
        }
        self.inner.txn_ended.notify_waiters();
        Ok(())
    }

    fn check_cancel(txn: &Txn) -> Result<(), EngineError> {
        match &txn.cancel {
            Some(flag) if flag.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(EngineError::Canceled)
            }
            _ => Ok(()),
        }
    }

    /// Waits for `holder` to finish, with deadlock detection on the waits-for graph.
    async fn wait_for_txn(
        &self,
        st: MutexGuard<'_, State>,
        waiter: TxnId,
        holder: TxnId,
    ) -> Result<(), EngineError> {
        self.wait_for_txns(st, waiter, &[holder]).await
    }

    /// Waits (bounded, then the caller re-checks) for any of `holders` to finish,
    /// refusing with 40P01 if one of them already waits, directly or not, for
    /// `waiter`.
    async fn wait_for_txns(
        &self,
        mut st: MutexGuard<'_, State>,
        waiter: TxnId,
        holders: &[TxnId],
    ) -> Result<(), EngineError> {
        let holders: Vec<TxnId> = holders.iter().map(|&h| st.owner(h)).collect();
        if waiter != 0 && st.reaches(&holders, waiter) {
            let holder = holders.first().copied().unwrap_or(0);
            return Err(EngineError::Deadlock {
                detail: format!("Process for transaction {waiter} waits for transaction {holder}, which waits for it."),
            });
        }
        if waiter != 0 {
            st.waits_for.insert(waiter, holders);
        }
        let notified = self.inner.txn_ended.notified();
        drop(st);
        let _ = tokio::time::timeout(LOCK_RECHECK, notified).await;
        let mut st = self.lock().await;
        st.waits_for.remove(&waiter);
        Ok(())
    }

    /// Whether `txn` may write the row whose chain is `versions`, and on which
    /// version.
    ///
    /// Early lock release: a version created or deleted by a transaction that has
    /// committed (its commit record is appended) counts as committed here even
    /// before that record is durable, so a row lock is held until COMMIT is
    /// decided, not until storage has acknowledged it (InnoDB, and so Aurora
    /// MySQL, release locks the same way). This is safe because commit order is LSN
    /// order: this transaction's own commit record comes after the one it built on,
    /// VDL only moves forward, so it cannot be acknowledged before that commit is
    /// durable, and a crash that loses that commit loses this transaction too.
    /// Snapshots stay at VDL: plain reads never see a commit that is not durable.
    /// The price, as in InnoDB: this transaction's own statements (RETURNING, or a
    /// later read of the row it wrote) may show a value that a crash before either
    /// commit is durable takes back together with the transaction itself. Waiting
    /// for durability held the hottest rows (TPC-B's branches) locked for a whole
    /// quorum round trip more per transaction.
    fn check_write(st: &State, txn: &Txn, versions: &[Version]) -> Result<WriteCheck, EngineError> {
        for (i, v) in versions.iter().enumerate() {
            let own_xmin = st.owner(v.xmin) == txn.txid;
            let created = if own_xmin {
                TxnState::InProgress
            } else {
                st.txn_state(v.xmin)?
            };
            if !own_xmin {
                match created {
                    TxnState::Aborted => continue,
                    TxnState::InProgress => return Ok(WriteCheck::Wait(v.xmin)),
                    TxnState::Committed(l)
                        if l > txn.snapshot && txn.isolation == Isolation::RepeatableRead =>
                    {
                        return Err(EngineError::SerializationFailure)
                    }
                    TxnState::Committed(_) => {}
                }
            } else if v.xmin_cid >= txn.cid {
                // Created by this very statement: it already did its work on this row.
                return Ok(WriteCheck::Proceed(None));
            }
            // `v` is the newest live-or-deleted version we may act on; look at its xmax.
            let own_xmax = v.xmax != 0 && st.owner(v.xmax) == txn.txid;
            if v.xmax != 0 && !own_xmax {
                match st.txn_state(v.xmax)? {
                    TxnState::Aborted => {}
                    TxnState::InProgress => return Ok(WriteCheck::Wait(v.xmax)),
                    TxnState::Committed(_) if v.flags & FLAG_LOCK_ONLY != 0 => {}
                    TxnState::Committed(l) => {
                        if l > txn.snapshot && txn.isolation == Isolation::RepeatableRead {
                            return Err(EngineError::SerializationFailure);
                        }
                        return Ok(WriteCheck::Proceed(None)); // deleted: nothing to act on
                    }
                }
            } else if own_xmax && v.flags & FLAG_LOCK_ONLY == 0 {
                // Deleted or superseded by us earlier.
                return Ok(WriteCheck::Proceed(None));
            }
            return Ok(WriteCheck::Proceed(Some(i)));
        }
        Ok(WriteCheck::Proceed(None))
    }

    /// Reads the row at `key` as `txn` sees it and lets `decide` update, delete or
    /// lock it, waiting for concurrent writers first. Under READ COMMITTED the row
    /// shown is the newest committed version (PostgreSQL's re-check); `decide` must
    /// re-evaluate its predicate on it.
    pub async fn modify_row(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        key: &[u8],
        decide: &mut (dyn FnMut(&[Datum]) -> Result<RowAction, EngineError> + Send),
    ) -> Result<RowOutcome, EngineError> {
        self.modify_row_inner(txn, table, key, None, decide).await
    }

    /// [`Engine::modify_row`] for a key the caller has not read first: the row is
    /// acted on only if `txn`'s snapshot sees a version of it for which `matches`
    /// (the statement's predicate) is true, exactly the rows a scan of the key
    /// followed by `modify_row` would act on. It saves an UPDATE or DELETE by
    /// primary key the scan's B+tree descent and row decoding. As after a scan,
    /// nothing is locked or written when the snapshot sees no matching version.
    pub async fn modify_visible_row(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        key: &[u8],
        matches: &mut RowPredicate<'_>,
        decide: &mut (dyn FnMut(&[Datum]) -> Result<RowAction, EngineError> + Send),
    ) -> Result<RowOutcome, EngineError> {
        self.modify_row_inner(txn, table, key, Some(matches), decide)
            .await
    }

    async fn modify_row_inner(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        key: &[u8],
        mut matches: Option<&mut RowPredicate<'_>>,
        decide: &mut (dyn FnMut(&[Datum]) -> Result<RowAction, EngineError> + Send),
    ) -> Result<RowOutcome, EngineError> {
        let mut st = self.lock().await;
        if matches.is_none() {
            st.assign_txid(txn).await?;
            st = self.take_write_lock(st, txn, table.oid).await?;
        }
        loop {
            let found = walk!(st, btree::get_with_leaf(&st.store, table.root, key))?;
            let Some((leaf, payload)) = found else {
                return Ok(RowOutcome::NotFound);
            };
            let versions = decode_versions(&payload)?;
            // The version the snapshot sees, decoded, once it passed `matches`.
            let mut seen: Option<(usize, Vec<Datum>)> = None;
            if let Some(matches) = matches.as_mut() {
                // A version visible to a fixed snapshot stays visible (nothing a
                // snapshot in use can see is pruned), so after a wait below this
                // finds the same version again.
                let snap = txn.snap();
                let Some(v) = walk!(st, Self::visible(&st, &snap, &versions))? else {
                    return Ok(RowOutcome::NotFound);
                };
                let row = row::decode_row(&versions[v].row)?;
                if !matches(&row)? {
                    return Ok(RowOutcome::Skipped);
                }
                seen = Some((v, row));
                if txn.txid == 0 || !txn.holds_table(table.oid) {
                    // Neither awaits with the engine lock released unless it fails
                    // (`CatalogChanged`), so `versions` is still the row's chain.
                    st.assign_txid(txn).await?;
                    st = self.take_write_lock(st, txn, table.oid).await?;
                }
            }
            let check = walk!(st, Self::check_write(&st, txn, &versions))?;
            let idx = match check {
                w @ (WriteCheck::Wait(_) | WriteCheck::WaitDurable(_)) => {
                    st = self.wait_out(st, txn, w).await?;
                    continue;
                }
                WriteCheck::Proceed(None) => return Ok(RowOutcome::NotFound),
                WriteCheck::Proceed(Some(i)) => i,
            };
            let current = match seen {
                Some((v, row)) if v == idx => row,
                _ => row::decode_row(&versions[idx].row)?,
            };
            let action = decide(&current)?;
            // A new version whose indexed columns changed needs new index entries
            // (after the uniqueness check); one that keeps them needs nothing.
            let mut entries = Vec::new();
            if let RowAction::Update(new_row) = &action {
                let mut wait = None;
                for index in table.secondary_indexes() {
                    if index::same_key(index, &current, new_row) {
                        continue;
                    }
                    let (k, has_null) = index::index_key(index, new_row)?;
                    if index.unique && !has_null {
                        match walk!(
                            st,
                            index::unique_check(&st, txn, table.root, index, &k, key)
                        )? {
                            index::Conflict::None => {}
                            index::Conflict::Violation(pk) => {
                                return Err(unique_violation(table, index, new_row, pk))
                            }
                            index::Conflict::Wait(h) => {
                                wait = Some(WriteCheck::Wait(h));
                                break;
                            }
                            index::Conflict::WaitDurable(l) => {
                                wait = Some(WriteCheck::WaitDurable(l));
                                break;
                            }
                        }
                    }
                    entries.push((index.root, index::entry_key(&k, key)));
                }
                if let Some(w) = wait {
                    st = self.wait_out(st, txn, w).await?;
                    continue;
                }
            }
            let mut versions = versions;
            let result = match action {
                RowAction::Skip => return Ok(RowOutcome::Skipped),
                RowAction::Lock => {
                    let v = &mut versions[idx];
                    if v.xmax != 0 && st.owner(v.xmax) == txn.txid {
                        return Ok(RowOutcome::Done(current));
                    }
                    v.xmax = txn.write_xid;
                    v.xmax_cid = txn.cid;
                    v.flags |= FLAG_LOCK_ONLY;
                    current
                }
                RowAction::Delete => {
                    let v = &mut versions[idx];
                    v.xmax = txn.write_xid;
                    v.xmax_cid = txn.cid;
                    v.flags &= !FLAG_LOCK_ONLY;
                    current
                }
                RowAction::Update(new_row) => {
                    {
                        let v = &mut versions[idx];
                        v.xmax = txn.write_xid;
                        v.xmax_cid = txn.cid;
                        v.flags &= !FLAG_LOCK_ONLY;
                    }
                    let mut buf = Vec::with_capacity(64);
                    row::encode_row(&new_row, &mut buf);
                    versions.insert(0, txn.new_version(buf));
                    new_row
                }
            };
            st.store_versions(txn, table.root, key, Some(leaf), &versions, &entries)
                .await?;
            return Ok(RowOutcome::Done(result));
        }
    }

    /// Inserts a new row under `key`. A live or in-doubt row with the same key is a
    /// unique violation (after waiting for its writer to finish).
    pub async fn insert_row(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        key: &[u8],
        row: &[Datum],
        constraint: &str,
    ) -> Result<(), EngineError> {
        let mut buf = Vec::with_capacity(64);
        row::encode_row(row, &mut buf);
        // Every secondary index gets an entry: (index, encoded key, has a NULL).
        let mut keys = Vec::new();
        for index in table.secondary_indexes() {
            let (k, has_null) = index::index_key(index, row)?;
            keys.push((index, k, has_null));
        }
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        let mut st = self.take_write_lock(st, txn, table.oid).await?;
        'retry: loop {
            let existing = walk!(st, btree::get(&st.store, table.root, key))?;
            let mut versions = match existing {
                Some(p) => decode_versions(&p)?,
                None => vec![],
            };
            if !versions.is_empty() {
                // Is any version live (or possibly live) for uniqueness purposes?
                let mut conflict = None;
                for v in &versions {
                    let created = if st.owner(v.xmin) == txn.txid {
                        TxnState::Committed(Lsn::ZERO)
                    } else {
                        walk!(st, st.txn_state(v.xmin))?
                    };
                    match created {
                        TxnState::Aborted => continue,
                        TxnState::InProgress => {
                            conflict = Some(WriteCheck::Wait(v.xmin));
                            break;
                        }
                        TxnState::Committed(_) => {}
                    }
                    let deleted = if v.xmax == 0 || v.flags & FLAG_LOCK_ONLY != 0 {
                        TxnState::Aborted
                    } else if st.owner(v.xmax) == txn.txid {
                        TxnState::Committed(Lsn::ZERO)
                    } else {
                        walk!(st, st.txn_state(v.xmax))?
                    };
                    match deleted {
                        TxnState::Committed(l) if l > st.store.volume.vdl() => {
                            conflict = Some(WriteCheck::WaitDurable(l))
                        }
                        TxnState::Committed(_) => {}
                        TxnState::InProgress => conflict = Some(WriteCheck::Wait(v.xmax)),
                        TxnState::Aborted => {
                            return Err(EngineError::UniqueViolation {
                                constraint: constraint.to_string(),
                                detail: String::new(),
                                key: key.to_vec(),
                            })
                        }
                    }
                    break;
                }
                if let Some(w) = conflict {
                    st = self.wait_out(st, txn, w).await?;
                    continue;
                }
            }
            for (index, k, has_null) in &keys {
                if !index.unique || *has_null {
                    continue;
                }
                match walk!(st, index::unique_check(&st, txn, table.root, index, k, key))? {
                    index::Conflict::None => {}
                    index::Conflict::Violation(pk) => {
                        return Err(unique_violation(table, index, row, pk))
                    }
                    index::Conflict::Wait(holder) => {
                        Self::check_cancel(txn)?;
                        self.wait_for_txn(st, txn.txid, holder).await?;
                        st = self.lock().await;
                        continue 'retry;
                    }
                    index::Conflict::WaitDurable(l) => {
                        drop(st);
                        self.inner.volume.wait_durable(l).await?;
                        st = self.lock().await;
                        continue 'retry;
                    }
                }
            }
            let entries: Vec<(PageNo, Vec<u8>)> = keys
                .iter()
                .map(|(index, k, _)| (index.root, index::entry_key(k, key)))
                .collect();
            versions.insert(0, txn.new_version(buf));
            st.store_versions(txn, table.root, key, None, &versions, &entries)
                .await?;
            return Ok(());
        }
    }

    /// Inserts a batch of new rows (`keys[i]` is the clustered key of `rows[i]`)
    /// under one hold of the engine lock: the bulk path of COPY FROM and
    /// INSERT ... SELECT.
    ///
    /// The checks of [`Engine::insert_row`] run first for every row (a live or
    /// in-doubt row with the key, unique indexes, and duplicates within the batch),
    /// before anything is written; a wait for another transaction releases the
    /// lock and redoes the checks. Then the rows go into the table in key order and
    /// the entries into each index in entry order, a run of items per leaf as one
    /// MTR (`btree::put_run`): rows arriving in key order (hidden row ids, a load
    /// sorted by primary key) become whole-page records instead of one descent and
    /// one record per row. A row and its index entries are no longer one MTR, which
    /// is safe because nobody sees either before the transaction commits: the
    /// engine lock is held throughout, and after a crash the transaction counts as
    /// aborted.
    ///
    /// On a violation nothing is written and the error names the first offending
    /// row in batch order.
    pub async fn insert_rows(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        keys: &[Vec<u8>],
        rows: &[Vec<Datum>],
        constraint: &str,
    ) -> Result<(), BatchError> {
        if keys.len() != rows.len() {
            return Err(
                EngineError::Internal("batch keys and rows differ in length".into()).into(),
            );
        }
        Self::check_cancel(txn)?;
        let n = rows.len();
        let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(n);
        for row in rows {
            let mut buf = Vec::with_capacity(64);
            row::encode_row(row, &mut buf);
            encoded.push(buf);
        }
        let indexes: Vec<&IndexDef> = table.secondary_indexes().collect();
        // index_keys[j][i]: (key of row i in index j, it has a NULL).
        let mut index_keys: Vec<Vec<(Vec<u8>, bool)>> = Vec::with_capacity(indexes.len());
        for index in &indexes {
            let mut ks = Vec::with_capacity(n);
            for row in rows {
                ks.push(index::index_key(index, row)?);
            }
            index_keys.push(ks);
        }
        // Duplicates inside the batch: the later row (in batch order) is the one
        // that violates, as if the rows were inserted one by one.
        let mut first_violation: Option<(usize, EngineError)> = None;
        let note = |slot: &mut Option<(usize, EngineError)>, i: usize, e: EngineError| {
            if slot.as_ref().is_none_or(|(r, _)| i < *r) {
                *slot = Some((i, e));
            }
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
        for w in order.windows(2) {
            if keys[w[0]] == keys[w[1]] {
                let e = EngineError::UniqueViolation {
                    constraint: constraint.to_string(),
                    detail: String::new(),
                    key: keys[w[1]].clone(),
                };
                note(&mut first_violation, w[0].max(w[1]), e);
            }
        }
        for (j, index) in indexes.iter().enumerate() {
            if !index.unique {
                continue;
            }
            let ks = &index_keys[j];
            let mut by_key: Vec<usize> = (0..n).filter(|&i| !ks[i].1).collect();
            by_key.sort_by(|&a, &b| ks[a].0.cmp(&ks[b].0));
            for w in by_key.windows(2) {
                if ks[w[0]].0 == ks[w[1]].0 {
                    let (early, late) = (w[0].min(w[1]), w[0].max(w[1]));
                    let e = unique_violation(table, index, &rows[late], keys[early].clone());
                    note(&mut first_violation, late, e);
                }
            }
        }
        if let Some((row, error)) = first_violation.take() {
            return Err(BatchError {
                row: Some(row),
                error,
            });
        }
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        let mut st = self.take_write_lock(st, txn, table.oid).await?;
        // Hidden row ids come from the table's row-id sequence, whose ids are never
        // handed out twice (`next_rowid`): no version of such a key can exist, and
        // looking for one cost a B+tree descent per row, a tenth of a COPY.
        let fresh_keys = table.rowid_seq.is_some();
        loop {
            let mut violation: Option<(usize, EngineError)> = None;
            let mut wait: Option<WriteCheck> = None;
            let mut existing: Vec<Option<Vec<Version>>> = vec![None; n];
            for i in 0..n {
                if violation.as_ref().is_some_and(|(r, _)| *r < i) {
                    break;
                }
                let mut conflicts = Vec::new();
                let found = if fresh_keys {
                    None
                } else {
                    walk!(st, btree::get(&st.store, table.root, &keys[i]))?
                };
                if let Some(p) = found {
                    let versions = decode_versions(&p)?;
                    match walk!(st, st.key_conflict(txn, &versions))? {
                        index::Conflict::Violation(_) => {
                            conflicts.push(index::Conflict::Violation(keys[i].clone()))
                        }
                        c => conflicts.push(c),
                    }
                    existing[i] = Some(versions);
                }
                for (j, index) in indexes.iter().enumerate() {
                    let (k, has_null) = &index_keys[j][i];
                    if !index.unique || *has_null {
                        continue;
                    }
                    match walk!(
                        st,
                        index::unique_check(&st, txn, table.root, index, k, &keys[i])
                    )? {
                        index::Conflict::Violation(pk) => {
                            let e = unique_violation(table, index, &rows[i], pk);
                            note(&mut violation, i, e);
                        }
                        c => conflicts.push(c),
                    }
                }
                for c in conflicts {
                    match c {
                        index::Conflict::None => {}
                        index::Conflict::Violation(key) => note(
                            &mut violation,
                            i,
                            EngineError::UniqueViolation {
                                constraint: constraint.to_string(),
                                detail: String::new(),
                                key,
                            },
                        ),
                        index::Conflict::Wait(x) => {
                            wait.get_or_insert(WriteCheck::Wait(x));
                        }
                        index::Conflict::WaitDurable(l) => {
                            wait.get_or_insert(WriteCheck::WaitDurable(l));
                        }
                    }
                }
            }
            if let Some((row, error)) = violation {
                return Err(BatchError {
                    row: Some(row),
                    error,
                });
            }
            if let Some(w) = wait {
                st = self.wait_out(st, txn, w).await?;
                continue;
            }
            let mut items = Vec::with_capacity(n);
            for &i in &order {
                let mut versions = match existing[i].take() {
                    Some(v) => walk!(st, st.prune(&v))?,
                    None => Vec::new(),
                };
                versions.insert(0, txn.new_version(std::mem::take(&mut encoded[i])));
                items.push(btree::make_item(&keys[i], &encode_versions(&versions)));
            }
            st.put_items(txn, table.root, &items).await?;
            drop(items);
            for (j, index) in indexes.iter().enumerate() {
                let mut entries: Vec<(Vec<u8>, usize)> = (0..n)
                    .map(|i| (index::entry_key(&index_keys[j][i].0, &keys[i]), i))
                    .collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let items: Vec<Vec<u8>> = entries
                    .iter()
                    .map(|(e, i)| btree::make_item(e, &keys[*i]))
                    .collect();
                st.put_items(txn, index.root, &items).await?;
            }
            return Ok(());
        }
    }

    /// Scans rows visible to `txn` with keys in [`from`, `to`), calling `visit` on
    /// each until it returns false. Rows are produced in key order.
    pub async fn scan(
        &self,
        txn: &Txn,
        root: PageNo,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        visit: &mut (dyn FnMut(&[u8], Vec<Datum>) -> Result<bool, EngineError> + Send),
    ) -> Result<(), EngineError> {
        let snap = txn.snap();
        // A point lookup needs one item, not a leaf's worth.
        if let (Bound::Included(a), Bound::Included(b)) = (&from, &to) {
            if a == b {
                if let Some(row) = self.get_row(txn, root, a).await? {
                    visit(a, row)?;
                }
                return Ok(());
            }
        }
        let mut resume: Option<Vec<u8>> = match &from {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.clone()),
            Bound::Unbounded => None,
        };
        let mut leaf: Option<PageNo> = None;
        loop {
            Self::check_cancel(txn)?;
            let batch = {
                let mut st = self.lock().await;
                let leaf_no = match leaf {
                    Some(p) => p,
                    None => walk!(
                        st,
                        btree::leaf_of(&st.store, root, resume.as_deref().unwrap_or(&[]))
                    )?,
                };
                walk!(
                    st,
                    Self::collect_batch(&st, &snap, leaf_no, resume.as_deref(), &from, &to)
                )?
            };
            for (key, row) in batch.rows {
                if !visit(&key, row)? {
                    return Ok(());
                }
            }
            if batch.done || batch.next_leaf == 0 {
                return Ok(());
            }
            leaf = Some(batch.next_leaf);
            resume = None;
        }
    }

    /// The visible rows of one leaf from `resume` up to the end bound, decoded
    /// straight from the cached page (only matching items are copied out).
    fn collect_batch(
        st: &State,
        snap: &Snapshot,
        leaf_no: PageNo,
        resume: Option<&[u8]>,
        from: &Bound<Vec<u8>>,
        to: &Bound<Vec<u8>>,
    ) -> Result<ScanBatch, EngineError> {
        let page = st.store.page(leaf_no)?;
        let mut rows = Vec::new();
        let next = btree::leaf_range(page, leaf_no, resume, from, to, |key, payload| {
            let versions = decode_version_refs(payload)?;
            if let Some(v) = Self::visible(st, snap, &versions)? {
                rows.push((key.to_vec(), row::decode_row(versions[v].row)?));
            }
            Ok(())
        })?;
        Ok(ScanBatch {
            rows,
            next_leaf: next.unwrap_or(0),
            done: next.is_none(),
        })
    }

    /// Point lookup of the version of `key` visible to `txn`.
    pub async fn get_row(
        &self,
        txn: &Txn,
        root: PageNo,
        key: &[u8],
    ) -> Result<Option<Vec<Datum>>, EngineError> {
        let snap = txn.snap();
        let mut st = self.lock().await;
        walk!(st, Self::visible_row(&st, &snap, root, key))
    }

    /// The decoded version of `key` visible to `snap`, read in place from the cached
    /// leaf: only that one row is copied out. A `PageMiss` (tree or CLOG page) makes
    /// the caller load the page and run the whole read again, which is harmless.
    fn visible_row(
        st: &State,
        snap: &Snapshot,
        root: PageNo,
        key: &[u8],
    ) -> Result<Option<Vec<Datum>>, EngineError> {
        let Some(payload) = btree::get_in_place(&st.store, root, key)? else {
            return Ok(None);
        };
        let versions = decode_version_refs(payload)?;
        match Self::visible(st, snap, &versions)? {
            Some(i) => Ok(Some(row::decode_row(versions[i].row)?)),
            None => Ok(None),
        }
    }

    fn visible<V: VersionHeader>(
        st: &State,
        snap: &Snapshot,
        versions: &[V],
    ) -> Result<Option<usize>, EngineError> {
        for (i, v) in versions.iter().enumerate() {
            let (v_xmin, v_xmin_cid, v_xmax, v_xmax_cid, v_flags) = v.header();
            let xmin = st.owner(v_xmin);
            let created = if xmin == snap.txid {
                TxnState::InProgress
            } else {
                st.txn_state(v_xmin)?
            };
            if !snap.sees(xmin, v_xmin_cid, created) {
                continue;
            }
            if v_xmax != 0 && v_flags & FLAG_LOCK_ONLY == 0 {
                let xmax = st.owner(v_xmax);
                let deleted = if xmax == snap.txid {
                    TxnState::InProgress
                } else {
                    st.txn_state(v_xmax)?
                };
                if snap.sees(xmax, v_xmax_cid, deleted) {
                    return Ok(None);
                }
            }
            return Ok(Some(i));
        }
        Ok(None)
    }

    // ---- catalog ----

    fn catalog_table() -> TableDef {
        TableDef {
            oid: 0,
            name: "borealis_catalog".into(),
            kind: RelKind::Table,
            columns: vec![],
            pk: vec![0],
            pk_name: None,
            root: CATALOG_ROOT,
            indexes: vec![],
            checks: vec![],
            rowid_seq: None,
            sequence: None,
            stats: None,
        }
    }

    /// All relations visible to `txn` (as of its catalog floor if that is newer
    /// than its snapshot).
    pub async fn relations(&self, txn: &Txn) -> Result<Vec<Arc<TableDef>>, EngineError> {
        if txn.catalog_floor > txn.snapshot {
            let mut view = txn.clone();
            view.snapshot = txn.catalog_floor;
            view.catalog_floor = Lsn::ZERO;
            return Box::pin(self.relations(&view)).await;
        }
        if !txn.catalog_dirty {
            let st = self.lock().await;
            if let Some((from, list)) = &st.catalog_cached {
                if txn.snapshot >= st.catalog_commit_lsn && *from >= st.catalog_commit_lsn {
                    return Ok(list.as_ref().clone());
                }
            }
        }
        let out = self.scan_relations(txn).await?;
        if !txn.catalog_dirty {
            let mut st = self.lock().await;
            if txn.snapshot >= st.catalog_commit_lsn {
                st.catalog_cached = Some((txn.snapshot, Arc::new(out.clone())));
            }
        }
        Ok(out)
    }

    async fn scan_relations(&self, txn: &Txn) -> Result<Vec<Arc<TableDef>>, EngineError> {
        let mut out = Vec::new();
        let mut err = None;
        self.scan(
            txn,
            CATALOG_ROOT,
            Bound::Unbounded,
            Bound::Unbounded,
            &mut |_, row| {
                match row.first() {
                    Some(Datum::Text(json)) => match self.decode_relation(json) {
                        Ok(def) => out.push(def),
                        Err(e) => err = Some(e),
                    },
                    _ => {
                        err = Some(EngineError::Corrupt(
                            "catalog entry without definition".into(),
                        ))
                    }
                }
                Ok(true)
            },
        )
        .await?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Decodes a catalog entry, memoized by its exact text: statements read the
    /// catalog at their own snapshot every time, but the entries rarely change.
    fn decode_relation(&self, json: &str) -> Result<Arc<TableDef>, EngineError> {
        let mut cache = self
            .inner
            .catalog_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(def) = cache.get(json) {
            return Ok(def.clone());
        }
        let def = Arc::new(
            serde_json::from_str::<TableDef>(json)
                .map_err(|e| EngineError::Corrupt(format!("catalog entry: {e}")))?,
        );
        if cache.len() >= CATALOG_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(json.to_string(), def.clone());
        Ok(def)
    }

    pub async fn relation(
        &self,
        txn: &Txn,
        name: &str,
    ) -> Result<Option<Arc<TableDef>>, EngineError> {
        Ok(self
            .relations(txn)
            .await?
            .into_iter()
            .find(|t| t.name == name))
    }

    /// Allocates an OID and a fresh B+tree root page (recorded as garbage should
    /// the transaction abort, see `space`).
    pub async fn allocate_relation(&self, txn: &mut Txn) -> Result<(u32, PageNo), EngineError> {
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        let oid = st.next_oid;
        st.next_oid += 1;
        let next_oid = st.superblock_op(SB_NEXT_OID, st.next_oid as u64);
        let root = st.new_tree(txn, vec![next_oid]).await?;
        Ok((oid, root))
    }

    /// Stores (inserts or replaces) a relation definition in the catalog. Trees the
    /// old definition had and the new one does not (TRUNCATE, rewrites, dropped
    /// indexes) are retired: freed once the change commits and no snapshot sees them.
    pub async fn put_relation(
        &self,
        txn: &mut Txn,
        def: &TableDef,
        create: bool,
    ) -> Result<(), EngineError> {
        txn.catalog_dirty = true;
        let key = row::encode_key(&[Datum::Int8(def.oid as i64)])?;
        let json = serde_json::to_string(def).map_err(|e| EngineError::Internal(e.to_string()))?;
        let row = vec![Datum::Text(json)];
        let cat = Self::catalog_table();
        if create {
            return self
                .insert_row(txn, &cat, &key, &row, "borealis_catalog_pkey")
                .await;
        }
        let mut action = Some(RowAction::Update(row));
        let mut old = None;
        match self
            .modify_row(txn, &cat, &key, &mut |row| {
                old = row.first().cloned();
                Ok(action.take().unwrap_or(RowAction::Skip))
            })
            .await?
        {
            RowOutcome::Done(_) => {
                let kept = space::roots_of(def);
                let gone: Vec<PageNo> = Self::roots_of_entry(old)?
                    .into_iter()
                    .filter(|r| !kept.contains(r))
                    .collect();
                self.retire_trees(txn, &gone).await
            }
            _ => Err(EngineError::Internal(format!(
                "catalog entry {} vanished",
                def.oid
            ))),
        }
    }

    /// Deletes a relation's catalog entry; its trees are retired (see `put_relation`).
    pub async fn drop_relation(&self, txn: &mut Txn, oid: u32) -> Result<(), EngineError> {
        txn.catalog_dirty = true;
        let key = row::encode_key(&[Datum::Int8(oid as i64)])?;
        let mut old = None;
        let outcome = self
            .modify_row(txn, &Self::catalog_table(), &key, &mut |row| {
                old = row.first().cloned();
                Ok(RowAction::Delete)
            })
            .await?;
        if let RowOutcome::Done(_) = outcome {
            let gone = Self::roots_of_entry(old)?;
            self.retire_trees(txn, &gone).await?;
        }
        Ok(())
    }

    /// The trees of a catalog entry as `modify_row` showed it (its text column).
    fn roots_of_entry(entry: Option<Datum>) -> Result<Vec<PageNo>, EngineError> {
        let Some(Datum::Text(json)) = entry else {
            return Ok(Vec::new());
        };
        let def: TableDef = serde_json::from_str(&json)
            .map_err(|e| EngineError::Corrupt(format!("catalog entry: {e}")))?;
        Ok(space::roots_of(&def))
    }

    // ---- sequences (non-transactional, like PostgreSQL's) ----

    /// Creates or resets a sequence's state: the next `nextval` returns `value` if
    /// `is_called` is false, else value + increment.
    pub async fn set_sequence(
        &self,
        txn: &mut Txn,
        oid: u32,
        value: i64,
        is_called: bool,
    ) -> Result<(), EngineError> {
        let key = row::encode_key(&[Datum::Int8(oid as i64)])?;
        let mut payload = value.to_le_bytes().to_vec();
        payload.push(is_called as u8);
        let mut st = self.lock().await;
        let mut alloc = st.alloc();
        let ops = walk!(
            st,
            btree::put(&st.store, SEQUENCES_ROOT, &key, &payload, &mut alloc)
        )?;
        st.write_mtr(txn, ops, Some(alloc)).await?;
        Ok(())
    }

    /// A hidden row id for a table without a primary key. Ids are reserved from the
    /// table's row-id sequence a block at a time (one redo record per block, not per
    /// row); ids of a block unused at a crash are skipped, never reused.
    pub async fn next_rowid(&self, txn: &mut Txn, seq: &TableDef) -> Result<i64, EngineError> {
        {
            let mut blocks = self
                .inner
                .rowid_blocks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((next, end)) = blocks.get_mut(&seq.oid) {
                if *next < *end {
                    *next += 1;
                    return Ok(*next - 1);
                }
            }
        }
        let key = row::encode_key(&[Datum::Int8(seq.oid as i64)])?;
        let first = {
            let mut st = self.lock().await;
            let cur = walk!(st, btree::get(&st.store, SEQUENCES_ROOT, &key))?;
            let first = match cur.as_deref() {
                Some([v @ .., c]) if v.len() == 8 => {
                    let value = i64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
                    if *c != 0 {
                        value + 1
                    } else {
                        value
                    }
                }
                _ => 1,
            };
            let last = first + ROWID_BLOCK - 1;
            let mut payload = last.to_le_bytes().to_vec();
            payload.push(1);
            let mut alloc = st.alloc();
            let ops = walk!(
                st,
                btree::put(&st.store, SEQUENCES_ROOT, &key, &payload, &mut alloc)
            )?;
            st.write_mtr(txn, ops, Some(alloc)).await?;
            first
        };
        let mut blocks = self
            .inner
            .rowid_blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        blocks.insert(seq.oid, (first + 1, first + ROWID_BLOCK));
        Ok(first)
    }

    pub async fn nextval(&self, txn: &mut Txn, seq: &TableDef) -> Result<i64, EngineError> {
        let def = seq
            .sequence
            .as_ref()
            .ok_or_else(|| EngineError::Internal("not a sequence".into()))?;
        let key = row::encode_key(&[Datum::Int8(seq.oid as i64)])?;
        let mut st = self.lock().await;
        let cur = walk!(st, btree::get(&st.store, SEQUENCES_ROOT, &key))?;
        let (value, called) = match cur.as_deref() {
            Some([v @ .., c]) if v.len() == 8 => {
                (i64::from_le_bytes(v.try_into().unwrap_or([0; 8])), *c != 0)
            }
            _ => (def.start, false),
        };
        let mut next = if called {
            value.checked_add(def.increment)
        } else {
            Some(value)
        };
        if let Some(n) = next {
            if n > def.max_value || n < def.min_value {
                next = if def.cycle {
                    Some(if def.increment > 0 {
                        def.min_value
                    } else {
                        def.max_value
                    })
                } else {
                    None
                };
            }
        }
        let Some(next) = next else {
            return Err(EngineError::SequenceLimit(format!(
                "nextval: reached maximum value of sequence \"{}\" ({})",
                seq.name, def.max_value
            )));
        };
        let mut payload = next.to_le_bytes().to_vec();
        payload.push(1);
        let mut alloc = st.alloc();
        let ops = walk!(
            st,
            btree::put(&st.store, SEQUENCES_ROOT, &key, &payload, &mut alloc)
        )?;
        st.write_mtr(txn, ops, Some(alloc)).await?;
        Ok(next)
    }

    /// Current value without advancing (for `currval`-like needs and tests).
    pub async fn sequence_state(&self, oid: u32) -> Result<Option<(i64, bool)>, EngineError> {
        let key = row::encode_key(&[Datum::Int8(oid as i64)])?;
        let mut st = self.lock().await;
        let cur = walk!(st, btree::get(&st.store, SEQUENCES_ROOT, &key))?;
        Ok(match cur.as_deref() {
            Some([v @ .., c]) if v.len() == 8 => {
                Some((i64::from_le_bytes(v.try_into().unwrap_or([0; 8])), *c != 0))
            }
            _ => None,
        })
    }

    /// A fresh, empty B+tree for `txn` (TRUNCATE's new trees, index builds); it is
    /// freed again should the transaction abort.
    pub async fn new_root(&self, txn: &mut Txn) -> Result<PageNo, EngineError> {
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        st.new_tree(txn, Vec::new()).await
    }

    /// Records that `txn`'s current (sub)transaction no longer uses the trees at
    /// `roots`: they are freed once it commits and no snapshot can see them.
    async fn retire_trees(&self, txn: &mut Txn, roots: &[PageNo]) -> Result<(), EngineError> {
        let mut st = self.lock().await;
        for &root in roots {
            st.record_garbage(txn, space::When::IfCommitted, Some(root), Vec::new())
                .await?;
        }
        Ok(())
    }

    /// Frees the trees of finished transactions that no snapshot can see any more
    /// (see `space`): DROP, TRUNCATE and table rewrites once committed, the trees of
    /// CREATE and of rolled-back rewrites once aborted. Runs in the background and
    /// at VACUUM; one tree per MTR.
    pub async fn reclaim(&self) -> Result<ReclaimStats, EngineError> {
        let _one = self.inner.reclaiming.lock().await;
        let mut stats = ReclaimStats::default();
        let mut st = self.lock().await;
        if st.garbage_root == 0 {
            return Ok(stats);
        }
        let mut entries = Vec::new();
        let mut leaf: Option<PageNo> = None;
        loop {
            let root = st.garbage_root;
            let batch = match leaf {
                None => walk!(st, btree::scan_leaf_from(&st.store, root, None))?,
                Some(p) => walk!(st, btree::read_leaf(&st.store, p, None))?,
            };
            for (key, payload) in &batch.items {
                match space::decode_garbage(key, payload) {
                    Ok(g) => entries.push(g),
                    Err(e) => {
                        // Left in place: what it names cannot be known, so nothing
                        // is freed for it.
                        log::error!("garbage tree: {e}");
                    }
                }
            }
            if batch.next_leaf == 0 {
                break;
            }
            leaf = Some(batch.next_leaf);
        }
        let horizon = st.prune_horizon();
        let mut txn = self.begin(Isolation::ReadCommitted, false);
        for g in entries {
            let free = match walk!(st, st.txn_state(g.xid))? {
                TxnState::InProgress => continue,
                TxnState::Committed(lsn) => match g.when {
                    space::When::IfCommitted if lsn > horizon => continue,
                    space::When::IfCommitted => true,
                    space::When::IfAborted => false,
                },
                TxnState::Aborted => g.when == space::When::IfAborted,
            };
            let pages = if free {
                let walked = async {
                    let mut w = space::TreeWalk::new(g.root, st.next_page)?;
                    loop {
                        match w.step(&st.store) {
                            Ok(()) => return Ok(w.pages()),
                            Err(EngineError::PageMiss(p)) => st.store.load(p).await?,
                            Err(e) => return Err(e),
                        }
                    }
                }
                .await;
                match walked {
                    Ok(pages) => pages,
                    Err(e @ EngineError::Corrupt(_)) => {
                        // Freeing what is not certainly this tree's could hand a
                        // live page out twice: leave the entry (and the pages).
                        log::error!("not freeing the tree at page {}: {e}", g.root);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                Vec::new()
            };
            let mut ops = walk!(st, btree::delete(&st.store, st.garbage_root, &g.key))?;
            if pages.is_empty() {
                st.write_mtr(&mut txn, ops, None).await?;
            } else {
                // Mirrored to fill the head page's spare room first; without it
                // (unreadable) the pages go on new list pages linked in front of it.
                st.mirror_free(1).await;
                // The list changes in memory only once the MTR is written: a failed
                // write must not leave pages on it that are still in use.
                let mut free_list = st.free.clone();
                free_list.push_ops(&pages, &mut ops);
                ops.push(st.superblock_op(SB_FREE_HEAD, free_list.head));
                ops.push(st.superblock_op(SB_FREE_PAGES, free_list.total));
                st.write_mtr(&mut txn, ops, None).await?;
                st.free = free_list;
            }
            stats.trees_freed += free as u64;
            stats.pages_freed += pages.len() as u64;
        }
        Ok(stats)
    }

    /// VACUUM: rewrites every row whose version chain holds versions no snapshot can
    /// see any more, and removes rows deleted at or below the prune horizon. Works
    /// leaf by leaf under the engine lock, so writers interleave. Pruning only shrinks
    /// items, so leaves never split under it and the leaf chain can be followed.
    pub async fn vacuum(&self, root: PageNo) -> Result<VacuumStats, EngineError> {
        let mut txn = self.begin(Isolation::ReadCommitted, false);
        let mut stats = VacuumStats::default();
        let mut leaf: Option<PageNo> = None;
        loop {
            let mut st = self.lock().await;
            let batch = match leaf {
                None => walk!(st, btree::scan_leaf_from(&st.store, root, None))?,
                Some(p) => walk!(st, btree::read_leaf(&st.store, p, None))?,
            };
            let horizon = st.prune_horizon();
            for (key, payload) in batch.items {
                stats.rows_scanned += 1;
                let versions = decode_versions(&payload)?;
                let before = versions.len();
                let pruned = walk!(st, st.prune(&versions))?;
                let dead = match pruned.as_slice() {
                    [] => true,
                    [only] if only.xmax != 0 && only.flags & FLAG_LOCK_ONLY == 0 => {
                        matches!(walk!(st, st.txn_state(only.xmax))?, TxnState::Committed(l) if l <= horizon)
                    }
                    _ => false,
                };
                let ops = if dead {
                    stats.rows_removed += 1;
                    walk!(st, btree::delete(&st.store, root, &key))?
                } else if pruned.len() < before {
                    stats.versions_removed += (before - pruned.len()) as u64;
                    let mut alloc = st.alloc();
                    let ops = walk!(
                        st,
                        btree::put(&st.store, root, &key, &encode_versions(&pruned), &mut alloc)
                    )?;
                    if alloc.taken > 0 {
                        return Err(EngineError::Internal("vacuum would split a page".into()));
                    }
                    ops
                } else {
                    continue;
                };
                if !ops.is_empty() {
                    st.write_mtr(&mut txn, ops, None).await?;
                }
            }
            if batch.next_leaf == 0 {
                break;
            }
            leaf = Some(batch.next_leaf);
        }
        Ok(stats)
    }

    /// Fills the fresh, empty tree at `root` with `rows` (sorted by key, keys unique;
    /// the caller checks) as new versions of `txn`, writing whole pages (one record
    /// per page) rather than a record per row. Nothing points at the new pages until
    /// the last MTR rewrites the root, so a crash midway leaves the tree empty.
    ///
    /// Rows come encoded (`row::encode_row`): a table rewrite encodes each row as
    /// it scans it instead of holding the whole table as datums.
    pub async fn bulk_load(
        &self,
        txn: &mut Txn,
        root: PageNo,
        rows: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), EngineError> {
        let mut st = self.lock().await;
        st.assign_txid(txn).await?;
        let mut items = Vec::with_capacity(rows.len());
        for (key, row) in rows {
            let version = txn.new_version(row);
            items.push(btree::make_item(&key, &encode_versions(&[version])));
        }
        st.mirror_free(bulk_pages(&items)).await;
        let mut alloc = st.alloc();
        let build = btree::bulk_build(root, items, &mut alloc)?;
        st.write_bulk_build(txn, build, alloc).await
    }

    // ---- table locks ----

    /// Takes a table lock until the transaction ends: shared for DML, exclusive for
    /// DDL that changes the table's storage or definition. Index builds rely on it:
    /// once CREATE INDEX holds the exclusive lock, no transaction that wrote the
    /// table is still in progress and none can write it until the index is
    /// committed, so no row escapes the new index.
    ///
    /// Returns true when the caller's catalog may be stale (it waited, or DDL on
    /// the table committed after the transaction's snapshot): it must re-read the
    /// catalog with [`Engine::latest_relations`] before writing. Waits are
    /// deadlock-checked (40P01) and cancelable.
    pub async fn lock_table(
        &self,
        txn: &mut Txn,
        oid: u32,
        mode: TableLockMode,
    ) -> Result<bool, EngineError> {
        let exclusive = mode == TableLockMode::Exclusive;
        if txn
            .table_locks
            .iter()
            .any(|&(o, x)| o == oid && (x || !exclusive))
        {
            // Held: no DDL on the table can have committed since it was taken.
            return Ok(false);
        }
        let mut waited = false;
        loop {
            if let Err(e) = Self::check_cancel(txn) {
                if waited {
                    self.lock().await.forget_exclusive_waiter(oid, txn.txid);
                }
                return Err(e);
            }
            let mut st = self.lock().await;
            st.assign_txid(txn).await?;
            let Some(blockers) = st.try_table_lock(txn, oid, exclusive) else {
                return Ok(waited || st.catalog_stale(txn, oid));
            };
            waited = true;
            let me = txn.txid;
            if let Err(e) = self.wait_for_txns(st, me, &blockers).await {
                self.lock().await.forget_exclusive_waiter(oid, me);
                return Err(e);
            }
        }
    }

    /// The shared lock a row write takes on its table at the transaction's first
    /// write to it (in the same hold of the engine lock as the write, so DML pays
    /// no extra round on the lock). If the statement's catalog may be stale (it had
    /// to wait, or DDL committed after its catalog snapshot) nothing is written and
    /// `CatalogChanged` tells the SQL layer to re-read the catalog and re-run the
    /// statement.
    async fn take_write_lock<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        txn: &mut Txn,
        oid: u32,
    ) -> Result<MutexGuard<'a, State>, EngineError> {
        // The catalog's own table (oid 0) is not locked: DDL serializes on the
        // tables it changes.
        if oid == 0 || txn.holds_table(oid) {
            return Ok(st);
        }
        match st.try_table_lock(txn, oid, false) {
            None if st.catalog_stale(txn, oid) => return Err(EngineError::CatalogChanged),
            None => return Ok(st),
            Some(blockers) => {
                Self::check_cancel(txn)?;
                self.wait_for_txns(st, txn.txid, &blockers).await?;
            }
        }
        // Wait (however long the DDL takes) until the lock is granted, then have
        // the statement re-run on the catalog the DDL left behind.
        loop {
            Self::check_cancel(txn)?;
            let mut st = self.lock().await;
            match st.try_table_lock(txn, oid, false) {
                None => return Err(EngineError::CatalogChanged),
                Some(blockers) => self.wait_for_txns(st, txn.txid, &blockers).await?,
            }
        }
    }

    /// Makes the transaction read the newest committed catalog from now on (after
    /// `CatalogChanged` or a stale `lock_table`), and under READ COMMITTED moves the
    /// statement's snapshot past the lock wait, as PostgreSQL takes its snapshot
    /// after locking. DDL releases its exclusive lock only once its commit is
    /// durable, so VDL covers it.
    pub fn refresh_catalog_view(&self, txn: &mut Txn) {
        let vdl = self.inner.volume.vdl();
        txn.catalog_floor = txn.catalog_floor.max(vdl);
        if txn.isolation == Isolation::ReadCommitted && vdl > txn.snapshot {
            txn.snapshot = vdl;
            txn.read_point = Some(self.inner.read_points.hold(vdl));
        }
    }

    // ---- secondary indexes ----

    /// Scans `index` over entry keys in [`from`, `to`) and calls `visit` with the
    /// clustered key and the row version visible to `txn`, in index order, until it
    /// returns false. An entry yields its row only if the visible version still has
    /// the entry's indexed values (entries of old versions stay until VACUUM).
    pub async fn index_scan(
        &self,
        txn: &Txn,
        table: &TableDef,
        index: &IndexDef,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        visit: &mut (dyn FnMut(&[u8], Vec<Datum>) -> Result<bool, EngineError> + Send),
    ) -> Result<(), EngineError> {
        let snap = txn.snap();
        let mut resume: Option<Vec<u8>> = match &from {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.clone()),
            Bound::Unbounded => None,
        };
        let mut leaf: Option<PageNo> = None;
        loop {
            Self::check_cancel(txn)?;
            let (rows, next_leaf, done) = {
                let mut st = self.lock().await;
                let leaf_no = match leaf {
                    Some(p) => p,
                    None => walk!(
                        st,
                        btree::leaf_of(&st.store, index.root, resume.as_deref().unwrap_or(&[]))
                    )?,
                };
                let batch = walk!(
                    st,
                    index::entry_batch(&st, leaf_no, resume.as_deref(), &from, &to)
                )?;
                let mut rows = Vec::with_capacity(batch.entries.len());
                for (entry, pk) in batch.entries {
                    let Some(row) = walk!(st, Self::visible_row(&st, &snap, table.root, &pk))?
                    else {
                        continue;
                    };
                    let (k, _) = index::index_key(index, &row)?;
                    if entry.len() == k.len() + pk.len() && entry.starts_with(&k) {
                        rows.push((pk, row));
                    }
                }
                (rows, batch.next_leaf, batch.done)
            };
            for (pk, row) in rows {
                if !visit(&pk, row)? {
                    return Ok(());
                }
            }
            if done || next_leaf == 0 {
                return Ok(());
            }
            leaf = Some(next_leaf);
            resume = None;
        }
    }

    /// Builds the tree of a new secondary index of `table` (whose exclusive lock
    /// `txn` holds) and returns its root. Every version that is not aborted gets an
    /// entry, so snapshots older than the build read through the index correctly;
    /// for a unique index the rows' current versions must not collide. Written
    /// bottom-up, a page per record; nothing points at the pages until the caller
    /// commits the catalog entry naming the root.
    pub async fn build_index(
        &self,
        txn: &mut Txn,
        table: &TableDef,
        index: &IndexDef,
    ) -> Result<PageNo, EngineError> {
        let root = self.new_root(txn).await?;
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        // (index key, clustered key) of each row's current version, for uniqueness.
        let mut current: Vec<(Vec<u8>, Vec<u8>, Vec<Datum>)> = Vec::new();
        let mut leaf: Option<PageNo> = None;
        loop {
            Self::check_cancel(txn)?;
            let mut st = self.lock().await;
            let batch = match leaf {
                None => walk!(st, btree::scan_leaf_from(&st.store, table.root, None))?,
                Some(p) => walk!(st, btree::read_leaf(&st.store, p, None))?,
            };
            for (pk, payload) in batch.items {
                let versions = decode_versions(&payload)?;
                let mut found_current = false;
                for v in &versions {
                    let own = st.owner(v.xmin) == txn.txid;
                    let created = if own {
                        TxnState::Committed(Lsn::ZERO)
                    } else {
                        walk!(st, st.txn_state(v.xmin))?
                    };
                    if created == TxnState::Aborted {
                        continue;
                    }
                    let row = row::decode_row(&v.row)?;
                    let (k, has_null) = index::index_key(index, &row)?;
                    let deleted = v.xmax != 0
                        && v.flags & FLAG_LOCK_ONLY == 0
                        && (st.owner(v.xmax) == txn.txid
                            || matches!(walk!(st, st.txn_state(v.xmax))?, TxnState::Committed(_)));
                    if index.unique && !found_current && !deleted {
                        found_current = true;
                        if !has_null {
                            current.push((k.clone(), pk.clone(), row));
                        }
                    }
                    if entries.len() >= MAX_INDEX_BUILD_ENTRIES {
                        return Err(EngineError::LimitExceeded(format!(
                            "index build over more than {MAX_INDEX_BUILD_ENTRIES} row versions"
                        )));
                    }
                    entries.push((index::entry_key(&k, &pk), pk.clone()));
                }
            }
            if batch.next_leaf == 0 {
                break;
            }
            leaf = Some(batch.next_leaf);
        }
        if index.unique {
            current.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(w) = current.windows(2).find(|w| w[0].0 == w[1].0) {
                let mut e = unique_violation(table, index, &w[0].2, w[1].1.clone());
                if let EngineError::UniqueViolation { detail, .. } = &mut e {
                    *detail = detail.replace("already exists", "is duplicated");
                }
                return Err(e);
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        let items: Vec<Vec<u8>> = entries
            .iter()
            .map(|(k, pk)| btree::make_item(k, pk))
            .collect();
        drop(entries);
        let mut st = self.lock().await;
        st.mirror_free(bulk_pages(&items)).await;
        let mut alloc = st.alloc();
        let build = btree::bulk_build(root, items, &mut alloc)?;
        st.write_bulk_build(txn, build, alloc).await?;
        Ok(root)
    }

    /// How many recent decided transactions the engine keeps in memory (see
    /// `State::txns_keep`; the default suits production, tests lower it to make
    /// pruning happen). Returns how many it holds now.
    pub async fn set_transaction_cache(&self, keep: u64) -> usize {
        let mut st = self.lock().await;
        st.txns_keep = keep.max(1);
        st.txns_prune_at = 2 * st.txns_keep;
        st.txns.len()
    }

    /// VACUUM of a table: its rows (see [`Engine::vacuum`]), then each secondary
    /// index, whose entries are removed once no version of their row (that is not
    /// aborted) carries their key.
    pub async fn vacuum_table(&self, table: &TableDef) -> Result<VacuumStats, EngineError> {
        let mut stats = self.vacuum(table.root).await?;
        for index in table.secondary_indexes() {
            stats.index_entries_removed += self.vacuum_index(table, index).await?;
        }
        Ok(stats)
    }

    /// Removes dead entries of one index, leaf by leaf under the engine lock: the
    /// check and the delete of an entry happen under one hold, so a writer that
    /// adds a version with the entry's key either came before (the entry is kept)
    /// or re-adds the entry after.
    async fn vacuum_index(&self, table: &TableDef, index: &IndexDef) -> Result<u64, EngineError> {
        let mut txn = self.begin(Isolation::ReadCommitted, false);
        let mut removed = 0;
        let mut leaf: Option<PageNo> = None;
        loop {
            let mut st = self.lock().await;
            let batch = match leaf {
                None => walk!(st, btree::scan_leaf_from(&st.store, index.root, None))?,
                Some(p) => walk!(st, btree::read_leaf(&st.store, p, None))?,
            };
            for (entry, pk) in batch.items {
                let chain = walk!(st, btree::get(&st.store, table.root, &pk))?;
                let mut live = false;
                if let Some(chain) = chain {
                    for v in decode_versions(&chain)? {
                        if walk!(st, st.txn_state(v.xmin))? == TxnState::Aborted {
                            continue;
                        }
                        let (k, _) = index::index_key(index, &row::decode_row(&v.row)?)?;
                        if entry.len() == k.len() + pk.len() && entry.starts_with(&k) {
                            live = true;
                            break;
                        }
                    }
                }
                if live {
                    continue;
                }
                let ops = walk!(st, btree::delete(&st.store, index.root, &entry))?;
                if !ops.is_empty() {
                    st.write_mtr(&mut txn, ops, None).await?;
                    removed += 1;
                }
            }
            if batch.next_leaf == 0 {
                break;
            }
            leaf = Some(batch.next_leaf);
        }
        Ok(removed)
    }

    /// The oldest read point this instance still needs (PGMRPL's contribution):
    /// storage may garbage-collect records below it.
    pub async fn min_read_point(&self) -> Lsn {
        self.lock().await.prune_horizon()
    }

    /// Engine statistics for metrics.
    pub async fn stats(&self) -> EngineStats {
        let st = self.lock().await;
        EngineStats {
            cache_pages: st.store.cached_pages() as u64,
            cache_hits: st.store.hits.get(),
            cache_misses: st.store.misses,
            active_transactions: st.active.len() as u64,
            leaf_prunes: st.leaf_prunes,
            read_points: st.read_points.held(),
            prune_lag: st.store.volume.vdl().0.saturating_sub(st.prune_horizon().0),
            free_pages: st.free.total,
            allocated_pages: st.next_page,
        }
    }
}

/// 23505 for a row whose indexed columns collide with the row at clustered key `pk`.
fn unique_violation(table: &TableDef, index: &IndexDef, row: &[Datum], pk: Vec<u8>) -> EngineError {
    let names: Vec<&str> = index
        .columns
        .iter()
        .filter_map(|&c| table.columns.get(c).map(|c| c.name.as_str()))
        .collect();
    let values: Vec<String> = index
        .columns
        .iter()
        .map(|&c| {
            row.get(c)
                .and_then(|d| d.to_text())
                .unwrap_or_else(|| "NULL".into())
        })
        .collect();
    EngineError::UniqueViolation {
        constraint: index.name.clone(),
        detail: format!(
            "Key ({})=({}) already exists.",
            names.join(", "),
            values.join(", ")
        ),
        key: pk,
    }
}

/// Upper bounds of the commit-latency buckets, in microseconds.
const COMMIT_BUCKETS_US: [u64; 12] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

#[derive(Default)]
struct CommitLatency {
    /// Per bucket (non-cumulative); the last slot counts everything slower.
    buckets: [std::sync::atomic::AtomicU64; COMMIT_BUCKETS_US.len() + 1],
    sum_us: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
}

impl CommitLatency {
    fn record(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = COMMIT_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(COMMIT_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut cumulative = 0;
        let mut out = Vec::with_capacity(COMMIT_BUCKETS_US.len());
        for (i, b) in COMMIT_BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            out.push((*b as f64 / 1e6, cumulative));
        }
        (
            out,
            self.sum_us.load(Relaxed) as f64 / 1e6,
            self.count.load(Relaxed),
        )
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VacuumStats {
    pub rows_scanned: u64,
    pub rows_removed: u64,
    pub versions_removed: u64,
    pub index_entries_removed: u64,
}

/// What one [`Engine::reclaim`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReclaimStats {
    pub trees_freed: u64,
    pub pages_freed: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    pub cache_pages: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub active_transactions: u64,
    pub leaf_prunes: u64,
    /// Pages on the free-page list, waiting for reuse.
    pub free_pages: u64,
    /// Page numbers ever handed out (the volume's high-water mark in pages).
    pub allocated_pages: u64,
    /// Snapshots held by transactions (see `ReadPoints`).
    pub read_points: u64,
    /// How far (in LSNs) the oldest snapshot in use holds pruning behind VDL: an
    /// idle open transaction shows here, as PostgreSQL's `backend_xmin` does.
    pub prune_lag: u64,
}
