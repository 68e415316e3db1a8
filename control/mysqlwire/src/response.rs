//! The server's generic replies: OK, ERR and EOF, the errors Sluice sends as if it were the
//! server, and [`AuthReply`], which tells apart what a server may answer during authentication.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use crate::wire::{put_lenenc_bytes, put_lenenc_int, Reader};
use crate::{malformed, AuthMoreData, AuthSwitchRequest, CapabilityFlags, Error, StatusFlags};

const OK_HEADER: u8 = 0x00;
const EOF_HEADER: u8 = 0xFE;
const ERR_HEADER: u8 = 0xFF;
/// An EOF packet is shorter than this; a 0xFE packet this long or longer is an OK in EOF's place.
const EOF_MAX_LEN: usize = 9;

/// Wrong user or password (SQLSTATE 28000).
pub const ER_ACCESS_DENIED_ERROR: u16 = 1045;
/// The user may not use the database (SQLSTATE 42000).
pub const ER_DBACCESS_DENIED_ERROR: u16 = 1044;
/// Too many connections (SQLSTATE 08004).
pub const ER_CON_COUNT_ERROR: u16 = 1040;
/// The handshake could not be read (SQLSTATE 08S01).
pub const ER_BAD_HANDSHAKE: u16 = 1043;
/// The server requires TLS (SQLSTATE HY000).
pub const ER_SECURE_TRANSPORT_REQUIRED: u16 = 3159;

/// Success (header 0x00, or 0xFE in EOF's place under CLIENT_DEPRECATE_EOF).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: StatusFlags,
    pub warnings: u16,
    /// Human-readable; decoded lossily.
    pub info: String,
    /// Session state changes (CLIENT_SESSION_TRACK with SERVER_SESSION_STATE_CHANGED), unparsed.
    pub session_state_info: Vec<u8>,
    /// Sent with header 0xFE, where an EOF packet would have been.
    pub eof_replacement: bool,
}

impl OkPacket {
    /// Writes the payload for a client with capabilities `caps`.
    pub fn encode(&self, caps: CapabilityFlags, out: &mut BytesMut) {
        out.put_u8(if self.eof_replacement { EOF_HEADER } else { OK_HEADER });
        put_lenenc_int(out, self.affected_rows);
        put_lenenc_int(out, self.last_insert_id);
        if caps.contains(CapabilityFlags::PROTOCOL_41) {
            out.put_u16_le(self.status.bits());
            out.put_u16_le(self.warnings);
        } else if caps.contains(CapabilityFlags::TRANSACTIONS) {
            out.put_u16_le(self.status.bits());
        }
        if caps.contains(CapabilityFlags::SESSION_TRACK) {
            // As servers do: both fields are left off when there is nothing to say.
            let state_changed = self.status.contains(StatusFlags::SESSION_STATE_CHANGED);
            if state_changed || !self.info.is_empty() {
                put_lenenc_bytes(out, self.info.as_bytes());
            }
            if state_changed {
                put_lenenc_bytes(out, &self.session_state_info);
            }
        } else {
            out.put_slice(self.info.as_bytes());
        }
    }

    pub fn decode(payload: &[u8], caps: CapabilityFlags) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let eof_replacement = match r.u8("OK packet")? {
            OK_HEADER => false,
            EOF_HEADER if caps.contains(CapabilityFlags::DEPRECATE_EOF) && payload.len() >= 7 => true,
            got => return Err(Error::UnexpectedHeader { what: "OK packet", got }),
        };
        let affected_rows = r.lenenc_int("affected rows")?;
        let last_insert_id = r.lenenc_int("last insert id")?;
        let (mut status, mut warnings) = (StatusFlags::empty(), 0);
        if caps.contains(CapabilityFlags::PROTOCOL_41) {
            status = StatusFlags::from_bits(r.u16("status flags")?);
            warnings = r.u16("warnings")?;
        } else if caps.contains(CapabilityFlags::TRANSACTIONS) {
            status = StatusFlags::from_bits(r.u16("status flags")?);
        }
        let mut session_state_info = Vec::new();
        let info = if caps.contains(CapabilityFlags::SESSION_TRACK) {
            // Servers leave both off when there is nothing to say.
            if r.is_empty() {
                String::new()
            } else {
                let info = lossy(r.lenenc_bytes("info")?);
                if status.contains(StatusFlags::SESSION_STATE_CHANGED) && !r.is_empty() {
                    session_state_info = r.lenenc_bytes("session state info")?.to_vec();
                }
                info
            }
        } else {
            lossy(r.rest())
        };
        Ok(OkPacket { affected_rows, last_insert_id, status, warnings, info, session_state_info, eof_replacement })
    }
}

