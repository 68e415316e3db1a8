//! Sans-IO PostgreSQL wire protocol codec.
//!
//! Sluice only inspects the connection-setup part of the protocol (startup packets, authentication,
//! the server's greeting) and the odd cancel request; after that the bytes are relayed untouched.
//! Like rustls' and quinn-proto's cores, everything here takes byte slices and returns values or
//! bytes, so it is testable and fuzzable without sockets. Decoders return `Ok(None)` when more input
//! is needed, `Ok(Some((value, consumed)))` when a whole packet is there, and an error for input no
//! conforming peer sends. [`Framer`] splits a stream into packets; [`ServerNegotiation`] and
//! [`UpstreamStartup`] are the two sides of connection setup as state machines that drivers
//! feed with bytes read from a socket.

#![forbid(unsafe_code)]

use thiserror::Error;

mod framer;
pub mod negotiation;
pub mod upstream_startup;

pub use framer::Framer;
pub use negotiation::{choose_protocol, Event, NegotiationError, ProtocolChoice, ServerNegotiation, TlsOffer};
pub use upstream_startup::{Greeting, UpstreamEvent, UpstreamStartup, UpstreamStartupError};

/// Magic "protocol version" of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Magic "protocol version" of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Magic "protocol version" of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH); larger ones are hostile.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Upper bound for a regular message during connection setup. The setup phase only carries small
/// messages (passwords, SASL, errors, parameter status); anything near this is garbage.
pub const MAX_SETUP_MESSAGE_LEN: usize = 1 << 20;
/// Largest cancel key protocol 3.2 allows.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// Errors for bytes no conforming PostgreSQL peer sends.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("packet length {0} is out of range")]
    BadLength(usize),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("startup message has no user parameter")]
    NoUser,
}

fn malformed(what: &'static str) -> WireError {
    WireError::Malformed { what }
}

/// A protocol version as sent in a StartupMessage (major in the high 16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    pub const V3_0: ProtocolVersion = ProtocolVersion { major: 3, minor: 0 };
    pub const V3_2: ProtocolVersion = ProtocolVersion { major: 3, minor: 2 };

    pub fn from_code(code: u32) -> Self {
        ProtocolVersion { major: (code >> 16) as u16, minor: (code & 0xffff) as u16 }
    }

    pub fn code(self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

/// The first packet on a connection, before any message has a type byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelRequest),
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: u32,
    /// 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub secret: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: ProtocolVersion,
    /// Parameters in the order the client sent them (user, database, options, `_pq_.*`, ...).
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> Option<&str> {
        self.param("user")
    }

    /// The database, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> Option<&str> {
        self.param("database").filter(|d| !d.is_empty()).or_else(|| self.user())
    }
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Decodes the first packet of a connection (SSLRequest, GSSENCRequest, CancelRequest or
/// StartupMessage). Protocol 3.x of any minor version is accepted; the caller negotiates.
pub fn decode_startup(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = read_u32(buf, 0) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(WireError::BadLength(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let code = read_u32(buf, 4);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST_CODE if body.is_empty() => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if body.is_empty() => StartupPacket::GssEncRequest,
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => return Err(malformed("encryption request")),
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_KEY_LEN {
                return Err(malformed("cancel request"));
            }
            StartupPacket::Cancel(CancelRequest { pid: read_u32(body, 0), secret: body[4..].to_vec() })
        }
        _ => {
            let version = ProtocolVersion::from_code(code);
            if version.major != 3 {
                return Err(WireError::UnsupportedVersion { major: version.major, minor: version.minor });
            }
            StartupPacket::Startup(StartupMessage { version, params: decode_params(body)? })
        }
    };
    Ok(Some((packet, len)))
}

/// Decodes a NUL-separated list of name/value pairs closed by an empty name.
fn decode_params(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    let mut rest = body;
    loop {
        let (name, after) = take_cstr(rest).ok_or(malformed("startup parameters"))?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(malformed("startup parameters"));
            }
            return Ok(params);
        }
        let (value, after) = take_cstr(after).ok_or(malformed("startup parameters"))?;
        params.push((name.to_owned(), value.to_owned()));
        rest = after;
    }
}

