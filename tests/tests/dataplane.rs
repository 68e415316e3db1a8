//! Sessions live in the dataplane process: control hands them over after the handshake, they keep
//! flowing while control is killed and restarted (the new control audits their end), and a killed
//! dataplane's sessions are recorded as ended while control takes new sessions itself.

use std::time::Duration;

use nix::sys::signal::Signal;
use sluice_tests::{client_config_from_pem, count_in, runtime, wait_until, Harness};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

#[test]
fn sessions_survive_a_control_restart_and_are_audited_by_the_new_control() {
    let mut h = Harness::start("dp-restart").unwrap();
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 41 + 1", &[])).unwrap().get(0);
    assert_eq!(v, 42);
    // The data plane relays as soon as it has the session; control logs the handoff once the
    // data plane acknowledged it and the session's record is committed.
    wait_until(Duration::from_secs(5), "control to see the handoff done", || {
        Ok((count_in(&h.control_log(), "session handed to the dataplane") == 1).then_some(()))
    })
    .unwrap();
    let live = h.state.live_sessions().unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let sid = live[0].0.clone();

    h.stack.control.proc.stop(Signal::SIGKILL);
    // No control at all: the session still works, so its bytes cannot be passing through control.
    let v: i32 = rt.block_on(c.client.query_one("select 2 * 21", &[])).unwrap().get(0);
    assert_eq!(v, 42);

    h.start_control_again(|_| {}).unwrap();
    // The new control learned the session is still live, so it has not ended it.
    assert!(!h.audit().unwrap().iter().any(|e| e.event == "db.session.end"));
    let rows: i64 =
        rt.block_on(c.client.query_one("select count(*) from generate_series(1, 5000)", &[])).unwrap().get(0);
    assert_eq!(rows, 5000);

    // Ctrl-C still works: the new control restored the session's cancel route.
    let tls = MakeRustlsConnect::new(client_config_from_pem(&h.ca_pem, Some(&cert)).unwrap());
    let err = sluice_tests::cancel_a_sleep(&rt, &c, tls);
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    rt.block_on(c.close()).unwrap();

    let end = wait_until(Duration::from_secs(10), "db.session.end from the new control", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end"))
    })
    .unwrap();
    assert_eq!(end.session_id.as_deref(), Some(sid.as_str()));
    assert!(end.success, "{end:?}");
    assert_eq!(end.data["data_plane"], true);
    assert!(end.data["bytes_from_client"].as_u64().unwrap() > 0, "{end:?}");
    assert!(end.data["bytes_to_client"].as_u64().unwrap() > 0, "{end:?}");
    assert!(h.state.live_sessions().unwrap().is_empty());
}

#[test]
fn a_killed_dataplane_ends_its_sessions_and_control_takes_new_ones() {
    let mut h = Harness::start("dp-kill").unwrap();
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 1", &[])).unwrap().get(0);
    assert_eq!(v, 1);
    // The data plane relays as soon as it has the session, maybe before control has read its
    // acknowledgement: kill it only once control counts the session as handed over, or the end
    // is audited as a failed handoff instead.
    wait_until(Duration::from_secs(5), "control to see the handoff acknowledged", || {
        Ok((count_in(&h.control_log(), "session handed to the dataplane") >= 1).then_some(()))
    })
    .unwrap();
    h.stack.dataplane.as_mut().expect("the stack runs a dataplane").proc.stop(Signal::SIGKILL);

    // The client sees its connection closed, not a hang.
    let r =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), c.client.query_one("select 1", &[])).await });
    assert!(matches!(r, Ok(Err(_))), "the session must end when its dataplane dies: {r:?}");

    let end = wait_until(Duration::from_secs(15), "db.session.end for the lost session", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end"))
    })
    .unwrap();
    assert!(!end.success, "{end:?}");
    assert!(end.data["error"].as_str().unwrap().contains("no longer holds"), "{end:?}");
    assert!(h.state.live_sessions().unwrap().is_empty());

    // With no dataplane, control relays new sessions itself.
    let c2 = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c2.client.query_one("select 7", &[])).unwrap().get(0);
    assert_eq!(v, 7);
    rt.block_on(c2.close()).unwrap();
}

#[test]
fn an_admin_kill_ends_the_session_within_a_second() {
    let h = Harness::start("dp-kill-admin").unwrap();
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 5", &[])).unwrap().get(0);
    assert_eq!(v, 5);
    let sid = wait_until(Duration::from_secs(5), "the session's record", || {
        Ok(h.state.live_sessions()?.first().map(|s| s.0.clone()))
    })
    .unwrap();

    let control = sluice_control::demo::find_bin("control").unwrap();
    let config = h.stack.control.config_path.clone();
    let ls =
        std::process::Command::new(&control).arg("--config").arg(&config).args(["sessions", "ls"]).output().unwrap();
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(listed.contains(&sid) && listed.contains("alice"), "{listed}");

    let result = rt.block_on(async {
        let sleep = c.client.simple_query("select pg_sleep(20)");
        let kill = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let out = tokio::process::Command::new(&control)
                .arg("--config")
                .arg(&config)
                .args(["sessions", "kill", &sid])
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::time::Instant::now()
        };
        let (r, killed_at) = tokio::join!(sleep, kill);
        (r, killed_at.elapsed())
    });
    assert!(result.0.is_err(), "the query must fail when its session is killed");
    assert!(result.1 < Duration::from_secs(1), "the client saw the end {:?} after the kill", result.1);

    let end = wait_until(Duration::from_secs(10), "db.session.end", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end"))
    })
    .unwrap();
    assert_eq!(end.data["reason"], "AdminKill", "{end:?}");
    // Killing an unknown session is an error, not a silent success.
    let out = std::process::Command::new(&control)
        .arg("--config")
        .arg(&config)
        .args(["sessions", "kill", "no-such-session"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
