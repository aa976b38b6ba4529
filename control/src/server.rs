//! `pgwarden serve`: opens the data dir (token, CA, store), adopts or finishes what a previous
//! run left, and serves the control API until shutdown.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use pgwarden_certs::Ca;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, ApiState};
use crate::local::LocalDriver;
use crate::platform::{Platform, PlatformConfig};
use crate::provision;
use crate::store::Store;

/// Where nodes come from.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Directory of the PostgreSQL 15 programs.
    pub pg_bin: PathBuf,
    /// OS user nodes run as when pgwarden runs as root.
    pub user: String,
    /// Stop every node when the API stops (`pgwarden up`); otherwise nodes keep running and
    /// are adopted by the next start.
    pub stop_on_exit: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self { pg_bin: LocalDriver::default_bin(), user: "postgres".into(), stop_on_exit: false }
    }
}

/// Runs the control plane on `listener` until `shutdown`. Nodes keep running after it returns.
pub async fn serve(
    listener: TcpListener,
    config: PlatformConfig,
    nodes: NodeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop_on_exit = nodes.stop_on_exit;
    let platform = open(config, nodes)?;
    let token = read_secret_file(&platform.config.data_dir.join("token"))?;
    info!(listen = %listener.local_addr()?, data_dir = %platform.config.data_dir.display(), "control plane started");
    let recovering = platform.clone();
    let watchers = shutdown.child_token();
    tokio::spawn(crate::pitr::supervise(platform.clone(), shutdown.child_token()));
    tokio::spawn(crate::backups::schedule(
        platform.clone(),
        platform.config.backup_tick,
        shutdown.child_token(),
    ));
    tokio::spawn(async move {
        provision::recover(&recovering).await;
        crate::ha::supervise(recovering, watchers).await;
    });
    let state = Arc::new(ApiState { platform: platform.clone(), token });
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("control API failed");
    if stop_on_exit {
        provision::stop_all(&platform).await;
    }
    served
}

fn open(config: PlatformConfig, nodes: NodeOptions) -> anyhow::Result<Arc<Platform>> {
    let dir = &config.data_dir;
    fs::create_dir_all(dir.join("nodes"))
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let driver = LocalDriver::new(nodes.pg_bin.clone(), &nodes.user)?;
    if crate::local::is_root() {
        // Node processes run unprivileged: they must be able to reach their directories.
        let mode = fs::metadata(dir)?.permissions().mode();
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o711))?;
        check_traversable(dir, &nodes.user)?;
    }
    let ca_dir = dir.join("ca");
    fs::create_dir_all(&ca_dir)?;
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700))?;
    let ca = Ca::load_or_create(&ca_dir).context("platform CA")?;
    let store = Store::open(&dir.join("state.redb")).context("state store")?;
    fs::set_permissions(dir.join("state.redb"), fs::Permissions::from_mode(0o600))?;
    let backups =
        crate::storage::LocalStorage::new(dir.join("backups")).context("backup storage")?;
    Ok(Platform::new(config, store, Arc::new(driver), ca, Arc::new(backups), nodes.pg_bin))
}

/// A secret kept in a file (API token, proxies' token), created (0600, random) on first use.
pub fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(token) = fs::read_to_string(path) {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_owned());
        }
    }
    let token = crate::secrets::generate_password();
    let mut file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())?;
    Ok(token)
}

fn check_traversable(dir: &Path, user: &str) -> anyhow::Result<()> {
    let dir = dir.canonicalize()?;
    for ancestor in dir.ancestors().skip(1) {
        let mode = fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "the node user {user:?} cannot reach {}: {} is not traversable by others (chmod o+x it, or choose a --data-dir elsewhere)",
                dir.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}
