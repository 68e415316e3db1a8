//! Prometheus metrics and health endpoints: what control counts itself (session setup time,
//! handshake failures by reason, discovery and token errors, totals of ended sessions) plus, at
//! each scrape, every live session's counters asked from the data plane (`StatsRequest`), served
//! over HTTP on `metrics.listen_addr` at `/metrics`, beside `/healthz` and `/readyz`.
//!
//! Control's own counters live in `prometheus-client` metrics ([`METRICS`]). The per-session
//! series are rebuilt from the data plane's answer at every scrape by a [`Collector`] in a
//! registry made for that scrape, so nothing has to be cleaned up when a session ends. What the
//! endpoints read from the rest of control comes through [`Probe`], so this module does not
//! depend on the proxy.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sluice_handoff::handoff::{CounterSource, LegCounters, SessionCounters, SessionStats};
use tokio::net::TcpListener;
use tracing::warn;

/// Upper bounds (seconds) of the connection-setup histogram: TLS, startup, RBAC, IAM token and
/// the upstream session together take milliseconds on a LAN, seconds when AWS is slow.
const SETUP_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the histogram of each ended session's smoothed RTT.
const RTT_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

const LEGS: [&str; 2] = ["client", "upstream"];
const DIRECTIONS: [&str; 2] = ["rx", "tx"];

/// Traffic totals: `[client, upstream]` × `[rx, tx]`.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    bytes: [[u64; 2]; 2],
    packets: [[u64; 2]; 2],
    retransmits: [u64; 2],
}

