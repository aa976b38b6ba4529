//! Floods of connections that never authenticate: one address cannot hold more than its share
//! of starting connections, many addresses cannot fill the proxy (the oldest starting one gives
//! way), and failed logins from one address are answered ever later. Meanwhile a well-behaved
//! client connects and queries. (How fast it still is: `benches/flood.rs`.)

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pgwarden_e2e::{PgNode, TestProxy, TEST_PASSWORD};
use pgwarden_proxy::config::Limits;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

async fn proxy_for(node: &PgNode, limits: Limits) -> TestProxy {
    let proxy = TestProxy::start(limits, None).await;
    proxy.route_authenticating(1, "app", node).await;
    proxy
}

/// A connection from `source` (a loopback address) that sends nothing.
async fn idle_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(source), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the proxy closed `s` (after an error message or not) within a second.
async fn closed(s: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut answer = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut answer)).await;
    (done.is_ok(), answer)
}

async fn query_as(proxy: &TestProxy, password: &str) -> Result<(), tokio_postgres::Error> {
    let conninfo = proxy.conninfo("app", "app", &format!("password={password}"));
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_starting_connections_do_not_starve_a_well_behaved_client() {
    let node = PgNode::start();
    let limits = Limits { max_starting: 40, max_starting_per_source: 10, ..Limits::default() };
    let proxy = proxy_for(&node, limits).await;

    // One address: its 11th starting connection is refused at once, with 53300.
    let mut mine = Vec::new();
    for _ in 0..10 {
        mine.push(idle_from([127, 0, 0, 2], proxy.addr).await);
    }
    let mut eleventh = idle_from([127, 0, 0, 2], proxy.addr).await;
    let (was_closed, answer) = closed(&mut eleventh).await;
    assert!(was_closed, "the 11th connection from one address was kept");
    assert!(answer.windows(5).any(|w| w == b"53300"), "{answer:?}");
    assert!(query_as(&proxy, TEST_PASSWORD).await.is_ok(), "another address was refused");

    // Many addresses, 50 connections: the oldest starting ones (the first address's) give way.
    let mut many = Vec::new();
    for i in 0..50u8 {
        many.push(idle_from([127, 0, 1, i % 10], proxy.addr).await);
    }
    let mut evicted = 0;
    for s in &mut mine {
        evicted += usize::from(closed(s).await.0);
    }
    assert_eq!(evicted, 10, "the oldest starting connections were not ended");
    let metric = "pgwarden_proxy_connections_rejected_total{reason=\"evicted_while_starting\"}";
    assert!(proxy.metric(metric).await >= 10.0);
    // The newest client gets its place, logs in and queries.
    assert!(query_as(&proxy, TEST_PASSWORD).await.is_ok(), "a well-behaved client was starved");
    drop(many);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_are_answered_ever_later() {
    let node = PgNode::start();
    let proxy = proxy_for(&node, Limits::default()).await;
    let mut waits = Vec::new();
    for _ in 0..4 {
        let started = Instant::now();
        let err = query_as(&proxy, "wrong").await.expect_err("wrong password accepted");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));
        waits.push(started.elapsed());
    }
    // 0, then 100, 200, 300 ms (less decay) of penalty before the 28P01.
    assert!(waits[3] >= Duration::from_millis(250), "{waits:?}");
    assert!(waits[3] > waits[0], "{waits:?}");
    // The right password still works at once: only failures are slowed.
    assert!(query_as(&proxy, TEST_PASSWORD).await.is_ok());
}
