//! Authentication, in one of two ways chosen by the route:
//!
//! - the proxy authenticates the client itself ([`authenticate_client`], SCRAM-SHA-256, and
//!   SCRAM-SHA-256-PLUS over TLS) against the user's verifier, then logs in to the node as the
//!   same user with the ClientKey the client's proof revealed ([`Login`]);
//! - or the exchange is relayed between client and node message by message.
//!
//! Either way the node's messages up to `ReadyForQuery` reach the client; the only one changed
//! on the way is `BackendKeyData`, whose secret is the proxy's (registered in the cancel map
//! against the node's real key).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cancel::{CancelGuard, CancelKey, CancelMap, CancelTarget, NodeAddress};
use crate::protocol::{self, auth_code, tag};
use crate::routes::Credential;
use crate::scram::{self, Binding, ClientExchange, ClientKey, Keys, ScramError, ServerExchange};
use crate::stream::{ClientStream, NodeStream};

/// PostgreSQL's own bound on an authentication token (`PG_MAX_AUTH_TOKEN_LENGTH`).
const MAX_CLIENT_AUTH_MESSAGE: usize = 65_535;
/// Bound on one node message during startup (parameter status, notices, errors).
const MAX_NODE_STARTUP_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("client connection failed during authentication: {0}")]
    Client(std::io::Error),
    #[error("node connection failed during authentication: {0}")]
    Node(std::io::Error),
    #[error("client sent an invalid authentication message")]
    ClientProtocol,
    #[error("node sent an invalid message during startup")]
    NodeProtocol,
    /// The node refused the session; its ErrorResponse was relayed to the client.
    #[error("node refused the session")]
    Refused,
    /// The node refused a session the proxy opened for itself (transaction pooling): its
    /// SQLSTATE and message.
    #[error("the node refused the session: {code} {message}")]
    NodeRefused { code: String, message: String },
    #[error("the node did not answer in time")]
    NodeTimeout,
    #[error("the client did not answer in time")]
    ClientTimeout,
    /// Wrong password, or a user the proxy does not know (the client cannot tell which).
    #[error("password authentication failed for user {0:?}")]
    BadPassword(String),
    #[error("user {0:?} has a password the proxy cannot check (not a SCRAM verifier)")]
    NotScram(String),
    #[error("client's SCRAM exchange failed: {0}")]
    ClientScram(ScramError),
    #[error("logging in to the node failed: {0}")]
    NodeScram(ScramError),
    #[error("the node asked for authentication code {0}, but the proxy logs in with SCRAM only")]
    NodeMethod(i32),
}

/// What the proxy logs in to the node with: the user's verifier and the ClientKey the client
/// proved it has.
#[derive(Clone)]
pub struct Login {
    keys: Keys,
    client_key: ClientKey,
}

/// Runs the client's SCRAM exchange for `user` (`None`: a user the route does not list, which
/// fails the same way as a wrong password, after the same exchange). `end_point` is the
/// `tls-server-end-point` hash of the proxy's certificate when the client came over TLS: then
/// `SCRAM-SHA-256-PLUS` is offered first. On success the client has had `AuthenticationSASLFinal`;
/// `AuthenticationOk` comes from the node.
pub async fn authenticate_client(
    client: &mut ClientStream,
    user: &str,
    credential: Option<&Credential>,
    decoy_secret: &[u8; 32],
    end_point: Option<&[u8]>,
    limit: std::time::Duration,
) -> Result<Login, AuthError> {
    let keys = match credential {
        Some(Credential::Scram(keys)) => Some(keys.clone()),
        Some(Credential::Unsupported) => return Err(AuthError::NotScram(user.to_owned())),
        None => None,
    };
    let known = keys.is_some();
    let keys = keys.unwrap_or_else(|| Keys::decoy(user, decoy_secret));
    let (offer, binding) = match end_point {
        Some(hash) => (
            protocol::authentication_sasl(&[scram::MECHANISM_PLUS, scram::MECHANISM]),
            Binding::Tls(hash),
        ),
        None => (protocol::authentication_sasl(&[scram::MECHANISM]), Binding::None),
    };
    send_within(client, &offer, limit).await?;
    let initial = read_client_within(client, limit).await?;
    let (mechanism, client_first) =
        protocol::parse_sasl_initial_response(&initial[5..]).ok_or(AuthError::ClientProtocol)?;
    let exchange = ServerExchange::start(mechanism, client_first, &keys, binding, &scram::nonce())
        .map_err(AuthError::ClientScram)?;
    let server_first = exchange.server_first().as_bytes();
    send_within(client, &protocol::authentication(auth_code::SASL_CONTINUE, server_first), limit)
        .await?;
    let response = read_client_within(client, limit).await?;
    match exchange.finish(&response[5..], &keys) {
        Ok((client_key, server_final)) if known => {
            let last = protocol::authentication(auth_code::SASL_FINAL, server_final.as_bytes());
            send_within(client, &last, limit).await?;
            Ok(Login { keys, client_key })
        }
        Ok(_) | Err(ScramError::BadProof) => Err(AuthError::BadPassword(user.to_owned())),
        Err(e) => Err(AuthError::ClientScram(e)),
    }
}

