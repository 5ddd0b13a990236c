//! Sessions: the unit the protocol front end drives. A session owns the current
//! transaction and its status (what ReadyForQuery reports), runs statements through
//! the executor, and maps engine errors to SQLSTATEs.

use crate::exec;
use crate::SqlError;
use borealis_engine::types::{Datum, Type};
use borealis_engine::{Engine, EngineError, Isolation, Txn};
use borealis_volume::Volume;
use sqlparser::ast::{
    Statement, TransactionAccessMode, TransactionIsolationLevel, TransactionMode,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What ReadyForQuery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InBlock,
    /// 'E': in a failed transaction block (only ROLLBACK is accepted).
    Failed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: Type,
    /// Table OID and column number when the column comes straight from a table.
    pub table_oid: u32,
    pub column_id: i16,
}

impl Column {
    pub fn new(name: impl Into<String>, ty: Type) -> Column {
        Column {
            name: name.into(),
            ty,
            table_oid: 0,
            column_id: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExecResult {
    /// Rows and the command tag ("SELECT 2", "INSERT 0 1" for RETURNING, ...).
    Rows {
        columns: Arc<Vec<Column>>,
        rows: Vec<Vec<Datum>>,
        tag: String,
    },
    /// A command without rows: "CREATE TABLE", "INSERT 0 5", "BEGIN", ...
    Command { tag: String },
    /// COPY ... FROM STDIN: the client must now send CopyData messages.
    CopyIn { format: CopyFormat, columns: usize },
    /// COPY ... TO STDOUT: the lines to send as CopyData, then the tag.
    CopyOut {
        format: CopyFormat,
        columns: usize,
        data: Vec<Vec<u8>>,
        tag: String,
    },
    /// An empty query string.
    Empty,
}

/// A parsed, described statement for the extended protocol.
#[derive(Debug)]
pub struct Prepared {
    pub sql: String,
    pub param_types: Vec<Type>,
    /// Result columns; empty for statements without rows.
    pub columns: Arc<Vec<Column>>,
    pub(crate) statement: Option<Arc<Statement>>,
    /// The plan of the last execution, reused while the catalog is unchanged.
    pub(crate) plan: exec::PlanSlot,
}

impl Clone for Prepared {
    fn clone(&self) -> Prepared {
        Prepared {
            sql: self.sql.clone(),
            param_types: self.param_types.clone(),
            columns: self.columns.clone(),
            statement: self.statement.clone(),
            // A copy binds its own plan when it first runs.
            plan: exec::PlanSlot::default(),
        }
    }
}

/// A database: the engine of one instance, shared by its sessions.
#[derive(Clone)]
pub struct Database {
    pub(crate) engine: Engine,
}

/// Buffer cache size used when the caller does not choose one (pages of 8 KiB).
pub const DEFAULT_CACHE_PAGES: usize = 65_536;

impl Database {
    /// Opens the database stored on `volume` (formatting a new volume).
    pub async fn open(volume: Volume) -> Result<Database, SqlError> {
        Database::open_with_cache(volume, DEFAULT_CACHE_PAGES).await
    }

    pub async fn open_with_cache(volume: Volume, cache_pages: usize) -> Result<Database, SqlError> {
        let engine = Engine::open(volume, cache_pages)
            .await
            .map_err(engine_error)?;
        Ok(Database { engine })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn session(&self, user: &str, database: &str) -> Session {
        Session {
            db: self.clone(),
            user: Arc::from(user),
            database: Arc::from(database),
            txn: None,
            status: TransactionStatus::Idle,
            default_isolation: Isolation::ReadCommitted,
            default_read_only: false,
            settings: HashMap::new(),
            copy: None,
            notices: Vec::new(),
            cancel: None,
            defer_commit: false,
        }
    }

    /// ParameterStatus values sent at startup.
    pub fn parameter_status(&self) -> Vec<(&'static str, String)> {
        vec![
            ("server_version", "15.0 (Borealis 0.1.0)".to_string()),
            ("server_encoding", "UTF8".to_string()),
            ("client_encoding", "UTF8".to_string()),
            ("DateStyle", "ISO, MDY".to_string()),
            ("TimeZone", "UTC".to_string()),
            ("integer_datetimes", "on".to_string()),
            ("standard_conforming_strings", "on".to_string()),
            ("IntervalStyle", "postgres".to_string()),
            ("is_superuser", "on".to_string()),
            ("application_name", String::new()),
        ]
    }
}

pub struct Session {
    pub(crate) db: Database,
    /// Shared, not copied, by every statement's executor.
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub(crate) txn: Option<Txn>,
    status: TransactionStatus,
    pub(crate) default_isolation: Isolation,
    /// `default_transaction_read_only`: new transactions start READ ONLY.
    pub(crate) default_read_only: bool,
    pub(crate) settings: HashMap<String, String>,
    pub(crate) copy: Option<exec::CopyState>,
    /// Notices raised since the front end last asked (severity, notice).
    pub(crate) notices: Vec<(&'static str, SqlError)>,
    /// Set by a cancel request for this session's connection.
    cancel: Option<Arc<AtomicBool>>,
    /// Extended-protocol statements outside a block commit at Sync, not at Execute.
    defer_commit: bool,
}

/// Message of the error that makes `exec::execute` re-run a statement with a fresh
/// catalog (see `EngineError::CatalogChanged`).
pub(crate) const CATALOG_CHANGED: &str =
    "could not serialize access due to concurrent DDL on the table";

/// Maps engine errors to SQLSTATEs: the one place where that happens.
pub fn engine_error(e: EngineError) -> SqlError {
    match e {
        EngineError::UniqueViolation {
            constraint, detail, ..
        } => {
            let err = SqlError::new(
                "23505",
                format!("duplicate key value violates unique constraint \"{constraint}\""),
            );
            if detail.is_empty() {
                err
            } else {
                err.with_detail(detail)
            }
        }
        EngineError::SerializationFailure => SqlError::new(
            "40001",
            "could not serialize access due to concurrent update",
        ),
        EngineError::Deadlock { detail } => {
            SqlError::new("40P01", "deadlock detected").with_detail(detail)
        }
        EngineError::RowTooBig(n) => SqlError::new(
            "54000",
            format!("row is too big: size {n}, maximum size 4000"),
        ),
        EngineError::Unsupported(what) => SqlError::new("0A000", what),
        EngineError::LimitExceeded(what) => SqlError::new("54000", what),
        EngineError::NoSavepoint(name) => {
            SqlError::new("3B001", format!("savepoint \"{name}\" does not exist"))
        }
        EngineError::Canceled => SqlError::new("57014", "canceling statement due to user request"),
        // Normally handled by re-running the statement (`exec::execute`).
        EngineError::CatalogChanged => SqlError::new("40001", CATALOG_CHANGED),
        EngineError::DuplicateTable(name) => {
            SqlError::new("42P07", format!("relation \"{name}\" already exists"))
        }
        EngineError::SequenceLimit(m) => SqlError::new("2200H", m),
        EngineError::Volume(v) => SqlError::new("58030", format!("storage error: {v}")),
        EngineError::Corrupt(m) => SqlError::new("XX001", format!("data corrupted: {m}")),
        EngineError::IncompatibleVolume => SqlError::new("XX000", e.to_string()),
        EngineError::PageMiss(_) | EngineError::Internal(_) => SqlError::internal(e.to_string()),
    }
}

pub(crate) fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
    if let Some(stmt) = parse_vacuum(sql)? {
        return Ok(vec![stmt]);
    }
    let rewritten = strip_copy_freeze(sql);
    Parser::parse_sql(&PostgreSqlDialect {}, rewritten.as_deref().unwrap_or(sql)).map_err(|e| {
        let msg = e.to_string();
        let msg = msg
            .strip_prefix("sql parser error: ")
            .unwrap_or(&msg)
            .to_string();
        SqlError::syntax(format!("syntax error: {msg}"))
    })
}

/// sqlparser parses Redshift's VACUUM, not PostgreSQL's (`VACUUM [FULL] [FREEZE]
/// [VERBOSE] [ANALYZE] [table, ...]`, `VACUUM (options) [table]`), so PostgreSQL's
/// form is recognised here. Several tables become one statement per table.
fn parse_vacuum(sql: &str) -> Result<Option<Statement>, SqlError> {
    let text = sql.trim().trim_end_matches(';').trim();
    let lower = text.to_ascii_lowercase();
    if !(lower == "vacuum" || lower.starts_with("vacuum ") || lower.starts_with("vacuum(")) {
        return Ok(None);
    }
    if text.contains(';') {
        return Ok(None); // several statements: leave it to the general parser
    }
    let mut rest = text[6..].trim();
    if rest.starts_with('(') {
        let close = rest
            .find(')')
            .ok_or_else(|| SqlError::syntax("syntax error in VACUUM options"))?;
        rest = rest[close + 1..].trim();
    }
    let mut words: Vec<&str> = rest.split_whitespace().collect();
    while let Some(w) = words.first() {
        if ["full", "freeze", "verbose", "analyze", "analyse"]
            .contains(&w.to_ascii_lowercase().as_str())
        {
            words.remove(0);
        } else {
            break;
        }
    }
    let tables = words.join(" ");
    let table_name = if tables.is_empty() {
        None
    } else {
        let first = tables.split(',').next().unwrap_or("").trim();
        let name = first.split('(').next().unwrap_or("").trim();
        Some(sqlparser::ast::ObjectName::from(
            name.split('.')
                .map(|p| sqlparser::ast::Ident::new(p.trim_matches('"')))
                .collect::<Vec<_>>(),
        ))
    };
    Ok(Some(Statement::Vacuum(sqlparser::ast::VacuumStatement {
        full: false,
        sort_only: false,
        delete_only: false,
        reindex: false,
        recluster: false,
        table_name,
        threshold: None,
        boost: false,
    })))
}

/// `COPY ... WITH (FREEZE ON)` (pgbench -i) does not parse in sqlparser; FREEZE is a
/// hint PostgreSQL may ignore too, so it is dropped before parsing.
fn strip_copy_freeze(sql: &str) -> Option<String> {
    let lower = sql.to_ascii_lowercase();
    if !lower.trim_start().starts_with("copy") || !lower.contains("freeze") {
        return None;
    }
    let mut out = sql.to_string();
    for pat in [
        "with (freeze on)",
        "with (freeze true)",
        "with (freeze)",
        "(freeze on)",
        "(freeze true)",
        "(freeze)",
    ] {
        if let Some(i) = out.to_ascii_lowercase().find(pat) {
            out.replace_range(i..i + pat.len(), "");
            return Some(out);
        }
    }
    for pat in [
        ", freeze on",
        ", freeze true",
        ", freeze",
        "freeze on, ",
        "freeze true, ",
        "freeze, ",
    ] {
        if let Some(i) = out.to_ascii_lowercase().find(pat) {
            out.replace_range(i..i + pat.len(), "");
            return Some(out);
        }
    }
    None
}

#[derive(Clone, Copy)]
enum SavepointOp {
    Create,
    Release,
    RollbackTo,
}

fn isolation_of(
    modes: &[TransactionMode],
    default: (Isolation, bool),
) -> Result<(Isolation, bool), SqlError> {
    let (mut iso, mut read_only) = default;
    apply_modes(modes, &mut iso, &mut read_only)?;
    Ok((iso, read_only))
}

/// Applies transaction modes over `iso` and `read_only`; a mode not named keeps
/// its value.
fn apply_modes(
    modes: &[TransactionMode],
    iso: &mut Isolation,
    read_only: &mut bool,
) -> Result<(), SqlError> {
    for m in modes {
        match m {
            TransactionMode::IsolationLevel(TransactionIsolationLevel::ReadCommitted)
            | TransactionMode::IsolationLevel(TransactionIsolationLevel::ReadUncommitted) => {
                *iso = Isolation::ReadCommitted
            }
            TransactionMode::IsolationLevel(TransactionIsolationLevel::RepeatableRead) => {
                *iso = Isolation::RepeatableRead
            }
            TransactionMode::IsolationLevel(other) => return Err(unsupported_isolation(other)),
            TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => *read_only = true,
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => *read_only = false,
        }
    }
    Ok(())
}

/// The error for an isolation level Borealis does not run (SERIALIZABLE): refused,
/// never silently weaker.
pub(crate) fn unsupported_isolation(level: impl std::fmt::Display) -> SqlError {
    SqlError::new(
        "0A000",
        format!("isolation level {level} is not supported; use READ COMMITTED or REPEATABLE READ"),
    )
}

/// `SET TRANSACTION` inside a block. As in PostgreSQL, once a query has run (it took
/// a snapshot under the old modes) only the isolation level it already has, or a
/// switch to READ ONLY, is accepted; inside a savepoint the level cannot change,
/// nor can a read-only transaction become read-write (in PostgreSQL's order of
/// checks).
fn set_transaction_modes(txn: &mut Txn, modes: &[TransactionMode]) -> Result<(), SqlError> {
    let (mut iso, mut read_only) = (txn.isolation, txn.read_only);
    apply_modes(modes, &mut iso, &mut read_only)?;
    let ran_query = txn.cid > 0;
    let refuse = |msg| Err(SqlError::new("25001", msg));
    if iso != txn.isolation {
        if ran_query {
            return refuse("SET TRANSACTION ISOLATION LEVEL must be called before any query");
        }
        if txn.has_savepoints() {
            return refuse(
                "SET TRANSACTION ISOLATION LEVEL must not be called in a subtransaction",
            );
        }
    }
    if txn.read_only && !read_only {
        if txn.has_savepoints() {
            return refuse("cannot set transaction read-write mode inside a read-only transaction");
        }
        if ran_query {
            return refuse("transaction read-write mode must be set before any query");
        }
    }
    txn.isolation = iso;
    txn.read_only = read_only;
    Ok(())
}

impl Session {
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.db.engine
    }

    /// Simple query protocol: runs each statement, stopping at the first error.
    pub async fn query(&mut self, sql: &str) -> Vec<Result<ExecResult, SqlError>> {
        let statements = match parse(sql) {
            Ok(s) => s,
            Err(e) => {
                self.fail_block().await;
                return vec![Err(e)];
            }
        };
        if statements.is_empty() {
            return vec![Ok(ExecResult::Empty)];
        }
        // Several statements in one Query run as one implicit transaction (unless
        // they manage their own with BEGIN/COMMIT), as in PostgreSQL.
        let implicit = statements.len() > 1;
        self.defer_commit = implicit;
        let mut out = Vec::with_capacity(statements.len());
        let mut failed = false;
        for stmt in &statements {
            let r = self.run(stmt, &[], None).await;
            failed = r.is_err();
            out.push(r);
            if failed || self.copy.is_some() {
                break;
            }
        }
        self.defer_commit = false;
        if implicit && !failed && self.copy.is_none() {
            if let Err(e) = self.sync().await {
                out.push(Err(e));
            }
        }
        out
    }

    /// Parses and describes a statement against the catalog as this session sees
    /// it now (its own uncommitted DDL included). A failure inside a transaction
    /// block fails the block, as in PostgreSQL.
    pub async fn prepare(&mut self, sql: &str, param_types: &[Type]) -> Result<Prepared, SqlError> {
        let r = self.prepare_inner(sql, param_types).await;
        if r.is_err() {
            self.fail_block().await;
        }
        r
    }

    async fn prepare_inner(
        &mut self,
        sql: &str,
        param_types: &[Type],
    ) -> Result<Prepared, SqlError> {
        let mut statements = parse(sql)?;
        if statements.len() > 1 {
            return Err(SqlError::syntax(
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let Some(statement) = statements.pop() else {
            return Ok(Prepared {
                sql: sql.to_string(),
                param_types: vec![],
                columns: Arc::new(vec![]),
                statement: None,
                plan: exec::PlanSlot::default(),
            });
        };
        let catalog = self.describe_catalog().await?;
        let (param_types, columns) = exec::describe(&catalog, &statement, param_types)?;
        Ok(Prepared {
            sql: sql.to_string(),
            param_types,
            columns: Arc::new(columns),
            statement: Some(Arc::new(statement)),
            plan: exec::PlanSlot::default(),
        })
    }

    pub async fn execute(
        &mut self,
        prepared: &Prepared,
        params: Vec<Datum>,
    ) -> Result<ExecResult, SqlError> {
        match &prepared.statement {
            None => Ok(ExecResult::Empty),
            Some(stmt) => {
                self.defer_commit = true;
                let r = self.run(stmt, &params, Some(&prepared.plan)).await;
                self.defer_commit = false;
                r
            }
        }
    }

    /// The protocol's Sync: commits the implicit transaction that extended-protocol
    /// statements outside a block have been running in.
    pub async fn sync(&mut self) -> Result<(), SqlError> {
        if self.status == TransactionStatus::Idle && self.copy.is_none() {
            if let Some(txn) = self.txn.take() {
                self.db.engine.commit(txn).await.map_err(engine_error)?;
            }
        }
        Ok(())
    }

    /// Notices raised since the last call, oldest first.
    pub fn take_notices(&mut self) -> Vec<(&'static str, SqlError)> {
        std::mem::take(&mut self.notices)
    }

    /// The flag a cancel request for this session sets; statements check it in scans
    /// and lock waits and fail with 57014.
    pub fn set_cancel_flag(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    pub(crate) fn warn(
        &mut self,
        severity: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) {
        self.notices.push((severity, SqlError::new(code, message)));
    }

    pub async fn copy_data(&mut self, data: &[u8]) -> Result<(), SqlError> {
        let r = exec::copy_data(self, data).await;
        if r.is_err() {
            self.copy = None;
            let _ = self.after_statement(Err(())).await;
        }
        r
    }

    pub async fn copy_done(&mut self) -> Result<ExecResult, SqlError> {
        let r = exec::copy_done(self).await;
        self.copy = None;
        let r = match r {
            Ok(res) => match self.after_statement(Ok(())).await {
                Ok(()) => Ok(res),
                Err(e) => Err(e),
            },
            Err(e) => {
                let _ = self.after_statement(Err(())).await;
                Err(e)
            }
        };
        r
    }

    pub async fn copy_fail(&mut self, message: &str) -> SqlError {
        self.copy = None;
        let _ = self.after_statement(Err(())).await;
        SqlError::new("57014", format!("COPY from stdin failed: {message}"))
    }

    /// The client went away: roll back whatever is open.
    pub async fn terminate(&mut self) {
        self.copy = None;
        if let Some(txn) = self.txn.take() {
            let _ = self.db.engine.rollback(txn).await;
        }
        self.status = TransactionStatus::Idle;
    }

    /// The catalog for describing a statement: this transaction's view including its
    /// latest statement, or a fresh snapshot outside a transaction.
    async fn describe_catalog(
        &mut self,
    ) -> Result<Vec<Arc<borealis_engine::catalog::TableDef>>, SqlError> {
        let engine = self.db.engine.clone();
        let mut view = match &self.txn {
            Some(t) => t.clone(),
            None => engine.begin(self.default_isolation, true),
        };
        engine.start_statement(&mut view);
        engine.relations(&view).await.map_err(engine_error)
    }

    /// Marks the current transaction block failed (or ends an implicit transaction)
    /// after an error the front end raised itself.
    pub async fn fail_block(&mut self) {
        match self.status {
            TransactionStatus::InBlock => {
                self.status = TransactionStatus::Failed;
                // As in PostgreSQL, the failed transaction releases its row locks at
                // once; the block only waits for ROLLBACK. With savepoints open it
                // stays, so that ROLLBACK TO SAVEPOINT can continue it.
                if !self.txn.as_ref().is_some_and(|t| t.has_savepoints()) {
                    if let Some(txn) = self.txn.take() {
                        let _ = self.db.engine.rollback(txn).await;
                    }
                }
            }
            TransactionStatus::Idle => {
                if let Some(txn) = self.txn.take() {
                    let _ = self.db.engine.rollback(txn).await;
                }
            }
            TransactionStatus::Failed => {}
        }
    }

    /// Ends the implicit transaction of a statement run outside a block, or marks a
    /// block failed after an error.
    async fn after_statement(&mut self, outcome: Result<(), ()>) -> Result<(), SqlError> {
        if self.copy.is_some() {
            return Ok(()); // COPY FROM STDIN still running: the statement is not over.
        }
        if let Some(txn) = self.txn.as_mut() {
            self.db.engine.end_statement(txn);
        }
        match (outcome, self.status) {
            (Ok(()), TransactionStatus::Idle) if !self.defer_commit => {
                if let Some(txn) = self.txn.take() {
                    self.db.engine.commit(txn).await.map_err(engine_error)?;
                }
                Ok(())
            }
            (Err(()), _) => {
                self.fail_block().await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The transaction for the next statement, starting one if needed.
    pub(crate) fn txn_for_statement(&mut self) -> &mut Txn {
        let engine = self.db.engine.clone();
        let (iso, read_only) = (self.default_isolation, self.default_read_only);
        let cancel = self.cancel.clone();
        let txn = self.txn.get_or_insert_with(|| engine.begin(iso, read_only));
        txn.cancel = cancel;
        engine.start_statement(txn);
        txn
    }

    async fn savepoint_op(&mut self, op: SavepointOp, name: &str) -> Result<(), SqlError> {
        if self.status == TransactionStatus::Idle {
            let what = match op {
                SavepointOp::Create => "SAVEPOINT",
                SavepointOp::Release => "RELEASE SAVEPOINT",
                SavepointOp::RollbackTo => "ROLLBACK TO SAVEPOINT",
            };
            return Err(SqlError::new(
                "25P01",
                format!("{what} can only be used in transaction blocks"),
            ));
        }
        let engine = self.db.engine.clone();
        let (iso, read_only) = (self.default_isolation, self.default_read_only);
        let txn = self.txn.get_or_insert_with(|| engine.begin(iso, read_only));
        let r = match op {
            SavepointOp::Create => engine.savepoint(txn, name).await,
            SavepointOp::Release => engine.release_savepoint(txn, name).await,
            SavepointOp::RollbackTo => engine.rollback_to_savepoint(txn, name).await,
        };
        if let Err(e) = r {
            self.fail_block().await;
            return Err(engine_error(e));
        }
        Ok(())
    }

    /// Runs one statement; `plan` is a prepared statement's plan cache.
    async fn run(
        &mut self,
        stmt: &Statement,
        params: &[Datum],
        plan: Option<&exec::PlanSlot>,
    ) -> Result<ExecResult, SqlError> {
        match stmt {
            Statement::StartTransaction { modes, .. } => {
                if self.status != TransactionStatus::Idle {
                    self.warn(
                        "WARNING",
                        "25001",
                        "there is already a transaction in progress",
                    );
                    return Ok(ExecResult::Command {
                        tag: "BEGIN".into(),
                    });
                }
                let defaults = (self.default_isolation, self.default_read_only);
                let (iso, read_only) = match isolation_of(modes, defaults) {
                    Ok(v) => v,
                    Err(e) => return Err(e),
                };
                self.txn = Some(self.db.engine.begin(iso, read_only));
                self.status = TransactionStatus::InBlock;
                return Ok(ExecResult::Command {
                    tag: "BEGIN".into(),
                });
            }
            Statement::Commit { .. } => {
                if self.status == TransactionStatus::Idle {
                    self.warn("WARNING", "25P01", "there is no transaction in progress");
                }
                let failed = self.status == TransactionStatus::Failed;
                self.status = TransactionStatus::Idle;
                let tag = if failed { "ROLLBACK" } else { "COMMIT" };
                if let Some(txn) = self.txn.take() {
                    if failed {
                        self.db.engine.rollback(txn).await.map_err(engine_error)?;
                    } else {
                        self.db.engine.commit(txn).await.map_err(engine_error)?;
                    }
                }
                return Ok(ExecResult::Command { tag: tag.into() });
            }
            Statement::Rollback {
                savepoint: None, ..
            } => {
                if self.status == TransactionStatus::Idle {
                    self.warn("WARNING", "25P01", "there is no transaction in progress");
                }
                self.status = TransactionStatus::Idle;
                if let Some(txn) = self.txn.take() {
                    self.db.engine.rollback(txn).await.map_err(engine_error)?;
                }
                return Ok(ExecResult::Command {
                    tag: "ROLLBACK".into(),
                });
            }
            Statement::Rollback {
                savepoint: Some(name),
                ..
            } => {
                let r = self
                    .savepoint_op(SavepointOp::RollbackTo, &crate::expr::norm(name))
                    .await;
                if r.is_ok() {
                    self.status = TransactionStatus::InBlock;
                }
                return r.map(|()| ExecResult::Command {
                    tag: "ROLLBACK".into(),
                });
            }
            _ if self.status == TransactionStatus::Failed => return Err(SqlError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )),
            Statement::Savepoint { name } => {
                return self
                    .savepoint_op(SavepointOp::Create, &crate::expr::norm(name))
                    .await
                    .map(|()| ExecResult::Command {
                        tag: "SAVEPOINT".into(),
                    });
            }
            Statement::ReleaseSavepoint { name } => {
                return self
                    .savepoint_op(SavepointOp::Release, &crate::expr::norm(name))
                    .await
                    .map(|()| ExecResult::Command {
                        tag: "RELEASE".into(),
                    });
            }
            Statement::Set(sqlparser::ast::Set::SetTransaction {
                modes,
                session: true,
                ..
            }) => {
                let defaults = (self.default_isolation, self.default_read_only);
                (self.default_isolation, self.default_read_only) = isolation_of(modes, defaults)?;
                return Ok(ExecResult::Command { tag: "SET".into() });
            }
            Statement::Set(sqlparser::ast::Set::SetTransaction {
                modes,
                session: false,
                ..
            }) => {
                let set = ExecResult::Command { tag: "SET".into() };
                let txn = match (self.status, self.txn.as_mut()) {
                    (TransactionStatus::InBlock, Some(txn)) => txn,
                    _ => {
                        self.warn(
                            "WARNING",
                            "25P01",
                            "SET TRANSACTION can only be used in transaction blocks",
                        );
                        return Ok(set);
                    }
                };
                match set_transaction_modes(txn, modes) {
                    Ok(()) => return Ok(set),
                    Err(e) => {
                        // An error inside a block aborts it, as any other does.
                        self.fail_block().await;
                        return Err(e);
                    }
                }
            }
            _ => {}
        }
        let r = exec::execute(self, stmt, params, plan).await;
        match r {
            Ok(res) => {
                self.after_statement(Ok(())).await?;
                Ok(res)
            }
            Err(e) => {
                let _ = self.after_statement(Err(())).await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borealis_volume::VolumeConfig;

    fn cached_plan(p: &Prepared) -> Option<Arc<exec::CachedPlan>> {
        p.plan.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn prepared_plans_are_reused_until_the_catalog_changes() {
        let db = Database::open(Volume::in_memory(VolumeConfig::default()))
            .await
            .unwrap();
        let mut s = db.session("postgres", "postgres");
        for r in s
            .query("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 10)")
            .await
        {
            r.unwrap();
        }
        let p = s
            .prepare("SELECT v FROM t WHERE id = $1", &[Type::Int4])
            .await
            .unwrap();
        assert!(cached_plan(&p).is_none());
        s.execute(&p, vec![Datum::Int4(1)]).await.unwrap();
        s.sync().await.unwrap();
        let first = cached_plan(&p).expect("bound plan kept");
        s.execute(&p, vec![Datum::Int4(2)]).await.unwrap();
        s.sync().await.unwrap();
        let second = cached_plan(&p).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "same catalog: plan reused");
        // Other parameter types bind again.
        s.execute(&p, vec![Datum::Null]).await.unwrap();
        s.sync().await.unwrap();
        assert!(!Arc::ptr_eq(&second, &cached_plan(&p).unwrap()));
        s.execute(&p, vec![Datum::Int4(1)]).await.unwrap();
        s.sync().await.unwrap();
        let third = cached_plan(&p).unwrap();
        // A new index changes the table's catalog entry: bound afresh.
        s.query("CREATE INDEX t_v ON t (v)")
            .await
            .pop()
            .unwrap()
            .unwrap();
        s.execute(&p, vec![Datum::Int4(1)]).await.unwrap();
        s.sync().await.unwrap();
        assert!(!Arc::ptr_eq(&third, &cached_plan(&p).unwrap()));
        // A copy of a statement starts without a plan.
        assert!(cached_plan(&p.clone()).is_none());
    }
}
