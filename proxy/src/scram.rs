//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, on both legs of a session:
//!
//! - towards the client the proxy is the server: it checks the client's proof against the
//!   user's verifier (never a password) and recovers the ClientKey from it;
//! - towards the node the proxy is the client: it proves it knows that ClientKey, and checks the
//!   node's signature, so the node is the one holding the same verifier.
//!
//! Channel binding is `tls-server-end-point` (RFC 5929): the hash of the TLS server's
//! certificate, with the hash of the certificate's signature algorithm (SHA-256 for MD5/SHA-1).
//! Every function here is pure (no I/O), so the parsers can be fuzzed and tested alone; every
//! length a client controls is bounded by the message that carries it.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::{digest, hmac};

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
pub const CHANNEL_BINDING: &str = "tls-server-end-point";
/// Length of a SHA-256 output: StoredKey, ServerKey, ClientKey, proofs and signatures.
const KEY_LEN: usize = 32;
/// The number of random bytes in a nonce (PostgreSQL uses 18).
const NONCE_BYTES: usize = 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SASL mechanism")]
    Mechanism,
    #[error("channel binding: {0}")]
    ChannelBinding(&'static str),
    /// Wrong password or unknown user: the client is told no more than that.
    #[error("the client's proof does not match")]
    BadProof,
    #[error("the node's SCRAM parameters differ from the proxy's verifier (stale verifier)")]
    StaleVerifier,
    #[error("the node's signature does not match its verifier")]
    BadServerSignature,
}

