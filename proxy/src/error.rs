//! The one boundary between the proxy's errors and what a client sees.
//!
//! An error a client may be told about implements [`UserFacing`]: its SQLSTATE and the sentence
//! the client reads, written for the client (a database name, a user name, a PostgreSQL
//! message at most: never an address, an OS error or the proxy's own detail, which go to the
//! log through `Display`). A connection refused before its session starts is a [`Refusal`],
//! which also names its metric label; [`refuse`] counts it, logs it and tells the client.

use crate::tenants::Full;
use std::fmt;

use tokio::io::AsyncWriteExt;
use tracing::debug;

use crate::auth::AuthError;
use crate::metrics::{Metrics, Rejection};
use crate::protocol::{self, SqlState};
use crate::scram::ScramError;
use crate::stream::ClientStream;

/// An error with a client's side: what it is told, and with which SQLSTATE.
pub trait UserFacing: fmt::Display {
    fn sqlstate(&self) -> SqlState;
    /// The sentence the client reads: no internal detail (that is `Display`'s, for the log).
    fn client_message(&self) -> String;
}

/// The `ErrorResponse` (severity ERROR: the session goes on) that tells a client `e`.
pub fn error_response(e: &impl UserFacing) -> bytes::BytesMut {
    protocol::error(e.sqlstate(), &e.client_message())
}

/// The `ErrorResponse` (severity FATAL: the connection ends) that tells a client `e`.
pub fn fatal_response(e: &impl UserFacing) -> bytes::BytesMut {
    protocol::fatal(e.sqlstate(), &e.client_message())
}

/// Why a client connection was refused before its session started.
#[derive(Debug)]
pub enum Refusal {
    /// A TLS server name `<id>.<domain>` named no database.
    UnknownId(String),
    UnknownDatabase(String),
    TooManyClients,
    /// The database's own limit (clients at once, or new connections per second).
    DatabaseFull(String, crate::tenants::Full),
    ShuttingDown,
    /// A plaintext client of a database that forces TLS.
    TlsRequired(String),
    /// The pool address, for a database whose users' verifiers the proxy does not have.
    NoVerifiers(String),
    /// The pool address, for a startup packet the pool cannot carry (the reason says why).
    NotPoolable(String),
    /// The database stayed held by a switchover for the whole hold bound.
    HoldTimeout(String),
    /// The primary did not answer.
    NoPrimary(String),
    /// The primary moved every time the session started on it.
    PrimaryMoving(String),
    /// No TLS connection to the node, or one whose certificate did not verify.
    NodeTls(String),
    /// The node's connection broke, or it broke the protocol, during the session's start.
    NodeLost,
    NodeTimeout(String),
    /// The proxy could not log in to the node as the client's user; `Some` node message when
    /// the node itself refused (a PostgreSQL message, the client's to read).
    NodeLogin {
        database: String,
        user: String,
        refused: Option<String>,
    },
    /// A wrong password or an unknown user: the client cannot tell which.
    BadPassword(String),
    /// A user whose password is not a SCRAM verifier.
    NotScram(String),
    ClientScram(ScramError),
    ClientProtocol,
    /// The node refused the session and told the client itself (its ErrorResponse relayed).
    RefusedByNode,
    /// The client did not finish its handshake in time: it is told nothing.
    ClientTimeout,
    /// The client's connection failed: there is no one to tell.
    ClientGone,
}

impl Refusal {
    /// The label of `pgwarden_proxy_connections_rejected_total` that counts it, if any (a
    /// session refused by the node is the node's to count).
    pub fn rejection(&self) -> Option<Rejection> {
        Some(match self {
            Self::UnknownId(_) | Self::UnknownDatabase(_) => Rejection::UnknownDatabase,
            Self::TooManyClients => Rejection::TooManyClients,
            Self::DatabaseFull(_, Full::Clients(_)) => Rejection::DatabaseClients,
            Self::DatabaseFull(_, Full::Rate(_)) => Rejection::DatabaseRate,
            Self::ShuttingDown => Rejection::ShuttingDown,
            Self::TlsRequired(_) => Rejection::TlsRequired,
            Self::NoVerifiers(_) | Self::NotPoolable(_) => Rejection::NotPoolable,
            Self::HoldTimeout(_) => Rejection::HoldTimeout,
            Self::NoPrimary(_) | Self::PrimaryMoving(_) => Rejection::NoPrimary,
            Self::NodeTls(_) => Rejection::NodeTls,
            Self::NodeLost | Self::NodeLogin { .. } => Rejection::NodeLogin,
            Self::NodeTimeout(_) => Rejection::NodeTimeout,
            Self::BadPassword(_) | Self::NotScram(_) => Rejection::BadPassword,
            Self::ClientScram(_) | Self::ClientProtocol => Rejection::Malformed,
            Self::ClientTimeout => Rejection::HandshakeTimeout,
            Self::ClientGone => Rejection::ClientGone,
            Self::RefusedByNode => return None,
        })
    }

