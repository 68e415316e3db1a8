//! The PostgreSQL listener: TLS with a required client certificate, the startup exchange, RBAC,
//! the upstream session, cancel routing, and (until the data plane takes sessions over) the relay.
//!
//! Identity and route come from the client certificate; the StartupMessage must agree with the
//! route. Local clients may instead connect in plaintext over a per-database Unix socket, where
//! the kernel-checked peer uid (mapped to a Sluice user by `proxy_service.local_socket.users`)
//! is the identity; both legs of such a session can then be spliced as is. Every refusal reaches the client as an ErrorResponse with an SQLSTATE and a log line, and
//! every failure is contained to its own connection task.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use rustls::ServerConfig;
use serde_json::json;
use sluice_pgwire::{self as pg, encode, sqlstate, ErrorFields, ProtocolVersion, StartupMessage, StartupPacket};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn, Instrument};

use crate::audit::{AuditLog, SessionFields, SESSION_END, SESSION_START};
use crate::ca::{identity_from_cert, Identity};
use crate::catalog;
use crate::config::{Config, LocalSocket, LOCAL_SOCKET_PORT};
use crate::dataplane::{leg_crypto, DataplaneClient, Events};
use crate::iam::TokenMinter;
use crate::leg::Leg;
use crate::limits::{ConnLimiter, ConnPermit, LimitHit};
use crate::metrics::{counters_json, METRICS};
use crate::policy::{self, Denial, PolicyView};
use crate::state::State;
use crate::tls::UpstreamTls;
use crate::upstream::{self, CancelTarget, UpstreamError, UpstreamStream};
use sluice_dataplane::handoff::{CounterSource, EndReason, LegCounters, LegCrypto, SessionCounters};

/// The client leg: mTLS over TCP, or plaintext from a local Unix socket.
type ClientStream = Leg<tokio_rustls::server::TlsStream<TcpStream>, UnixStream>;

/// Shared by every connection task.
pub struct ProxyContext {
    pub cfg: Arc<Config>,
    pub state: Arc<State>,
    pub audit: Arc<AuditLog>,
    pub minter: Arc<TokenMinter>,
    pub upstream_tls: Arc<UpstreamTls>,
    pub server_tls: Arc<ServerConfig>,
    /// Our cancel keys (given to clients) → where to send the upstream's cancel.
    cancels: Mutex<HashMap<u32, (Vec<u8>, CancelTarget)>>,
    /// Set when sessions are handed to a dataplane process.
    pub dataplane: OnceLock<Arc<DataplaneClient>>,
    /// Sessions control relays itself, and how to end them.
    relayed: Mutex<HashMap<String, Relayed>>,
    /// The zero of relayed sessions' activity clocks.
    epoch: Instant,
    limiter: Arc<ConnLimiter<IpAddr>>,
    /// Local-socket connections, by uid.
    local_limiter: Arc<ConnLimiter<u32>>,
    /// Connections being refused for being over a limit.
    refusing: std::sync::atomic::AtomicUsize,
}

impl ProxyContext {
    pub fn new(
        cfg: Arc<Config>,
        state: Arc<State>,
        audit: Arc<AuditLog>,
        minter: Arc<TokenMinter>,
        server_tls: Arc<ServerConfig>,
    ) -> Self {
        ProxyContext {
            limiter: ConnLimiter::new(cfg.proxy_service.limits),
            local_limiter: ConnLimiter::new(cfg.proxy_service.limits),
            cfg,
            state,
            audit,
            minter,
            upstream_tls: Arc::new(UpstreamTls::default()),
            server_tls,
            cancels: Mutex::new(HashMap::new()),
            dataplane: OnceLock::new(),
            relayed: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            refusing: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Vec<u8>, CancelTarget)>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn relayed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Relayed>> {
        self.relayed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since_activity(&self, activity: &std::sync::atomic::AtomicU64) -> Duration {
        let last = Duration::from_millis(activity.load(std::sync::atomic::Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// A refusal to send the client before closing.
#[derive(Debug)]
struct Refusal {
    fields: ErrorFields,
    /// What goes in the log and the audit event.
    reason: String,
    /// Label of the handshake-failure metric.
    kind: &'static str,
}

impl Refusal {
    fn new(code: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Refusal { reason: message.clone(), fields: ErrorFields::fatal(code, message), kind: "denied" }
    }
    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
}

impl From<UpstreamError> for Refusal {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Rejected(fields) => {
                let reason = format!(
                    "upstream rejected the session: {} ({})",
                    fields.message().unwrap_or("no message"),
                    fields.code().unwrap_or("no code")
                );
                let hint = if fields.code() == Some(sqlstate::INVALID_PASSWORD) {
                    "RDS Proxy refused Sluice's IAM auth token: check the AWS credentials and IAM policy \
                     (rds-db:connect) of the Sluice control service"
                } else {
                    "the error came from the upstream database"
                };
                Refusal { fields: fields.with(b'H', hint), reason, kind: "upstream_rejected" }
            }
            UpstreamError::Iam(e) => {
                // A missing region is found before any mint is tried.
                if !matches!(e, crate::iam::IamError::NoRegion) {
                    METRICS.token_error();
                }
                let mut r = Refusal::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("Sluice could not create an IAM auth token: {e}"),
                )
                .kind("token");
                // No credentials / a refused AssumeRole: say what fixes it (the trust policy).
                if matches!(e, crate::iam::IamError::NoCredentials(_) | crate::iam::IamError::AssumeRole { .. }) {
                    r.fields = r.fields.with(b'H', crate::troubleshoot::explain_iam(&e, None));
                }
                r
            }
            UpstreamError::UnsupportedAuth(_) => {
                Refusal::new(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, e.to_string()).kind("upstream_auth")
            }
            other => Refusal::new(
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("Sluice could not reach the database: {other}"),
            )
            .kind("upstream_unreachable"),
        }
    }
}

/// Serves the PostgreSQL listener until the task is dropped.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match ctx.limiter.admit(peer.ip()) {
            Ok(p) => p,
            Err(hit) => {
                refuse_busy(&ctx, tcp, peer, hit);
                continue;
            }
        };
        let ctx = ctx.clone();
        let session_id = new_session_id();
        let span = tracing::info_span!("session", session_id = %session_id, client = %peer);
        tokio::spawn(async move { handle(ctx, tcp, peer, session_id, permit).await }.instrument(span));
    }
}

