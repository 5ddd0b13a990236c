//! SQL errors with their SQLSTATE.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    /// Five-character SQLSTATE, e.g. "42P01".
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Where it happened, e.g. "COPY t, line 3" (the 'W' field).
    pub context: Option<String>,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError {
            code,
            message: message.into(),
            detail: None,
            hint: None,
            context: None,
        }
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> SqlError {
        self.detail = Some(detail.into());
        self
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> SqlError {
        self.hint = Some(hint.into());
        self
    }
    pub fn syntax(message: impl Into<String>) -> SqlError {
        SqlError::new("42601", message)
    }
    pub fn unsupported(what: impl fmt::Display) -> SqlError {
        SqlError::new("0A000", format!("{what} is not supported yet"))
    }
    pub fn internal(message: impl Into<String>) -> SqlError {
        SqlError::new("XX000", message)
    }
    /// Severity as PostgreSQL reports it.
    pub fn severity(&self) -> &'static str {
        if self.code.starts_with("57P") {
            "FATAL"
        } else {
            "ERROR"
        }
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for SqlError {}
