//! Transaction pooling's client side, a [`PooledSession`] (`pool_listen`, the address of `DATABASE_POOL_URL`): a
//! client authenticated by the proxy (SCRAM against the route's verifiers) gets a server
//! connection of its database's pool for each transaction, and gives it back when the server
//! says the transaction is over (`ReadyForQuery` idle, every query and sync answered).
//!
//! - The client's startup parameters (`application_name`, `client_encoding`, `DateStyle`,
//!   `options=-c ...`) are session settings: set on each server connection the client gets
//!   (`SET`), only where it differs from what the connection already has.
//! - Named protocol-level statements work on every connection (`statements.rs`); `DEALLOCATE`
//!   and `DISCARD ALL` alone forget the client's.
//! - `SET`/`RESET` alone outside a transaction block is carried to every connection the client
//!   gets. Other session state the pool cannot carry pins the client to its server connection
//!   until the client leaves, when the connection is closed, never reused (`session_sql.rs`
//!   tells which); pins are counted by reason in `/metrics`.
//! - A running transaction counts as starting on its route: a planned switchover's hold waits
//!   (a bounded 2 s) for it to end before the old primary stops, and new transactions wait for
//!   the next table; so pooled clients see neither the switchover nor an error.
//! - A transaction that waits longer than `limits.pool_wait_timeout_secs` for a connection, or
//!   finds `limits.pool_max_waiting` others waiting, gets `53300` as an ERROR: the client's
//!   connection stays open. A new transaction on a held route (planned switchover) waits for the
//!   next table.
//! - A server connection lost mid-transaction (the primary failed or moved) ends that
//!   transaction with a `57P01` ERROR; the client's connection stays open and its next
//!   transaction runs on the current primary. A pinned client is ended instead (its state is
//!   gone).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::internal::{
    apply_settings, closed, record_parameter, run_again, run_internal, InternalQueryError,
};
use super::pool::{AcquireError, DbPool, ServerConn, Want};
use super::session_sql::{
    carried, drops_statements, overlay, session_state, starts_with_any, Carry,
};
use super::statements::{Malformed, Statements};
use crate::auth::Login;
use crate::cancel::CancelGuard;
use crate::error::{self, Ended, Refusal, UserFacing};
use crate::metrics::{ConnectionGauge, Pin};
use crate::protocol::tag::{backend, frontend};
use crate::protocol::{self, status, SqlState, HEADER};
use crate::routes::{Route, Starting};
use crate::stream::ClientStream;
use crate::Shared;

/// Largest client message accepted (PostgreSQL's own bound is 1 GB).
const MAX_CLIENT_MESSAGE: usize = 1 << 30;

/// A client authenticated on the pool address, before its first transaction.
pub struct PooledClient {
    pub stream: ClientStream,
    pub database: String,
    pub user: String,
    pub login: Login,
    /// Session settings (name, SQL value) from the startup packet, then as `SET` changed them:
    /// applied on every server connection it gets.
    pub settings: Vec<(String, String)>,
    /// The startup packet's settings alone (what `RESET` goes back to).
    pub startup: Vec<(String, String)>,
}

/// A pooled client from its first transaction to its leaving. Each turn of [`Self::run`]
/// takes what the client sent, gives it a server connection if it has none, relays the
/// server's answers as the client is owed them, and gives the connection back when the
/// transaction is over.
pub struct PooledSession<'s> {
    client: PooledClient,
    shared: &'s Shared,
    pool: Arc<DbPool>,
    cancel: CancelGuard,
    /// Read from the client, not yet framed.
    cbuf: BytesMut,
    /// Read from the server, not yet relayed.
    sbuf: BytesMut,
    /// Owed to the client, written at the end of the turn.
    out: BytesMut,
    /// The server connection of the running transaction (or of a pinned client).
    server: Option<ServerConn>,
    /// Session state the pool cannot carry ties the client to its connection.
    pin: Option<Pin>,
    statements: Statements,
    /// The last `ReadyForQuery` status.
    status: u8,
    /// Bytes of a long server message still to relay.
    relaying: usize,
    /// The client's transaction block lost its server: the next connection starts in a failed
    /// block, where PostgreSQL answers as it would have (25P02 until ROLLBACK).
    aborted: bool,
    /// The block lost its server while the client was owed nothing: its next statements are
    /// told why before they meet the failed block.
    lost_block: bool,
    /// A transaction running on a route counts as starting there: a hold waits for it.
    running: Option<Starting<'s>>,
    /// A SET or RESET on its way, with the error count before it (it is carried if it
    /// succeeded).
    carrying: Option<(Carry, usize)>,
}

