//! The `--mysql` scenario: the MySQL side of Sluice against MariaDB straight and the RDS Proxy
//! emulator's MySQL mode alone, with the stock client tools.
//!
//! It starts the demo stack with its MySQL part ([`Stack::start_demo`]: MariaDB, the emulator in
//! MySQL mode in front of it, control with `proxy_service.mysql_listen_addr` and a data plane),
//! logs alice in with the `sluice` CLI (`sluice db login demo-mysql`, `sluice db config`, whose
//! option file the clients read with `--defaults-extra-file`), and runs, interleaved over
//! repetitions with the target order rotated:
//!
//! * point selects by primary key with `mariadb-slap` at 1 and 8 connections (each client
//!   connects once and runs `--queries` selects): queries per second;
//! * a bulk read: `SELECT` of `--mysql-mb` rows of 1 MiB through `mariadb --quick`, hashed by
//!   `md5sum` (MiB/s; every target's md5 must equal the direct one's).
//!
//! Targets: `direct` (MariaDB over TCP, no TLS: the floor), `emulator-only` (TLS to the emulator
//! with a fresh IAM token, which logs in to MariaDB with the stored secret) and `sluice` (client
//! certificate → control → data plane → emulator → MariaDB). Sluice's own cost is its ratio to
//! `emulator-only`; the proxies' CPU comes from `/proc/PID/stat`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use aws_credential_types::Credentials;
use sluice_control::demo::{self, AwsCreds, Stack};
use sluice_control::iam::{generate_auth_token, TokenTarget};

use super::{
    check_interrupted, clock_ticks, loadavg, machine_info, median, proc_ticks, run_output, thousands, SluiceCli,
};

/// What `--mysql` runs with.
#[derive(Debug, Clone)]
pub(crate) struct MysqlSettings {
    pub reps: usize,
    /// Selects each client runs per point-select run.
    pub queries: u64,
    /// Rows of 1 MiB in the bulk read.
    pub bulk_mb: u64,
}

/// One way to reach the database.
struct Target {
    key: &'static str,
    description: String,
    /// Connection options for `mariadb`/`mariadb-slap` (after `--no-defaults` or
    /// `--defaults-extra-file`, which must come first).
    args: Vec<String>,
    /// A fixed password (MariaDB's own login).
    password: Option<String>,
    /// Mint a fresh IAM token as the password.
    token: Option<TokenTarget>,
    /// Processes whose CPU is the proxy's.
    cpu: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Point1,
    Point8,
    Bulk,
}

const WORK: [Work; 3] = [Work::Point1, Work::Point8, Work::Bulk];

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::Point1 => "point select, 1 connection (queries/s)",
            Work::Point8 => "point select, 8 connections (queries/s)",
            Work::Bulk => "bulk read (MiB/s)",
        }
    }
}

struct Sample {
    work: Work,
    target: &'static str,
    /// Queries/s or MiB/s.
    value: f64,
    /// Proxy CPU seconds per query (point) or per GiB (bulk).
    cpu: Option<f64>,
    md5: Option<String>,
}

const TABLE_ROWS: u64 = 10_000;

