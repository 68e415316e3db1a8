//! The PostgreSQL listener: TLS with a required client certificate, the startup exchange, RBAC,
//! the upstream session, cancel routing, and (until the data plane takes sessions over) the relay.
//!
//! Identity and route come from the client certificate; the StartupMessage must agree with the
//! route. Local clients may instead connect in plaintext over a per-database Unix socket, where
//! the kernel-checked peer uid (mapped to a Sluice user by `proxy_service.local_socket.users`)
//! is the identity; both legs of such a session can then be spliced as is. Every refusal
//! reaches the client as an ErrorResponse with an SQLSTATE and a log line, and every failure is
//! contained to its own connection task.
//!
//! By role: `listener` accepts (TCP, local sockets, refusals over a limit), `startup` drives the
//! client's negotiation and sets the session up, `cancel` routes cancel requests, `handoff`
//! passes sessions to the data plane, `relay` runs the sessions control keeps and ends those
//! the policy no longer allows.

mod cancel;
mod handoff;
mod listener;
mod mysql;
mod relay;
mod startup;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use rustls::ServerConfig;
use tokio::net::{TcpStream, UnixStream};

use crate::audit::AuditLog;
use crate::config::Config;
use crate::dataplane::DataplaneClient;
use crate::iam::TokenMinter;
use crate::leg::Leg;
use crate::limits::ConnLimiter;
use crate::policy::PolicyStore;
use crate::state::State;
use crate::tls::UpstreamTls;
use crate::upstream::{CancelTarget, UpstreamStream};
use handoff::LiveRecord;
use relay::Relayed;

pub use listener::{serve, serve_local, serve_mysql};
pub use relay::enforce_policy;

/// The client leg: mTLS over TCP, or plaintext from a local Unix socket.
type ClientStream = Leg<tokio_rustls::server::TlsStream<TcpStream>, UnixStream>;

/// Shared by every connection task.
pub struct ProxyContext {
    pub cfg: Arc<Config>,
    pub state: Arc<State>,
    /// What connections are decided from (no SQL per connection).
    pub policy: Arc<PolicyStore>,
    /// Sessions the data plane holds, as recorded in `live_sessions` (written through to the
    /// state for a restarted control, read from here).
    handed: Mutex<HashMap<String, LiveRecord>>,
    pub audit: Arc<AuditLog>,
    pub minter: Arc<TokenMinter>,
    pub upstream_tls: Arc<UpstreamTls>,
    pub server_tls: Arc<ServerConfig>,
    /// Our cancel keys (given to clients) → where to send the upstream's cancel.
    cancels: Mutex<HashMap<u32, (Vec<u8>, CancelTarget)>>,
    /// MySQL connection ids of ours (given to clients in our greeting) → the session's upstream
    /// thread and owner, for `KILL QUERY` from a second connection. `None` while being set up.
    mysql_kills: Mutex<HashMap<u32, Option<mysql::KillTarget>>>,
    /// The server version of the last MySQL upstream greeting, shown to the next clients.
    mysql_version: Mutex<Option<String>>,
    /// This process's node index (0 where the auth service runs): the top bits of its cancel
    /// keys, so that another agent can pass a cancel request on to it.
    node_index: u16,
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
    /// Notified when a session starts or ends: an agent heartbeats at once, so that the auth
    /// server's `control sessions ls` and `sessions kill` see the change.
    pub sessions_changed: Arc<tokio::sync::Notify>,
}

