//! The buffer cache and the only path by which the engine changes pages.
//!
//! Pages are read from the volume on a miss (at VDL: a page is only evicted once
//! its last change is durable, so VDL covers it). Changes go through [`Store::write`]:
//! the ops of one mini-transaction are appended to the volume as redo records, and the
//! returned records are applied to the cached pages with the same `redo::apply` that
//! storage nodes run. Nothing else writes a page.
//!
//! Engine code that walks pages is synchronous: when it needs a page that is not
//! cached it returns [`EngineError::PageMiss`], the caller loads the page and retries.
//! Walks are read-only until they hand their ops to `write`, so a retry is harmless.

use crate::EngineError;
use borealis_common::{IdHashMap, Lsn, PageNo};
use borealis_redo::{apply, Op, Page};
use borealis_volume::Volume;
use std::cell::Cell;

struct Frame {
    page: Page,
    last_used: Cell<u64>,
}

pub struct Store {
    pub volume: Volume,
    /// Keyed with the cheap id hash: a point lookup probes it once per tree level.
    frames: IdHashMap<PageNo, Frame>,
    capacity_pages: usize,
    tick: Cell<u64>,
    pub hits: Cell<u64>,
    pub misses: u64,
}

/// Smallest cache allowed: a B+tree walk plus a split must fit with room to spare.
pub const MIN_CACHE_PAGES: usize = 256;

impl Store {
    pub fn new(volume: Volume, capacity_pages: usize) -> Store {
        Store {
            volume,
            frames: IdHashMap::default(),
            capacity_pages: capacity_pages.max(MIN_CACHE_PAGES),
            tick: Cell::new(0),
            hits: Cell::new(0),
            misses: 0,
        }
    }

    /// A cached page, or `PageMiss` for the caller to load it and retry.
    pub fn page(&self, page_no: PageNo) -> Result<&Page, EngineError> {
        match self.frames.get(&page_no) {
            Some(frame) => {
                let t = self.tick.get() + 1;
                self.tick.set(t);
                frame.last_used.set(t);
                self.hits.set(self.hits.get() + 1);
                Ok(&frame.page)
            }
            None => Err(EngineError::PageMiss(page_no)),
        }
    }

    pub fn cached_pages(&self) -> usize {
        self.frames.len()
    }

    /// Reads `page_no` from the volume into the cache.
    pub async fn load(&mut self, page_no: PageNo) -> Result<(), EngineError> {
        self.load_keeping(page_no, &[]).await
    }

    /// Loads `page_no` without evicting any page in `keep`.
    async fn load_keeping(&mut self, page_no: PageNo, keep: &[PageNo]) -> Result<(), EngineError> {
        if self.frames.contains_key(&page_no) {
            return Ok(());
        }
        self.misses += 1;
        let read_lsn = self.volume.vdl();
        let page = self.volume.get_page(page_no, read_lsn).await?;
        self.evict_if_full(keep);
        self.frames.insert(
            page_no,
            Frame {
                page,
                last_used: Cell::new(self.tick.get()),
            },
        );
        Ok(())
    }

    /// Evicts the least recently used sixteenth of the evictable pages (those whose
    /// last change is at or below VDL) once the cache is full.
    fn evict_if_full(&mut self, keep: &[PageNo]) {
        if self.frames.len() < self.capacity_pages {
            return;
        }
        let vdl = self.volume.vdl();
        let mut candidates: Vec<(u64, PageNo)> = self
            .frames
            .iter()
            .filter(|(p, f)| f.page.lsn() <= vdl && !keep.contains(p))
            .map(|(p, f)| (f.last_used.get(), *p))
            .collect();
        let n = (self.capacity_pages / 16).max(1).min(candidates.len());
        if n == 0 {
            return;
        }
        candidates.select_nth_unstable(n - 1);
        for (_, p) in &candidates[..n] {
            self.frames.remove(p);
        }
    }

    /// Appends one mini-transaction and applies its records to the cache. Returns the
    /// LSN of its last record (its CPL).
    pub async fn write(&mut self, ops: Vec<(PageNo, Op)>) -> Result<Lsn, EngineError> {
        let lsns = self.write_all(ops).await?;
        lsns.last()
            .copied()
            .ok_or_else(|| EngineError::Internal("empty mini-transaction".into()))
    }

    /// Like [`Store::write`], returning the LSN of every record in op order.
    pub async fn write_all(&mut self, ops: Vec<(PageNo, Op)>) -> Result<Vec<Lsn>, EngineError> {
        if ops.is_empty() {
            return Err(EngineError::Internal("empty mini-transaction".into()));
        }
        // Every page an op changes must be cached before its records are applied. The
        // walk that produced the ops read them, but a load during the walk's retries
        // may have evicted one since (only pages whose changes are all durable are
        // evicted, so reloading at VDL gives back the same image). Pages the MTR
        // formats from scratch need no load.
        let pages: Vec<PageNo> = ops.iter().map(|(p, _)| *p).collect();
        let mut formatted: Vec<PageNo> = Vec::new();
        for (p, op) in &ops {
            if matches!(op, Op::Init { .. } | Op::InitWithItems { .. }) {
                formatted.push(*p);
            } else if !formatted.contains(p) && !self.frames.contains_key(p) {
                self.load_keeping(*p, &pages).await?;
            }
        }
        let records = self.volume.append(ops).await?;
        let mut lsns = Vec::with_capacity(records.len());
        for record in &records {
            let frame = self.frames.entry(record.page).or_insert_with(|| Frame {
                page: Page::zeroed(),
                last_used: Cell::new(0),
            });
            apply(&mut frame.page, record.page, record)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            lsns.push(record.lsn);
        }
        self.evict_if_full(&[]);
        Ok(lsns)
    }
}
