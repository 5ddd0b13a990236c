//! Client side of the volume, used by database instances.
//!
//! The engine sees the volume through [`Volume`]:
//!
//! * [`Volume::append`] turns one mini-transaction (a list of page ops) into redo
//!   records: it allocates dense, increasing LSNs, sets each record's backlink to the
//!   previous record of its PG, flags the last record as the MTR's CPL, queues the
//!   records to every segment of their PGs, and returns them so the caller can apply
//!   them to its cached pages with [`borealis_redo::apply`]. It waits (asynchronously)
//!   while the next LSN would pass VDL + LAL: that is the write path's backpressure.
//! * [`Volume::wait_durable`] resolves when VDL has reached an LSN: commit waits on it.
//! * [`Volume::get_page`] reads a page as of a read LSN from one complete segment.
//!
//! Backends: `Memory` keeps the log in this process (engine unit tests, and the
//! reference the simulation compares against). The quorum backend over real storage
//! nodes ([`Volume::open_writer`]) lives beside it behind the same API:
//!
//! * [`quorum`]: sans-I/O writer state (LSN allocation, acks, PGCL/VCL/VDL, LAL,
//!   read routing), shared with the deterministic simulation.
//! * [`recovery`]: VCL/VDL from a read quorum of segment tails, truncation history.
//! * `remote`: the tokio driver (one pipelined connection per storage node).
//!
//! # Opening the volume on an instance
//!
//! ```text
//!   let topology: Topology = GET /v1/volume/topology (control plane);
//!   let epoch: Epoch = a fresh volume epoch from the control plane (higher than any
//!                      before: every writer start and every failover gets a new one);
//!   let volume = Volume::open_writer(topology, epoch, VolumeConfig { geometry: topology.geometry, lal }).await?;
//! ```
//!
//! `open_writer` runs recovery (fence older writers on a write quorum, read a read
//! quorum of every PG's tail above the persisted VDL hint, compute VCL/VDL, truncate
//! above VDL, re-replicate the kept tail) and returns once the volume is writable at
//! VDL. It fails with [`VolumeError::Fenced`] if a newer epoch already exists and
//! with [`VolumeError::Unavailable`] without a read quorum of some PG or a write
//! quorum for the epoch. After it returns, `vdl()` is the recovered durable point;
//! the engine's state is exactly the pages as of it (no redo replay on the
//! instance, invariant 8). The writer should call [`Volume::set_min_read_point`]
//! with the oldest read point any instance still uses (PGMRPL): segments fold and
//! garbage-collect redo below it, which keeps GetPage cheap.

mod memory;
pub mod quorum;
pub mod recovery;
mod remote;

use borealis_common::{Epoch, Geometry, Lsn, PageNo};
use borealis_redo::{Op, Page, Record};
use std::sync::Arc;

pub use memory::MemoryVolume;
pub use quorum::{QuorumConfig, TransitionStatus};
pub use remote::RemoteVolume;

#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    #[error("volume is fenced: epoch {ours} superseded by {theirs}")]
    Fenced { ours: Epoch, theirs: Epoch },
    #[error("page {0} is beyond the volume's maximum size")]
    PageOutOfRange(PageNo),
    #[error("read at LSN {read} is outside what storage can serve ({why})")]
    ReadPoint { read: Lsn, why: String },
    #[error("no segment of {pg} could serve the request: {why}")]
    Unavailable {
        pg: borealis_common::PgId,
        why: String,
    },
    #[error("corrupt data from storage: {0}")]
    Corrupt(String),
    #[error("volume is shut down")]
    Closed,
}

/// Limits and timeouts of the volume client (invariant 9: everything bounded).
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub geometry: Geometry,
    /// LSN allocation limit: the writer never allocates beyond VDL + lal.
    pub lal: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            geometry: Geometry::default(),
            lal: 100_000,
        }
    }
}

/// A snapshot of the volume client's state, for status and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VolumeStatus {
    pub epoch: Epoch,
    pub vcl: Lsn,
    pub vdl: Lsn,
    /// Highest LSN allocated so far.
    pub last_lsn: Lsn,
    pub protection_groups: u32,
    /// Commits hedged to the lazy segments because an eager one was slow.
    pub commit_hedges: u64,
    /// Times records were released to the segments; a group commit is one, so
    /// commits divided by this is the mean group size.
    pub flushes: u64,
    /// Bytes of redo records the writer holds (not yet at quorum, or kept for
    /// segments that have not acked them); bounded by `lal_bytes` plus
    /// `retain_acked_bytes` (see `QuorumConfig`).
    pub retained_bytes: u64,
}

/// Handle to a volume; cheap to clone.
#[derive(Clone)]
pub struct Volume {
    backend: Arc<Backend>,
}

enum Backend {
    Memory(MemoryVolume),
    Remote(RemoteVolume),
}

impl Volume {
    /// A volume kept entirely in this process (no storage nodes). Durable "at once":
    /// VDL follows every CPL immediately.
    pub fn in_memory(config: VolumeConfig) -> Volume {
        Volume {
            backend: Arc::new(Backend::Memory(MemoryVolume::new(config))),
        }
    }

    /// Opens the quorum-replicated volume as its writer under `epoch` (handed out by
    /// the control plane, higher than any before): runs recovery (read quorum of
    /// every PG's tail, VCL/VDL, truncation above VDL and fencing of older epochs on
    /// a write quorum, re-replication of the kept tail), then serves. The geometry
    /// is the topology's.
    pub async fn open_writer(
        topology: Topology,
        epoch: Epoch,
        config: VolumeConfig,
    ) -> Result<Volume, VolumeError> {
        Self::open_writer_with(topology, epoch, config, QuorumConfig::default()).await
    }

