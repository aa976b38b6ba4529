//! A proxy that follows the routing table in etcd (`[etcd]` in proxy.toml), against a real
//! etcd member and a real PostgreSQL node: the table sealed with its admin token is applied
//! with the revision that wrote it as its epoch; one sealed with another token is refused; cut
//! off from etcd (the member frozen) longer than `fence_after_ms`, the proxy ends its sessions
//! and holds new ones, then refuses them; when etcd answers again it routes again. A proxy pair
//! on two "hosts" elects its active through etcd: kill -9 of the active, takeover, cancel
//! requests through the new active, a frozen active replaced and standing down on resuming.

use std::time::{Duration, Instant};

use pgwarden_api::RoutingTable;
use pgwarden_e2e::{
    assert_cancel_reaches_the_backend, let_time_pass, plain_route, until_ok, wait_until, PgNode,
    TestEtcd, TestProxy, TEST_PASSWORD,
};
use pgwarden_proxy::config::EtcdConfig;
use rustix::process::Signal;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

fn table(node: &PgNode) -> RoutingTable {
    let route = plain_route(&node.address());
    RoutingTable { epoch: 0, databases: [("app".to_owned(), route)].into(), node_ca: None }
}

async fn follower(etcd: &TestEtcd, fence_after_ms: u64, hold_secs: f64) -> TestProxy {
    let any = "127.0.0.1:0".parse().unwrap();
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_owned).collect();
    TestProxy::start_configured(any, any, |config| {
        config.etcd = Some(EtcdConfig { endpoints, prefix: "pgwarden".into(), fence_after_ms });
        config.limits.hold_timeout_secs = hold_secs;
    })
    .await
}

async fn write_table(etcd: &TestEtcd, token: &str, table: &RoutingTable) -> i64 {
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_owned).collect();
    let mut client = etcd_client::Client::connect(&endpoints, None).await.unwrap();
    let sealed = pgwarden_api::sealed::seal_table(token, table);
    let put = client.put("/pgwarden/routing", sealed, None).await.unwrap();
    put.header().unwrap().revision()
}

async fn wait_epoch(proxy: &TestProxy, epoch: i64) {
    wait_until(&format!("epoch {epoch} applied"), Duration::from_secs(10), async || {
        let applied = proxy.metric("pgwarden_proxy_epoch").await;
        if applied == epoch as f64 {
            Ok(())
        } else {
            Err(format!("epoch {applied}"))
        }
    })
    .await;
}

async fn connect(
    proxy: &TestProxy,
) -> Result<
    (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>),
    tokio_postgres::Error,
