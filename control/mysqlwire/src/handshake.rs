//! Connection-phase messages: the server's Handshake v10, the client's SSLRequest and
//! HandshakeResponse41, auth switching and more-data, and the `mysql_clear_password` response
//! (how RDS IAM tokens travel).
//!
//! Each `decode` takes one whole payload (from [`crate::PacketDecoder`]) and reads the fields the
//! capabilities in that same message select. Trailing bytes after the last field are ignored, as
//! servers do (a MySQL 8 client with zstd compression appends its level, for one).

use bytes::{BufMut, BytesMut};

use crate::wire::{put_lenenc_bytes, put_nul_bytes, utf8, Reader};
use crate::{malformed, CapabilityFlags, Error, StatusFlags};

/// The only protocol version spoken since MySQL 3.21.
pub const PROTOCOL_VERSION: u8 = 10;
pub const NATIVE_PASSWORD_PLUGIN: &str = "mysql_native_password";
pub const CLEAR_PASSWORD_PLUGIN: &str = "mysql_clear_password";
pub const CACHING_SHA2_PASSWORD_PLUGIN: &str = "caching_sha2_password";

/// Header byte of an AuthSwitchRequest (also the EOF packet's, in other phases).
const AUTH_SWITCH_HEADER: u8 = 0xFE;
/// Header byte of AuthMoreData.
const AUTH_MORE_DATA_HEADER: u8 = 0x01;
/// Length of the SSLRequest and of the fixed part of HandshakeResponse41.
const SSL_REQUEST_LEN: usize = 32;
/// Zero filler after the charset in SSLRequest and HandshakeResponse41: 23 bytes, of which
/// MariaDB uses the last 4 for its extended capabilities.
const RESPONSE_FILLER: usize = 19;
/// Reserved bytes of Handshake v10: 10, of which MariaDB uses the last 4.
const HANDSHAKE_RESERVED: usize = 6;
/// Length of the scramble part 1, and the least length of part 2.
const SCRAMBLE_PART1: usize = 8;
const SCRAMBLE_PART2_MIN: usize = 13;

/// The server's greeting (Protocol::HandshakeV10). Only the CLIENT_PROTOCOL_41 form is
/// accepted: every server since MySQL 4.1 sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub server_version: String,
    pub connection_id: u32,
    /// The scramble, parts 1 and 2 together without part 2's terminating NUL: 20 bytes from
    /// real servers. Encoding writes at least 8 (zero-padded); without CLIENT_SECURE_CONNECTION
    /// only the first 8 travel, and without CLIENT_PLUGIN_AUTH the length is not sent, so 20 is
    /// assumed on decoding. Servers generate it from printable bytes with no NUL (some clients
    /// copy it as a C string), and so should a server-side user of this type.
    pub auth_plugin_data: Vec<u8>,
    pub capabilities: CapabilityFlags,
    pub charset: u8,
    pub status: StatusFlags,
    /// MariaDB's extended capabilities (the last 4 reserved bytes); 0 from MySQL.
    pub mariadb_capabilities: u32,
    /// The default authentication plugin; `Some` exactly when CLIENT_PLUGIN_AUTH is set.
    pub auth_plugin_name: Option<String>,
}

