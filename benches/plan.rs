//! Plan-change benchmark on real databases behind a real proxy, under a writer (one connection,
//! inserts back to back, reconnecting after errors) and a connector (a new session every 20 ms).
//!
//!   cargo bench --bench plan -- [rounds=3] [major_gb=1]
//!
//! Paths, each round going up then back down: a single node (sandbox ↔ starter-1024, a restart
//! under a hold), business ↔ business (512 ↔ 1024: rolling with a switchover up, primary first
//! down) and starter ↔ business (512: a standby added, then removed); and minor engine
//! upgrades from PostgreSQL 15.17 to the default build (Debian's 15), on a single node and on a
//! business database, each round on a new database (when `scripts/setup.sh` installed 15.17).
//! And a major upgrade (Debian's 15 to PostgreSQL 18, when `scripts/setup.sh --engines` built it) of a
//! business database loaded with `major_gb` GB, under the writer, with five established sessions
//! (the swap ends them) and the hold the swap took from its event.
//! For every change: total duration of the operation, longest wait of a new connection and new
//! connections that failed; at the end, acknowledged inserts lost.

use std::time::{Duration, Instant};

use pgwarden_e2e::{engines_dir, lost_writes, psql, Connector, TestControl, Writer};
use serde_json::json;

struct Measure {
    path: &'static str,
    took: Duration,
    longest_wait: Duration,
    failed: usize,
    attempts: usize,
}

async fn change(
    control: &TestControl,
    id: &str,
    url: &str,
    plan: &str,
    path: &'static str,
) -> Measure {
    let request = ("PATCH", format!("/v1/databases/{id}"), json!({"plan": plan}));
    measure(control, url, plan, path, request).await
}

