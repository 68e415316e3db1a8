//! Cluster, part 2 (issue 12): two auth nodes A and B on one PostgreSQL, two agents, no single
//! point of failure. Real processes on loopback: the test stack gives the upstream (PostgreSQL
//! behind the RDS Proxy emulator) that the agents serve; a second PostgreSQL (TLS, password
//! file) holds the auth state of both nodes, whose CA key is sealed under one KEK file. Agent 1
//! knows the auth servers as `[A, B]` and follows A, agent 2 as `[B, A]` and follows B.
//!
//! A lock placed through one node ends, within a second, a session on the agent that follows the
//! other (the change feed carries it across nodes). Killing A with SIGKILL mid-session ends no
//! session and fails no query on agent 1; the agent follows B within seconds and goes on
//! admitting sessions, renewing its certificate and heartbeating through B; `sluice login` and
//! `db login` work against B, and a login made through A goes on working through B. The two
//! agents, joining at once through different nodes, get distinct node indexes, and logins made
//! concurrently through both nodes all succeed, each a web session both nodes serve.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sluice_control::config::Config;
use sluice_control::demo::{dev_role, find_bin, AwsCreds, ControlProc};
use sluice_control::state::{OpenMode, State};
use sluice_tests::{
    auth_control, ca_pin, check_output, client_config_from_pem, cluster_addr, connect, followed_auth_server,
    join_token, parse_env_exports, psql_query, route_identity, shared_db, start_auth_with, wait_until, AgentProc,
    ClientCert, Connected, Harness, StoragePg,
};

const START: Duration = Duration::from_secs(30);

/// Each test runs a whole cluster; two at once on a small machine would blur the timings.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two auth nodes on one storage PostgreSQL and two agents, one following each.
///
/// Fields drop in order: agents, auth nodes and the admin handle before the storage they use,
/// the harness (and its directory) last.
struct Cluster {
    agent1: AgentProc,
    agent2: AgentProc,
    metrics1: String,
    metrics2: String,
    a: ControlProc,
    b: ControlProc,
    addr_a: String,
    addr_b: String,
    /// An admin handle on the shared state (as `control` admin verbs open it).
    admin: State,
    ca_pem: String,
    ca_file: std::path::PathBuf,
    _storage: StoragePg,
    h: Harness,
}