/// How a pooled session ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The client left (or the proxy ended it between messages): a server connection in a
    /// clean state goes back to the pool.
    Leave,
    /// The session broke off mid-way: its server connection is closed, never reused.
    Close,
}

impl<'s> PooledSession<'s> {
    /// Finishes the client's startup: a server connection of the pool tells the server's
    /// parameters (the client's own settings on top), then `BackendKeyData` (the proxy's key)
    /// and `ReadyForQuery`. `None` when the client was told why not.
    pub async fn start(mut client: PooledClient, shared: &'s Shared) -> Option<Self> {
        let Some(route) = shared.routes.load().route(&client.database) else {
            let refusal = Refusal::UnknownDatabase(client.database.clone());
            error::refuse(&mut client.stream, &shared.metrics, refusal).await;
            return None;
        };
        let pool = shared.pools.get(&client.database, route.pool_size);
        // The server's parameters as a fresh connection to this primary reported them, the
        // client's own settings on top; the first client of a pool asks a connection.
        let params = match pool.login_params(&route.primary, &client.user) {
            Some(params) => overlay(params, &client.settings),
            None => match first_params(&client, &route, &pool, shared).await {
                Ok(params) => params,
                Err(e) => {
                    debug!(error = %e, "no server connection for a pooled client's start");
                    error::close_with(&mut client.stream, &e).await;
                    return None;
                }
            },
        };
        let cancel = shared.cancels.register_pooled();
        let key = cancel.key();
        let mut out = BytesMut::with_capacity(512);
        out.extend_from_slice(&protocol::authentication(protocol::auth_code::OK, &[]));
        for (name, value) in &params {
            out.extend_from_slice(&protocol::parameter_status(name, value));
        }
        out.extend_from_slice(&protocol::backend_key_data(key.pid, key.secret));
        out.extend_from_slice(&protocol::ready_for_query(status::IDLE));
        let limit = shared.limits.handshake_timeout();
        let sent = tokio::time::timeout(limit, async {
            client.stream.write_all(&out).await?;
            client.stream.flush().await
        })
        .await;
        matches!(sent, Ok(Ok(()))).then(|| PooledSession {
            client,
            shared,
            pool,
            cancel,
            cbuf: BytesMut::with_capacity(8192),
            sbuf: BytesMut::with_capacity(16384),
            out: BytesMut::new(),
            server: None,
            pin: None,
            statements: Statements::default(),
            status: status::IDLE,
            relaying: 0,
            aborted: false,
            lost_block: false,
            running: None,
            carrying: None,
        })
    }

    /// Relays the client's transactions through the pool until the client leaves.
    pub async fn run(mut self) {
        let _pooled = ConnectionGauge::new(&self.shared.metrics.pooled_clients);
        let exit = loop {
            if let Err(exit) = self.turn().await {
                break exit;
            }
        };
        self.finish(exit);
    }

    /// One turn: wait for either side, then act on what came.
    async fn turn(&mut self) -> Result<(), Exit> {
        let server_gone = self.wait().await?;
        let mut batch = self.take_batch().await?;
        if server_gone {
            self.server_lost().await?;
        }
        self.tell_lost_block(&mut batch);
        self.answer_deallocation(&mut batch);
        if !batch.is_empty() {
            self.forward(batch).await?;
        }
        self.relay_answers().await;
        self.flush().await?;
        self.settle();
        Ok(())
    }