/// Most connections being refused at once for being over a limit; past it they are closed
/// without a word, so refusing costs as little as the flood.
const MAX_REFUSING: usize = 256;

/// Answers a connection over the listener's limits with SQLSTATE 53300. The client's first
/// packet (SSLRequest or StartupMessage) is read first, so that closing does not reset the
/// connection before the client reads the error; no TLS is done for it.
fn refuse_busy(ctx: &Arc<ProxyContext>, mut tcp: TcpStream, peer: SocketAddr, hit: LimitHit) {
    use std::sync::atomic::Ordering;
    METRICS.handshake_failed(hit.label());
    if ctx.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        ctx.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    info!(client = %peer, reason = hit.label(), "connection refused: over a limit");
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_TIME, async {
            let mut first = [0u8; 1];
            // A direct-TLS client cannot read a plaintext error: it is just closed.
            if matches!(tcp.peek(&mut first).await, Ok(1) if first[0] != 0x16) && read_startup(&mut tcp).await.is_ok() {
                send_error(&mut tcp, &ErrorFields::fatal(sqlstate::TOO_MANY_CONNECTIONS, hit.message())).await;
            }
        })
        .await;
        ctx.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// How long a refused client gets to send its first packet.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Serves one Unix socket per served database under `local.dir`, following the catalog as
