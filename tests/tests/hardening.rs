//! The promises control keeps against a careless deployment and a hostile client:
//!
//! * state is private: the data dir is 0700 and its files 0600 after every start, even when an
//!   earlier version or an operator left them looser, and a fresh data dir survives the daemon and
//!   an admin verb opening it at the same moment;
//! * every TLS handshake re-checks the client certificate: there is no session resumption, and a
//!   connection after the certificate expired gets SQLSTATE 28000;
//! * live sessions end within a second when they would no longer be allowed to start (user
//!   removed, roles changed), and sessions control relays itself also end at certificate expiry
//!   and at the idle timeout;
//! * a client that pipelines its first query behind its StartupMessage is still handed to the
//!   data plane;
//! * startup parameters are allow-listed (`options` role changes and `replication` refused);
//! * a user name with a newline cannot forge a log line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use sluice_control::api::{self, Request};
use sluice_control::demo::{dev_role, find_bin, free_port, AwsCreds};
use sluice_tests::{
    backend_messages, error_fields, route_identity, runtime, sluice_control, ssl_request, startup_packet, wait_until,
    Connected, Harness, TestDir,
};
use time::OffsetDateTime;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every regular file directly in `dir` and its mode.
fn file_modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), mode(&e.path())))
        .collect();
    out.sort();
    out
}

/// A child process that is killed when the test lets go of it, panicking or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn state_is_private_and_safe_to_open_concurrently() {
    let dir = TestDir::new("private-state").unwrap();
    let control = find_bin("control").unwrap();
    for round in 0..5 {
        let data = dir.join(format!("data-{round}"));
        let config = dir.join(format!("control-{round}.yaml"));
        std::fs::write(
            &config,
            format!(
                "data_dir: {}\nauth_service: {{listen_addr: '127.0.0.1:{}', cluster_listen_addr: '127.0.0.1:{}'}}\nproxy_service: {{postgres_listen_addr: '127.0.0.1:{}'}}\n",
                data.display(),
                free_port().unwrap(),
                free_port().unwrap(),
                free_port().unwrap()
            ),
        )
        .unwrap();
        // The seed's habit: start the daemon, then at once ask for the status.
        let log = std::fs::File::create(dir.join(format!("control-{round}.log"))).unwrap();
        let mut daemon = KillOnDrop(
            Command::new(&control)
                .arg("--config")
                .arg(&config)
                .arg("start")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let status = Command::new(&control).arg("--config").arg(&config).arg("status").output().unwrap();
        assert!(status.status.success(), "round {round}: status failed: {}", String::from_utf8_lossy(&status.stderr));
        std::thread::sleep(Duration::from_millis(500));
        let exited = daemon.0.try_wait().unwrap();
        drop(daemon);
        assert!(
            exited.is_none(),
            "round {round}: the daemon exited ({exited:?}): {}",
            std::fs::read_to_string(dir.join(format!("control-{round}.log"))).unwrap()
        );
        // One CA for both.
        let again = Command::new(&control).arg("--config").arg(&config).arg("status").output().unwrap();
        let pin = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stdout).lines().find(|l| l.starts_with("CA pin")).map(str::to_owned)
        };
        assert_eq!(pin(&status), pin(&again));
        assert!(pin(&status).is_some());
        assert_eq!(mode(&data), 0o700, "round {round}");
        for (name, m) in file_modes(&data) {
            assert_eq!(m, 0o600, "round {round}: {name} is {m:o}");
        }
    }

    // Loosened by hand (or by an older Sluice): the next opener tightens everything and says so.
    let data = dir.join("data-0");
    let config = dir.join("control-0.yaml");
    set_mode(&data, 0o755);
    set_mode(&data.join("sluice.db"), 0o644);
    std::fs::write(data.join("audit.log"), b"").unwrap();
    set_mode(&data.join("audit.log"), 0o664);
    let out = Command::new(&control).arg("--config").arg(&config).arg("status").output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tightened") && stderr.contains("sluice.db"), "{stderr}");
    assert_eq!(mode(&data), 0o700);
    assert!(file_modes(&data).iter().all(|(_, m)| *m == 0o600), "{:?}", file_modes(&data));
}

