//! PostgreSQL wire protocol front end mapping to engine sessions.
//!
//! # Message flow
//!
//! ```text
//!  accept ─► negotiate_encryption ─► startup ─────────────► query loop ──► terminate
//!            SSLRequest → 'S'+TLS     StartupMessage         (Connection)   session.terminate()
//!            or 'N'; GSSENC → 'N'     CancelRequest → flag     │
//!                                     SASL SCRAM-SHA-256       ├─ Ready ──── Query ─► session.query ─► results…, ReadyForQuery
//!                                     AuthenticationOk         │             Parse/Bind/Describe/Execute/Close ─► one reply each
//!                                     ParameterStatus*         │             Sync ─► ReadyForQuery(session.transaction_status())
//!                                     BackendKeyData           ├─ SkipUntilSync  (after an extended-protocol error:
//!                                     ReadyForQuery('I')       │                  everything but Sync is discarded)
//!                                                              └─ CopyIn ──── CopyData ─► session.copy_data
//!                                                                             CopyDone ─► session.copy_done ─► CommandComplete
//!                                                                             CopyFail ─► session.copy_fail ─► ErrorResponse
//! ```
//!
//! * Every ReadyForQuery carries the session's own transaction status (I/T/E); the
//!   front end never tracks it separately (DESIGN.md section 8).
//! * Errors: a [`SqlError`](borealis_sql::SqlError) becomes an ErrorResponse in
//!   [`error`] and the connection goes on. A malformed, oversized or unexpected message
//!   is a protocol violation: FATAL 08P01, logged, connection closed, session
//!   terminated (its transaction rolls back). A vanished client terminates the
//!   session the same way. Other connections are unaffected: each runs in its own task.
//! * Frames are read with their length checked before the body is buffered
//!   ([`ServerConfig::max_message_bytes`]); frontend messages are decoded by this
//!   crate's bounds-checked decoder ([`frontend`]), backend messages are encoded with
//!   pgwire's message types.
//! * Output is buffered and written when the client could be waiting for it: before
//!   the server blocks on a read, at ReadyForQuery, Flush and CopyInResponse, and when
//!   the buffer passes [`ServerConfig::output_flush_bytes`].
//!
//! # Why not pgwire's connection loop
//!
//! pgwire 0.42.1's `process_socket` + handler traits were evaluated and not used:
//! its frontend decoders panic on truncated bodies (`Buf::get_u16` on a short buffer)
//! and let C strings run past the frame; the transaction status it puts in
//! ReadyForQuery is its own bookkeeping (`to_error_state` on any error, reset on
//! Sync), not the session's; its per-message size limits are fixed constants. The
//! crate is used for what it does well: backend message encoding, the SCRAM state
//! machine and its rustls (ring) TLS acceptor type.

mod auth;
pub mod binary;
mod cancel;
mod config;
mod connection;
pub mod error;
pub mod frontend;
mod tls;
mod wire;

pub use auth::ScramCredential;
pub use config::{Auth, ServerConfig};
pub use tls::tls_acceptor_from_pem;

use borealis_sql::Database;
use cancel::CancelRegistry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What every connection task shares.
pub(crate) struct Shared {
    pub db: Database,
    pub config: ServerConfig,
    pub cancel: Arc<CancelRegistry>,
    /// Used for users that do not exist, so they fail like a wrong password.
    pub mock_credential: ScramCredential,
}

/// Serves PostgreSQL clients on `listener` until the listener fails fatally (it
/// does not, in practice: accept errors such as EMFILE are logged and retried).
pub async fn serve(
    listener: TcpListener,
    db: Database,
    config: ServerConfig,
) -> std::io::Result<()> {
    serve_until(listener, db, config, std::future::pending()).await
}

/// Like [`serve`], but returns when `shutdown` completes. Connections already open
/// keep running in their own tasks until their clients leave.
pub async fn serve_until(
    listener: TcpListener,
    db: Database,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (_keep, handed_off) = tokio::sync::mpsc::channel(1);
    serve_with_handoff(listener, handed_off, db, config, shutdown).await
}

/// Like [`serve_until`], also serving client sockets accepted elsewhere and handed
/// over on `handed_off` (an endpoint proxy on this host passes its accepted client
/// sockets; see `borealis_common::handoff`). They are served exactly like ones
/// accepted here.
pub async fn serve_with_handoff(
    listener: TcpListener,
    mut handed_off: tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
    db: Database,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let mock_credential = ScramCredential::new(&pgwire::api::auth::sasl::scram::random_nonce());
    let shared = Arc::new(Shared {
        db,
        config,
        cancel: Arc::new(CancelRegistry::default()),
        mock_credential,
    });
    let mut handoff_open = true;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted.map(|(tcp, _peer)| tcp),
            tcp = handed_off.recv(), if handoff_open => match tcp {
                Some(tcp) => Ok(tcp),
                None => {
                    handoff_open = false;
                    continue;
                }
            },
        };
        match accepted {
            Ok(tcp) => {
                // Over the limit the client still gets a proper FATAL 53300 after its
                // startup packet, so the permit is optional here.
                let permit = connections.clone().try_acquire_owned().ok();
                let open = OpenConnection::new(shared.config.open_connections.clone());
                let shared = shared.clone();
                tokio::spawn(async move {
                    connection::handle(tcp, shared, permit).await;
                    drop(open);
                });
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(counter: Arc<std::sync::atomic::AtomicUsize>) -> OpenConnection {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenConnection(counter)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
