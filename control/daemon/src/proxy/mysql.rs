//! MySQL and MariaDB clients: the connection phase (driving `sluice_mysqlwire::ServerHandshake`
//! over the socket), TLS with a required client certificate (the identity, as for PostgreSQL),
//! the policy decision, the upstream session (`upstream::connect_mysql`), and `KILL QUERY` from a
//! second connection. After the OK the session goes the way PostgreSQL sessions go
//! (`run_session`: the data plane or control's relay), which is protocol-agnostic.
//!
//! `mysql`'s Ctrl-C opens a second connection and sends `KILL QUERY <id>` as its first command,
//! with the connection id of our greeting. Those ids are ours (bit 31 set, so a KILL that slipped
//! through to an upstream names no real thread, with the node index below as for cancel keys);
//! each maps to the upstream's thread id and the Sluice user who owns the session. The first
//! command of every session is therefore awaited briefly: a KILL is answered here, anything
//! else is passed on and the session handed over.

use std::net::IpAddr;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use sluice_mysqlwire::{
    self as my, parse_kill, CapabilityFlags, Command, ErrPacket, Kill, KillKind, OkPacket, PacketDecoder,
    PacketEncoder, ServerEvent, ServerHandshake, ServerHandshakeError,
};
use sluice_pgwire::StartupMessage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::cancel::CancelRouteError;
use super::handoff::LiveRecord;
use super::startup::{authorize, client_identity, Refusal};
use super::{HandshakeFailure, ProxyContext, Ready};
use crate::audit::{SessionFields, SESSION_END, SESSION_START};
use crate::ca::Identity;
use crate::catalog::Database;
use crate::config::PROTOCOL_MYSQL;
use crate::leg::Leg;
use crate::limits::ConnPermit;
use crate::metrics::METRICS;
use crate::policy::{self, Denial};
use crate::upstream::{self, MysqlClient, UpstreamError};

/// The greeting's server version until an upstream's is known.
const DEFAULT_SERVER_VERSION: &str = "8.0.36-Sluice";
/// How long a new session waits for the client's first command (a KILL is answered in control).
const FIRST_COMMAND_WAIT: Duration = Duration::from_secs(1);
/// A first command longer than this is no KILL statement: it is passed on unread.
const KILL_MAX_PAYLOAD: usize = 128;
/// How long answering a KILL may take (a fresh upstream login and the statement).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bits of a connection id under the node index (as cancel keys: 2M ids per process).
const NODE_SHIFT: u32 = 21;
const NODE_MASK: u32 = 0x3ff;
/// Set in every connection id of ours, so none is a real upstream thread id.
const OUR_ID_BIT: u32 = 1 << 31;

// MySQL error codes Sluice sends besides those `sluice_mysqlwire` names.
const ER_BAD_DB_ERROR: u16 = 1049;
const ER_NO_SUCH_THREAD: u16 = 1094;
const ER_KILL_DENIED_ERROR: u16 = 1095;
const ER_UNKNOWN_ERROR: u16 = 1105;
/// The client library's "can't connect" code: what a client shows for an unreachable server.
const CR_CONN_HOST_ERROR: u16 = 2003;

/// Where a `KILL` for one of our connection ids goes.
#[derive(Clone)]
pub(super) struct KillTarget {
    /// The Sluice user who owns the session: only they may kill it.
    owner: String,
    database: Database,
    db_user: String,
    db_name: Option<String>,
    /// The upstream's connection id (from its greeting).
    upstream_id: u32,
}

/// What a restarted control needs to route a handed-off session's KILL (the rest is in its
/// live record: the owner, database and database user).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct KillRecord {
    upstream_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    db_name: Option<String>,
}

impl ProxyContext {
    pub(super) fn mysql_kill_record(&self, our_id: u32) -> Option<KillRecord> {
        let t = self.mysql_kills().get(&our_id).cloned().flatten()?;
        Some(KillRecord { upstream_id: t.upstream_id, db_name: t.db_name })
    }

