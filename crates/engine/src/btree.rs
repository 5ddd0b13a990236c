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
//! without applying anything. A split writes the new right page whole
//! (`InitWithItems`), cuts the left page down to its first items (`TruncateItems`)
//! and adds a separator to the parent, all in the same MTR, so readers never see
//! half a split (invariant 6).

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

/// The children of an internal page: the leftmost (`aux`), then one per item.
pub fn children(page: &Page) -> Result<Vec<PageNo>, EngineError> {
    let mut out = Vec::with_capacity(page.nslots() as usize + 1);
    out.push(page.aux());
    for slot in 0..page.nslots() {
        out.push(child_of(
            page.item(slot)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?,
        )?);
    }
    Ok(out)
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

/// Looks up `key`; returns the leaf that holds it and a copy of its payload. The
/// leaf lets a write of the same key under the same engine-lock hold skip the
/// descent (`replace_in_leaf`).
pub fn get_with_leaf(
    store: &Store,
    root: PageNo,
    key: &[u8],
) -> Result<Option<(PageNo, Vec<u8>)>, EngineError> {
    Ok(find(store, root, key)?.map(|(leaf, payload)| (leaf, payload.to_vec())))
}

/// The leaf holding `key` and the item's payload where it lies in the cached page.
fn find<'s>(
    store: &'s Store,
    root: PageNo,
    key: &[u8],
) -> Result<Option<(PageNo, &'s [u8])>, EngineError> {
    let leaf = leaf_of(store, root, key)?;
    let page = store.page(leaf)?;
    match search(page, key)? {
        Ok(slot) => {
            let item = page
                .item(slot)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
            Ok(Some((leaf, item_payload(item)?)))
        }
        Err(_) => Ok(None),
    }
}

/// The op that replaces the payload of `key` in place when leaf `leaf_no` holds
/// `key` and the new item fits there; None when it does not (the caller then
/// uses [`put`]). A key lives in exactly one page of a tree and pages are never
/// reused, so a leaf that holds `key` is the leaf `put` would find: a stale
/// `leaf_no` can only make this return None, never write the wrong page.
pub fn replace_in_leaf(
    store: &Store,
    leaf_no: PageNo,
    key: &[u8],
    payload: &[u8],
) -> Result<Option<Vec<(PageNo, Op)>>, EngineError> {
    let leaf = store.page(leaf_no)?;
    if leaf.kind() != Some(PageKind::BtreeLeaf) {
        return Ok(None);
    }
    let Ok(slot) = search(leaf, key)? else {
        return Ok(None);
    };
    let len = 2 + key.len() + payload.len();
    if len > MAX_ITEM_BYTES || !leaf.fits_replace(slot, len) {
        return Ok(None);
    }
    let item = make_item(key, payload);
    Ok(Some(vec![(leaf_no, Op::ReplaceItem { slot, data: item })]))
}

/// Looks up `key`; returns the leaf item's payload where it lies in the cached page.
pub fn get_in_place<'s>(
    store: &'s Store,
    root: PageNo,
    key: &[u8],
) -> Result<Option<&'s [u8]>, EngineError> {
    Ok(find(store, root, key)?.map(|(_, payload)| payload))
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
            split(
                store,
                root,
                leaf_no,
                items,
                Change::Replace(slot),
                path,
                alloc,
            )
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
            split(
                store,
                root,
                leaf_no,
                items,
                Change::Insert(pos),
                path,
                alloc,
            )
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

/// The one change that made a page overflow: `items` passed to [`split`] are the
/// page's items with this applied.
#[derive(Clone, Copy)]
enum Change {
    Replace(u16),
    Insert(u16),
}

