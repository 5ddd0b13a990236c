//! Tests-only crate: the runner lives in `tests/`, the scripts in `slt/` and `mvcc/`.
//! See `tests/sqllogic.rs` for the `.slt` format and `tests/mvcc.rs` for the
//! multi-session script format.
