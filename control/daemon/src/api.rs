//! The server side of the client API that `sluice` talks to: one JSON request line and one JSON
//! response line per TLS connection (the messages and the client are in `sluice_api::api`). Login
//! with a password yields a session token; with it the client lists databases and obtains
//! short-lived database certificates for a key pair it generated itself (the private key never
//! leaves the user's machine).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn, Instrument};

use crate::ca::{CertAuthority, DbRoute, Identity};
use crate::catalog;
use crate::config::Config;
use crate::limits::{ConnLimiter, LoginThrottle};
use crate::rbac::{can_see, check_access, AccessRequest};
use crate::state::State;

/// Longest request line accepted (a public key PEM is well under this).
const MAX_REQUEST: u64 = 64 * 1024;

pub use sluice_api::api::{call, ApiError, DbCertResponse, DbInfo, LoginResponse, Request, IO_TIMEOUT};

/// What the server needs to answer requests.
pub struct ApiContext {
    pub cfg: Arc<Config>,
    pub state: Arc<State>,
    pub ca: Arc<CertAuthority>,
    limiter: Arc<ConnLimiter<IpAddr>>,
    throttle: LoginThrottle,
    /// Password hashes checked at once: Argon2 takes tens of milliseconds of a core and 19 MiB
    /// each, so a burst of logins must queue rather than take every core from the handshakes.
    hashing: tokio::sync::Semaphore,
}

impl ApiContext {
    pub fn new(cfg: Arc<Config>, state: Arc<State>, ca: Arc<CertAuthority>) -> Self {
        let limiter = ConnLimiter::new(cfg.auth_service.limits);
        ApiContext {
            cfg,
            state,
            ca,
            limiter,
            throttle: LoginThrottle::default(),
            hashing: tokio::sync::Semaphore::new(1),
        }
    }
}

