//! A frozen primary (SIGSTOP of its postmaster) fails over while API calls that need the
//! primary are in flight: none of them delays the failover, and each ends with an answer a
//! client can act on (never a 500, never a hang). Real nodes, real proxy, real client.

use std::time::{Duration, Instant};

use pgwarden_e2e::{http_request, lost_writes, postmaster_pid, psql, TestControl, Writer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn node(db: &Value, role: &str) -> (String, i32) {
    let n = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap();
    (n["name"].as_str().unwrap().to_owned(), n["port"].as_i64().unwrap() as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_fails_over_while_user_backup_tls_and_switchover_calls_are_in_flight() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("frozen", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    for name in ["to_drop", "to_reset"] {
        let r = control
            .request("POST", &format!("/v1/databases/{id}/users"), Some(json!({"name": name})))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let ((old_name, old_port), (_, new_port)) = (node(&db, "primary"), node(&db, "replica"));
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(old_port, 50, WAIT).await);

    let pid = postmaster_pid(&control.node_data_dir(&old_name)).expect("primary running");
    let frozen_at = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let calls: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", format!("/v1/databases/{id}/users"), Some(json!({"name": "late_user"}))),
        ("DELETE", format!("/v1/databases/{id}/users/to_drop"), None),
        ("POST", format!("/v1/databases/{id}/users/to_reset/reset-password"), None),
        ("POST", format!("/v1/databases/{id}/backups"), None),
        ("PUT", format!("/v1/databases/{id}/tls"), Some(json!({"force": true}))),
        ("POST", format!("/v1/databases/{id}/switchover"), None),
    ];
    let (addr, token) = (control.addr, control.token.clone());
    let in_flight: Vec<_> = calls
        .into_iter()
        .map(|(method, path, body)| {
            let token = token.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let body = body.map(|b| b.to_string());
                let answer = http_request(addr, method, &path, Some(&token), body.as_deref())
                    .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
                (format!("{method} {path}"), answer, started.elapsed())
            })
        })
        .collect();

    // The failover is not held up by the calls. (The writer, a plaintext client, is refused
    // while the TLS call forces TLS: the time to the first write is measured by
    // benches/failover.rs.)
    let failover = loop {
        let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await;
        if let Some(e) = events.json().as_array().unwrap().iter().find(|e| e["kind"] == "failover")
        {
            break e["message"].as_str().unwrap().to_owned();
        }
        assert!(frozen_at.elapsed() < WAIT, "no failover: {}", events.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("freeze to failover recorded: {:?}: {failover}", frozen_at.elapsed());

    // Every call ended, with a status and body a client can act on.
    for call in in_flight {
        let (call, answer, took) = call.join().unwrap();
        println!("{call}: {} in {took:?}: {}", answer.status, answer.body);
        assert_ne!(answer.status, 500, "{call}: {}", answer.body);
        assert!(
            matches!(answer.status, 200 | 201 | 202 | 204 | 409 | 503),
            "{call}: {}",
            answer.body
        );
        if answer.status >= 400 {
            let error = &answer.json()["error"];
            assert!(error["code"].is_string(), "{call}: {}", answer.body);
            let message = error["message"].as_str().unwrap();
            if answer.status == 503 {
                assert!(message.contains(&old_name), "{call}: the 503 names the node: {message}");
            }
        }
        if answer.status == 202 {
            let op = answer.json()["operation"]["id"].as_str().unwrap().to_owned();
            let op = control.wait_operation(&op).await;
            if op["status"] == "failed" {
                assert!(!op["error"].as_str().unwrap_or("").is_empty(), "{call}: {op}");
            }
        }
    }
    let _ = std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();
    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": false})))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(writer.wait_acks_from(new_port, 20, WAIT).await, "no write on the new primary");

    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',' ORDER BY n) FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {lost:?}", lost.len());
    control.wait_synchronous(&id, "the frozen node rejoins").await;
}
