//! Logical backups through the control API and the CLI, restored with pg_restore into another
//! PostgreSQL: real nodes, real pg_dump/pg_restore.

use std::process::Command;
use std::time::Duration;

use pgwarden_e2e::{
    let_time_pass, pg_bin, postmaster_pid, psql, wait_until, workspace_bin, PgNode, TestControl,
};
use serde_json::{json, Value};

async fn take_backup(control: &TestControl, id: &str) -> (u16, Value) {
    let r = control.request("POST", &format!("/v1/databases/{id}/backups"), None).await;
    if r.status != 202 {
        return (r.status, r.json());
    }
    let answer = r.json();
    let op = control.wait_operation(answer["operation"]["id"].as_str().unwrap()).await;
    let backup = answer["backup"]["id"].as_str().unwrap().to_owned();
    let listed = control.request("GET", &format!("/v1/databases/{id}/backups"), None).await.json();
    let found =
        listed.as_array().unwrap().iter().find(|b| b["id"] == backup.as_str()).unwrap().clone();
    assert_eq!(op["status"] == "succeeded", found["status"] == "succeeded", "{op} {found}");
    (202, found)
}

fn cli(control: &TestControl, args: &[&str]) -> (bool, String) {
    let out = Command::new(workspace_bin("pgwarden"))
        .arg("--data-dir")
        .arg(control.dir.path().join("data"))
        .args(["--api", &format!("http://{}", control.addr)])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn backup_file(control: &TestControl, id: &str, backup: &str) -> std::path::PathBuf {
    control.dir.path().join("data/backups").join(id).join(format!("{backup}.dump"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_downloads_with_the_cli_and_restores_with_pg_restore() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("shop", "postgresql-business-512").await;
    let out = psql(&url, None, "CREATE TABLE orders(id int PRIMARY KEY, total int); INSERT INTO orders SELECT g, g * 3 FROM generate_series(1, 5000) g");
    assert!(out.success, "{}", out.stderr);

    let (status, backup) = take_backup(&control, &id).await;
    assert_eq!(status, 202);
    assert_eq!(backup["status"], "succeeded", "{backup}");
    assert_eq!(backup["kind"], "manual");
    let replica = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == "replica").unwrap()
        ["name"]
        .clone();
    assert_eq!(backup["node"], replica, "taken from the standby");
    let size = backup["size_bytes"].as_u64().unwrap();
    assert!(size > 10_000, "{backup}");
    assert_eq!(backup["sha256"].as_str().unwrap().len(), 64);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.dump");
    let bk = backup["id"].as_str().unwrap();
    let (ok, out) = cli(&control, &["backups", "download", &id, bk, "-o", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("sha256 verified"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);

    // pg_restore into a scratch database on another server gives the same data.
    let scratch = PgNode::start();
    assert!(scratch.superuser_sql("CREATE DATABASE scratch").success);
    let restored = Command::new(pg_bin("pg_restore"))
        .args([
            "--no-owner",
            "--no-privileges",
            "-U",
            "postgres",
            "-h",
            "127.0.0.1",
            "-p",
            &scratch.port.to_string(),
            "-d",
            "scratch",
        ])
        .arg(&file)
        .env("PGPASSWORD", pgwarden_e2e::TEST_PASSWORD)
        .output()
        .unwrap();
    assert!(restored.status.success(), "{}", String::from_utf8_lossy(&restored.stderr));
    let check = |conn: &str| {
        psql(conn, None, "SELECT count(*), sum(total) FROM orders").stdout.trim().to_owned()
    };
    let scratch_conn = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=scratch",
        scratch.port,
        pgwarden_e2e::TEST_PASSWORD
    );
    assert_eq!(check(&scratch_conn), "5000|37507500");
    assert_eq!(check(&url), "5000|37507500");

    let (ok, listed) = cli(&control, &["backups", "list", &id]);
    assert!(ok && listed.contains(bk) && listed.contains("succeeded"), "{listed}");
    let (ok, out) = cli(&control, &["backups", "delete", &id, bk]);
    assert!(ok, "{out}");
    assert!(!backup_file(&control, &id, bk).exists());
    assert_eq!(
        control.request("DELETE", &format!("/v1/databases/{id}/backups/{bk}"), None).await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_backup_is_refused_on_download() {
    let control = TestControl::start().await;
    let db = control.create_database("fragile", "postgresql-starter-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let (_, backup) = take_backup(&control, &id).await;
    let bk = backup["id"].as_str().unwrap();
    let path = backup_file(&control, &id, bk);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let r =
        control.request("GET", &format!("/v1/databases/{id}/backups/{bk}/download"), None).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "backup_damaged");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("damaged"));
    let out_file = control.dir.path().join("out.dump");
    let (ok, out) =
        cli(&control, &["backups", "download", &id, bk, "-o", out_file.to_str().unwrap()]);
    assert!(!ok && out.contains("damaged"), "{out}");
    assert!(!out_file.exists(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_backups_are_capped_by_the_plan() {
    let control = TestControl::start().await;
    let sandbox = control.create_database("tiny", "postgresql-sandbox").await;
    let (status, err) = take_backup(&control, sandbox["id"].as_str().unwrap()).await;
    assert_eq!(status, 409);
    assert!(err["error"]["message"].as_str().unwrap().contains("no manual backups"), "{err}");

    let db = control.create_database("capped", "postgresql-starter-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    for n in 0..10 {
        let (status, backup) = take_backup(&control, &id).await;
        assert_eq!(
            (status, backup["status"].as_str()),
            (202, Some("succeeded")),
            "backup {n}: {backup}"
        );
    }
    let (status, err) = take_backup(&control, &id).await;
    assert_eq!(status, 409);
    assert_eq!(err["error"]["code"], "backup_limit");
    assert!(err["error"]["message"].as_str().unwrap().contains("at most 10"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_backup_runs_at_its_hour_and_a_failed_backup_keeps_its_reason() {
    let control = TestControl::start().await;
    let db = control.create_database("nightly", "postgresql-starter-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let r = control
        .request(
            "PUT",
            &format!("/v1/databases/{id}/backup-schedule"),
            Some(json!({"hour_utc": 24})),
        )
        .await;
    assert_eq!(r.status, 400);
    // The hour that has just begun: the backup is due now.
    let hour = time::OffsetDateTime::now_utc().hour();
    let r = control
        .request(
            "PUT",
            &format!("/v1/databases/{id}/backup-schedule"),
            Some(json!({"hour_utc": hour})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until("a daily backup", Duration::from_secs(30), async || {
        let list =
            control.request("GET", &format!("/v1/databases/{id}/backups"), None).await.json();
        let daily = list.as_array().unwrap().iter();
        if daily.clone().any(|b| b["kind"] == "daily" && b["status"] == "succeeded") {
            assert_eq!(daily.count(), 1, "exactly one daily backup per slot: {list}");
            Ok(())
        } else {
            Err(list.to_string())
        }
    })
    .await;
    // Time itself must pass: the schedule ticks again (every 200 ms here) and must not take a
    // second backup in the same slot.
    let_time_pass(Duration::from_millis(600)).await;
    let list = control.request("GET", &format!("/v1/databases/{id}/backups"), None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "taken once, not at every tick: {list}");

    // A node that is down: the backup fails, recorded with pg_dump's reason.
    let node = db["nodes"][0]["name"].as_str().unwrap();
    let pid = postmaster_pid(&control.node_data_dir(node)).unwrap();
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    wait_until("the killed postmaster gone", Duration::from_secs(10), async || {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if alive {
            Err(format!("{pid} still there"))
        } else {
            Ok(())
        }
    })
    .await;
    let (status, backup) = take_backup(&control, &id).await;
    assert_eq!(status, 202);
    assert_eq!(backup["status"], "failed");
    assert!(backup["error"].as_str().unwrap().contains("pg_dump failed"), "{backup}");
    // A sentence for the client: no path of the host (the log has the program's output).
    let data = control.data.display().to_string();
    assert!(!backup["error"].as_str().unwrap().contains(&data), "{backup}");
}
