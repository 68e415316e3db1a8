//! `control start`: opens the state, loads the CA, binds the PostgreSQL and API listeners and
//! serves until SIGINT/SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::{self, ApiContext};
use crate::audit::AuditLog;
use crate::ca::CaError;
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn bind_one(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { what, addr, source })
}

/// Names control's server certificate is valid for.
fn server_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    for addr in [cfg.proxy_service.postgres_listen_addr, cfg.auth_service.listen_addr] {
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
    }
    if let Ok((host, _)) = split_host_port(&cfg.proxy_service.public_addr(), 5433) {
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
    pub api: TcpListener,
    pub metrics: Option<TcpListener>,
}

pub async fn bind(cfg: &Config) -> Result<Bound, DaemonError> {
    let postgres = bind_one("postgres", cfg.proxy_service.postgres_listen_addr).await?;
    let api = bind_one("api", cfg.auth_service.listen_addr).await?;
    let metrics = match &cfg.metrics {
        Some(m) => Some(bind_one("metrics", m.listen_addr).await?),
        None => None,
    };
    Ok(Bound { postgres, api, metrics })
}

/// Serves until SIGINT/SIGTERM. With `config_path`, discovery follows changes to the file's
/// `discovery_service` section.
pub async fn serve(cfg: Config, bound: Bound, config_path: Option<std::path::PathBuf>) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let state = Arc::new(State::open(&cfg.data_dir).map_err(DaemonError::State)?);
    let ca = Arc::new(state.ensure_ca(&cfg.auth_service.cluster_name).map_err(DaemonError::Ca)?);
    let (chain, key) = ca.issue_server(&server_names(&cfg), Duration::from_secs(365 * 86400))?;
    let pg_tls = tls::postgres_server_config(&ca.cert_der, chain.clone(), key.clone_key())?;
    let api_tls = tls::api_server_config(chain, key)?;
    let audit = Arc::new(AuditLog::new(state.clone(), cfg.audit_json_file()));
    let minter = Arc::new(TokenMinter::new());
    let discovery_task = tokio::spawn(crate::discovery::run(cfg.clone(), state.clone(), minter.clone(), config_path));
    let policy = Arc::new(PolicyStore::open(cfg.clone(), state.clone()).map_err(DaemonError::Policy)?);
    let proxy_ctx = Arc::new(ProxyContext::new(cfg.clone(), state.clone(), policy, audit, minter, pg_tls));
    if let Some(dp) = &cfg.dataplane {
        let client = crate::dataplane::DataplaneClient::start(dp.socket.clone(), proxy_ctx.clone());
        let _ = proxy_ctx.dataplane.set(client);
    }
    let api_ctx = Arc::new(ApiContext::new(cfg.clone(), state, ca));
    info!(
        postgres = %bound.postgres.local_addr()?,
        api = %bound.api.local_addr()?,
        cluster = %cfg.auth_service.cluster_name,
        "control is serving"
    );
    let mut tasks = vec![
        tokio::spawn(proxy::enforce_policy(proxy_ctx.clone())),
        tokio::spawn(api::serve(api_ctx, bound.api, api_tls)),
    ];
    let probe = Arc::new(ProxyProbe { ctx: proxy_ctx.clone(), serving: AtomicBool::new(false) });
    if let Some(l) = bound.metrics {
        info!(metrics = %format!("http://{}/metrics", l.local_addr()?), "serving Prometheus metrics");
        tasks.push(tokio::spawn(crate::metrics::serve(probe.clone(), l)));
    }
    if let Some(local) = cfg.proxy_service.local_socket.clone() {
        tasks.push(tokio::spawn(proxy::serve_local(proxy_ctx.clone(), local)));
    }
    tasks.push(tokio::spawn(proxy::serve(proxy_ctx, bound.postgres)));
    probe.serving.store(true, Ordering::Release);
    shutdown_signal().await;
    info!("shutting down");
    for t in tasks {
        t.abort();
    }
    discovery_task.abort();
    Ok(())
}

/// What the metrics endpoints read from the proxy: its live sessions and whether it can serve.
struct ProxyProbe {
    ctx: Arc<ProxyContext>,
    /// Set once every listener is served.
    serving: AtomicBool,
}

impl Probe for ProxyProbe {
    async fn live_sessions(&self) -> (Vec<LiveSession>, Option<bool>) {
        let Some(dp) = self.ctx.dataplane.get() else { return (Vec::new(), None) };
        if !dp.connected() {
            return (Vec::new(), Some(false));
        }
        let stats = match dp.stats().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "asking the dataplane for live counters");
                return (Vec::new(), Some(true));
            }
        };
        // The data plane knows sessions by id; control knows their user and database.
        let known = self.ctx.handed_sessions();
        let live = stats
            .into_iter()
            .map(|stats| {
                let (user, db) = known.get(&stats.session_id).cloned().unwrap_or_default();
                LiveSession { stats, user, db }
            })
            .collect();
        (live, Some(true))
    }

    fn readiness(&self) -> Result<(), NotReady> {
        if !self.serving.load(Ordering::Acquire) {
            return Err(NotReady::Starting);
        }
        let Some(dp) = &self.ctx.cfg.dataplane else { return Ok(()) };
        match self.ctx.dataplane.get() {
            Some(client) if client.connected() => Ok(()),
            _ => Err(NotReady::NoDataplaneLink(dp.socket.clone())),
        }
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
