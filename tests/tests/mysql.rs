//! MySQL through Sluice with real processes: control's MySQL listener and the dataplane in
//! front of a MariaDB server, reached with the `mariadb` client (TLS with a client certificate)
//! and with a Rust client driving the handshake with `sluice-mysqlwire` over rustls.
//!
//! The upstream is the RDS Proxy emulator's MySQL mode (TLS required, the IAM token through
//! mysql_clear_password, KILL ids translated) in front of MariaDB, as `demo::MysqlDemo` starts
//! them. Tests that need MariaDB fail under CI=true when it is missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::BytesMut;
use sluice_mysqlwire::{
    CapabilityFlags, ErrPacket, Handshake, HandshakeResponse, PacketDecoder, PacketEncoder, SslRequest,
    NATIVE_PASSWORD_PLUGIN, SERVER_CAPABILITIES,
};
use sluice_tests::sluice_control::demo::{demo_database, free_port, AwsCreds, Emulator, MariaDb, MysqlDemo};
use sluice_tests::sluice_control::state::random_secret;
use sluice_tests::{skip_without_mariadb, wait_until, ClientCert, Harness};

const MYDB: &str = "mydb";

/// A stack whose control also serves MariaDB behind the MySQL emulator as database `mydb`
/// (env=dev) on its MySQL listener. `None` when MariaDB is missing (outside CI).
struct MyStack {
    h: Harness,
    _demo: MysqlDemo,
    port: u16,
    certs: PathBuf,
}

fn start(name: &str) -> Result<Option<MyStack>> {
    start_with(name, true, &AwsCreds::demo())
}

/// As [`start`]; without a dataplane (control relays) unless `dataplane`, and an emulator that
/// accepts IAM tokens signed with `creds` only (control signs with the demo credentials).
fn start_with(name: &str, dataplane: bool, creds: &AwsCreds) -> Result<Option<MyStack>> {
    if skip_without_mariadb() {
        return Ok(None);
    }
    let mut h = Harness::start_opts(name, &AwsCreds::demo(), dataplane)?;
    let dir = h.dir.join("my");
    let mariadb = MariaDb::start(&dir.join("mariadb"))?;
    let password = random_secret(12);
    mariadb.create_user("alice", &password)?;
    mariadb.sql("CREATE DATABASE demo; CREATE DATABASE other")?;
    // The sequence engine is built in on most packages, a plugin on some.
    if mariadb.sql("SELECT 1 FROM demo.seq_1_to_1").is_err() {
        mariadb.sql("INSTALL SONAME 'ha_sequence'")?;
    }
    let emulator = Emulator::start_mysql(
        &dir.join("emulator"),
        mariadb.port(),
        std::slice::from_ref(creds),
        &[("alice".to_owned(), password.clone())],
    )?;
    let demo = MysqlDemo { emulator, mariadb, db_password: password };
    let port = free_port()?;
    let db = demo_database(MYDB, &demo.emulator, &[("env", "dev")]);
    h.restart_control(|cfg| {
        cfg.proxy_service.mysql_listen_addr = Some(([127, 0, 0, 1], port).into());
        cfg.db_service.databases.push(db);
    })?;
    wait_until(Duration::from_secs(10), "the MySQL listener", || {
        Ok(TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()))
    })?;
    let certs = h.dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    Ok(Some(MyStack { h, _demo: demo, port, certs }))
}

impl MyStack {
    /// Writes `cert` for the `mariadb` client; (cert, key) paths.
    fn files(&self, name: &str, cert: &ClientCert) -> Result<(PathBuf, PathBuf)> {
        let (c, k) = (self.certs.join(format!("{name}.crt")), self.certs.join(format!("{name}.key")));
        std::fs::write(&c, &cert.cert_pem)?;
        std::fs::write(&k, &cert.key_pem)?;
        Ok((c, k))
    }