/// databases are added and removed.
pub async fn serve_local(ctx: Arc<ProxyContext>, local: LocalSocket) {
    let mut listening: HashMap<String, (PathBuf, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut failed: HashSet<String> = HashSet::new();
    loop {
        match catalog::databases(&ctx.cfg, &ctx.state) {
            Ok(dbs) => {
                let names: HashSet<String> = dbs.into_iter().map(|d| d.name).collect();
                listening.retain(|name, (path, task)| {
                    let keep = names.contains(name);
                    if !keep {
                        task.abort();
                        let _ = std::fs::remove_file(path);
                        info!(db = %name, "local socket removed");
                    }
                    keep
                });
                for name in names {
                    if listening.contains_key(&name) {
                        continue;
                    }
                    match bind_local(&local.dir, &name) {
                        Ok((path, listener)) => {
                            info!(db = %name, path = %path.display(), "local socket listening");
                            failed.remove(&name);
                            let task = tokio::spawn(accept_local(ctx.clone(), listener, name.clone()));
                            listening.insert(name, (path, task));
                        }
                        Err(e) => {
                            if failed.insert(name.clone()) {
                                warn!(db = %name, error = %e, "cannot create the local socket");
                            }
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing databases for local sockets"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn bind_local(dir: &Path, db: &str) -> std::io::Result<(PathBuf, UnixListener)> {
    use std::os::unix::fs::PermissionsExt;
    let sub = dir.join(db);
    std::fs::create_dir_all(&sub)?;
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755))?;
    let path = sub.join(format!(".s.PGSQL.{LOCAL_SOCKET_PORT}"));
    // A socket file left by an earlier control would make bind fail with EADDRINUSE.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    // Anyone may connect: who they are is decided from SO_PEERCRED, as PostgreSQL's peer auth does.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok((path, listener))
}

async fn accept_local(ctx: Arc<ProxyContext>, listener: UnixListener, db: String) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(db = %db, error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        // The kernel vouches for the uid: no handshake to limit, only the listener's total.
        let mut permit = match ctx.local_limiter.admit(uid.unwrap_or(u32::MAX)) {
            Ok(p) => p,
            Err(hit) => {
                METRICS.handshake_failed(hit.label());
                info!(db = %db, uid = ?uid, reason = hit.label(), "local connection refused: over a limit");
                continue;
            }
        };
        permit.authenticated();
        let ctx = ctx.clone();
        let session_id = new_session_id();
        let client = uid.map(|u| format!("unix:uid={u}")).unwrap_or_else(|| "unix".into());
        let span = tracing::info_span!("session", session_id = %session_id, client = %client);
        let db = db.clone();
        tokio::spawn(
            async move {
                let started = Instant::now();
                let mut fields = SessionFields { session_id, client_addr: client, ..Default::default() };
                let deadline = ctx.cfg.proxy_service.handshake_timeout;
                let setup = tokio::time::timeout(deadline, local_handshake(&ctx, stream, uid, db, &mut fields)).await;
                run_session(ctx, setup, fields, started).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// The startup exchange of a local plaintext client: the OS user behind the socket, mapped to
/// a Sluice user, stands in for a client certificate whose route is this socket's database.
async fn local_handshake(
    ctx: &ProxyContext,
    mut stream: UnixStream,
    uid: Option<u32>,
    service: String,
    fields: &mut SessionFields,
) -> Result<Option<Ready>, &'static str> {
    use sqlstate::INVALID_AUTHORIZATION_SPECIFICATION as DENIED;
    let startup = loop {
        match read_startup(&mut stream).await {
            Ok(Ok(StartupPacket::Startup(m))) => break m,
            // libpq never asks for encryption on a Unix socket; others may, and get the plain answer.
            Ok(Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                if stream.write_all(b"N").await.is_err() {
                    return Err("client_gone");
                }
            }
            Ok(Ok(StartupPacket::Cancel(c))) => {
                handle_cancel(ctx, c).await;
                return Ok(None);
            }
            Ok(Err(e)) => {
                info!(error = %e, "invalid startup packet");
                let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid startup packet: {e}"));
                send_error(&mut stream, &e).await;
                return Err("protocol");
            }
            Err(e) => {
                info!(error = %e, "client went away during startup");
                return Err("client_gone");
            }
        }
    };
    let os_user = uid.and_then(|u| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u)).ok().flatten());
    let os_name = os_user.map(|u| u.name).unwrap_or_else(|| format!("uid {}", uid.unwrap_or(u32::MAX)));
    let mapped = ctx.cfg.proxy_service.local_socket.as_ref().and_then(|l| l.users.get(&os_name)).cloned();
    let Some(user) = mapped else {
        fields.db_service = service;
        let refusal = Refusal::new(
            DENIED,
            format!("OS user {os_name:?} is not mapped to a Sluice user (proxy_service.local_socket.users)"),
        );
        info!(os_user = %os_name, reason = %refusal.reason, "session refused");
        ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
        send_error(&mut stream, &refusal.fields).await;
        return Err("unmapped_os_user");
    };
    fields.user = user.clone();
    let identity = Identity {
        v: 1,
        user,
        route: Some(crate::ca::DbRoute { service, db_user: String::new(), db_name: String::new() }),
    };
    match authorize_and_connect(ctx, &identity, &startup, &mut stream, fields).await {
        Ok((our_pid, upstream)) => {
            ctx.audit.emit(SESSION_START, fields, true, json!({ "os_user": os_name }));
            Ok(Some(Ready { client: Leg::Plain(stream), upstream, our_pid, not_after: 0 }))
        }
        Err(refusal) => {
            info!(user = %fields.user, db = %fields.db_service, reason = %refusal.reason, "session refused");
            ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
            send_error(&mut stream, &refusal.fields).await;
            Err(refusal.kind)
        }
    }
}

/// Ends every live session that could not start now, within the poll interval: a lock covers
/// it, its user was removed, its roles no longer allow the route, or its database is gone;
/// and, for sessions control relays itself, its certificate expired or it sat idle past the
/// idle timeout (the data plane enforces those two for the sessions it holds). The data plane's
/// sessions end through EndSession, control's own by stopping their relay. New sessions meet
/// the same decision at setup.
pub async fn enforce_policy(ctx: Arc<ProxyContext>) {
    let mut asked: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(POLICY_POLL).await;
        let dp = ctx.dataplane.get().filter(|d| d.connected()).cloned();
        if dp.is_none() && ctx.relayed().is_empty() {
            asked.clear();
            continue;
        }
        let (cfg, state, with_dp) = (ctx.cfg.clone(), ctx.state.clone(), dp.is_some());
        let relaying = !ctx.relayed().is_empty();
        let loaded = tokio::task::spawn_blocking(move || {
            let live = if with_dp { state.live_sessions()? } else { Vec::new() };
            if live.is_empty() && !relaying {
                return Ok(None);
            }
            Ok::<_, crate::state::StateError>(Some((PolicyView::load(&cfg, &state)?, live)))
        })
        .await;
        let (view, live) = match loaded {
            Ok(Ok(Some(x))) => x,
            // No live session at all.
            Ok(Ok(None)) => {
                asked.clear();
                continue;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "reading the state to enforce policy on live sessions");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "policy check task failed");
                continue;
            }
        };
        let verdict = |f: &SessionFields| {
            let route =
                policy::Route { user: &f.user, db_service: &f.db_service, db_user: &f.db_user, db_name: &f.db_name };
            view.decide(route).err().map(|d| {
                let reason =
                    if matches!(d, Denial::Locked { .. }) { EndReason::Locked } else { EndReason::AccessRevoked };
                (reason, d.to_string())
            })
        };

        let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
        let idle_limit = ctx.cfg.idle_timeout();
        let ending: Vec<(String, EndReason, String)> = ctx
            .relayed()
            .iter()
            .filter_map(|(id, r)| {
                let why = if r.not_after != 0 && now_unix > r.not_after {
                    Some((EndReason::CertExpired, "the client certificate expired".to_owned()))
                } else if !idle_limit.is_zero() && ctx.since_activity(&r.activity) >= idle_limit {
                    Some((EndReason::IdleTimeout, format!("idle for {} s", idle_limit.as_secs())))
                } else {
                    verdict(&r.fields)
                };
                why.map(|(reason, text)| (id.clone(), reason, text))
            })
            .collect();
        for (id, reason, why) in ending {
            if let Some(r) = ctx.relayed().remove(&id) {
                info!(session_id = %id, reason = ?reason, why = %why, "ending a session control relays");
                let _ = r.end.send(reason);
            }
        }

        let Some(dp) = dp else { continue };
        asked.retain(|id| live.iter().any(|(l, _, _)| l == id));
        for (id, _, record) in live {
            let fields = match LiveRecord::from_json(&record) {
                Ok(r) => r.fields,
                Err(e) => {
                    warn!(session_id = %id, error = %e, "unreadable live-session record");
                    continue;
                }
            };
            let Some((reason, why)) = verdict(&fields) else { continue };
            if asked.insert(id.clone()) {
                info!(session_id = %id, reason = ?reason, why = %why, "ending a session in the dataplane");
                if let Err(e) = dp.end_session(&id, reason) {
                    warn!(session_id = %id, error = %e, "asking the dataplane to end a session");
                    asked.remove(&id);
                }
            }
        }
    }
}

/// How often live sessions are checked against the policy; sessions must end within a second
/// of a lock, a user's removal or a role change.
const POLICY_POLL: Duration = Duration::from_millis(250);

/// A session control relays itself.
struct Relayed {
    fields: SessionFields,
    /// Stops the relay.
    end: tokio::sync::oneshot::Sender<EndReason>,
    /// The client certificate's expiry (unix seconds; 0 for local clients, who have none).
    not_after: i64,
    /// Milliseconds after `ProxyContext::epoch` of the last byte relayed either way.
    activity: Arc<std::sync::atomic::AtomicU64>,
}

/// What control keeps about a session the data plane holds (`live_sessions` in the state), so
/// a restarted control can audit its end, route its cancels and enforce policy on it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LiveRecord {
    fields: SessionFields,
}

impl LiveRecord {
    fn from_json(v: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(v.clone())
    }
}

fn new_session_id() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Reads one untyped startup-phase packet (length-prefixed) without reading past it, so the TLS
/// handshake that may follow starts on a clean stream.
async fn read_startup<S: AsyncRead + Unpin>(s: &mut S) -> Result<Result<StartupPacket, pg::WireError>, std::io::Error> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len) as usize;
    if !(8..=pg::MAX_STARTUP_LEN).contains(&n) {
        return Ok(Err(pg::WireError::BadLength(n)));
    }
    let mut packet = vec![0u8; n];
    packet[..4].copy_from_slice(&len);
    s.read_exact(&mut packet[4..]).await?;
    Ok(pg::decode_startup(&packet).and_then(|p| p.map(|(p, _)| p).ok_or(pg::WireError::BadLength(n))))
}

