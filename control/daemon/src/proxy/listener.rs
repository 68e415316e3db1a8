//! Accepting clients: the TCP listener, the per-database local sockets, and the quick refusal
//! of connections over a limit.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_pgwire::negotiation::TLS_HANDSHAKE_RECORD;
use sluice_pgwire::{sqlstate, ErrorFields, ServerNegotiation, TlsOffer};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tracing::{info, warn, Instrument};

use super::relay::run_session;
use super::startup::{handshake, local_handshake, next_negotiation_event, send_error};
use super::{new_session_id, ProxyContext};
use crate::audit::SessionFields;
use crate::config::{LocalSocket, LOCAL_SOCKET_PORT};
use crate::limits::{ConnPermit, LimitHit};
use crate::metrics::METRICS;

/// The wire protocol a TCP listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Postgres,
    Mysql,
}

/// Serves the PostgreSQL listener until the task is dropped.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    accept_loop(ctx, listener, Wire::Postgres).await
}

/// Serves the MySQL listener until the task is dropped: the same limits, handshake deadline and
/// session handling as PostgreSQL's.
pub async fn serve_mysql(ctx: Arc<ProxyContext>, listener: TcpListener) {
    accept_loop(ctx, listener, Wire::Mysql).await
}

async fn accept_loop(ctx: Arc<ProxyContext>, listener: TcpListener, wire: Wire) {
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
                match wire {
                    Wire::Postgres => refuse_busy(&ctx, tcp, peer, hit),
                    Wire::Mysql => refuse_busy_mysql(&ctx, tcp, peer, hit),
                }
                continue;
            }
        };
        let ctx = ctx.clone();
        let session_id = new_session_id();
        let span = match wire {
            Wire::Postgres => tracing::info_span!("session", session_id = %session_id, client = %peer),
            Wire::Mysql => {
                tracing::info_span!("session", session_id = %session_id, client = %peer, protocol = "mysql")
            }
        };
        tokio::spawn(async move { handle(ctx, tcp, peer, session_id, permit, wire).await }.instrument(span));
    }
}

/// Answers a MySQL connection over the listener's limits with error 1040 in place of the
/// greeting, as a full server does; the client speaks first in nothing, so nothing is read.
fn refuse_busy_mysql(ctx: &Arc<ProxyContext>, mut tcp: TcpStream, peer: SocketAddr, hit: LimitHit) {
    use tokio::io::AsyncWriteExt;
    let message = hit.message();
    refuse_over_limit(ctx, peer, hit, async move {
        let err = sluice_mysqlwire::ErrPacket::new(sluice_mysqlwire::ER_CON_COUNT_ERROR, *b"08004", message)
            .before_greeting();
        let mut out = bytes::BytesMut::new();
        sluice_mysqlwire::PacketEncoder::new(0).write_with(&mut out, |o| err.encode(o));
        let _ = tcp.write_all(&out).await;
        let _ = tcp.shutdown().await;
    });
}

/// Most connections being refused at once for being over a limit; past it they are closed
/// without a word, so refusing costs as little as the flood.
const MAX_REFUSING: usize = 256;

/// Answers a connection over the listener's limits with SQLSTATE 53300. The client's first
/// packet (SSLRequest or StartupMessage) is read first, so that closing does not reset the
/// connection before the client reads the error; no TLS is done for it.
fn refuse_busy(ctx: &Arc<ProxyContext>, mut tcp: TcpStream, peer: SocketAddr, hit: LimitHit) {
    let message = hit.message();
    refuse_over_limit(ctx, peer, hit, async move {
        let mut first = [0u8; 1];
        // A direct-TLS client cannot read a plaintext error: it is just closed.
        if matches!(tcp.peek(&mut first).await, Ok(1) if first[0] != TLS_HANDSHAKE_RECORD)
            && next_negotiation_event(&mut tcp, &mut ServerNegotiation::new(TlsOffer::Required)).await.is_ok()
        {
            send_error(&mut tcp, &ErrorFields::fatal(sqlstate::TOO_MANY_CONNECTIONS, message)).await;
        }
    });
}

/// Counts and logs a refusal, and runs `answer` (the protocol's way of saying so) within
/// [`REFUSAL_TIME`], unless [`MAX_REFUSING`] refusals are under way already.
fn refuse_over_limit(
    ctx: &Arc<ProxyContext>,
    peer: SocketAddr,
    hit: LimitHit,
    answer: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use std::sync::atomic::Ordering;
    METRICS.handshake_failed(hit.label());
    if ctx.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        ctx.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    info!(client = %peer, reason = hit.label(), "connection refused: over a limit");
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
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
        match ctx.policy.current_async().await {
            Ok((view, _)) => {
                let names: HashSet<String> = view.databases.keys().cloned().collect();
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

async fn handle(
    ctx: Arc<ProxyContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: String,
    mut permit: ConnPermit<IpAddr>,
    wire: Wire,
) {
    let _ = tcp.set_nodelay(true);
    let deadline = ctx.cfg.proxy_service.handshake_timeout;
    let started = Instant::now();
    let mut fields = SessionFields { session_id, client_addr: peer.to_string(), ..Default::default() };
    let setup = match wire {
        Wire::Postgres => tokio::time::timeout(deadline, handshake(&ctx, tcp, &mut fields, &mut permit)).await,
        Wire::Mysql => {
            tokio::time::timeout(deadline, super::mysql::handshake(&ctx, tcp, &mut fields, &mut permit)).await
        }
    };
    run_session(ctx, setup, fields, started).await;
    // Held until here: a session control relays itself still costs control its sockets.
    drop(permit);
}
