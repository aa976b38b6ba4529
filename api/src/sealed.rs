//! The routing table as etcd holds it for the proxies that watch it: JSON sealed (AES-256-GCM)
//! with a key derived (HKDF-SHA256) from the proxies' admin token, which the control planes
//! and the proxies share and etcd never sees. The users' SCRAM verifiers in the table are
//! thereby unreadable to whoever reads etcd, and a value not made with the token is refused.
//!
//! Layout: the 12-byte nonce, then the ciphertext and its tag.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};

use crate::RoutingTable;

const SALT: &[u8] = b"pgwarden routing table v1";
const AAD: &[u8] = b"pgwarden routing table";

#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("the sealed routing table does not open with this admin token (another platform's, or damaged)")]
    Open,
    #[error("the sealed routing table is not a routing table: {0}")]
    Json(#[from] serde_json::Error),
}

fn key(token: &str) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, SALT).extract(token.trim().as_bytes());
    let okm = prk.expand(&[b"aes-256-gcm"], &AES_256_GCM).expect("the key length is AES-256's");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// `table`, sealed with the key of `token`.
pub fn seal_table(token: &str, table: &RoutingTable) -> Vec<u8> {
    let mut data = serde_json::to_vec(table).expect("a routing table serializes");
    let nonce: [u8; NONCE_LEN] = rand_nonce();
    key(token)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), &mut data)
        .expect("sealing in memory cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    out
}

/// The table sealed in `sealed` with the key of `token`.
pub fn open_table(token: &str, sealed: &[u8]) -> Result<RoutingTable, SealedError> {
    if sealed.len() < NONCE_LEN {
        return Err(SealedError::Open);
    }
    let (nonce, data) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealedError::Open)?;
    let mut data = data.to_vec();
    let plain = key(token)
        .open_in_place(nonce, Aad::from(AAD), &mut data)
        .map_err(|_| SealedError::Open)?;
    Ok(serde_json::from_slice(plain)?)
}

fn rand_nonce() -> [u8; NONCE_LEN] {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new().fill(&mut nonce).expect("the system's random source");
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_table_opens_with_its_token_only() {
        let mut table = RoutingTable { epoch: 7, ..RoutingTable::default() };
        table.node_ca = Some("SCRAM-SHA-256$4096:secret-looking".into());
        let sealed = seal_table("token-a", &table);
        assert!(!String::from_utf8_lossy(&sealed).contains("secret-looking"), "sealed in clear");
        assert_eq!(open_table("token-a", &sealed).unwrap(), table);
        assert!(matches!(open_table("token-b", &sealed), Err(SealedError::Open)));
        let mut damaged = sealed.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(matches!(open_table("token-a", &damaged), Err(SealedError::Open)));
        assert!(matches!(open_table("token-a", b"short"), Err(SealedError::Open)));
        assert_ne!(seal_table("token-a", &table), sealed, "a fresh nonce each time");
    }
}
