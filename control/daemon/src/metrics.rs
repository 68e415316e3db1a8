//! Prometheus metrics: what control counts itself (session setup time, handshake failures by
//! reason, discovery and token errors, totals of ended sessions) plus, at each scrape, every live
//! session's counters asked from the data plane (`StatsRequest`), served as the text exposition
//! format on `metrics.listen_addr` at `/metrics`.
//!
//! The format is written by hand (a few dozen lines) rather than with `prometheus-client`: the
//! per-session series are rebuilt from the data plane's answer at every scrape, so there is no
//! registry state to keep or to clean when sessions end, and no dependency is added. The HTTP side
//! is a minimal responder (one GET per connection), enough for Prometheus and curl.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_handoff::handoff::{CounterSource, LegCounters, SessionCounters, SessionStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::proxy::ProxyContext;

/// Upper bounds (seconds) of the connection-setup histogram: TLS, startup, RBAC, IAM token and
/// the upstream session together take milliseconds on a LAN, seconds when AWS is slow.
const SETUP_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the histogram of each ended session's smoothed RTT.
const RTT_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

struct Histogram<const N: usize> {
    bounds: [f64; N],
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        // Buckets are cumulative in the format; store them that way.
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            if s <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", b.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Traffic totals of ended sessions: `[client, upstream]` × `[rx, tx]`.
#[derive(Default)]
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

/// Control's own counters; one per process ([`METRICS`]).
pub struct Metrics {
    sessions_started: AtomicU64,
    sessions_ended: AtomicU64,
    /// Sessions control relays itself (no data plane), live now.
    local_active: AtomicU64,
    setup: Histogram<12>,
    end_srtt: Histogram<10>,
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    discovery_errors: AtomicU64,
    token_errors: AtomicU64,
    ended: Mutex<Option<Totals>>,
}

pub static METRICS: Metrics = Metrics::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    const fn new() -> Self {
        Metrics {
            sessions_started: AtomicU64::new(0),
            sessions_ended: AtomicU64::new(0),
            local_active: AtomicU64::new(0),
            setup: Histogram::new(SETUP_BUCKETS),
            end_srtt: Histogram::new(RTT_BUCKETS),
            handshake_failures: Mutex::new(BTreeMap::new()),
            discovery_errors: AtomicU64::new(0),
            token_errors: AtomicU64::new(0),
            ended: Mutex::new(None),
        }
    }

    /// A session is ready (client authenticated, upstream session open) after `setup`.
    pub fn session_started(&self, setup: Duration) {
        self.sessions_started.fetch_add(1, Ordering::Relaxed);
        self.setup.observe(setup);
    }

    /// A client was refused or gave up before its session was ready.
    pub fn handshake_failed(&self, reason: &'static str) {
        *lock(&self.handshake_failures).entry(reason).or_insert(0) += 1;
    }

