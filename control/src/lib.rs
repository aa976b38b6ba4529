//! `pgwarden`: the control plane of pgwarden.
//!
//! - `server.rs` runs `pgwarden serve`: it opens the data dir (API token, platform CA from the
//!   `certs` crate, the redb state store of `store.rs`), recovers what a previous run left
//!   (`provision::recover`), and serves the HTTP API of `api.rs` (errors in `error.rs`).
//! - `platform.rs` is the shared state; `provision.rs` creates and destroys a database's nodes
//!   through the `driver.rs` interface, implemented for local processes by `local.rs`;
//!   `users.rs` holds the roles and grants of SPEC §5, `secrets.rs` passwords and SCRAM
//!   verifiers, `plans.rs` the catalogue.
//! - `cli.rs` is the `pgwarden` command line (`client.rs` talks to the API); `up.rs` runs
//!   `serve` and `up` (two proxy processes, one database, Ctrl-C stops everything).
//! - `ha.rs` watches replicated databases: failover, synchronous/asynchronous commits, rejoin.
//! - Every change publishes a routing table with a new epoch; `publisher.rs` keeps each proxy
//!   on it over the proxies' admin API (`httpc.rs`).
#![forbid(unsafe_code)]

pub mod api;
pub mod backups;
pub mod cli;
pub mod client;
pub mod driver;
pub mod error;
pub mod ha;
pub mod httpc;
pub mod local;
pub mod metrics;
pub mod pitr;
pub mod plans;
pub mod platform;
pub mod provision;
pub mod publisher;
pub mod records;
pub mod retention;
pub mod secrets;
pub mod server;
pub mod storage;
pub mod store;
pub mod up;
pub mod users;

pub use platform::{HealthConfig, PlatformConfig};
pub use server::{serve, NodeOptions};
