//! The client's side of connection setup towards an upstream PostgreSQL (RDS Proxy): the
//! SSLRequest, the StartupMessage, the password, and the server's greeting up to ReadyForQuery.
//!
//! [`UpstreamStartup`] is fed the server's bytes and says what to do next: write bytes, read
//! more (exactly [`UpstreamEvent::NeedMore`] bytes, so nothing past a message is read before
//! the TLS handshake or the relay), start TLS, or hand the finished [`Greeting`] over. Only
//! cleartext password authentication is answered (RDS Proxy's IAM authentication, where the
//! password is the IAM token), or none at all when the TLS client certificate authenticates
//! (PostgreSQL's `cert`); MD5, SASL and the rest are refused.

use thiserror::Error;

use crate::framer::Framer;
use crate::{encode, BackendMessage, ErrorFields, ProtocolVersion, WireError, MAX_SETUP_MESSAGE_LEN};

/// The server's side of a finished startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// ParameterStatus and NoticeResponse messages after AuthenticationOk, raw, in order.
    pub messages: Vec<Vec<u8>>,
    pub backend_key: Option<(u32, Vec<u8>)>,
    pub ready_status: u8,
}

/// The next thing the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// Write these bytes (and flush), then go on.
    Send(Vec<u8>),
    /// Read exactly this many bytes and feed them.
    NeedMore(usize),
    /// The server accepted the SSLRequest: run the TLS handshake, then call
    /// [`UpstreamStartup::tls_established`].
    StartTls,
    /// ReadyForQuery: the session is authenticated.
    Done(Greeting),
}

