//! `pgwarden serve` and `pgwarden up` as commands: data dir, proxies, signals.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::Method;
use pgwarden_api::control::{Database, DatabaseOperation, DatabaseStatus};
use pgwarden_certs::Ca;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::args::{AgentArgs, AgentCertArgs, EtcdArgs, HealthArgs, NodeArgs, ServeArgs, UpArgs};
use crate::agent::server::DEFAULT_ROOT;
use crate::cli::{split_host_port, Client};
use crate::httpc::Timeouts;
use crate::server::{read_secret_file, NodeOptions};
use crate::wait;
use crate::{HealthConfig, PlatformConfig};

/// Cancels the returned token on SIGINT or SIGTERM.
fn on_signals() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        cancel.cancel();
    });
    Ok(token)
}

/// The platform settings `serve` and `up` share: nodes on loopback, daily-backup checks every
/// 30 s.
fn platform_config(
    data_dir: &Path,
    (client_host, client_port, client_pool_port): (String, u16, Option<u16>),
    proxies: Vec<String>,
    proxy_token: String,
    nodes: &NodeArgs,
) -> PlatformConfig {
    PlatformConfig {
        data_dir: data_dir.to_owned(),
        backup_dir: data_dir.join("backups"),
        client_host,
        client_port,
        client_pool_port,
        proxies,
        proxy_token,
        node_host: "127.0.0.1".into(),
        agents: Vec::new(),
        agent_root: DEFAULT_ROOT.into(),
        first_node_port: nodes.first_node_port,
        extra_settings: Vec::new(),
        health: health_config(&nodes.health),
        backup_tick: Duration::from_secs(30),
        engines_dir: nodes.engines_dir.clone(),
        rollback_window: Duration::from_secs(nodes.rollback_window_secs),
        stats_interval: Duration::from_secs(nodes.stats_interval_secs),
        stats_retention: Duration::from_secs(nodes.stats_retention_hours * 3600),
        etcd: None,
    }
}

fn health_config(args: &HealthArgs) -> HealthConfig {
    let interval = Duration::from_millis(args.health_interval_ms.max(50));
    HealthConfig {
        interval,
        failures: args.health_failures.max(1),
        timeout: interval.mul_f64(0.8),
        max_failover_lag_bytes: args.max_failover_lag_bytes,
    }
}

pub async fn serve_command(data_dir: &Path, args: ServeArgs) -> anyhow::Result<()> {
    crate::files::private_dir(data_dir)?;
    // The API token exists before the API listens: a client that reaches it can authenticate.
    read_secret_file(&data_dir.join("token"))?;
    let proxy_token = match &args.proxy_token_file {
        Some(path) => {
            if crate::files::readable_by_others(path)
                .with_context(|| format!("cannot read {}", path.display()))?
            {
                bail!("{} is readable by other users: chmod 600 it", path.display());
            }
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .trim()
                .to_owned()
        }
        None => read_secret_file(&data_dir.join("proxy-token"))?,
    };
    let (client_host, client_port) = split_host_port(&args.client_addr)?;
    let pool_port = match &args.client_pool_addr {
        Some(addr) => Some(split_host_port(addr)?.1),
        None => None,
    };
    let proxies = args.proxy_admins.clone();
    let client = (client_host, client_port, pool_port);
    let mut config = platform_config(data_dir, client, proxies, proxy_token, &args.nodes);
    config.agents = args.agents.clone();
    config.agent_root = args.agent_root.clone().unwrap_or_else(|| DEFAULT_ROOT.into());
    if let Some(dir) = &args.backup_dir {
        config.backup_dir = dir.clone();
    }
    config.etcd = etcd_settings(&args.etcd, args.listen);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let nodes = NodeOptions { user: args.nodes.node_user, ..NodeOptions::default() };
    crate::serve(listener, config, nodes, on_signals()?).await
}

/// What `--etcd` and its options ask for (none without `--etcd`).
fn etcd_settings(
    args: &EtcdArgs,
    listen: std::net::SocketAddr,
) -> Option<crate::coord::EtcdSettings> {
    (!args.etcd.is_empty()).then(|| crate::coord::EtcdSettings {
        endpoints: args.etcd.clone(),
        prefix: args.etcd_prefix.clone(),
        lease_ttl: Duration::from_secs(args.lease_ttl_secs.max(2)),
        advertise: args.advertise.clone().unwrap_or_else(|| listen.to_string()),
    })
}

pub async fn agent_command(args: AgentArgs) -> anyhow::Result<()> {
    let etcd = etcd_settings(&args.etcd, args.listen);
    let options = crate::agent::server::AgentOptions {
        listen: args.listen,
        root: args.dir.unwrap_or_else(|| DEFAULT_ROOT.into()),
        tls_dir: args.tls_dir,
        pg_bin: NodeOptions::default().pg_bin,
        user: args.node_user,
        etcd,
    };
    crate::agent::server::run(options, on_signals()?).await
}