    /// Waits for bytes from the client or the server; `true` when the server connection is
    /// gone (closed, failed, or its node stopped being the primary).
    async fn wait(&mut self) -> Result<bool, Exit> {
        let Self { client, server, cbuf, sbuf, shared, .. } = self;
        let (server_stream, moved) = match server {
            Some(conn) => (Some(&mut conn.stream), Some(&conn.moved)),
            None => (None, None),
        };
        let server_read = async {
            match server_stream {
                Some(stream) => stream.read_buf(sbuf).await,
                None => std::future::pending().await,
            }
        };
        let lost_primary = async {
            match moved {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = client.stream.read_buf(cbuf) => match read {
                Ok(0) | Err(_) => Err(Exit::Leave),
                Ok(n) => {
                    shared.metrics.bytes_from_clients.inc_by(n as u64);
                    Ok(false)
                }
            },
            read = server_read => Ok(matches!(read, Ok(0) | Err(_))),
            () = lost_primary => Ok(true),
            () = shared.terminate.cancelled() => {
                let _ = client.stream.write_all(&error::fatal_response(&Ended::Shutdown)).await;
                Err(Exit::Leave)
            }
        }
    }

    /// The client's complete messages, noting what pins it and the `SET` or `RESET` to carry.
    async fn take_batch(&mut self) -> Result<Vec<BytesMut>, Exit> {
        let was_pinned = self.pin.is_some();
        let mut batch: Vec<BytesMut> = Vec::new();
        let mut terminate = false;
        loop {
            if let Some((_, len)) = protocol::header(&self.cbuf) {
                if !(4..=MAX_CLIENT_MESSAGE as i32).contains(&len) {
                    error::close_with(&mut self.client.stream, &Violation::Length).await;
                    return Err(Exit::Close);
                }
            }
            let Some((tag, len)) = protocol::frame(&self.cbuf) else { break };
            let message = self.cbuf.split_to(len);
            let body = &message[HEADER..];
            match tag {
                frontend::TERMINATE => {
                    terminate = true;
                    break;
                }
                frontend::QUERY => {
                    // Alone and outside a transaction block, SET and RESET are carried.
                    let alone =
                        self.status == status::IDLE && self.cbuf.is_empty() && batch.is_empty();
                    match carried(body).filter(|_| alone && self.pin.is_none()) {
                        Some(carry) => self.carrying = Some((carry, self.statements.errors)),
                        None => self.pin = self.pin.or_else(|| session_state(body)),
                    }
                }
                frontend::FUNCTION_CALL => self.pin = self.pin.or(Some(Pin::FunctionCall)),
                frontend::PARSE => {
                    let query = body.splitn(2, |b| *b == 0).nth(1).unwrap_or_default();
                    self.pin = self.pin.or_else(|| session_state(query));
                }
                _ => {}
            }
            batch.push(message);
        }
        if let Some(reason) = self.pin.filter(|_| !was_pinned) {
            self.shared.metrics.pinned(reason);
        }
        if terminate {
            return Err(Exit::Leave);
        }
        Ok(batch)
    }

    /// The server connection is gone: what the client is owed ends with an error, and a
    /// transaction block it was in stays failed on its next connection.
    async fn server_lost(&mut self) -> Result<(), Exit> {
        let had = self.server.take();
        self.running = None;
        if let Some(conn) = &had {
            self.pool.drop_idle_to(&conn.primary);
        }
        self.shared.cancels.retarget(self.cancel.key(), None);
        if self.pin.is_some() {
            error::close_with(&mut self.client.stream, &Ended::PinLost).await;
            return Err(Exit::Close);
        }
        if self.relaying > 0 {
            return Err(Exit::Close); // half a message reached the client: nothing sensible can follow.
        }
        // A client inside a transaction block must not see its next statements run outside
        // of it: its next server connection starts in a failed block.
        let in_block = self.status != status::IDLE;
        let owed = self.statements.lost();
        self.lost_block = in_block && owed == 0;
        if owed > 0 {
            self.out.extend_from_slice(&error::error_response(&Ended::TransactionLost));
            let now = if in_block { status::FAILED_BLOCK } else { status::IDLE };
            for _ in 0..owed {
                self.out.extend_from_slice(&protocol::ready_for_query(now));
            }
        }
        self.sbuf.clear();
        self.status = if in_block { status::FAILED_BLOCK } else { status::IDLE };
        self.aborted = in_block;
        Ok(())
    }

    /// The first statements after a lost block learn why it failed (a ROLLBACK ends it).
    fn tell_lost_block(&mut self, batch: &mut Vec<BytesMut>) {
        if !self.lost_block || batch.is_empty() {
            return;
        }
        self.lost_block = false;
        let rollback = |m: &BytesMut| {
            m[0] == frontend::QUERY && starts_with_any(&m[HEADER..], &[b"rollback", b"abort"])
        };
        if !batch.first().is_some_and(rollback) {
            self.out.extend_from_slice(&error::error_response(&Ended::TransactionLost));
            for _ in batch.iter().filter(|m| frontend::answered_by_ready(m[0])) {
                self.out.extend_from_slice(&protocol::ready_for_query(status::FAILED_BLOCK));
            }
            batch.clear();
        }
    }

    /// Statements the proxy answers itself, outside a transaction block.
    fn answer_deallocation(&mut self, batch: &mut Vec<BytesMut>) {
        let idle = self.pin.is_none() && self.status == status::IDLE && self.server.is_none();
        if !idle || !self.statements.owes_nothing() {
            return;
        }
        if let [only] = batch.as_slice() {
            if let Some(tag) = deallocation(only, &mut self.statements) {
                let complete = format!("{tag}\0");
                self.out.extend_from_slice(&protocol::message(
                    backend::COMMAND_COMPLETE,
                    complete.as_bytes(),
                ));
                self.out.extend_from_slice(&protocol::ready_for_query(status::IDLE));
                batch.clear();
            }
        }
    }

    /// Sends the client's messages to its server connection, getting one first if it has
    /// none.
    async fn forward(&mut self, batch: Vec<BytesMut>) -> Result<(), Exit> {
        if self.server.is_none() && !self.take_server(&batch).await {
            return Ok(());
        }
        let Some(conn) = self.server.as_mut() else { return Ok(()) };
        // A pinned client's next transaction counts as running too.
        if self.running.is_none() {
            self.running = Some(self.shared.routes.starting(&self.client.database));
        }
        let mut to_server = BytesMut::new();
        for message in &batch {
            let rewritten =
                self.statements.client_message(message, &mut conn.statements, &mut to_server);
            if let Err(e) = rewritten {
                error::close_with(&mut self.client.stream, &Violation::Malformed(e)).await;
                return Err(Exit::Close);
            }
        }
        // A query that drops prepared statements on the server drops them all, as far as the
        // proxy knows.
        if batch.iter().any(|m| m[0] == frontend::QUERY && drops_statements(&m[HEADER..])) {
            conn.statements.clear();
        }
        // A failed write shows at the next read of the server.
        let _ = conn.stream.write_all(&to_server).await;
        Ok(())
    }

    /// Gives the client a server connection for `batch`; `false` when the proxy answered the
    /// batch itself instead (an error, or a prepare recorded for later).
    ///
    /// A prepare alone (`Parse` of a named statement, then `Sync`: libpq's `PQprepare`) that
    /// finds every connection busy (or the database held) is recorded and answered at once;
    /// the statement is prepared on the connection its first use gets (where an error in it
    /// shows). A client blocked in its prepare can hold up the busy ones: pgbench runs all its
    /// clients in one thread, and a transaction of one cannot end while another waits for its
    /// prepare.
    async fn take_server(&mut self, batch: &[BytesMut]) -> bool {
        let prepare_alone = self.pin.is_none()
            && self.status == status::IDLE
            && !self.aborted
            && matches!(batch, [parse, sync]
                if parse[0] == frontend::PARSE
                    && parse.get(HEADER).is_some_and(|b| *b != 0)
                    && sync[0] == frontend::SYNC);
        let attached = match self.attach(!prepare_alone).await {
            Err(Unattached::Busy) if self.statements.record(&batch[0]).is_ok() => {
                self.out.extend_from_slice(&protocol::message(backend::PARSE_COMPLETE, &[]));
                self.out.extend_from_slice(&protocol::ready_for_query(status::IDLE));
                return false;
            }
            Err(Unattached::Busy) => self.attach(true).await,
            attached => attached,
        };
        match attached {
            Ok((conn, guard)) => {
                self.aborted = false;
                self.shared.cancels.retarget(self.cancel.key(), conn.cancel.clone());
                self.server = Some(conn);
                self.running = Some(guard);
                self.sbuf.clear();
                self.relaying = 0;
                true
            }
            Err(refused) => {
                debug!(error = %refused, "a pooled transaction got no server connection");
                self.out.extend_from_slice(&error::error_response(&refused));
                let owed = batch.iter().filter(|m| frontend::answered_by_ready(m[0])).count();
                for _ in 0..owed {
                    self.out.extend_from_slice(&protocol::ready_for_query(self.status));
                }
                false
            }
        }
    }

    /// A server connection for the client's next transaction, on the current route (waiting
    /// out a hold, and for a busy pool, if `queue`).
    async fn attach(&self, queue: bool) -> Result<(ServerConn, Starting<'s>), Unattached> {
        let (shared, client) = (self.shared, &self.client);
        let hold_deadline = tokio::time::Instant::now() + shared.limits.hold_timeout();
        let mut stale = 0;
        loop {
            let mut changes = shared.routes.subscribe();
            // Counted before the route is read: a hold applied from now on waits for it.
            let running = shared.routes.starting(&client.database);
            let Some(route) = shared.routes.load().route(&client.database) else {
                return Err(Unattached::Gone(client.database.clone()));
            };
            if route.hold {
                drop(running);
                if !queue {
                    return Err(Unattached::Busy);
                }
                if tokio::time::timeout_at(hold_deadline, changes.changed()).await.is_err() {
                    return Err(Unattached::HoldTimeout(client.database.clone()));
                }
                continue;
            }
            let pool = shared.pools.get(&client.database, route.pool_size);
            // A transaction still waiting for a connection when a hold comes has not started:
            // it waits out the hold with the new ones instead of holding the hold up.
            let acquired = tokio::select! {
                acquired = pool.acquire(shared, want(client, &route, queue)) => acquired,
                () = hold_applied(shared, &mut changes, &client.database) => {
                    drop(running);
                    continue;
                }
            };
            let mut conn = acquired.map_err(|e| match e {
                AcquireError::Busy { .. } => Unattached::Busy,
                e => Unattached::Acquire(e),
            })?;
            if stale < 3 && closed(&mut conn).await {
                // The node ended it while it was idle (a restart): so it did the others.
                pool.drop_idle_to(&conn.primary);
                stale += 1;
                continue;
            }
            let limit = shared.limits.backend_auth_timeout();
            apply_settings(&mut conn, &client.settings, limit)
                .await
                .map_err(Unattached::Settings)?;
            if self.aborted {
                // The error is the point: the block is failed, as the client's was.
                let fail = "BEGIN; DO $pgwarden$ BEGIN RAISE EXCEPTION 'transaction lost with \
                            its server connection' USING ERRCODE = '57P01'; END $pgwarden$";
                let _ = run_internal(&mut conn, fail, limit).await;
            }
            return Ok((conn, running));
        }
    }

    /// The proxy's own answers due now, then the server's messages as the client is owed them.
    async fn relay_answers(&mut self) {
        self.statements.replies(&mut self.out);
        let Some(conn) = self.server.as_mut() else { return };
        let ServerConn { statements: prepared, params, .. } = conn;
        let fatal = self.statements.relay(
            &mut self.sbuf,
            &mut self.out,
            &mut self.relaying,
            &mut self.status,
            prepared,
            |body| record_parameter(params, body),
        );
        if let Some(text) = fatal {
            debug!(error = %text, "the server ended a pooled connection");
        }
        if self.statements.rerun_due {
            let limit = self.shared.limits.backend_auth_timeout();
            run_again(&mut self.statements, conn, limit).await;
            self.shared.metrics.stale_plans_healed.inc();
        }
    }

    /// Writes what the client is owed.
    async fn flush(&mut self) -> Result<(), Exit> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.shared.metrics.bytes_to_clients.inc_by(self.out.len() as u64);
        if self.client.stream.write_all(&self.out).await.is_err() {
            return Err(Exit::Leave);
        }
        self.out.clear();
        Ok(())
    }

