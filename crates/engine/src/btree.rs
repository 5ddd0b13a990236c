//! B+trees over slotted pages.
//!
//! ```text
//!            root (fixed page number for the tree's whole life)
//!           /     \
//!   internal: aux = leftmost child, items = (separator key, right child)
//!        ...
//!   leaves: items = (key, value), sorted by key bytes; next = right sibling
//! ```
//!
//! Item layout: `[key_len u16][key][payload]`; in internal nodes the payload is the
//! child page number (u64). The root never moves: a root split moves the root's
//! items into two new pages and turns the root into an internal node above them, so
//! the catalog never has to learn a new root.
//!
//! Functions here are synchronous walks over cached pages (see `store`): they return
//! `PageMiss` when a page is not cached and produce the ops of one mini-transaction
//! without applying anything. A split rewrites both halves with `InitWithItems` and
//! adds a separator to the parent, all in the same MTR, so readers never see half a
//! split (invariant 6).

use crate::row::Cursor;
use crate::store::Store;
use crate::EngineError;
use borealis_common::PageNo;
use borealis_common::PAGE_SIZE;
use borealis_redo::page::{HEADER_BYTES, MAX_ITEM_BYTES, SLOT_BYTES};
use borealis_redo::{Op, Page, PageKind};
use std::cmp::Ordering;

/// Maximum tree height walked before declaring the tree corrupt (bounded loops).
const MAX_DEPTH: usize = 32;

pub fn item_key(item: &[u8]) -> Result<&[u8], EngineError> {
    let mut c = Cursor::new(item);
    let n = c.u16()? as usize;
    c.take(n)
}

pub fn item_payload(item: &[u8]) -> Result<&[u8], EngineError> {
    let mut c = Cursor::new(item);
    let n = c.u16()? as usize;
    c.take(n)?;
    Ok(&item[c.at..])
}

pub fn make_item(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + key.len() + payload.len());
    v.extend_from_slice(&(key.len() as u16).to_le_bytes());
    v.extend_from_slice(key);
    v.extend_from_slice(payload);
    v
}

fn child_of(item: &[u8]) -> Result<PageNo, EngineError> {
    let p = item_payload(item)?;
    let arr: [u8; 8] = p
        .try_into()
        .map_err(|_| EngineError::Corrupt("bad internal item".into()))?;
    Ok(u64::from_le_bytes(arr))
}

/// Asks the CPU to start loading the cache line at the start of `bytes`. Only a
/// hint: it cannot fault and changes no result.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the
    // address; SSE, which provides it, is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            bytes.as_ptr().cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Binary search of a page's items by key: Ok(slot) if found, Err(insert position).
///
/// Items lie scattered over the 8 KiB page, so on a page that is not in the CPU
/// cache (most leaves of a large table) every probe is a cache miss, and each
/// probe waits for the previous one. The two places the next probe can go are
/// prefetched while the current item is compared, so those misses overlap.
pub fn search(page: &Page, key: &[u8]) -> Result<Result<u16, u16>, EngineError> {
    let (mut lo, mut hi) = (0u16, page.nslots());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if mid > lo {
            if let Some(next) = page.item(lo + (mid - lo) / 2) {
                prefetch(next);
            }
        }
        if mid + 1 < hi {
            if let Some(next) = page.item(mid + 1 + (hi - mid - 1) / 2) {
                prefetch(next);
            }
        }
        let item = page
            .item(mid)
            .ok_or_else(|| EngineError::Corrupt("slot out of page".into()))?;
        match item_key(item)?.cmp(key) {
            Ordering::Less => lo = mid + 1,
            Ordering::Greater => hi = mid,
            Ordering::Equal => return Ok(Ok(mid)),
        }
    }
    Ok(Err(lo))
}

/// The child of internal `page` that covers `key`, and its position (-1 = leftmost).
fn descend(page: &Page, key: &[u8]) -> Result<(PageNo, i32), EngineError> {
    let pos = match search(page, key)? {
        Ok(slot) => slot as i32,
        Err(ins) => ins as i32 - 1,
    };
    let child = if pos < 0 {
        page.aux()
    } else {
        child_of(
            page.item(pos as u16)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?,
        )?
    };
    Ok((child, pos))
}

