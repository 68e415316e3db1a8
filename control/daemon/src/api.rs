//! The server side of the client API that `sluice` talks to: one JSON request line and one JSON
//! response line per TLS connection (the messages and the client are in `sluice_api::api`). Login
//! with a password yields a session token; with it the client lists databases and obtains
//! short-lived database certificates for a key pair it generated itself (the private key never
//! leaves the user's machine).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn, Instrument};

use crate::ca::{CaError, CertAuthority, DbRoute, Identity};
use crate::catalog::{self, Database};
use crate::cluster::heartbeat::{now_ms, status_of, NodeStatus};
use crate::config::Config;
use crate::limits::{ConnLimiter, LoginThrottle};
use crate::rbac::{can_see, check_access, AccessRequest, Denied};
use crate::state::{Node, NodeHeartbeat, State, StateError};

/// Longest request line accepted (a public key PEM is well under this).
const MAX_REQUEST: u64 = 64 * 1024;

pub use sluice_api::api::{call, ApiError, DbCertResponse, DbInfo, LoginResponse, Request, IO_TIMEOUT};

/// Why a request was not answered. The text is the `error` the client is sent, so refusals about
/// credentials never say whether the user exists.
#[derive(Debug, Error)]
enum RequestError {
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),
    #[error("reading request: {0}")]
    Read(#[source] std::io::Error),
    #[error(
        "too many failed logins {}; try again in {} s",
        if *by_user { "for this user" } else { "from your address" },
        retry_after.as_secs().max(1)
    )]
    Throttled { by_user: bool, retry_after: Duration },
    #[error("shutting down")]
    ShuttingDown,
    /// A wrong password, or a user that does not exist: the client cannot tell which.
    #[error("invalid user name or password")]
    BadCredentials,
    #[error("not logged in or the login expired: run `sluice login`")]
    NotLoggedIn,
    /// The login is valid but its user was removed since.
    #[error("user {0:?} no longer exists")]
    UserGone(String),
    #[error("database {0:?} not found")]
    DbNotFound(String),
    #[error("--db-user is required")]
    NoDbUser,
    /// No role of the user lets it see the database.
    #[error("access to database {0:?} denied")]
    DbHidden(String),
    #[error("access denied: {0}")]
    AccessDenied(Denied),
    /// The client's public key or the certificate built over it.
    #[error(transparent)]
    Certificate(#[from] CaError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl RequestError {
    /// Control's own failure rather than the client's request: logged where it is answered.
    fn is_internal(&self) -> bool {
        matches!(self, RequestError::State(_) | RequestError::Encode(_) | RequestError::Task(_))
    }
}

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
async fn answer(ctx: &Arc<ApiContext>, req: Request, peer: SocketAddr) -> Result<Value, RequestError> {
    let login_user = match &req {
        Request::Login { user, .. } => Some(user.clone()),
        _ => None,
    };
    let _hashing = match &login_user {
        Some(user) => {
            if let Err(t) = ctx.throttle.begin(peer.ip(), user, std::time::Instant::now()) {
                warn!(user = %user, client = %peer, by_user = t.by_user, "login throttled");
                return Err(RequestError::Throttled { by_user: t.by_user, retry_after: t.retry_after });
            }
            Some(ctx.hashing.acquire().await.map_err(|_| RequestError::ShuttingDown)?)
        }
        None => None,
    };
    let task_ctx = ctx.clone();
    let result =
        tokio::task::spawn_blocking(move || handle(&task_ctx, req, peer)).await.unwrap_or_else(|e| Err(e.into()));
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
    let answered = match read {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(ctx, req, peer).await,
            Err(e) => Err(RequestError::BadRequest(e)),
        },
        Err(e) => Err(RequestError::Read(e)),
    };
    let response = match answered {
        Ok(v) => serde_json::json!({ "ok": true, "result": v }),
        Err(e) => {
            if e.is_internal() {
                warn!(error = %e, "api request failed");
            }
            serde_json::json!({ "ok": false, "error": e.to_string() })
        }
    };
    let mut out = response.to_string();
    out.push('\n');
    let _ = tls.write_all(out.as_bytes()).await;
    let _ = tls.shutdown().await;
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn session_user(state: &State, session: &str) -> Result<(crate::state::User, OffsetDateTime), RequestError> {
    let (name, expires) = state.web_session(session)?.ok_or(RequestError::NotLoggedIn)?;
    let user = state.user(&name)?.ok_or(RequestError::UserGone(name))?;
    Ok((user, expires))
}

