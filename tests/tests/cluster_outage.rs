//! Cluster, slice 4: an agent outlives its auth server's absence. With the auth server stopped
//! (SIGSTOP: its sockets stay open and silent, the worst case), live sessions go on, new ones
//! are admitted from the cached policy until `db_service.max_policy_staleness` and refused after
//! it (SQLSTATE 57P03, `/readyz` 503 saying why), and once the auth server is back the audit
//! events of the outage arrive there exactly once: delivering a batch again stores nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sluice_control::cluster::client::AuthClient;
use sluice_control::cluster::{AuditStored, AuditUpload};
use sluice_control::tls::ReloadableCert;
use sluice_tests::{
    auth_control, ca_pin, connect, http_get, join_token, shared_db, wait_until, AgentProc, ClientCert, Harness,
};

const START: Duration = Duration::from_secs(30);
/// Longer than the issue's 30 s outage, so that the whole of it is served from the cache.
const MAX_STALENESS: Duration = Duration::from_secs(35);
/// How long the auth server stays away with new sessions still admitted.
const OUTAGE: Duration = Duration::from_secs(30);

async fn one_session(port: u16, h: &Harness, cert: &ClientCert) -> Result<i32> {
    let c = connect(port, "alice", "demo", h.tls(Some(cert))?).await?;
    let v: i32 = c.client.query_one("select 7", &[]).await?.get(0);
    c.close().await?;
    Ok(v)
}

/// Event ids in the agent's own JSON audit file.
fn agent_event_ids(agent: &AgentProc) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(agent.config.audit_json_file())?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v["event_id"].as_str().map(str::to_owned).context("an event without event_id")
        })
        .collect()
}