    /// The `mariadb` client to Sluice as `user` on `db`, with `cert` (or none).
    fn client(&self, cert: Option<(&Path, &Path)>, user: &str, db: &str) -> Command {
        let mut cmd = Command::new("mariadb");
        cmd.args(["--no-defaults", "-h", "127.0.0.1", "-N", "-B"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={user}"))
            .arg(format!("--database={db}"))
            .arg(format!("--ssl-ca={}", self.h.ca_file.display()))
            .arg("--ssl-verify-server-cert");
        if let Some((c, k)) = cert {
            cmd.arg(format!("--ssl-cert={}", c.display())).arg(format!("--ssl-key={}", k.display()));
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    fn cert(&self, name: &str, user: &str, service: &str, db_user: &str, db_name: &str) -> Result<(PathBuf, PathBuf)> {
        let c = self.h.issue_cert(user, service, db_user, db_name)?;
        self.files(name, &c)
    }

    fn tls(&self, cert: &ClientCert) -> Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(self.h.tls(Some(cert))?))
    }
}

fn run(mut cmd: Command) -> Result<(bool, String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn ok(cmd: Command, sql: &str) -> Result<String> {
    let mut cmd = cmd;
    cmd.args(["-e", sql]);
    let (good, out, err) = run(cmd)?;
    ensure!(good, "{sql}: {err}");
    Ok(out)
}

fn refused(cmd: Command, code: u16) -> Result<String> {
    let mut cmd = cmd;
    cmd.args(["-e", "select 1"]);
    let (good, out, err) = run(cmd)?;
    ensure!(!good, "connected where refused: {out}");
    ensure!(err.contains(&format!("ERROR {code} ")), "expected error {code}, got: {err}");
    Ok(err)
}

/// A Rust client: the connection phase driven with `sluice-mysqlwire` over rustls, then raw
/// command packets.
struct RawClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    /// The connection id of Sluice's greeting (what `mysql_thread_id()` returns).
    id: u32,
    buf: BytesMut,
}

fn read_packet(r: &mut impl Read, buf: &mut BytesMut) -> Result<sluice_mysqlwire::Packet> {
    let mut dec = PacketDecoder::new(1 << 30);
    loop {
        if let Some(p) = dec.next_packet(buf)? {
            return Ok(p);
        }
        let mut chunk = vec![0u8; dec.needed(buf)?.max(1)];
        r.read_exact(&mut chunk)?;
        buf.extend_from_slice(&chunk);
    }
}

fn caps() -> CapabilityFlags {
    SERVER_CAPABILITIES
}

impl RawClient {
    fn connect(
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        user: &str,
        db: &str,
    ) -> Result<Result<RawClient, ErrPacket>> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = BytesMut::new();
        let greeting = read_packet(&mut tcp, &mut buf)?;
        let hello = Handshake::decode(&greeting.payload)?;
        let mut out = BytesMut::new();
        let ssl = SslRequest { capabilities: caps(), max_packet_size: 1 << 30, charset: 45, mariadb_capabilities: 0 };
        PacketEncoder::new(1).write_with(&mut out, |o| ssl.encode(o));
        tcp.write_all(&out)?;
        let conn = rustls::ClientConnection::new(tls, "localhost".try_into()?)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let resp = HandshakeResponse {
            capabilities: caps(),
            max_packet_size: 1 << 30,
            charset: 45,
            mariadb_capabilities: 0,
            username: user.into(),
            auth_response: vec![1; 20],
            database: Some(db.into()),
            auth_plugin_name: Some(NATIVE_PASSWORD_PLUGIN.into()),
            connect_attrs: vec![("program_name".into(), "sluice-test".into())],
        };
        let mut out = BytesMut::new();
        PacketEncoder::new(2).try_write_with(&mut out, |o| resp.encode(o))?;
        tls.write_all(&out)?;
        let reply = read_packet(&mut tls, &mut buf)?;
        ensure!(reply.seq == 3, "OK/ERR with sequence id {}", reply.seq);
        match reply.payload.first() {
            Some(0x00) => Ok(Ok(RawClient { tls, id: hello.connection_id, buf })),
            Some(0xFF) => Ok(Err(ErrPacket::decode(&reply.payload)?)),
            other => bail!("unexpected login reply {other:?}"),
        }
    }

    fn send_query(&mut self, sql: &str) -> Result<()> {
        let mut payload = vec![0x03];
        payload.extend_from_slice(sql.as_bytes());
        let mut out = BytesMut::new();
        PacketEncoder::new(0).write(&payload, &mut out);
        self.tls.write_all(&out)?;
        Ok(())
    }

    /// Reads a text result: its rows' raw packets, or the ERR.
    fn result(&mut self) -> Result<Result<Vec<Vec<u8>>, ErrPacket>> {
        let first = read_packet(&mut self.tls, &mut self.buf)?;
        match first.payload.first() {
            Some(0xFF) => return Ok(Err(ErrPacket::decode(&first.payload)?)),
            Some(0x00) => return Ok(Ok(Vec::new())),
            _ => {}
        }
        let mut rows = Vec::new();
        let mut columns_left = first.payload[0] as usize;
        loop {
            let p = read_packet(&mut self.tls, &mut self.buf)?;
            if columns_left > 0 {
                columns_left -= 1;
                continue;
            }
            match p.payload.first() {
                Some(0xFF) => return Ok(Err(ErrPacket::decode(&p.payload)?)),
                Some(0xFE) if p.payload.len() < 0xFF_FFFF => return Ok(Ok(rows)),
                _ => rows.push(p.payload.to_vec()),
            }
        }
    }

    fn query(&mut self, sql: &str) -> Result<Result<Vec<Vec<u8>>, ErrPacket>> {
        self.send_query(sql)?;
        self.result()
    }
}

/// The single text value of a one-column row.
fn text(row: &[u8]) -> String {
    let n = row.first().copied().unwrap_or(0) as usize;
    String::from_utf8_lossy(row.get(1..1 + n).unwrap_or_default()).into_owned()
}

#[test]
fn queries_policy_and_refusals() -> Result<()> {
    let Some(s) = start("mysql_policy")? else { return Ok(()) };
    let alice = s.cert("alice", "alice", MYDB, "alice", "demo")?;
    let a = (alice.0.as_path(), alice.1.as_path());

    // The mariadb client with its certificate: queries go to MariaDB as alice on demo.
    let out = ok(s.client(Some(a), "alice", "demo"), "select 1+1, database(), current_user()")?;
    assert_eq!(out.trim(), "2\tdemo\talice@%");
    let out =
        ok(s.client(Some(a), "alice", "demo"), "create table t (x int); insert into t values (7); select x from t")?;
    assert_eq!(out.trim(), "7");

    // A database user the role does not allow (and another than the certificate's).
    let bob = s.cert("bob", "alice", MYDB, "bob", "demo")?;
    let e = refused(s.client(Some((&bob.0, &bob.1)), "bob", "demo"), 1045)?;
    assert!(e.contains("bob"), "{e}");
    refused(s.client(Some(a), "bob", "demo"), 1045)?;
    // Another database name than the certificate's, and one the role does not allow.
    refused(s.client(Some(a), "alice", "other"), 1044)?;
    let other = s.cert("other", "alice", MYDB, "alice", "other")?;
    let e = refused(s.client(Some((&other.0, &other.1)), "alice", "other"), 1044)?;
    assert!(e.contains("other"), "{e}");
    // A database Sluice does not know, and a PostgreSQL database on the MySQL listener.
    let unknown = s.cert("unknown", "alice", "nosuchdb", "alice", "demo")?;
    refused(s.client(Some((&unknown.0, &unknown.1)), "alice", "demo"), 1049)?;
    let pg = s.cert("pg", "alice", "demo", "alice", "demo")?;
    let e = refused(s.client(Some((&pg.0, &pg.1)), "alice", "demo"), 1049)?;
    assert!(e.contains("PostgreSQL"), "{e}");
    // ... and a MySQL database on the PostgreSQL listener.
    let for_mysql = s.h.issue_cert("alice", MYDB, "alice", "demo")?;
    let err = sluice_tests::runtime()?
        .block_on(s.h.connect_with(Some(&for_mysql), "alice", "demo"))
        .err()
        .context("a MySQL database admitted on the PostgreSQL listener")?
        .pg();
    let db = err.as_db_error().context("no ErrorResponse")?;
    assert_eq!(db.code().code(), "3D000");
    assert!(db.message().contains("MySQL listener"), "{}", db.message());
    // Labels: a role whose labels no longer match the database's refuses it.
    let prod = serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": "dev"},
        "spec": {"allow": {"db_labels": {"env": "prod"}, "db_names": ["demo"], "db_users": ["alice"]}}});
    s.h.state.upsert_role(&sluice_tests::role(prod)?)?;
    refused(s.client(Some(a), "alice", "demo"), 1045)?;
    s.h.state.upsert_role(&sluice_tests::sluice_control::demo::dev_role("dev", &["demo"], &["alice"])?)?;
    ok(s.client(Some(a), "alice", "demo"), "select 1")?;

    // No certificate, a certificate of another CA, an expired certificate.
    let (good, _, err) = run({
        let mut c = s.client(None, "alice", "demo");
        c.args(["-e", "select 1"]);
        c
    })?;
    assert!(!good, "connected without a certificate");
    assert!(err.contains("ERROR"), "{err}");
    let foreign_ca = rcgen::generate_simple_self_signed(vec!["x".into()])?;
    let foreign = ClientCert { cert_pem: foreign_ca.cert.pem(), key_pem: foreign_ca.signing_key.serialize_pem() };
    let f = s.files("foreign", &foreign)?;
    let (good, _, err) = run({
        let mut c = s.client(Some((&f.0, &f.1)), "alice", "demo");
        c.args(["-e", "select 1"]);
        c
    })?;
    assert!(!good && err.contains("ERROR"), "foreign certificate: {err}");
    let now = time::OffsetDateTime::now_utc();
    let expired = s.h.issue_cert_window(
        &sluice_tests::route_identity("alice", MYDB, "alice", "demo"),
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    )?;
    let x = s.files("expired", &expired)?;
    let e = refused(s.client(Some((&x.0, &x.1)), "alice", "demo"), 1045)?;
    assert!(e.contains("expired"), "{e}");

    // A plaintext client is told TLS with a client certificate is required.
    let mut plain = Command::new("mariadb");
    plain
        .args(["--no-defaults", "-h", "127.0.0.1", "--skip-ssl", "-u", "alice", "-e", "select 1"])
        .arg(format!("--port={}", s.port));
    let (good, _, err) = run(plain)?;
    assert!(!good && err.contains("3159") && err.contains("certificate"), "{err}");

    // The Rust client: same answers.
    let alice_cert = s.h.issue_cert("alice", MYDB, "alice", "demo")?;
    let mut c = RawClient::connect(s.port, s.tls(&alice_cert)?, "alice", "demo")?.map_err(|e| anyhow!("{e:?}"))?;
    assert!(c.id >= 1 << 31, "our connection id {:#x}", c.id);
    let rows = c.query("select 'hello'")?.map_err(|e| anyhow!("{e:?}"))?;
    assert_eq!(rows.iter().map(|r| text(r)).collect::<Vec<_>>(), ["hello"]);
    let e = RawClient::connect(s.port, s.tls(&alice_cert)?, "bob", "demo")?.err().context("bob admitted")?;
    assert_eq!(e.code, 1045);

    // Audit: every session says it was MySQL.
    // Audit events are written in the background.
    let starts = wait_until(Duration::from_secs(10), "the audit events", || {
        let starts: Vec<_> = s.h.audit()?.into_iter().filter(|e| e.event == "db.session.start").collect();
        Ok((starts.iter().filter(|e| e.success).count() >= 4).then_some(starts))
    })?;
    for e in &starts {
        // The one attempt on the PostgreSQL listener is recorded as such.
        let pg = e.data["error"].as_str().is_some_and(|m| m.contains("MySQL listener"));
        assert_eq!(e.data["db_protocol"], if pg { "postgres" } else { "mysql" }, "{:?}", e.data);
    }
    Ok(())
}

