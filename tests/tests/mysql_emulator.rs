//! MariaDB and the RDS Proxy emulator's MySQL mode, driven with the stock `mariadb` client and a
//! hand-driven client on `sluice-mysqlwire`: the harness's private server, IAM-token logins over
//! TLS, refusals (bad token, no TLS, unknown KILL id) and `KILL QUERY` through a second emulator
//! connection ending a `SELECT SLEEP(30)`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice_mysqlwire::{
    encode_clear_password, AuthReply, CapabilityFlags, ErrPacket, Handshake, HandshakeResponse, Packet, PacketDecoder,
    PacketEncoder, SslRequest, CLEAR_PASSWORD_PLUGIN, COM_QUERY, NATIVE_PASSWORD_PLUGIN,
};
use sluice_tests::sluice_control::demo::{find_bin, AwsCreds, Emulator, DEMO_REGION};
use sluice_tests::sluice_control::state::random_secret;
use sluice_tests::{check_output, client_config_from_pem, skip_without_mariadb, MariaDb, TestDir};

#[test]
fn mariadb_harness_runs_sql_and_creates_users() {
    if skip_without_mariadb() {
        return;
    }
    let dir = TestDir::new("mariadb").unwrap();
    let db = MariaDb::start(&dir.join("mariadb")).unwrap();
    assert_eq!(db.sql("SELECT @@port").unwrap(), db.port().to_string());
    assert_eq!(db.sql("SELECT @@max_allowed_packet, @@local_infile").unwrap(), "1073741824\t1");
    assert!(db.socket().exists());
    db.create_user("bob", "it's a secret").unwrap();
    assert_eq!(db.sql("SELECT plugin FROM mysql.user WHERE user = 'bob'").unwrap(), "mysql_native_password");
    // The password works over TCP, and a wrong one does not.
    let login = |pw: &str| {
        Command::new(db.client())
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &db.port().to_string(), "-u", "bob"])
            .env("MYSQL_PWD", pw)
            .args(["-N", "-B", "-e", "SELECT CURRENT_USER()"])
            .output()
            .unwrap()
    };
    let ok = login("it's a secret");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "bob@%");
    let bad = login("wrong");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("1045"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// MariaDB with user `alice` (database `demo`) and the MySQL emulator holding her secret.
struct Setup {
    // Fields drop in order: the emulator, then MariaDB, then the directory.
    emu: Emulator,
    db: MariaDb,
    dir: TestDir,
    /// alice's MariaDB password: the emulator's stored secret.
    password: String,
}

impl Setup {
    fn start(name: &str) -> Setup {
        let dir = TestDir::new(name).unwrap();
        let db = MariaDb::start(&dir.join("mariadb")).unwrap();
        let password = random_secret(12);
        db.create_user("alice", &password).unwrap();
        db.sql("CREATE DATABASE demo").unwrap();
        let emu = Emulator::start_mysql(
            &dir.join("emulator"),
            db.port(),
            &[AwsCreds::demo()],
            &[("alice".to_owned(), password.clone())],
        )
        .unwrap();
        assert!(emu.mysql && !emu.plaintext);
        Setup { emu, db, dir, password }
    }

    /// A token for `user` signed with `creds`, from `sluice aws rds-token` (botocore's algorithm).
    fn token(&self, creds: &AwsCreds, user: &str) -> String {
        self.token_for(&self.emu, creds, user)
    }

    fn token_for(&self, emu: &Emulator, creds: &AwsCreds, user: &str) -> String {
        let mut cmd = Command::new(find_bin("sluice").unwrap());
        cmd.args(["aws", "rds-token", "--host", &emu.endpoint, "--port", &emu.port.to_string()])
            .args(["--user", user, "--region", DEMO_REGION])
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env("AWS_CONFIG_FILE", self.dir.join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.dir.join("no-aws-credentials"));
        creds.apply(&mut cmd);
        check_output("sluice aws rds-token", &cmd.output().unwrap()).unwrap().trim().to_owned()
    }

    /// The stock client through the emulator, as RDS documents it: TLS verified against the
    /// proxy's CA, the token as the password through the cleartext plugin (always enabled in
    /// MariaDB's client, which warns that `--enable-cleartext-plugin` is obsolete).
    fn mariadb(&self, user: &str, password: &str, tls: bool, sql: &str) -> Output {
        self.mariadb_to(&self.emu, user, password, tls, sql)
    }

    fn mariadb_to(&self, emu: &Emulator, user: &str, password: &str, tls: bool, sql: &str) -> Output {
        let mut cmd = Command::new(self.db.client());
        cmd.args(["--no-defaults", "-h", "127.0.0.1", "-P", &emu.port.to_string(), "-u", user])
            .env("MYSQL_PWD", password)
            .args(["--connect-timeout=20", "-D", "demo", "-N", "-B", "-e", sql]);
        if tls {
            cmd.args(["--ssl", "--ssl-verify-server-cert", "--ssl-ca"]).arg(&emu.ca_file);
        } else {
            cmd.arg("--skip-ssl");
        }
        cmd.output().unwrap()
    }

    fn log(&self) -> String {
        sluice_tests::tail(&self.dir.join("emulator").join("emulator.log"), 20)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn mariadb_client_logs_in_with_a_token_over_tls() {
    if skip_without_mariadb() {
        return;
    }
    let s = Setup::start("myemu-login");
    let token = s.token(&AwsCreds::demo(), "alice");
    let out = s.mariadb("alice", &token, true, "SELECT CURRENT_USER(), DATABASE(), @@port");
    let rows = check_output("mariadb through the emulator", &out).unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    // The backend's user, the database the client named, and MariaDB's own port behind the proxy.
    assert_eq!(rows.trim(), format!("alice@%\tdemo\t{}", s.db.port()));

    // A token signed with another secret is refused like a wrong password.
    let bad = s.token(&AwsCreds { secret_key: "wrong".into(), ..AwsCreds::demo() }, "alice");
    let out = s.mariadb("alice", &bad, true, "SELECT 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ERROR 1045 (28000)"), "{}", stderr(&out));
    // ... and so is alice's token presented as another user.
    let out = s.mariadb("root", &token, true, "SELECT 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ERROR 1045 (28000)"), "{}", stderr(&out));
    // A client without TLS is refused before any token is asked for.
    let out = s.mariadb("alice", &token, false, "SELECT 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ERROR 1045 (28000)"), "{}", stderr(&out));
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));
    // The good token still works: refusals left nothing behind.
    let out = s.mariadb("alice", &token, true, "SELECT 2");
    assert_eq!(check_output("mariadb again", &out).unwrap().trim(), "2");
}

