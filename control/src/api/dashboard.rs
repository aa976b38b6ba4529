//! The web dashboard (SPEC §10): static files compiled into the binary (no build step, no
//! network), which call the same HTTP API as the CLI with the API token in a header. The files
//! hold no data, so they are served without the token; everything they show comes from
//! authenticated API calls. Every response of the control plane carries the security headers
//! of [`secure_headers`].

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

const UPLOT_JS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.min.css");
const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");

/// Scripts and styles from this origin only, no inline script, no framing, API calls to this
/// origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

pub async fn root() -> Redirect {
    Redirect::to("/dashboard/")
}

pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> Response {
    file("text/css; charset=utf-8", APP_CSS)
}

pub async fn uplot_js() -> Response {
    file("text/javascript; charset=utf-8", UPLOT_JS)
}

pub async fn uplot_css() -> Response {
    file("text/css; charset=utf-8", UPLOT_CSS)
}

/// On every response: a strict Content-Security-Policy, no framing, no MIME sniffing, no
/// referrer, and no caching (API answers carry customer data).
pub async fn secure_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
