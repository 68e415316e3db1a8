//! Cluster, slice 5: sessions across agents, controlled from the auth server. Real processes on
//! loopback: the test stack's control is the auth server, two agents (each with its own data
//! plane, heartbeating every second) serve the same dynamic database. `control sessions ls` on
//! the auth server lists the sessions of both with their agent; `control sessions kill` ends
//! one on agent B within a second and leaves the one on agent A alone; a lock on the auth server
//! ends the sessions on both agents within a second. An agent that heartbeats only every 30 s
//! still reports a session's start and end at once, and ends a session it relays itself (no
//! data plane) on the auth server's request.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_control::state::State;
use sluice_tests::{ca_pin, connect, join_token, shared_db, wait_until, AgentProc, ClientCert, Connected, Harness};

const START: Duration = Duration::from_secs(30);

/// An agent named `name` with its own data plane, heartbeating every second, serving.
fn start_agent(h: &Harness, name: &str, token: &str, pin: &str) -> Result<AgentProc> {
    start_agent_with(h, name, token, pin, Duration::from_secs(1), true)
}

fn start_agent_with(
    h: &Harness,
    name: &str,
    token: &str,
    pin: &str,
    heartbeat: Duration,
    dataplane: bool,
) -> Result<AgentProc> {
    let mut agent = AgentProc::configure(&h.stack.control, &h.dir.join(name), token, pin)?;
    agent.edit_config(|c| {
        c.db_service.heartbeat_interval = heartbeat;
        if let Some(join) = c.join.as_mut() {
            join.node_name = Some(name.to_owned());
        }
    })?;
    if dataplane {
        agent.with_dataplane()?;
    }
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;
    Ok(agent)
}

/// The id of the one session an agent's data plane holds (from the agent's own store).
fn only_session(data_dir: &Path) -> Result<String> {
    let store = State::open_agent(data_dir)?;
    wait_until(Duration::from_secs(5), "the session in the agent's data plane", || {
        let live = store.live_sessions()?;
        Ok((live.len() == 1).then(|| live[0].0.clone()))
    })
}

/// The Node column of `control sessions ls` for each listed session.
fn listed(h: &Harness) -> Result<Vec<(String, String)>> {
    let out = h.control_ok(&["sessions", "ls"])?;
    Ok(out
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('('))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.first()?.to_string(), cols.get(12)?.to_string()))
        })
        .collect())
}

async fn session(port: u16, h: &Harness, cert: &ClientCert) -> Result<Connected> {
    let c = connect(port, "alice", "demo", h.tls(Some(cert))?).await?;
    let v: i32 = c.client.query_one("select 7", &[]).await?.get(0);
    anyhow::ensure!(v == 7);
    Ok(c)
}

/// Runs `select pg_sleep(30)` on `c`, and returns when it failed, or an error if it finished.
async fn sleep_until_ended(c: &Connected) -> Result<Instant> {
    match tokio::time::timeout(Duration::from_secs(20), c.client.simple_query("select pg_sleep(30)")).await {
        Ok(Err(_)) => Ok(Instant::now()),
        Ok(Ok(_)) => anyhow::bail!("the query finished: the session was not ended"),
        Err(_) => anyhow::bail!("the session was still running 20 s later"),
    }
}

/// Runs `select pg_sleep(30)` on `on` while `control sessions kill ID` runs on the auth server
/// 300 ms in: when the query failed, when the command was started, and its output.
fn kill_while_sleeping(
    rt: &tokio::runtime::Runtime,
    h: &Harness,
    on: &Connected,
    id: &str,
) -> Result<(Instant, Instant, std::process::Output)> {
    let config = h.stack.control.config_path.clone();
    let control = sluice_control::demo::find_bin("control")?;
    let (ended, kill) = rt.block_on(async {
        let kill = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let at = Instant::now();
            let out = tokio::process::Command::new(&control)
                .arg("--config")
                .arg(&config)
                .args(["sessions", "kill", id])
                .output()
                .await?;
            Ok::<_, anyhow::Error>((at, out))
        };
        tokio::join!(sleep_until_ended(on), kill)
    });
    let (asked_at, out) = kill?;
    Ok((ended?, asked_at, out))
}

