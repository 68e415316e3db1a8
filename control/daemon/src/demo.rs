//! Starting the whole stack on one machine: a PostgreSQL cluster, the RDS Proxy emulator and
//! control, each a real child process on loopback with its own ports and directory. `control demo`
//! uses it, and so do the integration tests, so both exercise the same wiring.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::ConfigError;
use crate::config::{
    AuditConfig, AuthService, AwsSpec, Config, DatabaseSpec, DataplaneConfig, DbService, LocalSocket, MetricsConfig,
    ProxyService, StaticDatabase, TlsMode, TlsSpec,
};
use crate::rbac::Role;
use crate::state::{random_secret, State, StateError};

/// Why a part of the stack did not start. Each message names the part and, where it has one, its
/// log file.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RawIo(#[from] std::io::Error),
    /// A process exited or did not become ready in time.
    #[error("{0}")]
    Start(String),
    /// Something the stack needs is not installed or not built.
    #[error("{0}")]
    Missing(String),
    /// A command the stack runs (initdb, psql) failed; `stderr` is its output.
    #[error("{what}: {stderr}")]
    Command { what: String, stderr: String },
    #[error("{0}")]
    Parse(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("writing the config: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error("reading YAML: {0}")]
    YamlParse(#[from] Box<serde_saphyr::Error>),
    #[error(transparent)]
    Os(#[from] nix::errno::Errno),
    #[error("test certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

type Result<T, E = DemoError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// Credentials the demo's control signs with and the emulator accepts (AWS's documentation key).
pub const DEMO_ACCESS_KEY: &str = "AKIDSLUICEDEMO000001";
pub const DEMO_SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
pub const DEMO_REGION: &str = "us-east-1";
pub const DEMO_PROXY_NAME: &str = "sluice-demo";
pub const DEMO_PROXY_ID: &str = "abcdefghijkl";
/// The Sluice user (and database user) of the demo; the OS user running it maps to this user on
/// the local sockets.
pub const DEMO_USER: &str = "alice";
/// The demo database whose upstream is the emulator without TLS: with a local-socket client,
/// both legs are spliced.
pub const DEMO_PLAIN_DB: &str = "demo-plain";
/// The demo's MySQL database (`protocol: mysql`): MariaDB behind the emulator's MySQL mode.
pub const DEMO_MYSQL_DB: &str = "demo-mysql";
/// The MySQL emulator's proxy name: a proxy of its own, as RDS Proxy has one engine per proxy.
pub const DEMO_MYSQL_PROXY_NAME: &str = "sluice-demo-mysql";

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().map_err(io(format!("starting {name} ({cmd:?})")))?;
        Ok(Proc { name: name.to_owned(), child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self, sig: nix::sys::signal::Signal) {
        if !self.alive() {
            return;
        }
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(nix::sys::signal::Signal::SIGTERM);
    }
}

/// A loopback port that was free a moment ago, for a child to listen on.
///
/// Ports come from below the kernel's ephemeral range, in a per-process sequence. A port from
/// `bind(:0)` lies in the ephemeral range, where any outgoing connection made before the child
/// binds can take it as its local port (the child then fails with EADDRINUSE), and where a
/// readiness probe can connect to itself by TCP simultaneous open and report a listener that
/// does not exist. The sequence keeps two threads of one test binary off the same port.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u32>().ok()))
        .unwrap_or(32768);
    const LOW: u32 = 10000;
    if ephemeral_low <= LOW + 1000 {
        // No room below the ephemeral range: fall back to the kernel's choice.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = ephemeral_low - LOW;
    // Processes started close together (a test binary and the next) begin far apart.
    let base = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span.min(2000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (base + n) % span;
        let Ok(port) = u16::try_from(port) else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(DemoError::Start(format!("no free loopback port between {LOW} and {ephemeral_low}")))
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !proc.alive() {
            return Err(DemoError::Start(format!("{} exited during start-up", proc.name)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(DemoError::Start(format!("{} did not listen on port {port} within {timeout:?}", proc.name)))
}

/// Finds a Sluice binary: `$SLUICE_BIN_DIR`, beside the running executable, or one level up
/// (test executables live in `target/<profile>/deps`).
pub fn find_bin(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("SLUICE_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        DemoError::Missing(format!("cannot find the {name} binary (looked in {dirs:?}); build the workspace first"))
    })
}

/// The newest installed PostgreSQL server's bin directory (`$SLUICE_PG_BIN` overrides).
pub fn postgres_bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SLUICE_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        DemoError::Missing("no PostgreSQL server found under /usr/lib/postgresql (apt-get install postgresql)".into())
    })
}

/// PostgreSQL (and pgbouncer) refuse to run as root: pick an unprivileged account when we are root.
pub fn unprivileged_user() -> Result<Option<nix::unistd::User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(u) = nix::unistd::User::from_name(name)? {
            return Ok(Some(u));
        }
    }
    Err(DemoError::Missing(
        "running as root, and neither a postgres nor a nobody account exists to run PostgreSQL or pgbouncer".into(),
    ))
}

/// How [`Postgres::start_opts`] starts a cluster.
#[derive(Debug, Clone, Default)]
pub struct PgOpts {
    /// `max_connections` (PostgreSQL's default is 100).
    pub max_connections: Option<u32>,
    /// Serve TLS on the TCP port with this certificate chain and key (PEM files; copied into
    /// the cluster's directory).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: the CA that client certificates are checked against (`ssl_ca_file`).
    pub client_ca: Option<PathBuf>,
    /// The whole of `pg_hba.conf` instead of initdb's (keep `local all all trust` for [`Postgres::psql`]).
    pub hba: Option<String>,
}

/// A throwaway PostgreSQL cluster: superuser `postgres` over its Unix socket (trust), SCRAM
/// passwords over TCP on 127.0.0.1.
pub struct Postgres {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    proc: Proc,
}

impl Postgres {
    pub fn start(dir: &Path) -> Result<Postgres> {
        Self::start_with(dir, None)
    }

    /// As [`Postgres::start`], allowing `max_connections` client connections (PostgreSQL's
    /// default is 100; a test holding hundreds of sessions needs one upstream connection each).
    pub fn start_with(dir: &Path, max_connections: Option<u32>) -> Result<Postgres> {
        Self::start_opts(dir, PgOpts { max_connections, ..Default::default() })
    }

    /// As [`Postgres::start`], with the options in `opts` (TLS on the TCP port, more connections).
    pub fn start_opts(dir: &Path, opts: PgOpts) -> Result<Postgres> {
        use std::os::unix::process::CommandExt;
        let bin = postgres_bin_dir()?;
        let run_as = unprivileged_user()?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        if let Some(u) = &run_as {
            std::os::unix::fs::chown(dir, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
        }
        // PostgreSQL refuses a key file that is not private to its own account; copies inside
        // `dir` can be given both whatever the caller's files are.
        let mut server_args = Vec::new();
        if let Some((cert, key)) = &opts.tls {
            let (cert_copy, key_copy) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::copy(cert, &cert_copy).map_err(io(format!("copying {}", cert.display())))?;
            std::fs::copy(key, &key_copy).map_err(io(format!("copying {}", key.display())))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_copy, std::fs::Permissions::from_mode(0o600))?;
            }
            if let Some(u) = &run_as {
                for f in [&cert_copy, &key_copy] {
                    std::os::unix::fs::chown(f, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
                }
            }
            server_args.extend([
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert_copy.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key_copy.display()),
            ]);
            if let Some(ca) = &opts.client_ca {
                let ca_copy = dir.join("client-ca.crt");
                std::fs::copy(ca, &ca_copy).map_err(io(format!("copying {}", ca.display())))?;
                server_args.extend(["-c".to_owned(), format!("ssl_ca_file={}", ca_copy.display())]);
            }
        }
        if let Some(n) = opts.max_connections {
            server_args.extend(["-c".to_owned(), format!("max_connections={n}")]);
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir(dir);
        if let Some(u) = &run_as {
            initdb.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let out = initdb.output().map_err(io("running initdb"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(DemoError::Command { what: "initdb failed".into(), stderr });
        }
        if let Some(hba) = &opts.hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        // A port can still be taken between choosing it and the server binding it; a server
        // that dies during start-up is started again on another port.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::launch(dir, &data, &bin, run_as.as_ref(), &server_args) {
                Ok(pg) => return Ok(pg),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| DemoError::Start("PostgreSQL did not start".into())))
    }

    fn launch(
        dir: &Path,
        data: &Path,
        bin: &Path,
        run_as: Option<&nix::unistd::User>,
        server_args: &[String],
    ) -> Result<Postgres> {
        use std::os::unix::process::CommandExt;
        let port = free_port()?;
        let log_path = dir.join("postgres.log");
        let log = std::fs::File::create(&log_path)?;
        if let Some(u) = run_as {
            std::os::unix::fs::chown(&log_path, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
        }
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-k"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .current_dir(dir)
            .args(server_args);
        if let Some(u) = run_as {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let log_tail = || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        let mut proc = Proc::spawn("postgres", &mut cmd)?;
        wait_for_port(port, Duration::from_secs(30), &mut proc)
            .map_err(|e| DemoError::Start(format!("{e}: {}", log_tail())))?;
        let mut pg = Postgres { port, dir: dir.to_path_buf(), bin: bin.to_path_buf(), proc };
        // The TCP port opens a moment before the server accepts queries.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match pg.psql("postgres", "select 1") {
                Ok(_) => return Ok(pg),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) if !pg.proc.alive() => {
                    return Err(DemoError::Start(format!("postgres exited during start-up ({e}): {}", log_tail())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The directory of this PostgreSQL's programs (`pg_dump`, `psql`, …).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs SQL as the superuser over the Unix socket; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .output()
            .map_err(io("running psql"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(DemoError::Command { what: format!("psql {sql:?}"), stderr });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates a login role with a password and a database it owns.
    pub fn create_user_and_db(&self, user: &str, password: &str, db: &str) -> Result<()> {
        let quoted_pw = password.replace('\'', "''");
        self.psql("postgres", &format!("CREATE ROLE \"{user}\" LOGIN PASSWORD '{quoted_pw}'"))?;
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\" OWNER \"{user}\""))?;
        Ok(())
    }

    pub fn stop(&mut self) {
        // SIGINT is PostgreSQL's "fast" shutdown.
        self.proc.stop(nix::sys::signal::Signal::SIGINT);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds a MariaDB program (`mariadbd`, `mariadb`, `mariadb-install-db`): in `$SLUICE_MARIADB_BIN`
/// when set, else on `$PATH` or in the sbin directories a Debian package puts the server in (often
/// not on a non-root user's `$PATH`).
pub fn mariadb_bin(name: &str) -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SLUICE_MARIADB_BIN") {
        let p = PathBuf::from(d).join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(DemoError::Missing(format!("{} not found ($SLUICE_MARIADB_BIN)", p.display())))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DemoError::Missing(format!(
                "{name} not found (apt-get install mariadb-server mariadb-client, or run scripts/setup)"
            ))
        })
}

/// Whether the MariaDB server, installer and client are all installed (see [`mariadb_bin`]).
pub fn mariadb_available() -> bool {
    ["mariadbd", "mariadb-install-db", "mariadb"].iter().all(|n| mariadb_bin(n).is_ok())
}

/// A throwaway MariaDB server: its own data directory and Unix socket in `dir`, TCP on 127.0.0.1
/// and a free port, grant tables on (users log in with passwords over TCP, as behind RDS Proxy),
/// and the OS user running it as the administrator over the socket (`unix_socket` auth).
pub struct MariaDb {
    pub port: u16,
    pub dir: PathBuf,
    socket: PathBuf,
    /// The account [`MariaDb::sql`] logs in as over the socket: the OS user's name.
    admin: String,
    client: PathBuf,
    proc: Proc,
}

impl MariaDb {
    /// Initialises `dir/mariadb-data` (removing whatever `dir` held) and starts the server.
    pub fn start(dir: &Path) -> Result<MariaDb> {
        let server = mariadb_bin("mariadbd")?;
        let install = mariadb_bin("mariadb-install-db")?;
        let client = mariadb_bin("mariadb")?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let root = nix::unistd::geteuid().is_root();
        let admin = match root {
            true => "root".to_owned(),
            false => nix::unistd::User::from_uid(nix::unistd::geteuid())?
                .map(|u| u.name)
                .ok_or_else(|| DemoError::Missing("the current user has no account name".into()))?,
        };
        let data = dir.join("mariadb-data");
        // Servers name their temporary files after their pid in --tmpdir (/tmp by default); a
        // private one keeps parallel servers (tests, other checkouts) from removing each other's.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut cmd = Command::new(&install);
        // --no-defaults first: a system my.cnf must not point the install at its own datadir.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            .arg(format!("--auth-root-socket-user={admin}"))
            // Passed on to the bootstrap server.
            .arg(format!("--tmpdir={}", tmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir(&dir);
        if root {
            cmd.arg("--user=root");
        }
        let out = cmd.output().map_err(io("running mariadb-install-db"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(DemoError::Command { what: "mariadb-install-db failed".into(), stderr });
        }
        // As with PostgreSQL: a port taken between choosing it and binding it means another try.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::launch(&dir, &data, &server, &client, &admin) {
                Ok(db) => return Ok(db),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| DemoError::Start("MariaDB did not start".into())))
    }

    fn launch(dir: &Path, data: &Path, server: &Path, client: &Path, admin: &str) -> Result<MariaDb> {
        let port = free_port()?;
        let mut socket = dir.join("mariadb.sock");
        if socket.as_os_str().len() > 100 {
            // Unix socket paths are limited to 108 bytes; a deep directory gets one under /tmp.
            socket = std::env::temp_dir().join(format!("sluice-mariadb-{}.sock", random_secret(4)));
        }
        let log_path = dir.join("mariadb.log");
        let mut cmd = Command::new(server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", log_path.display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                // Users are '%' accounts; no reverse DNS lookups for loopback clients.
                "--skip-name-resolve",
                "--max-allowed-packet=1G",
                "--local-infile=ON",
                // A test server: durability is not wanted, start-up speed and a small footprint are.
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=16M",
                "--skip-log-bin",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(dir);
        if nix::unistd::geteuid().is_root() {
            cmd.arg("--user=root");
        }
        let log_tail = || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        let mut proc = Proc::spawn("mariadbd", &mut cmd)?;
        wait_for_port(port, Duration::from_secs(60), &mut proc)
            .map_err(|e| DemoError::Start(format!("{e}: {}", log_tail())))?;
        let mut db =
            MariaDb { port, dir: dir.to_path_buf(), socket, admin: admin.to_owned(), client: client.to_owned(), proc };
        // The TCP port can open before the grant tables are loaded.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match db.sql("SELECT 1") {
                Ok(_) => return Ok(db),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) if !db.proc.alive() => {
                    return Err(DemoError::Start(format!("mariadbd exited during start-up ({e}): {}", log_tail())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's Unix socket (administrator access, see [`MariaDb::sql`]): in the directory
    /// given to [`MariaDb::start`] unless that path is too long for a socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `mariadb` client program.
    pub fn client(&self) -> &Path {
        &self.client
    }

    /// Runs SQL as the administrator over the Unix socket; returns the rows tab-separated,
    /// without column names.
    pub fn sql(&self, sql: &str) -> Result<String> {
        let out = Command::new(&self.client)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", &self.admin, "-N", "-B", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running mariadb"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(DemoError::Command { what: format!("mariadb {sql:?}"), stderr });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates `name`@`%` with `password` (mysql_native_password, MariaDB's default) and every
    /// privilege, so a test or the demo can use any database through the emulator.
    pub fn create_user(&self, name: &str, password: &str) -> Result<()> {
        let quote = |s: &str| s.replace('\\', "\\\\").replace('\'', "''");
        let (name, password) = (quote(name), quote(password));
        self.sql(&format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO '{name}'@'%' WITH GRANT OPTION"
        ))?;
        Ok(())
    }

    pub fn stop(&mut self) {
        // SIGTERM is mariadbd's normal shutdown.
        self.proc.stop(nix::sys::signal::Signal::SIGTERM);
        if !self.socket.starts_with(&self.dir) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// AWS credentials as the emulator's secrets file and the AWS_* variables take them.
#[derive(Debug, Clone)]
pub struct AwsCreds {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl AwsCreds {
    pub fn demo() -> Self {
        AwsCreds { access_key: DEMO_ACCESS_KEY.into(), secret_key: DEMO_SECRET_KEY.into(), session_token: None }
    }

    /// Sets the standard AWS variables on `cmd` (and turns IMDS off: there is no instance here,
    /// and the chain must not wander off loopback).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
        match &self.session_token {
            Some(t) => cmd.env("AWS_SESSION_TOKEN", t),
            None => cmd.env_remove("AWS_SESSION_TOKEN"),
        };
    }
}

/// The RDS Proxy emulator child.
pub struct Emulator {
    /// Serving without TLS (`--plaintext`): a non-TLS upstream whose leg is spliced as is.
    pub plaintext: bool,
    /// Fronting MySQL/MariaDB (`--engine mysql`, see [`Emulator::start_mysql`]) rather than PostgreSQL.
    pub mysql: bool,
    pub port: u16,
    pub endpoint: String,
    pub ca_file: PathBuf,
    pub proc: Proc,
}

impl Emulator {
    pub fn start(dir: &Path, pg_port: u16, creds: &[AwsCreds], secrets: &[(String, String)]) -> Result<Emulator> {
        Self::start_opts(dir, pg_port, creds, secrets, false)
    }

    pub fn start_opts(
        dir: &Path,
        pg_port: u16,
        creds: &[AwsCreds],
        secrets: &[(String, String)],
        plaintext: bool,
    ) -> Result<Emulator> {
        let (port, mut cmd) = Self::command(dir, pg_port, secrets, creds)?;
        cmd.args(["--name", DEMO_PROXY_NAME, "--region", DEMO_REGION, "--proxy-id", DEMO_PROXY_ID]);
        if plaintext {
            cmd.arg("--plaintext");
        }
        Self::spawn(dir, port, cmd, plaintext)
    }

    /// An emulator in front of MySQL/MariaDB on `mysql_port` (RDS Proxy for MySQL: TLS and IAM
    /// tokens through `mysql_clear_password` required, `mysql_native_password` with the stored
    /// secret to the backend), with the demo's identity; the same [`Emulator`] as
    /// [`Emulator::start`], with `mysql` set.
    pub fn start_mysql(
        dir: &Path,
        mysql_port: u16,
        creds: &[AwsCreds],
        secrets: &[(String, String)],
    ) -> Result<Emulator> {
        Self::start_mysql_opts(dir, mysql_port, creds, secrets, false)
    }

    /// As [`Emulator::start_mysql`]; with `plaintext`, serving clients without TLS (no
    /// CLIENT_SSL offered), a non-TLS upstream whose leg can be spliced as is.
    pub fn start_mysql_opts(
        dir: &Path,
        mysql_port: u16,
        creds: &[AwsCreds],
        secrets: &[(String, String)],
        plaintext: bool,
    ) -> Result<Emulator> {
        let (port, mut cmd) = Self::command_mysql(dir, mysql_port, secrets, creds)?;
        cmd.args(["--name", DEMO_MYSQL_PROXY_NAME, "--region", DEMO_REGION, "--proxy-id", DEMO_PROXY_ID]);
        if plaintext {
            cmd.arg("--plaintext");
        }
        let mut emulator = Self::spawn(dir, port, cmd, plaintext)?;
        emulator.mysql = true;
        Ok(emulator)
    }

    /// The emulator's command line on a fresh port, serving `secrets` in front of PostgreSQL on
    /// `pg_port` and accepting tokens signed with `creds`, with its TLS files and log in `dir`;
    /// the caller adds its identity, then [`Emulator::spawn`]s it. The secrets go to the
    /// emulator in a 0600 file, never on its command line.
    pub fn command(
        dir: &Path,
        pg_port: u16,
        secrets: &[(String, String)],
        creds: &[AwsCreds],
    ) -> Result<(u16, Command)> {
        Self::command_for(dir, &["--postgres".to_owned(), format!("127.0.0.1:{pg_port}")], secrets, creds)
    }

    /// As [`Emulator::command`], in MySQL mode in front of MariaDB on `mysql_port`.
    pub fn command_mysql(
        dir: &Path,
        mysql_port: u16,
        secrets: &[(String, String)],
        creds: &[AwsCreds],
    ) -> Result<(u16, Command)> {
        let backend =
            ["--engine".to_owned(), "mysql".to_owned(), "--mysql".to_owned(), format!("127.0.0.1:{mysql_port}")];
        Self::command_for(dir, &backend, secrets, creds)
    }

    /// As [`Emulator::command`], with `backend` the arguments naming the engine and its server.
    fn command_for(
        dir: &Path,
        backend: &[String],
        secrets: &[(String, String)],
        creds: &[AwsCreds],
    ) -> Result<(u16, Command)> {
        std::fs::create_dir_all(dir)?;
        let mut lines = String::new();
        for c in creds {
            lines.push_str(&format!("credentials {}:{}", c.access_key, c.secret_key));
            if let Some(t) = &c.session_token {
                lines.push_str(&format!(":{t}"));
            }
            lines.push('\n');
        }
        for (user, pw) in secrets {
            lines.push_str(&format!("secret {user}={pw}\n"));
        }
        let secrets_file = dir.join("emulator-secrets");
        crate::private_fs::write_private(&secrets_file, lines.as_bytes())?;
        let port = free_port()?;
        let mut cmd = Command::new(find_bin("rds-proxy-emulator")?);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-dir")
            .arg(dir.join("tls"))
            .args(backend)
            .stdout(Stdio::piped())
            .arg("--secrets-file")
            .arg(&secrets_file)
            .stderr(std::fs::File::create(dir.join("emulator.log"))?);
        Ok((port, cmd))
    }

    /// Starts an emulator from [`Emulator::command`] and waits for its READY line.
    pub fn spawn(dir: &Path, port: u16, mut cmd: Command, plaintext: bool) -> Result<Emulator> {
        let mut proc = Proc::spawn("rds-proxy-emulator", &mut cmd)?;
        let stdout = proc.take_stdout().ok_or_else(|| DemoError::Start("no emulator stdout".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the emulator never blocks on a full pipe.
            for _ in lines {}
        });
        let endpoint = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(line))) => line
                .strip_prefix("READY ")
                .map(str::to_owned)
                .ok_or_else(|| DemoError::Start(format!("unexpected emulator output {line:?}")))?,
            _ => {
                let log = dir.join("emulator.log");
                return Err(DemoError::Start(format!(
                    "rds-proxy-emulator did not become ready; see {}",
                    log.display()
                )));
            }
        };
        Ok(Emulator { plaintext, mysql: false, port, endpoint, ca_file: dir.join("tls").join("ca.pem"), proc })
    }
}

/// The dataplane child process.
pub struct DataplaneProc {
    pub socket: PathBuf,
    pub proc: Proc,
    /// Its BPF pin directory (`--instance`), removed when the process is dropped: a dataplane
    /// stopped cleanly unpins its empty map itself, a killed one cannot.
    pub pin_dir: PathBuf,
    /// Its command line, for a successor (`--take-over`).
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
}

impl Drop for DataplaneProc {
    fn drop(&mut self) {
        self.proc.stop(nix::sys::signal::Signal::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl DataplaneProc {
    pub fn start(dir: &Path) -> Result<DataplaneProc> {
        Self::start_with_args(dir, &[])
    }

    /// As [`DataplaneProc::start`], with extra arguments (e.g. `--counters userspace`).
    pub fn start_with_args(dir: &Path, args: &[&str]) -> Result<DataplaneProc> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("dataplane.sock");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("dataplane.log"))?;
        let mut cmd = Command::new(find_bin("dataplane")?);
        let mut all: Vec<std::ffi::OsString> = Vec::new();
        let instance = match args.iter().position(|a| *a == "--instance") {
            Some(i) => args.get(i + 1).map(|s| s.to_string()).unwrap_or_default(),
            None => {
                let name = format!("demo-{}", random_secret(6));
                all.extend(["--instance".into(), name.clone().into()]);
                name
            }
        };
        all.push("--control-socket".into());
        all.push(socket.clone().into());
        all.extend(args.iter().map(Into::into));
        cmd.args(&all).stdout(Stdio::null()).stderr(log);
        let mut proc = Proc::spawn("dataplane", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if !proc.alive() {
                return Err(DemoError::Start(format!(
                    "dataplane exited during start-up; see {}",
                    dir.join("dataplane.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(DemoError::Start(format!("dataplane did not create {} within 30 s", socket.display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pin_dir = Path::new("/sys/fs/bpf/sluice").join(instance);
        Ok(DataplaneProc { socket, proc, pin_dir, args: all, log: dir.join("dataplane.log") })
    }

    /// Replaces the process with a new one (`--take-over`) that takes its live sessions; returns
    /// once the old one has exited and the new one serves the socket.
    pub fn take_over(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(find_bin("dataplane")?);
        cmd.args(&self.args).arg("--take-over").stdout(Stdio::null()).stderr(log);
        let mut next = Proc::spawn("dataplane", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.proc.alive() || !self.socket.exists() {
            if !next.alive() {
                return Err(DemoError::Start(format!(
                    "the successor data plane exited during the takeover; see {}",
                    self.log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(DemoError::Start(format!(
                    "the takeover did not finish within 30 s; see {}",
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = next;
        Ok(())
    }
}

/// Control's child process, with the addresses it serves.
pub struct ControlProc {
    pub pg_port: u16,
    pub api_port: u16,
    pub config_path: PathBuf,
    pub config: Config,
    pub proc: Proc,
}

impl ControlProc {
    pub fn start(
        dir: &Path,
        databases: Vec<StaticDatabase>,
        creds: &AwsCreds,
        dataplane_socket: Option<PathBuf>,
    ) -> Result<ControlProc> {
        Self::start_edited(dir, databases, creds, dataplane_socket, |_| {})
    }

    /// As [`ControlProc::start`], with `edit` applied to the config before control first starts
    /// (another `auth_service.storage`, say, which must be right from the first start since the
    /// node creates or joins the state then).
    pub fn start_edited(
        dir: &Path,
        databases: Vec<StaticDatabase>,
        creds: &AwsCreds,
        dataplane_socket: Option<PathBuf>,
        edit: impl FnOnce(&mut Config),
    ) -> Result<ControlProc> {
        std::fs::create_dir_all(dir)?;
        let pg_port = free_port()?;
        let api_port = free_port()?;
        let metrics_port = free_port()?;
        let cluster_port = free_port()?;
        let web_port = free_port()?;
        // Socket paths are limited to 108 bytes; a test directory can be deeper than that.
        let local_dir = std::env::temp_dir().join(format!("sluice-sock-{}", random_secret(4)));
        let os_user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
            .map(|u| u.name)
            .ok_or_else(|| DemoError::Missing("this process's uid has no user name".into()))?;
        let mut config = Config {
            data_dir: dir.join("data"),
            auth_service: AuthService {
                listen_addr: ([127, 0, 0, 1], api_port).into(),
                cluster_listen_addr: Some(([127, 0, 0, 1], cluster_port).into()),
                web_listen_addr: Some(([127, 0, 0, 1], web_port).into()),
                ..Default::default()
            },
            proxy_service: ProxyService {
                postgres_listen_addr: ([127, 0, 0, 1], pg_port).into(),
                postgres_public_addr: Some(format!("localhost:{pg_port}")),
                local_socket: Some(LocalSocket {
                    dir: local_dir,
                    users: [(os_user, DEMO_USER.to_owned())].into_iter().collect(),
                }),
                ..Default::default()
            },
            db_service: DbService { databases, ..Default::default() },
            discovery_service: Default::default(),
            audit: AuditConfig::default(),
            dataplane: dataplane_socket.map(|socket| DataplaneConfig { socket, idle_timeout: Duration::ZERO }),
            metrics: Some(MetricsConfig { listen_addr: ([127, 0, 0, 1], metrics_port).into() }),
            join: None,
        };
        edit(&mut config);
        let config_path = dir.join("control.yaml");
        std::fs::write(&config_path, serde_saphyr::to_string(&config)?)?;
        Self::spawn(config_path, config, pg_port, api_port, creds, dir)
    }

    /// Starts control on an existing config (used to restart it).
    pub fn spawn(
        config_path: PathBuf,
        config: Config,
        pg_port: u16,
        api_port: u16,
        creds: &AwsCreds,
        dir: &Path,
    ) -> Result<ControlProc> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("control.log"))?;
        let mut cmd = Command::new(find_bin("control")?);
        cmd.arg("start").arg("--config").arg(&config_path).stdout(Stdio::null()).stderr(log);
        creds.apply(&mut cmd);
        let mut proc = Proc::spawn("control", &mut cmd)?;
        wait_for_port(api_port, Duration::from_secs(30), &mut proc)?;
        wait_for_port(pg_port, Duration::from_secs(30), &mut proc)?;
        if let Some(m) = &config.metrics {
            wait_for_port(m.listen_addr.port(), Duration::from_secs(30), &mut proc)?;
        }
        Ok(ControlProc { pg_port, api_port, config_path, config, proc })
    }

    pub fn state(&self) -> Result<State> {
        Ok(State::open(&self.config.data_dir)?)
    }

    /// Where control serves Prometheus metrics, if it does.
    pub fn metrics_url(&self) -> Option<String> {
        self.config.metrics.as_ref().map(|m| format!("http://{}/metrics", m.listen_addr))
    }
}

/// The demo database as control sees it: the emulator's endpoint name, dialled on loopback.
pub fn demo_database(name: &str, emulator: &Emulator, labels: &[(&str, &str)]) -> StaticDatabase {
    StaticDatabase {
        name: name.to_owned(),
        description: format!("RDS Proxy in {DEMO_REGION} (local emulator)"),
        static_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        spec: DatabaseSpec {
            protocol: if emulator.mysql { crate::config::PROTOCOL_MYSQL } else { crate::config::PROTOCOL_POSTGRES }
                .into(),
            uri: format!("{}:{}", emulator.endpoint, emulator.port),
            aws: AwsSpec { region: Some(DEMO_REGION.into()), ..Default::default() },
            tls: match emulator.plaintext {
                false => TlsSpec { ca_cert_file: Some(emulator.ca_file.clone()), ..Default::default() },
                true => TlsSpec { mode: TlsMode::Disable, ..Default::default() },
            },
            connect_addr: Some(format!("127.0.0.1:{}", emulator.port)),
            auth: Default::default(),
        },
    }
}

/// A role allowing `db_users` on databases labelled env=dev.
pub fn dev_role(name: &str, db_names: &[&str], db_users: &[&str]) -> Result<Role> {
    let yaml = format!(
        "kind: role\nversion: v7\nmetadata: {{name: {name}}}\nspec:\n  allow:\n    db_labels: {{env: dev}}\n    db_names: {:?}\n    db_users: {:?}\n",
        db_names, db_users
    );
    Ok(crate::config::from_yaml(&yaml)?)
}

/// The running stack; dropping it stops control, the emulator and PostgreSQL in that order.
pub struct Stack {
    pub dir: PathBuf,
    pub control: ControlProc,
    /// `None` when started without one: control then relays sessions itself.
    pub dataplane: Option<DataplaneProc>,
    pub emulator: Emulator,
    /// The same emulator without TLS, behind database [`DEMO_PLAIN_DB`].
    pub plain_emulator: Emulator,
    pub postgres: Postgres,
    /// The PostgreSQL password of the demo database user (the emulator's "secret").
    pub db_password: String,
    /// MariaDB behind a MySQL emulator, served as [`DEMO_MYSQL_DB`] (see [`Stack::start_demo`]).
    pub mysql: Option<MysqlDemo>,
}

/// The demo's MySQL side: MariaDB with database `demo` and user `alice` (password `db_password`,
/// the emulator's secret), and the emulator in front of it.
pub struct MysqlDemo {
    // Dropped in order: the emulator before its backend.
    pub emulator: Emulator,
    pub mariadb: MariaDb,
    pub db_password: String,
}

impl MysqlDemo {
    /// Starts MariaDB in `dir/mariadb` and the MySQL emulator in `dir/emulator-mysql`.
    pub fn start(dir: &Path) -> Result<MysqlDemo> {
        let mariadb = MariaDb::start(&dir.join("mariadb"))?;
        let db_password = random_secret(12);
        mariadb.create_user(DEMO_USER, &db_password)?;
        mariadb.sql("CREATE DATABASE demo")?;
        let emulator = Emulator::start_mysql(
            &dir.join("emulator-mysql"),
            mariadb.port(),
            &[AwsCreds::demo()],
            &[(DEMO_USER.to_owned(), db_password.clone())],
        )?;
        Ok(MysqlDemo { emulator, mariadb, db_password })
    }
}

impl Stack {
    /// Starts PostgreSQL with database `demo` owned by `alice`, the emulator holding her secret,
    /// and control serving database `demo` (labels env=dev) with `control_creds`.
    pub fn start(dir: &Path, control_creds: &AwsCreds) -> Result<Stack> {
        Self::start_with(dir, control_creds, true)
    }

    /// As [`Stack::start`]; without a dataplane process when `with_dataplane` is false (to
    /// measure control's own relay against the dataplane).
    pub fn start_with(dir: &Path, control_creds: &AwsCreds, with_dataplane: bool) -> Result<Stack> {
        Self::start_opts(dir, control_creds, with_dataplane.then_some(&[]))
    }

    /// As [`Stack::start`]; `dataplane`: `None` for no dataplane process, else its extra
    /// arguments.
    pub fn start_opts(dir: &Path, control_creds: &AwsCreds, dataplane: Option<&[&str]>) -> Result<Stack> {
        Self::start_sized(dir, control_creds, dataplane, None)
    }

    /// As [`Stack::start_opts`], with PostgreSQL allowing `max_connections` (see
    /// [`Postgres::start_with`]).
    pub fn start_sized(
        dir: &Path,
        control_creds: &AwsCreds,
        dataplane: Option<&[&str]>,
        max_connections: Option<u32>,
    ) -> Result<Stack> {
        let pg = PgOpts { max_connections, ..Default::default() };
        Self::start_full(dir, control_creds, dataplane, pg, |_| Vec::new(), None)
    }

    /// As [`Stack::start`], plus the MySQL side when MariaDB is installed: MariaDB and a MySQL
    /// emulator served as database [`DEMO_MYSQL_DB`] (labels env=dev) on control's MySQL
    /// listener. Without MariaDB, or when it fails to start, the stack is the PostgreSQL one
    /// and `mysql` is `None` (the reason is logged on stderr).
    pub fn start_demo(dir: &Path, control_creds: &AwsCreds) -> Result<Stack> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mysql = if mariadb_available() {
            match MysqlDemo::start(&dir) {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("MariaDB did not start, so the demo has no MySQL database: {e}");
                    None
                }
            }
        } else {
            eprintln!("MariaDB is not installed (scripts/setup installs it), so the demo has no MySQL database");
            None
        };
        Self::start_full(&dir, control_creds, Some(&[]), PgOpts::default(), |_| Vec::new(), mysql)
    }

    /// As [`Stack::start_opts`], with PostgreSQL started with `pg` (TLS, a client CA, its own
    /// pg_hba.conf) and control also serving the databases `extra` returns for that PostgreSQL
    /// (the benchmark's upstreams without the emulator). `dir/control/data` is control's data
    /// directory, so files `control auth sign` wrote for it beforehand come from the CA it uses.
    pub fn start_custom(
        dir: &Path,
        control_creds: &AwsCreds,
        dataplane: Option<&[&str]>,
        pg: PgOpts,
        extra: impl FnOnce(&Postgres) -> Vec<StaticDatabase>,
    ) -> Result<Stack> {
        Self::start_full(dir, control_creds, dataplane, pg, extra, None)
    }

    fn start_full(
        dir: &Path,
        control_creds: &AwsCreds,
        dataplane: Option<&[&str]>,
        pg: PgOpts,
        extra: impl FnOnce(&Postgres) -> Vec<StaticDatabase>,
        mysql: Option<MysqlDemo>,
    ) -> Result<Stack> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let pg_dir = if nix::unistd::geteuid().is_root() {
            // The unprivileged PostgreSQL account must be able to reach its directory; a path
            // under a user's home often is not traversable, so use a private one under /tmp.
            std::env::temp_dir().join(format!("sluice-pg-{}", random_secret(6)))
        } else {
            dir.join("postgres")
        };
        let postgres = Postgres::start_opts(&pg_dir, pg)?;
        std::fs::write(dir.join("postgres-dir"), pg_dir.to_string_lossy().as_bytes())?;
        let db_password = random_secret(12);
        postgres.create_user_and_db("alice", &db_password, "demo")?;
        let emulator = Emulator::start(
            &dir.join("emulator"),
            postgres.port,
            &[AwsCreds::demo()],
            &[("alice".to_owned(), db_password.clone())],
        )?;
        let plain_emulator = Emulator::start_opts(
            &dir.join("emulator-plain"),
            postgres.port,
            &[AwsCreds::demo()],
            &[(DEMO_USER.to_owned(), db_password.clone())],
            true,
        )?;
        let mut dbs = vec![
            demo_database("demo", &emulator, &[("env", "dev")]),
            demo_database(DEMO_PLAIN_DB, &plain_emulator, &[("env", "dev")]),
        ];
        dbs.extend(extra(&postgres));
        let mysql_port = match &mysql {
            Some(m) => {
                dbs.push(demo_database(DEMO_MYSQL_DB, &m.emulator, &[("env", "dev")]));
                Some(free_port()?)
            }
            None => None,
        };
        let dataplane =
            dataplane.map(|args| DataplaneProc::start_with_args(&dir.join("dataplane"), args)).transpose()?;
        let socket = dataplane.as_ref().map(|d| d.socket.clone());
        let control = ControlProc::start_edited(&dir.join("control"), dbs, control_creds, socket, |c| {
            if let Some(port) = mysql_port {
                c.proxy_service.mysql_listen_addr = Some(([127, 0, 0, 1], port).into());
                c.proxy_service.mysql_public_addr = Some(format!("localhost:{port}"));
            }
        })?;
        let stack = Stack { dir, control, dataplane, emulator, plain_emulator, postgres, db_password, mysql };
        if stack.dataplane.is_some() {
            stack.wait_for_dataplane_link()?;
        }
        Ok(stack)
    }

    /// Control connects to the dataplane in the background; wait until it has, so the first
    /// session is already handed off (the link is logged in control.log).
    pub fn wait_for_dataplane_link(&self) -> Result<()> {
        let log = self.dir.join("control").join("control.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("connected to the dataplane") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DemoError::Start(format!(
                    "control did not connect to the dataplane; see {}",
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.control.proc.stop(nix::sys::signal::Signal::SIGTERM);
        if let Some(d) = self.dataplane.as_mut() {
            d.proc.stop(nix::sys::signal::Signal::SIGTERM);
        }
        self.emulator.proc.stop(nix::sys::signal::Signal::SIGTERM);
        self.plain_emulator.proc.stop(nix::sys::signal::Signal::SIGTERM);
        if let Some(m) = self.mysql.as_mut() {
            m.emulator.proc.stop(nix::sys::signal::Signal::SIGTERM);
            m.mariadb.stop();
        }
        self.postgres.stop();
        // The private directory made under /tmp for a root run (see `start_sized`) is the
        // stack's alone; every test left one behind (tens of MB each).
        let ours = self.postgres.dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("sluice-pg-"));
        if ours && self.postgres.dir.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_dir_all(&self.postgres.dir);
        }
        if let Some(local) = &self.control.config.proxy_service.local_socket {
            let _ = std::fs::remove_dir_all(&local.dir);
        }
        // SLUICE_KEEP_TEST_DIRS keeps PostgreSQL's log for reading after a failed test.
        if self.postgres.dir.starts_with(std::env::temp_dir()) && std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.postgres.dir);
        }
    }
}

/// libpq variables that must not leak from the developer's environment into a client (psql, pgbench) run by a test or benchmark.
pub const LIBPQ_VARS: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLCRL",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGSSLNEGOTIATION",
    "PGGSSENCMODE",
    "PGREQUIRESSL",
    "PGTARGETSESSIONATTRS",
];

/// Parses `export NAME=VALUE` lines (values bare or single-quoted, as `sluice db env` and POSIX
/// shells write them) into pairs; other lines are ignored.
pub fn parse_env_exports(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("export ") else { continue };
        let (name, value) =
            rest.split_once('=').ok_or_else(|| DemoError::Parse(format!("malformed export line {line:?}")))?;
        out.push((name.trim().to_owned(), unquote_shell(value.trim())?));
    }
    Ok(out)
}

/// Undoes POSIX single-quoting (`'it'\''s'` → `it's`); bare words are returned as they are.
fn unquote_shell(s: &str) -> Result<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err(DemoError::Parse(format!("unterminated quote in {s:?}"))),
                }
            },
            '\\' => out.push(chars.next().ok_or_else(|| DemoError::Parse(format!("trailing backslash in {s:?}")))?),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A local certificate authority (rcgen) for TLS servers that tests and benches start.
pub struct LocalCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl LocalCa {
    pub fn new(name: &str) -> Result<LocalCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key)?.pem();
        Ok(LocalCa { params, key, pem })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its key, both PEM.
    pub fn issue_server(&self, names: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("server"));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A PostgreSQL for Sluice's auth state, set up as production should be: TLS with a server
/// certificate for `localhost` and `127.0.0.1` from a test CA (its PEM is `ca_file`, the
/// `sslrootcert`), role `sluice` with a SCRAM password (in the 0600 `password_file`) owning
/// database `sluice`, and that role admitted only over `hostssl`.
pub struct StoragePostgres {
    pub pg: Postgres,
    /// `host=localhost port=… dbname=sluice user=sluice sslmode=verify-full sslrootcert=<ca_file>`.
    pub conn_string: String,
    pub password_file: PathBuf,
    pub ca_file: PathBuf,
    pub ca: LocalCa,
    pub dir: PathBuf,
}

impl StoragePostgres {
    /// Starts the cluster under `dir/pg` (its certificates and password file go in `dir`).
    pub fn start(dir: &Path) -> Result<StoragePostgres> {
        Self::start_with(dir, None)
    }

    /// As [`StoragePostgres::start`], with `max_connections`.
    pub fn start_with(dir: &Path, max_connections: Option<u32>) -> Result<StoragePostgres> {
        std::fs::create_dir_all(dir)?;
        let ca = LocalCa::new("sluice storage test CA")?;
        let ca_file = dir.join("storage-ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let (cert, key) = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let (cert_file, key_file) = (dir.join("storage-server.crt"), dir.join("storage-server.key"));
        std::fs::write(&cert_file, cert)?;
        crate::private_fs::write_private(&key_file, key.as_bytes())?;
        let opts = PgOpts { max_connections, tls: Some((cert_file, key_file)), ..Default::default() };
        let pg = Postgres::start_opts(&dir.join("pg"), opts)?;
        // The role may log in only over TLS; other roles (an emulator's backend login) keep
        // plain SCRAM on loopback.
        let hba = "local all all trust\n\
                   hostssl sluice sluice 127.0.0.1/32 scram-sha-256\n\
                   host all sluice 0.0.0.0/0 reject\n\
                   host all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(pg.dir.join("data").join("pg_hba.conf"), hba)?;
        pg.psql("postgres", "select pg_reload_conf()")?;
        let password = random_secret(18);
        pg.create_user_and_db("sluice", &password, "sluice")?;
        let password_file = dir.join("storage-password");
        crate::private_fs::write_private(&password_file, format!("{password}\n").as_bytes())?;
        let conn_string = format!(
            "host=localhost port={} dbname=sluice user=sluice sslmode=verify-full sslrootcert={}",
            pg.port,
            ca_file.display()
        );
        Ok(StoragePostgres { pg, conn_string, password_file, ca_file, ca, dir: dir.to_path_buf() })
    }

    /// `auth_service.storage` for this database, logging in with the password file.
    pub fn storage(&self) -> crate::pgconn::PgStorage {
        crate::pgconn::PgStorage {
            conn_string: self.conn_string.clone(),
            password_file: Some(self.password_file.clone()),
            aws_iam: None,
            pool_size: 10,
        }
    }

    /// `auth_service.storage` on this database with the password file, sealing the CA key
    /// under the KEK file `kek` (a small pool: tests start several nodes).
    pub fn storage_config(&self, kek: &Path) -> crate::config::StorageConfig {
        crate::config::StorageConfig::Postgres(crate::config::PostgresStorage {
            conn_string: self.conn_string.clone(),
            password_file: Some(self.password_file.clone()),
            aws_iam: None,
            pool_size: 4,
            kek: crate::kek::KekConfig { file: Some(kek.to_path_buf()), aws_kms: None },
            previous_keks: Vec::new(),
        })
    }

    /// A validated auth-server config with `data_dir` and [`StoragePostgres::storage_config`] (for
    /// opening the shared state as a library, as an auth node or admin verb does).
    pub fn config(&self, data_dir: &Path, kek: &Path) -> Result<crate::config::Config> {
        let mut cfg: crate::config::Config = crate::config::from_yaml(&format!("data_dir: {}\n", data_dir.display()))
            .map_err(|e| DemoError::Parse(e.to_string()))?;
        cfg.auth_service.storage = self.storage_config(kek);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Changes role `sluice`'s password in PostgreSQL and then in the password file (replaced
    /// atomically, as a secrets agent would), returning the new password.
    pub fn rotate_password(&self) -> Result<String> {
        let password = random_secret(18);
        self.pg.psql("postgres", &format!("ALTER ROLE sluice PASSWORD '{password}'"))?;
        let tmp = self.dir.join("storage-password.new");
        crate::private_fs::write_private(&tmp, format!("{password}\n").as_bytes())?;
        std::fs::rename(&tmp, &self.password_file)?;
        Ok(password)
    }
}
