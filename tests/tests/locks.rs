//! Teleport-style locks (`control locks add/ls/rm`): a lock refuses new sessions of its user or
//! database with SQLSTATE 28000 and ends live ones within a second, whether the dataplane holds
//! them (TLS or spliced plain legs) or control relays them itself; removing it lets users back.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_control::demo::{AwsCreds, DEMO_PLAIN_DB};
use sluice_tests::{psql_cmd, runtime, sluice_control, wait_until, ConnectError, Harness};
use tokio_postgres::error::SqlState;

fn control(h: &Harness, args: &[&str]) -> Output {
    Command::new(sluice_control::demo::find_bin("control").unwrap())
        .arg("--config")
        .arg(&h.stack.control.config_path)
        .args(args)
        .output()
        .unwrap()
}

fn control_ok(h: &Harness, args: &[&str]) -> String {
    let out = control(h, args);
    assert!(out.status.success(), "control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for a child to exit, failing the test if it takes longer than `limit`.
fn exits_within(child: &mut std::process::Child, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "the session was still running {limit:?} after the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lock_ends_and_refuses(with_dataplane: bool) {
    let name = if with_dataplane { "locks-dp" } else { "locks-relay" };
    let h = Harness::start_opts(name, &AwsCreds::demo(), with_dataplane).unwrap();
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 7", &[])).unwrap().get(0);
    assert_eq!(v, 7);
    // A second session of alice's on the local socket (plain legs), busy in a long query.
    let local = h.local_env(DEMO_PLAIN_DB).unwrap();
    let mut psql = psql_cmd(&local);
    psql.args(["-c", "select pg_sleep(30)"]).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut busy = psql.spawn().unwrap();
    wait_until(Duration::from_secs(10), "both sessions to start", || {
        let starts = h.audit()?.into_iter().filter(|e| e.event == "db.session.start" && e.success).count();
        Ok((starts >= 2).then_some(()))
    })
    .unwrap();
    if with_dataplane {
        wait_until(Duration::from_secs(5), "both sessions in the dataplane", || {
            Ok((h.state.live_sessions()?.len() == 2).then_some(()))
        })
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    let (query, elapsed) = rt.block_on(async {
        let sleep = c.client.simple_query("select pg_sleep(30)");
        let lock = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let out = control(&h, &["locks", "add", "--user", "alice", "--message", "offboarding"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            Instant::now()
        };
        let (r, locked_at) = tokio::join!(sleep, lock);
        (r, locked_at.elapsed())
    });
    assert!(query.is_err(), "the query must fail when its session is locked");
    assert!(elapsed < Duration::from_secs(1), "the TLS client saw the end {elapsed:?} after the lock");
    let waited = exits_within(&mut busy, Duration::from_secs(1));
    eprintln!("[{name}] TLS session ended {elapsed:?} and local session {waited:?} after the lock");

    // New sessions are refused with the lock's message, on both kinds of listener.
    match rt.block_on(h.connect_with(Some(&cert), "alice", "demo")) {
        Err(ConnectError::Postgres(e)) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("expected a server error, got {e}"));
            assert_eq!(db.code(), &SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
            assert!(db.message().contains("locked") && db.message().contains("offboarding"), "{}", db.message());
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a locked user connected"),
    }
    let out = psql_cmd(&local).args(["-c", "select 1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked"), "{}", String::from_utf8_lossy(&out.stderr));

    let ends = wait_until(Duration::from_secs(10), "both db.session.end events", || {
        let ends: Vec<_> = h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        Ok((ends.len() >= 2).then_some(ends))
    })
    .unwrap();
    for e in &ends {
        assert_eq!(e.data["reason"], "Locked", "{:?}", e.data);
        assert_eq!(e.data["data_plane"], with_dataplane, "{:?}", e.data);
    }

    // `locks ls` shows it; `locks rm` lifts it.
    let listed = control_ok(&h, &["locks", "ls"]);
    assert!(listed.contains("alice") && listed.contains("offboarding"), "{listed}");
    let id = listed.lines().nth(1).and_then(|l| l.split_whitespace().next()).unwrap().to_owned();
    control_ok(&h, &["locks", "rm", &id]);
    assert!(!control(&h, &["locks", "rm", &id]).status.success(), "removing a lock twice must fail");
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 8", &[])).unwrap().get(0);
    assert_eq!(v, 8);

    // A database lock covers every user of that database only.
    control_ok(&h, &["locks", "add", "--db", DEMO_PLAIN_DB, "--ttl", "1h"]);
    let out = psql_cmd(&local).args(["-c", "select 1"]).output().unwrap();
    assert!(!out.status.success(), "a locked database accepted a session");
    let v: i32 = rt.block_on(c.client.query_one("select 9", &[])).unwrap().get(0);
    assert_eq!(v, 9, "a lock on another database ended this session");
    assert!(!control(&h, &["locks", "add"]).status.success(), "a lock needs a target");
}

#[test]
fn a_lock_ends_dataplane_sessions_and_refuses_new_ones() {
    lock_ends_and_refuses(true);
}

#[test]
fn a_lock_ends_sessions_control_relays_and_refuses_new_ones() {
    lock_ends_and_refuses(false);
}
