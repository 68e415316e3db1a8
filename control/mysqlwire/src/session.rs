//! The connection phase as two state machines that take and return bytes: [`ServerHandshake`]
//! plays the server to a client (greeting, SSLRequest, TLS, handshake response) and
//! [`UpstreamHandshake`] plays the client to a server (greeting, SSLRequest, TLS, handshake
//! response, the switch to `mysql_clear_password` and its token, OK). The driver reads exactly
//! the bytes asked for ([`ServerEvent::NeedMore`], [`UpstreamEvent::NeedMore`]) so that nothing
//! past an SSLRequest or a greeting is consumed before a TLS handshake starts on the socket.

use bytes::{Bytes, BytesMut};

use crate::{
    encode_clear_password, AuthReply, CapabilityFlags, ClientHello, ErrPacket, Error, Handshake, HandshakeResponse,
    OkPacket, Packet, PacketDecoder, PacketEncoder, SslRequest, StatusFlags, CLEAR_PASSWORD_PLUGIN,
    NATIVE_PASSWORD_PLUGIN, PRE_AUTH_MAX_PAYLOAD,
};

/// utf8mb4_general_ci: the greeting's character set when the upstream's is not known.
pub const DEFAULT_CHARSET: u8 = 45;

/// What Sluice offers a client: what MariaDB 10.2+, MySQL 8 and RDS Proxy all support, so that
/// whatever a client picks from it the upstream agrees to. No MariaDB extended capabilities,
/// no compression (the data plane relays bytes as they are) and no query attributes.
pub const SERVER_CAPABILITIES: CapabilityFlags = CapabilityFlags::from_bits(
    CapabilityFlags::LONG_PASSWORD.bits()
        | CapabilityFlags::FOUND_ROWS.bits()
        | CapabilityFlags::LONG_FLAG.bits()
        | CapabilityFlags::CONNECT_WITH_DB.bits()
        | CapabilityFlags::LOCAL_FILES.bits()
        | CapabilityFlags::PROTOCOL_41.bits()
        | CapabilityFlags::INTERACTIVE.bits()
        | CapabilityFlags::SSL.bits()
        | CapabilityFlags::TRANSACTIONS.bits()
        | CapabilityFlags::SECURE_CONNECTION.bits()
        | CapabilityFlags::MULTI_STATEMENTS.bits()
        | CapabilityFlags::MULTI_RESULTS.bits()
        | CapabilityFlags::PS_MULTI_RESULTS.bits()
        | CapabilityFlags::PLUGIN_AUTH.bits()
        | CapabilityFlags::CONNECT_ATTRS.bits()
        | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA.bits()
        | CapabilityFlags::SESSION_TRACK.bits()
        | CapabilityFlags::DEPRECATE_EOF.bits(),
);

/// Capabilities that change how the command phase is framed: if the client uses one the
/// upstream does not, relaying bytes unchanged would corrupt the session.
const FRAMING_CAPABILITIES: CapabilityFlags = CapabilityFlags::from_bits(
    CapabilityFlags::PROTOCOL_41.bits()
        | CapabilityFlags::TRANSACTIONS.bits()
        | CapabilityFlags::SESSION_TRACK.bits()
        | CapabilityFlags::DEPRECATE_EOF.bits()
        | CapabilityFlags::MULTI_RESULTS.bits()
        | CapabilityFlags::PS_MULTI_RESULTS.bits(),
);

/// A finished client handshake: what the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLogin {
    pub response: HandshakeResponse,
    /// The capabilities in effect for the client: its own within what Sluice offered.
    pub capabilities: CapabilityFlags,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Write these bytes to the client (the greeting).
    Send(Vec<u8>),
    /// Read exactly this many more bytes and [`ServerHandshake::feed`] them.
    NeedMore(usize),
    /// Run the TLS handshake as the server now, then call [`ServerHandshake::tls_established`].
    StartTls,
    Done(ClientLogin),
}