async fn send_error<S: AsyncWrite + Unpin>(s: &mut S, fields: &ErrorFields) {
    let _ = s.write_all(&encode::error_response(fields)).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

async fn handle(
    ctx: Arc<ProxyContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: String,
    mut permit: ConnPermit<IpAddr>,
) {
    let _ = tcp.set_nodelay(true);
    let deadline = ctx.cfg.proxy_service.handshake_timeout;
    let started = Instant::now();
    let mut fields = SessionFields { session_id, client_addr: peer.to_string(), ..Default::default() };
    let setup = tokio::time::timeout(deadline, handshake(&ctx, tcp, &mut fields, &mut permit)).await;
    run_session(ctx, setup, fields, started).await;
    // Held until here: a session control relays itself still costs control its sockets.
    drop(permit);
}

/// Relays (or hands off) a session once its setup finished, and audits its end.
async fn run_session(
    ctx: Arc<ProxyContext>,
    setup: Result<Result<Option<Ready>, &'static str>, tokio::time::error::Elapsed>,
    fields: SessionFields,
    started: Instant,
) {
    let deadline = ctx.cfg.proxy_service.handshake_timeout;
    let ready = match setup {
        Err(_) => {
            info!(timeout_s = deadline.as_secs(), "handshake deadline passed; dropping client");
            METRICS.handshake_failed("timeout");
            return;
        }
        Ok(Ok(Some(ready))) => ready,
        Ok(Ok(None)) => return,
        Ok(Err(reason)) => {
            METRICS.handshake_failed(reason);
            return;
        }
    };
    METRICS.session_started(started.elapsed());
    info!(user = %fields.user, db = %fields.db_service, db_user = %fields.db_user, db_name = %fields.db_name, "session started");
    let ready = match ctx.dataplane.get().filter(|d| d.connected()) {
        // With a data plane there, control relays nothing itself.
        Some(dp) => match hand_off(&ctx, dp, ready, &fields).await {
            Outcome::Done => return,
            Outcome::Failed(why, our_pid) => {
                warn!(reason = %why, "handoff to the dataplane failed; session closed");
                METRICS.handshake_failed("handoff");
                ctx.cancels().remove(&our_pid);
                ctx.audit.emit(SESSION_END, &fields, false, json!({ "error": format!("handoff failed: {why}") }));
                return;
            }
        },
        None => ready,
    };
    let Ready { client, upstream, our_pid, not_after } = ready;
    let legs = json!({ "client": leg_kind(client.is_tls()), "upstream": leg_kind(upstream.is_tls()) });
    // Count what each side delivered as it is read, so the totals survive a relay that ends in
    // an error (a client killed mid-transfer still gets an accurate audit record).
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(ctx.epoch.elapsed().as_millis() as u64));
    let mut client = CountingReader::new(client, ctx.epoch, activity.clone());
    let mut upstream = CountingReader::new(upstream, ctx.epoch, activity.clone());
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let relayed = Relayed { fields: fields.clone(), end: end_tx, not_after, activity };
    ctx.relayed().insert(fields.session_id.clone(), relayed);
    METRICS.local_session(true);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 * 1024, 64 * 1024) => r.map(|_| None),
        Ok(reason) = end_rx => Ok(Some(reason)),
    };
    ctx.relayed().remove(&fields.session_id);
    METRICS.local_session(false);
    ctx.cancels().remove(&our_pid);
    let (to_upstream, to_client) = (client.read, upstream.read);
    let (error, reason) = match result {
        Ok(reason) => (None, reason),
        // A peer that closes TCP without TLS close_notify (a killed psql, many drivers) has ended
        // its session, not failed it.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => (None, None),
        Err(e) => (Some(e.to_string()), None),
    };
    if let Some(reason) = reason {
        // No ErrorResponse: the relay may be in the middle of a message, and a frame spliced into
        // it would corrupt the stream. Both legs close, as the data plane does.
        let _ = client.inner.shutdown().await;
        info!(reason = ?reason, "session ended by control");
    }
    let duration = started.elapsed();
    info!(bytes_from_client = to_upstream, bytes_to_client = to_client, duration_ms = duration.as_millis() as u64, error = ?error, "session ended");
    // Control's own relay counts plaintext it read; packets and TCP health are not visible here.
    let counters = SessionCounters {
        source: CounterSource::Userspace,
        client: LegCounters { rx_bytes: to_upstream, tx_bytes: to_client, ..Default::default() },
        upstream: LegCounters { rx_bytes: to_client, tx_bytes: to_upstream, ..Default::default() },
    };
    METRICS.session_ended(&counters);
    ctx.audit.emit(
        SESSION_END,
        &fields,
        error.is_none(),
        json!({
            "duration_ms": duration.as_millis() as u64,
            "bytes_from_client": to_upstream,
            "bytes_to_client": to_client,
            "counters": counters_json(&counters),
            "error": error,
            "reason": reason.map(|r| format!("{r:?}")),
            "data_plane": false,
            "legs": legs,
        }),
    );
}