    /// Routes KILLs for a session handed off by an earlier control process again.
    pub(super) fn restore_mysql_kill(&self, record: &LiveRecord) -> Result<(), CancelRouteError> {
        let Some(k) = &record.mysql_kill else { return Ok(()) };
        let service = &record.fields.db_service;
        let (view, _) = self.policy.current().unwrap_or_else(|_| self.policy.last());
        let database =
            view.databases.get(service).cloned().ok_or_else(|| CancelRouteError::Unregistered(service.clone()))?;
        let target = KillTarget {
            owner: record.fields.user.clone(),
            database,
            db_user: record.fields.db_user.clone(),
            db_name: k.db_name.clone(),
            upstream_id: k.upstream_id,
        };
        self.mysql_kills().insert(record.our_pid, Some(target));
        Ok(())
    }
}

/// A connection id of node `node_index`: bit 31 set, the index in bits 21-30, `random` below.
fn connection_id(node_index: u16, random: u32) -> u32 {
    OUR_ID_BIT | ((u32::from(node_index) & NODE_MASK) << NODE_SHIFT) | (random & ((1 << NODE_SHIFT) - 1))
}

impl ProxyContext {
    /// Reserves a fresh connection id for a client's greeting.
    fn reserve_mysql_id(&self) -> u32 {
        let mut ids = self.mysql_kills();
        loop {
            let id = connection_id(self.node_index, rand::random::<u32>());
            if let std::collections::hash_map::Entry::Vacant(e) = ids.entry(id) {
                e.insert(None);
                return id;
            }
        }
    }

    fn server_version(&self) -> String {
        let v = self.mysql_version.lock().unwrap_or_else(|p| p.into_inner());
        v.clone().unwrap_or_else(|| DEFAULT_SERVER_VERSION.to_owned())
    }
}

/// An ERR packet for a refusal of the shared setup (policy, upstream), by what refused it.
fn err_for(refusal: &Refusal) -> ErrPacket {
    let msg = refusal.fields.message().unwrap_or(&refusal.reason).to_owned();
    let msg = match refusal.fields.get(b'H') {
        Some(hint) => format!("{msg} ({hint})"),
        None => msg,
    };
    match refusal.kind {
        HandshakeFailure::UnknownDatabase => ErrPacket::new(ER_BAD_DB_ERROR, *b"42000", msg),
        HandshakeFailure::PolicyUnavailable | HandshakeFailure::Internal => {
            ErrPacket::new(ER_UNKNOWN_ERROR, *b"HY000", msg)
        }
        // Roles name the dimension they refused in the text (`rbac::check_access`).
        HandshakeFailure::Denied if refusal.reason.contains("database name") => {
            ErrPacket::new(my::ER_DBACCESS_DENIED_ERROR, *b"42000", msg)
        }
        _ => ErrPacket::new(my::ER_ACCESS_DENIED_ERROR, *b"28000", msg),
    }
}

/// An upstream failure, told as MySQL clients expect.
fn err_for_upstream(e: UpstreamError) -> (ErrPacket, HandshakeFailure, String) {
    let reason = e.to_string();
    match e {
        UpstreamError::MysqlRejected(err) => {
            let packet = if err.code == my::ER_ACCESS_DENIED_ERROR {
                ErrPacket::new(
                    my::ER_ACCESS_DENIED_ERROR,
                    *b"28000",
                    format!(
                        "RDS Proxy refused Sluice's IAM auth token: check the AWS credentials and IAM policy \
                         (rds-db:connect) of the Sluice control service (the database said: {})",
                        err.message
                    ),
                )
            } else {
                ErrPacket { message: format!("the database refused the session: {}", err.message), ..err }
            };
            (packet, HandshakeFailure::UpstreamRejected, reason)
        }
        UpstreamError::Iam(ref iam) => {
            if !matches!(iam, crate::iam::IamError::NoRegion) {
                METRICS.token_error();
            }
            let mut msg = format!("Sluice could not create an IAM auth token: {iam}");
            if matches!(iam, crate::iam::IamError::NoCredentials(_) | crate::iam::IamError::AssumeRole { .. }) {
                msg = format!("{msg} ({})", crate::troubleshoot::explain_iam(iam, None));
            }
            (ErrPacket::new(my::ER_ACCESS_DENIED_ERROR, *b"28000", msg), HandshakeFailure::Token, reason)
        }
        UpstreamError::UnsupportedAuth(_) => (
            ErrPacket::new(my::ER_ACCESS_DENIED_ERROR, *b"28000", reason.clone()),
            HandshakeFailure::UpstreamAuth,
            reason,
        ),
        other => (
            ErrPacket::new(CR_CONN_HOST_ERROR, *b"HY000", format!("Sluice could not reach the database: {other}")),
            HandshakeFailure::UpstreamUnreachable,
            reason,
        ),
    }
}

