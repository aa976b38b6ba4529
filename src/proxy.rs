//! The pgwarden proxy, started in-process on free loopback ports, and the test certificates.

use std::net::SocketAddr;
use std::path::PathBuf;

use pgwarden_api::{DatabaseRoute, RoutingTable};
use pgwarden_certs::Ca;
use pgwarden_proxy::config::{Limits, TlsFiles};
use pgwarden_proxy::{Config, Listeners, WorkerThreads, Workers};
use tokio_util::sync::CancellationToken;

use crate::http::{http_request, HttpResponse};

/// A CA and a server certificate for `localhost`/`127.0.0.1`, on disk.
pub struct TestCerts {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl TestCerts {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate().expect("CA");
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("write CA");
        let certs = Self { dir, ca };
        certs.reissue_server(&certs.ca);
        certs
    }

    /// Writes a new server certificate signed by `ca` over the current files.
    pub fn reissue_server(&self, ca: &Ca) {
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).expect("issue");
        server.write(&self.cert_path(), &self.key_path()).expect("write server cert");
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
    pub fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.cert_path(), key: self.key_path() }
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

/// A route to `primary`: no TLS required, no hold, the node authenticates clients.
pub fn plain_route(primary: &str) -> DatabaseRoute {
    DatabaseRoute {
        force_tls: false,
        primary: primary.to_owned(),
        replicas: vec![],
        hold: false,
        id: None,
        users: None,
        pool_size: None,
        client_connections: None,
        connections_per_second: None,
    }
}

/// A running proxy. Dropping it shuts it down.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The transaction-pooling address (`pool_listen`).
    pub pool_addr: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    threads: Option<WorkerThreads>,
}

impl TestProxy {
    /// Starts a proxy with `limits`, optional client TLS, and no routes.
    pub async fn start(limits: Limits, tls: Option<TlsFiles>) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::start_at(any, any, limits, tls).await
    }

    /// The same, on given addresses (to restart a proxy where it was).
    pub async fn start_at(
        clients: SocketAddr,
        admin: SocketAddr,
        limits: Limits,
        tls: Option<TlsFiles>,
    ) -> Self {
        Self::start_configured(clients, admin, |config| {
            config.limits = limits;
            config.tls = tls;
        })
        .await
    }

    /// Starts a proxy whose configuration `configure` completes (limits, TLS, domain...).
    pub async fn start_configured(
        clients: SocketAddr,
        admin: SocketAddr,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        // The proxy's log, with the test's output: `RUST_LOG=pgwarden_proxy=debug`.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let token = format!("test-token-{}", std::process::id());
        let mut config = Config::with_token(token.clone());
        configure(&mut config);
        let pool = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool_addr = pool.local_addr().expect("addr");
        config.pool_listen = Some(pool_addr);
        let listeners = Listeners {
            clients: Some(tokio::net::TcpListener::bind(clients).await.expect("bind")),
            pool: Some(pool),
            admin: tokio::net::TcpListener::bind(admin).await.expect("bind"),
        };
        let addr = listeners.clients.as_ref().expect("bound").local_addr().expect("addr");
        let admin = listeners.admin.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        // As the binary does: sessions spread over this runtime and a thread of its own, so
        // that every test also crosses runtimes (handover of sockets, wake-ups from the admin
        // API and shutdown).
        let (workers, threads) =
            Workers::start(tokio::runtime::Handle::current(), 1, false).expect("worker thread");
        let run = pgwarden_proxy::run_on(config, listeners, shutdown.clone(), workers);
        let task = tokio::spawn(run);
        Self { addr, pool_addr, admin, token, shutdown, task: Some(task), threads: Some(threads) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Routes `database` to `node` at `epoch` with `app`'s SCRAM verifier from the node's
    /// catalog: the proxy authenticates `app` itself, as with tables the control plane pushes.
    pub async fn route_authenticating(&self, epoch: u64, database: &str, node: &crate::PgNode) {
        self.route_pooled(epoch, database, node, None).await;
    }

    /// As `route_authenticating`, with at most `pool_size` pooled server connections.
    pub async fn route_pooled(
        &self,
        epoch: u64,
        database: &str,
        node: &crate::PgNode,
        pool_size: Option<u32>,
    ) {
        let out = node.superuser_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
        assert!(out.success, "{}", out.stderr);
        let users =
            pgwarden_api::Verifiers([("app".to_owned(), out.stdout.trim().to_owned())].into());
        let route = DatabaseRoute { users: Some(users), pool_size, ..plain_route(&node.address()) };
        let databases = [(database.to_owned(), route)].into();
        let answer = self.put_routes(&RoutingTable { epoch, databases, node_ca: None }).await;
        assert_eq!(answer.status, 200, "routes refused: {}", answer.body);
    }

    /// `PUT /v1/routes` with the admin token.
    pub async fn put_routes(&self, table: &RoutingTable) -> HttpResponse {
        let body = serde_json::to_string(table).expect("json");
        self.admin_request("PUT", "/v1/routes", Some(&self.token.clone()), Some(body)).await
    }

    /// Routes each `(database, primary, force_tls)` at `epoch`; panics unless accepted.
    pub async fn route(&self, epoch: u64, databases: &[(&str, &str, bool)]) {
        let table = RoutingTable {
            epoch,
            databases: databases
                .iter()
                .map(|(db, primary, force_tls)| {
                    let route = DatabaseRoute { force_tls: *force_tls, ..plain_route(primary) };
                    (db.to_string(), route)
                })
                .collect(),
            node_ca: None,
        };
        let answer = self.put_routes(&table).await;
        assert_eq!(answer.status, 200, "routes refused: {}", answer.body);
    }

    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> HttpResponse {
        let (admin, method, path) = (self.admin, method.to_owned(), path.to_owned());
        let token = token.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            http_request(admin, &method, &path, token.as_deref(), body.as_deref())
        })
        .await
        .expect("join")
        .expect("admin request")
    }

    /// Current value of one metric series (the whole `name{labels}` as printed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.admin_request("GET", "/metrics", None, None).await.body;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().expect("number"))
            .unwrap_or(0.0)
    }

    /// The value of `series` once it reaches `want`, or its last value after 5 s (a counter
    /// the proxy moves after the client already saw the outcome: a cancel request counts as
    /// forwarded once its connection to the node is closed).
    pub async fn metric_reaching(&self, series: &str, want: f64) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let value = self.metric(series).await;
            if value == want || std::time::Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// libpq connection string for `database` as `user` through the proxy.
    pub fn conninfo(&self, database: &str, user: &str, extra: &str) -> String {
        format!("host=127.0.0.1 port={} dbname={database} user={user} {extra}", self.port())
    }

    /// Stops the proxy as SIGTERM would, and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = match self.task.take() {
            Some(task) => task.await.expect("proxy task panicked"),
            None => Ok(()),
        };
        if let Some(threads) = self.threads.take() {
            threads.stop();
        }
        result
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(threads) = self.threads.take() {
            threads.stop();
        }
    }
}
