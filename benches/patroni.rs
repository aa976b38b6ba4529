//! The same faults as `benches/hosts.rs`, on Patroni with its defaults (ttl 30 s, loop_wait
//! 10 s, retry_timeout 10 s; synchronous mode) behind HAProxy with Patroni's documented check,
//! in network namespaces (`PatroniHosts`: etcd ×3, three database hosts, HAProxy).
//!
//!   scripts/setup.sh --bench --etcd   # Debian's patroni and HAProxy
//!   cargo bench --bench patroni -- [postmaster_kills=20] [host_kills=5]
//!
//! A writer inserts through HAProxy and records every acknowledged insert. Postmaster kill:
//! kill -9 of the primary's postmaster, time to the first insert acknowledged once writes
//! resume (Patroni restarts it in place, or fails over), then wait until all three members run
//! with a synchronous standby. Host kill: kill -9 of every process of the primary's host
//! (Patroni and PostgreSQL), time to the first acknowledged insert, then start Patroni there
//! again (it rejoins, with pg_rewind) and wait as before. At the end, count acknowledged
//! inserts missing.

use std::time::{Duration, Instant};

use pgwarden_e2e::{kill_postmaster, lost_writes, median_max, psql, PatroniHosts, Writer};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (postmaster_kills, host_kills) =
        (args.first().copied().unwrap_or(20), args.get(1).copied().unwrap_or(5));
    let mut hosts = PatroniHosts::start().await;
    hosts.wait_steady(Duration::from_secs(180)).await;
    let url = hosts.url();
    let setup = psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(5432, 20, Duration::from_secs(30)).await, "no writes");

    let mut restart_times = Vec::new();
    for run in 0..postmaster_kills {
        let primary = hosts.primary(Duration::from_secs(60)).await;
        let killed = Instant::now();
        kill_postmaster(&hosts.data_dir(primary));
        let ack = writer.resumed_after(killed, Duration::from_secs(120)).await;
        let ack = ack.unwrap_or_else(|| panic!("writes did not resume:\n{}", hosts.tails()));
        let after = hosts.primary(Duration::from_secs(60)).await;
        eprintln!("postmaster kill {run}: {:?} (primary {primary} -> {after})", ack.at - killed);
        restart_times.push(ack.at - killed);
        hosts.wait_steady(Duration::from_secs(180)).await;
    }

    let mut failover_times = Vec::new();
    for run in 0..host_kills {
        let primary = hosts.primary(Duration::from_secs(60)).await;
        let killed = Instant::now();
        hosts.kill_host(primary);
        let ack = writer.resumed_after(killed, Duration::from_secs(180)).await;
        let ack = ack.unwrap_or_else(|| panic!("writes did not resume:\n{}", hosts.tails()));
        let after = hosts.primary(Duration::from_secs(60)).await;
        assert_ne!(after, primary, "run {run}: a dead host cannot stay primary");
        eprintln!("host kill {run}: {:?} (primary {primary} -> {after})", ack.at - killed);
        failover_times.push(ack.at - killed);
        hosts.start_patroni(primary);
        hosts.wait_steady(Duration::from_secs(180)).await;
    }

    let acked = writer.stop().await;
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    let lost = lost_writes(&acked, &out.stdout);
    println!(
        "Patroni, kill -9 of the primary's postmaster to the first acknowledged write: {}",
        median_max(restart_times)
    );
    println!(
        "Patroni, kill -9 of the primary's host (Patroni and PostgreSQL) to the first acknowledged write: {}",
        median_max(failover_times)
    );
    println!("acknowledged inserts: {}, lost: {}", acked.len(), lost.len());
}
