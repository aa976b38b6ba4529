//! The whole multi-host platform in network namespaces (`netns.rs`): three etcd members
//! (`e1`..`e3`), three database hosts with agents (`db1`..`db3`), two control planes (`cp1`,
//! `cp2`) and two proxies (`px1`, `px2`) elected through etcd, the active one holding the
//! virtual IP clients use (`on_active` adds it and announces it with a gratuitous ARP,
//! `on_standby` removes it). Every process is real and runs in its host; the test reaches them
//! over the LAN. etcd keeps its default timing and the leases are the defaults (5 s; the
//! proxy pair's 3 s): the whole suite runs beside these hosts on two cores, and an etcd leader
//! election slowed by that load must not end a lease.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::{http_request_within, HttpResponse};
use crate::netns::Lan;
use crate::wait::wait_until_every;

const HOSTS: [&str; 10] = ["e1", "e2", "e3", "db1", "db2", "db3", "cp1", "cp2", "px1", "px2"];
pub const DB_HOSTS: [&str; 3] = ["db1", "db2", "db3"];
pub const PLANES: [&str; 2] = ["cp1", "cp2"];
pub const PROXIES: [&str; 2] = ["px1", "px2"];
const API: u16 = 9180;
const ADMIN: u16 = 9181;
const AGENT: u16 = 9190;
const CLIENTS: u16 = 6432;

pub struct TestHosts {
    pub dir: tempfile::TempDir,
    /// Every process, by host (several per host at most once each).
    processes: Vec<(String, Child)>,
    pub token: String,
    pub lan: Lan,
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

const ETCD: [&str; 3] = ["e1", "e2", "e3"];

/// The client URLs of etcd members `members` of `lan`, comma-separated.
pub(crate) fn etcd_endpoints(lan: &Lan, members: &[&str]) -> String {
    let urls: Vec<String> =
        members.iter().map(|h| format!("http://{}:2379", lan.addr(h))).collect();
    urls.join(",")
}

/// The commands that start one etcd cluster of `members` (etcd's default timing), each in its
/// host of `lan`, with its data in `dir/<member>`.
pub(crate) fn etcd_cluster(
    lan: &Lan,
    dir: &Path,
    members: &[&str],
) -> Vec<(String, std::process::Command)> {
    let cluster: Vec<String> =
        members.iter().map(|h| format!("{h}=http://{}:2380", lan.addr(h))).collect();
    let start = |host: &&str| {
        let addr = lan.addr(host);
        let mut command = lan.command(host, "etcd");
        command
            .args(["--name", host])
            .arg("--data-dir")
            .arg(dir.join(host))
            .args(["--listen-client-urls", &format!("http://{addr}:2379")])
            .args(["--advertise-client-urls", &format!("http://{addr}:2379")])
            .args(["--listen-peer-urls", &format!("http://{addr}:2380")])
            .args(["--initial-advertise-peer-urls", &format!("http://{addr}:2380")])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "hosts"]);
        (host.to_string(), command)
    };
    members.iter().map(start).collect()
}

