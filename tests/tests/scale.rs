//! Hundreds of live sessions on one control ↔ data plane link. The data plane's answers to
//! `StatsRequest` and `ListSessions` grow with the number of sessions; past one frame (about 350
//! sessions for stats) they go in parts. With 400 idle sessions handed to the data plane, a
//! `/metrics` scrape and `control sessions ls` show every one of them, a restarted control
//! reconnects (its `ListSessions` answer is the largest frame of all) and keeps them, the
//! sessions still answer queries, and each one's end is audited.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use sluice_control::demo::find_bin;
use sluice_tests::{connect, count_in, runtime, scrape, wait_until, Connected, Harness};

const SESSIONS: usize = 400;

/// The session ids with a live `sluice_session_bytes` series.
fn scraped_sessions(text: &str) -> HashSet<String> {
    text.lines()
        .filter(|l| l.starts_with("sluice_session_bytes{"))
        .filter_map(|l| Some(l.split("session_id=\"").nth(1)?.split('"').next()?.to_owned()))
        .collect()
}

/// `control sessions ls`: the ids listed with live byte counts from the data plane.
fn listed_sessions(control: &std::path::Path, config: &std::path::Path) -> HashSet<String> {
    let out =
        std::process::Command::new(control).arg("--config").arg(config).args(["sessions", "ls"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("no live counters"), "sessions ls had no counters from the data plane: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // id user db db_user db_name started age bytes_in …: only rows with live counts.
            (cols.len() > 8 && cols[7].parse::<u64>().is_ok()).then(|| cols[0].to_owned())
        })
        .collect()
}

/// Raises the soft descriptor limit for `sessions` (children started from here inherit it): the
/// data plane holds two descriptors a session (no pipe while idle), the emulator two, this
/// process one; eight leaves room.
fn raise_nofile(sessions: usize) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let needed = (sessions * 8 + 1024) as u64;
    assert!(hard >= needed, "RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs");
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// Opens `n` sessions, a few connects at a time.
async fn open_sessions(n: usize, port: u16, tls: rustls::ClientConfig) -> Vec<Result<Connected, String>> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (tls, sem) = (tls.clone(), sem.clone());
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
                match tokio::time::timeout(Duration::from_secs(20), connect(port, "alice", "demo", tls)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("connect timed out".to_owned()),
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string()).and_then(|r| r));
    }
    out
}

#[test]
fn four_hundred_sessions_are_listed_scraped_and_survive_a_control_restart() {
    raise_nofile(SESSIONS);
    let started = Instant::now();
    let mut h = Harness::start_sized("scale", SESSIONS as u32 + 60).unwrap();
    let control_fds =
        |h: &Harness| std::fs::read_dir(format!("/proc/{}/fd", h.stack.control.proc.pid())).unwrap().count();
    let dp_pid = h.stack.dataplane.as_ref().expect("the stack runs a data plane").proc.pid();
    let dp_fds = || std::fs::read_dir(format!("/proc/{dp_pid}/fd")).unwrap().count();
    let (control_before, dp_before) = (control_fds(&h), dp_fds());
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let tls = h.tls(Some(&cert)).unwrap();
    let port = h.pg_port();

    // A few connects at a time: the point is many sessions at once, not a handshake storm.
    let conns: Vec<Connected> =
        rt.block_on(open_sessions(SESSIONS, port, tls)).into_iter().map(|c| c.unwrap()).collect();
    eprintln!("{SESSIONS} sessions open after {:.1?}", started.elapsed());
    let ids: HashSet<String> = wait_until(Duration::from_secs(30), "every session is handed to the data plane", || {
        let live = h.state.live_sessions()?;
        Ok((live.len() == SESSIONS).then(|| live.into_iter().map(|l| l.0).collect()))
    })
    .unwrap();
    // Control keeps no descriptor of a session it handed over; the data plane keeps its two
    // sockets (an idle session holds no pipe).
    let (control_with, dp_with) = (control_fds(&h), dp_fds());
    eprintln!("descriptors: control {control_before} -> {control_with}, data plane {dp_before} -> {dp_with}");
    assert!(control_with < control_before + SESSIONS / 10, "control holds {control_with} descriptors");
    assert!(dp_with <= dp_before + 2 * SESSIONS + 64, "the data plane holds {dp_with} descriptors");

    // One stats answer for 400 sessions is larger than a frame.
    let url = h.stack.control.metrics_url().expect("the test stack serves metrics");
    let text = scrape(&url).unwrap();
    assert!(text.contains(&format!("sluice_sessions_active {SESSIONS}\n")), "{}", &text[..text.len().min(2000)]);
    assert_eq!(scraped_sessions(&text), ids);
    let control = find_bin("control").unwrap();
    let config = h.stack.control.config_path.clone();
    assert_eq!(listed_sessions(&control, &config), ids);
    assert_eq!(count_in(&h.control_log(), "dataplane link failed"), 0);

    // A new control learns the 400 sessions from one `ListSessions` answer in parts.
    h.stack.control.proc.stop(Signal::SIGKILL);
    h.start_control_again(|_| {}).unwrap();
    // Give a broken answer time to show: the link would fail and reconnect, or sessions missing
    // from the answer would be ended.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count_in(&h.control_log(), "dataplane link failed"), 0);
    assert_eq!(count_in(&h.control_log(), "connected to the dataplane"), 2);
    assert!(!h.audit().unwrap().iter().any(|e| e.event == "db.session.end"));
    assert_eq!(scraped_sessions(&scrape(&url).unwrap()), ids);
    assert_eq!(listed_sessions(&control, &config), ids);

    // The sessions still work, through the data plane (control was gone for a while).
    for (i, c) in conns.iter().enumerate().step_by(SESSIONS / 8) {
        let v: i64 = rt.block_on(c.client.query_one(&format!("select {i}::bigint * 2"), &[])).unwrap().get(0);
        assert_eq!(v, i as i64 * 2);
    }

    rt.block_on(async {
        let closing: Vec<_> = conns.into_iter().map(|c| tokio::spawn(c.close())).collect();
        for c in closing {
            c.await.unwrap().unwrap();
        }
    });
    let ended = wait_until(Duration::from_secs(30), "db.session.end for every session", || {
        let ends: Vec<_> = h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        Ok((ends.len() >= SESSIONS).then_some(ends))
    })
    .unwrap();
    let ended_ids: HashSet<String> = ended.iter().filter_map(|e| e.session_id.clone()).collect();
    assert_eq!(ended_ids, ids);
    assert!(ended.iter().all(|e| e.success && e.data["data_plane"] == true), "{:?}", ended.iter().find(|e| !e.success));
    assert!(h.state.live_sessions().unwrap().is_empty());
    eprintln!("done after {:.1?}", started.elapsed());
}

