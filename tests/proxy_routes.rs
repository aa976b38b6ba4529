//! The proxy's admin API and routing table: hot swaps, refused tables, certificate reload and
//! graceful shutdown, against real PostgreSQL nodes.

use std::time::{Duration, Instant};

use pgwarden_e2e::{let_time_pass, psql, wait_until, PgNode, TestCerts, TestProxy, TEST_PASSWORD};
use pgwarden_proxy::config::Limits;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

async fn connect(proxy: &TestProxy, database: &str) -> tokio_postgres::Client {
    let conninfo = proxy.conninfo(database, "app", &format!("password={TEST_PASSWORD}"));
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// A session whose connection task is kept: an idle session ended by the proxy learns it
/// through the connection's result (the FATAL arrives while no query is pending).
async fn connect_watched(
    proxy: &TestProxy,
    database: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) {
    let conninfo = proxy.conninfo(database, "app", &format!("password={TEST_PASSWORD}"));
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.expect("connect");
    (client, tokio::spawn(connection))
}

async fn assert_ended_with_57p01(
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    message: &str,
) {
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    let err =
        ended.expect("session not ended").unwrap().expect_err("session must end with an error");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains(message), "{err:?}");
}

/// The node's port, by a simple query: an extended-protocol query would leave the statement's
/// `Close` in flight after it returns, and an error that ends the session then answers that
/// `Close` instead of reaching the connection.
async fn server_port(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let messages = client.simple_query("SELECT inet_server_port()").await?;
    let port = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    Ok(port.expect("one row").parse().expect("a port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_sends_new_sessions_to_the_new_primary_and_ends_old_ones() {
    let (a, b) = (PgNode::start(), PgNode::start());
    b.superuser_sql("CREATE DATABASE other OWNER app");
    a.superuser_sql("CREATE DATABASE other OWNER app");
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &a.address(), false), ("other", &a.address(), false)]).await;

    let (on_old, on_old_connection) = connect_watched(&proxy, "app").await;
    assert_eq!(server_port(&on_old).await.unwrap(), a.port as i32);
    let (unaffected, unaffected_connection) = connect_watched(&proxy, "other").await;
    // A session in the middle of a transaction when the primary moves.
    on_old.batch_execute("BEGIN; CREATE TEMP TABLE t(x int)").await.unwrap();

    proxy.route(2, &[("app", &b.address(), false), ("other", &a.address(), false)]).await;

    assert_ended_with_57p01(on_old_connection, "primary of database \"app\" moved").await;
    assert!(server_port(&on_old).await.is_err());
    let fresh = connect(&proxy, "app").await;
    assert_eq!(server_port(&fresh).await.unwrap(), b.port as i32);
    assert_eq!(
        server_port(&unaffected).await.unwrap(),
        a.port as i32,
        "unchanged route, session kept"
    );
    assert_eq!(
        proxy.metric("pgwarden_proxy_sessions_terminated_total{reason=\"primary_moved\"}").await,
        1.0
    );
    assert_eq!(proxy.metric("pgwarden_proxy_epoch").await, 2.0);

    // Removing a database ends its sessions too, and new ones get 3D000.
    proxy.route(3, &[("app", &b.address(), false)]).await;
    assert_ended_with_57p01(unaffected_connection, "primary of database \"other\" moved").await;
    let conninfo = proxy.conninfo("other", "app", &format!("password={TEST_PASSWORD}"));
    let Err(err) = tokio_postgres::connect(&conninfo, NoTls).await else {
        panic!("a removed database must not be routed");
    };
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME));
}

