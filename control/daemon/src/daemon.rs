//! `control start`: opens the state, loads the CA, binds the PostgreSQL, API and cluster
//! listeners and serves until SIGINT/SIGTERM. An agent (`auth_service.enabled: false`) instead
//! joins its auth server, follows its policy and serves PostgreSQL (see [`crate::cluster`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::{self, ApiContext};
use crate::audit::AuditLog;
use crate::ca::CaError;
use crate::cluster::client::AuthClient;
use crate::cluster::hub::Hub;
use crate::cluster::server::ClusterContext;
use crate::config::{split_host_port, Config};
use crate::iam::TokenMinter;
use crate::metrics::{LiveSession, NotReady, Probe};
use crate::policy::PolicyStore;
use crate::proxy::{self, ProxyContext};
use crate::state::{State, StateError};
use crate::tls::{self, TlsError};

/// Why control could not start serving.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("binding the {what} listener {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the state: {0}")]
    State(#[source] StateError),
    #[error("loading the CA: {0}")]
    Ca(#[source] StateError),
    #[error("issuing control's server certificate: {0}")]
    ServerCertificate(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("reading the policy: {0}")]
    Policy(#[source] StateError),
    #[error("joining the cluster: {0}")]
    Join(#[from] crate::cluster::agent::AgentError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn bind_one(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { what, addr, source })
}

/// Names control's server certificate (an agent's host certificate) is valid for.
pub fn server_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let mut addrs = vec![cfg.proxy_service.postgres_listen_addr];
    addrs.extend(cfg.proxy_service.mysql_listen_addr);
    if cfg.auth_service.enabled {
        addrs.push(cfg.auth_service.listen_addr);
        addrs.extend(cfg.auth_service.cluster_listen_addr);
    }
    for addr in addrs {
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
    }
    if let Ok((host, _)) = split_host_port(&cfg.proxy_service.public_addr(), 5433) {
        names.push(host);
    }
    if let Some(Ok((host, _))) = cfg.proxy_service.mysql_public_addr.as_deref().map(|a| split_host_port(a, 3306)) {
        names.push(host);
    }
    names.extend(cfg.proxy_service.public_names.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// The bound listeners; split from [`serve`] so tests and the demo know the ports before serving.
pub struct Bound {
    pub postgres: TcpListener,
    /// The MySQL listener, when `proxy_service.mysql_listen_addr` is set.
    pub mysql: Option<TcpListener>,
    /// The client API and the cluster API: only where the auth service runs.
    pub api: Option<TcpListener>,
    pub cluster: Option<TcpListener>,
    /// The web console: only where the auth service runs, when configured.
    pub web: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

pub async fn bind(cfg: &Config) -> Result<Bound, DaemonError> {
    let postgres = bind_one("postgres", cfg.proxy_service.postgres_listen_addr).await?;
    let mysql = match cfg.proxy_service.mysql_listen_addr {
        Some(addr) => Some(bind_one("mysql", addr).await?),
        None => None,
    };
    let (api, cluster, web) = if cfg.auth_service.enabled {
        (
            Some(bind_one("api", cfg.auth_service.listen_addr).await?),
            match cfg.auth_service.cluster_listen_addr {
                Some(addr) => Some(bind_one("cluster", addr).await?),
                None => None,
            },
            match cfg.auth_service.web_listen_addr {
                Some(addr) => Some(bind_one("web console", addr).await?),
                None => None,
            },
        )
    } else {
        (None, None, None)
    };
    let metrics = match &cfg.metrics {
        Some(m) => Some(bind_one("metrics", m.listen_addr).await?),
        None => None,
    };
    Ok(Bound { postgres, mysql, api, cluster, web, metrics })
}

/// Serves until SIGINT/SIGTERM. With `config_path`, discovery follows changes to the file's
/// `discovery_service` section.
pub async fn serve(cfg: Config, bound: Bound, config_path: Option<std::path::PathBuf>) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let mut tasks = Vec::new();
    let proxy_ctx = if cfg.is_agent() {
        start_agent(&cfg, &bound, &mut tasks).await?
    } else {
        let postgres = bound.postgres.local_addr()?;
        let listeners = AuthListeners { api: bound.api, cluster: bound.cluster, web: bound.web };
        start_auth(&cfg, postgres, listeners, config_path, &mut tasks)?
    };
    if let Some(dp) = &cfg.dataplane {
        let client = crate::dataplane::DataplaneClient::start(dp.socket.clone(), proxy_ctx.clone());
        let _ = proxy_ctx.dataplane.set(client);
    }
    tasks.push(tokio::spawn(proxy::enforce_policy(proxy_ctx.clone())));
    let probe = Arc::new(ProxyProbe { ctx: proxy_ctx.clone(), serving: AtomicBool::new(false) });
    if let Some(l) = bound.metrics {
        info!(metrics = %format!("http://{}/metrics", l.local_addr()?), "serving Prometheus metrics");
        tasks.push(tokio::spawn(crate::metrics::serve(probe.clone(), l)));
    }
    if let Some(local) = cfg.proxy_service.local_socket.clone() {
        tasks.push(tokio::spawn(proxy::serve_local(proxy_ctx.clone(), local)));
    }
    if let Some(mysql) = bound.mysql {
        info!(mysql = %mysql.local_addr()?, "serving MySQL clients");
        tasks.push(tokio::spawn(proxy::serve_mysql(proxy_ctx.clone(), mysql)));
    }
    tasks.push(tokio::spawn(proxy::serve(proxy_ctx, bound.postgres)));
    probe.serving.store(true, Ordering::Release);
    shutdown_signal().await;
    info!("shutting down");
    for t in tasks {
        t.abort();
    }
    // Events and live-session records still queued are written before the process exits.
    let audit = probe.ctx.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    Ok(())
}

/// The auth server (and, in one process, the proxy and database services): the state, the
/// CA, the client and cluster APIs, discovery, and the policy read from the state.
/// The auth service's listeners, as bound.
struct AuthListeners {
    api: Option<TcpListener>,
    cluster: Option<TcpListener>,
    web: Option<TcpListener>,
}

fn start_auth(
    cfg: &Arc<Config>,
    postgres: std::net::SocketAddr,
    listeners: AuthListeners,
    config_path: Option<std::path::PathBuf>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Arc<ProxyContext>, DaemonError> {
    let state = Arc::new(State::open_configured(cfg, crate::state::OpenMode::Serve).map_err(DaemonError::State)?);
    tasks.push(tokio::spawn(janitor(state.clone())));
    let me = auth_node(cfg, &listeners)?;
    tasks.push(tokio::spawn(announce(state.clone(), me)));
    let ca = Arc::new(state.ensure_ca(&cfg.auth_service.cluster_name).map_err(DaemonError::Ca)?);
    let (chain, key) = ca.issue_server(&server_names(cfg), Duration::from_secs(365 * 86400))?;
    let cert = tls::ReloadableCert::new(chain.clone(), key.clone_key())?;
    let pg_tls = tls::postgres_server_config(&ca.cert_der, cert.clone())?;
    let cluster_tls = tls::cluster_server_config(&ca.cert_der, cert)?;
    let api_tls = tls::api_server_config(chain, key)?;
    let audit = Arc::new(AuditLog::for_state(state.clone(), cfg.audit_json_file()).map_err(DaemonError::State)?);
    if audit.spool().is_some() {
        tasks.push(tokio::spawn(crate::audit::deliver_to_store(audit.clone())));
    }
    let minter = Arc::new(TokenMinter::new());
    tasks.push(tokio::spawn(crate::discovery::run(cfg.clone(), state.clone(), minter.clone(), config_path)));
    let policy = Arc::new(PolicyStore::open(cfg.clone(), state.clone()).map_err(DaemonError::Policy)?);
    let AuthListeners { api: api_listener, cluster: cluster_listener, web: web_listener } = listeners;
    let Some(api_listener) = api_listener else {
        return Err(DaemonError::Io(std::io::Error::other("the auth service's listener was not bound")));
    };
    info!(
        postgres = %postgres,
        api = %api_listener.local_addr()?,
        cluster_api = ?cluster_listener.as_ref().and_then(|l| l.local_addr().ok()),
        web_console = ?web_listener.as_ref().and_then(|l| l.local_addr().ok()),
        cluster = %cfg.auth_service.cluster_name,
        storage = state.backend(),
        "control is serving"
    );
    if let Some(listener) = cluster_listener {
        let hub = Hub::load(cfg, &state).map_err(DaemonError::Policy)?;
        tasks.push(tokio::spawn(hub.clone().run(cfg.clone(), state.clone(), policy.clone())));
        let cluster_ctx = Arc::new(ClusterContext::new(cfg.clone(), state.clone(), ca.clone(), audit.clone(), hub));
        tasks.push(tokio::spawn(crate::cluster::server::serve(cluster_ctx, listener, cluster_tls)));
    }
    // Signs `auth: cert` upstream client certificates; derived, so it needs no storage.
    let db_ca = ca.derive_db_ca()?;
    let api_ctx = Arc::new(ApiContext::new(cfg.clone(), state.clone(), ca));
    tasks.push(tokio::spawn(api::serve(api_ctx, api_listener, api_tls.clone())));
    let proxy = Arc::new(
        ProxyContext::new(cfg.clone(), state.clone(), policy, audit.clone(), minter, pg_tls)
            .with_upstream_ca(Arc::new(db_ca)),
    );
    if let Some(listener) = web_listener {
        let web = Arc::new(crate::web::WebContext::new(cfg.clone(), state, proxy.clone(), audit));
        tasks.push(tokio::spawn(crate::web::serve(web, listener, api_tls)));
    }
    Ok(proxy)
}

/// Removes expired tokens, login sessions and locks every 30 s (±20 %, so that several auth
/// nodes on one store spread out; running at once they only repeat each other's work).
async fn janitor(state: Arc<State>) {
    loop {
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        tokio::time::sleep(Duration::from_secs_f64(30.0 * jitter)).await;
        let state = state.clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match tokio::task::spawn_blocking(move || state.janitor_pass(now)).await {
            Ok(Ok(n)) if n != Default::default() => info!(
                tokens = n.tokens,
                web_sessions = n.web_sessions,
                locks = n.locks,
                auth_nodes = n.auth_nodes,
                leases = n.leases,
                "expired rows removed"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "janitor pass failed"),
            Err(e) => warn!(error = %e, "janitor task failed"),
        }
    }
}

/// This auth server as `control status` lists it: a random id kept in the data dir (so a restart
/// is the same node), the host name and its listeners.
fn auth_node(cfg: &Config, listeners: &AuthListeners) -> Result<crate::state::AuthNode, DaemonError> {
    let id_file = cfg.data_dir.join("auth-node-id");
    let id = match std::fs::read_to_string(&id_file) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let id = crate::state::random_secret(8);
            crate::private_fs::write_private(&id_file, id.as_bytes())?;
            id
        }
    };
    let host = crate::cluster::agent::default_node_name();
    let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(crate::state::AuthNode {
        id,
        name: host,
        api_addr: addr(&listeners.api).unwrap_or_default(),
        cluster_addr: addr(&listeners.cluster),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: now,
        last_seen: now,
    })
}

/// Says every 5 s that this auth server is serving (`control status` lists the live ones).
async fn announce(state: Arc<State>, mut me: crate::state::AuthNode) {
    loop {
        me.last_seen = time::OffsetDateTime::now_utc().unix_timestamp();
        let (state, node) = (state.clone(), me.clone());
        match tokio::task::spawn_blocking(move || state.record_auth_node(&node)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "recording this auth server in the state"),
            Err(e) => warn!(error = %e, "auth node task failed"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// An agent: no cluster state, no CA key, no client API, no discovery. It joins (or loads the
/// identity it joined with), follows the auth server's policy, and serves PostgreSQL with its
/// host certificate, minting IAM tokens with its own AWS identity. Its own `agent.db` keeps
/// only its live sessions and audit events.
async fn start_agent(
    cfg: &Arc<Config>,
    bound: &Bound,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Arc<ProxyContext>, DaemonError> {
    let Some(join) = cfg.join.clone() else {
        return Err(DaemonError::Io(std::io::Error::other("an agent needs a join section")));
    };
    let joined = crate::cluster::agent::ensure_joined(cfg, &join, server_names(cfg)).await?;
    let cert = tls::ReloadableCert::new(joined.chain, joined.key)?;
    let pg_tls = tls::postgres_server_config(&joined.ca, cert.clone())?;
    let state = Arc::new(State::open_agent(&cfg.data_dir).map_err(DaemonError::State)?);
    let audit = Arc::new(AuditLog::spooling(state.clone(), cfg.audit_json_file()).map_err(DaemonError::State)?);
    let policy = Arc::new(PolicyStore::feed(cfg.db_service.max_policy_staleness));
    // One certificate for the listener and the calls to the auth server, renewed in place.
    let client = AuthClient::new(&join.auth_servers, &join.ca_pin, Some(cert.clone()))?;
    tasks.push(tokio::spawn(crate::cluster::audit_upload::upload(client.clone(), audit.clone())));
    tasks.push(tokio::spawn(crate::cluster::renew::run(
        client.clone(),
        cert,
        crate::cluster::agent::identity_dir(cfg),
        server_names(cfg),
    )));
    info!(
        postgres = %bound.postgres.local_addr()?,
        host_id = %joined.identity.host_id,
        node_index = joined.identity.node_index,
        cluster = %joined.identity.cluster,
        auth_servers = %join.auth_servers.join(","),
        "agent is serving"
    );
    let minter = Arc::new(TokenMinter::new());
    let ctx = Arc::new(
        ProxyContext::new(cfg.clone(), state, policy.clone(), audit, minter, pg_tls)
            .with_node_index(joined.identity.node_index),
    );
    // Weak: the watch task must not keep the proxy context alive.
    let kill_ctx = Arc::downgrade(&ctx);
    let kill: crate::cluster::watch::KillSession = Arc::new(move |id: &str| {
        if let Some(ctx) = kill_ctx.upgrade() {
            ctx.kill_session(id);
        }
    });
    tasks.push(tokio::spawn(crate::cluster::watch::follow(client.clone(), cfg.clone(), policy, kill)));
    let (public_addr, report_ctx) = (cfg.proxy_service.public_addr(), ctx.clone());
    let mysql_addr = cfg.proxy_service.mysql_addr();
    let report = move || crate::cluster::HeartbeatReport {
        postgres_addr: public_addr.clone(),
        mysql_addr: mysql_addr.clone(),
        databases: report_ctx.policy.last().0.databases.keys().cloned().collect(),
        sessions: u32::try_from(report_ctx.session_count()).unwrap_or(u32::MAX),
        live: report_ctx.live_sessions(crate::cluster::MAX_REPORTED_SESSIONS),
    };
    tasks.push(tokio::spawn(crate::cluster::heartbeat::run(
        client,
        cfg.db_service.heartbeat_interval,
        ctx.sessions_changed.clone(),
        report,
    )));
    Ok(ctx)
}

/// What the metrics endpoints read from the proxy: its live sessions and whether it can serve.
struct ProxyProbe {
    ctx: Arc<ProxyContext>,
    /// Set once every listener is served.
    serving: AtomicBool,
}

impl Probe for ProxyProbe {
    async fn live_sessions(&self) -> (Vec<LiveSession>, Option<bool>) {
        self.ctx.live_stats().await
    }

    fn readiness(&self) -> Result<(), NotReady> {
        if !self.serving.load(Ordering::Acquire) {
            return Err(NotReady::Starting);
        }
        if let Err(e) = self.ctx.policy.check_feed() {
            return Err(NotReady::NoPolicy(e.to_string()));
        }
        let Some(dp) = &self.ctx.cfg.dataplane else { return Ok(()) };
        match self.ctx.dataplane.get() {
            Some(client) if client.connected() => Ok(()),
            _ => Err(NotReady::NoDataplaneLink(dp.socket.clone())),
        }
    }

    fn degraded(&self) -> Option<String> {
        if let Some(age) = self.ctx.state.feed_age().filter(|a| *a > crate::cluster::watch::SILENCE_LIMIT) {
            return Some(format!(
                "shared storage not heard from for {} s; admitting new sessions from the cached policy until it is {} s old (db_service.max_policy_staleness)",
                age.as_secs(),
                self.ctx.cfg.db_service.max_policy_staleness.as_secs()
            ));
        }
        let age = self.ctx.policy.check_feed().ok().flatten()?;
        let (_, max) = self.ctx.policy.staleness()?;
        (age > crate::cluster::watch::SILENCE_LIMIT).then(|| {
            format!(
                "auth server not heard from for {} s; admitting new sessions from the cached policy until it is {} s old (db_service.max_policy_staleness)",
                age.as_secs(),
                max.as_secs()
            )
        })
    }
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {},
                _ = t.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
