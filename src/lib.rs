//! End-to-end harness for `tests/` and `benches/`: real PostgreSQL 15 nodes started from this
//! process, a real pgwarden proxy, and the real clients (`psql`, `pgbench`).
//!
//! - `node.rs`: [`PgNode`], a PostgreSQL server in a temp dir on a free port, run as an
//!   unprivileged OS user when the tests run as root.
//! - `proxy.rs`: [`TestProxy`], the proxy started in-process on `127.0.0.1:0`.
//! - `control.rs`: [`TestControl`], the control plane in-process, publishing to a proxy.
//! - `etcd.rs`: [`TestEtcd`], a real etcd cluster on loopback addresses.
//! - `planes.rs`: [`TestPlanes`], control planes on etcd as processes, with agents and a proxy.
//! - `relay.rs`: [`Relay`], a TCP link the tests can cut (a partition on loopback).
//! - `netns.rs`: [`Lan`], hosts in network namespaces on a bridge; `hosts.rs`: [`TestHosts`],
//!   the whole multi-host platform in them; `patroni.rs`: [`PatroniHosts`], Patroni and
//!   HAProxy in them, for the side-by-side failover benchmark.
//! - `http.rs`: a minimal HTTP/1.1 client for admin APIs.
//! - `load.rs`: writer and connector load generators for HA tests and benchmarks.
//! - `clients.rs`: `psql` and `pgbench` runners.
//! - `tls.rs`: a rustls client for raw protocol tests over TLS.
//! - `browser.rs`: [`Browser`], headless Chromium through ChromeDriver (WebDriver).
//! - `wait.rs`: [`wait_until`], the one way tests wait for a condition.
#![forbid(unsafe_code)]

mod browser;
mod clients;
mod control;
mod etcd;
mod hosts;
mod http;
mod load;
mod netns;
mod node;
mod patroni;
mod planes;
mod proxy;
mod relay;
mod tls;
mod wait;

pub use browser::{Browser, Element};
pub use clients::{
    assert_cancel_reaches_the_backend, pg_bin, psql, until_ok, wait_running, ClientOutput,
};
pub use control::TestControl;
pub use etcd::TestEtcd;
pub use hosts::{TestHosts, DB_HOSTS};
pub use http::{http_request, http_request_within, HttpResponse};
pub use load::{assert_no_failed, lost_writes, median_max, Ack, Connector, Writer};
pub use netns::Lan;
pub use node::{
    free_port, kill_postmaster, node_data_dirs, node_port_block, postmaster_pid, stop_immediately,
    NodeOptions, PgNode, TEST_PASSWORD,
};
pub use patroni::{PatroniHosts, PATRONI_HOSTS};
pub use planes::{live_processes, TestPlanes};
pub use proxy::{plain_route, TestCerts, TestProxy};
pub use relay::Relay;
pub use tls::{connect_with_binding, tls_connect};
pub use wait::{
    let_time_pass, until_blocking_every, wait_psql, wait_until, wait_until_blocking,
    wait_until_every,
};

/// The engines directory `scripts/setup.sh` fills (`PGWARDEN_ENGINES_DIR`, else
/// `/var/cache/pgwarden/engines` for root and `~/.cache/pgwarden/engines` for others), if the
/// PostgreSQL 15.17 server build is there.
pub fn engines_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let dir = std::env::var_os("PGWARDEN_ENGINES_DIR").map(PathBuf::from).unwrap_or_else(|| {
        if rustix::process::geteuid().is_root() {
            PathBuf::from("/var/cache/pgwarden/engines")
        } else {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/pgwarden/engines")
        }
    });
    dir.join("15.17/bin/postgres").exists().then_some(dir)
}

/// Path of a workspace binary (`pgwarden`, `pgwarden-proxy`) built next to the running test.
/// Cargo builds them for the `control/` and `proxy/` crates' own CLI tests.
/// The release `pgwarden-proxy` as a process of its own (benchmarks), configured by `toml`
/// (written to `proxy.toml` in `dir`), logging errors only.
pub fn spawn_release_proxy(dir: &std::path::Path, toml: &str) -> std::process::Child {
    let config = dir.join("proxy.toml");
    std::fs::write(&config, toml).expect("write proxy.toml");
    std::process::Command::new(workspace_bin("pgwarden-proxy"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "error")
        .spawn()
        .expect("pgwarden-proxy (cargo build --release -p pgwarden-proxy)")
}

pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo nextest run --workspace`",
        path.display()
    );
    path
}
