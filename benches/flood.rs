//! A well-behaved client's connect-and-query latency through pgwarden-proxy, quiet and then
//! during floods of connections that never authenticate:
//!
//!   cargo build --release -p pgwarden-proxy && cargo bench --bench flood -- [seconds=20]
//!
//! The proxy runs as its own process (the release binary), so its memory and CPU are its own;
//! it authenticates clients itself (SCRAM from the node's verifier), as the control plane
//! configures it. The floods, all on loopback, each bounded by the run's duration:
//! - 10 000 connections that never send a byte, from 100 addresses (127.0.1.x);
//! - 1 000 connections sending a startup packet one byte per second, from 10 addresses
//!   (127.0.2.x);
//! - a storm of failed SCRAM logins (well-formed exchange, wrong proof) from 127.0.0.4, 64 at a
//!   time, as fast as the proxy answers.
//!
//! The well-behaved client (127.0.0.1) opens a connection, runs `SELECT 1` and closes, N times
//! in a row; the table gives its latency quiet and under the floods, the proxy's resident
//! memory, and what happened to the floods.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_e2e::{free_port, workspace_bin, PgNode, TEST_PASSWORD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SAMPLES: usize = 300;

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

async fn connect_and_query(conninfo: &str) -> Duration {
    let started = Instant::now();
    let (client, connection) =
        tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.expect("well-behaved login");
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    let _ = connection.await;
    started.elapsed()
}

async fn latencies(conninfo: &str) -> Vec<Duration> {
    let mut all = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        all.push(connect_and_query(conninfo).await);
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

async fn from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    socket.connect(to).await
}

fn startup_packet() -> Vec<u8> {
    let params = b"user\0app\0database\0app\0\0";
    let mut packet = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608u32.to_be_bytes());
    packet.extend_from_slice(params);
    packet
}