impl Cluster {
    fn start(name: &str) -> Result<Cluster> {
        let started = Instant::now();
        // The stack's control is not part of the cluster: the stack is there for the upstream.
        let h = Harness::start_opts(name, &AwsCreds::demo(), false)?;
        let storage = StoragePg::start(&h.dir.join("storage"))?;
        let kek = h.dir.join("kek");
        sluice_control::kek::generate_file(&kek)?;
        let on_pg = storage.storage_config(&kek);
        let node = |dir: &Path| {
            let storage = on_pg.clone();
            start_auth_with(dir, move |c: &mut Config| {
                c.auth_service.storage = storage;
                // Renewal is due about 10 s into a 15 s certificate: renewals happen in the test.
                c.auth_service.host_cert_ttl = Duration::from_secs(15);
            })
        };
        let a = node(&h.dir.join("a"))?;
        let b = node(&h.dir.join("b"))?;
        // Each node's second start (the one on the edited config) serves the shared state. (The
        // first may be stopped before it logs; the second binds its ports before it logs.)
        for node in [&a, &b] {
            wait_until(Duration::from_secs(10), "`control is serving` from PostgreSQL", || {
                let log = control_log(node);
                Ok(log
                    .lines()
                    .any(|l| l.contains("control is serving") && l.contains("storage=\"postgres\""))
                    .then_some(()))
            })?;
        }

        // One CA, in the shared state, for both nodes. The first start of each node (before its
        // config named the storage) made a throwaway SQLite state with a CA of its own: the
        // agents below join with the shared pin, which only a node serving the shared state
        // passes.
        let pin = ca_pin(&a)?;
        assert_eq!(ca_pin(&b)?, pin, "A and B present different CAs");
        let cluster = a.config.auth_service.cluster_name.clone();
        let admin = State::open_configured(&a.config, OpenMode::Admin)?;
        assert_eq!(admin.backend(), "postgres");
        let ca = admin.ensure_ca(&cluster)?;
        assert_eq!(ca.pin()?, pin);
        for dir in [&a.config.data_dir, &b.config.data_dir] {
            let throwaway = State::open(dir)?.ensure_ca(&cluster)?.pin()?;
            assert_ne!(throwaway, pin, "the throwaway SQLite CA is the shared one: the pin proves nothing");
        }
        let ca_file = h.dir.join("cluster-ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem)?;

        // Alice, her role and the database the agents serve, in the shared state.
        admin.upsert_role(&dev_role("dev", &["demo"], &["alice"])?)?;
        admin.add_user("alice", &h.password, &["dev".to_owned()])?;
        admin.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;

        // The agents join at once, one through each node, with a token made through A.
        let token = join_token(&a, "1h")?;
        let (addr_a, addr_b) = (cluster_addr(&a)?, cluster_addr(&b)?);
        let (mut agent1, metrics1) = agent(&h, "agent1", &[addr_a.clone(), addr_b.clone()], &token, &pin)?;
        let (mut agent2, metrics2) = agent(&h, "agent2", &[addr_b.clone(), addr_a.clone()], &token, &pin)?;
        for agent in [&mut agent1, &mut agent2] {
            agent.wait_serving(START)?;
            agent.wait_following(START)?;
        }
        // Each follows the first address it knows.
        wait_until(Duration::from_secs(5), "each agent following its first auth server", || {
            Ok((followed_auth_server(&metrics1)?.as_deref() == Some(addr_a.as_str())
                && followed_auth_server(&metrics2)?.as_deref() == Some(addr_b.as_str()))
            .then_some(()))
        })?;
        // Both report `orders` in their heartbeats: the auth nodes list it to clients only then.
        wait_until(Duration::from_secs(10), "both agents reporting orders", || {
            let listed = nodes(&b)?;
            let reporting = listed.iter().filter(|n| n["databases"] == serde_json::json!(["orders"])).count();
            Ok((reporting == 2).then_some(()))
        })?;
        eprintln!("[{name}] cluster started in {:.1?}", started.elapsed());
        Ok(Cluster {
            agent1,
            agent2,
            metrics1,
            metrics2,
            a,
            b,
            addr_a,
            addr_b,
            admin,
            ca_pem: ca.cert_pem,
            ca_file,
            _storage: storage,
            h,
        })
    }

    /// A client certificate for alice on `orders` (as `demo`), from the shared CA.
    fn cert(&self) -> Result<ClientCert> {
        let ca = self.admin.ensure_ca(&self.a.config.auth_service.cluster_name)?;
        let key = rcgen::KeyPair::generate()?;
        let now = time::OffsetDateTime::now_utc();
        let cert_pem = ca.issue_client(
            &route_identity("alice", "orders", "alice", "demo"),
            &key.public_key_pem(),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )?;
        Ok(ClientCert { cert_pem, key_pem: key.serialize_pem() })
    }

    async fn session(&self, port: u16, cert: &ClientCert) -> Result<Connected> {
        let c = connect(port, "alice", "demo", client_config_from_pem(&self.ca_pem, Some(cert))?).await?;
        let v: i32 = c.client.query_one("select 7", &[]).await?.get(0);
        ensure!(v == 7);
        Ok(c)
    }

    /// The error a new session on `port` is refused with.
    async fn refusal(&self, port: u16, cert: &ClientCert) -> Result<String> {
        match self.session(port, cert).await {
            Ok(c) => {
                c.close().await?;
                anyhow::bail!("the session was admitted")
            }
            Err(e) => Ok(format!("{e:?}")),
        }
    }

    /// Whether a new session on `port` is admitted.
    fn admits(&self, rt: &tokio::runtime::Runtime, port: u16, cert: &ClientCert) -> Result<bool> {
        Ok(match rt.block_on(self.session(port, cert)) {
            Ok(c) => {
                rt.block_on(c.close())?;
                true
            }
            Err(_) => false,
        })
    }
}

/// An agent named `name` knowing `servers` (in this order), heartbeating every second, with
/// metrics; started. Its metrics URL.
fn agent(h: &Harness, name: &str, servers: &[String], token: &str, pin: &str) -> Result<(AgentProc, String)> {
    let mut agent = AgentProc::configure_with_auth_servers(servers, &h.dir.join(name), token, pin)?;
    agent.edit_config(|c| {
        c.db_service.heartbeat_interval = Duration::from_secs(1);
        if let Some(join) = c.join.as_mut() {
            join.node_name = Some(name.to_owned());
        }
    })?;
    let metrics = agent.with_metrics()?;
    agent.start()?;
    Ok((agent, metrics))
}

fn host_id(agent: &AgentProc) -> Result<String> {
    let id: serde_json::Value = serde_json::from_slice(&std::fs::read(agent.identity_dir().join("identity.json"))?)?;
    Ok(id["host_id"].as_str().context("no host_id in identity.json")?.to_owned())
}

/// `control nodes ls --format json` run with `auth`'s config.
fn nodes(auth: &ControlProc) -> Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(auth_control(auth, &["nodes", "ls", "--format", "json"])?.trim())?)
}