/// A client message that must come within `limit`; only `p` (SASL) messages are expected.
async fn read_client_within(
    client: &mut ClientStream,
    limit: std::time::Duration,
) -> Result<BytesMut, AuthError> {
    let message = tokio::time::timeout(limit, read_client_message(client))
        .await
        .map_err(|_| AuthError::ClientTimeout)??;
    if message[0] != tag::frontend::PASSWORD {
        return Err(AuthError::ClientProtocol);
    }
    Ok(message)
}

/// The node's side of a SCRAM login in progress.
enum NodeExchange {
    None,
    Started(ClientExchange),
    Sent { expected: String },
}

/// How long each side has for each of its steps.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// For each message the client must send.
    pub client: std::time::Duration,
    /// For each answer of the node.
    pub node: std::time::Duration,
}

/// A session ready for queries.
pub struct Authenticated {
    /// Present when the node sent a key; held for the session, dropping it forgets the key.
    pub _cancel: Option<CancelGuard>,
    /// Bytes the node sent after `ReadyForQuery` (already relayed to the client).
    pub leftover: BytesMut,
}

pub async fn relay(
    client: &mut ClientStream,
    node: &mut NodeStream,
    node_addr: NodeAddress,
    startup_packet: &[u8],
    login: Option<&Login>,
    cancels: &Arc<CancelMap>,
    deadlines: Deadlines,
) -> Result<Authenticated, AuthError> {
    tokio::time::timeout(deadlines.node, node.write_all(startup_packet))
        .await
        .map_err(|_| AuthError::NodeTimeout)?
        .map_err(AuthError::Node)?;
    let mut inbuf = BytesMut::with_capacity(2048);
    let mut out = BytesMut::with_capacity(1024);
    let mut cancel = None;
    let mut exchange = NodeExchange::None;
    let end_point = node.end_point();
    loop {
        let (msg_tag, len) =
            tokio::time::timeout(deadlines.node, next_node_message(node, &mut inbuf))
                .await
                .map_err(|_| AuthError::NodeTimeout)??;
        let message = inbuf.split_to(len);
        match msg_tag {
            tag::backend::BACKEND_KEY_DATA if len == 13 => {
                let key = key_of(&message);
                let target = CancelTarget { node: node_addr.clone(), key };
                let guard = cancels.register(target);
                let key = guard.key();
                out.extend_from_slice(&protocol::backend_key_data(key.pid, key.secret));
                cancel = Some(guard);
            }
            tag::backend::READY_FOR_QUERY => {
                out.extend_from_slice(&message);
                out.extend_from_slice(&inbuf);
                send_within(client, &out, deadlines.client).await?;
                return Ok(Authenticated { _cancel: cancel, leftover: inbuf });
            }
            tag::backend::ERROR_RESPONSE => {
                out.extend_from_slice(&message);
                send_within(client, &out, deadlines.client).await?;
                return Err(AuthError::Refused);
            }
            tag::backend::AUTHENTICATION if len >= 9 && login.is_some() => {
                let code = i32::from_be_bytes(message[5..9].try_into().expect("9 bytes"));
                let login = login.expect("checked");
                let binding = end_point.as_deref().map_or(Binding::None, Binding::Tls);
                let answer = log_in(code, &message[9..], login, binding, &mut exchange)?;
                if code == auth_code::OK {
                    out.extend_from_slice(&message);
                }
                if let Some(answer) = answer {
                    tokio::time::timeout(deadlines.node, node.write_all(&answer))
                        .await
                        .map_err(|_| AuthError::NodeTimeout)?
                        .map_err(AuthError::Node)?;
                }
            }
            tag::backend::AUTHENTICATION if len >= 9 => {
                let code = i32::from_be_bytes(message[5..9].try_into().expect("9 bytes"));
                if code == auth_code::SASL && end_point.is_some() {
                    // The node offers -PLUS over its TLS with the proxy, but a client's binding
                    // would be to the proxy's certificate: relayed, only unbound SCRAM works.
                    let unbound: Vec<&str> = protocol::sasl_mechanisms(&message[9..])
                        .into_iter()
                        .filter_map(|m| std::str::from_utf8(m).ok())
                        .filter(|m| !m.ends_with("-PLUS"))
                        .collect();
                    out.extend_from_slice(&protocol::authentication_sasl(&unbound));
                } else {
                    out.extend_from_slice(&message);
                }
                if needs_client_response(code) {
                    send_within(client, &out, deadlines.client).await?;
                    out.clear();
                    let response =
                        tokio::time::timeout(deadlines.client, read_client_message(client))
                            .await
                            .map_err(|_| AuthError::ClientTimeout)??;
                    tokio::time::timeout(deadlines.node, node.write_all(&response))
                        .await
                        .map_err(|_| AuthError::NodeTimeout)?
                        .map_err(AuthError::Node)?;
                }
            }
            tag::backend::AUTHENTICATION | tag::backend::BACKEND_KEY_DATA => {
                return Err(AuthError::NodeProtocol)
            }
            _ => out.extend_from_slice(&message),
        }
    }
}