struct Ready {
    client: ClientStream,
    upstream: UpstreamStream,
    our_pid: u32,
    /// The client certificate's expiry (unix seconds): the session may not outlive it.
    not_after: i64,
}

/// Runs the whole setup. `Ok(None)` is a finished short exchange (a cancel request); `Err(reason)`
/// means the client was refused or went away (already told and logged); `reason` labels the
/// handshake-failure metric.
async fn handshake(
    ctx: &ProxyContext,
    mut tcp: TcpStream,
    fields: &mut SessionFields,
    permit: &mut ConnPermit<IpAddr>,
) -> Result<Option<Ready>, &'static str> {
    // PostgreSQL 17 clients may start TLS directly (sslnegotiation=direct): a TLS record, not a
    // length-prefixed packet, comes first.
    let mut first = [0u8; 1];
    let direct_tls = matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    if !direct_tls {
        loop {
            let packet = match read_startup(&mut tcp).await {
                Ok(p) => p,
                Err(e) => {
                    info!(error = %e, "client went away before TLS");
                    return Err("client_gone");
                }
            };
            match packet {
                Ok(StartupPacket::SslRequest) => {
                    if tcp.write_all(b"S").await.is_err() {
                        return Err("client_gone");
                    }
                    break;
                }
                Ok(StartupPacket::GssEncRequest) => {
                    if tcp.write_all(b"N").await.is_err() {
                        return Err("client_gone");
                    }
                }
                Ok(StartupPacket::Cancel(c)) => {
                    handle_cancel(ctx, c).await;
                    return Ok(None);
                }
                Ok(StartupPacket::Startup(_)) => {
                    info!("plaintext startup refused");
                    let e = ErrorFields::fatal(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        "Sluice requires TLS with a client certificate",
                    )
                    .with(b'H', "connect with sslmode=verify-full and the certificate from `sluice db login`");
                    send_error(&mut tcp, &e).await;
                    return Err("plaintext");
                }
                Err(e) => {
                    info!(error = %e, "invalid startup packet");
                    let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid startup packet: {e}"));
                    send_error(&mut tcp, &e).await;
                    return Err("protocol");
                }
            }
        }
    }
    let mut client = match TlsAcceptor::from(ctx.server_tls.clone()).accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "client TLS handshake failed");
            return Err("tls");
        }
    };
    let identity = {
        let certs = client.get_ref().1.peer_certificates();
        match certs.and_then(|c| c.first()).map(|c| identity_from_cert(c)) {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                info!(error = %e, "client certificate has no usable identity");
                let e = ErrorFields::fatal(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("bad client certificate: {e}"),
                );
                send_error(&mut client, &e).await;
                return Err("certificate");
            }
            None => {
                let e = ErrorFields::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "no client certificate");
                send_error(&mut client, &e).await;
                return Err("certificate");
            }
        }
    };
    fields.user = identity.user.clone();
    // Every handshake re-checks the certificate's expiry here (TLS lets an expired one through,
    // so the client learns why; there is no resumption to skip this).
    let cert = client.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    if let Err(expired) = crate::tls::check_not_expired(&cert, time::OffsetDateTime::now_utc()) {
        let when = expired.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        info!(user = %identity.user, expired = %when, "client certificate expired");
        let e = ErrorFields::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("client certificate expired at {when}"),
        )
        .with(b'H', "run `sluice login` and `sluice db login` for a new certificate");
        send_error(&mut client, &e).await;
        return Err("certificate_expired");
    }
    let not_after = crate::ca::not_after(&cert).map(|t| t.unix_timestamp()).unwrap_or(0);
    // A valid client certificate: this connection no longer counts as an unauthenticated one.
    permit.authenticated();
    let startup = match read_startup(&mut client).await {
        Ok(Ok(StartupPacket::Startup(m))) => m,
        Ok(Ok(StartupPacket::Cancel(c))) => {
            handle_cancel(ctx, c).await;
            return Ok(None);
        }
        Ok(Ok(_)) => {
            let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "unexpected encryption request inside TLS");
            send_error(&mut client, &e).await;
            return Err("protocol");
        }
        Ok(Err(e)) => {
            info!(error = %e, "invalid startup packet inside TLS");
            let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid startup packet: {e}"));
            send_error(&mut client, &e).await;
            return Err("protocol");
        }
        Err(e) => {
            info!(error = %e, "client went away during startup");
            return Err("client_gone");
        }
    };
    match authorize_and_connect(ctx, &identity, &startup, &mut client, fields).await {
        Ok(our_pid_and_upstream) => {
            ctx.audit.emit(SESSION_START, fields, true, json!({}));
            let (our_pid, upstream) = our_pid_and_upstream;
            Ok(Some(Ready { client: Leg::Tls(client), upstream, our_pid, not_after }))
        }
        Err(refusal) => {
            info!(user = %fields.user, db = %fields.db_service, reason = %refusal.reason, "session refused");
            ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
            send_error(&mut client, &refusal.fields).await;
            Err(refusal.kind)
        }
    }
}

