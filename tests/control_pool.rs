//! `DATABASE_POOL_URL`: transaction pooling for a database the control plane made, through the
//! same proxy and credentials as `DATABASE_URL`, with the pool sized from the plan.

use std::time::Duration;

use pgwarden_e2e::{let_time_pass, psql, TestControl};
use tokio_postgres::NoTls;

/// A pgbench run through a pooled URL, and the operation that starts 2 s into it.
struct Across<'a> {
    pooled: &'a str,
    clients: u32,
    seconds: u32,
    /// SQL run after `pgbench -i`, before the run.
    prepare: &'a str,
    /// pgbench's built-in script.
    script: &'a str,
}

impl Across<'_> {
    fn new(pooled: &str) -> Across<'_> {
        Across { pooled, clients: 8, seconds: 10, prepare: "", script: "tpcb-like" }
    }

    /// Runs pgbench `-M prepared` and, 2 s in, the operation `request` (a 202 with an
    /// operation that must succeed while pgbench still runs); asserts that pgbench saw no failed
    /// transaction and no aborted client.
    async fn run(
        &self,
        control: &TestControl,
        (method, path, body): (&str, String, Option<serde_json::Value>),
    ) {
        let pgbench = pgwarden_e2e::pg_bin("pgbench");
        let init =
            std::process::Command::new(&pgbench).args(["-i", "-q", self.pooled]).output().unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        if !self.prepare.is_empty() {
            let out = psql(self.pooled, None, self.prepare);
            assert!(out.success, "{}", out.stderr);
        }
        let (clients, seconds) = (self.clients.to_string(), self.seconds.to_string());
        let mut run = std::process::Command::new(&pgbench)
            .args(["-M", "prepared", "-b", self.script, "-c", &clients, "-j", "8"])
            .args(["-T", &seconds, self.pooled])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Time must pass: the operation starts while pgbench is well into its run.
        let_time_pass(Duration::from_secs(2)).await;
        let r = control.request(method, &path, body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let ran_through = run.try_wait().unwrap().is_none();
        let out =
            tokio::task::spawn_blocking(move || run.wait_with_output()).await.unwrap().unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("{stdout}\n{stderr}");
        assert!(ran_through, "the operation ended after pgbench: {op}");
        assert!(out.status.success(), "pgbench failed: {stdout} {stderr}");
        assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
        assert!(!stderr.contains("aborted"), "{stderr}");
        let processed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("processed");
        assert!(processed > 100, "{stdout}");
    }
}

/// `DATABASE_POOL_URL` of database `id`.
async fn pool_url(control: &TestControl, id: &str) -> String {
    let env = control.request("GET", &format!("/v1/databases/{id}/env"), None).await.json();
    env["DATABASE_POOL_URL"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pooled_url_serves_more_clients_than_the_plan_has_server_connections() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("pooled", "postgresql-sandbox").await;
    let env = control.request("GET", &format!("/v1/databases/{id}/env"), None).await.json();
    assert_eq!(env["DATABASE_URL"], url.as_str());
    let pooled = env["DATABASE_POOL_URL"].as_str().expect("DATABASE_POOL_URL").to_owned();
    assert_eq!(
        pooled.replace(&control.proxy.pool_addr.port().to_string(), "PORT"),
        url.replace(&control.proxy.port().to_string(), "PORT"),
        "same credentials and database, the pool port"
    );
    let out = psql(&pooled, None, "CREATE TABLE t(n int); SELECT 'pooled'");
    assert!(out.success && out.stdout.contains("pooled"), "{}", out.stderr);

    // The sandbox plan allows 30 connections; its pool gets 20 of them. 40 clients run a
    // transaction each at once, all succeed, and the node never sees more than 20 sessions of
    // the database's user.
    let user = db["name"].as_str().unwrap().to_owned();
    let count = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'");
    let mut tasks = Vec::new();
    for n in 0..40 {
        let pooled = pooled.clone();
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&pooled, NoTls).await?;
            tokio::spawn(connection);
            let sql = format!("BEGIN; INSERT INTO t VALUES ({n}); SELECT pg_sleep(0.3); COMMIT");
            client.batch_execute(&sql).await?;
            Ok::<_, tokio_postgres::Error>(client)
        }));
    }
    let mut most = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = control.sql_on_every_node(&db, &count);
        most = most.max(seen[0].parse::<u32>().unwrap());
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap().expect("a pooled transaction"));
    }
    assert!((1..=20).contains(&most), "{most} server sessions at once");
    let out = psql(&url, None, "SELECT count(*) FROM t");
    assert_eq!(out.stdout.trim(), "40");
    println!("40 pooled clients, at most {most} server sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_through_the_pooled_url_does_not_notice_a_switchover() {
    let control = TestControl::start().await;
    let (_, id, _) = control.create_routed_database("bench", "postgresql-business-512").await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    let pooled = pool_url(&control, &id).await;
    let switchover = ("POST", format!("/v1/databases/{id}/switchover"), None);
    Across::new(&pooled).run(&control, switchover).await;
}