#[test]
fn a_running_stack_keeps_its_state_and_the_cli_home_private() {
    let h = Harness::start("private-stack").unwrap();
    let data = &h.stack.control.config.data_dir;
    assert_eq!(mode(data), 0o700);
    let files = file_modes(data);
    assert!(files.iter().any(|(n, _)| n == "sluice.db"), "{files:?}");
    assert!(files.iter().all(|(_, m)| *m == 0o600), "{files:?}");
    // The emulator's secrets are in a 0600 file, not on its command line.
    let secrets = h.stack.dir.join("emulator").join("emulator-secrets");
    assert_eq!(mode(&secrets), 0o600);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", h.stack.emulator.proc.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(&h.stack.db_password), "a secret on the emulator's command line");

    // A home created looser than 0700 (an older CLI, a umask of 022) is tightened at login.
    std::fs::create_dir_all(&h.home).unwrap();
    set_mode(&h.home, 0o755);
    h.login_demo().unwrap();
    assert_eq!(mode(&h.home), 0o700);
}

/// A TLS connection to control's PostgreSQL listener after SSLRequest, handshake done.
fn tls_connect(port: u16, cfg: Arc<ClientConfig>) -> StreamOwned<ClientConnection, TcpStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&ssl_request()).unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).unwrap();
    assert_eq!(&s, b"S");
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// Reads backend messages until `n` ReadyForQuery or an ErrorResponse.
fn read_messages(s: &mut impl Read, n: usize) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut ready = 0;
    while ready < n {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        let mut frame = head.to_vec();
        frame.extend(&body);
        let msg = backend_messages(&frame).unwrap().remove(0);
        let tag = msg.0;
        out.push(msg);
        match tag {
            b'Z' => ready += 1,
            b'E' => break,
            _ => {}
        }
    }
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend(((sql.len() + 5) as u32).to_be_bytes());
    out.extend(sql.as_bytes());
    out.push(0);
    out
}

fn data_rows(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned()) // one column: count, len
        .collect()
}

#[test]
fn every_handshake_rechecks_the_certificate() {
    let h = Harness::start("resumption").unwrap();
    let identity = route_identity("alice", "demo", "alice", "demo");
    let now = OffsetDateTime::now_utc();
    let expires = now + time::Duration::seconds(3);
    let cert = h.issue_cert_window(&identity, now - time::Duration::minutes(1), expires).unwrap();
    // One client config for both connections: it keeps any ticket the server sends and offers
    // it on the next connection.
    let cfg = Arc::new(h.tls(Some(&cert)).unwrap());

    let mut first = tls_connect(h.pg_port(), cfg.clone());
    assert_eq!(first.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let mut hello = startup_packet(&[("user", "alice"), ("database", "demo")]);
    hello.extend(query("select 'still me'"));
    first.write_all(&hello).unwrap();
    let msgs = read_messages(&mut first, 2);
    assert_eq!(data_rows(&msgs), vec!["still me"], "{msgs:?}");
    first.write_all(&[b'X', 0, 0, 0, 4]).unwrap();
    drop(first);

    let wait = (expires - OffsetDateTime::now_utc()).whole_milliseconds().max(0) as u64 + 1200;
    std::thread::sleep(Duration::from_millis(wait));
    let mut second = tls_connect(h.pg_port(), cfg);
    // Nothing to resume: the server never issued a ticket or cached the session.
    assert_eq!(second.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    second.write_all(&startup_packet(&[("user", "alice"), ("database", "demo")])).unwrap();
    let msgs = read_messages(&mut second, 1);
    let (tag, body) = msgs.last().unwrap();
    assert_eq!(*tag, b'E', "{msgs:?}");
    let f = error_fields(body).unwrap();
    assert_eq!(f[&'C'], "28000", "{f:?}");
    assert!(f[&'M'].contains("expired"), "{f:?}");
}

#[test]
fn a_pipelined_first_query_is_relayed_by_the_data_plane() {
    let h = Harness::start("pipelined").unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let mut s = tls_connect(h.pg_port(), Arc::new(h.tls(Some(&cert)).unwrap()));
    // StartupMessage and the first query in one write: one TLS record.
    let mut bytes = startup_packet(&[("user", "alice"), ("database", "demo")]);
    bytes.extend(query("select 40 + 2"));
    s.write_all(&bytes).unwrap();
    let msgs = read_messages(&mut s, 2);
    assert_eq!(data_rows(&msgs), vec!["42"], "{msgs:?}");
    // The data plane holds it (control relays nothing while one is connected); its record is
    // committed by control's audit thread as the handoff completes.
    let live = sluice_tests::wait_until(std::time::Duration::from_secs(5), "the live session's record", || {
        let live = h.state.live_sessions()?;
        Ok((live.len() == 1).then_some(live))
    })
    .unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let log = std::fs::read_to_string(h.control_log()).unwrap();
    assert!(log.contains("forwarded bytes buffered during the startup"), "{log}");
    assert!(!log.contains("session stays in control"));
    s.write_all(&query("select 6 * 7")).unwrap();
    assert_eq!(data_rows(&read_messages(&mut s, 1)), vec!["42"]);
}

/// Polls the session with a query until it fails; returns how long that took.
fn ends_within(rt: &tokio::runtime::Runtime, c: &Connected, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let r = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), c.client.simple_query("select 1")).await });
        if !matches!(r, Ok(Ok(_))) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "the session was still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `reason` of the session-end audit event of the latest session of `user`.