#[test]
fn plaintext_emulator_serves_clients_without_tls_but_still_checks_tokens() {
    if skip_without_mariadb() {
        return;
    }
    let s = Setup::start("myemu-plain");
    let plain = Emulator::start_mysql_opts(
        &s.dir.join("emulator-plain"),
        s.db.port(),
        &[AwsCreds::demo()],
        &[("alice".to_owned(), s.password.clone())],
        true,
    )
    .unwrap();
    assert!(plain.plaintext && plain.mysql);
    let token = s.token_for(&plain, &AwsCreds::demo(), "alice");
    let out = s.mariadb_to(&plain, "alice", &token, false, "SELECT CURRENT_USER()");
    assert_eq!(check_output("mariadb without TLS", &out).unwrap().trim(), "alice@%");
    // TLS is not offered, so a client that insists on it gives up.
    let out = s.mariadb_to(&plain, "alice", &token, true, "SELECT 1");
    assert!(!out.status.success(), "a TLS client connected to the plaintext emulator");
    // The token is still what logs in: one for the TLS emulator's port is refused.
    let other = s.token(&AwsCreds::demo(), "alice");
    let out = s.mariadb_to(&plain, "alice", &other, false, "SELECT 1");
    assert!(stderr(&out).contains("ERROR 1045 (28000)"), "{}", stderr(&out));
}

/// A MySQL client over TLS to the emulator, driven packet by packet.
struct RawClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    greeting: Handshake,
}

fn read_packet(r: &mut impl Read) -> Packet {
    let mut decoder = PacketDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    loop {
        if let Some(p) = decoder.next_packet(&mut buf).unwrap() {
            return p;
        }
        let mut chunk = vec![0u8; decoder.needed(&buf).unwrap()];
        r.read_exact(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk);
    }
}