#[test]
fn wrong_aws_credentials_are_explained() -> Result<()> {
    // The emulator (RDS Proxy) knows other credentials than those control signs with.
    let creds = AwsCreds { secret_key: "another-secret".into(), ..AwsCreds::demo() };
    let Some(s) = start_with("mysql_awscreds", true, &creds)? else { return Ok(()) };
    let alice = s.cert("alice", "alice", MYDB, "alice", "demo")?;
    let e = refused(s.client(Some((&alice.0, &alice.1)), "alice", "demo"), 1045)?;
    assert!(e.contains("RDS Proxy refused Sluice's IAM auth token") && e.contains("rds-db:connect"), "{e}");
    // Audit events are written in the background.
    wait_until(Duration::from_secs(10), "the refused session's audit event", || {
        let audit = s.h.audit()?;
        Ok(audit.iter().any(|e| e.event == "db.session.start" && !e.success).then_some(()))
    })?;
    Ok(())
}

#[test]
fn kill_query_from_a_second_connection() -> Result<()> {
    let Some(mut s) = start("mysql_kill")? else { return Ok(()) };
    let alice = s.h.issue_cert("alice", MYDB, "alice", "demo")?;
    let files = s.files("alice", &alice)?;
    let mut a = RawClient::connect(s.port, s.tls(&alice)?, "alice", "demo")?.map_err(|e| anyhow!("{e:?}"))?;
    // The session is in the dataplane by now (no first command within a second).
    std::thread::sleep(Duration::from_millis(1500));
    a.send_query("SELECT SLEEP(30)")?;
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();

    // Another Sluice user may not kill it; an unknown id is unknown.
    s.h.state.add_user("mallory", "pw-mallory-1", &["dev".to_owned()])?;
    let mallory = s.cert("mallory", "mallory", MYDB, "alice", "demo")?;
    let e = run({
        let mut c = s.client(Some((&mallory.0, &mallory.1)), "alice", "demo");
        c.args(["-e", &format!("KILL QUERY {}", a.id)]);
        c
    })?;
    assert!(!e.0 && e.2.contains("ERROR 1095"), "{}", e.2);
    let e = run({
        let mut c = s.client(Some((&files.0, &files.1)), "alice", "demo");
        c.args(["-e", &format!("KILL QUERY {}", a.id ^ 1)]);
        c
    })?;
    assert!(!e.0 && e.2.contains("ERROR 1094"), "{}", e.2);

    // What mariadb's Ctrl-C does: a second connection sending KILL QUERY <our id>.
    ok(s.client(Some((&files.0, &files.1)), "alice", "demo"), &format!("KILL QUERY {}", a.id))?;
    let r = a.result()?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "the sleep was not cancelled ({took:?})");
    // MariaDB ends a killed SLEEP early with 1, or with "Query execution was interrupted".
    match r {
        Ok(rows) => assert_eq!(rows.iter().map(|r| text(r)).collect::<Vec<_>>(), ["1"]),
        Err(e) => assert_eq!(e.code, 1317, "{e:?}"),
    }
    // The session lives on.
    let rows = a.query("select 'still here'")?.map_err(|e| anyhow!("{e:?}"))?;
    assert_eq!(text(&rows[0]), "still here");

    // The mariadb client's own Ctrl-C: SIGINT while a query runs makes it send the KILL.
    let mut cli = s.client(Some((&files.0, &files.1)), "alice", "demo");
    cli.args(["-e", "SELECT SLEEP(30)"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cli.spawn()?;
    std::thread::sleep(Duration::from_millis(2500));
    let started = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(started.elapsed() < Duration::from_secs(15), "{stderr}");
    wait_until(Duration::from_secs(10), "the KILL from mariadb's Ctrl-C", || {
        let kills = s.h.audit()?.into_iter().filter(|e| e.data["kill_result"] == "ok").count();
        Ok((kills >= 2).then_some(()))
    })
    .with_context(|| format!("mariadb said: {stderr}"))?;

    // A restarted control still routes KILLs for the session the dataplane kept.
    s.h.restart_control(|_| {})?;
    a.send_query("SELECT SLEEP(30)")?;
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "KILL after the restart", || {
        let mut kill = s.client(Some((&files.0, &files.1)), "alice", "demo");
        kill.args(["-e", &format!("KILL QUERY {}", a.id)]);
        let (good, _, err) = run(kill)?;
        ensure!(good || err.contains("ERROR 1094"), "{err}");
        Ok(good.then_some(()))
    })?;
    let r = a.result()?;
    assert!(started.elapsed() < Duration::from_secs(15), "not cancelled after the restart");
    assert!(matches!(&r, Ok(rows) if text(&rows[0]) == "1") || matches!(&r, Err(e) if e.code == 1317), "{r:?}");
    Ok(())
}

