//! Free-space reuse: the free-page list, and the trees waiting to be put on it.
//!
//! ```text
//!   superblock: free head ──> [next | n | page, page, ...]  (a raw page of the list)
//!                                │
//!                                └──> [next | n | ...] ──> ... ──> 0
//!   allocation: the head page's entries from the end, then the head page itself
//!               (the next page of the list becomes the head), then fresh numbers
//!   garbage tree (root in the superblock): (xid, seq) -> (when, root)
//!     IfCommitted: a root the transaction stopped using (DROP, TRUNCATE, a rewrite)
//!     IfAborted:   a root the transaction created (CREATE, TRUNCATE's new tree)
//! ```
//!
//! Why: page numbers used to only grow, so every dropped, truncated or rewritten
//! table kept its pages (and each storage segment its images of them) forever; a
//! test suite or an application that re-creates tables ran storage out of disk.
//!
//! A tree cannot be freed when its DDL commits: a snapshot older than the commit
//! still sees the old catalog entry and may walk the old tree (TRUNCATE and DROP are
//! MVCC-safe here). So the DDL records the root in the garbage tree, in the
//! transaction's own MTRs but outside MVCC, keyed by the transaction (or
//! subtransaction) id. [`crate::Engine::reclaim`] later decides each entry from the
//! transaction's fate: a committed IfCommitted root is freed once the commit is at or
//! below the prune horizon (no snapshot can see the tree any more), an aborted
//! IfAborted root at once; the other pairings just drop the entry. Freeing a tree
//! pushes every page of it onto the list and deletes its entry in one MTR, so a crash
//! never frees a tree twice nor half of one.
//!
//! The first pages of the list are mirrored in memory (`FreeList::mirror`: the head
//! page, up to 64 after a push, as many as a bulk build will need before it) so
//! that allocation, which happens inside synchronous B+tree walks, never reads a
//! page; the rest of the list is read when the mirrored part is used up. Pages on
//! the list keep their old contents: whoever allocates one formats it
//! (`Init`/`InitWithItems`), as with a fresh page.

use crate::btree;
use crate::catalog::{TableDef, FIRST_FREE_PAGE};
use crate::store::Store;
use crate::EngineError;
use borealis_common::PageNo;
use borealis_redo::page::BODY_BYTES;
use borealis_redo::{Op, Page, PageKind};
use std::collections::HashSet;
use std::sync::Arc;

/// Byte offsets in a free-list page's body.
const LIST_NEXT: u16 = 0;
const LIST_COUNT: u16 = 8;
const LIST_ENTRIES: u16 = 16;
/// Page numbers one free-list page holds.
pub const FREE_PER_PAGE: usize = (BODY_BYTES - LIST_ENTRIES as usize) / 8;
/// List pages a push leaves mirrored (about 65,000 free pages, 512 KiB of memory):
/// freeing a huge table must not hold all its page numbers in memory.
const MIRROR_PAGES: usize = 64;

/// One page of the free list as mirrored in memory.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub page: PageNo,
    /// The link to the next page of the list (0: the last).
    pub next: PageNo,
    pub entries: Vec<PageNo>,
}

impl ListPage {
    /// Reads list page `page_no` (`page`), checking every entry against the pages
    /// that can exist (`limit` = the next fresh page number).
    pub fn read(page_no: PageNo, page: &Page, limit: PageNo) -> Result<ListPage, EngineError> {
        let bad = |why: &str| EngineError::Corrupt(format!("free-list page {page_no}: {why}"));
        if page.kind() != Some(PageKind::Raw) {
            return Err(bad("not a raw page"));
        }
        let body = page.body();
        let next = crate::u64_at(body, LIST_NEXT);
        let n = crate::u64_at(body, LIST_COUNT) as usize;
        if n > FREE_PER_PAGE {
            return Err(bad("entry count out of range"));
        }
        if next != 0 && !(FIRST_FREE_PAGE..limit).contains(&next) {
            return Err(bad("link out of range"));
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let p = crate::u64_at(body, LIST_ENTRIES + 8 * i as u16);
            if !(FIRST_FREE_PAGE..limit).contains(&p) {
                return Err(bad("entry out of range"));
            }
            entries.push(p);
        }
        Ok(ListPage {
            page: page_no,
            next,
            entries,
        })
    }
}