#[test]
fn a_dataplane_that_stops_reading_does_not_freeze_control() {
    // More handoffs than the link's socket buffer holds (about 170).
    const STUCK: usize = 250;
    raise_nofile(STUCK);
    let mut h = Harness::start_sized("stuck-dp", STUCK as u32 + 60).unwrap();
    // Put a data plane that answers Hello and then never reads in the real one's place.
    let dp = h.stack.dataplane.as_mut().expect("the stack runs a dataplane");
    dp.proc.stop(Signal::SIGKILL);
    let listener = sluice_handoff::link::Listener::bind(&dp.socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok(link) = listener.accept() {
            if held.is_empty() {
                let _ = link.recv_hello();
                let _ = link.answer_hello();
            }
            // Later connections are held unanswered, like a data plane that hangs.
            held.push(link);
        }
    });
    wait_until(Duration::from_secs(10), "control connects to the stuck data plane", || {
        Ok((count_in(&h.control_log(), "connected to the dataplane") >= 2).then_some(()))
    })
    .unwrap();

    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let tls = h.tls(Some(&cert)).unwrap();
    let started = Instant::now();
    // Their outcome does not matter (handed to a data plane that never takes them); that each
    // connect returns does.
    let stuck = rt.block_on(open_sessions(STUCK, h.pg_port(), tls.clone()));
    eprintln!("{STUCK} connects returned after {:.1?}", started.elapsed());
    assert!(!stuck.iter().any(|c| matches!(c, Err(e) if e == "connect timed out")), "a connect hung");
    wait_until(Duration::from_secs(10), "control gives up on the stuck data plane", || {
        Ok((count_in(&h.control_log(), "stopped reading its link") >= 1).then_some(()))
    })
    .unwrap();

    // Control still serves: a new session works (relayed by control), and so does /metrics.
    let t = Instant::now();
    let v: i32 = rt
        .block_on(async {
            let c = connect(h.pg_port(), "alice", "demo", tls).await?;
            let v = c.client.query_one("select 7", &[]).await?.get(0);
            drop(c);
            anyhow::Ok(v)
        })
        .unwrap();
    assert_eq!(v, 7);
    assert!(t.elapsed() < Duration::from_secs(10), "a new session took {:?}", t.elapsed());
    let url = h.stack.control.metrics_url().expect("the test stack serves metrics");
    assert!(scrape(&url).unwrap().contains("sluice_sessions_started_total"));
    assert!(h.control_alive());
    drop(stuck);
}