fn handle(ctx: &ApiContext, req: Request, peer: SocketAddr) -> Result<Value, RequestError> {
    let state = &ctx.state;
    match req {
        Request::Login { user, password } => {
            if !state.verify_password(&user, &password)? {
                warn!(user = %user, client = %peer, "login failed");
                return Err(RequestError::BadCredentials);
            }
            let u = state.user(&user)?.ok_or(RequestError::BadCredentials)?;
            let (session, expires) = state.create_web_session(&user, ctx.cfg.auth_service.session_ttl)?;
            info!(user = %user, "user logged in");
            to_json(&LoginResponse {
                session,
                user,
                roles: u.roles,
                expires: rfc3339(expires),
                cluster: ctx.cfg.auth_service.cluster_name.clone(),
                postgres_public_addr: ctx.cfg.proxy_service.public_addr(),
                mysql_public_addr: ctx.cfg.proxy_service.mysql_addr(),
                ca_pem: ctx.ca.cert_pem.clone(),
            })
        }
        Request::Logout { session } => {
            state.delete_web_session(&session)?;
            Ok(Value::Null)
        }
        Request::DbList { session } => {
            let (user, _) = session_user(state, &session)?;
            let roles = state.roles_of(&user)?;
            let dbs: Vec<DbInfo> = cluster_databases(&ctx.cfg, state, now_ms())?
                .into_iter()
                .filter(|(d, _)| can_see(&roles, &d.labels))
                .map(|(d, served)| DbInfo {
                    name: d.name,
                    description: d.description,
                    protocol: d.spec.protocol,
                    uri: d.spec.uri,
                    labels: d.labels,
                    agents: served.agents,
                    endpoints: served.endpoints,
                })
                .collect();
            to_json(&dbs)
        }
        Request::DbLogin { session, db, db_user, db_name, public_key_pem } => {
            let (user, expires) = session_user(state, &session)?;
            let roles = state.roles_of(&user)?;
            let found = cluster_databases(&ctx.cfg, state, now_ms())?.into_iter().find(|(d, _)| d.name == db);
            let Some((d, served)) = found else { return Err(RequestError::DbNotFound(db)) };
            if db_user.is_empty() {
                return Err(RequestError::NoDbUser);
            }
            if db_name.is_empty() {
                if !can_see(&roles, &d.labels) {
                    return Err(RequestError::DbHidden(db));
                }
            } else {
                let req =
                    AccessRequest { db_service: &d.name, labels: &d.labels, db_name: &db_name, db_user: &db_user };
                check_access(&user.name, &roles, req).map_err(RequestError::AccessDenied)?;
            }
            let identity =
                Identity { v: 1, user: user.name.clone(), route: Some(DbRoute { service: db, db_user, db_name }) };
            let now = OffsetDateTime::now_utc();
            // Within the login, and no longer than auth_service.db_cert_ttl where set.
            let expires = match ctx.cfg.auth_service.db_cert_ttl {
                Some(ttl) => expires.min(now + ttl),
                None => expires,
            };
            let cert_pem =
                ctx.ca.issue_client(&identity, &public_key_pem, now - time::Duration::minutes(1), expires)?;
            info!(user = %user.name, db = %d.name, protocol = %d.spec.protocol, "database certificate issued");
            let (postgres_endpoints, mysql_endpoints) =
                if d.spec.is_mysql() { (Vec::new(), served.endpoints) } else { (served.endpoints, Vec::new()) };
            to_json(&DbCertResponse {
                cert_pem,
                ca_pem: ctx.ca.cert_pem.clone(),
                expires: rfc3339(expires),
                postgres_public_addr: ctx.cfg.proxy_service.public_addr(),
                postgres_endpoints,
                protocol: d.spec.protocol,
                mysql_endpoints,
            })
        }
    }
}

/// Where a database is served in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Served {
    /// Healthy agents serving it.
    pub agents: u32,
    /// [`DbInfo::endpoints`].
    pub endpoints: Vec<String>,
}

/// The databases users can connect to, and where: those this process serves itself, and the
/// shared ones (dynamic, discovered) that an agent said it serves in its last heartbeat, healthy
/// or not (so that a database whose agents are all down still shows, with none). Blocking:
/// SQLite.
pub(crate) fn cluster_databases(
    cfg: &Config,
    state: &State,
    now_ms: i64,
) -> Result<Vec<(Database, Served)>, StateError> {
    let own = catalog::databases(cfg, state)?;
    let nodes = state.nodes()?;
    let shared = catalog::shared_databases(cfg, state)?;
    let reported: BTreeSet<&str> = nodes
        .iter()
        .filter_map(|n| n.heartbeat.as_ref())
        .flat_map(|hb| hb.databases.iter().map(String::as_str))
        .collect();
    let own_names: BTreeSet<String> = own.iter().map(|d| d.name.clone()).collect();
    let agents_only = shared
        .iter()
        .filter(|db| {
            let name = db.resource.metadata.name.as_str();
            reported.contains(name) && !own_names.contains(name)
        })
        .map(catalog::shared)
        .collect::<Vec<_>>();
    let listed = own.into_iter().map(|d| (true, d)).chain(agents_only.into_iter().map(|d| (false, d)));
    Ok(listed
        .map(|(served_here, d)| {
            let served = if d.spec.is_mysql() {
                mysql_served_at(cfg, &nodes, &d.name, served_here, now_ms)
            } else {
                served_at(cfg, &nodes, &d.name, served_here, now_ms)
            };
            (d, served)
        })
        .collect())
}

