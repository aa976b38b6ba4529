//! Generated passwords and their SCRAM-SHA-256 verifiers (RFC 5802/7677, as PostgreSQL stores
//! them), so that a password never reaches PostgreSQL, or its logs, in clear text; and the
//! `Sealer` that encrypts the passwords the control plane must give again (`DATABASE_URL`, the
//! replication password) before they are stored.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::distr::{Alphanumeric, SampleString};
use ring::{digest, hmac, pbkdf2};

const ITERATIONS: u32 = 4096;

/// A random password of 32 alphanumeric characters (about 190 bits).
pub fn generate_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
pub fn scram_verifier(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    verifier_with_salt(password, &salt, ITERATIONS)
}

fn verifier_with_salt(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(iterations).expect("non-zero"),
        salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key.as_ref()),
        B64.encode(server_key.as_ref())
    )
}

/// Prefix of a sealed value: `sealed:v1:<base64 of nonce, ciphertext and tag>`.
const SEALED: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read or create the secret key {path}: {source}")]
    Key { path: String, source: std::io::Error },
    #[error("the secret key {0} is damaged (want 32 bytes, base64)")]
    BadKey(String),
    #[error("{0} is readable by other users: make it private (chmod 600 {0})")]
    Exposed(String),
    #[error(
        "a sealed value does not open with this data dir's key (damaged or from another data dir)"
    )]
    Open,
}

/// Encrypts values at rest with AES-256-GCM under a key kept in a private file of the data dir.
/// Each value is bound to what it is (its `context`), so a sealed value moved elsewhere does not
/// open.
pub struct Sealer {
    key: ring::aead::LessSafeKey,
}

impl Sealer {
    /// The key in `path` (base64 of 32 bytes), created (0600, random) on first use.
    pub fn open(path: &std::path::Path) -> Result<Self, SealError> {
        let shown = path.display().to_string();
        let io = |source| SealError::Key { path: shown.clone(), source };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => {
                if crate::files::readable_by_others(path).map_err(io)? {
                    return Err(SealError::Exposed(shown));
                }
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let text = B64.encode(key);
                crate::files::write_private(path, format!("{text}\n").as_bytes()).map_err(io)?;
                text
            }
            Err(e) => return Err(io(e)),
        };
        let bytes = B64.decode(text.trim()).map_err(|_| SealError::BadKey(shown.clone()))?;
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &bytes)
            .map_err(|_| SealError::BadKey(shown))?;
        Ok(Self { key: ring::aead::LessSafeKey::new(key) })
    }

    pub fn seal(&self, context: &str, value: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(context.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM seals any value under 64 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{SEALED}{}", B64.encode(out))
    }

    /// Opens a sealed value; a value that is not sealed (written before sealing existed) is
    /// returned as it is.
    pub fn open_value(&self, context: &str, stored: &str) -> Result<String, SealError> {
        let Some(encoded) = stored.strip_prefix(SEALED) else { return Ok(stored.to_owned()) };
        let bytes = B64.decode(encoded).map_err(|_| SealError::Open)?;
        if bytes.len() < 12 {
            return Err(SealError::Open);
        }
        let (nonce, sealed) = bytes.split_at(12);
        let mut data = sealed.to_vec();
        let nonce =
            ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Open)
    }
}

pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::open(&dir.path().join("secret.key")).unwrap();
        let sealed = sealer.seal("db-1/password", "hunter2hunter2");
        assert!(is_sealed(&sealed) && !sealed.contains("hunter2"));
        assert_eq!(sealer.open_value("db-1/password", &sealed).unwrap(), "hunter2hunter2");
        assert!(sealer.open_value("db-2/password", &sealed).is_err(), "bound to its context");
        assert_eq!(sealer.open_value("x", "legacy-plain").unwrap(), "legacy-plain");
        let again = Sealer::open(&dir.path().join("secret.key")).unwrap();
        assert_eq!(again.open_value("db-1/password", &sealed).unwrap(), "hunter2hunter2");
        let other = Sealer::open(&dir.path().join("other.key")).unwrap();
        assert!(other.open_value("db-1/password", &sealed).is_err(), "another key");
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("secret.key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = Sealer::open(&key).err().expect("an exposed key is refused").to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
    }

    #[test]
    fn verifier_matches_rfc_7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = verifier_with_salt("pencil", &salt, 4096);
        let (_, keys) = v.rsplit_once('$').unwrap();
        let (_, server_key) = keys.split_once(':').unwrap();
        // ServerSignature = HMAC(ServerKey, AuthMessage) is what the RFC shows; check the
        // derivation end to end against it.
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let key = hmac::Key::new(hmac::HMAC_SHA256, &B64.decode(server_key).unwrap());
        let signature = B64.encode(hmac::sign(&key, auth_message.as_bytes()).as_ref());
        assert_eq!(signature, "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn passwords_are_long_and_distinct() {
        let (a, b) = (generate_password(), generate_password());
        assert!(a.len() >= 24 && a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert!(scram_verifier(&a).starts_with("SCRAM-SHA-256$4096:"));
    }
}