/// Sends a framed ERR and closes the connection.
async fn send_err<S: AsyncWrite + Unpin>(s: &mut S, hs: &mut ServerHandshake, err: &ErrPacket) {
    let _ = s.write_all(&hs.frame_err(err)).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// Runs the handshake on `s` until it needs TLS or is done; a refusal is sent before returning.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    hs: &mut ServerHandshake,
) -> Result<Option<my::ClientLogin>, HandshakeFailure> {
    let mut chunk = Vec::new();
    loop {
        match hs.next_event() {
            Ok(ServerEvent::Send(bytes)) => {
                if upstream::write_all_flush(s, &bytes).await.is_err() {
                    return Err(HandshakeFailure::ClientGone);
                }
            }
            Ok(ServerEvent::NeedMore(n)) => {
                chunk.resize(n, 0);
                if let Err(e) = s.read_exact(&mut chunk).await {
                    info!(error = %e, "client went away during the handshake");
                    return Err(HandshakeFailure::ClientGone);
                }
                hs.feed(&chunk);
            }
            Ok(ServerEvent::StartTls) => return Ok(None),
            Ok(ServerEvent::Done(login)) => return Ok(Some(login)),
            Err(e) => {
                info!(error = %e, "MySQL handshake refused");
                send_err(s, hs, &e.err_packet()).await;
                return Err(match e {
                    ServerHandshakeError::TlsRequired => HandshakeFailure::Plaintext,
                    _ => HandshakeFailure::Protocol,
                });
            }
        }
    }
}

/// Runs a MySQL client's whole setup, like `startup::handshake` for PostgreSQL. `Ok(None)` is a
/// finished short exchange (a KILL answered here).
pub(super) async fn handshake(
    ctx: &ProxyContext,
    tcp: TcpStream,
    fields: &mut SessionFields,
    permit: &mut ConnPermit<IpAddr>,
) -> Result<Option<Ready>, HandshakeFailure> {
    fields.db_protocol = PROTOCOL_MYSQL.to_owned();
    let mut reserved = Reserved { ctx, id: ctx.reserve_mysql_id(), keep: false };
    let r = setup(ctx, tcp, reserved.id, fields, permit).await;
    // A session keeps its id until it ends (`ProxyContext::forget_key`).
    reserved.keep = matches!(r, Ok(Some(_)));
    r
}

/// A connection id being set up: released unless the session starts, also when the handshake
/// deadline drops the setup midway.
struct Reserved<'a> {
    ctx: &'a ProxyContext,
    id: u32,
    keep: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.ctx.mysql_kills().remove(&self.id);
        }
    }
}