fn end_reason(h: &Harness, user: &str) -> Option<String> {
    h.audit()
        .unwrap()
        .into_iter()
        .rev()
        .find(|e| e.event == "db.session.end" && e.user.as_deref() == Some(user))
        .and_then(|e| e.data["reason"].as_str().map(str::to_owned))
}

fn revocations_end_sessions(with_dataplane: bool) {
    let name = if with_dataplane { "revoke-dp" } else { "revoke-relay" };
    let h = Harness::start_opts(name, &AwsCreds::demo(), with_dataplane).unwrap();
    let rt = runtime().unwrap();
    h.state.add_user("bob", "pw-bob-123456", &["dev".to_owned()]).unwrap();
    let bob = h.issue_cert("bob", "demo", "alice", "demo").unwrap();
    let alice = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let b = rt.block_on(h.connect_with(Some(&bob), "alice", "demo")).unwrap();
    let a = rt.block_on(h.connect_with(Some(&alice), "alice", "demo")).unwrap();
    rt.block_on(b.client.simple_query("select 1")).unwrap();
    rt.block_on(a.client.simple_query("select 1")).unwrap();

    // `control users rm`: bob's session ends within a second; alice's goes on.
    h.control_ok(&["users", "rm", "bob"]).unwrap();
    let took = ends_within(&rt, &b, Duration::from_millis(1500));
    eprintln!("[{name}] user removal ended the session after {took:?}");
    rt.block_on(a.client.simple_query("select 1")).unwrap();

    // A role change that no longer allows alice's route ends hers.
    h.state.upsert_role(&dev_role("dev", &["other"], &["alice"]).unwrap()).unwrap();
    let took = ends_within(&rt, &a, Duration::from_millis(1500));
    eprintln!("[{name}] role change ended the session after {took:?}");
    for user in ["bob", "alice"] {
        wait_until(Duration::from_secs(5), "the end audit event", || {
            Ok(end_reason(&h, user).filter(|r| r == "AccessRevoked").map(|_| ()))
        })
        .unwrap();
    }
}

#[test]
fn user_removal_and_role_changes_end_data_plane_sessions() {
    revocations_end_sessions(true);
}

#[test]
fn user_removal_and_role_changes_end_sessions_control_relays() {
    revocations_end_sessions(false);
}