impl TestHosts {
    pub async fn start() -> Self {
        let lan = Lan::new(&HOSTS);
        let dir = tempfile::Builder::new().prefix("pgwarden-hosts-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let mut hosts = Self { dir, processes: Vec::new(), token: String::new(), lan };
        hosts.start_etcd();
        private_file(&hosts.dir.path().join("proxy-token"), "hosts-proxy-token");
        // The planes' shared secrets, made by `pgwarden init` before either starts, and copied
        // to the second as an operator copies them to its host.
        let (first, second) = (hosts.data("cp1"), hosts.data("cp2"));
        let init = std::process::Command::new(crate::workspace_bin("pgwarden"))
            .arg("--data-dir")
            .arg(&first)
            .arg("init")
            .output()
            .expect("pgwarden init");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        std::fs::create_dir_all(&second).expect("mkdir");
        std::fs::set_permissions(&second, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        for shared in ["secret.key", "token", "ca"] {
            crate::planes::private_copy(&first.join(shared), &second.join(shared));
        }
        hosts.start_plane("cp1");
        hosts.wait_leader(Duration::from_secs(60)).await;
        hosts.token = std::fs::read_to_string(first.join("token")).expect("token").trim().into();
        for host in DB_HOSTS {
            hosts.start_agent(host);
        }
        hosts.start_plane("cp2");
        for host in PROXIES {
            hosts.start_proxy(host);
        }
        hosts.wait_active_proxy(Duration::from_secs(30)).await;
        hosts
    }

    /// The address clients use (the active proxy's).
    pub fn vip(&self) -> Ipv4Addr {
        self.lan.at(100)
    }

    fn data(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    fn log(&self, host: &str) -> std::fs::File {
        std::fs::File::create(self.dir.path().join(format!("{host}.log"))).expect("log")
    }

    /// The last lines each of `hosts` logged.
    pub fn tails(&self, hosts: &[&str]) -> String {
        let tail = |host: &&str| {
            let log = self.log_of(host);
            let lines: Vec<&str> = log.lines().collect();
            format!("--- {host}\n{}", lines[lines.len().saturating_sub(25)..].join("\n"))
        };
        hosts.iter().map(tail).collect::<Vec<_>>().join("\n")
    }

    /// What `host`'s process logged.
    pub fn log_of(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{host}.log"))).unwrap_or_default()
    }

    fn spawn(&mut self, host: &str, mut command: std::process::Command) {
        let child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(host))
            .spawn()
            .expect("a process in its host");
        self.processes.push((host.to_owned(), child));
    }

    fn etcd_endpoints(&self) -> String {
        etcd_endpoints(&self.lan, &ETCD)
    }

    fn start_etcd(&mut self) {
        for (host, command) in etcd_cluster(&self.lan, self.dir.path(), &ETCD) {
            self.spawn(&host, command);
        }
    }

    /// Starts (again) the control plane of `host` (`cp1`, `cp2`); it stands by if another
    /// leads.
    pub fn start_plane(&mut self, host: &str) {
        let api = format!("{}:{API}", self.lan.addr(host));
        let mut command = self.lan.command(host, crate::workspace_bin("pgwarden"));
        command.arg("--data-dir").arg(self.data(host));
        command.args(["serve", "--listen", &api, "--advertise", &api]);
        command.args(["--etcd", &self.etcd_endpoints(), "--lease-ttl-secs", "5"]);
        for db in DB_HOSTS {
            command.args(["--agent", &format!("{}:{AGENT}", self.lan.addr(db))]);
        }
        command.arg("--agent-root").arg(self.dir.path().join("agents"));
        for proxy in PROXIES {
            command.args(["--proxy-admin", &format!("{}:{ADMIN}", self.lan.addr(proxy))]);
        }
        command.arg("--proxy-token-file").arg(self.dir.path().join("proxy-token"));
        command.args(["--client-addr", &format!("{}:{CLIENTS}", self.vip())]);
        command.args(["--first-node-port", "15432"]);
        self.spawn(host, command);
    }

    /// Starts (again) the agent of database host `host`.
    pub fn start_agent(&mut self, host: &str) {
        let addr = format!("{}:{AGENT}", self.lan.addr(host));
        let tls = self.dir.path().join(format!("tls-{host}"));
        let out = std::process::Command::new(crate::workspace_bin("pgwarden"))
            .arg("--data-dir")
            .arg(self.data("cp1"))
            .args(["agent-cert", "--address", &self.lan.addr(host).to_string(), "--out"])
            .arg(&tls)
            .output()
            .expect("pgwarden agent-cert");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Each host has its own disk: its agent sees its own root (`hosts/<host>`) at the path
        // every agent is given (`agents`), through a bind mount in the host's private mount
        // namespace (`ip netns exec` gives each command one). Its PostgreSQL nodes, its newest
        // term and what its fencing kills are its own, as on separate machines.
        let (root, shared) = (self.host_root(host), self.dir.path().join("agents"));
        std::fs::create_dir_all(&root).expect("a host's root");
        std::fs::create_dir_all(&shared).expect("the agents' root");
        let mut command = self.lan.command(host, "sh");
        command.args(["-c", r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#, "sh"]);
        command.arg(&root).arg(&shared).arg(crate::workspace_bin("pgwarden"));
        command.args(["agent", "--listen", &addr, "--advertise", &addr, "--dir"]);
        command.arg(&shared).arg("--tls-dir").arg(&tls);
        command.args(["--etcd", &self.etcd_endpoints(), "--lease-ttl-secs", "5"]);
        self.spawn(host, command);
    }

    fn start_proxy(&mut self, host: &str) {
        let vip = self.vip();
        let endpoints: Vec<String> =
            self.etcd_endpoints().split(',').map(|e| format!("\"{e}\"")).collect();
        let config = format!(
            "listen = \"{vip}:{CLIENTS}\"\nadmin_listen = \"{}:{ADMIN}\"\n\
             admin_token_file = \"{}\"\n\
             [etcd]\nendpoints = [{}]\nfence_after_ms = 5000\n\
             [ha]\netcd_pair = \"main\"\ntakeover_after_ms = 3000\n\
             on_active = \"ip addr add {vip}/24 dev eth0 && (arping -q -U -c 2 -I eth0 {vip} || true)\"\n\
             on_standby = \"ip addr del {vip}/24 dev eth0 || true\"\n",
            self.lan.addr(host),
            self.dir.path().join("proxy-token").display(),
            endpoints.join(", "),
        );
        let path = self.dir.path().join(format!("{host}.toml"));
        std::fs::write(&path, config).expect("write");
        let mut command = self.lan.command(host, crate::workspace_bin("pgwarden-proxy"));
        command.arg("--config").arg(&path);
        self.spawn(host, command);
    }

    fn api(&self, host: &str) -> SocketAddr {
        SocketAddr::from((self.lan.addr(host), API))
    }

    async fn get(addr: SocketAddr, path: &str, token: Option<String>) -> Option<HttpResponse> {
        let path = path.to_owned();
        let wait = Duration::from_millis(500);
        let ask =
            move || http_request_within(addr, "GET", &path, token.as_deref(), None, wait).ok();
        tokio::task::spawn_blocking(ask).await.expect("join")
    }

    /// The status of `host`'s `/health` (`None`: no answer).
    pub async fn health(&self, host: &str) -> Option<u16> {
        Self::get(self.api(host), "/health", None).await.map(|h| h.status)
    }

    /// The leading control plane, once one leads.
    pub async fn wait_leader(&self, timeout: Duration) -> &'static str {
        let every = Duration::from_millis(20);
        wait_until_every("a control plane leading", timeout, every, async || {
            for host in PLANES {
                let running = self.processes.iter().any(|(h, _)| h == host);
                let health = Self::get(self.api(host), "/health", None).await;
                if running && health.is_some_and(|h| h.status == 200) {
                    return Ok(host);
                }
            }
            Err(format!("none leads:\n{}", self.tails(&PLANES)))
        })
        .await
    }

    /// The active proxy, once one is.
    pub async fn wait_active_proxy(&self, timeout: Duration) -> &'static str {
        let every = Duration::from_millis(20);
        wait_until_every("an active proxy", timeout, every, async || {
            for host in PROXIES {
                let admin = SocketAddr::from((self.lan.addr(host), ADMIN));
                let active = Self::get(admin, "/active", None).await;
                if active.is_some_and(|a| a.status == 200) {
                    return Ok(host);
                }
            }
            Err(format!("none active:\n{}", self.tails(&PROXIES)))
        })
        .await
    }

    /// A request to the leading control plane.
    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let leader = self.wait_leader(Duration::from_secs(30)).await;
        let (addr, token) = (self.api(leader), self.token.clone());
        let (method, path) = (method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let body = body.map(|b| b.to_string());
            crate::http_request(addr, &method, &path, Some(&token), body.as_deref())
        })
        .await
        .expect("join")
        .expect("control request")
    }