/// Runs `request` (an operation) under a connector on `url`; what new connections saw.
async fn measure(
    control: &TestControl,
    url: &str,
    plan: &str,
    path: &'static str,
    (method, target, body): (&str, String, serde_json::Value),
) -> Measure {
    let connector = Connector::start(url.to_owned());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = control.request(method, &target, Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    let took = started.elapsed();
    assert_eq!(op["status"], "succeeded", "{path} to {plan}: {op}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outcomes = connector.stop().await;
    let longest_wait =
        outcomes.iter().filter_map(|o| o.as_ref().ok()).max().copied().unwrap_or_default();
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    eprintln!(
        "{path} → {plan}: {} ms, {} new connections, {failed} failed, longest wait {} ms",
        took.as_millis(),
        outcomes.len(),
        longest_wait.as_millis()
    );
    Measure { path, took, longest_wait, failed, attempts: outcomes.len() }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let engines = engines_dir();
    let control = TestControl::start_full(Vec::new(), Vec::new(), "data", engines.clone()).await;
    let paths: [(&str, &str, &str, &'static str); 3] = [
        ("single", "postgresql-sandbox", "postgresql-starter-1024", "single node restart"),
        ("rolling", "postgresql-business-512", "postgresql-business-1024", "business ↔ business"),
        ("grow", "postgresql-starter-512", "postgresql-business-512", "starter ↔ business"),
    ];
    let mut measures = Vec::new();
    let mut lost_total = 0;
    let mut acked_total = 0;
    for (name, from, to, path) in paths {
        let (_, id, url) = control.create_routed_database(name, from).await;
        control
            .wait_database(&id, "every node running", |db| {
                db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
            })
            .await;
        assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
        let writer = Writer::start(url.clone());
        for _ in 0..rounds {
            for plan in [to, from] {
                measures.push(change(&control, &id, &url, plan, path).await);
                if plan.contains("business") {
                    control.wait_synchronous(&id, "synchronous before the next change").await;
                }
            }
        }
        let acked = writer.stop().await;
        let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
        lost_total += lost_writes(&acked, &out.stdout).len();
        acked_total += acked.len();
    }
    // Minor upgrades: each round on a new database created on 15.17.
    let upgrades = [
        ("postgresql-sandbox", "minor upgrade, single node"),
        ("postgresql-business-512", "minor upgrade, business"),
    ];
    if engines.is_none() {
        eprintln!(
            "minor upgrades not measured: PostgreSQL 15.17 is not installed (scripts/setup.sh)"
        );
    }
    for (round, (plan, path)) in upgrades.iter().cycle().take(2 * rounds).enumerate() {
        if engines.is_none() {
            break;
        }
        let body = json!({"name": format!("up{round}"), "plan": plan, "version": "15.17"});
        let r = control.request("POST", "/v1/databases", Some(body)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
        let id = r.json()["database"]["id"].as_str().unwrap().to_owned();
        let db = control
            .wait_database(&id, "every node running", |db| {
                db["status"] == "running"
                    && db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
            })
            .await;
        control.wait_routed(db["name"].as_str().unwrap(), true).await;
        let url = db["database_url"].as_str().unwrap().to_owned();
        assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
        let writer = Writer::start(url.clone());
        let engines = control.request("GET", "/v1/engines", None).await.json();
        let default = engines.as_array().unwrap().iter().find(|e| e["default"] == true).cloned();
        let version = default.expect("default build")["version"].clone();
        let request =
            ("POST", format!("/v1/databases/{id}/engine-upgrade"), json!({"version": version}));
        let label = format!("PostgreSQL {}", version.as_str().unwrap_or_default());
        measures.push(measure(&control, &url, &label, path, request).await);
        let acked = writer.stop().await;
        let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
        lost_total += lost_writes(&acked, &out.stdout).len();
        acked_total += acked.len();
    }
    let major_gb: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.strip_prefix("major_gb=").and_then(|v| v.parse().ok()))
        .unwrap_or(1.0);
    let major = major_upgrade(&control, major_gb).await;
    if let Some((m, lost, acked, _, _)) = &major {
        lost_total += lost;
        acked_total += acked;
        measures.push(Measure { path: "major upgrade, business", ..*m });
    }
    println!("| path | changes | median duration | max duration | longest wait of a new connection | new connections failed |");
    println!("|---|---:|---:|---:|---:|---:|");
    let all_paths = paths
        .iter()
        .map(|p| p.3)
        .chain(upgrades.iter().map(|u| u.1))
        .chain(["major upgrade, business"]);
    for path in all_paths {
        let of: Vec<&Measure> = measures.iter().filter(|m| m.path == path).collect();
        if of.is_empty() {
            continue;
        }
        let mut took: Vec<Duration> = of.iter().map(|m| m.took).collect();
        took.sort();
        let wait = of.iter().map(|m| m.longest_wait).max().unwrap_or_default();
        let failed: usize = of.iter().map(|m| m.failed).sum();
        let attempts: usize = of.iter().map(|m| m.attempts).sum();
        println!(
            "| {path} | {} | {} ms | {} ms | {} ms | {failed} of {attempts} |",
            of.len(),
            took[took.len() / 2].as_millis(),
            took.last().unwrap().as_millis(),
            wait.as_millis()
        );
    }
    if let Some((m, _, _, held, ended)) = &major {
        println!(
            "major upgrade of {major_gb} GB: {} ms in all, new sessions held {held} ms, {} of {} \
             new connections failed, longest wait {} ms, established sessions ended: {ended} of 5",
            m.took.as_millis(),
            m.failed,
            m.attempts,
            m.longest_wait.as_millis()
        );
    }
    println!("acknowledged inserts lost: {lost_total} of {acked_total}");
    assert_eq!(lost_total, 0, "acknowledged inserts lost");
}

/// A major upgrade of a business database holding `gb` GB, under the writer: what new
/// connections saw, acknowledged inserts lost and written, the hold in ms (from the
/// `switched_cluster` event) and how many of five established sessions ended.
async fn major_upgrade(
    control: &TestControl,
    gb: f64,
) -> Option<(Measure, usize, usize, String, usize)> {
    let engines = control.request("GET", "/v1/engines", None).await.json();
    let Some(v18) = engines.as_array().unwrap().iter().find(|e| e["major"] == 18).cloned() else {
        eprintln!(
            "major upgrade not measured: no PostgreSQL 18 build (scripts/setup.sh --engines)"
        );
        return None;
    };
    let (_, id, url) = control.create_routed_database("major", "postgresql-business-512").await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    let rows = (gb * 1_000_000.0) as i64;
    let load = format!(
        "CREATE TABLE big(id int8 PRIMARY KEY, body text); \
         INSERT INTO big SELECT g, repeat(md5(g::text), 31) FROM generate_series(1, {rows}) g; \
         CREATE TABLE w(n int8 PRIMARY KEY);"
    );
    let started = Instant::now();
    assert!(psql(&url, None, &load).success);
    let size = psql(&url, None, "SELECT pg_size_pretty(pg_database_size(current_database()))");
    eprintln!("loaded {} in {} s", size.stdout.trim(), started.elapsed().as_secs());
    let mut established = Vec::new();
    for _ in 0..5 {
        let (client, connection) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
        established.push((client, tokio::spawn(connection)));
    }
    let writer = Writer::start(url.clone());
    let version = v18["version"].clone();
    let request =
        ("POST", format!("/v1/databases/{id}/engine-upgrade"), json!({"version": version}));
    let label = format!("PostgreSQL {}", version.as_str().unwrap_or_default());
    let m = measure(control, &url, &label, "major upgrade, business", request).await;
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout).len();
    let ended = established.iter().filter(|(_, task)| task.is_finished()).count();
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let held = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "switched_cluster")
        .and_then(|e| e["message"].as_str())
        .and_then(|m| m.split("held ").nth(1))
        .and_then(|m| m.split(' ').next())
        .unwrap_or("?")
        .to_owned();
    Some((m, lost, acked.len(), held, ended))
}
