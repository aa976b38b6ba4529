//! The control plane provisioning real PostgreSQL nodes behind a real proxy: create, connect
//! with the returned DATABASE_URL, destroy; and the API's answers to bad input.

use pgwarden_e2e::{psql, TestControl};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_database_is_reachable_through_its_database_url_and_destroyed() {
    let control = TestControl::start().await;
    let db = control.create_database("my-app", "postgresql-sandbox").await;
    let id = db["id"].as_str().unwrap().to_owned();
    let name = db["name"].as_str().unwrap().to_owned();
    assert!(id.starts_with("my-app-") && id.len() == "my-app-3030".len(), "{id}");
    assert_eq!(name, id.replace('-', "_"));
    assert_eq!(db["status"], "running");
    assert_eq!(db["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(db["nodes"][0]["role"], "primary");
    assert_eq!(db["nodes"][0]["status"], "running");
    assert!(db["nodes"][0]["version"].as_str().unwrap().starts_with("15."), "{db}");

    let url = db["database_url"].as_str().unwrap().to_owned();
    let expected_prefix = format!("postgres://{name}:");
    assert!(
        url.starts_with(&expected_prefix)
            && url.ends_with(&format!("@127.0.0.1:{}/{name}", control.proxy.port())),
        "{url}"
    );
    let env = control.request("GET", &format!("/v1/databases/{id}/env"), None).await.json();
    assert_eq!(env["DATABASE_URL"], url.as_str());
    assert_eq!(env["PGWARDEN_POSTGRESQL_URL"], url.as_str());

    control.wait_routed(&name, true).await;
    let out = psql(&url, None, "CREATE TABLE t(x int); INSERT INTO t VALUES (42); SELECT x FROM t");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "42");
    let out = psql(&format!("{url}?sslmode=require"), None, "SELECT current_user, current_setting('max_connections'), current_setting('shared_buffers')");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("{name}|30|64MB"));
    // Data checksums on, SCRAM verifiers stored.
    let out = psql(&url, None, "SHOW data_checksums");
    assert_eq!(out.stdout.trim(), "on");

    let events = control.request("GET", &format!("/v1/databases/{id}/events"), None).await.json();
    assert!(events.as_array().unwrap().iter().any(|e| e["kind"] == "provisioned"), "{events}");

    let r = control.request("DELETE", &format!("/v1/databases/{id}"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    control.wait_routed(&name, false).await;
    assert_eq!(control.request("GET", &format!("/v1/databases/{id}"), None).await.status, 404);
    let nodes = std::fs::read_dir(control.dir.path().join("data/nodes")).unwrap().count();
    assert_eq!(nodes, 0, "node directories removed");
    let out = psql(&url, None, "SELECT 1");
    assert!(!out.success && out.stderr.contains("does not exist"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors() {
    let control = TestControl::start().await;
    let r = control.request_as(None, "GET", "/v1/databases", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert_eq!(
        control.request_as(None, "GET", "/health", None).await.json(),
        json!({"status": "ok"})
    );
    let r = control.request_as(Some("wrong".into()), "GET", "/v1/plans", None).await;
    assert_eq!(r.status, 401);

    let plans = control.request("GET", "/v1/plans", None).await.json();
    assert_eq!(plans.as_array().unwrap().len(), 7);

    let r = control
        .request("POST", "/v1/databases", Some(json!({"name": "app", "plan": "postgresql-gold"})))
        .await;
    assert_eq!(r.status, 422);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("postgresql-gold") && message.contains("postgresql-business-1024"),
        "{message}"
    );
    for name in ["A", "-app", "app-", "my_app", "a", "app--x"] {
        let r = control
            .request(
                "POST",
                "/v1/databases",
                Some(json!({"name": name, "plan": "postgresql-sandbox"})),
            )
            .await;
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_name");
    }
    let r = control.request("POST", "/v1/databases", Some(json!({"nam": "x"}))).await;
    assert_eq!(r.status, 400);
    assert_eq!(control.request("GET", "/v1/databases/nope-1234", None).await.status, 404);
    assert_eq!(control.request("GET", "/v1/operations/op-999", None).await.status, 404);

    control.create_database("dup", "postgresql-sandbox").await;
    let metrics = control.request("GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("pgwarden_operations_total{kind=\"provision\",result=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pgwarden_routing_epoch"), "{metrics}");
    assert_eq!(control.request_as(None, "GET", "/metrics", None).await.status, 401);
    let r = control
        .request(
            "POST",
            "/v1/databases",
            Some(json!({"name": "dup", "plan": "postgresql-sandbox"})),
        )
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "duplicate_name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_to_start_fails_the_operation_with_its_log_line() {
    let bad = vec![("shared_preload_libraries".to_owned(), "'no_such_extension'".to_owned())];
    let control = TestControl::start_with(bad).await;
    let r = control
        .request(
            "POST",
            "/v1/databases",
            Some(json!({"name": "broken", "plan": "postgresql-sandbox"})),
        )
        .await;
    assert_eq!(r.status, 202);
    let id = r.json()["database"]["id"].as_str().unwrap().to_owned();
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "failed");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("no_such_extension"), "the node's own log line: {error}");
    assert_eq!(op["error_code"], "node_not_started", "a stable code beside the sentence: {op}");
    let db = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(db["status"], "failed");
    // Nothing else is disturbed: the API answers, the failed database can be destroyed.
    let r = control.request("DELETE", &format!("/v1/databases/{id}"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
}
