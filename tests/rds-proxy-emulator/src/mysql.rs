//! MySQL mode: one client connection as RDS Proxy for MySQL with IAM authentication and TLS
//! required treats it.
//!
//! The emulator connects to the backend first and greets the client with the backend's version,
//! capabilities and charset but its own connection id and a fresh `mysql_native_password`
//! scramble. After the SSLRequest and TLS it asks for `mysql_clear_password` (the token travels in
//! the clear inside TLS), checks the token with the same SigV4 verifier as the PostgreSQL mode,
//! logs in to the backend with the user's stored secret (`mysql_native_password`), hands the
//! backend's OK to the client renumbered into the client's sequence, and relays bytes.
//!
//! `KILL QUERY <id>` from mysql's Ctrl-C names the id of the emulator's greeting; a connection
//! whose first command is a `KILL` (or COM_PROCESS_KILL) has that id rewritten to the backend's
//! thread id through [`KillMap`]. Reads during the handshake are exact (never past the current
//! packet), so no byte is buffered across the TLS upgrade or into the relay.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use rand::Rng;
use sha1::{Digest, Sha1};
use sluice_mysqlwire::{
    decode_clear_password, parse_kill, AuthReply, AuthSwitchRequest, CapabilityFlags, ClientHello, ErrPacket,
    Handshake, HandshakeResponse, KillKind, Packet, PacketDecoder, PacketEncoder, CLEAR_PASSWORD_PLUGIN,
    COM_PROCESS_KILL, COM_QUERY, HEADER_LEN, NATIVE_PASSWORD_PLUGIN, PRE_AUTH_MAX_PAYLOAD,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::proxy::{check_token, relay, ConnError, ProxyConfig, HANDSHAKE_DEADLINE};

/// ER_NO_SUCH_THREAD: `KILL` of an id that is not a live connection.
const ER_NO_SUCH_THREAD: u16 = 1094;
/// Longest first command inspected for a `KILL`; a longer one is relayed untouched.
const MAX_INSPECTED_COMMAND: usize = 1024;
/// Capabilities never passed to the backend: TLS is the client leg's alone (the backend leg is
/// plain loopback), and compression would start under the emulator's own re-framed OK.
const NOT_FORWARDED: CapabilityFlags = CapabilityFlags::SSL.union(CapabilityFlags::COMPRESS);

#[derive(Debug, Error)]
pub enum MyError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] sluice_mysqlwire::Error),
    #[error("backend: {0}")]
    Backend(&'static str),
    #[error("handshake took longer than {HANDSHAKE_DEADLINE:?}")]
    Timeout,
    #[error(transparent)]
    Relay(#[from] ConnError),
}

/// Emulator connection ids (as greeted) to the backend thread ids behind them.
#[derive(Debug, Default, Clone)]
pub struct KillMap(Arc<Mutex<HashMap<u32, u32>>>);

impl KillMap {
    fn insert(&self, ours: u32, backend: u32) -> KillEntry {
        self.lock().insert(ours, backend);
        KillEntry { map: self.clone(), ours }
    }

    fn backend_id(&self, ours: u64) -> Option<u32> {
        let ours = u32::try_from(ours).ok()?;
        self.lock().get(&ours).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u32>> {
        // A panic while holding the lock leaves a plain map behind, still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a connection from the [`KillMap`] when it ends.
struct KillEntry {
    map: KillMap,
    ours: u32,
}

impl Drop for KillEntry {
    fn drop(&mut self) {
        self.map.lock().remove(&self.ours);
    }
}

/// A logged-in client, its backend connection, and the map entry that lives as long as they do.
struct Session<S> {
    client: S,
    backend: TcpStream,
    _entry: KillEntry,
}

/// Serves one client to completion; errors end only this connection.
pub async fn handle_connection(tcp: TcpStream, cfg: Arc<ProxyConfig>, kills: KillMap, id: u32) {
    let result = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(tcp, &cfg, &kills, id)).await {
        Ok(Ok(Some(LoggedIn::Tls(s)))) => serve(*s, &kills).await,
        Ok(Ok(Some(LoggedIn::Plain(s)))) => serve(s, &kills).await,
        Ok(Ok(None)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(MyError::Timeout),
    };
    if let Err(e) = result {
        warn!(error = %e, "connection failed");
    }
}

/// A session over TLS or, with `--plaintext`, over plain TCP.
enum LoggedIn {
    Tls(Box<Session<tokio_rustls::server::TlsStream<TcpStream>>>),
    Plain(Session<TcpStream>),
}

/// The session after login: the first command checked for a `KILL`, then a plain relay.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: Session<S>, kills: &KillMap) -> Result<(), MyError> {
    let mut header = [0u8; HEADER_LEN];
    match s.client.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len <= MAX_INSPECTED_COMMAND {
        let mut payload = vec![0u8; len];
        s.client.read_exact(&mut payload).await?;
        match rewrite_kill(&payload, kills) {
            KillRewrite::NotKill => {
                s.backend.write_all(&header).await?;
                s.backend.write_all(&payload).await?;
            }
            KillRewrite::Rewritten { payload, ours, backend } => {
                info!(connection = ours, backend_thread = backend, "rewrote a KILL to the backend thread id");
                let mut out = BytesMut::new();
                PacketEncoder::new(header[3]).write(&payload, &mut out);
                s.backend.write_all(&out).await?;
            }
            KillRewrite::Unknown(ours) => {
                warn!(connection = ours, "KILL of an unknown connection id");
                let e = ErrPacket::new(ER_NO_SUCH_THREAD, *b"HY000", format!("Unknown thread id: {ours}"));
                send_err(&mut s.client, header[3].wrapping_add(1), &e).await?;
            }
        }
    } else {
        s.backend.write_all(&header).await?;
    }
    Ok(relay(s.client, s.backend).await?)
}

/// What the first command of a connection becomes.
#[derive(Debug, PartialEq, Eq)]
enum KillRewrite {
    NotKill,
    /// The command with the emulator's id replaced by the backend's.
    Rewritten {
        payload: Vec<u8>,
        ours: u64,
        backend: u32,
    },
    /// A `KILL` naming no live emulator connection.
    Unknown(u64),
}

/// Maps a `KILL [QUERY|CONNECTION] n` query or a COM_PROCESS_KILL to the backend's thread id.
fn rewrite_kill(payload: &[u8], kills: &KillMap) -> KillRewrite {
    match payload.split_first() {
        Some((&COM_QUERY, sql)) => {
            let Ok(kill) = parse_kill(sql) else { return KillRewrite::NotKill };
            let Some(backend) = kills.backend_id(kill.id) else { return KillRewrite::Unknown(kill.id) };
            let sql = match kill.kind {
                KillKind::Query => format!("KILL QUERY {backend}"),
                KillKind::Connection => format!("KILL CONNECTION {backend}"),
            };
            let mut payload = vec![COM_QUERY];
            payload.extend_from_slice(sql.as_bytes());
            KillRewrite::Rewritten { payload, ours: kill.id, backend }
        }
        Some((&COM_PROCESS_KILL, id)) if id.len() == 4 => {
            let ours = u64::from(u32::from_le_bytes([id[0], id[1], id[2], id[3]]));
            let Some(backend) = kills.backend_id(ours) else { return KillRewrite::Unknown(ours) };
            let mut payload = vec![COM_PROCESS_KILL];
            payload.extend_from_slice(&backend.to_le_bytes());
            KillRewrite::Rewritten { payload, ours, backend }
        }
        _ => KillRewrite::NotKill,
    }
}

async fn handshake(
    mut tcp: TcpStream,
    cfg: &ProxyConfig,
    kills: &KillMap,
    id: u32,
) -> Result<Option<LoggedIn>, MyError> {
    let mut backend = match TcpStream::connect(&cfg.backend).await {
        Ok(b) => b,
        Err(err) => {
            warn!(error = %err, "could not connect to the backend");
            let e = ErrPacket::new(2003, *b"HY000", "RDS Proxy could not connect to the database").before_greeting();
            send_err(&mut tcp, 0, &e).await?;
            return Ok(None);
        }
    };
    backend.set_nodelay(true)?;
    let backend_greeting = read_packet(&mut backend).await?;
    let backend_hello = match Handshake::decode(&backend_greeting.payload) {
        Ok(h) => h,
        Err(sluice_mysqlwire::Error::UnexpectedHeader { got: 0xFF, .. }) => {
            // The backend refused at once (too many connections): the client sees why.
            let mut out = BytesMut::new();
            PacketEncoder::new(0).write(&backend_greeting.payload, &mut out);
            tcp.write_all(&out).await?;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let greeting = client_greeting(&backend_hello, id, random_scramble(), !cfg.plaintext);
    let mut out = BytesMut::new();
    PacketEncoder::new(0).write_with(&mut out, |o| greeting.encode(o));
    tcp.write_all(&out).await?;

    let first = read_packet(&mut tcp).await?;
    match ClientHello::decode(&first.payload)? {
        ClientHello::SslRequest(_) => {
            let mut tls = cfg.tls.accept(tcp).await.map_err(MyError::Tls)?;
            let packet = read_packet(&mut tls).await?;
            let response = HandshakeResponse::decode(&packet.payload)?;
            let session = login(tls, packet.reply_seq(), response, backend, &backend_hello, cfg).await?;
            Ok(session.map(|(client, backend, backend_id)| {
                LoggedIn::Tls(Box::new(Session { client, backend, _entry: kills.insert(id, backend_id) }))
            }))
        }
        ClientHello::Response(response) if cfg.plaintext => {
            let session = login(tcp, first.reply_seq(), response, backend, &backend_hello, cfg).await?;
            Ok(session.map(|(client, backend, backend_id)| {
                LoggedIn::Plain(Session { client, backend, _entry: kills.insert(id, backend_id) })
            }))
        }
        ClientHello::Response(response) => {
            warn!(user = %response.username, "rejected connection: client did not request TLS");
            let e = ErrPacket::new(
                sluice_mysqlwire::ER_ACCESS_DENIED_ERROR,
                *b"28000",
                "This RDS Proxy requires TLS connections",
            );
            send_err(&mut tcp, first.reply_seq(), &e).await?;
            Ok(None)
        }
    }
}

/// The greeting the client sees: the backend's server identity and capabilities, with plugin
/// auth and (unless `tls` is false: `--plaintext`) TLS offered, but the emulator's connection id
/// and scramble.
fn client_greeting(backend: &Handshake, id: u32, scramble: Vec<u8>, tls: bool) -> Handshake {
    let mut capabilities = backend.capabilities.difference(CapabilityFlags::COMPRESS)
        | CapabilityFlags::PLUGIN_AUTH
        | CapabilityFlags::SECURE_CONNECTION
        | CapabilityFlags::PROTOCOL_41;
    capabilities.set(CapabilityFlags::SSL, tls);
    Handshake {
        server_version: backend.server_version.clone(),
        connection_id: id,
        auth_plugin_data: scramble,
        capabilities,
        charset: backend.charset,
        status: backend.status,
        mariadb_capabilities: backend.mariadb_capabilities,
        auth_plugin_name: Some(NATIVE_PASSWORD_PLUGIN.to_owned()),
    }
}

/// 20 printable bytes without NUL or `$`, as servers generate them (some clients copy the
/// scramble as a C string).
fn random_scramble() -> Vec<u8> {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#%&()*+,-./:;<=>?@[]^_{|}~";
    let mut rng = rand::thread_rng();
    (0..20).map(|_| CHARS[rng.gen_range(0..CHARS.len())]).collect()
}

/// `mysql_native_password`'s answer: SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))).
/// An empty password answers with nothing, as clients do.
pub fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = Sha1::digest(password);
    let stage2 = Sha1::digest(stage1);
    let mut h = Sha1::new();
    h.update(scramble);
    h.update(stage2);
    let mask = h.finalize();
    stage1.iter().zip(mask.iter()).map(|(a, b)| a ^ b).collect()
}

/// Checks the client's token and logs in to the backend; `seq` is the sequence id of the next
/// packet to the client. Returns the client, backend and the backend's thread id, or `None`
/// after telling the client why not.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    mut seq: u8,
    response: HandshakeResponse,
    mut backend: TcpStream,
    backend_hello: &Handshake,
    cfg: &ProxyConfig,
) -> Result<Option<(S, TcpStream, u32)>, MyError> {
    let user = response.username.clone();
    tracing::Span::current().record("user", user.as_str());
    let token = if response.auth_plugin_name.as_deref() == Some(CLEAR_PASSWORD_PLUGIN) {
        decode_clear_password(&response.auth_response)?.to_vec()
    } else {
        let switch = AuthSwitchRequest { plugin_name: CLEAR_PASSWORD_PLUGIN.to_owned(), plugin_data: Vec::new() };
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write_with(&mut out, |o| switch.encode(o));
        client.write_all(&out).await?;
        client.flush().await?;
        let answer = read_packet(&mut client).await?;
        seq = answer.reply_seq();
        decode_clear_password(&answer.payload)?.to_vec()
    };
    let denied = || ErrPacket::access_denied(&user, "127.0.0.1", true);
    let Ok(token) = std::str::from_utf8(&token) else {
        warn!("rejected connection: the token is not UTF-8");
        send_err(&mut client, seq, &denied()).await?;
        return Ok(None);
    };
    if let Err(reason) = check_token(cfg, token, &user).await {
        warn!(%reason, "rejected connection: IAM authentication failed");
        send_err(&mut client, seq, &denied()).await?;
        return Ok(None);
    }
    let Some(secret) = cfg.secrets.get(&user) else {
        warn!("rejected connection: no stored secret for this user");
        let e = ErrPacket::new(
            sluice_mysqlwire::ER_ACCESS_DENIED_ERROR,
            *b"28000",
            format!("This RDS Proxy has no credentials for the user {user}. Check the credentials for this user and try again."),
        );
        send_err(&mut client, seq, &e).await?;
        return Ok(None);
    };

    let offered = backend_hello.capabilities;
    let mut caps = (response.capabilities & offered).difference(NOT_FORWARDED);
    // The scramble answer is 20 binary bytes: it needs a length prefix and a plugin name.
    caps.insert((CapabilityFlags::PLUGIN_AUTH | CapabilityFlags::SECURE_CONNECTION) & offered);
    let to_backend = HandshakeResponse {
        capabilities: caps,
        max_packet_size: response.max_packet_size,
        charset: response.charset,
        mariadb_capabilities: response.mariadb_capabilities & backend_hello.mariadb_capabilities,
        username: user.clone(),
        auth_response: native_password(secret.as_bytes(), &backend_hello.auth_plugin_data),
        database: response.database.clone().filter(|_| caps.contains(CapabilityFlags::CONNECT_WITH_DB)),
        auth_plugin_name: caps.contains(CapabilityFlags::PLUGIN_AUTH).then(|| NATIVE_PASSWORD_PLUGIN.to_owned()),
        connect_attrs: response.connect_attrs.clone(),
    };
    let mut out = BytesMut::new();
    PacketEncoder::new(1).try_write_with(&mut out, |o| to_backend.encode(o))?;
    backend.write_all(&out).await?;

    loop {
        let packet = read_packet(&mut backend).await?;
        match AuthReply::decode(&packet.payload, caps)? {
            AuthReply::Ok(_) => {
                info!(backend = %cfg.backend, backend_thread = backend_hello.connection_id, "logged in to the backend");
                let mut out = BytesMut::new();
                PacketEncoder::new(seq).write(&packet.payload, &mut out);
                client.write_all(&out).await?;
                client.flush().await?;
                return Ok(Some((client, backend, backend_hello.connection_id)));
            }
            AuthReply::Err(e) => {
                warn!(code = e.code, message = %e.message, "backend refused the login");
                send_err(&mut client, seq, &e).await?;
                return Ok(None);
            }
            AuthReply::Switch(switch) => {
                let data = match switch.plugin_name.as_str() {
                    NATIVE_PASSWORD_PLUGIN => native_password(secret.as_bytes(), switch.scramble()),
                    CLEAR_PASSWORD_PLUGIN => {
                        let mut d = secret.as_bytes().to_vec();
                        d.push(0);
                        d
                    }
                    other => {
                        warn!(plugin = other, "backend asked for an unsupported authentication plugin");
                        let e = ErrPacket::new(
                            sluice_mysqlwire::ER_ACCESS_DENIED_ERROR,
                            *b"28000",
                            "The database asked for an authentication method this proxy does not support",
                        );
                        send_err(&mut client, seq, &e).await?;
                        return Ok(None);
                    }
                };
                let mut out = BytesMut::new();
                PacketEncoder::new(packet.reply_seq()).write(&data, &mut out);
                backend.write_all(&out).await?;
            }
            AuthReply::MoreData(_) => {
                return Err(MyError::Backend("unexpected AuthMoreData (only mysql_native_password is supported)"))
            }
        }
    }
}

/// Sends an ERR packet with sequence id `seq`; the caller then drops the connection.
async fn send_err<S: AsyncWrite + Unpin>(stream: &mut S, seq: u8, e: &ErrPacket) -> Result<(), MyError> {
    let mut out = BytesMut::new();
    PacketEncoder::new(seq).write_with(&mut out, |o| e.encode(o));
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads exactly one connection-phase packet: no byte past it is taken off the stream.
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Packet, MyError> {
    let mut decoder = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD);
    let mut buf = BytesMut::new();
    loop {
        let needed = decoder.needed(&buf)?;
        if needed == 0 {
            return decoder.next_packet(&mut buf)?.ok_or(MyError::Backend("packet decoder lost a packet"));
        }
        let start = buf.len();
        buf.put_bytes(0, needed);
        stream.read_exact(&mut buf[start..]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn native_password_matches_a_captured_login() {
        // From sluice-mysqlwire's captures: MariaDB 10.11's greeting scramble and the `mariadb`
        // client's answer for password "secret".
        let scramble = b"Bq4La#+K" as &[u8];
        let part2 = b"y?n.7j1T2=yk";
        let scramble = [scramble, part2].concat();
        let answer = native_password(b"secret", &scramble);
        assert_eq!(answer.len(), 20);
        assert_eq!(answer, hex("64318cb2609ab5872ac3eb1cd89c4532ee537f8e"));
        assert!(native_password(b"", &scramble).is_empty());
        assert_ne!(native_password(b"secreT", &scramble), answer);
    }

    #[test]
    fn kill_ids_are_rewritten_to_the_backend_thread() {
        let kills = KillMap::default();
        let entry = kills.insert(7, 4242);
        let query = |sql: &str| [&[COM_QUERY][..], sql.as_bytes()].concat();
        assert_eq!(
            rewrite_kill(&query("kill query 7;"), &kills),
            KillRewrite::Rewritten { payload: query("KILL QUERY 4242"), ours: 7, backend: 4242 }
        );
        assert_eq!(
            rewrite_kill(&query("KILL 7"), &kills),
            KillRewrite::Rewritten { payload: query("KILL CONNECTION 4242"), ours: 7, backend: 4242 }
        );
        assert_eq!(
            rewrite_kill(&[COM_PROCESS_KILL, 7, 0, 0, 0], &kills),
            KillRewrite::Rewritten { payload: vec![COM_PROCESS_KILL, 0x92, 0x10, 0, 0], ours: 7, backend: 4242 }
        );
        assert_eq!(rewrite_kill(&query("KILL QUERY 8"), &kills), KillRewrite::Unknown(8));
        assert_eq!(rewrite_kill(&query("KILL QUERY 99999999999"), &kills), KillRewrite::Unknown(99999999999));
        assert_eq!(rewrite_kill(&query("SELECT 1"), &kills), KillRewrite::NotKill);
        assert_eq!(rewrite_kill(&query("KILL QUERY 7 /* x */"), &kills), KillRewrite::NotKill);
        assert_eq!(rewrite_kill(&[0x0e], &kills), KillRewrite::NotKill);
        drop(entry);
        assert_eq!(rewrite_kill(&query("KILL QUERY 7"), &kills), KillRewrite::Unknown(7));
    }

    #[test]
    fn greeting_keeps_the_backend_identity_but_not_its_id_or_scramble() {
        let backend = Handshake {
            server_version: "5.5.5-10.11.19-MariaDB".into(),
            connection_id: 31,
            auth_plugin_data: b"abcdefghijklmnopqrst".to_vec(),
            capabilities: CapabilityFlags::PROTOCOL_41
                | CapabilityFlags::SECURE_CONNECTION
                | CapabilityFlags::COMPRESS
                | CapabilityFlags::CONNECT_ATTRS,
            charset: 45,
            status: sluice_mysqlwire::StatusFlags::AUTOCOMMIT,
            mariadb_capabilities: 0x1d,
            auth_plugin_name: Some(NATIVE_PASSWORD_PLUGIN.into()),
        };
        let scramble = random_scramble();
        assert_eq!(scramble.len(), 20);
        assert!(!scramble.contains(&0));
        let g = client_greeting(&backend, 9, scramble.clone(), true);
        assert_eq!((g.connection_id, g.charset, g.mariadb_capabilities), (9, 45, 0x1d));
        assert_eq!(g.server_version, backend.server_version);
        assert_eq!(g.auth_plugin_data, scramble);
        assert!(g.capabilities.contains(CapabilityFlags::SSL | CapabilityFlags::PLUGIN_AUTH));
        assert!(g.capabilities.contains(CapabilityFlags::CONNECT_ATTRS));
        assert!(!g.capabilities.contains(CapabilityFlags::COMPRESS));
        // It survives the codec, as a client reads it.
        let mut out = BytesMut::new();
        g.encode(&mut out);
        assert_eq!(Handshake::decode(&out).unwrap(), g);
        // A --plaintext emulator does not offer TLS, even when the backend does.
        let backend = Handshake { capabilities: backend.capabilities | CapabilityFlags::SSL, ..backend };
        assert!(!client_greeting(&backend, 9, scramble, false).capabilities.contains(CapabilityFlags::SSL));
    }
}
