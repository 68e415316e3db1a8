//! Cluster, slice 5: several agents serve one database. Real processes on loopback: the test
//! stack's control is the auth server, two agents (each with its own data plane, heartbeating
//! every second) serve the dynamic database `orders`. `sluice db ls` counts the healthy agents
//! of a database and `sluice db env` gives libpq all of them (multi-host), unless the auth
//! server's PostgreSQL address is configured (a load balancer); a CancelRequest that reaches
//! the wrong agent (or the auth server) is passed on to the one holding the session; with an agent killed, `db ls`
//! counts one and psql reaches the other, even with the old two-host environment. A `protocol:
//! mysql` database is handed out at the MySQL address of the agent that reports one (agent A
//! has a `mysql_listen_addr`; B has none and is not counted for it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_tests::{
    ca_pin, cancel_request, env_get, join_token, parse_env_exports, psql_query, raw_connect, read_to_close, shared_db,
    wait_until, write_lenient, AgentProc, Harness, RawSession,
};

const START: Duration = Duration::from_secs(30);
const SLEEP: &str = "select pg_sleep(30)";

/// An agent serving env=dev databases through its own data plane, heartbeating every second,
/// with a MySQL listen address on `mysql_port` if given.
fn start_agent(h: &Harness, name: &str, token: &str, pin: &str, mysql_port: Option<u16>) -> Result<AgentProc> {
    let mut agent = AgentProc::configure(&h.stack.control, &h.dir.join(name), token, pin)?;
    agent.edit_config(|c| {
        c.db_service.heartbeat_interval = Duration::from_secs(1);
        c.proxy_service.mysql_listen_addr = mysql_port.map(|p| ([127, 0, 0, 1], p).into());
    })?;
    agent.with_dataplane()?;
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;
    Ok(agent)
}

