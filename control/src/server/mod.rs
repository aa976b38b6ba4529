//! `pgwarden serve`: opens the data dir (token, CA, store), adopts what a previous run left,
//! starts supervision, resumes interrupted operations, and serves the control API until
//! shutdown. `up.rs` holds the `serve` and `up` commands.

pub mod args;
pub mod recover;
pub mod up;

pub use args::Command;

use std::fs;
use std::future::IntoFuture;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use pgwarden_certs::Ca;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::coord::{Etcd, Leadership};
use crate::nodes::local::LocalDriver;
use crate::nodes::this_host::ThisHost;
use crate::pitr::Heartbeats;
use crate::platform::{Parts, Platform, PlatformConfig};
use crate::state::kv::{Kv, RedbKv};
use crate::state::Store;

/// What a control plane on etcd leads with: its store there, the connection, its leadership.
type Coordination = (Box<dyn Kv>, Etcd, Arc<Leadership>);

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
/// With etcd (`config.etcd`), it stands by until it leads, and returns an error if it loses
/// the leadership (it must stop acting: start it again to stand by).
pub async fn serve(
    listener: TcpListener,
    config: PlatformConfig,
    nodes: NodeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(settings) = config.etcd.clone() else {
        return lead(listener, config, nodes, None, shutdown).await;
    };
    let etcd = Etcd::connect(&settings.endpoints, &settings.prefix).await?;
    // A standby answers on the same socket until it leads: every API call gets 503 naming
    // the leader.
    let socket = listener.into_std()?;
    let standby = TcpListener::from_std(socket.try_clone()?)?;
    let listener = TcpListener::from_std(socket)?;
    let standing_by = CancellationToken::new();
    let router = api::standby::router(etcd.clone());
    let standby = axum::serve(standby, router)
        .with_graceful_shutdown(standing_by.clone().cancelled_owned())
        .into_future();
    let standby = tokio::spawn(standby);
    let what = "the leadership: this control plane stops acting";
    let (me, ttl) = (&settings.advertise, settings.lease_ttl);
    let leadership = Leadership::campaign(&etcd, "leader", me, ttl, what, &shutdown).await;
    standing_by.cancel();
    let _ = standby.await;
    let Some(leadership) = leadership else { return Ok(()) };
    let running = shutdown.child_token();
    let lost = leadership.lost();
    let stop = running.clone();
    tokio::spawn(async move {
        lost.cancelled().await;
        stop.cancel();
    });
    let kv = crate::state::etcd::EtcdKv::new(etcd.clone(), Arc::clone(&leadership));
    let coordination = Some((Box::new(kv) as Box<dyn Kv>, etcd, Arc::clone(&leadership)));
    let served = lead(listener, config, nodes, coordination, running).await;
    if shutdown.is_cancelled() && leadership.is_valid() {
        leadership.resign().await;
        return served;
    }
    served?;
    bail!("this control plane lost the leadership and stopped acting; start it again to stand by")
}

