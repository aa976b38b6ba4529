//! The stats history: what the samples of every database showed, in its own embedded,
//! transactional store (`stats.redb` in the data dir: a crash loses at most the sample being
//! written), in tiers so that a database's week stays small whatever its figures:
//!
//! | tier | a point is | kept | answers charts of |
//! |---|---|---|---|
//! | 0 | one sample | 3 hours (1 080 samples, but at least 75 minutes) | an hour |
//! | 1 | the mean of a minute | 7 hours | 6 hours |
//! | 2 | the mean of 5 minutes | 26 hours | a day |
//! | 3 | the mean of 30 minutes | the retention (7 days by default) | a week |
//!
//! A point is a few bytes per figure (`f32`s), keyed by tier, database and time. When a record
//! starts a new minute, the steps that ended are rolled up from the tier below, each tier's
//! expired points go, and so does everything of databases that no longer exist: one look per
//! database and tier, whatever the number of points.
//!
//! An answer takes its range from the coarsest tier no coarser than its step, from finer tiers
//! what is too recent to be rolled up yet, and from coarser ones what finer tiers no longer
//! keep; then one mean per step, each point weighing the samples it stands for. A point, its
//! bytes and the means of points are in `point.rs`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use pgwarden_api::control::{Stats, StatsHistory};
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle};

use super::point::{answer, means, Point, Sample};
use crate::files::blocking_io;
use crate::state::StoreError;

/// Key `(tier, database, unix ms)`: each tier's points of a database, in time order.
const POINTS: TableDefinition<(u8, &str, i64), &[u8]> = TableDefinition::new("points");

/// Where versions before the tiers kept every sample (as JSON, key `<database>/<ms>`); its
/// samples are moved into the tiers when the store is first opened.
const SAMPLES: TableDefinition<&str, &[u8]> = TableDefinition::new("samples");

/// How redb says another process has the file open.
const ALREADY_OPEN: &str = "already open";

/// The most steps an answer may have.
pub const MAX_STEPS: u64 = 10_000;

const TIERS: usize = 4;
/// Samples kept: at most this long, and at most `RAW_SAMPLES` of them, but always the last
/// `RAW_AT_LEAST` (the hour charts are of samples at any interval).
const RAW_KEPT: Duration = Duration::from_secs(3 * 3600);
const RAW_SAMPLES: u32 = 1_080;
const RAW_AT_LEAST: Duration = Duration::from_secs(75 * 60);
/// The rolled-up tiers: grain, and how long they are kept (at most the retention).
const ROLLED: [(Duration, Duration); TIERS - 1] = [
    (Duration::from_secs(60), Duration::from_secs(7 * 3600)),
    (Duration::from_secs(300), Duration::from_secs(26 * 3600)),
    (Duration::from_secs(1800), Duration::MAX),
];

/// A tier's grain and how long it keeps its points (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tier {
    grain_ms: i64,
    kept_ms: i64,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The tiers for samples every `interval`, all kept for at most `retention`.
fn tiers(interval: Duration, retention: Duration) -> [Tier; TIERS] {
    let interval = ms(interval).max(1);
    let retention = ms(retention);
    let raw = ms(RAW_KEPT).min(interval.saturating_mul(RAW_SAMPLES.into()).max(ms(RAW_AT_LEAST)));
    let mut tiers = [Tier { grain_ms: interval, kept_ms: raw.min(retention) }; TIERS];
    for (tier, (grain, kept)) in tiers[1..].iter_mut().zip(ROLLED) {
        *tier = Tier { grain_ms: ms(grain).max(interval), kept_ms: ms(kept).min(retention) };
    }
    tiers
}

pub struct History {
    path: PathBuf,
    /// Open once a first use could open it: on storage the control planes share, the one that
    /// led before may hold it for a moment yet (a frozen leader, until it resumes and stops).
    db: OnceLock<Database>,
    tiers: [Tier; TIERS],
    /// When the last record was (ms; `i64::MIN` before the first): a record in a new minute
    /// rolls up and prunes.
    last_record_ms: AtomicI64,
}

impl History {
    /// Opens (or makes) the history at `path`, for samples every `interval` kept for
    /// `retention` (the coarsest tier's); `Err` if it cannot be made at all.
    pub fn open(path: &Path, interval: Duration, retention: Duration) -> Result<Self, StoreError> {
        Self::with_tiers(path, tiers(interval, retention))
    }

