//! The server's side of connection setup, up to the StartupMessage: encryption requests, direct
//! TLS, cancel requests and the checks PostgreSQL itself makes on them.
//!
//! [`ServerNegotiation`] is fed the client's bytes and says what to do next: read more (exactly
//! [`Event::NeedMore`] bytes, so nothing past a packet is read before a TLS handshake), write an
//! answer, start TLS, route a cancel request, or go on with the StartupMessage. Whether the
//! StartupMessage came over TLS is for the caller to know; this machine only enforces that a
//! listener that requires TLS never accepts one in plaintext.

use thiserror::Error;

use crate::framer::Framer;
use crate::{decode_startup, sqlstate, CancelRequest, ErrorFields, StartupMessage, StartupPacket, WireError};

/// The first byte of a TLS record carrying a handshake: a PostgreSQL 17 client with
/// `sslnegotiation=direct` starts with its ClientHello instead of an SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsOffer {
    /// TLS is required: SSLRequest is answered `S`, direct TLS is accepted, and a plaintext
    /// StartupMessage is refused.
    Required,
    /// No TLS (a local socket): SSLRequest is answered `N` and the client goes on in plaintext.
    None,
}

/// The next thing the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Read exactly this many bytes and feed them.
    NeedMore(usize),
    /// Write this answer to an encryption request, then go on.
    Reply(u8),
    /// Write `reply` if there is one (none for direct TLS), run the TLS handshake, then call
    /// [`ServerNegotiation::tls_established`].
    StartTls { reply: Option<u8> },
    /// A CancelRequest: route it; the connection then ends.
    Cancel(CancelRequest),
    /// The StartupMessage; the negotiation is over.
    Startup(StartupMessage),
}

/// Why the negotiation failed: [`NegotiationError::error_fields`] is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("invalid startup packet: {0}")]
    Invalid(#[from] WireError),
    #[error("unexpected encryption request inside TLS")]
    EncryptionRequestInsideTls,
    #[error("more than one {0} on a connection")]
    RepeatedRequest(&'static str),
    /// Bytes that came in the same read as the SSLRequest could have been injected by someone
    /// in the middle (CVE-2021-23214); PostgreSQL refuses them, and so does this.
    #[error("received unencrypted data after SSL request")]
    DataAfterSslRequest,
    /// A plaintext StartupMessage on a listener that requires TLS.
    #[error("TLS is required")]
    TlsRequired,
    /// A packet after the negotiation ended.
    #[error("negotiation already finished")]
    Finished,
}

impl NegotiationError {
    /// The FATAL error for the client: SQLSTATE 08P01 for protocol violations, 28000 when TLS
    /// is required (the caller may add a hint on how to connect).
    pub fn error_fields(&self) -> ErrorFields {
        match self {
            NegotiationError::TlsRequired => ErrorFields::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "Sluice requires TLS with a client certificate",
            ),
            other => ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, other.to_string()),
        }
    }

    /// The ErrorResponse to send before closing.
    pub fn error_response(&self) -> Vec<u8> {
        crate::encode::error_response(&self.error_fields())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read yet: a TLS record may come instead of a packet.
    Start,
    /// Plaintext packets before the StartupMessage.
    Plain,
    /// `StartTls` was returned; waiting for [`ServerNegotiation::tls_established`].
    TlsHandshake,
    /// Inside TLS, before the StartupMessage.
    InTls,
    /// A cancel request, a StartupMessage or an error ended it.
    Done,
}

/// The server's negotiation state machine; see the module documentation.
#[derive(Debug, Clone)]
pub struct ServerNegotiation {
    offer: TlsOffer,
    state: State,
    framer: Framer,
    ssl_requests: u8,
    gss_requests: u8,
}

impl ServerNegotiation {
    pub fn new(offer: TlsOffer) -> Self {
        ServerNegotiation { offer, state: State::Start, framer: Framer::startup(), ssl_requests: 0, gss_requests: 0 }
    }