#[test]
fn the_auth_server_lists_and_ends_sessions_on_its_agents() -> Result<()> {
    let h = Harness::start("cluster-sessions")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let a = start_agent(&h, "agent-a", &token, &pin)?;
    let b = start_agent(&h, "agent-b", &token, &pin)?;
    let rt = sluice_tests::runtime()?;
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;

    // (a) One session through each agent; the auth server lists both, with their agent.
    let on_a = rt.block_on(session(a.pg_port, &h, &cert))?;
    let on_b = rt.block_on(session(b.pg_port, &h, &cert))?;
    let sid_a = only_session(&a.config.data_dir)?;
    let sid_b = only_session(&b.config.data_dir)?;
    let rows = wait_until(Duration::from_secs(5), "both sessions in `sessions ls` on the auth server", || {
        let rows = listed(&h)?;
        let has = |sid: &str| rows.iter().any(|(id, _)| id == sid);
        Ok((has(&sid_a) && has(&sid_b)).then_some(rows))
    })?;
    let node_of = |sid: &str| rows.iter().find(|(id, _)| id == sid).map(|(_, n)| n.clone()).unwrap_or_default();
    assert_eq!((node_of(&sid_a).as_str(), node_of(&sid_b).as_str()), ("agent-a", "agent-b"), "{rows:?}");

    // (b) Killing B's session on the auth server ends it within a second; A's goes on.
    let (ended, asked_at, out) = kill_while_sleeping(&rt, &h, &on_b, &sid_b)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sessions kill failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("agent-b") && stdout.contains("ended"), "{stdout}");
    let took = ended.saturating_duration_since(asked_at);
    eprintln!("[cluster-sessions] the session on agent B ended {took:?} after `sessions kill`");
    assert!(took < Duration::from_secs(1), "the session on agent B ended {took:?} after the kill");
    let v: i32 = rt.block_on(on_a.client.query_one("select 8", &[]))?.get(0);
    assert_eq!(v, 8, "the session on agent A is untouched");
    let rows = listed(&h)?;
    assert!(!rows.iter().any(|(id, _)| *id == sid_b), "the killed session is still listed: {rows:?}");
    assert!(rows.iter().any(|(id, _)| *id == sid_a), "{rows:?}");
    // Audited on the agent, uploaded to the auth server, as an administrator's kill.
    let end = wait_until(Duration::from_secs(20), "the end of B's session in the auth server's audit", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end" && e.session_id.as_deref() == Some(&sid_b)))
    })?;
    assert_eq!(end.data["reason"], "AdminKill", "{end:?}");
    // An id no agent reported is an error.
    let (config, control) = (h.stack.control.config_path.clone(), sluice_control::demo::find_bin("control")?);
    let out = std::process::Command::new(&control)
        .arg("--config")
        .arg(&config)
        .args(["sessions", "kill", "no-such-session"])
        .output()
        .context("running sessions kill")?;
    assert!(!out.status.success(), "killing an unknown session succeeded");

    // (c) A lock on the auth server ends the sessions on both agents within a second.
    let on_b = rt.block_on(session(b.pg_port, &h, &cert))?;
    let (ended_a, ended_b, locked) = rt.block_on(async {
        let lock = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let out = tokio::process::Command::new(&control)
                .arg("--config")
                .arg(&config)
                .args(["locks", "add", "--user", "alice", "--message", "offboarding"])
                .output()
                .await?;
            anyhow::ensure!(out.status.success(), "locks add: {}", String::from_utf8_lossy(&out.stderr));
            Ok(Instant::now())
        };
        tokio::join!(sleep_until_ended(&on_a), sleep_until_ended(&on_b), lock)
    });
    let locked = locked?;
    for (agent, ended) in [("A", ended_a?), ("B", ended_b?)] {
        let took = ended.saturating_duration_since(locked);
        eprintln!("[cluster-sessions] the session on agent {agent} ended {took:?} after the lock");
        assert!(took < Duration::from_secs(1), "the session on agent {agent} ended {took:?} after the lock");
    }
    Ok(())
}

/// Heartbeats every 30 s, but session starts and ends are reported at once; a session the agent
/// relays itself (no data plane) ends on `sessions kill` too.
#[test]
fn session_changes_are_reported_at_once_and_relayed_sessions_can_be_killed() -> Result<()> {
    let h = Harness::start("cluster-sessions-relayed")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let c = start_agent_with(&h, "agent-c", &token, &pin, Duration::from_secs(30), false)?;
    // The first heartbeat goes out at start; the next periodic one only 30 s later.
    wait_until(Duration::from_secs(10), "agent-c's first heartbeat", || {
        Ok(h.state.nodes()?.into_iter().any(|n| n.name == "agent-c" && n.heartbeat.is_some()).then_some(()))
    })?;
    let rt = sluice_tests::runtime()?;
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;
    let on_c = rt.block_on(session(c.pg_port, &h, &cert))?;
    let rows =
        wait_until(Duration::from_secs(5), "the session in `sessions ls` long before the next heartbeat", || {
            let rows = listed(&h)?;
            Ok(rows.iter().any(|(_, node)| node == "agent-c").then_some(rows))
        })?;
    let sid = rows.into_iter().find(|(_, node)| node == "agent-c").map(|(id, _)| id).context("no session")?;

    let (ended, asked_at, out) = kill_while_sleeping(&rt, &h, &on_c, &sid)?;
    // The CLI returns once a heartbeat no longer lists the session: sent when it ended.
    assert!(out.status.success(), "sessions kill failed: {}", String::from_utf8_lossy(&out.stderr));
    let took = ended.saturating_duration_since(asked_at);
    eprintln!("[cluster-sessions] the relayed session on agent C ended {took:?} after `sessions kill`");
    assert!(took < Duration::from_secs(1), "the session on agent C ended {took:?} after the kill");
    assert!(asked_at.elapsed() < Duration::from_secs(5), "sessions kill waited for a periodic heartbeat");
    let end = wait_until(Duration::from_secs(20), "the end of C's session in the auth server's audit", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end" && e.session_id.as_deref() == Some(&sid)))
    })?;
    assert_eq!(end.data["reason"], "AdminKill", "{end:?}");
    assert_eq!(end.data["data_plane"], false, "{end:?}");
    Ok(())
}
