//! A proxy with many routes: what a one-database change costs it, and what a route costs in
//! memory.
//!
//!   cargo build --release -p pgwarden-proxy && cargo bench --bench routes -- [routes=10000] [changes=1000]
//!
//! Runs the release `pgwarden-proxy` as its own process and gives it a table of `routes`
//! synthetic databases shaped as the control plane publishes them (a primary and a standby, an
//! id, one user with a SCRAM verifier, a pool size, limits). Then, through its admin API and
//! timed from the request to the answer: the whole table (`PUT`), `changes` one-database changes
//! (`PATCH`, the primary of a database picked at random moves), and for comparison the same
//! change sent as a whole table. Also the proxy's resident memory with no route and with all.

use std::time::{Duration, Instant};

use base64::Engine;
use pgwarden_e2e::{free_port, http_request_within, spawn_release_proxy};
use serde_json::{json, Value};

fn route(i: usize, port: u16) -> Value {
    let b64 = |n: usize, seed: usize| {
        let bytes: Vec<u8> = (0..n).map(|k| (k * 31 + seed * 7) as u8).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let verifier =
        format!("SCRAM-SHA-256$4096:{}${}:{}", b64(16, i), b64(32, i + 1), b64(32, i + 2));
    json!({
        "primary": format!("10.0.{}.{}:{port}", i / 250, i % 250 + 1),
        "replicas": [format!("10.1.{}.{}:5432", i / 250, i % 250 + 1)],
        "id": format!("app-{i:05}"),
        "users": {format!("app_{i:05}"): verifier},
        "pool_size": 20,
        "client_connections": 300,
        "connections_per_second": 60,
    })
}

/// The proxy, killed when the bench ends (or panics).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let routes = args.first().copied().unwrap_or(10_000);
    let changes = args.get(1).copied().unwrap_or(1_000);
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nadmin_token = \"bench\"\n"
    );
    let proxy = Stopped(spawn_release_proxy(dir.path(), &config));
    let pid = proxy.0.id();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let call = |method: &str, body: &Value| {
        let started = Instant::now();
        let answer = http_request_within(
            admin,
            method,
            "/v1/routes",
            Some("bench"),
            Some(&body.to_string()),
            Duration::from_secs(30),
        )
        .expect("admin API");
        assert_eq!(answer.status, 200, "{}", answer.body);
        started.elapsed()
    };
    for _ in 0..100 {
        if http_request_within(admin, "GET", "/health", None, None, Duration::from_secs(1)).is_ok()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_empty = rss_kib(pid);

    let mut databases: serde_json::Map<String, Value> =
        (0..routes).map(|i| (format!("app_{i:05}"), route(i, 5432))).collect();
    let mut epoch = 1u64;
    let mut whole = Vec::new();
    for _ in 0..5 {
        whole.push(call("PUT", &json!({"epoch": epoch, "databases": databases})));
        epoch += 1;
    }
    let rss_full = rss_kib(pid);

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut pick = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize % routes
    };
    let mut deltas = Vec::with_capacity(changes);
    let mut current = epoch - 1;
    for k in 0..changes {
        let i = pick();
        let changed = route(i, 6000 + (k % 1000) as u16);
        let name = format!("app_{i:05}");
        databases.insert(name.clone(), changed.clone());
        let delta = json!({"base_epoch": current, "epoch": current + 1, "set": {name: changed}});
        deltas.push(call("PATCH", &delta));
        current += 1;
    }
    let mut whole_change = Vec::new();
    for k in 0..20 {
        let i = pick();
        databases.insert(format!("app_{i:05}"), route(i, 7000 + k));
        current += 1;
        whole_change.push(call("PUT", &json!({"epoch": current, "databases": databases})));
    }
    drop(proxy);

    for v in [&mut whole, &mut deltas, &mut whole_change] {
        v.sort();
    }
    println!("{routes} routes; times from the request to the proxy's answer");
    println!("| | n | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in [
        ("whole table (`PUT`)", &whole),
        ("one-database change (`PATCH`)", &deltas),
        ("one-database change as a whole table (`PUT`)", &whole_change),
    ] {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    println!(
        "\nproxy RSS: {rss_empty} KiB with no route, {rss_full} KiB with {routes}: {:.1} KiB per route",
        (rss_full.saturating_sub(rss_empty)) as f64 / routes as f64
    );
}
