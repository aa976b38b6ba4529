//! Platform certificate authority.
//!
//! `Ca` creates a self-signed CA (or reloads one from its key), and issues certificates from it:
//! `Ca::issue_server` for nodes and proxies (DNS names and IP addresses as SANs) and
//! `Ca::issue_client` for client-certificate authentication (the CN is the user name, as
//! PostgreSQL's `clientcert=verify-full` expects). Everything is PEM in memory; `CertifiedPem::write`
//! puts a pair on disk with the key readable only by its owner.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why a certificate could not be made or stored.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid subject alternative name {0:?}")]
    InvalidName(String),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The certificate only: the key never reaches a log.
impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl CertifiedPem {
    /// Writes the certificate (0644) and key (0600) files, replacing existing ones atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        write_atomic(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(key_path, self.key_pem.as_bytes(), 0o600)
    }
}

/// A certificate authority able to issue certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

const CA_COMMON_NAME: &str = "pgwarden platform CA";

impl Ca {
    /// Creates a new CA valid for ten years.
    pub fn generate() -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let params = ca_params();
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(ca_params(), key), cert_pem, key_pem })
    }

    /// Reloads a CA made by [`Ca::generate`] from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(ca_params(), key), cert_pem: cert_pem.to_owned(), key_pem })
    }

    /// Loads `ca.crt`/`ca.key` from `dir`, creating them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, CertError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if key_path.exists() {
            let read = |p: &Path| {
                fs::read_to_string(p)
                    .map_err(|source| CertError::Read { path: p.display().to_string(), source })
            };
            return Self::from_pem(&read(&cert_path)?, &read(&key_path)?);
        }
        let ca = Self::generate()?;
        ca.pem().write(&cert_path, &key_path)?;
        Ok(ca)
    }

    /// The CA certificate and key.
    pub fn pem(&self) -> CertifiedPem {
        CertifiedPem { cert_pem: self.cert_pem.clone(), key_pem: self.key_pem.clone() }
    }

    /// The CA certificate, for clients' `sslrootcert` and servers' `ssl_ca_file`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses), valid for two years.
    pub fn issue_server(&self, names: &[&str]) -> Result<CertifiedPem, CertError> {
        let common_name = names.first().copied().unwrap_or("pgwarden");
        let mut params = leaf_params(common_name);
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// Issues a client certificate whose CN is `user`, valid for two years.
    pub fn issue_client(&self, user: &str) -> Result<CertifiedPem, CertError> {
        let mut params = leaf_params(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertifiedPem, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    params
}

fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(730);
    params
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| CertError::InvalidName(name.to_owned()))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    io::Write::write_all(&mut file, contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_from_a_reloaded_ca_verify_against_the_original() {
        let ca = Ca::generate().unwrap();
        let reloaded = Ca::from_pem(&ca.pem().cert_pem, &ca.pem().key_pem).unwrap();
        let server = reloaded.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let client = reloaded.issue_client("app").unwrap();
        let dir = tempfile_dir("verify");
        fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        for (name, cert) in [("server", &server), ("client", &client)] {
            let path = dir.join(format!("{name}.crt"));
            fs::write(&path, &cert.cert_pem).unwrap();
            let out = std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.join("ca.crt"))
                .arg(&path)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(reloaded.issue_server(&["caf\u{e9}.example"]).is_err(), "non-ASCII DNS name");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_or_create_keeps_the_same_ca() {
        let dir = tempfile_dir("reload");
        let first = Ca::load_or_create(&dir).unwrap();
        let second = Ca::load_or_create(&dir).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        let mode = fs::metadata(dir.join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pgwarden-certs-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