/// Splits a NUL-terminated UTF-8 string off the front of `buf`.
fn take_cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..nul]).ok()?;
    Some((s, &buf[nul + 1..]))
}

/// One regular (typed) message: a tag byte and its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

/// Splits one typed message off the front of `buf`. `max_len` bounds the declared length.
pub fn decode_message(buf: &[u8], max_len: usize) -> Result<Option<(Message<'_>, usize)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = read_u32(buf, 1) as usize;
    if len < 4 || len > max_len {
        return Err(WireError::BadLength(len));
    }
    let total = len + 1;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((Message { tag: buf[0], body: &buf[5..total] }, total)))
}

/// Backend messages Sluice acts on during connection setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationMd5Password {
        salt: [u8; 4],
    },
    AuthenticationSasl {
        mechanisms: Vec<String>,
    },
    AuthenticationSaslContinue(Vec<u8>),
    AuthenticationSaslFinal(Vec<u8>),
    /// Any other authentication request (Kerberos, GSS, SSPI...).
    AuthenticationOther(u32),
    ParameterStatus {
        name: String,
        value: String,
    },
    BackendKeyData {
        pid: u32,
        secret: Vec<u8>,
    },
    ReadyForQuery(u8),
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    NegotiateProtocolVersion {
        newest_minor: u32,
        unrecognized: Vec<String>,
    },
    /// Anything else; the caller relays or rejects it.
    Other(u8),
}

impl BackendMessage {
    pub fn parse(msg: Message<'_>) -> Result<Self, WireError> {
        let b = msg.body;
        Ok(match msg.tag {
            b'R' => {
                if b.len() < 4 {
                    return Err(malformed("authentication request"));
                }
                let rest = &b[4..];
                match read_u32(b, 0) {
                    0 => BackendMessage::AuthenticationOk,
                    3 => BackendMessage::AuthenticationCleartextPassword,
                    5 => {
                        let salt: [u8; 4] = rest.try_into().map_err(|_| malformed("md5 salt"))?;
                        BackendMessage::AuthenticationMd5Password { salt }
                    }
                    10 => {
                        let mut mechanisms = Vec::new();
                        let mut rest = rest;
                        loop {
                            let (m, after) = take_cstr(rest).ok_or(malformed("SASL mechanisms"))?;
                            if m.is_empty() {
                                break;
                            }
                            mechanisms.push(m.to_owned());
                            rest = after;
                        }
                        BackendMessage::AuthenticationSasl { mechanisms }
                    }
                    11 => BackendMessage::AuthenticationSaslContinue(rest.to_vec()),
                    12 => BackendMessage::AuthenticationSaslFinal(rest.to_vec()),
                    other => BackendMessage::AuthenticationOther(other),
                }
            }
            b'S' => {
                let (name, rest) = take_cstr(b).ok_or(malformed("parameter status"))?;
                let (value, _) = take_cstr(rest).ok_or(malformed("parameter status"))?;
                BackendMessage::ParameterStatus { name: name.to_owned(), value: value.to_owned() }
            }
            b'K' => {
                if b.len() < 8 || b.len() > 4 + MAX_CANCEL_KEY_LEN {
                    return Err(malformed("backend key data"));
                }
                BackendMessage::BackendKeyData { pid: read_u32(b, 0), secret: b[4..].to_vec() }
            }
            b'Z' => match b {
                [s @ (b'I' | b'T' | b'E')] => BackendMessage::ReadyForQuery(*s),
                _ => return Err(malformed("ready for query")),
            },
            b'E' => BackendMessage::ErrorResponse(ErrorFields::parse(b)?),
            b'N' => BackendMessage::NoticeResponse(ErrorFields::parse(b)?),
            b'v' => {
                if b.len() < 8 {
                    return Err(malformed("negotiate protocol version"));
                }
                let newest_minor = read_u32(b, 0);
                let count = read_u32(b, 4) as usize;
                let mut rest = &b[8..];
                let mut unrecognized = Vec::new();
                for _ in 0..count.min(rest.len()) {
                    let (opt, after) = take_cstr(rest).ok_or(malformed("negotiate protocol version"))?;
                    unrecognized.push(opt.to_owned());
                    rest = after;
                }
                BackendMessage::NegotiateProtocolVersion { newest_minor, unrecognized }
            }
            other => BackendMessage::Other(other),
        })
    }
}

