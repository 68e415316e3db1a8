//! Cluster, slice 3: an agent serves sessions from the policy it follows on the auth server's
//! watch stream, through its own data plane, with IAM tokens it mints itself. Real processes on
//! loopback: the test stack's control is the auth server (PostgreSQL behind the RDS Proxy
//! emulator), the agent joins it with a token and serves the dynamic databases its labels
//! select. A lock or a user's removal on the auth server ends the agent's live session within a
//! second, and a handshake on the agent reads nothing from any state.

use std::time::{Duration, Instant};

use anyhow::Result;
use sluice_control::state::State;
use sluice_tests::{ca_pin, connect, join_token, scrape, shared_db, wait_until, AgentProc, ClientCert, Harness};

const START: Duration = Duration::from_secs(30);

/// The agent's `sluice_state_statements_total{kind="read"}`.
fn state_reads(url: &str) -> Result<u64> {
    let text = scrape(url)?;
    let prefix = "sluice_state_statements_total{kind=\"read\"} ";
    let value = text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or("0");
    Ok(value.trim().parse::<f64>()? as u64)
}

async fn query_one(port: u16, h: &Harness, cert: &ClientCert) -> Result<i32> {
    let c = connect(port, "alice", "demo", h.tls(Some(cert))?).await?;
    let v: i32 = c.client.query_one("select 7", &[]).await?.get(0);
    c.close().await?;
    Ok(v)
}

/// The error a connection to the agent is refused with.
async fn refusal(port: u16, h: &Harness, cert: &ClientCert) -> Result<String> {
    match connect(port, "alice", "demo", h.tls(Some(cert))?).await {
        Ok(c) => match c.client.query_one("select 7", &[]).await {
            Ok(_) => anyhow::bail!("the session was admitted"),
            Err(e) => Ok(format!("{e:?}")),
        },
        Err(e) => Ok(format!("{e:?}")),
    }
}

/// Runs `select pg_sleep(30)` on a session of the agent, does `revoke` on the auth server after
/// 300 ms, and returns how long after it the session ended.
async fn ended_after(port: u16, h: &Harness, cert: &ClientCert, revoke: impl FnOnce()) -> Result<Duration> {
    let c = connect(port, "alice", "demo", h.tls(Some(cert))?).await?;
    let sleep = c.client.simple_query("select pg_sleep(30)");
    let act = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        revoke();
        Instant::now()
    };
    let (result, revoked_at) = tokio::join!(sleep, act);
    anyhow::ensure!(result.is_err(), "the query outlived the revocation");
    Ok(revoked_at.elapsed())
}

#[test]
fn an_agent_serves_from_the_auth_servers_policy_and_follows_its_changes() -> Result<()> {
    let h = Harness::start("cluster-serve")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    h.state.upsert_database(&shared_db(&h, "billing", &[("env", "prod")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let mut agent = AgentProc::configure(&h.stack.control, &h.dir.join("agent"), &token, &pin)?;
    agent.with_dataplane()?;
    let metrics = agent.with_metrics()?;
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;
    let rt = sluice_tests::runtime()?;
    let orders = h.issue_cert("alice", "orders", "alice", "demo")?;

    // Served through the agent's data plane: the session is recorded in the agent's own store.
    assert_eq!(rt.block_on(query_one(agent.pg_port, &h, &orders))?, 7);
    let agent_store = State::open_agent(&agent.config.data_dir)?;
    let c = rt.block_on(connect(agent.pg_port, "alice", "demo", h.tls(Some(&orders))?))?;
    wait_until(Duration::from_secs(5), "the session in the agent's data plane", || {
        Ok((agent_store.live_sessions()?.len() == 1).then_some(()))
    })?;
    rt.block_on(c.close())?;

    // No handshake reads a state: the policy is in memory.
    let reads = state_reads(&metrics)?;
    for _ in 0..3 {
        assert_eq!(rt.block_on(query_one(agent.pg_port, &h, &orders))?, 7);
    }
    assert_eq!(state_reads(&metrics)?, reads, "handshakes on the agent read a state");

    // A database the agent's labels do not select is not served by it.
    let billing = h.issue_cert("alice", "billing", "alice", "demo")?;
    let refused = rt.block_on(refusal(agent.pg_port, &h, &billing))?;
    assert!(refused.contains("3D000") && refused.contains("not registered"), "{refused}");

    // A lock on the auth server ends the live session on the agent within a second, and
    // refuses the next one.
    let mut lock_id = String::new();
    let took = rt.block_on(ended_after(agent.pg_port, &h, &orders, || {
        lock_id = h.state.add_lock(Some("alice"), None, "offboarding", None).map(|l| l.id).unwrap_or_default();
    }))?;
    eprintln!("[cluster-serve] session on the agent ended {took:?} after the lock");
    assert!(took < Duration::from_secs(1), "the session ended {took:?} after the lock");
    let refused = rt.block_on(refusal(agent.pg_port, &h, &orders))?;
    assert!(refused.contains("locked") && refused.contains("offboarding"), "{refused}");

    // Lifting it admits sessions again; removing the user ends them.
    h.state.delete_lock(&lock_id)?;
    wait_until(Duration::from_secs(5), "the lock lifted on the agent", || {
        Ok(rt.block_on(query_one(agent.pg_port, &h, &orders)).ok())
    })?;
    let took = rt.block_on(ended_after(agent.pg_port, &h, &orders, || {
        let _ = h.state.delete_user("alice");
    }))?;
    eprintln!("[cluster-serve] session on the agent ended {took:?} after the user's removal");
    assert!(took < Duration::from_secs(1), "the session ended {took:?} after the user's removal");
    let refused = rt.block_on(refusal(agent.pg_port, &h, &orders))?;
    assert!(refused.contains("does not exist"), "{refused}");
    Ok(())
}
