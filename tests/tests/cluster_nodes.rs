//! Cluster, slice 2: agents renew their host certificates before they expire, heartbeat to the
//! auth server, and show in `control nodes ls`; `control nodes rm` cuts an agent off. Real
//! processes on loopback: an auth server (`control` without databases) and agents configured
//! with `control db configure create --auth-server ...`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sluice_control::ca::{host_identity_from_cert, not_after, spki_pin, Identity};
use sluice_control::demo::ControlProc;
use sluice_tests::{
    auth_control, ca_pin, client_config_from_pem, join_token, raw_connect, ssl_request, start_auth, start_auth_with,
    wait_until, AgentProc, ClientCert, TestDir,
};
use time::OffsetDateTime;

const START: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

/// `control nodes ls --format json` on the auth server.
fn nodes(auth: &ControlProc) -> Result<Vec<serde_json::Value>> {
    let out = auth_control(auth, &["nodes", "ls", "--format", "json"])?;
    serde_json::from_str(out.trim()).with_context(|| format!("nodes ls printed {out:?}"))
}

fn node<'a>(nodes: &'a [serde_json::Value], host_id: &str) -> Option<&'a serde_json::Value> {
    nodes.iter().find(|n| n["host_id"] == host_id)
}

/// A user's client certificate from the auth server's CA (what `sluice db login` gets).
fn user_cert(auth: &ControlProc) -> Result<ClientCert> {
    let ca = auth.state()?.ensure_ca("sluice")?;
    let key = rcgen::KeyPair::generate()?;
    let now = OffsetDateTime::now_utc();
    let user = Identity { v: 1, user: "alice".into(), route: None };
    let cert_pem = ca.issue_client(&user, &key.public_key_pem(), now, now + time::Duration::hours(1))?;
    Ok(ClientCert { cert_pem, key_pem: key.serialize_pem() })
}

/// The agent's own host certificate and key, as files in its identity directory hold them.
fn host_cert(agent: &AgentProc) -> Result<ClientCert> {
    let read = |name: &str| std::fs::read_to_string(agent.identity_dir().join(name));
    Ok(ClientCert { cert_pem: read("host.crt")?, key_pem: read("host.key")? })
}

/// The chain the agent's PostgreSQL listener presents, verified against `ca_pem` for 127.0.0.1
/// (SSLRequest, then TLS, as libpq does).
fn presented_chain(port: u16, ca_pem: &str, client: &ClientCert) -> Result<Vec<CertificateDer<'static>>> {
    let mut tcp = raw_connect(port, Duration::from_secs(10))?;
    tcp.write_all(&ssl_request())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    if answer[0] != b'S' {
        bail!("the listener answered the SSLRequest with {:?}", answer[0] as char);
    }
    let tls = Arc::new(client_config_from_pem(ca_pem, Some(client))?);
    let mut conn = rustls::ClientConnection::new(tls, ServerName::try_from("127.0.0.1")?.to_owned())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(conn.peer_certificates().context("no server certificate")?.iter().map(|c| c.clone().into_owned()).collect())
}

