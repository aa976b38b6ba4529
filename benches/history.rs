//! The stats history of many databases over a week: what it costs on disk per database, how
//! long a record takes, and how fast charts answer.
//!
//!   cargo bench --bench history -- [N=1000] [days=7]
//!
//! Replays `days` days (and an hour) of samples every 10 s (the default interval) of N databases
//! (a business database, two nodes, for every four sandbox ones, one node each) into the real
//! history (`pgwarden_control::stats::history`, default tiers and a 7-day retention), as fast as
//! it goes: the clock is simulated, and the file is in `/dev/shm` (memory) when there is one, so
//! that every commit is the real one (durable) without waiting on a disk. Then it reports the file's size per database, the time records took (a
//! plain one, and one that starts a minute and so rolls up and prunes), and the time of the
//! dashboard's chart queries (1 hour, 6 hours, 1 day, 7 days, with the steps the API picks) for databases picked at random.

use std::time::{Duration, Instant};

use pgwarden_api::control::{
    BackupStats, Connections, Container, DiskStats, Lag, NodeRole, NodeStats, SizeStats, Stats,
    Usage,
};
use pgwarden_control::stats::history::History;

const INTERVAL: Duration = Duration::from_secs(10);
const WEEK: Duration = Duration::from_secs(7 * 86_400);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let days: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("temp dir");
    let history =
        History::open(&dir.path().join("stats.redb"), INTERVAL, WEEK).expect("open the history");
    let ids: Vec<String> = (0..n).map(|i| format!("db{i:05}-{}", 1000 + i % 9000)).collect();
    let business = |i: usize| i.is_multiple_of(5);

    // Start on a minute, like a platform that has run for a while.
    let start_ms: i64 = 1_800_000_000_000;
    let records = (days * 86_400 + 3_600) / INTERVAL.as_secs();
    println!(
        "{n} databases, {records} records of {} s ({days} days and an hour)",
        INTERVAL.as_secs()
    );
    let (mut plain, mut tidy) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for r in 0..records {
        let now_ms = start_ms + (r * INTERVAL.as_millis() as u64) as i64;
        let all: Vec<Stats> =
            ids.iter().enumerate().map(|(i, id)| sample(id, business(i), r, i)).collect();
        let took = Instant::now();
        history.record(&all, &ids, now_ms).expect("record");
        let took = took.elapsed();
        let minute = now_ms.rem_euclid(60_000) < INTERVAL.as_millis() as i64;
        if minute {
            tidy.push(took)
        } else {
            plain.push(took)
        }
        if r % 8_640 == 0 && r > 0 {
            println!(
                "  day {}: {:.0} s so far, {:.1} MiB",
                r / 8_640,
                started.elapsed().as_secs_f64(),
                history.file_size().unwrap_or(0) as f64 / 1048576.0
            );
        }
    }
    let end_ms = start_ms + (records * INTERVAL.as_millis() as u64) as i64;
    let size = history.file_size().expect("file size");

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| databases | {n} ({} business, {} sandbox) |", n.div_ceil(5), n - n.div_ceil(5));
    println!("| replayed | {days} days and an hour, a sample every {} s |", INTERVAL.as_secs());
    println!("| file | {:.1} MiB |", size as f64 / 1048576.0);
    // After a week, every tier is full: this is what a database costs for good.
    println!("| per database | {:.0} KiB |", size as f64 / n as f64 / 1024.0);
    let [stored, pages, free] = history.usage().expect("usage");
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "| of which | {:.1} MiB of points, in {:.1} MiB of pages; {:.1} MiB free |",
        mib(stored),
        mib(pages),
        mib(free)
    );
    println!("| plain record (N samples) | {} |", percentiles(&mut plain));
    println!("| record that rolls up and prunes | {} |", percentiles(&mut tidy));

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for (name, span_s, step_s) in [
        ("1 hour, step 10 s", 3_600, 10),
        ("6 hours, step 60 s", 21_600, 60),
        ("1 day, step 300 s", 86_400, 300),
        ("7 days, step 1800 s", 604_800, 1_800),
    ] {
        let mut times = Vec::new();
        let mut points = 0;
        for _ in 0..200 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = &ids[rng as usize % n];
            let took = Instant::now();
            let h = history.series(id, end_ms - span_s * 1_000, end_ms, step_s).expect("series");
            times.push(took.elapsed());
            points += h.at.len();
            assert!(!h.at.is_empty(), "{name}: no points for {id}");
        }
        println!("| chart {name} ({} points) | {} |", points / 200, percentiles(&mut times));
    }
}

/// A sample of database `i` at record `r`: figures that move, so that means are real work.
fn sample(id: &str, business: bool, r: u64, i: usize) -> Stats {
    let wave = ((r as usize + i) % 360) as f64;
    let node = |k: usize| NodeStats {
        name: format!("{id}-{k}"),
        role: if k == 1 { NodeRole::Primary } else { NodeRole::Replica },
        sampled_at: String::new(),
        container: Container { cgroup: None, unlimited_reason: None },
        cpu_percent: Some(wave / 36.0),
        memory: Usage {
            current: Some(40 << 20 | (r % 4096) << 8),
            highest: None,
            limit: Some(128 << 20),
        },
        swap: Usage { current: Some(0), highest: None, limit: Some(128 << 20) },
        connections: Some(Connections { open: r % 7, max: 30 }),
        replication_lag: (k > 1).then_some(Lag { bytes: r % 1000, seconds: 0.0 }),
        disk: DiskStats { data: 30 << 20, wal: 16 << 20, other: 1 << 20, total: 47 << 20 },
    };
    let nodes = if business { vec![node(1), node(2)] } else { vec![node(1)] };
    Stats {
        database: id.to_owned(),
        sampled_at: String::new(),
        nodes,
        size: SizeStats {
            sampled_at: String::new(),
            logical: Some(8 << 20 | r << 4),
            disk: Some(DiskStats {
                data: 30 << 20,
                wal: 16 << 20,
                other: 1 << 20,
                total: 47 << 20,
            }),
        },
        backups: BackupStats {
            sampled_at: String::new(),
            last_backup_at: None,
            last_backup_age_secs: None,
        },
        pitr: None,
    }
}

fn percentiles(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "-".into();
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", at(0.5), at(0.99), at(1.0))
}