impl Totals {
    fn add(&mut self, c: &SessionCounters) {
        for (i, leg) in [&c.client, &c.upstream].into_iter().enumerate() {
            self.bytes[i][0] += leg.rx_bytes;
            self.bytes[i][1] += leg.tx_bytes;
            self.packets[i][0] += leg.rx_packets;
            self.packets[i][1] += leg.tx_packets;
            self.retransmits[i] += u64::from(leg.total_retrans);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

/// Control's own counters; one per process ([`METRICS`]). The metric handles share their values
/// with their clones, which each scrape registers.
pub struct Metrics {
    sessions_started: Counter,
    sessions_ended: Counter,
    /// Sessions control relays itself (no data plane), live now.
    local_active: AtomicU64,
    setup: Histogram,
    end_srtt: Histogram,
    handshake_failures: Family<ReasonLabel, Counter>,
    discovery_errors: Counter,
    token_errors: Counter,
    /// Per discovery source: 1 while this node holds its lease (and so polls it).
    discovery_lease_held: Family<SourceLabel, Gauge>,
    /// Traffic of ended sessions.
    ended: Mutex<Totals>,
    /// On an agent: the auth server whose watch stream it follows now.
    auth_server: Mutex<Option<String>>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// A live session as a scrape shows it: the data plane's numbers, with the user and database
/// from control's state.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub stats: SessionStats,
    pub user: String,
    pub db: String,
}

/// What the HTTP endpoints read from the rest of control, at request time.
pub trait Probe: Send + Sync + 'static {
    /// The data plane's live sessions, and whether control's link to it is up (`None` when no
    /// data plane is configured).
    fn live_sessions(&self) -> impl Future<Output = (Vec<LiveSession>, Option<bool>)> + Send;

    /// `Err(reason)` while control cannot serve sessions as configured.
    fn readiness(&self) -> Result<(), NotReady>;

    /// Why control serves, but not as it should (an agent admitting sessions from a cached
    /// policy while the auth server is unreachable).
    fn degraded(&self) -> Option<String> {
        None
    }
}

/// Why `/readyz` answers 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("starting")]
    Starting,
    /// A data plane is configured but control has no link to it (control relays sessions itself
    /// meanwhile: it serves, but not as configured).
    #[error("no link to the data plane at {}", .0.display())]
    NoDataplaneLink(std::path::PathBuf),
    /// An agent without a usable policy from the auth server.
    #[error("{0}")]
    NoPolicy(String),
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            sessions_started: Counter::default(),
            sessions_ended: Counter::default(),
            local_active: AtomicU64::new(0),
            setup: Histogram::new(SETUP_BUCKETS),
            end_srtt: Histogram::new(RTT_BUCKETS),
            handshake_failures: Family::default(),
            discovery_errors: Counter::default(),
            token_errors: Counter::default(),
            discovery_lease_held: Family::default(),
            ended: Mutex::new(Totals::default()),
            auth_server: Mutex::new(None),
        }
    }

    /// A session is ready (client authenticated, upstream session open) after `setup`.
    pub fn session_started(&self, setup: Duration) {
        self.sessions_started.inc();
        self.setup.observe(setup.as_secs_f64());
    }

    /// A client was refused or gave up before its session was ready.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Looking the database up in the catalog failed (not: the database is unknown).
    pub fn discovery_error(&self) {
        self.discovery_errors.inc();
    }

    /// Minting an RDS IAM auth token failed.
    pub fn token_error(&self) {
        self.token_errors.inc();
    }

    /// Whether this node holds the discovery lease of `source` (`None`: the source is no
    /// longer configured here, and its series goes).
    pub fn discovery_lease(&self, source: &str, held: Option<bool>) {
        let label = SourceLabel { source: source.to_owned() };
        match held {
            Some(held) => {
                self.discovery_lease_held.get_or_create(&label).set(i64::from(held));
            }
            None => {
                self.discovery_lease_held.remove(&label);
            }
        }
    }

    pub fn local_session(&self, live: bool) {
        if live {
            self.local_active.fetch_add(1, Ordering::Relaxed);
        } else {
            self.local_active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// An agent follows the auth server at `addr` now (`None`: none, its stream was lost).
    pub fn following(&self, addr: Option<&str>) {
        *self.auth_server.lock().unwrap_or_else(|p| p.into_inner()) = addr.map(str::to_owned);
    }

    /// A session ended with these final counters.
    pub fn session_ended(&self, c: &SessionCounters) {
        self.sessions_ended.inc();
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).add(c);
        let srtt = c.client.srtt_us.max(c.upstream.srtt_us);
        if c.source == CounterSource::Bpf && srtt > 0 {
            self.end_srtt.observe(f64::from(srtt) / 1e6);
        }
    }

    /// The exposition text (Prometheus text format 0.0.4); `live` are the data plane's live
    /// sessions.
    pub fn render(&self, live: Vec<LiveSession>, dataplane_connected: Option<bool>) -> String {
        let mut registry = Registry::default();
        // Counters are registered without `_total` and help texts without their final period:
        // the registry appends both.
        registry.register(
            "sluice_sessions_started",
            "Sessions set up (authenticated, upstream open)",
            self.sessions_started.clone(),
        );
        registry.register("sluice_sessions_ended", "Sessions ended", self.sessions_ended.clone());
        registry.register("sluice_connection_setup_seconds", "Time from accept to a ready session", self.setup.clone());
        registry.register(
            "sluice_handshake_failures",
            "Clients refused or lost before their session was ready",
            self.handshake_failures.clone(),
        );
        registry.register("sluice_discovery_errors", "Failed database catalog look-ups", self.discovery_errors.clone());
        registry.register("sluice_token_errors", "Failed RDS IAM auth token mints", self.token_errors.clone());
        registry.register(
            "sluice_discovery_lease_held",
            "Whether this node holds a discovery source's lease and polls it (1) or another node does (0)",
            self.discovery_lease_held.clone(),
        );
        registry.register(
            "sluice_session_srtt_seconds",
            "Smoothed RTT of each ended session (its slower leg)",
            self.end_srtt.clone(),
        );
        let ended = *self.ended.lock().unwrap_or_else(|p| p.into_inner());
        registry.register_collector(Box::new(LiveSeries {
            live,
            dataplane_connected,
            local_active: self.local_active.load(Ordering::Relaxed),
            ended,
            auth_server: self.auth_server.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }));
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_text::encode(&mut out, &registry) {
            // Only a failing writer fails, and a String does not.
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// The series computed at scrape time: live sessions, their share of the aggregates, the link.
#[derive(Debug)]
struct LiveSeries {
    live: Vec<LiveSession>,
    dataplane_connected: Option<bool>,
    local_active: u64,
    ended: Totals,
    auth_server: Option<String>,
}

/// Writes one family of series: its descriptor, then a sample per label set.
fn family<'l, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, &'l str)>, M)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels.as_slice())?)?;
    }
    Ok(())
}

