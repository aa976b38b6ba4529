//! The proxy authenticates clients itself (SCRAM-SHA-256, and -PLUS over TLS) from verifiers
//! the control plane reads from the node's catalog, and logs in to the node with the ClientKey
//! the client's proof revealed. Real nodes, a real control plane and proxy, real clients (psql,
//! libpq 18 through psycopg, tokio-postgres).

use std::time::{Duration, Instant};

use pgwarden_e2e::{connect_with_binding, psql, TestControl, TestProxy};
use pgwarden_proxy::config::Limits;
use serde_json::{json, Value};

/// `url` with `extra` query parameters.
fn with(url: &str, extra: &str) -> String {
    format!("{url}?{extra}")
}

/// The password in a `postgres://user:password@...` URL.
fn password_of(url: &str) -> String {
    let rest = url.strip_prefix("postgres://").unwrap();
    let (userinfo, _) = rest.split_once('@').unwrap();
    userinfo.split_once(':').unwrap().1.to_owned()
}

/// Runs SQL as the node's superuser over its private socket.
fn superuser_sql(control: &TestControl, db: &Value, sql: &str) -> String {
    let node = &db["nodes"][0];
    let dir = control.node_data_dir(node["name"].as_str().unwrap());
    let conninfo = format!(
        "host='{}' port={} user=postgres dbname={}",
        dir.parent().unwrap().display(),
        node["port"],
        db["name"].as_str().unwrap()
    );
    let out = psql(&conninfo, None, sql);
    assert!(out.success, "{sql}: {}", out.stderr);
    out.stdout
}

