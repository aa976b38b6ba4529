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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parts(
    id: &Identity<'_>,
) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(id.ca.as_bytes()) {
        roots.add(cert.map_err(|e| format!("CA certificate: {e}"))?).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("the CA file holds no certificate".into());
    }
    let certs = CertificateDer::pem_slice_iter(id.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).map_err(|e| format!("key: {e}"))?;
    Ok((roots, certs, key))
}

/// An agent's side: its server certificate; clients must present a client certificate of the
/// CA.
pub fn server_config(id: &Identity<'_>) -> Result<rustls::ServerConfig, String> {
    let (roots, certs, key) = parts(id)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())
}

/// The control plane's side: it trusts only the CA and presents its client certificate.
pub fn client_config(id: &Identity<'_>) -> Result<rustls::ClientConfig, String> {
    let (roots, certs, key) = parts(id)?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())
}
