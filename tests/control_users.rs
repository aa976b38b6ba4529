//! Users (SPEC §5) and force-TLS through the control API, checked with real clients.

use pgwarden_e2e::{psql, wait_psql, wait_until, TestControl};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_read_write_users_get_exactly_their_privileges() {
    let control = TestControl::start().await;
    let db = control.create_database("crm", "postgresql-sandbox").await;
    let (id, name) =
        (db["id"].as_str().unwrap().to_owned(), db["name"].as_str().unwrap().to_owned());
    let owner_url = db["database_url"].as_str().unwrap().to_owned();
    control.wait_routed(&name, true).await;

    let users_path = format!("/v1/databases/{id}/users");
    let users = |body| control.request("POST", &users_path, Some(body));
    let r = users(json!({"name": "reader", "read_only": true})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let reader = r.json();
    assert!(reader["password"].as_str().unwrap().len() >= 24);
    let reader_url = reader["database_url"].as_str().unwrap().to_owned();
    let r = users(json!({"name": "writer"})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let writer_url = r.json()["database_url"].as_str().unwrap().to_owned();
    assert_eq!(users(json!({"name": "writer"})).await.status, 409);
    assert_eq!(users(json!({"name": "Bad-Name"})).await.status, 400);

    // Tables the owner creates after the users exist.
    let out = psql(
        &owner_url,
        None,
        "CREATE TABLE invoices(id serial, total int); INSERT INTO invoices(total) VALUES (10)",
    );
    assert!(out.success, "{}", out.stderr);

    let out = psql(&reader_url, None, "SELECT total FROM invoices");
    assert!(out.success, "reader reads: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "10");
    let out = psql(&reader_url, None, "INSERT INTO invoices(total) VALUES (1)");
    assert!(
        !out.success && out.stderr.contains("permission denied"),
        "reader cannot write: {}",
        out.stderr
    );
    let out = psql(&reader_url, None, "CREATE TABLE mine(x int)");
    assert!(!out.success && out.stderr.contains("permission denied"), "{}", out.stderr);

    let out = psql(&writer_url, None, "INSERT INTO invoices(total) VALUES (20); UPDATE invoices SET total = total + 1; SELECT sum(total) FROM invoices");
    assert!(out.success, "writer writes, sequence included: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "32");
    let out = psql(&writer_url, None, "CREATE TABLE writer_table(x int)");
    assert!(out.success, "writer can create: {}", out.stderr);

    let list = control.request("GET", &format!("/v1/databases/{id}/users"), None).await.json();
    let listed: Vec<(String, bool, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_owned(),
                u["read_only"].as_bool().unwrap(),
                u["default"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (name.clone(), false, true),
            ("reader".into(), true, false),
            ("writer".into(), false, false)
        ]
    );

    // Reset: the old password stops working, the new one works.
    let r = control
        .request("POST", &format!("/v1/databases/{id}/users/reader/reset-password"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let new_url = r.json()["database_url"].as_str().unwrap().to_owned();
    assert!(!psql(&reader_url, None, "SELECT 1").success);
    assert!(psql(&new_url, None, "SELECT 1").success);

    // The default user cannot be deleted; others can, and then cannot connect.
    let r = control.request("DELETE", &format!("/v1/databases/{id}/users/{name}"), None).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "default_user");
    assert_eq!(
        control.request("DELETE", &format!("/v1/databases/{id}/users/writer"), None).await.status,
        204
    );
    assert!(!psql(&writer_url, None, "SELECT 1").success);
    let out =
        psql(&owner_url, None, "SELECT tableowner FROM pg_tables WHERE tablename = 'writer_table'");
    assert_eq!(out.stdout.trim(), name, "objects of a deleted user go to the owner");
    assert_eq!(
        control.request("DELETE", &format!("/v1/databases/{id}/users/nobody"), None).await.status,
        404
    );

    // No password in the node's log.
    let nodes = control.dir.path().join("data/nodes");
    let node_dir = std::fs::read_dir(nodes).unwrap().flatten().next().unwrap().path();
    let log = std::fs::read_to_string(node_dir.join("postgres.log")).unwrap();
    let password = reader["password"].as_str().unwrap();
    assert!(!log.contains(password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_tls_refuses_plaintext_and_accepts_tls() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("secure", "postgresql-sandbox").await;
    let epoch_before = control.request("GET", &format!("/v1/databases/{id}"), None).await.json()
        ["epoch"]
        .as_u64()
        .unwrap();

    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": true})))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tls"]["force"], true);
    assert!(r.json()["epoch"].as_u64().unwrap() > epoch_before);
    wait_until("plaintext refused", std::time::Duration::from_secs(10), async || {
        let out = psql(&format!("{url}?sslmode=disable"), None, "SELECT 1");
        if out.success {
            return Err("plaintext still accepted".to_owned());
        }
        assert!(
            out.stderr.contains("TLS is required") && out.stderr.contains("sslmode=require"),
            "{}",
            out.stderr
        );
        Ok(())
    })
    .await;
    let verify =
        format!("{url}?sslmode=verify-full&sslrootcert={}", control.certs.ca_path().display());
    let out = psql(&verify.replace("127.0.0.1", "localhost"), None, "SELECT 1");
    assert!(out.success, "{}", out.stderr);

    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": false})))
        .await;
    assert_eq!(r.status, 200);
    let plaintext = format!("{url}?sslmode=disable");
    let what = "plaintext accepted again";
    wait_psql(what, std::time::Duration::from_secs(10), &plaintext, "SELECT 1").await;
    let r = control
        .request("PUT", &format!("/v1/databases/{id}/tls"), Some(json!({"force": "yes"})))
        .await;
    assert_eq!(r.status, 400);
}

/// What the proxies allow a database comes from its plan and can be set through the API: a
/// client beyond it is refused with 53300, and `null` gives the plan's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_s_proxy_limits_come_from_its_plan_and_can_be_set() {
    let control = TestControl::start().await;
    let (_, id, url) = control.create_routed_database("tenant", "postgresql-sandbox").await;
    let path = format!("/v1/databases/{id}");
    let limits = control.request("GET", &path, None).await.json()["limits"].clone();
    assert_eq!(limits, json!({"client_connections": 300, "connections_per_second": 60}));

    let limits_path = format!("{path}/limits");
    let r = control.request("PUT", &limits_path, Some(json!({"client_connections": 1}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["limits"], json!({"client_connections": 1, "connections_per_second": 60}));
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok::<_, tokio_postgres::Error>(client)
    };
    let first = connect().await.expect("the first client");
    wait_until("a second client refused", std::time::Duration::from_secs(10), async || {
        match connect().await {
            Ok(_) => Err("a second client was let in".to_owned()),
            Err(e) => {
                assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS));
                let message = e.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
                assert!(message.contains("at most 1 client at once"), "{message}");
                Ok(())
            }
        }
    })
    .await;
    first.simple_query("SELECT 1").await.expect("the first client goes on");
    let events = control.request("GET", &format!("{path}/events"), None).await.json();
    assert!(events.as_array().unwrap().iter().any(|e| e["kind"] == "limits_changed"), "{events}");
    // The proxy got that change alone, not the whole table again.
    let metrics = control.request("GET", "/metrics", None).await.body;
    let deltas = metrics.lines().find_map(|l| l.strip_prefix("pgwarden_route_deltas_total "));
    assert!(deltas.and_then(|d| d.parse::<f64>().ok()).is_some_and(|d| d >= 1.0), "{metrics}");

    for bad in [json!({"client_connections": 0}), json!({"connections_per_second": 2_000_000})] {
        let r = control.request("PUT", &limits_path, Some(bad)).await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_limit")));
    }
    assert_eq!(control.request("PUT", &limits_path, Some(json!({"clients": 5}))).await.status, 400);

    let r = control.request("PUT", &limits_path, Some(json!({"client_connections": null}))).await;
    assert_eq!(r.json()["limits"]["client_connections"], 300);
    wait_until("a second client let in again", std::time::Duration::from_secs(10), async || {
        connect().await.map(drop).map_err(|e| e.to_string())
    })
    .await;
}

/// A role left on the node by a create whose grants never finished (the node stopped
/// answering) is taken over by the next create of that name: new password, grants, recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_left_on_the_node_by_an_unfinished_create_is_taken_over() {
    let control = TestControl::start().await;
    let db = control.create_database("half", "postgresql-sandbox").await;
    let id = db["id"].as_str().unwrap().to_owned();
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    let node = db["nodes"][0]["name"].as_str().unwrap();
    let socket = control.node_data_dir(node).parent().unwrap().display().to_string();
    let superuser =
        format!("host='{socket}' port={} user=postgres dbname=postgres", db["nodes"][0]["port"]);
    let out = psql(&superuser, None, "CREATE ROLE stranded LOGIN PASSWORD 'old-password-123'");
    assert!(out.success, "{}", out.stderr);

    let r = control
        .request("POST", &format!("/v1/databases/{id}/users"), Some(json!({"name": "stranded"})))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let url = r.json()["database_url"].as_str().unwrap().to_owned();
    let out = psql(&url, None, "CREATE TABLE mine(x int); SELECT current_user");
    assert!(out.success, "the new password works and the grants are there: {}", out.stderr);
    let users = control.request("GET", &format!("/v1/databases/{id}/users"), None).await.json();
    assert!(users.as_array().unwrap().iter().any(|u| u["name"] == "stranded"), "{users}");
}
