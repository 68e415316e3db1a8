//! `e2e`: Sluice's end-to-end benchmark harness.
//!
//! It starts, on loopback, the whole Sluice stack ([`sluice_control::demo::Stack`]: PostgreSQL,
//! the RDS Proxy emulator, a `dataplane` process when that binary is built, and control) plus
//! the peer proxies pgbouncer (session pooling) and haproxy (`mode tcp`, once plain and once with
//! `option splice-auto`), all in front of the same PostgreSQL database, and then runs the same
//! client workloads against every target:
//!
//! * `pgbench -S -c1` (select-only, one connection): TPS and average latency;
//! * `pgbench -S -c8 -j2`: TPS;
//! * `pgbench -S -C -c4 -j2` (a new connection per transaction): TPS;
//! * `COPY (SELECT ...) TO STDOUT` of about `--copy-mb` MiB read by `psql`, counted and hashed
//!   (MiB/s; the md5 must equal the direct connection's);
//! * `\copy ... from pstdin` of about `--copy-in-mb` MiB into an unlogged table, checked row by
//!   row by PostgreSQL afterwards (MiB/s);
//! * with `--contention sched-idle`, `pgbench -S -c1` again with every CPU kept busy by
//!   SCHED_IDLE loops (the latency each proxy adds, idle vs busy).
//!
//! The main tables compare targets with the same legs, all straight to the one PostgreSQL (which
//! serves TLS and plain TCP): TLS on both legs (`direct-tls`; `sluice-tls-cert`, Sluice with
//! `auth: cert` upstream; `pgbouncer-tls`; `haproxy-tls-passthrough`) and plain on both legs
//! (`direct`; `sluice-plain`, control's Unix socket with a `tls.mode: disable` upstream;
//! `pgbouncer`; `haproxy`; `haproxy-splice`).
//!
//! The second set of tables keeps PostgreSQL itself (`direct`), the full Sluice path (`sluice`:
//! client certificate from Sluice's CA → control → dataplane → emulator with an IAM token →
//! PostgreSQL), the emulator alone (`emulator-only`, isolating the cost of the RDS Proxy
//! stand-in so Sluice's own cost can be read off) and their plaintext variants. Runs are
//! interleaved (repetition 1 runs every workload on every target, then repetition 2, ...; the
//! target order rotates from one repetition to the next) and the report gives medians, ratios to
//! the same-legs baselines (and, for Sluice through the emulator, to the emulator), the proxies'
//! CPU per transaction, per connection and per GiB of COPY (from `/proc/<pid>/stat`) and the raw
//! per-repetition numbers.
//!
//! With `--auth` it measures the auth API instead (logins and database certificates per second
//! per auth node, on SQLite and on a shared PostgreSQL; see `e2e/auth.rs`).
//!
//! Every child process is stopped when the harness ends, also on errors and on SIGINT/SIGTERM,
//! and every client command runs under a time limit. `bench/README.md` has the command line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use aws_credential_types::Credentials;
use clap::Parser;
use sluice_control::config::{AwsSpec, DatabaseSpec, StaticDatabase, TlsMode, TlsSpec, UpstreamAuth};
use sluice_control::demo::{
    self, parse_env_exports, AwsCreds, ControlProc, DataplaneProc, PgOpts, Proc, Stack, LIBPQ_VARS,
};
use sluice_control::iam::{generate_auth_token, TokenTarget};
use sluice_control::state::random_secret;

/// The COPY's rows: the row number, a tab, 30 copies of the row number's md5 (960 bytes) and a
/// newline, so every row is distinct and the md5 of the stream checks order and content.
const COPY_ROW_BYTES_APPROX: u64 = 969;

/// The defaults of a full run, sized so that every target × 3 repetitions (with
/// `--contention sched-idle`) fits in about a quarter of an hour on the 2-core VM.
const DEFAULT_DURATION: u64 = 4;
const DEFAULT_COPY_MB: u64 = 512;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Parser, Debug)]
#[command(
    name = "e2e",
    about = "Sluice end-to-end benchmark: pgbench and COPY against direct PostgreSQL, Sluice, the RDS Proxy emulator, pgbouncer and haproxy"
)]
struct Args {
    /// Repetitions of the whole workload × target matrix [default: 3, or 1 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Approximate size of the COPY in MiB [default: 512, or 256 with --quick].
    #[arg(long)]
    copy_mb: Option<u64>,
    /// Seconds each pgbench run lasts (`-T`) [default: 4, or 3 with --quick].
    #[arg(long)]
    duration: Option<u64>,
    /// Where to write the Markdown report [default: bench/RESULTS.md; with --auth, stdout only].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A short run to test the harness itself: --reps 1 --duration 3 --copy-mb 256 (explicit
    /// flags still win).
    #[arg(long)]
    quick: bool,
    /// Approximate size of the COPY FROM (psql `\copy ... from pstdin`) in MiB [default: half of
    /// --copy-mb].
    #[arg(long)]
    copy_in_mb: Option<u64>,
    /// Run only these targets (comma-separated; direct is always run, as the baseline): direct,
    /// direct-tls, sluice-tls-cert, sluice-plain, pgbouncer-tls, haproxy-tls-passthrough, sluice,
    /// sluice-nobpf, sluice-splice, emulator-only, emulator-plain, pgbouncer, haproxy, haproxy-splice.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// `sched-idle`: also run `pgbench -S -c1` with every CPU kept busy by SCHED_IDLE spinning
    /// processes (`chrt --idle 0`), and report the latency each proxy adds with idle and with busy
    /// CPUs.
    #[arg(long, value_enum)]
    contention: Option<Contention>,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Start Sluice without a dataplane process (control relays sessions itself), to compare
    /// control's userspace relay with the dataplane in the same harness.
    #[arg(long)]
    no_dataplane: bool,
    /// Never run apt-get: skip pgbouncer/haproxy when they are not installed.
    #[arg(long)]
    no_install: bool,
    /// Keep the working directory (configs, logs) after a successful run.
    #[arg(long)]
    keep: bool,
    /// Measure the auth API instead of the data path: logins and database certificates per
    /// second per auth node, on SQLite and on a shared PostgreSQL with one and two nodes
    /// (--reps rounds of --duration seconds each; see `auth.rs`).
    #[arg(long)]
    auth: bool,
    /// Measure the MySQL side instead: direct MariaDB vs the RDS Proxy emulator's MySQL mode vs
    /// Sluice, with mariadb-slap point selects at 1 and 8 connections and a bulk read (see
    /// `mysql.rs`). Appends its report to --out when given.
    #[arg(long)]
    mysql: bool,
    /// With --mysql: selects per client per run [default: 20000, or 2000 with --quick].
    #[arg(long)]
    mysql_queries: Option<u64>,
    /// With --mysql: MiB in the bulk read [default: 512, or 64 with --quick].
    #[arg(long)]
    mysql_mb: Option<u64>,
    /// With --auth: concurrent clients per auth node.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

/// Background load during the `-c1` runs of [`Workload::SelectC1Busy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Contention {
    /// One SCHED_IDLE busy loop per CPU: the CPUs never idle (no wake-up latency from a deep
    /// idle state), yet any normal task preempts the loops at once.
    SchedIdle,
}

/// The settings a run uses, after --quick and the defaults.
#[derive(Debug, Clone)]
struct Settings {
    reps: usize,
    copy_mb: u64,
    copy_in_mb: u64,
    duration: u64,
    scale: u32,
    contention: Option<Contention>,
}

// ---------------------------------------------------------------------------------------------
// Progress, interruption, child processes
// ---------------------------------------------------------------------------------------------

static START: OnceLock<Instant> = OnceLock::new();
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[e2e {:>7.1}s] {}", $crate::START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64(), format!($($arg)*))
    };
}

extern "C" fn on_signal(_: std::os::raw::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag that every wait loop checks, so the harness unwinds
/// and its `Drop`s stop the child processes instead of leaving them behind.
fn install_signal_handlers() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { signal(sig, SigHandler::Handler(on_signal)) } {
            progress!("cannot install a handler for {sig}: {e}");
        }
    }
}

