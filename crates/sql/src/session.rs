//! Sessions: the unit the protocol front end drives.

use crate::SqlError;
use borealis_engine::types::{Datum, Type};
use borealis_volume::Volume;
use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
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
        Column { name: name.into(), ty, table_oid: 0, column_id: 0 }
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
    Rows { columns: Arc<Vec<Column>>, rows: Vec<Vec<Datum>>, tag: String },
    /// A command without rows: "CREATE TABLE", "INSERT 0 5", "BEGIN", ...
    Command { tag: String },
    /// COPY ... FROM STDIN: the client must now send CopyData messages.
    CopyIn { format: CopyFormat, columns: usize },
    /// COPY ... TO STDOUT: the lines to send as CopyData, then the tag.
    CopyOut { format: CopyFormat, columns: usize, data: Vec<Vec<u8>>, tag: String },
    /// An empty query string.
    Empty,
}

/// A parsed, described statement for the extended protocol.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub sql: String,
    pub param_types: Vec<Type>,
    /// Result columns; empty for statements without rows.
    pub columns: Arc<Vec<Column>>,
    pub(crate) statement: Option<Arc<Statement>>,
}

/// A database: the engine of one instance, shared by its sessions.
#[derive(Clone)]
pub struct Database {
    inner: Arc<DatabaseInner>,
}

struct DatabaseInner {
    #[allow(dead_code)]
    volume: Volume,
}

impl Database {
    /// Opens the database stored on `volume` (creating the catalog on a new volume).
    pub async fn open(volume: Volume) -> Result<Database, SqlError> {
        Ok(Database { inner: Arc::new(DatabaseInner { volume }) })
    }

    pub fn session(&self, user: &str, database: &str) -> Session {
        Session {
            db: self.clone(),
            user: user.to_string(),
            database: database.to_string(),
            status: TransactionStatus::Idle,
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
    #[allow(dead_code)]
    db: Database,
    pub user: String,
    pub database: String,
    status: TransactionStatus,
}

fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| SqlError::syntax(e.to_string()))
}

impl Session {
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// Simple query protocol: runs each statement, stopping at the first error.
    pub async fn query(&mut self, sql: &str) -> Vec<Result<ExecResult, SqlError>> {
        let statements = match parse(sql) {
            Ok(s) => s,
            Err(e) => {
                self.on_error();
                return vec![Err(e)];
            }
        };
        if statements.is_empty() {
            return vec![Ok(ExecResult::Empty)];
        }
        let mut out = Vec::with_capacity(statements.len());
        for stmt in &statements {
            let r = self.execute_statement(stmt, &[]).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    pub fn prepare(&mut self, sql: &str, param_types: &[Type]) -> Result<Prepared, SqlError> {
        let mut statements = parse(sql)?;
        if statements.len() > 1 {
            return Err(SqlError::syntax("cannot insert multiple commands into a prepared statement"));
        }
        let statement = statements.pop().map(Arc::new);
        Ok(Prepared { sql: sql.to_string(), param_types: param_types.to_vec(), columns: Arc::new(vec![]), statement })
    }

    pub async fn execute(&mut self, prepared: &Prepared, params: Vec<Datum>) -> Result<ExecResult, SqlError> {
        match &prepared.statement {
            None => Ok(ExecResult::Empty),
            Some(stmt) => self.execute_statement(stmt, &params).await,
        }
    }

    pub async fn copy_data(&mut self, _data: &[u8]) -> Result<(), SqlError> {
        Err(SqlError::unsupported("COPY FROM STDIN"))
    }

    pub async fn copy_done(&mut self) -> Result<ExecResult, SqlError> {
        Err(SqlError::unsupported("COPY FROM STDIN"))
    }

    pub async fn copy_fail(&mut self, message: &str) -> SqlError {
        self.on_error();
        SqlError::new("57014", format!("COPY from stdin failed: {message}"))
    }

    /// The client went away: roll back whatever is open.
    pub async fn terminate(&mut self) {
        self.status = TransactionStatus::Idle;
    }

    fn on_error(&mut self) {
        if self.status == TransactionStatus::InBlock {
            self.status = TransactionStatus::Failed;
        }
    }

    async fn execute_statement(&mut self, stmt: &Statement, _params: &[Datum]) -> Result<ExecResult, SqlError> {
        let r = match stmt {
            Statement::StartTransaction { .. } => {
                self.status = TransactionStatus::InBlock;
                Ok(ExecResult::Command { tag: "BEGIN".into() })
            }
            Statement::Commit { .. } => {
                let tag = if self.status == TransactionStatus::Failed { "ROLLBACK" } else { "COMMIT" };
                self.status = TransactionStatus::Idle;
                Ok(ExecResult::Command { tag: tag.into() })
            }
            Statement::Rollback { .. } => {
                self.status = TransactionStatus::Idle;
                Ok(ExecResult::Command { tag: "ROLLBACK".into() })
            }
            _ if self.status == TransactionStatus::Failed => Err(SqlError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )),
            Statement::Query(q) if q.to_string().eq_ignore_ascii_case("SELECT 1") => Ok(ExecResult::Rows {
                columns: Arc::new(vec![Column::new("?column?", Type::Int4)]),
                rows: vec![vec![Datum::Int4(1)]],
                tag: "SELECT 1".into(),
            }),
            other => Err(SqlError::unsupported(format!("statement {:?}", other.to_string()))),
        };
        if r.is_err() {
            self.on_error();
        }
        r
    }
}
