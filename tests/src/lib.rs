//! Support for Sluice's integration tests.
//!
//! Every test starts the real thing on loopback: PostgreSQL, the RDS Proxy emulator and `control`
//! (through [`sluice_control::demo::Stack`]), then talks to it with the `sluice` binary, stock
//! `/usr/bin/psql`, tokio-postgres over rustls, or raw bytes on a [`TcpStream`]. This crate holds
//! the pieces those tests share:
//!
//! * [`TestDir`] and [`Harness`]: a private directory under [`std::env::temp_dir`] and a running
//!   stack with role `dev` and user `alice` set up, the `sluice` CLI wired to a private
//!   `SLUICE_HOME`, and certificates issued directly with control's CA (bypassing the API's
//!   pre-check, so control's connect-time checks are what a test exercises);
//! * [`parse_env_exports`] and [`psql`]: `sluice db env` output as environment variables for psql;
//! * [`client_config_from_files`], [`client_config_from_pem`] and [`connect`]: tokio-postgres with a
//!   client certificate;
//! * [`startup_packet`], [`ssl_request`], [`cancel_request`], [`read_to_close`], [`backend_messages`],
//!   [`error_fields`] and [`RawSession`]: the PostgreSQL wire protocol by hand, for malformed-input
//!   and cancel tests;
//! * [`StoragePg`] and [`TestCa`]: a PostgreSQL for the auth storage, with TLS from a test CA and
//!   role `sluice` admitted only over TLS with a password file;
//! * [`MariaDb`] and [`skip_without_mariadb`]: a private MariaDB server for the MySQL tests;
//! * [`wait_until`] and [`runtime`].
//!
//! The binaries (`control`, `sluice`, `rds-proxy-emulator`) must have been built first
//! (`cargo build --workspace --bins`); [`sluice_control::demo::find_bin`] finds them next to the
//! test executables.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sluice_control::ca::{DbRoute, Identity};
use sluice_control::demo::{dev_role, find_bin, AwsCreds, ControlProc, Stack};
pub use sluice_control::demo::{parse_env_exports, LIBPQ_VARS};
use sluice_control::state::{random_secret, AuditRow, State};
use time::OffsetDateTime;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use sluice_control;
// In the std-only support crate, which the data plane's tests use too.
pub use sluice_test_support::count_in;

pub mod moto;

/// Where psql lives (the Debian/Ubuntu wrapper that picks the newest client).
pub const PSQL: &str = "/usr/bin/psql";