/// One HTTP/1.1 POST to the auth server's cluster API over TLS (verified against `ca_pem`),
/// presenting `client` if given; the status code and body.
fn cluster_post(
    auth: &ControlProc,
    ca_pem: &str,
    client: Option<&ClientCert>,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, String)> {
    let addr = auth.config.auth_service.cluster_listen_addr.context("no cluster listener")?;
    let tcp = raw_connect(addr.port(), Duration::from_secs(10))?;
    let tls = Arc::new(client_config_from_pem(ca_pem, client)?);
    let conn = rustls::ClientConnection::new(tls, ServerName::try_from("127.0.0.1")?.to_owned())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    // The server may close without close_notify after `Connection: close`; what came is enough.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn unix_ms_now() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[test]
fn host_certificate_is_renewed_before_it_expires() -> Result<()> {
    let dir = TestDir::new("cluster-renew")?;
    let auth = start_auth_with(dir.path(), |c| c.auth_service.host_cert_ttl = Duration::from_secs(15))?;
    let pin = ca_pin(&auth)?;
    let mut agent = AgentProc::configure(&auth, &dir.join("agent"), &join_token(&auth, "1h")?, &pin)?;
    agent.edit_config(|c| c.db_service.heartbeat_interval = Duration::from_secs(2))?;
    agent.start()?;
    agent.wait_serving(START)?;

    let id_dir = agent.identity_dir();
    let ca_pem = std::fs::read_to_string(id_dir.join("ca.pem"))?;
    let user = user_cert(&auth)?;
    let first = presented_chain(agent.pg_port, &ca_pem, &user)?;
    let first_files = (std::fs::read(id_dir.join("host.key"))?, std::fs::read(id_dir.join("host.crt"))?);
    let first_expiry = not_after(&first[0])?;
    let first_host = host_identity_from_cert(&first[0])?;

    // Within 25 s (renewal is due after about 9.5 s of the 15 s), the listener presents a new
    // certificate; the handshake verified it against the auth server's CA.
    let started = Instant::now();
    let renewed = wait_until(Duration::from_secs(25), "a renewed certificate on the PostgreSQL listener", || {
        let chain = presented_chain(agent.pg_port, &ca_pem, &user)?;
        Ok((chain[0] != first[0]).then_some(chain))
    })?;
    eprintln!("renewed after {:?}", started.elapsed());
    assert!(not_after(&renewed[0])? > first_expiry, "the new certificate does not outlive the old one");
    assert_ne!(spki_pin(&renewed[0])?, spki_pin(&first[0])?, "the renewal kept the old key");
    assert_eq!(spki_pin(&renewed[1])?, pin, "the chain ends in the pinned CA");
    let host = host_identity_from_cert(&renewed[0])?;
    assert_eq!((host.host_id, host.node_index), (first_host.host_id.clone(), first_host.node_index));

    // The files changed (new key, new certificate) and stay private.
    assert_ne!(std::fs::read(id_dir.join("host.key"))?, first_files.0);
    assert_ne!(std::fs::read(id_dir.join("host.crt"))?, first_files.1);
    for name in ["host.key", "host.crt"] {
        assert_eq!(mode(&id_dir.join(name)), 0o600, "{name}");
    }
    assert!(!id_dir.join("host.key.new").exists() && !id_dir.join("host.crt.new").exists());
    let on_disk = CertificateDer::pem_slice_iter(&std::fs::read(id_dir.join("host.crt"))?)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    assert!(not_after(&on_disk[0])? > first_expiry, "host.crt holds the old certificate");

    // The auth server recorded and audited it.
    let ours = nodes(&auth)?;
    let n = node(&ours, &first_host.host_id).context("the node is gone")?;
    assert!(n["cert_not_after"].as_i64().unwrap_or(0) > first_expiry.unix_timestamp());
    let renewals: Vec<_> =
        auth.state()?.audit_events(1000)?.into_iter().filter(|e| e.event == "cluster.renew").collect();
    assert!(renewals.iter().any(|e| e.success && e.data["host_id"] == first_host.host_id.as_str()));

    // Past the first certificate's expiry the agent still calls the auth server: its client
    // side presents the renewed certificate too (an expired one fails the handshake).
    let after_expiry = (first_expiry.unix_timestamp() + 1) * 1000;
    wait_until(Duration::from_secs(20), "a heartbeat after the first certificate expired", || {
        let now = unix_ms_now();
        let ours = nodes(&auth)?;
        let at = node(&ours, &first_host.host_id).and_then(|n| n["last_heartbeat_ms"].as_i64()).unwrap_or(0);
        Ok((now > after_expiry && at > after_expiry).then_some(()))
    })?;
    assert!(agent.log_text().contains("host certificate renewed"), "{}", agent.log_text());
    Ok(())
}

#[test]
fn cluster_calls_need_an_agents_host_certificate() -> Result<()> {
    let dir = TestDir::new("cluster-mtls")?;
    let auth = start_auth(dir.path())?;
    let mut agent = AgentProc::configure(&auth, &dir.join("agent"), &join_token(&auth, "1h")?, &ca_pin(&auth)?)?;
    agent.start()?;
    agent.wait_serving(START)?;
    let ca_pem = std::fs::read_to_string(agent.identity_dir().join("ca.pem"))?;
    // The agent's own first heartbeat lands, then it stops: the calls below speak for it, with
    // its certificate, and nothing overwrites what they report.
    wait_until(Duration::from_secs(10), "the agent's first heartbeat", || {
        Ok(nodes(&auth)?.first().is_some_and(|n| n["status"] == "healthy").then_some(()))
    })?;
    agent.stop();
    let beat = serde_json::json!({
        "postgres_addr": "127.0.0.1:1", "databases": [], "sessions": 0, "version": "test", "interval_ms": 60_000
    });

    // A user's certificate, from the same CA, is no host certificate.
    let user = user_cert(&auth)?;
    let (status, body) = cluster_post(&auth, &ca_pem, Some(&user), "/v1/heartbeat", &beat)?;
    assert_eq!(status, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(err["error"]["code"], "no_host_certificate");
    let key = rcgen::KeyPair::generate()?;
    let renew = serde_json::json!({ "public_key_pem": key.public_key_pem(), "dns_names": ["127.0.0.1"] });
    assert_eq!(cluster_post(&auth, &ca_pem, Some(&user), "/v1/renew", &renew)?.0, 401);
    // No certificate at all.
    assert_eq!(cluster_post(&auth, &ca_pem, None, "/v1/heartbeat", &beat)?.0, 401);

    // The agent's host certificate is accepted, and the report lands in `nodes ls`.
    let host = host_cert(&agent)?;
    let (status, body) = cluster_post(&auth, &ca_pem, Some(&host), "/v1/heartbeat", &beat)?;
    assert_eq!((status, body.trim()), (200, "{}"));
    let listed = nodes(&auth)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["postgres_addr"], "127.0.0.1:1");
    assert_eq!(listed[0]["version"], "test");
    // A malformed one is refused and changes nothing.
    let (status, _) = cluster_post(&auth, &ca_pem, Some(&host), "/v1/heartbeat", &serde_json::json!({"x": 1}))?;
    assert_eq!(status, 400);
    let zero = serde_json::json!({ "postgres_addr": "127.0.0.1:2", "interval_ms": 0 });
    assert_eq!(cluster_post(&auth, &ca_pem, Some(&host), "/v1/heartbeat", &zero)?.0, 400);
    assert_eq!(nodes(&auth)?[0]["postgres_addr"], "127.0.0.1:1");
    Ok(())
}

#[test]
fn nodes_ls_shows_health_and_nodes_rm_cuts_an_agent_off() -> Result<()> {
    let dir = TestDir::new("cluster-nodes")?;
    // Short certificates, so that the removed agent also tries to renew during the test.
    let auth = start_auth_with(dir.path(), |c| c.auth_service.host_cert_ttl = Duration::from_secs(15))?;
    let pin = ca_pin(&auth)?;
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        let mut agent = AgentProc::configure(&auth, &dir.join(name), &join_token(&auth, "1h")?, &pin)?;
        agent.edit_config(|c| c.db_service.heartbeat_interval = Duration::from_secs(2))?;
        agent.start()?;
        agent.wait_serving(START)?;
        agents.push(agent);
    }
    let host_id = |agent: &AgentProc| -> Result<String> {
        let id: serde_json::Value =
            serde_json::from_slice(&std::fs::read(agent.identity_dir().join("identity.json"))?)?;
        Ok(id["host_id"].as_str().context("no host_id")?.to_owned())
    };
    let (a, b) = (host_id(&agents[0])?, host_id(&agents[1])?);

    // Both healthy, each with the address it serves PostgreSQL on.
    let listed = wait_until(Duration::from_secs(10), "both agents healthy", || {
        let listed = nodes(&auth)?;
        let healthy = [&a, &b].iter().all(|id| node(&listed, id).is_some_and(|n| n["status"] == "healthy"));
        Ok(healthy.then_some(listed))
    })?;
    for (id, agent) in [(&a, &agents[0]), (&b, &agents[1])] {
        let n = node(&listed, id).context("agent not listed")?;
        assert_eq!(n["postgres_addr"], format!("127.0.0.1:{}", agent.pg_port));
        assert_eq!(n["heartbeat_interval_ms"], 2000);
        assert_eq!(n["sessions"], 0);
    }
    let table = auth_control(&auth, &["nodes", "ls"])?;
    assert!(table.starts_with("Host ID"), "{table}");
    assert!(table.contains(&a) && table.contains("healthy") && table.contains("s ago"), "{table}");

    // SIGKILL: offline within two heartbeats (1.5 intervals plus a second of slack, from the
    // last beat), and a second for this machine's load.
    agents[0].kill()?;
    let killed = Instant::now();
    wait_until(Duration::from_secs(5), "the killed agent shown offline", || {
        let listed = nodes(&auth)?;
        Ok(node(&listed, &a).is_some_and(|n| n["status"] == "offline").then_some(()))
    })?;
    eprintln!("offline after {:?}", killed.elapsed());
    assert_eq!(node(&nodes(&auth)?, &b).map(|n| n["status"].clone()), Some("healthy".into()));

    // Both agents have the same (host) name: removing by name is refused, naming both ids.
    let name = node(&listed, &a).and_then(|n| n["name"].as_str()).context("no name")?.to_owned();
    let out = std::process::Command::new(sluice_control::demo::find_bin("control")?)
        .arg("--config")
        .arg(&auth.config_path)
        .args(["nodes", "rm", &name])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&a) && stderr.contains(&b), "{stderr}");
    assert_eq!(nodes(&auth)?.len(), 2, "an ambiguous rm removed something");

    // Removed by host id: gone from the list; its next heartbeat and renewal are refused.
    let removed_at = agents[1].log_text().len();
    auth_control(&auth, &["nodes", "rm", &b])?;
    assert!(node(&nodes(&auth)?, &b).is_none());
    assert!(node(&nodes(&auth)?, &a).is_some());
    let refused = |what: &str| {
        let log = agents[1].log_text();
        let new = &log[removed_at.min(log.len())..];
        new.lines().any(|l| l.contains(what) && l.contains("node_removed"))
    };
    wait_until(Duration::from_secs(5), "the removed agent's heartbeat refused", || {
        Ok(refused("heartbeat failed").then_some(()))
    })?;
    wait_until(Duration::from_secs(20), "the removed agent's renewal refused", || {
        Ok(refused("renewing the host certificate failed").then_some(()))
    })?;
    // It keeps running (and retrying) rather than exit.
    assert!(agents[1].wait_exit(Duration::from_millis(500)).is_err(), "the removed agent exited");
    assert!(node(&nodes(&auth)?, &b).is_none(), "a refused call brought the node back");
    Ok(())
}
