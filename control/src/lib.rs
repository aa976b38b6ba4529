//! `pgwarden`: the control plane of pgwarden, and its command line.
//!
//! Folders by feature, each depending only on those listed before it:
//!
//! - `coord/`: control planes on several hosts: the etcd connection and the leadership.
//! - `state/`: what is kept: database, node and user records, events, operations, in an
//!   embedded crash-safe store (redb) or in etcd.
//! - `nodes/`: PostgreSQL nodes: the `NodeDriver` interface and its local implementation, the
//!   configuration written into a node (with the quoting rules of config files and connection
//!   strings), ports, and SQL sessions bounded in time.
//! - `failure.rs`: the failures every workflow shares (`Failure`) and what a failed operation
//!   tells its user (`Reportable`: a stable code and a sentence).
//! - `routing/`: the routing table and the publisher that pushes it to every proxy.
//! - `platform/`: the handles workflows share (store, driver, CA, publisher, holds, storage),
//!   the record lock, the primary-change claims, and the one operation runner.
//! - `lifecycle/`: provisioning, standbys, destruction, and recovery at start-up.
//! - `ha/`: the watchers, failover, switchover and rejoin.
//! - `changes/`: plan changes of a running database (rolling, with holds and a switchover).
//! - `backups/`: logical backups, their schedule and retention.
//! - `pitr/`: WAL archiving, base backups, the recoverable window and restores.
//! - `api/`: the HTTP API, one file per resource.
//! - `server/`: `pgwarden serve` and `pgwarden up`, and the arguments of the server's own
//!   commands (`args.rs`).
//! - `cli/`: the client commands of the command line, a client of the API (wire types from
//!   `pgwarden-api` only); the binary puts them beside the server's.
//!
//! Leaves used by several: `plans.rs` (catalogue), `secrets.rs` (passwords, SCRAM verifiers),
//! `files.rs` (private files), `storage.rs` (where backups live), `httpc.rs` (bounded HTTP
//! client), `metrics.rs`, `wait.rs` (the one way to wait for a condition).
//!
//! A request flows: `api/` checks the body and the database's state, changes the record under
//! the record lock (never across a node call) or starts an operation (`platform/operations.rs`)
//! that runs a workflow of `lifecycle/`, `ha/`, `backups/` or `pitr/`; workflows drive nodes
//! through `nodes/` with bounded calls and publish a new routing epoch through `routing/`.
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

pub use platform::{HealthConfig, PlatformConfig};
pub use server::{serve, NodeOptions};