/// How many times each event id is stored on the auth server.
fn auth_event_counts(h: &Harness) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for row in h.audit()? {
        if let Some(id) = row.data["event_id"].as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

#[test]
fn sessions_survive_the_auth_servers_absence_and_audit_arrives_once() -> Result<()> {
    let h = Harness::start("cluster-outage")?;
    h.state.upsert_database(&shared_db(&h, "orders", &[("env", "dev")])?)?;
    let token = join_token(&h.stack.control, "1h")?;
    let pin = ca_pin(&h.stack.control)?;
    let mut agent = AgentProc::configure(&h.stack.control, &h.dir.join("agent"), &token, &pin)?;
    agent.config.db_service.max_policy_staleness = MAX_STALENESS;
    agent.with_dataplane()?;
    let metrics = agent.with_metrics()?;
    let metrics_addr = metrics.trim_start_matches("http://").trim_end_matches("/metrics").to_owned();
    agent.start()?;
    agent.wait_serving(START)?;
    agent.wait_following(START)?;
    let rt = sluice_tests::runtime()?;
    let cert = h.issue_cert("alice", "orders", "alice", "demo")?;
    assert_eq!(rt.block_on(one_session(agent.pg_port, &h, &cert))?, 7);
    assert_eq!(http_get(&metrics_addr, "/readyz")?.status, 200);

    let live = rt.block_on(connect(agent.pg_port, "alice", "demo", h.tls(Some(&cert))?))?;
    h.stack.control.proc.signal(Signal::SIGSTOP);
    let stopped = std::time::Instant::now();
    let outcome = (|| -> Result<()> {
        // Within max_policy_staleness: admitted from the cache, the live session untouched, and
        // /readyz says the agent is degraded, still ready.
        for _ in 0..3 {
            assert_eq!(rt.block_on(one_session(agent.pg_port, &h, &cert))?, 7);
        }
        std::thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
        assert_eq!(rt.block_on(one_session(agent.pg_port, &h, &cert))?, 7, "refused within the outage");
        let ready = http_get(&metrics_addr, "/readyz")?;
        assert!(ready.status == 200 && ready.body.contains("degraded"), "{} {}", ready.status, ready.body);
        let v: i32 = rt.block_on(live.client.query_one("select 9", &[]))?.get(0);
        assert_eq!(v, 9);
        eprintln!("[cluster-outage] sessions admitted {:?} into the outage", stopped.elapsed());
        // Past it: refused, and /readyz says why; the live session still runs.
        let refused = wait_until(MAX_STALENESS + Duration::from_secs(10), "the cached policy to expire", || {
            Ok(rt.block_on(one_session(agent.pg_port, &h, &cert)).err().map(|e| {
                match e.downcast_ref::<tokio_postgres::Error>() {
                    // The Debug form names the SQLSTATE.
                    Some(pg) => format!("{pg:?}"),
                    None => format!("{e:?}"),
                }
            }))
        })?;
        eprintln!("[cluster-outage] refused {:?} after the auth server stopped", stopped.elapsed());
        // The policy's age counts from the last line heard (a ping at most 2 s before the stop).
        assert!(
            stopped.elapsed() >= MAX_STALENESS - Duration::from_millis(2500),
            "refused before max_policy_staleness"
        );
        assert!(refused.contains("57P03") && refused.contains("max_policy_staleness"), "{refused}");
        let ready = http_get(&metrics_addr, "/readyz")?;
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(ready.body.contains("max_policy_staleness (35 s)"), "{}", ready.body);
        let v: i32 = rt.block_on(live.client.query_one("select 8", &[]))?.get(0);
        assert_eq!(v, 8, "the live session ended while the auth server was away");
        Ok(())
    })();
    h.stack.control.proc.signal(Signal::SIGCONT);
    outcome?;
    eprintln!("[cluster-outage] auth server stopped for {:?}", stopped.elapsed());

    // Back: admitted again, ready again, and every event the agent recorded stored once.
    wait_until(Duration::from_secs(30), "sessions admitted again", || {
        Ok(rt.block_on(one_session(agent.pg_port, &h, &cert)).ok())
    })?;
    assert_eq!(http_get(&metrics_addr, "/readyz")?.status, 200);
    rt.block_on(live.close())?;
    let ids = wait_until(Duration::from_secs(30), "the agent's audit events on the auth server", || {
        let ids = agent_event_ids(&agent)?;
        let counts = auth_event_counts(&h)?;
        Ok(ids.iter().all(|id| counts.contains_key(id)).then_some(ids))
    })?;
    // Starts and ends of the 1 + 3 + 1 + refused + 1 + live sessions, at least.
    assert!(ids.len() >= 12, "only {} events recorded by the agent", ids.len());
    let counts = auth_event_counts(&h)?;
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "event {id} stored {:?} times", counts.get(id));
    }
    let stamped = h.audit()?.into_iter().filter(|r| ids.contains(r.data["event_id"].as_str().unwrap_or_default()));
    assert!(stamped.into_iter().all(|r| r.data["agent"]["node"].is_string()), "events not stamped with their agent");

    // Delivering the same events again (an answer lost in transit) stores nothing.
    let identity = agent.identity_dir();
    let chain = CertificateDer::pem_file_iter(identity.join("host.crt"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(identity.join("host.key"))?;
    let client = AuthClient::new(
        &agent.config.join.as_ref().context("no join section")?.auth_servers,
        &pin,
        Some(ReloadableCert::new(chain, key)?),
    )?;
    let again: Vec<serde_json::Value> = std::fs::read_to_string(agent.config.audit_json_file())?
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|e| ids.contains(e["event_id"].as_str().unwrap_or_default()))
        .collect();
    let answer: AuditStored =
        rt.block_on(client.post_json("/v1/audit", &AuditUpload { events: again.clone() }, Duration::from_secs(10)))?;
    assert_eq!((answer.stored, answer.duplicates), (0, again.len()));
    // (Other events may arrive meanwhile: the agent keeps uploading its own.)
    let after = auth_event_counts(&h)?;
    for e in &again {
        let id = e["event_id"].as_str().unwrap_or_default();
        assert_eq!(after.get(id), Some(&1), "event {id} stored again by a second delivery");
    }

    // A removed node's watch is closed and cannot be reopened (its cached policy then ages out
    // as above).
    let identity: serde_json::Value = serde_json::from_slice(&std::fs::read(identity.join("identity.json"))?)?;
    let host_id = identity["host_id"].as_str().context("no host_id")?;
    auth_control(&h.stack.control, &["nodes", "rm", host_id])?;
    wait_until(Duration::from_secs(20), "the removed agent's watch refused", || {
        Ok(agent.log_text().contains("node_removed").then_some(()))
    })?;
    assert!(
        std::fs::read_to_string(h.control_log())?.contains("node removed from the cluster; closing its watch"),
        "the auth server did not close the removed node's watch"
    );
    Ok(())
}