/// Retries `check` for up to `limit`; the last outcome.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_with_scram_through_the_proxy_and_bind_the_channel() {
    let control = TestControl::start().await;
    let (db, _, url) = control.create_routed_database("bound", "postgresql-starter-512").await;
    let name = db["name"].as_str().unwrap().to_owned();

    // psql (libpq 15) with channel binding required: only SCRAM-SHA-256-PLUS satisfies it.
    let out = psql(
        &with(&url, "sslmode=require&channel_binding=require"),
        None,
        "SELECT current_user || ',' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    );
    assert!(out.success, "{}", out.stderr);
    // The proxy's own session on the node is encrypted too.
    assert_eq!(out.stdout.trim(), format!("{name},true"));
    // Without TLS there is nothing to bind to: libpq refuses to go on.
    let out = psql(&with(&url, "sslmode=disable&channel_binding=require"), None, "SELECT 1");
    assert!(!out.success);
    assert!(out.stderr.contains("channel binding"), "{}", out.stderr);
    // Plain SCRAM over plaintext still works where the database allows plaintext.
    let out = psql(&with(&url, "sslmode=disable"), None, "SELECT 1");
    assert!(out.success, "{}", out.stderr);

    // libpq 18 (psycopg's wheel) with channel binding, over both TLS negotiations.
    for negotiation in ["postgres", "direct"] {
        let conninfo = with(
            &url,
            &format!("sslmode=require&channel_binding=require&sslnegotiation={negotiation}"),
        );
        let script = "import sys, psycopg\n\
                      c = psycopg.connect(sys.argv[1])\n\
                      print(c.execute('SELECT current_user').fetchone()[0])";
        let out = std::process::Command::new("python3")
            .args(["-c", script, &conninfo])
            .output()
            .expect("python3 with psycopg 3 (scripts/setup.sh installs it)");
        assert!(out.status.success(), "{negotiation}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    }

    // tokio-postgres, binding to the proxy's certificate (verified against the CA).
    let conninfo =
        format!("user={name} password={} dbname={name} channel_binding=require", password_of(&url));
    let (client, connection) =
        connect_with_binding(&conninfo, control.proxy.addr, &control.certs.ca_path(), "localhost")
            .await
            .expect("tokio-postgres with channel binding");
    tokio::spawn(connection);
    let row = client.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), name);

    // The verifiers never leave the proxy: its routing table lists users, not verifiers.
    let routes = control
        .proxy
        .admin_request("GET", "/v1/routes", Some(&control.proxy.token.clone()), None)
        .await;
    assert!(routes.body.contains(&format!("\"{name}\"")), "{}", routes.body);
    assert!(!routes.body.contains("SCRAM-SHA-256$"), "{}", routes.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_users_are_refused_by_the_proxy_alone() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("guarded", "postgresql-starter-512").await;
    let name = db["name"].as_str().unwrap().to_owned();
    let host = format!("127.0.0.1:{}", control.proxy.port());
    let connects = "pgwarden_proxy_backend_connect_seconds_count";
    let before = control.proxy.metric(connects).await;

    // sslmode=require: with `prefer`, libpq tries again without TLS after a refusal.
    let wrong = with(&url.replace(&password_of(&url), "not-the-password"), "sslmode=require");
    let out = psql(&wrong, None, "SELECT 1");
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!("password authentication failed for user \"{name}\"")),
        "{}",
        out.stderr
    );
    let unknown = format!("postgres://nobody:whatever@{host}/{name}?sslmode=require");
    let out = psql(&unknown, None, "SELECT 1");
    assert!(!out.success);
    assert!(
        out.stderr.contains("password authentication failed for user \"nobody\""),
        "{}",
        out.stderr
    );
    // The same answer for both, with the SQLSTATE: 28P01.
    let (client, _) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=nobody password=x dbname={name}",
            control.proxy.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .map(|_| panic!("unknown user logged in"))
    .unwrap_or_else(|e| (e, ()));
    assert_eq!(client.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));
    assert_eq!(control.proxy.metric(connects).await, before, "a refused login reached a node");
    assert_eq!(
        control
            .proxy
            .metric("pgwarden_proxy_connections_rejected_total{reason=\"bad_password\"}")
            .await,
        3.0
    );

    // A password reset through the API: the old one is refused as soon as the call returns.
    let r = control
        .request("POST", &format!("/v1/databases/{id}/users/{name}/reset-password"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let new_url = r.json()["database_url"].as_str().unwrap().to_owned();
    let out = psql(&url, None, "SELECT 1");
    assert!(!out.success, "the old password still works");
    assert!(out.stderr.contains("password authentication failed"), "{}", out.stderr);
    let out = psql(&new_url, None, "SELECT 1");
    assert!(out.success, "{}", out.stderr);

    // A user created in SQL is picked up from the catalog within a few seconds.
    superuser_sql(
        &control,
        &db,
        &format!("CREATE ROLE from_sql LOGIN PASSWORD 'sql-pass'; GRANT CONNECT ON DATABASE {name} TO from_sql"),
    );
    let sql_user = format!("postgres://from_sql:sql-pass@{host}/{name}");
    assert!(
        eventually(Duration::from_secs(10), || psql(&sql_user, None, "SELECT 1").success).await,
        "a role created in SQL never could log in through the proxy"
    );
    // One with an MD5 password gets an error that says what to do.
    superuser_sql(
        &control,
        &db,
        "SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD 'old-pass'",
    );
    let legacy = format!("postgres://legacy:old-pass@{host}/{name}");
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            last = psql(&legacy, None, "SELECT 1").stderr;
            last.contains("scram-sha-256")
        })
        .await,
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_plaintext_logins_so_force_tls_cannot_be_bypassed() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("sealed", "postgresql-starter-512").await;
    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": true})))
        .await;
    assert!(r.status < 300, "{}", r.body);
    let (name, port) = (db["name"].as_str().unwrap(), &db["nodes"][0]["port"]);
    let password = password_of(&url);
    let direct = |sslmode: &str| {
        format!(
            "host=127.0.0.1 port={port} user={name} dbname={name} password={password} sslmode={sslmode}"
        )
    };
    // Straight to the node's port in plaintext, with the right password: refused.
    let out = psql(&direct("disable"), None, "SELECT 1");
    assert!(!out.success, "a plaintext login reached the node");
    assert!(out.stderr.contains("no encryption"), "{}", out.stderr);
    // Through the proxy in plaintext: refused by force-TLS; with TLS: fine.
    let out = psql(&with(&url, "sslmode=disable"), None, "SELECT 1");
    assert!(out.stderr.contains("TLS is required"), "{}", out.stderr);
    assert!(psql(&with(&url, "sslmode=require"), None, "SELECT 1").success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifiers_survive_a_switchover_and_a_proxy_restart() {
    let mut control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("moving", "postgresql-business-512").await;
    let bound = with(&url, "sslmode=require&channel_binding=require");
    assert!(psql(&bound, None, "SELECT 1").success);

    let r =
        control.request("POST", &format!("/v1/databases/{id}/switchover"), Some(json!({}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let out = psql(&bound, None, "SELECT pg_is_in_recovery()");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "f");

    // A restarted proxy has no table and no verifiers until the control plane pushes them.
    let (clients, admin) = (control.proxy.addr, control.proxy.admin);
    control.proxy.stop().await.unwrap();
    control.proxy =
        TestProxy::start_at(clients, admin, Limits::default(), Some(control.certs.files())).await;
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(15), || {
            let out = psql(&bound, None, "SELECT 1");
            last = out.stderr;
            out.success
        })
        .await,
        "no login after the proxy restarted: {last}"
    );
    let wrong = bound.replace(&password_of(&url), "nope");
    let out = psql(&wrong, None, "SELECT 1");
    assert!(out.stderr.contains("password authentication failed"), "{}", out.stderr);
}
