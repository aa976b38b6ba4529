//! Fair to every tenant: one database's reconnect storm against another's connect-and-query
//! latency, through pgwarden-proxy, with the per-database limits and without them:
//!
//!   cargo build --release -p pgwarden-proxy && cargo bench --bench tenants -- [rounds=3] [storm_clients=32]
//!
//! The proxy runs as its own process (the release binary) and authenticates clients itself,
//! as the control plane configures it; one real PostgreSQL 15 holds both databases, `calm` and
//! `storm`. The storm is `storm_clients` clients on a runtime of their own, each connecting to `storm`,
//! running `SELECT 1` and closing, as fast as they can, for the length of a measurement. The
//! calm client connects to `calm`, runs `SELECT 1` and closes, 100 times in a row. Each round
//! measures it quiet, during a storm with `storm`'s plan limits (a sandbox's: 300 clients, 60
//! new connections a second) and during a storm with no limit, in turn; the table gives the
//! percentiles over every round and the ratios to quiet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_e2e::{free_port, http_request, spawn_release_proxy, PgNode, TEST_PASSWORD};
use serde_json::json;

const SAMPLES: usize = 100;

async fn connect_and_query(conninfo: &str) -> Result<Duration, tokio_postgres::Error> {
    let started = Instant::now();
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await?;
    drop(client);
    let _ = connection.await;
    Ok(started.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

/// Storm counts: attempts, and those that got their `SELECT 1` answered.
#[derive(Default)]
struct Storm {
    attempts: AtomicU64,
    served: AtomicU64,
}

/// Runs the storm on a thread and runtime of its own until `stop`.
fn storm(
    clients: usize,
    conninfo: String,
    stop: Arc<AtomicBool>,
    counts: Arc<Storm>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let (conninfo, stop, counts) = (conninfo.clone(), stop.clone(), counts.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        counts.attempts.fetch_add(1, Ordering::Relaxed);
                        let bounded = tokio::time::timeout(
                            Duration::from_secs(5),
                            connect_and_query(&conninfo),
                        );
                        if let Ok(Ok(_)) = bounded.await {
                            counts.served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        });
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(3);
    let storm_clients = args.get(1).copied().unwrap_or(32);
    let node = PgNode::start();
    for db in ["calm", "storm"] {
        let out = node.superuser_sql(&format!("CREATE DATABASE {db} OWNER app"));
        assert!(out.success, "{}", out.stderr);
    }
    let verifier = node.superuser_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    let verifier = verifier.stdout.trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let table = |epoch: u64, limited: bool| {
        let route = |limits: bool| {
            let mut route = json!({"primary": node.address(), "users": {"app": verifier}});
            if limits {
                route["client_connections"] = json!(300);
                route["connections_per_second"] = json!(60);
            }
            route
        };
        json!({"epoch": epoch, "databases": {"calm": route(true), "storm": route(limited)}})
    };
    std::fs::write(dir.path().join("routes.json"), table(1, true).to_string()).unwrap();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         admin_token = \"bench\"\nroutes_file = \"{}\"\n",
        dir.path().join("routes.json").display()
    );
    let mut proxy = spawn_release_proxy(dir.path(), &config);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let conninfo = |db: &str| {
        format!("host=127.0.0.1 port={port} user=app dbname={db} password={TEST_PASSWORD} connect_timeout=10")
    };
    let calm = conninfo("calm");
    for _ in 0..100 {
        if connect_and_query(&calm).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut epoch = 1;
    let phases = ["quiet", "storm, limited", "storm, not limited"];
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); phases.len()];
    let mut storms: Vec<(u64, u64, f64)> = vec![(0, 0, 0.0); phases.len()];
    for round in 0..rounds {
        for (phase, name) in phases.iter().enumerate() {
            epoch += 1;
            let put = http_request(
                admin,
                "PUT",
                "/v1/routes",
                Some("bench"),
                Some(&table(epoch, phase != 2).to_string()),
            )
            .expect("routes");
            assert_eq!(put.status, 200, "{}", put.body);
            let (stop, counts) = (Arc::new(AtomicBool::new(false)), Arc::new(Storm::default()));
            let storming = (phase > 0)
                .then(|| storm(storm_clients, conninfo("storm"), stop.clone(), counts.clone()));
            // The storm at full strength (and the bucket empty) before measuring.
            tokio::time::sleep(Duration::from_secs(if phase > 0 { 2 } else { 0 })).await;
            let (attempts, served) =
                (counts.attempts.load(Ordering::Relaxed), counts.served.load(Ordering::Relaxed));
            let started = Instant::now();
            for _ in 0..SAMPLES {
                let took = connect_and_query(&calm).await.expect("the calm database answers");
                latencies[phase].push(took);
            }
            let took = started.elapsed().as_secs_f64();
            storms[phase].0 += counts.attempts.load(Ordering::Relaxed) - attempts;
            storms[phase].1 += counts.served.load(Ordering::Relaxed) - served;
            storms[phase].2 += took;
            stop.store(true, Ordering::Relaxed);
            if let Some(thread) = storming {
                thread.join().unwrap();
            }
            eprintln!("round {}: {name} measured in {took:.1} s", round + 1);
        }
    }
    let _ = proxy.kill();
    let _ = proxy.wait();

    println!("storm: {storm_clients} clients reconnecting in a loop");
    println!("| calm: connect + SELECT 1 + close | p50 (ms) | p90 (ms) | p99 (ms) | p50 / quiet | p90 / quiet | storm attempts/s | storm served/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for v in &mut latencies {
        v.sort();
    }
    let quiet = latencies[0].clone();
    for (phase, name) in phases.iter().enumerate() {
        let v = &latencies[phase];
        let (attempts, served, secs) = storms[phase];
        let rate = |n: u64| if secs > 0.0 { format!("{:.0}", n as f64 / secs) } else { "-".into() };
        println!(
            "| {name} ({} in {rounds} rounds) | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x | {} | {} |",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(v, 0.5) / pct(&quiet, 0.5),
            pct(v, 0.9) / pct(&quiet, 0.9),
            rate(attempts),
            rate(served),
        );
    }
}
