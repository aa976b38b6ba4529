//! The stats history: every sample of every database, kept `retention` in its own embedded,
//! transactional store (`stats.redb` in the data dir: a crash loses at most the sample being
//! written), pruned as samples are added. Answers are one mean per step, per figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pgwarden_api::control::{NodeSeries, Stats, StatsHistory};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::files::blocking_io;
use crate::state::StoreError;

/// Key `<database>/<unix ms, 20 digits>`: a database's samples in time order.
const SAMPLES: TableDefinition<&str, &[u8]> = TableDefinition::new("samples");

/// How redb says another process has the file open.
const ALREADY_OPEN: &str = "already open";

/// The most steps an answer may have.
pub const MAX_STEPS: u64 = 10_000;

/// What a sample keeps for charts.
#[derive(Debug, Serialize, Deserialize)]
struct Point {
    at_ms: i64,
    nodes: Vec<NodePoint>,
    logical: Option<u64>,
    /// data, WAL, other.
    disk: Option<[u64; 3]>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodePoint {
    name: String,
    cpu: Option<f64>,
    memory: Option<u64>,
    memory_limit: Option<u64>,
    swap: Option<u64>,
    swap_limit: Option<u64>,
    open: Option<u64>,
    max: Option<u64>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
}

impl Point {
    fn of(stats: &Stats, at_ms: i64) -> Self {
        Self {
            at_ms,
            nodes: stats
                .nodes
                .iter()
                .map(|n| NodePoint {
                    name: n.name.clone(),
                    cpu: n.cpu_percent,
                    memory: n.memory.current,
                    memory_limit: n.memory.limit,
                    swap: n.swap.current,
                    swap_limit: n.swap.limit,
                    open: n.connections.as_ref().map(|c| c.open),
                    max: n.connections.as_ref().map(|c| c.max),
                    lag_bytes: n.replication_lag.as_ref().map(|l| l.bytes),
                    lag_seconds: n.replication_lag.as_ref().map(|l| l.seconds),
                })
                .collect(),
            logical: stats.size.logical,
            disk: stats.size.disk.as_ref().map(|d| [d.data, d.wal, d.other]),
        }
    }
}

pub struct History {
    path: PathBuf,
    /// Open once a first use could open it: on storage the control planes share, the one that
    /// led before may hold it for a moment yet (a frozen leader, until it resumes and stops).
    db: OnceLock<Database>,
    retention_ms: i64,
    /// Samples recorded since the last sweep of the whole store.
    since_sweep: std::sync::atomic::AtomicU32,
}

/// A sweep of the whole store (samples of deleted databases) every this many records.
const SWEEP_EVERY: u32 = 360;

fn key(database: &str, at_ms: i64) -> String {
    format!("{database}/{:020}", at_ms.max(0))
}

impl History {
    /// Opens (or makes) the history at `path`, keeping samples for `retention`; `Err` if it
    /// cannot be made at all.
    pub fn open(path: &Path, retention: std::time::Duration) -> Result<Self, StoreError> {
        let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
        let history = Self {
            path: path.to_owned(),
            db: OnceLock::new(),
            retention_ms,
            since_sweep: std::sync::atomic::AtomicU32::new(0),
        };
        match history.db() {
            Err(StoreError::Db(e)) if e.contains(ALREADY_OPEN) => {
                tracing::warn!(path = %path.display(), "the stats history is still open in another process; opened at a later sample");
            }
            opened => drop(opened?),
        }
        Ok(history)
    }

    /// The store, opened now if it was not yet.
    fn db(&self) -> Result<&Database, StoreError> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let path = &self.path;
        // Created 0600 before redb opens it (as the state store), whatever the umask.
        let private = || {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        };
        private().map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let db = blocking_io(|| Database::create(path))?;
        let tx = db.begin_write()?;
        tx.open_table(SAMPLES)?;
        tx.commit()?;
        Ok(self.db.get_or_init(|| db))
    }