async fn authorize_and_connect<C: AsyncWrite + Unpin>(
    ctx: &ProxyContext,
    identity: &Identity,
    startup: &StartupMessage,
    client: &mut C,
    fields: &mut SessionFields,
) -> Result<(u32, UpstreamStream), Refusal> {
    use sqlstate::INVALID_AUTHORIZATION_SPECIFICATION as DENIED;
    let route = identity.route.as_ref().ok_or_else(|| {
        Refusal::new(
            DENIED,
            format!("certificate of {:?} has no database route; run `sluice db login <database>`", identity.user),
        )
    })?;
    fields.db_service = route.service.clone();
    let startup_user = startup.user().ok_or_else(|| Refusal::new(DENIED, "startup message has no user"))?;
    let db_user = if route.db_user.is_empty() { startup_user } else { route.db_user.as_str() };
    if startup_user != db_user {
        return Err(Refusal::new(
            DENIED,
            format!("database user {startup_user:?} does not match the certificate's {db_user:?}; run `sluice db login {} --db-user {startup_user}`", route.service),
        ));
    }
    let startup_db = startup.database().unwrap_or(db_user);
    let db_name = if route.db_name.is_empty() { startup_db } else { route.db_name.as_str() };
    if startup_db != db_name {
        return Err(Refusal::new(
            DENIED,
            format!("database name {startup_db:?} does not match the certificate's {db_name:?}; run `sluice db login {} --db-name {startup_db}`", route.service),
        ));
    }
    fields.db_user = db_user.to_owned();
    fields.db_name = db_name.to_owned();

    let internal =
        |e: String| Refusal::new(sqlstate::INTERNAL_ERROR, format!("Sluice state error: {e}")).kind("internal");
    let view = {
        let (cfg, state) = (ctx.cfg.clone(), ctx.state.clone());
        let (user, service) = (identity.user.clone(), route.service.clone());
        // SQLite blocks: never on the async threads.
        tokio::task::spawn_blocking(move || PolicyView::load_for(&cfg, &state, &user, &service))
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| {
                METRICS.discovery_error();
                internal(e.to_string())
            })?
    };
    let decided = view.decide(policy::Route { user: &identity.user, db_service: &route.service, db_user, db_name });
    let db = decided
        .map_err(|d| match d {
            Denial::UnknownDatabase => Refusal::new(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database {:?} is not registered with Sluice", route.service),
            )
            .kind("unknown_database"),
            Denial::UnknownUser => Refusal::new(DENIED, format!("user {:?} does not exist", identity.user)),
            other => Refusal::new(DENIED, other.to_string()),
        })?
        .clone();
    let roles = view.users.get(&identity.user).map(|u| view.roles_of(u)).unwrap_or_default();

    // Protocol 3.2 is spoken to the client (only cancel keys differ); the upstream gets 3.0.
    let unrecognized: Vec<String> =
        startup.params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    let client_minor = if startup.version > ProtocolVersion::V3_2 { 2 } else { startup.version.minor };
    let negotiate = (startup.version > ProtocolVersion::V3_2 || !unrecognized.is_empty())
        .then(|| encode::negotiate_protocol_version(client_minor, &unrecognized));
    let extra = crate::startup_params::upstream_params(&startup.params, crate::rbac::allows_replication(&roles))
        .map_err(|r| Refusal::new(r.code, r.message).kind("startup_parameter"))?;

    let (upstream, greeting, cancel_target) =
        upstream::connect(&db, db_user, db_name, &extra, &ctx.minter, &ctx.upstream_tls).await?;

    // Clients get our own cancel key: upstream keys never leave Sluice, and keys of different
    // upstreams cannot collide.
    let key_len = if client_minor >= 2 { 32 } else { 4 };
    let mut secret = vec![0u8; key_len];
    rand::thread_rng().fill_bytes(&mut secret);
    let our_pid = {
        let mut cancels = ctx.cancels();
        let mut pid;
        loop {
            pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !cancels.contains_key(&pid) {
                break;
            }
        }
        if greeting.backend_key.is_some() {
            cancels.insert(pid, (secret.clone(), cancel_target));
        }
        pid
    };
    let mut out = Vec::new();
    if let Some(n) = negotiate {
        out.extend(n);
    }
    out.extend(encode::auth_ok());
    for m in &greeting.messages {
        out.extend_from_slice(m);
    }
    out.extend(encode::backend_key_data(our_pid, &secret));
    out.extend(encode::ready_for_query(greeting.ready_status));
    if let Err(e) = upstream::write_all_flush(client, &out).await {
        ctx.cancels().remove(&our_pid);
        return Err(Refusal::new(sqlstate::CONNECTION_FAILURE, format!("client went away: {e}")));
    }
    Ok((our_pid, upstream))
}

async fn handle_cancel(ctx: &ProxyContext, req: pg::CancelRequest) {
    let target = {
        let cancels = ctx.cancels();
        match cancels.get(&req.pid) {
            Some((secret, target)) if bool::from(secret.as_slice().ct_eq(&req.secret)) => Some(target.clone()),
            _ => None,
        }
    };
    match target {
        Some(t) => match upstream::cancel(&t).await {
            Ok(()) => info!(pid = req.pid, "cancel request forwarded upstream"),
            Err(e) => warn!(pid = req.pid, error = %e, "forwarding cancel request failed"),
        },
        // PostgreSQL ignores unknown cancel keys silently; so do we (no oracle for key guessing).
        None => info!(pid = req.pid, "cancel request with unknown key ignored"),
    }
}

enum Outcome {
    /// The dataplane owns the session now.
    Done,
    /// The TLS state was already taken apart; the session is lost (its sockets close).
    Failed(String, u32),
}

