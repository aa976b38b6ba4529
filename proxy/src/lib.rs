//! `pgwarden-proxy`: a wire-level PostgreSQL proxy.
//!
//! Data flow for one client connection (`session.rs`), in phases with typed results:
//! 1. handshake: `handshake.rs` answers `SSLRequest`/`GSSENCRequest` (TLS from `tls.rs`) and
//!    reads the startup packet or a `CancelRequest`;
//! 2. route: the database named in the startup packet (or the TLS server name) picks a route
//!    in the current snapshot of `routes.rs`;
//! 3. authenticate: `auth.rs` runs the client's SCRAM against the route's verifiers (or relays
//!    the exchange to the node);
//! 4. connect: `node.rs` opens the connection to the primary, `auth.rs` logs in to it and swaps
//!    the node's `BackendKeyData` for a proxy key registered in `cancel.rs`;
//! 5. relay: `passthrough.rs` copies bytes both ways until a side closes, or until the route's
//!    primary moves or the proxy shuts down, when the client gets a FATAL `57P01` at a message
//!    boundary.
//!
//! On the pool address (`pool_listen`), steps 4 and 5 are `pooling/`: each transaction
//! borrows a server connection of its database's pool and gives it back at `ReadyForQuery`.
//! Every refusal and every error a client reads goes through `error.rs`.
//!
//! Modules, each using only those listed before it (the workspace's `tests/layout.rs` checks it):
//! - `protocol`: the wire format: framing, message tags, the messages the proxy writes;
//! - `metrics`: every metric and its closed label sets;
//! - `scram`: SCRAM-SHA-256 on both legs;
//! - `config`: `proxy.toml`;
//! - `open_files`: the limit on open files as a session limit;
//! - `stream`: client and node streams, plain or TLS;
//! - `tls`: the client-facing certificate, re-read on SIGHUP;
//! - `tenants`: bounds per database on clients and new connections per second;
//! - `routes`: the routing table and its hot swap;
//! - `node`: connections to nodes (TCP, verified TLS);
//! - `cancel`: cancel keys and forwarding cancel requests to nodes;
//! - `auth`: authentication of clients and logins to nodes;
//! - `error`: what a client is told, with which SQLSTATE and metric label;
//! - `admission`: bounds on connections still starting, per address and in all;
//! - `handshake`: the connection start, up to a startup packet or a cancel request;
//! - `passthrough`: the byte pump of an established session;
//! - `pooling`: transaction pooling;
//! - `session`: one client connection, phase by phase;
//! - `ha`: the active/standby pair;
//! - `admin`: health, metrics and the routing table over HTTP;
//! - `follow`: following the routing table in etcd, fencing when cut off from it;
//! - `workers`: one single-threaded runtime per CPU;
//! - `server`: the accept loops and graceful shutdown;
//! - `fuzz`: fuzz targets of every parser, and the fuzzer that runs them.
#![forbid(unsafe_code)]

mod admin;
mod admission;
mod auth;
mod cancel;
pub mod config;
mod error;
mod follow;
#[doc(hidden)]
pub mod fuzz;
mod ha;
mod handshake;
mod metrics;
mod node;
pub mod open_files;
mod passthrough;
mod pooling;
mod protocol;
mod routes;
mod scram;
mod server;
mod session;
mod stream;
mod tenants;
mod tls;
mod workers;

use std::sync::Arc;

pub use config::Config;
pub use config::HaConfig;
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
    /// Each database's clients and new connections, against its limits.
    tenants: Arc<tenants::Tenants>,
    routes: RouteStore,
    /// Transaction pooling's server connections, per database.
    pools: pooling::Pools,
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
