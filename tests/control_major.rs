//! Major engine upgrades online, on real nodes behind a real proxy: from Debian's PostgreSQL 15
//! to PostgreSQL 18 (`scripts/setup.sh` builds it once from Debian's source package), through
//! logical replication and a held swap, with a writer that records acknowledged inserts and a
//! connector that opens a new session every 20 ms. Also: what logical replication cannot carry
//! is refused before anything moves, a swap past its hold budget is abandoned with the database
//! untouched, and the old cluster is kept stopped for the rollback window, then removed.

use std::time::Duration;

use pgwarden_e2e::{
    assert_no_failed, engines_dir, lost_writes, psql, wait_until, Connector, TestControl, Writer,
};
use serde_json::{json, Value};

/// A control plane with the engines directory whose clusters replaced by a major upgrade are
/// kept `window`, and the newest installed build of major 18; or why the test cannot run.
async fn control_with_18(window: Duration) -> Option<(TestControl, String)> {
    let Some(engines) = engines_dir() else {
        println!("SKIPPED: no engines directory (run scripts/setup.sh)");
        return None;
    };
    let control =
        TestControl::start_keeping(Vec::new(), Vec::new(), "data", Some(engines), window).await;
    newest_18(control).await
}

/// `control` with the newest installed build of major 18, or why the test cannot run.
async fn newest_18(control: TestControl) -> Option<(TestControl, String)> {
    let list = control.request("GET", "/v1/engines", None).await.json();
    let newest_18 = list.as_array().unwrap().iter().find(|e| e["major"] == 18).cloned();
    let Some(engine) = newest_18 else {
        println!(
            "SKIPPED: no PostgreSQL 18 build installed (scripts/setup.sh --engines builds it from Debian's \
             postgresql-18 source package into the engines directory); installed: {list}"
        );
        return None;
    };
    Some((control, engine["version"].as_str().unwrap().to_owned()))
}

async fn create(control: &TestControl, name: &str, plan: &str) -> (String, String) {
    let (db, id, url) = control.create_routed_database(name, plan).await;
    if db["nodes"].as_array().unwrap().len() > 1 {
        control.wait_synchronous(&id, "a synchronous standby").await;
    }
    (id, url)
}