/// The fields of an ErrorResponse or NoticeResponse, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// A FATAL error with the given SQLSTATE and message.
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        ErrorFields {
            fields: vec![
                (b'S', "FATAL".to_owned()),
                (b'V', "FATAL".to_owned()),
                (b'C', code.to_owned()),
                (b'M', message.into()),
            ],
        }
    }

    pub fn with(mut self, field: u8, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.fields.iter_mut().find(|(f, _)| *f == field) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((field, value)),
        }
        self
    }

    pub fn get(&self, field: u8) -> Option<&str> {
        self.fields.iter().find(|(f, _)| *f == field).map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut fields = Vec::new();
        let mut rest = body;
        loop {
            match rest.split_first() {
                Some((0, _)) => return Ok(ErrorFields { fields }),
                Some((&f, after)) => {
                    let (v, after) = take_cstr(after).ok_or(malformed("error fields"))?;
                    fields.push((f, v.to_owned()));
                    rest = after;
                }
                None => return Err(malformed("error fields")),
            }
        }
    }
}

/// Encoders for the messages Sluice writes. Each returns the whole packet.
pub mod encode {
    use super::*;

    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn untyped(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn ssl_request() -> Vec<u8> {
        untyped(SSL_REQUEST_CODE, &[])
    }

    pub fn gssenc_request() -> Vec<u8> {
        untyped(GSSENC_REQUEST_CODE, &[])
    }

    pub fn cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(secret);
        untyped(CANCEL_REQUEST_CODE, &body)
    }

    pub fn startup(version: ProtocolVersion, params: &[(String, String)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in params {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        untyped(version.code(), &body)
    }

    pub fn password(password: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, password);
        typed(b'p', &body)
    }

    pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, mechanism);
        body.extend_from_slice(&(data.len() as u32).to_be_bytes());
        body.extend_from_slice(data);
        typed(b'p', &body)
    }

    pub fn sasl_response(data: &[u8]) -> Vec<u8> {
        typed(b'p', data)
    }

    pub fn auth_ok() -> Vec<u8> {
        typed(b'R', &0u32.to_be_bytes())
    }

    pub fn auth_cleartext() -> Vec<u8> {
        typed(b'R', &3u32.to_be_bytes())
    }

    pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, value);
        typed(b'S', &body)
    }

    pub fn backend_key_data(pid: u32, secret: &[u8]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(secret);
        typed(b'K', &body)
    }

    pub fn ready_for_query(status: u8) -> Vec<u8> {
        typed(b'Z', &[status])
    }

    pub fn negotiate_protocol_version(newest_minor: u16, unrecognized: &[String]) -> Vec<u8> {
        let mut body = u32::from(newest_minor).to_be_bytes().to_vec();
        body.extend_from_slice(&(unrecognized.len() as u32).to_be_bytes());
        for opt in unrecognized {
            cstr(&mut body, opt);
        }
        typed(b'v', &body)
    }

    fn fields(tag: u8, e: &ErrorFields) -> Vec<u8> {
        let mut body = Vec::new();
        for (f, v) in &e.fields {
            body.push(*f);
            // A NUL inside a value would end the field early on the peer's side.
            cstr(&mut body, &v.replace('\0', " "));
        }
        body.push(0);
        typed(tag, &body)
    }

    pub fn error_response(e: &ErrorFields) -> Vec<u8> {
        fields(b'E', e)
    }

    pub fn notice_response(e: &ErrorFields) -> Vec<u8> {
        fields(b'N', e)
    }

    pub fn terminate() -> Vec<u8> {
        typed(b'X', &[])
    }
}

/// Reads the password out of a PasswordMessage body (NUL-terminated string).
pub fn parse_password(body: &[u8]) -> Result<&str, WireError> {
    match take_cstr(body) {
        Some((p, [])) => Ok(p),
        _ => Err(malformed("password message")),
    }
}

