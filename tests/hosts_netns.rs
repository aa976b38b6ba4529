//! The platform on hosts in network namespaces (three etcd members, three database hosts with
//! agents, two control planes, two proxies holding a virtual IP in turn), with a writer
//! through the virtual IP recording every acknowledged insert. Faults, one after another:
//! kill -9 of the primary's postmaster; of the leading control plane together with the new
//! primary's postmaster; of an etcd member, then of the primary again; of the active proxy's
//! host; the primary's host cut off (its interface down); the new primary's host partitioned
//! (every packet on its interface dropped); the leading control plane frozen, then resumed. After each, writes resume on the new primary, nothing acknowledged is lost,
//! and no write is acknowledged by a former primary once the new one took one. The times are
//! printed (the benchmark in benches/ repeats them).

use std::time::{Duration, Instant};

use pgwarden_e2e::{
    kill_postmaster, lost_writes, postmaster_pid, psql, wait_until, Ack, TestHosts, Writer,
};
use serde_json::Value;

fn node(db: &Value, role: &str) -> (String, i32) {
    let nodes = db["nodes"].as_array().unwrap();
    let node = nodes.iter().find(|n| n["role"] == role).unwrap();
    (node["name"].as_str().unwrap().to_owned(), node["port"].as_i64().unwrap() as i32)
}

