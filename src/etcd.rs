//! A real etcd cluster (Debian's `etcd-server`) for the multi-host tests: one member per
//! loopback address given, each with its own data dir under a temp dir, on free ports.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::http_request;

pub struct TestEtcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    client: std::net::SocketAddr,
    child: Option<Child>,
}

fn free_addr(host: &str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind((host, 0)).expect("a free port");
    listener.local_addr().expect("addr")
}

impl TestEtcd {
    /// A cluster of one member per address of `hosts` (`127.0.0.x`), started and healthy.
    pub async fn start(hosts: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("pgwarden-etcd-").tempdir().expect("tempdir");
        let peers: Vec<std::net::SocketAddr> = hosts.iter().map(|h| free_addr(h)).collect();
        let clients: Vec<std::net::SocketAddr> = hosts.iter().map(|h| free_addr(h)).collect();
        let cluster: Vec<String> =
            peers.iter().enumerate().map(|(i, p)| format!("m{i}=http://{p}")).collect();
        let mut members = Vec::new();
        for (i, (peer, client)) in peers.iter().zip(&clients).enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("log");
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "pgwarden-test"])
                // A LAN's timing (what the README recommends with short leases).
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd (Debian's etcd-server; scripts/setup.sh installs it)");
            members.push(Member { client: *client, child: Some(child) });
        }
        let etcd = Self { dir, members };
        etcd.wait_healthy().await;
        etcd
    }

    /// The members' client URLs, comma-separated (`serve --etcd`).
    pub fn endpoints(&self) -> String {
        let urls: Vec<String> =
            self.members.iter().map(|m| format!("http://{}", m.client)).collect();
        urls.join(",")
    }

    /// The members' client addresses.
    pub fn clients(&self) -> Vec<std::net::SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// Kills member `i` (kill -9).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to member `i` (freeze it with `STOP`, resume it with `CONT`).
    pub fn signal(&self, i: usize, signal: rustix::process::Signal) {
        let child = self.members[i].child.as_ref().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// What the members logged.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))))
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for member in &self.members {
            let addr = member.client;
            loop {
                let healthy = tokio::task::spawn_blocking(move || {
                    http_request(addr, "GET", "/health", None, None)
                        .is_ok_and(|r| r.status == 200 && r.body.contains("true"))
                })
                .await
                .expect("join");
                if healthy {
                    break;
                }
                assert!(Instant::now() < deadline, "etcd did not become healthy:\n{}", self.logs());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
