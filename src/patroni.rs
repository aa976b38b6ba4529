//! Patroni beside pgwarden, for the failover benchmark (`benches/patroni.rs`): Debian's
//! Patroni with its documented defaults (ttl 30 s, loop_wait 10 s, retry_timeout 10 s) on
//! three database hosts in network namespaces, three etcd members (the same cluster as
//! `TestHosts`), and HAProxy in front with the check Patroni's documentation gives
//! (`OPTIONS /primary` on the REST API every 3 s, down after 3 failures, up after 2, sessions
//! ended when marked down). Synchronous mode is on, as pgwarden's business plans replicate.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::http_request_within;
use crate::netns::Lan;

const HOSTS: [&str; 7] = ["e1", "e2", "e3", "db1", "db2", "db3", "lb"];
const ETCD: [&str; 3] = ["e1", "e2", "e3"];
pub const PATRONI_HOSTS: [&str; 3] = ["db1", "db2", "db3"];
const SUPERUSER_PASSWORD: &str = "bench-superuser";
const REST: u16 = 8008;
const CLIENTS: u16 = 5000;

pub struct PatroniHosts {
    pub dir: tempfile::TempDir,
    processes: Vec<(String, Child)>,
    pub lan: Lan,
}

impl PatroniHosts {
    /// Starts everything and returns once a primary answers through HAProxy.
    pub async fn start() -> Self {
        let lan = Lan::new(&HOSTS);
        let dir = tempfile::Builder::new().prefix("pgwarden-patroni-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let mut hosts = Self { dir, processes: Vec::new(), lan };
        for (host, command) in crate::hosts::etcd_cluster(&hosts.lan, hosts.dir.path(), &ETCD) {
            hosts.spawn(&host, command);
        }
        for host in PATRONI_HOSTS {
            hosts.start_patroni(host);
        }
        hosts.start_haproxy();
        let deadline = Instant::now() + Duration::from_secs(180);
        while !crate::psql(&hosts.url(), None, "SELECT 1").success {
            assert!(Instant::now() < deadline, "no primary through HAProxy:\n{}", hosts.tails());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        hosts
    }

    /// The superuser's URL through HAProxy (what an application of Patroni's uses).
    pub fn url(&self) -> String {
        let lb = self.lan.addr("lb");
        format!("postgres://postgres:{SUPERUSER_PASSWORD}@{lb}:{CLIENTS}/postgres")
    }

    fn spawn(&mut self, host: &str, mut command: std::process::Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("{host}.log"))).expect("log");
        let child = command.stdout(Stdio::null()).stderr(log).spawn().expect("a process");
        self.processes.push((host.to_owned(), child));
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    /// Starts (again) Patroni on `host`, as the `postgres` OS user.
    pub fn start_patroni(&mut self, host: &str) {
        let dir = self.host_dir(host);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let chown = std::process::Command::new("chown").arg("postgres:postgres").arg(&dir).status();
        assert!(chown.is_ok_and(|s| s.success()), "chown {}", dir.display());
        let config = dir.join("patroni.yml");
        std::fs::write(&config, self.patroni_config(host, &dir)).expect("write");
        let mut command = self.lan.command(host, "setpriv");
        command.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "patroni"]);
        command.arg(&config);
        self.spawn(host, command);
    }

    fn patroni_config(&self, host: &str, dir: &Path) -> String {
        let addr = self.lan.addr(host);
        let etcd: Vec<String> = ETCD.iter().map(|e| format!("{}:2379", self.lan.addr(e))).collect();
        let dir = dir.display();
        format!(
            "scope: bench\nname: {host}\n\
             restapi:\n  listen: {addr}:{REST}\n  connect_address: {addr}:{REST}\n\
             etcd3:\n  hosts: {etcd}\n\
             bootstrap:\n  dcs:\n    ttl: 30\n    loop_wait: 10\n    retry_timeout: 10\n    \
             maximum_lag_on_failover: 1048576\n    synchronous_mode: true\n    \
             postgresql:\n      use_pg_rewind: true\n      parameters:\n        \
             wal_log_hints: 'on'\n  \
             initdb:\n  - encoding: UTF8\n  \
             pg_hba:\n  - local all all trust\n  - host replication replicator 10.0.0.0/8 md5\n  \
             - host all all 10.0.0.0/8 md5\n\
             postgresql:\n  listen: {addr}:5432\n  connect_address: {addr}:5432\n  \
             data_dir: {dir}/data\n  bin_dir: /usr/lib/postgresql/15/bin\n  \
             pgpass: {dir}/pgpass\n  \
             authentication:\n    superuser:\n      username: postgres\n      \
             password: {SUPERUSER_PASSWORD}\n    replication:\n      username: replicator\n      \
             password: bench-replicator\n    rewind:\n      username: postgres\n      \
             password: {SUPERUSER_PASSWORD}\n  \
             parameters:\n    unix_socket_directories: '{dir}'\n",
            etcd = etcd.join(","),
        )
    }

    fn start_haproxy(&mut self) {
        let lb = self.lan.addr("lb");
        let servers: String = PATRONI_HOSTS
            .iter()
            .map(|h| {
                let addr = self.lan.addr(h);
                format!("    server {h} {addr}:5432 maxconn 100 check port {REST}\n")
            })
            .collect();
        let config = format!(
            "global\n    maxconn 100\n\
             defaults\n    mode tcp\n    retries 2\n    timeout client 30m\n    \
             timeout connect 4s\n    timeout server 30m\n    timeout check 5s\n\
             listen primary\n    bind {lb}:{CLIENTS}\n    option httpchk OPTIONS /primary\n    \
             http-check expect status 200\n    \
             default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n{servers}"
        );
        let path = self.dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write");
        let mut command = self.lan.command("lb", "haproxy");
        command.arg("-db").arg("-f").arg(&path);
        self.spawn("lb", command);
    }

    async fn rest(&self, host: &str, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::from((self.lan.addr(host), REST));
        let path = path.to_owned();
        let wait = Duration::from_secs(2);
        let ask = move || http_request_within(addr, "GET", &path, None, None, wait).ok();
        let answer = tokio::task::spawn_blocking(ask).await.expect("join")?;
        Some((answer.status, answer.body))
    }

    /// The host whose Patroni leads (its `/primary` answers 200), once one does.
    pub async fn primary(&self, timeout: Duration) -> &'static str {
        let deadline = Instant::now() + timeout;
        loop {
            for host in PATRONI_HOSTS {
                if self.rest(host, "/primary").await.is_some_and(|(status, _)| status == 200) {
                    return host;
                }
            }
            assert!(Instant::now() < deadline, "no Patroni primary:\n{}", self.tails());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until all three members run, one of them the synchronous standby.
    pub async fn wait_steady(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.primary(timeout).await;
            if let Some((200, body)) = self.rest(leader, "/cluster").await {
                let cluster: Value = serde_json::from_str(&body).unwrap_or_default();
                let members = cluster["members"].as_array().cloned().unwrap_or_default();
                let running =
                    |m: &Value| matches!(m["state"].as_str(), Some("running" | "streaming"));
                let synced = members.iter().any(|m| m["role"] == "sync_standby");
                if members.len() == 3 && members.iter().all(running) && synced {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "Patroni not steady:\n{}", self.tails());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The data directory of the node on `host`.
    pub fn data_dir(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("data")
    }

    /// Kills (kill -9) every process of `host`: Patroni and its PostgreSQL die together.
    pub fn kill_host(&mut self, host: &str) {
        self.lan.kill_all(host);
        for (_, child) in self.processes.iter_mut().filter(|(h, _)| h == host) {
            let _ = child.wait();
        }
        self.processes.retain(|(h, _)| h != host);
    }

    /// The last lines each host logged.
    pub fn tails(&self) -> String {
        let tail = |host: &&str| {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{host}.log")));
            let log = log.unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            format!("--- {host}\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
        };
        PATRONI_HOSTS.iter().chain(&["lb"]).map(tail).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for PatroniHosts {
    fn drop(&mut self) {
        for host in HOSTS {
            self.lan.kill_all(host);
        }
        for (_, child) in &mut self.processes {
            let _ = child.wait();
        }
    }
}
