//! Sans-IO MySQL / MariaDB wire protocol codec.
//!
//! Sluice inspects only the connection phase of the protocol (the server's greeting, the client's
//! SSLRequest and handshake response, auth switches, OK and ERR) and the odd `KILL QUERY` on a second
//! connection; after that the bytes are relayed untouched. As in `sluice-pgwire`, nothing here does
//! I/O: [`PacketDecoder`] takes bytes a driver read and yields whole packets, [`PacketEncoder`] frames
//! payloads with the right sequence ids, and each message has `encode` (payload bytes into a
//! `BytesMut`) and `decode` (a payload slice into a value or a typed [`Error`], never a panic).
//!
//! Strings the protocol NUL-terminates (user, database, plugin names, server version) are decoded
//! as UTF-8 and refused otherwise: Sluice matches them against its policy, and a lossy conversion
//! could make two different names equal. Human-readable texts (OK info, ERR messages) are decoded
//! lossily since nothing decides on them.

#![forbid(unsafe_code)]

use thiserror::Error;

#[cfg(test)]
mod captures;
mod command;
mod flags;
mod handshake;
mod packet;
mod response;
mod session;
pub mod wire;

pub use command::{parse_kill, Command, Kill, KillKind, COM_INIT_DB, COM_PING, COM_PROCESS_KILL, COM_QUERY, COM_QUIT};
pub use flags::{CapabilityFlags, StatusFlags};
pub use handshake::{
    decode_clear_password, encode_clear_password, AuthMoreData, AuthSwitchRequest, AuthSwitchResponse, ClientHello,
    Handshake, HandshakeResponse, SslRequest, CACHING_SHA2_PASSWORD_PLUGIN, CLEAR_PASSWORD_PLUGIN,
    NATIVE_PASSWORD_PLUGIN, PROTOCOL_VERSION,
};
pub use packet::{Packet, PacketDecoder, PacketEncoder, HEADER_LEN, MAX_FRAGMENT_LEN, PRE_AUTH_MAX_PAYLOAD};
pub use response::{
    AuthReply, EofPacket, ErrPacket, OkPacket, ER_ACCESS_DENIED_ERROR, ER_BAD_HANDSHAKE, ER_CON_COUNT_ERROR,
    ER_DBACCESS_DENIED_ERROR, ER_SECURE_TRANSPORT_REQUIRED,
};
pub use session::{
    ClientLogin, ServerEvent, ServerHandshake, ServerHandshakeError, UpstreamEvent, UpstreamHandshake,
    UpstreamHandshakeError, UpstreamLogin, UpstreamSession, DEFAULT_CHARSET, SERVER_CAPABILITIES,
};

/// Errors for bytes no conforming MySQL or MariaDB peer sends, or that Sluice does not accept.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The declared payload (all continuation fragments together) is over the caller's limit.
    #[error("packet payload of {len} bytes exceeds the limit of {max}")]
    PacketTooLarge { len: usize, max: usize },
    /// A continuation fragment of a multi-packet payload did not carry the next sequence id.
    #[error("packet sequence id {got} where {expected} was expected")]
    BadSequence { expected: u8, got: u8 },
    /// The payload ended inside a field.
    #[error("truncated {what}")]
    Truncated { what: &'static str },
    /// A field holds a value the protocol does not allow there.
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    /// A protocol form Sluice does not speak (protocol 9, HandshakeResponse320, query attributes...).
    #[error("unsupported {what}")]
    Unsupported { what: &'static str },
    /// The first byte says this is another message than the one asked for.
    #[error("unexpected packet header {got:#04x} for {what}")]
    UnexpectedHeader { what: &'static str, got: u8 },
    /// A value does not fit the form the capabilities select (an encoder's only error).
    #[error("{what} is too long for its encoding")]
    TooLong { what: &'static str },
}

pub(crate) fn malformed(what: &'static str) -> Error {
    Error::Malformed { what }
}
