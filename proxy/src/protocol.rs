//! The few PostgreSQL wire-protocol messages the proxy reads or writes itself.
//!
//! Everything else is relayed as bytes. Lengths are checked before anything is allocated. The
//! messages the proxy sends to nodes as a client are encoded by `postgres-protocol` (the
//! codec tokio-postgres uses); what it answers clients as a server, and what it parses, is here.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

/// The ALPN protocol name of PostgreSQL over TLS.
pub const ALPN: &[u8] = b"postgresql";
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const PROTOCOL_MAJOR_3: u32 = 3;

/// Message tags: the only place the code spells a tag byte (a tag means one thing from a
/// client and another from a server: `D` is `Describe` one way and `DataRow` the other).
pub mod tag {
    /// What a client (frontend) sends.
    pub mod frontend {
        pub const QUERY: u8 = b'Q';
        pub const PARSE: u8 = b'P';
        pub const BIND: u8 = b'B';
        pub const DESCRIBE: u8 = b'D';
        pub const EXECUTE: u8 = b'E';
        pub const CLOSE: u8 = b'C';
        pub const SYNC: u8 = b'S';
        pub const FLUSH: u8 = b'H';
        pub const FUNCTION_CALL: u8 = b'F';
        pub const TERMINATE: u8 = b'X';
        /// `PasswordMessage`, `SASLInitialResponse` and `SASLResponse`.
        pub const PASSWORD: u8 = b'p';
        /// A `Describe` or `Close` of a prepared statement (not a portal).
        pub const STATEMENT: u8 = b'S';

        /// Whether a message of `tag` is answered up to a `ReadyForQuery`.
        pub fn answered_by_ready(tag: u8) -> bool {
            matches!(tag, QUERY | SYNC | FUNCTION_CALL)
        }
    }

    /// What a server (backend) sends.
    pub mod backend {
        pub const AUTHENTICATION: u8 = b'R';
        pub const BACKEND_KEY_DATA: u8 = b'K';
        pub const PARAMETER_STATUS: u8 = b'S';
        pub const READY_FOR_QUERY: u8 = b'Z';
        pub const ERROR_RESPONSE: u8 = b'E';
        pub const NOTICE_RESPONSE: u8 = b'N';
        pub const NOTIFICATION_RESPONSE: u8 = b'A';
        pub const PARSE_COMPLETE: u8 = b'1';
        pub const BIND_COMPLETE: u8 = b'2';
        pub const CLOSE_COMPLETE: u8 = b'3';
        pub const ROW_DESCRIPTION: u8 = b'T';
        pub const NO_DATA: u8 = b'n';
        pub const DATA_ROW: u8 = b'D';
        pub const COMMAND_COMPLETE: u8 = b'C';
        pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
        pub const PORTAL_SUSPENDED: u8 = b's';
        /// Both ways, during `COPY`.
        pub const COPY_DATA: u8 = b'd';
    }
}

/// A `ReadyForQuery`'s transaction status (`T` is in a block, which the proxy only relays).
pub mod status {
    pub const IDLE: u8 = b'I';
    pub const FAILED_BLOCK: u8 = b'E';
}

/// The one-byte answers to an `SSLRequest` or `GSSENCRequest`.
pub const ENCRYPTION_ACCEPTED: u8 = b'S';
pub const ENCRYPTION_REFUSED: u8 = b'N';

/// The size of a message header: a tag byte and a 4-byte length (which counts itself).
pub const HEADER: usize = 5;

/// The tag and length field of the message at the start of `buf`, once its header is there.
pub fn header(buf: &[u8]) -> Option<(u8, i32)> {
    let len = i32::from_be_bytes(buf.get(1..HEADER)?.try_into().ok()?);
    Some((buf[0], len))
}

/// The tag and total size of the whole message at the start of `buf`, once it is all there.
pub fn frame(buf: &[u8]) -> Option<(u8, usize)> {
    let (tag, len) = header(buf)?;
    let total = 1 + usize::try_from(len).ok()?;
    (buf.len() >= total).then_some((tag, total))
}

/// Field codes of an `ErrorResponse` or `NoticeResponse` body.
pub mod field {
    pub const SEVERITY: u8 = b'S';
    /// The severity, never localized.
    pub const SEVERITY_RAW: u8 = b'V';
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
}

