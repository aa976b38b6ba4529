//! The active/standby proxy pair, as real processes: kill -9 of the active proxy, takeover of
//! the client address by the standby within about a second, no flapping, hooks, /active.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgwarden_e2e::{
    assert_cancel_reaches_the_backend, free_port, http_request, let_time_pass, until_ok,
    wait_until, wait_until_blocking, workspace_bin, PgNode, TEST_PASSWORD,
};
use tokio_postgres::NoTls;

struct Proxy {
    child: Child,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, listen: u16, admin: u16, peer: u16) -> Proxy {
    let config = dir.join(format!("{name}.toml"));
    let hook =
        |role: &str| format!("echo {role} >> {}", dir.join(format!("{name}.roles")).display());
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nadmin_token = \"t\"\n\
             routes_file = \"{}\"\n[ha]\npeer_admin = \"127.0.0.1:{peer}\"\non_active = \"{}\"\non_standby = \"{}\"\n",
            dir.join("routes.json").display(),
            hook("active"),
            hook("standby"),
        ),
    )
    .unwrap();
    let child = Command::new(workspace_bin("pgwarden-proxy"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proxy { child }
}

fn role(admin: u16) -> Option<String> {
    let r = http_request(([127, 0, 0, 1], admin).into(), "GET", "/health", None, None).ok()?;
    Some(r.json()["role"].as_str()?.to_owned())
}

fn wait_role(admin: u16, expected: &str) {
    let what = format!("proxy on admin port {admin} {expected}");
    wait_until_blocking(&what, Duration::from_secs(10), || match role(admin) {
        Some(now) if now == expected => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

fn active_status(admin: u16) -> u16 {
    http_request(([127, 0, 0, 1], admin).into(), "GET", "/active", None, None).unwrap().status
}

async fn query(listen: u16) -> Result<i32, tokio_postgres::Error> {
    let conninfo = format!("host=127.0.0.1 port={listen} dbname=app user=app password={TEST_PASSWORD} connect_timeout=2");
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client.query_one("SELECT inet_server_port()", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_within_a_second_and_a_returning_proxy_stays_standby() {
    let node = PgNode::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.json"),
        format!(r#"{{"epoch": 1, "databases": {{"app": {{"primary": "{}"}}}}}}"#, node.address()),
    )
    .unwrap();
    let (listen, admin_a, admin_b) = (free_port(), free_port(), free_port());
    let mut a = start(dir.path(), "a", listen, admin_a, admin_b);
    wait_role(admin_a, "active");
    let b = start(dir.path(), "b", listen, admin_b, admin_a);
    wait_role(admin_b, "standby");
    assert_eq!(active_status(admin_a), 200);
    assert_eq!(active_status(admin_b), 503);
    assert_eq!(query(listen).await.unwrap(), node.port as i32);

    // kill -9 of the active proxy: new connections succeed at the same address within ~1 s.
    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let took_over = until_ok(killed, Duration::from_secs(5), || query(listen)).await;
    println!("takeover: first successful connection {took_over:?} after kill -9");
    // How fast a takeover is, is measured in benches (RESULTS.md); here, that it happens.
    assert_eq!(role(admin_b).as_deref(), Some("active"));
    assert_eq!(active_status(admin_b), 200);

    // Cancel works through the new active proxy.
    let conninfo =
        format!("host=127.0.0.1 port={listen} dbname=app user=app password={TEST_PASSWORD}");
    assert_cancel_reaches_the_backend(&conninfo).await;

    // The old active comes back: it stays standby, no flapping.
    let _a = start(dir.path(), "a", listen, admin_a, admin_b);
    wait_role(admin_a, "standby");
    // Time must pass: no flapping for a while.
    let_time_pass(Duration::from_secs(1)).await;
    assert_eq!(role(admin_a).as_deref(), Some("standby"));
    assert_eq!(role(admin_b).as_deref(), Some("active"));
    assert_eq!(query(listen).await.unwrap(), node.port as i32);

    // Hooks ran on every role change.
    let roles = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.roles"))).unwrap_or_default()
    };
    wait_until("both proxies' hooks", Duration::from_secs(5), async || {
        let (a, b) = (roles("a"), roles("b"));
        if a == "active\nstandby\n" && b == "standby\nactive\n" {
            Ok(())
        } else {
            Err(format!("a={a:?} b={b:?}"))
        }
    })
    .await;
    drop(b);
}