/// Creates what `serve` creates on its first start, where missing: the API token, the
/// proxies' token, the secret key sealing secrets in the store, and the platform CA. Several
/// control planes on one etcd must share all four; this makes them before any plane starts.
pub fn init_command(data_dir: &Path) -> anyhow::Result<()> {
    crate::files::private_dir(data_dir)?;
    read_secret_file(&data_dir.join("token"))?;
    read_secret_file(&data_dir.join("proxy-token"))?;
    crate::secrets::Sealer::open(&data_dir.join("secret.key"))?;
    let ca_dir = data_dir.join("ca");
    crate::files::private_dir(&ca_dir)?;
    Ca::load_or_create(&ca_dir).context("platform CA")?;
    println!(
        "{} holds the API token, the proxies' token, the secret key and the CA",
        data_dir.display()
    );
    Ok(())
}

/// Writes an agent's certificate for `args.addresses`, its key and the CA certificate, issued
/// by the CA of `data_dir` (the control plane's).
pub fn agent_cert_command(data_dir: &Path, args: &AgentCertArgs) -> anyhow::Result<()> {
    let ca_dir = data_dir.join("ca");
    if !ca_dir.join("ca.key").exists() {
        bail!(
            "no platform CA in {}: run `pgwarden serve` on this data dir first",
            ca_dir.display()
        );
    }
    let ca = Ca::load_or_create(&ca_dir).context("platform CA")?;
    let names: Vec<&str> = args.addresses.iter().map(String::as_str).collect();
    let cert = ca.issue_server(&names).context("agent certificate")?;
    crate::files::private_dir(&args.out)?;
    cert.write(&args.out.join("agent.crt"), &args.out.join("agent.key"))?;
    crate::files::write_private(&args.out.join("ca.crt"), ca.cert_pem().as_bytes())?;
    println!("agent certificate for {} written to {}", names.join(", "), args.out.display());
    Ok(())
}