/// What a SCRAM verifier (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`) holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub iterations: u32,
    pub salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl Keys {
    /// Parses a verifier as `pg_authid.rolpassword` holds it; `None` for anything else (an MD5
    /// hash, a plaintext password, garbage).
    pub fn parse(verifier: &str) -> Option<Self> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|i| *i > 0)?;
        let salt = BASE64.decode(salt).ok().filter(|s| !s.is_empty())?;
        Some(Self {
            iterations,
            salt,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Keys no proof can match, for a user the proxy does not know: the exchange looks the same
    /// as for a real user (same salt for the same name, for the life of the process), so
    /// failures do not tell which users exist.
    pub fn decoy(user: &str, secret: &[u8; 32]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let salt = hmac::sign(&key, user.as_bytes()).as_ref()[..16].to_vec();
        let mut stored_key = [0u8; KEY_LEN];
        stored_key.copy_from_slice(hmac::sign(&key, b"stored key").as_ref());
        Self { iterations: 4096, salt, stored_key, server_key: stored_key }
    }

    fn client_signature(&self, auth_message: &[u8]) -> [u8; KEY_LEN] {
        hmac_sha256(&self.stored_key, auth_message)
    }

    fn server_signature(&self, auth_message: &[u8]) -> [u8; KEY_LEN] {
        hmac_sha256(&self.server_key, auth_message)
    }
}

/// The key a client derives from its password; what the proxy needs to log in to the node.
#[derive(Clone)]
pub struct ClientKey([u8; KEY_LEN]);

impl ClientKey {
    /// A key no client has (for fuzzing the node side without a client).
    pub(crate) fn zero() -> Self {
        Self([0; KEY_LEN])
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

/// How the TLS session under an exchange can be bound to it.
#[derive(Clone, Copy, Debug)]
pub enum Binding<'a> {
    /// No TLS: only `SCRAM-SHA-256` without binding.
    None,
    /// TLS with this `tls-server-end-point` hash.
    Tls(&'a [u8]),
}

/// A fresh printable nonce.
pub fn nonce() -> String {
    let bytes: [u8; NONCE_BYTES] = rand::random();
    BASE64.encode(bytes)
}

/// The proxy as server, after the client's first message.
pub struct ServerExchange {
    client_first_bare: String,
    server_first: String,
    /// What the client's final message must carry as `c=` (base64 of the GS2 header, plus the
    /// binding data when bound).
    expected_binding: String,
    nonce: String,
}

impl std::fmt::Debug for ServerExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerExchange(..)")
    }
}

impl ServerExchange {
    /// Reads the client's first message for `mechanism`; `server_nonce` is appended to the
    /// client's nonce. Checks the GS2 header against what the connection offers, as PostgreSQL
    /// does: `p=` only with `-PLUS`, and `y` (client could bind but thinks the server cannot)
    /// refused when the server offered binding (a downgrade).
    pub fn start(
        mechanism: &str,
        client_first: &[u8],
        keys: &Keys,
        binding: Binding<'_>,
        server_nonce: &str,
    ) -> Result<Self, ScramError> {
        let plus = match mechanism {
            MECHANISM => false,
            MECHANISM_PLUS => true,
            _ => return Err(ScramError::Mechanism),
        };
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (flag, rest) = text.split_once(',').ok_or(ScramError::Malformed("no GS2 header"))?;
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authorization identities are not supported"));
        }
        let gs2_header = &text[..flag.len() + authzid.len() + 2];
        let cbind_data: &[u8] = match (flag, plus, binding) {
            ("n", false, _) => &[],
            ("y", false, Binding::None) => &[],
            ("y", false, Binding::Tls(_)) => {
                return Err(ScramError::ChannelBinding(
                    "the client supports channel binding but thinks the server does not",
                ))
            }
            ("p=tls-server-end-point", true, Binding::Tls(hash)) => hash,
            (f, true, _) if f.starts_with("p=") => {
                return Err(ScramError::ChannelBinding("unsupported channel binding type"))
            }
            (_, true, _) => {
                return Err(ScramError::ChannelBinding("SCRAM-SHA-256-PLUS without binding"))
            }
            (f, false, _) if f.starts_with("p=") => {
                return Err(ScramError::ChannelBinding("binding requested without -PLUS"))
            }
            _ => return Err(ScramError::Malformed("invalid GS2 channel binding flag")),
        };
        // client-first-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut attributes = bare.split(',');
        let user = attributes.next().ok_or(ScramError::Malformed("no user name"))?;
        if user.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extensions are not supported"));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("no user name attribute"));
        }
        let client_nonce = attribute(&mut attributes, "r=", "no nonce")?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first =
            format!("r={nonce},s={},i={}", BASE64.encode(&keys.salt), keys.iterations);
        let mut binding_input = gs2_header.as_bytes().to_vec();
        binding_input.extend_from_slice(cbind_data);
        Ok(Self {
            client_first_bare: bare.to_owned(),
            server_first,
            expected_binding: BASE64.encode(binding_input),
            nonce,
        })
    }

    /// The server-first message to send.
    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks the client's final message; returns the ClientKey and the server-final message.
    pub fn finish(
        self,
        client_final: &[u8],
        keys: &Keys,
    ) -> Result<(ClientKey, String), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) =
            text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut attributes = without_proof.split(',');
        let channel = attribute(&mut attributes, "c=", "no channel binding attribute")?;
        let nonce = attribute(&mut attributes, "r=", "no nonce")?;
        if channel != self.expected_binding {
            return Err(ScramError::ChannelBinding("binding data does not match"));
        }
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; KEY_LEN] = BASE64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?
            .try_into()
            .map_err(|_| ScramError::Malformed("proof has the wrong length"))?;
        let auth_message =
            format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let signature = keys.client_signature(auth_message.as_bytes());
        let client_key = xor(&proof, &signature);
        let stored = digest::digest(&digest::SHA256, &client_key);
        if !constant_time_eq(stored.as_ref(), &keys.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_final =
            format!("v={}", BASE64.encode(keys.server_signature(auth_message.as_bytes())));
        Ok((ClientKey(client_key), server_final))
    }
}

/// The proxy as client of a node.
pub struct ClientExchange {
    gs2_header: String,
    cbind_data: Vec<u8>,
    client_first_bare: String,
    nonce: String,
}

impl ClientExchange {
    /// Starts an exchange; with `Binding::Tls`, bound to the node's certificate (`-PLUS`).
    pub fn start(binding: Binding<'_>, nonce: String) -> Self {
        let (gs2_header, cbind_data) = match binding {
            Binding::None => ("n,,".to_owned(), Vec::new()),
            Binding::Tls(hash) => (format!("p={CHANNEL_BINDING},,"), hash.to_vec()),
        };
        // PostgreSQL takes the user from the startup packet and ignores this one.
        let client_first_bare = format!("n=,r={nonce}");
        Self { gs2_header, cbind_data, client_first_bare, nonce }
    }