fn node(auth: &ControlProc, host_id: &str) -> Result<serde_json::Value> {
    nodes(auth)?.into_iter().find(|n| n["host_id"] == host_id).context("the agent is not in nodes ls")
}

fn control_log(auth: &ControlProc) -> String {
    let log = auth.config_path.parent().map(|d| d.join("control.log")).unwrap_or_default();
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Lines of the agent's log saying it moved from one auth server to another.
fn moves(agent: &AgentProc) -> Vec<String> {
    agent.log_text().lines().filter(|l| l.contains("moving to another auth server")).map(str::to_owned).collect()
}

/// Runs `select pg_sleep(30)` on `on` while `control locks add --user alice` runs with `auth`'s
/// config 300 ms in. Returns how long after the command started the query failed, and the
/// command's stdout.
fn lock_while_sleeping(rt: &tokio::runtime::Runtime, on: &Connected, auth: &ControlProc) -> Result<(Duration, String)> {
    let control = find_bin("control")?;
    let (ended, lock) = rt.block_on(async {
        let ended = async {
            match tokio::time::timeout(Duration::from_secs(20), on.client.simple_query("select pg_sleep(30)")).await {
                Ok(Err(_)) => Ok(Instant::now()),
                Ok(Ok(_)) => anyhow::bail!("the query finished: the session was not ended"),
                Err(_) => anyhow::bail!("the session was still running 20 s later"),
            }
        };
        let lock = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let at = Instant::now();
            let out = tokio::process::Command::new(&control)
                .arg("--config")
                .arg(&auth.config_path)
                .args(["locks", "add", "--user", "alice", "--message", "offboarding"])
                .output()
                .await?;
            Ok::<_, anyhow::Error>((at, out))
        };
        tokio::join!(ended, lock)
    });
    let (asked_at, out) = lock?;
    let stdout = check_output("control locks add", &out)?;
    let ended = ended?;
    Ok((ended.saturating_duration_since(asked_at), stdout))
}

/// The id in `lock ID created`.
fn lock_id(stdout: &str) -> Result<String> {
    let id = stdout.trim().strip_prefix("lock ").and_then(|r| r.strip_suffix(" created"));
    Ok(id.with_context(|| format!("unexpected output {stdout:?}"))?.to_owned())
}

