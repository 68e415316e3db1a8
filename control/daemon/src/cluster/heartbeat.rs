//! Heartbeats: every `db_service.heartbeat_interval`, and at once when a session starts or
//! ends, an agent tells the auth server where it serves PostgreSQL (and MySQL, if it does), which
//! databases and which live sessions ([`run`]); the auth server keeps the last one per node (`POST /v1/heartbeat`,
//! [`handle`]) as bookkeeping that leaves the policy snapshot alone, and judges a node's health
//! from its age ([`node_status`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::agent::AgentError;
use super::client::AuthClient;
use super::server::{json_response, AgentIdentity, ClusterContext};
use super::{ErrorBody, ErrorDetail, HeartbeatReport, HeartbeatRequest, HeartbeatResponse, MAX_REPORTED_SESSIONS};
use crate::state::{Node, NodeHeartbeat};

/// Longest interval an agent may announce (and so the longest a dead one can look healthy).
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Most database names one heartbeat may list, and the longest name or address in it.
const MAX_DATABASES: usize = 10_000;
const MAX_FIELD: usize = 512;

/// Slack for scheduling and the network on top of 1.5 intervals before a node counts as offline.
const SLACK_MS: u64 = 1000;

/// How long one heartbeat call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an agent leaves its MySQL address out after an auth server from before MySQL
/// addresses refused it, before trying again (the auth server may have been upgraded).
const MYSQL_ADDR_RETRY: Duration = Duration::from_secs(600);

/// Shortest gap between two heartbeats sent because sessions started or ended: a burst of
/// connections costs the auth server a few writes a second, not one per session.
pub const MIN_GAP: Duration = Duration::from_millis(200);

/// A node's health as `control nodes ls` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Joined, and not heartbeated yet.
    Joined,
    /// Its last heartbeat is at most 1.5 of its intervals old (plus a second of slack).
    Healthy,
    /// Its heartbeats stopped.
    Offline,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Joined => "joined",
            NodeStatus::Healthy => "healthy",
            NodeStatus::Offline => "offline",
        }
    }
}

/// The health rule: a node is healthy while its last heartbeat (at `at_ms`, announcing
/// `interval_ms`) is no older than 1.5 intervals plus [`SLACK_MS`] at `now_ms`: one missed
/// heartbeat is forgiven only as far as half an interval. All times are unix milliseconds.
pub fn node_status(last: Option<(i64, u64)>, now_ms: i64) -> NodeStatus {
    let Some((at_ms, interval_ms)) = last else { return NodeStatus::Joined };
    let allowed = interval_ms.saturating_mul(3) / 2 + SLACK_MS;
    let age = now_ms.saturating_sub(at_ms);
    // A heartbeat from the future (clock steps) counts as fresh.
    if age <= 0 || u64::try_from(age).unwrap_or(u64::MAX) <= allowed {
        NodeStatus::Healthy
    } else {
        NodeStatus::Offline
    }
}

/// [`node_status`] of a stored node.
pub fn status_of(node: &Node, now_ms: i64) -> NodeStatus {
    node_status(node.heartbeat.as_ref().map(|h| (h.at_ms, h.interval_ms)), now_ms)
}

pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

// ---- the auth server ----

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    json_response(status, &ErrorBody { error: ErrorDetail { code: code.to_owned(), message } })
}

/// Checks a heartbeat's fields; the reason it is refused, if it is.
fn check(req: &HeartbeatRequest) -> Result<(), String> {
    let max_ms = u64::try_from(MAX_INTERVAL.as_millis()).unwrap_or(u64::MAX);
    if req.interval_ms == 0 || req.interval_ms > max_ms {
        return Err(format!("interval_ms must be between 1 and {}", MAX_INTERVAL.as_millis()));
    }
    if req.databases.len() > MAX_DATABASES {
        return Err(format!("more than {MAX_DATABASES} databases"));
    }
    if req.live.len() > MAX_REPORTED_SESSIONS {
        return Err(format!("more than {MAX_REPORTED_SESSIONS} sessions listed"));
    }
    let session_fields = req.live.iter().flat_map(|s| {
        let f = &s.fields;
        [&f.session_id, &f.user, &f.db_service, &f.db_user, &f.db_name, &f.client_addr]
    });
    let mut fields = std::iter::once(&req.postgres_addr)
        .chain(req.mysql_addr.as_ref())
        .chain([&req.version])
        .chain(&req.databases)
        .chain(session_fields);
    if let Some(field) = fields.find(|f| f.len() > MAX_FIELD) {
        let head: String = field.chars().take(32).collect();
        return Err(format!("a field is longer than {MAX_FIELD} bytes: {head:?}..."));
    }
    Ok(())
}