/// Runs the scenario; writes the report to `out` (appended) or stdout.
pub(crate) fn run(settings: &MysqlSettings, dir: &Path, out: Option<&Path>, command: &str) -> Result<bool> {
    let load_at_start = loadavg();
    progress!("load average: {load_at_start}");
    let stack = Stack::start_demo(&dir.join("stack"), &AwsCreds::demo()).context("starting the demo stack")?;
    let mysql = stack.mysql.as_ref().ok_or_else(|| anyhow!("MariaDB is not installed (scripts/setup installs it)"))?;
    let db = &mysql.mariadb;
    let client = db.client().to_path_buf();
    let slap = client.with_file_name("mariadb-slap");
    if !slap.exists() {
        bail!("{} is missing (package mariadb-client)", slap.display());
    }
    db.sql(&format!(
        "USE demo; CREATE TABLE point (id INT PRIMARY KEY, k INT NOT NULL, c CHAR(120) NOT NULL); \
         INSERT INTO point SELECT seq, seq * 7 % {TABLE_ROWS}, REPEAT(CHAR(65 + seq % 26), 120) FROM seq_1_to_{TABLE_ROWS}"
    ))?;
    let cnf = sluice_option_file(&stack, dir)?;
    let control_pids: Vec<u32> =
        std::iter::once(stack.control.proc.pid()).chain(stack.dataplane.as_ref().map(|d| d.proc.pid())).collect();
    let emu = &mysql.emulator;
    let targets = [
        Target {
            key: "direct",
            description: format!("MariaDB on 127.0.0.1:{} (TCP, no TLS)", db.port()),
            args: vec![
                "--no-defaults".into(),
                "--protocol=TCP".into(),
                "-h127.0.0.1".into(),
                format!("-P{}", db.port()),
                format!("-u{}", demo::DEMO_USER),
                "--skip-ssl".into(),
            ],
            password: Some(mysql.db_password.clone()),
            token: None,
            cpu: Vec::new(),
        },
        Target {
            key: "emulator-only",
            description: format!(
                "RDS Proxy emulator (MySQL mode) on 127.0.0.1:{} (TLS verified, a fresh IAM token) → MariaDB",
                emu.port
            ),
            args: vec![
                "--no-defaults".into(),
                "--protocol=TCP".into(),
                "-h127.0.0.1".into(),
                format!("-P{}", emu.port),
                format!("-u{}", demo::DEMO_USER),
                "--ssl".into(),
                "--ssl-verify-server-cert".into(),
                format!("--ssl-ca={}", emu.ca_file.display()),
            ],
            password: None,
            token: Some(TokenTarget {
                host: emu.endpoint.clone(),
                port: emu.port,
                user: demo::DEMO_USER.into(),
                region: demo::DEMO_REGION.into(),
            }),
            cpu: vec![emu.proc.pid()],
        },
        Target {
            key: "sluice",
            description: "Sluice: client certificate (`sluice db config` option file) → control → data plane → \
                          emulator → MariaDB"
                .into(),
            args: vec![format!("--defaults-extra-file={}", cnf.display())],
            password: None,
            token: None,
            cpu: control_pids,
        },
    ];
    let creds = Credentials::new(demo::DEMO_ACCESS_KEY, demo::DEMO_SECRET_KEY, None, None, "sluice-bench");
    let ticks = clock_ticks();
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for rep in 0..settings.reps {
        for work in WORK {
            for i in 0..targets.len() {
                check_interrupted()?;
                let t = &targets[(i + rep) % targets.len()];
                let before: u64 = t.cpu.iter().map(|p| proc_ticks(*p).unwrap_or(0)).sum();
                let result = match work {
                    Work::Point1 => point(&slap, t, &creds, 1, settings.queries),
                    Work::Point8 => point(&slap, t, &creds, 8, settings.queries),
                    Work::Bulk => bulk(&client, t, &creds, settings.bulk_mb),
                };
                let after: u64 = t.cpu.iter().map(|p| proc_ticks(*p).unwrap_or(0)).sum();
                let cpu_s = after.saturating_sub(before) as f64 / ticks;
                match result {
                    Ok((value, units, md5)) => {
                        progress!("rep {} {:<40} {:<14} {:>10.1}", rep + 1, work.label(), t.key, value);
                        let cpu = (!t.cpu.is_empty() && units > 0.0).then_some(cpu_s / units);
                        samples.push(Sample { work, target: t.key, value, cpu, md5 });
                    }
                    Err(e) => {
                        progress!("rep {} {} {}: FAILED: {e:#}", rep + 1, work.label(), t.key);
                        failures.push(format!("{} / {}: {e:#}", work.label(), t.key));
                    }
                }
            }
        }
    }
    let report = report(settings, &targets, &samples, &failures, command, &load_at_start);
    match out {
        Some(path) => {
            let mut text = std::fs::read_to_string(path).unwrap_or_default();
            text.push_str(&report);
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            progress!("appended the report to {}", path.display());
        }
        None => println!("{report}"),
    }
    let direct_md5 = samples.iter().find(|s| s.work == Work::Bulk && s.target == "direct").and_then(|s| s.md5.clone());
    let md5_ok = samples.iter().filter(|s| s.work == Work::Bulk).all(|s| s.md5 == direct_md5);
    Ok(failures.is_empty() && md5_ok)
}

/// Logs alice in with the `sluice` CLI and has it write the MySQL option file.
fn sluice_option_file(stack: &Stack, dir: &Path) -> Result<PathBuf> {
    let cli = SluiceCli::login(&stack.control, dir, &[demo::DEMO_USER])?;
    cli.run(&["db", "login", demo::DEMO_MYSQL_DB, "--db-user", demo::DEMO_USER, "--db-name", "demo"])?;
    cli.run(&["db", "config", demo::DEMO_MYSQL_DB])?;
    let cnf = cli.home.join("db").join(format!("{}.cnf", demo::DEMO_MYSQL_DB));
    if !cnf.exists() {
        bail!("`sluice db config` wrote no option file at {}", cnf.display());
    }
    Ok(cnf)
}

/// The target's password or a fresh token, in the environment: never on a command line, where
/// every local user could read it in /proc.
fn with_token(cmd: &mut Command, t: &Target, creds: &Credentials) -> Result<()> {
    if let Some(token) = &t.token {
        cmd.env("MYSQL_PWD", generate_auth_token(creds, token, SystemTime::now())?);
    } else if let Some(password) = &t.password {
        cmd.env("MYSQL_PWD", password);
    }
    Ok(())
}

