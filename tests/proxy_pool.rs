//! Transaction pooling on the proxy's pool address, against a real PostgreSQL node, with real
//! clients (tokio-postgres in the simple protocol and with prepared statements, psql, pgbench):
//! many clients share few server connections; session state pins its client and never leaks
//! to another; startup settings follow each client; a transaction that cannot get a connection
//! in time gets 53300 and its connection stays open; a node restart ends the running
//! transaction only.

use std::time::Duration;

use pgwarden_e2e::{psql, PgNode, TestProxy, TEST_PASSWORD};
use pgwarden_proxy::config::Limits;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

async fn pooled_proxy(node: &PgNode, pool_size: u32, limits: Limits) -> TestProxy {
    let proxy = TestProxy::start(limits, None).await;
    proxy.route_pooled(1, "app", node, Some(pool_size)).await;
    proxy
}

fn pool_conninfo(proxy: &TestProxy, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} dbname=app user=app password={TEST_PASSWORD} {extra}",
        proxy.pool_addr.port()
    )
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// The first column of the first row of a simple query.
async fn value(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Server sessions of user `app` on the node (not counting the one asking).
fn app_backends(node: &PgNode) -> usize {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'";
    node.superuser_sql(sql).stdout.trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_server_connections() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 3, Limits::default()).await;
    let setup = connect(&pool_conninfo(&proxy, "")).await;
    setup
        .batch_execute("CREATE TABLE t(client int, n int, PRIMARY KEY (client, n))")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for client_no in 0..24 {
        let conninfo = pool_conninfo(&proxy, "");
        tasks.push(tokio::spawn(async move {
            let client = connect(&conninfo).await;
            for n in 0..15 {
                let sql = format!("BEGIN; INSERT INTO t VALUES ({client_no}, {n}); COMMIT");
                client.batch_execute(&sql).await.expect("transaction");
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    assert_eq!(value(&setup, "SELECT count(*) FROM t").await, "360");
    // 25 clients connected, at most 3 server sessions ever.
    assert!(app_backends(&node) <= 3, "{} server sessions", app_backends(&node));
    assert!(proxy.metric("pgwarden_proxy_pool_server_connections").await <= 3.0);
    assert_eq!(proxy.metric("pgwarden_proxy_pooled_client_connections").await, 25.0);
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_its_client_and_never_leaks() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let a = connect(&pool_conninfo(&proxy, "")).await;
    let b = connect(&pool_conninfo(&proxy, "")).await;
    let default = value(&b, "SHOW statement_timeout").await;
    a.batch_execute("SET statement_timeout = '1234ms'").await.unwrap();
    a.batch_execute("CREATE TEMP TABLE mine(x int); INSERT INTO mine VALUES (7)").await.unwrap();
    // a keeps its state, b never sees it, however often it runs.
    for _ in 0..5 {
        assert_eq!(value(&a, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(value(&a, "SELECT x FROM mine").await, "7");
        assert_eq!(value(&b, "SHOW statement_timeout").await, default);
        let err = b.simple_query("SELECT x FROM mine").await.expect_err("a's temporary table");
        assert!(format!("{err:?}").contains("does not exist"), "{err:?}");
    }
    // The SET alone was carried; the temporary table pinned.
    assert_eq!(proxy.metric("pgwarden_proxy_pool_pins_total{reason=\"set\"}").await, 0.0);
    let temporary = "pgwarden_proxy_pool_pins_total{reason=\"temporary_table\"}";
    assert_eq!(proxy.metric(temporary).await, 1.0);
    // When the pinned client leaves, its server connection is closed, not reused.
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connect(&pool_conninfo(&proxy, "")).await;
    assert_eq!(value(&c, "SHOW statement_timeout").await, default);
    let err = c.simple_query("SELECT x FROM mine").await.expect_err("gone with a");
    assert!(format!("{err:?}").contains("does not exist"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_alone_is_carried_to_every_connection_and_never_leaks() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let (x, y) =
        (connect(&pool_conninfo(&proxy, "")).await, connect(&pool_conninfo(&proxy, "")).await);
    x.batch_execute("CREATE SCHEMA x_schema; CREATE TABLE x_schema.only_x(n int)").await.unwrap();
    x.batch_execute("SET search_path = x_schema, public").await.unwrap();
    x.batch_execute("SET statement_timeout TO '4321ms'").await.unwrap();
    // Both clients run many transactions on the two shared connections: each sees its own.
    for _ in 0..10 {
        let (a, b) = tokio::join!(value(&x, "SHOW search_path"), value(&y, "SHOW search_path"));
        assert_eq!((a.as_str(), b.as_str()), ("x_schema, public", "\"$user\", public"));
        assert_eq!(value(&x, "SHOW statement_timeout").await, "4321ms");
        assert_eq!(value(&y, "SHOW statement_timeout").await, "0");
        x.batch_execute("SELECT count(*) FROM only_x").await.expect("found through x's path");
    }
    x.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(value(&x, "SHOW statement_timeout").await, "0");
    // A SET that fails is not carried.
    assert!(x.batch_execute("SET statement_timeout = 'soon'").await.is_err());
    assert_eq!(value(&x, "SHOW statement_timeout").await, "0");
    assert_eq!(proxy.metric("pgwarden_proxy_pool_pins_total{reason=\"set\"}").await, 0.0);
    // Inside a transaction block a SET could be rolled back: that pins.
    y.batch_execute("BEGIN; SET search_path = y; COMMIT").await.unwrap();
    assert_eq!(proxy.metric("pgwarden_proxy_pool_pins_total{reason=\"set\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_follow_each_client_on_a_shared_connection() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 1, Limits::default()).await;
    let x = connect(&pool_conninfo(&proxy, "application_name=x options='-c search_path=x_schema'"))
        .await;
    let y = connect(&pool_conninfo(&proxy, "application_name=y")).await;
    for _ in 0..3 {
        assert_eq!(value(&x, "SHOW application_name").await, "x");
        assert_eq!(value(&x, "SHOW search_path").await, "x_schema");
        assert_eq!(value(&y, "SHOW application_name").await, "y");
        assert_eq!(value(&y, "SHOW search_path").await, "\"$user\", public");
    }
    assert_eq!(app_backends(&node), 1, "both on the one server connection");
    // psql through the pool, with its own startup settings.
    let out =
        psql(&pool_conninfo(&proxy, "application_name=psql-pooled"), None, "SHOW application_name");
    assert!(out.success && out.stdout.trim() == "psql-pooled", "{} {}", out.stdout, out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_cannot_get_a_connection_in_time_gets_53300_and_keeps_its_client() {
    let node = PgNode::start();
    let limits = Limits { pool_wait_timeout_secs: 0.5, ..Limits::default() };
    let proxy = pooled_proxy(&node, 1, limits).await;
    let holder = connect(&pool_conninfo(&proxy, "")).await;
    let waiter = connect(&pool_conninfo(&proxy, "")).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = waiter.simple_query("SELECT 2").await.expect_err("no connection free");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(db.message().contains("server connections of database \"app\""), "{}", db.message());
    assert!(proxy.metric("pgwarden_proxy_pool_wait_seconds_count").await >= 1.0);
    // The waiter's connection is still there and works once the holder commits.
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&waiter, "SELECT 2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_are_shared_by_many_clients_on_few_connections() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let setup = connect(&pool_conninfo(&proxy, "")).await;
    setup.batch_execute("CREATE TABLE kv(k int PRIMARY KEY, v text)").await.unwrap();
    // tokio-postgres prepares a named statement for every query: twelve clients prepare the
    // same ones and use them on whichever of the two server connections they get.
    let mut tasks = Vec::new();
    for c in 0..12 {
        let conninfo = pool_conninfo(&proxy, "");
        tasks.push(tokio::spawn(async move {
            let client = connect(&conninfo).await;
            let insert = client.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
            let read = client.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            for n in 0..20 {
                let k: i32 = c * 100 + n;
                client.execute(&insert, &[&k, &format!("v{k}")]).await.expect("insert");
                let row = client.query_one(&read, &[&k]).await.expect("read");
                assert_eq!(row.get::<_, String>(0), format!("v{k}"));
            }
            // Closing a statement and preparing it again works too.
            drop(read);
            let again = client.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            let k: i32 = c * 100;
            assert_eq!(
                client.query_one(&again, &[&k]).await.unwrap().get::<_, String>(0),
                format!("v{k}")
            );
            client
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(value(&setup, "SELECT count(*) FROM kv").await, "240");
    assert!(app_backends(&node) <= 2, "{} server sessions", app_backends(&node));
    let pins = proxy.metric("pgwarden_proxy_pool_pins_total{reason=\"prepared_statement\"}").await;
    assert_eq!(pins, 0.0, "protocol-level statements do not pin");
    // An error in a pipeline: the client gets it, then goes on with the same statements.
    let client = connect(&pool_conninfo(&proxy, "")).await;
    let err = client.prepare("SELEC 1").await.expect_err("a syntax error");
    assert_eq!(err.code().map(|c| c.code()), Some("42601"), "{err:?}");
    let read = client.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    assert_eq!(client.query_one(&read, &[&0i32]).await.unwrap().get::<_, String>(0), "v0");
    // DEALLOCATE ALL (PDO, psycopg's reset) forgets the client's statements, not the server's.
    client.batch_execute("DEALLOCATE ALL").await.unwrap();
    let read = client.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    assert_eq!(client.query_one(&read, &[&100i32]).await.unwrap().get::<_, String>(0), "v100");
}

/// A server connection keeps at most 1000 statements: beyond that the least recently used is
/// closed on the server, and prepared there again when a client uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_keeps_at_most_1000_statements_and_prepares_a_closed_one_again() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 1, Limits::default()).await;
    let client = connect(&pool_conninfo(&proxy, "")).await;
    let sql = |k: i32| format!("SELECT {k} + $1::int");
    let first = client.prepare(&sql(0)).await.unwrap();
    let mut statements = Vec::new();
    for k in 1..1000 {
        statements.push(client.prepare(&sql(k)).await.unwrap());
    }
    // The first is used again, so statements 1..=10 are now the least recently used.
    assert_eq!(client.query_one(&first, &[&1i32]).await.unwrap().get::<_, i32>(0), 1);
    for k in 1000..1010 {
        statements.push(client.prepare(&sql(k)).await.unwrap());
    }
    let on_server = "SELECT count(*) FROM pg_prepared_statements";
    let prepared = |messages: Vec<SimpleQueryMessage>| {
        let row = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        row.unwrap_or_default()
    };
    assert_eq!(prepared(client.simple_query(on_server).await.unwrap()), "1000");
    // Statement 1 was closed on the server: using it prepares it again, transparently.
    let one = &statements[0];
    assert_eq!(client.query_one(one, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);
    assert_eq!(client.query_one(&first, &[&5i32]).await.unwrap().get::<_, i32>(0), 5);
    assert_eq!(prepared(client.simple_query(on_server).await.unwrap()), "1000");
    assert!(app_backends(&node) <= 1, "one server connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_pool_in_every_protocol_mode() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let bin = pgwarden_e2e::pg_bin("pgbench");
    let port = proxy.pool_addr.port().to_string();
    let init = std::process::Command::new(&bin)
        .args(["-i", "-q", "-h", "127.0.0.1", "-p", &port, "-U", "app", "app"])
        .env("PGPASSWORD", TEST_PASSWORD)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    for mode in ["simple", "extended", "prepared"] {
        let run = std::process::Command::new(&bin)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "-c", "8", "-t", "50", "-M", mode])
            .arg("app")
            .env("PGPASSWORD", TEST_PASSWORD)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{mode}: {out} {}", String::from_utf8_lossy(&run.stderr));
        assert!(out.contains("number of failed transactions: 0"), "{mode}: {out}");
        assert!(
            out.contains("number of transactions actually processed: 400/400"),
            "{mode}: {out}"
        );
    }
    assert!(app_backends(&node) <= 2, "8 pgbench clients on at most 2 server connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restart_ends_the_running_transaction_only() {
    let mut node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let client = connect(&pool_conninfo(&proxy, "")).await;
    client.batch_execute("CREATE TABLE r(x int PRIMARY KEY)").await.unwrap();
    client.batch_execute("BEGIN; INSERT INTO r VALUES (1)").await.unwrap();
    node.signal("-INT"); // fast shutdown: sessions end with 57P01
    node.restart();
    // The transaction block is lost with its server connection: the client is told at its
    // next statement (not with a FATAL: its connection stays), and its statements do not run
    // outside the block; ROLLBACK ends it, as in PostgreSQL.
    let err = client.batch_execute("INSERT INTO r VALUES (2)").await.expect_err("block lost");
    let db_error = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "57P01", "{err:?}");
    assert!(db_error.message().contains("run it again"), "{err:?}");
    let err = client.batch_execute("INSERT INTO r VALUES (2)").await.expect_err("still failed");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err:?}");
    client.batch_execute("ROLLBACK").await.expect("rollback ends the failed block");
    // The client's connection stayed open: its next transaction runs on the restarted node.
    client.batch_execute("INSERT INTO r VALUES (3)").await.expect("the next transaction");
    assert_eq!(value(&client, "SELECT string_agg(x::text, ',') FROM r").await, "3");
    // A client whose first statement after the loss is ROLLBACK just ends its block.
    client.batch_execute("BEGIN; INSERT INTO r VALUES (4)").await.unwrap();
    node.signal("-INT");
    node.restart();
    client.batch_execute("ROLLBACK").await.expect("rollback of the lost block");
    assert_eq!(value(&client, "SELECT string_agg(x::text, ',') FROM r").await, "3");
}

/// psycopg 3 (libpq 17+, `tests/clients/pooled.py`): its server-side prepared statements, its
/// pipeline mode, and a transaction across statements, through the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_statements_and_pipeline_mode_work_through_the_pool() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let conninfo = pool_conninfo(&proxy, "connect_timeout=10");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/pooled.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3").arg(script).arg(&conninfo).output()
    })
    .await
    .unwrap()
    .expect("python3 with psycopg 3 (scripts/setup.sh installs it)");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success() && stdout.ends_with("ok\n"), "{stdout}{stderr}");
    assert!(app_backends(&node) <= 2, "{} server sessions", app_backends(&node));
}

/// Every kind of session state a shared connection cannot carry, with two clients on one
/// server connection: the one that made it keeps it, the other never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_locks_and_cursors_pin_and_never_leak() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 3, Limits::default()).await;
    let owner = connect(&pool_conninfo(&proxy, "")).await;
    owner
        .batch_execute("CREATE TABLE c(n int); INSERT INTO c SELECT generate_series(1, 10)")
        .await
        .unwrap();
    let states: [(&str, &str, &str, &str); 3] = [
        ("listen", "LISTEN jobs", "SELECT count(*) FROM pg_listening_channels()", "0"),
        (
            "advisory_lock",
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        (
            "cursor_with_hold",
            "DECLARE held CURSOR WITH HOLD FOR SELECT n FROM c",
            "SELECT count(*) FROM pg_cursors",
            "0",
        ),
    ];
    for (reason, make, probe, clean) in states {
        let (a, b) =
            (connect(&pool_conninfo(&proxy, "")).await, connect(&pool_conninfo(&proxy, "")).await);
        a.batch_execute(make).await.unwrap();
        for _ in 0..5 {
            assert_ne!(value(&a, probe).await, clean, "{reason}: a keeps its state");
            assert_eq!(value(&b, probe).await, clean, "{reason}: b never sees a's state");
        }
        let series = format!("pgwarden_proxy_pool_pins_total{{reason=\"{reason}\"}}");
        assert_eq!(proxy.metric(&series).await, 1.0, "{reason}");
        drop(a);
        // a's connection was closed, not reused: its lock is gone with it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = connect(&pool_conninfo(&proxy, "")).await;
        assert_eq!(value(&c, probe).await, clean, "{reason}: nothing left behind");
    }
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'";
    assert_eq!(value(&owner, locks).await, "0", "no advisory lock left on any connection");
}

/// A table's columns change under statements prepared on shared connections: the server answers
/// `cached plan must not change result type`; the proxy prepares them anew and runs the batch
/// again, and the client never sees the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_plan_after_ddl_is_healed_by_preparing_again() {
    let node = PgNode::start();
    let proxy = pooled_proxy(&node, 2, Limits::default()).await;
    let setup = connect(&pool_conninfo(&proxy, "")).await;
    setup
        .batch_execute(
            "CREATE TABLE stale(k int PRIMARY KEY, v text); INSERT INTO stale VALUES (1, 'a')",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("stale.sql");
    std::fs::write(&script, "SELECT * FROM stale WHERE k = 1;\n").unwrap();
    let bin = pgwarden_e2e::pg_bin("pgbench");
    let port = proxy.pool_addr.port().to_string();
    let run = std::process::Command::new(&bin)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "-n", "-M", "prepared"])
        .args(["-c", "4", "-j", "4", "-T", "4", "-f"])
        .arg(&script)
        .arg("app")
        .env("PGPASSWORD", TEST_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    setup.batch_execute("ALTER TABLE stale ADD COLUMN extra int DEFAULT 0").await.unwrap();
    let out = tokio::task::spawn_blocking(move || run.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    assert!(!stderr.contains("cached plan"), "{stderr}");
    assert!(proxy.metric("pgwarden_proxy_pool_stale_plans_healed_total").await >= 1.0);
}
