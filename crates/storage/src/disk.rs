//! The storage node's view of a disk: one append-only log file per segment plus one
//! small node metadata file replaced atomically.
//!
//! The node logic ([`crate::node::Node`]) only talks to [`Disk`], so the same code
//! runs on real files ([`FileDisk`], with `fdatasync`) and on [`MemDisk`], a simulated
//! disk that keeps "written" and "synced" bytes apart and, on a simulated crash,
//! keeps only the synced bytes plus a torn prefix of the rest (possibly garbled).
//!
//! Durability contract: bytes passed to `append_log` are durable once a sync job
//! obtained *after* the append has completed successfully. `write_meta` is durable
//! (and atomic) when it returns.

use borealis_common::PgId;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A deferred sync, run off the node's event loop (a blocking thread in the tokio
/// driver, inline in the simulation).
pub type SyncJob = Box<dyn FnOnce() -> io::Result<()> + Send>;

pub trait Disk: Send {
    fn list_segments(&mut self) -> io::Result<Vec<PgId>>;
    fn read_log(&mut self, pg: PgId) -> io::Result<Vec<u8>>;
    /// Up to `max` bytes of a log from `offset` (fewer at the end of the file):
    /// scrubbing re-reads logs a stretch at a time.
    fn read_log_at(&mut self, pg: PgId, offset: u64, max: usize) -> io::Result<Vec<u8>>;
    fn append_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()>;
    /// Cuts a log to `len` bytes (a torn tail found on restart) and syncs that.
    fn truncate_log(&mut self, pg: PgId, len: u64) -> io::Result<()>;
    /// Atomically replaces a log with `bytes` (compaction) durably.
    fn replace_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()>;
    /// A job that makes every byte appended so far to these logs durable.
    fn sync_job(&mut self, pgs: &[PgId]) -> io::Result<SyncJob>;
    fn read_meta(&mut self) -> io::Result<Option<Vec<u8>>>;
    fn write_meta(&mut self, bytes: &[u8]) -> io::Result<()>;
}

// ---- real files -------------------------------------------------------------------

/// Log files grow in zero-filled chunks of this size. An fdatasync after an
/// append that grows a file must also commit the file's new size (a filesystem
/// journal commit); appending into bytes that already exist and are written does
/// not, which is why PostgreSQL zero-fills its WAL segments too. On restart the
/// zero tail reads as the clean end of the log and is cut (see `Segment::replay`).
const PREALLOCATE_BYTES: u64 = 8 << 20;

struct LogFile {
    file: Arc<File>,
    /// Logical end: where the next append goes.
    len: u64,
    /// Bytes that exist in the file (written or zero-filled).
    allocated: u64,
}

pub struct FileDisk {
    dir: PathBuf,
    logs: BTreeMap<PgId, LogFile>,
}

impl FileDisk {
    pub fn open(dir: &Path) -> io::Result<FileDisk> {
        std::fs::create_dir_all(dir)?;
        Ok(FileDisk {
            dir: dir.to_path_buf(),
            logs: BTreeMap::new(),
        })
    }

    fn log_path(&self, pg: PgId) -> PathBuf {
        self.dir.join(format!("segment-{:08}.log", pg.0))
    }