fn lossy(b: &[u8]) -> String {
    match String::from_utf8_lossy(b) {
        Cow::Borrowed(s) => s.to_owned(),
        Cow::Owned(s) => s,
    }
}

/// Failure (header 0xFF): error code, SQLSTATE, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    /// Sent as `#` and 5 characters; absent in an error sent in place of the greeting, since
    /// clients then do not yet know the server speaks protocol 4.1 and would show it as part of
    /// the message.
    pub sql_state: Option<[u8; 5]>,
    /// Human-readable; decoded lossily.
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, sql_state: [u8; 5], message: impl Into<String>) -> Self {
        ErrPacket { code, sql_state: Some(sql_state), message: message.into() }
    }

    /// 1045: wrong user or password, with MySQL's wording.
    pub fn access_denied(user: &str, host: &str, using_password: bool) -> Self {
        let using = if using_password { "YES" } else { "NO" };
        Self::new(
            ER_ACCESS_DENIED_ERROR,
            *b"28000",
            format!("Access denied for user '{user}'@'{host}' (using password: {using})"),
        )
    }

    /// 1044: the user may not use `database`.
    pub fn database_access_denied(user: &str, host: &str, database: &str) -> Self {
        Self::new(
            ER_DBACCESS_DENIED_ERROR,
            *b"42000",
            format!("Access denied for user '{user}'@'{host}' to database '{database}'"),
        )
    }

    /// 1040: no connection slot left. Usually sent in place of the greeting, then with
    /// [`ErrPacket::before_greeting`].
    pub fn too_many_connections() -> Self {
        Self::new(ER_CON_COUNT_ERROR, *b"08004", "Too many connections")
    }

    /// 1043: the client's handshake could not be read.
    pub fn bad_handshake() -> Self {
        Self::new(ER_BAD_HANDSHAKE, *b"08S01", "Bad handshake")
    }

    /// 3159: the client did not ask for TLS and Sluice requires it.
    pub fn secure_transport_required() -> Self {
        Self::new(
            ER_SECURE_TRANSPORT_REQUIRED,
            *b"HY000",
            "Connections using insecure transport are prohibited while --require_secure_transport=ON.",
        )
    }

    /// The same error without its SQLSTATE, for sending in place of the greeting.
    pub fn before_greeting(mut self) -> Self {
        self.sql_state = None;
        self
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(ERR_HEADER);
        out.put_u16_le(self.code);
        if let Some(state) = &self.sql_state {
            out.put_u8(b'#');
            out.put_slice(state);
        }
        out.put_slice(self.message.as_bytes());
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        match r.u8("ERR packet")? {
            ERR_HEADER => {}
            got => return Err(Error::UnexpectedHeader { what: "ERR packet", got }),
        }
        let code = r.u16("error code")?;
        // Clients take a '#' and 5 bytes as the state whether or not protocol 4.1 was agreed.
        let sql_state = if r.peek() == Some(b'#') && r.remaining() >= 6 {
            r.u8("SQL state marker")?;
            let mut s = [0; 5];
            s.copy_from_slice(r.bytes(5, "SQL state")?);
            Some(s)
        } else {
            None
        };
        Ok(ErrPacket { code, sql_state, message: lossy(r.rest()) })
    }
}

/// End of a result set part (header 0xFE, shorter than 9 bytes), without CLIENT_DEPRECATE_EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EofPacket {
    pub warnings: u16,
    pub status: StatusFlags,
}

impl EofPacket {
    pub fn encode(&self, caps: CapabilityFlags, out: &mut BytesMut) {
        out.put_u8(EOF_HEADER);
        if caps.contains(CapabilityFlags::PROTOCOL_41) {
            out.put_u16_le(self.warnings);
            out.put_u16_le(self.status.bits());
        }
    }

    pub fn decode(payload: &[u8], caps: CapabilityFlags) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        match r.u8("EOF packet")? {
            EOF_HEADER if payload.len() < EOF_MAX_LEN => {}
            EOF_HEADER => return Err(malformed("EOF packet length")),
            got => return Err(Error::UnexpectedHeader { what: "EOF packet", got }),
        }
        if caps.contains(CapabilityFlags::PROTOCOL_41) {
            let warnings = r.u16("warnings")?;
            let status = StatusFlags::from_bits(r.u16("status flags")?);
            Ok(EofPacket { warnings, status })
        } else {
            Ok(EofPacket::default())
        }
    }
}

/// What a server answers a handshake response or an auth switch response with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    Ok(OkPacket),
    Err(ErrPacket),
    Switch(AuthSwitchRequest),
    MoreData(AuthMoreData),
}

