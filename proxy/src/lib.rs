//! `pgwarden-proxy`: a wire-level PostgreSQL proxy.
//!
//! Data flow for one client connection (`session.rs`):
//! 1. `handshake.rs` answers `SSLRequest`/`GSSENCRequest` (TLS from `tls.rs`) and reads the
//!    startup packet or a `CancelRequest` (`protocol.rs` frames and parses it).
//! 2. The database named in the startup packet picks a route in the current snapshot of
//!    `routes.rs`; the proxy connects to that database's primary.
//! 3. `auth.rs` relays the authentication exchange, swapping the node's `BackendKeyData` for a
//!    proxy key registered in `cancel.rs`.
//! 4. `passthrough.rs` copies bytes both ways until a side closes, or until the route's primary
//!    moves or the proxy shuts down, when the client gets a FATAL `57P01` at a message boundary.
//!
//! On the pool address (`pool_listen`), step 3 is the proxy's own SCRAM and steps 4 onwards are
//! `pooled.rs`: each transaction borrows a server connection of its database's pool
//! (`pool.rs`) and gives it back at `ReadyForQuery`.
//!
//! `admission.rs` bounds the connections still starting, per client address and in all, and
//! slows an address's failed logins. `ha.rs` is the active/standby pair: a standby holds no client address until its peer dies.
//! `follow.rs` follows the routing table in etcd and fences the proxy when cut off from it.
//! `admin.rs` serves health, metrics (`metrics.rs`) and the routing table over HTTP;
//! `server.rs` runs the accept loop and graceful shutdown; `config.rs` is `proxy.toml`;
//! `open_files.rs` turns the limit on open files into a session limit; `workers.rs` runs
//! sessions on one single-threaded runtime per CPU. `scram.rs` is SCRAM on both legs;
//! `fuzz.rs` holds the fuzz targets of every parser and the fuzzer that runs them.
#![forbid(unsafe_code)]

mod admin;
mod admission;
mod auth;
mod cancel;
pub mod config;
mod follow;
#[doc(hidden)]
pub mod fuzz;
mod ha;
mod handshake;
mod metrics;
pub mod open_files;
mod passthrough;
mod pool;
mod pooled;
mod protocol;
mod routes;
mod scram;
mod server;
mod session;
mod session_sql;
mod statements;
mod stream;
mod tls;
mod workers;

use std::sync::Arc;

pub use config::Config;
pub use ha::HaConfig;
pub use server::{run, run_on, Listeners};
pub use workers::{WorkerThreads, Workers};

use cancel::CancelMap;
use config::Limits;
use metrics::Metrics;
use routes::RouteStore;
use tls::TlsStore;
use tokio_util::sync::CancellationToken;

/// State shared by every task of one proxy.
pub(crate) struct Shared {
    limits: Limits,
    admission: Arc<admission::Admission>,
    routes: RouteStore,
    /// Transaction pooling's server connections, per database.
    pools: pool::Pools,
    tls: TlsStore,
    cancels: Arc<CancelMap>,
    metrics: Metrics,
    role: ha::Role,
    admin_token: String,
    /// SNI names `<database id>.<domain>` select a database (`Config::domain`).
    domain: Option<String>,
    /// Keys decoy SCRAM exchanges for unknown users (random per process).
    decoy_secret: [u8; 32],
    /// Set when the proxy stops accepting clients.
    draining: CancellationToken,
    /// Set when remaining sessions must end now.
    terminate: CancellationToken,
}
