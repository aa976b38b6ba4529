//! Several control planes on etcd (`pgwarden serve --etcd`, real processes so that they can
//! be killed or frozen), node agents on loopback addresses, and one proxy they publish to.
//! The first control plane creates the platform's CA and keys; the others get copies of them
//! (as an operator copies them to each control plane's host).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pgwarden_proxy::config::EtcdConfig;
use serde_json::Value;

use crate::etcd::TestEtcd;
use crate::http::{http_request, http_request_within, HttpResponse};
use crate::proxy::{TestCerts, TestProxy};
use crate::relay::Relay;
use crate::wait::wait_until_every;
use crate::wait_until;

pub struct Plane {
    pub addr: SocketAddr,
    pub data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct TestPlanes {
    pub dir: tempfile::TempDir,
    pub etcd: TestEtcd,
    pub proxy: TestProxy,
    pub certs: TestCerts,
    pub planes: Vec<Plane>,
    pub token: String,
    agents: Vec<Agent>,
    agent_processes: Vec<Child>,
}

/// An agent, and the links to and from its "host" the tests can cut: the control planes reach
/// it through `control`, it reaches each etcd member through `etcd`.
struct Agent {
    /// Where it listens.
    listen: String,
    control: Relay,
    etcd: Vec<Relay>,
}

pub(crate) fn private_copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("mkdir");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
            private_copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).expect("copy");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

/// Every live (not zombie) process: pid, parent pid, program name.
pub fn live_processes() -> impl Iterator<Item = (u32, u32, String)> {
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    entries.filter_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // pid (name) state ppid ...: the name may hold spaces and parentheses.
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_owned();
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next()?, fields.next()?.parse().ok()?);
        (state != "Z").then_some((pid, ppid, name))
    })
}

/// A free port on each of `hosts`, as `host:port`.
pub(crate) fn free_addrs(hosts: &[&str]) -> Vec<String> {
    let free = |host: &&str| {
        let listener = std::net::TcpListener::bind((*host, 0)).expect("a free port");
        listener.local_addr().expect("addr").to_string()
    };
    hosts.iter().map(free).collect()
}

/// A `pgwarden agent` on `addr` with nodes under `root`, its certificate issued by
/// `pgwarden agent-cert` from the CA of control-plane data dir `data` (into `tls_parent`),
/// started and listening.
/// `extra` arguments go to `pgwarden agent`.
pub(crate) async fn start_agent(
    data: &Path,
    root: &Path,
    addr: &str,
    tls_parent: &Path,
    extra: &[String],
) -> Child {
    let host = addr.rsplit_once(':').expect("host:port").0;
    let tls = tls_parent.join(format!("agent-{host}"));
    let log = std::fs::File::create(tls_parent.join(format!("agent-{host}.log"))).expect("log");
    let out = Command::new(crate::workspace_bin("pgwarden"))
        .arg("--data-dir")
        .arg(data)
        .args(["agent-cert", "--address", host, "--out"])
        .arg(&tls)
        .output()
        .expect("pgwarden agent-cert");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let child = Command::new(crate::workspace_bin("pgwarden"))
        .args(["agent", "--listen", addr, "--dir"])
        .arg(root)
        .arg("--tls-dir")
        .arg(&tls)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("pgwarden agent");
    wait_until(&format!("agent {addr} listening"), Duration::from_secs(10), async || {
        std::net::TcpStream::connect(addr).map(drop).map_err(|e| e.to_string())
    })
    .await;
    child
}