/// Who serves `name` over PostgreSQL: the healthy agents that say so and this process if
/// `served_here`; a configured public address (a load balancer in front of them) replaces the
/// list.
fn served_at(cfg: &Config, nodes: &[Node], name: &str, served_here: bool, now_ms: i64) -> Served {
    let ps = &cfg.proxy_service;
    let here = (served_here && ps.enabled).then(|| ps.public_addr());
    served_by(nodes, name, now_ms, |hb| Some(hb.postgres_addr.as_str()), ps.postgres_public_addr.as_ref(), here)
}

/// [`served_at`] for a MySQL database: the agents' MySQL addresses (those without a MySQL
/// listener, or from before agents reported one, are not counted: a MySQL client cannot reach
/// the database through them), this process's own MySQL listener, or
/// `proxy_service.mysql_public_addr` in place of them all. Never a PostgreSQL address: with
/// none of these the list is empty and the client says there is no MySQL listener.
fn mysql_served_at(cfg: &Config, nodes: &[Node], name: &str, served_here: bool, now_ms: i64) -> Served {
    let ps = &cfg.proxy_service;
    let here = if served_here && ps.enabled { ps.mysql_listen_addr.map(|a| a.to_string()) } else { None };
    served_by(nodes, name, now_ms, |hb| hb.mysql_addr.as_deref(), ps.mysql_public_addr.as_ref(), here)
}

