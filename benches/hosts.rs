//! Failover across hosts and control-plane takeover, on the platform in network namespaces
//! (`TestHosts`: etcd ×3 with LAN timing, agents ×3, control planes ×2, proxies ×2 holding a
//! virtual IP; leases 3 s).
//!
//!   cargo bench --bench hosts -- [failovers=20] [takeovers=20] [host_kills=5]
//!
//! Failover: with a writer inserting through the virtual IP, kill -9 the primary's postmaster
//! and measure the time to the first insert acknowledged once writes resume; wait until the
//! old primary has rejoined and commits are synchronous again; repeat. Takeover: kill -9 the
//! leading control plane, measure until the other answers as leader, start the killed one
//! again (it stands by); repeat. Host kill: kill -9 of every process of the primary's host
//! (its agent and PostgreSQL), measure as for a failover, start the agent again and wait until
//! its node has rejoined. At the end, count acknowledged inserts missing (must be 0).
//! `benches/patroni.rs` runs the same faults on Patroni.

use std::time::{Duration, Instant};

use pgwarden_e2e::{kill_postmaster, lost_writes, median_max, psql, TestHosts, Writer, DB_HOSTS};
use serde_json::Value;

fn primary(db: &Value) -> (String, i32) {
    let n = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == "primary").unwrap();
    (n["name"].as_str().unwrap().to_owned(), n["port"].as_i64().unwrap() as i32)
}

/// The database host (`db1`..) the primary runs on.
fn primary_host(hosts: &TestHosts, db: &Value) -> &'static str {
    let n = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == "primary").unwrap();
    let on = |h: &&&str| n["host"].as_str() == Some(hosts.lan.addr(h).to_string().as_str());
    DB_HOSTS.iter().find(on).expect("a database host")
}

fn steady(db: &Value) -> bool {
    let running = db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running");
    db["replication"] == "synchronous" && running
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (failovers, takeovers) =
        (args.first().copied().unwrap_or(20), args.get(1).copied().unwrap_or(20));
    let host_kills = args.get(2).copied().unwrap_or(5);
    let mut hosts = TestHosts::start().await;
    let db = hosts.create_database("bench", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let url = db["database_url"].as_str().unwrap().to_owned();
    let setup = psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let writer = Writer::start(url.clone());
    let writing = writer.wait_acks_from(primary(&db).1, 20, Duration::from_secs(30)).await;
    assert!(writing, "no writes through the virtual IP");
    let mut db = db;

    let mut failover_times = Vec::new();
    for run in 0..failovers {
        let (name, port) = primary(&db);
        let killed = Instant::now();
        kill_postmaster(&hosts.node_data_dir(&name));
        let ack =
            writer.resumed_after(killed, Duration::from_secs(90)).await.expect("writes resumed");
        assert_ne!(ack.port, port, "run {run}: the primary was restarted, not failed over");
        failover_times.push(ack.at - killed);
        eprintln!("failover {run}: {:?}", ack.at - killed);
        if ack.at - killed > Duration::from_secs(10) {
            eprintln!("a slow failover; the logs:\n{}", hosts.tails(&["cp1", "cp2", "px1", "px2"]));
        }
        db = hosts.wait_database(&id, |db| steady(db) && primary(db).1 == ack.port).await;
    }

    let mut takeover_times = Vec::new();
    for run in 0..takeovers {
        let leader = hosts.wait_leader(Duration::from_secs(30)).await;
        let killed = Instant::now();
        hosts.kill(leader);
        let other = hosts.wait_leader(Duration::from_secs(30)).await;
        assert_ne!(other, leader);
        takeover_times.push(killed.elapsed());
        eprintln!("takeover {run}: {:?}", killed.elapsed());
        hosts.start_plane(leader);
    }

    let mut host_kill_times = Vec::new();
    for run in 0..host_kills {
        let (_, port) = primary(&db);
        let host = primary_host(&hosts, &db);
        let killed = Instant::now();
        hosts.kill_host(host);
        let ack =
            writer.resumed_after(killed, Duration::from_secs(90)).await.expect("writes resumed");
        assert_ne!(ack.port, port, "run {run}: a dead host cannot stay primary");
        host_kill_times.push(ack.at - killed);
        eprintln!("host kill {run}: {:?}", ack.at - killed);
        hosts.start_agent(host);
        db = hosts.wait_database(&id, |db| steady(db) && primary(db).1 == ack.port).await;
    }

    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    println!("failover (kill -9 of the primary's postmaster to the first acknowledged write after it): {}", median_max(failover_times));
    println!(
        "control-plane takeover (kill -9 of the leader to the other answering as leader): {}",
        median_max(takeover_times)
    );
    println!(
        "failover after a host's death (kill -9 of its agent and PostgreSQL to the first acknowledged write): {}",
        median_max(host_kill_times)
    );
    println!("acknowledged inserts: {}, lost: {}", acked.len(), lost.len());
}