/// `mariadb-slap` point selects: (queries/s, queries, no md5).
fn point(
    slap: &Path,
    t: &Target,
    creds: &Credentials,
    clients: u32,
    queries: u64,
) -> Result<(f64, f64, Option<String>)> {
    let mut cmd = Command::new(slap);
    cmd.args(&t.args);
    with_token(&mut cmd, t, creds)?;
    cmd.args([
        "--create-schema=demo".to_owned(),
        format!("--concurrency={clients}"),
        "--iterations=1".to_owned(),
        format!("--number-of-queries={}", queries * u64::from(clients)),
        format!("--query=SELECT c FROM point WHERE id = {}", TABLE_ROWS / 2),
    ]);
    let out = run_output(&mut cmd, Duration::from_secs(600))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("mariadb-slap failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    let secs: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Average number of seconds to run all queries:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no timing in mariadb-slap's output: {text}"))?;
    let total = (queries * u64::from(clients)) as f64;
    if secs <= 0.0 {
        bail!("mariadb-slap reported {secs} s");
    }
    Ok((total / secs, total, None))
}

/// The bulk read piped into `md5sum`: (MiB/s, GiB read, md5).
fn bulk(client: &Path, t: &Target, creds: &Credentials, mb: u64) -> Result<(f64, f64, Option<String>)> {
    let mut cmd = Command::new(client);
    cmd.args(&t.args);
    with_token(&mut cmd, t, creds)?;
    cmd.args([
        "-D",
        "demo",
        "--quick",
        "-N",
        "-B",
        "-e",
        &format!("SELECT REPEAT(CHAR(65 + seq % 26), 1048575) FROM seq_1_to_{mb}"),
    ]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut reader = cmd.spawn().context("starting the mariadb client")?;
    let stdout = reader.stdout.take().ok_or_else(|| anyhow!("no client stdout"))?;
    let md5 = Command::new("md5sum").stdin(Stdio::from(stdout)).output().context("running md5sum")?;
    let status = reader.wait().context("waiting for the client")?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = reader.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("the bulk read failed ({status}): {err}");
    }
    let sum = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    Ok((mb as f64 / secs, mb as f64 / 1024.0, Some(sum)))
}

fn report(
    settings: &MysqlSettings,
    targets: &[Target],
    samples: &[Sample],
    failures: &[String],
    command: &str,
    load_at_start: &str,
) -> String {
    let mut r = String::new();
    let when =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    r.push_str(&format!("\n## MySQL: direct MariaDB vs the RDS Proxy emulator vs Sluice ({when})\n\n"));
    r.push_str(&format!(
        "`{command}`: {} repetitions, {} selects per client per run, a bulk read of {} MiB; medians; \
         load average at the start {load_at_start}.\n\n",
        settings.reps, settings.queries, settings.bulk_mb
    ));
    for t in targets {
        r.push_str(&format!("- `{}`: {}\n", t.key, t.description));
    }
    r.push_str("\n| workload | direct | emulator-only | sluice | sluice / direct | sluice / emulator-only | proxy CPU (emulator-only → sluice) |\n");
    r.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    let med =
        |w: Work, t: &str| median(samples.iter().filter(|s| s.work == w && s.target == t).map(|s| s.value).collect());
    let cpu = |w: Work, t: &str| {
        median(samples.iter().filter(|s| s.work == w && s.target == t).filter_map(|s| s.cpu).collect())
    };
    for w in WORK {
        let (d, e, s) = (med(w, "direct"), med(w, "emulator-only"), med(w, "sluice"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let cpu_text = |t: &str| match (w, cpu(w, t)) {
            (Work::Bulk, Some(c)) => format!("{c:.2} s/GiB"),
            (_, Some(c)) => format!("{:.0} µs/query", c * 1e6),
            (_, None) => "–".into(),
        };
        let show = |v: Option<f64>| v.map(thousands).unwrap_or_else(|| "–".into());
        r.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} → {} |\n",
            w.label(),
            show(d),
            show(e),
            show(s),
            ratio(s, d),
            ratio(s, e),
            cpu_text("emulator-only"),
            cpu_text("sluice"),
        ));
    }
    let md5s: Vec<String> = samples
        .iter()
        .filter(|s| s.work == Work::Bulk)
        .map(|s| format!("{}={}", s.target, s.md5.as_deref().unwrap_or("?")))
        .collect();
    r.push_str(&format!("\nBulk-read md5s (all must be equal): {}\n", md5s.join(", ")));
    if !failures.is_empty() {
        r.push_str("\nFailed runs:\n");
        for f in failures {
            r.push_str(&format!("- {f}\n"));
        }
    }
    r.push_str("\nMachine:\n");
    for (k, v) in machine_info() {
        r.push_str(&format!("- {k}: {v}\n"));
    }
    r
}
