//! Control planes on etcd (a real three-member cluster on loopback addresses): one leads,
//! the others stand by and answer 503 naming it; the state lives in etcd; killing the leader
//! (kill -9) lets a standby take over, which then still fails a database over; a leader frozen
//! past its lease is replaced and stops when it resumes; a control plane that no longer leads
//! can write nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_control::coord::{Etcd, Leadership};
use pgwarden_control::state::etcd::EtcdKv;
use pgwarden_control::state::{Store, StoreError};
use pgwarden_e2e::{let_time_pass, lost_writes, wait_until, TestEtcd, TestPlanes, Writer};
use rustix::process::Signal;
use tokio_util::sync::CancellationToken;

const ETCD: [&str; 3] = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];

fn record(id: &str) -> pgwarden_control::state::DatabaseRecord {
    serde_json::from_value(serde_json::json!({
        "id": id, "name": id, "plan": "postgresql-sandbox", "status": "running",
        "force_tls": false, "password": "secret-of-{id}", "replication_password": "r",
        "nodes": [], "users": [], "created_at": "2026-01-01T00:00:00Z",
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_in_etcd_is_written_by_the_leader_only() {
    let cluster = TestEtcd::start(&ETCD[..1]).await;
    let endpoints: Vec<String> = cluster.endpoints().split(',').map(str::to_owned).collect();
    let etcd = Etcd::connect(&endpoints, "store-test").await.unwrap();
    let never = CancellationToken::new();
    let ttl = Duration::from_secs(2);
    let first =
        Leadership::campaign(&etcd, "leader", "first:1", ttl, "the lead", &never).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sealer = || pgwarden_control::secrets::Sealer::open(&dir.path().join("key")).unwrap();
    let kv = EtcdKv::new(etcd.clone(), Arc::clone(&first));
    let store = Store::over(Box::new(kv), sealer()).await.unwrap();
    for id in ["a-1", "a-10", "b-2"] {
        store.put_database(&record(id)).await.unwrap();
    }
    let event = |m: &str| pgwarden_api::control::Event {
        at: "t".into(),
        kind: "k".into(),
        message: m.into(),
    };
    for (id, message) in [("a-1", "m1"), ("a-10", "other"), ("a-1", "m2")] {
        store.add_event(id, &event(message)).await.unwrap();
    }
    let ids: Vec<String> = store.databases().await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["a-1", "a-10", "b-2"]);
    let messages: Vec<String> =
        store.events("a-1").await.unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(messages, ["m1", "m2"], "events in order, of a-1 only");
    assert_eq!(store.database("b-2").await.unwrap().unwrap().password, "secret-of-{id}");
    store.delete_database("a-1").await.unwrap();
    assert!(store.database("a-1").await.unwrap().is_none());
    assert!(store.events("a-1").await.unwrap().is_empty());
    assert_eq!(store.events("a-10").await.unwrap().len(), 1, "a-10's events stay");
    assert_eq!(store.next_counter("seq").await.unwrap(), 1);
    assert_eq!(store.next_counter("seq").await.unwrap(), 2);
    let epochs = [store.next_epoch(b"t1").await.unwrap(), store.next_epoch(b"t2").await.unwrap()];
    assert!(epochs[1] > epochs[0], "{epochs:?}");
    // The table is in etcd for the proxies, its epoch the revision that wrote it.
    let mut client = etcd.client();
    let routing = client.get(etcd.key("routing"), None).await.unwrap();
    assert_eq!(routing.kvs()[0].value(), b"t2");
    assert_eq!(routing.kvs()[0].mod_revision() as u64, epochs[1]);

    // Passwords are sealed in etcd too.
    let raw = client.get(etcd.key("state/databases/b-2"), None).await.unwrap();
    let raw = String::from_utf8_lossy(raw.kvs()[0].value()).into_owned();
    assert!(!raw.contains("secret-of"), "a password in clear text in etcd: {raw}");

    // A second control plane stands by while the first leads...
    let campaign = {
        let etcd = etcd.clone();
        tokio::spawn(async move {
            let never = CancellationToken::new();
            let ttl = Duration::from_secs(2);
            Leadership::campaign(&etcd, "leader", "second:2", ttl, "the lead", &never).await
        })
    };
    // Time must pass: longer than the second's lease, while the first keeps leading.
    let_time_pass(Duration::from_secs(3)).await;
    assert!(!campaign.is_finished(), "two leaders at once");
    assert_eq!(etcd.leader().await.unwrap().as_deref(), Some("first:1"));
    // ...and leads once the first gives up; the first can write nothing any more.
    first.resign().await;
    let second = tokio::time::timeout(Duration::from_secs(5), campaign).await.unwrap().unwrap();
    let second = second.unwrap();
    assert_eq!(etcd.leader().await.unwrap().as_deref(), Some("second:2"));
    let refused = store.put_database(&record("c-3")).await.unwrap_err();
    assert!(matches!(refused, StoreError::NotLeader(_)), "{refused}");
    let stale =
        Store::over(Box::new(EtcdKv::new(etcd.clone(), Arc::clone(&first))), sealer()).await;
    let stale_epoch = match stale {
        Err(_) => true,
        Ok(stale) => stale.next_epoch(b"t").await.is_err(),
    };
    assert!(stale_epoch, "a stale epoch");
    let store = Store::over(Box::new(EtcdKv::new(etcd.clone(), second)), sealer()).await.unwrap();
    assert!(store.next_epoch(b"t3").await.unwrap() > epochs[1]);
    assert!(store.database("c-3").await.unwrap().is_none(), "the refused write left nothing");
    assert_eq!(store.databases().await.unwrap().len(), 2);
}

/// Polls `check` every 50 ms until it answers something, at most `limit`.
async fn within<T>(limit: Duration, check: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(answer) = check() {
            return Some(answer);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When the stats samples of `id` that plane `plane` answers with were taken.
async fn sampled(planes: &TestPlanes, plane: usize, id: &str) -> Vec<i64> {
    let path = format!("/v1/databases/{id}/stats/history?step=1");
    let r = planes.request(plane, "GET", &path, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let history = r.json();
    history["at"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_leader_and_then_fails_a_database_over() {
    let mut planes = TestPlanes::start(&ETCD, &["127.0.0.2", "127.0.0.3"], 2).await;
    // The standby answers every call with 503, naming the leader.
    let leader_addr = planes.planes[0].addr.to_string();
    let refused = planes.request(1, "GET", "/v1/databases", None).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "standby", "{}", refused.body);
    assert!(refused.body.contains(&leader_addr), "{}", refused.body);
    let health = planes.health(1).await.unwrap();
    assert_eq!((health.status, health.json()["status"].clone()), (503, "standby".into()));

    let db = planes.create_database(0, "led", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let url = db["database_url"].as_str().unwrap().to_owned();
    let setup = pgwarden_e2e::psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let writer = Writer::start(url.clone());
    let port = |db: &serde_json::Value, role: &str| -> i32 {
        let nodes = db["nodes"].as_array().unwrap();
        nodes.iter().find(|n| n["role"] == role).unwrap()["port"].as_i64().unwrap() as i32
    };
    let first_port = port(&db, "primary");
    assert!(writer.wait_acks_from(first_port, 20, Duration::from_secs(30)).await);

    // A backup under the first leader, into the storage both planes mount; its WAL receiver.
    let r = planes.request(0, "POST", &format!("/v1/databases/{id}/backups"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let backup = r.json()["backup"]["id"].as_str().unwrap().to_owned();
    wait_until("the backup done", Duration::from_secs(60), async || {
        let list = planes.request(0, "GET", &format!("/v1/databases/{id}/backups"), None).await;
        let mine = list.json().as_array().unwrap().iter().find(|b| b["id"] == backup).cloned();
        if mine.as_ref().is_some_and(|b| b["status"] == "succeeded") {
            Ok(())
        } else {
            Err(list.body)
        }
    })
    .await;
    // Stats samples under the first leader (one a second here).
    let before = wait_until("three stats samples", Duration::from_secs(30), async || {
        let at = sampled(&planes, 0, &id).await;
        if at.len() >= 3 {
            Ok(at)
        } else {
            Err(format!("{at:?}"))
        }
    })
    .await;
    let receivers = within(Duration::from_secs(30), || {
        let pids = planes.children_running(0, "pg_receivewal");
        (!pids.is_empty()).then_some(pids)
    })
    .await
    .expect("the leader streams the WAL archive");

    // kill -9 of the leader: the standby leads within a few seconds, with the same state.
    let killed = Instant::now();
    planes.kill(0);
    let leader = planes.wait_leader(Duration::from_secs(20)).await;
    let takeover = killed.elapsed();
    assert_eq!(leader, 1);
    eprintln!("control-plane takeover after kill -9 of the leader: {takeover:?}");
    let seen = planes.request(1, "GET", &format!("/v1/databases/{id}"), None).await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    let placed = |db: &serde_json::Value| -> Vec<(String, String, i64)> {
        let nodes = db["nodes"].as_array().unwrap().iter();
        let placed = nodes
            .map(|n| (n["name"].to_string(), n["host"].to_string(), n["port"].as_i64().unwrap()));
        placed.collect()
    };
    assert_eq!(placed(&seen.json()), placed(&db), "the same nodes, from etcd: {}", seen.body);
    // The killed leader's WAL receiver died with it: left running, it would hold the slot and
    // write into the archive the new leader writes to.
    let gone = within(Duration::from_secs(5), || {
        let live: Vec<u32> = pgwarden_e2e::live_processes().map(|(pid, _, _)| pid).collect();
        receivers.iter().all(|pid| !live.contains(pid)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "pg_receivewal {receivers:?} outlived its control plane");
    // The new leader serves the backup the first one took.
    let path = format!("/v1/databases/{id}/backups/{backup}/download");
    let download = planes.request(1, "GET", &path, None).await;
    assert_eq!(download.status, 200, "{}", download.body);
    assert!(download.body.starts_with("PGDMP"), "not a pg_dump archive");
    // It goes on with the history the first one kept, on the same storage.
    let after = sampled(&planes, 1, &id).await;
    assert!(before.iter().all(|t| after.contains(t)), "{before:?} not in {after:?}");

    // The new leader watches the nodes: kill -9 of the primary's postmaster fails over.
    let what = "synchronous replication under the new leader";
    let db = wait_until(what, Duration::from_secs(30), async || {
        let db = planes.request(1, "GET", &format!("/v1/databases/{id}"), None).await.json();
        if db["replication"] == "synchronous" {
            Ok(db)
        } else {
            Err(db.to_string())
        }
    })
    .await;
    let primary = db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == "primary");
    let primary_name = primary.unwrap()["name"].as_str().unwrap().to_owned();
    let standby_port = port(&db, "replica");
    let crashed = Instant::now();
    pgwarden_e2e::kill_postmaster(&planes.node_data_dir(&primary_name));
    let resumed = writer.wait_acks_from(standby_port, 20, Duration::from_secs(60)).await;
    assert!(resumed, "no writes on the promoted standby:\n{}", planes.log(1));
    let first_ack = writer.acked().iter().find(|a| a.port == standby_port).map(|a| a.at);
    let failover = first_ack.unwrap().duration_since(crashed);
    eprintln!("failover under the new leader (kill -9 to first acknowledged write): {failover:?}");
    let acked = writer.stop().await;
    let first_new = acked.iter().position(|a| a.port == standby_port).unwrap();
    assert!(
        acked[first_new..].iter().all(|a| a.port == standby_port),
        "a write acknowledged by the old primary after the new one took one"
    );
    let out = pgwarden_e2e::psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

async fn wait_synchronous(planes: &TestPlanes, plane: usize, id: &str) -> serde_json::Value {
    wait_until("synchronous replication", Duration::from_secs(60), async || {
        let db = planes.request(plane, "GET", &format!("/v1/databases/{id}"), None).await.json();
        if db["replication"] == "synchronous" {
            Ok(db)
        } else {
            Err(db.to_string())
        }
    })
    .await
}

fn node<'a>(db: &'a serde_json::Value, role: &str) -> &'a serde_json::Value {
    db["nodes"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_host_cut_off_stops_writing_before_a_standby_elsewhere_is_promoted() {
    let planes = TestPlanes::start(&ETCD, &["127.0.0.2", "127.0.0.3"], 1).await;
    let db = planes.create_database(0, "cut", "postgresql-business-512").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let url = db["database_url"].as_str().unwrap().to_owned();
    let db = wait_synchronous(&planes, 0, &id).await;
    let setup = pgwarden_e2e::psql(&url, None, "CREATE TABLE w(n int8 PRIMARY KEY)");
    assert!(setup.success, "{}", setup.stderr);
    let (primary, standby) = (node(&db, "primary"), node(&db, "replica"));
    let old_host = primary["host"].as_str().unwrap().to_owned();
    let old_port = primary["port"].as_i64().unwrap() as i32;
    let new_port = standby["port"].as_i64().unwrap() as i32;
    let old_data = planes.node_data_dir(primary["name"].as_str().unwrap());
    let writer = Writer::start(url.clone());
    assert!(writer.wait_acks_from(old_port, 20, Duration::from_secs(30)).await);

    // The primary's host loses the control plane and etcd (its agent can neither be reached
    // nor renew its lease); the proxy still reaches its node.
    let cut = Instant::now();
    planes.cut_host(&old_host);
    let resumed = writer.wait_acks_from(new_port, 20, Duration::from_secs(60)).await;
    assert!(
        resumed,
        "no writes on the standby:
{}
{}",
        planes.logs(),
        planes.agent_log(&old_host)
    );
    let acked = writer.stop().await;
    let first_new = acked.iter().position(|a| a.port == new_port).unwrap();
    eprintln!(
        "cut-off primary host: first write on the promoted standby {:?} after the cut",
        acked[first_new].at.duration_since(cut)
    );

    // The agent killed its primary when its lease was about to end, before the promotion.
    let log = planes.agent_log(&old_host);
    assert!(log.contains("killed this host's primaries"), "{log}");
    assert!(
        pgwarden_e2e::postmaster_pid(&old_data)
            .is_none_or(|pid| { !std::path::Path::new(&format!("/proc/{pid}")).exists() }),
        "the old primary still runs"
    );
    assert!(
        acked[first_new..].iter().all(|a| a.port == new_port),
        "a write acknowledged by the old primary after the new one took one"
    );
    let out = pgwarden_e2e::psql(&url, None, "SELECT string_agg(n::text, ',') FROM w");
    assert!(out.success, "{}", out.stderr);
    let lost = lost_writes(&acked, &out.stdout);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    planes.heal_host(&old_host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_is_replaced_and_stops_when_it_resumes() {
    let mut planes = TestPlanes::start(&ETCD, &[], 2).await;
    let frozen = Instant::now();
    planes.signal(0, Signal::STOP);
    let leader = planes.wait_leader(Duration::from_secs(20)).await;
    assert_eq!(leader, 1, "the standby leads");
    eprintln!("takeover from a frozen leader: {:?}", frozen.elapsed());
    let db = planes.create_database(1, "after", "postgresql-sandbox").await;
    assert_eq!(db["status"], "running", "{db}");
    // Resumed, the former leader finds its lease over and stops instead of acting.
    planes.signal(0, Signal::CONT);
    let resumed = Instant::now();
    let status = planes.wait_exit(0, Duration::from_secs(15)).await;
    eprintln!("the resumed former leader stopped after {:?}", resumed.elapsed());
    let status = status.unwrap_or_else(|| panic!("still running:\n{}", planes.log(0)));
    assert!(!status.success(), "{status:?}");
    assert!(planes.log(0).contains("lost the leadership"), "{}", planes.log(0));
    let listed = planes.request(1, "GET", "/v1/databases", None).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json().as_array().map(Vec::len), Some(1), "{}", listed.body);
}
