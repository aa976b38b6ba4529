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
    let config = server_config(certs, read_key(&files.key)?)?;
    Ok(Acceptor { acceptor: TlsAcceptor::from(Arc::new(config)), end_point })
}

/// What the proxy offers clients: TLS 1.2 and 1.3, its choice of suite, no resumption.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM with SHA-256 first (the key schedule's hash runs on the CPU's SHA
    // instructions; SHA-384 has none), whatever the client prefers: libpq asks for
    // AES-256-GCM-SHA384 first, whose key schedule cost a reconnect storm 4 % of the proxy's
    // CPU. The suites stay the same; only the choice among them changes.
    provider.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite::*;
        let sha384 = [
            TLS13_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ];
        sha384.contains(&s.suite())
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.ignore_client_order = true;
    // No session resumption, as PostgreSQL itself (it turns tickets and its session cache
    // off): libpq never resumes, and TLS 1.3 resumption still does the key exchange, so
    // tickets would cost every connection two more records and a shared cache entry for
    // nothing.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // PostgreSQL 17 clients send this ALPN on direct TLS; older clients send none.
    config.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
    Ok(config)
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
    use rustls::pki_types::ServerName;
    use rustls::{
        CipherSuite, ClientConnection, ConnectionCommon, RootCertStore, ServerConnection,
    };

    use super::*;

    /// Carries the records `from` has to send into `to`.
    fn carry<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("records out");
        }
        let mut records = wire.as_slice();
        while !records.is_empty() {
            to.read_tls(&mut records).expect("records in");
            to.process_new_packets().expect("records accepted");
        }
    }

    /// Carries the records each side has to send to the other until neither has any.
    fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
        while client.wants_write() || server.wants_write() {
            carry(client, server);
            carry(server, client);
        }
    }

    #[test]
    fn the_proxy_chooses_aes_128_gcm_over_the_client_s_preference_and_sends_no_tickets() {
        let ca = pgwarden_certs::Ca::generate().expect("CA");
        let issued = ca.issue_server(&["localhost"]).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let files =
            TlsFiles { cert: dir.path().join("server.crt"), key: dir.path().join("server.key") };
        issued.write(&files.cert, &files.key).expect("write");
        let config = server_config(read_certs(&files.cert).unwrap(), read_key(&files.key).unwrap());

        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The client asks for AES-256-GCM-SHA384 first, as libpq does, and keeps tickets.
        let first = provider.cipher_suites[0].suite();
        assert_eq!(first, CipherSuite::TLS13_AES_256_GCM_SHA384);
        let tickets = Arc::new(ClientSessionMemoryCache::new(8));
        client_config.resumption = Resumption::store(Arc::clone(&tickets) as _);

        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(client_config), name.clone()).unwrap();
        let mut server = ServerConnection::new(Arc::new(config.expect("config"))).unwrap();
        exchange(&mut client, &mut server);
        server.writer().write_all(b"R").unwrap();
        exchange(&mut client, &mut server);
        let mut got = [0; 1];
        client.reader().read_exact(&mut got).expect("the server's byte");

        let suite = client.negotiated_cipher_suite().expect("a suite").suite();
        assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(tickets.take_tls13_ticket(&name).is_none(), "the proxy sent a session ticket");
    }
}