async fn setup(
    ctx: &ProxyContext,
    mut tcp: TcpStream,
    our_id: u32,
    fields: &mut SessionFields,
    permit: &mut ConnPermit<IpAddr>,
) -> Result<Option<Ready>, HandshakeFailure> {
    let mut scramble = [0u8; 20];
    {
        // Printable and NUL-free: clients copy it as a C string. Nothing checks what they derive.
        let mut rng = rand::thread_rng();
        scramble.iter_mut().for_each(|b| *b = rng.gen_range(0x21..0x7f));
    }
    let mut hs = ServerHandshake::new(&ctx.server_version(), our_id, scramble, my::DEFAULT_CHARSET);
    if drive(&mut tcp, &mut hs).await?.is_some() {
        // The machine refuses a plaintext response before it gets here.
        return Err(HandshakeFailure::Plaintext);
    }
    let mut client = match TlsAcceptor::from(ctx.server_tls.clone()).accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "client TLS handshake failed");
            return Err(HandshakeFailure::Tls);
        }
    };
    hs.tls_established();
    // The response comes first: a refusal is the answer to it, so the client shows it.
    let Some(login) = drive(&mut client, &mut hs).await? else {
        return Err(HandshakeFailure::Protocol);
    };
    let (identity, not_after) = match client_identity(&client, fields) {
        Ok(x) => x,
        Err(problem) => {
            let msg = match problem.hint {
                Some(h) => format!("{} ({h})", problem.message),
                None => problem.message,
            };
            send_err(&mut client, &mut hs, &ErrPacket::new(my::ER_ACCESS_DENIED_ERROR, *b"28000", msg)).await;
            return Err(problem.kind);
        }
    };
    permit.authenticated();
    let (upstream, kill_target) = match connect(ctx, &identity, &login, fields).await {
        Ok(x) => x,
        Err((err, kind, reason)) => {
            info!(user = %fields.user, db = %fields.db_service, reason = %reason, "session refused");
            ctx.audit.emit(SESSION_START, fields, false, json!({ "error": reason }));
            send_err(&mut client, &mut hs, &err).await;
            return Err(kind);
        }
    };
    let upstream::MysqlUpstream { stream: mut upstream, session } = upstream;
    *ctx.mysql_version.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.greeting.server_version.clone());
    let upstream_id = session.greeting.connection_id;
    ctx.mysql_kills().insert(our_id, Some(kill_target));
    // The upstream's OK, under the client's sequence ids (3 after the TLS switch).
    if let Err(e) = upstream::write_all_flush(&mut client, &hs.frame_reply(&session.ok_payload)).await {
        info!(error = %e, "client went away before its OK");
        return Err(HandshakeFailure::ClientGone);
    }
    ctx.audit.emit(
        SESSION_START,
        fields,
        true,
        json!({ "mysql_connection_id": our_id, "upstream_connection_id": upstream_id }),
    );
    match first_command(&mut client, login.capabilities).await {
        First::Kill(kill) => {
            let outcome = answer_kill(ctx, &identity.user, kill, &mut client, login.capabilities).await;
            let _ = client.shutdown().await;
            ctx.audit.emit(SESSION_END, fields, true, json!({ "mysql_kill": kill.id, "kill_result": outcome }));
            Ok(None)
        }
        First::Forward(bytes) => {
            if let Err(e) = upstream::write_all_flush(&mut upstream, &bytes).await {
                warn!(error = %e, "passing the first command on failed");
                ctx.audit.emit(SESSION_END, fields, false, json!({ "error": format!("upstream: {e}") }));
                return Ok(None);
            }
            Ok(Some(Ready { client: Leg::Tls(client), upstream, our_pid: our_id, not_after }))
        }
        First::Gone => {
            ctx.audit.emit(SESSION_END, fields, true, json!({ "bytes_from_client": 0, "bytes_to_client": 0 }));
            Ok(None)
        }
    }
}

type SetupError = (ErrPacket, HandshakeFailure, String);

