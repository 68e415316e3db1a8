//! Cluster, slice 1: agents (`control` with `auth_service.enabled: false`) join an auth server
//! with a token and the CA pin, keep the host identity they get, and serve PostgreSQL TLS with
//! it; refused joins say why. Real processes on loopback: the auth server is a `control` without
//! databases, the agent is configured with `control db configure create --auth-server ...`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sluice_control::ca::{host_identity_from_cert, identity_from_cert, CaError, CertAuthority, Identity};
use sluice_control::demo::find_bin;
use sluice_tests::{
    ca_pin, check_output, client_config_from_pem, join_token, only_error, raw_connect, ssl_request, start_auth,
    startup_packet, AgentProc, ClientCert, TestDir,
};
use time::OffsetDateTime;

const START: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn cluster_join_events(auth: &sluice_control::demo::ControlProc) -> Result<Vec<sluice_control::state::AuditRow>> {
    Ok(auth.state()?.audit_events(1000)?.into_iter().filter(|e| e.event == "cluster.join").collect())
}

#[test]
fn agent_joins_and_serves_tls_with_its_host_cert() -> Result<()> {
    let dir = TestDir::new("cluster-join-ok")?;
    let auth = start_auth(dir.path())?;
    let pin = ca_pin(&auth)?;
    let mut agent = AgentProc::configure(&auth, &dir.join("agent"), &join_token(&auth, "1h")?, &pin)?;
    agent.start()?;
    agent.wait_serving(START)?;

    // The identity: private files in a private directory.
    let id_dir = agent.identity_dir();
    assert_eq!(mode(&id_dir), 0o700);
    for name in ["host.key", "host.crt", "ca.pem", "identity.json"] {
        assert_eq!(mode(&id_dir.join(name)), 0o600, "{name}");
    }
    let ca_pem = std::fs::read_to_string(id_dir.join("ca.pem"))?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())?;
    assert_eq!(sluice_control::ca::spki_pin(&ca)?, pin, "ca.pem is the auth server's CA");

    // host.crt: leaf + CA, the leaf chains to the auth CA and is valid for the listener's address.
    let chain = CertificateDer::pem_slice_iter(&std::fs::read(id_dir.join("host.crt"))?)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    assert_eq!(chain.len(), 2);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    use rustls::client::danger::ServerCertVerifier;
    verifier.verify_server_cert(&chain[0], &chain[1..], &ServerName::try_from("127.0.0.1")?, &[], UnixTime::now())?;
    let host = host_identity_from_cert(&chain[0])?;
    assert_eq!((host.role.as_str(), host.cluster.as_str(), host.v), ("db", "sluice", 1));
    assert!(matches!(identity_from_cert(&chain[0]), Err(CaError::NoIdentity)), "a host cert is no user");
    let idfile: serde_json::Value = serde_json::from_slice(&std::fs::read(id_dir.join("identity.json"))?)?;
    assert_eq!(idfile["host_id"], host.host_id.as_str());
    assert_eq!(idfile["ca_pin"], pin.as_str());

    // The auth server knows the node, and audited the join.
    let nodes = auth.state()?.nodes()?;
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].host_id.as_str(), nodes[0].node_index), (host.host_id.as_str(), host.node_index));
    let joins = cluster_join_events(&auth)?;
    assert_eq!(joins.len(), 1);
    assert!(joins[0].success);
    assert_eq!(joins[0].data["host_id"], host.host_id.as_str());

    // The PostgreSQL listener: TLS verified with ca.pem (SAN 127.0.0.1), a user certificate from
    // the same CA accepted at the TLS layer, then the session decided by the auth server's
    // policy: this certificate names no database.
    agent.wait_following(START)?;
    let auth_ca = auth.state()?.ensure_ca("sluice")?;
    let key = rcgen::KeyPair::generate()?;
    let now = OffsetDateTime::now_utc();
    let user = Identity { v: 1, user: "alice".into(), route: None };
    let cert_pem = auth_ca.issue_client(&user, &key.public_key_pem(), now, now + time::Duration::hours(1))?;
    let client = ClientCert { cert_pem, key_pem: key.serialize_pem() };
    let tls = client_config_from_pem(&ca_pem, Some(&client))?;
    let mut tcp = raw_connect(agent.pg_port, Duration::from_secs(10))?;
    tcp.write_all(&ssl_request())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    assert_eq!(answer[0], b'S');
    let conn = rustls::ClientConnection::new(Arc::new(tls), ServerName::try_from("127.0.0.1")?.to_owned())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.write_all(&startup_packet(&[("user", "alice"), ("database", "demo")]))?;
    stream.flush()?;
    let presented = stream.conn.peer_certificates().context("no server certificate")?.to_vec();
    assert_eq!(presented[0], chain[0], "the listener serves the host certificate");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let err = only_error(&got)?;
    assert_eq!(err.get(&'C').map(String::as_str), Some("28000"), "{err:?}");
    assert!(err.get(&'M').is_some_and(|m| m.contains("has no database route")), "{err:?}");

    // No state on the agent, and no private key but its own.
    for f in files_under(&agent.dir) {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        assert!(!name.starts_with("sluice.db"), "agent has a state file {}", f.display());
        if name != "host.key" {
            let text = String::from_utf8_lossy(&std::fs::read(&f)?).into_owned();
            assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", f.display());
        }
    }
    Ok(())
}