impl Handshake {
    /// Writes the payload.
    pub fn encode(&self, out: &mut BytesMut) {
        let caps = self.capabilities;
        let mut scramble = self.auth_plugin_data.clone();
        if scramble.len() < SCRAMBLE_PART1 {
            scramble.resize(SCRAMBLE_PART1, 0);
        }
        out.put_u8(PROTOCOL_VERSION);
        put_nul_bytes(out, self.server_version.as_bytes());
        out.put_u32_le(self.connection_id);
        out.put_slice(&scramble[..SCRAMBLE_PART1]);
        out.put_u8(0);
        out.put_u16_le(caps.lower());
        out.put_u8(self.charset);
        out.put_u16_le(self.status.bits());
        out.put_u16_le(caps.upper());
        let data_len = if caps.contains(CapabilityFlags::PLUGIN_AUTH) {
            u8::try_from(scramble.len() + 1).unwrap_or(u8::MAX)
        } else {
            0
        };
        out.put_u8(data_len);
        out.put_slice(&[0; HANDSHAKE_RESERVED]);
        out.put_u32_le(self.mariadb_capabilities);
        if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            let part2 = &scramble[SCRAMBLE_PART1..];
            let part2 = &part2[..part2.len().min(usize::from(u8::MAX) - 1 - SCRAMBLE_PART1)];
            out.put_slice(part2);
            out.put_u8(0);
            for _ in part2.len() + 1..SCRAMBLE_PART2_MIN {
                out.put_u8(0);
            }
        }
        if caps.contains(CapabilityFlags::PLUGIN_AUTH) {
            put_nul_bytes(out, self.auth_plugin_name.as_deref().unwrap_or("").as_bytes());
        }
    }

    /// Reads a greeting. A server that refuses the connection at once (too many connections, host
    /// blocked) sends an ERR packet instead: that is [`Error::UnexpectedHeader`] with 0xFF here,
    /// and [`crate::ErrPacket::decode`] reads it.
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        match r.u8("handshake")? {
            PROTOCOL_VERSION => {}
            0xFF => return Err(Error::UnexpectedHeader { what: "handshake", got: 0xFF }),
            _ => return Err(Error::Unsupported { what: "protocol version" }),
        }
        let server_version = r.nul_str("server version")?;
        let connection_id = r.u32("connection id")?;
        let mut scramble = r.bytes(SCRAMBLE_PART1, "auth-plugin-data part 1")?.to_vec();
        r.u8("filler")?;
        let lower = r.u16("capability flags")?;
        let charset = r.u8("character set")?;
        let status = StatusFlags::from_bits(r.u16("status flags")?);
        let upper = r.u16("capability flags")?;
        let capabilities = CapabilityFlags::from_halves(lower, upper);
        if !capabilities.contains(CapabilityFlags::PROTOCOL_41) {
            return Err(Error::Unsupported { what: "server without CLIENT_PROTOCOL_41" });
        }
        let data_len = usize::from(r.u8("auth-plugin-data length")?);
        r.bytes(HANDSHAKE_RESERVED, "reserved")?;
        let mariadb_capabilities = r.u32("reserved")?;
        if capabilities.contains(CapabilityFlags::SECURE_CONNECTION) {
            let n = SCRAMBLE_PART2_MIN.max(data_len.saturating_sub(SCRAMBLE_PART1));
            scramble.extend_from_slice(r.bytes(n, "auth-plugin-data part 2")?);
            if capabilities.contains(CapabilityFlags::PLUGIN_AUTH) && data_len > SCRAMBLE_PART1 {
                scramble.truncate(data_len - 1);
            } else {
                // Without the length, the scramble is the 20 bytes before part 2's NUL.
                scramble.truncate(SCRAMBLE_PART1 + SCRAMBLE_PART2_MIN - 1);
            }
        }
        let auth_plugin_name = if capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
            // Some 5.5 servers left the NUL off the end of the packet (MySQL bug #59453).
            let rest = r.rest();
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            Some(utf8(&rest[..end], "auth plugin name")?)
        } else {
            None
        };
        Ok(Handshake {
            server_version,
            connection_id,
            auth_plugin_data: scramble,
            capabilities,
            charset,
            status,
            mariadb_capabilities,
            auth_plugin_name,
        })
    }
}

/// The fixed 32-byte start the client's SSLRequest and HandshakeResponse41 share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FixedPart {
    capabilities: CapabilityFlags,
    max_packet_size: u32,
    charset: u8,
    mariadb_capabilities: u32,
}

impl FixedPart {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u32_le(self.capabilities.bits());
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.charset);
        out.put_slice(&[0; RESPONSE_FILLER]);
        out.put_u32_le(self.mariadb_capabilities);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let capabilities = CapabilityFlags::from_bits(r.u32("client capability flags")?);
        if !capabilities.contains(CapabilityFlags::PROTOCOL_41) {
            return Err(Error::Unsupported { what: "HandshakeResponse320 (client without CLIENT_PROTOCOL_41)" });
        }
        let max_packet_size = r.u32("max packet size")?;
        let charset = r.u8("character set")?;
        r.bytes(RESPONSE_FILLER, "filler")?;
        let mariadb_capabilities = r.u32("filler")?;
        Ok(FixedPart { capabilities, max_packet_size, charset, mariadb_capabilities })
    }
}

/// The client's request to switch to TLS: HandshakeResponse41's first 32 bytes, CLIENT_SSL set.
/// The TLS handshake follows it directly, then the full response with sequence id 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRequest {
    /// Always contains CLIENT_SSL and CLIENT_PROTOCOL_41 once decoded; `encode` sets CLIENT_SSL.
    pub capabilities: CapabilityFlags,
    pub max_packet_size: u32,
    pub charset: u8,
    pub mariadb_capabilities: u32,
}

