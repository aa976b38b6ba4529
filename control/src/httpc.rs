//! A small HTTP/1.1 client (hyper) for the proxies' admin APIs and the CLI. Every call is
//! bounded: connecting, and the whole exchange (or, for downloads, each wait for more bytes).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{addr} did not answer within {} ms", .after.as_millis())]
    Timeout { addr: String, after: Duration },
}

/// How long connecting, and then the exchange, may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// The whole request and answer; for a download, each wait for the next bytes.
    pub exchange: Duration,
}

/// Opens an HTTP/1.1 connection to `addr` and starts a request with the host and token set.
async fn connect(
    addr: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    after: Duration,
) -> Result<
    (hyper::client::conn::http1::SendRequest<Full<Bytes>>, hyper::http::request::Builder),
    HttpError,
> {
    let stream = tokio::time::timeout(after, TcpStream::connect(addr))
        .await
        .map_err(|_| HttpError::Timeout { addr: addr.into(), after })?
        .map_err(|source| HttpError::Connect { addr: addr.into(), source })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HttpError::Http { addr: addr.into(), source })?;
    tokio::spawn(conn);
    let mut builder = Request::builder().method(method).uri(path).header("host", addr);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    Ok((sender, builder))
}

/// Sends one request to `addr` (`host:port`) and returns the status and the whole body.
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    timeouts: Timeouts,
) -> Result<(StatusCode, Bytes), HttpError> {
    let http = |source| HttpError::Http { addr: addr.into(), source };
    let (mut sender, mut builder) = connect(addr, method, path, token, timeouts.connect).await?;
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let exchange = async {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeouts.exchange, exchange)
        .await
        .map_err(|_| HttpError::Timeout { addr: addr.into(), after: timeouts.exchange })?
}

/// Streams a GET answer into `out`, calling `progress(received, total)` as bytes arrive.
/// Returns the response headers; a non-2xx answer is returned as `Err` with its body.
pub async fn download(
    addr: &str,
    path: &str,
    token: Option<&str>,
    out: &std::path::Path,
    timeouts: Timeouts,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Result<hyper::HeaderMap, (StatusCode, Bytes)>, DownloadError> {
    use tokio::io::AsyncWriteExt;
    let http = |source| HttpError::Http { addr: addr.into(), source };
    let after = timeouts.exchange;
    let timeout = || HttpError::Timeout { addr: addr.into(), after };
    let (mut sender, builder) = connect(addr, Method::GET, path, token, timeouts.connect).await?;
    let sending =
        sender.send_request(builder.body(Full::new(Bytes::new())).map_err(HttpError::from)?);
    let response =
        tokio::time::timeout(after, sending).await.map_err(|_| timeout())?.map_err(http)?;
    let (parts, mut body) = response.into_parts();
    if !parts.status.is_success() {
        let bytes = tokio::time::timeout(after, body.collect())
            .await
            .map_err(|_| timeout())?
            .map_err(http)?
            .to_bytes();
        return Ok(Err((parts.status, bytes)));
    }
    let total = parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.parse().ok());
    let mut file = tokio::fs::File::create(out).await?;
    let mut received = 0u64;
    while let Some(frame) =
        tokio::time::timeout(after, body.frame()).await.map_err(|_| timeout())?
    {
        if let Ok(data) = frame.map_err(http)?.into_data() {
            file.write_all(&data).await?;
            received += data.len() as u64;
            progress(received, total);
        }
    }
    file.sync_all().await?;
    if total.is_some_and(|t| t != received) {
        return Err(DownloadError::Truncated { received, expected: total.unwrap_or(0) });
    }
    Ok(Ok(parts.headers))
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot write the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("download cut short: {received} of {expected} bytes")]
    Truncated { received: u64, expected: u64 },
}
