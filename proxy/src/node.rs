//! Connections to database nodes: TCP, then TLS verified against the nodes' CA when the route
//! says so. Sessions, the pool and cancel requests all reach nodes through here.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::protocol;
use crate::routes::Route;
use crate::stream::NodeStream;

/// Why no connection to a node was opened.
#[derive(Debug, thiserror::Error)]
pub enum NodeConnectError {
    #[error("{0}")]
    Unreachable(std::io::Error),
    #[error("the node does not accept TLS")]
    NoTls,
    #[error("TLS with the node failed: {0}")]
    Tls(std::io::Error),
}

/// Connects to the route's primary, over TLS verified against the nodes' CA when the route
/// says so (the node's certificate must name the address connected to). The whole of it is
/// bounded by `limit`. Also returns the node's address (for cancels).
pub async fn connect(
    route: &Route,
    limit: std::time::Duration,
    metrics: &Metrics,
) -> Result<(NodeStream, SocketAddr), NodeConnectError> {
    let start = Instant::now();
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let tcp = tokio::time::timeout(limit, TcpStream::connect(&route.primary))
        .await
        .map_err(|_| NodeConnectError::Unreachable(timed_out()))?
        .map_err(NodeConnectError::Unreachable)?;
    tcp.set_nodelay(true).map_err(NodeConnectError::Unreachable)?;
    let addr = tcp.peer_addr().map_err(NodeConnectError::Unreachable)?;
    let node = match &route.node_tls {
        None => NodeStream::Plain(tcp),
        Some(connector) => {
            let handshake = start_tls(tcp, connector, host_of(&route.primary));
            let tls = tokio::time::timeout(limit.saturating_sub(start.elapsed()), handshake)
                .await
                .map_err(|_| NodeConnectError::Tls(timed_out()))??;
            NodeStream::Tls(Box::new(tls))
        }
    };
    metrics.backend_connect_seconds.observe(start.elapsed().as_secs_f64());
    Ok((node, addr))
}

/// SSLRequest, then a TLS handshake that verifies the node's certificate for `host`.
pub async fn start_tls(
    mut tcp: TcpStream,
    connector: &tokio_rustls::TlsConnector,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, NodeConnectError> {
    tcp.write_all(&protocol::ssl_request()).await.map_err(NodeConnectError::Unreachable)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(NodeConnectError::Unreachable)?;
    if answer[0] != protocol::ENCRYPTION_ACCEPTED {
        return Err(NodeConnectError::NoTls);
    }
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        NodeConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })?;
    connector.connect(name, tcp).await.map_err(NodeConnectError::Tls)
}

/// The host of `host:port` (IPv6 without its brackets).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address_loses_its_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:5432"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5432"), "::1");
        assert_eq!(host_of("db.internal:6432"), "db.internal");
    }
}