    /// Whether a client that sent `first` as its first byte starts TLS directly. The driver
    /// peeks at that byte (it must stay on the socket for the TLS handshake) and asks this
    /// before feeding anything; `Some` moves the machine to the TLS handshake.
    pub fn peeked_first_byte(&mut self, first: u8) -> Option<Event> {
        if self.state == State::Start && self.offer == TlsOffer::Required && first == TLS_HANDSHAKE_RECORD {
            self.state = State::TlsHandshake;
            return Some(Event::StartTls { reply: None });
        }
        None
    }

    /// Bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// The TLS handshake finished; what follows comes over TLS.
    pub fn tls_established(&mut self) {
        if self.state == State::TlsHandshake {
            self.state = State::InTls;
        }
    }

    /// What to do next, given what was fed so far.
    pub fn next_event(&mut self) -> Result<Event, NegotiationError> {
        match self.state {
            State::Done => return Err(NegotiationError::Finished),
            State::TlsHandshake => return Ok(Event::StartTls { reply: None }),
            State::Start | State::Plain | State::InTls => {}
        }
        let frame = match self.framer.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(Event::NeedMore(self.framer.needed())),
            Err(e) => return Err(self.fail(e.into())),
        };
        let packet = match decode_startup(&frame) {
            Ok(Some((packet, _))) => packet,
            // The framer checked the length, so the decoder has the whole packet.
            Ok(None) => return Err(self.fail(WireError::BadLength(frame.len()).into())),
            Err(e) => return Err(self.fail(e.into())),
        };
        let in_tls = self.state == State::InTls;
        if self.state == State::Start {
            self.state = State::Plain;
        }
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest if in_tls => {
                Err(self.fail(NegotiationError::EncryptionRequestInsideTls))
            }
            StartupPacket::SslRequest => {
                self.ssl_requests += 1;
                if self.ssl_requests > 1 {
                    return Err(self.fail(NegotiationError::RepeatedRequest("SSLRequest")));
                }
                match self.offer {
                    TlsOffer::Required => {
                        if self.framer.buffered() > 0 {
                            return Err(self.fail(NegotiationError::DataAfterSslRequest));
                        }
                        self.state = State::TlsHandshake;
                        Ok(Event::StartTls { reply: Some(b'S') })
                    }
                    TlsOffer::None => Ok(Event::Reply(b'N')),
                }
            }
            StartupPacket::GssEncRequest => {
                self.gss_requests += 1;
                if self.gss_requests > 1 {
                    return Err(self.fail(NegotiationError::RepeatedRequest("GSSENCRequest")));
                }
                Ok(Event::Reply(b'N'))
            }
            StartupPacket::Cancel(c) => {
                self.state = State::Done;
                Ok(Event::Cancel(c))
            }
            StartupPacket::Startup(_) if self.offer == TlsOffer::Required && !in_tls => {
                Err(self.fail(NegotiationError::TlsRequired))
            }
            StartupPacket::Startup(m) => {
                self.state = State::Done;
                Ok(Event::Startup(m))
            }
        }
    }

    fn fail(&mut self, e: NegotiationError) -> NegotiationError {
        self.state = State::Done;
        e
    }
}

/// The protocol spoken with a client after its StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolChoice {
    /// The minor version of protocol 3 spoken: the client's, capped at 2.
    pub minor: u16,
    /// The NegotiateProtocolVersion message to send before AuthenticationOk, when the client
    /// asked for a newer minor version or for `_pq_.` options (none of which are supported).
    pub negotiate: Option<Vec<u8>>,
    /// Length of the cancel key handed to the client: 32 bytes from 3.2 on, 4 before.
    pub cancel_key_len: usize,
}

/// Chooses the protocol for a client: 3.2 is the newest spoken (it differs from 3.0 only in the
/// cancel key's length), and every `_pq_.` option is reported as unrecognized.
pub fn choose_protocol(startup: &StartupMessage) -> ProtocolChoice {
    use crate::ProtocolVersion;
    let unrecognized: Vec<String> =
        startup.params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    let minor = if startup.version > ProtocolVersion::V3_2 { 2 } else { startup.version.minor };
    let negotiate = (startup.version > ProtocolVersion::V3_2 || !unrecognized.is_empty())
        .then(|| crate::encode::negotiate_protocol_version(minor, &unrecognized));
    ProtocolChoice { minor, negotiate, cancel_key_len: if minor >= 2 { 32 } else { 4 } }
}
