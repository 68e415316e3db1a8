//! Per-session counters end to end: a real client (tokio-postgres over rustls) talks to PostgreSQL
//! through control, the RDS Proxy emulator and the dataplane, counting the TLS bytes its own socket
//! sends and receives. After the session is handed to the dataplane those counts must appear
//! exactly as the client leg's bytes in `/metrics` (live) and in `db.session.end` (final), with the
//! BPF counters (as root, as CI runs) and with the userspace fallback forced; BPF map entries must
//! be gone once the session ends. `control sessions ls` must show the live bytes too. Midway the
//! data plane is replaced (`dataplane --take-over`): the session goes on, and the counts, live and
//! final, still cover every byte since the handoff. The same listener answers `/healthz` and
//! `/readyz`, which follows the data-plane link.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_tests::{
    http_get, pg_config, raw_connect, read_to_close, runtime, scrape, startup_packet, wait_until, Harness,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The client's TCP socket, counting what it sends and receives (TLS records, i.e. TCP payload).
struct Counted {
    inner: tokio::net::TcpStream,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.received.fetch_add((buf.filled().len() - before) as u64, Ordering::SeqCst);
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.sent.fetch_add(*n as u64, Ordering::SeqCst);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The value of the first series of `name` whose labels include all of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn run(mode: &str) {
    if mode == "bpf" {
        // Probe first: where BPF cannot run at all, say why and leave the fallback test to run.
        match sluice_ebpf::Counters::load(&sluice_ebpf::Options { cgroup: None, pin_dir: None }) {
            Ok(probe) => drop(probe),
            Err(e) if e.is_unavailable() && std::env::var_os("CI").is_none_or(|v| v != "true") => {
                eprintln!("skipping: BPF is unavailable here ({e}); the userspace fallback test still runs");
                return;
            }
            Err(e) => panic!("BPF counters failed to load: {e}"),
        }
    }
    let instance = format!("it-{mode}-{}", std::process::id());
    let mut h =
        Harness::start_with_dataplane_args(&format!("metrics-{mode}"), &["--counters", mode, "--instance", &instance])
            .unwrap();
    let url = h.stack.control.metrics_url().expect("the test stack serves metrics");
    // A refused handshake is counted by reason: a plaintext StartupMessage.
    let mut raw = raw_connect(h.pg_port(), Duration::from_secs(10)).unwrap();
    raw.write_all(&startup_packet(&[("user", "alice"), ("database", "demo")])).unwrap();
    read_to_close(&mut raw, Duration::from_secs(10)).unwrap();
    let text = wait_until(Duration::from_secs(10), "the refusal is counted", || {
        let text = scrape(&url).unwrap();
        Ok(text.contains("sluice_handshake_failures_total{reason=\"plaintext\"} 1\n").then_some(text))
    })
    .unwrap();
    assert_eq!(series(&text, "sluice_sessions_started_total", &[]), Some(0.0), "{text}");
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let tls = h.tls(Some(&cert)).unwrap();
    let rt = runtime().unwrap();
    let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (client, conn) = rt
        .block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.pg_port())).await?;
            tcp.set_nodelay(true)?;
            let stream = Counted { inner: tcp, sent: sent.clone(), received: received.clone() };
            let mut make = MakeRustlsConnect::new(tls);
            let connect = <MakeRustlsConnect as MakeTlsConnect<Counted>>::make_tls_connect(&mut make, "localhost")?;
            anyhow::Ok(pg_config(h.pg_port(), "alice", "demo").connect_raw(stream, connect).await?)
        })
        .unwrap();
    let connection = rt.spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection ended with: {e}");
        }
    });
    let sid = wait_until(Duration::from_secs(10), "the session is handed to the dataplane", || {
        Ok(h.state.live_sessions()?.first().map(|s| s.0.clone()))
    })
    .unwrap();
    // Counting begins at the handoff; everything before it was control's.
    let (sent0, received0) = (sent.load(Ordering::SeqCst), received.load(Ordering::SeqCst));

    let n = 300_000;
    let row = rt.block_on(client.query_one(&format!("select repeat('x', {n})"), &[])).unwrap();
    assert_eq!(row.get::<_, String>(0).len(), n);
    let rows = rt.block_on(client.query("select g, md5(g::text) from generate_series(1, 3000) g", &[])).unwrap();
    assert_eq!(rows.len(), 3000);

    // Quiescent: every byte either side sent has been read by the other.
    let (c_rx, c_tx) = (sent.load(Ordering::SeqCst) - sent0, received.load(Ordering::SeqCst) - received0);
    let text = scrape(&url).unwrap();
    let sid_label = format!("session_id=\"{sid}\"");
    let live = |leg: &str, dir: &str| {
        let (l, d) = (format!("leg=\"{leg}\""), format!("direction=\"{dir}\""));
        series(&text, "sluice_session_bytes", &[&sid_label, &l, &d]).unwrap_or_else(|| panic!("no {leg}/{dir}: {text}"))
            as u64
    };
    assert_eq!(live("client", "rx"), c_rx, "live client-leg rx = what the client sent after the handoff");
    assert_eq!(live("client", "tx"), c_tx, "live client-leg tx = what the client received after the handoff");
    assert!(live("upstream", "rx") > n as u64, "the result crossed the upstream leg");
    assert_eq!(series(&text, "sluice_counters_source", &[&format!("source=\"{mode}\"")]), Some(1.0), "{text}");
    assert_eq!(series(&text, "sluice_sessions_active", &[]), Some(1.0));
    assert!(series(&text, "sluice_connection_setup_seconds_count", &[]).unwrap_or(0.0) >= 1.0);
    if mode == "bpf" {
        counted_cgroup_is_sluices(&h);
        let rtt = series(&text, "sluice_session_rtt_seconds", &[&sid_label, "leg=\"client\""]).unwrap();
        assert!(rtt > 0.0, "BPF measures the RTT: {text}");
        assert!(
            series(&text, "sluice_session_packets", &[&sid_label, "leg=\"client\"", "direction=\"tx\""]).unwrap() > 0.0
        );
    }

    // `control sessions ls` shows the same live bytes.
    let out = std::process::Command::new(sluice_control::demo::find_bin("control").unwrap())
        .arg("--config")
        .arg(&h.stack.control.config_path)
        .args(["sessions", "ls"])
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&out.stdout);
    let line = ls.lines().find(|l| l.starts_with(&sid)).unwrap_or_else(|| panic!("{ls}"));
    assert!(line.contains(&c_rx.to_string()) && line.contains(&c_tx.to_string()), "{ls}");
    assert!(ls.contains(&format!("counted by {mode}")), "{ls}");

    // A data-plane restart that keeps the session: the new process takes it (and, with BPF, the
    // programs counting it) from the old one, which exits; control reconnects to the new one.
    h.stack.dataplane.as_mut().expect("the stack runs a dataplane").take_over().unwrap();
    let row = rt.block_on(client.query_one(&format!("select repeat('y', {n})"), &[])).unwrap();
    assert_eq!(row.get::<_, String>(0).len(), n);
    let c_rx = sent.load(Ordering::SeqCst) - sent0;
    let text = wait_until(Duration::from_secs(15), "live counts from the new data plane", || {
        let text = scrape(&url).unwrap();
        let got = series(&text, "sluice_session_bytes", &[&sid_label, "leg=\"client\"", "direction=\"rx\""]);
        Ok((got == Some(c_rx as f64)).then_some(text))
    })
    .unwrap();
    assert_eq!(series(&text, "sluice_sessions_active", &[]), Some(1.0), "{text}");

    rt.block_on(async {
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), connection).await
    })
    .unwrap()
    .unwrap();
    let c_rx_final = sent.load(Ordering::SeqCst) - sent0;
    let c_tx_final = received.load(Ordering::SeqCst) - received0;
    let end = wait_until(Duration::from_secs(10), "db.session.end", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end" && e.session_id.as_deref() == Some(&sid)))
    })
    .unwrap();
    let c = &end.data["counters"];
    assert_eq!(c["source"], mode, "{c}");
    // Terminate and close_notify the client sent are counted like everything else; what the
    // dataplane sends after the client closed (its close_notify to a socket the client no longer
    // reads) is on the wire but not in the client's count: at most one TLS 1.3 alert record.
    assert_eq!(c["client"]["rx_bytes"].as_u64(), Some(c_rx_final), "{c}");
    let tx = c["client"]["tx_bytes"].as_u64().unwrap();
    assert!((c_tx_final..=c_tx_final + 24).contains(&tx), "client tx {tx} vs {c_tx_final} received: {c}");
    assert!(c["upstream"]["rx_bytes"].as_u64().unwrap() > n as u64, "{c}");
    if mode == "bpf" {
        assert!(c["client"]["srtt_us"].as_u64().unwrap() > 0, "{c}");
        let pin_dir = std::path::Path::new(sluice_ebpf::PIN_ROOT).join(&instance);
        assert_eq!(sluice_ebpf::pinned_entries(&pin_dir).unwrap(), 0, "map entries are removed at session end");
    }
    let text = scrape(&url).unwrap();
    assert_eq!(series(&text, "sluice_sessions_active", &[]), Some(0.0), "{text}");
    assert!(series(&text, "sluice_bytes_total", &["leg=\"client\"", "direction=\"rx\""]).unwrap() as u64 >= c_rx_final);
    assert!(!text.contains(&sid_label), "ended sessions leave the per-session series");
}