impl RawClient {
    fn connect(emu: &Emulator, user: &str, token: &str) -> RawClient {
        let mut tcp = TcpStream::connect(("127.0.0.1", emu.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let greeting = Handshake::decode(&read_packet(&mut tcp).payload).unwrap();
        let caps = CapabilityFlags::PROTOCOL_41
            | CapabilityFlags::SECURE_CONNECTION
            | CapabilityFlags::PLUGIN_AUTH
            | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA
            | CapabilityFlags::TRANSACTIONS
            | CapabilityFlags::SSL;
        let mut out = BytesMut::new();
        let mut enc = PacketEncoder::new(1);
        let ssl = SslRequest { capabilities: caps, max_packet_size: 1 << 24, charset: 45, mariadb_capabilities: 0 };
        enc.write_with(&mut out, |o| ssl.encode(o));
        tcp.write_all(&out).unwrap();
        let ca = std::fs::read_to_string(&emu.ca_file).unwrap();
        let config = Arc::new(client_config_from_pem(&ca, None).unwrap());
        let name = rustls_pki_types::ServerName::try_from(emu.endpoint.clone()).unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut auth_response = BytesMut::new();
        encode_clear_password(token.as_bytes(), &mut auth_response).unwrap();
        let response = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 45,
            mariadb_capabilities: 0,
            username: user.to_owned(),
            auth_response: auth_response.to_vec(),
            database: None,
            auth_plugin_name: Some(CLEAR_PASSWORD_PLUGIN.to_owned()),
            connect_attrs: Vec::new(),
        };
        let mut out = BytesMut::new();
        enc.try_write_with(&mut out, |o| response.encode(o)).unwrap();
        tls.write_all(&out).unwrap();
        // The token went along with the response: no switch, straight to the backend's OK,
        // numbered after the response.
        let reply = read_packet(&mut tls);
        assert_eq!(reply.seq, 3);
        match AuthReply::decode(&reply.payload, caps).unwrap() {
            AuthReply::Ok(_) => {}
            other => panic!("login through the emulator: {other:?}"),
        }
        RawClient { tls, greeting }
    }

    /// Sends a query; its first answer packet: `Err` for ERR, `Ok` for a result set or OK.
    fn query(&mut self, sql: &str) -> Result<Packet, ErrPacket> {
        let mut payload = vec![COM_QUERY];
        payload.extend_from_slice(sql.as_bytes());
        let mut out = BytesMut::new();
        PacketEncoder::new(0).write(&payload, &mut out);
        self.tls.write_all(&out).unwrap();
        let first = read_packet(&mut self.tls);
        match first.payload.first() {
            Some(0xFF) => Err(ErrPacket::decode(&first.payload).unwrap()),
            _ => Ok(first),
        }
    }
}

#[test]
fn kill_query_through_a_second_connection_ends_a_sleep() {
    if skip_without_mariadb() {
        return;
    }
    let s = Setup::start("myemu-kill");
    let token = s.token(&AwsCreds::demo(), "alice");
    let mut victim = RawClient::connect(&s.emu, "alice", &token);
    // The greeting is the emulator's: TLS and plugin auth offered, a native-password scramble,
    // MariaDB's version, and an id of the emulator's own rather than the backend thread's.
    let g = &victim.greeting;
    assert!(g.capabilities.contains(CapabilityFlags::SSL | CapabilityFlags::PLUGIN_AUTH), "{g:?}");
    assert_eq!(g.auth_plugin_name.as_deref(), Some(NATIVE_PASSWORD_PLUGIN));
    assert_eq!(g.auth_plugin_data.len(), 20);
    assert!(g.server_version.contains("MariaDB"), "{}", g.server_version);
    let ours = g.connection_id;
    let backend_threads = s.db.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'alice'").unwrap();
    assert!(!backend_threads.split_whitespace().any(|t| t == ours.to_string()), "{ours} in {backend_threads}");

    // An id no emulator connection has is refused by the emulator itself.
    let out = s.mariadb("alice", &token, true, "KILL QUERY 999999");
    assert!(stderr(&out).contains("ERROR 1094"), "{}", stderr(&out));

    let killer = std::thread::spawn({
        let s_port = s.emu.port;
        let ca = s.emu.ca_file.clone();
        let client = s.db.client().to_owned();
        let token = token.clone();
        move || {
            std::thread::sleep(Duration::from_millis(1500));
            kill_query(&client, s_port, &ca, &token, ours)
        }
    });
    let started = Instant::now();
    let answer = victim.query("SELECT SLEEP(30)");
    let took = started.elapsed();
    let out = killer.join().unwrap();
    assert!(out.status.success(), "KILL QUERY through the emulator: {}\n{}", stderr(&out), s.log());
    assert!(took < Duration::from_secs(15), "SELECT SLEEP(30) ran {took:?}: KILL QUERY did not reach it");
    // MariaDB ends an interrupted SLEEP with ER_QUERY_INTERRUPTED, or (like MySQL) returns 1.
    if let Err(e) = &answer {
        assert_eq!(e.code, 1317, "{e:?}");
    }
    // KILL QUERY left the connection usable.
    let mut victim = victim;
    assert!(victim.query("SELECT 1").is_ok());
}

fn kill_query(client: &Path, port: u16, ca: &Path, token: &str, id: u32) -> Output {
    Command::new(client)
        .args(["--no-defaults", "-h", "127.0.0.1", "-P", &port.to_string(), "-u", "alice"])
        .env("MYSQL_PWD", token)
        .args(["--ssl", "--ssl-verify-server-cert", "--ssl-ca"])
        .arg(ca)
        .args(["-N", "-B", "-e", &format!("KILL QUERY {id}")])
        .output()
        .unwrap()
}