/// The healthy agents serving `name` that have an address for the protocol (`addr`), and where
/// clients connect: `public` if configured, else `here` (this process) and those agents.
fn served_by(
    nodes: &[Node],
    name: &str,
    now_ms: i64,
    addr: impl Fn(&NodeHeartbeat) -> Option<&str>,
    public: Option<&String>,
    here: Option<String>,
) -> Served {
    let agents: Vec<&str> = nodes
        .iter()
        .filter(|n| status_of(n, now_ms) == NodeStatus::Healthy)
        .filter_map(|n| n.heartbeat.as_ref())
        .filter(|hb| hb.databases.iter().any(|d| d == name))
        .filter_map(addr)
        .collect();
    let count = u32::try_from(agents.len()).unwrap_or(u32::MAX);
    let endpoints = match public {
        Some(public) => vec![public.clone()],
        None => {
            let mut all: Vec<String> = here.into_iter().chain(agents.iter().map(|a| a.to_string())).collect();
            let mut seen = BTreeSet::new();
            all.retain(|a| seen.insert(a.clone()));
            all
        }
    };
    Served { agents: count, endpoints }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, RequestError> {
    serde_json::to_value(v).map_err(RequestError::Encode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(index: u16, addr: &str, dbs: &[&str], at_ms: Option<i64>) -> Node {
        Node {
            host_id: format!("h{index}"),
            node_index: index,
            name: format!("agent-{index}"),
            role: "db".into(),
            labels: Default::default(),
            joined_at: 0,
            cert_not_after: 0,
            last_seen: 0,
            heartbeat: at_ms.map(|at_ms| crate::state::NodeHeartbeat {
                postgres_addr: addr.into(),
                mysql_addr: None,
                databases: dbs.iter().map(|d| d.to_string()).collect(),
                sessions: 0,
                version: String::new(),
                interval_ms: 1000,
                at_ms,
            }),
        }
    }

    #[test]
    fn a_database_is_reached_through_its_healthy_agents_unless_a_public_address_is_set() {
        let now = 1_700_000_000_000;
        let nodes = vec![
            node(1, "10.0.0.1:5433", &["orders"], Some(now - 500)),
            node(2, "10.0.0.2:5433", &["orders", "billing"], Some(now)),
            // Offline, and never heartbeated.
            node(3, "10.0.0.3:5433", &["orders"], Some(now - 10_000)),
            node(4, "", &[], None),
        ];
        let mut cfg: Config = crate::config::from_yaml("data_dir: /nonexistent").unwrap();
        cfg.proxy_service.postgres_listen_addr = ([127, 0, 0, 1], 6000).into();
        let served = served_at(&cfg, &nodes, "orders", false, now);
        assert_eq!(served, Served { agents: 2, endpoints: vec!["10.0.0.1:5433".into(), "10.0.0.2:5433".into()] });
        let served = served_at(&cfg, &nodes, "billing", true, now);
        assert_eq!(served, Served { agents: 1, endpoints: vec!["127.0.0.1:6000".into(), "10.0.0.2:5433".into()] });
        assert_eq!(served_at(&cfg, &nodes, "other", false, now), Served::default());
        cfg.proxy_service.postgres_public_addr = Some("lb.example:5433".into());
        let served = served_at(&cfg, &nodes, "orders", false, now);
        assert_eq!(served, Served { agents: 2, endpoints: vec!["lb.example:5433".into()] });
    }

    #[test]
    fn a_mysql_database_is_reached_through_mysql_listeners_only() {
        let now = 1_700_000_000_000;
        let mysql = |mut n: Node, addr: &str| {
            if let Some(hb) = n.heartbeat.as_mut() {
                hb.mysql_addr = Some(addr.into());
            }
            n
        };
        let mut nodes = vec![node(1, "10.0.0.1:5433", &["shop"], Some(now))];
        let mut cfg: Config = crate::config::from_yaml("data_dir: /nonexistent").unwrap();
        // No MySQL listener anywhere: nowhere to connect, never the PostgreSQL address.
        assert_eq!(mysql_served_at(&cfg, &nodes, "shop", true, now), Served::default());
        assert_eq!(cfg.proxy_service.mysql_addr(), None);
        cfg.proxy_service.mysql_listen_addr = Some(([127, 0, 0, 1], 3307).into());
        assert_eq!(cfg.proxy_service.mysql_addr().as_deref(), Some("127.0.0.1:3307"));
        let served = mysql_served_at(&cfg, &nodes, "shop", true, now);
        assert_eq!(served, Served { agents: 0, endpoints: vec!["127.0.0.1:3307".into()] });
        assert_eq!(mysql_served_at(&cfg, &nodes, "shop", false, now), Served::default());

        // Agents that report a MySQL address are reached there, healthy ones only, next to
        // this process's own listener when it serves the database too.
        nodes = vec![
            mysql(node(1, "10.0.0.1:5433", &["shop"], Some(now)), "10.0.0.1:3306"),
            node(2, "10.0.0.2:5433", &["shop"], Some(now)),
            mysql(node(3, "10.0.0.3:5433", &["shop"], Some(now - 10_000)), "10.0.0.3:3306"),
            mysql(node(4, "10.0.0.4:5433", &["orders"], Some(now)), "10.0.0.4:3306"),
        ];
        let served = mysql_served_at(&cfg, &nodes, "shop", false, now);
        assert_eq!(served, Served { agents: 1, endpoints: vec!["10.0.0.1:3306".into()] });
        let served = mysql_served_at(&cfg, &nodes, "shop", true, now);
        assert_eq!(served, Served { agents: 1, endpoints: vec!["127.0.0.1:3307".into(), "10.0.0.1:3306".into()] });
        // PostgreSQL databases keep the PostgreSQL addresses of every agent.
        assert_eq!(served_at(&cfg, &nodes, "shop", false, now).agents, 2);

        cfg.proxy_service.mysql_public_addr = Some("lb.example:3306".into());
        assert_eq!(cfg.proxy_service.mysql_addr().as_deref(), Some("lb.example:3306"));
        let served = mysql_served_at(&cfg, &nodes, "shop", false, now);
        assert_eq!(served, Served { agents: 1, endpoints: vec!["lb.example:3306".into()] });
    }

    /// The texts clients (and the `sluice` CLI) see stay as they were.
    #[test]
    fn client_facing_texts() {
        let throttled = |by_user, ms| RequestError::Throttled { by_user, retry_after: Duration::from_millis(ms) };
        assert_eq!(throttled(true, 300).to_string(), "too many failed logins for this user; try again in 1 s");
        assert_eq!(throttled(false, 42_000).to_string(), "too many failed logins from your address; try again in 42 s");
        assert_eq!(RequestError::BadCredentials.to_string(), "invalid user name or password");
        assert_eq!(RequestError::DbHidden("orders".into()).to_string(), "access to database \"orders\" denied");
        assert_eq!(
            RequestError::AccessDenied(Denied("no role allows db user \"bob\"".into())).to_string(),
            "access denied: no role allows db user \"bob\""
        );
        let corrupt = RequestError::from(StateError::Corrupt("roles".into()));
        assert!(corrupt.is_internal() && !RequestError::NotLoggedIn.is_internal());
        assert_eq!(corrupt.to_string(), StateError::Corrupt("roles".into()).to_string());
    }
}