/// The value of field `kind` of an `ErrorResponse` body (after its header).
pub fn error_field(body: &[u8], kind: u8) -> Option<&[u8]> {
    body.split(|b| *b == 0).find_map(|f| f.strip_prefix(&[kind]))
}

/// Whether an `ErrorResponse` body is FATAL (or PANIC): the server ends the connection.
pub fn is_fatal(body: &[u8]) -> bool {
    (body.split(|b| *b == 0))
        .find_map(|f| {
            f.strip_prefix(&[field::SEVERITY_RAW]).or_else(|| f.strip_prefix(&[field::SEVERITY]))
        })
        .is_some_and(|s| s == b"FATAL" || s == b"PANIC")
}

/// The name and value of a `ParameterStatus` body (after its header).
pub fn parameter(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// A SQLSTATE the proxy reports itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlState {
    /// 08P01 protocol_violation
    ProtocolViolation,
    /// 28000 invalid_authorization_specification
    InvalidAuthorization,
    /// 3D000 invalid_catalog_name
    UnknownDatabase,
    /// 53300 too_many_connections
    TooManyConnections,
    /// 28P01 invalid_password
    InvalidPassword,
    /// 57P01 admin_shutdown
    AdminShutdown,
    /// 57P03 cannot_connect_now
    CannotConnectNow,
    /// 0A000 feature_not_supported
    FeatureNotSupported,
}

impl SqlState {
    pub fn code(self) -> &'static str {
        match self {
            Self::ProtocolViolation => "08P01",
            Self::InvalidAuthorization => "28000",
            Self::InvalidPassword => "28P01",
            Self::UnknownDatabase => "3D000",
            Self::TooManyConnections => "53300",
            Self::AdminShutdown => "57P01",
            Self::CannotConnectNow => "57P03",
            Self::FeatureNotSupported => "0A000",
        }
    }
}

/// An `ErrorResponse` with severity FATAL.
pub fn fatal(state: SqlState, message: &str) -> BytesMut {
    error_response("FATAL", state, message)
}

/// An `ErrorResponse` with severity ERROR: the session goes on.
pub fn error(state: SqlState, message: &str) -> BytesMut {
    error_response("ERROR", state, message)
}