/// How long the background loops have to end after the API stopped (each ends at its next
/// step; a check of a node is bounded well within this).
const BACKGROUND_STOP: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the control plane, state in etcd's `kv` when given (the data dir's embedded store
/// without).
async fn lead(
    listener: TcpListener,
    config: PlatformConfig,
    nodes: NodeOptions,
    etcd: Option<Coordination>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop_on_exit = nodes.stop_on_exit;
    let platform = open(config, nodes, etcd).await?;
    let token = read_secret_file(&platform.config.data_dir.join("token"))?;
    info!(listen = %listener.local_addr()?, data_dir = %platform.config.data_dir.display(), "control plane started");
    let heartbeats = Arc::new(Heartbeats::default());
    // The background loops: tracked, and ended with the API (whatever ended it), before the
    // nodes are stopped, so that none of them acts on a node being stopped.
    let (tasks, background) = (TaskTracker::new(), shutdown.child_token());
    tasks.spawn(crate::pitr::archiver::supervise(
        platform.pitr(),
        heartbeats.clone(),
        background.child_token(),
        tasks.clone(),
    ));
    tasks.spawn(crate::routing::refresh::keep_fresh(platform.refresh(), background.child_token()));
    tasks.spawn(crate::changes::retired::supervise_retired(
        platform.changes(),
        background.child_token(),
    ));
    tasks.spawn(crate::backups::schedule::schedule(
        Arc::clone(&platform.records),
        Arc::clone(&platform.nodes),
        Arc::clone(&platform.backups),
        platform.metrics.clone(),
        platform.config.backup_tick,
        background.child_token(),
    ));
    // Nodes are adopted (started if stopped) first, then watched; interrupted operations are
    // resumed only once the watchers run, each as a task of its own.
    // What the previous run left is read now, before the API serves.
    let left = recover::Leftovers::read(&platform.records).await.context("state store")?;
    let (recovering, watchers, tracker) =
        (platform.clone(), background.child_token(), tasks.clone());
    tasks.spawn(async move {
        recover::adopt_nodes(&recovering, &left).await;
        let supervised = crate::ha::watcher::supervise(recovering.ha(), watchers, tracker.clone());
        tracker.spawn(supervised);
        let changes = left.interrupted_changes();
        recover::resume_operations(&recovering, left).await;
        crate::changes::resume::resume_interrupted(&recovering.changes(), changes).await;
    });
    // Control planes on etcd keep it with the backups, on the storage they share: a new leader
    // goes on with its predecessor's history.
    let stats_dir = match platform.nodes.etcd {
        Some(_) => &platform.config.backup_dir,
        None => &platform.config.data_dir,
    };
    let history = crate::stats::history::History::open(
        &stats_dir.join("stats.redb"),
        platform.config.stats_interval,
        platform.config.stats_retention,
    )
    .context("stats history")?;
    let sampler = Arc::new(crate::stats::Sampler::new(history));
    let sources = crate::stats::Sources {
        records: Arc::clone(&platform.records),
        nodes: Arc::clone(&platform.nodes),
        metrics: platform.metrics.clone(),
        backup_dir: platform.config.backup_dir.clone(),
        heartbeats: heartbeats.clone(),
    };
    tasks.spawn(crate::stats::run(
        sources,
        sampler.clone(),
        platform.config.stats_interval,
        background.child_token(),
    ));
    let state = Arc::new(ApiState { platform: platform.clone(), heartbeats, sampler, token });
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("control API failed");
    background.cancel();
    tasks.close();
    if !platform.operations.stop(BACKGROUND_STOP).await {
        warn!("operations did not end in time");
    }
    if tokio::time::timeout(BACKGROUND_STOP, tasks.wait()).await.is_err() {
        warn!(running = tasks.len(), "background tasks did not end in time");
    }
    if stop_on_exit {
        recover::stop_all(&platform.records, &platform.nodes).await;
    }
    served
}

/// Opens the data dir. It and everything in it is private to this user (0700 directories,
/// 0600 files), except that when nodes run as another OS user, the data dir and `nodes/` let
/// that user through (0711: it can reach its own directory, list nothing).
async fn open(
    config: PlatformConfig,
    nodes: NodeOptions,
    etcd: Option<Coordination>,
) -> anyhow::Result<Arc<Platform>> {
    let dir = &config.data_dir;
    let driver = LocalDriver::new(nodes.pg_bin.clone(), &nodes.user)?;
    crate::nodes::local::prepare_nodes_dir(dir, &nodes.user)?;
    let ca_dir = dir.join("ca");
    crate::files::private_dir(&ca_dir)?;
    let ca = Ca::load_or_create(&ca_dir).context("platform CA")?;
    let sealer = crate::secrets::Sealer::open(&dir.join("secret.key"))?;
    let (kv, etcd, leadership) = match etcd {
        Some((kv, etcd, leadership)) => (kv, Some(etcd), Some(leadership)),
        None => {
            // Created 0600 before redb opens it: never readable by others, not even for an
            // instant.
            let state = dir.join("state.redb");
            let mut create = fs::OpenOptions::new();
            create.write(true).create(true).truncate(false).mode(0o600).open(&state)?;
            fs::set_permissions(&state, fs::Permissions::from_mode(0o600))?;
            let kv = RedbKv::open(&state).context("state store")?;
            (Box::new(kv) as Box<dyn Kv>, None, None)
        }
    };
    let store = Store::over(kv, sealer).await.context("state store (a different secret.key?)")?;
    let backups =
        crate::storage::LocalStorage::new(config.backup_dir.clone()).context("backup storage")?;
    let remote = crate::agent::client::RemoteDriver::new(&ca)
        .context("the agents' client certificate")?
        .with_term(leadership.as_ref().map(|l| l.term()));
    let (local, remote) = (Arc::new(ThisHost(Arc::new(driver))), Arc::new(remote));
    let parts = Parts {
        store,
        etcd,
        leadership,
        local,
        remote,
        ca,
        backups: Arc::new(backups),
        pg_bin: nodes.pg_bin,
    };
    Ok(Platform::new(config, parts))
}

/// A secret kept in a file (API token, proxies' token), created (0600, random) on first use. A
/// file that others can read is refused: the secret may have leaked, and it must be fixed.
pub fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(token) = fs::read_to_string(path) {
        if crate::files::readable_by_others(path)? {
            bail!(
                "{} is readable by other users: make it private (chmod 600 {}), and replace the secret if others may have read it",
                path.display(),
                path.display()
            );
        }
        if !token.trim().is_empty() {
            return Ok(token.trim().to_owned());
        }
    }
    let token = crate::secrets::generate_password();
    crate::files::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = read_secret_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_secret_file(&path).unwrap(), token, "the same token again");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read_secret_file(&path).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
    }
}