impl TestPlanes {
    /// etcd members on `etcd_hosts`, agents on `agent_hosts`, and `planes` control planes;
    /// the first leads when this returns.
    pub async fn start(etcd_hosts: &[&str], agent_hosts: &[&str], planes: usize) -> Self {
        let dir = tempfile::Builder::new().prefix("pgwarden-planes-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let etcd = TestEtcd::start(etcd_hosts).await;
        let certs = TestCerts::new();
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_owned).collect();
        let proxy = TestProxy::start_configured(any, any, |config| {
            config.tls = Some(certs.files());
            config.etcd =
                Some(EtcdConfig { endpoints, prefix: "pgwarden".into(), fence_after_ms: 2000 });
        })
        .await;
        let proxy_token = dir.path().join("proxy-token");
        std::fs::write(&proxy_token, &proxy.token).expect("write");
        std::fs::set_permissions(&proxy_token, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let mut agents = Vec::new();
        for (host, listen) in agent_hosts.iter().zip(free_addrs(agent_hosts)) {
            let control = Relay::start(host, listen.parse().expect("addr")).await;
            let mut links = Vec::new();
            for member in etcd.clients() {
                links.push(Relay::start(host, member).await);
            }
            agents.push(Agent { listen, control, etcd: links });
        }
        let mut all = Self {
            dir,
            etcd,
            proxy,
            certs,
            planes: Vec::new(),
            token: String::new(),
            agents,
            agent_processes: Vec::new(),
        };
        for i in 0..planes {
            let data = all.dir.path().join(format!("plane{i}"));
            if i > 0 {
                let first = all.planes[0].data.clone();
                std::fs::create_dir_all(&data).expect("mkdir");
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
                    .expect("chmod");
                for shared in ["ca", "secret.key", "token"] {
                    private_copy(&first.join(shared), &data.join(shared));
                }
            }
            let plane = all.spawn_plane(data);
            all.planes.push(plane);
            let deadline = Instant::now() + Duration::from_secs(30);
            while all.health(i).await.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "control plane {i} does not answer:\n{}",
                    all.log(i)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if i == 0 {
                all.wait_leader(Duration::from_secs(30)).await;
                let token = std::fs::read_to_string(all.planes[0].data.join("token"));
                all.token = token.expect("token").trim().to_owned();
                all.start_agents().await;
            }
        }
        all
    }

    fn spawn_plane(&self, data: PathBuf) -> Plane {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let log = data.with_extension("log");
        let out = std::fs::File::create(&log).expect("log");
        let mut command = Command::new(crate::workspace_bin("pgwarden"));
        command.arg("--data-dir").arg(&data).args(["serve", "--listen", &addr.to_string()]);
        command.args(["--proxy-admin", &self.proxy.admin.to_string()]);
        command.arg("--proxy-token-file").arg(self.dir.path().join("proxy-token"));
        command.args(["--client-addr", &format!("127.0.0.1:{}", self.proxy.port())]);
        command.args(["--client-pool-addr", &self.proxy.pool_addr.to_string()]);
        for agent in &self.agents {
            command.args(["--agent", &agent.control.addr.to_string()]);
        }
        command.arg("--agent-root").arg(self.agent_root());
        // Storage every plane mounts alike: a new leader has its predecessor's backups.
        command.arg("--backup-dir").arg(self.dir.path().join("backups"));
        command.args(["--stats-interval-secs", "1"]);
        command.args(["--first-node-port", &crate::node_port_block().to_string()]);
        command.args(["--etcd", &self.etcd.endpoints(), "--lease-ttl-secs", "3"]);
        let child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("pgwarden serve");
        Plane { addr, data, log, child: Some(child) }
    }

    /// Agents on etcd (through their links), known to the control planes by their relay's
    /// address, with leases of 3 s.
    async fn start_agents(&mut self) {
        let root = self.agent_root();
        for agent in &self.agents {
            let links: Vec<String> =
                agent.etcd.iter().map(|r| format!("http://{}", r.addr)).collect();
            let extra = [
                "--etcd".to_owned(),
                links.join(","),
                "--lease-ttl-secs".to_owned(),
                "3".to_owned(),
                "--advertise".to_owned(),
                agent.control.addr.to_string(),
            ];
            let (data, parent) = (&self.planes[0].data, self.dir.path());
            let child = start_agent(data, &root, &agent.listen, parent, &extra).await;
            self.agent_processes.push(child);
        }
    }

    /// Cuts the "host" of the agent whose nodes listen on `host` off from everything it is
    /// reached by or reaches through the relays: the control planes and etcd.
    pub fn cut_host(&self, host: &str) {
        for agent in self.agents.iter().filter(|a| a.listen.starts_with(&format!("{host}:"))) {
            agent.control.cut();
            agent.etcd.iter().for_each(Relay::cut);
        }
    }

    /// Undoes `cut_host`.
    pub fn heal_host(&self, host: &str) {
        for agent in self.agents.iter().filter(|a| a.listen.starts_with(&format!("{host}:"))) {
            agent.control.heal();
            agent.etcd.iter().for_each(Relay::heal);
        }
    }

    /// What the agent of `host` logged.
    pub fn agent_log(&self, host: &str) -> String {
        let path = self.dir.path().join(format!("agent-{host}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The agents' root directory (nodes under `nodes/`).
    pub fn agent_root(&self) -> PathBuf {
        self.dir.path().join("agents")
    }

    /// Control plane `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.planes[i].log).unwrap_or_default()
    }

    /// `GET /health` of control plane `i`: 200 when it leads.
    pub async fn health(&self, i: usize) -> Option<HttpResponse> {
        let addr = self.planes[i].addr;
        let wait = Duration::from_millis(500);
        let ask = move || http_request_within(addr, "GET", "/health", None, None, wait).ok();
        tokio::task::spawn_blocking(ask).await.expect("join")
    }

    /// Waits until one control plane leads; returns it.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let every = Duration::from_millis(10);
        wait_until_every("a control plane leading", timeout, every, async || {
            for i in 0..self.planes.len() {
                if self.planes[i].child.is_some()
                    && self.health(i).await.is_some_and(|h| h.status == 200)
                {
                    return Ok(i);
                }
            }
            Err(format!("none leads:\n{}", self.logs()))
        })
        .await
    }

    pub fn logs(&self) -> String {
        let planes = (0..self.planes.len()).map(|i| format!("--- plane {i}\n{}", self.log(i)));
        planes.collect::<Vec<_>>().join("\n")
    }

    pub async fn request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> HttpResponse {
        let (addr, token) = (self.planes[i].addr, self.token.clone());
        let (method, path) = (method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let body = body.map(|b| b.to_string());
            http_request(addr, &method, &path, Some(&token), body.as_deref())
        })
        .await
        .expect("join")
        .expect("control request")
    }

    /// Creates a database through control plane `i` and waits for it; returns the database.
    pub async fn create_database(&self, i: usize, name: &str, plan: &str) -> Value {
        let body = serde_json::json!({"name": name, "plan": plan});
        let r = self.request(i, "POST", "/v1/databases", Some(body)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        let answer = r.json();
        let op = answer["operation"]["id"].as_str().expect("op id").to_owned();
        wait_until(&format!("operation {op} succeeded"), Duration::from_secs(180), async || {
            let state = self.request(i, "GET", &format!("/v1/operations/{op}"), None).await.json();
            assert!(state["status"] != "failed", "{state}\n{}", self.logs());
            if state["status"] == "succeeded" {
                Ok(())
            } else {
                Err(state.to_string())
            }
        })
        .await;
        let id = answer["database"]["id"].as_str().expect("id");
        self.request(i, "GET", &format!("/v1/databases/{id}"), None).await.json()
    }

    /// Kills control plane `i` (kill -9).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.planes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The processes control plane `i` started that run `program` (by their parent pid).
    pub fn children_running(&self, i: usize, program: &str) -> Vec<u32> {
        let Some(parent) = self.planes[i].child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        live_processes()
            .filter(|(_, ppid, name)| *ppid == parent && name == program)
            .map(|(pid, _, _)| pid)
            .collect()
    }

    /// Sends `signal` to control plane `i` (freeze with `Stop`, resume with `Cont`).
    pub fn signal(&self, i: usize, signal: rustix::process::Signal) {
        let child = self.planes[i].child.as_ref().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Waits up to `timeout` for control plane `i` to exit on its own.
    pub async fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.planes[i].child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.planes[i].child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `data` directory of node `name` on the agents.
    pub fn node_data_dir(&self, name: &str) -> PathBuf {
        crate::node::data_dir_of(crate::node_data_dirs(&self.agent_root()), name)
    }
}

impl Drop for TestPlanes {
    fn drop(&mut self) {
        for i in 0..self.planes.len() {
            self.kill(i);
        }
        for agent in &mut self.agent_processes {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        for data in crate::node_data_dirs(&self.agent_root()) {
            crate::stop_immediately(&data);
        }
        for plane in &self.planes {
            for data in crate::node_data_dirs(&plane.data) {
                crate::stop_immediately(&data);
            }
        }
    }
}