/// The free list: its head and a mirrored prefix of its pages.
#[derive(Debug, Clone, Default)]
pub struct FreeList {
    /// Head page of the list (0: the list is empty).
    pub head: PageNo,
    /// The first pages of the list, from `head` on, each linked to the next
    /// (usually just the head page; a bulk build reserves more). Empty while the
    /// head page could not be read: allocation then takes fresh page numbers only,
    /// since taking the head page itself would lose the entries on it.
    pub mirror: Arc<Vec<ListPage>>,
    /// Free pages in all, list pages included (persisted in the superblock).
    pub total: u64,
    /// A list page could not be read or was malformed: the rest of the list stays
    /// unused (allocation takes fresh pages) until the next start.
    pub broken: bool,
}

impl FreeList {
    /// Free pages allocation can take without reading a page.
    pub fn mirrored(&self) -> usize {
        self.mirror.iter().map(|l| l.entries.len() + 1).sum()
    }

    /// The page to read next to mirror more of the list (0: none).
    pub fn to_read(&self) -> PageNo {
        match self.mirror.last() {
            None => self.head,
            Some(l) => l.next,
        }
    }

    /// The ops that put `pages` on the list (first filling the head page if it is
    /// mirrored, then turning freed pages into new head pages linked in front of
    /// it); updates the mirror. The caller writes `head` and `total` to the
    /// superblock.
    pub fn push_ops(&mut self, pages: &[PageNo], ops: &mut Vec<(PageNo, Op)>) {
        let mirror = Arc::make_mut(&mut self.mirror);
        let mut rest = pages;
        if let Some(head) = mirror.first_mut() {
            let room = FREE_PER_PAGE - head.entries.len();
            let (add, after) = rest.split_at(room.min(rest.len()));
            if !add.is_empty() {
                let at = LIST_ENTRIES + 8 * head.entries.len() as u16;
                ops.push((
                    head.page,
                    Op::WriteBody {
                        offset: at,
                        data: le_bytes(add),
                    },
                ));
                head.entries.extend_from_slice(add);
                ops.push((
                    head.page,
                    Op::WriteBody {
                        offset: LIST_COUNT,
                        data: (head.entries.len() as u64).to_le_bytes().to_vec(),
                    },
                ));
            }
            rest = after;
        }
        while let Some((&page, after)) = rest.split_first() {
            let (entries, after) = after.split_at(FREE_PER_PAGE.min(after.len()));
            let mut body = Vec::with_capacity(LIST_ENTRIES as usize + 8 * entries.len());
            body.extend_from_slice(&self.head.to_le_bytes());
            body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            body.extend_from_slice(&le_bytes(entries));
            ops.push((
                page,
                Op::Init {
                    kind: PageKind::Raw as u16,
                },
            ));
            ops.push((
                page,
                Op::WriteBody {
                    offset: LIST_NEXT,
                    data: body,
                },
            ));
            mirror.insert(
                0,
                ListPage {
                    page,
                    next: self.head,
                    entries: entries.to_vec(),
                },
            );
            self.head = page;
            rest = after;
        }
        mirror.truncate(MIRROR_PAGES);
        self.total += pages.len() as u64;
    }
}

/// Page allocation inside one MTR: from the mirrored free list first, then fresh
/// numbers. Nothing changes until the MTR is written ([`FreeList::consume`]).
pub struct Alloc {
    pub next: PageNo,
    list: Arc<Vec<ListPage>>,
    /// The list page being consumed, and how many of its entries are left.
    at: usize,
    left: usize,
    /// Pages handed out, and how many of them came from the list.
    pub taken: usize,
    from_list: usize,
}