    /// Whether the node failed the session's start (worth a warning in the log).
    pub fn node_failed(&self) -> bool {
        matches!(self, Self::NodeLost | Self::NodeTimeout(_) | Self::NodeLogin { .. })
    }

    /// Whether the client is told (not when it is gone, too slow, or the node told it).
    fn tells_client(&self) -> bool {
        !matches!(self, Self::ClientTimeout | Self::ClientGone | Self::RefusedByNode)
    }

    /// What an authentication error of the client `user` of `database` refuses.
    pub fn of_auth(e: AuthError, database: &str, user: &str) -> Refusal {
        let node_login = |refused| Refusal::NodeLogin {
            database: database.to_owned(),
            user: user.to_owned(),
            refused,
        };
        match e {
            AuthError::Client(_) => Refusal::ClientGone,
            AuthError::ClientTimeout => Refusal::ClientTimeout,
            AuthError::ClientProtocol => Refusal::ClientProtocol,
            AuthError::BadPassword(user) => Refusal::BadPassword(user),
            AuthError::NotScram(user) => Refusal::NotScram(user),
            AuthError::ClientScram(e) => Refusal::ClientScram(e),
            AuthError::Refused => Refusal::RefusedByNode,
            AuthError::Node(_) | AuthError::NodeProtocol => Refusal::NodeLost,
            AuthError::NodeTimeout => Refusal::NodeTimeout(database.to_owned()),
            AuthError::NodeRefused { message, .. } => node_login(Some(message)),
            AuthError::NodeScram(_) | AuthError::NodeMethod(_) => node_login(None),
        }
    }
}

impl fmt::Display for Refusal {
    /// For the log: what the client is told, or why it is told nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RefusedByNode => f.write_str("the node refused the session"),
            Self::ClientTimeout => f.write_str("the client did not answer in time"),
            Self::ClientGone => f.write_str("the client's connection failed"),
            _ => f.write_str(&self.client_message()),
        }
    }
}

impl UserFacing for Refusal {
    fn sqlstate(&self) -> SqlState {
        match self {
            Self::UnknownId(_) | Self::UnknownDatabase(_) => SqlState::UnknownDatabase,
            Self::TooManyClients | Self::DatabaseFull(..) => SqlState::TooManyConnections,
            Self::TlsRequired(_) | Self::NoVerifiers(_) | Self::NotScram(_) => {
                SqlState::InvalidAuthorization
            }
            Self::NotPoolable(_) => SqlState::FeatureNotSupported,
            Self::BadPassword(_) => SqlState::InvalidPassword,
            Self::ClientScram(_) | Self::ClientProtocol => SqlState::ProtocolViolation,
            Self::ShuttingDown
            | Self::HoldTimeout(_)
            | Self::NoPrimary(_)
            | Self::PrimaryMoving(_)
            | Self::NodeTls(_)
            | Self::NodeLost
            | Self::NodeTimeout(_)
            | Self::NodeLogin { .. }
            | Self::RefusedByNode
            | Self::ClientTimeout
            | Self::ClientGone => SqlState::CannotConnectNow,
        }
    }

    fn client_message(&self) -> String {
        match self {
            Self::UnknownId(id) => {
                format!("database with id \"{id}\" (TLS server name) does not exist")
            }
            Self::UnknownDatabase(db) => format!("database \"{db}\" does not exist"),
            Self::TooManyClients => "sorry, too many clients already".into(),
            Self::DatabaseFull(db, Full::Clients(max)) => format!(
                "too many connections to database \"{db}\": it takes at most {max} {} at once",
                if *max == 1 { "client" } else { "clients" }
            ),
            Self::DatabaseFull(db, Full::Rate(rate)) => format!(
                "too many new connections to database \"{db}\": it takes at most {rate} per \
                 second; retry shortly"
            ),
            Self::ShuttingDown => "the proxy is shutting down".into(),
            Self::TlsRequired(db) => {
                format!("TLS is required for database \"{db}\": connect with sslmode=require")
            }
            Self::NoVerifiers(db) => format!(
                "database \"{db}\" cannot be pooled: the proxy does not have its users' verifiers"
            ),
            Self::NotPoolable(reason) => format!("this connection cannot be pooled: {reason}"),
            Self::HoldTimeout(db) => {
                format!("database \"{db}\" is switching to a new primary; retry shortly")
            }
            Self::NoPrimary(db) => {
                format!("no primary is reachable for database \"{db}\" right now; retry shortly")
            }
            Self::PrimaryMoving(db) => format!("the primary of database \"{db}\" is moving; retry"),
            Self::NodeTls(db) => format!(
                "the proxy could not open a verified TLS connection to the database node of \
                 \"{db}\""
            ),
            Self::NodeLost => "lost connection to the database node during authentication".into(),
            Self::NodeTimeout(db) => {
                format!("the database node of \"{db}\" did not answer in time; retry shortly")
            }
            Self::NodeLogin { database, user, refused } => {
                let mut message = format!(
                    "the proxy could not log in to the database node of \"{database}\" as \
                     \"{user}\""
                );
                if let Some(refused) = refused {
                    message.push_str(": ");
                    message.push_str(refused);
                }
                message
            }
            Self::BadPassword(user) => {
                format!("password authentication failed for user \"{user}\"")
            }
            Self::NotScram(user) => format!(
                "user \"{user}\" has a password the proxy cannot check: set it again with \
                 password_encryption = 'scram-sha-256' (MD5 passwords are not supported)"
            ),
            Self::ClientScram(e) => format!("SCRAM authentication failed: {e}"),
            Self::ClientProtocol => "invalid authentication message from the client".into(),
            Self::RefusedByNode | Self::ClientTimeout | Self::ClientGone => String::new(),
        }
    }
}