    pub fn mechanism(&self) -> &'static str {
        if self.cbind_data.is_empty() {
            MECHANISM
        } else {
            MECHANISM_PLUS
        }
    }

    /// The client-first message.
    pub fn client_first(&self) -> String {
        format!("{}{}", self.gs2_header, self.client_first_bare)
    }

    /// From the node's first message, the client-final message and the signature the node's
    /// final message must carry. The node's salt and iteration count must be the verifier's.
    pub fn finish(
        &self,
        server_first: &[u8],
        keys: &Keys,
        client_key: &ClientKey,
    ) -> Result<(String, String), ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attributes = text.split(',');
        let nonce = attribute(&mut attributes, "r=", "no nonce")?;
        let salt = attribute(&mut attributes, "s=", "no salt")?;
        let iterations = attribute(&mut attributes, "i=", "no iteration count")?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramError::Malformed("the node's nonce does not extend ours"));
        }
        let salt = BASE64.decode(salt).map_err(|_| ScramError::Malformed("salt is not base64"))?;
        if salt != keys.salt || iterations.parse::<u32>().ok() != Some(keys.iterations) {
            return Err(ScramError::StaleVerifier);
        }
        let mut binding_input = self.gs2_header.as_bytes().to_vec();
        binding_input.extend_from_slice(&self.cbind_data);
        let without_proof = format!("c={},r={nonce}", BASE64.encode(binding_input));
        let auth_message = format!("{},{},{}", self.client_first_bare, text, without_proof);
        let proof = xor(&client_key.0, &keys.client_signature(auth_message.as_bytes()));
        let expected =
            format!("v={}", BASE64.encode(keys.server_signature(auth_message.as_bytes())));
        Ok((format!("{without_proof},p={}", BASE64.encode(proof)), expected))
    }
}

/// Checks the node's final message against the signature `ClientExchange::finish` expects.
pub fn check_server_final(server_final: &[u8], expected: &str) -> Result<(), ScramError> {
    let text = server_final.split(|b| *b == b',').next().unwrap_or_default();
    if constant_time_eq(text, expected.as_bytes()) {
        Ok(())
    } else {
        Err(ScramError::BadServerSignature)
    }
}

/// The `tls-server-end-point` data of a DER certificate: its hash with the hash function of its
/// signature algorithm (SHA-256 when that is MD5 or SHA-1, or not recognised).
pub fn end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    // SHA-384 and SHA-512 with RSA (PKCS#1 and PSS is not listed: PSS names its hash inside its
    // parameters and PostgreSQL refuses it) and with ECDSA.
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    let algorithm = match signature_algorithm(cert_der) {
        Some(oid) if SHA384.contains(&oid) => &digest::SHA384,
        Some(oid) if SHA512.contains(&oid) => &digest::SHA512,
        _ => &digest::SHA256,
    };
    digest::digest(algorithm, cert_der).as_ref().to_vec()
}