/// A private directory under the system temp dir, removed when dropped.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/sluice-it-<name>-<pid>-<random>`.
    pub fn new(name: &str) -> Result<TestDir> {
        let path = std::env::temp_dir().join(format!("sluice-it-{name}-{}-{}", std::process::id(), random_secret(4)));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = path.canonicalize()?;
        Ok(TestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    /// Removes the directory, unless `SLUICE_KEEP_TEST_DIRS` is set (to read the logs of a
    /// failed run).
    fn drop(&mut self) {
        if std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The last `n` lines of a file, for failure reports.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A client certificate and the private key it was issued for, as PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running stack with the `dev` role (env=dev, database name `demo`, database user `alice`)
/// and the Sluice user `alice` holding it.
///
/// Fields drop in order: the stack (its processes) first, the directory last.
pub struct Harness {
    pub stack: Stack,
    /// The same SQLite state control reads per connection.
    pub state: State,
    /// Control's CA certificate, written for `sluice login --ca-file`.
    pub ca_file: PathBuf,
    pub ca_pem: String,
    /// `SLUICE_HOME` of the `sluice` commands run through [`Harness::sluice`].
    pub home: PathBuf,
    /// Alice's Sluice password.
    pub password: String,
    pub dir: TestDir,
}

impl Harness {
    /// Starts a stack whose control signs IAM tokens with the demo credentials.
    pub fn start(name: &str) -> Result<Harness> {
        Self::start_with_creds(name, &AwsCreds::demo())
    }

    /// Starts a stack whose control signs IAM tokens with `creds` (the emulator accepts only the
    /// demo credentials).
    pub fn start_with_creds(name: &str, creds: &AwsCreds) -> Result<Harness> {
        Self::start_opts(name, creds, true)
    }

    /// Starts a stack; without a dataplane process when `with_dataplane` is false (control then
    /// relays sessions itself).
    pub fn start_opts(name: &str, creds: &AwsCreds, with_dataplane: bool) -> Result<Harness> {
        Self::start_full(name, creds, with_dataplane.then_some(&[]), None)
    }

    /// Starts a stack whose dataplane gets `dataplane_args` (e.g. `--counters userspace`).
    pub fn start_with_dataplane_args(name: &str, dataplane_args: &[&str]) -> Result<Harness> {
        Self::start_full(name, &AwsCreds::demo(), Some(dataplane_args), None)
    }

    /// Starts a stack with a dataplane whose PostgreSQL takes `max_connections` clients (one
    /// per session, through the emulator), for tests holding hundreds of sessions.
    pub fn start_sized(name: &str, max_connections: u32) -> Result<Harness> {
        Self::start_full(name, &AwsCreds::demo(), Some(&[]), Some(max_connections))
    }

    fn start_full(
        name: &str,
        creds: &AwsCreds,
        dataplane: Option<&[&str]>,
        max_connections: Option<u32>,
    ) -> Result<Harness> {
        let dir = TestDir::new(name)?;
        let started = Instant::now();
        let stack =
            Stack::start_sized(&dir.join("stack"), creds, dataplane, max_connections).context("starting the stack")?;
        eprintln!("[{name}] stack started in {:.1?}", started.elapsed());
        let state = stack.control.state()?;
        state.upsert_role(&dev_role("dev", &["demo"], &["alice"])?)?;
        let password = format!("pw-{}", random_secret(6));
        state.add_user("alice", &password, &["dev".to_owned()])?;
        let ca_pem = state.ensure_ca("sluice")?.cert_pem;
        let ca_file = dir.join("control-ca.pem");
        std::fs::write(&ca_file, &ca_pem)?;
        let home = dir.join("home");
        Ok(Harness { stack, state, ca_file, ca_pem, home, password, dir })
    }

    /// Control's PostgreSQL port.
    pub fn pg_port(&self) -> u16 {
        self.stack.control.pg_port
    }

    /// Control's API address as `sluice login --proxy` takes it.
    pub fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.stack.control.api_port)
    }

    /// Runs the `sluice` binary with this harness's `SLUICE_HOME` and alice's password.
    pub fn sluice<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.sluice_as(&self.home, &self.password, args)
    }

    /// Runs the `sluice` binary with another home and password (another user).
    pub fn sluice_as<I, S>(&self, home: &Path, password: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(find_bin("sluice")?);
        cmd.args(args).env("SLUICE_HOME", home).env("SLUICE_PASSWORD", password).stdin(Stdio::null());
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    /// Like [`Harness::sluice`], but fails unless the command succeeds; returns its stdout.
    pub fn sluice_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.sluice(args)?;
        check_output(&format!("sluice {args:?}"), &out)
    }

    /// `sluice login` as alice.
    pub fn login(&self) -> Result<String> {
        let ca = self.ca_file.to_string_lossy().into_owned();
        self.sluice_ok(&["login", "--proxy", &self.api_addr(), "--user", "alice", "--ca-file", &ca])
    }

    /// The libpq environment of a local client on control's Unix socket for `db` (plaintext; the
    /// OS user running the tests is mapped to alice).
    pub fn local_env(&self, db: &str) -> Result<Vec<(String, String)>> {
        let local = self.stack.control.config.proxy_service.local_socket.as_ref().context("no local socket")?;
        let host = local.dir.join(db);
        let socket = host.join(".s.PGSQL.5432");
        // Control creates the sockets in the background, right after it starts.
        wait_until(Duration::from_secs(10), "the local socket", || Ok(socket.exists().then_some(())))?;
        Ok(vec![
            ("PGHOST".into(), host.to_string_lossy().into_owned()),
            ("PGUSER".into(), "alice".into()),
            ("PGDATABASE".into(), "demo".into()),
        ])
    }

    /// libpq environment straight to PostgreSQL (no Sluice), as alice.
    pub fn direct_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.stack.postgres.port.to_string()),
            ("PGUSER".into(), "alice".into()),
            ("PGDATABASE".into(), "demo".into()),
            ("PGPASSWORD".into(), self.stack.db_password.clone()),
            ("PGSSLMODE".into(), "disable".into()),
        ]
    }

    /// `sluice login`, `sluice db login demo --db-user alice --db-name demo` and `sluice db env
    /// demo`; returns the environment that `eval "$(sluice db env demo)"` would set.
    pub fn login_demo(&self) -> Result<Vec<(String, String)>> {
        self.login()?;
        self.sluice_ok(&["db", "login", "demo", "--db-user", "alice", "--db-name", "demo"])?;
        Ok(parse_env_exports(&self.sluice_ok(&["db", "env", "demo"])?)?)
    }

    /// A client certificate issued directly with control's CA for `identity`, valid from
    /// `not_before` to `not_after`, over a fresh key pair.
    pub fn issue_cert_window(
        &self,
        identity: &Identity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<ClientCert> {
        let ca = self.state.ensure_ca("sluice")?;
        let key = rcgen::KeyPair::generate()?;
        let cert_pem = ca.issue_client(identity, &key.public_key_pem(), not_before, not_after)?;
        Ok(ClientCert { cert_pem, key_pem: key.serialize_pem() })
    }

    /// A client certificate valid for the next hour, for `user` on route `service`/`db_user`/`db_name`.
    pub fn issue_cert(&self, user: &str, service: &str, db_user: &str, db_name: &str) -> Result<ClientCert> {
        let now = OffsetDateTime::now_utc();
        self.issue_cert_window(
            &route_identity(user, service, db_user, db_name),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
    }

    /// A rustls config trusting control's CA and presenting `cert` (or no certificate).
    pub fn tls(&self, cert: Option<&ClientCert>) -> Result<ClientConfig> {
        client_config_from_pem(&self.ca_pem, cert)
    }

    /// Connects with tokio-postgres to control as `user`/`db`, presenting `cert`.
    pub async fn connect_with(
        &self,
        cert: Option<&ClientCert>,
        user: &str,
        db: &str,
    ) -> std::result::Result<Connected, ConnectError> {
        let tls = self.tls(cert).map_err(ConnectError::Setup)?;
        connect(self.pg_port(), user, db, tls).await.map_err(ConnectError::Postgres)
    }

    /// The audit events recorded so far (oldest first).
    pub fn audit(&self) -> Result<Vec<AuditRow>> {
        Ok(self.state.audit_events(10_000)?)
    }

    /// The JSON lines audit file control appends to.
    pub fn audit_file(&self) -> PathBuf {
        self.stack.control.config.audit_json_file()
    }

    /// Control's log file.
    pub fn control_log(&self) -> PathBuf {
        self.stack.dir.join("control").join("control.log")
    }

    /// Whether the control process is still running.
    pub fn control_alive(&mut self) -> bool {
        self.stack.control.proc.alive()
    }

    /// Stops control, lets `edit` change its configuration, and starts it again on the same
    /// ports and state.
    pub fn restart_control(&mut self, edit: impl FnOnce(&mut sluice_control::config::Config)) -> Result<()> {
        self.stack.control.proc.stop(nix::sys::signal::Signal::SIGTERM);
        self.start_control_again(edit)
    }

    /// Starts control again after the test stopped it (with `edit` applied to its config), and
    /// waits until it is linked to the dataplane again if there is one.
    pub fn start_control_again(&mut self, edit: impl FnOnce(&mut sluice_control::config::Config)) -> Result<()> {
        let log = self.control_log();
        let links = move || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.matches("connected to the dataplane").count()
        };
        let before = links();
        let old = &self.stack.control;
        let mut config = old.config.clone();
        edit(&mut config);
        std::fs::write(&old.config_path, serde_saphyr::to_string(&config)?)?;
        self.stack.control = ControlProc::spawn(
            old.config_path.clone(),
            config,
            old.pg_port,
            old.api_port,
            &AwsCreds::demo(),
            &self.stack.dir.join("control"),
        )?;
        if self.stack.dataplane.is_some() {
            wait_until(Duration::from_secs(10), "control reconnects to the dataplane", || {
                Ok((links() > before).then_some(()))
            })?;
        }
        Ok(())
    }

    /// Makes alice an admin of the web console (role `admin`, `spec.admin: true`), restarts
    /// control serving it on a free port (with `edit` applied to the config too) and waits for
    /// it; its address.
    pub fn enable_web_console(&mut self, edit: impl FnOnce(&mut sluice_control::config::Config)) -> Result<String> {
        let admin = serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": "admin"}, "spec": {"admin": true}});
        self.state.upsert_role(&role(admin)?)?;
        self.state.update_user_roles("alice", &["dev".to_owned(), "admin".to_owned()])?;
        let port = sluice_control::demo::free_port()?;
        self.restart_control(|c| {
            c.auth_service.web_listen_addr = Some(([127, 0, 0, 1], port).into());
            edit(c);
        })?;
        let addr = format!("127.0.0.1:{port}");
        wait_until(Duration::from_secs(10), "the web console", || {
            Ok(https_request(&addr, &self.ca_pem, "GET", "/login", &[], b"").ok())
        })?;
        Ok(addr)
    }

    /// Runs an admin verb (`control --config … ARGS`); fails unless it succeeds; returns stdout.
    pub fn control_ok(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(find_bin("control")?);
        cmd.arg("--config").arg(&self.stack.control.config_path).args(args).stdin(Stdio::null());
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        check_output(&format!("control {args:?}"), &out)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- control.log (tail) ----\n{}", tail(&self.control_log(), 40));
            eprintln!(
                "---- emulator.log (tail) ----\n{}",
                tail(&self.stack.dir.join("emulator").join("emulator.log"), 20)
            );
        }
    }
}

