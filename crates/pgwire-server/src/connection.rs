//! One client connection: startup, authentication, then the query loop.
//! The message flow is described in the crate documentation (lib.rs).

use crate::auth;
use crate::binary;
use crate::cancel::CancelGuard;
use crate::config::Auth;
use crate::error::{error_response, fatal_response, sqlstate};
use crate::frontend::{self, FrontendMessage, ProtocolViolation, StartupPacket};
use crate::wire::{ReadError, Wire};
use crate::Shared;
use borealis_sql::{
    Column, CopyFormat, Datum, ExecResult, Prepared, Session, SqlError, TransactionStatus, Type,
};
use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::copy::{CopyData, CopyDone, CopyInResponse, CopyOutResponse};
use pgwire::messages::data::{NoData, ParameterDescription};
use pgwire::messages::extendedquery::{
    BindComplete, CloseComplete, ParseComplete, PortalSuspended,
};
use pgwire::messages::response::{self, CommandComplete, EmptyQueryResponse, ReadyForQuery};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::PgWireBackendMessage as Msg;
use pgwire::tokio::server::MaybeTls;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// Terminate ('X') or the client closed the socket.
    Client,
    Io(io::Error),
    /// We send this as a FATAL ErrorResponse, then close.
    Fatal(SqlError),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

impl From<ReadError> for End {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => End::Client,
            ReadError::Io(e) => End::Io(e),
            ReadError::Protocol(p) => protocol_fatal(p),
        }
    }
}

impl From<ProtocolViolation> for End {
    fn from(p: ProtocolViolation) -> Self {
        protocol_fatal(p)
    }
}

fn protocol_fatal(p: ProtocolViolation) -> End {
    End::Fatal(SqlError::new(sqlstate::PROTOCOL_VIOLATION, p.0))
}

/// A handler's failure: an ERROR for the client (the connection goes on), or the end.
enum Step {
    Sql(SqlError),
    End(End),
}

impl From<SqlError> for Step {
    fn from(e: SqlError) -> Self {
        Step::Sql(e)
    }
}
impl From<io::Error> for Step {
    fn from(e: io::Error) -> Self {
        Step::End(End::Io(e))
    }
}
impl From<End> for Step {
    fn from(e: End) -> Self {
        Step::End(e)
    }
}

/// Entry point for one accepted socket. Never panics on client input; logs how the
/// connection ended.
pub(crate) async fn handle(
    tcp: TcpStream,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = tcp.set_nodelay(true);
    let config = &shared.config;
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let negotiated =
        match tokio::time::timeout_at(deadline, negotiate_encryption(tcp, config)).await {
            Ok(Ok(n)) => n,
            // PostgreSQL answers nothing to a broken first packet; it logs and closes.
            Ok(Err(e)) => {
                log::warn!("connection from {peer}: bad startup packet, closing: {e:?}");
                return;
            }
            Err(_) => {
                log::info!("connection from {peer}: startup timed out");
                return;
            }
        };
    let (stream, is_tls, first_packet) = negotiated;
    let mut wire = Wire::new(
        stream,
        is_tls,
        config.max_message_bytes,
        config.output_flush_bytes,
    );
    let started = tokio::time::timeout_at(
        deadline,
        startup(&mut wire, first_packet, &shared, permit.is_some()),
    )
    .await;
    let (session, cancel) = match started {
        Ok(Ok(Some(s))) => s,
        // Cancel request served, or the client left during startup.
        Ok(Ok(None)) => return,
        Ok(Err(end)) => {
            finish(&mut wire, end, &peer).await;
            return;
        }
        Err(_) => {
            log::info!("connection from {peer}: startup timed out");
            let e = SqlError::new(
                sqlstate::PROTOCOL_VIOLATION,
                "canceling authentication due to timeout",
            );
            finish(&mut wire, End::Fatal(e), &peer).await;
            return;
        }
    };
    let mut session = session;
    session.set_cancel_flag(cancel.flag.clone());
    let mut conn = Connection {
        wire,
        session,
        shared: shared.clone(),
        cancel,
        statements: Named::default(),
        portals: Named::default(),
        state: State::Ready,
    };
    let end = conn.run().await;
    // Whatever the reason (Terminate, vanished client, protocol violation), an open
    // transaction must roll back and the session release what it holds.
    conn.session.terminate().await;
    finish(&mut conn.wire, end, &peer).await;
    drop(permit);
}

async fn finish(wire: &mut Wire, end: End, peer: &str) {
    match end {
        End::Client => log::debug!("connection from {peer} closed by client"),
        End::Io(e) => log::info!("connection from {peer} lost: {e}"),
        End::Fatal(e) => {
            if e.code == sqlstate::PROTOCOL_VIOLATION {
                log::warn!(
                    "connection from {peer}: protocol violation, closing: {}",
                    e.message
                );
            } else {
                log::info!("connection from {peer} refused: {e}");
            }
            let _ = wire.send(Msg::ErrorResponse(fatal_response(&e))).await;
        }
    }
    wire.shutdown().await;
}

fn fatal(code: &'static str, message: impl Into<String>) -> End {
    End::Fatal(SqlError::new(code, message))
}

