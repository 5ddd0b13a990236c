//! The page layout every page kind shares.
//!
//! ```text
//!  0        8      10      12       14      16       24       32          64
//!  +--------+------+-------+--------+-------+--------+--------+-----------+------------
//!  | lsn    | kind | nslot | freehi | rsvd  | next   | aux    | special   | slots ...
//!  +--------+------+-------+--------+-------+--------+--------+-----------+------------
//!                 ... free space ...  | items (grow down from the end of the page) |
//! ```
//!
//! Slotted kinds (B+tree leaves and internals, heap-like pages) keep a sorted slot
//! array of (offset, len) pairs after the header and item bytes packed from the end.
//! Raw kinds (transaction status, metadata) treat everything after the header as a
//! plain byte array ("body"). An all-zero page is `Uninit`: never written.
//!
//! Every mutator checks before it writes, so an error leaves the page unchanged:
//! that is what makes [`crate::apply`] total without copying the page.

use borealis_common::{Lsn, PAGE_SIZE};

pub const HEADER_BYTES: usize = 64;
pub const SLOT_BYTES: usize = 4;
pub const SPECIAL_OFFSET: usize = 32;
pub const SPECIAL_BYTES: usize = 32;
/// Bytes available to a raw page's body.
pub const BODY_BYTES: usize = PAGE_SIZE - HEADER_BYTES;
/// Largest item a slotted page can hold (a page must fit at least two).
pub const MAX_ITEM_BYTES: usize = (PAGE_SIZE - HEADER_BYTES) / 2 - SLOT_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum PageKind {
    Uninit = 0,
    /// Free-form bytes after the header (transaction status, volume metadata).
    Raw = 1,
    BtreeLeaf = 2,
    BtreeInternal = 3,
}

impl PageKind {
    pub fn from_u16(v: u16) -> Option<PageKind> {
        Some(match v {
            0 => PageKind::Uninit,
            1 => PageKind::Raw,
            2 => PageKind::BtreeLeaf,
            3 => PageKind::BtreeInternal,
            _ => return None,
        })
    }
    pub fn is_slotted(self) -> bool {
        matches!(self, PageKind::BtreeLeaf | PageKind::BtreeInternal)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Page {
    bytes: Box<[u8; PAGE_SIZE]>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("lsn", &self.lsn())
            .field("kind", &self.kind_raw())
            .field("nslots", &self.nslots())
            .finish()
    }
}

impl Default for Page {
    fn default() -> Self {
        Page::zeroed()
    }
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Page {
    /// A page that was never written (kind `Uninit`, LSN 0).
    pub fn zeroed() -> Page {
        Page {
            bytes: Box::new([0u8; PAGE_SIZE]),
        }
    }

    pub fn new(kind: PageKind) -> Page {
        let mut p = Page::zeroed();
        put_u16(&mut p.bytes[..], 8, kind as u16);
        put_u16(&mut p.bytes[..], 12, PAGE_SIZE as u16);
        p
    }

    /// Wraps bytes read from disk or the network. Structural checks happen lazily in
    /// the accessors (which never panic) and in [`Page::check`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Page> {
        if bytes.len() != PAGE_SIZE {
            return None;
        }
        let mut p = Page::zeroed();
        p.bytes.copy_from_slice(bytes);
        Some(p)
    }

    pub fn as_bytes(&self) -> &[u8; PAGE_SIZE] {
        &self.bytes
    }