fn node_index(agent: &AgentProc) -> Result<u32> {
    let text = std::fs::read_to_string(agent.identity_dir().join("identity.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["node_index"].as_u64().context("no node_index")? as u32)
}

/// `orders` as `sluice db ls --format json` lists it: (agents, endpoints).
fn listed(h: &Harness) -> Result<Option<(u64, BTreeSet<String>)>> {
    let v: serde_json::Value = serde_json::from_str(&h.sluice_ok(&["db", "ls", "--format", "json"])?)?;
    let Some(db) = v.as_array().context("a JSON array")?.iter().find(|d| d["name"] == "orders") else {
        return Ok(None);
    };
    let endpoints = db["endpoints"]
        .as_array()
        .context("no endpoints")?
        .iter()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    Ok(Some((db["agents"].as_u64().context("no agents")?, endpoints)))
}

/// `shop`, a MySQL database for env=dev (its upstream is never dialled here).
fn shop(h: &Harness) -> Result<sluice_control::config::DbResource> {
    let mut db = shared_db(h, "shop", &[("env", "dev")])?;
    db.spec = serde_json::from_value(serde_json::json!({"protocol": "mysql", "uri": "127.0.0.1:1"}))?;
    Ok(db)
}

/// `shop` in `sluice db ls --format json`: (agents, endpoints).
fn listed_shop(h: &Harness) -> Result<Option<(u64, Vec<String>)>> {
    let v: serde_json::Value = serde_json::from_str(&h.sluice_ok(&["db", "ls", "--format", "json"])?)?;
    let Some(db) = v.as_array().context("a JSON array")?.iter().find(|d| d["name"] == "shop") else {
        return Ok(None);
    };
    anyhow::ensure!(db["protocol"] == "mysql", "{db}");
    let endpoints = serde_json::from_value(db["endpoints"].clone())?;
    Ok(Some((db["agents"].as_u64().context("no agents")?, endpoints)))
}

fn wait_agents(h: &Harness, n: u64, timeout: Duration) -> Result<BTreeSet<String>> {
    wait_until(timeout, &format!("{n} agents of orders in sluice db ls"), || {
        Ok(listed(h)?.and_then(|(agents, endpoints)| (agents == n).then_some(endpoints)))
    })
}

fn db_env(h: &Harness) -> Result<Vec<(String, String)>> {
    Ok(parse_env_exports(&h.sluice_ok(&["db", "env", "orders"])?)?)
}

/// How many backends are running `sql` right now (asked of PostgreSQL directly).
fn running(h: &Harness, sql: &str) -> Result<usize> {
    let q = format!("select count(*) from pg_stat_activity where state = 'active' and query = '{sql}'");
    Ok(h.stack.postgres.psql("postgres", &q)?.trim().parse()?)
}

/// Sends a CancelRequest to `port` the way libpq does (plaintext, then wait for the close).
fn send_cancel(port: u16, pid: u32, secret: u32) -> Result<()> {
    let mut s = raw_connect(port, Duration::from_secs(5))?;
    write_lenient(&mut s, &cancel_request(pid, secret))?;
    let (bytes, _) = read_to_close(&mut s, Duration::from_secs(10))?;
    anyhow::ensure!(bytes.is_empty(), "a cancel request gets no answer, got {bytes:?}");
    Ok(())
}

#[test]
fn two_agents_serve_one_database() -> Result<()> {
    let mut h = Harness::start("cluster-agents")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    h.state.upsert_database(&shop(&h)?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let mysql_port = sluice_control::demo::free_port()?;
    let mut a = start_agent(&h, "agent-a", &token, &pin, Some(mysql_port))?;
    let b = start_agent(&h, "agent-b", &token, &pin, None)?;
    let (index_a, index_b) = (node_index(&a)?, node_index(&b)?);
    assert_ne!(index_a, index_b);
    h.login()?;

    // The stack's control has an explicit postgres_public_addr: that (a load balancer, say) is
    // the one endpoint, however many agents serve the database. The auth server does not serve
    // `orders` itself (no selector of its own matches it), yet lists it and issues for it.
    let public = h.stack.control.config.proxy_service.postgres_public_addr.clone().context("no public addr")?;
    let endpoints = wait_agents(&h, 2, START)?;
    assert_eq!(endpoints, BTreeSet::from([public.clone()]));
    h.sluice_ok(&["db", "login", "orders", "--db-user", "alice", "--db-name", "demo"])?;
    let env = db_env(&h)?;
    assert_eq!(format!("{}:{}", env_get(&env, "PGHOST")?, env_get(&env, "PGPORT")?), public);

    // The MySQL database: both agents serve it, only A has a MySQL address, and that (not a
    // PostgreSQL address, not the PostgreSQL load balancer) is where MySQL clients go.
    let mysql_addr = format!("127.0.0.1:{mysql_port}");
    let shop_served = wait_until(START, "shop served over MySQL by agent A", || {
        Ok(listed_shop(&h)?.filter(|(agents, _)| *agents == 1))
    })?;
    assert_eq!(shop_served, (1, vec![mysql_addr.clone()]));
    let nodes: serde_json::Value = serde_json::from_str(&h.control_ok(&["nodes", "ls", "--format", "json"])?)?;
    let mut reported: Vec<(String, serde_json::Value)> = nodes
        .as_array()
        .context("nodes: a JSON array")?
        .iter()
        .map(|n| (n["postgres_addr"].as_str().unwrap_or_default().to_owned(), n["mysql_addr"].clone()))
        .collect();
    reported.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected = vec![
        (format!("127.0.0.1:{}", a.pg_port), serde_json::Value::from(mysql_addr.clone())),
        (format!("127.0.0.1:{}", b.pg_port), serde_json::Value::Null),
    ];
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(reported, expected);
    h.sluice_ok(&["db", "login", "shop", "--db-user", "alice", "--db-name", "demo"])?;
    let env = parse_env_exports(&h.sluice_ok(&["db", "env", "shop"])?)?;
    assert_eq!(format!("{}:{}", env_get(&env, "MYSQL_HOST")?, env_get(&env, "MYSQL_TCP_PORT")?), mysql_addr);

    // Without it, the clients get every agent.
    h.restart_control(|c| c.proxy_service.postgres_public_addr = None)?;
    let endpoints = wait_agents(&h, 2, START)?;
    let agent_addrs = BTreeSet::from([format!("127.0.0.1:{}", a.pg_port), format!("127.0.0.1:{}", b.pg_port)]);
    assert_eq!(endpoints, agent_addrs);
    let text = h.sluice_ok(&["db", "ls"])?;
    let header = text.lines().next().context("no header")?;
    assert!(header.contains("Agents"), "{text}");
    let row = text.lines().find(|l| l.starts_with("orders ")).context("no orders row")?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[cols.len() - 2..], ["2", "env=dev"], "{text}");

    let env = db_env(&h)?;
    assert_eq!(env_get(&env, "PGHOST")?, "127.0.0.1,127.0.0.1");
    let ports: BTreeSet<u16> =
        env_get(&env, "PGPORT")?.split(',').map(str::parse).collect::<Result<_, _>>().context("PGPORT")?;
    assert_eq!(ports, BTreeSet::from([a.pg_port, b.pg_port]));
    assert_eq!(psql_query(&env, "select 1")?, "1");
    let config = h.sluice_ok(&["db", "config", "orders"])?;
    assert!(config.contains("host=127.0.0.1,127.0.0.1 port="), "{config}");

    // A session on agent B, cancelled through agent A: its key names B, so A passes the
    // request on. A wrong secret is passed on too, and B ignores it.
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;
    let mut session = RawSession::open(b.pg_port, h.tls(Some(&cert))?, "alice", "demo")?;
    assert_eq!(session.pid >> 21, index_b, "the key {:#x} does not name agent B", session.pid);
    session.send_query(SLEEP)?;
    wait_until(Duration::from_secs(20), "pg_sleep running", || Ok((running(&h, SLEEP)? == 1).then_some(())))?;
    send_cancel(a.pg_port, session.pid, session.secret ^ 1)?;
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(running(&h, SLEEP)?, 1, "a cancel request with a wrong secret cancelled the query");
    let sent = Instant::now();
    send_cancel(a.pg_port, session.pid, session.secret)?;
    let error = session.finish_query(Duration::from_secs(10))?.context("pg_sleep(30) finished without an error")?;
    let took = sent.elapsed();
    eprintln!("[cluster-agents] query on agent B cancelled {took:?} after the request to agent A");
    assert_eq!(error.get(&'C').map(String::as_str), Some("57014"), "{error:?}");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    let passed_on = a.log_text().matches("cancel request passed on to its agent").count();
    assert_eq!(passed_on, 2, "agent A's log: {}", sluice_tests::tail(&a.log, 20));
    // The session goes on (after the postmaster's second signal to the cancelled backend,
    // which would cancel the next query; see cancel.rs). The auth server (node index 0) passes
    // cancel requests on too.
    std::thread::sleep(Duration::from_millis(300));
    session.send_query("select 1")?;
    assert_eq!(session.finish_query(Duration::from_secs(10))?, None);
    session.send_query(SLEEP)?;
    wait_until(Duration::from_secs(20), "pg_sleep running", || Ok((running(&h, SLEEP)? == 1).then_some(())))?;
    send_cancel(h.pg_port(), session.pid, session.secret)?;
    let error = session.finish_query(Duration::from_secs(10))?.context("pg_sleep(30) finished without an error")?;
    assert_eq!(error.get(&'C').map(String::as_str), Some("57014"), "{error:?}");

    // Agent A dies: within a few heartbeats the auth server counts one agent, a fresh
    // environment names B only, and the old one still connects (libpq moves past A).
    a.kill()?;
    let killed = Instant::now();
    let endpoints = wait_agents(&h, 1, Duration::from_secs(15))?;
    eprintln!("[cluster-agents] one agent listed {:?} after the kill", killed.elapsed());
    assert_eq!(endpoints, BTreeSet::from([format!("127.0.0.1:{}", b.pg_port)]));
    let fresh = db_env(&h)?;
    assert_eq!((env_get(&fresh, "PGHOST")?, env_get(&fresh, "PGPORT")?), ("127.0.0.1", b.pg_port.to_string().as_str()));
    assert_eq!(psql_query(&fresh, "select 2")?, "2");
    let mut old = env.clone();
    for (k, v) in old.iter_mut() {
        if k == "PGPORT" {
            *v = format!("{},{}", a.pg_port, b.pg_port);
        }
    }
    assert_eq!(psql_query(&old, "select 3")?, "3");
    drop(session);
    Ok(())
}