/// SQLSTATE codes Sluice answers with.
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// The server is up but cannot take sessions now (an agent without a usable policy).
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ssl_request_roundtrip() {
        let p = encode::ssl_request();
        assert_eq!(decode_startup(&p), Ok(Some((StartupPacket::SslRequest, 8))));
        assert_eq!(decode_startup(&p[..7]), Ok(None));
    }

    #[test]
    fn startup_defaults_database_to_user() {
        let p = encode::startup(ProtocolVersion::V3_0, &[("user".into(), "alice".into())]);
        let Some((StartupPacket::Startup(m), n)) = decode_startup(&p).unwrap() else { panic!() };
        assert_eq!(n, p.len());
        assert_eq!(m.database(), Some("alice"));
    }

    #[test]
    fn rejects_absurd_and_tiny_lengths() {
        let mut p = (20_000_000u32).to_be_bytes().to_vec();
        p.extend_from_slice(&196608u32.to_be_bytes());
        assert_eq!(decode_startup(&p), Err(WireError::BadLength(20_000_000)));
        assert_eq!(decode_startup(&[0, 0, 0, 3, 0, 0, 0, 0]), Err(WireError::BadLength(3)));
    }

    #[test]
    fn rejects_protocol_2_and_unterminated_params() {
        let p = encode::startup(ProtocolVersion { major: 2, minor: 0 }, &[]);
        assert!(matches!(decode_startup(&p), Err(WireError::UnsupportedVersion { major: 2, .. })));
        let mut p = encode::startup(ProtocolVersion::V3_0, &[("user".into(), "a".into())]);
        p.pop();
        let len = p.len() as u32;
        p[..4].copy_from_slice(&len.to_be_bytes());
        assert!(decode_startup(&p).is_err());
    }

    #[test]
    fn cancel_request_with_long_key() {
        let p = encode::cancel_request(7, &[9u8; 32]);
        let Some((StartupPacket::Cancel(c), _)) = decode_startup(&p).unwrap() else { panic!() };
        assert_eq!((c.pid, c.secret.len()), (7, 32));
    }

    #[test]
    fn error_response_roundtrip() {
        let e = ErrorFields::fatal("28000", "denied").with(b'D', "because");
        let bytes = encode::error_response(&e);
        let (m, n) = decode_message(&bytes, MAX_SETUP_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(BackendMessage::parse(m), Ok(BackendMessage::ErrorResponse(e)));
    }

    #[test]
    fn backend_greeting_parses() {
        let mut bytes = encode::auth_ok();
        bytes.extend(encode::parameter_status("server_version", "15.1"));
        bytes.extend(encode::backend_key_data(42, &[1, 2, 3, 4]));
        bytes.extend(encode::ready_for_query(b'I'));
        let mut got = Vec::new();
        let mut rest = &bytes[..];
        while let Some((m, n)) = decode_message(rest, MAX_SETUP_MESSAGE_LEN).unwrap() {
            got.push(BackendMessage::parse(m).unwrap());
            rest = &rest[n..];
        }
        assert_eq!(got.len(), 4);
        assert_eq!(got[2], BackendMessage::BackendKeyData { pid: 42, secret: vec![1, 2, 3, 4] });
        assert_eq!(got[3], BackendMessage::ReadyForQuery(b'I'));
    }

    proptest! {
        #[test]
        fn startup_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_startup(&bytes);
        }

        #[test]
        fn startup_decoder_on_length_prefixed_garbage(code in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut p = ((body.len() + 8) as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(&body);
            if let Ok(Some((_, n))) = decode_startup(&p) {
                prop_assert_eq!(n, p.len());
            }
        }

        #[test]
        fn backend_parser_never_panics(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = BackendMessage::parse(Message { tag, body: &body });
            let _ = parse_password(&body);
        }

        #[test]
        fn startup_roundtrip(params in proptest::collection::vec(("[a-z_]{1,12}", "[^\u{0}]{0,20}"), 0..6), minor in 0u16..3) {
            let version = ProtocolVersion { major: 3, minor };
            let p = encode::startup(version, &params);
            let decoded = decode_startup(&p);
            prop_assert_eq!(decoded, Ok(Some((StartupPacket::Startup(StartupMessage { version, params }), p.len()))));
        }
    }
}