impl SslRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        FixedPart {
            capabilities: self.capabilities | CapabilityFlags::SSL,
            max_packet_size: self.max_packet_size,
            charset: self.charset,
            mariadb_capabilities: self.mariadb_capabilities,
        }
        .encode(out);
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        if payload.len() != SSL_REQUEST_LEN {
            return Err(malformed("SSLRequest length"));
        }
        let f = FixedPart::decode(&mut Reader::new(payload))?;
        if !f.capabilities.contains(CapabilityFlags::SSL) {
            return Err(malformed("SSLRequest without CLIENT_SSL"));
        }
        Ok(SslRequest {
            capabilities: f.capabilities,
            max_packet_size: f.max_packet_size,
            charset: f.charset,
            mariadb_capabilities: f.mariadb_capabilities,
        })
    }
}

/// The client's answer to the greeting (Protocol::HandshakeResponse41).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capabilities: CapabilityFlags,
    pub max_packet_size: u32,
    pub charset: u8,
    pub mariadb_capabilities: u32,
    pub username: String,
    /// Length-encoded with CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, else 1-byte length with
    /// CLIENT_SECURE_CONNECTION, else NUL-terminated.
    pub auth_response: Vec<u8>,
    /// `Some` exactly when CLIENT_CONNECT_WITH_DB is set.
    pub database: Option<String>,
    /// `Some` exactly when CLIENT_PLUGIN_AUTH is set (empty when a client set the flag but sent
    /// no name, which servers read as their default plugin).
    pub auth_plugin_name: Option<String>,
    /// With CLIENT_CONNECT_ATTRS; empty otherwise.
    pub connect_attrs: Vec<(String, String)>,
}

impl HandshakeResponse {
    /// Writes the payload; fails only when the auth response does not fit the form the
    /// capabilities select (over 255 bytes without CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, or a
    /// NUL in the NUL-terminated form), leaving `out` as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), Error> {
        let caps = self.capabilities;
        let too_long = Error::TooLong { what: "auth response" };
        let auth_len = if caps.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            None
        } else if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            Some(u8::try_from(self.auth_response.len()).map_err(|_| too_long)?)
        } else if self.auth_response.contains(&0) {
            return Err(malformed("auth response with a NUL in its NUL-terminated form"));
        } else {
            None
        };
        FixedPart {
            capabilities: caps,
            max_packet_size: self.max_packet_size,
            charset: self.charset,
            mariadb_capabilities: self.mariadb_capabilities,
        }
        .encode(out);
        put_nul_bytes(out, self.username.as_bytes());
        if caps.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            put_lenenc_bytes(out, &self.auth_response);
        } else if let Some(n) = auth_len {
            out.put_u8(n);
            out.put_slice(&self.auth_response);
        } else {
            put_nul_bytes(out, &self.auth_response);
        }
        if caps.contains(CapabilityFlags::CONNECT_WITH_DB) {
            put_nul_bytes(out, self.database.as_deref().unwrap_or("").as_bytes());
        }
        if caps.contains(CapabilityFlags::PLUGIN_AUTH) {
            put_nul_bytes(out, self.auth_plugin_name.as_deref().unwrap_or("").as_bytes());
        }
        if caps.contains(CapabilityFlags::CONNECT_ATTRS) {
            let mut attrs = BytesMut::new();
            for (k, v) in &self.connect_attrs {
                put_lenenc_bytes(&mut attrs, k.as_bytes());
                put_lenenc_bytes(&mut attrs, v.as_bytes());
            }
            put_lenenc_bytes(out, &attrs);
        }
        Ok(())
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let f = FixedPart::decode(&mut r)?;
        let caps = f.capabilities;
        let username = r.nul_str("username")?;
        let auth_response = if caps.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            r.lenenc_bytes("auth response")?
        } else if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            let n = r.u8("auth response length")?;
            r.bytes(usize::from(n), "auth response")?
        } else {
            r.nul_bytes("auth response")?
        }
        .to_vec();
        let database =
            if caps.contains(CapabilityFlags::CONNECT_WITH_DB) { Some(r.nul_str("database")?) } else { None };
        let auth_plugin_name = if !caps.contains(CapabilityFlags::PLUGIN_AUTH) {
            None
        } else if r.is_empty() {
            Some(String::new())
        } else {
            Some(r.nul_str("auth plugin name")?)
        };
        let mut connect_attrs = Vec::new();
        if caps.contains(CapabilityFlags::CONNECT_ATTRS) && !r.is_empty() {
            let mut a = Reader::new(r.lenenc_bytes("connection attributes")?);
            while !a.is_empty() {
                let k = utf8(a.lenenc_bytes("connection attribute name")?, "connection attribute name")?;
                let v = utf8(a.lenenc_bytes("connection attribute value")?, "connection attribute value")?;
                connect_attrs.push((k, v));
            }
        }
        Ok(HandshakeResponse {
            capabilities: caps,
            max_packet_size: f.max_packet_size,
            charset: f.charset,
            mariadb_capabilities: f.mariadb_capabilities,
            username,
            auth_response,
            database,
            auth_plugin_name,
            connect_attrs,
        })
    }
}