    /// Creates a database and waits until it replicates synchronously; returns it.
    pub async fn create_database(&self, name: &str, plan: &str) -> Value {
        let body = serde_json::json!({"name": name, "plan": plan});
        let r = self.request("POST", "/v1/databases", Some(body)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        let id = r.json()["database"]["id"].as_str().expect("id").to_owned();
        self.wait_database(&id, |db| db["replication"] == "synchronous").await
    }

    /// Polls the database until `check` holds (at most 120 s).
    pub async fn wait_database(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let db = self.request("GET", &format!("/v1/databases/{id}"), None).await;
            if db.status == 200 && check(&db.json()) {
                return db.json();
            }
            if Instant::now() >= deadline {
                let path = format!("/v1/databases/{id}/events");
                let events = self.request("GET", &path, None).await.body;
                let all = [&PLANES[..], &DB_HOSTS[..]].concat();
                panic!("database {id}: {}\nevents: {events}\n{}", db.body, self.tails(&all));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills (kill -9) the processes of `host`.
    pub fn kill(&mut self, host: &str) {
        for (_, child) in self.processes.iter_mut().filter(|(h, _)| h == host) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.processes.retain(|(h, _)| h != host);
    }

    /// Kills (kill -9) every process in `host`, started here or not (an agent's PostgreSQL
    /// nodes among them): the host died.
    pub fn kill_host(&mut self, host: &str) {
        self.lan.kill_all(host);
        self.kill(host);
    }

    /// Sends `signal` to the processes of `host`.
    pub fn signal(&self, host: &str, signal: rustix::process::Signal) {
        for (_, child) in self.processes.iter().filter(|(h, _)| h == host) {
            let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
            rustix::process::kill_process(pid, signal).expect("kill");
        }
    }

    /// What the agent of database host `host` sees as its root (`--dir`).
    fn host_root(&self, host: &str) -> PathBuf {
        self.dir.path().join("hosts").join(host)
    }

    /// The `data` directories of every host's nodes.
    fn node_data_dirs(&self) -> Vec<PathBuf> {
        DB_HOSTS.iter().flat_map(|h| crate::node_data_dirs(&self.host_root(h))).collect()
    }

    /// The `data` directory of node `name` (wherever its host keeps it).
    pub fn node_data_dir(&self, name: &str) -> PathBuf {
        crate::node::data_dir_of(self.node_data_dirs(), name)
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for data in self.node_data_dirs() {
            crate::stop_immediately(&data);
        }
    }
}
