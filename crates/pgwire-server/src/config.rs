//! Front-end configuration: authentication, limits and TLS.

use crate::auth::ScramCredential;
use std::sync::Arc;
use std::time::Duration;

/// How clients prove who they are.
#[derive(Clone)]
pub enum Auth {
    /// Any user name is accepted without a password (tests, local development).
    Trust,
    /// Only `user` may connect, and only with SCRAM-SHA-256 (PostgreSQL's default
    /// `password_encryption`). The server keeps a verifier, not the password.
    Scram {
        user: String,
        credential: Arc<ScramCredential>,
    },
}

impl Auth {
    /// SCRAM for `user` with `password`; derives the verifier once (4096 PBKDF2
    /// rounds), so build this at start-up, not per connection.
    pub fn scram(user: impl Into<String>, password: &str) -> Auth {
        Auth::Scram {
            user: user.into(),
            credential: Arc::new(ScramCredential::new(password)),
        }
    }

    /// What `borealis up --password` means: user `postgres` with that password, or
    /// trust when no password is given.
    pub fn from_password(password: Option<&str>) -> Auth {
        match password {
            Some(pw) => Auth::scram("postgres", pw),
            None => Auth::Trust,
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Trust => write!(f, "Trust"),
            Auth::Scram { user, .. } => write!(f, "Scram {{ user: {user:?} }}"),
        }
    }
}

/// Everything [`crate::serve`] needs besides the listener and the database.
#[derive(Clone)]
pub struct ServerConfig {
    pub auth: Auth,
    /// Connections served at once; more are refused with FATAL 53300.
    pub max_connections: usize,
    /// Largest frontend message accepted after startup (type byte excluded,
    /// length word included). Bigger ones close the connection with FATAL 08P01.
    pub max_message_bytes: usize,
    /// A client must finish SSL negotiation, startup and authentication within this.
    pub startup_timeout: Duration,
    /// Prepared statements plus portals one connection may hold (bounded memory).
    pub max_statements_per_connection: usize,
    /// Pending output is written to the socket once it exceeds this many bytes, even
    /// before the client asks for a flush (bounds memory for large results).
    pub output_flush_bytes: usize,
    /// When set, SSLRequest is answered 'S' and the connection is upgraded
    /// (rustls with the ring provider, via pgwire's re-export).
    pub tls: Option<pgwire::tokio::TlsAcceptor>,
    /// Refuse connections that do not use TLS (only meaningful with `tls`).
    pub require_tls: bool,
    /// Client connections open right now (for metrics; shared with the caller).
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            auth: Auth::Trust,
            max_connections: 100,
            max_message_bytes: 64 * 1024 * 1024,
            startup_timeout: Duration::from_secs(60),
            max_statements_per_connection: 10_000,
            output_flush_bytes: 64 * 1024,
            tls: None,
            require_tls: false,
            open_connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("auth", &self.auth)
            .field("max_connections", &self.max_connections)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("startup_timeout", &self.startup_timeout)
            .field(
                "max_statements_per_connection",
                &self.max_statements_per_connection,
            )
            .field("output_flush_bytes", &self.output_flush_bytes)
            .field("tls", &self.tls.is_some())
            .field("require_tls", &self.require_tls)
            .finish()
    }
}