/// A synchronous business database with table `w` (`columns`) and a client on its pooled URL.
struct Pooled {
    control: TestControl,
    db: serde_json::Value,
    id: String,
    url: String,
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn business_with_a_pooled_client(name: &str, columns: &str) -> Pooled {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database(name, "postgresql-business-512").await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    assert!(psql(&url, None, &format!("CREATE TABLE w({columns})")).success);
    let pooled = pool_url(&control, &id).await;
    let (client, connection) = tokio_postgres::connect(&pooled, NoTls).await.unwrap();
    Pooled { control, db, id, url, client, connection: tokio::spawn(connection) }
}

/// A pooled transaction still open when a switchover's wait for running transactions (2 s)
/// ends is ended with a `57P01` that says to run it again, and nothing of it is committed; the
/// switchover goes on, and the client's connection stays open, its next transaction on the new
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_transaction_that_outlives_the_switchover_s_wait_is_ended_and_the_switchover_goes_on(
) {
    let Pooled { control, id, url, client, connection, .. } =
        business_with_a_pooled_client("lingering", "n int8").await;
    let port = "SELECT inet_server_port()";
    client.batch_execute("BEGIN; INSERT INTO w VALUES (1)").await.unwrap();
    let old_port: i32 = client.query_one(port, &[]).await.unwrap().get(0);

    // The transaction stays open, idle, through the whole switchover.
    let r = control.request("POST", &format!("/v1/databases/{id}/switchover"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");

    let err = client.batch_execute("INSERT INTO w VALUES (2)").await.expect_err("ended");
    let db_error = err.as_db_error().unwrap_or_else(|| panic!("an ERROR, not {err:?}"));
    assert_eq!(db_error.code().code(), "57P01", "{err:?}");
    assert!(db_error.message().contains("run it again"), "{err:?}");
    // The client's block stays failed until it ends it, as in PostgreSQL.
    client.batch_execute("ROLLBACK").await.unwrap();
    let new_port: i32 = client.query_one(port, &[]).await.unwrap().get(0);
    assert_ne!(new_port, old_port, "the next transaction runs on the new primary");
    assert!(!connection.is_finished(), "the pooled client's connection stayed open");
    let out = psql(&url, None, "SELECT count(*) FROM w");
    assert_eq!(out.stdout.trim(), "0", "nothing of the ended transaction is committed");
}

/// Unplanned failover (kill -9 of the primary): the pooled client's connection stays open, the
/// transactions that could not run fail with a 57-class error, and the next ones run on the new
/// primary; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_client_keeps_its_connection_through_a_failover() {
    let Pooled { control, db, url, client, connection, .. } =
        business_with_a_pooled_client("failing", "n int8 PRIMARY KEY").await;
    let port_of = |role: &str| {
        db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap()["port"]
            .as_i64()
            .unwrap() as i32
    };
    let (old_port, new_port) = (port_of("primary"), port_of("replica"));
    let primary = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == "primary").unwrap();
    let data = control.node_data_dir(primary["name"].as_str().unwrap());

    let (mut acked, mut errors) = (Vec::new(), Vec::new());
    let mut killed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for n in 1i64.. {
        let insert = "INSERT INTO w VALUES ($1) RETURNING inet_server_port()";
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), client.query_one(insert, &[&n])).await;
        match outcome.expect("every statement is answered") {
            Ok(row) => acked.push((n, row.get::<_, i32>(0))),
            Err(e) => errors.push(e.code().map(|c| c.code().to_owned()).unwrap_or_default()),
        }
        if !killed && acked.len() >= 20 {
            pgwarden_e2e::kill_postmaster(&data);
            killed = true;
        }
        if acked.iter().filter(|(_, port)| *port == new_port).count() >= 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no writes on the new primary: {errors:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!connection.is_finished(), "the pooled client's connection stayed open");
    assert!(acked.iter().any(|(_, p)| *p == old_port), "writes on the old primary first");
    assert!(errors.iter().all(|c| c.starts_with("57")), "57-class errors only: {errors:?}");
    println!("{} acknowledged, errors during the failover: {errors:?}", acked.len());
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let present: std::collections::HashSet<i64> =
        out.stdout.trim().split(',').filter_map(|s| s.parse().ok()).collect();
    let lost: Vec<i64> = acked.iter().map(|(n, _)| *n).filter(|n| !present.contains(n)).collect();
    assert!(lost.is_empty(), "acknowledged inserts lost: {lost:?}");
}