/// The OID of `Certificate.signatureAlgorithm` (a SEQUENCE of tbsCertificate, then an
/// AlgorithmIdentifier SEQUENCE whose first element is the OID).
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der_element(certificate)?;
    let (tag, algorithm, _) = der_element(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element: its tag, its contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The next attribute of a SCRAM message, which must be `prefix` (`r=`, `s=`...): its value.
fn attribute<'a>(
    attributes: &mut impl Iterator<Item = &'a str>,
    prefix: &str,
    missing: &'static str,
) -> Result<&'a str, ScramError> {
    attributes.next().and_then(|a| a.strip_prefix(prefix)).ok_or(ScramError::Malformed(missing))
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; KEY_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(hmac::sign(&key, message).as_ref());
    out
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A verifier for `password`, as PostgreSQL computes it (Hi = PBKDF2-HMAC-SHA-256).
    pub fn verifier(password: &str, salt: &[u8], iterations: u32) -> String {
        let mut salted = [0u8; KEY_LEN];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations).unwrap(),
            salt,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored = digest::digest(&digest::SHA256, &client_key);
        let server_key = hmac_sha256(&salted, b"Server Key");
        format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            BASE64.encode(salt),
            BASE64.encode(stored.as_ref()),
            BASE64.encode(server_key)
        )
    }

    /// A client holding `password`, as libpq computes its final message.
    fn client_final(
        password: &str,
        gs2: &str,
        cbind: &[u8],
        bare: &str,
        server_first: &str,
    ) -> String {
        let mut salt = "";
        let mut iterations = 0;
        let mut nonce = "";
        for a in server_first.split(',') {
            match a.split_at(2) {
                ("r=", v) => nonce = v,
                ("s=", v) => salt = v,
                ("i=", v) => iterations = v.parse().unwrap(),
                _ => {}
            }
        }
        let mut salted = [0u8; KEY_LEN];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations).unwrap(),
            &BASE64.decode(salt).unwrap(),
            password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored: [u8; KEY_LEN] =
            digest::digest(&digest::SHA256, &client_key).as_ref().try_into().unwrap();
        let mut input = gs2.as_bytes().to_vec();
        input.extend_from_slice(cbind);
        let without_proof = format!("c={},r={nonce}", BASE64.encode(input));
        let auth = format!("{bare},{server_first},{without_proof}");
        let proof = xor(&client_key, &hmac_sha256(&stored, auth.as_bytes()));
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    fn keys(password: &str) -> Keys {
        Keys::parse(&verifier(password, b"0123456789abcdef", 4096)).unwrap()
    }

    /// A server exchange for a client that does not bind (`n,,`).
    fn start_unbound(keys: &Keys, bare: &str, server_nonce: &str) -> ServerExchange {
        let first = format!("n,,{bare}");
        ServerExchange::start(MECHANISM, first.as_bytes(), keys, Binding::None, server_nonce)
            .unwrap()
    }

    #[test]
    fn right_password_gives_the_client_key_and_a_signature_the_client_can_check() {
        let keys = keys("s3cret");
        let bare = "n=,r=clientnonce";
        let exchange = start_unbound(&keys, bare, "srv");
        let fin = client_final("s3cret", "n,,", &[], bare, exchange.server_first());
        let (client_key, server_final) = exchange.finish(fin.as_bytes(), &keys).unwrap();
        assert!(server_final.starts_with("v="));
        // The recovered ClientKey logs in to a node holding the same verifier.
        let to_node = ClientExchange::start(Binding::None, "proxynonce".into());
        let node_first = format!("r=proxynonceNODE,s={},i=4096", BASE64.encode(&keys.salt));
        let (fin, expected) = to_node.finish(node_first.as_bytes(), &keys, &client_key).unwrap();
        let node_side = ServerExchange {
            client_first_bare: "n=,r=proxynonce".into(),
            server_first: node_first,
            expected_binding: BASE64.encode("n,,"),
            nonce: "proxynonceNODE".into(),
        };
        let (_, node_final) = node_side.finish(fin.as_bytes(), &keys).unwrap();
        assert_eq!(check_server_final(node_final.as_bytes(), &expected), Ok(()));
        assert_eq!(check_server_final(b"v=AAAA", &expected), Err(ScramError::BadServerSignature));
    }

    #[test]
    fn the_login_to_a_node_binds_to_the_node_certificate() {
        let keys = keys("pw");
        let bare = "n=,r=c";
        let exchange = start_unbound(&keys, bare, "s");
        let fin = client_final("pw", "n,,", &[], bare, exchange.server_first());
        let (client_key, _) = exchange.finish(fin.as_bytes(), &keys).unwrap();
        let node_cert = [5u8; 32];
        for (node_sees, accepted) in [(node_cert, true), ([6u8; 32], false)] {
            let to_node = ClientExchange::start(Binding::Tls(&node_cert), "pn".into());
            assert_eq!(to_node.mechanism(), MECHANISM_PLUS);
            let first = to_node.client_first();
            assert!(first.starts_with("p=tls-server-end-point,,"), "{first}");
            let node = ServerExchange::start(
                MECHANISM_PLUS,
                first.as_bytes(),
                &keys,
                Binding::Tls(&node_sees),
                "N",
            )
            .unwrap();
            let (fin, _) =
                to_node.finish(node.server_first().as_bytes(), &keys, &client_key).unwrap();
            assert_eq!(node.finish(fin.as_bytes(), &keys).is_ok(), accepted);
        }
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_the_same_way() {
        let keys = keys("s3cret");
        let bare = "n=,r=abc";
        for keys in [keys, Keys::decoy("nobody", &[7; 32])] {
            let exchange = start_unbound(&keys, bare, "x");
            let fin = client_final("wrong", "n,,", &[], bare, exchange.server_first());
            assert_eq!(exchange.finish(fin.as_bytes(), &keys).unwrap_err(), ScramError::BadProof);
        }
        // A decoy's salt is stable per user, so two tries do not reveal it is invented.
        assert_eq!(Keys::decoy("a", &[1; 32]).salt, Keys::decoy("a", &[1; 32]).salt);
        assert_ne!(Keys::decoy("a", &[1; 32]).salt, Keys::decoy("b", &[1; 32]).salt);
    }

    #[test]
    fn channel_binding_must_match_the_certificate_and_downgrades_are_refused() {
        let keys = keys("pw");
        let hash = [9u8; 32];
        let bare = "n=,r=n1";
        let gs2 = "p=tls-server-end-point,,";
        let first = format!("{gs2}{bare}");
        // Bound to the proxy's certificate: accepted; to another one (a man in the middle): not.
        for (client_sees, accepted) in [(hash, true), ([1u8; 32], false)] {
            let exchange = ServerExchange::start(
                MECHANISM_PLUS,
                first.as_bytes(),
                &keys,
                Binding::Tls(&hash),
                "s",
            )
            .unwrap();
            let fin = client_final("pw", gs2, &client_sees, bare, exchange.server_first());
            match exchange.finish(fin.as_bytes(), &keys) {
                Ok(_) => assert!(accepted),
                Err(e) => assert!(!accepted && matches!(e, ScramError::ChannelBinding(_)), "{e}"),
            }
        }
        let start = |mech, first: &str, binding| {
            ServerExchange::start(mech, first.as_bytes(), &keys, binding, "s").map(|_| ())
        };
        assert!(matches!(
            start(MECHANISM, "y,,n=,r=a", Binding::Tls(&hash)),
            Err(ScramError::ChannelBinding(_))
        ));
        assert!(start(MECHANISM, "y,,n=,r=a", Binding::None).is_ok());
        assert!(matches!(
            start(MECHANISM_PLUS, "n,,n=,r=a", Binding::Tls(&hash)),
            Err(ScramError::ChannelBinding(_))
        ));
        assert!(matches!(
            start(MECHANISM_PLUS, &first, Binding::None),
            Err(ScramError::ChannelBinding(_))
        ));
        assert!(matches!(
            start(MECHANISM, &first, Binding::Tls(&hash)),
            Err(ScramError::ChannelBinding(_))
        ));
        assert_eq!(start("PLAIN", "n,,n=,r=a", Binding::None), Err(ScramError::Mechanism));
    }

    #[test]
    fn malformed_messages_are_errors_never_panics() {
        let keys = keys("pw");
        for first in [
            "",
            "n",
            "n,",
            "n,a=x,n=,r=a",
            "n,,",
            "n,,n=",
            "n,,n=,r=",
            "n,,m=x,r=a",
            "q,,n=,r=a",
            "n,,n=,r=a b",
            "n,,x=,r=a",
        ] {
            assert!(
                ServerExchange::start(MECHANISM, first.as_bytes(), &keys, Binding::None, "s")
                    .is_err(),
                "{first:?}"
            );
        }
        for fin in [
            "",
            "p=",
            "c=biws,p=AAAA",
            "c=biws,r=as,p=!!",
            "c=biws,r=as,p=AAAA",
            "c=x,r=as,p=AAAA",
            ",p=",
            "c=biws,r=a\u{0}s,p=",
        ] {
            let exchange =
                ServerExchange::start(MECHANISM, b"n,,n=,r=a", &keys, Binding::None, "s").unwrap();
            assert!(exchange.finish(fin.as_bytes(), &keys).is_err(), "{fin:?}");
        }
        let client = ClientExchange::start(Binding::None, "abc".into());
        let key = ClientKey([0; KEY_LEN]);
        for first in ["", "r=ab,s=AAAA,i=1", "r=abcX", "r=abcX,s=!,i=4096", "r=abcX,s=AAAA,i=x"] {
            assert!(client.finish(first.as_bytes(), &keys, &key).is_err(), "{first:?}");
        }
        for bad in ["SCRAM-SHA-256$0:AAAA$AA==:AA==", "md5abc", "SCRAM-SHA-256$4096:$x:y", ""] {
            assert!(Keys::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        // SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID ecdsa-with-SHA384 } }
        let mut cert = vec![0x30, 0x0e, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08];
        cert.extend_from_slice(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]);
        assert_eq!(end_point_hash(&cert).len(), 48);
        cert[15] = 0x02; // ecdsa-with-SHA256
        assert_eq!(end_point_hash(&cert).len(), 32);
        assert_eq!(end_point_hash(&[0x30, 0x85, 1]).len(), 32);
        assert_eq!(end_point_hash(&[]).len(), 32);
    }
}
