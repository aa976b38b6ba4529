//! Transaction pooling's client side (`pool_listen`, the address of `DATABASE_POOL_URL`): a
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

use crate::auth::Login;
use crate::cancel::CancelGuard;
use crate::pool::{AcquireError, DbPool, ServerConn, Want};
use crate::protocol::{self, SqlState};
use crate::session_sql::{
    carried, drops_statements, overlay, session_state, starts_with_any, Carry,
};
use crate::statements::Statements;
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

/// Finishes the client's startup: a server connection of the pool tells the server's
/// parameters (the client's own settings on top), then `BackendKeyData` (the proxy's key) and
/// `ReadyForQuery`. `None` when the client was told why not.
pub async fn start(
    mut client: PooledClient,
    shared: &Arc<Shared>,
) -> Option<(PooledClient, Arc<DbPool>, CancelGuard)> {
    let Some(route) = shared.routes.load().route(&client.database) else {
        let message = format!("database \"{}\" does not exist", client.database);
        crate::handshake::refuse(&mut client.stream, SqlState::UnknownDatabase, &message).await;
        return None;
    };
    let pool = shared.pools.get(&client.database, route.pool_size);
    // The server's parameters as a fresh connection to this primary reported them, the client's
    // own settings on top; the first client of a pool asks a connection.
    let params = match pool.login_params(&route.primary, &client.user) {
        Some(params) => overlay(params, &client.settings),
        None => {
            let mut conn = match pool.acquire(shared, want(&client, &route, true)).await {
                Ok(conn) => conn,
                Err(e) => {
                    let state = acquire_state(&e);
                    debug!(error = %e, "no server connection for a pooled client's start");
                    crate::handshake::refuse(&mut client.stream, state, &e.to_string()).await;
                    return None;
                }
            };
            if let Err(message) = apply_settings(&mut conn, &client.settings, shared).await {
                let message = format!("cannot apply the connection's settings: {message}");
                let state = SqlState::FeatureNotSupported;
                crate::handshake::refuse(&mut client.stream, state, &message).await;
                return None;
            }
            let params = conn.params.clone();
            pool.release(conn);
            params
        }
    };
    let cancel = shared.cancels.register_pooled();
    let key = cancel.key();
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(&protocol::authentication(protocol::auth_code::OK, &[]));
    for (name, value) in &params {
        out.extend_from_slice(&protocol::parameter_status(name, value));
    }
    out.extend_from_slice(&protocol::backend_key_data(key.pid, key.secret));
    out.extend_from_slice(&protocol::ready_for_query(b'I'));
    let limit = shared.limits.handshake_timeout();
    let sent = tokio::time::timeout(limit, async {
        client.stream.write_all(&out).await?;
        client.stream.flush().await
    })
    .await;
    matches!(sent, Ok(Ok(()))).then_some((client, pool, cancel))
}

fn want<'a>(client: &'a PooledClient, route: &'a crate::routes::Route, queue: bool) -> Want<'a> {
    Want { database: &client.database, route, user: &client.user, login: &client.login, queue }
}

fn acquire_state(e: &AcquireError) -> SqlState {
    match e {
        AcquireError::QueueFull { .. }
        | AcquireError::Timeout { .. }
        | AcquireError::Busy { .. } => SqlState::TooManyConnections,
        AcquireError::Connect { .. } | AcquireError::Login { .. } => SqlState::CannotConnectNow,
    }
}

/// Sets `settings` on `conn` where it differs (and resets what an earlier client set and this
/// one does not), in one round trip.
async fn apply_settings(
    conn: &mut ServerConn,
    settings: &[(String, String)],
    shared: &Shared,
) -> Result<(), String> {
    let mut sql = String::new();
    for (name, value) in settings {
        if conn.applied.get(name) != Some(value) {
            sql.push_str(&format!("SET {name} = {value};"));
        }
    }
    let stale: Vec<String> = conn
        .applied
        .keys()
        .filter(|name| !settings.iter().any(|(n, _)| n == *name))
        .cloned()
        .collect();
    for name in &stale {
        sql.push_str(&format!("RESET {name};"));
    }
    if sql.is_empty() {
        return Ok(());
    }
    let limit = shared.limits.backend_auth_timeout();
    let ran = tokio::time::timeout(limit, run_internal(conn, &sql)).await;
    match ran {
        Ok(Ok(())) => {
            for name in stale {
                conn.applied.remove(&name);
            }
            for (name, value) in settings {
                conn.applied.insert(name.clone(), value.clone());
            }
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the database node did not answer in time".into()),
    }
}

/// Runs `sql` on `conn` for the proxy itself: `ParameterStatus` changes are recorded, an error
/// is returned as its message.
async fn run_internal(conn: &mut ServerConn, sql: &str) -> Result<(), String> {
    conn.stream.write_all(&protocol::query(sql)).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut error = None;
    loop {
        while let Some((tag, len)) = frame(&buf) {
            let message = buf.split_to(len);
            match tag {
                b'Z' => return error.map_or(Ok(()), Err),
                b'E' => error = Some(error_text(&message[5..])),
                b'S' => record_parameter(&mut conn.params, &message[5..]),
                _ => {}
            }
        }
        if conn.stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the database node closed the connection".into());
        }
    }
}

