//! Buffer cache, B+trees, MVCC, catalog and transactions over the volume.