    fn with_tiers(path: &Path, tiers: [Tier; TIERS]) -> Result<Self, StoreError> {
        let history = Self {
            path: path.to_owned(),
            db: OnceLock::new(),
            tiers,
            last_record_ms: AtomicI64::new(i64::MIN),
        };
        match history.db() {
            Err(StoreError::Db(e)) if e.contains(ALREADY_OPEN) => {
                tracing::warn!(path = %path.display(), "the stats history is still open in another process; opened at a later sample");
            }
            opened => drop(opened?),
        }
        Ok(history)
    }

    /// The size of the store's file, in bytes.
    pub fn file_size(&self) -> std::io::Result<u64> {
        Ok(std::fs::metadata(&self.path)?.len())
    }

    /// Bytes of the store: keys and values stored, pages in use, pages the file holds free.
    pub fn usage(&self) -> Result<[u64; 3], StoreError> {
        let tx = self.db()?.begin_write()?;
        let stats = tx.stats()?;
        let pages = stats.allocated_pages() * stats.page_size() as u64;
        let file = self.file_size().map_err(|e| StoreError::Db(e.to_string()))?;
        Ok([stats.stored_bytes(), pages, file.saturating_sub(pages)])
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
        tx.open_table(POINTS)?;
        let moved = self.move_samples(&tx, now_ms())?;
        tx.commit()?;
        if let Some(moved) = moved {
            tracing::info!(
                samples = moved,
                "stats history: samples of an earlier version moved into tiers"
            );
        }
        Ok(self.db.get_or_init(|| db))
    }

