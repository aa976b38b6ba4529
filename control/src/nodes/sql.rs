//! SQL sessions the control plane opens on its nodes, every one bounded in time.
//!
//! A frozen postmaster accepts a socket connection and never answers, and a frozen backend never
//! finishes a statement: so opening a session and every statement run through [`Session`] have a
//! client-side deadline, and the node itself is told to give up (`statement_timeout`,
//! `lock_timeout`) when the control plane stopped waiting.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

/// How long opening a session and running one statement may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub statement: Duration,
}

impl Timeouts {
    /// For API calls and operations: a node that does not answer within this is unreachable.
    pub const DEFAULT: Timeouts =
        Timeouts { connect: Duration::from_secs(3), statement: Duration::from_secs(30) };

    /// Both bounds at `limit` (health checks).
    pub fn within(limit: Duration) -> Self {
        Self { connect: limit, statement: limit }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("node {node} cannot be reached: {source}")]
    Connect { node: String, source: tokio_postgres::Error },
    #[error("node {node} did not answer within {} ms", .after.as_millis())]
    Timeout { node: String, after: Duration },
    #[error("SQL failed on node {node}: {source}")]
    Query { node: String, source: tokio_postgres::Error },
    #[error("node {node} cannot be reached through its agent: {reason}")]
    Unreachable { node: String, reason: String },
}

impl SqlError {
    /// The node did not answer (as opposed to answering with an error).
    pub fn unreachable(&self) -> bool {
        match self {
            SqlError::Connect { .. } | SqlError::Timeout { .. } | SqlError::Unreachable { .. } => {
                true
            }
            SqlError::Query { source, .. } => source.is_closed() || source.code().is_none(),
        }
    }
}

/// A superuser session on one node.
pub struct Session {
    node: String,
    client: tokio_postgres::Client,
    timeouts: Timeouts,
    /// The queries it prepared, by their text: a kept session (`kept.rs`) runs the same few
    /// again and again, and a prepared one is parsed and planned once, not at every run.
    prepared: Mutex<HashMap<String, Statement>>,
}

impl Session {
    /// Opens a session on `node` (its name, for errors) with `conninfo`.
    pub async fn open(node: &str, conninfo: &str, timeouts: Timeouts) -> Result<Self, SqlError> {
        let connect_error = |source| SqlError::Connect { node: node.to_owned(), source };
        let mut config: tokio_postgres::Config = conninfo.parse().map_err(connect_error)?;
        let connecting = Self::bounded_config(&mut config, timeouts).connect(NoTls);
        let (client, connection) = tokio::time::timeout(timeouts.connect, connecting)
            .await
            .map_err(|_| SqlError::Timeout { node: node.to_owned(), after: timeouts.connect })?
            .map_err(connect_error)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self::new(node, client, timeouts))
    }

    fn new(node: &str, client: tokio_postgres::Client, timeouts: Timeouts) -> Self {
        Self { node: node.to_owned(), client, timeouts, prepared: Mutex::default() }
    }

    /// Opens a superuser session on `database` of `node` over `stream`, a byte stream to the
    /// node's socket (its agent's SQL tunnel).
    pub async fn open_over<S>(
        node: &str,
        stream: S,
        database: &str,
        timeouts: Timeouts,
    ) -> Result<Self, SqlError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = tokio_postgres::Config::new();
        config.user("postgres").dbname(database);
        let connecting = Self::bounded_config(&mut config, timeouts).connect_raw(stream, NoTls);
        let (client, connection) = tokio::time::timeout(timeouts.connect, connecting)
            .await
            .map_err(|_| SqlError::Timeout { node: node.to_owned(), after: timeouts.connect })?
            .map_err(|source| SqlError::Connect { node: node.to_owned(), source })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self::new(node, client, timeouts))
    }

    /// Statements and lock waits bounded by `timeouts.statement`.
    fn bounded_config(
        config: &mut tokio_postgres::Config,
        timeouts: Timeouts,
    ) -> &mut tokio_postgres::Config {
        let ms = timeouts.statement.as_millis().max(1);
        config
            .connect_timeout(timeouts.connect)
            .options(format!("-c statement_timeout={ms} -c lock_timeout={ms}"))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, SqlError> {
        let after = self.timeouts.statement;
        tokio::time::timeout(after, work)
            .await
            .map_err(|_| SqlError::Timeout { node: self.node.clone(), after })?
            .map_err(|source| SqlError::Query { node: self.node.clone(), source })
    }

    pub async fn batch_execute(&self, sql: &str) -> Result<(), SqlError> {
        self.bounded(self.client.batch_execute(sql)).await
    }

    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, SqlError> {
        self.bounded(self.client.execute(sql, params)).await
    }

    /// `sql` prepared on this session: once, the first time it runs here.
    async fn prepared(&self, sql: &str) -> Result<Statement, SqlError> {
        let known = self.prepared.lock().unwrap_or_else(PoisonError::into_inner).get(sql).cloned();
        if let Some(statement) = known {
            return Ok(statement);
        }
        let statement = self.bounded(self.client.prepare(sql)).await?;
        let mut prepared = self.prepared.lock().unwrap_or_else(PoisonError::into_inner);
        prepared.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, SqlError> {
        let statement = self.prepared(sql).await?;
        self.bounded(self.client.query(&statement, params)).await
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, SqlError> {
        let statement = self.prepared(sql).await?;
        self.bounded(self.client.query_one(&statement, params)).await
    }

    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, SqlError> {
        let statement = self.prepared(sql).await?;
        self.bounded(self.client.query_opt(&statement, params)).await
    }
}
