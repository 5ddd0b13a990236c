//! SQL for an instance: parse (sqlparser), bind, plan and execute against the engine.
//!
//! The protocol front end talks to a [`Session`] only:
//!
//! * [`Session::query`]: the simple query protocol (one string, maybe several
//!   statements; each runs in its own implicit transaction unless inside BEGIN).
//! * [`Session::prepare`] then [`Session::execute`]: the extended protocol. Prepared
//!   statements know their parameter types (inferred where the client left them
//!   unspecified) and their result columns, so Describe can answer before Execute.
//! * COPY FROM STDIN: `query`/`execute` return [`ExecResult::CopyIn`]; the front end
//!   then feeds [`Session::copy_data`] and finishes with [`Session::copy_done`] or
//!   [`Session::copy_fail`].
//! * [`Session::transaction_status`] is what ReadyForQuery must carry.
//!
//! Errors are [`SqlError`] with a PostgreSQL SQLSTATE; engine errors are mapped in
//! one place ([`session::engine_error`]).

mod error;
mod exec;
mod expr;
mod plan;
pub mod session;

pub use borealis_engine::types::{Datum, Numeric, Type};
pub use error::SqlError;
pub use session::{Column, CopyFormat, Database, ExecResult, Prepared, Session, TransactionStatus};