/// The programs cost only Sluice's traffic: started from the root cgroup (as this test is),
/// control and the data plane move to `sluice` below it, the programs attach there, and none of
/// ours is attached at the root, where every packet on the host would run through it.
fn counted_cgroup_is_sluices(h: &Harness) {
    use sluice_handoff::cgroup;
    if cgroup::relative_of(None).unwrap() != "/" {
        eprintln!("this test runs in a cgroup of its own: the data plane keeps it, nothing to check");
        return;
    }
    let group = format!("/{}", cgroup::GROUP);
    assert_eq!(cgroup::relative_of(Some(h.stack.control.proc.pid())).unwrap(), group, "control left the root cgroup");
    let mount = cgroup::mount().unwrap();
    let attached = |dir: &std::path::Path| {
        let out = std::process::Command::new("bpftool").args(["cgroup", "show"]).arg(dir).arg("-j").output().unwrap();
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let here = attached(&mount.join(cgroup::GROUP));
    assert!(here.contains("sluice_ingress") && here.contains("sluice_egress"), "attached to {group}: {here}");
    let root = attached(&mount);
    assert!(!root.contains("sluice_ingress"), "nothing of ours at the root cgroup: {root}");
}

#[test]
fn bpf_counters_match_the_client_bytes_in_metrics_and_audit() {
    run("bpf");
}

#[test]
fn userspace_counters_match_the_client_bytes_in_metrics_and_audit() {
    run("userspace");
}

/// Checks `text` against the Prometheus text format as a scraper reads it: every sample belongs to
/// the family its `# TYPE` line opened (histograms: `_bucket`, `_sum`, `_count`), its labels are
/// `name="value"` pairs, its value a float, and no series appears twice.
fn check_exposition(text: &str) {
    let is_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut family: Option<(String, String)> = None;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(is_name(name), "{line:?}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line:?}");
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "bad value in {line:?}");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels {line:?}"))),
            None => (series, ""),
        };
        let (fam, kind) = family.as_ref().unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
        let ok = match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{fam}{s}")),
            _ => name == fam,
        };
        assert!(ok, "{line:?} outside its family {fam} ({kind})");
        // Labels: name="value" pairs, values with \\, \" and \n escaped.
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
            assert!(is_name(key), "bad label name {key:?} in {line:?}");
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => assert!(matches!(chars.next(), Some((_, '\\' | '"' | 'n'))), "{line:?}"),
                    Some((i, '"')) => break i,
                    Some(_) => {}
                    None => panic!("unterminated label value in {line:?}"),
                }
            };
            rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
        }
        assert!(seen.insert(series.to_owned()), "{series} twice");
    }
    assert!(family.is_some(), "no metrics at all: {text}");
}