#[test]
fn sessions_control_relays_end_at_certificate_expiry_and_idle_timeout() {
    let mut h = Harness::start_opts("relay-expiry", &AwsCreds::demo(), false).unwrap();
    let rt = runtime().unwrap();
    let identity = route_identity("alice", "demo", "alice", "demo");
    let now = OffsetDateTime::now_utc();
    let expires = now + time::Duration::seconds(3);
    let short = h.issue_cert_window(&identity, now - time::Duration::minutes(1), expires).unwrap();
    let c = rt.block_on(h.connect_with(Some(&short), "alice", "demo")).unwrap();
    rt.block_on(c.client.simple_query("select 1")).unwrap();
    let left = Duration::from_millis((expires - OffsetDateTime::now_utc()).whole_milliseconds().max(0) as u64);
    // Control's clock check works in whole seconds: allow one, plus the poll.
    let took = ends_within(&rt, &c, left + Duration::from_millis(2300));
    assert!(took + Duration::from_millis(200) >= left, "ended {took:?} in, {left:?} before expiry");
    wait_until(Duration::from_secs(5), "the end event", || {
        Ok(end_reason(&h, "alice").filter(|r| r == "CertExpired").map(|_| ()))
    })
    .unwrap();

    h.restart_control(|c| c.proxy_service.idle_timeout = Duration::from_secs(2)).unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    rt.block_on(c.client.simple_query("select 1")).unwrap();
    let idle_from = Instant::now();
    // A busy session is not idle: keep it talking past the timeout first.
    while idle_from.elapsed() < Duration::from_secs(3) {
        rt.block_on(c.client.simple_query("select 1")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rt.block_on(c.client.simple_query("select 1")).is_ok(), "ended before the idle timeout");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        rt.block_on(c.client.simple_query("select 1")).is_err(),
        "not ended {:?} after going quiet",
        quiet.elapsed()
    );
    wait_until(Duration::from_secs(5), "the end event", || {
        Ok(end_reason(&h, "alice").filter(|r| r == "IdleTimeout").map(|_| ()))
    })
    .unwrap();
}

#[test]
fn startup_parameters_are_allow_listed() {
    let h = Harness::start("startup-params").unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let cfg = Arc::new(h.tls(Some(&cert)).unwrap());
    let refused = |params: &[(&str, &str)]| {
        let mut s = tls_connect(h.pg_port(), cfg.clone());
        let mut all = vec![("user", "alice"), ("database", "demo")];
        all.extend_from_slice(params);
        s.write_all(&startup_packet(&all)).unwrap();
        let msgs = read_messages(&mut s, 1);
        let (tag, body) = msgs.last().unwrap().clone();
        assert_eq!(tag, b'E', "{params:?} was accepted: {msgs:?}");
        error_fields(&body).unwrap()
    };
    for params in [&[("replication", "database")][..], &[("replication", "true")], &[("options", "-c role=postgres")]] {
        let f = refused(params);
        assert_eq!(f[&'C'], "42501", "{params:?}: {f:?}");
    }
    let f = refused(&[("session_authorization", "postgres")]);
    assert_eq!(f[&'C'], "08P01", "{f:?}");

    // What drivers send still passes, and reaches the upstream session.
    let rt = runtime().unwrap();
    let c = rt
        .block_on(async {
            let mut pg = sluice_tests::pg_config(h.pg_port(), "alice", "demo");
            pg.application_name("hardening-test").options("-c statement_timeout=4321");
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(h.tls(Some(&cert)).unwrap());
            let (client, conn) = pg.connect(tls).await?;
            tokio::spawn(conn);
            let app: String = client.query_one("show application_name", &[]).await?.get(0);
            let timeout: String = client.query_one("show statement_timeout", &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>((app, timeout))
        })
        .unwrap();
    assert_eq!(c, ("hardening-test".to_owned(), "4321ms".to_owned()));
}

#[test]
fn a_user_name_cannot_forge_log_lines() {
    let h = Harness::start("log-forging").unwrap();
    let rt = runtime().unwrap();
    let forged = "FORGED 2026-01-01T00:00:00Z INFO user logged in";
    let user = format!("mallory\n{forged}");
    let tls = sluice_control::tls::client_config_for_ca(&h.ca_pem).unwrap();
    let r: Result<serde_json::Value, _> = rt.block_on(api::call(
        &h.api_addr(),
        "localhost",
        tls,
        &Request::Login { user: user.clone(), password: "wrong".into() },
    ));
    assert!(r.is_err());
    wait_until(Duration::from_secs(5), "the failed login in the log", || {
        let log = std::fs::read_to_string(h.control_log())?;
        Ok(log.contains("login failed").then_some(()))
    })
    .unwrap();
    let log = std::fs::read_to_string(h.control_log()).unwrap();
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
    assert!(log.contains("mallory\\nFORGED"), "{log}");
}