/// `POST /v1/heartbeat`.
pub async fn handle(
    Extract(ctx): Extract<Arc<ClusterContext>>,
    AgentIdentity(host): AgentIdentity,
    body: Bytes,
) -> Response {
    let req: HeartbeatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("bad heartbeat: {e}")),
    };
    if let Err(why) = check(&req) {
        return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("bad heartbeat: {why}"));
    }
    let live: Vec<_> = req.live.into_iter().map(|s| (s.started_at, s.fields)).collect();
    // In a stable order, so that the same list is stored the same (a changed list is a change
    // the agents are told of).
    let mut databases = req.databases;
    databases.sort();
    databases.dedup();
    let hb = NodeHeartbeat {
        postgres_addr: req.postgres_addr,
        mysql_addr: req.mysql_addr,
        databases,
        sessions: req.sessions,
        version: req.version,
        interval_ms: req.interval_ms,
        at_ms: now_ms(),
    };
    let state = ctx.state.clone();
    let id = host.host_id.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let known = state.record_heartbeat(&id, &hb)?;
        if known {
            state.replace_node_sessions(&id, &live)?;
        }
        Ok::<_, crate::state::StateError>(known)
    });
    match stored.await {
        Ok(Ok(true)) => {
            debug!(host_id = %host.host_id, "heartbeat");
            json_response(StatusCode::OK, &HeartbeatResponse {})
        }
        // Removed after the identity was checked.
        Ok(Ok(false)) => refuse(
            StatusCode::FORBIDDEN,
            "node_removed",
            format!("node {} was removed from the cluster; join again with a new token", host.host_id),
        ),
        Ok(Err(e)) => {
            warn!(host_id = %host.host_id, error = %e, "storing a heartbeat");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

// ---- the agent ----

/// Sends a heartbeat every `interval`, the first at once, for as long as the agent runs, and
/// one out of turn (at most every [`MIN_GAP`]) whenever `changed` is notified (a session
/// started or ended); what it reports comes from `report` at each beat. A failure is logged
/// (once per distinct reason, and again every minute while it lasts) and the beats go on.
pub async fn run<F>(client: AuthClient, interval: Duration, changed: Arc<tokio::sync::Notify>, report: F)
where
    F: Fn() -> HeartbeatReport + Send + Sync + 'static,
{
    let interval = interval.max(Duration::from_millis(1));
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<(String, tokio::time::Instant)> = None;
    let mut last_sent: Option<tokio::time::Instant> = None;
    // Since when the auth server refuses `mysql_addr` (it predates it).
    let mut no_mysql_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = changed.notified() => {
                // Changes within the gap ride on one beat: the report is taken after the wait.
                if let Some(last) = last_sent {
                    tokio::time::sleep_until(last + MIN_GAP).await;
                }
                ticks.reset();
            }
        }
        last_sent = Some(tokio::time::Instant::now());
        let HeartbeatReport { postgres_addr, mysql_addr, databases, sessions, live } = report();
        let skip_mysql = no_mysql_since.is_some_and(|at| at.elapsed() < MYSQL_ADDR_RETRY);
        let req = HeartbeatRequest {
            postgres_addr,
            mysql_addr: mysql_addr.filter(|_| !skip_mysql),
            databases,
            sessions,
            live,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interval_ms,
        };
        let timeout = CALL_TIMEOUT.min(interval.max(Duration::from_secs(2)));
        let mut sent = client.post_json::<_, HeartbeatResponse>("/v1/heartbeat", &req, timeout).await;
        if req.mysql_addr.is_some() {
            if sent.as_ref().err().is_some_and(refuses_mysql_addr) {
                if no_mysql_since.is_none() {
                    warn!(
                        auth_server = %client.addr(),
                        "the auth server does not take MySQL addresses in heartbeats (upgrade it): this agent's \
                         MySQL address is left out, so MySQL clients reach it only through a mysql_public_addr"
                    );
                }
                no_mysql_since = Some(tokio::time::Instant::now());
                let req = HeartbeatRequest { mysql_addr: None, ..req };
                sent = client.post_json::<_, HeartbeatResponse>("/v1/heartbeat", &req, timeout).await;
            } else if sent.is_ok() && no_mysql_since.take().is_some() {
                info!(auth_server = %client.addr(), "the auth server takes this agent's MySQL address again");
            }
        }
        match sent {
            Ok(_) => {
                if failing.take().is_some() {
                    info!(auth_server = %client.addr(), "heartbeats are accepted again");
                }
            }
            Err(e) => {
                let reason = e.to_string();
                let repeat = failing
                    .as_ref()
                    .is_some_and(|(last, at)| *last == reason && at.elapsed() < Duration::from_secs(60));
                if !repeat {
                    warn!(
                        auth_server = %client.addr(),
                        error = %reason,
                        code = super::renew::refusal_code(&e).unwrap_or("-"),
                        "heartbeat failed"
                    );
                    failing = Some((reason, tokio::time::Instant::now()));
                }
            }
        }
    }
}

