//! The web dashboard in a real headless Chromium (SPEC §10): a wrong token is refused with a
//! sentence, the right one shows the databases, a database's page shows its status, plan,
//! nodes, the URL with its password hidden until asked, and charts drawn from the stats history
//! with data points. Every response carries the security headers, and the API takes its token
//! from a header only (a cookie or a form from another origin changes nothing).

use std::time::Duration;

use pgwarden_e2e::{http_request, psql, Browser, TestControl};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_in_with_the_token_and_shows_a_database_with_its_charts() {
    let control = TestControl::start_sampling(Duration::from_secs(1)).await;
    let (db, id, _) = control.create_routed_database("shop", "postgresql-sandbox").await;
    let Some(browser) = tokio::task::block_in_place(Browser::start) else { return };
    let base = format!("http://{}", control.addr);
    let token = control.token.clone();
    let password_url = db["database_url"].as_str().unwrap().to_owned();
    let name = db["name"].as_str().unwrap().to_owned();

    tokio::task::block_in_place(|| {
        // The bare address leads to the dashboard, which asks for the token.
        browser.goto(&format!("{base}/"));
        let field = browser.wait_for("#token");
        browser.type_into(&field, "not-the-token");
        browser.click(&browser.wait_for("#login button[type=submit]"));
        let refused = browser.wait_until("the refusal", || {
            let text = browser.text_at("#login-error")?;
            (!text.is_empty()).then_some(text)
        });
        assert!(refused.contains("token was refused"), "{refused}");
        assert!(browser.find("#databases").is_none(), "nothing shown on a wrong token");

        let field = browser.wait_for("#token");
        browser.clear(&field);
        browser.type_into(&field, &token);
        browser.click(&browser.wait_for("#login button[type=submit]"));
        assert_eq!(browser.wait_text("#databases a"), name);
        // The token is in this tab's session storage, never in the address.
        let url = browser.script("return location.href", json!([]));
        assert!(!url.as_str().unwrap().contains(&token), "{url}");
        let stored = browser.script("return sessionStorage.getItem('pgwarden-token')", json!([]));
        assert_eq!(stored, Value::String(token.clone()));

        // The list is re-rendered as it refreshes: the link is found again to be clicked.
        browser.click(&browser.wait_for("#databases a"));
        assert_eq!(browser.wait_text("#database-name"), name);
        assert_eq!(browser.wait_text("#database-status"), "running");
        assert_eq!(browser.wait_text("#database-plan"), "postgresql-sandbox");
        let nodes = browser.wait_text("#nodes");
        assert!(nodes.contains("primary") && nodes.contains(&format!("{id}-")), "{nodes}");

        // The password shows only when asked.
        let password = password_url.split(':').nth(2).unwrap().split('@').next().unwrap();
        let shown = browser.wait_text("#database-url");
        assert!(!shown.contains(password), "{shown}");
        browser.click(&browser.wait_for("#reveal-url"));
        assert_eq!(browser.wait_text("#database-url"), password_url);

        // Charts with data points: the page refreshes every 10 s; samples come every second.
        let points = browser.wait_until("charts with 3 points", || {
            let n = browser.script(
                "return charts.length && charts[0].data[0].length >= 3 ? charts[0].data[0].length : 0",
                json!([]),
            );
            n.as_u64().filter(|n| *n >= 3)
        });
        let canvases =
            browser.script("return document.querySelectorAll('#charts canvas').length", json!([]));
        assert!(canvases.as_u64().unwrap() >= 4, "{canvases}");
        // The memory chart draws the limit beside the figure.
        let memory = browser.script(
            "const c = charts.find(c => c.root.parentElement.dataset.chart.endsWith('memory (MiB)')); \
             return c ? c.series.map(s => s.label) : null",
            json!([]),
        );
        assert!(memory.to_string().contains("limit"), "{memory}");
        println!("charts drawn with {points} points");
        let figures = browser.wait_text("#figures");
        assert!(figures.contains("sessions") && figures.contains("on disk"), "{figures}");

        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard/database.png");
        browser.screenshot(&shot);
        assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
        println!("screenshot: {}", shot.display());
    });
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_security_headers_and_the_token_comes_from_a_header_only() {
    let control = TestControl::start().await;
    tokio::task::block_in_place(|| headers_and_forgery(&control));
}

fn headers_and_forgery(control: &TestControl) {
    for (path, token) in [
        ("/dashboard/", None),
        ("/dashboard/app.js", None),
        ("/v1/databases", Some(control.token.as_str())),
        ("/v1/databases", None),
    ] {
        let r = http_request(control.addr, "GET", path, token, None).unwrap();
        let csp =
            r.header("content-security-policy").unwrap_or_else(|| panic!("{path}: {}", r.head));
        for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{path}");
    }
    // The API's OpenAPI document is served (generated from the routes: control::api::doc).
    let doc = http_request(control.addr, "GET", "/v1/openapi.json", None, None).unwrap();
    assert_eq!(doc.status, 200, "{}", doc.body);
    let doc = doc.json();
    assert!(doc["paths"]["/v1/databases/{id}/stats/history"]["get"].is_object(), "{doc}");
    assert!(doc["components"]["schemas"]["Database"].is_object(), "{doc}");
    // The page has no inline script for a CSP to allow: its scripts are files of this origin.
    let page = http_request(control.addr, "GET", "/dashboard/", None, None).unwrap().body;
    assert!(
        !page.contains("<script>") && page.contains("<script src=\"/dashboard/app.js\""),
        "{page}"
    );
    // A request forged from another origin carries cookies, never the token: refused.
    let forged = format!(
        "POST /v1/databases HTTP/1.1\r\nHost: {0}\r\nOrigin: http://evil.example\r\n\
         Cookie: token={1}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 9\r\nConnection: close\r\n\r\nname=evil",
        control.addr, control.token
    );
    let answer = raw(control.addr, &forged);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let list =
        http_request(control.addr, "GET", "/v1/databases", Some(&control.token), None).unwrap();
    assert_eq!(list.json(), json!([]), "nothing was created");
}

fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// Logs in with `token` and opens database `id`'s page.
fn open_database(browser: &Browser, base: &str, token: &str, id: &str) {
    browser.goto(&format!("{base}/dashboard/"));
    browser.type_into(&browser.wait_for("#token"), token);
    browser.click(&browser.wait_for("#login button[type=submit]"));
    browser.wait_for("#databases a");
    browser.goto(&format!("{base}/dashboard/#/db/{id}"));
    browser.wait_for("#database-name");
}

fn text_of(browser: &Browser, css: &str) -> String {
    browser.text_at(css).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_manages_users_tls_and_backups_through_the_api() {
    let control = TestControl::start().await;
    let (db, id, url) = control.create_routed_database("ops", "postgresql-starter-512").await;
    let Some(browser) = tokio::task::block_in_place(Browser::start) else { return };
    let base = format!("http://{}", control.addr);
    let token = control.token.clone();
    let name = db["name"].as_str().unwrap().to_owned();

    tokio::task::block_in_place(|| {
        open_database(&browser, &base, &token, &id);

        // A read-only user: its URL is shown once, it is listed, and it can read.
        browser.type_into(&browser.wait_for("#user-name"), "auditor");
        browser.click(&browser.wait_for("#user-read-only"));
        browser.click(&browser.wait_for("#create-user"));
        let shown = browser.wait_until("the new user's URL", || {
            let t = text_of(&browser, "#new-password");
            t.contains("auditor").then_some(t)
        });
        let auditor_url = shown.split_whitespace().last().unwrap().to_owned();
        assert!(auditor_url.starts_with("postgres://auditor:"), "{shown}");
        browser.wait_until("auditor listed read-only", || {
            let users = text_of(&browser, "#users");
            (users.contains("auditor") && users.contains("read-only")).then_some(())
        });
        let read = psql(&auditor_url, None, "SELECT current_user");
        assert_eq!(read.stdout.trim(), "auditor", "{}", read.stderr);
        let write = psql(&auditor_url, None, "CREATE TABLE t(x int)");
        assert!(!write.success, "a read-only user cannot write");

        // A name with markup is refused by the API, and the refusal is shown as text.
        browser.type_into(&browser.wait_for("#user-name"), "<img src=x id=injected>");
        browser.click(&browser.wait_for("#create-user"));
        let refusal = browser.wait_until("the refusal", || {
            let t = text_of(&browser, "#users-status");
            (!t.is_empty()).then_some(t)
        });
        assert!(refusal.contains("<img"), "{refusal}");
        assert!(browser.find("#injected").is_none(), "markup from the API was never parsed");

        // Force TLS: a plaintext client is then refused by the proxy.
        browser.click(&browser.wait_for("#force-tls"));
        browser.wait_until("TLS required", || {
            text_of(&browser, "#manage-status").contains("required").then_some(())
        });
        let plain = psql(&format!("{url}?sslmode=disable"), None, "SELECT 1");
        assert!(!plain.success && plain.stderr.contains("sslmode=require"), "{}", plain.stderr);
        let tls = psql(&format!("{url}?sslmode=require"), None, "SELECT 1");
        assert_eq!(tls.stdout.trim(), "1", "{}", tls.stderr);

        // A backup started from the page succeeds and is listed.
        browser.click(&browser.wait_for("#create-backup"));
        browser.wait_until("the backup to succeed", || {
            let status = text_of(&browser, "#backups .backup-status");
            assert_ne!(status, "failed", "{}", text_of(&browser, "#backups"));
            (status == "succeeded").then_some(())
        });
        // A plan change from the page, its progress shown until it ends.
        let plan = browser.wait_for("#plan");
        browser.wait_until("the plans listed", || {
            text_of(&browser, "#plan").contains("postgresql-starter-1024").then_some(())
        });
        browser.select(&plan, "postgresql-starter-1024");
        browser.click(&browser.wait_for("#change-plan"));
        browser.wait_until("the plan change to succeed", || {
            let status = browser.script(
                "return document.getElementById('manage-status').dataset.status || ''",
                json!([]),
            );
            let status = status.as_str().unwrap_or_default().to_owned();
            assert_ne!(status, "failed", "{}", text_of(&browser, "#manage-status"));
            (status == "succeeded").then_some(())
        });
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard/manage.png");
        browser.screenshot(&shot);
    });
    // What the page did, the API shows.
    let users = control.request("GET", &format!("/v1/databases/{id}/users"), None).await.json();
    assert!(
        users.as_array().unwrap().iter().any(|u| u["name"] == "auditor" && u["read_only"] == true),
        "{users}"
    );
    let shown = control.request("GET", &format!("/v1/databases/{id}"), None).await.json();
    assert_eq!(shown["tls"]["force"], true, "{shown}");
    let backups = control.request("GET", &format!("/v1/databases/{id}/backups"), None).await.json();
    assert_eq!(backups[0]["status"], "succeeded", "{backups}");
    assert_eq!(name, shown["name"]);
    assert_eq!(shown["plan"], "postgresql-starter-1024", "{shown}");
    drop(browser);
}