/// The key of a 13-byte `BackendKeyData` message.
fn key_of(message: &[u8]) -> CancelKey {
    let pid = i32::from_be_bytes(message[5..9].try_into().expect("13 bytes"));
    let secret = i32::from_be_bytes(message[9..13].try_into().expect("13 bytes"));
    CancelKey { pid, secret }
}

/// A server connection of a pool, logged in: the node's `ParameterStatus` values and its
/// cancel key.
pub struct NodeLogin {
    pub params: Vec<(String, String)>,
    pub key: Option<CancelKey>,
}

/// Logs in to the node as `login`'s user with `startup` (no client involved: transaction
/// pooling), each of the node's answers within `limit`.
pub async fn log_in_node(
    node: &mut NodeStream,
    startup: &[u8],
    login: &Login,
    limit: std::time::Duration,
) -> Result<NodeLogin, AuthError> {
    tokio::time::timeout(limit, node.write_all(startup))
        .await
        .map_err(|_| AuthError::NodeTimeout)?
        .map_err(AuthError::Node)?;
    let mut inbuf = BytesMut::with_capacity(2048);
    let mut exchange = NodeExchange::None;
    let end_point = node.end_point();
    let mut out = NodeLogin { params: Vec::new(), key: None };
    loop {
        let (msg_tag, len) = tokio::time::timeout(limit, next_node_message(node, &mut inbuf))
            .await
            .map_err(|_| AuthError::NodeTimeout)??;
        let message = inbuf.split_to(len);
        match msg_tag {
            tag::backend::BACKEND_KEY_DATA if len == 13 => out.key = Some(key_of(&message)),
            tag::backend::READY_FOR_QUERY if inbuf.is_empty() => return Ok(out),
            tag::backend::ERROR_RESPONSE => {
                let field = |kind: u8| {
                    let value = protocol::error_field(&message[protocol::HEADER..], kind);
                    String::from_utf8_lossy(value.unwrap_or_default()).into_owned()
                };
                let (code, message) =
                    (field(protocol::field::CODE), field(protocol::field::MESSAGE));
                return Err(AuthError::NodeRefused { code, message });
            }
            tag::backend::AUTHENTICATION if len >= 9 => {
                let code = i32::from_be_bytes(message[5..9].try_into().expect("9 bytes"));
                let binding = end_point.as_deref().map_or(Binding::None, Binding::Tls);
                if let Some(answer) = log_in(code, &message[9..], login, binding, &mut exchange)? {
                    tokio::time::timeout(limit, node.write_all(&answer))
                        .await
                        .map_err(|_| AuthError::NodeTimeout)?
                        .map_err(AuthError::Node)?;
                }
            }
            tag::backend::PARAMETER_STATUS => {
                out.params.extend(protocol::parameter(&message[protocol::HEADER..]));
            }
            tag::backend::READY_FOR_QUERY
            | tag::backend::AUTHENTICATION
            | tag::backend::BACKEND_KEY_DATA => return Err(AuthError::NodeProtocol),
            _ => {} // notices
        }
    }
}