    /// Adds one sample per database at `now_ms`. In a new minute, first rolls up what ended,
    /// drops each tier's expired points and everything of databases not in `existing`, in the
    /// same transaction.
    pub fn record(
        &self,
        all: &[Stats],
        existing: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        blocking_io(|| {
            let minute = self.tiers[1].grain_ms;
            let last = self.last_record_ms.swap(now_ms, Ordering::Relaxed);
            let tidy = last == i64::MIN || last.div_euclid(minute) != now_ms.div_euclid(minute);
            let tx = self.db()?.begin_write()?;
            {
                let mut table = tx.open_table(POINTS)?;
                if tidy {
                    let existing: HashSet<&str> = existing.iter().map(String::as_str).collect();
                    self.tidy(&mut table, &existing, now_ms)?;
                }
                for stats in all {
                    let point = Point::of(stats, now_ms).encode();
                    table.insert((0, stats.database.as_str(), now_ms), point.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Rolls up every database's ended minutes and quarters, prunes each tier, and drops the
    /// points of databases not in `existing`.
    fn tidy(
        &self,
        table: &mut Table<(u8, &str, i64), &[u8]>,
        existing: &HashSet<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // Rolled up first: what a tier rolls up may be about to expire below it.
        for tier in 1..TIERS {
            for db in existing {
                self.roll(table, tier, db, now_ms)?;
            }
        }
        for tier in 0..TIERS {
            let t = tier as u8;
            // Every database this tier holds points of, one look each.
            let mut databases = Vec::new();
            let mut lower = Bound::Included((t, String::new(), i64::MIN));
            loop {
                let bounds = (
                    match &lower {
                        Bound::Included((t, db, at)) => Bound::Included((*t, db.as_str(), *at)),
                        Bound::Excluded((t, db, at)) => Bound::Excluded((*t, db.as_str(), *at)),
                        Bound::Unbounded => Bound::Unbounded,
                    },
                    Bound::Excluded((t + 1, "", i64::MIN)),
                );
                let Some(entry) = table.range::<(u8, &str, i64)>(bounds)?.next() else {
                    break;
                };
                let db = entry?.0.value().1.to_owned();
                lower = Bound::Excluded((t, db.clone(), i64::MAX));
                databases.push(db);
            }
            for db in &databases {
                let end = match existing.contains(db.as_str()) {
                    true => now_ms - self.tiers[tier].kept_ms,
                    false => i64::MAX,
                };
                table.retain_in((t, db.as_str(), i64::MIN)..(t, db.as_str(), end), |_, _| false)?;
            }
        }
        Ok(())
    }

    /// Rolls what tier `tier - 1` holds of `database`'s ended steps of tier `tier` (since its
    /// last point) into points of `tier`.
    fn roll(
        &self,
        table: &mut Table<(u8, &str, i64), &[u8]>,
        tier: usize,
        database: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let grain = self.tiers[tier].grain_ms;
        let end = now_ms - now_ms.rem_euclid(grain);
        let t = tier as u8;
        let start = match table.range((t, database, i64::MIN)..(t, database, i64::MAX))?.next_back()
        {
            Some(entry) => entry?.0.value().2 + grain,
            None => i64::MIN,
        };
        if start >= end {
            return Ok(());
        }
        let finer = read(table, tier - 1, database, start, end)?;
        for point in means(&finer, grain) {
            table.insert((t, database, point.at_ms), point.encode().as_slice())?;
        }
        Ok(())
    }

    /// Moves the samples an earlier version kept (every sample, as JSON) into the tiers, and
    /// drops their table; how many there were, `None` when there was no such table.
    fn move_samples(
        &self,
        tx: &redb::WriteTransaction,
        now_ms: i64,
    ) -> Result<Option<usize>, StoreError> {
        if !tx.list_tables()?.any(|t| t.name() == SAMPLES.name()) {
            return Ok(None);
        }
        let mut per_database: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        {
            let old = tx.open_table(SAMPLES)?;
            for entry in old.iter()? {
                let (key, value) = entry?;
                let Some((database, _)) = key.value().rsplit_once('/') else { continue };
                let Ok(sample) = serde_json::from_slice::<Sample>(value.value()) else { continue };
                per_database.entry(database.to_owned()).or_default().push(sample.point());
            }
        }
        let moved = per_database.values().map(Vec::len).sum();
        let mut table = tx.open_table(POINTS)?;
        for (database, samples) in &per_database {
            for (tier, Tier { grain_ms, kept_ms }) in self.tiers.iter().enumerate() {
                let points = match tier {
                    0 => samples.clone(),
                    _ => means(samples, *grain_ms),
                };
                for point in points.iter().filter(|p| p.at_ms >= now_ms - kept_ms) {
                    let key = (tier as u8, database.as_str(), point.at_ms);
                    table.insert(key, point.encode().as_slice())?;
                }
            }
        }
        drop(table);
        tx.delete_table(SAMPLES)?;
        Ok(Some(moved))
    }

    /// The step of an answer over `[since_ms, until_ms)` when none is asked: the range in at
    /// most 360 points, and no finer than the grain of the finest tier that keeps `since_ms` at
    /// `now_ms` (finer steps would be empty between that tier's points).
    pub fn default_step(&self, since_ms: i64, until_ms: i64, now_ms: i64) -> u64 {
        let span_s = (until_ms.saturating_sub(since_ms) / 1_000).max(1) as u64;
        let age = now_ms.saturating_sub(since_ms);
        let tier = self.tiers.iter().find(|t| t.kept_ms >= age).unwrap_or(&self.tiers[TIERS - 1]);
        span_s.div_ceil(360).max((tier.grain_ms / 1_000).max(1) as u64)
    }

    /// `database`'s figures over `[since_ms, until_ms)`, one mean per step of `step_secs`.
    pub fn series(
        &self,
        database: &str,
        since_ms: i64,
        until_ms: i64,
        step_secs: u64,
    ) -> Result<StatsHistory, StoreError> {
        let step_ms = (step_secs.max(1) * 1000) as i64;
        let points = blocking_io(|| {
            let tx = self.db()?.begin_read()?;
            let table = tx.open_table(POINTS)?;
            let grain = |tier: usize| self.tiers[tier].grain_ms;
            let preferred = (0..TIERS).rev().find(|&t| grain(t) <= step_ms).unwrap_or(0);
            let mut points = read(&table, preferred, database, since_ms, until_ms)?;
            // What is too recent for the preferred tier, from finer ones.
            let mut covered_to = points.last().map_or(since_ms, |p| p.at_ms + grain(preferred));
            for tier in (0..preferred).rev() {
                let recent = read(&table, tier, database, covered_to.max(since_ms), until_ms)?;
                if let Some(last) = recent.last() {
                    covered_to = last.at_ms + grain(tier);
                }
                points.extend(recent);
            }
            // What finer tiers no longer keep, from coarser ones: points that end before the
            // first one taken.
            let mut covered_from = points.first().map_or(until_ms, |p| p.at_ms);
            for tier in preferred + 1..TIERS {
                let end = covered_from.saturating_sub(grain(tier) - 1);
                let mut older = read(&table, tier, database, since_ms, end)?;
                if let Some(first) = older.first() {
                    covered_from = first.at_ms;
                }
                older.append(&mut points);
                points = older;
            }
            Ok::<_, StoreError>(points)
        })?;
        Ok(answer(database, &means(&points, step_ms), since_ms, until_ms, step_secs))
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `tier`'s points of `database` in `[from_ms, to_ms)`; unreadable ones are skipped.
fn read(
    table: &impl ReadableTable<(u8, &'static str, i64), &'static [u8]>,
    tier: usize,
    database: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Point>, StoreError> {
    let mut out = Vec::new();
    if from_ms >= to_ms {
        return Ok(out);
    }
    let t = tier as u8;
    for entry in table.range((t, database, from_ms)..(t, database, to_ms))? {
        let (key, value) = entry?;
        out.extend(Point::decode(key.value().2, value.value()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_api::control::{
        BackupStats, Connections, Container, DiskStats, NodeRole, NodeStats, SizeStats, Usage,
    };

    /// A sample of `database` whose figures tell its time: logical size `t` (seconds), each
    /// node's CPU `t % 100`.
    fn stats(database: &str, nodes: &[&str], t: i64) -> Stats {
        let node = |name: &&str| NodeStats {
            name: (*name).to_owned(),
            role: NodeRole::Primary,
            sampled_at: String::new(),
            container: Container { cgroup: None, unlimited_reason: None },
            cpu_percent: Some((t % 100) as f64),
            memory: Usage { current: Some(100), highest: None, limit: Some(1000) },
            swap: Usage::default(),
            connections: Some(Connections { open: 1, max: 30 }),
            replication_lag: None,
            disk: DiskStats { data: 1, wal: 2, other: 3, total: 6 },
        };
        Stats {
            database: database.to_owned(),
            sampled_at: String::new(),
            nodes: nodes.iter().map(node).collect(),
            size: SizeStats {
                sampled_at: String::new(),
                logical: Some(t as u64),
                disk: Some(DiskStats { data: 1, wal: 2, other: 3, total: 6 }),
            },
            backups: BackupStats {
                sampled_at: String::new(),
                last_backup_at: None,
                last_backup_age_secs: None,
            },
            pitr: None,
        }
    }

    /// Tiers of 1 s kept 60 s, 10 s kept 300 s, 60 s kept 900 s, 300 s kept 1 800 s: the shape
    /// of the real ones, in fewer records.
    const SMALL: [Tier; TIERS] = [
        Tier { grain_ms: 1_000, kept_ms: 60_000 },
        Tier { grain_ms: 10_000, kept_ms: 300_000 },
        Tier { grain_ms: 60_000, kept_ms: 900_000 },
        Tier { grain_ms: 300_000, kept_ms: 1_800_000 },
    ];

    fn count(history: &History, tier: u8, database: &str) -> usize {
        let tx = history.db().unwrap().begin_read().unwrap();
        let table = tx.open_table(POINTS).unwrap();
        table.range((tier, database, i64::MIN)..(tier, database, i64::MAX)).unwrap().count()
    }

    #[test]
    fn the_tiers_keep_each_grain_its_time_and_answers_join_them_without_gaps() {
        // In memory when the machine has it: 2 000 commits, each waiting for the disk.
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
        let path = dir.path().join("stats.redb");
        let history = History::with_tiers(&path, SMALL).unwrap();
        let both = ["a".to_owned(), "b".to_owned()];
        // 2 000 s, a sample a second; b is deleted at 1 000 s.
        for t in 1..=2_000i64 {
            let existing = if t < 1_000 { &both[..] } else { &both[..1] };
            let all: Vec<Stats> = existing
                .iter()
                .map(|db| match db.as_str() {
                    "a" => stats("a", &["a1", "a2"], t),
                    _ => stats("b", &["b1"], t),
                })
                .collect();
            history.record(&all, existing, t * 1_000).unwrap();
        }
        // Each tier holds its last `kept` (the raw tier up to the sample just added, rolled
        // tiers up to their last ended step).
        assert_eq!(count(&history, 0, "a"), 61);
        assert_eq!(count(&history, 1, "a"), 30);
        // 1 140 s is the first whole step of 60 s in the last 900 s; 1 980 s is not over.
        assert_eq!(count(&history, 2, "a"), 14);
        // 300, 600, 900, 1 200, 1 500.
        assert_eq!(count(&history, 3, "a"), 5);
        for tier in 0..4 {
            assert_eq!(count(&history, tier, "b"), 0, "tier {tier} of a deleted database");
        }

        // A mean per step is the mean of the samples' times in it, whichever tiers answer.
        let check = |since_s: i64, step_s: i64, first_s: i64| {
            let h = history.series("a", since_s * 1_000, 2_001_000, step_s as u64).unwrap();
            let expected: Vec<i64> = (first_s..=2_000).step_by(step_s as usize).collect();
            assert_eq!(h.at, expected, "since {since_s} s, step {step_s} s");
            for (at, logical) in h.at.iter().zip(&h.size_logical) {
                let last = (at + step_s - 1).min(2_000);
                let mean = (*at + last) as f64 / 2.0;
                assert_eq!(*logical, Some(mean), "step {at} s of {step_s} s");
            }
            assert_eq!(h.nodes.len(), 2);
            h
        };
        // The raw tier alone.
        check(1_950, 1, 1_950);
        // Minutes (10 s here) then the raw tier for the minute that is not over.
        check(1_800, 10, 1_800);
        // Each tier over what it keeps, then every finer one for what is not rolled up yet.
        check(1_200, 60, 1_200);
        let h = check(0, 300, 300);
        assert_eq!(h.nodes[0].cpu_percent.len(), h.at.len());
        // Steps finer than what is kept that far back: the older part from coarser tiers.
        let h = history.series("a", 0, 2_001_000, 10).unwrap();
        assert_eq!(h.at.first(), Some(&300));
        assert_eq!(h.at.last(), Some(&2_000));
        assert!(h.at.windows(2).all(|w| w[0] < w[1]));

        // Reopened (a restart): same answers, and the first record goes on from there.
        drop(history);
        let history = History::with_tiers(&path, SMALL).unwrap();
        // With no step asked: the range in 360 points, no finer than the tier that answers.
        let now = 2_000_000;
        assert_eq!(history.default_step(1_950_000, now, now), 1);
        assert_eq!(history.default_step(1_500_000, now, now), 60);
        assert_eq!(history.default_step(0, now, now), 300);
        assert_eq!(history.default_step(0, 360_000_000, now), 1_000);
        history.record(&[stats("a", &["a1", "a2"], 2_001)], &both[..1], 2_001_000).unwrap();
        // The first record after a start tidies: the minute at 1 700 s is now past 300 s.
        assert_eq!(count(&history, 1, "a"), 29);
        let h = history.series("a", 1_990_000, 2_002_000, 1).unwrap();
        assert_eq!(h.at.len(), 12);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn samples_kept_by_an_earlier_version_move_into_the_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.redb");
        let now = now_ms();
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut old = tx.open_table(SAMPLES).unwrap();
                for i in 0..90i64 {
                    let at = now - 3_600_000 + i * 10_000;
                    let json = format!(
                        r#"{{"at_ms":{at},"nodes":[{{"name":"n","cpu":{i}.0,"memory":5,"memory_limit":null,"swap":null,"swap_limit":null,"open":1,"max":2,"lag_bytes":null,"lag_seconds":null}}],"logical":7,"disk":[1,2,3]}}"#
                    );
                    old.insert(format!("db/{at:020}").as_str(), json.as_bytes()).unwrap();
                }
                old.insert("db/garbage", b"{".as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let history =
            History::open(&path, Duration::from_secs(10), Duration::from_secs(7 * 86_400)).unwrap();
        let tx = history.db().unwrap().begin_read().unwrap();
        assert!(!tx.list_tables().unwrap().any(|t| t.name() == SAMPLES.name()));
        drop(tx);
        assert_eq!(count(&history, 0, "db"), 90);
        assert!(count(&history, 1, "db") >= 15);
        let h = history.series("db", now - 3_600_000, now, 10).unwrap();
        assert_eq!(h.at.len(), 90);
        assert_eq!(h.nodes[0].cpu_percent[89], Some(89.0));
        assert_eq!(h.size_logical[0], Some(7.0));
    }

    #[test]
    fn the_real_tiers_follow_the_interval_and_the_retention() {
        let week = Duration::from_secs(7 * 86_400);
        let t = tiers(Duration::from_secs(10), week);
        assert_eq!(t[0], Tier { grain_ms: 10_000, kept_ms: 3 * 3_600_000 });
        assert_eq!(t[1], Tier { grain_ms: 60_000, kept_ms: 7 * 3_600_000 });
        assert_eq!(t[2], Tier { grain_ms: 300_000, kept_ms: 26 * 3_600_000 });
        assert_eq!(t[3], Tier { grain_ms: 1_800_000, kept_ms: 7 * 86_400_000 });
        // A sample a second: 1 080 of them would be 18 minutes; the last 75 are kept.
        assert_eq!(tiers(Duration::from_secs(1), week)[0].kept_ms, 4_500_000);
        assert_eq!(tiers(Duration::from_secs(5), week)[0].kept_ms, 5_400_000);
        // A retention of an hour bounds every tier.
        let hour = tiers(Duration::from_secs(10), Duration::from_secs(3_600));
        assert!(hour.iter().all(|t| t.kept_ms == 3_600_000));
    }
}
