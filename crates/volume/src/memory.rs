//! The in-process volume: one log, no quorum. Used by engine unit tests and as the
//! reference model ("GetPage at L = apply the records up to L").

use crate::{VolumeConfig, VolumeError, VolumeStatus};
use borealis_common::{Epoch, Geometry, Lsn, PageNo, PgId};
use borealis_redo::{apply, Op, Page, Record, CPL_FLAG};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

pub struct MemoryVolume {
    config: VolumeConfig,
    state: Mutex<State>,
    /// Signalled when held durability is released.
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    last_lsn: Lsn,
    /// Last record LSN per PG, for backlinks.
    pg_tail: HashMap<PgId, Lsn>,
    /// Per page: its records in LSN order.
    pages: HashMap<PageNo, BTreeMap<Lsn, Record>>,
    min_read_point: Lsn,
    /// Tests only ([`MemoryVolume::set_durability_held`]): VDL frozen here.
    held_vdl: Option<Lsn>,
}

impl MemoryVolume {
    pub fn new(config: VolumeConfig) -> MemoryVolume {
        MemoryVolume {
            config,
            state: Mutex::new(State::default()),
            released: tokio::sync::Notify::new(),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.config.geometry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn append(&self, mtr: Vec<(PageNo, Op)>) -> Result<Vec<Record>, VolumeError> {
        let geometry = self.config.geometry;
        if let Some((page, _)) = mtr.iter().find(|(p, _)| *p >= geometry.max_pages()) {
            return Err(VolumeError::PageOutOfRange(*page));
        }
        let mut st = self.lock();
        let n = mtr.len();
        let mut out = Vec::with_capacity(n);
        for (i, (page, op)) in mtr.into_iter().enumerate() {
            st.last_lsn = st.last_lsn.next();
            let lsn = st.last_lsn;
            let pg = geometry.pg_of(page);
            let prev_lsn = st.pg_tail.insert(pg, lsn).unwrap_or(Lsn::ZERO);
            let flags = if i + 1 == n { CPL_FLAG } else { 0 };
            let record = Record {
                lsn,
                prev_lsn,
                page,
                flags,
                op,
            };
            st.pages
                .entry(page)
                .or_default()
                .insert(lsn, record.clone());
            out.push(record);
        }
        Ok(out)
    }

    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), VolumeError> {
        loop {
            let released = self.released.notified();
            {
                let st = self.lock();
                if lsn > st.last_lsn {
                    return Err(VolumeError::ReadPoint {
                        read: lsn,
                        why: format!("beyond last LSN {}", st.last_lsn),
                    });
                }
                if st.held_vdl.is_none_or(|vdl| lsn <= vdl) {
                    return Ok(());
                }
            }
            released.await;
        }
    }

    /// Tests: while held, VDL stays where it is (commits wait, snapshots do not
    /// move), as when storage acknowledges slowly; releasing makes everything
    /// appended so far durable.
    pub fn set_durability_held(&self, held: bool) {
        let mut st = self.lock();
        st.held_vdl = if held {
            Some(st.held_vdl.unwrap_or(st.last_lsn))
        } else {
            None
        };
        drop(st);
        self.released.notify_waiters();
    }

    pub fn get_page(&self, page_no: PageNo, read_lsn: Lsn) -> Result<Page, VolumeError> {
        let st = self.lock();
        let mut page = Page::zeroed();
        if let Some(records) = st.pages.get(&page_no) {
            for record in records.range(..=read_lsn).map(|(_, r)| r) {
                apply(&mut page, page_no, record)
                    .map_err(|e| VolumeError::Corrupt(e.to_string()))?;
            }
        }
        Ok(page)
    }

    pub fn set_min_read_point(&self, lsn: Lsn) {
        self.lock().min_read_point = lsn;
    }

    pub fn status(&self) -> VolumeStatus {
        let st = self.lock();
        let vdl = st.held_vdl.unwrap_or(st.last_lsn);
        VolumeStatus {
            epoch: Epoch(1),
            vcl: vdl,
            vdl,
            last_lsn: st.last_lsn,
            protection_groups: st.pg_tail.len() as u32,
            commit_hedges: 0,
            flushes: 0,
            retained_bytes: 0,
        }
    }
}