    pub fn lsn(&self) -> Lsn {
        Lsn(get_u64(&self.bytes[..], 0))
    }
    pub(crate) fn set_lsn(&mut self, lsn: Lsn) {
        put_u64(&mut self.bytes[..], 0, lsn.0)
    }
    fn kind_raw(&self) -> u16 {
        get_u16(&self.bytes[..], 8)
    }
    /// The page kind, or `None` for bytes that name no kind (a corrupt page).
    pub fn kind(&self) -> Option<PageKind> {
        PageKind::from_u16(self.kind_raw())
    }
    pub fn nslots(&self) -> u16 {
        get_u16(&self.bytes[..], 10)
    }
    fn free_hi(&self) -> usize {
        get_u16(&self.bytes[..], 12) as usize
    }
    /// Right sibling (B+tree) or any other forward link; 0 = none.
    pub fn next(&self) -> u64 {
        get_u64(&self.bytes[..], 16)
    }
    /// Kind-specific word (leftmost child of an internal node, tree level, ...).
    pub fn aux(&self) -> u64 {
        get_u64(&self.bytes[..], 24)
    }
    pub fn special(&self) -> &[u8] {
        &self.bytes[SPECIAL_OFFSET..SPECIAL_OFFSET + SPECIAL_BYTES]
    }
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_BYTES..]
    }

    fn slot(&self, i: u16) -> (usize, usize) {
        let at = HEADER_BYTES + i as usize * SLOT_BYTES;
        (
            get_u16(&self.bytes[..], at) as usize,
            get_u16(&self.bytes[..], at + 2) as usize,
        )
    }

    /// Item `i`, or `None` if out of range or if the slot points outside the page.
    pub fn item(&self, i: u16) -> Option<&[u8]> {
        if i >= self.nslots() || !self.kind().is_some_and(|k| k.is_slotted()) {
            return None;
        }
        let (off, len) = self.slot(i);
        self.bytes.get(off..off.checked_add(len)?)
    }

    pub fn items(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.nslots()).filter_map(move |i| self.item(i))
    }

    fn used_item_bytes(&self) -> usize {
        (0..self.nslots()).map(|i| self.slot(i).1).sum()
    }

    /// Bytes still free for items and their slots (after compaction).
    pub fn free_bytes(&self) -> usize {
        let n = self.nslots() as usize;
        (PAGE_SIZE - HEADER_BYTES).saturating_sub(n * SLOT_BYTES + self.used_item_bytes())
    }

    /// Whether an item of `len` bytes can be inserted (needs `len` + a slot).
    pub fn fits_insert(&self, len: usize) -> bool {
        len <= MAX_ITEM_BYTES && self.free_bytes() >= len + SLOT_BYTES
    }

    /// Whether item `slot` can be replaced by one of `len` bytes.
    pub fn fits_replace(&self, slot: u16, len: usize) -> bool {
        let old = if slot < self.nslots() {
            self.slot(slot).1
        } else {
            return false;
        };
        len <= MAX_ITEM_BYTES && self.free_bytes() + old >= len
    }

    /// Structural check of a slotted page (used by scrubbing and tests).
    pub fn check(&self) -> Result<(), String> {
        let Some(kind) = self.kind() else {
            return Err(format!("unknown page kind {}", self.kind_raw()));
        };
        if !kind.is_slotted() {
            return Ok(());
        }
        let n = self.nslots() as usize;
        let slots_end = HEADER_BYTES + n * SLOT_BYTES;
        if slots_end > self.free_hi() || self.free_hi() > PAGE_SIZE {
            return Err(format!(
                "slot array end {slots_end} beyond data start {}",
                self.free_hi()
            ));
        }
        for i in 0..n as u16 {
            let (off, len) = self.slot(i);
            if off < self.free_hi() || off + len > PAGE_SIZE {
                return Err(format!("slot {i} ({off}+{len}) outside the item area"));
            }
        }
        Ok(())
    }

    fn require_slotted(&self) -> Result<(), String> {
        match self.kind() {
            Some(k) if k.is_slotted() => self.check(),
            _ => Err(format!("page kind {} has no items", self.kind_raw())),
        }
    }

    /// Rewrites items contiguously at the end of the page, in slot order.
    /// Deterministic, so every replica that applies the same records compacts alike.
    fn compact(&mut self) {
        // Items are copied out of one copy of the page (on the stack), not one
        // allocation per item: a leaf whose rows grow (UPDATE adds a version)
        // compacts every few writes. The result is byte for byte what laying out
        // `self.items()` in slot order gives.
        let old: [u8; PAGE_SIZE] = *self.bytes;
        let n = self.nslots();
        let mut hi = PAGE_SIZE;
        let mut placed = 0usize;
        for i in 0..n {
            let at = HEADER_BYTES + i as usize * SLOT_BYTES;
            let (off, len) = (get_u16(&old, at) as usize, get_u16(&old, at + 2) as usize);
            // Only items that lie inside the page, as `item` returns them.
            let Some(item) = old.get(off..off + len) else {
                continue;
            };
            hi -= len;
            self.bytes[hi..hi + len].copy_from_slice(item);
            let at = HEADER_BYTES + placed * SLOT_BYTES;
            put_u16(&mut self.bytes[..], at, hi as u16);
            put_u16(&mut self.bytes[..], at + 2, len as u16);
            placed += 1;
        }
        put_u16(&mut self.bytes[..], 12, hi as u16);
    }

    /// Places `data` in the item area, compacting first if the free space is
    /// fragmented; returns its offset. Caller has checked that it fits.
    fn place(&mut self, data: &[u8], extra_slots: usize) -> usize {
        let slots_end = HEADER_BYTES + (self.nslots() as usize + extra_slots) * SLOT_BYTES;
        if self.free_hi() < slots_end + data.len() {
            self.compact();
        }
        let off = self.free_hi() - data.len();
        self.bytes[off..off + data.len()].copy_from_slice(data);
        put_u16(&mut self.bytes[..], 12, off as u16);
        off
    }

    pub(crate) fn insert_item(&mut self, slot: u16, data: &[u8]) -> Result<(), String> {
        self.require_slotted()?;
        let n = self.nslots();
        if slot > n {
            return Err(format!("insert at slot {slot} past {n} items"));
        }
        if !self.fits_insert(data.len()) {
            return Err(format!(
                "item of {} bytes does not fit ({} free)",
                data.len(),
                self.free_bytes()
            ));
        }
        let off = self.place(data, 1);
        let at = HEADER_BYTES + slot as usize * SLOT_BYTES;
        let end = HEADER_BYTES + n as usize * SLOT_BYTES;
        self.bytes.copy_within(at..end, at + SLOT_BYTES);
        put_u16(&mut self.bytes[..], at, off as u16);
        put_u16(&mut self.bytes[..], at + 2, data.len() as u16);
        put_u16(&mut self.bytes[..], 10, n + 1);
        Ok(())
    }

    pub(crate) fn delete_item(&mut self, slot: u16) -> Result<(), String> {
        self.require_slotted()?;
        let n = self.nslots();
        if slot >= n {
            return Err(format!("delete of slot {slot} of {n} items"));
        }
        let at = HEADER_BYTES + slot as usize * SLOT_BYTES;
        let end = HEADER_BYTES + n as usize * SLOT_BYTES;
        self.bytes.copy_within(at + SLOT_BYTES..end, at);
        self.bytes[end - SLOT_BYTES..end].fill(0);
        put_u16(&mut self.bytes[..], 10, n - 1);
        Ok(())
    }

    pub(crate) fn replace_item(&mut self, slot: u16, data: &[u8]) -> Result<(), String> {
        self.require_slotted()?;
        let n = self.nslots();
        if slot >= n {
            return Err(format!("replace of slot {slot} of {n} items"));
        }
        if !self.fits_replace(slot, data.len()) {
            return Err(format!("replacement of {} bytes does not fit", data.len()));
        }
        let (off, len) = self.slot(slot);
        let at = HEADER_BYTES + slot as usize * SLOT_BYTES;
        if data.len() <= len {
            // Shrink in place; the tail becomes fragmentation that compaction reclaims.
            self.bytes[off..off + data.len()].copy_from_slice(data);
        } else {
            // Mark the slot empty first so compaction (if needed) drops the old bytes.
            put_u16(&mut self.bytes[..], at + 2, 0);
            let off = self.place(data, 0);
            put_u16(&mut self.bytes[..], at, off as u16);
        }
        put_u16(&mut self.bytes[..], at + 2, data.len() as u16);
        Ok(())
    }

    /// See [`crate::Op::ShrinkItems`]. Validates every shrink before changing
    /// anything; each one shrinks in place like [`Page::replace_item`].
    pub(crate) fn shrink_items(&mut self, items: &[crate::ItemShrink]) -> Result<(), String> {
        self.require_slotted()?;
        let n = self.nslots();
        let mut after = None;
        for s in items {
            // Strictly increasing slots: each item shrinks once, from its own length.
            if after.is_some_and(|a| s.slot <= a) {
                return Err(format!("shrink of slot {} after slot {after:?}", s.slot));
            }
            after = Some(s.slot);
            let Some(len) = self.item(s.slot).map(<[u8]>::len) else {
                return Err(format!("shrink of slot {} of {n} items", s.slot));
            };
            if s.len as usize > len || s.patch_at as usize + 2 > s.len as usize {
                return Err(format!(
                    "shrink of a {len}-byte item to {} bytes with a patch at {}",
                    s.len, s.patch_at
                ));
            }
        }
        for s in items {
            let (off, _) = self.slot(s.slot);
            let at = off + s.patch_at as usize;
            put_u16(&mut self.bytes[..], at, s.patch);
            put_u16(
                &mut self.bytes[..],
                HEADER_BYTES + s.slot as usize * SLOT_BYTES + 2,
                s.len,
            );
        }
        Ok(())
    }

    pub(crate) fn truncate_items(&mut self, keep: u16) -> Result<(), String> {
        self.require_slotted()?;
        let n = self.nslots();
        if keep > n {
            return Err(format!("truncate to {keep} of {n} items"));
        }
        let start = HEADER_BYTES + keep as usize * SLOT_BYTES;
        let end = HEADER_BYTES + n as usize * SLOT_BYTES;
        self.bytes[start..end].fill(0);
        put_u16(&mut self.bytes[..], 10, keep);
        self.compact();
        Ok(())
    }

    pub(crate) fn set_links(&mut self, next: u64, aux: u64) {
        put_u64(&mut self.bytes[..], 16, next);
        put_u64(&mut self.bytes[..], 24, aux);
    }

    pub(crate) fn write_special(&mut self, offset: u8, data: &[u8]) -> Result<(), String> {
        let start = offset as usize;
        if start + data.len() > SPECIAL_BYTES {
            return Err(format!(
                "special write {start}+{} past {SPECIAL_BYTES}",
                data.len()
            ));
        }
        if self.kind() == Some(PageKind::Uninit) {
            return Err("special write to an uninitialized page".into());
        }
        let at = SPECIAL_OFFSET + start;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub(crate) fn write_body(&mut self, offset: u16, data: &[u8]) -> Result<(), String> {
        if self.kind() != Some(PageKind::Raw) {
            return Err(format!("body write to page kind {}", self.kind_raw()));
        }
        let start = offset as usize;
        if start + data.len() > BODY_BYTES {
            return Err(format!(
                "body write {start}+{} past {BODY_BYTES}",
                data.len()
            ));
        }
        let at = HEADER_BYTES + start;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod compact_tests {
    use super::*;

    /// Compaction as it was first written: every item copied out, then laid out
    /// again in slot order. `compact` must produce the same bytes.
    fn compact_by_copies(page: &mut Page) {
        let items: Vec<Vec<u8>> = page.items().map(<[u8]>::to_vec).collect();
        let mut hi = PAGE_SIZE;
        for (i, item) in items.iter().enumerate() {
            hi -= item.len();
            page.bytes[hi..hi + item.len()].copy_from_slice(item);
            let at = HEADER_BYTES + i * SLOT_BYTES;
            put_u16(&mut page.bytes[..], at, hi as u16);
            put_u16(&mut page.bytes[..], at + 2, item.len() as u16);
        }
        put_u16(&mut page.bytes[..], 12, hi as u16);
    }

    #[test]
    fn compaction_lays_items_out_as_before() {
        let mut page = Page::new(PageKind::BtreeLeaf);
        for i in 0..60u16 {
            page.insert_item(i, &vec![i as u8; 40 + (i as usize % 7)])
                .unwrap();
        }
        // Growing and shrinking items fragment the free space.
        for i in (0..60u16).step_by(3) {
            page.replace_item(i, &[0xee; 60]).unwrap();
            page.replace_item(i + 1, &[0xdd; 8]).unwrap();
        }
        page.delete_item(5).unwrap();
        let mut expected = page.clone();
        compact_by_copies(&mut expected);
        page.compact();
        assert_eq!(page.as_bytes(), expected.as_bytes());
        assert!(page.check().is_ok());
    }
}
