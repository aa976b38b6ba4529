//! The control plane under conditions a careful operator worries about: a proxy that accepts
//! and never answers, unknown paths and wrong methods, concurrent creates, and a data dir whose
//! path holds a space and a quote. Real nodes, real proxy.

use std::time::Duration;

use pgwarden_e2e::{psql, wait_until, TestControl};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_answers_does_not_stall_publication_to_the_other() {
    // Accepts connections and never answers them.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackhole_addr = blackhole.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in blackhole.incoming().take(64) {
            open.push(stream);
        }
    });
    let control = TestControl::start_full(Vec::new(), vec![blackhole_addr], "data", None).await;
    let (_, id, url) = control.create_routed_database("reach", "postgresql-sandbox").await;
    assert!(psql(&url, None, "SELECT 1").success);
    // Each change still reaches the answering proxy.
    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": true})))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until("the TLS change at the proxy", Duration::from_secs(10), async || {
        let routes = control
            .proxy
            .admin_request("GET", "/v1/routes", Some(&control.proxy.token), None)
            .await;
        if routes.json()["databases"][&id.replace('-', "_")]["force_tls"] == true {
            Ok(())
        } else {
            Err(routes.body)
        }
    })
    .await;
    // Pushes to the silent one give up (bounded) and are counted as failed, then retried.
    wait_until("a push to the silent proxy timed out", Duration::from_secs(15), async || {
        let metrics = control.request("GET", "/metrics", None).await.body;
        if metrics.contains("pgwarden_route_pushes_total{result=\"failed\"}") {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_wrong_methods_405_with_the_json_error() {
    let control = TestControl::start().await;
    for (method, path, status) in [
        ("GET", "/v1/nope", 404),
        ("GET", "/nope", 404),
        ("PATCH", "/v1/plans", 405),
        ("DELETE", "/v1/databases", 405),
        ("PUT", "/v1/databases/x-1/users", 405),
    ] {
        let r = control.request(method, path, None).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        let error = &r.json()["error"];
        assert!(error["code"].is_string() && error["message"].is_string(), "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_name_give_one_202_and_one_409_and_never_share_a_port() {
    let control = TestControl::start().await;
    let create = |name: &'static str| {
        let (addr, token) = (control.addr, control.token.clone());
        std::thread::spawn(move || {
            let body = json!({"name": name, "plan": "postgresql-sandbox"}).to_string();
            pgwarden_e2e::http_request(addr, "POST", "/v1/databases", Some(&token), Some(&body))
                .unwrap()
        })
    };
    let (a, b, c) = (create("twin"), create("twin"), create("other"));
    let (a, b, c) = (a.join().unwrap(), b.join().unwrap(), c.join().unwrap());
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [202, 409], "{} / {}", a.body, b.body);
    let conflict = if a.status == 409 { &a } else { &b };
    assert_eq!(conflict.json()["error"]["code"], "duplicate_name");
    assert_eq!(c.status, 202, "{}", c.body);
    let winner = if a.status == 202 { &a } else { &b };
    let mut ports = Vec::new();
    for answer in [winner, &c] {
        let op = answer.json()["operation"]["id"].as_str().unwrap().to_owned();
        assert_eq!(control.wait_operation(&op).await["status"], "succeeded");
        let id = answer.json()["database"]["id"].as_str().unwrap().to_owned();
        let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
        ports.push(db["nodes"][0]["port"].as_u64().unwrap());
    }
    assert_ne!(ports[0], ports[1], "two concurrent provisions got the same port");
}