/// Path from the root to the leaf covering `key`: (page, position taken) per level.
pub fn find_leaf(
    store: &Store,
    root: PageNo,
    key: &[u8],
) -> Result<(PageNo, Vec<(PageNo, i32)>), EngineError> {
    let mut path = Vec::new();
    let leaf = descend_to_leaf(store, root, key, |page_no, pos| path.push((page_no, pos)))?;
    Ok((leaf, path))
}

/// The leaf covering `key` (lookups and scans, which need no path: no allocation).
pub fn leaf_of(store: &Store, root: PageNo, key: &[u8]) -> Result<PageNo, EngineError> {
    descend_to_leaf(store, root, key, |_, _| {})
}

fn descend_to_leaf(
    store: &Store,
    root: PageNo,
    key: &[u8],
    mut on_level: impl FnMut(PageNo, i32),
) -> Result<PageNo, EngineError> {
    let mut page_no = root;
    for _ in 0..MAX_DEPTH {
        let page = store.page(page_no)?;
        match page.kind() {
            Some(PageKind::BtreeLeaf) => return Ok(page_no),
            Some(PageKind::BtreeInternal) => {
                let (child, pos) = descend(page, key)?;
                on_level(page_no, pos);
                page_no = child;
            }
            _ => {
                return Err(EngineError::Corrupt(format!(
                    "page {page_no} is not a B+tree page"
                )))
            }
        }
    }
    Err(EngineError::Corrupt(
        "B+tree deeper than the depth limit".into(),
    ))
}

/// Looks up `key`; returns the leaf item's payload.
pub fn get(store: &Store, root: PageNo, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
    Ok(get_in_place(store, root, key)?.map(<[u8]>::to_vec))
}

/// Looks up `key`; returns the leaf item's payload where it lies in the cached page.
pub fn get_in_place<'s>(
    store: &'s Store,
    root: PageNo,
    key: &[u8],
) -> Result<Option<&'s [u8]>, EngineError> {
    let leaf = leaf_of(store, root, key)?;
    let page = store.page(leaf)?;
    match search(page, key)? {
        Ok(slot) => {
            let item = page
                .item(slot)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
            Ok(Some(item_payload(item)?))
        }
        Err(_) => Ok(None),
    }
}

/// Allocates new pages for splits; the engine persists the counter in the MTR.
pub trait PageAllocator {
    fn allocate(&mut self) -> PageNo;
}

/// Ops that insert `key` → `payload`, or replace the payload if the key exists.
pub fn put(
    store: &Store,
    root: PageNo,
    key: &[u8],
    payload: &[u8],
    alloc: &mut dyn PageAllocator,
) -> Result<Vec<(PageNo, Op)>, EngineError> {
    let item = make_item(key, payload);
    if item.len() > MAX_ITEM_BYTES {
        return Err(EngineError::RowTooBig(item.len()));
    }
    let (leaf_no, path) = find_leaf(store, root, key)?;
    let leaf = store.page(leaf_no)?;
    match search(leaf, key)? {
        Ok(slot) => {
            if leaf.fits_replace(slot, item.len()) {
                return Ok(vec![(leaf_no, Op::ReplaceItem { slot, data: item })]);
            }
            let mut items: Vec<Vec<u8>> = leaf.items().map(|i| i.to_vec()).collect();
            items[slot as usize] = item;
            split(store, root, leaf_no, items, path, alloc)
        }
        Err(pos) => {
            if leaf.fits_insert(item.len()) {
                return Ok(vec![(
                    leaf_no,
                    Op::InsertItem {
                        slot: pos,
                        data: item,
                    },
                )]);
            }
            let mut items: Vec<Vec<u8>> = leaf.items().map(|i| i.to_vec()).collect();
            items.insert(pos as usize, item);
            split(store, root, leaf_no, items, path, alloc)
        }
    }
}