/// Why a client's handshake failed; [`ServerHandshakeError::err_packet`] is what to tell it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerHandshakeError {
    /// A handshake response without an SSLRequest first.
    #[error("the client did not ask for TLS")]
    TlsRequired,
    #[error("malformed handshake packet: {0}")]
    Wire(#[from] Error),
    #[error("packet with sequence id {got} where {expected} was expected")]
    Sequence { expected: u8, got: u8 },
    #[error("{0}")]
    Protocol(&'static str),
}

impl ServerHandshakeError {
    pub fn err_packet(&self) -> ErrPacket {
        match self {
            ServerHandshakeError::TlsRequired => ErrPacket::new(
                crate::ER_SECURE_TRANSPORT_REQUIRED,
                *b"HY000",
                "Sluice requires TLS with a client certificate: connect with --ssl-cert, --ssl-key and \
                 --ssl-ca from `sluice db login` (ssl-mode VERIFY_IDENTITY)",
            ),
            _ => ErrPacket::bad_handshake(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Greet,
    SslRequest,
    Tls,
    Response,
    Done,
}

/// The client's connection phase with Sluice as the server. TLS is required: a client that
/// sends its handshake response in plaintext is refused. The auth response is not checked (the
/// client certificate is the identity); the driver answers with the upstream's OK or an ERR,
/// framed by [`ServerHandshake::frame_reply`].
pub struct ServerHandshake {
    greeting: Handshake,
    state: ServerState,
    decoder: PacketDecoder,
    buf: BytesMut,
    /// The sequence id of Sluice's next packet to the client.
    next_seq: u8,
}

impl ServerHandshake {
    /// `scramble`: 20 printable bytes with no NUL (clients copy it as a C string).
    pub fn new(server_version: &str, connection_id: u32, scramble: [u8; 20], charset: u8) -> Self {
        let greeting = Handshake {
            server_version: server_version.to_owned(),
            connection_id,
            auth_plugin_data: scramble.to_vec(),
            capabilities: SERVER_CAPABILITIES,
            charset,
            status: StatusFlags::AUTOCOMMIT,
            mariadb_capabilities: 0,
            auth_plugin_name: Some(NATIVE_PASSWORD_PLUGIN.to_owned()),
        };
        ServerHandshake {
            greeting,
            state: ServerState::Greet,
            decoder: PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD),
            buf: BytesMut::new(),
            next_seq: 0,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn tls_established(&mut self) {
        if self.state == ServerState::Tls {
            self.state = ServerState::Response;
        }
    }

    /// The next thing to do. After an error the handshake is over.
    pub fn next_event(&mut self) -> Result<ServerEvent, ServerHandshakeError> {
        match self.state {
            ServerState::Greet => {
                let mut out = BytesMut::new();
                PacketEncoder::new(0).write_with(&mut out, |o| self.greeting.encode(o));
                self.state = ServerState::SslRequest;
                self.next_seq = 1;
                Ok(ServerEvent::Send(out.to_vec()))
            }
            ServerState::Tls => Ok(ServerEvent::StartTls),
            ServerState::Done => Err(ServerHandshakeError::Protocol("handshake already finished")),
            ServerState::SslRequest | ServerState::Response => {
                let Some(p) = self.packet()? else { return Ok(ServerEvent::NeedMore(self.decoder.needed(&self.buf)?)) };
                if p.seq != self.next_seq {
                    self.state = ServerState::Done;
                    return Err(ServerHandshakeError::Sequence { expected: self.next_seq, got: p.seq });
                }
                self.next_seq = p.reply_seq();
                match (self.state, ClientHello::decode(&p.payload)) {
                    (ServerState::SslRequest, Ok(ClientHello::SslRequest(_))) => {
                        if !self.buf.is_empty() {
                            // Bytes after the SSLRequest would be read as TLS by nobody.
                            self.state = ServerState::Done;
                            return Err(ServerHandshakeError::Protocol("data after the SSLRequest"));
                        }
                        self.state = ServerState::Tls;
                        Ok(ServerEvent::StartTls)
                    }
                    (ServerState::SslRequest, Ok(ClientHello::Response(_))) => {
                        self.state = ServerState::Done;
                        Err(ServerHandshakeError::TlsRequired)
                    }
                    (_, Ok(ClientHello::Response(response))) => {
                        self.state = ServerState::Done;
                        let capabilities = response.capabilities & SERVER_CAPABILITIES;
                        Ok(ServerEvent::Done(ClientLogin { response, capabilities }))
                    }
                    (_, Ok(ClientHello::SslRequest(_))) => {
                        self.state = ServerState::Done;
                        Err(ServerHandshakeError::Protocol("SSLRequest inside TLS"))
                    }
                    (_, Err(e)) => {
                        self.state = ServerState::Done;
                        Err(e.into())
                    }
                }
            }
        }
    }

    fn packet(&mut self) -> Result<Option<Packet>, ServerHandshakeError> {
        self.decoder.next_packet(&mut self.buf).map_err(|e| {
            self.state = ServerState::Done;
            e.into()
        })
    }

    /// Frames a reply payload (an OK or ERR) with the client's next sequence id.
    pub fn frame_reply(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut enc = PacketEncoder::new(self.next_seq);
        enc.write(payload, &mut out);
        self.next_seq = enc.seq();
        out.to_vec()
    }

    /// Frames an ERR packet with the client's next sequence id.
    pub fn frame_err(&mut self, err: &ErrPacket) -> Vec<u8> {
        let mut payload = BytesMut::new();
        err.encode(&mut payload);
        self.frame_reply(&payload)
    }
}

/// What Sluice logs in to the upstream with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLogin {
    pub user: String,
    /// `None` connects without a default database.
    pub database: Option<String>,
    /// The client's capabilities in effect (see [`ClientLogin::capabilities`]).
    pub client_capabilities: CapabilityFlags,
    pub charset: u8,
    pub max_packet_size: u32,
    pub connect_attrs: Vec<(String, String)>,
    /// Sent on the upstream's switch to `mysql_clear_password` (an IAM auth token).
    pub password: String,
    /// Whether to switch to TLS after the greeting.
    pub tls: bool,
}

/// The upstream's session, once it accepted the login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSession {
    pub greeting: Handshake,
    /// The capabilities sent upstream: what the session runs under.
    pub capabilities: CapabilityFlags,
    /// The OK payload, to pass on to the client under its sequence ids.
    pub ok_payload: Bytes,
    pub ok: OkPacket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    Send(Vec<u8>),
    NeedMore(usize),
    /// Run the TLS handshake as the client now, then call [`UpstreamHandshake::tls_established`].
    StartTls,
    Done(Box<UpstreamSession>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamHandshakeError {
    #[error("the server does not offer TLS")]
    NoTls,
    /// The server answered with an ERR packet (in place of the greeting, or to the login).
    #[error("server error {}: {}", .0.code, .0.message)]
    Rejected(ErrPacket),
    /// The server wants another authentication method than the clear password (the IAM token).
    #[error("{0}")]
    UnsupportedAuth(String),
    /// The client uses a capability the upstream does not have.
    #[error("the upstream lacks capabilities the client uses: {0:?}")]
    Capabilities(CapabilityFlags),
    #[error("upstream protocol error: {0}")]
    Wire(#[from] Error),
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamState {
    Greeting,
    Tls,
    Auth { switched: bool },
    Done,
}

/// Sluice's connection phase as the client of a MySQL server or RDS Proxy.
pub struct UpstreamHandshake {
    login: UpstreamLogin,
    state: UpstreamState,
    decoder: PacketDecoder,
    buf: BytesMut,
    encoder: PacketEncoder,
    greeting: Option<Handshake>,
    capabilities: CapabilityFlags,
    pending: Option<Vec<u8>>,
}

impl UpstreamHandshake {
    pub fn new(login: UpstreamLogin) -> Self {
        UpstreamHandshake {
            login,
            state: UpstreamState::Greeting,
            decoder: PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD),
            buf: BytesMut::new(),
            encoder: PacketEncoder::new(1),
            greeting: None,
            capabilities: CapabilityFlags::empty(),
            pending: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn tls_established(&mut self) {
        if self.state == UpstreamState::Tls {
            self.state = UpstreamState::Auth { switched: false };
            self.pending = Some(self.response());
        }
    }

    pub fn next_event(&mut self) -> Result<UpstreamEvent, UpstreamHandshakeError> {
        let r = self.step();
        if r.is_err() {
            self.state = UpstreamState::Done;
        }
        r
    }

    fn step(&mut self) -> Result<UpstreamEvent, UpstreamHandshakeError> {
        if let Some(out) = self.pending.take() {
            return Ok(UpstreamEvent::Send(out));
        }
        match self.state {
            UpstreamState::Tls => return Ok(UpstreamEvent::StartTls),
            UpstreamState::Done => return Err(UpstreamHandshakeError::Protocol("handshake already finished")),
            _ => {}
        }
        let Some(p) = self.decoder.next_packet(&mut self.buf)? else {
            return Ok(UpstreamEvent::NeedMore(self.decoder.needed(&self.buf)?));
        };
        match self.state {
            UpstreamState::Greeting => {
                if p.payload.first() == Some(&0xFF) {
                    return Err(UpstreamHandshakeError::Rejected(ErrPacket::decode(&p.payload)?));
                }
                let greeting = Handshake::decode(&p.payload)?;
                self.capabilities = self.negotiate(&greeting)?;
                self.greeting = Some(greeting);
                self.encoder.set_seq(p.reply_seq());
                if self.login.tls {
                    let mut out = BytesMut::new();
                    let req = SslRequest {
                        capabilities: self.capabilities,
                        max_packet_size: self.login.max_packet_size,
                        charset: self.login.charset,
                        mariadb_capabilities: 0,
                    };
                    self.encoder.write_with(&mut out, |o| req.encode(o));
                    self.state = UpstreamState::Tls;
                    Ok(UpstreamEvent::Send(out.to_vec()))
                } else {
                    self.state = UpstreamState::Auth { switched: false };
                    Ok(UpstreamEvent::Send(self.response()))
                }
            }
            UpstreamState::Auth { switched } => {
                self.encoder.set_seq(p.reply_seq());
                match AuthReply::decode(&p.payload, self.capabilities)? {
                    AuthReply::Ok(ok) => {
                        self.state = UpstreamState::Done;
                        let greeting = self.greeting.clone().ok_or(UpstreamHandshakeError::Protocol("no greeting"))?;
                        Ok(UpstreamEvent::Done(Box::new(UpstreamSession {
                            greeting,
                            capabilities: self.capabilities,
                            ok_payload: p.payload,
                            ok,
                        })))
                    }
                    AuthReply::Err(e) => Err(UpstreamHandshakeError::Rejected(e)),
                    AuthReply::Switch(s) if s.plugin_name == CLEAR_PASSWORD_PLUGIN && !switched => {
                        self.state = UpstreamState::Auth { switched: true };
                        let mut out = BytesMut::new();
                        let password = self.login.password.as_bytes();
                        self.encoder.try_write_with(&mut out, |o| encode_clear_password(password, o))?;
                        Ok(UpstreamEvent::Send(out.to_vec()))
                    }
                    AuthReply::Switch(s) => Err(UpstreamHandshakeError::UnsupportedAuth(s.plugin_name)),
                    AuthReply::MoreData(_) => {
                        Err(UpstreamHandshakeError::UnsupportedAuth("more authentication data".into()))
                    }
                }
            }
            UpstreamState::Tls | UpstreamState::Done => Err(UpstreamHandshakeError::Protocol("unexpected packet")),
        }
    }

    /// The capabilities to log in with: the client's within the upstream's, with TLS as
    /// configured and a database only when one is asked for.
    fn negotiate(&self, greeting: &Handshake) -> Result<CapabilityFlags, UpstreamHandshakeError> {
        let server = greeting.capabilities;
        if self.login.tls && !server.contains(CapabilityFlags::SSL) {
            return Err(UpstreamHandshakeError::NoTls);
        }
        let client = self.login.client_capabilities & SERVER_CAPABILITIES;
        let missing = (client & FRAMING_CAPABILITIES).difference(server);
        if missing != CapabilityFlags::empty() {
            return Err(UpstreamHandshakeError::Capabilities(missing));
        }
        let mut caps = client & server;
        // CLIENT_MYSQL (bit 0) tells a MariaDB server this client sends no extended capabilities.
        caps.set(CapabilityFlags::LONG_PASSWORD, client.contains(CapabilityFlags::LONG_PASSWORD));
        caps.insert(CapabilityFlags::PROTOCOL_41 | CapabilityFlags::SECURE_CONNECTION);
        caps.set(CapabilityFlags::PLUGIN_AUTH, server.contains(CapabilityFlags::PLUGIN_AUTH));
        caps.set(CapabilityFlags::SSL, self.login.tls);
        caps.set(CapabilityFlags::CONNECT_WITH_DB, self.login.database.is_some());
        Ok(caps)
    }

    /// The handshake response: no password in it (an empty one), so that the server switches to
    /// `mysql_clear_password` and only then gets the token.
    fn response(&mut self) -> Vec<u8> {
        let caps = self.capabilities;
        let plugin = self.greeting.as_ref().and_then(|g| g.auth_plugin_name.clone());
        let r = HandshakeResponse {
            capabilities: caps,
            max_packet_size: self.login.max_packet_size,
            charset: self.login.charset,
            mariadb_capabilities: 0,
            username: self.login.user.clone(),
            auth_response: Vec::new(),
            database: self.login.database.clone().filter(|_| caps.contains(CapabilityFlags::CONNECT_WITH_DB)),
            auth_plugin_name: caps
                .contains(CapabilityFlags::PLUGIN_AUTH)
                .then(|| plugin.unwrap_or_else(|| NATIVE_PASSWORD_PLUGIN.to_owned())),
            connect_attrs: if caps.contains(CapabilityFlags::CONNECT_ATTRS) {
                self.login.connect_attrs.clone()
            } else {
                Vec::new()
            },
        };
        let mut out = BytesMut::new();
        // An empty auth response always fits its form.
        if self.encoder.try_write_with(&mut out, |o| r.encode(o)).is_err() {
            out.clear();
        }
        out.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captures::{self, hex};
    use crate::{AuthSwitchRequest, HEADER_LEN};
    use proptest::prelude::*;

    fn framed(seq: u8, f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write_with(&mut out, f);
        out.to_vec()
    }

    /// Drives the server side until it wants bytes it has not got, feeding `input` as asked.
    fn run_server(s: &mut ServerHandshake, input: &mut &[u8]) -> Result<ServerEvent, ServerHandshakeError> {
        loop {
            match s.next_event()? {
                ServerEvent::NeedMore(n) if input.len() >= n => {
                    let (now, rest) = input.split_at(n);
                    s.feed(now);
                    *input = rest;
                }
                other => return Ok(other),
            }
        }
    }

    fn client_response(seq: u8, caps: CapabilityFlags, user: &str, db: Option<&str>) -> Vec<u8> {
        let r = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 0x21,
            mariadb_capabilities: 0,
            username: user.into(),
            auth_response: vec![7; 20],
            database: db.map(Into::into),
            auth_plugin_name: Some(NATIVE_PASSWORD_PLUGIN.into()),
            connect_attrs: vec![("program_name".into(), "mysql".into())],
        };
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).try_write_with(&mut out, |o| r.encode(o)).unwrap();
        out.to_vec()
    }

    fn client_caps() -> CapabilityFlags {
        let mut c = SERVER_CAPABILITIES | CapabilityFlags::QUERY_ATTRIBUTES;
        c.remove(CapabilityFlags::SSL);
        c
    }

    #[test]
    fn server_greets_takes_tls_and_the_response() {
        let mut s = ServerHandshake::new("8.0.36-Sluice", 0x8000_0001, *b"abcdefghijklmnopqrst", DEFAULT_CHARSET);
        let ServerEvent::Send(greeting) = s.next_event().unwrap() else { panic!() };
        let mut dec = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD);
        let p = dec.next_packet(&mut BytesMut::from(&greeting[..])).unwrap().unwrap();
        assert_eq!(p.seq, 0);
        let h = Handshake::decode(&p.payload).unwrap();
        assert_eq!((h.connection_id, h.server_version.as_str()), (0x8000_0001, "8.0.36-Sluice"));
        assert!(h.capabilities.contains(CapabilityFlags::SSL | CapabilityFlags::DEPRECATE_EOF));
        assert_eq!(h.auth_plugin_data, b"abcdefghijklmnopqrst");
        assert_eq!(s.next_event(), Ok(ServerEvent::NeedMore(HEADER_LEN)));
        // MariaDB's client's SSLRequest, byte by byte.
        let ssl = hex(captures::SSL_REQUEST);
        for b in &ssl {
            assert!(matches!(s.next_event(), Ok(ServerEvent::NeedMore(_))));
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.next_event(), Ok(ServerEvent::StartTls));
        assert_eq!(s.next_event(), Ok(ServerEvent::StartTls), "until TLS is up");
        s.tls_established();
        let caps = client_caps() | CapabilityFlags::SSL;
        let resp = client_response(2, caps, "app", Some("shop"));
        let ServerEvent::Done(login) = run_server(&mut s, &mut &resp[..]).unwrap() else { panic!() };
        assert_eq!(login.response.username, "app");
        assert_eq!(login.response.database.as_deref(), Some("shop"));
        assert!(!login.capabilities.contains(CapabilityFlags::QUERY_ATTRIBUTES), "not offered");
        // The OK goes out as packet 3.
        let ok = s.frame_reply(b"\x00\x00\x00\x02\x00\x00\x00");
        assert_eq!(ok[3], 3);
        assert!(s.next_event().is_err());
    }

    #[test]
    fn server_refuses_plaintext_and_bad_sequences() {
        let mut s = ServerHandshake::new("8.0.36-Sluice", 1, [b'x'; 20], DEFAULT_CHARSET);
        s.next_event().unwrap();
        let resp = client_response(1, client_caps(), "app", None);
        let e = run_server(&mut s, &mut &resp[..]).unwrap_err();
        assert_eq!(e, ServerHandshakeError::TlsRequired);
        assert_eq!(e.err_packet().code, crate::ER_SECURE_TRANSPORT_REQUIRED);
        let err = s.frame_err(&e.err_packet());
        assert_eq!(err[3], 2, "the answer to packet 1");

        let mut s = ServerHandshake::new("8.0.36-Sluice", 1, [b'x'; 20], DEFAULT_CHARSET);
        s.next_event().unwrap();
        let mut ssl = hex(captures::SSL_REQUEST);
        ssl[3] = 5;
        let e = run_server(&mut s, &mut &ssl[..]).unwrap_err();
        assert_eq!(e, ServerHandshakeError::Sequence { expected: 1, got: 5 });
        assert_eq!(e.err_packet().code, crate::ER_BAD_HANDSHAKE);

        // An oversized length is refused on its header, before its bytes are awaited.
        let mut s = ServerHandshake::new("8.0.36-Sluice", 1, [b'x'; 20], DEFAULT_CHARSET);
        s.next_event().unwrap();
        s.feed(&[0xff, 0xff, 0xff, 1]);
        assert!(matches!(s.next_event(), Err(ServerHandshakeError::Wire(Error::PacketTooLarge { .. }))));
    }

    fn login(tls: bool) -> UpstreamLogin {
        UpstreamLogin {
            user: "app".into(),
            database: Some("shop".into()),
            client_capabilities: client_caps() | CapabilityFlags::SSL,
            charset: 0x21,
            max_packet_size: 1 << 24,
            connect_attrs: vec![("program_name".into(), "mysql".into())],
            password: "token?X-Amz-Signature=abc".into(),
            tls,
        }
    }

    fn decode_one(bytes: &[u8]) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let p = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD).next_packet(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        p
    }

    fn greeting_packet() -> Vec<u8> {
        hex(captures::CLEAR_GREETING)
    }

    #[test]
    fn upstream_tls_switch_to_clear_password_and_ok() {
        let mut greeting = Handshake::decode(&decode_one(&hex(captures::GREETING)).payload).unwrap();
        greeting.connection_id = 77;
        let mut u = UpstreamHandshake::new(login(true));
        assert_eq!(u.next_event(), Ok(UpstreamEvent::NeedMore(HEADER_LEN)));
        u.feed(&framed(0, |o| greeting.encode(o)));
        let UpstreamEvent::Send(ssl) = u.next_event().unwrap() else { panic!() };
        let p = decode_one(&ssl);
        assert_eq!(p.seq, 1);
        let ClientHello::SslRequest(req) = ClientHello::decode(&p.payload).unwrap() else { panic!() };
        assert!(req.capabilities.contains(CapabilityFlags::SSL));
        assert_eq!(u.next_event(), Ok(UpstreamEvent::StartTls));
        u.tls_established();
        let UpstreamEvent::Send(resp) = u.next_event().unwrap() else { panic!() };
        let p = decode_one(&resp);
        assert_eq!(p.seq, 2);
        let ClientHello::Response(r) = ClientHello::decode(&p.payload).unwrap() else { panic!() };
        assert_eq!((r.username.as_str(), r.database.as_deref()), ("app", Some("shop")));
        assert!(r.auth_response.is_empty(), "no password before the switch");
        assert!(!r.capabilities.contains(CapabilityFlags::QUERY_ATTRIBUTES));
        assert!(r.capabilities.contains(CapabilityFlags::LONG_PASSWORD), "no MariaDB extended capabilities");
        assert_eq!(r.connect_attrs, vec![("program_name".to_owned(), "mysql".to_owned())]);
        assert_eq!(u.next_event(), Ok(UpstreamEvent::NeedMore(HEADER_LEN)));
        let switch = AuthSwitchRequest { plugin_name: CLEAR_PASSWORD_PLUGIN.into(), plugin_data: vec![] };
        u.feed(&framed(3, |o| switch.encode(o)));
        let UpstreamEvent::Send(pw) = u.next_event().unwrap() else { panic!() };
        let p = decode_one(&pw);
        assert_eq!((p.seq, &p.payload[..]), (4, &b"token?X-Amz-Signature=abc\0"[..]));
        let mut ok = hex(captures::SWITCH_OK);
        ok[3] = 5;
        u.feed(&ok[..3]);
        assert_eq!(u.next_event(), Ok(UpstreamEvent::NeedMore(1)));
        u.feed(&ok[3..]);
        let UpstreamEvent::Done(s) = u.next_event().unwrap() else { panic!() };
        assert_eq!(s.greeting.connection_id, 77);
        assert_eq!(&s.ok_payload[..], &ok[HEADER_LEN..]);
    }

    #[test]
    fn upstream_refusals() {
        let greeting = Handshake::decode(&decode_one(&greeting_packet()).payload).unwrap();
        // A greeting without TLS where TLS is required.
        let mut no_tls = greeting.clone();
        no_tls.capabilities.remove(CapabilityFlags::SSL);
        let mut u = UpstreamHandshake::new(login(true));
        u.feed(&framed(0, |o| no_tls.encode(o)));
        assert_eq!(u.next_event(), Err(UpstreamHandshakeError::NoTls));

        // Plaintext (loopback): the response is packet 1; an ERR to it is a rejection.
        let mut u = UpstreamHandshake::new(login(false));
        u.feed(&framed(0, |o| greeting.encode(o)));
        let UpstreamEvent::Send(resp) = u.next_event().unwrap() else { panic!() };
        assert_eq!(decode_one(&resp).seq, 1);
        u.feed(&hex(captures::ACCESS_DENIED));
        let Err(UpstreamHandshakeError::Rejected(e)) = u.next_event() else { panic!() };
        assert_eq!(e.code, crate::ER_ACCESS_DENIED_ERROR);

        // A switch to anything but the clear password.
        let mut u = UpstreamHandshake::new(login(false));
        u.feed(&framed(0, |o| greeting.encode(o)));
        u.next_event().unwrap();
        u.feed(&hex(captures::SWITCH_TO_NATIVE));
        assert!(
            matches!(u.next_event(), Err(UpstreamHandshakeError::UnsupportedAuth(p)) if p == NATIVE_PASSWORD_PLUGIN)
        );

        // An ERR in place of the greeting.
        let mut u = UpstreamHandshake::new(login(true));
        u.feed(&framed(0, |o| ErrPacket::too_many_connections().before_greeting().encode(o)));
        assert!(matches!(u.next_event(), Err(UpstreamHandshakeError::Rejected(e)) if e.code == 1040));

        // An upstream without CLIENT_DEPRECATE_EOF for a client that uses it.
        let mut old = greeting;
        old.capabilities.remove(CapabilityFlags::DEPRECATE_EOF);
        let mut u = UpstreamHandshake::new(login(false));
        u.feed(&framed(0, |o| old.encode(o)));
        assert_eq!(u.next_event(), Err(UpstreamHandshakeError::Capabilities(CapabilityFlags::DEPRECATE_EOF)));
    }

    proptest! {
        /// Whatever a client sends, the server side answers with an event or an error, never a
        /// panic, and never asks for more than a packet's worth.
        #[test]
        fn server_side_takes_any_bytes(input in proptest::collection::vec(any::<u8>(), 0..200), tls in any::<bool>()) {
            let mut s = ServerHandshake::new("8.0.36-Sluice", 1, [b'x'; 20], DEFAULT_CHARSET);
            s.next_event().unwrap();
            if tls {
                s.feed(&hex(captures::SSL_REQUEST));
                prop_assert_eq!(s.next_event(), Ok(ServerEvent::StartTls));
                s.tls_established();
            }
            let mut rest = &input[..];
            while let Ok(ServerEvent::NeedMore(n)) = s.next_event() {
                prop_assert!(n > 0 && n <= PRE_AUTH_MAX_PAYLOAD + HEADER_LEN);
                if rest.is_empty() {
                    break;
                }
                let k = n.min(rest.len());
                s.feed(&rest[..k]);
                rest = &rest[k..];
            }
        }

        /// The same for the upstream side, from the greeting on.
        #[test]
        fn upstream_side_takes_any_bytes(input in proptest::collection::vec(any::<u8>(), 0..200), tls in any::<bool>()) {
            let mut u = UpstreamHandshake::new(login(tls));
            u.feed(&input);
            for _ in 0..8 {
                match u.next_event() {
                    Ok(UpstreamEvent::NeedMore(n)) => prop_assert!(n > 0),
                    Ok(UpstreamEvent::StartTls) => u.tls_established(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