    /// The open log of `pg`. A file opened for the first time ends at its size:
    /// the node cuts any zero tail at start-up before it appends.
    fn log(&mut self, pg: PgId) -> io::Result<&mut LogFile> {
        if !self.logs.contains_key(&pg) {
            let path = self.log_path(pg);
            let created = !path.exists();
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .read(true)
                .truncate(false)
                .open(&path)?;
            if created {
                // The new file's directory entry must survive a crash too.
                sync_dir(&self.dir)?;
            }
            let size = file.metadata()?.len();
            self.logs.insert(
                pg,
                LogFile {
                    file: Arc::new(file),
                    len: size,
                    allocated: size,
                },
            );
        }
        self.logs
            .get_mut(&pg)
            .ok_or_else(|| io::Error::other("log vanished"))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn fdatasync(f: &File) -> io::Result<()> {
    f.sync_data()
}

impl Disk for FileDisk {
    fn list_segments(&mut self) -> io::Result<Vec<PgId>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix("segment-")
                .and_then(|s| s.strip_suffix(".log"))
            {
                if let Ok(n) = n.parse::<u32>() {
                    out.push(PgId(n));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_log(&mut self, pg: PgId) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        match File::open(self.log_path(pg)) {
            Ok(mut f) => {
                f.read_to_end(&mut buf)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(buf)
    }

    fn read_log_at(&mut self, pg: PgId, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        // A fresh descriptor: reads what is on disk (through the page cache), the
        // same bytes a restart would replay.
        let f = match File::open(self.log_path(pg)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; max];
        let mut got = 0usize;
        while got < max {
            let n = f.read_at(&mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn append_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let log = self.log(pg)?;
        let end = log.len + bytes.len() as u64;
        if end > log.allocated {
            // Zero-fill the next chunk(s) so later appends overwrite existing bytes.
            let target = end.div_ceil(PREALLOCATE_BYTES) * PREALLOCATE_BYTES;
            let zeros = vec![0u8; (1 << 20).min((target - log.allocated) as usize)];
            let mut at = log.allocated;
            while at < target {
                let n = zeros.len().min((target - at) as usize);
                log.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            log.allocated = target;
        }
        log.file.write_all_at(bytes, log.len)?;
        log.len = end;
        Ok(())
    }

    fn truncate_log(&mut self, pg: PgId, len: u64) -> io::Result<()> {
        let log = self.log(pg)?;
        log.file.set_len(len)?;
        log.file.sync_all()?;
        log.len = len;
        log.allocated = len;
        Ok(())
    }

    fn replace_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("segment-{:08}.log.tmp", pg.0));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.log_path(pg))?;
        sync_dir(&self.dir)?;
        self.logs.remove(&pg);
        Ok(())
    }

    fn sync_job(&mut self, pgs: &[PgId]) -> io::Result<SyncJob> {
        let mut files = Vec::with_capacity(pgs.len());
        for pg in pgs {
            files.push(self.log(*pg)?.file.clone());
        }
        // One job syncs every dirty segment file of the group commit, one after the
        // other on the blocking thread that runs it. (Syncing them on threads of
        // their own cost a thread creation per file per group commit, which under
        // load outweighed the overlap it bought.)
        Ok(Box::new(move || {
            files.iter().try_for_each(|f| fdatasync(f))
        }))
    }

    fn read_meta(&mut self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join("node.meta")) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_meta(&mut self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("node.meta.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("node.meta"))?;
        sync_dir(&self.dir)
    }
}

// ---- simulated disk ----------------------------------------------------------------

#[derive(Default, Clone)]
struct MemFile {
    durable: Vec<u8>,
    /// Appended but not yet synced: lost or torn on a crash.
    volatile: Vec<u8>,
}

#[derive(Default)]
struct MemState {
    logs: BTreeMap<PgId, MemFile>,
    meta: Option<Vec<u8>>,
    /// Injected fault: every operation fails (disk full / dead disk).
    failing: bool,
}

/// A simulated disk shared between a node "process" and the simulation (which
/// survives the node's crashes). Cloning shares the same disk.
#[derive(Clone, Default)]
pub struct MemDisk {
    state: Arc<Mutex<MemState>>,
}

impl MemDisk {
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates power loss: each log keeps its synced bytes plus the first
    /// `keep(pg, volatile_len)` unsynced bytes; if `garble` is set the last kept byte
    /// is flipped (a torn sector).
    pub fn crash(&self, mut keep: impl FnMut(PgId, usize) -> (usize, bool)) {
        let mut st = self.lock();
        for (pg, f) in st.logs.iter_mut() {
            let (n, garble) = keep(*pg, f.volatile.len());
            let n = n.min(f.volatile.len());
            let mut kept = f.volatile[..n].to_vec();
            if garble {
                if let Some(b) = kept.last_mut() {
                    *b ^= 0x5a;
                }
            }
            f.durable.extend_from_slice(&kept);
            f.volatile.clear();
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// Flips one byte of a log's durable bytes (bit rot), for tests.
    pub fn corrupt(&self, pg: PgId, offset: usize) {
        let mut st = self.lock();
        if let Some(b) = st.logs.get_mut(&pg).and_then(|f| f.durable.get_mut(offset)) {
            *b ^= 0xff;
        }
    }

    pub fn log_len(&self, pg: PgId) -> usize {
        self.lock()
            .logs
            .get(&pg)
            .map(|f| f.durable.len() + f.volatile.len())
            .unwrap_or(0)
    }

    fn check(st: &MemState) -> io::Result<()> {
        if st.failing {
            return Err(io::Error::other("simulated I/O error"));
        }
        Ok(())
    }
}

impl Disk for MemDisk {
    fn list_segments(&mut self) -> io::Result<Vec<PgId>> {
        let st = self.lock();
        Self::check(&st)?;
        Ok(st.logs.keys().copied().collect())
    }

    fn read_log(&mut self, pg: PgId) -> io::Result<Vec<u8>> {
        let st = self.lock();
        Self::check(&st)?;
        Ok(st
            .logs
            .get(&pg)
            .map(|f| [&f.durable[..], &f.volatile[..]].concat())
            .unwrap_or_default())
    }

    fn read_log_at(&mut self, pg: PgId, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        let st = self.lock();
        Self::check(&st)?;
        let Some(f) = st.logs.get(&pg) else {
            return Ok(Vec::new());
        };
        let all = [&f.durable[..], &f.volatile[..]].concat();
        let from = (offset as usize).min(all.len());
        let to = from.saturating_add(max).min(all.len());
        Ok(all[from..to].to_vec())
    }

    fn append_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        Self::check(&st)?;
        st.logs
            .entry(pg)
            .or_default()
            .volatile
            .extend_from_slice(bytes);
        Ok(())
    }

    fn truncate_log(&mut self, pg: PgId, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        Self::check(&st)?;
        let f = st.logs.entry(pg).or_default();
        let mut all = [&f.durable[..], &f.volatile[..]].concat();
        all.truncate(len as usize);
        f.durable = all;
        f.volatile.clear();
        Ok(())
    }

    fn replace_log(&mut self, pg: PgId, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        Self::check(&st)?;
        st.logs.insert(
            pg,
            MemFile {
                durable: bytes.to_vec(),
                volatile: Vec::new(),
            },
        );
        Ok(())
    }

    fn sync_job(&mut self, pgs: &[PgId]) -> io::Result<SyncJob> {
        let pgs = pgs.to_vec();
        let disk = self.clone();
        Ok(Box::new(move || {
            let mut st = disk.lock();
            Self::check(&st)?;
            for pg in pgs {
                if let Some(f) = st.logs.get_mut(&pg) {
                    let v = std::mem::take(&mut f.volatile);
                    f.durable.extend_from_slice(&v);
                }
            }
            Ok(())
        }))
    }

    fn read_meta(&mut self) -> io::Result<Option<Vec<u8>>> {
        let st = self.lock();
        Self::check(&st)?;
        Ok(st.meta.clone())
    }

    fn write_meta(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        Self::check(&st)?;
        st.meta = Some(bytes.to_vec());
        Ok(())
    }
}