    /// Adds one sample per database, at `now_ms`; drops what is older than the retention and
    /// (at the first call, then every `SWEEP_EVERY`) everything of databases not in `existing`,
    /// in the same transaction.
    pub fn record(
        &self,
        all: &[Stats],
        existing: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        blocking_io(|| {
            let tx = self.db()?.begin_write()?;
            {
                let mut table = tx.open_table(SAMPLES)?;
                let cutoff = now_ms - self.retention_ms;
                // Keys sort by database, then time: what is too old is a range of each
                // database. Now and then (and first), whatever belongs to no database that
                // exists goes too.
                let count = self.since_sweep.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if count.is_multiple_of(SWEEP_EVERY) {
                    table.retain(|k, _| {
                        let database = k.rsplit_once('/').map_or(k, |(d, _)| d);
                        existing.iter().any(|e| e == database)
                    })?;
                }
                for database in existing {
                    let (from, to) = (key(database, 0), key(database, cutoff));
                    table.retain_in(from.as_str()..to.as_str(), |_, _| false)?;
                }
                for stats in all {
                    let point = serde_json::to_vec(&Point::of(stats, now_ms))?;
                    table.insert(key(&stats.database, now_ms).as_str(), point.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The samples of `database` in `[since_ms, until_ms)`, one mean per step of `step_secs`.
    pub fn series(
        &self,
        database: &str,
        since_ms: i64,
        until_ms: i64,
        step_secs: u64,
    ) -> Result<StatsHistory, StoreError> {
        let points: Vec<Point> = blocking_io(|| {
            let tx = self.db()?.begin_read()?;
            let table = tx.open_table(SAMPLES)?;
            let (from, to) = (key(database, since_ms), key(database, until_ms));
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str())? {
                let (_, v) = entry?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok::<_, StoreError>(out)
        })?;
        Ok(bucket(database, &points, since_ms, until_ms, step_secs))
    }
}

/// Means of the values of each step.
#[derive(Default)]
struct Mean(f64, u32);

impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.0 += v;
            self.1 += 1;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.1 > 0).then(|| self.0 / f64::from(self.1))
    }
}

const NODE_FIGURES: usize = 9;
const DATABASE_FIGURES: usize = 4;

fn node_figures(n: &NodePoint) -> [Option<f64>; NODE_FIGURES] {
    let f = |v: Option<u64>| v.map(|v| v as f64);
    [
        n.cpu,
        f(n.memory),
        f(n.memory_limit),
        f(n.swap),
        f(n.swap_limit),
        f(n.open),
        f(n.max),
        f(n.lag_bytes),
        n.lag_seconds,
    ]
}

fn bucket(
    database: &str,
    points: &[Point],
    since_ms: i64,
    until_ms: i64,
    step_secs: u64,
) -> StatsHistory {
    let step_ms = (step_secs.max(1) * 1000) as i64;
    // Step start (ms) → the database's means, and each node's.
    type Step = ([Mean; DATABASE_FIGURES], BTreeMap<usize, [Mean; NODE_FIGURES]>);
    let mut steps: BTreeMap<i64, Step> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    // Steps start at multiples of the step (not at `since`): a sample falls in the same step
    // whenever it is asked for.
    for point in points {
        let start = point.at_ms - point.at_ms.rem_euclid(step_ms);
        let (db, nodes) = steps.entry(start).or_default();
        let disk = |i: usize| point.disk.map(|d| d[i] as f64);
        for (mean, v) in
            db.iter_mut().zip([point.logical.map(|v| v as f64), disk(0), disk(1), disk(2)])
        {
            mean.add(v);
        }
        for node in &point.nodes {
            let at = names.iter().position(|n| *n == node.name).unwrap_or_else(|| {
                names.push(node.name.clone());
                names.len() - 1
            });
            let means = nodes.entry(at).or_default();
            for (mean, v) in means.iter_mut().zip(node_figures(node)) {
                mean.add(v);
            }
        }
    }
    let mut history = StatsHistory {
        database: database.to_owned(),
        since: rfc3339_ms(since_ms),
        until: rfc3339_ms(until_ms),
        step_secs: step_secs.max(1),
        at: Vec::with_capacity(steps.len()),
        nodes: names.iter().map(|n| NodeSeries { name: n.clone(), ..Default::default() }).collect(),
        size_logical: Vec::new(),
        disk_data: Vec::new(),
        disk_wal: Vec::new(),
        disk_other: Vec::new(),
    };
    for (start, (db, nodes)) in &steps {
        history.at.push(start.div_euclid(1000));
        let [logical, data, wal, other] = db;
        history.size_logical.push(logical.get());
        history.disk_data.push(data.get());
        history.disk_wal.push(wal.get());
        history.disk_other.push(other.get());
        for (i, series) in history.nodes.iter_mut().enumerate() {
            let means = nodes.get(&i);
            let value = |figure: usize| means.and_then(|m| m[figure].get());
            for (figure, column) in [
                &mut series.cpu_percent,
                &mut series.memory,
                &mut series.memory_limit,
                &mut series.swap,
                &mut series.swap_limit,
                &mut series.connections_open,
                &mut series.connections_max,
                &mut series.lag_bytes,
                &mut series.lag_seconds,
            ]
            .into_iter()
            .enumerate()
            {
                column.push(value(figure));
            }
        }
    }
    history
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at_ms: i64, nodes: &[(&str, f64)], logical: u64) -> Point {
        Point {
            at_ms,
            nodes: nodes
                .iter()
                .map(|(name, cpu)| NodePoint {
                    name: (*name).to_owned(),
                    cpu: Some(*cpu),
                    memory: Some(100),
                    memory_limit: Some(1000),
                    swap: None,
                    swap_limit: None,
                    open: Some(1),
                    max: Some(30),
                    lag_bytes: None,
                    lag_seconds: None,
                })
                .collect(),
            logical: Some(logical),
            disk: Some([1, 2, 3]),
        }
    }

    #[test]
    fn a_sample_is_in_the_same_step_whatever_the_query_s_start() {
        let points = [point(79_900, &[("a", 1.0)], 1), point(80_950, &[("a", 2.0)], 2)];
        for since in [0, 78_950, 79_100, 79_999] {
            let h = bucket("db", &points, since, 90_000, 1);
            assert_eq!(h.at, [79, 80], "since {since} ms");
        }
    }

    #[test]
    fn samples_are_averaged_per_step_and_nodes_that_come_and_go_leave_gaps() {
        let points = [
            point(0, &[("a", 10.0)], 100),
            point(5_000, &[("a", 30.0)], 200),
            point(10_000, &[("a", 50.0), ("b", 1.0)], 300),
            point(25_000, &[("b", 3.0)], 400),
        ];
        let h = bucket("db", &points, 0, 30_000, 10);
        assert_eq!(h.at, [0, 10, 20]);
        assert_eq!(h.size_logical, [Some(150.0), Some(300.0), Some(400.0)]);
        assert_eq!(h.disk_wal, [Some(2.0); 3]);
        let names: Vec<&str> = h.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(h.nodes[0].cpu_percent, [Some(20.0), Some(50.0), None]);
        assert_eq!(h.nodes[1].cpu_percent, [None, Some(1.0), Some(3.0)]);
        assert_eq!(h.nodes[1].connections_max, [None, Some(30.0), Some(30.0)]);
        assert_eq!(h.nodes[0].swap, [None, None, None]);
        assert_eq!(h.since, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn the_store_keeps_what_is_recent_and_of_existing_databases() {
        let dir = tempfile_dir();
        let history = History::open(&dir.join("stats.redb"), std::time::Duration::from_secs(60))
            .expect("open");
        let stats = |id: &str| Stats {
            database: id.into(),
            sampled_at: String::new(),
            nodes: Vec::new(),
            size: pgwarden_api::control::SizeStats {
                sampled_at: String::new(),
                logical: Some(7),
                disk: None,
            },
            backups: pgwarden_api::control::BackupStats {
                sampled_at: String::new(),
                last_backup_at: None,
                last_backup_age_secs: None,
            },
            pitr: None,
        };
        let both = ["a".to_owned(), "b".to_owned()];
        history.record(&[stats("a"), stats("b")], &both, 1_000).unwrap();
        history.record(&[stats("a"), stats("b")], &both, 30_000).unwrap();
        // 70 s: the sample at 1 s is past the 60 s retention.
        history.record(&[stats("a")], &both[..1], 70_000).unwrap();
        let a = history.series("a", 0, 100_000, 1).unwrap();
        assert_eq!(a.at, [30, 70]);
        assert_eq!(a.size_logical, [Some(7.0), Some(7.0)]);
        assert_eq!(history.series("b", 0, 100_000, 1).unwrap().at, [1, 30]);
        // "a" is not a prefix match for "ab".
        assert!(history.series("ab", 0, 100_000, 1).unwrap().at.is_empty());
        // Reopened (a restart): the first record sweeps b, which no longer exists, away.
        drop(history);
        let path = dir.join("stats.redb");
        let history = History::open(&path, std::time::Duration::from_secs(60)).expect("reopen");
        history.record(&[stats("a")], &both[..1], 80_000).unwrap();
        assert!(history.series("b", 0, 100_000, 1).unwrap().at.is_empty());
        assert_eq!(history.series("a", 0, 100_000, 1).unwrap().at, [30, 70, 80]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pgwarden-history-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
