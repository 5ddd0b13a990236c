//! The one place where errors become ErrorResponse/NoticeResponse fields.
//!
//! Everything a client can cause reaches the wire through [`error_response`]: SQL
//! errors from the session carry their own SQLSTATE; protocol-level failures are
//! built with [`SqlError::new`] and an 08P01/28P01/53300/... code by the caller.

use borealis_sql::SqlError;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};

/// ErrorResponse for `e` at its own severity (ERROR, or FATAL for 57P*).
pub fn error_response(e: &SqlError) -> ErrorResponse {
    ErrorResponse::new(fields(e.severity(), e))
}

/// ErrorResponse at FATAL severity: the connection closes right after it.
pub fn fatal_response(e: &SqlError) -> ErrorResponse {
    ErrorResponse::new(fields("FATAL", e))
}

/// NoticeResponse (severity WARNING, NOTICE, ...), e.g. 25P01 for ROLLBACK outside a
/// transaction block.
pub fn notice_response(severity: &str, e: &SqlError) -> NoticeResponse {
    NoticeResponse::new(fields(severity, e))
}

fn fields(severity: &str, e: &SqlError) -> Vec<(u8, String)> {
    // 'S' is localizable, 'V' (PostgreSQL 9.6+) is not; drivers read either.
    let mut f = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', e.code.to_string()),
        (b'M', e.message.clone()),
    ];
    if let Some(detail) = &e.detail {
        f.push((b'D', detail.clone()));
    }
    if let Some(hint) = &e.hint {
        f.push((b'H', hint.clone()));
    }
    if let Some(context) = &e.context {
        f.push((b'W', context.clone()));
    }
    f
}

/// SQLSTATEs the front end raises itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const UNDEFINED_PSTATEMENT: &str = "26000";
    pub const UNDEFINED_CURSOR: &str = "34000";
    pub const DUPLICATE_PSTATEMENT: &str = "42P05";
    pub const QUERY_CANCELED: &str = "57014";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    pub const NUMERIC_OUT_OF_RANGE: &str = "22003";
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_sqlstate_detail_and_hint() {
        let mut e =
            SqlError::new("23505", "duplicate key").with_detail("Key (id)=(1) already exists.");
        e.hint = Some("h".into());
        let r = error_response(&e);
        assert!(r.fields.contains(&(b'C', "23505".into())));
        assert!(r.fields.contains(&(b'S', "ERROR".into())));
        assert!(r
            .fields
            .contains(&(b'D', "Key (id)=(1) already exists.".into())));
        assert!(r.fields.contains(&(b'H', "h".into())));
        assert!(fatal_response(&e).fields.contains(&(b'S', "FATAL".into())));
    }
}
