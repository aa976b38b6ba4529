//! Mutual TLS between the control plane and the agents: both sides present a certificate of
//! the platform CA and accept only the other's kind (an agent's server certificate, the control
//! plane's client certificate).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate, and the certificate and key of one side.
pub struct Identity<'a> {
    pub ca: &'a str,
    pub cert: &'a str,
    pub key: &'a str,
}

/// Why one side's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what}: {source}")]
    Pem { what: &'static str, source: rustls_pki_types::pem::Error },
    #[error("the {0} file holds no certificate")]
    Empty(&'static str),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot issue the control plane's client certificate: {0}")]
    Issue(#[from] pgwarden_certs::CertError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

type Parts = (rustls::RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn parts(id: &Identity<'_>) -> Result<Parts, TlsSetupError> {
    let pem = |what| move |source| TlsSetupError::Pem { what, source };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(id.ca.as_bytes()) {
        roots.add(cert.map_err(pem("CA certificate"))?)?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::Empty("CA"));
    }
    let certs = CertificateDer::pem_slice_iter(id.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificate"))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Empty("certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).map_err(pem("key"))?;
    Ok((roots, certs, key))
}

/// An agent's side: its server certificate; clients must present a client certificate of the
/// CA.
pub fn server_config(id: &Identity<'_>) -> Result<rustls::ServerConfig, TlsSetupError> {
    let (roots, certs, key) = parts(id)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(config)
}

/// The control plane's side: it trusts only the CA and presents its client certificate.
pub fn client_config(id: &Identity<'_>) -> Result<rustls::ClientConfig, TlsSetupError> {
    let (roots, certs, key) = parts(id)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(config)
}
