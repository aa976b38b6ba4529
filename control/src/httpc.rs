//! A small HTTP/1.1 client (hyper) for the proxies' admin APIs, the node agents (over mutual
//! TLS) and the CLI. Every call is bounded: connecting, and the whole exchange (or, for
//! downloads, each wait for more bytes).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
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
    #[error("TLS with {addr} failed: {source}")]
    Tls { addr: String, source: std::io::Error },
    #[error("{addr} refused to switch protocols: {status}")]
    NoUpgrade { addr: String, status: StatusCode },
}

/// A stream an HTTP exchange runs on: plain TCP or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// How long connecting, and then the exchange, may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// The whole request and answer; for a download, each wait for the next bytes.
    pub exchange: Duration,
}

/// Opens an HTTP/1.1 connection to `addr` (over TLS with `tls`, for the host part of `addr`)
/// and starts a request with the host and token set.
async fn connect<B>(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    method: Method,
    path: &str,
    token: Option<&str>,
    after: Duration,
) -> Result<(hyper::client::conn::http1::SendRequest<B>, hyper::http::request::Builder), HttpError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let opening = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Connect { addr: addr.into(), source })?;
        let Some(tls) = tls else { return Ok(Box::new(tcp) as Box<dyn Stream>) };
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let tls_error = |source| HttpError::Tls { addr: addr.into(), source };
        let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| tls_error(std::io::Error::other(e)))?;
        Ok::<_, HttpError>(
            Box::new(tls.connect(name, tcp).await.map_err(tls_error)?) as Box<dyn Stream>
        )
    };
    let stream = tokio::time::timeout(after, opening)
        .await
        .map_err(|_| HttpError::Timeout { addr: addr.into(), after })??;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HttpError::Http { addr: addr.into(), source })?;
    tokio::spawn(conn.with_upgrades());
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
    request_over(addr, None, method, path, token, body, timeouts).await
}

/// [`request`] over TLS with `tls` when given.
pub async fn request_over(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    timeouts: Timeouts,
) -> Result<(StatusCode, Bytes), HttpError> {
    let (mut sender, mut builder) =
        connect(addr, tls, method, path, token, timeouts.connect).await?;
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    exchange(addr, &mut sender, request, timeouts.exchange).await
}

/// Sends `request` and reads the whole answer, within `after`.
async fn exchange<B>(
    addr: &str,
    sender: &mut hyper::client::conn::http1::SendRequest<B>,
    request: Request<B>,
    after: Duration,
) -> Result<(StatusCode, Bytes), HttpError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = |source| HttpError::Http { addr: addr.into(), source };
    let exchange = async {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(after, exchange)
        .await
        .map_err(|_| HttpError::Timeout { addr: addr.into(), after })?
}

/// Sends what `body` reads as the body of a `POST` to `path` (over TLS with `tls`); returns
/// the status and the whole answer. The whole exchange is bounded by `timeouts.exchange`.
pub async fn upload(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    path: &str,
    body: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    timeouts: Timeouts,
) -> Result<(StatusCode, Bytes), HttpError> {
    let (mut sender, builder) =
        connect(addr, tls, Method::POST, path, None, timeouts.connect).await?;
    let request = builder
        .header("content-type", "application/octet-stream")
        .body(ReaderBody { reader: body, buf: BytesMut::new() })?;
    exchange(addr, &mut sender, request, timeouts.exchange).await
}

/// A request body read from an `AsyncRead` to its end, 64 KiB at a time.
struct ReaderBody<R> {
    reader: R,
    buf: BytesMut,
}

impl<R: tokio::io::AsyncRead + Unpin> hyper::body::Body for ReaderBody<R> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        this.buf.reserve(64 * 1024);
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut this.reader), cx, &mut this.buf)
        {
            std::task::Poll::Ready(Ok(0)) => std::task::Poll::Ready(None),
            std::task::Poll::Ready(Ok(_)) => {
                let chunk = this.buf.split().freeze();
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Some(Err(e))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// Asks `addr` to switch the connection to `protocol` for `path` (a `GET` with `Upgrade`) and
/// returns the connection once it answered `101`.
pub async fn upgrade(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    path: &str,
    protocol: &str,
    timeouts: Timeouts,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, HttpError> {
    let http = |source| HttpError::Http { addr: addr.into(), source };
    let (mut sender, builder) =
        connect(addr, tls, Method::GET, path, None, timeouts.connect).await?;
    let request = builder
        .header("connection", "upgrade")
        .header("upgrade", protocol)
        .body(Full::new(Bytes::new()))?;
    let switching = async {
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(HttpError::NoUpgrade { addr: addr.into(), status: response.status() });
        }
        Ok(TokioIo::new(hyper::upgrade::on(response).await.map_err(http)?))
    };
    tokio::time::timeout(timeouts.exchange, switching)
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
    progress: impl FnMut(u64, Option<u64>),
) -> Result<Result<hyper::HeaderMap, (StatusCode, Bytes)>, DownloadError> {
    let connection = (addr, None, token);
    download_with(connection, (Method::GET, path, None), out, timeouts, progress).await
}

/// [`download`] of the answer to `request` (method, path, JSON body), over TLS with `tls`.
pub async fn download_over(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    request: (Method, &str, Option<Vec<u8>>),
    out: &std::path::Path,
    timeouts: Timeouts,
    progress: impl FnMut(u64, Option<u64>),
) -> Result<Result<hyper::HeaderMap, (StatusCode, Bytes)>, DownloadError> {
    download_with((addr, tls, None), request, out, timeouts, progress).await
}

async fn download_with(
    (addr, tls, token): (&str, Option<&tokio_rustls::TlsConnector>, Option<&str>),
    (method, path, body): (Method, &str, Option<Vec<u8>>),
    out: &std::path::Path,
    timeouts: Timeouts,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Result<hyper::HeaderMap, (StatusCode, Bytes)>, DownloadError> {
    use tokio::io::AsyncWriteExt;
    let http = |source| HttpError::Http { addr: addr.into(), source };
    let after = timeouts.exchange;
    let timeout = || HttpError::Timeout { addr: addr.into(), after };
    let (mut sender, mut builder) =
        connect(addr, tls, method, path, token, timeouts.connect).await?;
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())));
    let sending = sender.send_request(request.map_err(HttpError::from)?);
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