/// An identity with a database route, as `sluice db login` would get it.
pub fn route_identity(user: &str, service: &str, db_user: &str, db_name: &str) -> Identity {
    Identity {
        v: 1,
        user: user.to_owned(),
        route: Some(DbRoute { service: service.to_owned(), db_user: db_user.to_owned(), db_name: db_name.to_owned() }),
    }
}

/// A role from its JSON form (the same shape as the `kind: role` YAML).
pub fn role(spec: serde_json::Value) -> Result<sluice_control::rbac::Role> {
    let role: sluice_control::rbac::Role = serde_json::from_value(spec)?;
    role.validate()?;
    Ok(role)
}

/// Returns stdout of a finished command, or an error with its status and stderr.
pub fn check_output(what: &str, out: &Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An HTTP response as [`http_get`] returns it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// GETs `path` from `addr` (`HOST:PORT`) over HTTP/1.1 and reads the response to the end (the
/// request asks the server to close the connection after it).
pub fn http_get(addr: &str, path: &str) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("reading the answer to GET {path}"))?;
    parse_http_response(&text)
}

/// One HTTP/1.1 exchange over TLS trusting `ca_pem` (`Connection: close`): the web console's
/// tests. `headers` are sent as given (e.g. a `Cookie`).
pub fn https_request(
    addr: &str,
    ca_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<HttpResponse> {
    let tls = client_config_from_pem(ca_pem, None)?;
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(tls), rustls_pki_types::ServerName::try_from(host)?)?;
    let tcp = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut raw = Vec::new();
    // A server that closes without close_notify still sent a whole answer (Content-Length).
    let _ = s.read_to_end(&mut raw);
    parse_http_response(&String::from_utf8_lossy(&raw))
}

