//! Stats (SPEC §7). Every `stats_interval` the sampler reads, for each database, every node's
//! container (CPU, memory, swap), disk and sessions, and the database's size, last backup and
//! PITR window. The latest sample is what `GET /v1/databases/{id}/stats` answers; its figures
//! are gauges on `/metrics`. A kill by the kernel for want of memory in a node's container is
//! recorded as an event.
//!
//! Every sample also goes into the history (`history.rs`), for charts.
//!
//! A sample never holds a lock while it waits on a node: each figure is read first, then the
//! sample is stored in one step.

pub mod history;
mod point;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_api::control::{
    BackupStats, BackupStatus, Connections, Container, DatabaseStatus, DiskStats, Lag, NodeRole,
    NodeStats, PitrWindow, SizeStats, Stats, Usage,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::nodes::kept::Purpose;
use crate::nodes::sql::{Session, SqlError, Timeouts};
use crate::nodes::{cgroup, DiskUsage, NodeResources, NodeSpec, Nodes};
use crate::pitr::base::parse_time;
use crate::pitr::Heartbeats;
use crate::state::access::now_rfc3339;
use crate::state::{DatabaseRecord, NodeRecord, Records};

/// The latest sample of each database, what the next one compares with, and the history.
pub struct Sampler {
    pub history: history::History,
    latest: Mutex<HashMap<String, Stats>>,
    /// Per node: what its container read at the previous sample.
    readings: Mutex<HashMap<String, Reading>>,
    /// Per node: its disk usage, and how many samples have used it since it was walked.
    disks: Mutex<HashMap<String, (u32, DiskUsage)>>,
}

/// A node's disk is walked every this many samples (a walk stats every file of the node: with
/// hundreds of nodes, walking them all at every sample was most of the control plane's CPU).
const DISK_EVERY: u32 = 6;

#[derive(Default)]
struct Reading {
    /// When its CPU time was read, and that time (ns).
    cpu: Option<(Instant, u64)>,
    /// The OOM kills its container had counted.
    oom_kills: Option<u64>,
}

impl Sampler {
    pub fn new(history: history::History) -> Self {
        Self {
            history,
            latest: Mutex::default(),
            readings: Mutex::default(),
            disks: Mutex::default(),
        }
    }

    /// `node`'s disk usage as walked less than [`DISK_EVERY`] samples ago; `None` when it is
    /// due for a walk.
    fn recent_disk(&self, node: &str) -> Option<DiskUsage> {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let (age, disk) = disks.get_mut(node)?;
        *age += 1;
        (*age < DISK_EVERY).then_some(*disk)
    }

    /// Keeps what a walk of `node`'s disk found. The first walk of a node starts its count at
    /// a place of its own, so that the walks of many nodes spread over the samples.
    fn walked_disk(&self, node: &str, disk: DiskUsage) {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let spread = || node.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let age = if disks.contains_key(node) { 0 } else { spread() % DISK_EVERY };
        disks.insert(node.to_owned(), (age, disk));
    }