/// Ops that remove `key` (no-op list if absent). Pages are never merged: an empty
/// leaf stays in the chain, as in PostgreSQL until VACUUM.
pub fn delete(store: &Store, root: PageNo, key: &[u8]) -> Result<Vec<(PageNo, Op)>, EngineError> {
    let leaf_no = leaf_of(store, root, key)?;
    let leaf = store.page(leaf_no)?;
    Ok(match search(leaf, key)? {
        Ok(slot) => vec![(leaf_no, Op::DeleteItem { slot })],
        Err(_) => vec![],
    })
}

/// Splits the page `page_no` whose new content would be `items` (too many to fit),
/// pushing a separator into the parent (recursively).
fn split(
    store: &Store,
    root: PageNo,
    page_no: PageNo,
    items: Vec<Vec<u8>>,
    mut path: Vec<(PageNo, i32)>,
    alloc: &mut dyn PageAllocator,
) -> Result<Vec<(PageNo, Op)>, EngineError> {
    let mut ops = Vec::new();
    let page = store.page(page_no)?;
    let kind = page
        .kind()
        .ok_or_else(|| EngineError::Corrupt("page kind".into()))?;
    let leaf = kind == PageKind::BtreeLeaf;
    // Split by bytes so both halves fit whatever the item sizes.
    let total: usize = items.iter().map(|i| i.len() + 4).sum();
    let mut acc = 0;
    let mut mid = items.len() / 2;
    for (i, it) in items.iter().enumerate() {
        acc += it.len() + 4;
        if acc >= total / 2 {
            mid = (i + 1).clamp(1, items.len() - 1);
            break;
        }
    }
    // Leaves: the separator is the first key of the right half, which stays there.
    // Internals: the middle item moves up; its child becomes the right page's aux.
    let sep_key = item_key(&items[mid])?.to_vec();
    let (left, right, right_aux) = if leaf {
        (items[..mid].to_vec(), items[mid..].to_vec(), 0)
    } else {
        (
            items[..mid].to_vec(),
            items[mid + 1..].to_vec(),
            child_of(&items[mid])?,
        )
    };
    let kind_u16 = kind as u16;
    if page_no == root {
        let (a, b) = (alloc.allocate(), alloc.allocate());
        let (a_next, a_aux) = if leaf { (b, 0) } else { (0, page.aux()) };
        ops.push((
            a,
            Op::InitWithItems {
                kind: kind_u16,
                next: a_next,
                aux: a_aux,
                items: left,
            },
        ));
        ops.push((
            b,
            Op::InitWithItems {
                kind: kind_u16,
                next: 0,
                aux: right_aux,
                items: right,
            },
        ));
        let sep = make_item(&sep_key, &b.to_le_bytes());
        ops.push((
            root,
            Op::InitWithItems {
                kind: PageKind::BtreeInternal as u16,
                next: 0,
                aux: a,
                items: vec![sep],
            },
        ));
        return Ok(ops);
    }
    let r = alloc.allocate();
    let (l_next, r_next) = if leaf { (r, page.next()) } else { (0, 0) };
    ops.push((
        r,
        Op::InitWithItems {
            kind: kind_u16,
            next: r_next,
            aux: right_aux,
            items: right,
        },
    ));
    ops.push((
        page_no,
        Op::InitWithItems {
            kind: kind_u16,
            next: l_next,
            aux: page.aux(),
            items: left,
        },
    ));
    // Insert the separator into the parent.
    let (parent_no, pos) = path
        .pop()
        .ok_or_else(|| EngineError::Corrupt("split without parent".into()))?;
    let parent = store.page(parent_no)?;
    let sep = make_item(&sep_key, &r.to_le_bytes());
    let at = (pos + 1) as u16;
    if parent.fits_insert(sep.len()) {
        ops.push((
            parent_no,
            Op::InsertItem {
                slot: at,
                data: sep,
            },
        ));
    } else {
        let mut pitems: Vec<Vec<u8>> = parent.items().map(|i| i.to_vec()).collect();
        pitems.insert(at as usize, sep);
        ops.extend(split(store, root, parent_no, pitems, path, alloc)?);
    }
    Ok(ops)
}