/// The client's first packet after the greeting: an SSLRequest (exactly 32 bytes with
/// CLIENT_SSL) or the full response. A full response may carry CLIENT_SSL too: over TLS it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    SslRequest(SslRequest),
    Response(HandshakeResponse),
}

impl ClientHello {
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        if payload.len() == SSL_REQUEST_LEN {
            SslRequest::decode(payload).map(ClientHello::SslRequest)
        } else {
            HandshakeResponse::decode(payload).map(ClientHello::Response)
        }
    }
}

/// The server asks the client to authenticate with another plugin (0xFE, plugin name, data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSwitchRequest {
    pub plugin_name: String,
    /// The plugin's data as sent: for mysql_native_password the 20-byte scramble and a NUL; for
    /// mysql_clear_password usually empty.
    pub plugin_data: Vec<u8>,
}

impl AuthSwitchRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(AUTH_SWITCH_HEADER);
        put_nul_bytes(out, self.plugin_name.as_bytes());
        out.put_slice(&self.plugin_data);
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        match r.u8("auth switch request")? {
            AUTH_SWITCH_HEADER => {}
            got => return Err(Error::UnexpectedHeader { what: "auth switch request", got }),
        }
        if r.is_empty() {
            return Err(Error::Unsupported { what: "old auth switch request (mysql_old_password)" });
        }
        let plugin_name = r.nul_str("auth plugin name")?;
        Ok(AuthSwitchRequest { plugin_name, plugin_data: r.rest().to_vec() })
    }

    /// The plugin data without the NUL servers append to a scramble.
    pub fn scramble(&self) -> &[u8] {
        self.plugin_data.strip_suffix(&[0]).unwrap_or(&self.plugin_data)
    }
}

/// The client's answer to an auth switch or to more data: the plugin's bytes, unframed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSwitchResponse {
    pub data: Vec<u8>,
}

impl AuthSwitchResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&self.data);
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        Ok(AuthSwitchResponse { data: payload.to_vec() })
    }
}

/// Extra authentication data from the server (0x01, data): caching_sha2_password's fast-auth
/// result or its request for the full password, among others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMoreData {
    pub data: Vec<u8>,
}

impl AuthMoreData {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(AUTH_MORE_DATA_HEADER);
        out.put_slice(&self.data);
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        match payload.split_first() {
            Some((&AUTH_MORE_DATA_HEADER, data)) => Ok(AuthMoreData { data: data.to_vec() }),
            Some((&got, _)) => Err(Error::UnexpectedHeader { what: "auth more data", got }),
            None => Err(Error::Truncated { what: "auth more data" }),
        }
    }
}

/// Writes a mysql_clear_password response: the password and a NUL. A NUL inside the password
/// would end it there on the server's side, so it is refused.
pub fn encode_clear_password(password: &[u8], out: &mut BytesMut) -> Result<(), Error> {
    if password.contains(&0) {
        return Err(malformed("clear password with a NUL"));
    }
    out.put_slice(password);
    out.put_u8(0);
    Ok(())
}

