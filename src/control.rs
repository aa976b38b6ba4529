//! The control plane (`pgwarden serve`) started in-process, with a proxy it publishes to.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use pgwarden_control::{NodeOptions, PlatformConfig};
use pgwarden_proxy::config::Limits;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::http::{http_request, HttpResponse};
use crate::proxy::{TestCerts, TestProxy};
use crate::wait_until;

pub struct TestControl {
    pub addr: SocketAddr,
    pub token: String,
    pub dir: tempfile::TempDir,
    pub proxy: TestProxy,
    pub certs: TestCerts,
    /// The control plane's data dir.
    pub data: std::path::PathBuf,
    extra_proxies: Vec<String>,
    engines_dir: Option<std::path::PathBuf>,
    /// How long clusters a major upgrade replaced are kept (default: a day).
    rollback_window: Duration,
    /// How often stats are sampled (default 10 s, as `serve`'s).
    stats_interval: Duration,
    /// Agents (`host:port`) whose hosts run the nodes; their root is `agents` under the
    /// test's temp dir.
    agents: Vec<String>,
    agent_processes: Vec<std::process::Child>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestControl {
    /// A proxy (client TLS on) and a control plane publishing to it, on a fresh data dir.
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    pub async fn start_with(extra_settings: Vec<(String, String)>) -> Self {
        Self::start_full(extra_settings, Vec::new(), "data", None).await
    }

    /// Also publishing to `extra_proxies` (admin addresses, first), with the data dir at
    /// `data` under the test's temp dir (it may hold spaces and quotes), and PostgreSQL builds
    /// from `engines_dir` beside Debian's.
    pub async fn start_full(
        extra_settings: Vec<(String, String)>,
        extra_proxies: Vec<String>,
        data: &str,
        engines_dir: Option<std::path::PathBuf>,
    ) -> Self {
        Self::start_keeping(
            extra_settings,
            extra_proxies,
            data,
            engines_dir,
            Duration::from_secs(86_400),
        )
        .await
    }

    /// As `start_full`, keeping the clusters a major upgrade replaced for `rollback_window`.
    pub async fn start_keeping(
        extra_settings: Vec<(String, String)>,
        extra_proxies: Vec<String>,
        data: &str,
        engines_dir: Option<std::path::PathBuf>,
        rollback_window: Duration,
    ) -> Self {
        let sampling = Duration::from_secs(10);
        Self::start_inner(
            extra_settings,
            extra_proxies,
            data,
            engines_dir,
            rollback_window,
            sampling,
            Vec::new(),
        )
        .await
    }

    async fn start_inner(
        extra_settings: Vec<(String, String)>,
        extra_proxies: Vec<String>,
        data: &str,
        engines_dir: Option<std::path::PathBuf>,
        rollback_window: Duration,
        stats_interval: Duration,
        agents: Vec<String>,
    ) -> Self {
        let dir = tempfile::Builder::new().prefix("pgwarden-control-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // Directories above the data dir let the node user through, as the README asks.
        let mut parent = dir.path().to_owned();
        for part in std::path::Path::new(data).parent().into_iter().flat_map(|p| p.components()) {
            parent.push(part);
            std::fs::create_dir_all(&parent).expect("mkdir");
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let certs = TestCerts::new();
        let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
        let mut control = Self {
            addr: "127.0.0.1:0".parse().expect("addr"),
            token: String::new(),
            data: dir.path().join(data),
            dir,
            proxy,
            certs,
            extra_proxies,
            engines_dir,
            rollback_window,
            stats_interval,
            agents,
            agent_processes: Vec::new(),
            shutdown: CancellationToken::new(),
            task: None,
        };
        control.run(extra_settings).await;
        control
    }

    /// A proxy and a control plane that samples stats every `interval`.
    pub async fn start_sampling(interval: Duration) -> Self {
        Self::start_inner(
            Vec::new(),
            Vec::new(),
            "data",
            None,
            Duration::from_secs(86_400),
            interval,
            Vec::new(),
        )
        .await
    }

    /// A proxy and a control plane whose nodes run on node agents (`pgwarden agent`
    /// processes), one per address of `hosts` (loopback addresses: 127.0.0.2...), each with a
    /// certificate issued by `pgwarden agent-cert`.
    pub async fn start_on_agents(hosts: &[&str]) -> Self {
        Self::start_on_agents_with(hosts, None).await
    }

    /// `start_on_agents`, with the engines directory `engines_dir`.
    pub async fn start_on_agents_with(
        hosts: &[&str],
        engines_dir: Option<std::path::PathBuf>,
    ) -> Self {
        let addrs = crate::planes::free_addrs(hosts);
        let mut control = Self::start_inner(
            Vec::new(),
            Vec::new(),
            "data",
            engines_dir,
            Duration::from_secs(86_400),
            Duration::from_secs(10),
            addrs.clone(),
        )
        .await;
        let root = control.agent_root();
        for addr in &addrs {
            let parent = control.dir.path().to_owned();
            let child = crate::planes::start_agent(&control.data, &root, addr, &parent, &[]).await;
            control.agent_processes.push(child);
        }
        control
    }

    /// The agents' root directory (nodes under `nodes/`).
    pub fn agent_root(&self) -> std::path::PathBuf {
        self.dir.path().join("agents")
    }

    /// The agents' addresses (`host:port`).
    pub fn agents(&self) -> &[String] {
        &self.agents
    }

    /// Kills the agent at `addr` (as a crash would: its nodes keep running).
    pub fn kill_agent(&mut self, addr: &str) {
        if let Some(i) = self.agents.iter().position(|a| a == addr) {
            if let Some(child) = self.agent_processes.get_mut(i) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills the agent at `addr` and starts it again on the same root.
    pub async fn restart_agent(&mut self, addr: &str) {
        self.kill_agent(addr);
        let Some(i) = self.agents.iter().position(|a| a == addr) else { return };
        let (root, parent) = (self.agent_root(), self.dir.path().to_owned());
        let child = crate::planes::start_agent(&self.data, &root, addr, &parent, &[]).await;
        self.agent_processes[i] = child;
    }

    /// Starts (again) the control plane on the same data dir and proxy.
    pub async fn run(&mut self, extra_settings: Vec<(String, String)>) {
        let config = PlatformConfig {
            data_dir: self.data.clone(),
            backup_dir: self.data.join("backups"),
            client_host: "127.0.0.1".into(),
            client_port: self.proxy.port(),
            client_pool_port: Some(self.proxy.pool_addr.port()),
            proxies: self
                .extra_proxies
                .iter()
                .cloned()
                .chain([self.proxy.admin.to_string()])
                .collect(),
            proxy_token: self.proxy.token.clone(),
            node_host: "127.0.0.1".into(),
            agents: self.agents.clone(),
            agent_root: self.dir.path().join("agents"),
            first_node_port: crate::node_port_block(),
            extra_settings,
            health: Default::default(),
            backup_tick: Duration::from_millis(200),
            engines_dir: self.engines_dir.clone(),
            rollback_window: self.rollback_window,
            stats_interval: self.stats_interval,
            stats_retention: Duration::from_secs(7 * 24 * 3600),
            etcd: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.addr = listener.local_addr().expect("addr");
        self.shutdown = CancellationToken::new();
        self.task = Some(tokio::spawn(pgwarden_control::serve(
            listener,
            config,
            NodeOptions::default(),
            self.shutdown.clone(),
        )));
        let token_path = self.data.join("token");
        wait_until("the control plane's start", Duration::from_secs(10), async || {
            token_path.exists().then_some(()).ok_or_else(|| "no token file yet".to_owned())
        })
        .await;
        self.token = std::fs::read_to_string(token_path).expect("token").trim().to_owned();
    }

    /// Stops the API (as a crash would: nodes keep running).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        self.request_as(Some(self.token.clone()), method, path, body).await
    }

    pub async fn request_as(
        &self,
        token: Option<String>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> HttpResponse {
        let (addr, method, path) = (self.addr, method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            http_request(
                addr,
                &method,
                &path,
                token.as_deref(),
                body.map(|b| b.to_string()).as_deref(),
            )
        })
        .await
        .expect("join")
        .expect("control request")
    }

    /// Polls an operation until it ends; returns it.
    pub async fn wait_operation(&self, id: &str) -> Value {
        wait_until(&format!("the end of operation {id}"), Duration::from_secs(180), async || {
            let op = self.request("GET", &format!("/v1/operations/{id}"), None).await.json();
            let ended = op["status"] == "succeeded" || op["status"] == "failed";
            if ended {
                Ok(op)
            } else {
                Err(op.to_string())
            }
        })
        .await
    }

    /// Creates a database and waits for its provisioning; returns the database object.
    pub async fn create_database(&self, name: &str, plan: &str) -> Value {
        let r = self
            .request("POST", "/v1/databases", Some(serde_json::json!({"name": name, "plan": plan})))
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        let answer = r.json();
        let op = self.wait_operation(answer["operation"]["id"].as_str().expect("op id")).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let id = answer["database"]["id"].as_str().expect("id");
        self.request("GET", &format!("/v1/databases/{id}"), None).await.json()
    }

    /// Creates a database and waits until the proxy routes it: its record, id and URL.
    pub async fn create_routed_database(&self, name: &str, plan: &str) -> (Value, String, String) {
        let db = self.create_database(name, plan).await;
        let id = db["id"].as_str().expect("id").to_owned();
        let url = db["database_url"].as_str().expect("url").to_owned();
        self.wait_routed(db["name"].as_str().expect("name"), true).await;
        (db, id, url)
    }

    /// Waits until the proxy routes `database` (the publisher pushes asynchronously).
    pub async fn wait_routed(&self, database: &str, present: bool) {
        let what = format!("the route of {database} being there: {present}");
        wait_until(&what, Duration::from_secs(10), async || {
            let token = self.proxy.token.clone();
            let r = self.proxy.admin_request("GET", "/v1/routes", Some(&token), None).await;
            if r.json()["databases"].get(database).is_some() == present {
                Ok(())
            } else {
                Err(r.body)
            }
        })
        .await
    }
}

impl Drop for TestControl {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for agent in &mut self.agent_processes {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        // Nodes outlive the control plane and agents by design; a test's nodes must not.
        for data in self.all_node_data_dirs() {
            crate::stop_immediately(&data);
        }
    }
}

impl TestControl {
    /// The `data` directories of every node, on this host and on the agents.
    fn all_node_data_dirs(&self) -> Vec<std::path::PathBuf> {
        let mut dirs = crate::node_data_dirs(&self.data);
        dirs.extend(crate::node_data_dirs(&self.agent_root()));
        dirs
    }

    /// The `data` directory of node `name` (directories carry a per-attempt suffix).
    pub fn node_data_dir(&self, name: &str) -> std::path::PathBuf {
        crate::node::data_dir_of(self.all_node_data_dirs(), name)
    }

    /// The one-line answer of `sql` on every node of `db` (a database object of the API), as
    /// the superuser over each node's own socket.
    pub fn sql_on_every_node(&self, db: &Value, sql: &str) -> Vec<String> {
        db["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                let dir = self.node_data_dir(n["name"].as_str().expect("name"));
                let conninfo = format!(
                    "host='{}' port={} user=postgres dbname=postgres",
                    dir.parent().expect("node dir").display(),
                    n["port"]
                );
                let out = crate::psql(&conninfo, None, sql);
                assert!(out.success, "{sql}: {}", out.stderr);
                out.stdout.trim().to_owned()
            })
            .collect()
    }

    /// Waits until database `id` replicates synchronously with every node running.
    pub async fn wait_synchronous(&self, id: &str, what: &str) -> Value {
        self.wait_database(id, what, |db| {
            db["replication"] == "synchronous"
                && db["nodes"].as_array().expect("nodes").iter().all(|n| n["status"] == "running")
        })
        .await
    }

    /// Polls the events of database `id` until one of `kind` is there; returns them all.
    /// Events are recorded when a step has ended, which can be after clients see its effect
    /// (a failover reconfigures the new primary after the proxies route to it).
    pub async fn wait_event(&self, id: &str, kind: &str) -> Value {
        wait_until(&format!("a {kind} event"), Duration::from_secs(60), async || {
            let events =
                self.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
            if events.as_array().expect("events").iter().any(|e| e["kind"] == kind) {
                Ok(events)
            } else {
                Err(events.to_string())
            }
        })
        .await
    }

    /// Polls `GET /v1/databases/{id}` until `check` holds; returns the database.
    pub async fn wait_database(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(what, Duration::from_secs(90), async || {
            let db = self.request("GET", &format!("/v1/databases/{id}"), None).await.json();
            if check(&db) {
                Ok(db)
            } else {
                Err(db.to_string())
            }
        })
        .await
    }
}