/// `clients` pgbench clients through the pooled URL of a database of plan `from` while it
/// changes to plan `to`.
async fn plan_change_under_pgbench(
    name: &str,
    (from, to): (&str, &str),
    clients: u32,
    script: &str,
) {
    let control = TestControl::start().await;
    let (_, id, _) = control.create_routed_database(name, from).await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    let pooled = pool_url(&control, &id).await;
    let body = serde_json::json!({ "plan": to });
    let across = Across { clients, script, ..Across::new(&pooled) };
    across.run(&control, ("PATCH", format!("/v1/databases/{id}"), Some(body))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_through_the_pooled_url_does_not_notice_a_plan_change() {
    let plans = ("postgresql-business-512", "postgresql-business-1024");
    plan_change_under_pgbench("growing", plans, 8, "tpcb-like").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_through_the_pooled_url_does_not_notice_a_minor_upgrade() {
    let Some(engines) = pgwarden_e2e::engines_dir() else {
        println!("SKIPPED: the PostgreSQL 15.17 server build is not installed (scripts/setup.sh)");
        return;
    };
    let control = TestControl::start_full(Vec::new(), Vec::new(), "data", Some(engines)).await;
    let body =
        serde_json::json!({"name": "minor", "plan": "postgresql-business-512", "version": "15.17"});
    let r = control.request("POST", "/v1/databases", Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let id = r.json()["database"]["id"].as_str().unwrap().to_owned();
    let db = control.wait_synchronous(&id, "a synchronous standby").await;
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    let engines = control.request("GET", "/v1/engines", None).await.json();
    let default = engines.as_array().unwrap().iter().find(|e| e["default"] == true).cloned();
    let newer = default.expect("a default build")["version"].as_str().unwrap().to_owned();
    let pooled = pool_url(&control, &id).await;
    let upgrade = serde_json::json!({"version": newer});
    let path = format!("/v1/databases/{id}/engine-upgrade");
    Across::new(&pooled).run(&control, ("POST", path, Some(upgrade))).await;
}

/// A lower plan shrinks the pool with the routing epoch: 64 pooled clients of business-1024
/// (80 connections) keep running while the plan goes down to business-512 (60), and no server
/// connection the pool opens is refused by a node for lack of slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_through_the_pooled_url_does_not_notice_a_lower_plan() {
    // Select-only: 64 tpcb-like clients of one branch row queue on its lock for longer than a
    // hold waits for running transactions on a loaded machine; the pool's size is the point.
    let plans = ("postgresql-business-1024", "postgresql-business-512");
    plan_change_under_pgbench("shrinking", plans, 64, "select-only").await;
}

/// A major upgrade (PostgreSQL 15 to 18, logical replication then a held swap to the new
/// cluster) under pgbench `-M prepared` through the pooled URL: the clients' prepared
/// statements are prepared again on the new cluster's connections, nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_through_the_pooled_url_does_not_notice_a_major_upgrade() {
    let Some(engines) = pgwarden_e2e::engines_dir() else {
        println!("SKIPPED: no engines directory (run scripts/setup.sh)");
        return;
    };
    let control = TestControl::start_full(Vec::new(), Vec::new(), "data", Some(engines)).await;
    let engines = control.request("GET", "/v1/engines", None).await.json();
    let newest = engines.as_array().unwrap().iter().find(|e| e["major"] == 18).cloned();
    let Some(v18) = newest else {
        println!("SKIPPED: no PostgreSQL 18 build installed (scripts/setup.sh --engines)");
        return;
    };
    let (_, id, url) = control.create_routed_database("major", "postgresql-business-512").await;
    control.wait_synchronous(&id, "a synchronous standby").await;
    let pooled = pool_url(&control, &id).await;
    let upgrade = serde_json::json!({"version": v18["version"]});
    let path = format!("/v1/databases/{id}/engine-upgrade");
    // Logical replication needs a key on every table pgbench changes.
    let prepare = "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY";
    let across = Across { seconds: 60, prepare, ..Across::new(&pooled) };
    across.run(&control, ("POST", path, Some(upgrade))).await;
    let version = psql(&url, None, "SHOW server_version");
    assert!(version.stdout.trim().starts_with("18."), "{}", version.stdout);
}