#[test]
fn a_lock_placed_through_one_auth_node_ends_a_session_on_an_agent_following_the_other() -> Result<()> {
    let _serial = serial();
    let c = Cluster::start("cluster-ha-lock")?;
    let rt = sluice_tests::runtime()?;
    let cert = c.cert()?;

    // The two agents joined at once, through different nodes, and got distinct indexes from
    // the one shared table.
    let listed = nodes(&c.b)?;
    let mut indexes: Vec<i64> = listed.iter().filter_map(|n| n["node_index"].as_i64()).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![1, 2], "{listed:#?}");
    // `control status` through either node lists both auth servers as serving, on PostgreSQL.
    let status = auth_control(&c.a, &["status"])?;
    assert!(status.contains("Storage           postgres"), "{status}");
    let cluster_addrs: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("Auth node") && l.contains("serving"))
        .filter_map(|l| l.split("cluster ").nth(1)?.split(',').next())
        .collect();
    assert!(
        cluster_addrs.contains(&c.addr_a.as_str()) && cluster_addrs.contains(&c.addr_b.as_str()),
        "both auth nodes should be listed as serving: {status}"
    );

    // Agent 1 follows A; the lock goes in through B.
    let live = rt.block_on(c.session(c.agent1.pg_port, &cert))?;
    let (took, out) = lock_while_sleeping(&rt, &live, &c.b)?;
    eprintln!("[cluster-ha] lock through B ended the session on agent 1 (following A) {took:?} after `locks add`");
    assert!(took < Duration::from_secs(1), "the session ended {took:?} after the lock");
    let id = lock_id(&out)?;
    for agent in [&c.agent1, &c.agent2] {
        let refused = rt.block_on(c.refusal(agent.pg_port, &cert))?;
        assert!(refused.contains("locked") && refused.contains("offboarding"), "{refused}");
    }

    // Lifted through A: both agents admit again.
    auth_control(&c.a, &["locks", "rm", &id])?;
    wait_until(Duration::from_secs(5), "the lock lifted on both agents", || {
        Ok((c.admits(&rt, c.agent1.pg_port, &cert)? && c.admits(&rt, c.agent2.pg_port, &cert)?).then_some(()))
    })?;

    // Agent 2 follows B; the lock goes in through A.
    let live = rt.block_on(c.session(c.agent2.pg_port, &cert))?;
    let (took, _) = lock_while_sleeping(&rt, &live, &c.a)?;
    eprintln!("[cluster-ha] lock through A ended the session on agent 2 (following B) {took:?} after `locks add`");
    assert!(took < Duration::from_secs(1), "the session ended {took:?} after the lock");

    // Nobody moved: each agent followed its own node throughout.
    assert_eq!(followed_auth_server(&c.metrics1)?.as_deref(), Some(c.addr_a.as_str()));
    assert_eq!(followed_auth_server(&c.metrics2)?.as_deref(), Some(c.addr_b.as_str()));
    assert!(moves(&c.agent1).is_empty() && moves(&c.agent2).is_empty());
    Ok(())
}

