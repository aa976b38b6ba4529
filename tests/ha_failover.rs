//! Automatic failover under a live writer: no acknowledged write lost, the old primary fenced,
//! then rejoined as a standby, synchronous again. Real nodes, real proxy, real client.

use std::time::{Duration, Instant};

use pgwarden_e2e::{
    kill_postmaster, lost_writes, postmaster_pid, psql, stop_immediately, wait_until, Connector,
    TestControl, Writer,
};
use serde_json::Value;
use tokio_postgres::NoTls;

const WAIT: Duration = Duration::from_secs(60);

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
    let (db, id, url) = control.create_routed_database("ledger", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (old_port, new_port) = (port_of(&db, "primary"), port_of(&db, "replica"));
    let (old_name, new_name) = (name_of(&db, "primary"), name_of(&db, "replica"));

    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(old_port, 50, WAIT).await);
    let old_data = control.node_data_dir(&old_name);
    let pid = postmaster_pid(&old_data).expect("primary running");
    let signal = if freeze { "-STOP" } else { "-KILL" };
    let killed_at = Instant::now();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());

    assert!(writer.wait_acks_from(new_port, 50, WAIT).await);
    let first_new_ack = writer.acked().iter().position(|a| a.port == new_port).unwrap();
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
        acked[first_new_ack..].iter().all(|a| a.port == new_port),
        "write acknowledged by the old primary after failover"
    );

    // Every acknowledged insert is there.
    let out = psql(&url, None, "SELECT string_agg(n::text, ',' ORDER BY n) FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());

    // The old primary rejoins as a standby and the cluster is synchronous again.
    let db = control.wait_synchronous(&id, "rejoin and synchronous replication").await;
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
    let what = "the rejoined standby replaying the new primary's WAL";
    wait_until(what, Duration::from_secs(10), async || {
        let out = psql(&standby, None, "SELECT count(*) FROM w WHERE n = -1");
        if out.stdout.trim() == "1" {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await;
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
    let (db, id, url) = control.create_routed_database("queue", "postgresql-business-512").await;
    assert_eq!(db["replication"], "synchronous");
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let primary_port = port_of(&db, "primary");
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(primary_port, 20, WAIT).await);

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
    control.wait_event(&id, "replication_degraded").await;

    // The standby is restarted, catches up, and commits are synchronous again.
    control.wait_synchronous(&id, "synchronous again").await;
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(lost_writes(&acked, &out.stdout).is_empty(), "{}", out.stderr);
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
    let db = control.wait_synchronous(&id, "rejoin after forced failover").await;
    assert_eq!(name_of(&db, "primary"), new);
    assert_eq!(name_of(&db, "replica"), old);
    let url = db["database_url"].as_str().unwrap();
    wait_until("the proxy routing to the new primary", Duration::from_secs(10), async || {
        let out = psql(url, None, "SELECT inet_server_port(), pg_is_in_recovery()");
        if out.success && out.stdout.trim() == format!("{}|f", port_of(&db, "primary")) {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_nothing_and_new_connections_wait_instead_of_failing() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("planned", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (old_name, new_name) = (name_of(&db, "primary"), name_of(&db, "replica"));
    let new_port = port_of(&db, "replica");

    let (_idle, idle_connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let idle_end = tokio::spawn(idle_connection);
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(port_of(&db, "primary"), 50, WAIT).await);
    let connector = Connector::start(url.clone());
    connector.wait_more(5).await;

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
    assert!(writer.wait_acks_from(new_port, 50, WAIT).await);
    connector.wait_more(5).await;
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
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged inserts lost: {lost:?}");

    let err = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .unwrap()
        .unwrap()
        .expect_err("old session ended");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{err:?}");

    let db = control.wait_synchronous(&id, "old primary back as a synchronous standby").await;
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

async fn events_of(control: &TestControl, id: &str) -> String {
    control.request("GET", &format!("/v1/databases/{id}/events"), None).await.body
}

/// A rejoin cut short between its pg_rewind and the node's start (its control plane stopped
/// there), then done again by the next control plane: a second pg_rewind would first run crash
/// recovery over the first one's copy and leave the node on a fork of the primary's history,
/// never streaming. The node is copied afresh instead and commits become synchronous again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_cut_short_after_its_rewind_ends_in_a_fresh_copy() {
    let mut control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("rewound", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (old_port, new_port) = (port_of(&db, "primary"), port_of(&db, "replica"));
    let (old_name, new_name) = (name_of(&db, "primary"), name_of(&db, "replica"));
    let (old_data, new_data) = (control.node_data_dir(&old_name), control.node_data_dir(&new_name));
    let new_admin = format!(
        "host={} port={new_port} user=postgres dbname=postgres",
        new_data.parent().unwrap().display()
    );
    // Every replication slot of the standby taken (the old primary's, made in advance, among
    // them): once promoted, it cannot give the old
    // primary one, so the control plane's rejoin stops before its rewind, leaving the node
    // fenced, until the test frees them.
    let fill = "SELECT count(pg_create_physical_replication_slot('filler_' || i)) FROM \
                generate_series(1, current_setting('max_replication_slots')::int - \
                (SELECT count(*) FROM pg_replication_slots)::int) AS i";
    // The first base backup, taken from the standby, uses a slot of its own for its length.
    wait_until("a base backup", WAIT, async || {
        let events = events_of(&control, &id).await;
        if events.contains("base_backup") {
            Ok(())
        } else {
            Err(events)
        }
    })
    .await;
    let drop = "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots";
    for sql in [drop, fill] {
        let out = psql(&new_admin, None, sql);
        assert!(out.success, "{sql}: {}", out.stderr);
    }
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(old_port, 20, WAIT).await);

    kill_postmaster(&old_data);
    assert!(writer.wait_acks_from(new_port, 20, WAIT).await);
    wait_until("a rejoin attempt", WAIT, async || {
        let events = events_of(&control, &id).await;
        if events.contains("rejoin_failed") {
            Ok(())
        } else {
            Err(events)
        }
    })
    .await;
    // The control plane stops; the first half of a rejoin happens without it: the old
    // primary rewound onto the new one's timeline, not started.
    control.stop().await;
    stop_immediately(&old_data);
    // The killed postmaster, until its parent (here PID 1) reaps it, still holds its pid:
    // PostgreSQL (pg_rewind's crash recovery) takes the lock file for a live postmaster's.
    let lock = std::fs::read_to_string(old_data.join("postmaster.pid")).unwrap_or_default();
    if let Some(pid) = lock.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) {
        wait_until("the old primary's postmaster gone", WAIT, async || {
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            if alive {
                Err(format!("pid {pid} still there"))
            } else {
                Ok(())
            }
        })
        .await;
    }
    // pg_rewind reads the new primary's timeline from its control file: a checkpoint writes it.
    assert!(psql(&new_admin, None, "CHECKPOINT").success);
    let rewind = std::process::Command::new("setpriv")
        .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(pgwarden_e2e::pg_bin("pg_rewind"))
        .arg("--target-pgdata")
        .arg(&old_data)
        .arg(format!("--source-server={new_admin}"))
        .env("HOME", "/tmp")
        .output()
        .expect("pg_rewind");
    assert!(rewind.status.success(), "{}", String::from_utf8_lossy(&rewind.stderr));
    assert!(
        old_data.join("backup_label").exists(),
        "pg_rewind left no backup label: {}",
        String::from_utf8_lossy(&rewind.stderr)
    );
    // The primary goes on past the copy.
    let acked = writer.acked().len();
    wait_until("50 more writes", WAIT, async || {
        let now = writer.acked().len();
        if now >= acked + 50 {
            Ok(())
        } else {
            Err(format!("{} more", now - acked))
        }
    })
    .await;
    let free = "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots \
                WHERE slot_name LIKE 'filler\\_%'";
    let out = psql(&new_admin, None, free);
    assert!(out.success, "{}", out.stderr);

    // The next control plane rejoins the node again.
    control.run(Vec::new()).await;
    let db = control.wait_synchronous(&id, "the rewound node rejoined, synchronous").await;
    assert_eq!(name_of(&db, "primary"), new_name);
    assert_eq!(name_of(&db, "replica"), old_name);
    let events = events_of(&control, &id).await;
    assert!(
        events.contains("rejoined as a standby of") && events.contains("a fresh base backup"),
        "{events}"
    );
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // A standby that runs but does not replicate is shown as such, not as running with no lag.
    let standby_admin = format!(
        "host={} port={old_port} user=postgres dbname=postgres",
        control.node_data_dir(&old_name).parent().unwrap().display()
    );
    let cut = "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'";
    for sql in [cut, "SELECT pg_reload_conf()"] {
        assert!(psql(&standby_admin, None, sql).success, "{sql}");
    }
    let db = control
        .wait_database(&id, "the standby shown not streaming", |db| {
            db["nodes"].as_array().unwrap().iter().any(|n| n["status"] == "not_streaming")
        })
        .await;
    assert_eq!(name_of(&db, "replica"), old_name);
    for sql in ["ALTER SYSTEM RESET primary_conninfo", "SELECT pg_reload_conf()"] {
        assert!(psql(&standby_admin, None, sql).success, "{sql}");
    }
    control.wait_synchronous(&id, "the standby streaming again").await;
}