    /// Once the transaction is over, the connection goes back (a pinned client keeps it, but a
    /// hold need not wait for it between its transactions).
    fn settle(&mut self) {
        let done = self.statements.settled() && self.status == status::IDLE && self.relaying == 0;
        if !done {
            return;
        }
        self.running = None;
        if let (Some((carry, errors)), Some(conn)) = (self.carrying.take(), self.server.as_mut()) {
            if self.statements.errors == errors {
                carry_setting(&mut self.client, conn, carry);
            }
        }
        if self.pin.is_none() {
            if let Some(conn) = self.server.take() {
                self.shared.cancels.retarget(self.cancel.key(), None);
                self.pool.release(conn);
            }
        }
    }

    /// The client left: a connection in a clean state goes back, any other is closed.
    fn finish(mut self, exit: Exit) {
        let clean = self.statements.settled() && self.status == status::IDLE && self.relaying == 0;
        let server = self.server.take();
        if let Some(conn) = server.filter(|_| exit == Exit::Leave && clean && self.pin.is_none()) {
            self.pool.release(conn);
        }
    }
}

/// The parameters of a fresh server connection for `client`'s start, its settings applied.
async fn first_params(
    client: &PooledClient,
    route: &Route,
    pool: &Arc<DbPool>,
    shared: &Shared,
) -> Result<Vec<(String, String)>, Unattached> {
    let mut conn =
        pool.acquire(shared, want(client, route, true)).await.map_err(Unattached::Acquire)?;
    let limit = shared.limits.backend_auth_timeout();
    apply_settings(&mut conn, &client.settings, limit).await.map_err(Unattached::StartSettings)?;
    let params = conn.params.clone();
    pool.release(conn);
    Ok(params)
}