/// Splits the page `page_no` whose new content would be `items` (too many to fit),
/// pushing a separator into the parent (recursively).
///
/// Only the new right page is written whole (`InitWithItems`). The left page keeps
/// a prefix of its items, so it gets `TruncateItems` plus the change itself when
/// that falls in the left half: a split costs half a page of redo, not a whole one
/// (the left half used to be rewritten too, about 4 KiB per split of a full leaf).
/// An insert past the last item of the rightmost leaf (hidden row ids, serial keys,
/// append-only tables) moves nothing: the new item starts an otherwise empty right
/// page, and the left page stays full instead of half empty.
fn split(
    store: &Store,
    root: PageNo,
    page_no: PageNo,
    items: Vec<Vec<u8>>,
    change: Change,
    mut path: Vec<(PageNo, i32)>,
    alloc: &mut dyn PageAllocator,
) -> Result<Vec<(PageNo, Op)>, EngineError> {
    let mut ops = Vec::new();
    let page = store.page(page_no)?;
    let kind = page
        .kind()
        .ok_or_else(|| EngineError::Corrupt("page kind".into()))?;
    let leaf = kind == PageKind::BtreeLeaf;
    let appends = leaf
        && page_no != root
        && page.next() == 0
        && items.len() >= 2
        && matches!(change, Change::Insert(pos) if pos as usize == items.len() - 1);
    let mid = if appends {
        items.len() - 1
    } else {
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
        mid
    };
    // Leaves: the separator is the first key of the right half, which stays there.
    // Internals: the middle item moves up; its child becomes the right page's aux.
    let sep_key = item_key(&items[mid])?.to_vec();
    let (right_from, right_aux) = if leaf {
        (mid, 0)
    } else {
        (mid + 1, child_of(&items[mid])?)
    };
    let kind_u16 = kind as u16;
    if page_no == root {
        let left = items[..mid].to_vec();
        let right = items[right_from..].to_vec();
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
    ops.push((
        r,
        Op::InitWithItems {
            kind: kind_u16,
            next: if leaf { page.next() } else { 0 },
            aux: right_aux,
            items: items[right_from..].to_vec(),
        },
    ));
    // The left page: its first `mid` items are the page's own first items, except
    // for the change when it falls among them.
    match change {
        Change::Replace(slot) if (slot as usize) < mid => {
            ops.push((page_no, Op::TruncateItems { keep: mid as u16 }));
            ops.push((
                page_no,
                Op::ReplaceItem {
                    slot,
                    data: items[slot as usize].clone(),
                },
            ));
        }
        Change::Insert(pos) if (pos as usize) < mid => {
            ops.push((
                page_no,
                Op::TruncateItems {
                    keep: (mid - 1) as u16,
                },
            ));
            ops.push((
                page_no,
                Op::InsertItem {
                    slot: pos,
                    data: items[pos as usize].clone(),
                },
            ));
        }
        Change::Replace(_) | Change::Insert(_) => {
            if mid < page.nslots() as usize {
                ops.push((page_no, Op::TruncateItems { keep: mid as u16 }));
            }
        }
    }
    if leaf {
        ops.push((
            page_no,
            Op::SetLinks {
                next: r,
                aux: page.aux(),
            },
        ));
    }
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
        ops.extend(split(
            store,
            root,
            parent_no,
            pitems,
            Change::Insert(at),
            path,
            alloc,
        )?);
    }
    Ok(ops)
}

/// Most items one `put_run` takes into a single mini-transaction (bounds the MTR:
/// about 40 pages of rows at most).
const RUN_BYTES_MAX: usize = 256 * 1024;