/// Why the startup failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpstreamStartupError {
    /// The server answered the SSLRequest with something other than `S`.
    #[error("the server refused TLS")]
    NoTls,
    #[error("upstream rejected the session")]
    Rejected(ErrorFields),
    /// An authentication method other than cleartext password.
    #[error("upstream asked for {0} authentication")]
    UnsupportedAuth(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream protocol error: {0}")]
    Wire(#[from] WireError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The SSLRequest is to be sent.
    SendSslRequest,
    /// Waiting for the one-byte answer.
    SslAnswer,
    /// `StartTls` was returned; waiting for [`UpstreamStartup::tls_established`].
    TlsHandshake,
    SendStartup,
    /// Before AuthenticationOk.
    Authenticating,
    /// After AuthenticationOk, collecting the greeting.
    Greeting,
    Done,
}

/// The upstream startup state machine; see the module documentation.
#[derive(Debug, Clone)]
pub struct UpstreamStartup {
    state: State,
    params: Vec<(String, String)>,
    /// `None`: the client certificate authenticates, and a password request is refused.
    password: Option<String>,
    framer: Framer,
    ssl_answer: Vec<u8>,
    greeting: Greeting,
}

impl UpstreamStartup {
    /// A startup with these StartupMessage parameters (protocol 3.0) and `password` as the answer
    /// to AuthenticationCleartextPassword; with `tls`, an SSLRequest and the TLS handshake come
    /// first.
    pub fn new(tls: bool, params: Vec<(String, String)>, password: String) -> Self {
        Self::with_password(tls, params, Some(password))
    }

    /// A startup authenticated by the TLS client certificate (PostgreSQL's `cert` method): the
    /// server must answer AuthenticationOk straight away; a password request is refused, as
    /// there is none to give.
    pub fn without_password(params: Vec<(String, String)>) -> Self {
        Self::with_password(true, params, None)
    }

    fn with_password(tls: bool, params: Vec<(String, String)>, password: Option<String>) -> Self {
        UpstreamStartup {
            state: if tls { State::SendSslRequest } else { State::SendStartup },
            params,
            password,
            framer: Framer::typed(MAX_SETUP_MESSAGE_LEN),
            ssl_answer: Vec::new(),
            greeting: Greeting { messages: Vec::new(), backend_key: None, ready_status: b'I' },
        }
    }

    /// Bytes read from the server.
    pub fn feed(&mut self, bytes: &[u8]) {
        match self.state {
            State::SslAnswer => self.ssl_answer.extend_from_slice(bytes),
            _ => self.framer.push(bytes),
        }
    }

    /// The TLS handshake finished.
    pub fn tls_established(&mut self) {
        if self.state == State::TlsHandshake {
            self.state = State::SendStartup;
        }
    }

    /// What to do next, given what was fed so far.
    pub fn next_event(&mut self) -> Result<UpstreamEvent, UpstreamStartupError> {
        match self.state {
            State::SendSslRequest => {
                self.state = State::SslAnswer;
                Ok(UpstreamEvent::Send(encode::ssl_request()))
            }
            State::SslAnswer => match self.ssl_answer.as_slice() {
                [] => Ok(UpstreamEvent::NeedMore(1)),
                [b'S'] => {
                    self.state = State::TlsHandshake;
                    Ok(UpstreamEvent::StartTls)
                }
                // Bytes after the `S` were not protected by TLS (CVE-2021-23222).
                [b'S', ..] => self.fail(UpstreamStartupError::Protocol("unencrypted data after the SSL answer".into())),
                _ => self.fail(UpstreamStartupError::NoTls),
            },
            State::TlsHandshake => Ok(UpstreamEvent::StartTls),
            State::SendStartup => {
                self.state = State::Authenticating;
                Ok(UpstreamEvent::Send(encode::startup(ProtocolVersion::V3_0, &self.params)))
            }
            State::Authenticating | State::Greeting => self.on_message(),
            State::Done => self.fail(UpstreamStartupError::Protocol("startup already finished".into())),
        }
    }

    fn fail<T>(&mut self, e: UpstreamStartupError) -> Result<T, UpstreamStartupError> {
        self.state = State::Done;
        Err(e)
    }

    /// Handles buffered messages until one needs an answer from the driver.
    fn on_message(&mut self) -> Result<UpstreamEvent, UpstreamStartupError> {
        loop {
            let frame = match self.framer.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(UpstreamEvent::NeedMore(self.framer.needed())),
                Err(e) => return self.fail(e.into()),
            };
            let parsed = crate::decode_message(&frame, MAX_SETUP_MESSAGE_LEN)
                .and_then(|m| m.ok_or(WireError::BadLength(frame.len())))
                .and_then(|(m, _)| BackendMessage::parse(m));
            let msg = match parsed {
                Ok(m) => m,
                Err(e) => return self.fail(e.into()),
            };
            let authenticated = self.state == State::Greeting;
            match msg {
                BackendMessage::AuthenticationCleartextPassword if !authenticated => match &self.password {
                    Some(password) => return Ok(UpstreamEvent::Send(encode::password(password))),
                    None => return self.fail(UpstreamStartupError::UnsupportedAuth("cleartext password".into())),
                },
                BackendMessage::AuthenticationOk if !authenticated => self.state = State::Greeting,
                BackendMessage::AuthenticationMd5Password { .. } => {
                    return self.fail(UpstreamStartupError::UnsupportedAuth("MD5".into()))
                }
                BackendMessage::AuthenticationSasl { mechanisms } => {
                    return self
                        .fail(UpstreamStartupError::UnsupportedAuth(format!("SASL ({})", mechanisms.join(", "))))
                }
                BackendMessage::AuthenticationOther(code) => {
                    return self.fail(UpstreamStartupError::UnsupportedAuth(format!("method {code}")))
                }
                BackendMessage::ErrorResponse(fields) => return self.fail(UpstreamStartupError::Rejected(fields)),
                BackendMessage::ParameterStatus { .. } | BackendMessage::NoticeResponse(_) if authenticated => {
                    self.greeting.messages.push(frame.to_vec())
                }
                // A notice before authentication is for nobody; the protocol version is 3.0,
                // which every server speaks, so a NegotiateProtocolVersion changes nothing.
                BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion { .. } => {}
                BackendMessage::BackendKeyData { pid, secret } if authenticated => {
                    self.greeting.backend_key = Some((pid, secret))
                }
                BackendMessage::ReadyForQuery(status) if authenticated => {
                    self.state = State::Done;
                    let mut greeting = std::mem::replace(
                        &mut self.greeting,
                        Greeting { messages: Vec::new(), backend_key: None, ready_status: status },
                    );
                    greeting.ready_status = status;
                    return Ok(UpstreamEvent::Done(greeting));
                }
                other => {
                    return self.fail(UpstreamStartupError::Protocol(format!("unexpected {other:?} during startup")))
                }
            }
        }
    }
}