/// One failed SCRAM login, message by message; true if the proxy answered with an error.
async fn failed_login(to: SocketAddr) -> std::io::Result<bool> {
    let mut s = from([127, 0, 0, 4], to).await?;
    s.write_all(&startup_packet()).await?;
    let mut buf = vec![0u8; 1024];
    let _ = s.read(&mut buf).await?; // AuthenticationSASL
    let first = b"n,,n=,r=stormstormstorm";
    let mut m = vec![b'p'];
    m.extend_from_slice(&((4 + 14 + 4 + first.len()) as i32).to_be_bytes());
    m.extend_from_slice(b"SCRAM-SHA-256\0");
    m.extend_from_slice(&(first.len() as i32).to_be_bytes());
    m.extend_from_slice(first);
    s.write_all(&m).await?;
    let n = s.read(&mut buf).await?; // AuthenticationSASLContinue: r=...,s=...,i=...
    let text = String::from_utf8_lossy(&buf[9..n.max(9)]).into_owned();
    let nonce = text.split(',').next().unwrap_or("r=").trim_start_matches("r=").to_owned();
    let last = format!("c=biws,r={nonce},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let mut m = vec![b'p'];
    m.extend_from_slice(&((4 + last.len()) as i32).to_be_bytes());
    m.extend_from_slice(last.as_bytes());
    s.write_all(&m).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    Ok(answer.first() == Some(&b'E'))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let flood_for = Duration::from_secs(seconds);
    // 11 000 flood sockets here, as many in the proxy.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, raised)
        .expect("raise the limit on open files");

    let node = PgNode::start();
    let verifier = node.superuser_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let routes = serde_json::json!({"epoch": 1, "databases": {"app": {
        "primary": node.address(), "users": {"app": verifier.stdout.trim()}}}});
    std::fs::write(dir.path().join("routes.json"), routes.to_string()).unwrap();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         admin_token = \"bench\"\nroutes_file = \"{}\"\n",
        dir.path().join("routes.json").display()
    );
    std::fs::write(dir.path().join("proxy.toml"), config).unwrap();
    let binary = workspace_bin("pgwarden-proxy");
    let mut proxy = std::process::Command::new(&binary)
        .args(["--config", &dir.path().join("proxy.toml").display().to_string()])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("pgwarden-proxy (cargo build --release -p pgwarden-proxy)");
    let pid = proxy.id();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if TcpStream::connect(to).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conninfo =
        format!("host=127.0.0.1 port={port} user=app dbname=app password={TEST_PASSWORD}");

    let quiet = latencies(&conninfo).await;
    let rss_quiet = proc_field(pid, "status", "VmRSS:");

    let stop = Instant::now() + flood_for;
    // 10 000 silent connections from 100 addresses; refused or ended ones are counted.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..10_000u32 {
            if let Ok(s) = from([127, 0, 1, (i % 100) as u8], to).await {
                held.push(s);
            }
        }
        let opened = held.len();
        tokio::time::sleep_until(stop.into()).await;
        let mut ended = 0;
        for s in &mut held {
            let mut b = [0u8; 1];
            if matches!(s.try_read(&mut b), Ok(0) | Ok(1..)) {
                ended += 1;
            }
        }
        (opened, ended)
    });
    // 1 000 connections sending their startup packet one byte a second.
    let trickled = Arc::new(AtomicU64::new(0));
    let mut slow = Vec::new();
    for i in 0..1_000u32 {
        let trickled = trickled.clone();
        slow.push(tokio::spawn(async move {
            let Ok(mut s) = from([127, 0, 2, (i % 10) as u8], to).await else { return };
            for byte in startup_packet() {
                if Instant::now() > stop || s.write_all(&[byte]).await.is_err() {
                    return;
                }
                trickled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    // Failed SCRAM logins from one address, 64 at a time.
    let (attempts, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut storm = Vec::new();
    for _ in 0..64 {
        let (attempts, refused) = (attempts.clone(), refused.clone());
        storm.push(tokio::spawn(async move {
            while Instant::now() < stop {
                attempts.fetch_add(1, Ordering::Relaxed);
                if let Ok(true) = failed_login(to).await {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_seconds(pid);
    let measured_from = Instant::now();
    let flooded = latencies(&conninfo).await;
    let cpu = (cpu_seconds(pid) - cpu_before) / measured_from.elapsed().as_secs_f64();
    let rss_flood = proc_field(pid, "status", "VmRSS:");
    let (opened, ended) = silent.await.unwrap();
    for task in slow.into_iter().chain(storm) {
        task.abort();
    }
    let rss_peak = proc_field(pid, "status", "VmHWM:");
    let _ = proxy.kill();
    let _ = proxy.wait();

    println!("| | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---:|---:|---:|---:|");
    for (what, v) in [("quiet", &quiet), ("under the floods", &flooded)] {
        println!(
            "| connect + SELECT 1 + close, {what} ({SAMPLES} in a row) | {:.2} | {:.2} | {:.2} | {:.2} |",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    println!(
        "\nratio under floods / quiet: p50 {:.2}x, p90 {:.2}x",
        pct(&flooded, 0.5) / pct(&quiet, 0.5),
        pct(&flooded, 0.9) / pct(&quiet, 0.9)
    );
    println!(
        "proxy RSS: {rss_quiet} KiB quiet, {rss_flood} KiB under the floods, peak {rss_peak} KiB; \
         proxy CPU while measured under the floods: {:.0} % of one core",
        cpu * 100.0
    );
    println!(
        "silent flood: {opened} of 10000 connected, {ended} ended by the proxy before {seconds} s; \
         slow flood: {} bytes trickled; failed-login storm: {} attempts in {seconds} s ({:.0}/s), \
         {} answered with an error",
        trickled.load(Ordering::Relaxed),
        attempts.load(Ordering::Relaxed),
        attempts.load(Ordering::Relaxed) as f64 / seconds as f64,
        refused.load(Ordering::Relaxed)
    );
}