> {
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_applies_the_table_sealed_with_its_token_at_the_revision_that_wrote_it() {
    let etcd = TestEtcd::start(&["127.0.0.21"]).await;
    let node = PgNode::start();
    let proxy = follower(&etcd, 2000, 5.0).await;
    let revision = write_table(&etcd, &proxy.token, &table(&node)).await;
    wait_epoch(&proxy, revision).await;
    let (client, _) = connect(&proxy).await.expect("routed through the table from etcd");
    client.simple_query("SELECT 1").await.unwrap();
    let health = proxy.admin_request("GET", "/health", None, None).await.json();
    assert_eq!(health["epoch"], revision, "{health}");

    // A table sealed with another token (another platform's, or forged) is refused.
    let invalid = "pgwarden_proxy_route_updates_total{result=\"invalid\"}";
    assert_eq!(proxy.metric(invalid).await, 0.0);
    let mut other = table(&node);
    other.databases.insert("forged".into(), other.databases["app"].clone());
    write_table(&etcd, "another-token", &other).await;
    wait_until("the forged table refused", Duration::from_secs(10), async || {
        let refused = proxy.metric(invalid).await;
        if refused == 1.0 {
            Ok(())
        } else {
            Err(format!("{refused} refused"))
        }
    })
    .await;
    assert_eq!(proxy.metric("pgwarden_proxy_epoch").await, revision as f64, "forged table taken");
    let routes = proxy.admin_request("GET", "/v1/routes", Some(&proxy.token), None).await.json();
    assert!(routes["databases"].get("forged").is_none(), "{routes}");
    // The next genuine table is applied.
    let newer = write_table(&etcd, &proxy.token, &table(&node)).await;
    wait_epoch(&proxy, newer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_etcd_stops_routing_until_etcd_answers_again() {
    let etcd = TestEtcd::start(&["127.0.0.22"]).await;
    let node = PgNode::start();
    let proxy = follower(&etcd, 1000, 1.0).await;
    let revision = write_table(&etcd, &proxy.token, &table(&node)).await;
    wait_epoch(&proxy, revision).await;
    let (client, connection) = connect(&proxy).await.expect("routed");
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(proxy.metric("pgwarden_proxy_fenced").await, 0.0);

    // etcd frozen: within the bound (plus a check), the session on the primary is ended...
    let frozen = Instant::now();
    etcd.signal(0, Signal::STOP);
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    let fenced_after = frozen.elapsed();
    let err = ended.expect("session not ended").unwrap().expect_err("ended with an error");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("lost touch with etcd"), "{err:?}");
    // The bound counts from the last answer, up to a check (a quarter of it) before the freeze.
    let earliest = Duration::from_millis(750);
    assert!(fenced_after >= earliest, "fenced before the bound: {fenced_after:?}");
    assert_eq!(proxy.metric("pgwarden_proxy_fenced").await, 1.0);
    // ...and a new one is held, then refused with 57P03.
    let Err(refused) = connect(&proxy).await else { panic!("routed while cut off") };
    assert_eq!(refused.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{refused:?}");

    // etcd answers again: the proxy routes again, with the same table.
    etcd.signal(0, Signal::CONT);
    wait_until("the proxy no longer fenced", Duration::from_secs(15), async || {
        let fenced = proxy.metric("pgwarden_proxy_fenced").await;
        if fenced == 0.0 {
            Ok(())
        } else {
            Err(format!("fenced {fenced}"))
        }
    })
    .await;
    let (client, _) = connect(&proxy).await.expect("routed again");
    client.simple_query("SELECT 1").await.unwrap();
    eprintln!("fenced {fenced_after:?} after etcd froze (bound 1 s)");
}

struct PairProxy {
    child: std::process::Child,
    admin: u16,
    roles: std::path::PathBuf,
}

impl Drop for PairProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy process of the pair `main` elected through `etcd`, on client port `listen` (the
/// same for both: the address a virtual IP would be), its hooks appending to `<name>.roles`.
fn pair_proxy(dir: &std::path::Path, etcd: &TestEtcd, name: &str, listen: u16) -> PairProxy {
    let admin = pgwarden_e2e::free_port();
    let roles = dir.join(format!("{name}.roles"));
    let hook = |role: &str| format!("echo {role} >> {}", roles.display());
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(|e| format!("\"{e}\"")).collect();
    let config = format!(
        "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         admin_token = \"pair-token\"\n\
         [etcd]\nendpoints = [{}]\nfence_after_ms = 2000\n\
         [ha]\netcd_pair = \"main\"\ntakeover_after_ms = 2000\non_active = \"{}\"\non_standby = \"{}\"\n",
        endpoints.join(", "),
        hook("active"),
        hook("standby"),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = std::process::Command::new(pgwarden_e2e::workspace_bin("pgwarden-proxy"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    PairProxy { child, admin, roles }
}

fn role_of(proxy: &PairProxy) -> Option<String> {
    let addr = ([127, 0, 0, 1], proxy.admin).into();
    let health = pgwarden_e2e::http_request(addr, "GET", "/health", None, None).ok()?;
    Some(health.json()["role"].as_str()?.to_owned())
}

async fn wait_role(proxy: &PairProxy, role: &str) {
    wait_until(&format!("role {role}"), Duration::from_secs(15), async || match role_of(proxy) {
        Some(now) if now == role => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}

fn hooks(proxy: &PairProxy) -> Vec<String> {
    let text = std::fs::read_to_string(&proxy.roles).unwrap_or_default();
    text.lines().map(str::to_owned).collect()
}

async fn query(listen: u16) -> Result<i32, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={listen} dbname=app user=app password={TEST_PASSWORD} connect_timeout=2"
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client.query_one("SELECT inet_server_port()", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_pair_elects_its_active_through_etcd_and_a_frozen_active_stands_down() {
    let etcd = TestEtcd::start(&["127.0.0.23"]).await;
    let node = PgNode::start();
    let dir = tempfile::tempdir().unwrap();
    let listen = pgwarden_e2e::free_port();
    write_table(&etcd, "pair-token", &table(&node)).await;
    let mut a = pair_proxy(dir.path(), &etcd, "a", listen);
    wait_role(&a, "active").await;
    let b = pair_proxy(dir.path(), &etcd, "b", listen);
    // Time must pass: the second proxy stays standby while the first is active.
    let_time_pass(Duration::from_secs(1)).await;
    assert_eq!(role_of(&b).as_deref(), Some("standby"), "two active proxies");
    assert_eq!(hooks(&a), ["standby", "active"], "on_active ran (before the address was bound)");
    assert_eq!(hooks(&b), ["standby"]);
    assert_eq!(query(listen).await.unwrap(), node.port as i32);

    // kill -9 of the active proxy: the other holds the address once the lease has ended.
    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let took_over = until_ok(killed, Duration::from_secs(15), || query(listen)).await;
    eprintln!(
        "proxy pair through etcd: first connection {took_over:?} after kill -9 of the active"
    );
    assert_eq!(role_of(&b).as_deref(), Some("active"));
    assert_eq!(hooks(&b), ["standby", "active"]);

    // Cancel requests reach the backend through the new active proxy.
    let conninfo =
        format!("host=127.0.0.1 port={listen} dbname=app user=app password={TEST_PASSWORD}");
    assert_cancel_reaches_the_backend(&conninfo).await;

    // A proxy that comes back stands by; the active one frozen past its lease is replaced,
    // and when it resumes it stands down (on_standby, then exits) instead of serving.
    let a = pair_proxy(dir.path(), &etcd, "a2", listen);
    wait_role(&a, "standby").await;
    let mut b = b;
    let pid = rustix::process::Pid::from_raw(b.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::STOP).unwrap();
    // Elected, it runs on_active; it reports itself active only once it listens, which on
    // this one host (no address to move) waits for the frozen one to let the port go.
    wait_until("elected (on_active ran)", Duration::from_secs(15), async || {
        let ran = hooks(&a);
        if ran.last().map(String::as_str) == Some("active") {
            Ok(())
        } else {
            Err(format!("{ran:?}"))
        }
    })
    .await;
    assert_eq!(role_of(&a).as_deref(), Some("standby"), "active before it listens");
    rustix::process::kill_process(pid, Signal::CONT).unwrap();
    let status = wait_until("the resumed proxy exited", Duration::from_secs(10), async || {
        b.child.try_wait().unwrap().ok_or_else(|| "still running".to_owned())
    })
    .await;
    assert!(!status.success(), "{status:?}");
    assert_eq!(hooks(&b).last().map(String::as_str), Some("standby"), "{:?}", hooks(&b));
    wait_role(&a, "active").await;
    assert_eq!(query(listen).await.unwrap(), node.port as i32);
}