/// Reads a mysql_clear_password response (as the HandshakeResponse's auth response or an
/// AuthSwitchResponse): the password up to its terminating NUL. Borrowed, so the secret is not
/// copied. A missing terminator is tolerated (the whole payload is the password); bytes after
/// the NUL are not, since no client sends them and they would be silently dropped.
pub fn decode_clear_password(data: &[u8]) -> Result<&[u8], Error> {
    match data.iter().position(|&b| b == 0) {
        None => Ok(data),
        Some(end) if end + 1 == data.len() => Ok(&data[..end]),
        Some(_) => Err(malformed("clear password (bytes after its NUL)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captures::{self, hex};
    use crate::{AuthReply, Packet, PacketDecoder, PacketEncoder, PRE_AUTH_MAX_PAYLOAD};
    use proptest::prelude::*;

    fn packet(h: &str) -> Packet {
        let mut buf = BytesMut::from(&hex(h)[..]);
        let p = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD).next_packet(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        p
    }

    /// Encodes with `f` into a packet with sequence id `seq`.
    fn framed(seq: u8, f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write_with(&mut out, f);
        out.to_vec()
    }

    #[test]
    fn mariadb_greeting() {
        let p = packet(captures::GREETING);
        assert_eq!(p.seq, 0);
        let h = Handshake::decode(&p.payload).unwrap();
        assert_eq!(h.server_version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(h.connection_id, 3);
        assert_eq!(h.auth_plugin_data, b"Bq4La#+Ky?n.7j1T2=yk");
        assert_eq!(h.capabilities, CapabilityFlags::from_halves(0xfffe, 0x81ff));
        let c = h.capabilities;
        assert!(c.contains(CapabilityFlags::PROTOCOL_41 | CapabilityFlags::SSL | CapabilityFlags::PLUGIN_AUTH));
        assert!(c.contains(CapabilityFlags::SECURE_CONNECTION | CapabilityFlags::CONNECT_ATTRS));
        // MariaDB clears CLIENT_MYSQL and puts its own capabilities in the reserved bytes.
        assert!(!c.contains(CapabilityFlags::LONG_PASSWORD));
        assert_eq!(h.mariadb_capabilities, 0x1d);
        assert_eq!(h.charset, 8);
        assert_eq!(h.status, StatusFlags::AUTOCOMMIT);
        assert_eq!(h.auth_plugin_name.as_deref(), Some(NATIVE_PASSWORD_PLUGIN));
        // Sluice writes a greeting byte for byte as the server did.
        assert_eq!(framed(0, |o| h.encode(o)), hex(captures::GREETING));

        let h = Handshake::decode(&packet(captures::GREETING_NO_TLS).payload).unwrap();
        assert!(!h.capabilities.contains(CapabilityFlags::SSL));
        assert_eq!(framed(0, |o| h.encode(o)), hex(captures::GREETING_NO_TLS));
    }

    #[test]
    fn mariadb_handshake_response() {
        let p = packet(captures::RESPONSE);
        assert_eq!((p.seq, p.reply_seq()), (1, 2));
        let r = match ClientHello::decode(&p.payload).unwrap() {
            ClientHello::Response(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.username, "sluice");
        assert_eq!(r.database.as_deref(), Some("test"));
        assert_eq!(r.auth_plugin_name.as_deref(), Some(NATIVE_PASSWORD_PLUGIN));
        assert_eq!(r.auth_response, hex("64318cb2609ab5872ac3eb1cd89c4532ee537f8e"));
        assert!(r.capabilities.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA));
        assert!(!r.capabilities.contains(CapabilityFlags::SSL));
        assert_eq!((r.max_packet_size, r.charset, r.mariadb_capabilities), (1 << 20, 0x21, 0x1d));
        let attr = |k: &str| r.connect_attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(r.connect_attrs.len(), 7);
        assert_eq!(attr("_client_name"), Some("libmariadb"));
        assert_eq!(attr("program_name"), Some("mysql"));
        assert_eq!(attr("_server_host"), Some("127.0.0.1"));
        let mut out = BytesMut::new();
        PacketEncoder::new(1).try_write_with(&mut out, |o| r.encode(o)).unwrap();
        assert_eq!(out.to_vec(), hex(captures::RESPONSE));
    }

    #[test]
    fn mariadb_ssl_request() {
        let p = packet(captures::SSL_REQUEST);
        assert_eq!((p.seq, p.payload.len()), (1, 32));
        let s = match ClientHello::decode(&p.payload).unwrap() {
            ClientHello::SslRequest(s) => s,
            other => panic!("{other:?}"),
        };
        assert!(s.capabilities.contains(CapabilityFlags::SSL | CapabilityFlags::PROTOCOL_41));
        assert_eq!(framed(1, |o| s.encode(o)), hex(captures::SSL_REQUEST));
        // The same 32 bytes without CLIENT_SSL are neither an SSLRequest nor a whole response.
        let mut no_ssl = p.payload.to_vec();
        no_ssl[1] &= !0x08;
        assert_eq!(SslRequest::decode(&no_ssl), Err(malformed("SSLRequest without CLIENT_SSL")));
        assert_eq!(ClientHello::decode(&no_ssl), Err(malformed("SSLRequest without CLIENT_SSL")));
    }

    #[test]
    fn mariadb_clear_password_then_auth_switch() {
        let greeting = Handshake::decode(&packet(captures::CLEAR_GREETING).payload).unwrap();
        let p = packet(captures::CLEAR_RESPONSE);
        let r = HandshakeResponse::decode(&p.payload).unwrap();
        assert_eq!(r.auth_plugin_name.as_deref(), Some(CLEAR_PASSWORD_PLUGIN));
        assert_eq!(decode_clear_password(&r.auth_response), Ok(&b"secret"[..]));

        let sw = packet(captures::SWITCH_TO_NATIVE);
        assert_eq!(sw.seq, p.reply_seq());
        let caps = greeting.capabilities & r.capabilities;
        let AuthReply::Switch(req) = AuthReply::decode(&sw.payload, caps).unwrap() else { panic!("not a switch") };
        assert_eq!(req.plugin_name, NATIVE_PASSWORD_PLUGIN);
        // The server sends the greeting's scramble again.
        assert_eq!(req.scramble(), &greeting.auth_plugin_data[..]);
        assert_eq!(framed(sw.seq, |o| req.encode(o)), hex(captures::SWITCH_TO_NATIVE));

        let resp = packet(captures::SWITCH_RESPONSE);
        assert_eq!(resp.seq, sw.reply_seq());
        let data = AuthSwitchResponse::decode(&resp.payload).unwrap();
        assert_eq!(data.data.len(), 20);
        assert_eq!(framed(resp.seq, |o| data.encode(o)), hex(captures::SWITCH_RESPONSE));

        let ok = packet(captures::SWITCH_OK);
        assert_eq!(ok.seq, resp.reply_seq());
        assert!(matches!(AuthReply::decode(&ok.payload, caps), Ok(AuthReply::Ok(_))));
    }

    /// The examples of the MySQL source documentation (Protocol::HandshakeV10 and
    /// Protocol::HandshakeResponse41 pages), transcribed: an old-style greeting without
    /// CLIENT_PLUGIN_AUTH (so the scramble length is not sent) and a response with a 1-byte
    /// auth response length.
    #[test]
    fn mysql_documentation_examples() {
        let greeting = "360000000a352e352e322d6d320052000000223d4e5029753956\
                        00ffff0802000000000000000000000000000029644052\
                        5c55787a7c21294b00";
        let p = packet(greeting);
        let h = Handshake::decode(&p.payload).unwrap();
        assert_eq!(h.server_version, "5.5.2-m2");
        assert_eq!(h.connection_id, 0x52);
        assert_eq!(h.auth_plugin_data, b"\"=NP)u9V)d@R\\Uxz|!)K");
        assert_eq!(h.capabilities, CapabilityFlags::from_bits(0xffff));
        assert_eq!(h.auth_plugin_name, None);
        assert_eq!(framed(0, |o| h.encode(o)), hex(greeting));

        let response = "540000018da60f0000000001080000000000000000000000000000000000000000000000\
                        70616d0014ab09eef6bcb1323e61143865c0991d957d75d4477465737400\
                        6d7973716c5f6e61746976655f70617373776f726400";
        let r = HandshakeResponse::decode(&packet(response).payload).unwrap();
        assert_eq!(r.capabilities, CapabilityFlags::from_bits(0x000f_a68d));
        assert_eq!((r.max_packet_size, r.charset), (1 << 24, 8));
        assert_eq!(r.username, "pam");
        assert_eq!(r.auth_response, hex("ab09eef6bcb1323e61143865c0991d957d75d447"));
        assert_eq!(r.database.as_deref(), Some("test"));
        assert_eq!(r.auth_plugin_name.as_deref(), Some(NATIVE_PASSWORD_PLUGIN));
        assert!(r.connect_attrs.is_empty());
        let mut out = BytesMut::new();
        PacketEncoder::new(1).try_write_with(&mut out, |o| r.encode(o)).unwrap();
        assert_eq!(out.to_vec(), hex(response));
    }

    #[test]
    fn greeting_refusals() {
        let p = packet(captures::GREETING).payload.to_vec();
        assert_eq!(
            Handshake::decode(&[0xFF, 0x10, 0x04]),
            Err(Error::UnexpectedHeader { what: "handshake", got: 0xFF })
        );
        let mut v9 = p.clone();
        v9[0] = 9;
        assert_eq!(Handshake::decode(&v9), Err(Error::Unsupported { what: "protocol version" }));
        for cut in 0..p.len() - "mysql_native_password".len() - 1 {
            assert!(matches!(Handshake::decode(&p[..cut]), Err(Error::Truncated { .. })), "cut at {cut}");
        }
    }

    #[test]
    fn response_auth_data_forms() {
        let base = HandshakeResponse {
            capabilities: CapabilityFlags::PROTOCOL_41,
            max_packet_size: 1 << 24,
            charset: 45,
            mariadb_capabilities: 0,
            username: "u".into(),
            auth_response: b"pw".to_vec(),
            database: None,
            auth_plugin_name: None,
            connect_attrs: vec![],
        };
        let fixed = 32;
        let enc = |r: &HandshakeResponse| {
            let mut o = BytesMut::new();
            r.encode(&mut o).map(|()| o[fixed..].to_vec())
        };
        assert_eq!(enc(&base), Ok(b"u\0pw\0".to_vec()));
        let secure =
            HandshakeResponse { capabilities: base.capabilities | CapabilityFlags::SECURE_CONNECTION, ..base.clone() };
        assert_eq!(enc(&secure), Ok(b"u\0\x02pw".to_vec()));
        let long = HandshakeResponse { auth_response: vec![1; 256], ..secure.clone() };
        assert_eq!(enc(&long), Err(Error::TooLong { what: "auth response" }));
        let lenenc = HandshakeResponse {
            capabilities: secure.capabilities | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            ..long
        };
        let mut want = b"u\0\xfc\x00\x01".to_vec();
        want.extend_from_slice(&[1; 256]);
        assert_eq!(enc(&lenenc), Ok(want));
        let nul = HandshakeResponse { auth_response: b"a\0b".to_vec(), ..base.clone() };
        assert!(enc(&nul).is_err());
        let old = [0u8; 40];
        assert!(matches!(HandshakeResponse::decode(&old), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn clear_password() {
        let token = b"db.example.rds.amazonaws.com:3306/?Action=connect&DBUser=app&X-Amz-Signature=ab12";
        let mut out = BytesMut::new();
        encode_clear_password(token, &mut out).unwrap();
        assert_eq!(out.last(), Some(&0));
        assert_eq!(decode_clear_password(&out), Ok(&token[..]));
        assert_eq!(decode_clear_password(b"pw"), Ok(&b"pw"[..]));
        assert_eq!(decode_clear_password(b"\0"), Ok(&b""[..]));
        assert!(decode_clear_password(b"pw\0x").is_err());
        assert!(encode_clear_password(b"p\0w", &mut BytesMut::new()).is_err());
    }

    #[test]
    fn auth_switch_and_more_data() {
        let req = AuthSwitchRequest { plugin_name: CLEAR_PASSWORD_PLUGIN.into(), plugin_data: vec![] };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        assert_eq!(&out[..], b"\xfemysql_clear_password\0");
        assert_eq!(AuthSwitchRequest::decode(&out), Ok(req));
        let native = AuthSwitchRequest::decode(b"\xfemysql_native_password\0abcdefghijklmnopqrst\0").unwrap();
        assert_eq!(native.scramble(), b"abcdefghijklmnopqrst");
        assert!(matches!(AuthSwitchRequest::decode(b"\xfe"), Err(Error::Unsupported { .. })));
        assert!(matches!(AuthSwitchRequest::decode(b"\x00x\0"), Err(Error::UnexpectedHeader { got: 0, .. })));
        assert_eq!(AuthMoreData::decode(b"\x01\x03"), Ok(AuthMoreData { data: vec![3] }));
        assert!(AuthMoreData::decode(b"").is_err());
    }

    fn caps_with(required: CapabilityFlags) -> impl Strategy<Value = CapabilityFlags> {
        any::<u32>().prop_map(move |b| CapabilityFlags::from_bits(b) | required)
    }

    prop_compose! {
        fn handshakes()(
            caps in caps_with(CapabilityFlags::PROTOCOL_41),
            server_version in "[^\0]{0,40}",
            connection_id in any::<u32>(),
            charset in any::<u8>(),
            status in any::<u16>(),
            mariadb_capabilities in any::<u32>(),
            name in "[a-z_0-9]{0,30}",
            scramble in proptest::collection::vec(any::<u8>(), 8..=254),
        ) -> Handshake {
            // The scramble's length travels only with CLIENT_PLUGIN_AUTH (else 20 is assumed) and
            // only 8 bytes travel without CLIENT_SECURE_CONNECTION.
            let mut scramble = scramble;
            if !caps.contains(CapabilityFlags::SECURE_CONNECTION) {
                scramble.truncate(8);
            } else if !caps.contains(CapabilityFlags::PLUGIN_AUTH) {
                scramble.resize(20, 7);
            }
            Handshake {
                server_version,
                connection_id,
                auth_plugin_data: scramble,
                capabilities: caps,
                charset,
                status: StatusFlags::from_bits(status),
                mariadb_capabilities,
                auth_plugin_name: caps.contains(CapabilityFlags::PLUGIN_AUTH).then_some(name),
            }
        }
    }

    prop_compose! {
        fn responses()(
            caps in caps_with(CapabilityFlags::PROTOCOL_41),
            max_packet_size in any::<u32>(),
            charset in any::<u8>(),
            mariadb_capabilities in any::<u32>(),
            username in "[^\0]{0,20}",
            auth in proptest::collection::vec(any::<u8>(), 0..300),
            database in "[^\0]{0,20}",
            plugin in "[a-z_]{0,25}",
            attrs in proptest::collection::vec(("[^\0]{0,10}", ".{0,300}"), 0..4),
        ) -> HandshakeResponse {
            let mut auth = auth;
            if !caps.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
                if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
                    auth.truncate(255);
                } else {
                    auth.retain(|&b| b != 0);
                }
            }
            HandshakeResponse {
                capabilities: caps,
                max_packet_size,
                charset,
                mariadb_capabilities,
                username,
                auth_response: auth,
                database: caps.contains(CapabilityFlags::CONNECT_WITH_DB).then_some(database),
                auth_plugin_name: caps.contains(CapabilityFlags::PLUGIN_AUTH).then_some(plugin),
                connect_attrs: if caps.contains(CapabilityFlags::CONNECT_ATTRS) { attrs } else { vec![] },
            }
        }
    }

    proptest! {
        #[test]
        fn handshake_roundtrip(h in handshakes()) {
            let mut out = BytesMut::new();
            h.encode(&mut out);
            prop_assert_eq!(Handshake::decode(&out), Ok(h));
        }

        #[test]
        fn response_roundtrip(r in responses()) {
            let mut out = BytesMut::new();
            r.encode(&mut out).unwrap();
            // A response is never mistaken for an SSLRequest: the username's NUL makes it longer.
            prop_assert_eq!(ClientHello::decode(&out), Ok(ClientHello::Response(r)));
        }

        #[test]
        fn ssl_request_roundtrip(caps in caps_with(CapabilityFlags::PROTOCOL_41), max in any::<u32>(), cs in any::<u8>(), m in any::<u32>()) {
            let s = SslRequest { capabilities: caps | CapabilityFlags::SSL, max_packet_size: max, charset: cs, mariadb_capabilities: m };
            let mut out = BytesMut::new();
            s.encode(&mut out);
            prop_assert_eq!(ClientHello::decode(&out), Ok(ClientHello::SslRequest(s)));
        }

        #[test]
        fn auth_switch_roundtrip(name in "[^\0]{0,30}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let a = AuthSwitchRequest { plugin_name: name, plugin_data: data.clone() };
            let mut out = BytesMut::new();
            a.encode(&mut out);
            prop_assert_eq!(AuthSwitchRequest::decode(&out), Ok(a));
            let m = AuthMoreData { data: data.clone() };
            let mut out = BytesMut::new();
            m.encode(&mut out);
            prop_assert_eq!(AuthMoreData::decode(&out), Ok(m));
            let r = AuthSwitchResponse { data };
            let mut out = BytesMut::new();
            r.encode(&mut out);
            prop_assert_eq!(AuthSwitchResponse::decode(&out), Ok(r));
        }

        #[test]
        fn clear_password_roundtrip(pw in proptest::collection::vec(1u8.., 0..200)) {
            let mut out = BytesMut::new();
            encode_clear_password(&pw, &mut out).unwrap();
            prop_assert_eq!(decode_clear_password(&out), Ok(&pw[..]));
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = Handshake::decode(&b);
            let _ = ClientHello::decode(&b);
            let _ = HandshakeResponse::decode(&b);
            let _ = SslRequest::decode(&b);
            let _ = AuthSwitchRequest::decode(&b);
            let _ = AuthMoreData::decode(&b);
            let _ = decode_clear_password(&b);
        }

        /// Random bytes rarely get past the fixed part; a valid prefix with a random tail does.
        #[test]
        fn decoders_never_panic_on_valid_prefixes(caps in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut b = packet(captures::GREETING).payload[..31].to_vec();
            b.extend_from_slice(&tail);
            let _ = Handshake::decode(&b);
            let mut b = caps.to_le_bytes().to_vec();
            b.resize(32, 0);
            b.extend_from_slice(&tail);
            let _ = HandshakeResponse::decode(&b);
        }
    }
}
