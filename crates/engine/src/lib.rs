//! The database engine of an instance: buffer cache, B+trees, catalog, MVCC and
//! transactions, all over the volume. It persists nothing itself: every page change is
//! a redo record from [`borealis_volume::Volume::append`], applied to the cached page
//! with [`borealis_redo::apply`] (invariants 1 and 2).

pub mod types;

pub use types::{Datum, Numeric, Type};
