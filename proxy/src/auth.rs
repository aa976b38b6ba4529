//! The authentication exchange, relayed between client and node message by message until the
//! node says `ReadyForQuery`. The only message changed on the way is `BackendKeyData`: the client
//! gets the proxy's key, registered in the cancel map against the node's real one.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cancel::{CancelGuard, CancelKey, CancelMap, CancelTarget};
use crate::protocol::{self, tag};
use crate::stream::ClientStream;

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
    #[error("the node did not answer in time")]
    NodeTimeout,
    #[error("the client did not answer in time")]
    ClientTimeout,
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
    node: &mut TcpStream,
    node_addr: SocketAddr,
    startup_packet: &[u8],
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
    loop {
        let (msg_tag, len) =
            tokio::time::timeout(deadlines.node, next_node_message(node, &mut inbuf))
                .await
                .map_err(|_| AuthError::NodeTimeout)??;
        let message = inbuf.split_to(len);
        match msg_tag {
            tag::BACKEND_KEY_DATA if len == 13 => {
                let pid = i32::from_be_bytes(message[5..9].try_into().expect("13 bytes"));
                let secret = i32::from_be_bytes(message[9..13].try_into().expect("13 bytes"));
                let target = CancelTarget { node: node_addr, key: CancelKey { pid, secret } };
                let guard = cancels.register(target);
                let key = guard.key();
                out.extend_from_slice(&protocol::backend_key_data(key.pid, key.secret));
                cancel = Some(guard);
            }
            tag::READY_FOR_QUERY => {
                out.extend_from_slice(&message);
                out.extend_from_slice(&inbuf);
                send_within(client, &out, deadlines.client).await?;
                return Ok(Authenticated { _cancel: cancel, leftover: inbuf });
            }
            tag::ERROR_RESPONSE => {
                out.extend_from_slice(&message);
                send_within(client, &out, deadlines.client).await?;
                return Err(AuthError::Refused);
            }
            tag::AUTHENTICATION if len >= 9 => {
                out.extend_from_slice(&message);
                let code = i32::from_be_bytes(message[5..9].try_into().expect("9 bytes"));
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
            tag::AUTHENTICATION | tag::BACKEND_KEY_DATA => return Err(AuthError::NodeProtocol),
            _ => out.extend_from_slice(&message),
        }
    }
}

/// Authentication requests the client must answer: cleartext, MD5, GSS/SSPI, SASL steps.
fn needs_client_response(code: i32) -> bool {
    matches!(code, 2 | 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

/// Buffers until `inbuf` starts with a whole message; returns its tag and total length.
async fn next_node_message(
    node: &mut TcpStream,
    inbuf: &mut BytesMut,
) -> Result<(u8, usize), AuthError> {
    loop {
        if inbuf.len() >= 5 {
            let len = i32::from_be_bytes(inbuf[1..5].try_into().expect("5 bytes"));
            if !(4..=MAX_NODE_STARTUP_MESSAGE as i32).contains(&len) {
                return Err(AuthError::NodeProtocol);
            }
            let total = 1 + len as usize;
            if inbuf.len() >= total {
                return Ok((inbuf[0], total));
            }
            inbuf.reserve(total - inbuf.len());
        }
        if node.read_buf(inbuf).await.map_err(AuthError::Node)? == 0 {
            return Err(AuthError::Node(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

async fn read_client_message(client: &mut ClientStream) -> Result<BytesMut, AuthError> {
    let mut header = [0u8; 5];
    client.read_exact(&mut header).await.map_err(AuthError::Client)?;
    let len = i32::from_be_bytes(header[1..5].try_into().expect("5 bytes"));
    if !(4..=MAX_CLIENT_AUTH_MESSAGE as i32).contains(&len) {
        return Err(AuthError::ClientProtocol);
    }
    let mut message = BytesMut::zeroed(1 + len as usize);
    message[..5].copy_from_slice(&header);
    client.read_exact(&mut message[5..]).await.map_err(AuthError::Client)?;
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