    /// Looking the database up in the catalog failed (not: the database is unknown).
    pub fn discovery_error(&self) {
        self.discovery_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Minting an RDS IAM auth token failed.
    pub fn token_error(&self) {
        self.token_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn local_session(&self, live: bool) {
        if live {
            self.local_active.fetch_add(1, Ordering::Relaxed);
        } else {
            self.local_active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A session ended with these final counters.
    pub fn session_ended(&self, c: &SessionCounters) {
        self.sessions_ended.fetch_add(1, Ordering::Relaxed);
        lock(&self.ended).get_or_insert_with(Totals::default).add(c);
        let srtt = c.client.srtt_us.max(c.upstream.srtt_us);
        if c.source == CounterSource::Bpf && srtt > 0 {
            self.end_srtt.observe(Duration::from_micros(u64::from(srtt)));
        }
    }

    /// The exposition text; `live` are the data plane's live sessions with (user, database).
    pub fn render(&self, live: &[(SessionStats, String, String)], dataplane_connected: Option<bool>) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let active = self.local_active.load(Ordering::Relaxed) + live.len() as u64;
        let _ = writeln!(out, "# HELP sluice_sessions_active Sessions being relayed now.\n# TYPE sluice_sessions_active gauge\nsluice_sessions_active {active}");
        counter(
            &mut out,
            "sluice_sessions_started_total",
            "Sessions set up (authenticated, upstream open).",
            self.sessions_started.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "sluice_sessions_ended_total",
            "Sessions ended.",
            self.sessions_ended.load(Ordering::Relaxed),
        );
        self.setup.render(&mut out, "sluice_connection_setup_seconds", "Time from accept to a ready session.");
        let _ = writeln!(out, "# HELP sluice_handshake_failures_total Clients refused or lost before their session was ready.\n# TYPE sluice_handshake_failures_total counter");
        for (reason, n) in lock(&self.handshake_failures).iter() {
            let _ = writeln!(out, "sluice_handshake_failures_total{{reason=\"{reason}\"}} {n}");
        }
        counter(
            &mut out,
            "sluice_discovery_errors_total",
            "Failed database catalog look-ups.",
            self.discovery_errors.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "sluice_token_errors_total",
            "Failed RDS IAM auth token mints.",
            self.token_errors.load(Ordering::Relaxed),
        );
        let (reads, writes) = crate::state::statements_run();
        let _ = writeln!(out, "# HELP sluice_state_statements_total SQL statements control ran against its state.\n# TYPE sluice_state_statements_total counter\nsluice_state_statements_total{{kind=\"read\"}} {reads}\nsluice_state_statements_total{{kind=\"write\"}} {writes}");
        if let Some(up) = dataplane_connected {
            let _ = writeln!(out, "# HELP sluice_dataplane_connected Whether control's link to the data plane is up.\n# TYPE sluice_dataplane_connected gauge\nsluice_dataplane_connected {}", u8::from(up));
        }
        let source = live.iter().find_map(|(s, ..)| s.counters.map(|c| c.source));
        if let Some(source) = source {
            let _ = writeln!(out, "# HELP sluice_counters_source Where per-session counters come from (1 on the source in use).\n# TYPE sluice_counters_source gauge\nsluice_counters_source{{source=\"{}\"}} 1", source_name(source));
        }

        // Aggregates: ended sessions plus the live ones so far.
        let mut totals = Totals::default();
        if let Some(t) = lock(&self.ended).as_ref() {
            totals.bytes = t.bytes;
            totals.packets = t.packets;
            totals.retransmits = t.retransmits;
        }
        for (s, ..) in live {
            if let Some(c) = &s.counters {
                totals.add(c);
            }
        }
        let _ = writeln!(out, "# HELP sluice_bytes_total TCP payload bytes of all sessions by leg and direction (rx: from the leg's peer).\n# TYPE sluice_bytes_total counter");
        for (i, leg) in ["client", "upstream"].iter().enumerate() {
            for (j, dir) in ["rx", "tx"].iter().enumerate() {
                let _ = writeln!(out, "sluice_bytes_total{{leg=\"{leg}\",direction=\"{dir}\"}} {}", totals.bytes[i][j]);
            }
        }
        let _ = writeln!(out, "# HELP sluice_packets_total TCP segments of all sessions by leg and direction (BPF source only).\n# TYPE sluice_packets_total counter");
        for (i, leg) in ["client", "upstream"].iter().enumerate() {
            for (j, dir) in ["rx", "tx"].iter().enumerate() {
                let _ =
                    writeln!(out, "sluice_packets_total{{leg=\"{leg}\",direction=\"{dir}\"}} {}", totals.packets[i][j]);
            }
        }
        let _ = writeln!(out, "# HELP sluice_retransmits_total TCP retransmissions of all sessions by leg (BPF source only).\n# TYPE sluice_retransmits_total counter");
        for (i, leg) in ["client", "upstream"].iter().enumerate() {
            let _ = writeln!(out, "sluice_retransmits_total{{leg=\"{leg}\"}} {}", totals.retransmits[i]);
        }
        self.end_srtt.render(
            &mut out,
            "sluice_session_srtt_seconds",
            "Smoothed RTT of each ended session (its slower leg).",
        );

        // Per live session.
        let mut per = |name: &str, kind: &str, help: &str, value: &dyn Fn(&LegCounters) -> Vec<(&'static str, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (s, user, db) in live {
                let Some(c) = &s.counters else { continue };
                for (leg, counters) in [("client", &c.client), ("upstream", &c.upstream)] {
                    for (dir, v) in value(counters) {
                        let dir = if dir.is_empty() { String::new() } else { format!(",direction=\"{dir}\"") };
                        let _ = writeln!(
                            out,
                            "{name}{{session_id=\"{}\",user=\"{}\",db=\"{}\",leg=\"{leg}\"{dir}}} {v}",
                            escape(&s.session_id),
                            escape(user),
                            escape(db)
                        );
                    }
                }
            }
        };
        per(
            "sluice_session_bytes",
            "gauge",
            "A live session's TCP payload bytes so far, by leg and direction.",
            &|l| vec![("rx", l.rx_bytes as f64), ("tx", l.tx_bytes as f64)],
        );
        per("sluice_session_packets", "gauge", "A live session's TCP segments so far (BPF source only).", &|l| {
            vec![("rx", l.rx_packets as f64), ("tx", l.tx_packets as f64)]
        });
        per("sluice_session_rtt_seconds", "gauge", "A live session's smoothed RTT per leg (BPF source only).", &|l| {
            vec![("", f64::from(l.srtt_us) / 1e6)]
        });
        per(
            "sluice_session_retransmits",
            "gauge",
            "A live session's TCP retransmissions per leg (BPF source only).",
            &|l| vec![("", f64::from(l.total_retrans))],
        );
        out
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

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The live sessions with their user and database (from control's state), or none when no data
/// plane is connected.
async fn live_sessions(ctx: &ProxyContext) -> (Vec<(SessionStats, String, String)>, Option<bool>) {
    let Some(dp) = ctx.dataplane.get() else { return (Vec::new(), None) };
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
    let known = ctx.handed_sessions();
    let live = stats
        .into_iter()
        .map(|s| {
            let (user, db) = known.get(&s.session_id).cloned().unwrap_or_default();
            (s, user, db)
        })
        .collect();
    (live, Some(true))
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                debug!(%peer, "metrics request incomplete");
                return;
            }
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|b| *b == b' ');
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let (status, body) = if method == b"GET" && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
                let (live, connected) = live_sessions(&ctx).await;
                ("200 OK", METRICS.render(&live, connected))
            } else {
                ("404 Not Found", "not found; metrics are at /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let live = SessionStats {
            session_id: "s\"1".into(),
            bytes_client_to_upstream: 5,
            bytes_upstream_to_client: 6,
            duration_ms: 7,
            counters: Some(c),
        };
        let text = m.render(&[(live, "alice".into(), "demo".into())], Some(true));
        assert!(text.contains("sluice_sessions_active 1\n"), "{text}");
        assert!(text.contains("sluice_handshake_failures_total{reason=\"tls\"} 2\n"));
        assert!(text.contains("sluice_connection_setup_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("sluice_connection_setup_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("sluice_bytes_total{leg=\"client\",direction=\"rx\"} 20\n"), "ended + live: {text}");
        assert!(text.contains(
            "sluice_session_bytes{session_id=\"s\\\"1\",user=\"alice\",db=\"demo\",leg=\"upstream\",direction=\"tx\"} 20\n"
        ));
        assert!(text.contains("sluice_counters_source{source=\"bpf\"} 1\n"));
    }
}