/// Tables `w` (for a writer) and `items` (`rows` rows, a sequence), and a read-only user
/// `reader`; its URL.
async fn items_and_reader(control: &TestControl, id: &str, url: &str, rows: u32) -> String {
    let schema = format!(
        "CREATE TABLE w(n int8 PRIMARY KEY); \
         CREATE TABLE items(id serial PRIMARY KEY, body text); \
         INSERT INTO items(body) SELECT repeat('x', 100) FROM generate_series(1, {rows});"
    );
    assert!(psql(url, None, &schema).success);
    let users = format!("/v1/databases/{id}/users");
    let r =
        control.request("POST", &users, Some(json!({"name": "reader", "read_only": true}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["database_url"].as_str().unwrap().to_owned()
}

fn request_upgrade(version: &str, budget_ms: Option<u64>) -> Value {
    match budget_ms {
        Some(ms) => json!({"version": version, "hold_budget_ms": ms}),
        None => json!({"version": version}),
    }
}

async fn upgrade(control: &TestControl, id: &str, body: Value) -> Value {
    let path = format!("/v1/databases/{id}/engine-upgrade");
    let r = control.request("POST", &path, Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["operation"]["kind"], "engine_upgrade");
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
    println!("events of {id}: {}", events.body);
    op
}

fn first_words(answers: Vec<String>) -> Vec<String> {
    answers.iter().map(|v| v.split_whitespace().next().unwrap_or_default().to_owned()).collect()
}

fn event_kinds(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect()
}

fn node_names(db: &Value) -> Vec<String> {
    db["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().into()).collect()
}

fn accepts(port: u64) -> bool {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_database_moves_to_postgresql_18_online_without_failed_connections_or_lost_writes(
) {
    let Some((control, v18)) = control_with_18(Duration::from_secs(30)).await else { return };
    let (id, url) = create(&control, "major", "postgresql-business-512").await;
    let path = format!("/v1/databases/{id}/engine-upgrade");

    // What logical replication cannot carry is refused before anything moves, all of it named.
    let setup = "CREATE TABLE nopk(x int); CREATE UNLOGGED TABLE scratch(x int PRIMARY KEY); \
                 SELECT lo_create(0);";
    assert!(psql(&url, None, setup).success);
    let r = control.request("POST", &path, Some(request_upgrade(&v18, None))).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (422, Some("not_replicable")));
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    for offender in ["public.nopk", "public.scratch (unlogged table)", "1 large object(s)"] {
        assert!(message.contains(offender), "{offender} missing: {message}");
    }
    let cleanup = "DROP TABLE nopk, scratch; SELECT lo_unlink(oid) FROM pg_largeobject_metadata;";
    assert!(psql(&url, None, cleanup).success);

    // Data, a sequence, and a read-only user with its GRANTs: all must be on the new cluster.
    let reader_url = items_and_reader(&control, &id, &url, 5000).await;
    let before = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    let old_ports: Vec<u64> =
        before["nodes"].as_array().unwrap().iter().map(|n| n["port"].as_u64().unwrap()).collect();
    let old_names = node_names(&before);

    let writer = Writer::start(url.clone());
    let connector = Connector::start(url.clone());
    writer.wait_more(10).await;
    connector.wait_more(5).await;
    let op = upgrade(&control, &id, request_upgrade(&v18, None)).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    // The old cluster is stopped but kept (the rollback window is 30 s).
    for port in &old_ports {
        assert!(!accepts(*port), "old node on port {port} still accepts connections");
    }
    for name in &old_names {
        assert!(control.node_data_dir(name).exists(), "old node {name} removed too early");
    }
    connector.wait_more(5).await;
    let outcomes = connector.stop().await;
    let acked = writer.stop().await;
    assert_no_failed(&outcomes, "major upgrade");

    // Every acknowledged insert is on the new cluster; writes went on during the copy.
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());
    assert!(acked.len() > 10, "the writer wrote through the upgrade: {} acks", acked.len());

    // Both new nodes run 18, synchronous; the database reports it.
    let db = control.wait_synchronous(&id, "the new cluster, synchronous").await;
    assert_eq!(db["status"], "running");
    let names = node_names(&db);
    assert!(names.iter().all(|n| !old_names.contains(n)), "new nodes: {names:?} vs {old_names:?}");
    let versions = first_words(control.sql_on_every_node(&db, "SHOW server_version"));
    assert_eq!(versions, vec![v18.clone(), v18.clone()]);
    let reported: Vec<&str> =
        db["nodes"].as_array().unwrap().iter().map(|n| n["version"].as_str().unwrap()).collect();
    assert_eq!(reported, [v18.as_str(), v18.as_str()], "{db}");
    // The standby has the data too.
    let on_standby: Vec<String> = db["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let dir = control.node_data_dir(n["name"].as_str().unwrap());
            let conninfo = format!(
                "host='{}' port={} user=postgres dbname={}",
                dir.parent().unwrap().display(),
                n["port"],
                db["name"].as_str().unwrap()
            );
            psql(&conninfo, None, "SELECT count(*) FROM items").stdout.trim().to_owned()
        })
        .collect();
    assert_eq!(on_standby, ["5000", "5000"]);

    // The sequence goes on from the old value; the read-only user logs in with its password and
    // is still read-only.
    let next = psql(&url, None, "INSERT INTO items(body) VALUES ('after') RETURNING id");
    assert!(next.success && next.stdout.trim().starts_with("5001"), "{}", next.stdout);
    let read = psql(&reader_url, None, "SELECT count(*) FROM items");
    assert!(read.success && read.stdout.trim().starts_with("5001"), "{}", read.stderr);
    let write = psql(&reader_url, None, "INSERT INTO items(body) VALUES ('no')");
    assert!(!write.success && write.stderr.contains("permission denied"), "{}", write.stderr);

    // The old cluster is removed when the rollback window ends (it was kept, checked above).
    control.wait_event(&id, "old_cluster_removed").await;
    let dirs = pgwarden_e2e::node_data_dirs(&control.data);
    for name in &old_names {
        let prefix = format!("{name}.");
        assert!(
            !dirs.iter().any(|d| d
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))),
            "old node {name} still on disk"
        );
    }
    // PITR goes on on the new cluster: WAL streams from its primary, a new base backup is taken.
    let new_primary = format!("streaming WAL from {}", names[0]);
    wait_until("PITR going on on the new cluster", Duration::from_secs(60), async || {
        let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
        let events = events.json();
        let list = events.as_array().unwrap();
        let switched = list.iter().position(|e| e["kind"] == "switched_cluster").unwrap();
        let archiving = list.iter().any(|e| e["message"] == new_primary.as_str());
        let base = list[switched..].iter().any(|e| e["kind"] == "base_backup");
        if archiving && base {
            Ok(())
        } else {
            Err(events.to_string())
        }
    })
    .await;
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    let kinds = event_kinds(&events);
    for kind in [
        "engine_upgrade_started",
        "schema_copied",
        "replication_caught_up",
        "switched_cluster",
        "old_cluster_stopped",
        "engine_upgraded",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "missing event {kind}: {kinds:?}");
    }
    // Back to 15 is a downgrade.
    let r = control.request("POST", &path, Some(request_upgrade("15.18", None))).await;
    assert_eq!(r.status, 422, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_past_its_hold_budget_is_abandoned_and_a_later_upgrade_of_the_single_node_succeeds()
{
    let Some((control, v18)) = control_with_18(Duration::from_secs(86_400)).await else { return };
    let (id, url) = create(&control, "budget", "postgresql-sandbox").await;
    assert!(
        psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY); INSERT INTO w VALUES (1)").success
    );
    let before = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();

    // A budget of 1 ms cannot be met: the swap is abandoned once the old database stopped
    // taking sessions (an established one ends), and everything is put back.
    let (session, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    let established = tokio::spawn(connection);
    let op = upgrade(&control, &id, request_upgrade(&v18, Some(1))).await;
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("abandoned") && error.contains("hold budget 1 ms"), "{error}");
    let ended = tokio::time::timeout(Duration::from_secs(5), established).await.unwrap().unwrap();
    let err = ended.expect_err("the established session ended with the old database's writes");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{err:?}");
    drop(session);
    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(db["status"], "running");
    assert_eq!(node_names(&db), node_names(&before));
    let version = psql(&url, None, "SHOW server_version");
    assert!(version.stdout.trim().starts_with("15."), "{}", version.stdout);
    // Writes go on at once (the connection limit is back), and nothing of the upgrade is left.
    assert!(psql(&url, None, "INSERT INTO w VALUES (2)").success);
    let left = control.sql_on_every_node(
        &db,
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgwarden_upgrade') \
         || ',' || (SELECT count(*) FROM pg_roles WHERE rolname = 'pgwarden_upgrader') \
         || ',' || (SELECT datconnlimit FROM pg_database WHERE datname = current_user)",
    );
    assert_eq!(left, ["0,0,-1"]);
    let names: Vec<String> = pgwarden_e2e::node_data_dirs(&control.data)
        .iter()
        .filter_map(|d| Some(d.parent()?.file_name()?.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(names.len(), 1, "the abandoned cluster's nodes are gone: {names:?}");

    // With the default budget the single node moves to 18; new connections only wait.
    let connector = Connector::start(url.clone());
    let op = upgrade(&control, &id, request_upgrade(&v18, None)).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let outcomes = connector.stop().await;
    assert_no_failed(&outcomes, "single-node major upgrade");
    let out = psql(&url, None, "SELECT string_agg(n::text, ',' ORDER BY n) FROM w");
    assert_eq!(out.stdout.trim(), "1,2");
    let version = psql(&url, None, "SHOW server_version");
    assert!(version.stdout.trim().starts_with(&v18), "{}", version.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_logical_wal_is_refused_before_anything_moves() {
    let Some(engines) = engines_dir() else {
        println!("SKIPPED: no engines directory (run scripts/setup.sh)");
        return;
    };
    // Nodes started before pgwarden set wal_level=logical: the operator's setting stands in.
    let settings = vec![("wal_level".to_owned(), "replica".to_owned())];
    let control = TestControl::start_full(settings, Vec::new(), "data", Some(engines)).await;
    let list = control.request("GET", "/v1/engines", None).await.json();
    let Some(v18) = list.as_array().unwrap().iter().find(|e| e["major"] == 18).cloned() else {
        println!("SKIPPED: no PostgreSQL 18 build installed (scripts/setup.sh --engines)");
        return;
    };
    let (id, _) = create(&control, "replica", "postgresql-sandbox").await;
    let before = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    let path = format!("/v1/databases/{id}/engine-upgrade");
    let r = control.request("POST", &path, Some(json!({"version": v18["version"]}))).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (409, Some("restart_needed")));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("wal_level"), "{}", r.body);
    let after = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(node_names(&after), node_names(&before));
    assert_eq!(pgwarden_e2e::node_data_dirs(&control.data).len(), 1, "nothing was created");
}

/// A database whose nodes run on node agents (127.0.0.2 and 127.0.0.3) moves to 18 as well:
/// the roles and the schema are copied through the agents' SQL tunnels, the new nodes are made
/// on the agents, and the writes through the proxy go on with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_on_node_agents_moves_to_postgresql_18_with_its_users_and_data() {
    let Some(engines) = engines_dir() else {
        println!("SKIPPED: no engines directory (run scripts/setup.sh)");
        return;
    };
    let control =
        TestControl::start_on_agents_with(&["127.0.0.2", "127.0.0.3"], Some(engines)).await;
    let Some((control, v18)) = newest_18(control).await else { return };
    let (id, url) = create(&control, "remote", "postgresql-business-512").await;
    let reader_url = items_and_reader(&control, &id, &url, 2000).await;
    let old_names =
        node_names(&control.request("GET", &format!("/v1/databases/{id}"), None).await.json());

    let writer = Writer::start(url.clone());
    writer.wait_more(10).await;
    let op = upgrade(&control, &id, request_upgrade(&v18, None)).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());
    assert!(acked.len() > 10, "the writer wrote through the upgrade: {} acks", acked.len());

    // The new nodes are on the agents, under their root, and run 18.
    let db = control.wait_synchronous(&id, "the new cluster, synchronous").await;
    let names = node_names(&db);
    assert!(names.iter().all(|n| !old_names.contains(n)), "new nodes: {names:?} vs {old_names:?}");
    for node in db["nodes"].as_array().unwrap() {
        assert_eq!(node["version"].as_str(), Some(v18.as_str()), "{db}");
        assert!(["127.0.0.2", "127.0.0.3"].contains(&node["host"].as_str().unwrap()), "{db}");
        let dir = control.node_data_dir(node["name"].as_str().unwrap());
        assert!(dir.starts_with(control.agent_root()), "{}", dir.display());
    }
    let version = psql(&url, None, "SHOW server_version");
    assert!(version.stdout.trim().starts_with(&v18), "{}", version.stdout);
    // The data and the read-only user came along; nothing of the copy is left behind.
    let read = psql(&reader_url, None, "SELECT count(*) FROM items");
    assert!(read.success && read.stdout.trim() == "2000", "{} {}", read.stdout, read.stderr);
    let write = psql(&reader_url, None, "INSERT INTO items(body) VALUES ('no')");
    assert!(!write.success && write.stderr.contains("permission denied"), "{}", write.stderr);
    let scratch: Vec<String> = std::fs::read_dir(control.data.join("backups/.scratch"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> =
        scratch.iter().filter(|f| f.starts_with("socket-") || f.starts_with("upgrade-")).collect();
    assert!(left.is_empty(), "the copy left {left:?}");
}
