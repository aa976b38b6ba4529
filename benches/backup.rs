//! Backup and PITR benchmark on a real database behind a real proxy.
//!
//!   cargo bench --bench backup -- [pgbench scale=68]    (68 ≈ 1 GB)
//!
//! Reports: recovery point (newest restorable second vs the last acknowledged commit), logical
//! backup throughput through the API vs a plain `pg_dump -Fc` run by hand on the same data, a
//! hand-run `pg_basebackup` + `pg_verifybackup` (what pgwarden's base backups run), and the time
//! to restore the database to a point in time (base backup taken before the load, so the whole
//! load is replayed from archived WAL).

use std::process::Command;
use std::time::{Duration, Instant};

use pgwarden_e2e::{pg_bin, psql, TestControl};
use serde_json::{json, Value};
use time::OffsetDateTime;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

async fn window(control: &TestControl, id: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let r = control.request("GET", &format!("/v1/databases/{id}/pitr"), None).await;
    let parse = |v: &Value| {
        OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
    };
    (r.status == 200)
        .then(|| Some((parse(&r.json()["earliest"])?, parse(&r.json()["latest"])?)))
        .flatten()
}

async fn wait_latest(control: &TestControl, id: &str, until: OffsetDateTime) -> Duration {
    let started = Instant::now();
    loop {
        if window(control, id).await.is_some_and(|(_, latest)| latest >= until) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(600), "window never reached {until}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn timed(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    started.elapsed()
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(68);
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("bench", "postgresql-starter-2048").await;
    wait_latest(&control, &id, OffsetDateTime::now_utc()).await;

    // Recovery point, five times: how long after an acknowledged commit it is restorable.
    let mut points = Vec::new();
    assert!(psql(&url, None, "CREATE TABLE rp(at timestamptz)").success);
    for _ in 0..5 {
        assert!(psql(&url, None, "INSERT INTO rp VALUES (now())").success);
        let committed = OffsetDateTime::now_utc();
        points.push(wait_latest(&control, &id, committed).await);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    let loaded = Instant::now();
    let out = Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string(), "-d", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let load_time = loaded.elapsed();
    let size: i64 = psql(&url, None, "SELECT pg_database_size(current_database())")
        .stdout
        .trim()
        .parse()
        .unwrap();
    let size = size as u64;
    eprintln!("loaded {} MB in {load_time:?}", size / 1_000_000);

    // Logical backup through the API vs pg_dump by hand.
    let started = Instant::now();
    let r = control.request("POST", &format!("/v1/databases/{id}/backups"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let ours = started.elapsed();
    let scratch = tempfile::tempdir().unwrap();
    let by_hand = timed(
        Command::new(pg_bin("pg_dump"))
            .args(["-Fc", "-d", &url, "-f"])
            .arg(scratch.path().join("hand.dump")),
    );
    let node = db["nodes"][0]["name"].as_str().unwrap();
    let node_dir = control.node_data_dir(node);
    let socket = node_dir.parent().unwrap();
    let port = db["nodes"][0]["port"].to_string();
    let base_hand = timed(
        Command::new(pg_bin("pg_basebackup"))
            .args(["-h"])
            .arg(socket)
            .args(["-p", &port, "-U", "postgres", "-Fp", "-X", "stream", "-c", "fast", "-D"])
            .arg(scratch.path().join("base")),
    );
    let verify_hand =
        timed(Command::new(pg_bin("pg_verifybackup")).arg(scratch.path().join("base")));

    // Point-in-time restore of the loaded database.
    assert!(psql(&url, None, "INSERT INTO rp VALUES (now())").success);
    let target = OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(psql(&url, None, "INSERT INTO rp VALUES (now())").success);
    wait_latest(&control, &id, OffsetDateTime::now_utc()).await;
    let started = Instant::now();
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": rfc3339(target)})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let restore = started.elapsed();
    let rows = psql(&url, None, "SELECT count(*) FROM rp").stdout.trim().to_owned();
    assert_eq!(rows, "6", "the restore stops at the target");
    let accounts =
        psql(&url, None, "SELECT count(*) FROM pgbench_accounts").stdout.trim().to_owned();
    assert_eq!(accounts, (u64::from(scale) * 100_000).to_string());

    points.sort();
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| database size | {} MB (pgbench scale {scale}) |", size / 1_000_000);
    println!(
        "| recovery point: commit acknowledged → restorable (5 runs) | median {} ms, max {} ms |",
        points[2].as_millis(),
        points[4].as_millis()
    );
    println!("| logical backup through the API (pg_dump -Fc from the standby or primary, pg_restore --list, sha256) | {:.1} s, {:.1} MB/s |", ours.as_secs_f64(), mb_per_s(size, ours));
    println!(
        "| plain pg_dump -Fc by hand, same data | {:.1} s, {:.1} MB/s |",
        by_hand.as_secs_f64(),
        mb_per_s(size, by_hand)
    );
    println!("| pg_basebackup -X stream by hand / pg_verifybackup by hand (what base backups run) | {:.1} s ({:.1} MB/s) / {:.1} s |", base_hand.as_secs_f64(), mb_per_s(size, base_hand), verify_hand.as_secs_f64());
    println!("| point-in-time restore of the {} MB database (replays the whole load from archived WAL) | {:.1} s |", size / 1_000_000, restore.as_secs_f64());
}
