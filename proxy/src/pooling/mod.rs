//! Transaction pooling (`pool_listen`, the address of `DATABASE_POOL_URL`), client to server:
//!
//! - `session_sql.rs`: what a client's SQL does to its session, read without a parser (what
//!   pins it, the `SET`/`RESET` carried instead, the startup packet's settings);
//! - `statements.rs`: named prepared statements on whichever server connection a client gets,
//!   and the server's answers matched to what the client is owed;
//! - `pool.rs`: each database's server connections, their permits and waiters;
//! - `internal.rs`: what the proxy runs on a server connection for itself (settings, a batch
//!   run again after a stale plan, the check that an idle connection is open);
//! - `session.rs`: a pooled client's session, from its first transaction to its leaving.

mod internal;
pub mod pool;
pub mod session;
pub mod session_sql;
pub mod statements;

pub use pool::Pools;
pub use session::{PooledClient, PooledSession};