/// Reads one untyped startup packet straight from the socket, without read-ahead, so
/// nothing the client sent after an SSLRequest can be mistaken for TLS-protected data
/// (CVE-2021-23214).
async fn read_startup_packet(tcp: &mut TcpStream) -> Result<Bytes, ReadError> {
    let mut len = [0u8; 4];
    match tcp.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    if !(8..=frontend::MAX_STARTUP_PACKET_BYTES as i32).contains(&len) {
        return Err(ReadError::Protocol(ProtocolViolation::new(format!(
            "invalid length of startup packet {len}"
        ))));
    }
    let mut body = vec![0u8; len as usize - 4];
    tcp.read_exact(&mut body).await?;
    Ok(Bytes::from(body))
}

/// Answers SSLRequest/GSSENCRequest (upgrading to TLS when configured) and returns
/// the stream with the first other packet, if it was read here.
async fn negotiate_encryption(
    mut tcp: TcpStream,
    config: &crate::ServerConfig,
) -> Result<(MaybeTls, bool, Option<Bytes>), ReadError> {
    let mut gss_answered = false;
    loop {
        let body = read_startup_packet(&mut tcp).await?;
        match frontend::decode_startup(body.clone()) {
            Ok(StartupPacket::SslRequest) => match &config.tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await?;
                    let tls = acceptor.accept(tcp).await?;
                    return Ok((MaybeTls::Tls(Box::new(tls)), true, None));
                }
                None => tcp.write_all(b"N").await?,
            },
            Ok(StartupPacket::GssEncRequest) if !gss_answered => {
                gss_answered = true;
                tcp.write_all(b"N").await?;
            }
            // Startup, cancel, or garbage: `startup` decodes it again and answers.
            _ => return Ok((MaybeTls::Plain(tcp), false, Some(body))),
        }
    }
}

/// Startup packet, authentication, and the greeting. Returns `None` when the
/// connection only carried a cancel request (or the client left).
async fn startup(
    wire: &mut Wire,
    first_packet: Option<Bytes>,
    shared: &Shared,
    has_slot: bool,
) -> Result<Option<(Session, CancelGuard)>, End> {
    let config = &shared.config;
    let body = match first_packet {
        Some(b) => b,
        None => match wire.read_startup().await {
            Ok(b) => b,
            Err(ReadError::Closed) => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    let (major, minor, parameters) = match frontend::decode_startup(body)? {
        StartupPacket::Cancel { pid, secret } => {
            let matched = shared.cancel.cancel(pid, secret);
            log::info!(
                "cancel request for pid {pid}: {}",
                if matched { "delivered" } else { "no match" }
            );
            return Ok(None);
        }
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            return Err(fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "unexpected encryption request",
            ));
        }
        StartupPacket::Startup {
            major,
            minor,
            parameters,
        } => (major, minor, parameters),
    };
    if major != 3 {
        return Err(fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"),
        ));
    }
    // Protocol options (`_pq_.*`) and minor versions above 0 are negotiated down, as
    // PostgreSQL 15 does.
    let unsupported: Vec<String> = parameters
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if minor > 0 || !unsupported.is_empty() {
        wire.send(Msg::NegotiateProtocolVersion(
            NegotiateProtocolVersion::new(0, unsupported),
        ))
        .await?;
    }
    if config.require_tls && !wire.is_tls {
        return Err(fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "connection requires SSL encryption",
        ));
    }
    if !has_slot {
        return Err(fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        ));
    }
    let param = |name: &str| {
        parameters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let Some(user) = param("user").filter(|u| !u.is_empty()) else {
        return Err(fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        ));
    };
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    match &config.auth {
        Auth::Trust => {}
        Auth::Scram {
            user: expected,
            credential,
        } => {
            let known = *expected == user;
            // An unknown user still goes through the whole exchange against a
            // credential nobody knows, so the failure looks the same as a bad password.
            let secret = if known {
                credential.secret()
            } else {
                shared.mock_credential.secret()
            };
            if !scram_exchange(wire, secret).await? || !known {
                return Err(fatal(
                    sqlstate::INVALID_PASSWORD,
                    format!("password authentication failed for user \"{user}\""),
                ));
            }
        }
    }

    let session = shared.db.session(&user, &database);
    let cancel = shared.cancel.register();
    wire.send(Msg::Authentication(Authentication::Ok)).await?;
    for (name, value) in shared.db.parameter_status() {
        // Echo the client's application_name, as PostgreSQL does.
        let value = match (name, param("application_name")) {
            ("application_name", Some(app)) => app,
            _ => value,
        };
        wire.send(Msg::ParameterStatus(ParameterStatus::new(
            name.to_string(),
            value,
        )))
        .await?;
    }
    wire.send(Msg::BackendKeyData(BackendKeyData::new(
        cancel.pid,
        SecretKey::I32(cancel.secret),
    )))
    .await?;
    wire.send(ready_for_query(TransactionStatus::Idle)).await?;
    wire.flush().await?;
    log::debug!(
        "session for user {user:?} database {database:?} started (pid {})",
        cancel.pid
    );
    Ok(Some((session, cancel)))
}