impl ProxyContext {
    pub fn new(
        cfg: Arc<Config>,
        state: Arc<State>,
        policy: Arc<PolicyStore>,
        audit: Arc<AuditLog>,
        minter: Arc<TokenMinter>,
        server_tls: Arc<ServerConfig>,
    ) -> Self {
        ProxyContext {
            policy,
            handed: Mutex::new(HashMap::new()),
            limiter: ConnLimiter::new(cfg.proxy_service.limits),
            local_limiter: ConnLimiter::new(cfg.proxy_service.limits),
            cfg,
            state,
            audit,
            minter,
            upstream_tls: Arc::new(UpstreamTls::default()),
            server_tls,
            cancels: Mutex::new(HashMap::new()),
            mysql_kills: Mutex::new(HashMap::new()),
            mysql_version: Mutex::new(None),
            node_index: 0,
            dataplane: OnceLock::new(),
            relayed: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            refusing: std::sync::atomic::AtomicUsize::new(0),
            sessions_changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Upstream TLS that can sign `auth: cert` client certificates with `ca` (the auth server's
    /// database CA).
    pub fn with_upstream_ca(mut self, ca: Arc<crate::ca::CertAuthority>) -> Self {
        self.upstream_tls = Arc::new(UpstreamTls::with_ca(ca));
        self
    }

    /// An agent's context: its cancel keys carry its node index.
    pub fn with_node_index(mut self, node_index: u16) -> Self {
        self.node_index = node_index;
        self
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Vec<u8>, CancelTarget)>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mysql_kills(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Option<mysql::KillTarget>>> {
        self.mysql_kills.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a session's cancel key or MySQL connection id (the two never collide: MySQL ids
    /// have bit 31 set, cancel pids do not).
    fn forget_key(&self, key: u32) {
        self.cancels().remove(&key);
        self.mysql_kills().remove(&key);
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveRecord>> {
        self.handed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user and database of each session the data plane holds.
    pub fn handed_sessions(&self) -> HashMap<String, (String, String)> {
        self.handed().iter().map(|(id, r)| (id.clone(), (r.fields.user.clone(), r.fields.db_service.clone()))).collect()
    }

    /// The data plane's live sessions with their counters and who holds them, and whether
    /// control's link to it is up (`None` when no data plane is configured).
    pub async fn live_stats(&self) -> (Vec<crate::metrics::LiveSession>, Option<bool>) {
        let Some(dp) = self.dataplane.get() else { return (Vec::new(), None) };
        if !dp.connected() {
            return (Vec::new(), Some(false));
        }
        let stats = match dp.stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "asking the dataplane for live counters");
                return (Vec::new(), Some(true));
            }
        };
        // The data plane knows sessions by id; control knows their user and database.
        let known = self.handed_sessions();
        let live = stats
            .into_iter()
            .map(|stats| {
                let (user, db) = known.get(&stats.session_id).cloned().unwrap_or_default();
                crate::metrics::LiveSession { stats, user, db }
            })
            .collect();
        (live, Some(true))
    }

    /// Live sessions, in the data plane or relayed here.
    pub fn session_count(&self) -> usize {
        self.handed().len() + self.relayed().len()
    }

    /// Up to `max` live sessions (in the data plane or relayed here), oldest first, as the
    /// heartbeat reports them.
    pub fn live_sessions(&self, max: usize) -> Vec<crate::cluster::ReportedSession> {
        use crate::cluster::ReportedSession;
        let mut out: Vec<ReportedSession> = self
            .handed()
            .values()
            .map(|r| ReportedSession { fields: r.fields.clone(), started_at: r.started_at })
            .chain(
                self.relayed().values().map(|r| ReportedSession { fields: r.fields.clone(), started_at: r.started_at }),
            )
            .collect();
        out.sort_by(|a, b| (a.started_at, &a.fields.session_id).cmp(&(b.started_at, &b.fields.session_id)));
        out.truncate(max);
        out
    }

    /// A session started or ended.
    fn sessions_changed(&self) {
        self.sessions_changed.notify_one();
    }

    fn relayed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Relayed>> {
        self.relayed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since_activity(&self, activity: &std::sync::atomic::AtomicU64) -> Duration {
        let last = Duration::from_millis(activity.load(std::sync::atomic::Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Why a client's setup failed, as the handshake-failure metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// The handshake deadline passed.
    Timeout,
    /// The client closed or reset the connection.
    ClientGone,
    /// A packet no conforming client sends.
    Protocol,
    /// A plaintext StartupMessage on the TLS listener.
    Plaintext,
    /// The TLS handshake failed.
    Tls,
    /// No client certificate, or one without a usable identity.
    Certificate,
    CertificateExpired,
    /// A local client whose OS user maps to no Sluice user.
    UnmappedOsUser,
    /// The route or the policy refused the session.
    Denied,
    UnknownDatabase,
    /// Control's own state could not be read.
    Internal,
    /// An agent without a current policy from the auth server.
    PolicyUnavailable,
    /// A StartupMessage parameter that is not passed on.
    StartupParameter,
    /// No IAM auth token could be minted.
    Token,
    /// The upstream answered with an ErrorResponse.
    UpstreamRejected,
    /// The upstream asked for an authentication method other than the IAM token.
    UpstreamAuth,
    /// The upstream could not be reached (TCP, TLS, protocol).
    UpstreamUnreachable,
    /// The data plane did not take the session.
    Handoff,
}

impl HandshakeFailure {
    /// The metric label; dashboards and tests know these strings.
    pub(crate) fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClientGone => "client_gone",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Plaintext => "plaintext",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Certificate => "certificate",
            HandshakeFailure::CertificateExpired => "certificate_expired",
            HandshakeFailure::UnmappedOsUser => "unmapped_os_user",
            HandshakeFailure::Denied => "denied",
            HandshakeFailure::UnknownDatabase => "unknown_database",
            HandshakeFailure::Internal => "internal",
            HandshakeFailure::PolicyUnavailable => "policy_unavailable",
            HandshakeFailure::StartupParameter => "startup_parameter",
            HandshakeFailure::Token => "token",
            HandshakeFailure::UpstreamRejected => "upstream_rejected",
            HandshakeFailure::UpstreamAuth => "upstream_auth",
            HandshakeFailure::UpstreamUnreachable => "upstream_unreachable",
            HandshakeFailure::Handoff => "handoff",
        }
    }
}

struct Ready {
    client: ClientStream,
    upstream: UpstreamStream,
    our_pid: u32,
    /// The client certificate's expiry (unix seconds): the session may not outlive it.
    not_after: i64,
}

fn new_session_id() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::HandshakeFailure::*;

    #[test]
    fn handshake_failure_labels_are_distinct_and_stable() {
        let all = [
            Timeout,
            ClientGone,
            Protocol,
            Plaintext,
            Tls,
            Certificate,
            CertificateExpired,
            UnmappedOsUser,
            Denied,
            UnknownDatabase,
            Internal,
            PolicyUnavailable,
            StartupParameter,
            Token,
            UpstreamRejected,
            UpstreamAuth,
            UpstreamUnreachable,
            Handoff,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|f| f.label()).collect();
        assert_eq!(labels.len(), all.len());
        // Dashboards and the integration tests match on these.
        assert_eq!(
            (Tls.label(), ClientGone.label(), CertificateExpired.label()),
            ("tls", "client_gone", "certificate_expired")
        );
    }
}
