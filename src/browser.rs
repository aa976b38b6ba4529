//! A real headless browser for the dashboard's tests: Debian's Chromium driven through its
//! ChromeDriver with the W3C WebDriver protocol (JSON over HTTP, spoken with `http.rs`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::http_request;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A browser session; the browser and its driver end when it is dropped.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element found on the page.
#[derive(Clone, Debug)]
pub struct Element(String);

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts ChromeDriver and a headless Chromium; `None` (after saying why) when they are not
    /// installed (`scripts/setup.sh` installs them).
    pub fn start() -> Option<Self> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            println!(
                "SKIPPED: {CHROMIUM} or {CHROMEDRIVER} is missing (scripts/setup.sh installs \
                 Debian's chromium and chromium-driver)"
            );
            return None;
        }
        let port = crate::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http_request(addr, "GET", "/status", None, None)
                .is_ok_and(|r| r.status == 200 && r.json()["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1800", "--no-first-run",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let mut browser = Self { driver, addr, session: String::new(), _profile: profile };
        let created = browser.call("POST", "/session", Some(capabilities));
        browser.session = created["sessionId"].as_str().expect("session id").to_owned();
        Some(browser)
    }

    /// One WebDriver command; panics with the driver's message if it fails.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let r = http_request(self.addr, method, path, None, body.as_deref().or(Some("{}")))
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let value = r.json()["value"].clone();
        assert_eq!(r.status, 200, "webdriver {method} {path}: {value}");
        value
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.session_path("/url"), Some(json!({"url": url})));
    }

    /// The first element matching `css` now, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let body = json!({"using": "css selector", "value": css}).to_string();
        let r = http_request(self.addr, "POST", &self.session_path("/element"), None, Some(&body))
            .expect("webdriver find");
        let value = r.json()["value"].clone();
        match (r.status, value[ELEMENT_KEY].as_str()) {
            (200, Some(id)) => Some(Element(id.to_owned())),
            (404, _) => None,
            _ => panic!("webdriver find {css}: {} {value}", r.status),
        }
    }

    /// Waits (at most 20 s) for an element matching `css`.
    pub fn wait_for(&self, css: &str) -> Element {
        self.wait_until(&format!("an element {css}"), || self.find(css))
    }

    /// Waits (at most 20 s) until `check` gives something.
    pub fn wait_until<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = check() {
                return found;
            }
            if Instant::now() > deadline {
                let page = self.script("return document.body.innerText", json!([]));
                panic!("waited 20 s for {what}; the page shows: {page}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rendered text of the first element matching `css` now, if any, found and read in
    /// one step: an element the page re-renders in between cannot go stale.
    pub fn text_at(&self, css: &str) -> Option<String> {
        let read = "const e = document.querySelector(arguments[0]); return e ? e.innerText : null";
        self.script(read, json!([css])).as_str().map(str::to_owned)
    }

    /// Waits (at most 20 s) for an element matching `css`; its text (see `text_at`).
    pub fn wait_text(&self, css: &str) -> String {
        self.wait_until(&format!("an element {css}"), || self.text_at(css))
    }

    pub fn click(&self, element: &Element) {
        self.call("POST", &self.session_path(&format!("/element/{}/click", element.0)), None);
    }

    pub fn type_into(&self, element: &Element, text: &str) {
        let path = self.session_path(&format!("/element/{}/value", element.0));
        self.call("POST", &path, Some(json!({"text": text})));
    }

    pub fn clear(&self, element: &Element) {
        self.call("POST", &self.session_path(&format!("/element/{}/clear", element.0)), None);
    }

    /// Runs `body` (a function body; `arguments` are `args`) in the page; returns its value.
    pub fn script(&self, body: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({"script": body, "args": args})),
        )
    }

    /// Chooses `value` in the `<select>` `element`, as a user would (a `change` event follows).
    pub fn select(&self, element: &Element, value: &str) {
        self.script(
            "arguments[0].value = arguments[1]; \
             arguments[0].dispatchEvent(new Event('change', { bubbles: true }))",
            json!([{ ELEMENT_KEY: element.0 }, value]),
        );
    }

    /// Saves a PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let data = self.call("GET", &self.session_path("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64"))
            .expect("PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http_request(self.addr, "DELETE", &self.session_path(""), None, None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
