//! Point-in-time recovery on real nodes: continuous WAL archiving, base backups, restore to a
//! chosen second through the same DATABASE_URL, and refusals that touch nothing.

use std::time::{Duration, Instant};

use pgwarden_e2e::{let_time_pass, psql, wait_psql, wait_until, TestControl};
use serde_json::{json, Value};
use time::OffsetDateTime;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn parse(t: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(t.as_str().unwrap(), &time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Waits until the PITR window exists and reaches `until`; returns it.
async fn window_reaching(
    control: &TestControl,
    id: &str,
    until: OffsetDateTime,
) -> (OffsetDateTime, OffsetDateTime) {
    wait_until(&format!("the PITR window reaching {until}"), Duration::from_secs(90), async || {
        let r = control.request("GET", &format!("/v1/databases/{id}/pitr"), None).await;
        if r.status == 200 {
            let w = r.json();
            let (earliest, latest) = (parse(&w["earliest"]), parse(&w["latest"]));
            if latest >= until {
                return Ok((earliest, latest));
            }
        }
        Err(r.body)
    })
    .await
}

async fn restore(control: &TestControl, id: &str, target: OffsetDateTime) -> Value {
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": rfc3339(target)})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await
}

fn rows(url: &str) -> String {
    let out = psql(url, None, "SELECT string_agg(v, ',' ORDER BY v) FROM t");
    assert!(out.success, "{}", out.stderr);
    out.stdout.trim().to_owned()
}

async fn wait_rows(url: &str, expected: &str) {
    wait_until(&format!("the rows {expected}"), Duration::from_secs(20), async || {
        let out = psql(url, None, "SELECT string_agg(v, ',' ORDER BY v) FROM t");
        if out.success && out.stdout.trim() == expected {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_second_between_two_commits_through_the_same_url() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("ledger", "postgresql-starter-512").await;
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;

    assert!(psql(&url, None, "CREATE TABLE t(v text); INSERT INTO t VALUES ('t1')").success);
    let_time_pass(Duration::from_millis(1500)).await;
    assert!(psql(&url, None, "INSERT INTO t VALUES ('t2')").success);
    let_time_pass(Duration::from_millis(1500)).await;
    let target = OffsetDateTime::now_utc();
    let_time_pass(Duration::from_millis(1500)).await;
    assert!(psql(&url, None, "INSERT INTO t VALUES ('t3')").success);
    let committed = OffsetDateTime::now_utc();
    let started = Instant::now();
    let (_, latest) = window_reaching(&control, &id, committed).await;
    println!(
        "recovery point: last commit restorable after {:?} (latest {latest})",
        started.elapsed()
    );

    let old_node = db["nodes"][0]["name"].as_str().unwrap().to_owned();
    let op = restore(&control, &id, target).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    wait_rows(&url, "t1,t2").await;
    let after = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(after["database_url"], url.as_str(), "same DATABASE_URL");
    assert_eq!(after["status"], "running");
    assert_ne!(after["nodes"][0]["name"], old_node.as_str(), "restored on new nodes");
    assert_eq!(
        std::fs::read_dir(control.dir.path().join("data/nodes")).unwrap().count(),
        1,
        "old node removed after success"
    );
    // The restored database takes writes and is archived again.
    assert!(psql(&url, None, "INSERT INTO t VALUES ('t4')").success);
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    assert!(events.as_array().unwrap().iter().any(|e| e["kind"] == "restored"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_few_seconds_ago_has_the_last_commits() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("recent", "postgresql-starter-512").await;
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    assert!(psql(&url, None, "CREATE TABLE t(v text); INSERT INTO t SELECT 'row' || lpad(g::text, 3, '0') FROM generate_series(1, 100) g").success);
    let last_commit = OffsetDateTime::now_utc();
    let (_, latest) = window_reaching(&control, &id, last_commit).await;
    let recovery_point = latest - last_commit;
    println!("newest restorable second is {recovery_point} after the last commit was acknowledged");
    let_time_pass(Duration::from_secs(2)).await;
    let target = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    window_reaching(&control, &id, target).await;
    let op = restore(&control, &id, target).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    wait_until("the 100 rows restored", Duration::from_secs(20), async || {
        let out = psql(&url, None, "SELECT count(*), max(v) FROM t");
        if out.success && out.stdout.trim() == "100|row100" {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_wal_segment_or_a_target_outside_the_window_is_refused_and_nothing_is_touched() {
    let control = TestControl::start().await;
    let sandbox = control.create_database("nopitr", "postgresql-sandbox").await;
    let r = control
        .request("GET", &format!("/v1/databases/{}/pitr", sandbox["id"].as_str().unwrap()), None)
        .await;
    assert_eq!(r.status, 409);
    assert!(r.body.contains("no point-in-time recovery"), "{}", r.body);

    let (db, id, url) = control.create_routed_database("holes", "postgresql-starter-512").await;
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    let node = db["nodes"][0]["name"].as_str().unwrap();
    let socket = control.node_data_dir(node).parent().unwrap().to_owned();
    let superuser = format!(
        "host={} port={} user=postgres dbname=postgres",
        socket.display(),
        db["nodes"][0]["port"]
    );
    assert!(psql(&url, None, "CREATE TABLE t(v text)").success);
    for i in 0..4 {
        assert!(psql(&url, None, &format!("INSERT INTO t VALUES ('{i}')")).success);
        assert!(psql(&superuser, None, "SELECT pg_switch_wal()").success);
    }
    let (earliest, latest) = window_reaching(&control, &id, OffsetDateTime::now_utc()).await;

    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": rfc3339(earliest - time::Duration::hours(1))})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("outside the recoverable window"),
        "{}",
        r.body
    );
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": "yesterday"})),
        )
        .await;
    assert_eq!(r.status, 400);

    // A damaged base backup is refused (its manifest checksums no longer match).
    let bases = control.dir.path().join("data/backups").join(&id).join("base");
    let base = std::fs::read_dir(&bases)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .unwrap();
    let victim_file = base.join("PG_VERSION");
    let original = std::fs::read(&victim_file).unwrap();
    std::fs::write(&victim_file, b"99\n").unwrap();
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": rfc3339(latest)})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("damaged"), "{}", r.body);
    std::fs::write(&victim_file, original).unwrap();

    // Delete a segment in the middle of the archive.
    let wal = control.dir.path().join("data/backups").join(&id).join("wal");
    let mut segments: Vec<String> = std::fs::read_dir(&wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.len() == 24)
        .collect();
    segments.sort();
    assert!(segments.len() >= 4, "{segments:?}");
    let victim = segments[segments.len() - 2].clone();
    std::fs::remove_file(wal.join(&victim)).unwrap();
    let r = control
        .request(
            "POST",
            &format!("/v1/databases/{id}/restore"),
            Some(json!({"target_time": rfc3339(latest)})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&victim) && message.contains("missing"), "{message}");
    // Nothing touched: same node, same data, still running.
    let now = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(now["nodes"][0]["name"], node);
    assert_eq!(now["status"], "running");
    assert_eq!(rows(&url), "0,1,2,3");
    // The gap is reported, not only discovered at restore time.
    wait_until("a wal_gap event naming the segment", Duration::from_secs(30), async || {
        let events =
            control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
        let reported =
            events.as_array().unwrap().iter().any(|e| {
                e["kind"] == "wal_gap" && e["message"].as_str().unwrap().contains(&victim)
            });
        if reported {
            Ok(())
        } else {
            Err(events.to_string())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_across_a_failover_follows_the_new_timeline() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("durable", "postgresql-business-512").await;
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    assert!(psql(&url, None, "CREATE TABLE t(v text); INSERT INTO t VALUES ('before')").success);

    // Fail over: the archive now holds timeline 1 then timeline 2.
    let r = control.request("POST", &format!("/v1/databases/{id}/failover"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let after = "INSERT INTO t VALUES ('after')";
    wait_psql("a write after the failover", Duration::from_secs(20), &url, after).await;
    let_time_pass(Duration::from_millis(1500)).await;
    let target = OffsetDateTime::now_utc();
    let_time_pass(Duration::from_millis(1500)).await;
    assert!(psql(&url, None, "INSERT INTO t VALUES ('later')").success);
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    let wal = control.dir.path().join("data/backups").join(&id).join("wal");
    assert!(wal.join("00000002.history").exists(), "archive followed the new timeline");

    let op = restore(&control, &id, target).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    wait_rows(&url, "after,before").await;
    let after = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(after["nodes"].as_array().unwrap().len(), 2, "restored with its standby: {after}");
}

/// Files of `dir` others could read: directories other than `shared` with any permission for
/// others, and files other than certificates readable or writable by others.
fn exposed(dir: &std::path::Path, shared: &[std::path::PathBuf]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            // A directory the node user must pass through may let others through, no more.
            let allowed = if shared.contains(&path) { 0o011 } else { 0 };
            if mode & 0o077 & !allowed != 0 {
                found.push(format!("{} {mode:o}", path.display()));
            }
            stack.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else if meta.is_file() {
            let certificate = path.extension().is_some_and(|e| e == "crt");
            if !certificate && mode & 0o066 != 0 {
                found.push(format!("{} {mode:o}", path.display()));
            }
        }
    }
    found
}

/// A data dir with a space and a quote in its path, under umask 000: the business database
/// streams to its standby, archives WAL, restores, keeps every file private and its password
/// sealed, and its destruction leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pitr_database_in_a_quoted_data_dir_is_private_restorable_and_destroyed_without_a_trace()
{
    rustix::process::umask(rustix::fs::Mode::empty());
    let control = TestControl::start_full(Vec::new(), Vec::new(), "my data/it's here", None).await;
    let (db, id, url) = control.create_routed_database("quoted", "postgresql-business-512").await;
    assert_eq!(db["replication"], "synchronous", "{db}");
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    assert!(psql(&url, None, "CREATE TABLE t(v text); INSERT INTO t VALUES ('t1')").success);
    let_time_pass(Duration::from_millis(1500)).await;
    let target = OffsetDateTime::now_utc();
    let_time_pass(Duration::from_millis(1500)).await;
    assert!(psql(&url, None, "INSERT INTO t VALUES ('t2')").success);
    window_reaching(&control, &id, OffsetDateTime::now_utc()).await;
    let op = restore(&control, &id, target).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    wait_rows(&url, "t1").await;
    control.wait_synchronous(&id, "restored standby synchronous").await;
    let r = control.request("POST", &format!("/v1/databases/{id}/backups"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");

    // Private whatever the umask.
    let data = control.data.clone();
    let shared = [data.clone(), data.join("nodes")];
    let exposed = exposed(&data, &shared);
    assert!(exposed.is_empty(), "readable by others: {exposed:#?}");
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    for file in ["state.redb", "token", "secret.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    // The password of DATABASE_URL is not in the state file in clear text.
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap().to_owned();
    let state = std::fs::read(data.join("state.redb")).unwrap();
    assert!(!state.windows(password.len()).any(|w| w == password.as_bytes()), "clear password");
    let kept = data.join("backups").join(&id);
    let before: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(before.iter().any(|n| n.starts_with("wal-before-")), "{before:?}");

    // Destroy: nodes, routes, logical and base backups, WAL archives, earlier generations.
    let r = control.request("DELETE", &format!("/v1/databases/{id}"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    control.wait_routed(db["name"].as_str().unwrap(), false).await;
    assert!(!kept.exists(), "{} is still there", kept.display());
    let nodes: Vec<_> = std::fs::read_dir(data.join("nodes")).unwrap().flatten().collect();
    assert!(nodes.is_empty(), "{nodes:?}");
    assert_eq!(control.request("GET", &format!("/v1/databases/{id}"), None).await.status, 404);
    let leftovers: Vec<_> = std::fs::read_dir(data.join("backups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".scratch")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