/// SASL SCRAM-SHA-256. Returns whether the client proved the password; a broken
/// exchange (wrong message, bad encoding) is a FATAL error.
async fn scram_exchange(
    wire: &mut Wire,
    secret: pgwire::api::auth::sasl::scram::ScramSecret,
) -> Result<bool, End> {
    wire.send(Msg::Authentication(Authentication::SASL(vec![
        auth::MECHANISM.to_string(),
    ])))
    .await?;
    let body = expect_password_message(wire).await?;
    let (mechanism, client_first) = frontend::decode_sasl_initial(body)?;
    if mechanism != auth::MECHANISM {
        return Err(fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let server = auth::server();
    let (server_first, waiting) =
        match server.on_client_first_message_with_secret(&client_first, secret) {
            Ok(x) => x,
            Err(e) => {
                log::info!("SCRAM client-first refused: {e}");
                return Ok(false);
            }
        };
    wire.send(Msg::Authentication(Authentication::SASLContinue(
        Bytes::from(server_first),
    )))
    .await?;
    let client_final = expect_password_message(wire).await?;
    match waiting.on_client_final_message(&client_final) {
        Ok(server_final) => {
            wire.send(Msg::Authentication(Authentication::SASLFinal(Bytes::from(
                server_final,
            ))))
            .await?;
            Ok(true)
        }
        Err(e) => {
            log::info!("SCRAM proof refused: {e}");
            Ok(false)
        }
    }
}

async fn expect_password_message(wire: &mut Wire) -> Result<Bytes, End> {
    let (ty, body) = wire.read_message().await?;
    if ty != b'p' {
        return Err(fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("expected SASL response, got message type {ty}"),
        ));
    }
    Ok(body)
}

fn ready_for_query(status: TransactionStatus) -> Msg {
    let status = match status {
        TransactionStatus::Idle => response::TransactionStatus::Idle,
        TransactionStatus::InBlock => response::TransactionStatus::Transaction,
        TransactionStatus::Failed => response::TransactionStatus::Error,
    };
    Msg::ReadyForQuery(ReadyForQuery::new(status))
}

enum State {
    Ready,
    /// An extended-protocol message failed: discard everything until Sync.
    SkipUntilSync,
    /// COPY FROM STDIN in progress. `rest` holds the remaining results of a simple
    /// Query that contained the COPY, to be sent after it completes.
    CopyIn {
        extended: bool,
        rest: VecDeque<Result<ExecResult, SqlError>>,
    },
}

/// A bound statement: parameters until executed, then its remaining rows.
struct Portal {
    prepared: Arc<Prepared>,
    result_formats: Vec<i16>,
    run: PortalRun,
}

enum PortalRun {
    NotStarted(Vec<Datum>),
    Rows {
        columns: Arc<Vec<Column>>,
        rows: VecDeque<Vec<Datum>>,
        tag: String,
    },
    Done {
        tag: Option<String>,
    },
}

struct Connection {
    wire: Wire,
    session: Session,
    shared: Arc<Shared>,
    cancel: CancelGuard,
    statements: Named<Arc<Prepared>>,
    portals: Named<Portal>,
    state: State,
}

/// Prepared statements or portals by name, with the unnamed one ("") kept apart.
/// Clients of the extended protocol (libpq, JDBC, sysbench) use the unnamed ones for
/// nearly every statement, and an empty `String` is never allocated: looking it up
/// in a `HashMap` compared two dangling pointers, for which glibc's AVX-512 memcmp
/// takes a microcode assist (its masked load touches an unmapped page), about
/// 300 ns a comparison and several comparisons a statement.
struct Named<T> {
    unnamed: Option<T>,
    named: HashMap<String, T>,
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named {
            unnamed: None,
            named: HashMap::new(),
        }
    }
}

impl<T> Named<T> {
    fn get(&self, name: &str) -> Option<&T> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }
    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    fn insert(&mut self, name: String, value: T) {
        if name.is_empty() {
            self.unnamed = Some(value);
        } else {
            self.named.insert(name, value);
        }
    }
    fn remove(&mut self, name: &str) -> Option<T> {
        self.remove_entry(name).map(|(_, v)| v)
    }
    fn remove_entry(&mut self, name: &str) -> Option<(String, T)> {
        if name.is_empty() {
            self.unnamed.take().map(|v| (String::new(), v))
        } else {
            self.named.remove_entry(name)
        }
    }
    fn len(&self) -> usize {
        self.named.len() + usize::from(self.unnamed.is_some())
    }
    fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }
}

impl Connection {
    async fn run(&mut self) -> End {
        loop {
            match self.step().await {
                Ok(()) => {}
                Err(end) => return end,
            }
        }
    }

    async fn step(&mut self) -> Result<(), End> {
        let (ty, body) = self.wire.read_message().await?;
        let msg = frontend::decode(ty, body)?;
        if let FrontendMessage::Terminate = msg {
            return Err(End::Client);
        }
        match std::mem::replace(&mut self.state, State::Ready) {
            State::SkipUntilSync => {
                if let FrontendMessage::Sync = msg {
                    self.sync().await?;
                } else {
                    self.state = State::SkipUntilSync;
                }
                Ok(())
            }
            State::CopyIn { extended, rest } => self.copy_in_message(msg, extended, rest).await,
            State::Ready => self.ready_message(msg).await,
        }
    }