/// Takes the plaintext a TLS connection received but nobody read yet (a client that pipelined
/// its first query behind its StartupMessage; an upstream that sent a notice after
/// ReadyForQuery): such bytes live only in rustls' buffers and would be lost by a handoff.
fn take_buffered_plaintext<D: rustls::SideData>(conn: &mut rustls::ConnectionCommon<D>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let pending = conn.process_new_packets().map_err(|e| e.to_string())?.plaintext_bytes_to_read();
    let mut out = vec![0u8; pending];
    conn.reader().read_exact(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Moves what rustls buffered on one leg to the other leg, so both legs can be handed over with
/// nothing left behind; returns how many bytes moved.
async fn forward_buffered(ready: &mut Ready) -> Result<(usize, usize), String> {
    let from_client = match &mut ready.client {
        Leg::Tls(t) => take_buffered_plaintext(t.get_mut().1)?,
        Leg::Plain(_) => Vec::new(),
    };
    let from_upstream = match &mut ready.upstream {
        Leg::Tls(t) => take_buffered_plaintext(t.get_mut().1)?,
        Leg::Plain(_) => Vec::new(),
    };
    if !from_client.is_empty() {
        upstream::write_all_flush(&mut ready.upstream, &from_client).await.map_err(|e| e.to_string())?;
    }
    if !from_upstream.is_empty() {
        upstream::write_all_flush(&mut ready.client, &from_upstream).await.map_err(|e| e.to_string())?;
    }
    Ok((from_client.len(), from_upstream.len()))
}

/// How a leg is described in audit events: `tls` (the data plane runs the record layer, in the
/// kernel with kTLS or in userspace) or `plain` (spliced as is).
fn leg_kind(tls: bool) -> &'static str {
    if tls {
        "tls"
    } else {
        "plain"
    }
}

fn describe_tls(v: Option<rustls::ProtocolVersion>, s: Option<rustls::SupportedCipherSuite>) -> (u16, u16) {
    (v.map(u16::from).unwrap_or(0), s.map(|s| u16::from(s.suite())).unwrap_or(0))
}

/// A TLS leg taken apart for the data plane: its socket and the traffic secrets.
fn tls_handoff_leg(tcp: TcpStream, conn: rustls::Connection) -> Result<(OwnedFd, LegCrypto), String> {
    let (v, s) = describe_tls(conn.protocol_version(), conn.negotiated_cipher_suite());
    let crypto = conn.dangerous_extract_secrets().map_err(|e| e.to_string()).and_then(|x| leg_crypto(v, s, x))?;
    Ok((OwnedFd::from(tcp.into_std().map_err(|e| e.to_string())?), crypto))
}

fn client_handoff_leg(leg: ClientStream) -> Result<(OwnedFd, LegCrypto), String> {
    match leg {
        Leg::Tls(t) => {
            let (tcp, conn) = t.into_inner();
            tls_handoff_leg(tcp, conn.into())
        }
        Leg::Plain(u) => Ok((OwnedFd::from(u.into_std().map_err(|e| e.to_string())?), LegCrypto::Plain)),
    }
}

fn upstream_handoff_leg(leg: UpstreamStream) -> Result<(OwnedFd, LegCrypto), String> {
    match leg {
        Leg::Tls(t) => {
            let (tcp, conn) = t.into_inner();
            tls_handoff_leg(tcp, conn.into())
        }
        Leg::Plain(t) => Ok((OwnedFd::from(t.into_std().map_err(|e| e.to_string())?), LegCrypto::Plain)),
    }
}

async fn hand_off(ctx: &ProxyContext, dp: &DataplaneClient, mut ready: Ready, fields: &SessionFields) -> Outcome {
    // Nothing is read from the sockets here, so one pass empties rustls' buffers.
    match forward_buffered(&mut ready).await {
        Ok((0, 0)) => {}
        Ok((to_upstream, to_client)) => {
            info!(to_upstream, to_client, "forwarded bytes buffered during the startup before the handoff")
        }
        Err(e) => return Outcome::Failed(format!("forwarding buffered bytes: {e}"), ready.our_pid),
    }
    let Ready { client, upstream, our_pid, not_after } = ready;
    let legs = json!({ "client": leg_kind(client.is_tls()), "upstream": leg_kind(upstream.is_tls()) });
    let (client_fd, client_leg) = match client_handoff_leg(client) {
        Ok(x) => x,
        Err(e) => return Outcome::Failed(format!("taking the client leg apart: {e}"), our_pid),
    };
    let (upstream_fd, upstream_leg) = match upstream_handoff_leg(upstream) {
        Ok(x) => x,
        Err(e) => return Outcome::Failed(format!("taking the upstream leg apart: {e}"), our_pid),
    };
    // What a restarted control needs to route this session's cancel requests.
    let cancel = ctx.cancels().get(&our_pid).map(|(ours, t)| {
        json!({ "our_secret": hex::encode(ours), "upstream_pid": t.pid, "upstream_secret": hex::encode(&t.secret) })
    });
    let record = json!({ "fields": fields, "our_pid": our_pid, "cancel": cancel, "legs": legs });
    if let Err(e) = ctx.state.insert_live_session(&fields.session_id, &record) {
        return Outcome::Failed(format!("recording the session: {e}"), our_pid);
    }
    let idle = ctx.cfg.idle_timeout();
    let h = sluice_dataplane::handoff::Handoff {
        session_id: fields.session_id.clone(),
        user: fields.user.clone(),
        db_service: fields.db_service.clone(),
        db_user: fields.db_user.clone(),
        db_name: fields.db_name.clone(),
        not_after,
        idle_timeout_ms: idle.as_millis() as u64,
        client: client_leg,
        upstream: upstream_leg,
    };
    match dp.handoff(h, client_fd, upstream_fd).await {
        Ok(()) => {
            info!("session handed to the dataplane");
            Outcome::Done
        }
        Err(e) => {
            let _ = ctx.state.take_live_session(&fields.session_id);
            Outcome::Failed(e, our_pid)
        }
    }
}

/// The legs as the dataplane ran them: a TLS leg whose records the kernel protected is `ktls`;
/// one the userspace record path handled stays `tls`.
fn with_ktls(legs: &serde_json::Value, ktls: Option<(bool, bool)>) -> serde_json::Value {
    let mut legs = legs.clone();
    if let Some((client, upstream)) = ktls {
        for (name, on) in [("client", client), ("upstream", upstream)] {
            if on && legs[name] == "tls" {
                legs[name] = json!("ktls");
            }
        }
    }
    legs
}

impl ProxyContext {
    /// Audits the end of a session the dataplane held.
    fn finish_handed_off(&self, id: &str, ended: Option<&sluice_dataplane::handoff::SessionEnded>) {
        let record = match self.state.take_live_session(id) {
            Ok(Some((_, record))) => record,
            Ok(None) => {
                warn!(session_id = %id, "end report for a session control does not know");
                return;
            }
            Err(e) => {
                warn!(session_id = %id, error = %e, "reading a live session");
                return;
            }
        };
        let fields: SessionFields = serde_json::from_value(record["fields"].clone()).unwrap_or_default();
        if let Some(pid) = record["our_pid"].as_u64() {
            self.cancels().remove(&(pid as u32));
        }
        let extra = match ended {
            Some(e) => json!({
                "duration_ms": e.duration_ms,
                "bytes_from_client": e.bytes_client_to_upstream,
                "bytes_to_client": e.bytes_upstream_to_client,
                "reason": format!("{:?}", e.reason),
                "data_plane": true,
                "legs": with_ktls(&record["legs"], e.ktls),
                "counters": e.counters.as_ref().map(counters_json),
            }),
            None => {
                json!({ "error": "the dataplane no longer holds the session", "data_plane": true, "legs": record["legs"] })
            }
        };
        let success = ended.is_some_and(|e| e.reason != sluice_dataplane::handoff::EndReason::Error);
        if let Some(c) = ended.and_then(|e| e.counters.as_ref()) {
            METRICS.session_ended(c);
        }
        info!(session_id = %id, user = %fields.user, db = %fields.db_service, "session ended in the dataplane");
        self.audit.emit(SESSION_END, &fields, success, extra);
    }
}

impl ProxyContext {
    /// Rebuilds the cancel route of a session handed off by an earlier control process.
    fn restore_cancel(&self, record: &serde_json::Value) -> Result<(), String> {
        let (Some(our_pid), Some(c)) = (record["our_pid"].as_u64(), record.get("cancel").filter(|c| !c.is_null()))
        else {
            return Ok(());
        };
        let our_pid = our_pid as u32;
        if self.cancels().contains_key(&our_pid) {
            return Ok(());
        }
        let hex_field = |k: &str| hex::decode(c[k].as_str().unwrap_or_default()).map_err(|e| format!("{k}: {e}"));
        let (ours, secret) = (hex_field("our_secret")?, hex_field("upstream_secret")?);
        let pid = c["upstream_pid"].as_u64().ok_or("no upstream pid")? as u32;
        let service = record["fields"]["db_service"].as_str().unwrap_or_default();
        let db = catalog::find(&self.cfg, &self.state, service)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("database {service:?} is no longer registered"))?;
        let dial = db.spec.dial_target().map_err(|e| e.to_string())?;
        let name = db.spec.tls_server_name().map_err(|e| e.to_string())?;
        let server_name = rustls_pki_types::ServerName::try_from(name).map_err(|e| e.to_string())?;
        let tls = match db.spec.tls.mode {
            crate::config::TlsMode::VerifyFull => {
                Some(self.upstream_tls.config(db.spec.tls.ca_cert_file.as_deref()).map_err(|e| e.to_string())?)
            }
            crate::config::TlsMode::Disable => None,
        };
        self.cancels().insert(our_pid, (ours, CancelTarget { dial, server_name, tls, pid, secret }));
        Ok(())
    }
}