fn parse_http_response(text: &str) -> Result<HttpResponse> {
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no end of headers: {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse { status, headers, body: body.to_owned() })
}

/// GETs a Prometheus `/metrics` URL (`http://HOST:PORT/metrics`) and returns the body; fails
/// unless it is a 200.
pub fn scrape(url: &str) -> Result<String> {
    let addr = url.trim_start_matches("http://").trim_end_matches("/metrics");
    let r = http_get(addr, "/metrics")?;
    if r.status != 200 {
        bail!("scraping {url}: {} {}", r.status, &r.body[..r.body.len().min(500)]);
    }
    Ok(r.body)
}

/// The value of `name` in an environment list.
pub fn env_get<'a>(env: &'a [(String, String)], name: &str) -> Result<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).ok_or_else(|| anyhow!("{name} is not set in {env:?}"))
}

/// A psql command with exactly `env` as its libpq environment (and none of the caller's), run
/// quietly: no psqlrc, unaligned tuples-only output, stop on the first error.
pub fn psql_cmd(env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(PSQL);
    for v in LIBPQ_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::null());
    cmd
}

/// Runs psql with `env` and `args`; returns its output whatever its exit status.
pub fn psql(env: &[(String, String)], args: &[&str]) -> Result<Output> {
    let mut cmd = psql_cmd(env);
    cmd.args(args);
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// Runs one SQL command with psql and returns its trimmed output; fails unless psql succeeds.
pub fn psql_query(env: &[(String, String)], sql: &str) -> Result<String> {
    let out = psql(env, &["-c", sql])?;
    Ok(check_output(&format!("psql {sql:?}"), &out)?.trim().to_owned())
}

/// Runs `cmd` (typically psql) with its stdout piped into `md5sum`, counting the bytes on the way;
/// returns the hex digest, the byte count and the wall time. Fails unless both succeed.
pub fn md5_of_stdout(mut cmd: Command) -> Result<(String, u64, Duration)> {
    let started = Instant::now();
    let mut producer =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut md5 =
        Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("starting md5sum")?;
    let mut from = producer.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut to = md5.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let bytes = std::io::copy(&mut from, &mut to).context("piping into md5sum")?;
    drop(to);
    let produced = producer.wait_with_output()?;
    let digest = md5.wait_with_output()?;
    let elapsed = started.elapsed();
    if !produced.status.success() {
        bail!("{cmd:?} failed ({}): {}", produced.status, String::from_utf8_lossy(&produced.stderr));
    }
    let sum = check_output("md5sum", &digest)?;
    let hex = sum.split_whitespace().next().ok_or_else(|| anyhow!("md5sum printed nothing"))?;
    Ok((hex.to_owned(), bytes, elapsed))
}

/// Pipes `producer`'s stdout into `consumer`'s stdin (like `a | b`); fails unless both succeed.
/// Returns the consumer's stdout.
pub fn pipe(mut producer: Command, mut consumer: Command) -> Result<String> {
    let mut a = producer
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {producer:?}"))?;
    let out = a.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let b = consumer
        .stdin(Stdio::from(out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {consumer:?}"))?;
    let b_out = b.wait_with_output()?;
    let a_out = a.wait_with_output()?;
    if !a_out.status.success() {
        bail!("{producer:?} failed ({}): {}", a_out.status, String::from_utf8_lossy(&a_out.stderr));
    }
    check_output(&format!("{consumer:?}"), &b_out)
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting the CAs in `ca_pem`, presenting `cert` if given.
pub fn client_config_from_pem(ca_pem: &str, cert: Option<&ClientCert>) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("parsing CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("no CA certificate in the PEM");
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match cert {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .context("parsing certificate PEM")?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).context("parsing key PEM")?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// A rustls client config from the files `sluice db login` wrote (PGSSLROOTCERT, PGSSLCERT,
/// PGSSLKEY).
pub fn client_config_from_files(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let cert = ClientCert { cert_pem: read(cert)?, key_pem: read(key)? };
    client_config_from_pem(&read(ca)?, Some(&cert))
}

/// tokio-postgres settings for control on 127.0.0.1:`port`, verifying the server as `localhost`.
pub fn pg_config(port: u16, user: &str, db: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(port)
        .user(user)
        .dbname(db)
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(20));
    cfg
}

/// A tokio-postgres client and the task driving its connection.
pub struct Connected {
    pub client: tokio_postgres::Client,
    pub connection: tokio::task::JoinHandle<()>,
}

impl Connected {
    /// Drops the client and waits for the connection to close cleanly.
    pub async fn close(self) -> Result<()> {
        drop(self.client);
        tokio::time::timeout(Duration::from_secs(10), self.connection).await.context("connection did not close")??;
        Ok(())
    }
}

/// Why [`Harness::connect_with`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// Building the TLS configuration failed (a test bug, not a refusal).
    Setup(anyhow::Error),
    /// The connection was refused or failed.
    Postgres(tokio_postgres::Error),
}

impl ConnectError {
    /// The tokio-postgres error; panics on a setup error, which no test expects.
    pub fn pg(self) -> tokio_postgres::Error {
        match self {
            ConnectError::Postgres(e) => e,
            ConnectError::Setup(e) => panic!("test setup failed: {e:#}"),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Setup(e) => write!(f, "setup: {e:#}"),
            ConnectError::Postgres(e) => write!(f, "{e} ({e:?})"),
        }
    }
}

/// Connects with tokio-postgres over rustls and spawns the connection task.
pub async fn connect(
    port: u16,
    user: &str,
    db: &str,
    tls: ClientConfig,
) -> std::result::Result<Connected, tokio_postgres::Error> {
    let (client, conn) = pg_config(port, user, db).connect(MakeRustlsConnect::new(tls)).await?;
    let connection = tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("tokio-postgres connection ended with: {e}");
        }
    });
    Ok(Connected { client, connection })
}