    async fn ready_message(&mut self, msg: FrontendMessage) -> Result<(), End> {
        let extended = msg.is_extended();
        let result = match msg {
            FrontendMessage::Query(sql) => return self.simple_query(&sql).await,
            FrontendMessage::Sync => return self.sync().await,
            FrontendMessage::Flush => return Ok(self.wire.flush().await?),
            FrontendMessage::Parse {
                name,
                sql,
                param_oids,
            } => self.parse(name, &sql, &param_oids).await,
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                self.bind(portal, &statement, &param_formats, params, result_formats)
                    .await
            }
            FrontendMessage::Describe { kind, name } => self.describe(kind, &name).await,
            FrontendMessage::Execute { portal, max_rows } => self.execute(&portal, max_rows).await,
            FrontendMessage::Close { kind, name } => self.close(kind, &name).await,
            // Left over from a COPY that already failed: PostgreSQL drops these too.
            FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail(_) => Ok(()),
            FrontendMessage::Password(_) => {
                return Err(fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "unexpected password message after authentication",
                ))
            }
            FrontendMessage::Terminate => return Err(End::Client),
        };
        match result {
            Ok(()) => Ok(()),
            Err(Step::End(end)) => Err(end),
            Err(Step::Sql(e)) => {
                self.send_error(e).await?;
                if extended && !matches!(self.state, State::CopyIn { .. }) {
                    self.state = State::SkipUntilSync;
                }
                Ok(())
            }
        }
    }

    /// Notices the session raised, then ReadyForQuery with the session's own
    /// transaction status, flushed.
    async fn send_ready(&mut self) -> Result<(), End> {
        for (severity, notice) in self.session.take_notices() {
            self.wire
                .send(Msg::NoticeResponse(crate::error::notice_response(
                    severity, &notice,
                )))
                .await?;
        }
        self.wire
            .send(ready_for_query(self.session.transaction_status()))
            .await?;
        self.wire.flush().await?;
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), End> {
        // Sync ends the implicit transaction of extended-protocol statements run
        // outside a block (a pipeline before one Sync commits as one transaction).
        if let Err(e) = self.session.sync().await {
            self.send_error(e).await?;
        }
        // Portals live until the end of their transaction; the unnamed statement stays.
        if self.session.transaction_status() == TransactionStatus::Idle {
            self.portals.clear();
        }
        self.send_ready().await?;
        Ok(())
    }

    async fn simple_query(&mut self, sql: &str) -> Result<(), End> {
        // exec_simple_query drops the unnamed statement and portal.
        self.statements.remove("");
        self.portals.remove("");
        self.cancel.flag.store(false, Ordering::SeqCst);
        let results: VecDeque<_> = self.session.query(sql).await.into();
        self.simple_results(results).await
    }

    /// Sends a simple Query's results in order; stops at the first error or at a
    /// COPY FROM STDIN (resumed by `copy_in_message`), then ReadyForQuery.
    async fn simple_results(
        &mut self,
        mut results: VecDeque<Result<ExecResult, SqlError>>,
    ) -> Result<(), End> {
        while let Some(result) = results.pop_front() {
            let outcome = match result {
                Ok(ExecResult::CopyIn { format, columns }) => {
                    self.start_copy_in(format, columns).await?;
                    self.state = State::CopyIn {
                        extended: false,
                        rest: results,
                    };
                    return Ok(());
                }
                Ok(ExecResult::Rows { columns, rows, tag }) => {
                    self.send_rows(&columns, rows, tag).await
                }
                Ok(other) => self.send_non_row_result(other).await,
                Err(e) => Err(Step::Sql(e)),
            };
            match outcome {
                Ok(()) => {}
                Err(Step::End(end)) => return Err(end),
                Err(Step::Sql(e)) => {
                    self.send_error(e).await?;
                    break;
                }
            }
        }
        self.send_ready().await?;
        Ok(())
    }

    /// Command, Empty and CopyOut results (rows need format handling and are sent
    /// by the callers).
    async fn send_non_row_result(&mut self, result: ExecResult) -> Result<(), Step> {
        match result {
            ExecResult::Command { tag } => self.wire.send(command_complete(tag)).await?,
            ExecResult::Empty => {
                self.wire
                    .send(Msg::EmptyQueryResponse(EmptyQueryResponse::new()))
                    .await?
            }
            ExecResult::CopyOut {
                format,
                columns,
                data,
                tag,
            } => {
                let columns = column_count(columns)?;
                self.wire
                    .send(Msg::CopyOutResponse(CopyOutResponse::new(
                        copy_format(format),
                        columns,
                        vec![0; columns as usize],
                    )))
                    .await?;
                for line in data {
                    self.check_cancel()?;
                    self.wire
                        .send(Msg::CopyData(CopyData::new(Bytes::from(line))))
                        .await?;
                }
                self.wire.send(Msg::CopyDone(CopyDone::new())).await?;
                self.wire.send(command_complete(tag)).await?;
            }
            ExecResult::Rows { .. } | ExecResult::CopyIn { .. } => {
                return Err(Step::Sql(SqlError::internal("unexpected result kind")));
            }
        }
        Ok(())
    }

    async fn start_copy_in(&mut self, format: CopyFormat, columns: usize) -> Result<(), End> {
        let columns = column_count(columns).map_err(End::Fatal)?;
        self.wire
            .send(Msg::CopyInResponse(CopyInResponse::new(
                copy_format(format),
                columns,
                vec![0; columns as usize],
            )))
            .await?;
        // The client sends nothing until it sees CopyInResponse.
        self.wire.flush().await?;
        Ok(())
    }

    async fn copy_in_message(
        &mut self,
        msg: FrontendMessage,
        extended: bool,
        rest: VecDeque<Result<ExecResult, SqlError>>,
    ) -> Result<(), End> {
        let failure = match msg {
            FrontendMessage::CopyData(data) => match self.session.copy_data(&data).await {
                Ok(()) => {
                    self.state = State::CopyIn { extended, rest };
                    return Ok(());
                }
                Err(e) => e,
            },
            FrontendMessage::CopyDone => match self.session.copy_done().await {
                Ok(result) => {
                    match self.send_non_row_result(result).await {
                        Ok(()) => {}
                        Err(Step::End(end)) => return Err(end),
                        Err(Step::Sql(e)) => return self.copy_failed(e, extended).await,
                    }
                    // Extended: back to normal; the client's Sync brings ReadyForQuery.
                    if !extended {
                        self.simple_results(rest).await?;
                    }
                    return Ok(());
                }
                Err(e) => e,
            },
            FrontendMessage::CopyFail(message) => self.session.copy_fail(&message).await,
            // PostgreSQL ignores these during COPY: libpq and tokio-postgres may send
            // them before they notice the command was a COPY.
            FrontendMessage::Flush | FrontendMessage::Sync => {
                self.state = State::CopyIn { extended, rest };
                return Ok(());
            }
            other => {
                return Err(fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "unexpected message type during COPY from stdin: {}",
                        message_name(&other)
                    ),
                ));
            }
        };
        self.copy_failed(failure, extended).await
    }

    /// Sends an ERROR to the client; a FATAL one (57P01 shutdown, ...) ends the
    /// connection instead, as in PostgreSQL.
    async fn send_error(&mut self, e: SqlError) -> Result<(), End> {
        if e.severity() == "FATAL" {
            return Err(End::Fatal(e));
        }
        self.wire
            .send(Msg::ErrorResponse(error_response(&e)))
            .await?;
        Ok(())
    }

    async fn copy_failed(&mut self, e: SqlError, extended: bool) -> Result<(), End> {
        self.send_error(e).await?;
        if extended {
            self.state = State::SkipUntilSync;
        } else {
            self.state = State::Ready;
            self.send_ready().await?;
        }
        Ok(())
    }

    fn check_statement_limit(&self) -> Result<(), SqlError> {
        if self.statements.len() + self.portals.len()
            >= self.shared.config.max_statements_per_connection
        {
            return Err(SqlError::new(
                "54000",
                format!(
                    "too many prepared statements and portals on this connection (limit {})",
                    self.shared.config.max_statements_per_connection
                ),
            ));
        }
        Ok(())
    }

    async fn parse(&mut self, name: String, sql: &str, param_oids: &[u32]) -> Result<(), Step> {
        if !name.is_empty() && self.statements.contains_key(&name) {
            return Err(SqlError::new(
                sqlstate::DUPLICATE_PSTATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            )
            .into());
        }
        if !self.statements.contains_key(&name) {
            self.check_statement_limit()?;
        }
        let mut types = Vec::with_capacity(param_oids.len());
        for &oid in param_oids {
            // OID 0 means "infer it"; the session resolves Unknown from context.
            let ty = if oid == 0 {
                Type::Unknown
            } else {
                Type::from_oid(oid).ok_or_else(|| {
                    SqlError::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!("parameter type with OID {oid} is not supported"),
                    )
                })?
            };
            types.push(ty);
        }
        let prepared = self.session.prepare(sql, &types).await?;
        self.statements.insert(name, Arc::new(prepared));
        self.wire
            .send(Msg::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    async fn bind(
        &mut self,
        portal_name: String,
        statement: &str,
        param_formats: &[i16],
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    ) -> Result<(), Step> {
        let prepared = self.statements.get(statement).cloned().ok_or_else(|| {
            SqlError::new(
                sqlstate::UNDEFINED_PSTATEMENT,
                format!("prepared statement \"{statement}\" does not exist"),
            )
        })?;
        let wanted = prepared.param_types.len();
        if params.len() != wanted {
            return Err(SqlError::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("bind message supplies {} parameters, but prepared statement \"{statement}\" requires {wanted}", params.len()),
            )
            .into());
        }
        let formats = Formats::check(param_formats, params.len(), "parameter")?;
        let mut values = Vec::with_capacity(params.len());
        for (i, param) in params.into_iter().enumerate() {
            let ty = param_wire_type(prepared.param_types[i]);
            let value = match param {
                None => Datum::Null,
                Some(bytes) if formats.get(i) == 1 => binary::decode(ty, &bytes)?,
                Some(bytes) => decode_text_param(ty, &bytes)?,
            };
            values.push(value);
        }
        if !prepared.columns.is_empty() {
            Formats::check(&result_formats, prepared.columns.len(), "result")?;
        } else if result_formats.iter().any(|&f| f != 0 && f != 1) {
            return Err(
                SqlError::new(sqlstate::PROTOCOL_VIOLATION, "unsupported format code").into(),
            );
        }
        if !portal_name.is_empty() && self.portals.contains_key(&portal_name) {
            return Err(
                SqlError::new("42P03", format!("cursor \"{portal_name}\" already exists")).into(),
            );
        }
        if !self.portals.contains_key(&portal_name) {
            self.check_statement_limit()?;
        }
        self.portals.insert(
            portal_name,
            Portal {
                prepared,
                result_formats,
                run: PortalRun::NotStarted(values),
            },
        );
        self.wire
            .send(Msg::BindComplete(BindComplete::new()))
            .await?;
        Ok(())
    }

    async fn describe(&mut self, kind: u8, name: &str) -> Result<(), Step> {
        if kind == b'S' {
            let prepared = self.statements.get(name).cloned().ok_or_else(|| {
                SqlError::new(
                    sqlstate::UNDEFINED_PSTATEMENT,
                    format!("prepared statement \"{name}\" does not exist"),
                )
            })?;
            // tokio-postgres needs exactly: ParameterDescription, then RowDescription
            // or NoData (DESIGN.md section 8).
            let types = prepared
                .param_types
                .iter()
                .map(|t| param_wire_type(*t).oid())
                .collect();
            self.wire
                .send(Msg::ParameterDescription(ParameterDescription::new(types)))
                .await?;
            self.describe_rows(&prepared.columns, &[]).await
        } else {
            let portal = self.portals.get(name).ok_or_else(|| {
                SqlError::new(
                    sqlstate::UNDEFINED_CURSOR,
                    format!("portal \"{name}\" does not exist"),
                )
            })?;
            let columns = match &portal.run {
                PortalRun::Rows { columns, .. } => columns.clone(),
                _ => portal.prepared.columns.clone(),
            };
            let formats = portal.result_formats.clone();
            self.describe_rows(&columns, &formats).await
        }
    }

    async fn describe_rows(&mut self, columns: &[Column], formats: &[i16]) -> Result<(), Step> {
        if columns.is_empty() {
            self.wire.send(Msg::NoData(NoData::new())).await?;
        } else {
            self.send_row_description(columns, formats).await?;
        }
        Ok(())
    }

    /// RowDescription ('T'), encoded in place: clients of prepared statements
    /// (libpq's PQexecPrepared) describe the portal on every execution.
    async fn send_row_description(
        &mut self,
        columns: &[Column],
        formats: &[i16],
    ) -> Result<(), Step> {
        let formats = Formats::check(formats, columns.len(), "result")?;
        let count = column_count(columns.len())?;
        self.wire
            .send_encoded(b'T', |out| -> Result<(), Step> {
                encode_row_description(columns, count, formats, out);
                Ok(())
            })
            .await
    }

    async fn execute(&mut self, name: &str, max_rows: i32) -> Result<(), Step> {
        let (name, mut portal) = self.portals.remove_entry(name).ok_or_else(|| {
            SqlError::new(
                sqlstate::UNDEFINED_CURSOR,
                format!("portal \"{name}\" does not exist"),
            )
        })?;
        let result = self.execute_portal(&mut portal, max_rows).await;
        // A portal stays until Close or the end of the transaction, even after an error
        // (PostgreSQL marks it failed; executing it again reports the error again).
        self.portals.insert(name, portal);
        result
    }

    async fn execute_portal(&mut self, portal: &mut Portal, max_rows: i32) -> Result<(), Step> {
        if let PortalRun::NotStarted(params) = &mut portal.run {
            let params = std::mem::take(params);
            self.cancel.flag.store(false, Ordering::SeqCst);
            let result = self.session.execute(&portal.prepared, params).await;
            portal.run = PortalRun::Done { tag: None };
            match result? {
                ExecResult::Rows { columns, rows, tag } => {
                    portal.run = PortalRun::Rows {
                        columns,
                        rows: rows.into(),
                        tag,
                    };
                }
                ExecResult::CopyIn { format, columns } => {
                    self.start_copy_in(format, columns).await?;
                    self.state = State::CopyIn {
                        extended: true,
                        rest: VecDeque::new(),
                    };
                    return Ok(());
                }
                other => {
                    let tag = match &other {
                        ExecResult::Command { tag } | ExecResult::CopyOut { tag, .. } => {
                            Some(tag.clone())
                        }
                        _ => None,
                    };
                    self.send_non_row_result(other).await?;
                    portal.run = PortalRun::Done { tag };
                    return Ok(());
                }
            }
        }
        match &mut portal.run {
            PortalRun::Rows { columns, rows, tag } => {
                let columns = columns.clone();
                let limit = if max_rows > 0 {
                    max_rows as usize
                } else {
                    usize::MAX
                };
                if rows.len() > limit {
                    let batch: Vec<_> = rows.drain(..limit).collect();
                    self.send_data_rows(&columns, batch, &portal.result_formats)
                        .await?;
                    self.wire
                        .send(Msg::PortalSuspended(PortalSuspended::new()))
                        .await?;
                } else {
                    let batch: Vec<_> = std::mem::take(rows).into();
                    let sent = batch.len();
                    self.send_data_rows(&columns, batch, &portal.result_formats)
                        .await?;
                    // After partial fetches the tag counts this batch, as PostgreSQL does.
                    let tag = if tag.starts_with("SELECT ") && max_rows > 0 {
                        format!("SELECT {sent}")
                    } else {
                        std::mem::take(tag)
                    };
                    self.wire.send(command_complete(tag.clone())).await?;
                    portal.run = PortalRun::Done { tag: Some(tag) };
                }
            }
            PortalRun::Done { tag } => {
                let tag = tag.clone().unwrap_or_else(|| "SELECT 0".to_string());
                self.wire.send(command_complete(tag)).await?;
            }
            PortalRun::NotStarted(_) => {}
        }
        Ok(())
    }

    async fn close(&mut self, kind: u8, name: &str) -> Result<(), Step> {
        // Closing something that does not exist is not an error.
        if kind == b'S' {
            self.statements.remove(name);
        } else {
            self.portals.remove(name);
        }
        self.wire
            .send(Msg::CloseComplete(CloseComplete::new()))
            .await?;
        Ok(())
    }

    /// A simple-protocol row result: RowDescription, DataRows (text), CommandComplete.
    async fn send_rows(
        &mut self,
        columns: &[Column],
        rows: Vec<Vec<Datum>>,
        tag: String,
    ) -> Result<(), Step> {
        self.send_row_description(columns, &[]).await?;
        self.send_data_rows(columns, rows, &[]).await?;
        self.wire.send(command_complete(tag)).await?;
        Ok(())
    }

    async fn send_data_rows(
        &mut self,
        columns: &[Column],
        rows: Vec<Vec<Datum>>,
        formats: &[i16],
    ) -> Result<(), Step> {
        let formats = Formats::check(formats, columns.len(), "result")?;
        let field_count = column_count(columns.len())?;
        for row in rows {
            self.check_cancel()?;
            self.wire
                .send_data_row(field_count, |out| -> Result<(), Step> {
                    for (i, value) in row.iter().enumerate() {
                        let ty = columns.get(i).map(|c| c.ty).unwrap_or(Type::Text);
                        encode_value(ty, value, formats.get(i), out)?;
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }

    /// A CancelRequest for this connection stops result streaming with 57014.
    fn check_cancel(&self) -> Result<(), SqlError> {
        if self.cancel.flag.swap(false, Ordering::SeqCst) {
            return Err(SqlError::new(
                sqlstate::QUERY_CANCELED,
                "canceling statement due to user request",
            ));
        }
        Ok(())
    }
}

/// Parameters of unknown type are sent and read as text, which is what PostgreSQL
/// infers for a parameter without context.
fn param_wire_type(ty: Type) -> Type {
    if ty == Type::Unknown {
        Type::Text
    } else {
        ty
    }
}

fn decode_text_param(ty: Type, bytes: &[u8]) -> Result<Datum, SqlError> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        SqlError::new(
            sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            "invalid byte sequence for encoding \"UTF8\"",
        )
    })?;
    Datum::parse_text(ty, text).map_err(|e| {
        let code = if e.0.starts_with("value out of range") {
            sqlstate::NUMERIC_OUT_OF_RANGE
        } else {
            sqlstate::INVALID_TEXT_REPRESENTATION
        };
        SqlError::new(code, e.0)
    })
}