/// The proxy's answer to the node's authentication message `code` (with `data`), if one is due.
fn log_in(
    code: i32,
    data: &[u8],
    login: &Login,
    binding: Binding<'_>,
    exchange: &mut NodeExchange,
) -> Result<Option<BytesMut>, AuthError> {
    match (code, std::mem::replace(exchange, NodeExchange::None)) {
        (auth_code::OK, NodeExchange::None) => Ok(None),
        (auth_code::SASL, NodeExchange::None) => {
            // Over TLS the node offers -PLUS, and the login is bound to its certificate.
            let offered = protocol::sasl_mechanisms(data);
            let binding = match binding {
                Binding::Tls(_) if offered.contains(&scram::MECHANISM_PLUS.as_bytes()) => binding,
                _ if offered.contains(&scram::MECHANISM.as_bytes()) => Binding::None,
                _ => return Err(AuthError::NodeScram(ScramError::Mechanism)),
            };
            let client = ClientExchange::start(binding, scram::nonce());
            let first = protocol::sasl_initial_response(
                client.mechanism(),
                client.client_first().as_bytes(),
            );
            *exchange = NodeExchange::Started(client);
            Ok(Some(first))
        }
        (auth_code::SASL_CONTINUE, NodeExchange::Started(client)) => {
            let (last, expected) = client
                .finish(data, &login.keys, &login.client_key)
                .map_err(AuthError::NodeScram)?;
            *exchange = NodeExchange::Sent { expected };
            Ok(Some(protocol::sasl_response(last.as_bytes())))
        }
        (auth_code::SASL_FINAL, NodeExchange::Sent { expected }) => {
            scram::check_server_final(data, &expected).map_err(AuthError::NodeScram)?;
            Ok(None)
        }
        (code, _) => Err(AuthError::NodeMethod(code)),
    }
}

/// Authentication requests the client must answer: cleartext, MD5, GSS/SSPI, SASL steps.
fn needs_client_response(code: i32) -> bool {
    matches!(code, 2 | 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

/// Buffers until `inbuf` starts with a whole message; returns its tag and total length.
async fn next_node_message(
    node: &mut NodeStream,
    inbuf: &mut BytesMut,
) -> Result<(u8, usize), AuthError> {
    loop {
        if let Some((tag, len)) = protocol::header(inbuf) {
            if !(4..=MAX_NODE_STARTUP_MESSAGE as i32).contains(&len) {
                return Err(AuthError::NodeProtocol);
            }
            let total = 1 + len as usize;
            if inbuf.len() >= total {
                return Ok((tag, total));
            }
            inbuf.reserve(total - inbuf.len());
        }
        if node.read_buf(inbuf).await.map_err(AuthError::Node)? == 0 {
            return Err(AuthError::Node(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

async fn read_client_message(client: &mut ClientStream) -> Result<BytesMut, AuthError> {
    let mut header = [0u8; protocol::HEADER];
    client.read_exact(&mut header).await.map_err(AuthError::Client)?;
    let (_, len) = protocol::header(&header).ok_or(AuthError::ClientProtocol)?;
    if !(4..=MAX_CLIENT_AUTH_MESSAGE as i32).contains(&len) {
        return Err(AuthError::ClientProtocol);
    }
    let mut message = BytesMut::zeroed(1 + len as usize);
    message[..protocol::HEADER].copy_from_slice(&header);
    client.read_exact(&mut message[protocol::HEADER..]).await.map_err(AuthError::Client)?;
    Ok(message)
}

/// Sends to a client that must take it within `limit`.
async fn send_within(
    client: &mut ClientStream,
    bytes: &[u8],
    limit: std::time::Duration,
) -> Result<(), AuthError> {
    tokio::time::timeout(limit, send(client, bytes)).await.map_err(|_| AuthError::ClientTimeout)?
}

async fn send(client: &mut ClientStream, bytes: &[u8]) -> Result<(), AuthError> {
    client.write_all(bytes).await.map_err(AuthError::Client)?;
    client.flush().await.map_err(AuthError::Client)
}