/// A leg's values of one per-session family, each with its `direction` label if it has one.
type LegValues<V> = Vec<(Option<&'static str>, V)>;

impl LiveSeries {
    /// A gauge per live session and leg (and direction, where `value` gives one).
    fn per_session<V: EncodeGaugeValue + fmt::Debug>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: fn(&LegCounters) -> LegValues<V>,
    ) -> fmt::Result {
        let samples = self.live.iter().flat_map(|s| {
            s.stats.counters.iter().flat_map(move |c| {
                LEGS.into_iter().zip([&c.client, &c.upstream]).flat_map(move |(leg, counters)| {
                    value(counters).into_iter().map(move |(dir, v)| {
                        let mut labels = vec![
                            ("session_id", s.stats.session_id.as_str()),
                            ("user", s.user.as_str()),
                            ("db", s.db.as_str()),
                            ("leg", leg),
                        ];
                        labels.extend(dir.map(|d| ("direction", d)));
                        (labels, ConstGauge::new(v))
                    })
                })
            })
        });
        family(enc, name, help, MetricType::Gauge, samples)
    }
}

impl Collector for LiveSeries {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let active = self.local_active + self.live.len() as u64;
        family(
            &mut enc,
            "sluice_sessions_active",
            "Sessions being relayed now.",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(active))],
        )?;
        if let Some(up) = self.dataplane_connected {
            family(
                &mut enc,
                "sluice_dataplane_connected",
                "Whether control's link to the data plane is up.",
                MetricType::Gauge,
                [(vec![], ConstGauge::new(u64::from(up)))],
            )?;
        }
        if let Some(source) = self.live.iter().find_map(|s| s.stats.counters.map(|c| c.source)) {
            family(
                &mut enc,
                "sluice_counters_source",
                "Where per-session counters come from (1 on the source in use).",
                MetricType::Gauge,
                [(vec![("source", source_name(source))], ConstGauge::new(1u64))],
            )?;
        }
        if let Some(addr) = &self.auth_server {
            family(
                &mut enc,
                "sluice_agent_auth_server",
                "The auth server whose policy this agent follows now (1 on its address).",
                MetricType::Gauge,
                [(vec![("addr", addr.as_str())], ConstGauge::new(1u64))],
            )?;
        }

        let (reads, writes) = crate::state::statements_run();
        family(
            &mut enc,
            "sluice_state_statements",
            "SQL statements control ran against its state, by kind.",
            MetricType::Counter,
            [(vec![("kind", "read")], ConstCounter::new(reads)), (vec![("kind", "write")], ConstCounter::new(writes))],
        )?;

        // Aggregates: ended sessions plus the live ones so far.
        let mut totals = self.ended;
        for c in self.live.iter().filter_map(|s| s.stats.counters.as_ref()) {
            totals.add(c);
        }
        let by_leg_and_direction = |v: &[[u64; 2]; 2]| {
            let v = *v;
            LEGS.iter().enumerate().flat_map(move |(i, leg)| {
                DIRECTIONS
                    .iter()
                    .enumerate()
                    .map(move |(j, dir)| (vec![("leg", *leg), ("direction", *dir)], ConstCounter::new(v[i][j])))
            })
        };
        family(
            &mut enc,
            "sluice_bytes",
            "TCP payload bytes of all sessions by leg and direction (rx: from the leg's peer).",
            MetricType::Counter,
            by_leg_and_direction(&totals.bytes),
        )?;
        family(
            &mut enc,
            "sluice_packets",
            "TCP segments of all sessions by leg and direction (BPF source only).",
            MetricType::Counter,
            by_leg_and_direction(&totals.packets),
        )?;
        family(
            &mut enc,
            "sluice_retransmits",
            "TCP retransmissions of all sessions by leg (BPF source only).",
            MetricType::Counter,
            LEGS.iter().zip(totals.retransmits).map(|(leg, v)| (vec![("leg", *leg)], ConstCounter::new(v))),
        )?;

        // Per live session and leg; `direction` only where the value has one.
        self.per_session(
            &mut enc,
            "sluice_session_bytes",
            "A live session's TCP payload bytes so far, by leg and direction.",
            |l| vec![(Some("rx"), l.rx_bytes), (Some("tx"), l.tx_bytes)],
        )?;
        self.per_session(
            &mut enc,
            "sluice_session_packets",
            "A live session's TCP segments so far (BPF source only).",
            |l| vec![(Some("rx"), l.rx_packets), (Some("tx"), l.tx_packets)],
        )?;
        self.per_session(
            &mut enc,
            "sluice_session_rtt_seconds",
            "A live session's smoothed RTT per leg (BPF source only).",
            |l| vec![(None, f64::from(l.srtt_us) / 1e6)],
        )?;
        self.per_session(
            &mut enc,
            "sluice_session_retransmits",
            "A live session's TCP retransmissions per leg (BPF source only).",
            |l| vec![(None, u64::from(l.total_retrans))],
        )?;
        Ok(())
    }
}