#[test]
fn malformed_handshakes_while_another_client_is_served() -> Result<()> {
    let Some(mut s) = start("mysql_malformed")? else { return Ok(()) };
    let alice = s.h.issue_cert("alice", MYDB, "alice", "demo")?;
    let mut good = RawClient::connect(s.port, s.tls(&alice)?, "alice", "demo")?.map_err(|e| anyhow!("{e:?}"))?;
    let attempts: Vec<(&str, Vec<u8>)> = vec![
        ("oversized header", vec![0xff, 0xff, 0xff, 1]),
        ("wrong sequence id", vec![32, 0, 0, 9]),
        ("truncated SSLRequest", vec![32, 0, 0, 1, 0x0a, 0x8a]),
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("short response", vec![4, 0, 0, 1, 0, 0, 0, 0]),
    ];
    for (what, bytes) in attempts {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut buf = BytesMut::new();
        let greeting = read_packet(&mut tcp, &mut buf)?;
        Handshake::decode(&greeting.payload)?;
        let _ = tcp.write_all(&bytes);
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
        // An ERR packet or nothing, then the close.
        if !rest.is_empty() {
            let mut b = BytesMut::from(&rest[..]);
            let p = PacketDecoder::new(1 << 16).next_packet(&mut b)?.context(format!("{what}: partial answer"))?;
            let e = ErrPacket::decode(&p.payload).with_context(|| format!("{what}: {rest:?}"))?;
            assert!([1043, 3159].contains(&e.code), "{what}: {e:?}");
        }
        let rows = good.query("select 'alive'")?.map_err(|e| anyhow!("{e:?}"))?;
        assert_eq!(text(&rows[0]), "alive", "{what}");
    }

    // Over the limit of unauthenticated connections from one address: 1040 in place of the
    // greeting, as a full server says it.
    s.h.restart_control(|cfg| cfg.proxy_service.limits.max_unauthenticated_per_source = 2)?;
    // Connections are greeted until two are held unauthenticated (fewer if one of the malformed
    // attempts above is still being counted), then the next one gets 1040.
    let mut held = Vec::new();
    let (seq, e) = loop {
        let mut c = TcpStream::connect(("127.0.0.1", s.port))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let p = read_packet(&mut c, &mut BytesMut::new())?;
        if p.payload.first() == Some(&0xff) {
            break (p.seq, ErrPacket::decode(&p.payload)?);
        }
        Handshake::decode(&p.payload)?;
        held.push(c);
        assert!(held.len() <= 2, "a third unauthenticated connection from one address was greeted");
    };
    assert_eq!((seq, e.code), (0, 1040), "{e:?}");
    drop(held);
    Ok(())
}