/// Whether an `ErrorResponse` body is FATAL (or PANIC): the server ends the connection.
pub(crate) fn is_fatal(body: &[u8]) -> bool {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"V").or_else(|| f.strip_prefix(b"S")))
        .is_some_and(|s| s == b"FATAL" || s == b"PANIC")
}

pub(crate) fn error_text(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "error".into())
}

fn record_parameter(params: &mut Vec<(String, String)>, body: &[u8]) {
    let mut parts = body.split(|b| *b == 0);
    let (Some(name), Some(value)) = (parts.next(), parts.next()) else { return };
    let (name, value) =
        (String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned());
    match params.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = value,
        None => params.push((name, value)),
    }
}

/// The tag and total length of the whole message at the start of `buf`, once it is all there.
fn frame(buf: &[u8]) -> Option<(u8, usize)> {
    let len = i32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    let total = 1 + usize::try_from(len).ok()?;
    (buf.len() >= total).then_some((buf[0], total))
}

/// What a client whose transaction lost its server connection is told.
const LOST_TRANSACTION: &str = "the transaction was ended because the connection to the primary \
                                was lost (the primary failed, moved, or restarted and the \
                                transaction outlived the wait for it): run it again";

/// Relays the client's transactions through the pool until the client leaves.
pub async fn run(
    mut client: PooledClient,
    shared: &Arc<Shared>,
    pool: Arc<DbPool>,
    cancel: CancelGuard,
) {
    let _pooled = crate::metrics::ConnectionGauge::new(&shared.metrics.pooled_clients);
    let mut cbuf = BytesMut::with_capacity(8192);
    let mut sbuf = BytesMut::with_capacity(16384);
    let mut out = BytesMut::new();
    let mut server: Option<ServerConn> = None;
    let mut pin: Option<&'static str> = None;
    let mut statements = Statements::default();
    // The last ReadyForQuery status, and bytes of a long server message still to relay.
    let (mut status, mut relaying) = (b'I', 0usize);
    // The client's transaction block lost its server: the next connection starts in a failed
    // block, where PostgreSQL answers as it would have (25P02 until ROLLBACK).
    let mut aborted = false;
    // The block lost its server while the client was owed nothing: its next statements are
    // told why before they meet the failed block.
    let mut lost_block = false;
    // A transaction running on a route counts as starting there: a hold waits for it.
    let mut running: Option<crate::routes::Starting<'_>> = None;
    // A SET or RESET on its way, with the error count before it (it is carried if it
    // succeeded).
    let mut carrying: Option<(Carry, usize)> = None;
    loop {
        let moved = server.as_ref().map(|s| s.moved.clone());
        let server_read = async {
            match server.as_mut() {
                Some(conn) => conn.stream.read_buf(&mut sbuf).await,
                None => std::future::pending().await,
            }
        };
        let lost_primary = async {
            match &moved {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let mut server_gone = false;
        tokio::select! {
            read = client.stream.read_buf(&mut cbuf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => shared.metrics.bytes_from_clients.inc_by(n as u64),
            },
            read = server_read => match read {
                Ok(0) | Err(_) => server_gone = true,
                Ok(_) => {}
            },
            () = lost_primary => server_gone = true,
            () = shared.terminate.cancelled() => {
                let message = "terminating connection because the proxy is shutting down";
                let _ = client.stream.write_all(&protocol::fatal(SqlState::AdminShutdown, message)).await;
                break;
            }
        }
        // The client's complete messages.
        let was_pinned = pin.is_some();
        let mut batch: Vec<BytesMut> = Vec::new();
        let mut terminate = false;
        loop {
            if cbuf.len() >= 5 {
                let len = i32::from_be_bytes(cbuf[1..5].try_into().expect("5 bytes"));
                if !(4..=MAX_CLIENT_MESSAGE as i32).contains(&len) {
                    let message = "invalid message length from the client";
                    let _ = client
                        .stream
                        .write_all(&protocol::fatal(SqlState::ProtocolViolation, message))
                        .await;
                    return;
                }
            }
            let Some((tag, len)) = frame(&cbuf) else { break };
            let message = cbuf.split_to(len);
            match tag {
                b'X' => {
                    terminate = true;
                    break;
                }
                b'Q' => {
                    // Alone and outside a transaction block, SET and RESET are carried.
                    let alone = status == b'I' && cbuf.is_empty() && batch.is_empty();
                    match carried(&message[5..]).filter(|_| alone && pin.is_none()) {
                        Some(carry) => carrying = Some((carry, statements.errors)),
                        None => pin = pin.or_else(|| session_state(&message[5..])),
                    }
                }
                b'F' => pin = pin.or(Some("function_call")),
                b'P' => {
                    let query = message[5..].splitn(2, |b| *b == 0).nth(1).unwrap_or_default();
                    pin = pin.or_else(|| session_state(query));
                }
                _ => {}
            }
            batch.push(message);
        }
        if let Some(reason) = pin.filter(|_| !was_pinned) {
            shared.metrics.pinned(reason);
        }
        if terminate {
            break;
        }
        if server_gone {
            let had = server.take();
            running = None;
            if let Some(conn) = &had {
                pool.drop_idle_to(&conn.primary);
            }
            shared.cancels.retarget(cancel.key(), None);
            if pin.is_some() {
                let message = "terminating connection because its server connection was lost \
                               (the primary failed or moved) and its session state with it";
                let _ = client
                    .stream
                    .write_all(&protocol::fatal(SqlState::AdminShutdown, message))
                    .await;
                return;
            }
            if relaying > 0 {
                return; // half a message reached the client: nothing sensible can follow.
            }
            // A client inside a transaction block must not see its next statements run
            // outside of it: its next server connection starts in a failed block.
            let in_block = status != b'I';
            let owed = statements.lost();
            lost_block = in_block && owed == 0;
            if owed > 0 {
                out.extend_from_slice(&protocol::error(SqlState::AdminShutdown, LOST_TRANSACTION));
                let now = if in_block { b'E' } else { b'I' };
                for _ in 0..owed {
                    out.extend_from_slice(&protocol::ready_for_query(now));
                }
            }
            sbuf.clear();
            status = if in_block { b'E' } else { b'I' };
            aborted = in_block;
        }
        // The first statements after a lost block learn why it failed (a ROLLBACK ends it).
        if lost_block && !batch.is_empty() {
            lost_block = false;
            let rollback =
                |m: &BytesMut| m[0] == b'Q' && starts_with_any(&m[5..], &[b"rollback", b"abort"]);
            if !batch.first().is_some_and(rollback) {
                out.extend_from_slice(&protocol::error(SqlState::AdminShutdown, LOST_TRANSACTION));
                for _ in batch.iter().filter(|m| matches!(m[0], b'Q' | b'S' | b'F')) {
                    out.extend_from_slice(&protocol::ready_for_query(b'E'));
                }
                batch.clear();
            }
        }
        // Statements the proxy answers itself, outside a transaction block.
        if pin.is_none() && status == b'I' && statements.owes_nothing() && server.is_none() {
            if let [only] = batch.as_slice() {
                if let Some(tag) = deallocation(only, &mut statements) {
                    out.extend_from_slice(&protocol::message(b'C', format!("{tag}\0").as_bytes()));
                    out.extend_from_slice(&protocol::ready_for_query(b'I'));
                    batch.clear();
                }
            }
        }
        // A prepare alone (`Parse` of a named statement, then `Sync`: libpq's `PQprepare`)
        // that finds every connection busy (or the database held) is recorded and answered at
        // once; the statement is prepared on the connection its first use gets (where an error
        // in it shows). A client blocked in its prepare can hold up the busy ones: pgbench runs
        // all its clients in one thread, and a transaction of one cannot end while another
        // waits for its prepare.
        let prepare_alone = server.is_none()
            && pin.is_none()
            && status == b'I'
            && !aborted
            && matches!(batch.as_slice(), [parse, sync]
                if parse[0] == b'P' && parse.get(5).is_some_and(|b| *b != 0) && sync[0] == b'S');
        if !batch.is_empty() {
            if server.is_none() {
                let attached = match attach(&mut client, shared, aborted, !prepare_alone).await {
                    Err(Unattached::Busy) if statements.record(&batch[0]).is_ok() => {
                        out.extend_from_slice(&protocol::message(b'1', &[]));
                        out.extend_from_slice(&protocol::ready_for_query(b'I'));
                        batch.clear();
                        None
                    }
                    Err(Unattached::Busy) => Some(attach(&mut client, shared, aborted, true).await),
                    attached => Some(attached),
                };
                match attached {
                    Some(Ok((conn, guard))) => {
                        aborted = false;
                        shared.cancels.retarget(cancel.key(), conn.cancel.clone());
                        server = Some(conn);
                        running = Some(guard);
                        sbuf.clear();
                        relaying = 0;
                    }
                    Some(Err(refused)) => {
                        let (state, message) = refused.reason();
                        out.extend_from_slice(&protocol::error(state, &message));
                        let owed = batch.iter().filter(|m| matches!(m[0], b'Q' | b'S' | b'F'));
                        for _ in 0..owed.count() {
                            out.extend_from_slice(&protocol::ready_for_query(status));
                        }
                        batch.clear();
                    }
                    None => {}
                }
            }
            if let Some(conn) = server.as_mut() {
                // A pinned client's next transaction counts as running too.
                if running.is_none() {
                    running = Some(shared.routes.starting(&client.database));
                }
                let mut to_server = BytesMut::new();
                for message in &batch {
                    let rewritten =
                        statements.client_message(message, &mut conn.statements, &mut to_server);
                    if let Err(e) = rewritten {
                        let m = protocol::fatal(SqlState::ProtocolViolation, &e.to_string());
                        let _ = client.stream.write_all(&m).await;
                        return;
                    }
                }
                // A query that drops prepared statements on the server drops them all, as far as
                // the proxy knows.
                if batch.iter().any(|m| m[0] == b'Q' && drops_statements(&m[5..])) {
                    conn.statements.clear();
                }
                // A failed write shows at the next read of the server.
                let _ = conn.stream.write_all(&to_server).await;
            }
        }
        // The proxy's own answers due now, then the server's messages as the client is owed
        // them.
        statements.replies(&mut out);
        if let Some(conn) = server.as_mut() {
            let ServerConn { statements: prepared, params, .. } = conn;
            let fatal = statements.relay(
                &mut sbuf,
                &mut out,
                &mut relaying,
                &mut status,
                prepared,
                |body| record_parameter(params, body),
            );
            if let Some(text) = fatal {
                debug!(error = %text, "the server ended a pooled connection");
            }
            if statements.rerun_due {
                // A stale plan: the connection's statements go, and the client's batch runs
                // again on statements prepared anew.
                let again = statements.take_rerun(&mut conn.statements);
                let limit = shared.limits.backend_auth_timeout();
                let cleared =
                    tokio::time::timeout(limit, run_internal(conn, "DEALLOCATE ALL")).await;
                if matches!(cleared, Ok(Ok(()))) {
                    let mut to_server = BytesMut::new();
                    let mut rest = &again[..];
                    while let Some((_, len)) = frame(rest) {
                        let rewritten = statements.client_message(
                            &rest[..len],
                            &mut conn.statements,
                            &mut to_server,
                        );
                        if rewritten.is_err() {
                            break;
                        }
                        rest = &rest[len..];
                    }
                    let _ = conn.stream.write_all(&to_server).await;
                }
                shared.metrics.stale_plans_healed.inc();
            }
        }
        if !out.is_empty() {
            shared.metrics.bytes_to_clients.inc_by(out.len() as u64);
            if client.stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        // The transaction is over: the connection goes back (a pinned client keeps it, but a
        // hold need not wait for it between its transactions).
        let done = statements.settled() && status == b'I' && relaying == 0;
        if done {
            running = None;
            if let (Some((carry, errors)), Some(conn)) = (carrying.take(), server.as_mut()) {
                if statements.errors == errors {
                    carry_setting(&mut client, conn, carry);
                }
            }
        }
        if done && pin.is_none() && server.is_some() {
            shared.cancels.retarget(cancel.key(), None);
            pool.release(server.take().expect("checked"));
        }
    }
    // The client left: a connection in a clean state goes back, any other is closed.
    let clean = statements.settled() && status == b'I' && relaying == 0;
    if let Some(conn) = server.take().filter(|_| clean && pin.is_none()) {
        pool.release(conn);
    }
    drop(running);
    drop(cancel);
}

/// `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` sent alone as a simple query: the
/// client's statements are the proxy's to forget (the server's stay for other clients).
/// Returns the command tag the client gets, or `None` for anything else (and for a name the
/// client did not prepare through the protocol: the server answers).
fn deallocation(message: &[u8], statements: &mut Statements) -> Option<&'static str> {
    if message[0] != b'Q' || !starts_with_any(&message[5..], &[b"discard", b"deallocate"]) {
        return None;
    }
    let text = String::from_utf8_lossy(&message[5..]).to_ascii_lowercase();
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

/// Why a client's next transaction got no server connection.
enum Unattached {
    /// Every connection was busy (or the database held) and the caller would not wait.
    Busy,
    /// The SQLSTATE and sentence the client gets.
    Refused(SqlState, String),
}

impl Unattached {
    fn reason(self) -> (SqlState, String) {
        match self {
            Unattached::Busy => {
                (SqlState::TooManyConnections, "every server connection is busy".into())
            }
            Unattached::Refused(state, message) => (state, message),
        }
    }
}

/// A server connection for the client's next transaction, on the current route (waiting out a
/// hold, and for a busy pool, if `queue`).
async fn attach<'s>(
    client: &mut PooledClient,
    shared: &'s Shared,
    aborted: bool,
    queue: bool,
) -> Result<(ServerConn, crate::routes::Starting<'s>), Unattached> {
    let hold_deadline = tokio::time::Instant::now() + shared.limits.hold_timeout();
    let mut stale = 0;
    loop {
        let mut changes = shared.routes.subscribe();
        // Counted before the route is read: a hold applied from now on waits for it.
        let running = shared.routes.starting(&client.database);
        let Some(route) = shared.routes.load().route(&client.database) else {
            let message = format!("database \"{}\" does not exist any more", client.database);
            return Err(Unattached::Refused(SqlState::UnknownDatabase, message));
        };
        if route.hold {
            drop(running);
            if !queue {
                return Err(Unattached::Busy);
            }
            if tokio::time::timeout_at(hold_deadline, changes.changed()).await.is_err() {
                let message = format!(
                    "database \"{}\" is switching to a new primary; retry shortly",
                    client.database
                );
                return Err(Unattached::Refused(SqlState::CannotConnectNow, message));
            }
            continue;
        }
        let pool = shared.pools.get(&client.database, route.pool_size);
        // A transaction still waiting for a connection when a hold comes has not started: it
        // waits out the hold with the new ones instead of holding the hold up.
        let acquired = tokio::select! {
            acquired = pool.acquire(shared, want(client, &route, queue)) => acquired,
            () = hold_applied(shared, &mut changes, &client.database) => {
                drop(running);
                continue;
            }
        };
        let mut conn = acquired.map_err(|e| match e {
            AcquireError::Busy { .. } => Unattached::Busy,
            e => Unattached::Refused(acquire_state(&e), e.to_string()),
        })?;
        if stale < 3 && closed(&mut conn).await {
            // The node ended it while it was idle (a restart): so it did the others.
            pool.drop_idle_to(&conn.primary);
            stale += 1;
            continue;
        }
        if let Err(message) = apply_settings(&mut conn, &client.settings, shared).await {
            let message = format!("cannot apply settings: {message}");
            return Err(Unattached::Refused(SqlState::CannotConnectNow, message));
        }
        if aborted {
            // The error is the point: the block is failed, as the client's was.
            let fail = "BEGIN; DO $pgwarden$ BEGIN RAISE EXCEPTION 'transaction lost with its \
                        server connection' USING ERRCODE = '57P01'; END $pgwarden$";
            let limit = shared.limits.backend_auth_timeout();
            let _ = tokio::time::timeout(limit, run_internal(&mut conn, fail)).await;
        }
        return Ok((conn, running));
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

/// Whether an idle connection was closed by its node (or sent something unasked): checked
/// without waiting, before a transaction is written to it (never after: a transaction is
/// never sent twice).
async fn closed(conn: &mut ServerConn) -> bool {
    let mut probe = BytesMut::with_capacity(64);
    let read = conn.stream.read_buf(&mut probe);
    tokio::time::timeout(std::time::Duration::ZERO, read).await.is_ok()
}