pub async fn up(data_dir: &Path, args: UpArgs) -> anyhow::Result<()> {
    crate::files::private_dir(data_dir)?;
    crate::files::private_dir(&data_dir.join("proxy"))?;
    let data_dir = data_dir.canonicalize()?;
    let shutdown = on_signals()?;
    let proxy_token = read_secret_file(&data_dir.join("proxy-token"))?;
    read_secret_file(&data_dir.join("token"))?;
    let ca_dir = data_dir.join("ca");
    crate::files::private_dir(&ca_dir)?;
    let ca = Ca::load_or_create(&ca_dir).context("platform CA")?;
    let proxy_dir = data_dir.join("proxy");
    let (client_ip, pool_ip) =
        (args.client_listen.ip().to_string(), args.client_pool_listen.ip().to_string());
    ca.issue_server(&[&client_ip, &pool_ip, "localhost"])?
        .write(&proxy_dir.join("server.crt"), &proxy_dir.join("server.key"))?;

    let mut proxies = Vec::new();
    for (i, admin) in args.proxy_admin.iter().enumerate() {
        proxies.push(start_proxy(&proxy_dir, i, &args, *admin).await?);
        if i == 0 {
            // The first one starts active; the second then finds it and stays standby.
            wait_active(*admin).await;
        }
    }

    let client = (
        args.client_listen.ip().to_string(),
        args.client_listen.port(),
        Some(args.client_pool_listen.port()),
    );
    let admins = args.proxy_admin.iter().map(|a| a.to_string()).collect();
    let config = platform_config(&data_dir, client, admins, proxy_token.clone(), &args.nodes);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let nodes = NodeOptions {
        user: args.nodes.node_user.clone(),
        stop_on_exit: true,
        ..NodeOptions::default()
    };
    let server = tokio::spawn(crate::serve(listener, config, nodes, shutdown.clone()));

    let provisioned = async {
        let db = ensure_database(&args, &data_dir).await?;
        // The URL is printed once it works: every proxy routes the database.
        wait_routed(&args.proxy_admin, &proxy_token, &db.name).await?;
        Ok(db)
    };
    let provisioned = tokio::select! {
        r = provisioned => r,
        () = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    match provisioned {
        Ok(db) => print_summary(&db, &args, &data_dir),
        Err(e) => {
            eprintln!("error: {e:#}");
            shutdown.cancel();
        }
    }
    shutdown.cancelled().await;
    eprintln!("-----> Stopping: nodes, proxies, control API");
    let served = server.await.context("control plane task")?;
    for mut proxy in proxies {
        stop_child(&mut proxy).await;
    }
    served
}

async fn start_proxy(
    dir: &Path,
    index: usize,
    args: &UpArgs,
    admin: std::net::SocketAddr,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let binary = exe.with_file_name("pgwarden-proxy");
    if !binary.exists() {
        bail!(
            "{} not found: build both binaries (cargo build --release --workspace)",
            binary.display()
        );
    }
    let name = ["a", "b"].get(index).copied().unwrap_or("x");
    let config_path = dir.join(format!("proxy-{name}.toml"));
    // The two proxies form an active/standby pair on the same client address, and stop when
    // this process is gone (even when killed).
    let peer = args.proxy_admin.iter().find(|a| **a != admin).copied().unwrap_or(admin);
    let config = format!(
        "listen = \"{}\"\npool_listen = \"{}\"\nadmin_listen = \"{admin}\"\nadmin_token_file = \"{}\"\n\
         parent_pid = {}\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[ha]\npeer_admin = \"{peer}\"\n",
        args.client_listen,
        args.client_pool_listen,
        dir.parent().unwrap_or(dir).join("proxy-token").display(),
        std::process::id(),
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
    );
    crate::files::write_private(&config_path, config.as_bytes())?;
    let log = crate::files::create_private(&dir.join(format!("proxy-{name}.log")))?;
    let child = Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(child)
}

const PROBE: Timeouts =
    Timeouts { connect: Duration::from_millis(500), exchange: Duration::from_millis(500) };

/// Waits (up to 5 s) until the proxy at `admin` reports itself active.
async fn wait_active(admin: std::net::SocketAddr) {
    let addr = admin.to_string();
    wait::until_true(Duration::from_secs(5), wait::STEADY, || async {
        let answer = crate::httpc::request(&addr, Method::GET, "/active", None, None, PROBE).await;
        answer.is_ok_and(|(status, _)| status.is_success())
    })
    .await;
}

/// Waits (up to 30 s) until every proxy at `admins` routes `database`: the control plane pushes
/// its tables in the background, and a URL printed before would answer that the database does
/// not exist.
async fn wait_routed(
    admins: &[std::net::SocketAddr],
    token: &str,
    database: &str,
) -> anyhow::Result<()> {
    for admin in admins {
        let addr = admin.to_string();
        let routed = wait::until_true(Duration::from_secs(30), wait::STEADY, || async {
            let routes =
                crate::httpc::request(&addr, Method::GET, "/v1/routes", Some(token), None, PROBE);
            let Ok((status, body)) = routes.await else { return false };
            let table: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            status.is_success() && table["databases"].get(database).is_some()
        });
        if !routed.await {
            bail!("the proxy at {admin} does not route database {database} after 30 s");
        }
    }
    Ok(())
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Finds the database named `args.name`, or provisions it; waits until it runs.
async fn ensure_database(args: &UpArgs, data_dir: &Path) -> anyhow::Result<Database> {
    let client = wait_for_api(args, data_dir).await?;
    let dbs: Vec<Database> = client.call(Method::GET, "/v1/databases", None).await?;
    let prefix = format!("{}-", args.name);
    let existing = dbs.into_iter().find(|d| {
        d.id.strip_prefix(&prefix).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
    });
    let id = match existing {
        Some(db) => db.id,
        None => {
            let body = json!({"name": args.name, "plan": args.plan});
            let answer: DatabaseOperation =
                client.call(Method::POST, "/v1/databases", Some(body)).await?;
            client.wait(answer.operation).await?;
            answer.database.id
        }
    };
    let running = wait::until(Duration::from_secs(300), wait::SLOW, || async {
        let db: Database = client.call(Method::GET, &format!("/v1/databases/{id}"), None).await?;
        match db.status {
            DatabaseStatus::Running if db.nodes.iter().all(|n| n.status == "running") => {
                Ok(Some(db))
            }
            DatabaseStatus::Failed => bail!("database {id} failed; see `pgwarden events {id}`"),
            _ => Ok(None),
        }
    });
    match running.await? {
        Some(db) => Ok(db),
        None => bail!("database {id} is still not running after 300 s"),
    }
}

async fn wait_for_api(args: &UpArgs, data_dir: &Path) -> anyhow::Result<Client> {
    let api = wait::until(Duration::from_secs(30), wait::STEADY, || async {
        if !data_dir.join("token").exists() {
            return Ok(None);
        }
        let client = Client::new(&format!("http://{}", args.listen), data_dir)?;
        let health = client.call::<serde_json::Value>(Method::GET, "/health", None).await;
        Ok::<_, anyhow::Error>(health.is_ok().then_some(client))
    });
    match api.await? {
        Some(client) => Ok(client),
        None => bail!("the control API did not start on {}", args.listen),
    }
}

fn print_summary(db: &Database, args: &UpArgs, data_dir: &Path) {
    let standbys = db.nodes.len().saturating_sub(1);
    let layout = match standbys {
        0 => "1 node: primary".to_owned(),
        n => format!("{} nodes: primary + {n} standby", n + 1),
    };
    println!("-----> Addon postgresql has been provisioned");
    println!("       ID: {}", db.id);
    println!("       Plan: {} ({layout})", db.plan);
    println!("       DATABASE_URL={}", db.database_url);
    let (sessions, pooled) =
        (format!("@{}/", args.client_listen), format!("@{}/", args.client_pool_listen));
    println!("       DATABASE_POOL_URL={}", db.database_url.replace(&sessions, &pooled));
    let token = data_dir.join("token");
    let shown = std::env::current_dir()
        .ok()
        .and_then(|cwd| token.strip_prefix(cwd).ok().map(PathBuf::from));
    println!(
        "       Control API: http://{}  (token in {})",
        args.listen,
        shown.unwrap_or(token).display()
    );
    println!("       Dashboard: http://{}/dashboard/  (log in with the same token)", args.listen);
}