#[test]
fn relayed_by_control_without_a_dataplane() -> Result<()> {
    let Some(s) = start_with("mysql_relay", false, &AwsCreds::demo())? else { return Ok(()) };
    let alice = s.h.issue_cert("alice", MYDB, "alice", "demo")?;
    let mut c = RawClient::connect(s.port, s.tls(&alice)?, "alice", "demo")?.map_err(|e| anyhow!("{e:?}"))?;
    let rows = c.query("select repeat('z', 100000)")?.map_err(|e| anyhow!("{e:?}"))?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), 100_000 + 4, "a 3-byte length-encoded string");
    drop(c);
    wait_until(Duration::from_secs(10), "the relayed session's end", || {
        let ends: Vec<_> = s.h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        Ok(ends.iter().any(|e| e.data["data_plane"] == false && e.data["db_protocol"] == "mysql").then_some(()))
    })?;
    Ok(())
}

/// MD5 of what `f` writes, with `md5sum`.
fn md5_of(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<String> {
    let mut md5 = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, md5.stdin.take().context("stdin")?);
        f(&mut w)?;
        w.flush()?;
    }
    let out = md5.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned())
}

/// One line of the generated data: deterministic, different per line.
fn line(i: u64, width: usize) -> String {
    let mut s = format!("{i:012}-");
    let fill = (b'a' + (i % 26) as u8) as char;
    while s.len() < width {
        s.push(fill);
    }
    s
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn large_select_and_load_data_are_byte_exact() -> Result<()> {
    let Some(s) = start("mysql_large")? else { return Ok(()) };
    let alice = s.cert("alice", "alice", MYDB, "alice", "demo")?;
    let a = (alice.0.as_path(), alice.1.as_path());
    const WIDTH: usize = 1023;
    // 1 GiB of rows (1024 bytes each with the newline) out through the data plane.
    let rows: u64 = (1 << 30) / (WIDTH as u64 + 1);
    let sql = format!(
        "SELECT CONCAT(LPAD(seq, 12, '0'), '-', REPEAT(CHAR(97 + seq % 26), {})) FROM seq_1_to_{rows}",
        WIDTH - 13
    );
    let mut cmd = s.client(Some(a), "alice", "demo");
    cmd.args(["--quick", "--max-allowed-packet=1G", "-e", &sql]);
    let (got, bytes, took) = sluice_tests::md5_of_stdout(cmd)?;
    eprintln!("SELECT: {bytes} bytes in {took:?}");
    let want = md5_of(|w| (1..=rows).try_for_each(|i| writeln!(w, "{}", line(i, WIDTH))))?;
    assert_eq!(bytes, rows * (WIDTH as u64 + 1));
    assert_eq!(got, want);

    // 512 MiB in with LOAD DATA LOCAL INFILE.
    let lines: u64 = (512 << 20) / (WIDTH as u64 + 1);
    let file = s.h.dir.join("load.txt");
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&file)?);
        for i in 1..=lines {
            writeln!(w, "{}", line(i * 7, WIDTH))?;
        }
        w.flush()?;
    }
    let (mut count, mut len, mut xor) = (0u64, 0u64, 0u32);
    for i in 1..=lines {
        let l = line(i * 7, WIDTH);
        count += 1;
        len += l.len() as u64;
        xor ^= crc32(l.as_bytes());
    }
    let mut cmd = s.client(Some(a), "alice", "demo");
    cmd.args(["--local-infile=1"]);
    let load = format!(
        "CREATE TABLE big (l LONGTEXT) ENGINE=MyISAM; LOAD DATA LOCAL INFILE '{}' INTO TABLE big (l); \
         SELECT COUNT(*), SUM(LENGTH(l)), BIT_XOR(CRC32(l)) FROM big",
        file.display()
    );
    let out = ok(cmd, &load)?;
    assert_eq!(out.trim(), format!("{count}\t{len}\t{xor}"));
    // Both went through the data plane, which counted them.
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    wait_until(Duration::from_secs(10), "the dataplane's end reports", || {
        let ends: Vec<_> = s.h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        let held = |e: &&sluice_tests::sluice_control::state::AuditRow| e.data["data_plane"] == true;
        let out = ends.iter().filter(held).any(|e| n(&e.data["bytes_to_client"]) > 1 << 30);
        let into = ends.iter().filter(held).any(|e| n(&e.data["bytes_from_client"]) > 512 << 20);
        Ok((out && into).then_some(()))
    })?;
    Ok(())
}