/// The route the client asks for, the policy decision and the upstream login.
async fn connect(
    ctx: &ProxyContext,
    identity: &Identity,
    login: &my::ClientLogin,
    fields: &mut SessionFields,
) -> Result<(upstream::MysqlUpstream, KillTarget), SetupError> {
    let r = &login.response;
    let route = identity.route.as_ref();
    if let Some(route) = route {
        fields.db_service = route.service.clone();
    }
    // Without a database from the client, the certificate's (if any) is the default database.
    let asked_db = r
        .database
        .clone()
        .filter(|d| !d.is_empty())
        .or_else(|| route.map(|r| r.db_name.clone()).filter(|d| !d.is_empty()));
    let mut params = vec![("user".to_owned(), r.username.clone())];
    if let Some(db) = &asked_db {
        params.push(("database".to_owned(), db.clone()));
    }
    let startup = StartupMessage { version: sluice_pgwire::ProtocolVersion::V3_0, params };
    let host = "sluice";
    match policy::resolve_route(identity, &startup) {
        Ok(asked) => {
            fields.db_user = asked.db_user;
            fields.db_name = asked_db.clone().unwrap_or_default();
        }
        Err(d @ Denial::DbNameMismatch { .. }) => {
            let db = asked_db.clone().unwrap_or_default();
            let mut e = ErrPacket::database_access_denied(&r.username, host, &db);
            e.message = format!("{} ({d})", e.message);
            return Err((e, HandshakeFailure::Denied, d.to_string()));
        }
        Err(d) => {
            let mut e = ErrPacket::access_denied(&r.username, host, !r.auth_response.is_empty());
            e.message = format!("{} ({d})", e.message);
            return Err((e, HandshakeFailure::Denied, d.to_string()));
        }
    }
    let authorized = authorize(ctx, identity, &startup, PROTOCOL_MYSQL).await.map_err(|refusal| {
        let reason = refusal.reason.clone();
        (err_for(&refusal), refusal.kind, reason)
    })?;
    let d = authorized.decision;
    let client = MysqlClient {
        capabilities: login.capabilities,
        charset: r.charset,
        max_packet_size: r.max_packet_size,
        connect_attrs: r.connect_attrs.clone(),
    };
    let up =
        upstream::connect_mysql(&d.database, &d.db_user, asked_db.as_deref(), client, &ctx.minter, &ctx.upstream_tls)
            .await
            .map_err(err_for_upstream)?;
    let target = KillTarget {
        owner: identity.user.clone(),
        database: d.database,
        db_user: d.db_user,
        db_name: asked_db,
        upstream_id: up.session.greeting.connection_id,
    };
    Ok((up, target))
}

/// What the client sent first, if anything within [`FIRST_COMMAND_WAIT`].
enum First {
    Kill(Kill),
    /// Bytes to pass on (none when the client said nothing yet).
    Forward(Vec<u8>),
    Gone,
}