impl Alloc {
    pub fn new(next: PageNo, free: &FreeList) -> Alloc {
        Alloc {
            next,
            left: free.mirror.first().map_or(0, |l| l.entries.len()),
            list: free.mirror.clone(),
            at: 0,
            taken: 0,
            from_list: 0,
        }
    }
}

impl btree::PageAllocator for Alloc {
    fn allocate(&mut self) -> PageNo {
        self.taken += 1;
        if let Some(l) = self.list.get(self.at) {
            self.from_list += 1;
            if self.left > 0 {
                self.left -= 1;
                return l.entries[self.left];
            }
            // The list page itself: the list continues at its link.
            self.at += 1;
            self.left = self.list.get(self.at).map_or(0, |n| n.entries.len());
            return l.page;
        }
        let p = self.next;
        self.next += 1;
        p
    }
}

impl FreeList {
    /// Applies a written MTR's allocation to the list: the ops (for the same MTR)
    /// that record it, and the mirror without what was taken. Returns whether the
    /// superblock's head and count need writing (the caller writes them).
    pub fn consume(&mut self, a: Alloc, ops: &mut Vec<(PageNo, Op)>) -> Result<bool, EngineError> {
        if a.from_list == 0 {
            return Ok(false);
        }
        if !Arc::ptr_eq(&a.list, &self.mirror) {
            // The list changed after the allocation was made: its pages may have
            // been handed out twice. Nothing may be written.
            return Err(EngineError::Internal(
                "page allocation made from a stale free list".into(),
            ));
        }
        // Let go of the allocation's reference first, so the mirror is changed in
        // place rather than copied.
        drop(a.list);
        let mirror = Arc::make_mut(&mut self.mirror);
        let gone: Vec<ListPage> = mirror.drain(..a.at.min(mirror.len())).collect();
        if let Some(head) = mirror.first_mut() {
            if a.left < head.entries.len() {
                head.entries.truncate(a.left);
                ops.push((
                    head.page,
                    Op::WriteBody {
                        offset: LIST_COUNT,
                        data: (a.left as u64).to_le_bytes().to_vec(),
                    },
                ));
            }
            self.head = head.page;
        } else if let Some(last) = gone.last() {
            self.head = last.next;
        }
        self.total = self.total.saturating_sub(a.from_list as u64);
        Ok(true)
    }
}

fn le_bytes(pages: &[PageNo]) -> Vec<u8> {
    pages.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// When a garbage entry's tree is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The transaction stopped using the tree: free it if the transaction commits.
    IfCommitted = 1,
    /// The transaction created the tree: free it if the transaction aborts.
    IfAborted = 2,
}

/// A garbage-tree item: key (xid, seq) big-endian, payload (when, root).
pub fn garbage_item(xid: u64, seq: u64, when: When, root: PageNo) -> (Vec<u8>, Vec<u8>) {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&xid.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    let mut payload = Vec::with_capacity(9);
    payload.push(when as u8);
    payload.extend_from_slice(&root.to_le_bytes());
    (key, payload)
}

/// A garbage entry as read back.
#[derive(Debug, Clone)]
pub struct Garbage {
    pub key: Vec<u8>,
    pub xid: u64,
    pub when: When,
    pub root: PageNo,
}