/// Why the proxy ended a session, or a pooled client's transaction (`57P01`: run it again).
#[derive(Debug)]
pub enum Ended {
    /// The database's primary moved: a session must not go on writing to the old one.
    PrimaryMoved(String),
    /// The proxy lost touch with etcd and cannot vouch for the database's primary.
    Fenced(String),
    Shutdown,
    /// A pinned pooled client's server connection was lost, and its session state with it.
    PinLost,
    /// A pooled transaction lost its server connection; the client's connection stays.
    TransactionLost,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.client_message())
    }
}

impl UserFacing for Ended {
    fn sqlstate(&self) -> SqlState {
        SqlState::AdminShutdown
    }

    fn client_message(&self) -> String {
        match self {
            Self::PrimaryMoved(db) => format!(
                "terminating connection because the primary of database \"{db}\" moved; \
                 reconnect to reach the new primary"
            ),
            Self::Fenced(db) => format!(
                "terminating connection because the proxy lost touch with etcd and cannot \
                 vouch for the primary of database \"{db}\"; reconnect"
            ),
            Self::Shutdown => "terminating connection because the proxy is shutting down".into(),
            Self::PinLost => "terminating connection because its server connection was lost \
                              (the primary failed or moved) and its session state with it"
                .into(),
            Self::TransactionLost => "the transaction was ended because the connection to the \
                                      primary was lost (the primary failed, moved, or restarted \
                                      and the transaction outlived the wait for it): run it again"
                .into(),
        }
    }
}

/// Counts `refusal`, logs it, and tells the client (a FATAL, then the connection closes), best
/// effort.
pub async fn refuse(stream: &mut ClientStream, metrics: &Metrics, refusal: Refusal) {
    if let Some(rejection) = refusal.rejection() {
        metrics.rejected(rejection);
    }
    debug!(reason = %refusal, "connection refused");
    if refusal.tells_client() {
        close_with(stream, &refusal).await;
    }
}

/// Sends `e` as a FATAL error and closes the connection, best effort.
pub async fn close_with(stream: &mut ClientStream, e: &impl UserFacing) {
    let _ = stream.write_all(&fatal_response(e)).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_login_error_tells_the_node_s_refusal_and_nothing_of_the_proxy_s_detail() {
        let refused = AuthError::NodeRefused {
            code: "53300".into(),
            message: "too many connections for role \"app\"".into(),
        };
        let told = Refusal::of_auth(refused, "app", "app").client_message();
        assert!(told.ends_with(": too many connections for role \"app\""), "{told}");
        let scram = AuthError::NodeScram(ScramError::StaleVerifier);
        let told = Refusal::of_auth(scram, "app", "app").client_message();
        assert!(!told.contains("verifier"), "{told}");
        let lost =
            AuthError::Node(std::io::Error::other("Connection reset by peer (os error 104)"));
        let told = Refusal::of_auth(lost, "app", "app").client_message();
        assert!(!told.contains("os error"), "{told}");
    }

    #[test]
    fn silent_refusals_are_counted_but_tell_nothing() {
        for silent in [Refusal::ClientGone, Refusal::ClientTimeout] {
            assert!(silent.rejection().is_some());
            assert!(!silent.tells_client());
        }
        assert!(Refusal::RefusedByNode.rejection().is_none());
        assert_eq!(Refusal::UnknownDatabase("x".into()).sqlstate().code(), "3D000");
    }
}