fn want<'a>(client: &'a PooledClient, route: &'a Route, queue: bool) -> Want<'a> {
    Want { database: &client.database, route, user: &client.user, login: &client.login, queue }
}

/// A client that broke the protocol: told with a FATAL, its connection closed.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("invalid message length from the client")]
    Length,
    #[error(transparent)]
    Malformed(Malformed),
}

impl UserFacing for Violation {
    fn sqlstate(&self) -> SqlState {
        SqlState::ProtocolViolation
    }

    fn client_message(&self) -> String {
        self.to_string()
    }
}

/// `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` sent alone as a simple query: the
/// client's statements are the proxy's to forget (the server's stay for other clients).
/// Returns the command tag the client gets, or `None` for anything else (and for a name the
/// client did not prepare through the protocol: the server answers).
fn deallocation(message: &[u8], statements: &mut Statements) -> Option<&'static str> {
    let body = &message[HEADER..];
    if message[0] != frontend::QUERY || !starts_with_any(body, &[b"discard", b"deallocate"]) {
        return None;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    let words: Vec<&str> =
        text.trim_end_matches('\0').trim().trim_end_matches(';').split_whitespace().collect();
    match words.as_slice() {
        ["discard", "all"] => {
            statements.deallocate_all();
            Some("DISCARD ALL")
        }
        ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            statements.deallocate_all();
            Some("DEALLOCATE ALL")
        }
        ["deallocate", name] | ["deallocate", "prepare", name] => {
            let name = name.trim_matches('"');
            statements.deallocate(name).then_some("DEALLOCATE")
        }
        _ => None,
    }
}