/// Format codes checked against the protocol's rules (none → all text, one →
/// applies to all, else one each), read per column without building a vector.
#[derive(Clone, Copy)]
struct Formats<'a>(&'a [i16]);

impl<'a> Formats<'a> {
    fn check(codes: &'a [i16], n: usize, what: &str) -> Result<Formats<'a>, SqlError> {
        if let Some(bad) = codes.iter().find(|&&f| f != 0 && f != 1) {
            return Err(SqlError::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("unsupported format code: {bad}"),
            ));
        }
        match codes.len() {
            0 | 1 => Ok(Formats(codes)),
            len if len == n => Ok(Formats(codes)),
            len => Err(SqlError::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("bind message has {len} {what} formats but {n} {what}s"),
            )),
        }
    }

    /// The format of column (or parameter) `i`: 0 = text, 1 = binary.
    fn get(&self, i: usize) -> i16 {
        match self.0 {
            [] => 0,
            [all] => *all,
            each => each.get(i).copied().unwrap_or(0),
        }
    }
}

fn encode_value(ty: Type, value: &Datum, format: i16, out: &mut BytesMut) -> Result<(), SqlError> {
    if value.is_null() {
        out.put_i32(-1);
        return Ok(());
    }
    // Reserve the length word, write the value, then fill the length in.
    let start = out.len();
    out.put_i32(0);
    if format == 1 {
        binary::encode(ty, value, out)?;
    } else if let Some(text) = value.to_text() {
        out.put_slice(text.as_bytes());
    }
    let len = i32::try_from(out.len() - start - 4)
        .map_err(|_| SqlError::new("54000", "value too large to send"))?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The body of a RowDescription: what pgwire's `RowDescription` encodes, written
/// straight into the output buffer.
fn encode_row_description(
    columns: &[Column],
    count: i16,
    formats: Formats<'_>,
    out: &mut BytesMut,
) {
    out.put_i16(count);
    for (i, c) in columns.iter().enumerate() {
        out.put_slice(c.name.as_bytes());
        out.put_u8(0);
        out.put_i32(c.table_oid as i32);
        out.put_i16(c.column_id);
        out.put_u32(c.ty.oid());
        out.put_i16(c.ty.typlen());
        out.put_i32(-1); // type modifier
        out.put_i16(formats.get(i));
    }
}

fn command_complete(tag: String) -> Msg {
    Msg::CommandComplete(CommandComplete::new(tag))
}

fn copy_format(_format: CopyFormat) -> i8 {
    // Text and CSV are both "textual" COPY formats (0); binary COPY would be 1.
    0
}

fn column_count(n: usize) -> Result<i16, SqlError> {
    i16::try_from(n).map_err(|_| SqlError::new("54011", "too many columns"))
}

fn message_name(m: &FrontendMessage) -> &'static str {
    match m {
        FrontendMessage::Query(_) => "Query",
        FrontendMessage::Parse { .. } => "Parse",
        FrontendMessage::Bind { .. } => "Bind",
        FrontendMessage::Describe { .. } => "Describe",
        FrontendMessage::Execute { .. } => "Execute",
        FrontendMessage::Close { .. } => "Close",
        FrontendMessage::Sync => "Sync",
        FrontendMessage::Flush => "Flush",
        FrontendMessage::Terminate => "Terminate",
        FrontendMessage::CopyData(_) => "CopyData",
        FrontendMessage::CopyDone => "CopyDone",
        FrontendMessage::CopyFail(_) => "CopyFail",
        FrontendMessage::Password(_) => "PasswordMessage",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format of every column, as a vector.
    fn resolve_formats(codes: &[i16], n: usize, what: &str) -> Result<Vec<i16>, SqlError> {
        let formats = Formats::check(codes, n, what)?;
        Ok((0..n).map(|i| formats.get(i)).collect())
    }

    #[test]
    fn format_codes_follow_the_protocol() {
        assert_eq!(resolve_formats(&[], 3, "result").unwrap(), vec![0, 0, 0]);
        assert_eq!(resolve_formats(&[1], 2, "result").unwrap(), vec![1, 1]);
        assert_eq!(resolve_formats(&[0, 1], 2, "result").unwrap(), vec![0, 1]);
        assert_eq!(
            resolve_formats(&[0, 1], 3, "result").unwrap_err().code,
            "08P01"
        );
        assert_eq!(
            resolve_formats(&[2], 1, "result").unwrap_err().code,
            "08P01"
        );
    }

    #[test]
    fn text_params_map_parse_errors_to_sqlstates() {
        assert_eq!(
            decode_text_param(Type::Int4, b"42").unwrap(),
            Datum::Int4(42)
        );
        assert_eq!(
            decode_text_param(Type::Int4, b"x").unwrap_err().code,
            "22P02"
        );
        assert_eq!(
            decode_text_param(Type::Int2, b"99999").unwrap_err().code,
            "22003"
        );
        assert_eq!(
            decode_text_param(Type::Text, &[0xff]).unwrap_err().code,
            "22021"
        );
    }

    #[test]
    fn row_description_encodes_like_pgwire() {
        use pgwire::messages::data::{FieldDescription, RowDescription};
        use pgwire::messages::Message;
        let mut named = Column::new("abalance", Type::Int4);
        named.table_oid = 16384;
        named.column_id = 3;
        let columns = vec![named, Column::new("?column?", Type::Text)];
        let mut ours = BytesMut::new();
        let formats = Formats::check(&[0, 1], 2, "result").unwrap();
        encode_row_description(&columns, 2, formats, &mut ours);
        let fields = columns
            .iter()
            .zip([0, 1])
            .map(|(c, f)| {
                FieldDescription::new(
                    c.name.clone(),
                    c.table_oid as i32,
                    c.column_id,
                    c.ty.oid(),
                    c.ty.typlen(),
                    -1,
                    f,
                )
            })
            .collect();
        let mut theirs = BytesMut::new();
        RowDescription::new(fields)
            .encode_body(&mut theirs)
            .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn values_are_length_prefixed() {
        let mut b = BytesMut::new();
        encode_value(Type::Int4, &Datum::Int4(7), 0, &mut b).unwrap();
        encode_value(Type::Int4, &Datum::Int4(7), 1, &mut b).unwrap();
        encode_value(Type::Int4, &Datum::Null, 1, &mut b).unwrap();
        assert_eq!(
            &b[..],
            &[0, 0, 0, 1, b'7', 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]
        );
    }
}