/// Ops that put a run of `items` (leaf items, sorted by key, keys unique) into the
/// tree: those that fall into the leaf covering the first one (up to a byte bound),
/// as one mini-transaction. Returns the ops and how many items they cover; the
/// caller writes them and calls again with the rest.
///
/// Why: a row-at-a-time load costs one descent and one redo record per row. Here a
/// run of rows landing in one leaf (a bulk load in key order lands entirely in the
/// rightmost leaf) becomes whole-page `InitWithItems` records: the leaf rewritten
/// with its old and new items, plus as many new right siblings as needed, with
/// their separators added to the parent in the same MTR (so readers never see a
/// half-split, invariant 6). A run of one or two items uses `put`, whose records
/// are smaller.
pub fn put_run(
    store: &Store,
    root: PageNo,
    items: &[Vec<u8>],
    alloc: &mut dyn PageAllocator,
) -> Result<(Vec<(PageNo, Op)>, usize), EngineError> {
    let Some(first) = items.first() else {
        return Ok((vec![], 0));
    };
    let first_key = item_key(first)?;
    let (leaf_no, path) = find_leaf(store, root, first_key)?;
    // The leaf's upper bound: the separator right of the position taken at the
    // lowest level that has one.
    let mut upper: Option<&[u8]> = None;
    for &(page_no, pos) in path.iter().rev() {
        let page = store.page(page_no)?;
        let right = (pos + 1) as u16;
        if right < page.nslots() {
            let item = page
                .item(right)
                .ok_or_else(|| EngineError::Corrupt("slot".into()))?;
            upper = Some(item_key(item)?);
            break;
        }
    }
    let mut n = 0;
    let mut bytes = 0;
    for item in items {
        if item.len() > MAX_ITEM_BYTES {
            if n == 0 {
                return Err(EngineError::RowTooBig(item.len()));
            }
            break;
        }
        if upper.is_some_and(|u| item_key(item).is_ok_and(|k| k >= u)) || bytes >= RUN_BYTES_MAX {
            break;
        }
        bytes += item.len() + SLOT_BYTES;
        n += 1;
    }
    if n <= 2 {
        let payload = item_payload(first)?;
        return Ok((put(store, root, first_key, payload, alloc)?, 1));
    }
    let leaf = store.page(leaf_no)?;
    // Merge the leaf's items with the run (a run item replaces an equal key).
    let mut merged: Vec<Vec<u8>> = Vec::with_capacity(leaf.nslots() as usize + n);
    let mut run = items[..n].iter().peekable();
    for old in leaf.items() {
        let old_key = item_key(old)?;
        while let Some(new) = run.peek() {
            match item_key(new)?.cmp(old_key) {
                Ordering::Less => merged.push(run.next().map(|v| v.to_vec()).unwrap_or_default()),
                Ordering::Equal | Ordering::Greater => break,
            }
        }
        if run
            .peek()
            .is_some_and(|new| item_key(new).is_ok_and(|k| k == old_key))
        {
            merged.push(run.next().map(|v| v.to_vec()).unwrap_or_default());
        } else {
            merged.push(old.to_vec());
        }
    }
    merged.extend(run.cloned());
    let mut ops = Vec::new();
    let mut path = path;
    rewrite_node(
        store,
        root,
        Node {
            page_no: leaf_no,
            kind: PageKind::BtreeLeaf,
            next: leaf.next(),
            aux: leaf.aux(),
            items: merged,
        },
        &mut path,
        alloc,
        &mut ops,
    )?;
    Ok((ops, n))
}

/// New content for one B+tree page.
struct Node {
    page_no: PageNo,
    kind: PageKind,
    next: PageNo,
    aux: PageNo,
    items: Vec<Vec<u8>>,
}

/// Bytes a page's items and slots may take.
const NODE_BYTES: usize = PAGE_SIZE - HEADER_BYTES;

