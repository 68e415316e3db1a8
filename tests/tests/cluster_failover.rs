//! Cluster, several auth servers: an agent configured with more than one auth server address
//! (`join.auth_servers`) moves to another when the one it uses fails, for every call (join,
//! watch, heartbeat, renewal, audit upload), without ending its sessions. Real processes on
//! loopback: the test stack's control is the one live auth server, the other address is a port
//! nothing listens on. (Two auth nodes sharing one PostgreSQL state are tested with that
//! backend.)

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_tests::{
    ca_pin, cluster_addr, connect, followed_auth_server, join_token, psql_query, shared_db, wait_until, AgentProc,
    ClientCert, Harness,
};

const START: Duration = Duration::from_secs(30);

/// An address where nothing listens (connections are refused at once).
fn dead_addr() -> Result<String> {
    Ok(format!("127.0.0.1:{}", sluice_control::demo::free_port()?))
}

fn identity(agent: &AgentProc) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(agent.identity_dir().join("identity.json"))?)?)
}

/// The agent's row in the auth server's `control nodes ls --format json`.
fn node(h: &Harness, host_id: &str) -> Result<serde_json::Value> {
    let nodes: Vec<serde_json::Value> =
        serde_json::from_str(h.control_ok(&["nodes", "ls", "--format", "json"])?.trim())?;
    nodes.into_iter().find(|n| n["host_id"] == host_id).context("the agent is not in nodes ls")
}

/// The libpq environment of a psql client of the agent presenting `cert` (files under `dir`).
fn psql_env(h: &Harness, agent: &AgentProc, cert: &ClientCert) -> Result<Vec<(String, String)>> {
    let (crt, key) = (agent.dir.join("client.crt"), agent.dir.join("client.key"));
    std::fs::write(&crt, &cert.cert_pem)?;
    std::fs::write(&key, &cert.key_pem)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    Ok(vec![
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), agent.pg_port.to_string()),
        ("PGUSER".into(), "alice".into()),
        ("PGDATABASE".into(), "demo".into()),
        ("PGSSLMODE".into(), "verify-ca".into()),
        ("PGSSLROOTCERT".into(), path(&h.ca_file)),
        ("PGSSLCERT".into(), path(&crt)),
        ("PGSSLKEY".into(), path(&key)),
    ])
}

/// Lines of the agent's log saying it moved from one auth server to another.
fn moves(agent: &AgentProc) -> Vec<String> {
    agent.log_text().lines().filter(|l| l.contains("moving to another auth server")).map(str::to_owned).collect()
}

#[test]
fn a_dead_first_auth_server_is_passed_over_by_every_call() -> Result<()> {
    let mut h = Harness::start("cluster-failover-dead-first")?;
    // Renewal is due after about 10 s of a 15 s certificate.
    h.restart_control(|c| c.auth_service.host_cert_ttl = Duration::from_secs(15))?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let (dead, real) = (dead_addr()?, cluster_addr(&h.stack.control)?);
    let servers = [dead.clone(), real.clone()];
    let mut agent = AgentProc::configure_with_auth_servers(&servers, &h.dir.join("agent"), &token, &pin)?;
    agent.config.db_service.heartbeat_interval = Duration::from_secs(1);
    let metrics = agent.with_metrics()?;
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;

    // Joined through the second address; the identity keeps the list.
    let id = identity(&agent)?;
    assert_eq!(id["auth_servers"], serde_json::json!(servers));
    let host_id = id["host_id"].as_str().context("no host_id")?.to_owned();
    wait_until(Duration::from_secs(5), "the metric naming the followed auth server", || {
        Ok((followed_auth_server(&metrics)?.as_deref() == Some(real.as_str())).then_some(()))
    })?;
    assert!(agent.log_text().contains(&format!("auth_server={real}")), "{}", agent.log_text());

    // Heartbeats arrive.
    let beat = |h: &Harness| -> Result<i64> { Ok(node(h, &host_id)?["last_heartbeat_ms"].as_i64().unwrap_or(0)) };
    let first = wait_until(Duration::from_secs(10), "a heartbeat", || Ok(Some(beat(&h)?).filter(|b| *b > 0)))?;
    wait_until(Duration::from_secs(10), "a later heartbeat", || Ok((beat(&h)? > first).then_some(())))?;

    // psql is served from the policy followed through the live auth server.
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;
    let env = psql_env(&h, &agent, &cert)?;
    assert_eq!(psql_query(&env, "select 7")?, "7");

    // The certificate is renewed through it, and the agent's audit events reach it.
    let not_after = |h: &Harness| -> Result<i64> { Ok(node(h, &host_id)?["cert_not_after"].as_i64().unwrap_or(0)) };
    let before = not_after(&h)?;
    let started = Instant::now();
    wait_until(Duration::from_secs(30), "a renewal through the live auth server", || {
        Ok((not_after(&h)? > before && agent.log_text().contains("host certificate renewed")).then_some(()))
    })?;
    eprintln!("[cluster-failover] renewed {:?} after the first session", started.elapsed());
    assert_eq!(psql_query(&env, "select 8")?, "8", "served after the renewal");
    wait_until(Duration::from_secs(20), "the agent's session events on the auth server", || {
        let from_agent = h.audit()?.into_iter().filter(|r| r.data["agent"]["node"].is_string()).count();
        Ok((from_agent >= 4).then_some(()))
    })?;

    // Nothing failed on the way, and the moves were two: the join's client and the agent's one
    // (shared by its watch, heartbeats, renewals and uploads; concurrent failures move it once).
    let log = agent.log_text();
    for failure in ["heartbeat failed", "renewing the host certificate failed", "cannot deliver audit events"] {
        assert!(!log.contains(failure), "{failure}: {log}");
    }
    let moved = moves(&agent);
    assert_eq!(moved.len(), 2, "{moved:#?}");
    for line in &moved {
        assert!(line.contains(&format!("from={dead}")) && line.contains(&format!("to={real}")), "{line}");
    }
    Ok(())
}