fn error_response(severity: &str, state: SqlState, message: &str) -> BytesMut {
    let mut body = BytesMut::with_capacity(32 + message.len());
    for (kind, value) in [
        (field::SEVERITY, severity),
        (field::SEVERITY_RAW, severity),
        (field::CODE, state.code()),
        (field::MESSAGE, message),
    ] {
        body.put_u8(kind);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut msg = BytesMut::with_capacity(5 + body.len());
    msg.put_u8(tag::backend::ERROR_RESPONSE);
    msg.put_i32((4 + body.len()) as i32);
    msg.put_slice(&body);
    msg
}

/// `ReadyForQuery` with a transaction status (`I`, `T`, `E`).
pub fn ready_for_query(status: u8) -> [u8; 6] {
    [tag::backend::READY_FOR_QUERY, 0, 0, 0, 5, status]
}

/// A backend or frontend message: `tag`, length, `body`.
pub fn message(tag: u8, body: &[u8]) -> BytesMut {
    let mut msg = BytesMut::with_capacity(5 + body.len());
    msg.put_u8(tag);
    msg.put_i32((4 + body.len()) as i32);
    msg.put_slice(body);
    msg
}

/// `ParameterStatus` `name` = `value`.
pub fn parameter_status(name: &str, value: &str) -> BytesMut {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    for part in [name, value] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    message(tag::backend::PARAMETER_STATUS, &body)
}

/// A simple-protocol `Query`.
pub fn query(sql: &str) -> BytesMut {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    message(tag::frontend::QUERY, &body)
}

/// A protocol 3.0 `StartupMessage` with `params`.
pub fn startup_message(params: &[(&str, &str)]) -> BytesMut {
    let mut body = Vec::new();
    body.extend_from_slice(&(PROTOCOL_MAJOR_3 << 16).to_be_bytes());
    for (name, value) in params {
        for part in [name, value] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut msg = BytesMut::with_capacity(4 + body.len());
    msg.put_i32((4 + body.len()) as i32);
    msg.put_slice(&body);
    msg
}

/// Every `name`/`value` pair of a startup packet (length and version included), in order.
pub fn startup_pairs(packet: &[u8]) -> Vec<(String, String)> {
    let list = packet.get(8..).unwrap_or_default();
    let items: Vec<&[u8]> = list.split(|&b| b == 0).collect();
    items
        .chunks_exact(2)
        .take_while(|pair| !pair[0].is_empty())
        .filter_map(|pair| {
            Some((
                std::str::from_utf8(pair[0]).ok()?.to_owned(),
                std::str::from_utf8(pair[1]).ok()?.to_owned(),
            ))
        })
        .collect()
}

/// `BackendKeyData` with the given key.
pub fn backend_key_data(pid: i32, secret: i32) -> [u8; 13] {
    let mut m = [0u8; 13];
    m[0] = tag::backend::BACKEND_KEY_DATA;
    m[1..5].copy_from_slice(&12i32.to_be_bytes());
    m[5..9].copy_from_slice(&pid.to_be_bytes());
    m[9..13].copy_from_slice(&secret.to_be_bytes());
    m
}

/// Authentication request codes.
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// An `Authentication*` message with `code` and `data` after it.
pub fn authentication(code: i32, data: &[u8]) -> BytesMut {
    let mut msg = BytesMut::with_capacity(9 + data.len());
    msg.put_u8(tag::backend::AUTHENTICATION);
    msg.put_i32((8 + data.len()) as i32);
    msg.put_i32(code);
    msg.put_slice(data);
    msg
}

/// `AuthenticationSASL` offering `mechanisms`.
pub fn authentication_sasl(mechanisms: &[&str]) -> BytesMut {
    let mut list = Vec::new();
    for m in mechanisms {
        list.extend_from_slice(m.as_bytes());
        list.push(0);
    }
    list.push(0);
    authentication(auth_code::SASL, &list)
}

/// The mechanisms an `AuthenticationSASL` body (after the code) lists.
pub fn sasl_mechanisms(body: &[u8]) -> Vec<&[u8]> {
    body.split(|b| *b == 0).take_while(|m| !m.is_empty()).collect()
}

/// A `SASLInitialResponse` (`p`): mechanism, then the client's first message.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> BytesMut {
    let mut msg = BytesMut::with_capacity(10 + mechanism.len() + data.len());
    frontend::sasl_initial_response(mechanism, data, &mut msg)
        .expect("mechanism without NUL, data under 2 GiB");
    msg
}

/// A `SASLResponse` (`p`) carrying `data`.
pub fn sasl_response(data: &[u8]) -> BytesMut {
    let mut msg = BytesMut::with_capacity(5 + data.len());
    frontend::sasl_response(data, &mut msg).expect("data under 2 GiB");
    msg
}

/// The mechanism and data of a `SASLInitialResponse` body (after tag and length).
pub fn parse_sasl_initial_response(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    let mechanism = std::str::from_utf8(&body[..end]).ok()?;
    let rest = &body[end + 1..];
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    // -1: no initial response, which SCRAM does not allow.
    (usize::try_from(len).ok()? == data.len()).then_some((mechanism, data))
}

/// An `SSLRequest` packet.
pub fn ssl_request() -> BytesMut {
    let mut m = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut m);
    m
}

/// A `CancelRequest` packet.
pub fn cancel_request(pid: i32, secret: i32) -> BytesMut {
    let mut m = BytesMut::with_capacity(16);
    frontend::cancel_request(pid, secret, &mut m);
    m
}

/// What a client's first packets (length prefix included) ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Ssl,
    GssEnc,
    /// A `CancelRequest`: process id and secret.
    Cancel(i32, i32),
    Startup(StartupParams),
}

/// Reads one packet of the connection start; the error is the message for the client.
pub fn classify(packet: &[u8]) -> Result<Request, String> {
    if packet.len() < 8
        || i32::from_be_bytes(packet[..4].try_into().expect("4")) as usize != packet.len()
    {
        return Err(format!("invalid length of startup packet: {}", packet.len()));
    }
    let code = u32::from_be_bytes(packet[4..8].try_into().expect("8 bytes checked"));
    match code {
        SSL_REQUEST_CODE if packet.len() == 8 => Ok(Request::Ssl),
        GSSENC_REQUEST_CODE if packet.len() == 8 => Ok(Request::GssEnc),
        CANCEL_REQUEST_CODE if packet.len() == 16 => {
            let pid = i32::from_be_bytes(packet[8..12].try_into().expect("16 bytes"));
            let secret = i32::from_be_bytes(packet[12..16].try_into().expect("16 bytes"));
            Ok(Request::Cancel(pid, secret))
        }
        code if code >> 16 == PROTOCOL_MAJOR_3 => {
            parse_startup_params(&packet[8..]).map(Request::Startup).map_err(|e| e.to_string())
        }
        code => Err(format!(
            "unsupported frontend protocol {}.{}: server supports 3.0",
            code >> 16,
            code & 0xffff
        )),
    }
}