/// Pushes the ops that give `node.page_no` the content `node.items`: one
/// `InitWithItems` if it fits, otherwise a split into as many pages as needed
/// (filled to `BULK_FILL`), with the separators of the new pages inserted into the
/// parent taken from `path` (recursively). The root never moves: when it
/// overflows, all its content moves to new pages and it becomes their parent.
fn rewrite_node(
    store: &Store,
    root: PageNo,
    node: Node,
    path: &mut Vec<(PageNo, i32)>,
    alloc: &mut dyn PageAllocator,
    ops: &mut Vec<(PageNo, Op)>,
) -> Result<(), EngineError> {
    let total: usize = node.items.iter().map(|i| i.len() + SLOT_BYTES).sum();
    if total <= NODE_BYTES {
        ops.push((
            node.page_no,
            Op::InitWithItems {
                kind: node.kind as u16,
                next: node.next,
                aux: node.aux,
                items: node.items,
            },
        ));
        return Ok(());
    }
    let leaf = node.kind == PageKind::BtreeLeaf;
    // Pack into chunks of at most BULK_FILL bytes (at least two chunks).
    let mut chunks: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut used = 0;
    for item in node.items {
        let need = item.len() + SLOT_BYTES;
        if used + need > BULK_FILL && chunks.last().is_some_and(|c| !c.is_empty()) {
            chunks.push(Vec::new());
            used = 0;
        }
        used += need;
        if let Some(c) = chunks.last_mut() {
            c.push(item);
        }
    }
    if chunks.len() < 2 {
        return Err(EngineError::Internal(
            "overfull page packed into one chunk".into(),
        ));
    }
    // Pages for the chunks: the root keeps none (it becomes their parent), any
    // other page keeps the first chunk.
    let is_root = node.page_no == root;
    let pages: Vec<PageNo> = chunks
        .iter()
        .enumerate()
        .map(|(i, _)| {
            if i == 0 && !is_root {
                node.page_no
            } else {
                alloc.allocate()
            }
        })
        .collect();
    // Separators for chunks 1..: leaves keep their first key (it stays in the
    // page); internals move their first item up and its child becomes the aux.
    let mut seps: Vec<Vec<u8>> = Vec::with_capacity(chunks.len() - 1);
    let count = chunks.len();
    for (i, mut items) in chunks.into_iter().enumerate() {
        let mut aux = if i == 0 { node.aux } else { 0 };
        if i > 0 {
            let first = items
                .first()
                .ok_or_else(|| EngineError::Internal("empty chunk".into()))?;
            let key = item_key(first)?.to_vec();
            if !leaf {
                aux = child_of(first)?;
                items.remove(0);
            }
            seps.push(make_item(&key, &pages[i].to_le_bytes()));
        }
        let next = if !leaf {
            0
        } else if i + 1 < count {
            pages[i + 1]
        } else {
            node.next
        };
        ops.push((
            pages[i],
            Op::InitWithItems {
                kind: node.kind as u16,
                next,
                aux,
                items,
            },
        ));
    }
    if is_root {
        return rewrite_node(
            store,
            root,
            Node {
                page_no: root,
                kind: PageKind::BtreeInternal,
                next: 0,
                aux: pages[0],
                items: seps,
            },
            path,
            alloc,
            ops,
        );
    }
    let (parent_no, pos) = path
        .pop()
        .ok_or_else(|| EngineError::Corrupt("split without parent".into()))?;
    let parent = store.page(parent_no)?;
    let at = (pos + 1) as usize;
    let need: usize = seps.iter().map(|s| s.len() + SLOT_BYTES).sum();
    if parent.free_bytes() >= need {
        for (i, sep) in seps.into_iter().enumerate() {
            ops.push((
                parent_no,
                Op::InsertItem {
                    slot: (at + i) as u16,
                    data: sep,
                },
            ));
        }
        return Ok(());
    }
    let mut pitems: Vec<Vec<u8>> = parent.items().map(|i| i.to_vec()).collect();
    if at > pitems.len() {
        return Err(EngineError::Corrupt(
            "separator position past parent".into(),
        ));
    }
    pitems.splice(at..at, seps);
    rewrite_node(
        store,
        root,
        Node {
            page_no: parent_no,
            kind: PageKind::BtreeInternal,
            next: parent.next(),
            aux: parent.aux(),
            items: pitems,
        },
        path,
        alloc,
        ops,
    )
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

    /// Every (key, value length) of the tree, in leaf-chain order, through a cold
    /// cache (pages come from the volume).
    async fn scan_all(volume: Volume, root: PageNo) -> Vec<(Vec<u8>, usize)> {
        let mut cold = Store::new(volume, 256);
        let mut out = Vec::new();
        let mut batch = loop {
            match scan_leaf_from(&cold, root, None) {
                Ok(b) => break b,
                Err(EngineError::PageMiss(p)) => cold.load(p).await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        };
        loop {
            out.extend(batch.items.iter().map(|(k, v)| (k.clone(), v.len())));
            if batch.next_leaf == 0 {
                return out;
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
    }

    async fn empty_tree(volume: &Volume, root: PageNo, cache_pages: usize) -> Store {
        let mut store = Store::new(volume.clone(), cache_pages);
        store
            .write(vec![(
                root,
                Op::Init {
                    kind: PageKind::BtreeLeaf as u16,
                },
            )])
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn replace_in_leaf_writes_only_the_leaf_that_holds_the_key() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = empty_tree(&volume, 1, 4096).await;
        let mut alloc = Counter(1);
        for k in 0..2_000u64 {
            run_put(&mut store, 1, &k.to_be_bytes(), &[b'a'; 100], &mut alloc).await;
        }
        let key = 1_500u64.to_be_bytes();
        let (leaf, payload) = get_with_leaf(&store, 1, &key).unwrap().unwrap();
        assert_eq!(payload, [b'a'; 100]);
        assert_ne!(leaf, 1, "the tree has split: the root is internal");
        // Another leaf, an internal page and a key not in the tree: no op, so the
        // caller falls back to a full `put`.
        let other = get_with_leaf(&store, 1, &0u64.to_be_bytes())
            .unwrap()
            .unwrap()
            .0;
        assert_ne!(other, leaf);
        assert!(replace_in_leaf(&store, other, &key, b"x")
            .unwrap()
            .is_none());
        assert!(replace_in_leaf(&store, 1, &key, b"x").unwrap().is_none());
        assert!(replace_in_leaf(&store, leaf, &9_999u64.to_be_bytes(), b"x")
            .unwrap()
            .is_none());
        // Too big for the leaf's free space: no op either.
        assert!(replace_in_leaf(&store, leaf, &key, &[b'z'; 3_000])
            .unwrap()
            .is_none());
        // The leaf that holds the key: the same op `put` produces.
        let ops = replace_in_leaf(&store, leaf, &key, b"new")
            .unwrap()
            .unwrap();
        assert_eq!(ops, put(&store, 1, &key, b"new", &mut alloc).unwrap());
        store.write(ops).await.unwrap();
        assert_eq!(get(&store, 1, &key).unwrap().unwrap(), b"new");
    }

    #[tokio::test]
    async fn appends_fill_leaves_and_descending_inserts_split_left() {
        // Ascending keys (a hidden row id, a serial): the rightmost leaf splits by
        // starting an empty right page, so leaves end up full, not half full, and
        // internal pages on the rightmost path split too.
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = empty_tree(&volume, 1, 4096).await;
        let mut alloc = Counter(1);
        let n = 60_000u64;
        let val = vec![b'a'; 100];
        for k in 0..n {
            run_put(&mut store, 1, &k.to_be_bytes(), &val, &mut alloc).await;
        }
        let got = scan_all(volume.clone(), 1).await;
        assert_eq!(got.len() as u64, n, "row count after ascending inserts");
        for (i, (k, len)) in got.iter().enumerate() {
            assert_eq!(k.as_slice(), (i as u64).to_be_bytes(), "key order at {i}");
            assert_eq!(*len, 100);
        }
        // item: 2 + 8 + 100 bytes + a 4-byte slot: about 71 per 8 KiB leaf.
        let per_leaf = (PAGE_SIZE - HEADER_BYTES) / (110 + SLOT_BYTES);
        let pages = alloc.0 - 1;
        let full = n / per_leaf as u64;
        assert!(
            pages < full + full / 10,
            "{pages} pages for {n} appended rows; {full} if leaves were full"
        );

        // Descending keys always insert at slot 0 of the leftmost leaf: the change
        // falls in the left half of every split.
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = empty_tree(&volume, 1, 4096).await;
        let mut alloc = Counter(1);
        let n = 20_000u64;
        for k in (0..n).rev() {
            run_put(
                &mut store,
                1,
                &k.to_be_bytes(),
                &val[..(k % 90) as usize],
                &mut alloc,
            )
            .await;
        }
        let got = scan_all(volume, 1).await;
        assert_eq!(got.len() as u64, n, "row count after descending inserts");
        for (i, (k, len)) in got.iter().enumerate() {
            assert_eq!(k.as_slice(), (i as u64).to_be_bytes(), "key order at {i}");
            assert_eq!(*len, i % 90);
        }
    }

    /// A split writes the right half whole and only cuts the left page down: the
    /// MTR carries about half a page, not a whole one.
    #[tokio::test]
    async fn split_redo_is_about_half_a_page() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let mut store = empty_tree(&volume, 1, 4096).await;
        let mut alloc = Counter(1);
        // Two leaves, so the next split is not a root split.
        for k in (0..200u64).map(|i| i * 2) {
            run_put(&mut store, 1, &k.to_be_bytes(), &[b'x'; 100], &mut alloc).await;
        }
        // Fill gaps until a non-root leaf splits, and look at that MTR.
        for k in (0..200u64).map(|i| i * 2 + 1) {
            let key = k.to_be_bytes();
            let ops = loop {
                match put(&store, 1, &key, &[b'y'; 100], &mut alloc) {
                    Ok(ops) => break ops,
                    Err(EngineError::PageMiss(p)) => store.load(p).await.unwrap(),
                    Err(e) => panic!("{e}"),
                }
            };
            let inits = ops
                .iter()
                .filter(|(_, op)| matches!(op, Op::InitWithItems { .. }))
                .count();
            let bytes: usize = ops
                .iter()
                .map(|(p, op)| {
                    borealis_redo::Record {
                        lsn: borealis_common::Lsn(1),
                        prev_lsn: borealis_common::Lsn::ZERO,
                        page: *p,
                        flags: 0,
                        op: op.clone(),
                    }
                    .encode()
                    .len()
                })
                .sum();
            let split = ops
                .iter()
                .any(|(_, op)| matches!(op, Op::TruncateItems { .. }));
            store.write(ops).await.unwrap();
            if split {
                assert_eq!(inits, 1, "only the new right page is written whole");
                assert!(bytes < PAGE_SIZE * 3 / 4, "split MTR of {bytes} bytes");
                return;
            }
        }
        panic!("no leaf split happened");
    }

    #[tokio::test]
    async fn many_inserts_split_and_stay_sorted_and_survive_cache_loss() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let root = 1;
        let mut store = empty_tree(&volume, root, 256).await;
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
        let got = all_keys(volume, root).await;
        assert_eq!(got.len() as u64, n);
        for (i, (k, len)) in got.into_iter().enumerate() {
            assert_eq!(k, i as u64);
            let expect = if k % 3 == 0 { 120 } else { (k % 50) as usize };
            assert_eq!(len, expect);
        }
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

    /// Writes runs of items with `put_run` until all are in (as the engine does).
    async fn run_put_run(store: &mut Store, root: PageNo, items: &[Vec<u8>], alloc: &mut Counter) {
        let mut at = 0;
        while at < items.len() {
            match put_run(store, root, &items[at..], alloc) {
                Ok((ops, used)) => {
                    assert!(used > 0);
                    store.write(ops).await.unwrap();
                    at += used;
                }
                Err(EngineError::PageMiss(p)) => store.load(p).await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Every key in order through the leaf chain, through a cold cache.
    async fn all_keys(volume: Volume, root: PageNo) -> Vec<(u64, usize)> {
        scan_all(volume, root)
            .await
            .into_iter()
            .map(|(k, len)| (u64::from_be_bytes(k.as_slice().try_into().unwrap()), len))
            .collect()
    }

    #[tokio::test]
    async fn put_run_matches_a_map_for_appends_scattered_runs_and_replacements() {
        let volume = Volume::in_memory(VolumeConfig::default());
        let root = 1;
        let mut store = empty_tree(&volume, root, 256).await;
        let mut alloc = Counter(1);
        let mut expect = std::collections::BTreeMap::new();
        // Appends in key order (a load by hidden row id), in batches of 2000: the
        // root splits into several levels.
        for batch in 0..20u64 {
            let items: Vec<Vec<u8>> = (batch * 2000..(batch + 1) * 2000)
                .map(|k| {
                    let k = k * 10;
                    expect.insert(k, 120);
                    make_item(&k.to_be_bytes(), &[b'a'; 120])
                })
                .collect();
            run_put_run(&mut store, root, &items, &mut alloc).await;
        }
        // Sorted batches of scattered keys (between and beyond the existing ones),
        // some replacing existing keys with longer values.
        let mut x = 12345u64;
        for _ in 0..30 {
            let mut keys: Vec<u64> = (0..700)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % 450_000
                })
                .collect();
            keys.sort();
            keys.dedup();
            let items: Vec<Vec<u8>> = keys
                .iter()
                .map(|&k| {
                    let len = if k % 10 == 0 { 200 } else { (k % 90) as usize };
                    expect.insert(k, len);
                    make_item(&k.to_be_bytes(), &vec![b'b'; len])
                })
                .collect();
            run_put_run(&mut store, root, &items, &mut alloc).await;
        }
        let got = all_keys(volume, root).await;
        let want: Vec<(u64, usize)> = expect.into_iter().collect();
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        for k in [0u64, 10, 199_990, 449_999] {
            let found = loop {
                match get(&store, root, &k.to_be_bytes()) {
                    Ok(f) => break f,
                    Err(EngineError::PageMiss(p)) => store.load(p).await.unwrap(),
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(found.is_some(), got.iter().any(|(g, _)| *g == k), "key {k}");
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