#[test]
fn restarting_the_live_auth_server_ends_no_session() -> Result<()> {
    let mut h = Harness::start("cluster-failover-restart")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let (real, dead) = (cluster_addr(&h.stack.control)?, dead_addr()?);
    let mut agent =
        AgentProc::configure_with_auth_servers(&[real.clone(), dead.clone()], &h.dir.join("agent"), &token, &pin)?;
    agent.config.db_service.heartbeat_interval = Duration::from_secs(1);
    let metrics = agent.with_metrics()?;
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;
    assert!(moves(&agent).is_empty(), "moved away from a live first auth server: {:#?}", moves(&agent));
    assert_eq!(followed_auth_server(&metrics)?.as_deref(), Some(real.as_str()));

    let rt = sluice_tests::runtime()?;
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;
    let live = rt.block_on(connect(agent.pg_port, "alice", "demo", h.tls(Some(&cert))?))?;
    let pid = |c: &tokio_postgres::Client| -> Result<i32> {
        Ok(rt.block_on(c.query_one("select pg_backend_pid()", &[]))?.get(0))
    };
    let before = pid(&live.client)?;
    let follows = |agent: &AgentProc| agent.log_text().matches("following the auth server's policy").count();
    let followed_before = follows(&agent);

    // The auth server stops and starts again on the same address and state.
    let restarted = Instant::now();
    h.restart_control(|_| {})?;
    wait_until(Duration::from_secs(30), "the agent following the restarted auth server", || {
        Ok((follows(&agent) > followed_before && followed_auth_server(&metrics)?.as_deref() == Some(real.as_str()))
            .then_some(()))
    })?;
    eprintln!("[cluster-failover] following again {:?} after the restart began", restarted.elapsed());
    // On the way it tried the other address.
    let moved = moves(&agent);
    assert!(
        moved.iter().any(|l| l.contains(&format!("from={real}")) && l.contains(&format!("to={dead}"))),
        "{moved:#?}"
    );

    // The live session went on: the same backend, still answering; new sessions are served.
    assert_eq!(pid(&live.client)?, before, "the session was reconnected");
    let v: i32 = rt.block_on(live.client.query_one("select 9", &[]))?.get(0);
    assert_eq!(v, 9);
    let fresh = rt.block_on(connect(agent.pg_port, "alice", "demo", h.tls(Some(&cert))?))?;
    let v: i32 = rt.block_on(fresh.client.query_one("select 10", &[]))?.get(0);
    assert_eq!(v, 10);
    rt.block_on(fresh.close())?;
    rt.block_on(live.close())?;
    assert!(!agent.log_text().contains("session ended by control"), "{}", agent.log_text());

    // Heartbeats reach the restarted auth server too.
    let host_id = identity(&agent)?["host_id"].as_str().context("no host_id")?.to_owned();
    let now_ms = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    wait_until(Duration::from_secs(10), "a heartbeat at the restarted auth server", || {
        Ok((node(&h, &host_id)?["last_heartbeat_ms"].as_i64().unwrap_or(0) > now_ms).then_some(()))
    })?;
    Ok(())
}
