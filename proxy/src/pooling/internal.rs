//! What the proxy runs on a server connection for itself, outside any client's transaction:
//! the client's settings, a statement batch run again after a stale plan, the check that an
//! idle connection is still open. Each is bounded in time.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pool::ServerConn;
use super::statements::Statements;
use crate::protocol::tag::backend;
use crate::protocol::{self, HEADER};

/// A stale plan: the connection's statements go, and the client's batch runs again on
/// statements prepared anew.
pub(super) async fn run_again(statements: &mut Statements, conn: &mut ServerConn, limit: Duration) {
    let again = statements.take_rerun(&mut conn.statements);
    if run_internal(conn, "DEALLOCATE ALL", limit).await.is_err() {
        return;
    }
    let mut to_server = BytesMut::new();
    let mut rest = &again[..];
    while let Some((_, len)) = protocol::frame(rest) {
        if statements.client_message(&rest[..len], &mut conn.statements, &mut to_server).is_err() {
            break;
        }
        rest = &rest[len..];
    }
    let _ = conn.stream.write_all(&to_server).await;
}

/// Sets `settings` on `conn` where it differs (and resets what an earlier client set and this
/// one does not), in one round trip.
pub(super) async fn apply_settings(
    conn: &mut ServerConn,
    settings: &[(String, String)],
    limit: Duration,
) -> Result<(), InternalQueryError> {
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
    run_internal(conn, &sql, limit).await?;
    for name in stale {
        conn.applied.remove(&name);
    }
    for (name, value) in settings {
        conn.applied.insert(name.clone(), value.clone());
    }
    Ok(())
}

/// Why a statement the proxy ran for itself on a server connection failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum InternalQueryError {
    /// The server's `ErrorResponse` message (a PostgreSQL message: the client may read it).
    #[error("the server answered: {0}")]
    Server(String),
    #[error("the database node did not answer in time")]
    Timeout,
    #[error("the database node closed the connection")]
    Closed,
    #[error("the connection to the database node failed: {0}")]
    Io(#[from] std::io::Error),
}

impl InternalQueryError {
    /// What a client may read of it.
    pub(super) fn told(&self) -> &str {
        match self {
            Self::Server(message) => message,
            Self::Timeout => "the database node did not answer in time",
            Self::Closed | Self::Io(_) => "the connection to the database node was lost",
        }
    }
}

/// Runs `sql` on `conn` for the proxy itself, within `limit`: `ParameterStatus` changes are
/// recorded, an error is returned with the server's message.
pub(super) async fn run_internal(
    conn: &mut ServerConn,
    sql: &str,
    limit: Duration,
) -> Result<(), InternalQueryError> {
    let ran = async {
        conn.stream.write_all(&protocol::query(sql)).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut error = None;
        loop {
            while let Some((tag, len)) = protocol::frame(&buf) {
                let message = buf.split_to(len);
                let body = &message[HEADER..];
                match tag {
                    backend::READY_FOR_QUERY => return error.map_or(Ok(()), Err),
                    backend::ERROR_RESPONSE => {
                        let text = protocol::error_field(body, protocol::field::MESSAGE)
                            .map_or_else(|| "error".into(), |m| String::from_utf8_lossy(m).into());
                        error = Some(InternalQueryError::Server(text));
                    }
                    backend::PARAMETER_STATUS => record_parameter(&mut conn.params, body),
                    _ => {}
                }
            }
            if conn.stream.read_buf(&mut buf).await? == 0 {
                return Err(InternalQueryError::Closed);
            }
        }
    };
    tokio::time::timeout(limit, ran).await.unwrap_or(Err(InternalQueryError::Timeout))
}

pub(super) fn record_parameter(params: &mut Vec<(String, String)>, body: &[u8]) {
    let Some((name, value)) = protocol::parameter(body) else { return };
    match params.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = value,
        None => params.push((name, value)),
    }
}

/// Whether an idle connection was closed by its node (or sent something unasked): checked
/// without waiting, before a transaction is written to it (never after: a transaction is
/// never sent twice).
pub(super) async fn closed(conn: &mut ServerConn) -> bool {
    let mut probe = BytesMut::with_capacity(64);
    let read = conn.stream.read_buf(&mut probe);
    tokio::time::timeout(std::time::Duration::ZERO, read).await.is_ok()
}