/// A change (`PATCH /v1/routes`) moves the databases it names and nothing else; one from an
/// epoch the proxy does not hold is refused with 409, and the proxy keeps its table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_moves_only_the_databases_it_names() {
    let (a, b) = (PgNode::start(), PgNode::start());
    b.superuser_sql("CREATE DATABASE other OWNER app");
    a.superuser_sql("CREATE DATABASE other OWNER app");
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &a.address(), false), ("other", &a.address(), false)]).await;
    let (_on_old, on_old_connection) = connect_watched(&proxy, "app").await;
    let (unaffected, _unaffected_connection) = connect_watched(&proxy, "other").await;
    let patch = |body: serde_json::Value| {
        proxy.admin_request("PATCH", "/v1/routes", Some(&proxy.token), Some(body.to_string()))
    };

    let moved = patch(serde_json::json!({"base_epoch": 1, "epoch": 2,
        "set": {"app": {"primary": b.address()}}}))
    .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_ended_with_57p01(on_old_connection, "primary of database \"app\" moved").await;
    assert_eq!(server_port(&connect(&proxy, "app").await).await.unwrap(), b.port as i32);
    assert_eq!(server_port(&unaffected).await.unwrap(), a.port as i32, "untouched, kept");
    let table = proxy.admin_request("GET", "/v1/routes", Some(&proxy.token), None).await.json();
    assert_eq!(table["epoch"], 2);
    assert_eq!(table["databases"]["other"]["primary"], a.address());

    // From an epoch it does not hold: refused, the table unchanged.
    let stale = patch(serde_json::json!({"base_epoch": 1, "epoch": 3, "remove": ["other"]})).await;
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert_eq!(stale.json()["error"]["code"], "base_epoch_mismatch");
    assert_eq!(server_port(&unaffected).await.unwrap(), a.port as i32);
    let bad = patch(
        serde_json::json!({"base_epoch": 2, "epoch": 3, "set": {"x": {"primary": "nohost"}}}),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    let removed =
        patch(serde_json::json!({"base_epoch": 2, "epoch": 3, "remove": ["other"]})).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    let conninfo = proxy.conninfo("other", "app", &format!("password={TEST_PASSWORD}"));
    let Err(err) = tokio_postgres::connect(&conninfo, NoTls).await else {
        panic!("a removed database must not be routed");
    };
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME));
    assert_eq!(proxy.metric("pgwarden_proxy_epoch").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ended_mid_result_gets_the_error_after_a_whole_message() {
    use futures_util::{pin_mut, StreamExt};
    let (a, b) = (PgNode::start(), PgNode::start());
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &a.address(), false)]).await;
    let client = connect(&proxy, "app").await;
    // Rows of odd sizes, read slowly: when the swap lands the proxy holds a partly relayed row.
    let sql = "SELECT repeat('x', 997 + i % 13) FROM generate_series(1, 1000000) i";
    let rows = client.query_raw(sql, std::iter::empty::<i32>()).await.expect("query");
    pin_mut!(rows);
    for _ in 0..1000 {
        rows.next().await.expect("row").expect("row");
    }
    proxy.route(2, &[("app", &b.address(), false)]).await;
    let mut received = 1000;
    let err = loop {
        match rows.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(e)) => break e,
            None => panic!("result completed: the swap did not end the session"),
        }
        if received % 1000 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    // A torn message would surface as a protocol or I/O error, not as the proxy's FATAL.
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?} after {received} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_requests_and_keeps_the_table() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(5, &[("app", &node.address(), false)]).await;
    let valid = r#"{"epoch": 9, "databases": {"app": {"primary": "127.0.0.1:1"}}}"#.to_owned();

    let r = proxy.admin_request("PUT", "/v1/routes", None, Some(valid.clone())).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    let r = proxy.admin_request("PUT", "/v1/routes", Some("wrong"), Some(valid.clone())).await;
    assert_eq!(r.status, 401);
    let r = proxy.admin_request("GET", "/v1/routes", None, None).await;
    assert_eq!(r.status, 401);

    let token = Some(proxy.token.as_str());
    let r = proxy.admin_request("PUT", "/v1/routes", token, Some("{not json".into())).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_routing_table");
    let bad_addr = r#"{"epoch": 9, "databases": {"app": {"primary": "127.0.0.1"}}}"#;
    let r = proxy.admin_request("PUT", "/v1/routes", token, Some(bad_addr.into())).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("host:port"), "{}", r.body);
    let unknown_key =
        r#"{"epoch": 9, "databases": {"app": {"primary": "127.0.0.1:1", "forcetls": true}}}"#;
    let r = proxy.admin_request("PUT", "/v1/routes", token, Some(unknown_key.into())).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("forcetls"), "{}", r.body);

    let stale = r#"{"epoch": 5, "databases": {}}"#;
    let r = proxy.admin_request("PUT", "/v1/routes", token, Some(stale.into())).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "stale_epoch");

    // Nothing changed: same epoch, same table, sessions still routed.
    let r = proxy.admin_request("GET", "/v1/routes", token, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["epoch"], 5);
    assert_eq!(r.json()["databases"]["app"]["primary"], node.address());
    let client = connect(&proxy, "app").await;
    assert_eq!(server_port(&client).await.unwrap(), node.port as i32);

    let health = proxy.admin_request("GET", "/health", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({"role": "active", "epoch": 5}));
    assert_eq!(proxy.admin_request("GET", "/active", None, None).await.status, 200);
    let metrics = proxy.admin_request("GET", "/metrics", None, None).await.body;
    for name in [
        "pgwarden_proxy_client_connections",
        "pgwarden_proxy_connections_accepted_total",
        "pgwarden_proxy_connections_rejected_total",
        "pgwarden_proxy_tls_handshakes_total",
        "pgwarden_proxy_backend_connect_seconds_bucket",
        "pgwarden_proxy_bytes_total",
        "pgwarden_proxy_epoch 5",
        "pgwarden_proxy_route_updates_total{result=\"stale_epoch\"} 1",
        "pgwarden_proxy_route_updates_total{result=\"invalid\"} 3",
        "pgwarden_proxy_route_updates_total{result=\"unauthorized\"} 2",
        "pgwarden_proxy_role{role=\"active\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let verify = |ca: &std::path::Path| {
        format!(
            "host=localhost port={} dbname=app user=app sslmode=verify-full sslrootcert={}",
            proxy.port(),
            ca.display()
        )
    };
    let established = connect(&proxy, "app").await;

    let new_ca = pgwarden_certs::Ca::generate().unwrap();
    let new_ca_path = certs.dir.path().join("new-ca.crt");
    std::fs::write(&new_ca_path, new_ca.cert_pem()).unwrap();
    certs.reissue_server(&new_ca);
    // Before the signal, handshakes still use the old certificate.
    assert!(psql(&verify(&certs.ca_path()), Some(TEST_PASSWORD), "SELECT 1").success);

    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("the new certificate served", Duration::from_secs(5), async || {
        let out = psql(&verify(&new_ca_path), Some(TEST_PASSWORD), "SELECT 1");
        if out.success {
            Ok(())
        } else {
            Err(out.stderr)
        }
    })
    .await;
    assert!(!psql(&verify(&certs.ca_path()), Some(TEST_PASSWORD), "SELECT 1").success);
    server_port(&established).await.expect("session opened before the reload still works");

    // A broken certificate file is refused and the current one stays in use.
    std::fs::write(certs.cert_path(), "garbage").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(psql(&verify(&new_ca_path), Some(TEST_PASSWORD), "SELECT 1").success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_sessions_finish_then_ends_them_with_57p01() {
    let node = PgNode::start();
    let limits = Limits { shutdown_grace_secs: 1.5, ..Limits::default() };
    let mut proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    // An idle session: its connection ends with the proxy's FATAL error.
    let (_idle, idle_connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    let idle_end = tokio::spawn(idle_connection);
    let short = connect(&proxy, "app").await;
    let long = connect(&proxy, "app").await;
    let in_grace =
        tokio::spawn(async move { short.simple_query("SELECT pg_sleep(0.5)").await.map(|_| ()) });
    let past_grace =
        tokio::spawn(async move { long.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = Instant::now();
    let addr = proxy.addr;
    let stop = tokio::spawn(async move { proxy.stop().await });
    wait_until("the draining proxy refusing new clients", Duration::from_secs(5), async || {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepted".to_owned()),
        }
    })
    .await;
    in_grace.await.unwrap().expect("a query in progress finishes during the grace period");

    stop.await.unwrap().expect("clean exit");
    let elapsed = stopping.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    let err = past_grace.await.unwrap().expect_err("ended after the grace period");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let err = idle_end.await.unwrap().expect_err("idle session ended");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
}

/// Connects (however long the proxy makes it wait) and answers the node's port.
async fn port_once_connected(conninfo: String) -> Result<i32, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    server_port(&client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_sessions_wait_then_get_57p03_or_go_through() {
    let (a, b) = (PgNode::start(), PgNode::start());
    let limits = Limits { hold_timeout_secs: 1.0, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &a.address(), false)]).await;
    let established = connect(&proxy, "app").await;
    let hold = |epoch: u64, primary: String| {
        serde_json::json!({"epoch": epoch, "databases": {"app": {"primary": primary, "hold": true}}}).to_string()
    };
    let token = Some(proxy.token.clone());
    let r = proxy
        .admin_request("PUT", "/v1/routes", token.as_deref(), Some(hold(2, a.address())))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        server_port(&established).await.unwrap(),
        a.port as i32,
        "established session untouched"
    );

    // Past the bound: 57P03.
    let started = Instant::now();
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let Err(err) = tokio_postgres::connect(&conninfo, NoTls).await else {
        panic!("held session went through")
    };
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("switching"), "{err:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(950) && waited < Duration::from_secs(10), "{waited:?}");

    // Released within the bound: the session goes to the new primary.
    let waiting = tokio::spawn(port_once_connected(conninfo.clone()));
    // Time must pass: the held session is still waiting a while later.
    let_time_pass(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "held session must wait");
    proxy.route(3, &[("app", &b.address(), false)]).await;
    assert_eq!(waiting.await.unwrap().unwrap(), b.port as i32);
    assert_eq!(
        proxy.metric("pgwarden_proxy_connections_rejected_total{reason=\"hold_timeout\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_to_an_unreachable_primary_waits_for_the_failover_or_gets_57p03() {
    let b = PgNode::start();
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let limits = Limits { hold_timeout_secs: 1.5, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &dead, false)]).await;
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));

    // The failover's table arrives while the session waits: it lands on the new primary.
    let waiting = tokio::spawn(port_once_connected(conninfo.clone()));
    // Time must pass: the session is still waiting a while later.
    let_time_pass(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "the session must wait for a new primary");
    proxy.route(2, &[("app", &b.address(), false)]).await;
    assert_eq!(waiting.await.unwrap().unwrap(), b.port as i32);

    // No new table within the bound: 57P03, with a sentence.
    proxy.route(3, &[("app", &dead, false)]).await;
    let started = Instant::now();
    let Err(err) = tokio_postgres::connect(&conninfo, NoTls).await else {
        panic!("a session reached a primary that is down")
    };
    let waited = started.elapsed();
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("no primary is reachable"), "{err:?}");
    assert!(waited >= Duration::from_millis(1400), "refused before the bound: {waited:?}");
    assert_eq!(
        proxy.metric("pgwarden_proxy_connections_rejected_total{reason=\"no_primary\"}").await,
        1.0
    );
}