pub fn decode_garbage(key: &[u8], payload: &[u8]) -> Result<Garbage, EngineError> {
    let bad = || EngineError::Corrupt("garbage entry".into());
    let xid = u64::from_be_bytes(
        key.get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let when = match payload.first() {
        Some(1) => When::IfCommitted,
        Some(2) => When::IfAborted,
        _ => return Err(bad()),
    };
    let root = u64::from_le_bytes(
        payload
            .get(1..9)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    Ok(Garbage {
        key: key.to_vec(),
        xid,
        when,
        root,
    })
}

/// The B+tree roots a relation owns (its tree and its indexes' trees).
pub fn roots_of(def: &TableDef) -> Vec<PageNo> {
    let mut roots: Vec<PageNo> = std::iter::once(def.root)
        .chain(def.indexes.iter().map(|i| i.root))
        .filter(|&r| r >= FIRST_FREE_PAGE)
        .collect();
    roots.sort_unstable();
    roots.dedup();
    roots
}

/// A walk collecting every page of a dead B+tree, resumable after a `PageMiss`
/// (the caller loads the page and steps again). It reads the internal pages and,
/// below each lowest internal page, one child to learn that the level is leaves
/// (B+trees are balanced), not every leaf. Order: leaves, then internal pages.
pub struct TreeWalk {
    stack: Vec<PageNo>,
    /// An internal page whose children are being classified: (page, children).
    probing: Option<(PageNo, Vec<PageNo>)>,
    pub leaves: Vec<PageNo>,
    pub internal: Vec<PageNo>,
    seen: HashSet<PageNo>,
    limit: PageNo,
}

impl TreeWalk {
    /// `limit`: the next fresh page number (no page of the tree is at or above it).
    pub fn new(root: PageNo, limit: PageNo) -> Result<TreeWalk, EngineError> {
        let mut walk = TreeWalk {
            stack: vec![root],
            probing: None,
            leaves: Vec::new(),
            internal: Vec::new(),
            seen: HashSet::new(),
            limit,
        };
        walk.check(root)?;
        Ok(walk)
    }

    fn check(&mut self, page: PageNo) -> Result<(), EngineError> {
        if !(FIRST_FREE_PAGE..self.limit).contains(&page) || !self.seen.insert(page) {
            return Err(EngineError::Corrupt(format!(
                "page {page} cannot be part of a dead tree (out of range or seen twice)"
            )));
        }
        Ok(())
    }

    /// Walks until done (Ok) or a page is missing (`PageMiss`); any other error
    /// means the tree is not what it should be and nothing may be freed.
    pub fn step(&mut self, store: &Store) -> Result<(), EngineError> {
        loop {
            if let Some((_, children)) = &self.probing {
                let first = children[0];
                let leaf_level = match store.page(first)?.kind() {
                    Some(PageKind::BtreeLeaf) => true,
                    Some(PageKind::BtreeInternal) => false,
                    _ => {
                        return Err(EngineError::Corrupt(format!(
                            "page {first} under an internal page is not a tree page"
                        )))
                    }
                };
                let Some((_, children)) = self.probing.take() else {
                    continue;
                };
                for &c in &children {
                    self.check(c)?;
                }
                if leaf_level {
                    self.leaves.extend(children);
                } else {
                    self.stack.extend(children.into_iter().rev());
                }
                continue;
            }
            let Some(&p) = self.stack.last() else {
                return Ok(());
            };
            let page = store.page(p)?;
            self.stack.pop();
            match page.kind() {
                Some(PageKind::BtreeLeaf) => self.leaves.push(p),
                Some(PageKind::BtreeInternal) => {
                    self.internal.push(p);
                    let children = btree::children(page)?;
                    if children.is_empty() {
                        return Err(EngineError::Corrupt(format!(
                            "internal page {p} has no children"
                        )));
                    }
                    self.probing = Some((p, children));
                }
                _ => {
                    return Err(EngineError::Corrupt(format!(
                        "page {p} of a dead tree is not a tree page"
                    )))
                }
            }
        }
    }

    /// Every page of the tree, leaves first.
    pub fn pages(self) -> Vec<PageNo> {
        let mut pages = self.leaves;
        pages.extend(self.internal);
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btree::PageAllocator;
    use borealis_common::Lsn;
    use borealis_redo::{apply, Record};
    use std::collections::BTreeMap;

    /// Pages as the ops leave them, through the one apply function.
    #[derive(Default)]
    struct Pages {
        map: BTreeMap<PageNo, Page>,
        lsn: u64,
    }

    impl Pages {
        fn apply(&mut self, ops: Vec<(PageNo, Op)>) {
            for (page, op) in ops {
                self.lsn += 1;
                let record = Record {
                    lsn: Lsn(self.lsn),
                    prev_lsn: Lsn(0),
                    page,
                    flags: 0,
                    op,
                };
                let p = self.map.entry(page).or_insert_with(Page::zeroed);
                apply(p, page, &record).expect("apply");
            }
        }

        /// Every page number on the list from `head`, list pages included.
        fn walk(&self, head: PageNo, limit: PageNo) -> Vec<PageNo> {
            let mut out = Vec::new();
            let mut at = head;
            while at != 0 {
                let l = ListPage::read(at, &self.map[&at], limit).expect("list page");
                out.push(at);
                out.extend(&l.entries);
                at = l.next;
            }
            out
        }
    }

    #[test]
    fn pushed_pages_come_back_once_each_and_the_rest_stays_listed() {
        let limit = 10_000;
        let mut pages = Pages::default();
        let mut free = FreeList::default();
        // Three pushes: one list page, then one that fills it and adds two more.
        for chunk in [100..400u64, 400..2900, 2900..3000] {
            let freed: Vec<PageNo> = chunk.collect();
            let mut ops = Vec::new();
            free.push_ops(&freed, &mut ops);
            pages.apply(ops);
        }
        assert_eq!(free.total, 2900);
        let mut listed = pages.walk(free.head, limit);
        listed.sort_unstable();
        assert_eq!(listed, (100..3000).collect::<Vec<_>>());

        // Allocations take the mirrored pages (the head page only here, as after a
        // restart), list page included, then fresh numbers; the rest stays on the
        // list as written.
        Arc::make_mut(&mut free.mirror).truncate(1);
        let mut taken = Vec::new();
        for round in 0..3 {
            let mut a = Alloc::new(limit, &free);
            // Round 0 wants more than the head page holds: the rest are fresh.
            let n = [1500, 300, 5][round];
            for _ in 0..n {
                taken.push(a.allocate());
            }
            let next = a.next;
            let mut ops = Vec::new();
            assert!(free.consume(a, &mut ops).expect("consume"));
            pages.apply(ops);
            if free.mirror.is_empty() && free.head != 0 {
                let l = ListPage::read(free.head, &pages.map[&free.head], limit).unwrap();
                Arc::make_mut(&mut free.mirror).push(l);
            }
            assert!(next >= limit);
        }
        let fresh: Vec<PageNo> = taken.iter().copied().filter(|&p| p >= limit).collect();
        let reused: Vec<PageNo> = taken.iter().copied().filter(|&p| p < limit).collect();
        assert!(
            !reused.is_empty() && !fresh.is_empty(),
            "{} {}",
            reused.len(),
            fresh.len()
        );
        let mut left = pages.walk(free.head, limit);
        assert_eq!(free.total as usize, left.len());
        left.extend(&reused);
        left.sort_unstable();
        assert_eq!(
            left,
            (100..3000).collect::<Vec<_>>(),
            "every page exactly once"
        );
    }

    #[test]
    fn a_stale_allocation_is_refused() {
        let mut free = FreeList::default();
        let mut ops = Vec::new();
        free.push_ops(&(100..200).collect::<Vec<_>>(), &mut ops);
        let mut a = Alloc::new(1000, &free);
        a.allocate();
        // The list changes before the allocation's MTR is written.
        free.push_ops(&[300], &mut ops);
        assert!(free.consume(a, &mut ops).is_err());
    }

    #[test]
    fn malformed_list_pages_are_refused() {
        let mut pages = Pages::default();
        let mut free = FreeList::default();
        let mut ops = Vec::new();
        free.push_ops(&[50, 60, 70], &mut ops);
        pages.apply(ops);
        // Entries beyond the pages that exist, or a count beyond the page.
        assert!(ListPage::read(50, &pages.map[&50], 65).is_err());
        pages.apply(vec![(
            50,
            Op::WriteBody {
                offset: LIST_COUNT,
                data: (FREE_PER_PAGE as u64 + 1).to_le_bytes().to_vec(),
            },
        )]);
        assert!(ListPage::read(50, &pages.map[&50], 1000).is_err());
        assert!(ListPage::read(50, &Page::zeroed(), 1000).is_err());
    }
}
