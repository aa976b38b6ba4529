//! Clients connecting through the proxy: TLS modes, authentication methods, errors with their
//! SQLSTATEs, cancel requests. Real PostgreSQL 15, real psql and tokio-postgres.

use std::time::{Duration, Instant};

use pgwarden_api::{DatabaseRoute, RoutingTable};
use pgwarden_e2e::{
    plain_route, psql, wait_running, wait_until, NodeOptions, PgNode, TestCerts, TestProxy,
    TEST_PASSWORD,
};
use pgwarden_proxy::config::Limits;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

async fn connect(
    proxy: &TestProxy,
    database: &str,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = proxy.conninfo(database, user, &format!("password={TEST_PASSWORD}"));
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_require_verify_full_and_plaintext() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let query = "SELECT current_user || '@' || current_database()";

    let require = proxy.conninfo("app", "app", "sslmode=require");
    let out = psql(&require, Some(TEST_PASSWORD), query);
    assert!(out.success, "sslmode=require: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "app@app");

    let verify = format!(
        "host=localhost port={} dbname=app user=app sslmode=verify-full sslrootcert={}",
        proxy.port(),
        certs.ca_path().display()
    );
    let out = psql(&verify, Some(TEST_PASSWORD), query);
    assert!(out.success, "sslmode=verify-full: {}", out.stderr);

    // The certificate really is checked: a different CA makes verify-full fail.
    let other = TestCerts::new();
    let wrong_ca = verify
        .replace(&certs.ca_path().display().to_string(), &other.ca_path().display().to_string());
    let out = psql(&wrong_ca, Some(TEST_PASSWORD), query);
    assert!(!out.success);
    assert!(out.stderr.contains("certificate verify failed"), "{}", out.stderr);

    for (min, max) in [("TLSv1.2", "TLSv1.2"), ("TLSv1.3", "TLSv1.3")] {
        let pinned =
            format!("{require} ssl_min_protocol_version={min} ssl_max_protocol_version={max}");
        let out = psql(&pinned, Some(TEST_PASSWORD), query);
        assert!(out.success, "{min}: {}", out.stderr);
    }

    let plain = proxy.conninfo("app", "app", "sslmode=disable");
    let out = psql(&plain, Some(TEST_PASSWORD), query);
    assert!(out.success, "sslmode=disable: {}", out.stderr);
    assert_eq!(proxy.metric("pgwarden_proxy_tls_handshakes_total{result=\"ok\"}").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_certificate_ssl_is_refused_and_prefer_falls_back() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let out =
        psql(&proxy.conninfo("app", "app", "sslmode=prefer"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(out.success, "{}", out.stderr);
    let out =
        psql(&proxy.conninfo("app", "app", "sslmode=require"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(!out.success);
    assert!(out.stderr.contains("server does not support SSL"), "{}", out.stderr);
    // libpq tries GSS encryption first when it can; the proxy answers N and SSL follows.
    let out = psql(
        &proxy.conninfo("app", "app", "gssencmode=prefer sslmode=prefer"),
        Some(TEST_PASSWORD),
        "SELECT 1",
    );
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_tls_refuses_plaintext_with_28000() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    proxy.route(1, &[("app", &node.address(), true)]).await;

    let err = connect(&proxy, "app", "app").await.expect_err("plaintext must be refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{err}");
    let message = err.as_db_error().expect("db error").message().to_owned();
    assert!(
        message.contains("TLS is required") && message.contains("sslmode=require"),
        "{message}"
    );

    let out =
        psql(&proxy.conninfo("app", "app", "sslmode=disable"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(!out.success && out.stderr.contains("sslmode=require"), "{}", out.stderr);
    let out =
        psql(&proxy.conninfo("app", "app", "sslmode=require"), Some(TEST_PASSWORD), "SELECT 1");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        proxy.metric("pgwarden_proxy_connections_rejected_total{reason=\"tls_required\"}").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_and_unreachable_primary_have_their_sqlstates() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    let closed = format!("127.0.0.1:{}", pgwarden_e2e::free_port());
    proxy.route(1, &[("app", &node.address(), false), ("gone", &closed, false)]).await;

    let err = connect(&proxy, "nope", "app").await.expect_err("unknown database");
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    let message = err.as_db_error().expect("db error").message();
    assert_eq!(message, "database \"nope\" does not exist");

    let err = connect(&proxy, "gone", "app").await.expect_err("no primary");
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err}");

    // The proxy is still fine for everyone else.
    let client = connect(&proxy, "app", "app").await.expect("connect");
    client.simple_query("SELECT 1").await.expect("query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_trust_users_authenticate_through_the_proxy() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    assert_eq!(
        node.superuser_sql("SELECT rolname FROM pg_authid WHERE rolpassword LIKE 'md5%'")
            .stdout
            .trim(),
        "md5_user"
    );

    for (user, sslmode) in
        [("app", "disable"), ("app", "require"), ("md5_user", "disable"), ("md5_user", "require")]
    {
        let conninfo = proxy.conninfo("app", user, &format!("sslmode={sslmode}"));
        let out = psql(&conninfo, Some(TEST_PASSWORD), "SELECT current_user");
        assert!(out.success, "{user} {sslmode}: {}", out.stderr);
        assert_eq!(out.stdout.trim(), user);
        let wrong = psql(&conninfo, Some("wrong"), "SELECT 1");
        assert!(!wrong.success);
        assert!(wrong.stderr.contains("password authentication failed"), "{}", wrong.stderr);
    }
    // libpq's default channel_binding=prefer over TLS, and an explicit one.
    let out = psql(
        &proxy.conninfo("app", "app", "sslmode=require channel_binding=prefer"),
        Some(TEST_PASSWORD),
        "SELECT 1",
    );
    assert!(out.success, "{}", out.stderr);
    let out =
        psql(&proxy.conninfo("app", "trust_user", "sslmode=disable"), None, "SELECT current_user");
    assert!(out.success && out.stdout.trim() == "trust_user", "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let sleeper = connect(&proxy, "app", "app").await.expect("connect");
    let bystander = connect(&proxy, "app", "app").await.expect("connect");
    let bystander_sleep =
        tokio::spawn(
            async move { bystander.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) },
        );

    let token = sleeper.cancel_token();
    let started = Instant::now();
    let query =
        tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    wait_running(&conninfo, "SELECT pg_sleep(30)").await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let err = query.await.unwrap().expect_err("query must be cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    // Ended by the cancel, not by the 30 s sleep. (How fast: a benchmark's business.)
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // Only the right backend was cancelled.
    bystander_sleep.await.unwrap().expect("other session untouched");
    assert_eq!(
        proxy
            .metric_reaching("pgwarden_proxy_cancel_requests_total{result=\"forwarded\"}", 1.0)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cancel_with_sigint() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let mut child = std::process::Command::new(pgwarden_e2e::pg_bin("psql"))
        .args(["-X", "-d", &proxy.conninfo("app", "app", ""), "-c", "SELECT pg_sleep(30)"])
        .env("PGPASSWORD", TEST_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    // Wait until the query runs on the node.
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'";
    wait_until("the query running on the node", Duration::from_secs(10), async || {
        let out = node.superuser_sql(running);
        if out.stdout.trim() == "1" {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await;
    let started = Instant::now();
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        let mut s = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut s).unwrap();
        s
    })
    .await
    .unwrap();
    assert!(out.contains("canceling statement due to user request"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients() {
    let node = PgNode::start_with(NodeOptions { max_connections: 260, ..NodeOptions::default() });
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let mut tasks = Vec::new();
    let proxy = std::sync::Arc::new(proxy);
    for i in 0..200i64 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let client = connect(&proxy, "app", "app").await?;
            let row = client.query_one("SELECT $1::int8 * 2, pg_sleep(0.5)::text", &[&i]).await?;
            Ok::<i64, tokio_postgres::Error>(row.get(0))
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().expect("client"), i as i64 * 2);
    }
    assert_eq!(proxy.metric("pgwarden_proxy_connections_accepted_total").await, 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_get_53300() {
    let node = PgNode::start();
    let limits = Limits { max_client_connections: 2, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let a = connect(&proxy, "app", "app").await.expect("first");
    let b = connect(&proxy, "app", "app").await.expect("second");
    let err = connect(&proxy, "app", "app").await.expect_err("third is refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    drop(a);
    // The slot frees once the first session is gone.
    let c = wait_until("the slot freed", Duration::from_secs(5), async || {
        connect(&proxy, "app", "app").await.map_err(|e| e.to_string())
    })
    .await;
    c.simple_query("SELECT 1").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
}

/// A database's own limits (from its plan, in its route): clients at once and new connections
/// per second are refused with 53300 and a message that says which, and another database on the
/// same proxy is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_s_own_limits_refuse_its_clients_with_53300_and_leave_others_alone() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    let table = |epoch: u64, clients: Option<u32>, per_second: Option<u32>| {
        let app = DatabaseRoute {
            client_connections: clients,
            connections_per_second: per_second,
            ..plain_route(&node.address())
        };
        let other = plain_route(&node.address());
        let databases = [("app".to_owned(), app), ("postgres".to_owned(), other)].into();
        RoutingTable { epoch, databases, node_ca: None }
    };
    assert_eq!(proxy.put_routes(&table(1, Some(2), None)).await.status, 200);
    let a = connect(&proxy, "app", "app").await.expect("first");
    let _b = connect(&proxy, "app", "app").await.expect("second");
    let err = connect(&proxy, "app", "app").await.expect_err("third is refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("\"app\"") && message.contains("2 clients at once"), "{message}");
    // The other database has no such limit.
    let others: Vec<_> =
        futures_util::future::join_all((0..5).map(|_| connect(&proxy, "postgres", "app"))).await;
    assert!(others.iter().all(Result::is_ok), "{:?}", others.iter().find(|r| r.is_err()));
    drop(a);
    let c = wait_until("the seat freed", Duration::from_secs(5), async || {
        connect(&proxy, "app", "app").await.map_err(|e| e.to_string())
    })
    .await;
    c.simple_query("SELECT 1").await.unwrap();
    // The third, and any try of the wait above made before the first's seat was given back.
    let metric = "pgwarden_proxy_connections_rejected_total{reason=\"database_client_limit\"}";
    assert!(proxy.metric(metric).await >= 1.0);

    // One new connection a second: of twenty at once, the first goes through, the next five
    // wait their turn (five seconds' worth wait), the others are refused, each after a second
    // (so that a client reconnecting in a loop comes back once a second).
    assert_eq!(proxy.put_routes(&table(2, None, Some(1))).await.status, 200);
    let started = Instant::now();
    let attempts = (0..20).map(|_| async {
        let result = connect(&proxy, "app", "app").await;
        (result, started.elapsed())
    });
    let results = futures_util::future::join_all(attempts).await;
    let took = started.elapsed().as_secs_f64();
    let mut admitted: Vec<Duration> =
        results.iter().filter(|(r, _)| r.is_ok()).map(|(_, at)| *at).collect();
    admitted.sort();
    let refused: Vec<_> =
        results.iter().filter_map(|(r, at)| Some((r.as_ref().err()?, *at))).collect();
    // One from the full bucket, five that waited, and one a second for how long the twenty took
    // to arrive (on a loaded machine).
    assert!(
        (1..=6 + took as usize).contains(&admitted.len()),
        "{} admitted in {took:.2} s",
        admitted.len()
    );
    for (k, at) in admitted.iter().enumerate().skip(1) {
        assert!(*at >= Duration::from_millis(900 * k as u64), "the {k}th waited: {admitted:?}");
    }
    assert!(!refused.is_empty());
    for (err, at) in &refused {
        assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
        let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(message.contains("at most 1 per second"), "{message}");
        assert!(*at >= Duration::from_millis(950), "refused after {at:?}");
    }
    let metric = "pgwarden_proxy_connections_rejected_total{reason=\"database_connection_rate\"}";
    assert_eq!(proxy.metric(metric).await, refused.len() as f64);
    // Meanwhile the other database took every one of its own.
    for _ in 0..5 {
        connect(&proxy, "postgres", "app").await.expect("another database is not limited");
    }
}

/// A libpq 17+ client (psycopg 3, `tests/clients/session.py`) sees its real backend through
/// the proxy over TLS, negotiated with an SSLRequest and directly (`sslnegotiation=direct`,
/// ALPN `postgresql`): its pid, NOTIFY's sender pid, cancel inside TLS, pg_terminate_backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libpq_17_client_sees_its_real_backend_and_cancels_inside_tls() {
    let node = PgNode::start();
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    for negotiation in ["postgres", "direct"] {
        let conninfo = proxy.conninfo(
            "app",
            "app",
            &format!(
                "password={TEST_PASSWORD} sslmode=require sslnegotiation={negotiation} connect_timeout=10"
            ),
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/session.py");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3").arg(script).arg(&conninfo).output()
        })
        .await
        .unwrap()
        .expect("python3 with psycopg 3 (scripts/setup.sh installs it)");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("sslnegotiation={negotiation}:\n{stdout}");
        assert!(
            out.status.success() && stdout.ends_with("ok\n"),
            "{negotiation}: {stdout}{stderr}"
        );
    }
    assert_eq!(
        proxy
            .metric_reaching("pgwarden_proxy_cancel_requests_total{result=\"forwarded\"}", 2.0)
            .await,
        2.0
    );
}

/// A connection that opens with a TLS ClientHello without the `postgresql` ALPN protocol is
/// refused with 08P01, as PostgreSQL refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_the_postgresql_alpn_is_refused() {
    use tokio::io::AsyncReadExt;
    let certs = TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = pgwarden_e2e::tls_connect(tcp, &certs.ca_path(), "localhost").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "neither answered nor closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.first() == Some(&b'E') && text.contains("08P01"), "{text}");
    assert!(text.contains("ALPN"), "{text}");
}