/// Share of a page a bulk build fills, leaving room for later inserts.
const BULK_FILL: usize = (PAGE_SIZE - HEADER_BYTES) * 9 / 10;

/// Ops that build a whole B+tree over `items` (leaf items, sorted by key, keys
/// unique) under `root`, which must be a fresh, empty tree. Leaves and inner nodes
/// are written whole (one `InitWithItems` record per page) instead of one record
/// per row. The ops come in two parts: `pages` (every page but the root, in an
/// order that can be split into several MTRs, since nothing points at them yet) and
/// `root` (the last MTR, which makes the whole tree reachable at once).
pub struct BulkBuild {
    pub pages: Vec<(PageNo, Op)>,
    pub root: (PageNo, Op),
}

pub fn bulk_build(
    root: PageNo,
    items: Vec<Vec<u8>>,
    alloc: &mut dyn PageAllocator,
) -> Result<BulkBuild, EngineError> {
    // Pack leaves.
    let mut leaves: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        if item.len() > MAX_ITEM_BYTES {
            return Err(EngineError::RowTooBig(item.len()));
        }
        let need = item.len() + SLOT_BYTES;
        if used + need > BULK_FILL && !leaves.last().is_some_and(|l| l.is_empty()) {
            leaves.push(Vec::new());
            used = 0;
        }
        used += need;
        if let Some(l) = leaves.last_mut() {
            l.push(item);
        }
    }
    let leaf_kind = PageKind::BtreeLeaf as u16;
    if leaves.len() == 1 {
        let items = leaves.pop().unwrap_or_default();
        return Ok(BulkBuild {
            pages: vec![],
            root: (
                root,
                Op::InitWithItems {
                    kind: leaf_kind,
                    next: 0,
                    aux: 0,
                    items,
                },
            ),
        });
    }
    let numbers: Vec<PageNo> = leaves.iter().map(|_| alloc.allocate()).collect();
    let mut pages = Vec::new();
    // (first key, page) of each node of the level being built.
    let mut level: Vec<(Vec<u8>, PageNo)> = Vec::with_capacity(leaves.len());
    for (i, items) in leaves.into_iter().enumerate() {
        let first = items
            .first()
            .map(|it| item_key(it).map(|k| k.to_vec()))
            .transpose()?
            .unwrap_or_default();
        let next = numbers.get(i + 1).copied().unwrap_or(0);
        level.push((first, numbers[i]));
        pages.push((
            numbers[i],
            Op::InitWithItems {
                kind: leaf_kind,
                next,
                aux: 0,
                items,
            },
        ));
    }
    let internal = PageKind::BtreeInternal as u16;
    for _ in 0..MAX_DEPTH {
        // Group the level's nodes under parents: aux = first child, then (key, child).
        let mut parents: Vec<(Vec<u8>, PageNo, Vec<Vec<u8>>)> = Vec::new();
        let mut used = BULK_FILL; // forces a new parent for the first child
        for (key, child) in level {
            let entry = make_item(&key, &child.to_le_bytes());
            let need = entry.len() + SLOT_BYTES;
            if used + need > BULK_FILL {
                parents.push((key, child, Vec::new()));
                used = 0;
            } else if let Some(p) = parents.last_mut() {
                p.2.push(entry);
                used += need;
            }
        }
        if parents.len() == 1 {
            let (_, aux, items) = parents.pop().unwrap_or_default();
            return Ok(BulkBuild {
                pages,
                root: (
                    root,
                    Op::InitWithItems {
                        kind: internal,
                        next: 0,
                        aux,
                        items,
                    },
                ),
            });
        }
        level = Vec::with_capacity(parents.len());
        for (key, aux, items) in parents {
            let page = alloc.allocate();
            pages.push((
                page,
                Op::InitWithItems {
                    kind: internal,
                    next: 0,
                    aux,
                    items,
                },
            ));
            level.push((key, page));
        }
    }
    Err(EngineError::Internal(
        "bulk build deeper than the depth limit".into(),
    ))
}

