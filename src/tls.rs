//! TLS clients for tests: one for tests that speak the protocol as raw bytes, and one for
//! tokio-postgres that supports channel binding (`tls-server-end-point`).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::ChannelBinding;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn connector(ca_path: &Path) -> std::io::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_path).map_err(std::io::Error::other)? {
        roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Runs a TLS handshake on `tcp`, trusting only the CA at `ca_path`.
pub async fn tls_connect(
    tcp: TcpStream,
    ca_path: &Path,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(std::io::Error::other)?;
    connector(ca_path)?.connect(name, tcp).await
}

/// A tokio-postgres session over TLS (verified against the CA at `ca_path`, for
/// `server_name`) that can bind SCRAM to the server's certificate: `conninfo` may say
/// `channel_binding=require`.
pub async fn connect_with_binding(
    conninfo: &str,
    addr: std::net::SocketAddr,
    ca_path: &Path,
    server_name: &str,
) -> Result<
    (tokio_postgres::Client, tokio_postgres::Connection<TcpStream, BoundStream>),
    tokio_postgres::Error,
> {
    let config: tokio_postgres::Config = conninfo.parse()?;
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let connector = connector(ca_path).expect("CA file");
    let tcp = TcpStream::connect(addr).await.expect("TCP connection to the server");
    config.connect_raw(tcp, BindingTls { connector, name }).await
}

/// The connector behind [`connect_with_binding`].
pub struct BindingTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

/// A TLS stream that reports the server certificate's `tls-server-end-point` data.
pub struct BoundStream(TlsStream<TcpStream>);

impl tokio_postgres::tls::TlsConnect<TcpStream> for BindingTls {
    type Stream = BoundStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<BoundStream>> + Send>>;

    fn connect(self, stream: TcpStream) -> Self::Future {
        Box::pin(async move { Ok(BoundStream(self.connector.connect(self.name, stream).await?)) })
    }
}

impl tokio_postgres::tls::TlsStream for BoundStream {
    fn channel_binding(&self) -> ChannelBinding {
        match self.0.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            // The test certificates are signed with SHA-256.
            Some(cert) => ChannelBinding::tls_server_end_point(
                ring::digest::digest(&ring::digest::SHA256, cert).as_ref().to_vec(),
            ),
            None => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for BoundStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
