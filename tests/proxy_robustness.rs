//! Hostile and broken clients: malformed startup packets as raw bytes, clients that stop
//! half-way or never speak. Each is answered or closed while everyone else is served. Then real
//! load: pgbench in every query mode.

use std::time::{Duration, Instant};

use pgwarden_e2e::{let_time_pass, pg_bin, ClientOutput, PgNode, TestProxy, TEST_PASSWORD};
use pgwarden_proxy::config::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

async fn assert_serving(proxy: &TestProxy) {
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let (client, connection) =
        tokio_postgres::connect(&conninfo, NoTls).await.expect("proxy still serves");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("query");
}

/// Sends `bytes` and half-closes, then reads until the proxy closes; returns what it answered.
/// (A client that sends a partial packet and then waits is the handshake-timeout test's case.)
async fn exchange(proxy: &TestProxy, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The proxy may close before reading everything; that is a valid answer too.
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "proxy neither answered nor closed for {:?}",
        &bytes[..bytes.len().min(16)]
    );
    answer
}

/// The SQLSTATE of an `ErrorResponse` answer: fields are a type byte then a C string.
fn sqlstate(answer: &[u8]) -> Option<String> {
    if answer.first() != Some(&b'E') || answer.len() < 5 {
        return None;
    }
    let mut fields = &answer[5..];
    while let Some((&kind, rest)) = fields.split_first() {
        let end = rest.iter().position(|&b| b == 0)?;
        if kind == b'C' {
            return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
        fields = &rest[end + 1..];
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_get_08p01_and_others_keep_working() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    // Someone holds an established session throughout.
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let (bystander, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    tokio::spawn(connection);

    for (what, packet) in [
        ("length below 8", 4i32.to_be_bytes().to_vec()),
        ("negative length", (-1i32).to_be_bytes().to_vec()),
        ("length above 10000", [10_001i32.to_be_bytes(), 196_608u32.to_be_bytes()].concat()),
        ("huge length", [i32::MAX.to_be_bytes(), 196_608u32.to_be_bytes()].concat()),
    ] {
        let answer = exchange(&proxy, &packet).await;
        assert_eq!(sqlstate(&answer).as_deref(), Some("08P01"), "{what}: {answer:?}");
    }
    let mut bad_params = 196_608u32.to_be_bytes().to_vec();
    bad_params.extend_from_slice(b"user\0app\0database");
    let packet = [((bad_params.len() + 4) as i32).to_be_bytes().to_vec(), bad_params].concat();
    assert_eq!(sqlstate(&exchange(&proxy, &packet).await).as_deref(), Some("08P01"));
    let wrong_version = [8i32.to_be_bytes(), 0x0002_0000u32.to_be_bytes()].concat();
    let answer = exchange(&proxy, &wrong_version).await;
    assert_eq!(sqlstate(&answer).as_deref(), Some("08P01"));
    assert!(String::from_utf8_lossy(&answer).contains("unsupported frontend protocol 2.0"));

    // Random garbage of every shape: answered or closed, never a hang or a crash.
    for seed in 0..50u32 {
        let len = 1 + (seed as usize * 97) % 3000;
        let garbage: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        let _ = exchange(&proxy, &garbage).await;
    }
    // Cut off mid-packet: a length of 100 then 10 bytes, then close.
    for _ in 0..5 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&100i32.to_be_bytes()).await.unwrap();
        s.write_all(&[1; 10]).await.unwrap();
        drop(s);
    }
    assert_serving(&proxy).await;
    bystander.simple_query("SELECT 1").await.expect("established session untouched");
    let malformed = proxy
        .metric("pgwarden_proxy_connections_rejected_total{reason=\"malformed_startup\"}")
        .await;
    assert!(malformed >= 6.0, "{malformed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_cut_off_without_holding_back_others() {
    let node = PgNode::start();
    let limits = Limits { handshake_timeout_secs: 1.0, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    // A slow sender: half a startup packet, then nothing.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
    // An SSL request answered, then silence (no TLS handshake).
    let mut stuck_ssl = TcpStream::connect(proxy.addr).await.unwrap();
    stuck_ssl.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    let mut answer = [0u8; 1];
    stuck_ssl.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N", "this proxy has no certificate");

    // Meanwhile others connect and query at once.
    assert_serving(&proxy).await;
    // Served while the stuck ones still hold their connections (their timeout is 1 s).
    let mut probe = [0u8; 1];
    for stream in [&silent, &slow, &stuck_ssl] {
        let open = matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(open || started.elapsed() >= Duration::from_secs(1), "closed before its timeout");
    }

    for stream in [&mut silent, &mut slow, &mut stuck_ssl] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "connection not closed");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    assert_eq!(
        proxy
            .metric("pgwarden_proxy_connections_rejected_total{reason=\"handshake_timeout\"}")
            .await,
        3.0
    );
    assert_serving(&proxy).await;
}

fn pgbench(args: &[&str], conninfo_port: u16) -> ClientOutput {
    let mut cmd = std::process::Command::new(pg_bin("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &conninfo_port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", TEST_PASSWORD);
    ClientOutput::from_command(&mut cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_in_every_query_mode() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let port = proxy.port();
    let init =
        tokio::task::spawn_blocking(move || pgbench(&["-i", "-s", "1", "-q"], port)).await.unwrap();
    assert!(init.success, "pgbench -i: {}", init.stderr);
    for mode in ["simple", "extended", "prepared"] {
        let out = tokio::task::spawn_blocking(move || {
            pgbench(&["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "300"], port)
        })
        .await
        .unwrap();
        assert!(out.success, "-M {mode}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("number of transactions actually processed: 1200/1200"),
            "-M {mode}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains("number of failed transactions: 0"),
            "-M {mode}: {}",
            out.stdout
        );
    }
    // Reconnect per transaction and the write workload too.
    let out = tokio::task::spawn_blocking(move || pgbench(&["-C", "-c", "4", "-t", "50"], port))
        .await
        .unwrap();
    assert!(
        out.success && out.stdout.contains("number of failed transactions: 0"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_gets_n_then_ssl_request_gets_s() {
    let certs = pgwarden_e2e::TestCerts::new();
    let proxy = TestProxy::start(Limits::default(), Some(certs.files())).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let gssenc = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    s.write_all(&gssenc).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'N');
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    s.write_all(&ssl).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'S');
    // A second GSSENCRequest, now inside TLS, is a protocol violation answered over TLS.
    let tls = pgwarden_e2e::tls_connect(s, &certs.ca_path(), "localhost").await;
    let mut tls = tls.expect("TLS handshake after S");
    tls.write_all(&gssenc).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    assert_eq!(sqlstate(&answer).as_deref(), Some("08P01"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_password_message_gets_08p01_not_a_silent_close() {
    let node = PgNode::start();
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    let mut s = send_startup(&proxy).await;
    // The node asks for SCRAM (AuthenticationSASL).
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], b'R');
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.unwrap();
    // A password message claiming 10 MB.
    s.write_all(&[b'p', 0, 0x98, 0x96, 0x80]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert_eq!(sqlstate(&answer).as_deref(), Some("08P01"), "{answer:?}");
    assert_serving(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_slower_than_the_handshake_timeout_still_serves_its_client() {
    let node = PgNode::start();
    let limits = Limits { handshake_timeout_secs: 1.0, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    assert_serving(&proxy).await;
    // The node takes longer than the client's handshake timeout to answer the session's start:
    // that is the node's time, not the client's.
    node.signal("-STOP");
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let connecting = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.map(drop)
    });
    // Time must pass: the node stays frozen well past the 1 s handshake timeout.
    let_time_pass(Duration::from_millis(2500)).await;
    node.signal("-CONT");
    let served = tokio::time::timeout(Duration::from_secs(20), connecting).await;
    served.expect("client answered").unwrap().expect("the client's session started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_gets_the_client_57p03_not_a_silent_close() {
    let node = PgNode::start();
    let limits =
        Limits { handshake_timeout_secs: 1.0, backend_auth_timeout_secs: 2.0, ..Limits::default() };
    let proxy = TestProxy::start(limits, None).await;
    proxy.route(1, &[("app", &node.address(), false)]).await;
    node.signal("-STOP");
    let conninfo = proxy.conninfo("app", "app", &format!("password={TEST_PASSWORD}"));
    let answer =
        tokio::time::timeout(Duration::from_secs(20), tokio_postgres::connect(&conninfo, NoTls))
            .await
            .expect("the proxy answered");
    node.signal("-CONT");
    let err = answer.err().expect("no session on a frozen node");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "an ErrorResponse, not a close: {err:?}"
    );
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("did not answer in time"), "{message}");
    assert_eq!(
        proxy.metric("pgwarden_proxy_connections_rejected_total{reason=\"node_timeout\"}").await,
        1.0
    );
}

/// Connects and sends a startup packet for user and database `app`.
async fn send_startup(proxy: &TestProxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let params = b"user\0app\0database\0app\0\0";
    let mut startup = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(params);
    s.write_all(&startup).await.unwrap();
    s
}

/// A proxy that authenticates `app` itself.
async fn proxy_authenticating(node: &PgNode) -> TestProxy {
    let proxy = TestProxy::start(Limits::default(), None).await;
    proxy.route_authenticating(1, "app", node).await;
    proxy
}

/// Sends a startup packet for `app` and reads the proxy's AuthenticationSASL.
async fn start_scram(proxy: &TestProxy) -> TcpStream {
    let mut s = send_startup(proxy).await;
    let mut header = [0u8; 9];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!((header[0], &header[5..9]), (b'R', &10i32.to_be_bytes()[..]), "AuthenticationSASL");
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 8];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(body, b"SCRAM-SHA-256\0\0");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_messages_past_their_limit_or_malformed_get_08p01_from_the_proxy_alone() {
    let node = PgNode::start();
    let proxy = proxy_authenticating(&node).await;
    // PostgreSQL's bound on an authentication message (PG_MAX_AUTH_TOKEN_LENGTH, 65535): one
    // byte over is refused before it is read.
    let over = [&[b'p'][..], &65_536i32.to_be_bytes()].concat();
    // At the bound, a well-framed message that is not SCRAM; and a message that is not SASL.
    let mut at_bound = vec![b'p'];
    at_bound.extend_from_slice(&65_535i32.to_be_bytes());
    at_bound.extend_from_slice(b"SCRAM-SHA-256\0");
    let rest = 65_535 - 4 - 14 - 4;
    at_bound.extend_from_slice(&(rest as i32).to_be_bytes());
    at_bound.extend(std::iter::repeat_n(b'x', rest));
    let query = [&[b'Q'][..], &9i32.to_be_bytes(), b"SELECT\0"].concat();
    for message in [over, at_bound, query] {
        let mut s = start_scram(&proxy).await;
        let _ = s.write_all(&message).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        assert_eq!(sqlstate(&answer).as_deref(), Some("08P01"), "{:?}", &message[..5]);
    }
    assert_eq!(
        proxy.metric("pgwarden_proxy_backend_connect_seconds_count").await,
        0.0,
        "a client that never authenticated reached the node"
    );
    // And a real client still logs in.
    assert_serving(&proxy).await;
}
