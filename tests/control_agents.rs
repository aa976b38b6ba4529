//! Node agents: `pgwarden agent` processes own the nodes of their "hosts" (loopback addresses
//! 127.0.0.2 and 127.0.0.3 here; network namespaces come with the multi-host tests), and the
//! control plane drives them over mutual TLS. A business database gets its primary on one
//! agent and its standby on the other; clients reach it through the proxy; a switchover and a
//! failover (kill -9 of the primary's postmaster) work across the agents.

use std::time::Duration;

use pgwarden_e2e::{let_time_pass, psql, wait_until, TestControl};
use serde_json::Value;

fn nodes(db: &Value) -> Vec<Value> {
    db["nodes"].as_array().unwrap().clone()
}

fn role_host(db: &Value, role: &str) -> String {
    nodes(db).iter().find(|n| n["role"] == role).unwrap()["host"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_database_runs_on_two_agents_and_fails_over_across_them() {
    let control = TestControl::start_on_agents(&["127.0.0.2", "127.0.0.3"]).await;
    let (_, id, url) = control.create_routed_database("spread", "postgresql-business-512").await;
    let db = control.wait_synchronous(&id, "a synchronous standby on the other agent").await;
    let hosts: Vec<String> =
        nodes(&db).iter().map(|n| n["host"].as_str().unwrap().to_owned()).collect();
    let mut sorted = hosts.clone();
    sorted.sort();
    assert_eq!(sorted, ["127.0.0.2", "127.0.0.3"], "one node per agent: {db}");
    for node in nodes(&db) {
        let dir = control.node_data_dir(node["name"].as_str().unwrap());
        assert!(dir.starts_with(control.agent_root()), "{} is the agent's", dir.display());
    }

    // Clients through the proxy reach the primary on its agent's address.
    let out = psql(
        &url,
        None,
        "CREATE TABLE t(n int); INSERT INTO t VALUES (1); SELECT inet_server_addr()",
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), role_host(&db, "primary"), "{}", out.stdout);

    // Stats come from the agents: each node's container (or why it has none) and its files.
    wait_until("stats from the agents", Duration::from_secs(40), async || {
        let stats = control.request("GET", &format!("/v1/databases/{id}/stats"), None).await;
        let sampled = stats.status == 200
            && stats.json()["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == 2
                    && nodes.iter().all(|n| {
                        let contained = n["memory"]["limit"] == 512 * 1024 * 1024
                            || n["container"]["unlimited_reason"].is_string();
                        contained && n["disk"]["total"].as_u64().unwrap_or(0) > 0
                    })
            });
        if sampled {
            Ok(())
        } else {
            Err(stats.body)
        }
    })
    .await;

    // A backup: pg_dump runs on the standby's agent, the archive streams to the control
    // plane's storage with its SHA-256 and reads back with pg_restore.
    let r = control.request("POST", &format!("/v1/databases/{id}/backups"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let backup = r.json()["backup"]["id"].as_str().unwrap().to_owned();
    let file = control.data.join("backups").join(&id).join(format!("{backup}.dump"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the backup is private");
    let list = std::process::Command::new(pgwarden_e2e::pg_bin("pg_restore"))
        .arg("--list")
        .arg(&file)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("TABLE public t "), "{list:?}");

    // Switchover: the primary moves to the other agent.
    let before = role_host(&db, "primary");
    let r = control.request("POST", &format!("/v1/databases/{id}/switchover"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let db = control.wait_synchronous(&id, "synchronous again after the switchover").await;
    let after = role_host(&db, "primary");
    assert_ne!(before, after, "{db}");
    let out = psql(&url, None, "INSERT INTO t VALUES (2); SELECT inet_server_addr()");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), after);

    // Failover: kill -9 of the primary's postmaster on its agent's host.
    let primary = nodes(&db).into_iter().find(|n| n["role"] == "primary").unwrap();
    let data = control.node_data_dir(primary["name"].as_str().unwrap());
    pgwarden_e2e::kill_postmaster(&data);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let served_by = loop {
        let out = psql(&url, None, "INSERT INTO t VALUES (3); SELECT inet_server_addr()");
        if out.success {
            break out.stdout.trim().to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no failover: {}", out.stderr);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served_by, before, "the standby on the other agent took over");
    let out = psql(&url, None, "SELECT string_agg(n::text, ',' ORDER BY n) FROM t");
    assert_eq!(out.stdout.trim(), "1,2,3", "{}", out.stderr);
    control.wait_event(&id, "failover").await;
    // The old primary comes back as a standby, rewound by its agent from the new primary over
    // TLS, as a role that may log in only while the rewind runs.
    let db = control.wait_synchronous(&id, "the old primary back as a synchronous standby").await;
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
    println!("{db}\n{}", events.body);
    assert!(events.body.contains("(pg_rewind)"), "not rewound: {}", events.body);
    let role = "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'pgwarden_rewinder'";
    let out = psql(&url, None, role);
    assert_eq!(out.stdout.trim(), "f", "the rewind role can still log in: {}", out.stderr);
}

/// `GET /v1/info` from the agent at `addr` with the client certificate of `ca` (or none).
async fn info_with(
    addr: &str,
    ca_pem: &str,
    client: Option<&pgwarden_certs::Ca>,
) -> Result<u16, String> {
    use pgwarden_control::agent::tls::{client_config, Identity};
    use pgwarden_control::httpc::{request_over, Timeouts};
    let config = match client {
        Some(issuer) => {
            let cert = issuer.issue_client("pgwarden-control").unwrap();
            let id = Identity { ca: ca_pem, cert: &cert.cert_pem, key: &cert.key_pem };
            client_config(&id).map_err(|e| e.to_string())?
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let timeouts = Timeouts { connect: Duration::from_secs(3), exchange: Duration::from_secs(5) };
    let get = hyper::Method::GET;
    request_over(addr, Some(&tls), get, "/v1/info", None, None, timeouts)
        .await
        .map(|(status, _)| status.as_u16())
        .map_err(|e| e.to_string())
}

/// Only the control plane's certificate (a client certificate of the platform CA) reaches an
/// agent: no certificate, or one of another CA, is refused in the TLS handshake; plain HTTP
/// gets nothing. Even the control plane cannot have a node placed outside the agent's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answers_only_the_platform_s_control_plane() {
    let mut control = TestControl::start_on_agents(&["127.0.0.2"]).await;
    let addr = control.agents()[0].clone();
    let ca_dir = control.data.join("ca");
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).unwrap();
    let platform = pgwarden_certs::Ca::from_pem(&read("ca.crt"), &read("ca.key")).unwrap();
    let ca_pem = read("ca.crt");

    assert_eq!(info_with(&addr, &ca_pem, Some(&platform)).await, Ok(200));
    let refused = info_with(&addr, &ca_pem, None).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let other = pgwarden_certs::Ca::generate().unwrap();
    let refused = info_with(&addr, &ca_pem, Some(&other)).await;
    assert!(refused.is_err(), "another CA's certificate: {refused:?}");
    let plain = pgwarden_control::httpc::request(
        &addr,
        hyper::Method::GET,
        "/v1/info",
        None,
        None,
        pgwarden_control::httpc::Timeouts {
            connect: Duration::from_secs(3),
            exchange: Duration::from_secs(5),
        },
    )
    .await;
    assert!(plain.is_err(), "plain HTTP: {plain:?}");

    // A node whose directory is not right under the agent's nodes/ is refused.
    let remote = pgwarden_control::agent::client::RemoteDriver::new(&platform).unwrap();
    let node = pgwarden_control::nodes::driver::NodeSpec {
        name: "x".into(),
        dir: "/etc/x".into(),
        host: "127.0.0.2".into(),
        port: 1,
        bin: None,
        agent: Some(addr.clone()),
    };
    use pgwarden_control::nodes::driver::NodeDriver;
    let message = remote.destroy(&node).await.expect_err("refused").to_string();
    assert!(message.contains("keeps its nodes right under"), "{message}");

    // Once a control plane of a newer leadership term called, an older one changes nothing
    // (a leader frozen and resumed); reads and fencing still answer it.
    let ghost = pgwarden_control::nodes::driver::NodeSpec {
        name: "ghost".into(),
        dir: control.agent_root().join("nodes/ghost"),
        host: "127.0.0.2".into(),
        port: 1,
        bin: None,
        agent: Some(addr.clone()),
    };
    let reload = async |term: i64| {
        let remote = pgwarden_control::agent::client::RemoteDriver::new(&platform)
            .unwrap()
            .with_term(Some(term));
        (
            remote.reload(&ghost).await.expect_err("no such node").to_string(),
            remote.is_running(&ghost).await,
        )
    };
    let (newer, _) = reload(10).await;
    assert!(!newer.contains("newer control plane"), "{newer}");
    let (older, running) = reload(9).await;
    assert!(older.contains("a newer control plane leads (term 10"), "{older}");
    assert!(!running);
    let (same, _) = reload(10).await;
    assert!(!same.contains("newer control plane"), "{same}");
    // A restarted agent remembers the newest term.
    control.restart_agent(&addr).await;
    let remote =
        pgwarden_control::agent::client::RemoteDriver::new(&platform).unwrap().with_term(Some(9));
    let older = remote.reload(&ghost).await.expect_err("refused").to_string();
    assert!(older.contains("a newer control plane leads (term 10"), "{older}");
}

/// Waits until the PITR window of `id` reaches `until`.
async fn window_reaching(control: &TestControl, id: &str, until: time::OffsetDateTime) {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    wait_until(&format!("the PITR window reaching {until}"), Duration::from_secs(90), async || {
        let r = control.request("GET", &format!("/v1/databases/{id}/pitr"), None).await;
        let latest = r.json()["latest"].as_str().map(|t| time::OffsetDateTime::parse(t, rfc3339));
        if r.status == 200 && latest.is_some_and(|l| l.is_ok_and(|l| l >= until)) {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await
}

/// Point-in-time recovery onto an agent's host: the base backup and WAL the control plane
/// keeps go to the agent as tar streams, and the database comes back as it was at the target,
/// on a new node under the agent, through the same URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_on_an_agent_is_restored_to_a_point_in_time_there() {
    let control = TestControl::start_on_agents(&["127.0.0.2"]).await;
    let (db, id, url) = control.create_routed_database("ledger", "postgresql-starter-512").await;
    window_reaching(&control, &id, time::OffsetDateTime::now_utc()).await;
    assert!(psql(&url, None, "CREATE TABLE t(v text); INSERT INTO t VALUES ('t1')").success);
    let_time_pass(Duration::from_millis(1500)).await;
    let target = time::OffsetDateTime::now_utc();
    let_time_pass(Duration::from_millis(1500)).await;
    assert!(psql(&url, None, "INSERT INTO t VALUES ('t2')").success);
    window_reaching(&control, &id, time::OffsetDateTime::now_utc()).await;

    let target = target.format(&time::format_description::well_known::Rfc3339).unwrap();
    let body = serde_json::json!({ "target_time": target });
    let r = control.request("POST", &format!("/v1/databases/{id}/restore"), Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let after = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    let node = &after["nodes"][0];
    assert_ne!(node["name"], db["nodes"][0]["name"], "restored on a new node");
    assert_eq!(node["host"], "127.0.0.2", "{after}");
    let dir = control.node_data_dir(node["name"].as_str().unwrap());
    assert!(dir.starts_with(control.agent_root()), "{}", dir.display());
    let out = psql(&url, None, "SELECT string_agg(v, ',' ORDER BY v) FROM t");
    assert_eq!(out.stdout.trim(), "t1", "{}", out.stderr);
    let staging = control.agent_root().join("staging");
    let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the staging area is emptied");
}
