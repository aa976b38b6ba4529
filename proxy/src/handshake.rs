//! The client's side of connection start: SSL/GSS negotiation, then a startup packet or a
//! cancel request. Returns a typed phase; nothing here talks to a node.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cancel::CancelKey;
use crate::metrics::Metrics;
use crate::protocol::{self, Request, SqlState, StartupParams};
use crate::stream::ClientStream;
use crate::tls::TlsStore;

/// What a client asked for.
pub enum Handshake {
    Startup(Startup),
    /// A cancel request, and the connection it came on (to be closed cleanly: a TLS client
    /// expects a close_notify, not a bare end of stream).
    Cancel(CancelKey, ClientStream),
}

/// A client that sent a startup packet.
pub struct Startup {
    pub stream: ClientStream,
    pub params: StartupParams,
    /// The whole packet, length included, relayed to the node unchanged.
    pub packet: Vec<u8>,
    /// Over TLS: the `tls-server-end-point` data of the certificate the client saw.
    pub end_point: Option<Arc<[u8]>>,
    /// Over TLS: the server name the client asked for (SNI), lower-case.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client broke the protocol; it was told so with an `08P01` error where possible.
    #[error("{0}")]
    Protocol(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the start of a connection until the client sends a startup packet or a cancel request.
pub async fn accept(
    tcp: TcpStream,
    tls: &TlsStore,
    max_packet: usize,
    metrics: &Metrics,
) -> Result<Handshake, HandshakeError> {
    let mut end_point = None;
    let mut stream = match direct_tls(tcp, tls, metrics).await? {
        Ok((tls, hash)) => {
            end_point = Some(hash);
            ClientStream::Tls(Box::new(tls))
        }
        Err(tcp) => ClientStream::Plain(tcp),
    };
    let mut gss_refused = false;
    loop {
        let packet = read_packet(&mut stream, max_packet).await?;
        let request = match protocol::classify(&packet) {
            Ok(request) => request,
            Err(message) => return reject(stream, &message).await,
        };
        match request {
            Request::Ssl => {
                let ClientStream::Plain(mut tcp) = stream else {
                    return reject(stream, "SSLRequest received on a TLS connection").await;
                };
                let Some(acceptor) = tls.acceptor() else {
                    tcp.write_all(&[protocol::ENCRYPTION_REFUSED]).await?;
                    stream = ClientStream::Plain(tcp);
                    continue;
                };
                tcp.write_all(&[protocol::ENCRYPTION_ACCEPTED]).await?;
                // Nothing was read past the SSLRequest, so no plaintext can leak into the TLS
                // session: bytes the client sent early are fed to the TLS handshake and fail it.
                match acceptor.acceptor.accept(tcp).await {
                    Ok(tls) => {
                        metrics.tls_handshake(true);
                        end_point = Some(acceptor.end_point.clone());
                        stream = ClientStream::Tls(Box::new(tls));
                    }
                    Err(e) => {
                        metrics.tls_handshake(false);
                        return Err(HandshakeError::Tls(e));
                    }
                }
            }
            Request::GssEnc if !gss_refused => {
                if stream.is_tls() {
                    return reject(stream, "GSSENCRequest received on a TLS connection").await;
                }
                stream.write_all(&[protocol::ENCRYPTION_REFUSED]).await?;
                gss_refused = true;
            }
            Request::GssEnc => return reject(stream, "GSSENCRequest sent twice").await,
            Request::Cancel(pid, secret) => {
                return Ok(Handshake::Cancel(CancelKey { pid, secret }, stream));
            }
            Request::Startup(params) => {
                let server_name = match &stream {
                    ClientStream::Tls(tls) => tls.get_ref().1.server_name().map(str::to_owned),
                    ClientStream::Plain(_) => None,
                };
                let server_name = server_name.map(|n| n.to_ascii_lowercase());
                let startup = Startup { stream, params, packet, end_point, server_name };
                return Ok(Handshake::Startup(startup));
            }
        }
    }
}

/// The first byte of a TLS handshake record: a client opening with a ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`): a connection that opens with a TLS
/// ClientHello is accepted without the SSLRequest round trip, if it names the `postgresql`
/// protocol (ALPN), as PostgreSQL itself requires. Any other connection is handed back.
async fn direct_tls(
    tcp: TcpStream,
    tls: &TlsStore,
    metrics: &Metrics,
) -> Result<Result<(TlsStream, Arc<[u8]>), TcpStream>, HandshakeError> {
    let mut first = [0u8; 1];
    let opens_with_tls = tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE;
    let acceptor = match tls.acceptor() {
        Some(acceptor) if opens_with_tls => acceptor,
        _ => return Ok(Err(tcp)),
    };
    let mut stream = match acceptor.acceptor.accept(tcp).await {
        Ok(stream) => stream,
        Err(e) => {
            metrics.tls_handshake(false);
            return Err(HandshakeError::Tls(e));
        }
    };
    metrics.tls_handshake(true);
    if stream.get_ref().1.alpn_protocol() != Some(protocol::ALPN) {
        let message = "direct TLS without the postgresql ALPN protocol";
        let _ = stream.write_all(&protocol::fatal(SqlState::ProtocolViolation, message)).await;
        let _ = stream.shutdown().await;
        return Err(HandshakeError::Protocol(message.into()));
    }
    Ok(Ok((stream, acceptor.end_point.clone())))
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Reads one length-prefixed packet, checking the length before allocating.
async fn read_packet(stream: &mut ClientStream, max: usize) -> Result<Vec<u8>, HandshakeError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = i32::from_be_bytes(len);
    if len < 8 || len as usize > max {
        let message = format!("invalid length of startup packet: {len}");
        stream.write_all(&protocol::fatal(SqlState::ProtocolViolation, &message)).await?;
        stream.flush().await?;
        return Err(HandshakeError::Protocol(message));
    }
    let mut packet = vec![0u8; len as usize];
    packet[..4].copy_from_slice(&len.to_be_bytes());
    stream.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

async fn reject<T>(mut stream: ClientStream, message: &str) -> Result<T, HandshakeError> {
    stream.write_all(&protocol::fatal(SqlState::ProtocolViolation, message)).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Err(HandshakeError::Protocol(message.to_owned()))
}