// Under e2e/ rather than beside e2e.rs, where cargo would take it for another binary.
#[path = "e2e/auth.rs"]
mod auth;
#[path = "e2e/mysql.rs"]
mod mysql;

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A short-lived child (pgbench, psql, md5sum) that is killed and reaped if dropped while running.
struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(ChildGuard { child })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` to completion with its output captured, killing it after `timeout` or on an
/// interrupt. Returns the output whatever the exit status.
fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_output_from(cmd, timeout, Stdio::null())
}

/// As [`run_output`], with `stdin` as the command's standard input.
fn run_output_from(cmd: &mut Command, timeout: Duration, stdin: Stdio) -> Result<Output> {
    cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{:?}", cmd.get_program());
    let mut guard = ChildGuard::spawn(cmd)?;
    let out = drain(guard.child.stdout.take());
    let err = drain(guard.child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = guard.child.try_wait().with_context(|| format!("waiting for {what}"))? {
            break status;
        }
        if interrupted() {
            bail!("interrupted while running {what}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().map_err(|_| anyhow!("reading {what}'s stdout panicked"))?;
    let stderr = err.join().map_err(|_| anyhow!("reading {what}'s stderr panicked"))?;
    Ok(Output { status, stdout, stderr })
}

/// Like [`run_output`], but fails unless the command succeeds; returns its stdout.
fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = run_output(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command's first output line (for version strings), or a note that it failed.
fn first_line(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    match run_output(&mut cmd, Duration::from_secs(10)) {
        Ok(out) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            text.lines().next().unwrap_or("").trim().to_owned()
        }
        Err(e) => format!("({program}: {e})"),
    }
}

/// The working directory; removed at the end unless kept (--keep, or after an error, for its logs).
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("e2e: kept the working directory {} (logs, configs)", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------------------------

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
fn clock_ticks() -> f64 {
    let mut cmd = Command::new("getconf");
    cmd.arg("CLK_TCK");
    run_ok(&mut cmd, Duration::from_secs(5))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in ticks.
fn proc_ticks(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces; count from after it.
    let rest = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let get = |i: usize| -> Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat field {}", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Busy ticks of the whole machine (user, nice, system, irq, softirq) from /proc/stat.
fn machine_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// Named groups of processes whose CPU time is measured around each run.
#[derive(Debug, Clone)]
struct CpuGroup {
    name: String,
    pids: Vec<u32>,
}

/// A CPU snapshot: ticks per group, and the machine's busy ticks.
struct CpuSnap {
    groups: Vec<u64>,
    machine: u64,
}

fn cpu_snap(groups: &[CpuGroup]) -> Result<CpuSnap> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut t = 0;
        for pid in &g.pids {
            t += proc_ticks(*pid)?;
        }
        out.push(t);
    }
    Ok(CpuSnap { groups: out, machine: machine_ticks()? })
}

/// CPU seconds per group, and of the whole machine, between two snapshots.
fn cpu_delta(before: &CpuSnap, after: &CpuSnap, ticks: f64) -> (Vec<f64>, f64) {
    let groups = before.groups.iter().zip(&after.groups).map(|(b, a)| a.saturating_sub(*b) as f64 / ticks).collect();
    (groups, after.machine.saturating_sub(before.machine) as f64 / ticks)
}

// ---------------------------------------------------------------------------------------------
// The Sluice stack
// ---------------------------------------------------------------------------------------------

/// The database user `sluice-tls-cert` logs in as (PostgreSQL's `hostssl … cert` line names it;
/// a member of alice, so it reads her tables).
const CERT_DB_USER: &str = "alice_cert";
/// The database user `sluice-plain` logs in as (PostgreSQL trusts it on loopback: the IAM token a
/// plain upstream leg carries means nothing to a self-hosted PostgreSQL).
const PLAIN_DB_USER: &str = "alice_plain";
/// Control's names for PostgreSQL itself: over TLS with certificate auth, and plain.
const CERT_SERVICE: &str = "demo-cert";
const PLAIN_SERVICE: &str = "demo-direct-plain";

/// Creates role `dev` and Sluice user `alice`, logs her in with the `sluice` CLI (`sluice login`,
/// `sluice db login demo`) and returns the libpq environment `sluice db env demo` prints.
fn sluice_client_env(control: &ControlProc, dir: &Path) -> Result<Vec<(String, String)>> {
    let mut envs = sluice_client_envs(control, dir, &[("demo", "alice")])?;
    envs.pop().ok_or_else(|| anyhow!("no environment for database demo"))
}

/// As [`sluice_client_env`], for each `(service, database user)` in `logins` (database `demo`).
fn sluice_client_envs(
    control: &ControlProc,
    dir: &Path,
    logins: &[(&str, &str)],
) -> Result<Vec<Vec<(String, String)>>> {
    let cli = SluiceCli::login(control, dir, &["alice", CERT_DB_USER, PLAIN_DB_USER])?;
    let mut envs = Vec::new();
    for (service, db_user) in logins {
        cli.run(&["db", "login", service, "--db-user", db_user, "--db-name", "demo"])?;
        let mut env = parse_env_exports(&cli.run(&["db", "env", service])?)?;
        // The certificate names `localhost`; dial 127.0.0.1 directly so libpq does not try ::1
        // first (control listens on IPv4 only) on every connection of `pgbench -C`.
        env.push(("PGHOSTADDR".into(), "127.0.0.1".into()));
        envs.push(env);
    }
    Ok(envs)
}

/// The `sluice` CLI with alice logged in (`sluice login`), in a home of its own.
struct SluiceCli {
    bin: PathBuf,
    home: PathBuf,
    password: String,
}

impl SluiceCli {
    /// Creates role `dev` (database `demo` as `db_users`, every env=dev database) and Sluice user
    /// `alice` in control's state, and logs her in.
    fn login(control: &ControlProc, dir: &Path, db_users: &[&str]) -> Result<SluiceCli> {
        let state = control.state()?;
        state.upsert_role(&demo::dev_role("dev", &["demo"], db_users)?)?;
        let password = format!("pw-{}", random_secret(8));
        state.add_user("alice", &password, &["dev".to_owned()])?;
        let ca_file = dir.join("control-ca.pem");
        std::fs::write(&ca_file, state.ensure_ca("sluice")?.cert_pem)?;
        let cli = SluiceCli { bin: demo::find_bin("sluice")?, home: dir.join("sluice-home"), password };
        let api = format!("127.0.0.1:{}", control.api_port);
        cli.run(&["login", "--proxy", &api, "--user", "alice", "--ca-file", &ca_file.to_string_lossy()])?;
        Ok(cli)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("SLUICE_HOME", &self.home).env("SLUICE_PASSWORD", &self.password);
        run_ok(&mut cmd, Duration::from_secs(60))
    }
}

/// PostgreSQL's TLS files from `control auth sign --format=db` (server certificate and key
/// from Sluice's database CA, and that CA as `ssl_ca_file`), signed for the control that will run
/// on `stack_dir/control/data` so it trusts the server and PostgreSQL trusts its client
/// certificates.
struct DbTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

fn sign_db_tls(stack_dir: &Path, out_dir: &Path) -> Result<DbTls> {
    std::fs::create_dir_all(out_dir)?;
    let sign_cfg = out_dir.join("sign.yaml");
    std::fs::write(&sign_cfg, format!("data_dir: {}\n", stack_dir.join("control").join("data").display()))?;
    let files = out_dir.join("server");
    let mut cmd = Command::new(demo::find_bin("control")?);
    cmd.arg("--config")
        .arg(&sign_cfg)
        .args(["auth", "sign", "--format=db", "--host", "localhost,127.0.0.1", "--ttl", "24h", "--out"])
        .arg(&files);
    run_ok(&mut cmd, Duration::from_secs(60)).context("control auth sign --format=db")?;
    let with_ext = |ext: &str| PathBuf::from(format!("{}{ext}", files.display()));
    Ok(DbTls { cert: with_ext(".crt"), key: with_ext(".key"), client_ca: with_ext(".cas") })
}

/// PostgreSQL's pg_hba.conf: `alice_cert` only over TLS with a certificate (Sluice's
/// `auth: cert`), `alice_plain` trusted on loopback (Sluice's plain upstream, whose IAM token a
/// self-hosted server cannot check), everyone else SCRAM over TLS or not.
fn bench_hba() -> String {
    format!(
        "local all all trust\n\
         hostssl all {CERT_DB_USER} 127.0.0.1/32 cert\n\
         host all {CERT_DB_USER} 0.0.0.0/0 reject\n\
         host all {PLAIN_DB_USER} 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n"
    )
}

/// Control's routes straight to PostgreSQL: `demo-cert` (TLS, certificate auth) and
/// `demo-direct-plain` (no TLS; the IAM token control sends is never asked for).
fn direct_databases(pg_port: u16) -> Vec<StaticDatabase> {
    let db = |name: &str, tls: TlsSpec, auth: UpstreamAuth, aws: AwsSpec| StaticDatabase {
        name: name.into(),
        description: "the benchmark's PostgreSQL, without the emulator".into(),
        static_labels: [("env".to_owned(), "dev".to_owned())].into_iter().collect(),
        spec: DatabaseSpec {
            protocol: "postgres".into(),
            uri: format!("localhost:{pg_port}"),
            aws,
            tls,
            connect_addr: Some(format!("127.0.0.1:{pg_port}")),
            auth,
        },
    };
    vec![
        db(CERT_SERVICE, TlsSpec::default(), UpstreamAuth::Cert, AwsSpec::default()),
        db(
            PLAIN_SERVICE,
            TlsSpec { mode: TlsMode::Disable, ..Default::default() },
            UpstreamAuth::Iam,
            AwsSpec { region: Some(demo::DEMO_REGION.into()), ..Default::default() },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Peer proxies
// ---------------------------------------------------------------------------------------------

fn installed(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).is_file())
}

/// Installs pgbouncer and haproxy with apt-get when they are missing and we are root.
fn ensure_peer_proxies(no_install: bool, notes: &mut Vec<String>) {
    let missing: Vec<&str> = ["pgbouncer", "haproxy"].into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return;
    }
    if no_install || !nix::unistd::geteuid().is_root() {
        let why = if no_install { "--no-install" } else { "not root" };
        notes.push(format!("{} not installed ({why}): skipped", missing.join(", ")));
        return;
    }
    progress!("installing {} with apt-get", missing.join(" "));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_ok(&mut cmd, Duration::from_secs(600))
    };
    if install().is_err() {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        if let Err(e) = run_ok(&mut update, Duration::from_secs(300)).and_then(|_| install()) {
            notes.push(format!("apt-get install {} failed: {}", missing.join(" "), short(&format!("{e:#}"))));
        }
    }
}

/// pgbouncer in session pooling mode on a free loopback port, SCRAM towards clients and
/// PostgreSQL (with alice's plaintext password in its auth file). With `tls` (its certificate
/// chain and key, PEM), TLS is required on both legs (`client_tls_sslmode` and
/// `server_tls_sslmode = require`).
fn start_pgbouncer(dir: &Path, pg_port: u16, password: &str, tls: Option<(&str, &str)>) -> Result<(Proc, u16)> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let run_as = sluice_control::demo::unprivileged_user()?;
    std::fs::create_dir_all(dir)?;
    let port = demo::free_port()?;
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, format!("\"alice\" \"{}\"\n", password.replace('"', "\"\"")))?;
    std::fs::set_permissions(&userlist, std::fs::Permissions::from_mode(0o600))?;
    let log = dir.join("pgbouncer.log");
    std::fs::write(&log, "")?;
    let mut own_files = vec![dir.to_path_buf(), userlist.clone(), log.clone()];
    let tls_lines = match tls {
        None => "server_tls_sslmode = disable\n".to_owned(),
        Some((cert, key)) => {
            let (cert_file, key_file) = (dir.join("pgbouncer.crt"), dir.join("pgbouncer.key"));
            std::fs::write(&cert_file, cert)?;
            std::fs::write(&key_file, key)?;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
            let lines = format!(
                "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\nserver_tls_sslmode = require\n",
                cert_file.display(),
                key_file.display()
            );
            own_files.extend([cert_file, key_file]);
            lines
        }
    };
    let ini = dir.join("pgbouncer.ini");
    own_files.push(ini.clone());
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             demo = host=127.0.0.1 port={pg_port} dbname=demo\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             pool_mode = session\n\
             max_client_conn = 200\n\
             default_pool_size = 20\n\
             {tls_lines}\
             ignore_startup_parameters = extra_float_digits\n\
             log_connections = 0\n\
             log_disconnections = 0\n\
             logfile = {log}\n",
            userlist = userlist.display(),
            log = log.display(),
        ),
    )?;
    if let Some(u) = &run_as {
        for p in &own_files {
            std::os::unix::fs::chown(p, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
        }
    }
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(&ini).stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join("stderr.log"))?);
    if let Some(u) = &run_as {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let mut proc = Proc::spawn("pgbouncer", &mut cmd)?;
    demo::wait_for_port(port, Duration::from_secs(20), &mut proc)
        .with_context(|| format!("pgbouncer did not start; see {}", log.display()))?;
    Ok((proc, port))
}

/// haproxy in `mode tcp` on a free loopback port in front of PostgreSQL; `splice` adds
/// `option splice-auto`.
fn start_haproxy(dir: &Path, pg_port: u16, splice: bool, name: &str) -> Result<(Proc, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = demo::free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n\
             \x20   maxconn 1000\n\
             \n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 1h\n\
             \x20   timeout server 1h\n\
             {splice}\
             \n\
             listen postgres\n\
             \x20   bind 127.0.0.1:{port}\n\
             \x20   server pg 127.0.0.1:{pg_port}\n",
            splice = if splice { "    option splice-auto\n" } else { "" },
        ),
    )?;
    let mut check = Command::new("haproxy");
    check.arg("-c").arg("-f").arg(&cfg);
    run_ok(&mut check, Duration::from_secs(20)).context("haproxy -c rejected the configuration")?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?);
    let mut proc = Proc::spawn(name, &mut cmd)?;
    demo::wait_for_port(port, Duration::from_secs(20), &mut proc)?;
    Ok((proc, port))
}

// ---------------------------------------------------------------------------------------------
// Targets and workloads
// ---------------------------------------------------------------------------------------------

/// One place clients connect to.
struct Target {
    key: &'static str,
    description: String,
    env: Vec<(String, String)>,
    /// Mint a fresh IAM token as PGPASSWORD before each command (emulator-only).
    token: Option<TokenTarget>,
    /// The processes whose CPU time is measured; the first `own` groups are the proxy under test
    /// (control and dataplane for `sluice`, whose last group is the emulator it goes through).
    cpu: Vec<CpuGroup>,
    own: usize,
    /// Whether PostgreSQL's end of the session is TLS (`pg_stat_ssl`), checked before measuring.
    upstream_tls: bool,
}

impl Target {
    /// CPU seconds of the proxy under test in a sample.
    fn own_cpu(&self, x: &Sample) -> f64 {
        x.cpu_s.iter().take(self.own).sum()
    }
}

const TARGET_KEYS: &[&str] = &[
    "direct",
    "direct-tls",
    "sluice-tls-cert",
    "sluice-plain",
    "pgbouncer-tls",
    "haproxy-tls-passthrough",
    "sluice",
    "sluice-nobpf",
    "sluice-splice",
    "emulator-only",
    "emulator-plain",
    "pgbouncer",
    "haproxy",
    "haproxy-splice",
];

/// Cgroup v2 directories for the `sluice` (eBPF programs) and `sluice-nobpf` stacks.
fn bench_cgroups() -> Result<(PathBuf, PathBuf)> {
    let root = sluice_ebpf::own_cgroup().map_err(|e| anyhow!("{e}"))?;
    let base = format!("sluice-e2e-{}", std::process::id());
    let (a, b) = (root.join(format!("{base}-bpf")), root.join(format!("{base}-nobpf")));
    std::fs::create_dir_all(&a).with_context(|| format!("creating {}", a.display()))?;
    std::fs::create_dir_all(&b).with_context(|| format!("creating {}", b.display()))?;
    Ok((a, b))
}

/// Removes the bench cgroups when dropped (after the stacks in them have stopped), moving this
/// process back to its parent cgroup first.
struct CgroupGuard((PathBuf, PathBuf));

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(parent) = self.0 .0.parent() {
            let _ = enter_cgroup(parent);
        }
        for d in [&self.0 .0, &self.0 .1] {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("e2e: could not remove cgroup {}: {e}", d.display());
            }
        }
    }
}

/// Moves this process (and so the children it starts next) into a cgroup v2 directory.
fn enter_cgroup(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the bench into {}", dir.display()))
}

/// The RDS Proxy emulator a Sluice target goes through, measured alone: Sluice's own cost is
/// its ratio to that.
fn emulator_baseline(key: &str) -> Option<&'static str> {
    match key {
        "sluice" | "sluice-nobpf" => Some("emulator-only"),
        "sluice-splice" => Some("emulator-plain"),
        _ => None,
    }
}

/// The same-legs groups of the main tables: every target in a group has the same kind of leg on
/// both sides (TLS client leg and TLS to PostgreSQL, or plain both ways), straight to the one
/// PostgreSQL; each is compared with the baselines listed (direct PostgreSQL over the same leg).
const TLS_GROUP: &[&str] = &["direct-tls", "sluice-tls-cert", "pgbouncer-tls", "haproxy-tls-passthrough"];
const PLAIN_GROUP: &[&str] = &["direct", "sluice-plain", "pgbouncer", "haproxy", "haproxy-splice"];
/// The targets through the RDS Proxy emulator (a second userspace TLS proxy), reported apart.
const EMULATOR_GROUP: &[&str] =
    &["direct", "sluice", "sluice-nobpf", "sluice-splice", "emulator-only", "emulator-plain"];

/// The same-legs baseline a target's added latency is measured over.
fn same_legs_baseline(key: &str) -> Option<&'static str> {
    if TLS_GROUP.contains(&key) {
        Some("direct-tls")
    } else if PLAIN_GROUP.contains(&key) {
        Some("direct")
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    SelectC1,
    /// `-c1` with every CPU kept busy by SCHED_IDLE loops (`--contention sched-idle`).
    SelectC1Busy,
    SelectC8,
    SelectConnect,
    Copy,
    CopyIn,
}

/// The workloads a run measures, in order.
fn workloads(s: &Settings) -> Vec<Workload> {
    let mut w = vec![Workload::SelectC1];
    if s.contention.is_some() {
        w.push(Workload::SelectC1Busy);
    }
    w.extend([Workload::SelectC8, Workload::SelectConnect, Workload::Copy, Workload::CopyIn]);
    w
}

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::SelectC1 => "select-c1",
            Workload::SelectC1Busy => "select-c1-busy",
            Workload::SelectC8 => "select-c8",
            Workload::SelectConnect => "select-connect-c4",
            Workload::Copy => "copy",
            Workload::CopyIn => "copy-in",
        }
    }

    fn title(self, s: &Settings) -> String {
        let d = s.duration;
        match self {
            Workload::SelectC1 => format!("`pgbench -S -c1 -T {d}`: select-only, 1 connection"),
            Workload::SelectC1Busy => format!(
                "`pgbench -S -c1 -T {d}` with every CPU busy: one SCHED_IDLE spinning loop per CPU (`chrt --idle 0`)"
            ),
            Workload::SelectC8 => format!("`pgbench -S -c8 -j2 -T {d}`: select-only, 8 connections"),
            Workload::SelectConnect => {
                format!("`pgbench -S -C -c4 -j2 -T {d}`: select-only, a new connection per transaction")
            }
            Workload::Copy => format!("`COPY (SELECT ...) TO STDOUT` of ~{} MiB through psql", s.copy_mb),
            Workload::CopyIn => {
                format!("`\\copy copy_in FROM pstdin` of ~{} MiB through psql (an unlogged table)", s.copy_in_mb)
            }
        }
    }

    fn is_copy(self) -> bool {
        matches!(self, Workload::Copy | Workload::CopyIn)
    }

    fn pgbench_args(self, duration: u64) -> Vec<String> {
        let mut a: Vec<String> = vec!["-n".into(), "-S".into()];
        match self {
            Workload::SelectC1 | Workload::SelectC1Busy => a.extend(["-c1".into(), "-j1".into()]),
            Workload::SelectC8 => a.extend(["-c8".into(), "-j2".into()]),
            Workload::SelectConnect => a.extend(["-C".into(), "-c4".into(), "-j2".into()]),
            Workload::Copy | Workload::CopyIn => {}
        }
        a.extend(["-T".into(), duration.to_string()]);
        a
    }
}

/// The outcome of one run of one workload on one target.
#[derive(Debug, Clone)]
struct Sample {
    rep: usize,
    workload: Workload,
    target: &'static str,
    /// TPS, or MiB/s for the COPY.
    value: f64,
    latency_ms: Option<f64>,
    /// Transactions (pgbench) or bytes (COPY).
    units: u64,
    md5: Option<String>,
    wall_s: f64,
    /// CPU seconds per [`Target::cpu`] group.
    cpu_s: Vec<f64>,
    machine_cpu_s: f64,
    error: Option<String>,
}

struct Tools {
    pgbench: PathBuf,
    psql: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        let bin = demo::postgres_bin_dir()?;
        let pick = |name: &str| {
            let p = bin.join(name);
            if p.is_file() {
                p
            } else {
                PathBuf::from(name)
            }
        };
        Ok(Tools { pgbench: pick("pgbench"), psql: pick("psql") })
    }
}

/// Clients straight to an RDS Proxy emulator (with or without TLS), a fresh IAM token per command.
fn emulator_target(key: &'static str, emu: &demo::Emulator) -> Target {
    let mut env = vec![("PGHOST".into(), "127.0.0.1".into()), ("PGPORT".into(), emu.port.to_string())];
    let how = if emu.plaintext {
        env.push(("PGSSLMODE".into(), "disable".into()));
        "without TLS"
    } else {
        env.push(("PGSSLMODE".into(), "verify-full".into()));
        env.push(("PGSSLROOTCERT".into(), emu.ca_file.to_string_lossy().into_owned()));
        "with TLS verify-full"
    };
    env.extend([("PGUSER".into(), "alice".into()), ("PGDATABASE".into(), "demo".into())]);
    Target {
        key,
        description: format!(
            "RDS Proxy emulator on 127.0.0.1:{} ({how}, a fresh IAM token as the password) → PostgreSQL",
            emu.port
        ),
        env,
        token: Some(TokenTarget {
            host: emu.endpoint.clone(),
            port: emu.port,
            user: "alice".into(),
            region: demo::DEMO_REGION.into(),
        }),
        cpu: vec![CpuGroup { name: "emulator".into(), pids: vec![emu.proc.pid()] }],
        own: 1,
        upstream_tls: false,
    }
}

/// A client command with exactly the target's libpq environment.
fn client_cmd(program: &Path, target: &Target, creds: &Credentials) -> Result<Command> {
    let mut cmd = Command::new(program);
    for v in LIBPQ_VARS.iter().chain(&["PGCHANNELBINDING"]) {
        cmd.env_remove(v);
    }
    cmd.envs(target.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).env("PGCONNECT_TIMEOUT", "20");
    if let Some(t) = &target.token {
        cmd.env("PGPASSWORD", generate_auth_token(creds, t, SystemTime::now())?);
    }
    Ok(cmd)
}

struct PgbenchResult {
    tps: f64,
    latency_ms: Option<f64>,
    transactions: u64,
}

fn parse_pgbench(stdout: &str) -> Result<PgbenchResult> {
    let number_after = |prefix: &str| -> Option<f64> {
        stdout.lines().find_map(|l| l.trim().strip_prefix(prefix)).and_then(|rest| {
            rest.trim_start_matches([' ', '=', ':']).split_whitespace().next().and_then(|n| n.parse().ok())
        })
    };
    let tps = number_after("tps").ok_or_else(|| anyhow!("no `tps =` line in pgbench's output:\n{stdout}"))?;
    let failed = number_after("number of failed transactions").unwrap_or(0.0);
    if failed > 0.0 {
        bail!("pgbench reports {failed} failed transactions:\n{stdout}");
    }
    let transactions = number_after("number of transactions actually processed").unwrap_or(0.0) as u64;
    Ok(PgbenchResult { tps, latency_ms: number_after("latency average"), transactions })
}

fn run_pgbench(
    tools: &Tools,
    target: &Target,
    creds: &Credentials,
    workload: Workload,
    s: &Settings,
) -> Result<PgbenchResult> {
    let mut cmd = client_cmd(&tools.pgbench, target, creds)?;
    cmd.args(workload.pgbench_args(s.duration));
    let out = run_output(&mut cmd, Duration::from_secs(s.duration + 90))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench failed ({}): {}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    parse_pgbench(&stdout)
}

fn copy_sql(copy_mb: u64) -> String {
    let rows = (copy_mb * 1024 * 1024 / COPY_ROW_BYTES_APPROX).max(1);
    format!("COPY (SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, {rows}) AS i) TO STDOUT")
}

/// The COPY FROM's input: rows exactly like the COPY out's (`i`, a tab, 30 × md5(i), a newline),
/// written once by a direct COPY out, so PostgreSQL can recompute every row to check the load.
struct CopyInData {
    file: PathBuf,
    rows: u64,
    bytes: u64,
}

/// The unlogged table the COPY FROM loads (WAL would measure the disk, not the proxy).
const COPY_IN_TABLE: &str = "copy_in";

fn prepare_copy_in(
    pg: &demo::Postgres,
    tools: &Tools,
    direct: &Target,
    creds: &Credentials,
    dir: &Path,
    mb: u64,
) -> Result<CopyInData> {
    pg.psql(
        "demo",
        &format!(
            "CREATE UNLOGGED TABLE {COPY_IN_TABLE} (i bigint, s text); ALTER TABLE {COPY_IN_TABLE} OWNER TO alice"
        ),
    )?;
    let rows = (mb * 1024 * 1024 / COPY_ROW_BYTES_APPROX).max(1);
    let file = dir.join("copy-in.tsv");
    let mut cmd = client_cmd(&tools.psql, direct, creds)?;
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!("COPY (SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, {rows}) AS i) TO STDOUT"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?)
        .stderr(Stdio::piped());
    let out = ChildGuard::spawn(&mut cmd)?.child.wait_with_output_guarded(Duration::from_secs((mb / 5).max(120)))?;
    if !out.status.success() {
        bail!("writing the COPY FROM input failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let bytes = std::fs::metadata(&file)?.len();
    Ok(CopyInData { file, rows, bytes })
}

/// Waits for a child that writes only to a file and stderr, killing it after `timeout`.
trait WaitGuarded {
    fn wait_with_output_guarded(&mut self, timeout: Duration) -> Result<Output>;
}

impl WaitGuarded for Child {
    fn wait_with_output_guarded(&mut self, timeout: Duration) -> Result<Output> {
        let err = drain(self.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if interrupted() || Instant::now() > deadline {
                let _ = self.kill();
                let _ = self.wait();
                bail!("killed after {timeout:?} (or interrupted)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = err.join().map_err(|_| anyhow!("reading stderr panicked"))?;
        Ok(Output { status, stdout: Vec::new(), stderr })
    }
}

/// `psql -c "\copy copy_in from pstdin"` fed the prepared file through the target; returns the
/// seconds it took. The table is emptied beforehand (not measured).
fn run_copy_in(
    tools: &Tools,
    target: &Target,
    creds: &Credentials,
    data: &CopyInData,
    timeout: Duration,
) -> Result<f64> {
    let mut cmd = client_cmd(&tools.psql, target, creds)?;
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"]).arg(format!("\\copy {COPY_IN_TABLE} from pstdin"));
    let input = std::fs::File::open(&data.file).with_context(|| format!("opening {}", data.file.display()))?;
    let started = Instant::now();
    let out = run_output_from(&mut cmd, timeout, Stdio::from(input))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("psql \\copy failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(secs)
}

/// Checks the loaded table row by row against what the input held: the row count, the sum of
/// `i`, and no row whose text differs from `repeat(md5(i::text), 30)`.
fn check_copy_in(pg: &demo::Postgres, data: &CopyInData) -> Result<String> {
    let got = pg.psql(
        "demo",
        &format!(
            "SELECT count(*), coalesce(sum(i), 0), count(*) FILTER (WHERE s IS DISTINCT FROM repeat(md5(i::text), 30)) FROM {COPY_IN_TABLE}"
        ),
    )?;
    let n = data.rows;
    let want = format!("{n}|{}|0", n * (n + 1) / 2);
    if got != want {
        bail!("the loaded table holds count|sum(i)|bad rows = {got}, not {want}");
    }
    Ok(format!("{n} rows checked"))
}

struct CopyResult {
    bytes: u64,
    md5: String,
    secs: f64,
}

/// `psql -c "COPY ... TO STDOUT"` piped through a byte counter into `md5sum`, killed after
/// `timeout` (or on an interrupt).
fn run_copy(tools: &Tools, target: &Target, creds: &Credentials, sql: &str, timeout: Duration) -> Result<CopyResult> {
    let mut cmd = client_cmd(&tools.psql, target, creds)?;
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut md5_cmd = Command::new("md5sum");
    md5_cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut md5 = ChildGuard::spawn(&mut md5_cmd)?;
    let started = Instant::now();
    let mut psql = ChildGuard::spawn(&mut cmd)?;
    let psql_err = drain(psql.child.stderr.take());
    let md5_out = drain(md5.child.stdout.take());
    let mut from = psql.child.stdout.take().ok_or_else(|| anyhow!("no psql stdout"))?;
    let mut to = md5.child.stdin.take().ok_or_else(|| anyhow!("no md5sum stdin"))?;

    // A watchdog kills psql at the deadline or on an interrupt, which ends the read loop below.
    // psql is reaped only after the watchdog has finished, so its pid cannot be reused meanwhile.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let psql_pid = nix::unistd::Pid::from_raw(psql.child.id() as i32);
    let deadline = started + timeout;
    let watchdog = std::thread::spawn(move || loop {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if interrupted() || Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(psql_pid, nix::sys::signal::Signal::SIGKILL);
                    return true;
                }
            }
            _ => return false,
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let copied = loop {
        match from.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]) {
                    break Err(anyhow!("writing to md5sum: {e}"));
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(anyhow!("reading psql's output: {e}")),
        }
    };
    drop(to);
    drop(from);
    let _ = done_tx.send(());
    let killed = watchdog.join().map_err(|_| anyhow!("the COPY watchdog panicked"))?;
    let status = psql.child.wait().context("waiting for psql")?;
    let secs = started.elapsed().as_secs_f64();
    let stderr = psql_err.join().map_err(|_| anyhow!("reading psql's stderr panicked"))?;
    check_interrupted()?;
    if killed {
        bail!("COPY did not finish within {timeout:?} ({bytes} bytes so far); killed psql");
    }
    copied?;
    if !status.success() {
        bail!("psql COPY failed ({status}): {}", String::from_utf8_lossy(&stderr));
    }
    let md5_status = md5.child.wait().context("waiting for md5sum")?;
    let md5_stdout = md5_out.join().map_err(|_| anyhow!("reading md5sum's output panicked"))?;
    if !md5_status.success() {
        bail!("md5sum failed ({md5_status})");
    }
    let text = String::from_utf8_lossy(&md5_stdout);
    let md5 = text.split_whitespace().next().ok_or_else(|| anyhow!("md5sum printed nothing"))?.to_owned();
    Ok(CopyResult { bytes, md5, secs })
}

/// One SCHED_IDLE busy loop per CPU, stopped (killed) when the guards are dropped. `chrt`
/// execs the shell, so each guard's pid is the loop itself.
fn spin_idle() -> Result<Vec<ChildGuard>> {
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    (0..n)
        .map(|_| {
            let mut cmd = Command::new("chrt");
            cmd.args(["--idle", "0", "sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            ChildGuard::spawn(&mut cmd)
        })
        .collect()
}

/// What the runs share besides the target: the client programs, the superuser connection for
/// unmeasured set-up and checks, and the COPY FROM input.
struct Bench<'a> {
    tools: &'a Tools,
    creds: &'a Credentials,
    pg: &'a demo::Postgres,
    copy_in: &'a CopyInData,
    ticks: f64,
}

/// Runs one workload on one target and measures it; failures become a sample with `error`.
fn measure(b: &Bench, target: &Target, workload: Workload, rep: usize, s: &Settings) -> Sample {
    let (tools, creds, ticks) = (b.tools, b.creds, b.ticks);
    let mut sample = Sample {
        rep,
        workload,
        target: target.key,
        value: 0.0,
        latency_ms: None,
        units: 0,
        md5: None,
        wall_s: 0.0,
        cpu_s: vec![0.0; target.cpu.len()],
        machine_cpu_s: 0.0,
        error: None,
    };
    let started = Instant::now();
    let result = (|| -> Result<()> {
        if workload == Workload::CopyIn {
            b.pg.psql("demo", &format!("TRUNCATE {COPY_IN_TABLE}"))?;
        }
        let _spinners = if workload == Workload::SelectC1Busy { spin_idle()? } else { Vec::new() };
        let before = cpu_snap(&target.cpu)?;
        match workload {
            Workload::CopyIn => {
                let timeout = Duration::from_secs((s.copy_in_mb / 5).max(120));
                let secs = run_copy_in(tools, target, creds, b.copy_in, timeout)?;
                sample.value = b.copy_in.bytes as f64 / MIB / secs;
                sample.units = b.copy_in.bytes;
            }
            Workload::Copy => {
                let timeout = Duration::from_secs((s.copy_mb / 5).max(120));
                let r = run_copy(tools, target, creds, &copy_sql(s.copy_mb), timeout)?;
                sample.value = r.bytes as f64 / MIB / r.secs;
                sample.units = r.bytes;
                sample.md5 = Some(r.md5);
            }
            _ => {
                let r = run_pgbench(tools, target, creds, workload, s)?;
                sample.value = r.tps;
                sample.latency_ms = r.latency_ms;
                sample.units = r.transactions;
            }
        }
        let after = cpu_snap(&target.cpu)?;
        (sample.cpu_s, sample.machine_cpu_s) = cpu_delta(&before, &after, ticks);
        if workload == Workload::CopyIn {
            sample.md5 = Some(check_copy_in(b.pg, b.copy_in)?);
        }
        Ok(())
    })();
    sample.wall_s = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report
// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Thousands separators for a number rounded to an integer.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

fn short(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 300 {
        format!("{}…", one_line.chars().take(300).collect::<String>())
    } else {
        one_line
    }
}

/// Everything the report shows.
struct Report<'a> {
    settings: &'a Settings,
    targets: &'a [Target],
    samples: &'a [Sample],
    reference_md5: Option<String>,
    header: String,
    notes: Vec<String>,
}

impl Report<'_> {
    fn ok<'s>(&'s self, w: Workload, target: &str) -> impl Iterator<Item = &'s Sample> + 's {
        let target = target.to_owned();
        self.samples.iter().filter(move |x| x.workload == w && x.target == target && x.error.is_none())
    }

    fn attempts(&self, w: Workload, target: &str) -> usize {
        self.samples.iter().filter(|x| x.workload == w && x.target == target).count()
    }

    fn median_value(&self, w: Workload, target: &str) -> Option<f64> {
        median(self.ok(w, target).map(|x| x.value).collect())
    }

    /// The targets of `keys` this run has, in `keys`' order.
    fn present<'k>(&self, keys: &'k [&'k str]) -> Vec<&Target> {
        keys.iter().filter_map(|k| self.targets.iter().find(|t| t.key == *k)).collect()
    }

    /// One workload's table for `targets`, with a ratio column per baseline present and, with
    /// `emulator`, the ratio to the emulator a Sluice target goes through.
    fn workload_table(&self, w: Workload, targets: &[&Target], baselines: &[&str], emulator: bool) -> String {
        let baselines: Vec<&str> =
            baselines.iter().copied().filter(|b| self.targets.iter().any(|t| t.key == *b)).collect();
        let unit = if w.is_copy() { "MiB/s" } else { "TPS" };
        let mut head = format!("| target | {unit} (median) |");
        let mut rule = "|---|---:|".to_owned();
        if matches!(w, Workload::SelectC1 | Workload::SelectC1Busy) {
            head += " avg latency ms |";
            rule += "---:|";
        }
        for b in &baselines {
            head += &format!(" × {b} |");
            rule += "---:|";
        }
        if emulator {
            head += " × its emulator |";
            rule += "---:|";
        }
        match w {
            Workload::Copy => head += " md5 |",
            Workload::CopyIn => head += " table check |",
            _ => head += " proxy CPU µs/txn |",
        }
        rule += if w.is_copy() { "---|" } else { "---:|" };
        head += " runs ok |";
        rule += "---:|";
        let mut o = format!("{head}\n{rule}\n");
        for t in targets {
            let v = self.median_value(w, t.key);
            let mut row =
                format!("| {} | {} |", t.key, opt(v, |x| if w.is_copy() { format!("{x:.1}") } else { thousands(x) }));
            if matches!(w, Workload::SelectC1 | Workload::SelectC1Busy) {
                row += &format!(
                    " {} |",
                    opt(median(self.ok(w, t.key).filter_map(|x| x.latency_ms).collect()), |x| format!("{x:.3}"))
                );
            }
            let ratio = |base: Option<f64>| match (v, base) {
                (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
                _ => "–".into(),
            };
            for b in &baselines {
                row += &format!(" {} |", ratio(self.median_value(w, b)));
            }
            if emulator {
                let baseline = emulator_baseline(t.key).map(|b| ratio(self.median_value(w, b))).unwrap_or_default();
                row += &format!(" {baseline} |");
            }
            match w {
                Workload::Copy => {
                    let md5s: Vec<&String> = self.ok(w, t.key).filter_map(|x| x.md5.as_ref()).collect();
                    let check = match (&self.reference_md5, md5s.is_empty()) {
                        (_, true) => "–".to_owned(),
                        (Some(r), false) if md5s.iter().all(|m| *m == r) => "= direct".to_owned(),
                        (Some(_), false) => "**MISMATCH**".to_owned(),
                        (None, false) => "(no reference)".to_owned(),
                    };
                    row += &format!(" {check} |");
                }
                Workload::CopyIn => {
                    // A run whose table check failed is an error, so only checked runs count.
                    let checked = self.ok(w, t.key).filter(|x| x.md5.is_some()).count();
                    let failed = self.attempts(w, t.key) - self.ok(w, t.key).count();
                    row += &match (checked, failed) {
                        (0, 0) => " – |".to_owned(),
                        (n, 0) => format!(" exact ({n} checked) |"),
                        (_, f) => format!(" **{f} run(s) failed** |"),
                    };
                }
                _ if t.cpu.is_empty() => row += " – |",
                _ => {
                    let per_txn = self.own_cpu_per_unit(w, t, 1e6);
                    row += &format!(" {} |", opt(per_txn, |x| format!("{x:.0}")));
                }
            }
            row += &format!(" {}/{} |", self.ok(w, t.key).count(), self.attempts(w, t.key));
            o += &format!("{row}\n");
        }
        o + "\n"
    }

    /// The proxy's own CPU seconds per unit (transaction, connection or byte) × `scale`, median.
    fn own_cpu_per_unit(&self, w: Workload, t: &Target, scale: f64) -> Option<f64> {
        median(self.ok(w, t.key).filter(|x| x.units > 0).map(|x| t.own_cpu(x) * scale / x.units as f64).collect())
    }

    fn tables(&self) -> String {
        let mut o = String::new();
        let s = self.settings;
        let tls = self.present(TLS_GROUP);
        let plain = self.present(PLAIN_GROUP);
        let emu = self.present(EMULATOR_GROUP);
        let same_legs = !tls.is_empty() || plain.len() > 1;
        if same_legs {
            o += "## Same legs, straight to PostgreSQL (no emulator)\n\n";
            for w in workloads(s) {
                o += &format!("### {}\n\n", w.title(s));
                if !tls.is_empty() {
                    o += "TLS on the client leg and on the leg to PostgreSQL:\n\n";
                    o += &self.workload_table(w, &tls, &["direct-tls", "direct"], false);
                }
                if plain.len() > 1 {
                    o += "Plain TCP (sluice-plain: Unix socket) on the client leg, plain TCP to PostgreSQL:\n\n";
                    o += &self.workload_table(w, &plain, &["direct"], false);
                }
            }
            o += "### Proxy CPU per unit of work (same legs)\n\n";
            o += "| target | process(es) | µs/txn (`-c8`) | µs/connection (`-C`) | CPU-s/GiB COPY out | CPU-s/GiB COPY in |\n\
                  |---|---|---:|---:|---:|---:|\n";
            for t in tls.iter().chain(&plain).filter(|t| t.own > 0) {
                let names = t.cpu.iter().take(t.own).map(|g| g.name.as_str()).collect::<Vec<_>>().join(" + ");
                let f = |w: Workload, scale: f64, digits: usize| {
                    opt(self.own_cpu_per_unit(w, t, scale), |x| format!("{x:.digits$}"))
                };
                o += &format!(
                    "| {} | {names} | {} | {} | {} | {} |\n",
                    t.key,
                    f(Workload::SelectC8, 1e6, 0),
                    f(Workload::SelectConnect, 1e6, 0),
                    f(Workload::Copy, GIB, 2),
                    f(Workload::CopyIn, GIB, 2)
                );
            }
            o += "\n";
            if s.contention.is_some() {
                o += "### Added `-c1` latency over the same-legs baseline, idle vs busy CPUs\n\n";
                o += "Busy: one SCHED_IDLE spinning loop per CPU during the run (the CPUs never sleep, so no \
                      wake-up latency, yet every normal task preempts the loops). Added latency is the \
                      target's median average latency minus its baseline's (`direct-tls` for the TLS group, \
                      `direct` for the plain one) in the same mode.\n\n";
                o += "| target | baseline | idle: latency µs | idle: added µs | busy: latency µs | busy: added µs |\n\
                      |---|---|---:|---:|---:|---:|\n";
                let lat = |w: Workload, key: &str| median(self.ok(w, key).filter_map(|x| x.latency_ms).collect());
                for t in tls.iter().chain(&plain) {
                    let Some(base) = same_legs_baseline(t.key) else { continue };
                    let cell = |w: Workload| {
                        let v = lat(w, t.key);
                        let added = match (v, lat(w, base)) {
                            (Some(v), Some(b)) => format!("{:+.0}", (v - b) * 1e3),
                            _ => "–".into(),
                        };
                        (opt(v, |x| format!("{:.0}", x * 1e3)), added)
                    };
                    let (idle, idle_added) = cell(Workload::SelectC1);
                    let (busy, busy_added) = cell(Workload::SelectC1Busy);
                    o += &format!("| {} | {base} | {idle} | {idle_added} | {busy} | {busy_added} |\n", t.key);
                }
                o += "\n";
            }
        }
        if emu.len() > 1 {
            o += "## Through the RDS Proxy emulator\n\n";
            o += "Sluice's emulator targets go client → Sluice → emulator (a second userspace proxy) → \
                  PostgreSQL; `× its emulator` compares them with clients going straight to that emulator.\n\n";
            for w in workloads(s) {
                o += &format!("### {}\n\n", w.title(s));
                o += &self.workload_table(w, &emu, &["direct"], true);
            }
        }

        o += "### CPU seconds per GiB of COPY (out and in), every target\n\n";
        o += "| target | process(es) | COPY out CPU-s/GiB (median) | whole machine | COPY in CPU-s/GiB (median) | whole machine |\n\
              |---|---|---:|---:|---:|---:|\n";
        for t in self.targets {
            let per_gib = |w: Workload, f: &dyn Fn(&Sample) -> f64| {
                median(self.ok(w, t.key).filter(|x| x.units > 0).map(|x| f(x) / (x.units as f64 / GIB)).collect())
            };
            let two = |x: f64| format!("{x:.2}");
            let machine_out = opt(per_gib(Workload::Copy, &|x| x.machine_cpu_s), two);
            let machine_in = opt(per_gib(Workload::CopyIn, &|x| x.machine_cpu_s), two);
            if t.cpu.is_empty() {
                o += &format!("| {} | (no proxy) | – | {machine_out} | – | {machine_in} |\n", t.key);
            }
            for (i, g) in t.cpu.iter().enumerate() {
                let group = |w| opt(per_gib(w, &|x| x.cpu_s.get(i).copied().unwrap_or(0.0)), two);
                let (mo, mi) = if i == 0 { (machine_out.clone(), machine_in.clone()) } else { Default::default() };
                o += &format!(
                    "| {} | {} | {} | {mo} | {} | {mi} |\n",
                    t.key,
                    g.name,
                    group(Workload::Copy),
                    group(Workload::CopyIn)
                );
                if i + 1 == t.own && t.own > 1 {
                    let names = t.cpu.iter().take(t.own).map(|g| g.name.as_str()).collect::<Vec<_>>().join(" + ");
                    let own = |w| opt(per_gib(w, &|x| t.own_cpu(x)), |x| format!("**{x:.2}**"));
                    o += &format!(
                        "| {} | **{names}** | {} | | {} | |\n",
                        t.key,
                        own(Workload::Copy),
                        own(Workload::CopyIn)
                    );
                }
            }
        }
        o += "\n";
        let with = |w| self.median_value(w, "sluice");
        if self.targets.iter().any(|t| t.key == "sluice-nobpf") {
            o += "### eBPF counters: `sluice` (programs attached, sessions counted) vs `sluice-nobpf`\n\n";
            o += "| workload | sluice | sluice-nobpf | cost of the counters |\n|---|---:|---:|---:|\n";
            for w in workloads(s) {
                let (a, b) = (with(w), self.median_value(w, "sluice-nobpf"));
                let cost = match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:+.1} %", (1.0 - a / b) * 100.0),
                    _ => "–".into(),
                };
                let f = |v: Option<f64>| {
                    opt(v, |x| if w.is_copy() { format!("{x:.1} MiB/s") } else { format!("{} TPS", thousands(x)) })
                };
                o += &format!("| {} | {} | {} | {cost} |\n", w.key(), f(a), f(b));
            }
            o += "\n";
        }
        o
    }

    fn raw(&self) -> String {
        let mut o = String::from(
            "| rep | workload | target | TPS or MiB/s | latency ms | txns or bytes | wall s | proxy CPU s | machine CPU s | md5 / error |\n\
             |---:|---|---|---:|---:|---:|---:|---|---:|---|\n",
        );
        for x in self.samples {
            let cpu = x.cpu_s.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join(" + ");
            let tail = match (&x.error, &x.md5) {
                (Some(e), _) => format!("ERROR: {}", short(e).replace('|', "/")),
                (None, Some(m)) => m.clone(),
                (None, None) => String::new(),
            };
            o += &format!(
                "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {} | {:.2} | {} |\n",
                x.rep,
                x.workload.key(),
                x.target,
                x.value,
                opt(x.latency_ms, |l| format!("{l:.3}")),
                x.units,
                x.wall_s,
                if cpu.is_empty() { "–".into() } else { cpu },
                x.machine_cpu_s,
                tail
            );
        }
        o
    }

    fn how_to_read(&self) -> String {
        "## How to read this\n\n\
         * The machine is a small, noisy VM, shared with whatever else runs on it (see the load\n  \
         average in the header): absolute numbers move from run to run and between machines; only\n  \
         ratios between targets of the same run mean much. Everything (PostgreSQL, the proxies,\n  \
         pgbench/psql, md5sum) shares the same cores, so a proxy's CPU use is taken from the clients\n  \
         and the server too: a cheaper proxy also shows as more TPS.\n\
         * Latency-bound runs (`-c1`) are bimodal on a VM: when a vCPU idles between round trips,\n  \
         waking it costs tens of µs, so the same run can be ~3× faster while other work keeps the\n  \
         cores busy. The raw table's `machine CPU s` shows which mode a run was in (about 20 s of\n  \
         10 s × 2 cores: busy).\n\
         * Each cell is the median of the repetitions; the runs were interleaved (every workload on\n  \
         every target, then again), with the target order rotated each repetition. The raw numbers\n  \
         are at the end.\n\
         * `× direct` is the target's median over direct PostgreSQL's (1.00 = as fast; higher is\n  \
         better for TPS and MiB/s). `× its emulator` (Sluice only) compares Sluice with clients\n  \
         going straight to the RDS Proxy emulator it goes through (`emulator-only` for `sluice`,\n  \
         `emulator-plain` for `sluice-splice`): the emulator is itself a userspace proxy standing\n  \
         in for RDS Proxy, so this ratio is Sluice's own cost on top of what a real deployment\n  \
         pays anyway.\n\
         * `sluice-splice` is a local client on control's Unix socket (peer uid mapped to alice) to\n  \
         database `demo-plain`, whose upstream is the emulator without TLS: both legs are plain and\n  \
         the dataplane splices them (`emulator-plain` is that emulator measured alone, over TCP).\n\
         * The main tables compare targets with the same legs, all straight to the one PostgreSQL\n  \
         (which serves TLS and plain TCP at once): the TLS group (`direct-tls`, `sluice-tls-cert`,\n  \
         `pgbouncer-tls`, `haproxy-tls-passthrough`) has TLS from the client and TLS into\n  \
         PostgreSQL (haproxy passes the client's own TLS session through; the others terminate\n  \
         and re-encrypt); the plain group (`direct`, `sluice-plain`, `pgbouncer`, `haproxy`,\n  \
         `haproxy-splice`) has no TLS anywhere. Logins still differ: direct, pgbouncer and haproxy\n  \
         clients do SCRAM (PBKDF2 on both ends, every `-C` connection); `sluice-tls-cert` logs in\n  \
         to PostgreSQL with a client certificate; `sluice-plain`'s user is trusted on loopback\n  \
         (no password exchange at all), which flatters its `-C` numbers against `direct`.\n\
         * `sluice-plain`'s client leg is control's Unix socket (the peer uid names the user): a\n  \
         plain TCP client leg has no identity to route on (TCP clients are identified by their\n  \
         Sluice client certificate), so there is none to measure.\n\
         * `COPY FROM` loads the same rows the COPY out produces (written once to a file, fed to\n  \
         `psql \\copy ... from pstdin`) into an unlogged table, emptied before each run; after\n  \
         each run PostgreSQL recomputes every row from its key (`count`, `sum(i)`, and no row\n  \
         differing from `repeat(md5(i::text), 30)`), so a run counts only if the load was exact.\n\
         * The paths differ in more than the proxy: `direct`, `pgbouncer` and `haproxy*` are\n  \
         plaintext TCP, and libpq does SCRAM (PBKDF2) itself on every connection; `emulator-only`\n  \
         is TLS with the IAM token as a cleartext password, and the emulator does the SCRAM towards\n  \
         PostgreSQL; `sluice` is mutual TLS to control (no password) plus TLS to the emulator, so\n  \
         it decrypts and re-encrypts every byte once more than `emulator-only`. That is why\n  \
         `pgbench -C` can be faster through the emulator than direct. pgbouncer (session pooling)\n  \
         keeps server connections open, so `pgbench -C` through it forks no PostgreSQL backend per\n  \
         connection, but it checks each client's SCRAM proof itself. A proxy can also beat direct\n  \
         on COPY: it reads PostgreSQL's small writes and hands psql fewer, larger ones.\n\
         * CPU columns come from utime+stime in `/proc/<pid>/stat` of the proxy processes before\n  \
         and after each run; `proxy CPU µs/txn` counts the proxy under test only (control +\n  \
         dataplane for Sluice, not the emulator). The whole-machine column is every busy tick in\n  \
         `/proc/stat` per GiB: PostgreSQL, psql, md5sum, the harness, the kernel's network work,\n  \
         and anything else that was running.\n"
            .to_owned()
    }

    fn markdown(&self) -> String {
        let mut o = self.header.clone();
        if !self.notes.is_empty() {
            o += "\n## Notes from this run\n\n";
            for n in &self.notes {
                o += &format!("* {n}\n");
            }
        }
        o += "\n## Results (medians)\n\n";
        o += &self.tables();
        o += &self.how_to_read();
        o += "\n## Raw numbers (every repetition)\n\n";
        o += &self.raw();
        o
    }
}

/// The first three fields of /proc/loadavg (other work on the machine skews every number).
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    if fields.is_empty() {
        "?".into()
    } else {
        fields.join(" ")
    }
}

/// The machine and software, for the report's header.
fn machine_info() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "?".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next().and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".into());
    let pg = demo::postgres_bin_dir()
        .map(|b| first_line(&b.join("postgres").to_string_lossy(), &["--version"]))
        .unwrap_or_else(|e| format!("({e})"));
    vec![
        ("nproc".into(), nproc),
        ("CPU".into(), model),
        ("memory".into(), mem),
        ("kernel (`uname -r`)".into(), read("/proc/sys/kernel/osrelease").trim().to_owned()),
        ("uname -srvm".into(), first_line("uname", &["-srvm"])),
        ("PostgreSQL".into(), pg),
        ("pgbouncer".into(), first_line("pgbouncer", &["--version"])),
        ("haproxy".into(), first_line("haproxy", &["-v"])),
    ]
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    START.get_or_init(Instant::now);
    let args = Args::parse();
    install_signal_handlers();
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("e2e: finished, but some runs failed or a COPY's md5 differed (see the report)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("e2e: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` when the report was written but some run failed.
fn run(args: Args) -> Result<bool> {
    let copy_mb = args.copy_mb.unwrap_or(if args.quick { 256 } else { DEFAULT_COPY_MB }).max(1);
    let settings = Settings {
        reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        copy_mb,
        copy_in_mb: args.copy_in_mb.unwrap_or(copy_mb / 2).max(1),
        duration: args.duration.unwrap_or(if args.quick { 3 } else { DEFAULT_DURATION }).max(1),
        scale: args.scale.max(1),
        contention: args.contention,
    };
    for t in &args.targets {
        if !TARGET_KEYS.contains(&t.as_str()) {
            bail!("unknown target {t:?}; the targets are {}", TARGET_KEYS.join(", "));
        }
    }
    let wanted = |key: &str| key == "direct" || args.targets.is_empty() || args.targets.iter().any(|t| t == key);
    let command = format!(
        "cargo run {}-p sluice-bench --bin e2e --{}",
        if cfg!(debug_assertions) { "" } else { "--release " },
        std::env::args().skip(1).map(|a| format!(" {a}")).collect::<String>()
    );
    progress!("{command}");
    if args.auth {
        let auth =
            auth::AuthSettings { reps: settings.reps, duration: settings.duration, clients: args.clients.max(1) };
        progress!("settings: {auth:?}");
        let path = std::env::temp_dir().join(format!("sluice-e2e-auth-{}-{}", std::process::id(), random_secret(4)));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut workdir = WorkDir { path: path.canonicalize()?, keep: true };
        let outcome = auth::run(&auth, &workdir.path, args.out.as_deref(), &command);
        workdir.keep = args.keep || outcome.is_err();
        return outcome;
    }
    if args.mysql {
        let my = mysql::MysqlSettings {
            reps: settings.reps,
            queries: args.mysql_queries.unwrap_or(if args.quick { 2000 } else { 20_000 }).max(1),
            bulk_mb: args.mysql_mb.unwrap_or(if args.quick { 64 } else { 512 }).max(1),
        };
        progress!("settings: {my:?}");
        let path = std::env::temp_dir().join(format!("sluice-e2e-mysql-{}-{}", std::process::id(), random_secret(4)));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut workdir = WorkDir { path: path.canonicalize()?, keep: true };
        let outcome = mysql::run(&my, &workdir.path, args.out.as_deref(), &command);
        workdir.keep = args.keep || outcome.is_err();
        return outcome;
    }
    progress!("settings: {settings:?}");
    let started_at = time::OffsetDateTime::now_utc();
    let wall = Instant::now();
    let mut notes = Vec::new();

    let tools = Tools::find()?;
    if wanted("pgbouncer") || wanted("haproxy") || wanted("haproxy-splice") {
        ensure_peer_proxies(args.no_install, &mut notes);
    }
    let ticks = clock_ticks();

    let path = std::env::temp_dir().join(format!("sluice-e2e-{}-{}", std::process::id(), random_secret(4)));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut workdir = WorkDir { path: path.canonicalize()?, keep: true };
    let outcome =
        run_in(&args, &settings, &tools, &workdir.path, &mut notes, ticks, &wanted, &command, started_at, wall);
    workdir.keep = args.keep || outcome.is_err();
    outcome
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    args: &Args,
    s: &Settings,
    tools: &Tools,
    dir: &Path,
    notes: &mut Vec<String>,
    ticks: f64,
    wanted: &dyn Fn(&str) -> bool,
    command: &str,
    started_at: time::OffsetDateTime,
    wall: Instant,
) -> Result<bool> {
    let load_at_start = loadavg();
    progress!("load average: {load_at_start}");
    progress!("starting the Sluice stack in {}", dir.display());
    // With `sluice-nobpf` wanted (and as root), the first stack starts in a cgroup of its own: its
    // dataplane attaches the counters to the cgroup it runs in, which must not hold the second.
    let cgroups = (wanted("sluice-nobpf") && !args.no_dataplane && nix::unistd::geteuid().is_root())
        .then(|| bench_cgroups().map(CgroupGuard))
        .transpose()
        .unwrap_or_else(|e| {
            notes.push(format!("No dedicated cgroups ({e:#}): both Sluice targets share the eBPF programs' cgroup."));
            None
        });
    if let Some(cg) = &cgroups {
        enter_cgroup(&cg.0 .0)?;
    }
    // PostgreSQL serves TLS with a certificate from Sluice's database CA (signed before control
    // first starts, for the data directory it will use) beside plain TCP, so the TLS and the
    // plain targets all reach the same server.
    let stack_dir = dir.join("stack");
    std::fs::create_dir_all(&stack_dir)?;
    let db_tls = sign_db_tls(&stack_dir.canonicalize()?, &dir.join("db-tls"))?;
    let pg_opts = PgOpts {
        tls: Some((db_tls.cert.clone(), db_tls.key.clone())),
        client_ca: Some(db_tls.client_ca.clone()),
        hba: Some(bench_hba()),
        ..Default::default()
    };
    let dataplane_args: &[&str] = &[];
    let stack = Stack::start_custom(
        &stack_dir,
        &AwsCreds::demo(),
        (!args.no_dataplane).then_some(dataplane_args),
        pg_opts,
        |pg| direct_databases(pg.port),
    )
    .context("starting the Sluice stack")?;
    check_interrupted()?;
    let pg = &stack.postgres;
    let emu = &stack.emulator;
    let control = &stack.control;
    match stack.dataplane.as_ref().map(|d| d.proc.pid()) {
        Some(pid) => notes.push(format!(
            "Sluice ran with a dataplane process (pid {pid}); sessions are handed to it after the handshake."
        )),
        None => notes.push("Run with --no-dataplane: control relayed the sessions itself (userspace copy).".to_owned()),
    }
    for user in [CERT_DB_USER, PLAIN_DB_USER] {
        pg.psql("postgres", &format!("CREATE ROLE {user} LOGIN IN ROLE alice"))?;
    }
    let mut envs = sluice_client_envs(&stack.control, dir, &[("demo", "alice"), (CERT_SERVICE, CERT_DB_USER)])
        .context("logging alice in with the sluice CLI")?;
    let sluice_cert_env = envs.pop().ok_or_else(|| anyhow!("no environment for {CERT_SERVICE}"))?;
    let sluice_env = envs.pop().ok_or_else(|| anyhow!("no environment for demo"))?;
    match std::fs::read_to_string(stack.dir.join("dataplane").join("dataplane.log")) {
        Ok(log) if log.contains("source=\"bpf\"") || log.contains("source=bpf") => {
            notes.push("The `sluice` dataplane counted sessions with its eBPF programs (cgroup_skb).".to_owned())
        }
        Ok(_) => notes.push("The `sluice` dataplane counted sessions in userspace (BPF did not load).".to_owned()),
        Err(_) => {}
    }
    // `sluice-nobpf`: a second control + dataplane (counters forced to userspace) in their own
    // cgroup, so no eBPF program runs on their sockets, beside the first stack whose processes
    // sit in the cgroup its dataplane attached the programs to. The emulator and PostgreSQL are
    // shared (and in the first cgroup), so both targets pay the same for those hops.
    let nobpf = if wanted("sluice-nobpf") && !args.no_dataplane {
        let d = dir.join("nobpf");
        if let Some(cg) = &cgroups {
            enter_cgroup(&cg.0 .1)?;
        }
        let dp = DataplaneProc::start_with_args(&d.join("dataplane"), &["--counters", "userspace"])?;
        let db = demo::demo_database("demo", emu, &[("env", "dev")]);
        let c = ControlProc::start(&d.join("control"), vec![db], &AwsCreds::demo(), Some(dp.socket.clone()))?;
        let log = d.join("control").join("control.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("connected to the dataplane") {
            if Instant::now() > deadline {
                bail!("the sluice-nobpf control did not connect to its dataplane; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let env = sluice_client_env(&c, &d).context("logging alice in to the sluice-nobpf control")?;
        Some((dp, c, env))
    } else {
        None
    };

    let direct_env: Vec<(String, String)> = vec![
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), pg.port.to_string()),
        ("PGUSER".into(), "alice".into()),
        ("PGDATABASE".into(), "demo".into()),
        ("PGPASSWORD".into(), stack.db_password.clone()),
        ("PGSSLMODE".into(), "disable".into()),
    ];
    let creds = Credentials::new(demo::DEMO_ACCESS_KEY, demo::DEMO_SECRET_KEY, None, None, "sluice-bench");

    // pgbench's tables, once, as alice (who owns database demo), straight to PostgreSQL.
    progress!("pgbench -i -s {} (as alice, direct)", s.scale);
    let direct_probe = Target {
        key: "direct",
        description: String::new(),
        env: direct_env.clone(),
        token: None,
        cpu: Vec::new(),
        own: 0,
        upstream_tls: false,
    };
    let mut init = client_cmd(&tools.pgbench, &direct_probe, &creds)?;
    init.args(["-i", "-q", "-s", &s.scale.to_string()]);
    run_ok(&mut init, Duration::from_secs(600)).context("pgbench -i")?;

    // The peer proxies; a failure to start one is a note, not the end of the run.
    let mut peers: Vec<Proc> = Vec::new();
    let mut targets = vec![Target {
        key: "direct",
        description: format!("PostgreSQL on 127.0.0.1:{} (TCP, SCRAM, no TLS)", pg.port),
        env: direct_env.clone(),
        token: None,
        cpu: Vec::new(),
        own: 0,
        upstream_tls: false,
    }];
    // Control (and the dataplane) are the proxy under test; the emulator behind them is listed last.
    let sluice_cpu = |emulator: &demo::Emulator| {
        let mut cpu = vec![CpuGroup { name: "control".into(), pids: vec![control.proc.pid()] }];
        if let Some(dp) = stack.dataplane.as_ref().map(|d| d.proc.pid()) {
            cpu.push(CpuGroup { name: "dataplane".into(), pids: vec![dp] });
        }
        let own = cpu.len();
        cpu.push(CpuGroup { name: "emulator".into(), pids: vec![emulator.proc.pid()] });
        (cpu, own)
    };
    // The same-legs Sluice targets go to PostgreSQL itself: control and the dataplane are all
    // there is to measure.
    let sluice_own_cpu = || {
        let mut cpu = vec![CpuGroup { name: "control".into(), pids: vec![control.proc.pid()] }];
        if let Some(dp) = stack.dataplane.as_ref().map(|d| d.proc.pid()) {
            cpu.push(CpuGroup { name: "dataplane".into(), pids: vec![dp] });
        }
        let own = cpu.len();
        (cpu, own)
    };
    let via_dataplane = if stack.dataplane.is_some() { "dataplane → " } else { "" };
    let tls_env = |port: u16| -> Vec<(String, String)> {
        let mut env = direct_env.clone();
        for (k, v) in env.iter_mut() {
            match k.as_str() {
                "PGPORT" => *v = port.to_string(),
                "PGSSLMODE" => *v = "require".into(),
                _ => {}
            }
        }
        env
    };
    if wanted("direct-tls") {
        targets.push(Target {
            key: "direct-tls",
            description: format!("PostgreSQL on 127.0.0.1:{} (TCP, TLS `sslmode=require`, SCRAM)", pg.port),
            env: tls_env(pg.port),
            token: None,
            cpu: Vec::new(),
            own: 0,
            upstream_tls: true,
        });
    }
    if wanted("sluice-tls-cert") {
        let (cpu, own) = sluice_own_cpu();
        targets.push(Target {
            key: "sluice-tls-cert",
            description: format!(
                "control on 127.0.0.1:{} (mTLS, Sluice client certificate) → {via_dataplane}PostgreSQL over TLS as {CERT_DB_USER} (`auth: cert`: a client certificate from Sluice's database CA, `hostssl … cert`)",
                control.pg_port
            ),
            env: sluice_cert_env,
            token: None,
            cpu,
            own,
            upstream_tls: true,
        });
    }
    if wanted("sluice-plain") {
        let local = control.config.proxy_service.local_socket.as_ref().context("control serves no local socket")?;
        let (cpu, own) = sluice_own_cpu();
        targets.push(Target {
            key: "sluice-plain",
            description: format!(
                "control's Unix socket for {PLAIN_SERVICE} (plaintext, peer uid → alice) → {}PostgreSQL over plain TCP as {PLAIN_DB_USER} (`tls.mode: disable`; PostgreSQL trusts that user on loopback, so no password is asked)",
                if stack.dataplane.is_some() { "dataplane splicing both legs → " } else { "" }
            ),
            env: vec![
                ("PGHOST".into(), local.dir.join(PLAIN_SERVICE).to_string_lossy().into_owned()),
                ("PGUSER".into(), PLAIN_DB_USER.into()),
                ("PGDATABASE".into(), "demo".into()),
            ],
            token: None,
            cpu,
            own,
            upstream_tls: false,
        });
    }
    if wanted("sluice") {
        let (cpu, own) = sluice_cpu(emu);
        targets.push(Target {
            key: "sluice",
            description: format!(
                "control on 127.0.0.1:{} (mTLS, Sluice client certificate from `sluice db login`) → {}emulator (TLS, IAM token) → PostgreSQL",
                control.pg_port,
                if stack.dataplane.as_ref().map(|d| d.proc.pid()).is_some() { "dataplane → " } else { "" }
            ),
            env: sluice_env,
            token: None,
            cpu,
            own,
            upstream_tls: false,
        });
    }
    if let Some((dp, c, env)) = &nobpf {
        targets.push(Target {
            key: "sluice-nobpf",
            description: format!(
                "as `sluice`, through a second control on 127.0.0.1:{} and dataplane run with `--counters userspace` in a cgroup without the eBPF programs",
                c.pg_port
            ),
            env: env.clone(),
            token: None,
            cpu: vec![
                CpuGroup { name: "control".into(), pids: vec![c.proc.pid()] },
                CpuGroup { name: "dataplane".into(), pids: vec![dp.proc.pid()] },
                CpuGroup { name: "emulator".into(), pids: vec![emu.proc.pid()] },
            ],
            own: 2,
            upstream_tls: false,
        });
    }
    if wanted("sluice-splice") {
        let local = control.config.proxy_service.local_socket.as_ref().context("control serves no local socket")?;
        let (cpu, own) = sluice_cpu(&stack.plain_emulator);
        targets.push(Target {
            key: "sluice-splice",
            description: format!(
                "control's Unix socket for {} (plaintext, peer uid → alice) → {}emulator without TLS (IAM token) → PostgreSQL",
                demo::DEMO_PLAIN_DB,
                if stack.dataplane.is_some() { "dataplane splicing both legs → " } else { "" }
            ),
            env: vec![
                ("PGHOST".into(), local.dir.join(demo::DEMO_PLAIN_DB).to_string_lossy().into_owned()),
                ("PGUSER".into(), "alice".into()),
                ("PGDATABASE".into(), "demo".into()),
            ],
            token: None,
            cpu,
            own,
            upstream_tls: false,
        });
    }
    if wanted("emulator-plain") {
        targets.push(emulator_target("emulator-plain", &stack.plain_emulator));
    }
    if wanted("emulator-only") {
        targets.push(emulator_target("emulator-only", emu));
    }
    let plain_env = |port: u16| -> Vec<(String, String)> {
        let mut env = direct_env.clone();
        for (k, v) in env.iter_mut() {
            if k == "PGPORT" {
                *v = port.to_string();
            }
        }
        env
    };
    if wanted("pgbouncer") && installed("pgbouncer") {
        match start_pgbouncer(&dir.join("pgbouncer"), pg.port, &stack.db_password, None) {
            Ok((proc, port)) => {
                targets.push(Target {
                    key: "pgbouncer",
                    description: format!("pgbouncer on 127.0.0.1:{port} (session pooling, SCRAM, no TLS)"),
                    env: plain_env(port),
                    token: None,
                    cpu: vec![CpuGroup { name: "pgbouncer".into(), pids: vec![proc.pid()] }],
                    own: 1,
                    upstream_tls: false,
                });
                peers.push(proc);
            }
            Err(e) => notes.push(format!("pgbouncer did not start, skipped: {}", short(&format!("{e:#}")))),
        }
    }
    for (key, splice) in [("haproxy", false), ("haproxy-splice", true)] {
        if !(wanted(key) && installed("haproxy")) {
            continue;
        }
        match start_haproxy(&dir.join(key), pg.port, splice, key) {
            Ok((proc, port)) => {
                targets.push(Target {
                    key,
                    description: format!(
                        "haproxy on 127.0.0.1:{port} (mode tcp{}, no TLS)",
                        if splice { ", option splice-auto" } else { "" }
                    ),
                    env: plain_env(port),
                    token: None,
                    cpu: vec![CpuGroup { name: key.into(), pids: vec![proc.pid()] }],
                    own: 1,
                    upstream_tls: false,
                });
                peers.push(proc);
            }
            Err(e) => notes.push(format!("{key} did not start, skipped: {}", short(&format!("{e:#}")))),
        }
    }
    if wanted("pgbouncer-tls") && installed("pgbouncer") {
        let started = demo::LocalCa::new("bench pgbouncer CA")
            .and_then(|ca| ca.issue_server(&["localhost", "127.0.0.1"]))
            .map_err(anyhow::Error::from)
            .and_then(|(cert, key)| {
                start_pgbouncer(&dir.join("pgbouncer-tls"), pg.port, &stack.db_password, Some((&cert, &key)))
            });
        match started {
            Ok((proc, port)) => {
                targets.push(Target {
                    key: "pgbouncer-tls",
                    description: format!(
                        "pgbouncer on 127.0.0.1:{port} (session pooling, SCRAM, TLS required from clients and to PostgreSQL)"
                    ),
                    env: tls_env(port),
                    token: None,
                    cpu: vec![CpuGroup { name: "pgbouncer-tls".into(), pids: vec![proc.pid()] }],
                    own: 1,
                    upstream_tls: true,
                });
                peers.push(proc);
            }
            Err(e) => notes.push(format!("pgbouncer-tls did not start, skipped: {}", short(&format!("{e:#}")))),
        }
    }
    if wanted("haproxy-tls-passthrough") && installed("haproxy") {
        let key = "haproxy-tls-passthrough";
        match start_haproxy(&dir.join(key), pg.port, false, key) {
            Ok((proc, port)) => {
                targets.push(Target {
                    key,
                    description: format!(
                        "haproxy on 127.0.0.1:{port} (mode tcp) passing the clients' TLS (`sslmode=require`) through to PostgreSQL"
                    ),
                    env: tls_env(port),
                    token: None,
                    cpu: vec![CpuGroup { name: key.into(), pids: vec![proc.pid()] }],
                    own: 1,
                    upstream_tls: true,
                });
                peers.push(proc);
            }
            Err(e) => notes.push(format!("{key} did not start, skipped: {}", short(&format!("{e:#}")))),
        }
    }

    // Every target must answer a query before the measurements start.
    let mut checked = Vec::new();
    for t in targets {
        let mut cmd = client_cmd(&tools.psql, &t, &creds)?;
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user, coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false), count(*) from pgbench_branches",
        ]);
        let answer = run_ok(&mut cmd, Duration::from_secs(30)).and_then(|out| {
            // PostgreSQL's end of the session must be what the target claims (TLS or not).
            let tls = out.trim().split('|').nth(1) == Some("t");
            if tls != t.upstream_tls {
                bail!("PostgreSQL's side of the session is {} TLS: {}", if tls { "" } else { "not" }, out.trim());
            }
            Ok(out)
        });
        match answer {
            Ok(out) => {
                progress!("{}: {} → {}", t.key, t.description, out.trim());
                checked.push(t);
            }
            Err(e) if t.key == "direct" || t.key == "sluice" => return Err(e.context(format!("checking {}", t.key))),
            Err(e) => notes.push(format!("{} did not answer a query, skipped: {}", t.key, short(&format!("{e:#}")))),
        }
    }
    let targets = checked;

    // Warm PostgreSQL's caches so the first measured run is not the cold one.
    progress!("warm-up: pgbench -S -c2 -T 3 (direct)");
    let mut warm = client_cmd(&tools.pgbench, &targets[0], &creds)?;
    warm.args(["-n", "-S", "-c2", "-j2", "-T", "3"]);
    run_ok(&mut warm, Duration::from_secs(60)).context("warm-up")?;

    progress!("writing the COPY FROM input (~{} MiB, direct)", s.copy_in_mb);
    let copy_in =
        prepare_copy_in(pg, tools, &targets[0], &creds, dir, s.copy_in_mb).context("preparing the COPY FROM")?;
    let bench = Bench { tools, creds: &creds, pg, copy_in: &copy_in, ticks };

    let workloads = workloads(s);
    let pgbench_runs = workloads.iter().filter(|w| !w.is_copy()).count() as f64;
    // Loopback COPY runs at roughly 120 MiB/s out and 150 MiB/s in on the 2-core VM, plus the
    // emptying and the check of the loaded table.
    let per_copy = s.copy_mb as f64 / 120.0 + 0.3 + s.copy_in_mb as f64 / 150.0 + 0.5;
    let estimate = s.reps as f64 * targets.len() as f64 * (pgbench_runs * (s.duration as f64 + 0.2) + per_copy);
    progress!(
        "measuring: {} reps × {} workloads × {} targets (about {:.0} min)",
        s.reps,
        workloads.len(),
        targets.len(),
        estimate / 60.0
    );

    let mut samples = Vec::new();
    let mut reference_md5: Option<String> = None;
    for rep in 1..=s.reps {
        for &w in &workloads {
            for i in 0..targets.len() {
                check_interrupted()?;
                let t = &targets[(i + rep - 1) % targets.len()];
                let mut x = measure(&bench, t, w, rep, s);
                if let (Some(m), None, Workload::Copy) = (&x.md5, &x.error, w) {
                    if t.key == "direct" && reference_md5.is_none() {
                        reference_md5 = Some(m.clone());
                    }
                }
                match &x.error {
                    Some(e) => progress!("rep {rep} {} {}: FAILED: {}", w.key(), t.key, short(e)),
                    None => {
                        let cpu = x.cpu_s.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join("+");
                        let what = match w {
                            Workload::Copy | Workload::CopyIn => format!(
                                "{:.1} MiB/s ({} bytes in {:.1} s, md5 {})",
                                x.value,
                                x.units,
                                x.wall_s,
                                x.md5.as_deref().unwrap_or("?")
                            ),
                            _ => format!("{} TPS{}", thousands(x.value), opt(x.latency_ms, |l| format!(", {l:.3} ms"))),
                        };
                        progress!(
                            "rep {rep} {} {}: {what}; proxy CPU {} s",
                            w.key(),
                            t.key,
                            if cpu.is_empty() { "–".into() } else { cpu }
                        );
                    }
                }
                if interrupted() {
                    x.error.get_or_insert_with(|| "interrupted".into());
                }
                samples.push(x);
            }
        }
    }
    check_interrupted()?;

    // A COPY whose content differs from direct's is a failure, whatever its speed.
    let mut all_ok = true;
    for x in &mut samples {
        if let (Some(m), Some(r), Workload::Copy) = (&x.md5, &reference_md5, x.workload) {
            if m != r && x.error.is_none() {
                x.error = Some(format!("md5 {m} differs from direct's {r}"));
            }
        }
        if x.error.is_some() {
            all_ok = false;
        }
    }
    if reference_md5.is_none() && samples.iter().any(|x| x.workload == Workload::Copy) {
        notes.push("No direct COPY succeeded, so no md5 reference was available.".into());
        all_ok = false;
    }
    let failed = samples.iter().filter(|x| x.error.is_some()).count();
    if failed > 0 {
        notes.push(format!("{failed} of {} runs failed; see the raw numbers.", samples.len()));
    }

    let mut header = String::from("# Sluice end-to-end benchmark results\n\n");
    header += &format!(
        "Written by `bench/src/bin/e2e.rs` (see `bench/README.md`); regenerate with the command below.\n\n\
         * date: {}\n",
        started_at
            .format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC"))
            .unwrap_or_else(|_| started_at.to_string())
    );
    for (k, v) in machine_info() {
        header += &format!("* {k}: {v}\n");
    }
    header += &format!(
        "* build profile: {}\n* command: `{command}`\n* settings: {} repetition(s), pgbench `-T {}`, COPY ~{} MiB (`{}`), pgbench scale {}\n* total wall time: {:.1} min\n",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        s.reps,
        s.duration,
        s.copy_mb,
        copy_sql(s.copy_mb),
        s.scale,
        wall.elapsed().as_secs_f64() / 60.0,
    );
    header += &format!("* load average (1, 5, 15 min) at the start: {load_at_start}; at the end: {}\n", loadavg());
    header += "\nTargets (all on loopback, one PostgreSQL, database `demo`, user `alice`):\n\n";
    for t in &targets {
        header += &format!("* `{}`: {}\n", t.key, t.description);
    }
    let report =
        Report { settings: s, targets: &targets, samples: &samples, reference_md5, header, notes: notes.clone() };
    let md = report.markdown();
    println!("{}", report.header);
    if !report.notes.is_empty() {
        println!("## Notes from this run\n");
    }
    for n in &report.notes {
        println!("* {n}");
    }
    println!("\n{}", report.tables());
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("bench/RESULTS.md"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    progress!("wrote {}", out.display());
    drop(peers);
    drop(stack);
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_15_output() {
        let out = "pgbench (15.14 (Debian 15.14-0+deb12u1))\ntransaction type: <builtin: select only>\n\
                   scaling factor: 10\nquery mode: simple\nnumber of clients: 1\nnumber of threads: 1\n\
                   maximum number of tries: 1\nduration: 3 s\nnumber of transactions actually processed: 12345\n\
                   number of failed transactions: 0 (0.000%)\nlatency average = 0.243 ms\n\
                   initial connection time = 3.163 ms\ntps = 4115.190420 (without initial connection time)\n";
        let r = parse_pgbench(out).unwrap();
        assert_eq!(r.transactions, 12345);
        assert!((r.tps - 4115.19042).abs() < 1e-6);
        assert_eq!(r.latency_ms, Some(0.243));
        assert!(parse_pgbench("number of failed transactions: 3 (1.0%)\ntps = 1.0\n").is_err());
        assert!(parse_pgbench("nothing").is_err());
    }

    #[test]
    fn medians_and_formatting() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn parses_sluice_db_env() {
        let env = parse_env_exports("export PGHOST=localhost\nexport PGSSLKEY='/a b/k'\nnoise\n").unwrap();
        assert_eq!(env, vec![("PGHOST".into(), "localhost".into()), ("PGSSLKEY".into(), "/a b/k".into())]);
    }

    #[test]
    fn reads_own_cpu_ticks() {
        assert!(proc_ticks(std::process::id()).is_ok());
        assert!(machine_ticks().unwrap() > 0);
    }

    fn target(key: &'static str, own: usize) -> Target {
        let cpu = (0..own).map(|i| CpuGroup { name: format!("p{i}"), pids: vec![] }).collect();
        Target { key, description: String::new(), env: vec![], token: None, cpu, own, upstream_tls: false }
    }

    fn sample(target: &'static str, workload: Workload, value: f64, latency_ms: Option<f64>, cpu: f64) -> Sample {
        Sample {
            rep: 1,
            workload,
            target,
            value,
            latency_ms,
            units: 1000,
            md5: None,
            wall_s: 1.0,
            cpu_s: vec![cpu],
            machine_cpu_s: 2.0,
            error: None,
        }
    }

    #[test]
    fn groups_targets_by_legs_and_reports_added_latency() {
        let s = Settings {
            reps: 1,
            copy_mb: 1,
            copy_in_mb: 1,
            duration: 1,
            scale: 1,
            contention: Some(Contention::SchedIdle),
        };
        assert_eq!(
            workloads(&s),
            [
                Workload::SelectC1,
                Workload::SelectC1Busy,
                Workload::SelectC8,
                Workload::SelectConnect,
                Workload::Copy,
                Workload::CopyIn
            ]
        );
        assert_eq!(same_legs_baseline("sluice-tls-cert"), Some("direct-tls"));
        assert_eq!(same_legs_baseline("haproxy-splice"), Some("direct"));
        assert_eq!(same_legs_baseline("sluice"), None);
        let targets =
            [target("direct", 0), target("direct-tls", 0), target("sluice-tls-cert", 1), target("sluice-plain", 1)];
        let samples = vec![
            sample("direct", Workload::SelectC1, 20_000.0, Some(0.050), 0.0),
            sample("direct-tls", Workload::SelectC1, 10_000.0, Some(0.100), 0.0),
            sample("sluice-tls-cert", Workload::SelectC1, 5_000.0, Some(0.200), 0.0),
            sample("sluice-plain", Workload::SelectC1, 10_000.0, Some(0.070), 0.0),
            sample("direct-tls", Workload::SelectC1Busy, 10_000.0, Some(0.080), 0.0),
            sample("sluice-tls-cert", Workload::SelectC1Busy, 5_000.0, Some(0.130), 0.0),
            sample("sluice-tls-cert", Workload::SelectC8, 5_000.0, None, 0.03),
        ];
        let report = Report {
            settings: &s,
            targets: &targets,
            samples: &samples,
            reference_md5: None,
            header: String::new(),
            notes: vec![],
        };
        let t = report.tables();
        // TLS group: ratios to direct-tls and to direct.
        assert!(t.contains("| sluice-tls-cert | 5,000 | 0.200 | 0.50 | 0.25 |"), "{t}");
        // Plain group: ratio to direct only.
        assert!(t.contains("| sluice-plain | 10,000 | 0.070 | 0.50 | 0 | 1/1 |"), "{t}");
        // 100 µs over direct-tls idle, 50 µs busy; the plain one has no busy run.
        assert!(t.contains("| sluice-tls-cert | direct-tls | 200 | +100 | 130 | +50 |"), "{t}");
        assert!(t.contains("| sluice-plain | direct | 70 | +20 | – | – |"), "{t}");
        // 0.03 CPU-s over 1000 transactions.
        assert!(t.contains("| sluice-tls-cert | p0 | 30 |"), "{t}");
        // No emulator target: no emulator tables.
        assert!(!t.contains("Through the RDS Proxy emulator"), "{t}");
    }
}