impl AuthReply {
    /// Reads a reply by its first byte; `caps` are the capabilities both sides agreed on.
    pub fn decode(payload: &[u8], caps: CapabilityFlags) -> Result<Self, Error> {
        match payload.first() {
            Some(&OK_HEADER) => OkPacket::decode(payload, caps).map(AuthReply::Ok),
            Some(&ERR_HEADER) => ErrPacket::decode(payload).map(AuthReply::Err),
            Some(&EOF_HEADER) => AuthSwitchRequest::decode(payload).map(AuthReply::Switch),
            Some(&0x01) => AuthMoreData::decode(payload).map(AuthReply::MoreData),
            Some(&got) => Err(Error::UnexpectedHeader { what: "authentication reply", got }),
            None => Err(Error::Truncated { what: "authentication reply" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captures::{self, hex};
    use crate::{parse_kill, Command, Kill, KillKind, PacketDecoder, PacketEncoder, PRE_AUTH_MAX_PAYLOAD};
    use proptest::prelude::*;

    fn payload(h: &str) -> (u8, Vec<u8>) {
        let mut buf = BytesMut::from(&hex(h)[..]);
        let p = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD).next_packet(&mut buf).unwrap().unwrap();
        (p.seq, p.payload.to_vec())
    }

    /// The capabilities the captured client and server agreed on.
    fn agreed() -> CapabilityFlags {
        CapabilityFlags::from_halves(0xfffe, 0x81ff) & CapabilityFlags::from_bits(0x00bf_a28c)
    }

    #[test]
    fn mariadb_auth_ok_with_session_state() {
        let (seq, p) = payload(captures::AUTH_OK);
        assert_eq!(seq, 2);
        let ok = match AuthReply::decode(&p, agreed()).unwrap() {
            AuthReply::Ok(ok) => ok,
            other => panic!("{other:?}"),
        };
        assert_eq!((ok.affected_rows, ok.last_insert_id, ok.warnings, ok.info.as_str()), (0, 0, 0, ""));
        assert_eq!(ok.status, StatusFlags::AUTOCOMMIT | StatusFlags::SESSION_STATE_CHANGED);
        // SESSION_TRACK_SCHEMA (1), 5 bytes: "test".
        assert_eq!(ok.session_state_info, b"\x01\x05\x04test");
        let mut out = BytesMut::new();
        PacketEncoder::new(2).write_with(&mut out, |o| ok.encode(agreed(), o));
        assert_eq!(out.to_vec(), hex(captures::AUTH_OK));
    }

    #[test]
    fn mariadb_errors() {
        let (seq, p) = payload(captures::ACCESS_DENIED);
        assert_eq!(seq, 2);
        let e = match AuthReply::decode(&p, agreed()).unwrap() {
            AuthReply::Err(e) => e,
            other => panic!("{other:?}"),
        };
        // Sluice's own 1045 is the server's, byte for byte.
        assert_eq!(e, ErrPacket::access_denied("sluice", "localhost", true));
        let mut out = BytesMut::new();
        e.encode(&mut out);
        assert_eq!(out.to_vec(), p);

        let (_, p) = payload(captures::UNKNOWN_THREAD);
        let e = ErrPacket::decode(&p).unwrap();
        assert_eq!((e.code, e.sql_state, e.message.as_str()), (1094, Some(*b"HY000"), "Unknown thread id: 99"));
    }

    #[test]
    fn mariadb_kill_query_and_quit() {
        let (seq, p) = payload(captures::KILL_QUERY);
        assert_eq!(seq, 0);
        let Command::Query(sql) = Command::parse(&p, agreed()).unwrap() else { panic!("not a query") };
        assert_eq!(parse_kill(sql), Ok(Kill { kind: KillKind::Query, id: 99 }));
        let (_, p) = payload(captures::QUIT);
        assert_eq!(Command::parse(&p, agreed()), Ok(Command::Quit));
    }

    #[test]
    fn mariadb_ok_and_eof() {
        let (seq, p) = payload(captures::SWITCH_OK);
        assert_eq!(seq, 4);
        let ok = OkPacket::decode(&p, agreed()).unwrap();
        assert_eq!(ok, OkPacket { status: StatusFlags::AUTOCOMMIT, ..Default::default() });
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write_with(&mut out, |o| ok.encode(agreed(), o));
        assert_eq!(out.to_vec(), hex(captures::SWITCH_OK));

        let (seq, p) = payload(captures::EOF);
        let eof = EofPacket::decode(&p, agreed()).unwrap();
        assert_eq!(eof, EofPacket { warnings: 0, status: StatusFlags::AUTOCOMMIT });
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write_with(&mut out, |o| eof.encode(agreed(), o));
        assert_eq!(out.to_vec(), hex(captures::EOF));
    }

    #[test]
    fn sluice_errors() {
        let cases = [
            (ErrPacket::access_denied("app", "10.0.0.1", false), 1045, b"28000"),
            (ErrPacket::database_access_denied("app", "%", "shop"), 1044, b"42000"),
            (ErrPacket::too_many_connections(), 1040, b"08004"),
            (ErrPacket::bad_handshake(), 1043, b"08S01"),
            (ErrPacket::secure_transport_required(), 3159, b"HY000"),
        ];
        for (e, code, state) in cases {
            assert_eq!((e.code, e.sql_state), (code, Some(*state)));
            let mut out = BytesMut::new();
            e.encode(&mut out);
            assert_eq!(&out[..3], &[0xFF, code as u8, (code >> 8) as u8]);
            assert_eq!(&out[3..9], &[&b"#"[..], state].concat()[..]);
            assert_eq!(ErrPacket::decode(&out), Ok(e));
        }
        assert_eq!(
            ErrPacket::database_access_denied("app", "%", "shop").message,
            "Access denied for user 'app'@'%' to database 'shop'"
        );
        let early = ErrPacket::too_many_connections().before_greeting();
        let mut out = BytesMut::new();
        early.encode(&mut out);
        assert_eq!(&out[..], b"\xff\x10\x04Too many connections");
        assert_eq!(ErrPacket::decode(&out), Ok(early));
    }

    #[test]
    fn eof_and_ok_headers() {
        let p41 = CapabilityFlags::PROTOCOL_41;
        let eof = EofPacket { warnings: 1, status: StatusFlags::AUTOCOMMIT };
        let mut out = BytesMut::new();
        eof.encode(p41, &mut out);
        assert_eq!(&out[..], b"\xfe\x01\x00\x02\x00");
        assert_eq!(EofPacket::decode(&out, p41), Ok(eof));
        assert!(EofPacket::decode(&[0xFE; 9], p41).is_err());
        // 0xFE is an OK only under CLIENT_DEPRECATE_EOF.
        let ok = OkPacket { eof_replacement: true, ..Default::default() };
        let mut out = BytesMut::new();
        ok.encode(p41, &mut out);
        assert!(OkPacket::decode(&out, p41).is_err());
        assert_eq!(OkPacket::decode(&out, p41 | CapabilityFlags::DEPRECATE_EOF), Ok(ok));
        assert!(matches!(AuthReply::decode(b"\x02", p41), Err(Error::UnexpectedHeader { got: 2, .. })));
    }

    proptest! {
        #[test]
        fn ok_roundtrip(
            caps in any::<u32>(),
            affected in any::<u64>(),
            id in any::<u64>(),
            status in any::<u16>(),
            warnings in any::<u16>(),
            info in ".{0,40}",
            state in proptest::collection::vec(any::<u8>(), 0..40),
            eof in any::<bool>(),
        ) {
            let caps = CapabilityFlags::from_bits(caps) | CapabilityFlags::PROTOCOL_41;
            let status = StatusFlags::from_bits(status);
            let tracked = caps.contains(CapabilityFlags::SESSION_TRACK) && status.contains(StatusFlags::SESSION_STATE_CHANGED);
            let ok = OkPacket {
                affected_rows: affected,
                last_insert_id: id,
                status,
                warnings,
                info,
                session_state_info: if tracked { state } else { vec![] },
                eof_replacement: eof && caps.contains(CapabilityFlags::DEPRECATE_EOF),
            };
            let mut out = BytesMut::new();
            ok.encode(caps, &mut out);
            prop_assert_eq!(OkPacket::decode(&out, caps), Ok(ok));
        }

        #[test]
        fn err_roundtrip(code in any::<u16>(), state in proptest::option::of(any::<[u8; 5]>()), message in ".{0,60}") {
            // Without a state, a message that starts like one would be read as one.
            prop_assume!(state.is_some() || !message.starts_with('#'));
            let e = ErrPacket { code, sql_state: state, message };
            let mut out = BytesMut::new();
            e.encode(&mut out);
            prop_assert_eq!(ErrPacket::decode(&out), Ok(e));
        }

        #[test]
        fn eof_roundtrip(w in any::<u16>(), s in any::<u16>()) {
            let e = EofPacket { warnings: w, status: StatusFlags::from_bits(s) };
            let caps = CapabilityFlags::PROTOCOL_41;
            let mut out = BytesMut::new();
            e.encode(caps, &mut out);
            prop_assert_eq!(EofPacket::decode(&out, caps), Ok(e));
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), caps in any::<u32>()) {
            let caps = CapabilityFlags::from_bits(caps);
            let _ = OkPacket::decode(&b, caps);
            let _ = ErrPacket::decode(&b);
            let _ = EofPacket::decode(&b, caps);
            let _ = AuthReply::decode(&b, caps);
        }
    }
}
