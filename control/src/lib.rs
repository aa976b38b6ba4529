//! `pgwarden`: the control plane of pgwarden, and its command line.
//!
//! Folders by feature and leaf files, each using only those listed before it (the workspace's
//! `tests/layout.rs` checks it):
//! - `files`: private files and directories, blocking file work off the runtime;
//! - `wait`: the one way to wait for a condition, with a deadline;
//! - `httpc`: the bounded HTTP client (proxies' and agents' APIs);
//! - `metrics`: the control plane's own metrics;
//! - `secrets`: passwords, SCRAM verifiers, the sealing key;
//! - `coord`: control planes on several hosts: the etcd connection and the leadership;
//! - `state`: what is kept (database, node and user records, events, operations) in an
//!   embedded crash-safe store (redb) or in etcd, and `Records`: the store with each database's
//!   record lock and its events;
//! - `plans`: the plan catalogue;
//! - `storage`: where backups live;
//! - `nodes`: PostgreSQL nodes: the `NodeDriver` interface and its local implementation, the
//!   configuration written into a node, placement and ports, bounded SQL sessions, and `Nodes`:
//!   what workflows reach nodes with (driver, sessions, CA, ports, engines);
//! - `agent`: node agents on other hosts: their server, the client that drives their nodes,
//!   tunnels to their sockets, fencing by lease;
//! - `failure`: the failures every workflow shares (`Failure`) and what a failed operation
//!   tells its user (`Reportable`: a stable code and a sentence);
//! - `operations`: the one runner of long operations, which records their progress and end;
//! - `routing`: the routing table, its publisher to every proxy, the holds of planned
//!   operations, the users' verifiers kept fresh (`Routing`);
//! - `lifecycle`: provisioning, standbys, destruction;
//! - `ha`: primary-change claims, the watchers, failover, switchover and rejoin (`Ha`);
//! - `pitr`: WAL archiving, base backups, the recoverable window and restores (`Pitr`);
//! - `changes`: plan changes and engine upgrades of a running database (`Changes`);
//! - `backups`: logical backups, their schedule and retention;
//! - `stats`: sampling every node and its history;
//! - `platform`: the composition the API and the server hold: every context above, built once
//!   from the configuration;
//! - `api`: the HTTP API, one file per resource;
//! - `cli`: the client commands of the command line, a client of the API (wire types from
//!   `pgwarden-api` only);
//! - `server`: `pgwarden serve` and `pgwarden up`, recovery at start-up, and the arguments of
//!   the server's own commands (`args.rs`), which the binary puts beside the CLI's.
//!
//! A request flows: `api/` checks the body and the database's state, changes the record under
//! the record lock (never across a node call) or starts an operation (`operations.rs`) that
//! runs a workflow of `lifecycle/`, `ha/`, `changes/`, `backups/` or `pitr/`. A workflow takes
//! the contexts it uses (`Records`, `Nodes`, `Routing`...) or its folder's own (`Ha`,
//! `Changes`, `Pitr`, `Lifecycle`), drives nodes through `nodes/` with bounded calls and
//! publishes a new routing epoch through `routing/`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backups;
pub mod changes;
pub mod cli;
pub mod coord;
pub mod failure;
pub mod files;
pub mod ha;
pub mod httpc;
pub mod lifecycle;
pub mod metrics;
pub mod nodes;
pub mod operations;
pub mod pitr;
pub mod plans;
pub mod platform;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod state;
pub mod stats;
pub mod storage;
pub mod wait;

pub use ha::HealthConfig;
pub use platform::PlatformConfig;
pub use server::{serve, NodeOptions};
