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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_api::control::{
    BackupStats, BackupStatus, Connections, Container, DatabaseStatus, DiskStats, Lag, NodeRole,
    NodeStats, PitrWindow, SizeStats, Stats, Usage,
};
use tokio_util::sync::CancellationToken;

use crate::nodes::{cgroup, DiskUsage, NodeResources};
use crate::pitr::base::parse_time;
use crate::pitr::Heartbeats;
use crate::platform::{now_rfc3339, Platform};
use crate::state::{DatabaseRecord, NodeRecord};

/// The latest sample of each database, what the next one compares with, and the history.
pub struct Sampler {
    pub history: history::History,
    latest: Mutex<HashMap<String, Stats>>,
    /// Per node: when its CPU time was last read, and that time (ns).
    cpu: Mutex<HashMap<String, (Instant, u64)>>,
    /// Per node: the OOM kills its container had counted at the last sample.
    oom_kills: Mutex<HashMap<String, u64>>,
}

impl Sampler {
    pub fn new(history: history::History) -> Self {
        Self {
            history,
            latest: Mutex::default(),
            cpu: Mutex::default(),
            oom_kills: Mutex::default(),
        }
    }

    pub fn latest(&self, id: &str) -> Option<Stats> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// CPU percent of one CPU since the node's previous reading.
    fn cpu_percent(&self, node: &str, now_ns: Option<u64>) -> Option<f64> {
        let now_ns = now_ns?;
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let previous = cpu.insert(node.to_owned(), (Instant::now(), now_ns));
        let (at, then_ns) = previous?;
        let wall = at.elapsed().as_nanos() as f64;
        // A container made anew (the node restarted) counts from zero.
        (now_ns >= then_ns && wall > 0.0).then(|| (now_ns - then_ns) as f64 * 100.0 / wall)
    }

    /// How many kills the container counted since the previous sample (none at the first).
    fn new_oom_kills(&self, node: &str, count: Option<u64>) -> u64 {
        let Some(count) = count else { return 0 };
        let mut kills = self.oom_kills.lock().unwrap_or_else(|e| e.into_inner());
        let before = kills.insert(node.to_owned(), count);
        before.map_or(0, |before| count.saturating_sub(before))
    }
}

/// Samples every database every `interval` until `shutdown`.
pub async fn run(
    platform: Arc<Platform>,
    heartbeats: Arc<Heartbeats>,
    sampler: Arc<Sampler>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let databases = platform.store.databases().unwrap_or_default();
        let round = async {
            let mut all = Vec::with_capacity(databases.len());
            for db in databases.iter().filter(|d| sampled(d)) {
                all.push(sample(&platform, &heartbeats, &sampler, db).await);
            }
            all
        };
        // A sample under way is dropped at shutdown: the history's file is free at once for
        // the next control plane.
        let all = tokio::select! {
            () = shutdown.cancelled() => return,
            all = round => all,
        };
        platform.metrics.stats(&all);
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
    platform: &Arc<Platform>,
    heartbeats: &Heartbeats,
    sampler: &Sampler,
    db: &DatabaseRecord,
) -> Stats {
    let mut nodes = Vec::new();
    for node in db.nodes.iter().filter(|n| !n.fenced) {
        nodes.push(node_stats(platform, sampler, db, node).await);
    }
    let size = size(platform, db, nodes.iter().find(|n| n.role == NodeRole::Primary)).await;
    let pitr = crate::pitr::restore::window(platform, heartbeats, db).await.ok().map(
        |(earliest, latest)| PitrWindow { earliest: rfc3339(earliest), latest: rfc3339(latest) },
    );
    Stats {
        database: db.id.clone(),
        sampled_at: now_rfc3339(),
        nodes,
        size,
        backups: backups(platform, db),
        pitr,
    }
}

async fn node_stats(
    platform: &Arc<Platform>,
    sampler: &Sampler,
    db: &DatabaseRecord,
    node: &NodeRecord,
) -> NodeStats {
    let spec = platform.node_spec(node);
    let driver = platform.driver.clone();
    let resources = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || driver.resources(&spec)).await.unwrap_or_default()
    };
    let NodeResources { usage, cgroup, unlimited, disk } = resources;
    let usage = usage.unwrap_or_default();
    let kills = sampler.new_oom_kills(&node.name, usage.oom_kills);
    if kills > 0 {
        platform.event(
            &db.id,
            "node_out_of_memory",
            format!(
                "node {} used all of its {} MiB: the kernel ended {kills} of its processes, and \
                 PostgreSQL restarted its sessions",
                node.name,
                usage.memory.limit.map_or(0, |l| l / (1024 * 1024))
            ),
        );
    }
    let (connections, replication_lag) = sessions(platform, &spec, node.role).await;
    let triple =
        |t: &cgroup::Triple| Usage { current: t.current, highest: t.highest, limit: t.limit };
    NodeStats {
        name: node.name.clone(),
        role: node.role,
        sampled_at: now_rfc3339(),
        container: Container { cgroup: cgroup.map(str::to_owned), unlimited_reason: unlimited },
        cpu_percent: sampler.cpu_percent(&node.name, usage.cpu_ns),
        memory: triple(&usage.memory),
        swap: triple(&usage.swap),
        connections,
        replication_lag,
        disk: disk_stats(disk),
    }
}

/// Sessions open against `max_connections`, and a standby's lag, from the node itself.
async fn sessions(
    platform: &Platform,
    spec: &crate::nodes::NodeSpec,
    role: NodeRole,
) -> (Option<Connections>, Option<Lag>) {
    let Ok(session) = platform.session(spec, "postgres").await else { return (None, None) };
    let connections = session
        .query_one(
            "SELECT count(*) FILTER (WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid())::int8, \
             current_setting('max_connections')::int8 FROM pg_stat_activity",
            &[],
        )
        .await
        .ok()
        .map(|row| Connections {
            open: row.get::<_, i64>(0).max(0) as u64,
            max: row.get::<_, i64>(1).max(0) as u64,
        });
    let lag = match role {
        NodeRole::Primary => None,
        NodeRole::Replica => session
            .query_one(
                "SELECT COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), \
                 pg_last_wal_replay_lsn()), 0)::int8, \
                 CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                 ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) \
                 END::float8",
                &[],
            )
            .await
            .ok()
            .map(|row| Lag {
                bytes: row.get::<_, i64>(0).max(0) as u64,
                seconds: row.get::<_, f64>(1).max(0.0),
            }),
    };
    (connections, lag)
}

async fn size(platform: &Platform, db: &DatabaseRecord, primary: Option<&NodeStats>) -> SizeStats {
    let logical = match db.primary() {
        Some(node) => match platform.session(&platform.node_spec(node), "postgres").await {
            Ok(session) => session
                .query_one("SELECT pg_database_size($1)::int8", &[&db.name])
                .await
                .ok()
                .map(|row| row.get::<_, i64>(0).max(0) as u64),
            Err(_) => None,
        },
        None => None,
    };
    SizeStats { sampled_at: now_rfc3339(), logical, disk: primary.map(|p| p.disk.clone()) }
}

fn backups(platform: &Platform, db: &DatabaseRecord) -> BackupStats {
    let backups = platform.store.backups(&db.id).unwrap_or_default();
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
