//! TLS: towards clients, the acceptor built from the configured PEM files, replaceable at
//! runtime; towards nodes, a connector trusting the nodes' CA.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Config(#[from] rustls::Error),
}

/// An acceptor and what channel binding needs of its certificate.
pub struct Acceptor {
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` data of the certificate the acceptor presents.
    pub end_point: Arc<[u8]>,
}

/// The current TLS acceptor (none when no certificate is configured). New handshakes take the
/// acceptor in place when they start; a reload never touches established sessions.
pub struct TlsStore {
    files: Option<TlsFiles>,
    acceptor: ArcSwapOption<Acceptor>,
}

impl TlsStore {
    pub fn load(files: Option<TlsFiles>) -> Result<Self, TlsError> {
        let acceptor = files.as_ref().map(build_acceptor).transpose()?.map(Arc::new);
        Ok(Self { files, acceptor: ArcSwapOption::new(acceptor) })
    }

    pub fn acceptor(&self) -> Option<Arc<Acceptor>> {
        self.acceptor.load_full()
    }

    /// Re-reads the certificate and key; on error the previous ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        if let Some(files) = &self.files {
            self.acceptor.store(Some(Arc::new(build_acceptor(files)?)));
        }
        Ok(())
    }
}

fn build_acceptor(files: &TlsFiles) -> Result<Acceptor, TlsError> {
    let certs = read_certs(&files.cert)?;
    let end_point = crate::scram::end_point_hash(&certs[0]).into();
    let key = read_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // PostgreSQL 17 clients send this ALPN on direct TLS; older clients send none.
    config.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
    Ok(Acceptor { acceptor: TlsAcceptor::from(Arc::new(config)), end_point })
}

/// A connector that trusts only `ca_pem` (the nodes' CA), for TLS from the proxy to nodes.
pub fn node_connector(ca_pem: &str) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("node_ca: {e}"))?;
        roots.add(cert).map_err(|e| format!("node_ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err("node_ca holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert { path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Key { path: path.display().to_string(), reason: e.to_string() })
}
