//! The audit trail: a successful session produces `db.session.start` (success) and
//! `db.session.end` (bytes both ways, duration); a refused one produces `db.session.start` with
//! success false and the reason. The SQLite copy and the JSON lines file agree.

use std::time::Duration;

use serde_json::Value;
use sluice_tests::{psql_query, runtime, wait_until, Harness};

#[test]
fn sessions_are_audited_in_state_and_json_lines() {
    let h = Harness::start("audit").unwrap();
    let env = h.login_demo().unwrap();

    // A successful session: psql with the files from `sluice db login`.
    assert_eq!(psql_query(&env, "select count(*) from generate_series(1, 1000)").unwrap(), "1000");
    // A refused one: a certificate (issued directly) for a database user no role allows.
    runtime().unwrap().block_on(async {
        let cert = h.issue_cert("alice", "demo", "bob", "demo").unwrap();
        let err = h.connect_with(Some(&cert), "bob", "demo").await.err().expect("bob must be refused").pg();
        assert!(err.as_db_error().is_some(), "{err:?}");
    });

    // Events are written by control's audit thread, in batches: wait for both sessions' own.
    let events = wait_until(Duration::from_secs(10), "db.session.end and the refusal", || {
        let ev = h.audit()?;
        let refused = ev.iter().any(|e| e.event == "db.session.start" && !e.success);
        Ok((refused && ev.iter().any(|e| e.event == "db.session.end")).then_some(ev))
    })
    .unwrap();

    let ok_start = events
        .iter()
        .find(|e| e.event == "db.session.start" && e.success)
        .unwrap_or_else(|| panic!("no successful db.session.start in {events:#?}"));
    assert_eq!(ok_start.user.as_deref(), Some("alice"));
    assert_eq!(ok_start.db.as_deref(), Some("demo"));
    assert_eq!(ok_start.data["db_user"], "alice");
    assert_eq!(ok_start.data["db_name"], "demo");
    let sid = ok_start.session_id.clone().expect("a session id");

    let end = events
        .iter()
        .find(|e| e.event == "db.session.end" && e.session_id.as_deref() == Some(&sid))
        .unwrap_or_else(|| panic!("no db.session.end for {sid} in {events:#?}"));
    assert!(end.success, "the psql session ended with an error: {:?}", end.data);
    let from_client = end.data["bytes_from_client"].as_u64().unwrap_or(0);
    let to_client = end.data["bytes_to_client"].as_u64().unwrap_or(0);
    assert!(from_client > 0, "bytes_from_client {:?}", end.data);
    assert!(to_client > 0, "bytes_to_client {:?}", end.data);
    assert!(end.data["duration_ms"].is_u64(), "duration_ms {:?}", end.data);
    assert_eq!(end.data["user"], "alice");

    let refused = events
        .iter()
        .find(|e| e.event == "db.session.start" && !e.success)
        .unwrap_or_else(|| panic!("no failed db.session.start in {events:#?}"));
    assert_eq!(refused.user.as_deref(), Some("alice"));
    assert_eq!(refused.data["db_user"], "bob");
    let reason = refused.data["error"].as_str().unwrap_or_default();
    assert!(reason.contains("access denied") && reason.contains("database user \"bob\""), "{reason}");
    assert_ne!(refused.session_id.as_deref(), Some(sid.as_str()));
    // A refused session has no end event.
    assert!(!events.iter().any(|e| e.event == "db.session.end" && e.session_id == refused.session_id));

    // The JSON lines file holds the same events, with the same fields.
    let text = std::fs::read_to_string(h.audit_file()).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), events.len(), "file and state disagree:\n{text}");
    for e in &events {
        let line = lines
            .iter()
            .find(|l| l["event"] == e.event.as_str() && l["sid"] == e.session_id.as_deref().unwrap_or(""))
            .unwrap_or_else(|| panic!("{} of {:?} missing from the file:\n{text}", e.event, e.session_id));
        assert_eq!(line, &e.data, "file and state differ for {}", e.event);
        assert_eq!(line["success"], e.success);
        assert_eq!(line["time"], e.time.as_str());
    }
}

/// A client that vanishes without a TLS close_notify (killed psql, dropped network, many drivers)
/// still moved bytes; the end event must say how many, and the session must end at once rather
/// than wait half-open on the server's running query.
#[test]
fn abrupt_disconnect_keeps_byte_counts() {
    let h = Harness::start("auditkill").unwrap();
    let env = h.login_demo().unwrap();
    let mut cmd = sluice_tests::psql_cmd(&env);
    cmd.args(["-c", "select repeat('x', 100000)", "-c", "select pg_sleep(60)"]).stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let sql = "select pg_sleep(60)";
    wait_until(Duration::from_secs(30), "pg_sleep to run", || {
        let q = format!("select count(*) from pg_stat_activity where state = 'active' and query = '{sql}'");
        Ok((h.stack.postgres.psql("postgres", &q)? == "1").then_some(()))
    })
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let end = wait_until(Duration::from_secs(10), "db.session.end", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end"))
    })
    .unwrap();
    let to_client = end.data["bytes_to_client"].as_u64().unwrap_or(0);
    let from_client = end.data["bytes_from_client"].as_u64().unwrap_or(0);
    assert!(to_client > 100_000, "bytes_to_client {:?}", end.data);
    assert!(from_client > 0, "bytes_from_client {:?}", end.data);
}