fn synchronous(db: &Value) -> bool {
    let all_running = db["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "running");
    db["replication"] == "synchronous" && all_running
}

/// Waits for 10 writes acknowledged by the node on `port`; the first one's time.
async fn first_ack_on(writer: &Writer, port: i32, what: &str) -> Instant {
    assert!(writer.wait_acks_from(port, 10, Duration::from_secs(90)).await, "{what}: no writes");
    writer.acked().iter().find(|a| a.port == port).unwrap().at
}

/// `writer.resumed_after(since)`, or a panic with the logs.
async fn resumed_after(hosts: &TestHosts, writer: &Writer, since: Instant, what: &str) -> Ack {
    match writer.resumed_after(since, Duration::from_secs(90)).await {
        Some(ack) => ack,
        None => {
            let all = ["cp1", "cp2", "px1", "px2", "db1", "db2", "db3"];
            panic!("{what}: no writes resumed\n{}", hosts.tails(&all));
        }
    }
}

/// The first write the node on `port` acknowledged after `since` (waited for at most 90 s).
async fn first_ack_after(hosts: &TestHosts, writer: &Writer, port: i32, since: Instant) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(ack) = writer.acked().iter().find(|a| a.at > since && a.port == port) {
            return ack.at;
        }
        if Instant::now() > deadline {
            let all = ["cp1", "cp2", "px1", "px2", "db1", "db2", "db3"];
            panic!("no write on the node of port {port}\n{}", hosts.tails(&all));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Once the node on `new_port` took a write after `since`, no other node acknowledged one
/// (until `until`, the next fault).
fn no_split_brain(acks: &[Ack], since: Instant, until: Option<Instant>, new_port: i32) {
    let first = acks.iter().position(|a| a.at > since && a.port == new_port).unwrap();
    let window = acks[first..].iter().take_while(|a| until.is_none_or(|u| a.at < u));
    let stray: Vec<&Ack> = window.filter(|a| a.port != new_port).collect();
    assert!(stray.is_empty(), "acknowledged by a former primary after the new one: {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_lose_a_primary_the_leader_an_etcd_member_and_the_active_proxy() {
    let mut hosts = TestHosts::start().await;
    let db = hosts.create_database("hosts", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let url = db["database_url"].as_str().unwrap().to_owned();
    assert!(url.contains(&hosts.vip().to_string()), "{url}");
    let setup = psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let writer = Writer::start(url.clone());
    let (mut primary, mut standby) = (node(&db, "primary"), node(&db, "replica"));
    first_ack_on(&writer, primary.1, "at start").await;
    let mut phases = Vec::new();

    // 1. kill -9 of the primary's postmaster.
    let killed = Instant::now();
    kill_postmaster(&hosts.node_data_dir(&primary.0));
    let ack = resumed_after(&hosts, &writer, killed, "after the primary died").await;
    assert_eq!(ack.port, standby.1, "writes resumed on the standby");
    eprintln!("primary killed: first write on the new primary after {:?}", ack.at - killed);
    phases.push((killed, standby.1));
    let db = hosts.wait_database(&id, |db| synchronous(db) && node(db, "primary") == standby).await;
    (primary, standby) = (node(&db, "primary"), node(&db, "replica"));

    // 2. kill -9 of the leading control plane and of the primary's postmaster at once: the
    // other control plane takes over, then fails the database over (or, finding the primary
    // stopped when it adopts the nodes, starts it again: crash recovery, nothing lost).
    let leader = hosts.wait_leader(Duration::from_secs(5)).await;
    let killed = Instant::now();
    hosts.kill(leader);
    kill_postmaster(&hosts.node_data_dir(&primary.0));
    let other = hosts.wait_leader(Duration::from_secs(30)).await;
    assert_ne!(other, leader);
    eprintln!("leader killed: {other} leads after {:?}", killed.elapsed());
    let ack = resumed_after(&hosts, &writer, killed, "after the leader and the primary died").await;
    let how = if ack.port == standby.1 { "failed over" } else { "restarted in place" };
    eprintln!("leader and primary killed: {how}, first write after {:?}", ack.at - killed);
    phases.push((killed, ack.port));
    let now_primary = |db: &Value| node(db, "primary").1 == ack.port;
    let db = hosts.wait_database(&id, |db| synchronous(db) && now_primary(db)).await;
    (primary, standby) = (node(&db, "primary"), node(&db, "replica"));

    // 3. kill -9 of an etcd member: the platform goes on, and fails over again.
    hosts.kill("e1");
    let killed = Instant::now();
    kill_postmaster(&hosts.node_data_dir(&primary.0));
    let ack = resumed_after(&hosts, &writer, killed, "with an etcd member down").await;
    assert_eq!(ack.port, standby.1, "writes resumed on the standby");
    eprintln!(
        "with an etcd member down: first write on the new primary after {:?}",
        ack.at - killed
    );
    phases.push((killed, standby.1));
    let db = hosts.wait_database(&id, |db| synchronous(db) && node(db, "primary") == standby).await;
    let primary = node(&db, "primary");

    // 4. The active proxy's host dies: the other proxy takes the virtual IP.
    let active = hosts.wait_active_proxy(Duration::from_secs(5)).await;
    let died = Instant::now();
    hosts.kill(active);
    hosts.lan.cut(active);
    let ack = resumed_after(&hosts, &writer, died, "after the active proxy's host died").await;
    eprintln!("active proxy's host died: writes resumed after {:?}", ack.at - died);
    assert_ne!(hosts.wait_active_proxy(Duration::from_secs(5)).await, active);

    let acked = writer.stop().await;
    for (i, (since, port)) in phases.iter().enumerate() {
        no_split_brain(&acked, *since, phases.get(i + 1).map(|p| p.0), *port);
    }
    assert!(acked.iter().rev().take(10).all(|a| a.port == primary.1));
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_primary_host_and_a_frozen_leader_lose_nothing() {
    let hosts = TestHosts::start().await;
    let db = hosts.create_database("cutoff", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let url = db["database_url"].as_str().unwrap().to_owned();
    let setup = psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let writer = Writer::start(url.clone());
    let (primary, standby) = (node(&db, "primary"), node(&db, "replica"));
    first_ack_on(&writer, primary.1, "at start").await;

    // The primary's host is cut off from everything: its agent kills the primary before the
    // control plane promotes the standby on another host.
    let nodes = db["nodes"].as_array().unwrap();
    let host_of = |name: &str| {
        let node = nodes.iter().find(|n| n["name"] == name).unwrap();
        let addr = node["host"].as_str().unwrap().to_owned();
        ["db1", "db2", "db3"].into_iter().find(|h| hosts.lan.addr(h).to_string() == addr).unwrap()
    };
    let cut_host = host_of(&primary.0);
    // Another database's primary, on another host: the cut-off host's fencing is not its
    // business (each host has its own disk and processes).
    let other = hosts.create_database("bystander", "postgresql-business-512").await;
    let bystander = node(&other, "primary").0;
    let bystander_host = other["nodes"].as_array().unwrap().iter().find(|n| n["name"] == bystander);
    let bystander_addr = bystander_host.unwrap()["host"].as_str().unwrap().to_owned();
    assert_ne!(hosts.lan.addr(cut_host).to_string(), bystander_addr, "placement: {other}");
    let bystander_data = hosts.node_data_dir(&bystander);
    let bystander_pid = postmaster_pid(&bystander_data).expect("the bystander primary runs");
    let cut = Instant::now();
    hosts.lan.cut(cut_host);
    let ack = resumed_after(&hosts, &writer, cut, "after the primary's host was cut off").await;
    assert_eq!(ack.port, standby.1, "writes resumed on the standby");
    eprintln!("primary's host cut off: first write on the new primary after {:?}", ack.at - cut);
    let log = hosts.log_of(cut_host);
    let fenced = log.lines().find(|l| l.contains("killed this host's primaries"));
    let fenced = fenced.unwrap_or_else(|| panic!("the cut-off host fenced nothing:\n{log}"));
    assert!(fenced.contains(&format!("{}.", primary.0)), "{fenced}");
    assert!(!fenced.contains(&format!("{bystander}.")), "{fenced}");
    assert_eq!(postmaster_pid(&bystander_data), Some(bystander_pid), "the bystander primary");
    hosts.lan.heal(cut_host);
    hosts.wait_database(&id, |db| node(db, "primary") == standby).await;

    // The new primary's host partitioned: its packets dropped, its interface up. Only
    // timeouts tell; its agent still kills the primary before the old one, rejoined as the
    // standby meanwhile, is promoted.
    hosts.wait_database(&id, |db| synchronous(db) && node(db, "replica") == primary).await;
    let partitioned_host = host_of(&standby.0);
    let kills_before =
        hosts.log_of(partitioned_host).matches("killed this host's primaries").count();
    let dropped = Instant::now();
    hosts.lan.drop_packets(partitioned_host);
    // Acknowledgements in flight as the rules went in may still come from the old primary:
    // the measure is the first write the new one took.
    let taken = first_ack_after(&hosts, &writer, primary.1, dropped).await;
    eprintln!(
        "primary's packets dropped: first write on the new primary after {:?}",
        taken - dropped
    );
    let log = hosts.log_of(partitioned_host);
    assert!(log.matches("killed this host's primaries").count() > kills_before, "{log}");
    hosts.lan.pass_packets(partitioned_host);
    hosts.wait_database(&id, |db| node(db, "primary") == primary).await;

    // The leading control plane frozen past its lease: the other leads; resumed, the frozen
    // one stops instead of acting. Writes go on throughout.
    let leader = hosts.wait_leader(Duration::from_secs(5)).await;
    let frozen = Instant::now();
    hosts.signal(leader, rustix::process::Signal::STOP);
    let deadline = Instant::now() + Duration::from_secs(30);
    let other = loop {
        let now = hosts.wait_leader(Duration::from_secs(30)).await;
        if now != leader {
            break now;
        }
        assert!(Instant::now() < deadline, "the frozen leader still leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("leader frozen: {other} leads after {:?}", frozen.elapsed());
    hosts.signal(leader, rustix::process::Signal::CONT);
    // Its lease ran out while it was frozen: it reports so at once (no load balancer sends it
    // anything), acts on no node, and stops.
    let health = hosts.health(leader).await;
    assert!(health != Some(200), "the resumed leader reports healthy");
    wait_until("the resumed leader standing down", Duration::from_secs(15), async || {
        let log = hosts.log_of(leader);
        if log.contains("lost the leadership") {
            Ok(())
        } else {
            Err(log.lines().rev().take(5).collect::<Vec<_>>().join("\n"))
        }
    })
    .await;
    writer.wait_more(10).await;

    // Commits become synchronous again, also when the freeze cut a rejoin short between its
    // pg_rewind and the node's start (the next leader then copies the node afresh).
    hosts
        .wait_database(&id, |db| {
            synchronous(db) && node(db, "primary") == primary && node(db, "replica") == standby
        })
        .await;

    let acked = writer.stop().await;
    no_split_brain(&acked, cut, Some(dropped), standby.1);
    no_split_brain(&acked, dropped, None, primary.1);
    let out = psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