/// The parameters of a `StartupMessage` body (after the protocol version).
#[derive(Debug, PartialEq, Eq)]
pub struct StartupParams {
    pub user: String,
    pub database: String,
}

/// Why a startup packet could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartupParseError {
    #[error("invalid startup packet layout: expected terminator as last byte")]
    Layout,
    #[error("startup packet parameters are not valid UTF-8")]
    Encoding,
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

/// Parses the `name\0value\0...\0` list of a startup packet.
pub fn parse_startup_params(body: &[u8]) -> Result<StartupParams, StartupParseError> {
    let list = body.strip_suffix(&[0]).ok_or(StartupParseError::Layout)?;
    let items: Vec<&[u8]> = match list {
        [] => Vec::new(),
        _ => list.strip_suffix(&[0]).ok_or(StartupParseError::Layout)?.split(|&b| b == 0).collect(),
    };
    let pairs = items.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return Err(StartupParseError::Layout);
    }
    let (mut user, mut database) = (None, None);
    for pair in pairs {
        let value = std::str::from_utf8(pair[1]).map_err(|_| StartupParseError::Encoding)?;
        match pair[0] {
            b"user" => user = Some(value.to_owned()),
            b"database" => database = Some(value.to_owned()),
            _ => {}
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or(StartupParseError::NoUser)?;
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    Ok(StartupParams { user, database })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_and_database() {
        let p = parse_startup_params(b"user\0alice\0database\0app\0application_name\0psql\0\0");
        assert_eq!(p.unwrap(), StartupParams { user: "alice".into(), database: "app".into() });
    }

    #[test]
    fn database_defaults_to_user() {
        let p = parse_startup_params(b"user\0bob\0\0").unwrap();
        assert_eq!(p.database, "bob");
    }

    #[test]
    fn rejects_malformed_lists() {
        assert_eq!(parse_startup_params(b""), Err(StartupParseError::Layout));
        assert_eq!(parse_startup_params(b"user\0bob\0"), Err(StartupParseError::Layout));
        assert_eq!(parse_startup_params(b"user\0\0"), Err(StartupParseError::Layout));
        assert_eq!(parse_startup_params(b"\0"), Err(StartupParseError::NoUser));
        assert_eq!(parse_startup_params(b"user\0\xff\0\0"), Err(StartupParseError::Encoding));
    }

    #[test]
    fn sasl_messages_round_trip_and_bad_lengths_are_refused() {
        let m = sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x");
        assert_eq!(i32::from_be_bytes(m[1..5].try_into().unwrap()) as usize + 1, m.len());
        assert_eq!(
            parse_sasl_initial_response(&m[5..]),
            Some(("SCRAM-SHA-256", &b"n,,n=,r=x"[..]))
        );
        for bad in [&b""[..], b"SCRAM", b"SCRAM\0\0\0", b"S\0\xff\xff\xff\xff", b"S\0\0\0\0\x05ab"]
        {
            assert_eq!(parse_sasl_initial_response(bad), None, "{bad:?}");
        }
        let offer = authentication_sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(
            sasl_mechanisms(&offer[9..]),
            [&b"SCRAM-SHA-256-PLUS"[..], &b"SCRAM-SHA-256"[..]]
        );
        assert!(sasl_mechanisms(b"").is_empty());
    }

    #[test]
    fn fatal_message_is_well_framed() {
        let m = fatal(SqlState::UnknownDatabase, "no such database");
        assert_eq!(m[0], b'E');
        let len = i32::from_be_bytes(m[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, m.len());
        assert!(m.windows(6).any(|w| w == b"C3D000"));
        assert_eq!(*m.last().unwrap(), 0);
    }
}