pub fn source_name(s: CounterSource) -> &'static str {
    match s {
        CounterSource::Bpf => "bpf",
        CounterSource::Userspace => "userspace",
    }
}

/// Final counters as they appear in `db.session.end`.
pub fn counters_json(c: &SessionCounters) -> serde_json::Value {
    let leg = |l: &LegCounters| {
        serde_json::json!({
            "rx_bytes": l.rx_bytes,
            "tx_bytes": l.tx_bytes,
            "rx_packets": l.rx_packets,
            "tx_packets": l.tx_packets,
            "srtt_us": l.srtt_us,
            "retransmits": l.total_retrans,
        })
    };
    serde_json::json!({ "source": source_name(c.source), "client": leg(&c.client), "upstream": leg(&c.upstream) })
}

async fn metrics<P: Probe>(State(probe): State<Arc<P>>) -> impl IntoResponse {
    let (live, connected) = probe.live_sessions().await;
    ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], METRICS.render(live, connected))
}

async fn readyz<P: Probe>(State(probe): State<Arc<P>>) -> (StatusCode, String) {
    match probe.readiness() {
        Ok(()) => match probe.degraded() {
            Some(why) => (StatusCode::OK, format!("ready (degraded: {why})\n")),
            None => (StatusCode::OK, "ready\n".to_owned()),
        },
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (control can serve
/// sessions: 503 with the reason otherwise) until the task is dropped.
pub async fn serve<P: Probe>(probe: Arc<P>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics::<P>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<P>))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n") })
        .with_state(probe);
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "the metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_auth_server_an_agent_follows() {
        let m = Metrics::new();
        assert!(!m.render(Vec::new(), None).contains("sluice_agent_auth_server"));
        m.following(Some("10.0.0.2:3026"));
        let text = m.render(Vec::new(), None);
        assert!(text.contains("sluice_agent_auth_server{addr=\"10.0.0.2:3026\"} 1\n"), "{text}");
        m.following(None);
        assert!(!m.render(Vec::new(), None).contains("sluice_agent_auth_server"), "a lost stream still shown");
    }

    #[test]
    fn renders_which_discovery_leases_this_node_holds() {
        let m = Metrics::new();
        m.discovery_lease("aws/rdsproxy/us-west-2/-", Some(true));
        m.discovery_lease("aws/rdsproxy/eu-west-1/-", Some(false));
        let text = m.render(Vec::new(), None);
        assert!(text.contains("# TYPE sluice_discovery_lease_held gauge\n"), "{text}");
        assert!(text.contains("sluice_discovery_lease_held{source=\"aws/rdsproxy/us-west-2/-\"} 1\n"), "{text}");
        assert!(text.contains("sluice_discovery_lease_held{source=\"aws/rdsproxy/eu-west-1/-\"} 0\n"), "{text}");
        m.discovery_lease("aws/rdsproxy/us-west-2/-", Some(false));
        m.discovery_lease("aws/rdsproxy/eu-west-1/-", None);
        let text = m.render(Vec::new(), None);
        assert!(text.contains("sluice_discovery_lease_held{source=\"aws/rdsproxy/us-west-2/-\"} 0\n"), "{text}");
        assert!(!text.contains("eu-west-1"), "a source no longer configured keeps a series: {text}");
    }

    #[test]
    fn renders_live_and_ended_sessions() {
        let m = Metrics::new();
        m.session_started(Duration::from_millis(30));
        m.handshake_failed("tls");
        m.handshake_failed("tls");
        let leg =
            LegCounters { rx_bytes: 10, tx_bytes: 20, rx_packets: 1, tx_packets: 2, srtt_us: 50, total_retrans: 0 };
        let c = SessionCounters { source: CounterSource::Bpf, client: leg, upstream: leg };
        m.session_ended(&c);
        let stats = SessionStats {
            session_id: "s\"1".into(),
            bytes_client_to_upstream: 5,
            bytes_upstream_to_client: 6,
            duration_ms: 7,
            counters: Some(c),
        };
        let text = m.render(vec![LiveSession { stats, user: "alice".into(), db: "demo".into() }], Some(true));
        assert!(text.contains("sluice_sessions_active 1\n"), "{text}");
        assert!(text.contains("# HELP sluice_sessions_ended_total Sessions ended.\n"), "{text}");
        assert!(text.contains("# TYPE sluice_sessions_started_total counter\nsluice_sessions_started_total 1\n"));
        assert!(text.contains("sluice_handshake_failures_total{reason=\"tls\"} 2\n"), "{text}");
        assert!(text.contains("sluice_connection_setup_seconds_bucket{le=\"0.05\"} 1\n"), "{text}");
        assert!(text.contains("sluice_connection_setup_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("sluice_connection_setup_seconds_bucket{le=\"30\"} 1\n"), "{text}");
        assert!(text.contains("sluice_bytes_total{leg=\"client\",direction=\"rx\"} 20\n"), "ended + live: {text}");
        assert!(text.contains("sluice_retransmits_total{leg=\"upstream\"} 0\n"), "{text}");
        assert!(text.contains("sluice_session_srtt_seconds_count 1\n"), "{text}");
        assert!(text.contains(
            "sluice_session_bytes{session_id=\"s\\\"1\",user=\"alice\",db=\"demo\",leg=\"upstream\",direction=\"tx\"} 20\n"
        ), "{text}");
        assert!(
            text.contains(
                "sluice_session_rtt_seconds{session_id=\"s\\\"1\",user=\"alice\",db=\"demo\",leg=\"client\"} 0.00005\n"
            ),
            "{text}"
        );
        assert!(text.contains("sluice_counters_source{source=\"bpf\"} 1\n"));
        assert!(text.contains("sluice_dataplane_connected 1\n"));
    }

    #[test]
    fn without_a_data_plane_there_are_no_live_series() {
        let m = Metrics::new();
        m.local_session(true);
        let text = m.render(Vec::new(), None);
        assert!(text.contains("sluice_sessions_active 1\n"), "{text}");
        assert!(!text.contains("sluice_dataplane_connected"), "{text}");
        assert!(!text.contains("sluice_counters_source"), "{text}");
        assert!(text.contains("# TYPE sluice_session_bytes gauge\n"), "{text}");
        assert!(!text.contains("sluice_session_bytes{"), "{text}");
    }
}