/// Waits briefly for the client's first command and tells whether it is a KILL statement (or
/// the old COM_PROCESS_KILL) that control answers. Reads only until that is decided; whatever
/// was read is passed on otherwise.
async fn first_command<S: AsyncRead + Unpin>(s: &mut S, caps: CapabilityFlags) -> First {
    let deadline = tokio::time::Instant::now() + FIRST_COMMAND_WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Some(decided) = decide_first(&buf, caps) {
            return decided;
        }
        // Reading a TLS stream is cancel-safe: what was not returned stays in rustls' buffers.
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return First::Forward(buf),
            Ok(Ok(0)) | Ok(Err(_)) => return First::Gone,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `None` while the bytes so far may still be a KILL.
fn decide_first(buf: &[u8], caps: CapabilityFlags) -> Option<First> {
    let header = buf.get(..my::HEADER_LEN)?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    let is_command = |c: u8| c == my::COM_QUERY || c == my::COM_PROCESS_KILL;
    if header[3] != 0 || len > KILL_MAX_PAYLOAD || buf.get(my::HEADER_LEN).is_some_and(|&c| !is_command(c)) {
        return Some(First::Forward(buf.to_vec()));
    }
    let payload = buf.get(my::HEADER_LEN..my::HEADER_LEN + len)?;
    // A KILL with more behind it is not answered here: the rest would be lost.
    if buf.len() == my::HEADER_LEN + len {
        let kill = match Command::parse(payload, caps) {
            Ok(Command::Query(sql)) => parse_kill(sql).ok(),
            Ok(Command::ProcessKill(id)) => Some(Kill { kind: KillKind::Connection, id: u64::from(id) }),
            _ => None,
        };
        if let Some(k) = kill {
            return Some(First::Kill(k));
        }
    }
    Some(First::Forward(buf.to_vec()))
}

/// Answers a KILL for one of our connection ids: only the session's owner may, through a fresh
/// upstream login as the session's database user. Returns what happened, for the audit.
async fn answer_kill<S: AsyncWrite + Unpin>(
    ctx: &ProxyContext,
    user: &str,
    kill: Kill,
    client: &mut S,
    caps: CapabilityFlags,
) -> String {
    let target = u32::try_from(kill.id).ok().and_then(|id| ctx.mysql_kills().get(&id).cloned().flatten());
    let reply = match target {
        None => Err(ErrPacket::new(ER_NO_SUCH_THREAD, *b"HY000", format!("Unknown thread id: {}", kill.id))),
        Some(t) if t.owner != user => {
            Err(ErrPacket::new(ER_KILL_DENIED_ERROR, *b"HY000", format!("You are not owner of thread {}", kill.id)))
        }
        Some(t) => match tokio::time::timeout(KILL_TIMEOUT, kill_upstream(ctx, &t, kill.kind)).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(err))) => Err(err),
            Ok(Err(e)) => {
                Err(ErrPacket::new(ER_UNKNOWN_ERROR, *b"HY000", format!("Sluice could not send the KILL: {e}")))
            }
            Err(_) => Err(ErrPacket::new(ER_UNKNOWN_ERROR, *b"HY000", "Sluice timed out sending the KILL")),
        },
    };
    let mut payload = bytes::BytesMut::new();
    let outcome = match &reply {
        Ok(()) => {
            OkPacket { status: my::StatusFlags::AUTOCOMMIT, ..Default::default() }.encode(caps, &mut payload);
            "ok".to_owned()
        }
        Err(e) => {
            e.encode(&mut payload);
            format!("error {}: {}", e.code, e.message)
        }
    };
    info!(id = kill.id, kind = ?kill.kind, outcome = %outcome, "KILL answered");
    let mut out = bytes::BytesMut::new();
    // The answer to the command (sequence id 0).
    PacketEncoder::new(1).write(&payload, &mut out);
    let _ = upstream::write_all_flush(client, &out).await;
    outcome
}

