//! The web dashboard in a real headless Chromium (SPEC §10): a wrong token is refused with a
//! sentence, the right one shows the databases, a database's page shows its status, plan,
//! nodes, the URL with its password hidden until asked, and charts drawn from the stats history
//! with data points. Every response carries the security headers, and the API takes its token
//! from a header only (a cookie or a form from another origin changes nothing).

use std::time::Duration;

use pgwarden_e2e::{http_request, Browser, TestControl};
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
            let text = browser.text(&browser.find("#login-error")?);
            (!text.is_empty()).then_some(text)
        });
        assert!(refused.contains("token was refused"), "{refused}");
        assert!(browser.find("#databases").is_none(), "nothing shown on a wrong token");

        let field = browser.wait_for("#token");
        browser.clear(&field);
        browser.type_into(&field, &token);
        browser.click(&browser.wait_for("#login button[type=submit]"));
        let link = browser.wait_for("#databases a");
        assert_eq!(browser.text(&link), name);
        // The token is in this tab's session storage, never in the address.
        let url = browser.script("return location.href", json!([]));
        assert!(!url.as_str().unwrap().contains(&token), "{url}");
        let stored = browser.script("return sessionStorage.getItem('pgwarden-token')", json!([]));
        assert_eq!(stored, Value::String(token.clone()));

        browser.click(&link);
        let title = browser.wait_for("#database-name");
        assert_eq!(browser.text(&title), name);
        assert_eq!(browser.text(&browser.wait_for("#database-status")), "running");
        assert_eq!(browser.text(&browser.wait_for("#database-plan")), "postgresql-sandbox");
        let nodes = browser.text(&browser.wait_for("#nodes"));
        assert!(nodes.contains("primary") && nodes.contains(&format!("{id}-")), "{nodes}");

        // The password shows only when asked.
        let password = password_url.split(':').nth(2).unwrap().split('@').next().unwrap();
        let shown = browser.text(&browser.wait_for("#database-url"));
        assert!(!shown.contains(password), "{shown}");
        browser.click(&browser.wait_for("#reveal-url"));
        assert_eq!(browser.text(&browser.wait_for("#database-url")), password_url);

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
        let figures = browser.text(&browser.wait_for("#figures"));
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
