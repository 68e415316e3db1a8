//! Connections are decided from control's in-memory policy snapshot: a handshake runs no SQL
//! read against the state (control counts its statements in `/metrics`), and a change committed
//! by another process (here the test's own SQLite connection, as an admin verb's would be) is
//! seen by the very next connection.

use std::time::Duration;

use sluice_tests::{psql_query, scrape, wait_until, Harness};

/// (reads, writes) from control's `sluice_state_statements_total`.
fn statements(url: &str) -> (u64, u64) {
    let text = scrape(url).unwrap();
    let value = |kind: &str| {
        let prefix = format!("sluice_state_statements_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {text}")) as u64
    };
    (value("read"), value("write"))
}

/// Waits until the audit log holds `n` session ends, so no session is still being set up or torn
/// down when the counters are read.
fn wait_for_ends(h: &Harness, n: usize) {
    wait_until(Duration::from_secs(10), "the sessions' ends are audited", || {
        let ends = h.audit()?.iter().filter(|e| e.event == "db.session.end").count();
        Ok((ends >= n).then_some(()))
    })
    .unwrap();
}

#[test]
fn handshakes_read_nothing_from_the_state_and_changes_apply_at_once() {
    let h = Harness::start("policy-snapshot").unwrap();
    let url = h.stack.control.metrics_url().expect("the test stack serves metrics");
    let env = h.login_demo().unwrap();
    // The first session may find the snapshot older than the login and the test's writes.
    assert_eq!(psql_query(&env, "select 1").unwrap().trim(), "1");
    wait_for_ends(&h, 1);

    let (reads, writes) = statements(&url);
    const SESSIONS: usize = 5;
    for _ in 0..SESSIONS {
        assert_eq!(psql_query(&env, "select 1").unwrap().trim(), "1");
    }
    wait_for_ends(&h, 1 + SESSIONS);
    let (reads_after, writes_after) = statements(&url);
    assert_eq!(reads_after - reads, 0, "{SESSIONS} handshakes read the state");
    // The audit trail and the live-session records are still written (two audit rows each).
    assert!(writes_after - writes >= 2 * SESSIONS as u64, "writes went uncounted: {writes} -> {writes_after}");

    // A lock placed through another connection refuses the next handshake; that one re-reads.
    let lock = h.state.add_lock(Some("alice"), None, "snapshot test", None).unwrap();
    let refused = psql_query(&env, "select 1").unwrap_err().to_string();
    assert!(refused.contains("locked"), "{refused}");
    assert!(statements(&url).0 > reads_after, "the change was not read");
    h.state.delete_lock(&lock.id).unwrap();
    assert_eq!(psql_query(&env, "select 1").unwrap().trim(), "1");
}