/// `mysql_async` (rustls, a client identity) as an application would connect through Sluice.
fn mysql_async_opts(s: &MyStack, cert: &(PathBuf, PathBuf), user: &str) -> mysql_async::Opts {
    let ssl = mysql_async::SslOpts::default()
        .with_root_certs(vec![s.h.ca_file.clone().into()])
        .with_disable_built_in_roots(true)
        .with_client_identity(Some(mysql_async::ClientIdentity::new(cert.0.clone().into(), cert.1.clone().into())));
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("localhost")
        .tcp_port(s.port)
        .prefer_socket(false)
        .user(Some(user))
        .db_name(Some("demo"))
        // Given here, they are not read with a query after connecting: a KILL is only answered
        // by Sluice as a connection's first command (what mysql's Ctrl-C sends).
        .max_allowed_packet(Some(16 << 20))
        .wait_timeout(Some(28800))
        .ssl_opts(Some(ssl))
        .into()
}

#[test]
fn mysql_async_client() -> Result<()> {
    use mysql_async::prelude::Queryable;
    let Some(s) = start("mysql_async")? else { return Ok(()) };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = s.cert("alice", "alice", MYDB, "alice", "demo")?;
    sluice_tests::runtime()?.block_on(async {
        let mut conn = mysql_async::Conn::new(mysql_async_opts(&s, &cert, "alice")).await?;
        assert!(conn.id() >= 1 << 31, "our connection id {:#x}", conn.id());
        let row: Option<(i64, String)> = conn.query_first("select 40 + 2, database()").await?;
        assert_eq!(row, Some((42, "demo".to_owned())));
        // Prepared statements (binary protocol) pass through untouched.
        let n: Option<i64> = conn.exec_first("select ? * 2", (21,)).await?;
        assert_eq!(n, Some(42));

        // KILL QUERY from a second connection, as the application would send it.
        let id = conn.id();
        let sleeper = tokio::spawn(async move {
            let started = Instant::now();
            let r: std::result::Result<Option<i64>, _> = conn.query_first("SELECT SLEEP(30)").await;
            (r, started.elapsed(), conn)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut killer = mysql_async::Conn::new(mysql_async_opts(&s, &cert, "alice")).await?;
        killer.query_drop(format!("KILL QUERY {id}")).await?;
        let (r, took, conn) = sleeper.await?;
        assert!(took < Duration::from_secs(15), "not cancelled: {took:?}");
        match r {
            Ok(v) => assert_eq!(v, Some(1)),
            Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1317, "{e:?}"),
            Err(e) => bail!("{e}"),
        }
        conn.disconnect().await?;

        // Refused: another database user than the certificate's.
        match mysql_async::Conn::new(mysql_async_opts(&s, &cert, "bob")).await {
            Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1045, "{e:?}"),
            Err(e) => bail!("unexpected error: {e}"),
            Ok(_) => bail!("bob admitted"),
        }
        Ok::<(), anyhow::Error>(())
    })
}