    pub fn latest(&self, id: &str) -> Option<Stats> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Records `node`'s container readings; returns its CPU percent of one CPU since the
    /// previous reading and how many OOM kills it counted since (none at the first).
    fn compare(
        &self,
        node: &str,
        cpu_ns: Option<u64>,
        oom_kills: Option<u64>,
    ) -> (Option<f64>, u64) {
        let now = Reading { cpu: cpu_ns.map(|ns| (Instant::now(), ns)), oom_kills };
        let mut readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        let before = readings.insert(node.to_owned(), now).unwrap_or_default();
        let cpu = cpu_ns.zip(before.cpu).and_then(|(now_ns, (at, then_ns))| {
            let wall = at.elapsed().as_nanos() as f64;
            // A container made anew (the node restarted) counts from zero.
            (now_ns >= then_ns && wall > 0.0).then(|| (now_ns - then_ns) as f64 * 100.0 / wall)
        });
        let kills =
            oom_kills.zip(before.oom_kills).map_or(0, |(now, then)| now.saturating_sub(then));
        (cpu, kills)
    }
}

/// What the stats are read from.
pub struct Sources {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub metrics: Metrics,
    /// Where the WAL archive is (the recoverable window).
    pub backup_dir: PathBuf,
    /// How recent each archive is.
    pub heartbeats: Arc<Heartbeats>,
}

/// Samples every database every `interval` until `shutdown`.
pub async fn run(
    sources: Sources,
    sampler: Arc<Sampler>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let databases = sources.records.store.databases().await.unwrap_or_default();
        let round = async {
            let mut all = Vec::with_capacity(databases.len());
            for db in databases.iter().filter(|d| sampled(d)) {
                all.push(
                    sample(
                        &sources.records,
                        &sources.nodes,
                        &sources.backup_dir,
                        &sources.heartbeats,
                        &sampler,
                        db,
                    )
                    .await,
                );
            }
            all
        };
        // A sample under way is dropped at shutdown: the history's file is free at once for
        // the next control plane.
        let all = tokio::select! {
            () = shutdown.cancelled() => return,
            all = round => all,
        };
        sources.metrics.stats(&all);
        let existing: Vec<String> = databases.iter().map(|d| d.id.clone()).collect();
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        if let Err(e) = sampler.history.record(&all, &existing, now_ms) {
            tracing::error!(error = %e, "cannot record stats history");
        }
        {
            let mut latest = sampler.latest.lock().unwrap_or_else(|e| e.into_inner());
            latest.retain(|id, _| databases.iter().any(|d| &d.id == id));
            for stats in all {
                latest.insert(stats.database.clone(), stats);
            }
        }
        // Nodes that are gone (replaced, removed) leave no readings behind.
        let nodes: std::collections::HashSet<&str> =
            databases.iter().flat_map(|d| d.nodes.iter().map(|n| n.name.as_str())).collect();
        sources.nodes.kept.retain(|node| nodes.contains(node));
        sampler
            .readings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|node, _| nodes.contains(&node.as_str()));
        sampler
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|node, _| nodes.contains(&node.as_str()));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

fn sampled(db: &DatabaseRecord) -> bool {
    matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating)
}

/// One sample of `db`, taken now.
pub async fn sample(
    records: &Records,
    nodes: &Nodes,
    backup_dir: &Path,
    heartbeats: &Heartbeats,
    sampler: &Sampler,
    db: &DatabaseRecord,
) -> Stats {
    let mut per_node = Vec::new();
    let mut logical = None;
    for node in db.nodes.iter().filter(|n| !n.fenced) {
        let (stats, size) = node_stats(records, nodes, sampler, db, node).await;
        logical = logical.or(size);
        per_node.push(stats);
    }
    let primary = per_node.iter().find(|n| n.role == NodeRole::Primary);
    let size =
        SizeStats { sampled_at: now_rfc3339(), logical, disk: primary.map(|p| p.disk.clone()) };
    let pitr = crate::pitr::restore::window(nodes, backup_dir, heartbeats, db).await.ok().map(
        |(earliest, latest)| PitrWindow { earliest: rfc3339(earliest), latest: rfc3339(latest) },
    );
    Stats {
        database: db.id.clone(),
        sampled_at: now_rfc3339(),
        nodes: per_node,
        size,
        backups: backups(records, db).await,
        pitr,
    }
}

