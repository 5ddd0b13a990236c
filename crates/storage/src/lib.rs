//! Storage node: hosts segments of protection groups (PGs), appends redo durably and
//! acknowledges it, tracks SCL via backlinks, materializes pages with
//! [`borealis_redo::apply`], serves GetPage@LSN, garbage-collects below PGMRPL and
//! fences stale writers by volume epoch.
//!
//! Layers, from the bytes up:
//!
//! * [`proto`]: the binary wire protocol (length-prefixed, bounded frames) shared with
//!   the volume client.
//! * [`disk`]: the [`disk::Disk`] trait: real files with `fdatasync`, or a simulated
//!   disk that tears unsynced writes on a crash.
//! * [`segment`]: one PG's log on one node: log format, torn-tail cut, SCL, page
//!   materialization, GC, compaction.
//! * [`node`]: the node as a sans-I/O state machine: requests in, replies out, acks
//!   released after the group commit's sync.
//! * [`server`]: the tokio driver ([`run`], [`NodeConfig`]) and `/health`, `/metrics`.
//! * [`client`]: a simple request/response client (recovery, tests, rebuild).

pub mod client;
pub mod disk;
pub mod node;
pub mod proto;
pub mod segment;
pub mod server;

pub use node::{Node, NodeLimits};
pub use server::{run, start, NodeConfig, NodeHandle, StorageError};

#[cfg(test)]
mod tests;
