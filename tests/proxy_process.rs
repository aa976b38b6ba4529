//! The `pgwarden-proxy` binary as a process: what it makes of the limit on open files, and
//! where its runtime threads run. Real PostgreSQL 15, real tokio-postgres clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pgwarden_e2e::{
    free_port, http_request, wait_until, wait_until_blocking, workspace_bin, PgNode, TEST_PASSWORD,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

struct Proxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary under `sh -c "ulimit -n <open_files>"` (soft and hard limit) with a route
/// from database `app` to `node` and `extra` lines at the top of its configuration.
fn start(dir: &Path, node: &PgNode, open_files: u32, extra: &str) -> Proxy {
    let (port, admin) = (free_port(), free_port());
    let routes = dir.join("routes.json");
    std::fs::write(
        &routes,
        format!(r#"{{"epoch": 1, "databases": {{"app": {{"primary": "{}"}}}}}}"#, node.address()),
    )
    .unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             admin_token = \"t\"\nroutes_file = \"{}\"\n",
            routes.display()
        ),
    )
    .unwrap();
    let log = dir.join("proxy.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {open_files} && exec \"$0\" --config \"$1\""))
        .arg(workspace_bin("pgwarden-proxy"))
        .arg(&config)
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    wait_until_blocking("the proxy answering", Duration::from_secs(10), || {
        let health = http_request(([127, 0, 0, 1], admin).into(), "GET", "/health", None, None);
        health.map(drop).map_err(|e| format!("{e}; log: {}", read(&log)))
    });
    Proxy { child, port, log }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A session, or the error the proxy answered with; panics when no answer comes within 5 s.
async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo =
        format!("host=127.0.0.1 port={port} dbname=app user=app password={TEST_PASSWORD}");
    let connecting = tokio_postgres::connect(&conninfo, NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("the proxy left the client without an answer for 5 s")?;
    tokio::spawn(connection);
    Ok(client)
}

/// With a limit on open files far below what `max_client_connections` (10 000) needs, the
/// clients the limit has no room for are refused with 53300 at once, rather than left waiting
/// in the listen queue while `accept` fails; the others keep working and a freed slot is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_open_file_limit_get_53300() {
    let node = PgNode::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(dir.path(), &node, 160, "");
    let mut sessions = Vec::new();
    // `connect` fails the test when a client is left without an answer.
    let err = loop {
        assert!(sessions.len() < 150, "never refused: the limit on open files is not enforced");
        match connect(proxy.port).await {
            Ok(client) => sessions.push(client),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    assert!(sessions.len() >= 20, "only {} sessions fit in 160 descriptors", sessions.len());
    assert!(
        read(&proxy.log).contains("limit on open files"),
        "no warning at start: {}",
        read(&proxy.log)
    );
    for client in &sessions {
        client.simple_query("SELECT 1").await.expect("a session under the limit works");
    }
    sessions.pop();
    let again = wait_until("a freed slot reused", Duration::from_secs(5), async || {
        connect(proxy.port).await.map_err(|e| e.to_string())
    })
    .await;
    again.simple_query("SELECT 1").await.unwrap();
}

/// A limit on open files that leaves no room for any session stops the proxy at start with a
/// message that says so.
#[test]
fn an_open_file_limit_without_room_for_sessions_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nadmin_token = \"t\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let log = dir.path().join("proxy.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 40 && exec \"$0\" --config \"$1\"")
        .arg(workspace_bin("pgwarden-proxy"))
        .arg(&config)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running with room for no session: {}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = read(&dir.path().join("stderr"));
    assert!(!status.success(), "exited successfully: {stderr}");
    assert!(stderr.contains("no room for sessions"), "{stderr}");
}

/// `Cpus_allowed_list` of one thread of `pid`, e.g. "0-1" or "1".
fn cpus_allowed(pid: u32, tid: &str) -> String {
    let status = read(Path::new(&format!("/proc/{pid}/task/{tid}/status")));
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).expect("status");
    line.split_whitespace().nth(1).unwrap_or_default().to_owned()
}

/// Expands "0-2,5" into [0, 1, 2, 5].
fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

/// With `pin_workers`, runtime thread i runs only on the i-th CPU the process may use: the
/// main thread's runtime on the first, the worker on the second (the first again on a machine
/// with one CPU); sessions keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_runtimes_run_each_on_its_own_cpu() {
    let node = PgNode::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(dir.path(), &node, 1024, "worker_threads = 2\npin_workers = true");
    let allowed = cpu_list(&cpus_allowed(std::process::id(), &std::process::id().to_string()));
    let pid = proxy.child.id();
    let worker = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().into_string().unwrap())
        .find(|tid| {
            read(Path::new(&format!("/proc/{pid}/task/{tid}/comm"))).starts_with("pgwarden-worker")
        })
        .expect("a worker thread");
    assert_eq!(cpus_allowed(pid, &pid.to_string()), allowed[0].to_string());
    assert_eq!(cpus_allowed(pid, &worker), allowed[1 % allowed.len()].to_string());
    let sessions: Vec<_> =
        futures_util::future::join_all((0..4).map(|_| connect(proxy.port))).await;
    for client in sessions {
        client.unwrap().simple_query("SELECT 1").await.unwrap();
    }
}