/// Records a `SET`/`RESET` that succeeded on `conn`: the client's settings follow it to every
/// connection it gets, and `conn` has it already.
fn carry_setting(client: &mut PooledClient, conn: &mut ServerConn, carry: Carry) {
    let settings = &mut client.settings;
    match carry {
        Carry::Set(name, value) => {
            settings.retain(|(n, _)| *n != name);
            settings.push((name.clone(), value.clone()));
            conn.applied.insert(name, value);
        }
        Carry::Reset(name) => {
            // The session default is the startup packet's value, if it had one.
            settings.retain(|(n, _)| *n != name);
            settings.extend(client.startup.iter().filter(|(n, _)| *n == name).cloned());
            conn.applied.remove(&name);
        }
        Carry::ResetAll => {
            *settings = client.startup.clone();
            conn.applied.clear();
        }
    }
}

/// Why a client's transaction (or its start) got no server connection: an ERROR, the
/// client's connection stays (at its start, a FATAL).
#[derive(Debug, thiserror::Error)]
enum Unattached {
    /// Every connection was busy (or the database held) and the caller would not wait.
    #[error("every server connection is busy")]
    Busy,
    #[error("database \"{0}\" does not exist any more")]
    Gone(String),
    #[error("database \"{0}\" is switching to a new primary; retry shortly")]
    HoldTimeout(String),
    #[error(transparent)]
    Acquire(AcquireError),
    #[error("cannot apply settings: {0}")]
    Settings(InternalQueryError),
    /// The client's own startup settings failed on a fresh connection.
    #[error("cannot apply the connection's settings: {0}")]
    StartSettings(InternalQueryError),
}

impl UserFacing for Unattached {
    fn sqlstate(&self) -> SqlState {
        match self {
            Self::Busy => SqlState::TooManyConnections,
            Self::Gone(_) => SqlState::UnknownDatabase,
            Self::HoldTimeout(_) | Self::Settings(_) => SqlState::CannotConnectNow,
            Self::Acquire(e) => e.sqlstate(),
            Self::StartSettings(_) => SqlState::FeatureNotSupported,
        }
    }

    fn client_message(&self) -> String {
        match self {
            Self::Acquire(e) => e.client_message(),
            Self::Settings(e) => format!("cannot apply settings: {}", e.told()),
            Self::StartSettings(e) => {
                format!("cannot apply the connection's settings: {}", e.told())
            }
            other => other.to_string(),
        }
    }
}

/// Returns once the route of `database` is held (never if the routes stop changing).
async fn hold_applied(
    shared: &Shared,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    database: &str,
) {
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if shared.routes.load().route(database).is_some_and(|r| r.hold) {
            return;
        }
    }
}