/// A multi-threaded tokio runtime for a test body (two workers: the machines are small).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- the wire protocol by hand ----

/// Protocol 3.0's version code.
pub const PROTOCOL_3_0: u32 = 196_608;
/// The SSLRequest code.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// The CancelRequest code.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// A StartupMessage (protocol 3.0) carrying `params`.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// An SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    let mut out = 8u32.to_be_bytes().to_vec();
    out.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// A CancelRequest (protocol 3.0, 4-byte key) for backend `pid` with key `secret`.
pub fn cancel_request(pid: u32, secret: u32) -> Vec<u8> {
    let mut out = 16u32.to_be_bytes().to_vec();
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    out
}

/// Connects to 127.0.0.1:`port` with read and write timeouts.
pub fn raw_connect(port: u16, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads until the peer closes the connection; returns what arrived and how long it took. A
/// connection reset counts as a close. Fails if the peer is still open after `timeout`.
pub fn read_to_close(s: &mut TcpStream, timeout: Duration) -> Result<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("peer still open after {timeout:?} (received {} bytes)", out.len());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok((out, started.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
                return Ok((out, started.elapsed()))
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes `bytes`; a peer that already closed (reset, broken pipe) is not an error here, since
/// refusing early is what several tests expect.
pub fn write_lenient(s: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    match s.write_all(bytes) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Splits a byte stream into typed backend messages (tag, body); fails on a truncated message.
pub fn backend_messages(mut bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 5 {
            bail!("truncated message header: {bytes:?}");
        }
        let tag = bytes[0];
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len < 4 || bytes.len() < 1 + len {
            bail!("message {:?} claims length {len} but {} bytes follow", tag as char, bytes.len() - 1);
        }
        out.push((tag, bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    Ok(out)
}

/// The fields of an ErrorResponse or NoticeResponse body, by field type (`'C'`, `'M'`, `'H'`...).
pub fn error_fields(body: &[u8]) -> Result<BTreeMap<char, String>> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    loop {
        let (&kind, after) = rest.split_first().ok_or_else(|| anyhow!("error response ends without a terminator"))?;
        if kind == 0 {
            return Ok(out);
        }
        let nul = after.iter().position(|&b| b == 0).ok_or_else(|| anyhow!("unterminated error field"))?;
        out.insert(kind as char, String::from_utf8_lossy(&after[..nul]).into_owned());
        rest = &after[nul + 1..];
    }
}

/// A session opened by hand over TLS, with the cancel key Sluice gave it (tokio-postgres keeps
/// its key to itself).
pub struct RawSession {
    pub stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pub pid: u32,
    pub secret: u32,
}

impl RawSession {
    /// SSLRequest, TLS with `tls` (the server verified as 127.0.0.1), a protocol 3.0 startup as
    /// `user` to `db`, then everything up to ReadyForQuery.
    pub fn open(port: u16, tls: ClientConfig, user: &str, db: &str) -> Result<RawSession> {
        let mut sock = raw_connect(port, Duration::from_secs(10))?;
        sock.write_all(&ssl_request())?;
        let mut answer = [0u8; 1];
        sock.read_exact(&mut answer)?;
        if answer[0] != b'S' {
            bail!("the SSLRequest was answered {:?}", answer[0] as char);
        }
        let conn = rustls::ClientConnection::new(Arc::new(tls), "127.0.0.1".try_into()?)?;
        let mut stream = rustls::StreamOwned::new(conn, sock);
        stream.write_all(&startup_packet(&[("user", user), ("database", db)]))?;
        stream.flush()?;
        let mut key = None;
        loop {
            let (tag, body) = read_message(&mut stream)?;
            match tag {
                b'K' if body.len() == 8 => {
                    let word = |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
                    key = Some((word(0), word(4)));
                }
                b'E' => bail!("the session was refused: {:?}", error_fields(&body)?),
                b'Z' => break,
                _ => {}
            }
        }
        let (pid, secret) = key.context("no BackendKeyData")?;
        Ok(RawSession { stream, pid, secret })
    }

    /// Sends a simple Query.
    pub fn send_query(&mut self, sql: &str) -> Result<()> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&u32::try_from(body.len() + 4)?.to_be_bytes());
        msg.extend(body);
        self.stream.write_all(&msg)?;
        Ok(self.stream.flush()?)
    }

    /// Reads the answer to a query up to ReadyForQuery: the error's fields, if it failed.
    pub fn finish_query(&mut self, timeout: Duration) -> Result<Option<BTreeMap<char, String>>> {
        self.stream.sock.set_read_timeout(Some(timeout))?;
        let mut error = None;
        loop {
            let (tag, body) =
                read_message(&mut self.stream).with_context(|| format!("no answer to the query within {timeout:?}"))?;
            match tag {
                b'E' => error = Some(error_fields(&body)?),
                b'Z' => return Ok(error),
                _ => {}
            }
        }
    }
}

/// Reads one backend message (tag, body).
pub fn read_message(r: &mut impl Read) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=1 << 24).contains(&len) {
        bail!("message {:?} claims length {len}", head[0] as char);
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// The single ErrorResponse a refused raw connection received, as fields.
pub fn only_error(bytes: &[u8]) -> Result<BTreeMap<char, String>> {
    let msgs = backend_messages(bytes)?;
    match msgs.as_slice() {
        [(b'E', body)] => error_fields(body),
        other => bail!(
            "expected exactly one ErrorResponse, got {:?}",
            other.iter().map(|(t, b)| (*t as char, b.len())).collect::<Vec<_>>()
        ),
    }
}

/// A dynamic database (`kind: db`, as `control db add` takes it) reaching the stack's demo
/// database through the emulator, with `labels`: what the cluster tests' agents serve.
pub fn shared_db(h: &Harness, name: &str, labels: &[(&str, &str)]) -> Result<sluice_control::config::DbResource> {
    let spec = h.stack.control.config.db_service.databases.first().context("the stack has no database")?.spec.clone();
    Ok(sluice_control::config::DbResource {
        kind: "db".into(),
        version: "v3".into(),
        metadata: sluice_control::config::Metadata {
            name: name.into(),
            description: String::new(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        },
        spec,
    })
}

/// A `control` process with only an auth service to join, started on its own (no database, no
/// data plane): the auth server of the cluster tests.
pub fn start_auth(dir: &Path) -> Result<ControlProc> {
    Ok(ControlProc::start(&dir.join("auth"), Vec::new(), &AwsCreds::demo(), None)?)
}

/// [`start_auth`] with `edit` applied to the auth server's config (e.g. a short
/// `host_cert_ttl`): started once to write its config, then again on the edited one.
pub fn start_auth_with(dir: &Path, edit: impl FnOnce(&mut sluice_control::config::Config)) -> Result<ControlProc> {
    let mut auth = start_auth(dir)?;
    auth.proc.stop(nix::sys::signal::Signal::SIGTERM);
    let mut config = auth.config.clone();
    edit(&mut config);
    std::fs::write(&auth.config_path, serde_saphyr::to_string(&config)?)?;
    Ok(ControlProc::spawn(
        auth.config_path.clone(),
        config,
        auth.pg_port,
        auth.api_port,
        &AwsCreds::demo(),
        &dir.join("auth"),
    )?)
}

/// Runs `control -c AUTH_CONFIG ARGS...` against the auth server's config.
pub fn auth_control(auth: &ControlProc, args: &[&str]) -> Result<String> {
    let out = Command::new(find_bin("control")?).arg("--config").arg(&auth.config_path).args(args).output()?;
    check_output(&format!("control {args:?}"), &out)
}

/// A join token from the auth server, as an operator gets it (`control tokens add --type=db`).
pub fn join_token(auth: &ControlProc, ttl: &str) -> Result<String> {
    let out = auth_control(auth, &["tokens", "add", "--type=db", "--ttl", ttl, "--format", "json"])?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok(v["token"].as_str().context("no token in the json")?.to_owned())
}

/// The CA pin `control status` prints.
pub fn ca_pin(auth: &ControlProc) -> Result<String> {
    let out = auth_control(auth, &["status"])?;
    let line = out.lines().find(|l| l.starts_with("CA pin")).context("no CA pin in control status")?;
    Ok(line.split_whitespace().last().unwrap_or_default().to_owned())
}

/// The auth server's cluster API address, as agents are told it.
pub fn cluster_addr(auth: &ControlProc) -> Result<String> {
    Ok(auth.config.auth_service.cluster_listen_addr.context("the auth server has no cluster listener")?.to_string())
}

/// An agent (`control` with `auth_service.enabled: false`), configured as an operator would:
/// `control db configure create --auth-server ... --token FILE --ca-pin ...`, then given a
/// free PostgreSQL port.
pub struct AgentProc {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: sluice_control::config::Config,
    pub token_file: PathBuf,
    pub pg_port: u16,
    pub log: PathBuf,
    child: Option<std::process::Child>,
    /// The agent's own data plane, if [`AgentProc::with_dataplane`] started one.
    pub dataplane: Option<sluice_control::demo::DataplaneProc>,
}

impl AgentProc {
    /// Writes the agent's token file and config under `dir`; starts nothing.
    pub fn configure(auth: &ControlProc, dir: &Path, token: &str, pin: &str) -> Result<AgentProc> {
        Self::configure_with_auth_servers(&[cluster_addr(auth)?], dir, token, pin)
    }

    /// [`AgentProc::configure`] for an agent that knows several auth servers (tried in this
    /// order), given as an operator would: `--auth-server A --auth-server B,C`.
    pub fn configure_with_auth_servers(
        auth_servers: &[String],
        dir: &Path,
        token: &str,
        pin: &str,
    ) -> Result<AgentProc> {
        std::fs::create_dir_all(dir)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        let config_path = dir.join("agent.yaml");
        let mut cmd = Command::new(find_bin("control")?);
        cmd.args(["db", "configure", "create", "--dynamic-resources-labels", "env=dev"]);
        // The first flag alone, the rest as a comma list: both forms reach the config.
        if let Some((first, rest)) = auth_servers.split_first() {
            cmd.args(["--auth-server", first]);
            if !rest.is_empty() {
                cmd.args(["--auth-server", &rest.join(",")]);
            }
        }
        let out = cmd
            .arg("--token")
            .arg(&token_file)
            .args(["--ca-pin", pin, "--data-dir"])
            .arg(dir.join("data"))
            .arg("-o")
            .arg(&config_path)
            .output()?;
        check_output("control db configure create", &out)?;
        let mut config: sluice_control::config::Config =
            sluice_control::config::from_yaml(&std::fs::read_to_string(&config_path)?)?;
        let written = config.join.as_ref().map(|j| j.auth_servers.as_slice()).unwrap_or_default();
        ensure!(written == auth_servers, "the config names auth servers {written:?}, not {auth_servers:?}");
        let pg_port = sluice_control::demo::free_port()?;
        config.proxy_service.postgres_listen_addr = ([127, 0, 0, 1], pg_port).into();
        std::fs::write(&config_path, serde_saphyr::to_string(&config)?)?;
        Ok(AgentProc {
            dir: dir.to_path_buf(),
            config_path,
            config,
            token_file,
            pg_port,
            log: dir.join("agent.log"),
            child: None,
            dataplane: None,
        })
    }

    /// Writes [`AgentProc::config`] back to the agent's config file (before [`AgentProc::start`]).
    pub fn save_config(&self) -> Result<()> {
        std::fs::write(&self.config_path, serde_saphyr::to_string(&self.config)?)?;
        Ok(())
    }

    /// Applies `edit` to the agent's config and writes it (before [`AgentProc::start`]).
    pub fn edit_config(&mut self, edit: impl FnOnce(&mut sluice_control::config::Config)) -> Result<()> {
        edit(&mut self.config);
        self.save_config()
    }

    /// Gives the agent a data plane process of its own, as each agent host runs.
    pub fn with_dataplane(&mut self) -> Result<()> {
        let dp = sluice_control::demo::DataplaneProc::start(&self.dir.join("dataplane"))?;
        self.config.dataplane =
            Some(sluice_control::config::DataplaneConfig { socket: dp.socket.clone(), idle_timeout: Duration::ZERO });
        self.dataplane = Some(dp);
        self.save_config()
    }

    /// Serves the agent's metrics on a free port; their URL.
    pub fn with_metrics(&mut self) -> Result<String> {
        let port = sluice_control::demo::free_port()?;
        self.config.metrics =
            Some(sluice_control::config::MetricsConfig { listen_addr: ([127, 0, 0, 1], port).into() });
        self.save_config()?;
        Ok(format!("http://127.0.0.1:{port}/metrics"))
    }

    /// Kills the agent with SIGKILL: no goodbye to anyone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts `control start` on the config (stderr appended to [`AgentProc::log`]).
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(find_bin("control")?);
        // The agent mints IAM tokens with its own AWS identity (here the emulator's demo one).
        AwsCreds::demo().apply(&mut cmd);
        let child =
            cmd.arg("--config").arg(&self.config_path).arg("start").stdout(Stdio::null()).stderr(log).spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the PostgreSQL listener accepts connections; fails if the agent exits first.
    pub fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().context("not started")?.try_wait()? {
                bail!("the agent exited ({status}): {}", tail(&self.log, 20));
            }
            if TcpStream::connect(("127.0.0.1", self.pg_port)).is_ok() && self.log_text().contains("agent is serving") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent did not serve within {timeout:?}: {}", tail(&self.log, 20))
    }

    /// Waits until the agent follows the auth server's policy (its first snapshot arrived).
    pub fn wait_following(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().context("not started")?.try_wait()? {
                bail!("the agent exited ({status}): {}", tail(&self.log, 20));
            }
            if self.log_text().contains("following the auth server's policy") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the agent did not get the auth server's policy within {timeout:?}: {}", tail(&self.log, 20))
    }

    /// Waits for the agent to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("not started")?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent is still running after {timeout:?}: {}", tail(&self.log, 20))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.config.data_dir.join("identity")
    }

    /// Stops the agent (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The auth server an agent follows, from its `sluice_agent_auth_server{addr=...}` metric
/// (`metrics` is the agent's `/metrics` URL); `None` while it follows none.
pub fn followed_auth_server(metrics: &str) -> Result<Option<String>> {
    let text = scrape(metrics)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_agent_auth_server{addr=\""))
        .and_then(|rest| rest.split_once('"'))
        .map(|(addr, _)| addr.to_owned()))
}

pub use sluice_control::demo::{mariadb_available, MariaDb};
pub use sluice_control::demo::{LocalCa as TestCa, StoragePostgres as StoragePg};

/// Whether a test that needs MariaDB should skip: `true` (with a note) when `mariadbd`,
/// `mariadb-install-db` or `mariadb` is missing, and a panic under `CI=true`, where a missing
/// MariaDB is a broken setup, not a reason to pass.
pub fn skip_without_mariadb() -> bool {
    if mariadb_available() {
        return false;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but MariaDB (mariadbd, mariadb-install-db, mariadb) is not installed (run scripts/setup)");
    }
    eprintln!("SKIP: MariaDB is not installed (run scripts/setup)");
    true
}

/// Runs `select pg_sleep(30)` on `c` and sends its cancel request (over `tls`) 800 ms in, as
/// psql's Ctrl-C does; the query's error, which the caller checks is 57014. Panics if the query
/// is not cancelled within 10 s or finishes instead.
pub fn cancel_a_sleep(
    rt: &tokio::runtime::Runtime,
    c: &Connected,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
) -> tokio_postgres::Error {
    let token = c.client.cancel_token();
    rt.block_on(async {
        let sleep = c.client.simple_query("select pg_sleep(30)");
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            token.cancel_query(tls).await
        };
        let (r, sent) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(sleep, cancel) })
            .await
            .expect("pg_sleep(30) was not cancelled within 10 s");
        sent.expect("sending the cancel request");
        r
    })
    .expect_err("pg_sleep(30) finished instead of being cancelled")
}