impl Events for ProxyContext {
    fn ended(&self, e: sluice_dataplane::handoff::SessionEnded) {
        self.finish_handed_off(&e.session_id.clone(), Some(&e));
    }

    fn sync(&self, live: Vec<String>) {
        let known = match self.state.live_sessions() {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "listing live sessions");
                return;
            }
        };
        for (id, _, record) in known {
            if !live.contains(&id) {
                self.finish_handed_off(&id, None);
            } else if let Err(e) = self.restore_cancel(&record) {
                warn!(session_id = %id, error = %e, "cannot route cancel requests for a session from before the restart");
            }
        }
    }
}

/// Passes I/O through, counts the bytes read from the inner stream and stamps when the last
/// ones came (the idle timeout of sessions control relays).
struct CountingReader<S> {
    inner: S,
    read: u64,
    epoch: Instant,
    activity: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> CountingReader<S> {
    fn new(inner: S, epoch: Instant, activity: Arc<std::sync::atomic::AtomicU64>) -> Self {
        CountingReader { inner, read: 0, epoch, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingReader<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.store(self.epoch.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingReader<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktls_flags_refine_tls_legs_only() {
        let legs = json!({ "client": "tls", "upstream": "plain" });
        assert_eq!(with_ktls(&legs, None), legs);
        assert_eq!(with_ktls(&legs, Some((false, false))), legs);
        assert_eq!(with_ktls(&legs, Some((true, true))), json!({ "client": "ktls", "upstream": "plain" }));
        let both = json!({ "client": "tls", "upstream": "tls" });
        assert_eq!(with_ktls(&both, Some((false, true))), json!({ "client": "tls", "upstream": "ktls" }));
    }
}
