//! Business plans: a standby built with pg_basebackup, streaming over TLS, synchronous.

use std::time::Duration;

use pgwarden_e2e::{psql, wait_until, TestControl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_database_has_a_synchronous_standby_streaming_over_tls() {
    let control = TestControl::start().await;
    let db = control.create_database("shop", "postgresql-business-512").await;
    let nodes = db["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{db}");
    assert_eq!(nodes[0]["role"], "primary");
    assert_eq!(nodes[1]["role"], "replica");
    assert!(nodes.iter().all(|n| n["status"] == "running"), "{db}");
    let standby_name = nodes[1]["name"].as_str().unwrap().to_owned();
    let (name, url) =
        (db["name"].as_str().unwrap().to_owned(), db["database_url"].as_str().unwrap().to_owned());
    control.wait_routed(&name, true).await;
    let routes = control
        .proxy
        .admin_request("GET", "/v1/routes", Some(&control.proxy.token.clone()), None)
        .await
        .json();
    let replica_addr = format!("127.0.0.1:{}", nodes[1]["port"]);
    assert_eq!(routes["databases"][&name]["replicas"][0], replica_addr.as_str());

    // Written through the proxy on the primary, committed synchronously.
    let out = psql(&url, None, "CREATE TABLE orders(id int); INSERT INTO orders SELECT generate_series(1, 100); SHOW synchronous_standby_names");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("\"{standby_name}\""));

    // pg_stat_replication and pg_stat_ssl on the primary: the standby streams over TLS, sync.
    let superuser = node_conninfo(&control, &db, 0);
    let out = psql(
        &superuser,
        None,
        "SELECT r.application_name, r.state, r.sync_state, s.ssl, s.version FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    );
    assert!(out.success, "{}", out.stderr);
    // The PITR archiver (pg_receivewal) streams too, asynchronously; rows come in any order.
    let rows = out.stdout.trim().to_owned();
    let standby_row = rows.lines().find(|r| r.starts_with(&format!("{standby_name}|")));
    assert!(
        standby_row
            .is_some_and(|r| r.starts_with(&format!("{standby_name}|streaming|sync|t|TLSv1."))),
        "{rows}"
    );

    // The standby has the rows (it is a hot standby, read-only).
    let standby = node_conninfo(&control, &db, 1);
    wait_until("the standby caught up", Duration::from_secs(10), async || {
        let out = psql(
            &format!("{standby} dbname={name}"),
            None,
            "SELECT count(*), pg_is_in_recovery() FROM orders",
        );
        if out.success && out.stdout.trim() == "100|t" {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await;
    // Replication without TLS is refused by the primary's pg_hba.
    let plain = format!(
        "host=127.0.0.1 port={} user=pgwarden_replicator dbname=replication replication=true sslmode=disable password=x",
        nodes[0]["port"]
    );
    let out = psql(&plain, None, "IDENTIFY_SYSTEM");
    assert!(!out.success && out.stderr.contains("no encryption"), "{}", out.stderr);
}

/// Superuser conninfo on the node's private Unix socket (the test runs as root, like pgwarden).
fn node_conninfo(control: &TestControl, db: &serde_json::Value, index: usize) -> String {
    let node = &db["nodes"][index];
    let dir = node_dir(control, node["name"].as_str().unwrap());
    format!("host={} port={} user=postgres dbname=postgres", dir.display(), node["port"])
}

fn node_dir(control: &TestControl, name: &str) -> std::path::PathBuf {
    let nodes = control.dir.path().join("data/nodes");
    std::fs::read_dir(&nodes)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}.")))
        .unwrap_or_else(|| panic!("no directory for node {name} in {}", nodes.display()))
}