/// Starts an agent that must fail to join; returns its log.
fn refused(auth: &sluice_control::demo::ControlProc, dir: &Path, token: &str, pin: &str) -> Result<String> {
    let mut agent = AgentProc::configure(auth, dir, token, pin)?;
    agent.start()?;
    let status = agent.wait_exit(START)?;
    assert!(!status.success(), "the agent exited successfully: {}", agent.log_text());
    assert!(!agent.identity_dir().join("identity.json").exists());
    Ok(agent.log_text())
}

#[test]
fn refused_joins_say_why() -> Result<()> {
    let dir = TestDir::new("cluster-join-refused")?;
    let auth = start_auth(dir.path())?;
    let pin = ca_pin(&auth)?;

    let log = refused(&auth, &dir.join("unknown"), "0123456789abcdef0123456789abcdef", &pin)?;
    assert!(log.contains("join token not found (create one with `control tokens add --type=db`)"), "{log}");

    let expired = join_token(&auth, "1s")?;
    std::thread::sleep(Duration::from_millis(2100));
    let log = refused(&auth, &dir.join("expired"), &expired, &pin)?;
    assert!(log.contains("join token expired at 20"), "{log}");

    let (node_token, _) = auth.state()?.add_token("node", Duration::from_secs(3600))?;
    let log = refused(&auth, &dir.join("wrong-type"), &node_token, &pin)?;
    assert!(log.contains(r#"join token is of type "node"; this agent joins as "db""#), "{log}");

    let joins = cluster_join_events(&auth)?;
    let codes: Vec<&str> = joins.iter().map(|e| e.data["code"].as_str().unwrap_or_default()).collect();
    assert_eq!(codes, ["token_unknown", "token_expired", "token_wrong_type"]);
    assert!(joins.iter().all(|e| !e.success));
    assert!(auth.state()?.nodes()?.is_empty());
    Ok(())
}

#[test]
fn wrong_pin_is_refused_before_the_token_is_sent() -> Result<()> {
    let dir = TestDir::new("cluster-join-pin")?;
    let auth = start_auth(dir.path())?;
    let real = ca_pin(&auth)?;
    let other = CertAuthority::generate("impostor")?.pin()?;
    let log = refused(&auth, &dir.join("agent"), &join_token(&auth, "1h")?, &other)?;
    assert!(log.contains(&format!("auth server CA is {real}, but the config pins {other}")), "{log}");
    // The token never reached the auth server: no join was attempted there.
    assert!(cluster_join_events(&auth)?.is_empty());
    Ok(())
}

#[test]
fn restart_reuses_the_identity_without_the_token() -> Result<()> {
    let dir = TestDir::new("cluster-join-restart")?;
    let auth = start_auth(dir.path())?;
    let mut agent = AgentProc::configure(&auth, &dir.join("agent"), &join_token(&auth, "1h")?, &ca_pin(&auth)?)?;
    agent.start()?;
    agent.wait_serving(START)?;
    let first = std::fs::read(agent.identity_dir().join("identity.json"))?;
    let cert = std::fs::read(agent.identity_dir().join("host.crt"))?;
    agent.stop();
    std::fs::remove_file(&agent.token_file)?;
    std::fs::write(&agent.log, "")?;
    agent.start()?;
    agent.wait_serving(START)?;
    assert!(agent.log_text().contains("using the agent identity"), "{}", agent.log_text());
    assert_eq!(std::fs::read(agent.identity_dir().join("identity.json"))?, first);
    assert_eq!(std::fs::read(agent.identity_dir().join("host.crt"))?, cert);
    assert_eq!(auth.state()?.nodes()?.len(), 1, "no second join");
    Ok(())
}

#[test]
fn configure_create_writes_an_agent_config() -> Result<()> {
    let pin = format!("sha256:{}", "ab".repeat(32));
    let out = Command::new(find_bin("control")?)
        .args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev,team=db"])
        .args(["--auth-server", "auth.example.com:3026", "--token", "/etc/sluice/join-token"])
        .args(["--ca-pin", &pin, "--data-dir", "/var/lib/sluice-agent"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout)?;
    let expected = format!(
        "data_dir: /var/lib/sluice-agent
auth_service:
  enabled: false
proxy_service:
  postgres_listen_addr: 127.0.0.1:5433
  postgres_public_addr: null
  public_names: []
  handshake_timeout: 10s
  idle_timeout: 0s
  limits:
    max_connections: 8192
    max_unauthenticated: 512
    max_unauthenticated_per_source: 32
db_service:
  databases: []
  resources:
  - labels:
      env: dev
      team: db
    aws: null
  max_policy_staleness: 600s
  heartbeat_interval: 10s
audit:
  json_file: null
join:
  auth_servers:
  - auth.example.com:3026
  token_file: /etc/sluice/join-token
  ca_pin: {pin}
"
    );
    assert_eq!(yaml, expected);
    let cfg: sluice_control::config::Config = sluice_control::config::from_yaml(&yaml)?;
    cfg.validate()?;
    assert!(cfg.is_agent());

    // All three or none.
    let partial = Command::new(find_bin("control")?)
        .args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev"])
        .args(["--auth-server", "auth.example.com:3026"])
        .output()?;
    assert!(!partial.status.success());
    // A malformed pin is refused when the config is written, not when the agent starts.
    let bad = Command::new(find_bin("control")?)
        .args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev"])
        .args(["--auth-server", "a:3026", "--token", "/t", "--ca-pin", "sha256:nothex"])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ca_pin"));

    // Several auth servers: the flag repeated, or a comma list, in the order given.
    let several = Command::new(find_bin("control")?)
        .args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev"])
        .args(["--auth-server", "a.example:3026", "--auth-server", "b.example:3026,c.example:4026"])
        .args(["--token", "/t", "--ca-pin", &pin])
        .output()?;
    let yaml = check_output("configure create with several auth servers", &several)?;
    let cfg: sluice_control::config::Config = sluice_control::config::from_yaml(&yaml)?;
    let join = cfg.join.context("no join section")?;
    assert_eq!(join.auth_servers, ["a.example:3026", "b.example:3026", "c.example:4026"]);
    // Each is checked when the config is written.
    let bad = Command::new(find_bin("control")?)
        .args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev"])
        .args(["--auth-server", "a.example:3026,b.example:port", "--token", "/t", "--ca-pin", &pin])
        .output()?;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("b.example:port"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}

/// Admin verbs against an agent's config refuse, rather than create a state in its data dir.
#[test]
fn admin_verbs_refuse_an_agent_config() -> Result<()> {
    let dir = TestDir::new("cluster-agent-admin")?;
    let config = dir.join("agent.yaml");
    let data = dir.join("data");
    std::fs::write(
        &config,
        format!(
            "data_dir: {}\nauth_service: {{enabled: false}}\njoin: {{auth_server: '127.0.0.1:1', token_file: /nonexistent, ca_pin: 'sha256:{}'}}\n",
            data.display(),
            "0".repeat(64)
        ),
    )?;
    let out = Command::new(find_bin("control")?).arg("--config").arg(&config).arg("status").output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent's config"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.join("sluice.db").exists());
    Ok(())
}
