//! Failover and switchover benchmark on a real business database behind a real proxy.
//!
//!   cargo bench --bench failover -- [failovers=20] [switchovers=10] [stop]
//!
//! Failover: with a writer inserting through the proxy, kill -9 the primary's postmaster (or,
//! with `stop`, freeze it with SIGSTOP) and measure the time from the kill to the first insert
//! acknowledged by the new primary; wait
//! until the old primary has rejoined and commits are synchronous again; repeat. At the end,
//! count acknowledged inserts missing from the database (must be 0).
//! Switchover: with the writer and a new connection every 20 ms, switch over and record how
//! long new connections waited and how many failed (must be 0).

use std::time::{Duration, Instant};

use pgwarden_e2e::{lost_writes, postmaster_pid, psql, Connector, TestControl, Writer};
use serde_json::{json, Value};

fn node(db: &Value, role: &str) -> (String, i32) {
    let n = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap();
    (n["name"].as_str().unwrap().to_owned(), n["port"].as_i64().unwrap() as i32)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap())
}

async fn steady(control: &TestControl, id: &str) -> Value {
    control.wait_synchronous(id, "synchronous with every node running").await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let failovers = args.first().copied().unwrap_or(20);
    let switchovers = args.get(1).copied().unwrap_or(10);
    let freeze = std::env::args().any(|a| a == "stop");
    let (signal, what) = if freeze { ("-STOP", "SIGSTOP") } else { ("-KILL", "kill -9") };
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("bench", "postgresql-business-512").await;
    assert!(psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)").success);
    let writer = Writer::start(url.clone());

    let mut to_first_write = Vec::new();
    for run in 1..=failovers {
        let db = steady(&control, &id).await;
        let ((old, old_port), (_, new_port)) = (node(&db, "primary"), node(&db, "replica"));
        assert!(
            writer
                .wait_acks_from(
                    old_port,
                    writer.acked().iter().filter(|a| a.port == old_port).count() + 20,
                    Duration::from_secs(30)
                )
                .await
        );
        let pid = postmaster_pid(&control.node_data_dir(&old)).expect("primary running");
        let killed = Instant::now();
        std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
        let deadline = killed + Duration::from_secs(60);
        let took = loop {
            if let Some(ack) = writer.acked().iter().find(|a| a.port == new_port && a.at > killed) {
                break ack.at - killed;
            }
            assert!(Instant::now() < deadline, "run {run}: no write on the new primary");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!(
            "failover {run}: first write on the new primary {} ms after {what}",
            took.as_millis()
        );
        if freeze {
            // Fenced by the failover; a frozen process that survived would resume here.
            let _ = std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();
        }
        to_first_write.push(took);
    }

    let (mut waits, mut longest, mut failed, mut attempts) = (Vec::new(), Vec::new(), 0, 0);
    for run in 1..=switchovers {
        let db = steady(&control, &id).await;
        let (target, _) = node(&db, "replica");
        let connector = Connector::start(url.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = control
            .request(
                "POST",
                &format!("/v1/databases/{id}/switchover"),
                Some(json!({"target": target})),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
        assert_eq!(op["status"], "succeeded", "run {run}: {op}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let outcomes = connector.stop().await;
        attempts += outcomes.len();
        failed += outcomes.iter().filter(|o| o.is_err()).count();
        let ok: Vec<Duration> = outcomes.iter().filter_map(|o| o.as_ref().ok().copied()).collect();
        let max = ok.iter().max().copied().unwrap_or_default();
        eprintln!(
            "switchover {run}: {} new connections, {} failed, longest wait {} ms",
            outcomes.len(),
            outcomes.iter().filter(|o| o.is_err()).count(),
            max.as_millis()
        );
        longest.push(max);
        waits.extend(ok);
    }

    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    let (median, max) = stats(to_first_write);
    println!("| measurement | runs | median | max | target |");
    println!("|---|---:|---:|---:|---|");
    println!("| {what} of the primary → first write acknowledged by the new primary | {failovers} | {} ms | {} ms | median ≤ 3 s |", median.as_millis(), max.as_millis());
    println!(
        "| acknowledged writes lost (of {} acknowledged) | {failovers} | {} | {} | 0 |",
        acked.len(),
        lost.len(),
        lost.len()
    );
    if switchovers > 0 {
        let (median_longest, max_longest) = stats(longest);
        let (median_wait, _) = stats(waits);
        println!("| switchover: longest wait of a new connection | {switchovers} | {} ms | {} ms | < 1 s |", median_longest.as_millis(), max_longest.as_millis());
        println!("| switchover: new connections failed (of {attempts}) | {switchovers} | {failed} | {failed} | 0 |");
        println!(
            "| switchover: wait of every new connection during the runs | {attempts} | {} ms | | |",
            median_wait.as_millis()
        );
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