/// One leaf's worth of a range scan: the (key, payload) pairs with key >= `from`
/// (all if `from` is None) and the next leaf to continue with (0 = end).
pub struct LeafBatch {
    pub items: Vec<(Vec<u8>, Vec<u8>)>,
    pub next_leaf: PageNo,
}

pub fn scan_leaf_from(
    store: &Store,
    root: PageNo,
    from: Option<&[u8]>,
) -> Result<LeafBatch, EngineError> {
    let leaf_no = leaf_of(store, root, from.unwrap_or(&[]))?;
    read_leaf(store, leaf_no, from)
}

pub fn read_leaf(
    store: &Store,
    leaf_no: PageNo,
    from: Option<&[u8]>,
) -> Result<LeafBatch, EngineError> {
    let page = store.page(leaf_no)?;
    if page.kind() != Some(PageKind::BtreeLeaf) {
        return Err(EngineError::Corrupt(format!(
            "page {leaf_no} in a leaf chain is not a leaf"
        )));
    }
    let start = match from {
        Some(k) => match search(page, k)? {
            Ok(s) | Err(s) => s,
        },
        None => 0,
    };
    let mut items = Vec::with_capacity((page.nslots() - start.min(page.nslots())) as usize);
    for slot in start..page.nslots() {
        let item = page
            .item(slot)
            .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
        items.push((item_key(item)?.to_vec(), item_payload(item)?.to_vec()));
    }
    Ok(LeafBatch {
        items,
        next_leaf: page.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use borealis_volume::{Volume, VolumeConfig};

    struct Counter(PageNo);
    impl PageAllocator for Counter {
        fn allocate(&mut self) -> PageNo {
            self.0 += 1;
            self.0
        }
    }

    async fn run_put(store: &mut Store, root: PageNo, key: &[u8], val: &[u8], alloc: &mut Counter) {
        loop {
            match put(store, root, key, val, alloc) {
                Ok(ops) => {
                    store.write(ops).await.unwrap();
                    return;
                }
                Err(EngineError::PageMiss(p)) => store.load(p).await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn many_inserts_split_and_stay_sorted_and_survive_cache_loss() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = Store::new(volume.clone(), 256);
        let root = 1;
        store
            .write(vec![(
                root,
                Op::Init {
                    kind: PageKind::BtreeLeaf as u16,
                },
            )])
            .await
            .unwrap();
        let mut alloc = Counter(1);
        let n = 20_000u64;
        // A scrambled insertion order exercises splits everywhere in the tree.
        for i in 0..n {
            let k = (i * 7919) % n;
            run_put(
                &mut store,
                root,
                &k.to_be_bytes(),
                &vec![b'v'; (k % 50) as usize],
                &mut alloc,
            )
            .await;
        }
        // Replace with larger values to force splits on update.
        for k in (0..n).step_by(3) {
            run_put(
                &mut store,
                root,
                &k.to_be_bytes(),
                &vec![b'w'; 120],
                &mut alloc,
            )
            .await;
        }
        // Read everything back through a cold cache: pages come from the volume.
        let mut cold = Store::new(volume, 256);
        let mut seen = 0u64;
        let mut batch = loop {
            match scan_leaf_from(&cold, root, None) {
                Ok(b) => break b,
                Err(EngineError::PageMiss(p)) => cold.load(p).await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        };
        loop {
            for (k, v) in &batch.items {
                let k = u64::from_be_bytes(k.as_slice().try_into().unwrap());
                assert_eq!(k, seen);
                let expect = if k % 3 == 0 { 120 } else { (k % 50) as usize };
                assert_eq!(v.len(), expect);
                seen += 1;
            }
            if batch.next_leaf == 0 {
                break;
            }
            let next = batch.next_leaf;
            batch = loop {
                match read_leaf(&cold, next, None) {
                    Ok(b) => break b,
                    Err(EngineError::PageMiss(p)) => cold.load(p).await.unwrap(),
                    Err(e) => panic!("{e}"),
                }
            };
        }
        assert_eq!(seen, n);
    }

    #[tokio::test]
    async fn bulk_build_matches_inserts() {
        for n in [0u64, 1, 50, 5_000, 60_000] {
            let volume = Volume::in_memory(VolumeConfig::default());
            let mut store = Store::new(volume, 4096);
            let root = 1;
            store
                .write(vec![(
                    root,
                    Op::Init {
                        kind: PageKind::BtreeLeaf as u16,
                    },
                )])
                .await
                .unwrap();
            let items: Vec<Vec<u8>> = (0..n)
                .map(|k| make_item(&k.to_be_bytes(), &[b'x'; 100]))
                .collect();
            let mut alloc = Counter(1);
            let build = bulk_build(root, items, &mut alloc).unwrap();
            for chunk in build.pages.chunks(64) {
                store.write(chunk.to_vec()).await.unwrap();
            }
            store.write(vec![build.root]).await.unwrap();
            for k in [0, n / 2, n.saturating_sub(1)] {
                let found = get(&store, root, &k.to_be_bytes()).unwrap();
                assert_eq!(found.is_some(), n > 0, "n={n} k={k}");
            }
            assert!(get(&store, root, &n.to_be_bytes()).unwrap().is_none());
            // Full scan in order, then the tree still takes inserts.
            let mut seen = 0u64;
            let mut batch = scan_leaf_from(&store, root, None).unwrap();
            loop {
                for (k, _) in &batch.items {
                    assert_eq!(u64::from_be_bytes(k.as_slice().try_into().unwrap()), seen);
                    seen += 1;
                }
                if batch.next_leaf == 0 {
                    break;
                }
                batch = read_leaf(&store, batch.next_leaf, None).unwrap();
            }
            assert_eq!(seen, n);
            run_put(
                &mut store,
                root,
                &(n + 7).to_be_bytes(),
                b"late",
                &mut alloc,
            )
            .await;
            assert_eq!(
                get(&store, root, &(n + 7).to_be_bytes())
                    .unwrap()
                    .as_deref(),
                Some(&b"late"[..])
            );
        }
    }

    #[tokio::test]
    async fn writes_to_evicted_pages_reload_them() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = Store::new(volume, 256);
        store
            .write(vec![(
                0,
                Op::Init {
                    kind: PageKind::Raw as u16,
                },
            )])
            .await
            .unwrap();
        // Fill the cache far past its capacity so page 0 is evicted.
        for p in 1..2000u64 {
            store
                .write(vec![(
                    p,
                    Op::Init {
                        kind: PageKind::BtreeLeaf as u16,
                    },
                )])
                .await
                .unwrap();
        }
        assert!(store.cached_pages() <= 256 + 1);
        store
            .write(vec![(
                0,
                Op::WriteBody {
                    offset: 0,
                    data: vec![7; 8],
                },
            )])
            .await
            .unwrap();
        assert_eq!(&store.page(0).unwrap().body()[..8], &[7; 8]);
    }
}

/// Visits the items of leaf `page` (number `leaf_no`) in key order from `resume` (or
/// the first slot), skipping `from` itself when it is excluded, until the end bound.
/// Returns the next leaf to read, or `None` once the end bound was passed. Range
/// scans of tables and of indexes share it.
pub(crate) fn leaf_range(
    page: &Page,
    leaf_no: PageNo,
    resume: Option<&[u8]>,
    from: &std::ops::Bound<Vec<u8>>,
    to: &std::ops::Bound<Vec<u8>>,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), EngineError>,
) -> Result<Option<PageNo>, EngineError> {
    use std::ops::Bound;
    if page.kind() != Some(PageKind::BtreeLeaf) {
        return Err(EngineError::Corrupt(format!(
            "page {leaf_no} in a leaf chain is not a leaf"
        )));
    }
    let start = match resume {
        Some(k) => match search(page, k)? {
            Ok(s) | Err(s) => s,
        },
        None => 0,
    };
    for slot in start..page.nslots() {
        let item = page
            .item(slot)
            .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
        let key = item_key(item)?;
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
            return Ok(None);
        }
        visit(key, item_payload(item)?)?;
    }
    Ok(Some(page.next()))
}