#[test]
fn killing_auth_node_a_mid_session_moves_its_agent_to_b_and_ends_no_session() -> Result<()> {
    let _serial = serial();
    let mut c = Cluster::start("cluster-ha-kill")?;
    let rt = sluice_tests::runtime()?;
    let cert = c.cert()?;
    let api = |auth: &ControlProc| format!("127.0.0.1:{}", auth.api_port);
    let ca_file = c.ca_file.to_string_lossy().into_owned();

    // A login through A, before it dies (its web session is in the shared state).
    let home_a = c.h.dir.join("home-a");
    let out = c.h.sluice_as(
        &home_a,
        &c.h.password,
        ["login", "--proxy", &api(&c.a), "--user", "alice", "--ca-file", &ca_file],
    )?;
    check_output("sluice login (A)", &out)?;

    // A session through agent 1 (following A), asking `select 1` every 100 ms.
    let live = rt.block_on(c.session(c.agent1.pg_port, &cert))?;
    let client = Arc::new(live.client);
    let pid = |client: &tokio_postgres::Client| -> Result<i32> {
        Ok(rt.block_on(client.query_one("select pg_backend_pid()", &[]))?.get(0))
    };
    let backend = pid(&client)?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU32::new(0));
    let ticker = {
        let (client, stop, answered) = (client.clone(), stop.clone(), answered.clone());
        rt.spawn(async move {
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.query_one("select 1", &[]).await {
                    Ok(row) if row.get::<_, i32>(0) == 1 => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => failed.push("select 1 answered something else".to_owned()),
                    Err(e) => failed.push(format!("{e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failed
        })
    };

    let host1 = host_id(&c.agent1)?;
    let renewed_by_b = |c: &Cluster| {
        control_log(&c.b).lines().filter(|l| l.contains("host certificate renewed") && l.contains(&host1)).count()
    };
    let renewals_by_b_before = renewed_by_b(&c);
    let not_after_before = node(&c.b, &host1)?["cert_not_after"].as_i64().unwrap_or(0);
    let renewals_logged = |agent: &AgentProc| agent.log_text().matches("host certificate renewed").count();
    let agent_renewals_before = renewals_logged(&c.agent1);
    std::thread::sleep(Duration::from_millis(500));

    // SIGKILL A: no goodbye to the agents, its connections to the storage just drop.
    let killed_at_ms = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    c.a.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let answered_before_kill = answered.load(Ordering::Relaxed);
    let killed = Instant::now();
    wait_until(Duration::from_secs(5), "A gone", || Ok((!c.a.proc.alive()).then_some(())))?;

    // Agent 1 follows B within seconds.
    wait_until(Duration::from_secs(10), "agent 1 following B", || {
        Ok((followed_auth_server(&c.metrics1)?.as_deref() == Some(c.addr_b.as_str())).then_some(()))
    })?;
    let failover = killed.elapsed();
    eprintln!("[cluster-ha] agent 1 follows B {failover:?} after A was killed");
    let moved = moves(&c.agent1);
    assert!(
        moved.iter().any(|l| l.contains(&format!("from={}", c.addr_a)) && l.contains(&format!("to={}", c.addr_b))),
        "{moved:#?}"
    );
    assert!(
        c.agent1.log_text().contains(&format!("auth_server={}", c.addr_b)),
        "no `following` line for B: {}",
        c.agent1.log_text()
    );

    // New sessions are admitted on agent 1, from the policy it now follows through B.
    let fresh = rt.block_on(c.session(c.agent1.pg_port, &cert))?;
    rt.block_on(fresh.close())?;

    // `sluice login` and `db login` against B; psql through agent 1 with what they wrote.
    let home_b = c.h.dir.join("home-b");
    let sluice_b = |args: &[&str]| -> Result<String> {
        check_output(&format!("sluice {args:?}"), &c.h.sluice_as(&home_b, &c.h.password, args)?)
    };
    sluice_b(&["login", "--proxy", &api(&c.b), "--user", "alice", "--ca-file", &ca_file])?;
    sluice_b(&["db", "login", "orders", "--db-user", "alice", "--db-name", "demo"])?;
    let mut env = parse_env_exports(&sluice_b(&["db", "env", "orders"])?)?;
    env.retain(|(k, _)| !["PGHOST", "PGPORT", "PGSSLMODE"].contains(&k.as_str()));
    env.extend([
        ("PGHOST".to_owned(), "127.0.0.1".to_owned()),
        ("PGPORT".to_owned(), c.agent1.pg_port.to_string()),
        ("PGSSLMODE".to_owned(), "verify-ca".to_owned()),
    ]);
    assert_eq!(psql_query(&env, "select 11")?, "11");

    // The login made through A works through B: the same session, asked of another node.
    let profile_path = home_a.join("profile.json");
    let mut profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile_path)?)?;
    profile["proxy"] = serde_json::json!(api(&c.b));
    std::fs::write(&profile_path, serde_json::to_vec(&profile)?)?;
    let out =
        c.h.sluice_as(&home_a, "not-asked", ["db", "login", "orders", "--db-user", "alice", "--db-name", "demo"])?;
    check_output("sluice db login through B with A's login", &out)?;

    // Heartbeats and a renewal reach B (A is gone: nothing else could have taken them).
    wait_until(Duration::from_secs(10), "a heartbeat of agent 1 after the kill", || {
        Ok((node(&c.b, &host1)?["last_heartbeat_ms"].as_i64().unwrap_or(0) > killed_at_ms).then_some(()))
    })?;
    wait_until(Duration::from_secs(30), "a renewal of agent 1 through B", || {
        let not_after = node(&c.b, &host1)?["cert_not_after"].as_i64().unwrap_or(0);
        Ok((renewed_by_b(&c) > renewals_by_b_before
            && not_after > not_after_before
            && renewals_logged(&c.agent1) > agent_renewals_before)
            .then_some(()))
    })?;
    eprintln!("[cluster-ha] agent 1 renewed through B {:?} after A was killed", killed.elapsed());

    // The session lived through all of it: no query failed, the same backend answers.
    stop.store(true, Ordering::Relaxed);
    let failed = rt.block_on(ticker)?;
    let ok = answered.load(Ordering::Relaxed);
    eprintln!(
        "[cluster-ha] {ok} queries on the live session ({answered_before_kill} before the kill), {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    // The ticker ran through the failover and well after it (one query per 100 ms).
    assert!(
        answered_before_kill >= 3 && ok >= answered_before_kill + 20,
        "only {ok} queries ran ({answered_before_kill} before the kill)"
    );
    assert_eq!(pid(&client)?, backend, "the session was reconnected");
    let log = c.agent1.log_text();
    assert!(!log.contains("session ended by control"), "{log}");
    // A call in flight to A when it died may have failed once and been retried through B.
    for line in log.lines().filter(|l| l.contains("failed") || l.contains("cannot deliver")) {
        eprintln!("[cluster-ha] agent 1: {line}");
    }
    // Agent 2 followed B all along.
    assert!(moves(&c.agent2).is_empty(), "{:#?}", moves(&c.agent2));
    assert_eq!(followed_auth_server(&c.metrics2)?.as_deref(), Some(c.addr_b.as_str()));
    Ok(())
}

#[test]
fn concurrent_logins_spread_over_both_auth_nodes_all_succeed() -> Result<()> {
    const LOGINS: usize = 60;
    const AT_ONCE: usize = 10;
    // A node counts a login against its source address while it is being checked; all of these
    // come from 127.0.0.1, so each node gets no more at once than it lets one address try.
    const _: () = assert!(AT_ONCE / 2 < sluice_control::limits::LOGIN_ATTEMPTS_PER_SOURCE as usize);
    let _serial = serial();
    let c = Cluster::start("cluster-ha-logins")?;
    let ca_file = c.ca_file.to_string_lossy().into_owned();
    let apis = [format!("127.0.0.1:{}", c.a.api_port), format!("127.0.0.1:{}", c.b.api_port)];

    // `sluice login` as alice, LOGINS times, each with its own home, by AT_ONCE workers: login i
    // by worker i % AT_ONCE, through A if i is even, else through B (half the workers each).
    // Every one must succeed.
    let started = Instant::now();
    let homes: Vec<std::path::PathBuf> = (0..LOGINS).map(|i| c.h.dir.join(format!("login-{i}"))).collect();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|w| {
                let (c, apis, ca_file, homes) = (&c, &apis, &ca_file, &homes);
                s.spawn(move || {
                    (w..LOGINS)
                        .step_by(AT_ONCE)
                        .map(|i| {
                            let api = &apis[i % 2];
                            let out = c.h.sluice_as(
                                &homes[i],
                                &c.h.password,
                                ["login", "--proxy", api, "--user", "alice", "--ca-file", ca_file],
                            )?;
                            check_output(&format!("sluice login #{i} via {api}"), &out).map(|_| ())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|_| vec![Err(anyhow::anyhow!("a worker panicked"))]))
            .collect()
    });
    let took = started.elapsed();
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).collect();
    eprintln!("[cluster-ha] {LOGINS} logins over A and B, {AT_ONCE} at a time: {took:?}, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:#?}");
    // Each node served its half.
    for auth in [&c.a, &c.b] {
        let logged_in = control_log(auth).matches("user logged in").count();
        assert_eq!(logged_in, LOGINS / 2, "{}", auth.config_path.display());
    }

    // Each login is its own web session in the shared state, and the node that did not make it
    // serves it too: its profile pointed at the other node lists alice's databases.
    let mut sessions = std::collections::HashSet::new();
    for (i, home) in homes.iter().enumerate() {
        let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(home.join("profile.json"))?)?;
        let token = profile["session"].as_str().context("no session in the profile")?.to_owned();
        let user = c.admin.web_session(&token)?.map(|s| s.0);
        assert_eq!(user.as_deref(), Some("alice"), "login #{i}'s session is not in the shared state");
        sessions.insert(token);
    }
    assert_eq!(sessions.len(), LOGINS, "logins shared a session");
    for (i, home) in homes.iter().enumerate().take(2) {
        let path = home.join("profile.json");
        let mut profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        profile["proxy"] = serde_json::json!(apis[(i + 1) % 2]);
        std::fs::write(&path, serde_json::to_vec(&profile)?)?;
        let out = c.h.sluice_as(home, "not-asked", ["db", "ls", "--format", "json"])?;
        let listed: serde_json::Value = serde_json::from_str(check_output("sluice db ls", &out)?.trim())?;
        assert!(listed.to_string().contains("orders"), "{listed}");
    }
    Ok(())
}
