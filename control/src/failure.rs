//! What a failed workflow tells, and the failures every workflow shares.
//!
//! A long operation's failure is kept (and shown by the API, the CLI and the dashboard) as a
//! stable code and a sentence for the user ([`Reportable`]); the whole detail, `Display`, goes
//! to the log. [`Failure`] holds what any workflow can meet (a node, the store, a record that
//! vanished, a database without a primary, a program that failed); each feature's error wraps
//! it (`Core`) beside the variants that are its own.

use std::fmt;

use crate::nodes::config::ConfigError;
use crate::nodes::sql::SqlError;
use crate::nodes::{DriverError, NodeError};
use crate::state::StoreError;

/// An error a user is told about: a stable code and a sentence with no internal detail (no
/// OS error, no address a user cannot act on); `Display` keeps the detail for the log.
pub trait Reportable: fmt::Display {
    /// A stable `snake_case` code.
    fn code(&self) -> &'static str;
    /// What the user reads.
    fn sentence(&self) -> String {
        self.to_string()
    }
}

/// The failures every workflow can meet.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database {0} vanished")]
    Vanished(String),
    #[error("database {0} has no primary")]
    NoPrimary(String),
    /// A program failed; `sentence` is for users, its output went to the log.
    #[error("{what} failed: {sentence}")]
    Program { what: &'static str, sentence: String },
}

impl From<SqlError> for Failure {
    fn from(e: SqlError) -> Self {
        Failure::Node(e.into())
    }
}

impl From<DriverError> for Failure {
    fn from(e: DriverError) -> Self {
        Failure::Node(e.into())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Node(e.into())
    }
}

impl Reportable for Failure {
    fn code(&self) -> &'static str {
        match self {
            Failure::Node(NodeError::Sql(e)) if e.unreachable() => "node_unreachable",
            Failure::Node(NodeError::Sql(_)) => "node_sql_failed",
            Failure::Node(NodeError::Driver(e)) => e.code(),
            Failure::Node(NodeError::Config(_)) => "node_config_failed",
            Failure::Node(NodeError::Interrupted(_)) => "interrupted",
            Failure::Store(StoreError::NotLeader(_)) => "not_leader",
            Failure::Store(_) => "store_failed",
            Failure::Vanished(_) => "vanished",
            Failure::NoPrimary(_) => "no_primary",
            Failure::Program { .. } => "program_failed",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Failure::Node(NodeError::Sql(e)) => e.sentence(),
            Failure::Node(NodeError::Driver(e)) => e.sentence(),
            Failure::Node(NodeError::Config(ConfigError::UnknownPlan(plan))) => {
                format!("unknown plan {plan}")
            }
            Failure::Node(NodeError::Config(ConfigError::Certificate(_))) => {
                "cannot issue the node's certificate; see the control plane's log".into()
            }
            Failure::Node(NodeError::Interrupted(_)) => {
                "the node's work was interrupted; see the control plane's log".into()
            }
            Failure::Store(StoreError::NotLeader(_)) => {
                "this control plane stopped leading; the new leader takes over".into()
            }
            Failure::Store(_) => "the state store failed; see the control plane's log".into(),
            other => other.to_string(),
        }
    }
}

impl DriverError {
    fn code(&self) -> &'static str {
        match self {
            DriverError::Command { .. } => "program_failed",
            DriverError::Io(_) => "io_failed",
            DriverError::NotInstalled(_) => "not_installed",
            DriverError::OsUser { .. } => "os_user",
            DriverError::NotStarted { .. } => "node_not_started",
            DriverError::RewoundNotStarted(_) | DriverError::RemoteRewind(_) => "needs_fresh_copy",
            DriverError::NoAgent(_) => "no_agent",
            DriverError::NotLeading => "not_leader",
            DriverError::AgentUnreachable { .. } => "agent_unreachable",
            DriverError::AgentRefused { .. } => "agent_refused",
            DriverError::Transfer { .. } => "transfer_failed",
            DriverError::Encoding(_) | DriverError::Incomplete { .. } => "internal",
            DriverError::Interrupted(_) => "interrupted",
        }
    }

    fn sentence(&self) -> String {
        match self {
            DriverError::Io(_)
            | DriverError::Encoding(_)
            | DriverError::Incomplete { .. }
            | DriverError::Interrupted(_) => {
                "a node operation failed; see the control plane's log".into()
            }
            DriverError::AgentUnreachable { agent, .. } => {
                format!("agent {agent} cannot be reached")
            }
            other => other.to_string(),
        }
    }
}

impl SqlError {
    fn sentence(&self) -> String {
        match self {
            SqlError::Connect { node, .. } | SqlError::Unreachable { node, .. } => {
                format!("node {node} cannot be reached")
            }
            SqlError::Timeout { .. } => self.to_string(),
            // PostgreSQL's own message is the user's to read; a broken connection is not.
            SqlError::Query { node, source } => match source.as_db_error() {
                Some(db) => format!("SQL failed on node {node}: {}", db.message()),
                None => format!("node {node} cannot be reached"),
            },
        }
    }
}

/// A failure already reported elsewhere (a backup's record), carried as its code and sentence.
#[derive(Debug)]
pub struct Reported {
    pub code: &'static str,
    pub sentence: String,
}

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sentence)
    }
}

impl Reportable for Reported {
    fn code(&self) -> &'static str {
        self.code
    }
}

/// `From` the node and store errors (through [`Failure`]) for a feature's error with a
/// `Core(Failure)` variant: the variants live once, in `Failure`; this only routes `?`.
macro_rules! wraps_failure {
    ($target:ident) => {
        impl From<$crate::nodes::NodeError> for $target {
            fn from(e: $crate::nodes::NodeError) -> Self {
                $target::Core(e.into())
            }
        }
        impl From<$crate::state::StoreError> for $target {
            fn from(e: $crate::state::StoreError) -> Self {
                $target::Core(e.into())
            }
        }
        impl From<$crate::nodes::sql::SqlError> for $target {
            fn from(e: $crate::nodes::sql::SqlError) -> Self {
                $target::Core(e.into())
            }
        }
        impl From<$crate::nodes::DriverError> for $target {
            fn from(e: $crate::nodes::DriverError) -> Self {
                $target::Core(e.into())
            }
        }
        impl From<$crate::nodes::config::ConfigError> for $target {
            fn from(e: $crate::nodes::config::ConfigError) -> Self {
                $target::Core(e.into())
            }
        }
    };
}
pub(crate) use wraps_failure;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_tells_the_user_no_os_error_and_keeps_it_for_the_log() {
        let io = std::io::Error::other("Permission denied (os error 13)");
        let failed = Failure::Node(NodeError::Driver(DriverError::Io(io)));
        assert_eq!(failed.code(), "io_failed");
        assert!(!failed.sentence().contains("os error"), "{}", failed.sentence());
        assert!(failed.to_string().contains("os error 13"), "the log keeps it: {failed}");
        let unreachable =
            SqlError::Unreachable { node: "db-1".into(), reason: "tunnel: reset".into() };
        let failed = Failure::from(unreachable);
        assert_eq!(failed.code(), "node_unreachable");
        assert_eq!(failed.sentence(), "node db-1 cannot be reached");
        let program = Failure::Program { what: "pg_dump", sentence: "disk full".into() };
        assert_eq!(
            (program.code(), program.sentence().as_str()),
            ("program_failed", "pg_dump failed: disk full")
        );
    }
}