/// One node's figures, and the database's logical size when the node is the primary.
async fn node_stats(
    records: &Records,
    nodes: &Nodes,
    sampler: &Sampler,
    db: &DatabaseRecord,
    node: &NodeRecord,
) -> (NodeStats, Option<u64>) {
    let spec = NodeSpec::of(node);
    let driver = nodes.driver.clone();
    let resources = {
        let spec = spec.clone();
        driver.resources(&spec).await
    };
    let NodeResources { usage, cgroup, unlimited } = resources;
    let disk = match sampler.recent_disk(&node.name) {
        Some(disk) => disk,
        None => {
            let disk = driver.disk(&spec).await;
            sampler.walked_disk(&node.name, disk);
            disk
        }
    };
    let usage = usage.unwrap_or_default();
    let (cpu_percent, kills) = sampler.compare(&node.name, usage.cpu_ns, usage.oom_kills);
    if kills > 0 {
        records
            .event(
                &db.id,
                "node_out_of_memory",
                format!(
                "node {} used all of its {} MiB: the kernel ended {kills} of its processes, and \
                 PostgreSQL restarted its sessions",
                node.name,
                usage.memory.limit.map_or(0, |l| l / (1024 * 1024))
            ),
            )
            .await;
    }
    let Live { connections, lag: replication_lag, logical } =
        live(nodes, &spec, node.role, &db.name).await;
    let triple =
        |t: &cgroup::Triple| Usage { current: t.current, highest: t.highest, limit: t.limit };
    let stats = NodeStats {
        name: node.name.clone(),
        role: node.role,
        sampled_at: now_rfc3339(),
        container: Container { cgroup, unlimited_reason: unlimited },
        cpu_percent,
        memory: triple(&usage.memory),
        swap: triple(&usage.swap),
        connections,
        replication_lag,
        disk: disk_stats(disk),
    };
    (stats, logical)
}

/// What one session on the node reads: sessions open against `max_connections` (not counting
/// the platform's own, those of the bootstrap superuser, OID 10); a standby's lag; the primary's
/// `pg_database_size` of `database`.
#[derive(Default)]
struct Live {
    connections: Option<Connections>,
    lag: Option<Lag>,
    logical: Option<u64>,
}

async fn live(
    nodes: &Nodes,
    spec: &crate::nodes::NodeSpec,
    role: NodeRole,
    database: &str,
) -> Live {
    let read = async |session: &Session| -> Result<Live, SqlError> {
        let row = session
            .query_one(
                "SELECT count(*) FILTER (WHERE backend_type = 'client backend' \
                 AND usesysid <> 10)::int8, \
                 current_setting('max_connections')::int8 FROM pg_stat_activity",
                &[],
            )
            .await?;
        let connections = Some(Connections {
            open: row.get::<_, i64>(0).max(0) as u64,
            max: row.get::<_, i64>(1).max(0) as u64,
        });
        let logical = match role {
            NodeRole::Primary => Some(
                session
                    .query_one("SELECT pg_database_size($1)::int8", &[&database])
                    .await?
                    .get::<_, i64>(0)
                    .max(0) as u64,
            ),
            NodeRole::Replica => None,
        };
        let lag = match role {
            NodeRole::Primary => None,
            NodeRole::Replica => {
                let row = session
                    .query_one(
                        "SELECT COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), \
                         pg_last_wal_replay_lsn()), 0)::int8, \
                         CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                         ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) \
                         END::float8",
                        &[],
                    )
                    .await?;
                Some(Lag {
                    bytes: row.get::<_, i64>(0).max(0) as u64,
                    seconds: row.get::<_, f64>(1).max(0.0),
                })
            }
        };
        Ok(Live { connections, lag, logical })
    };
    nodes.read_kept(spec, Purpose::Reads, Timeouts::DEFAULT, read).await.unwrap_or_default()
}

async fn backups(records: &Records, db: &DatabaseRecord) -> BackupStats {
    let backups = records.store.backups(&db.id).await.unwrap_or_default();
    let last = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Succeeded)
        .filter_map(|b| b.finished_at.clone())
        .max_by_key(|at| parse_time(at));
    let age = last.as_deref().and_then(parse_time).map(|at| {
        let age = time::OffsetDateTime::now_utc() - at;
        age.whole_seconds().max(0) as u64
    });
    BackupStats { sampled_at: now_rfc3339(), last_backup_at: last, last_backup_age_secs: age }
}

fn disk_stats(disk: DiskUsage) -> DiskStats {
    let DiskUsage { data, wal, other } = disk;
    DiskStats { data, wal, other, total: data + wal + other }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