/// Logs in to the session's upstream as its database user and sends the KILL for its thread.
/// `Ok(Some(err))` is the upstream's refusal.
async fn kill_upstream(ctx: &ProxyContext, t: &KillTarget, kind: KillKind) -> Result<Option<ErrPacket>, UpstreamError> {
    // Only what every server has: nothing of this session is relayed.
    let capabilities = CapabilityFlags::PROTOCOL_41
        | CapabilityFlags::SECURE_CONNECTION
        | CapabilityFlags::PLUGIN_AUTH
        | CapabilityFlags::LONG_PASSWORD
        | CapabilityFlags::TRANSACTIONS;
    let client =
        MysqlClient { capabilities, charset: my::DEFAULT_CHARSET, max_packet_size: 1 << 24, connect_attrs: Vec::new() };
    let mut up =
        upstream::connect_mysql(&t.database, &t.db_user, t.db_name.as_deref(), client, &ctx.minter, &ctx.upstream_tls)
            .await?;
    let word = match kind {
        KillKind::Query => "QUERY",
        KillKind::Connection => "CONNECTION",
    };
    let mut sql = vec![my::COM_QUERY];
    sql.extend_from_slice(format!("KILL {word} {}", t.upstream_id).as_bytes());
    let mut out = bytes::BytesMut::new();
    PacketEncoder::new(0).write(&sql, &mut out);
    upstream::write_all_flush(&mut up.stream, &out).await?;
    let mut buf = bytes::BytesMut::new();
    let mut decoder = PacketDecoder::new(my::PRE_AUTH_MAX_PAYLOAD);
    let packet = loop {
        match decoder.next_packet(&mut buf) {
            Ok(Some(p)) => break p,
            Ok(None) => {
                let mut chunk = vec![0u8; decoder.needed(&buf).unwrap_or(1).max(1)];
                up.stream.read_exact(&mut chunk).await?;
                buf.extend_from_slice(&chunk);
            }
            Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
        }
    };
    let _ = up.stream.shutdown().await;
    match packet.payload.first() {
        Some(0x00) => Ok(None),
        Some(0xFF) => ErrPacket::decode(&packet.payload).map(Some).map_err(|e| UpstreamError::Protocol(e.to_string())),
        _ => Err(UpstreamError::Protocol("unexpected answer to KILL".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_are_never_thread_ids_and_name_their_node() {
        for (node, random) in [(0u16, 0u32), (1, u32::MAX), (1023, 0x1234_5678)] {
            let id = connection_id(node, random);
            assert!(id >= 1 << 31, "{id:#x}");
            assert_eq!((id >> NODE_SHIFT) & NODE_MASK, u32::from(node));
        }
    }

    fn framed(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        PacketEncoder::new(seq).write(payload, &mut out);
        out.to_vec()
    }

    #[test]
    fn refusals_map_to_mysql_errors() {
        let r = Refusal::new("3D000", "database \"x\" is not registered").kind(HandshakeFailure::UnknownDatabase);
        assert_eq!(err_for(&r).code, ER_BAD_DB_ERROR);
        let r = Refusal::new("28000", "role \"dev\" does not allow database name \"x\"");
        assert_eq!((err_for(&r).code, err_for(&r).sql_state), (my::ER_DBACCESS_DENIED_ERROR, Some(*b"42000")));
        let r = Refusal::new("28000", "user \"eve\" does not exist");
        assert_eq!(err_for(&r).code, my::ER_ACCESS_DENIED_ERROR);

        let bad_token = ErrPacket::access_denied("alice", "10.0.0.1", true);
        let (e, kind, _) = err_for_upstream(UpstreamError::MysqlRejected(bad_token));
        assert_eq!((e.code, kind.label()), (my::ER_ACCESS_DENIED_ERROR, "upstream_rejected"));
        assert!(e.message.contains("IAM auth token") && e.message.contains("rds-db:connect"), "{}", e.message);
        let other = ErrPacket::new(1049, *b"42000", "Unknown database 'x'");
        let (e, _, _) = err_for_upstream(UpstreamError::MysqlRejected(other));
        assert_eq!((e.code, e.sql_state), (1049, Some(*b"42000")));
        let (e, kind, _) = err_for_upstream(UpstreamError::UnsupportedAuth("caching_sha2_password".into()));
        assert_eq!(kind.label(), "upstream_auth");
        assert!(e.message.contains("IAM authentication must be REQUIRED"), "{}", e.message);
        let (e, kind, _) = err_for_upstream(UpstreamError::ConnectTimeout { addr: "x:3306".into() });
        assert_eq!((e.code, kind.label()), (CR_CONN_HOST_ERROR, "upstream_unreachable"));
    }

    #[test]
    fn first_commands() {
        let caps = CapabilityFlags::PROTOCOL_41;
        let kill = framed(0, b"\x03KILL QUERY 2147483649");
        assert!(decide_first(&kill[..kill.len() - 1], caps).is_none(), "incomplete");
        assert!(matches!(decide_first(&kill, caps), Some(First::Kill(Kill { kind: KillKind::Query, id: 2147483649 }))));
        assert!(
            matches!(decide_first(&framed(0, b"\x0c\x01\x00\x00\x80"), caps), Some(First::Kill(k)) if k.id == 0x8000_0001)
        );
        // Not a KILL, or a KILL with more behind it: passed on as read.
        let select = framed(0, b"\x03select @@version_comment limit 1");
        assert!(matches!(decide_first(&select, caps), Some(First::Forward(b)) if b == select));
        let mut two = kill.clone();
        two.extend_from_slice(&select);
        assert!(matches!(decide_first(&two, caps), Some(First::Forward(b)) if b == two));
        assert!(matches!(decide_first(&framed(0, b"\x0e"), caps), Some(First::Forward(_))));
        assert!(decide_first(&[], caps).is_none());
        let big = framed(0, &[b'x'; 4000]);
        assert!(matches!(decide_first(&big[..8], caps), Some(First::Forward(_))));
    }
}
