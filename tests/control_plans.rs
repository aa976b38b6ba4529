//! Plan changes on real nodes behind a real proxy, with a writer that records acknowledged
//! inserts and a connector that opens a new session every 20 ms: refusals, a single-node restart
//! under a hold, business up and down (rolling), starter to business and back.

use std::time::{Duration, Instant};

use pgwarden_e2e::{assert_no_failed, lost_writes, psql, Connector, TestControl, Writer};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

/// Changes `id` to `plan` and waits for the operation; returns it.
async fn change(control: &TestControl, id: &str, plan: &str) -> Value {
    let r =
        control.request("PATCH", &format!("/v1/databases/{id}"), Some(json!({"plan": plan}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["operation"]["kind"], "plan_change");
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    if op["status"] != "succeeded" {
        let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
        println!("events of {id}: {}", events.body);
    }
    op
}

/// `SHOW shared_buffers` and `SHOW max_connections` on every node of `db`, over its socket.
fn settings_of_every_node(control: &TestControl, db: &Value) -> Vec<(String, String)> {
    let sql =
        "SELECT current_setting('shared_buffers') || ',' || current_setting('max_connections')";
    let answers = control.sql_on_every_node(db, sql);
    answers
        .iter()
        .map(|a| {
            let (buffers, connections) = a.split_once(',').expect("two settings");
            (buffers.to_owned(), connections.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_restarts_on_its_new_plan_while_new_connections_wait() {
    let control = TestControl::start().await;
    // Refused before anything moves.
    let r = control
        .request(
            "POST",
            "/v1/databases",
            Some(json!({"name": "early", "plan": "postgresql-sandbox"})),
        )
        .await;
    let early = r.json()["database"]["id"].as_str().unwrap().to_owned();
    let r = control
        .request(
            "PATCH",
            &format!("/v1/databases/{early}"),
            Some(json!({"plan": "postgresql-starter-512"})),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "database_not_running");

    let (_, id, url) = control.create_routed_database("shop", "postgresql-sandbox").await;
    let r = control
        .request("PATCH", &format!("/v1/databases/{id}"), Some(json!({"plan": "gold"})))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("postgresql-business-1024"));
    let r = control
        .request(
            "PATCH",
            &format!("/v1/databases/{id}"),
            Some(json!({"plan": "postgresql-sandbox"})),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "same_plan");

    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let (_established, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let established = tokio::spawn(connection);
    let writer = Writer::start(url.clone());
    let connector = Connector::start(url.clone());
    writer.wait_more(10).await;
    connector.wait_more(5).await;
    let op = change(&control, &id, "postgresql-starter-1024").await;
    assert_eq!(op["status"], "succeeded", "{op}");
    connector.wait_more(5).await;
    assert_no_failed(&connector.stop().await, "single-node restart");
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(lost_writes(&acked, &out.stdout).is_empty(), "acknowledged inserts lost");

    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(
        (db["plan"].as_str(), db["status"].as_str()),
        (Some("postgresql-starter-1024"), Some("running"))
    );
    let out = psql(
        &url,
        None,
        "SELECT current_setting('shared_buffers') || ',' || current_setting('max_connections')",
    );
    assert_eq!(out.stdout.trim(), "256MB,80", "{}", out.stderr);
    // The established session was ended by the restart, with 57P01.
    let ended = tokio::time::timeout(Duration::from_secs(5), established).await.unwrap().unwrap();
    let err = ended.expect_err("session ended");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in ["plan_change_started", "node_reconfigured", "plan_changed"] {
        assert!(kinds.contains(&kind), "missing event {kind}: {kinds:?}");
    }
    // The new plan's backup cap applies (the sandbox had none).
    let r = control.request("POST", &format!("/v1/databases/{id}/backups"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_database_changes_plan_up_then_down_without_failed_connections_or_lost_writes() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("rolling", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let writer = Writer::start(url.clone());
    for (plan, buffers, connections) in
        [("postgresql-business-1024", "256MB", "80"), ("postgresql-business-512", "128MB", "60")]
    {
        writer.wait_more(20).await;
        let connector = Connector::start(url.clone());
        connector.wait_more(5).await;
        let op = change(&control, &id, plan).await;
        assert_eq!(op["status"], "succeeded", "{plan}: {op}");
        connector.wait_more(5).await;
        assert_no_failed(&connector.stop().await, plan);
        let db = control.wait_synchronous(&id, "both nodes back, synchronous").await;
        assert_eq!(db["plan"], plan);
        assert_eq!(db["status"], "running");
        let settings = settings_of_every_node(&control, &db);
        assert_eq!(settings.len(), 2);
        assert!(
            settings.iter().all(|(b, c)| b == buffers && c == connections),
            "{plan}: {settings:?}"
        );
    }
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());
}

/// A plan change that starts right after provisioning, before the control plane's supervisor
/// passed over the new database: the old primary still rejoins after the switchover (CI saw it
/// wait 120 s for a watcher that was never started for a database already `updating`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_at_once_after_provisioning_still_brings_the_old_primary_back() {
    let control = TestControl::start().await;
    let db = control.create_database("eager", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap();
    let started = Instant::now();
    let op = change(&control, id, "postgresql-business-1024").await;
    assert_eq!(op["status"], "succeeded", "{op}");
    println!("plan change right after provisioning took {:?}", started.elapsed());
    let db = control.wait_synchronous(id, "both nodes back, synchronous").await;
    let settings = settings_of_every_node(&control, &db);
    assert!(settings.iter().all(|(b, c)| b == "256MB" && c == "80"), "{settings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starter_to_business_adds_a_synchronous_standby_and_back_removes_it() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("grow", "postgresql-starter-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let writer = Writer::start(url.clone());
    let connector = Connector::start(url.clone());
    writer.wait_more(10).await;
    connector.wait_more(5).await;

    let op = change(&control, &id, "postgresql-business-512").await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let db = control.wait_synchronous(&id, "a synchronous standby").await;
    assert_eq!(db["nodes"].as_array().unwrap().len(), 2, "{db}");
    assert_eq!(db["plan"], "postgresql-business-512");
    let settings = settings_of_every_node(&control, &db);
    assert!(settings.iter().all(|(b, c)| b == "128MB" && c == "60"), "{settings:?}");

    let op = change(&control, &id, "postgresql-starter-512").await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(db["nodes"].as_array().unwrap().len(), 1, "{db}");
    assert_eq!(
        (db["replication"].as_str(), db["status"].as_str()),
        (Some("none"), Some("running"))
    );
    assert_eq!(
        std::fs::read_dir(control.data.join("nodes")).unwrap().count(),
        1,
        "the standby's directory is gone"
    );
    connector.wait_more(5).await;
    assert_no_failed(&connector.stop().await, "starter → business → starter");
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());
    // Commits no longer wait for a standby that is gone.
    assert!(psql(&url, None, "INSERT INTO w VALUES (-1)").success);
}
