//! The proxy reaches nodes over TLS verified against the nodes' CA (`node_ca` in the routing
//! table): a node whose certificate another CA signed, or that names another host, gets no
//! session; the relayed exchange still works (SCRAM offered without -PLUS).

use pgwarden_api::{DatabaseRoute, RoutingTable};
use pgwarden_certs::Ca;
use pgwarden_e2e::{
    plain_route, psql, wait_running, NodeOptions, PgNode, TestCerts, TestProxy, TEST_PASSWORD,
};
use pgwarden_proxy::config::Limits;

fn table(epoch: u64, primary: &str, node_ca: &Ca) -> RoutingTable {
    let route = plain_route(primary);
    RoutingTable {
        epoch,
        databases: [("app".to_owned(), route)].into(),
        node_ca: Some(node_ca.cert_pem().to_owned()),
    }
}

fn node_with_cert(ca: &Ca, names: &[&str]) -> PgNode {
    let cert = ca.issue_server(names).unwrap();
    PgNode::start_with(NodeOptions {
        tls: Some((cert.cert_pem, cert.key_pem)),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_reached_over_verified_tls_only() {
    let (platform_ca, other_ca) = (Ca::generate().unwrap(), Ca::generate().unwrap());
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // A relayed exchange cannot be bound: the client would bind to the proxy's certificate and
    // the node checks its own. The proxy offers the client unbound SCRAM only, which a client
    // that could bind over TLS takes as a downgrade unless binding is off (a route the control
    // plane publishes carries the users, and the proxy authenticates them itself).
    let conninfo = proxy.conninfo("app", "app", "sslmode=require channel_binding=disable");

    let good = node_with_cert(&platform_ca, &["127.0.0.1"]);
    let r = proxy.put_routes(&table(1, &good.address(), &platform_ca)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = psql(&conninfo, Some(TEST_PASSWORD), sql);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "t", "the proxy's session on the node is not encrypted");
    // In plaintext to the proxy nothing can be bound: unbound SCRAM, relayed over TLS.
    let plaintext = proxy.conninfo("app", "app", "sslmode=disable");
    let out = psql(&plaintext, Some(TEST_PASSWORD), sql);
    assert!(out.success, "{}", out.stderr);

    // Trusting another CA: the node's certificate does not verify.
    let r = proxy.put_routes(&table(2, &good.address(), &other_ca)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = psql(&conninfo, Some(TEST_PASSWORD), sql);
    assert!(!out.success);
    assert!(out.stderr.contains("verified TLS connection"), "{}", out.stderr);

    // Signed by the right CA for another name than the address connected to.
    let misnamed = node_with_cert(&platform_ca, &["db.example"]);
    let r = proxy.put_routes(&table(3, &misnamed.address(), &platform_ca)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = psql(&conninfo, Some(TEST_PASSWORD), sql);
    assert!(!out.success);
    assert!(out.stderr.contains("verified TLS connection"), "{}", out.stderr);

    // A node without TLS at all.
    let plain = PgNode::start();
    let r = proxy.put_routes(&table(4, &plain.address(), &platform_ca)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = psql(&conninfo, Some(TEST_PASSWORD), sql);
    assert!(!out.success);
    assert_eq!(
        proxy.metric("pgwarden_proxy_connections_rejected_total{reason=\"node_tls_failed\"}").await,
        3.0
    );

    // A CA that does not parse is refused with the table.
    let mut bad = table(5, &good.address(), &platform_ca);
    bad.node_ca = Some("not a certificate".into());
    let r = proxy.put_routes(&bad).await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_name_under_the_domain_selects_the_database() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let proxy = TestProxy::start_configured(any, any, |config| {
        config.tls = Some(certs.files());
        config.domain = Some("db.test".into());
    })
    .await;
    let route = DatabaseRoute { id: Some("shop-1234".into()), ..plain_route(&node.address()) };
    let table = RoutingTable { epoch: 1, databases: [("app".into(), route)].into(), node_ca: None };
    assert_eq!(proxy.put_routes(&table).await.status, 200);
    // libpq sends the host name as SNI and connects to hostaddr; the startup packet names no
    // routed database (dbname=app is what the node serves, user "app" would be the default).
    let by_name = |host: &str, dbname: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=app dbname={dbname} sslmode=require \
             channel_binding=disable",
            proxy.port()
        )
    };
    let out = psql(
        &by_name("SHOP-1234.db.test", "app"),
        Some(TEST_PASSWORD),
        "SELECT current_database()",
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "app");
    // The name wins over a startup database the proxy does not route ("postgres"), which the
    // node then serves.
    let sql = "SELECT current_database()";
    let out = psql(&by_name("shop-1234.db.test", "postgres"), Some(TEST_PASSWORD), sql);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "postgres");
    // An unknown id under the domain: 3D000, naming the id.
    let out = psql(&by_name("nope.db.test", "app"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(!out.success);
    assert!(out.stderr.contains("database with id \"nope\""), "{}", out.stderr);
    // Names outside the domain, and plaintext clients, route by the startup packet as before.
    let out = psql(&by_name("localhost", "app"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(out.success, "{}", out.stderr);
    let out = psql(&by_name("other.example", "nothing"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(out.stderr.contains("database \"nothing\" does not exist"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_node_behind_tls() {
    let platform_ca = Ca::generate().unwrap();
    let node = node_with_cert(&platform_ca, &["127.0.0.1"]);
    let proxy = TestProxy::start(Limits::default(), None).await;
    let r = proxy.put_routes(&table(1, &node.address(), &platform_ca)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let (client, connection) =
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let token = client.cancel_token();
    let sleeping =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    wait_running(&conninfo, "SELECT pg_sleep(30)").await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    let err = sleeping.await.unwrap().expect_err("cancelled");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err:?}");
    assert_eq!(
        proxy
            .metric_reaching("pgwarden_proxy_cancel_requests_total{result=\"forwarded\"}", 1.0)
            .await,
        1.0,
        "forwarded to the node over TLS"
    );
}