pub async fn serve(ctx: Arc<ApiContext>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Nothing to say to a client over its limit before TLS: it is closed at once.
        let permit = match ctx.limiter.admit(peer.ip()) {
            Ok(p) => p,
            Err(hit) => {
                info!(client = %peer, reason = hit.label(), "api connection refused");
                continue;
            }
        };
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        let span = tracing::info_span!("api", client = %peer);
        tokio::spawn(
            async move {
                if let Err(e) = tokio::time::timeout(IO_TIMEOUT, serve_one(&ctx, acceptor, tcp, peer)).await {
                    info!(error = %e, "api request timed out");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Answers one request off the async threads (SQLite and Argon2 block), throttling password
/// guesses per source and per user.
async fn answer(ctx: &Arc<ApiContext>, req: Request, peer: SocketAddr) -> Result<Value, String> {
    let login_user = match &req {
        Request::Login { user, .. } => Some(user.clone()),
        _ => None,
    };
    let _hashing = match &login_user {
        Some(user) => {
            if let Err(t) = ctx.throttle.begin(peer.ip(), user, std::time::Instant::now()) {
                let whom = if t.by_user { "for this user" } else { "from your address" };
                warn!(user = %user, client = %peer, by_user = t.by_user, "login throttled");
                return Err(format!(
                    "too many failed logins {whom}; try again in {} s",
                    t.retry_after.as_secs().max(1)
                ));
            }
            Some(ctx.hashing.acquire().await.map_err(|_| "shutting down".to_owned())?)
        }
        None => None,
    };
    let task_ctx = ctx.clone();
    let result = tokio::task::spawn_blocking(move || handle(&task_ctx, req, peer))
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
    if let Some(user) = login_user {
        ctx.throttle.finish(peer.ip(), &user, result.is_ok(), std::time::Instant::now());
    }
    result
}

async fn serve_one(ctx: &Arc<ApiContext>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let mut tls = match acceptor.accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "api TLS handshake failed");
            return;
        }
    };
    let mut line = String::new();
    let read = BufReader::new((&mut tls).take(MAX_REQUEST)).read_line(&mut line).await;
    let response = match read {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => match answer(ctx, req, peer).await {
                Ok(v) => serde_json::json!({ "ok": true, "result": v }),
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            },
            Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
        },
        Err(e) => serde_json::json!({ "ok": false, "error": format!("reading request: {e}") }),
    };
    let mut out = response.to_string();
    out.push('\n');
    let _ = tls.write_all(out.as_bytes()).await;
    let _ = tls.shutdown().await;
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn session_user(state: &State, session: &str) -> Result<(crate::state::User, OffsetDateTime), String> {
    let (name, expires) = state
        .web_session(session)
        .map_err(|e| e.to_string())?
        .ok_or("not logged in or the login expired: run `sluice login`")?;
    let user =
        state.user(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("user {name:?} no longer exists"))?;
    Ok((user, expires))
}

fn handle(ctx: &ApiContext, req: Request, peer: SocketAddr) -> Result<Value, String> {
    let state = &ctx.state;
    match req {
        Request::Login { user, password } => {
            if !state.verify_password(&user, &password).map_err(|e| e.to_string())? {
                warn!(user = %user, client = %peer, "login failed");
                return Err("invalid user name or password".into());
            }
            let u = state.user(&user).map_err(|e| e.to_string())?.ok_or("invalid user name or password")?;
            let (session, expires) =
                state.create_web_session(&user, ctx.cfg.auth_service.session_ttl).map_err(|e| e.to_string())?;
            info!(user = %user, "user logged in");
            to_json(&LoginResponse {
                session,
                user,
                roles: u.roles,
                expires: rfc3339(expires),
                cluster: ctx.cfg.auth_service.cluster_name.clone(),
                postgres_public_addr: ctx.cfg.proxy_service.public_addr(),
                ca_pem: ctx.ca.cert_pem.clone(),
            })
        }
        Request::Logout { session } => {
            state.delete_web_session(&session).map_err(|e| e.to_string())?;
            Ok(Value::Null)
        }
        Request::DbList { session } => {
            let (user, _) = session_user(state, &session)?;
            let roles = state.roles_of(&user).map_err(|e| e.to_string())?;
            let dbs: Vec<DbInfo> = catalog::databases(&ctx.cfg, state)
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|d| can_see(&roles, &d.labels))
                .map(|d| DbInfo {
                    name: d.name,
                    description: d.description,
                    protocol: d.spec.protocol,
                    uri: d.spec.uri,
                    labels: d.labels,
                })
                .collect();
            to_json(&dbs)
        }
        Request::DbLogin { session, db, db_user, db_name, public_key_pem } => {
            let (user, expires) = session_user(state, &session)?;
            let roles = state.roles_of(&user).map_err(|e| e.to_string())?;
            let d = catalog::find(&ctx.cfg, state, &db)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("database {db:?} not found"))?;
            if db_user.is_empty() {
                return Err("--db-user is required".into());
            }
            if db_name.is_empty() {
                if !can_see(&roles, &d.labels) {
                    return Err(format!("access to database {db:?} denied"));
                }
            } else {
                let req =
                    AccessRequest { db_service: &d.name, labels: &d.labels, db_name: &db_name, db_user: &db_user };
                check_access(&user.name, &roles, req).map_err(|e| format!("access denied: {e}"))?;
            }
            let identity =
                Identity { v: 1, user: user.name.clone(), route: Some(DbRoute { service: db, db_user, db_name }) };
            let now = OffsetDateTime::now_utc();
            let cert_pem = ctx
                .ca
                .issue_client(&identity, &public_key_pem, now - time::Duration::minutes(1), expires)
                .map_err(|e| e.to_string())?;
            info!(user = %user.name, db = %d.name, "database certificate issued");
            to_json(&DbCertResponse {
                cert_pem,
                ca_pem: ctx.ca.cert_pem.clone(),
                expires: rfc3339(expires),
                postgres_public_addr: ctx.cfg.proxy_service.public_addr(),
            })
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}