/// Whether `e` is an auth server from before MySQL addresses refusing the field.
fn refuses_mysql_addr(e: &AgentError) -> bool {
    matches!(e, AgentError::Refused { code, message, .. }
        if code == "bad_request" && message.contains("unknown field `mysql_addr`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_announced_interval() {
        let now = 1_700_000_000_000;
        assert_eq!(node_status(None, now), NodeStatus::Joined);
        // 1 s interval: healthy up to 2.5 s, offline after.
        assert_eq!(node_status(Some((now - 2500, 1000)), now), NodeStatus::Healthy);
        assert_eq!(node_status(Some((now - 2501, 1000)), now), NodeStatus::Offline);
        // 10 s interval: 16 s.
        assert_eq!(node_status(Some((now - 16_000, 10_000)), now), NodeStatus::Healthy);
        assert_eq!(node_status(Some((now - 16_001, 10_000)), now), NodeStatus::Offline);
        assert_eq!(node_status(Some((now + 5000, 1000)), now), NodeStatus::Healthy, "clock step");
        assert_eq!(node_status(Some((0, u64::MAX)), now), NodeStatus::Healthy, "no overflow");
        assert_eq!(NodeStatus::Offline.as_str(), "offline");
    }

    #[test]
    fn heartbeats_are_checked() {
        let ok = HeartbeatRequest {
            postgres_addr: "10.0.0.1:5433".into(),
            mysql_addr: Some("10.0.0.1:3306".into()),
            databases: vec!["orders".into()],
            sessions: 0,
            live: Vec::new(),
            version: "0.1.0".into(),
            interval_ms: 10_000,
        };
        assert_eq!(check(&ok), Ok(()));
        let session = |id: &str| super::super::ReportedSession {
            fields: crate::audit::SessionFields { session_id: id.into(), ..Default::default() },
            started_at: 0,
        };
        assert_eq!(check(&HeartbeatRequest { live: vec![session("s1")], ..ok.clone() }), Ok(()));
        assert!(check(&HeartbeatRequest { live: vec![session(&"s".repeat(513))], ..ok.clone() }).is_err());
        let too_many = vec![session("s"); MAX_REPORTED_SESSIONS + 1];
        assert!(check(&HeartbeatRequest { live: too_many, ..ok.clone() }).is_err());
        assert!(check(&HeartbeatRequest { interval_ms: 0, ..ok.clone() }).is_err());
        assert!(check(&HeartbeatRequest { interval_ms: 3_600_001, ..ok.clone() }).is_err());
        assert!(check(&HeartbeatRequest { databases: vec!["x".repeat(513)], ..ok.clone() }).is_err());
        assert!(check(&HeartbeatRequest { mysql_addr: Some("é".repeat(300)), ..ok.clone() }).is_err());
        assert!(check(&HeartbeatRequest { postgres_addr: "é".repeat(300), ..ok }).is_err());
    }

    /// The heartbeat before agents reported a MySQL address, field for field, refusing unknown
    /// fields as auth servers from then do.
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct OldHeartbeat {
        postgres_addr: String,
        #[serde(default)]
        databases: Vec<String>,
        #[serde(default)]
        sessions: u32,
        #[serde(default)]
        live: Vec<super::super::ReportedSession>,
        #[serde(default)]
        version: String,
        interval_ms: u64,
    }

    /// Old agents and old auth servers keep working with new ones: an agent without a MySQL
    /// address sends no `mysql_addr` (an old auth server would refuse the field), and a
    /// heartbeat without one reads as none.
    #[test]
    fn the_mysql_address_is_optional_both_ways() {
        let without = HeartbeatRequest {
            postgres_addr: "10.0.0.1:5433".into(),
            mysql_addr: None,
            databases: vec!["orders".into()],
            sessions: 2,
            live: Vec::new(),
            version: "0.1.0".into(),
            interval_ms: 10_000,
        };
        let json = serde_json::to_value(&without).unwrap();
        assert!(json.get("mysql_addr").is_none(), "{json}");
        let old: OldHeartbeat = serde_json::from_value(json).unwrap();
        assert_eq!((old.postgres_addr.as_str(), old.sessions), ("10.0.0.1:5433", 2));

        // From an old agent: no field, no address.
        let from_old = serde_json::json!({"postgres_addr": "10.0.0.1:5433", "databases": ["orders"], "sessions": 2,
            "version": "0.1.0", "interval_ms": 10_000});
        assert_eq!(serde_json::from_value::<HeartbeatRequest>(from_old).unwrap(), without);

        // With one: sent and read back; an old auth server refuses it, and the agent then
        // sends its beats without it.
        let with = HeartbeatRequest { mysql_addr: Some("10.0.0.1:3306".into()), ..without };
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["mysql_addr"], "10.0.0.1:3306");
        assert_eq!(serde_json::from_value::<HeartbeatRequest>(json.clone()).unwrap(), with);
        let old_error = serde_json::from_value::<OldHeartbeat>(json).unwrap_err();
        // What such an auth server answers, which makes the agent send its beats without it.
        let refused = |code: &str, message: String| AgentError::Refused {
            call: "/v1/heartbeat".into(),
            status: 400,
            code: code.into(),
            message,
        };
        assert!(refuses_mysql_addr(&refused("bad_request", format!("bad heartbeat: {old_error}"))));
        // A current auth server's other refusals (whose list of fields names it) are not that.
        let other = serde_json::from_value::<HeartbeatRequest>(serde_json::json!({"postgres_addr": "x",
            "interval_ms": 1, "extra": 1}))
        .unwrap_err();
        assert!(other.to_string().contains("mysql_addr"), "{other}");
        assert!(!refuses_mysql_addr(&refused("bad_request", format!("bad heartbeat: {other}"))));
        assert!(!refuses_mysql_addr(&refused("node_removed", format!("bad heartbeat: {old_error}"))));
    }

    /// Heartbeats and renewals, written through the daemon's own handle, leave its policy
    /// snapshot current while only their time and session count change: a cluster of agents
    /// heartbeating must not make every handshake re-read the state. A new address or list of
    /// databases is a change that the snapshot (and so the agents' watch) sees.
    #[test]
    fn only_heartbeats_that_change_what_a_node_serves_make_the_policy_stale() {
        use crate::cluster::ClusterView;
        use crate::policy::PolicyStore;
        use crate::state::State;
        let dir = std::env::temp_dir().join(format!("sluice-hb-{}", crate::state::random_secret(6)));
        let cfg: crate::config::Config = crate::config::from_yaml(&format!("data_dir: {}", dir.display())).unwrap();
        let daemon = Arc::new(State::open(&dir).unwrap());
        let node = daemon.add_node("a", "db", &Default::default(), OffsetDateTime::now_utc()).unwrap();
        let store = PolicyStore::open(Arc::new(cfg.clone()), daemon.clone()).unwrap();
        assert!(ClusterView::load(&cfg, &daemon).unwrap().nodes.is_empty(), "a node that never heartbeated");
        let mut hb = NodeHeartbeat {
            postgres_addr: "127.0.0.1:5433".into(),
            mysql_addr: None,
            databases: vec!["orders".into()],
            sessions: 0,
            version: String::new(),
            interval_ms: 1000,
            at_ms: now_ms(),
        };
        // The first heartbeat says where the node serves: a change.
        let (_, before) = store.current().unwrap();
        assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        assert!(store.fresh().is_none(), "the first heartbeat went unseen");
        let (view, generation) = store.current().unwrap();
        assert!(generation > before);
        assert_eq!(view.nodes.get(&node.node_index).map(String::as_str), Some("127.0.0.1:5433"));
        let shared = ClusterView::load(&cfg, &daemon).unwrap();
        assert_eq!(shared.nodes[&node.host_id].databases, ["orders"]);

        for i in 0..5 {
            hb.sessions = i;
            hb.at_ms += 1000;
            assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        }
        assert!(daemon.record_renewal(&node.host_id, OffsetDateTime::now_utc()).unwrap());
        assert_eq!(store.fresh().map(|(_, g)| g), Some(generation), "a heartbeat made the snapshot stale");

        hb.databases.push("billing".into());
        assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        assert!(store.fresh().is_none(), "a new list of databases went unseen");
        store.current().unwrap();
        hb.postgres_addr = "127.0.0.1:6433".into();
        assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        assert!(store.fresh().is_none(), "a new address went unseen");
        let (view, _) = store.current().unwrap();
        assert_eq!(view.nodes.get(&node.node_index).map(String::as_str), Some("127.0.0.1:6433"));
        hb.mysql_addr = Some("127.0.0.1:3306".into());
        assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        assert!(store.fresh().is_none(), "a new MySQL address went unseen");
        store.current().unwrap();
        hb.sessions += 1;
        assert!(daemon.record_heartbeat(&node.host_id, &hb).unwrap());
        assert!(store.fresh().is_some(), "the same MySQL address made the snapshot stale");
        assert!(!daemon.record_heartbeat("gone", &hb).unwrap(), "an unknown node was updated");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
