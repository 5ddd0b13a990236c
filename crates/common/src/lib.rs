//! Shared vocabulary of Borealis, named after the Aurora paper (DESIGN.md section 2).
//!
//! Everything here is plain data: no I/O except the small HTTP helpers in [`http`]
//! that every process uses for `/health` and `/metrics`, and the log setup in [`logging`].

pub mod handoff;
pub mod http;
pub mod logging;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes integer ids (page numbers, LSNs) with one multiply instead of SipHash,
/// which was a visible share of hot paths (the engine's buffer-cache probes, a
/// storage node's per-record chain map). The ids are chosen by Borealis itself, not
/// by clients, so hash flooding is not a concern.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Size of a page in bytes. Pages are addressed by [`PageNo`].
pub const PAGE_SIZE: usize = 8192;

/// Log sequence number. Allocated densely by the writer: every LSN in `1..=last`
/// names exactly one redo record, which is what lets recovery tell a lost record
/// from an unused number. LSN 0 means "nothing".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
    pub const MAX: Lsn = Lsn(u64::MAX);
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Page number in the volume's address space.
pub type PageNo = u64;

/// Protection group id: PG `n` covers pages `n * pages_per_pg .. (n + 1) * pages_per_pg`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PgId(pub u32);

impl fmt::Display for PgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pg{}", self.0)
    }
}

/// Volume epoch: bumped by every recovery or failover (only the control plane hands
/// out new ones). Storage rejects writes and truncations carrying an older epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Volume geometry: how pages map to protection groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Pages per protection group. Aurora uses 10 GB; the default here is 32 MiB so
    /// that local tests spread over several PGs.
    pub pages_per_pg: u64,
    /// Upper bound on the number of PGs (default: 128 TiB of pages).
    pub max_pgs: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        let pages_per_pg = 4096;
        let max_bytes: u64 = 128 << 40;
        Geometry {
            pages_per_pg,
            max_pgs: (max_bytes / (pages_per_pg * PAGE_SIZE as u64)) as u32,
        }
    }
}

impl Geometry {
    pub fn pg_of(&self, page: PageNo) -> PgId {
        PgId((page / self.pages_per_pg) as u32)
    }
    pub fn max_pages(&self) -> u64 {
        self.pages_per_pg * self.max_pgs as u64
    }
}

/// The availability zones of a cluster in a box.
pub const AZS: [&str; 3] = ["az-a", "az-b", "az-c"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_maps_pages_to_pgs() {
        let g = Geometry {
            pages_per_pg: 10,
            max_pgs: 4,
        };
        assert_eq!(g.pg_of(0), PgId(0));
        assert_eq!(g.pg_of(9), PgId(0));
        assert_eq!(g.pg_of(10), PgId(1));
        assert_eq!(g.max_pages(), 40);
        assert_eq!(
            Geometry::default().max_pages() * PAGE_SIZE as u64,
            128 << 40
        );
    }
}