    /// [`Volume::open_writer`] with explicit quorum-client limits and timeouts.
    pub async fn open_writer_with(
        topology: Topology,
        epoch: Epoch,
        config: VolumeConfig,
        quorum: QuorumConfig,
    ) -> Result<Volume, VolumeError> {
        let remote = RemoteVolume::open_writer(topology, epoch, config, quorum).await?;
        Ok(Volume {
            backend: Arc::new(Backend::Remote(remote)),
        })
    }

    pub fn geometry(&self) -> Geometry {
        match &*self.backend {
            Backend::Memory(m) => m.geometry(),
            Backend::Remote(r) => r.geometry(),
        }
    }

    /// Appends one mini-transaction. See the module docs.
    pub async fn append(&self, mtr: Vec<(PageNo, Op)>) -> Result<Vec<Record>, VolumeError> {
        match &*self.backend {
            Backend::Memory(m) => m.append(mtr),
            Backend::Remote(r) => r.append(mtr).await,
        }
    }

    /// Resolves once VDL >= `lsn`.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), VolumeError> {
        match &*self.backend {
            Backend::Memory(m) => m.wait_durable(lsn).await,
            Backend::Remote(r) => r.wait_durable(lsn).await,
        }
    }

    /// [`wait_durable`](Self::wait_durable) for a commit made while `others_open`
    /// other write transactions were open; concurrent commits share one batch.
    pub async fn wait_commit(&self, lsn: Lsn, others_open: usize) -> Result<(), VolumeError> {
        match &*self.backend {
            Backend::Memory(m) => m.wait_durable(lsn).await,
            Backend::Remote(r) => r.wait_commit(lsn, others_open).await,
        }
    }

    /// The page as of `read_lsn` (all records of the page with LSN <= read_lsn
    /// applied). A page never written is returned zeroed.
    pub async fn get_page(&self, page: PageNo, read_lsn: Lsn) -> Result<Page, VolumeError> {
        match &*self.backend {
            Backend::Memory(m) => m.get_page(page, read_lsn),
            Backend::Remote(r) => r.get_page(page, read_lsn).await,
        }
    }

    /// Lowest read point any instance still needs (PGMRPL); storage may GC below it.
    pub fn set_min_read_point(&self, lsn: Lsn) {
        match &*self.backend {
            Backend::Memory(m) => m.set_min_read_point(lsn),
            Backend::Remote(r) => r.set_min_read_point(lsn),
        }
    }

    pub fn vdl(&self) -> Lsn {
        self.status().vdl
    }

    /// Tests: holds (or releases) durability of an in-memory volume, as if storage
    /// were slow to acknowledge. Does nothing to a quorum volume.
    pub fn set_durability_held(&self, held: bool) {
        if let Backend::Memory(m) = &*self.backend {
            m.set_durability_held(held);
        }
    }

    /// Adopts a newer topology from the control plane without a restart (a
    /// membership change: a segment being replaced, or a replacement completing).
    /// Returns whether anything changed. An in-memory volume has no placement.
    pub fn update_topology(&self, topology: &Topology) -> Result<bool, VolumeError> {
        match &*self.backend {
            Backend::Memory(_) => Ok(false),
            Backend::Remote(r) => r.update_topology(topology),
        }
    }

    /// Segment replacements in progress as the writer sees them (for the control
    /// plane, which completes a replacement once the new segments caught up).
    pub fn transitions(&self) -> Vec<TransitionStatus> {
        match &*self.backend {
            Backend::Memory(_) => Vec::new(),
            Backend::Remote(r) => r.transitions(),
        }
    }

    /// Membership epochs the writer uses, by group (`None`: the default segments).
    pub fn membership_epochs(&self) -> Vec<(Option<borealis_common::PgId>, u64)> {
        match &*self.backend {
            Backend::Memory(_) => Vec::new(),
            Backend::Remote(r) => r.membership_epochs(),
        }
    }

    pub fn status(&self) -> VolumeStatus {
        match &*self.backend {
            Backend::Memory(m) => m.status(),
            Backend::Remote(r) => r.status(),
        }
    }
}

/// Where a volume's segments live. Owned by the control plane (served at
/// `GET /v1/volume/topology`), consumed by instances.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub geometry: Geometry,
    pub nodes: Vec<StorageNodeInfo>,
    /// Explicit placements. A PG not listed here lives on `default_segments`.
    pub protection_groups: Vec<PgPlacement>,
    /// Node names (6, two per AZ) for PGs without an explicit placement.
    pub default_segments: Vec<String>,
    /// Membership epoch of the default segments (bumped at each step of a segment
    /// replacement, like a [`PgPlacement`]'s).
    #[serde(default)]
    pub default_membership_epoch: u64,
    /// During a segment replacement: the six the default segments are moving to
    /// (empty otherwise). Writes need a write quorum of both sets meanwhile.
    #[serde(default)]
    pub default_next_segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageNodeInfo {
    pub name: String,
    pub az: String,
    pub addr: std::net::SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PgPlacement {
    pub pg: borealis_common::PgId,
    /// Membership epoch: bumped when a segment is replaced.
    pub membership_epoch: u64,
    /// Node names hosting the PG's 6 segments.
    pub segments: Vec<String>,
    /// During a segment replacement: the six it is moving to (empty otherwise).
    #[serde(default)]
    pub next_segments: Vec<String>,
}