/// `/healthz` answers while the process runs; `/readyz` only while the data plane it is configured
/// with is linked; other paths are 404; `/metrics` parses as the text format.
#[test]
fn health_and_readiness_follow_the_data_plane() {
    let mut h = Harness::start_with_dataplane_args("metrics-health", &["--counters", "userspace"]).unwrap();
    let url = h.stack.control.metrics_url().expect("the test stack serves metrics");
    let addr = url.trim_start_matches("http://").trim_end_matches("/metrics").to_owned();
    let health = http_get(&addr, "/healthz").unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = wait_until(Duration::from_secs(10), "control is ready", || {
        let r = http_get(&addr, "/readyz")?;
        Ok((r.status == 200).then_some(r))
    })
    .unwrap();
    assert_eq!(ready.body, "ready\n");
    let missing = http_get(&addr, "/metricz").unwrap();
    assert_eq!(missing.status, 404, "{missing:?}");

    // A session makes the per-session families non-empty for the format check.
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let rt = runtime().unwrap();
    let connected = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    wait_until(Duration::from_secs(10), "the session is handed to the dataplane", || {
        Ok(h.state.live_sessions()?.first().map(|s| s.0.clone()))
    })
    .unwrap();
    let m = http_get(&addr, "/metrics").unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "{m:?}");
    check_exposition(&m.body);
    assert!(m.body.contains("\nsluice_session_bytes{session_id="), "{}", m.body);
    assert_eq!(series(&m.body, "sluice_dataplane_connected", &[]), Some(1.0), "{}", m.body);
    rt.block_on(connected.close()).unwrap();

    // Without its data plane control is alive but not ready, and says why.
    h.stack.dataplane.as_mut().expect("the stack runs a dataplane").proc.stop(nix::sys::signal::Signal::SIGTERM);
    let not_ready = wait_until(Duration::from_secs(10), "readiness follows the link down", || {
        let r = http_get(&addr, "/readyz")?;
        Ok((r.status == 503).then_some(r))
    })
    .unwrap();
    assert!(not_ready.body.starts_with("not ready: no link to the data plane"), "{not_ready:?}");
    assert_eq!(http_get(&addr, "/healthz").unwrap().status, 200);
    let text = scrape(&url).unwrap();
    check_exposition(&text);
    assert_eq!(series(&text, "sluice_dataplane_connected", &[]), Some(0.0), "{text}");
}
