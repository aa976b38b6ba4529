//! Automatic failover under a live writer: no acknowledged write lost, the old primary fenced,
//! then rejoined as a standby, synchronous again. Real nodes, real proxy, real client.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_e2e::{postmaster_pid, psql, TestControl};
use serde_json::Value;
use tokio_postgres::NoTls;

/// Inserts 1, 2, 3... through the proxy, reconnecting on errors; records each acknowledged
/// number with the port of the node that acknowledged it.
struct Writer {
    acknowledged: Arc<Mutex<Vec<(i64, i32)>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(url: String) -> Self {
        let acknowledged: Arc<Mutex<Vec<(i64, i32)>>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let (acks, stopped) = (acknowledged.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut next = 1i64;
            while !stopped.is_cancelled() {
                let Ok(Ok((client, connection))) = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio_postgres::connect(&url, NoTls),
                )
                .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(connection);
                while !stopped.is_cancelled() {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
                    let insert = client.query_one(
                        "INSERT INTO w VALUES ($1) RETURNING inet_server_port()",
                        &params,
                    );
                    match tokio::time::timeout(Duration::from_secs(5), insert).await {
                        Ok(Ok(row)) => {
                            acks.lock().unwrap().push((next, row.get(0)));
                            next += 1;
                        }
                        // Outcome unknown: never counted as acknowledged, never reused.
                        _ => {
                            next += 1;
                            break;
                        }
                    }
                }
            }
        });
        Self { acknowledged, stop, task }
    }

    fn acked(&self) -> Vec<(i64, i32)> {
        self.acknowledged.lock().unwrap().clone()
    }

    async fn wait_acks_from(&self, port: i32, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked().iter().filter(|(_, p)| *p == port).count() < count {
            assert!(Instant::now() < deadline, "writer never got {count} acks from port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> Vec<(i64, i32)> {
        self.stop.cancel();
        let _ = self.task.await;
        self.acknowledged.lock().unwrap().clone()
    }
}

fn port_of(db: &Value, role: &str) -> i32 {
    db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap()["port"]
        .as_i64()
        .unwrap() as i32
}

fn name_of(db: &Value, role: &str) -> String {
    db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn failover_under_writer(freeze: bool) {
    let control = TestControl::start().await;
    let db = control.create_database("ledger", "postgresql-business-512").await;
    let (id, url) =
        (db["id"].as_str().unwrap().to_owned(), db["database_url"].as_str().unwrap().to_owned());
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (old_port, new_port) = (port_of(&db, "primary"), port_of(&db, "replica"));
    let (old_name, new_name) = (name_of(&db, "primary"), name_of(&db, "replica"));

    let writer = Writer::start(url.clone());
    writer.wait_acks_from(old_port, 50).await;
    let old_data = control.node_data_dir(&old_name);
    let pid = postmaster_pid(&old_data).expect("primary running");
    let signal = if freeze { "-STOP" } else { "-KILL" };
    let killed_at = Instant::now();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());

    writer.wait_acks_from(new_port, 50).await;
    let first_new_ack = writer.acked().iter().position(|(_, p)| *p == new_port).unwrap();
    println!("kill to 50 acknowledged writes on the new primary: {:?}", killed_at.elapsed());
    if freeze {
        // The frozen primary resumes (if the fence left anything to resume).
        let _ = std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let acked = writer.stop().await;
    // Split brain is impossible through the proxy: once the new primary acknowledged a write,
    // the old one never acknowledges another.
    assert!(
        acked[first_new_ack..].iter().all(|(_, p)| *p == new_port),
        "write acknowledged by the old primary after failover"
    );

    // Every acknowledged insert is there.
    let out = psql(&url, None, "SELECT string_agg(n::text, ',' ORDER BY n) FROM w");
    assert!(out.success, "{}", out.stderr);
    let present: std::collections::HashSet<i64> =
        out.stdout.trim().split(',').map(|n| n.parse().unwrap()).collect();
    let lost: Vec<i64> = acked.iter().map(|(n, _)| *n).filter(|n| !present.contains(n)).collect();
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());

    // The old primary rejoins as a standby and the cluster is synchronous again.
    let db = control
        .wait_database(&id, "rejoin and synchronous replication", |db| {
            db["replication"] == "synchronous"
                && db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
        })
        .await;
    assert_eq!(name_of(&db, "primary"), new_name);
    assert_eq!(name_of(&db, "replica"), old_name);
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in ["primary_unreachable", "failover", "rejoined", "replication_synchronous"] {
        assert!(kinds.contains(&kind), "missing event {kind}: {kinds:?}");
    }
    // The rejoined node really follows the new primary.
    let out = psql(&url, None, "INSERT INTO w VALUES (-1)");
    assert!(out.success, "{}", out.stderr);
    let standby = format!(
        "host={} port={} user=postgres dbname={}",
        old_data.parent().unwrap().display(),
        old_port,
        db["name"].as_str().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while psql(&standby, None, "SELECT count(*) FROM w WHERE n = -1").stdout.trim() != "1" {
        assert!(
            Instant::now() < deadline,
            "rejoined standby does not replay the new primary's WAL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = control.request("GET", "/metrics", None).await.body;
    assert!(metrics.contains("pgwarden_failovers_total{result=\"promoted\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_primary_fails_over_without_losing_acknowledged_writes() {
    failover_under_writer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_fenced_and_never_written_again() {
    failover_under_writer(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_standby_degrades_to_asynchronous_then_comes_back_synchronous() {
    let control = TestControl::start().await;
    let db = control.create_database("queue", "postgresql-business-512").await;
    let (id, url) =
        (db["id"].as_str().unwrap().to_owned(), db["database_url"].as_str().unwrap().to_owned());
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    assert_eq!(db["replication"], "synchronous");
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let primary_port = port_of(&db, "primary");
    let writer = Writer::start(url.clone());
    writer.wait_acks_from(primary_port, 20).await;

    let standby = control.node_data_dir(&name_of(&db, "replica"));
    let pid = postmaster_pid(&standby).expect("standby running");
    let acks_before = writer.acked().len();
    let killed_at = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // The primary keeps acknowledging writes (asynchronously) instead of blocking forever.
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer.acked().len() < acks_before + 100 {
        assert!(Instant::now() < deadline, "writes blocked after the standby died");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("standby killed: writes flowing again after {:?}", killed_at.elapsed());
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    assert!(
        events.as_array().unwrap().iter().any(|e| e["kind"] == "replication_degraded"),
        "{events}"
    );

    // The standby is restarted, catches up, and commits are synchronous again.
    control
        .wait_database(&id, "synchronous again", |db| {
            db["replication"] == "synchronous"
                && db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
        })
        .await;
    let acked = writer.stop().await;
    let out = psql(
        &url,
        None,
        "SELECT count(*) FROM w WHERE n = ANY(string_to_array($$X$$, ',')::int8[])"
            .replace("X", &acked.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>().join(","))
            .as_str(),
    );
    assert_eq!(out.stdout.trim(), acked.len().to_string(), "{}", out.stderr);
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"node_restarted"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "replication_synchronous").count(), 2, "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_failover_through_the_api_changes_the_primary() {
    let control = TestControl::start().await;
    let db = control.create_database("forced", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let (old, new) = (name_of(&db, "primary"), name_of(&db, "replica"));
    let r = control.request("POST", &format!("/v1/databases/{id}/failover"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let db = control
        .wait_database(&id, "rejoin after forced failover", |db| {
            db["replication"] == "synchronous"
                && db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
        })
        .await;
    assert_eq!(name_of(&db, "primary"), new);
    assert_eq!(name_of(&db, "replica"), old);
    let url = db["database_url"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = psql(url, None, "SELECT inet_server_port(), pg_is_in_recovery()");
        if out.success && out.stdout.trim() == format!("{}|f", port_of(&db, "primary")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy does not route to the new primary: {}",
            out.stdout
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sandbox = control.create_database("single", "postgresql-sandbox").await;
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{}/failover", sandbox["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "no_standby");
}

/// Opens a new connection every 20 ms and runs one query; records each outcome and how long
/// connecting took.
struct Connector {
    outcomes: Arc<Mutex<Vec<Result<Duration, String>>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Connector {
    fn start(url: String) -> Self {
        let outcomes: Arc<Mutex<Vec<Result<Duration, String>>>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let (record, stopped) = (outcomes.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !stopped.is_cancelled() {
                let started = Instant::now();
                let outcome = async {
                    let (client, connection) =
                        tokio_postgres::connect(&url, NoTls).await.map_err(|e| format!("{e:?}"))?;
                    tokio::spawn(connection);
                    let waited = started.elapsed();
                    client.simple_query("SELECT 1").await.map_err(|e| format!("{e:?}"))?;
                    Ok(waited)
                }
                .await;
                record.lock().unwrap().push(outcome);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { outcomes, stop, task }
    }

    async fn stop(self) -> Vec<Result<Duration, String>> {
        self.stop.cancel();
        let _ = self.task.await;
        self.outcomes.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_nothing_and_new_connections_wait_instead_of_failing() {
    let control = TestControl::start().await;
    let db = control.create_database("planned", "postgresql-business-512").await;
    let (id, url) =
        (db["id"].as_str().unwrap().to_owned(), db["database_url"].as_str().unwrap().to_owned());
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (old_name, new_name) = (name_of(&db, "primary"), name_of(&db, "replica"));
    let new_port = port_of(&db, "replica");

    let (_idle, idle_connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let idle_end = tokio::spawn(idle_connection);
    let writer = Writer::start(url.clone());
    writer.wait_acks_from(port_of(&db, "primary"), 50).await;
    let connector = Connector::start(url.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/switchover"),
            Some(serde_json::json!({"target": new_name})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    writer.wait_acks_from(new_port, 50).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = connector.stop().await;
    let acked = writer.stop().await;

    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    let longest = outcomes.iter().filter_map(|o| o.as_ref().ok()).max().unwrap();
    println!("{} new connections during the switchover, longest wait {longest:?}", outcomes.len());

    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let present: std::collections::HashSet<i64> =
        out.stdout.trim().split(',').map(|n| n.parse().unwrap()).collect();
    let lost: Vec<i64> = acked.iter().map(|(n, _)| *n).filter(|n| !present.contains(n)).collect();
    assert!(lost.is_empty(), "acknowledged inserts lost: {lost:?}");

    let err = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .unwrap()
        .unwrap()
        .expect_err("old session ended");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{err:?}");

    let db = control
        .wait_database(&id, "old primary back as a synchronous standby", |db| {
            db["replication"] == "synchronous"
                && db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running")
        })
        .await;
    assert_eq!(name_of(&db, "primary"), new_name);
    assert_eq!(name_of(&db, "replica"), old_name);

    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/switchover"),
            Some(serde_json::json!({"target": "nope"})),
        )
        .await;
    assert_eq!(r.status, 422);
}
