//! The `--auth` scenario: how many password logins (`sluice login`) and database certificates
//! (`sluice db login`) per second real control processes answer on loopback, with the auth state
//! in embedded SQLite (one node) and in a shared PostgreSQL (one auth node, then two at once).
//!
//! The clients are tasks of this process that speak the client API directly (one TLS connection
//! per request, as the CLI does), `--clients` of them per auth node, for `--duration` seconds per
//! run. The storage PostgreSQL is a second cluster set up as production should be: TLS with a
//! server certificate from its own CA, `sslmode=verify-full`, the role's password in a 0600 file,
//! that role admitted only over `hostssl`, and the CA key sealed under a KEK file. Runs are
//! interleaved like the data-path matrix (every setup for one operation, then the next operation,
//! then the next round, the setup order rotated each round) and the report gives medians.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sluice_api::api::{call, DbCertResponse, LoginResponse, Request};
use sluice_control::config::{AwsSpec, DatabaseSpec, PostgresStorage, StaticDatabase, StorageConfig};
use sluice_control::demo::{self, AwsCreds, ControlProc};
use sluice_control::kek::KekConfig;
use sluice_control::state::{random_secret, OpenMode, State};

use super::{
    check_interrupted, clock_ticks, interrupted, loadavg, machine_info, machine_ticks, median, proc_ticks, short,
    thousands,
};

/// The database certificates are issued for (control never dials it: issuing a certificate
/// reads the state and signs, nothing more).
const BENCH_DB: &str = "bench";
const BENCH_USER: &str = "alice";

/// What `--auth` runs with.
#[derive(Debug, Clone)]
pub(crate) struct AuthSettings {
    pub reps: usize,
    pub duration: u64,
    pub clients: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Login,
    Issue,
}

const OPS: [Op; 2] = [Op::Login, Op::Issue];

impl Op {
    fn key(self) -> &'static str {
        match self {
            Op::Login => "login",
            Op::Issue => "issue",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The storage PostgreSQL
// ---------------------------------------------------------------------------------------------

/// The second PostgreSQL, holding the auth state (see the module doc for how it is set up):
/// the same setup the integration tests use.
type StorageDb = demo::StoragePostgres;

fn start_storage(dir: &Path) -> Result<StorageDb> {
    demo::StoragePostgres::start(dir).context("starting the storage PostgreSQL")
}

/// The postmaster's pid, from `postmaster.pid`.
fn postmaster_pid(pg: &demo::Postgres) -> Result<u32> {
    let text = std::fs::read_to_string(pg.dir.join("data").join("postmaster.pid")).context("reading postmaster.pid")?;
    text.lines().next().and_then(|l| l.trim().parse().ok()).ok_or_else(|| anyhow!("malformed postmaster.pid"))
}

/// CPU ticks of a PostgreSQL cluster: the postmaster, its reaped children (cutime + cstime, so a
/// backend that exits between two snapshots is still counted) and its live children (the
/// backends, one per pooled connection, and the background workers).
fn cluster_ticks(postmaster: u32) -> Result<u64> {
    let fields = |pid: u32| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        // From field 3 (state) on; the state itself is not a number, so keep a placeholder.
        Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
    };
    let own = fields(postmaster).ok_or_else(|| anyhow!("the storage PostgreSQL (pid {postmaster}) is gone"))?;
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    // Fields 14-17 (utime, stime, cutime, cstime) are at 11-14; field 4 (ppid) at 1.
    let mut total = at(&own, 11) + at(&own, 12) + at(&own, 13) + at(&own, 14);
    for entry in std::fs::read_dir("/proc").context("reading /proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some(f) = fields(pid) {
            if at(&f, 1) == u64::from(postmaster) {
                total += at(&f, 11) + at(&f, 12);
            }
        }
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Auth nodes
// ---------------------------------------------------------------------------------------------

/// The database every node serves (static, labelled env=dev like the demo's).
fn bench_database() -> StaticDatabase {
    StaticDatabase {
        name: BENCH_DB.to_owned(),
        description: "certificates only: nothing connects to it".to_owned(),
        static_labels: [("env".to_owned(), "dev".to_owned())].into_iter().collect(),
        spec: DatabaseSpec {
            protocol: "postgres".into(),
            uri: format!("bench.proxy-{}.{}.rds.amazonaws.com:5432", demo::DEMO_PROXY_ID, demo::DEMO_REGION),
            aws: AwsSpec { region: Some(demo::DEMO_REGION.into()), ..Default::default() },
            tls: Default::default(),
            connect_addr: None,
            auth: Default::default(),
        },
    }
}

/// One auth node as the clients see it.
struct Node {
    name: &'static str,
    control: ControlProc,
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    /// A login session made through this node, for the certificate requests.
    session: String,
}

impl Node {
    fn metrics_statements(&self) -> Result<u64> {
        let addr = self.control.config.metrics.as_ref().map(|m| m.listen_addr).context("no metrics listener")?;
        let text = http_get(addr, "/metrics")?;
        let mut total = 0;
        for line in text.lines().filter(|l| l.starts_with("sluice_state_statements_total")) {
            total += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        }
        Ok(total)
    }
}

/// A plain HTTP/1.0 GET (control's metrics listener), returning the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path} from {addr}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// The TLS client for a node's API: its CA only, and no session resumption (the CLI is a new
/// process per command, so every login pays a full handshake).
fn api_tls(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let base = sluice_api::tls::client_config_for_ca(ca_pem).map_err(|e| anyhow!("{e}"))?;
    let mut cfg = (*base).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Role `dev` and user `alice` (password `password`) in a node's state.
fn add_user(state: &State, password: &str) -> Result<()> {
    state.upsert_role(&demo::dev_role("dev", &["demo"], &[BENCH_USER])?)?;
    state.add_user(BENCH_USER, password, &["dev".to_owned()])?;
    Ok(())
}

/// Logs in through `node` once (its session is used for the certificate runs) and checks one
/// certificate request.
fn warm_up(rt: &tokio::runtime::Runtime, node: &mut Node, password: &str, public_key_pem: &str) -> Result<()> {
    let login = login_request(password);
    let r: LoginResponse = rt
        .block_on(call(&node.addr, "127.0.0.1", node.tls.clone(), &login))
        .with_context(|| format!("logging in through {}", node.name))?;
    node.session = r.session;
    let issue = issue_request(&node.session, public_key_pem);
    let c: DbCertResponse = rt
        .block_on(call(&node.addr, "127.0.0.1", node.tls.clone(), &issue))
        .with_context(|| format!("a certificate from {}", node.name))?;
    if !c.cert_pem.starts_with("-----BEGIN CERTIFICATE-----") {
        bail!("{} answered a certificate request with no certificate", node.name);
    }
    Ok(())
}

fn login_request(password: &str) -> Request {
    Request::Login { user: BENCH_USER.to_owned(), password: password.to_owned() }
}

fn issue_request(session: &str, public_key_pem: &str) -> Request {
    Request::DbLogin {
        session: session.to_owned(),
        db: BENCH_DB.to_owned(),
        db_user: BENCH_USER.to_owned(),
        db_name: "demo".to_owned(),
        public_key_pem: public_key_pem.to_owned(),
    }
}

/// Which nodes a setup drives at once.
struct Setup {
    key: &'static str,
    backend: &'static str,
    /// Indexes into the node list.
    nodes: Vec<usize>,
    note: &'static str,
}

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

/// One node's share of a run.
#[derive(Debug, Clone, Default)]
struct NodeResult {
    node: &'static str,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    control_cpu_s: f64,
    /// State statements (reads + writes) the node ran during the run, from its /metrics.
    statements: Option<u64>,
}

#[derive(Debug, Clone)]
struct AuthSample {
    rep: usize,
    op: Op,
    setup: &'static str,
    nodes: Vec<NodeResult>,
    storage_cpu_s: Option<f64>,
    /// This process: the clients' TLS handshakes and requests.
    clients_cpu_s: f64,
    machine_cpu_s: f64,
    wall_s: f64,
    error: Option<String>,
}

impl AuthSample {
    fn ok_ops(&self) -> u64 {
        self.nodes.iter().map(|n| n.ok).sum()
    }
}

/// What one client task saw.
#[derive(Default)]
struct ClientTally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// One client: requests back to back until the deadline, each checked.
async fn client_loop(
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    req: Request,
    op: Op,
    deadline: Instant,
) -> ClientTally {
    let mut t = ClientTally::default();
    while Instant::now() < deadline && !interrupted() {
        let started = Instant::now();
        let checked = match op {
            Op::Login => call::<LoginResponse>(&addr, "127.0.0.1", tls.clone(), &req)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.user == BENCH_USER && !r.session.is_empty() {
                        Ok(())
                    } else {
                        Err("login answered without a session".into())
                    }
                }),
            Op::Issue => call::<DbCertResponse>(&addr, "127.0.0.1", tls.clone(), &req)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.cert_pem.starts_with("-----BEGIN CERTIFICATE-----") {
                        Ok(())
                    } else {
                        Err("no certificate in the answer".into())
                    }
                }),
        };
        match checked {
            Ok(()) => t.latencies.push(started.elapsed()),
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
        }
    }
    t
}

fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i].as_secs_f64() * 1e3)
}

struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    nodes: &'a [Node],
    password: &'a str,
    public_key_pem: &'a str,
    postmaster: u32,
    ticks: f64,
    s: &'a AuthSettings,
}

/// Drives every node of `setup` at once with `clients` clients each, for the run's duration.
fn measure(cx: &Ctx<'_>, setup: &Setup, op: Op, rep: usize) -> AuthSample {
    let mut sample = AuthSample {
        rep,
        op,
        setup: setup.key,
        nodes: Vec::new(),
        storage_cpu_s: None,
        clients_cpu_s: 0.0,
        machine_cpu_s: 0.0,
        wall_s: 0.0,
        error: None,
    };
    let result = (|| -> Result<()> {
        let nodes: Vec<&Node> = setup.nodes.iter().map(|i| &cx.nodes[*i]).collect();
        let stmts_before: Vec<Option<u64>> = nodes.iter().map(|n| n.metrics_statements().ok()).collect();
        let cpu_before: Vec<u64> = nodes.iter().map(|n| proc_ticks(n.control.proc.pid())).collect::<Result<_>>()?;
        let storage_before = (setup.backend == "postgres").then(|| cluster_ticks(cx.postmaster)).transpose()?;
        let clients_before = proc_ticks(std::process::id())?;
        let machine_before = machine_ticks()?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(cx.s.duration);
        let per_node: Vec<(Vec<ClientTally>, Instant)> = cx.rt.block_on(async {
            let mut joins = Vec::new();
            for n in &nodes {
                let req = match op {
                    Op::Login => login_request(cx.password),
                    Op::Issue => issue_request(&n.session, cx.public_key_pem),
                };
                let tasks: Vec<_> = (0..cx.s.clients)
                    .map(|_| tokio::spawn(client_loop(n.addr.clone(), n.tls.clone(), req.clone(), op, deadline)))
                    .collect();
                joins.push(tasks);
            }
            let mut out = Vec::new();
            for tasks in joins {
                let mut tallies = Vec::new();
                for t in tasks {
                    tallies.push(t.await.unwrap_or_else(|e| ClientTally {
                        errors: 1,
                        first_error: Some(format!("client task: {e}")),
                        ..Default::default()
                    }));
                }
                // Requests in flight at the deadline finish and count, so the rate is over the
                // time until the node's last one ended.
                out.push((tallies, Instant::now()));
            }
            out
        });
        let machine_after = machine_ticks()?;
        let clients_after = proc_ticks(std::process::id())?;
        sample.wall_s = started.elapsed().as_secs_f64();
        check_interrupted()?;
        let storage_after = (setup.backend == "postgres").then(|| cluster_ticks(cx.postmaster)).transpose()?;
        sample.storage_cpu_s = storage_before.zip(storage_after).map(|(b, a)| a.saturating_sub(b) as f64 / cx.ticks);
        sample.clients_cpu_s = clients_after.saturating_sub(clients_before) as f64 / cx.ticks;
        sample.machine_cpu_s = machine_after.saturating_sub(machine_before) as f64 / cx.ticks;
        for (i, (n, (tallies, ended))) in nodes.iter().zip(per_node).enumerate() {
            let mut lat: Vec<Duration> = tallies.iter().flat_map(|t| t.latencies.iter().copied()).collect();
            lat.sort();
            let errors = tallies.iter().map(|t| t.errors).sum();
            let first_error = tallies.iter().find_map(|t| t.first_error.clone());
            let cpu_after = proc_ticks(n.control.proc.pid())?;
            let statements = stmts_before[i].zip(n.metrics_statements().ok()).map(|(b, a)| a.saturating_sub(b));
            sample.nodes.push(NodeResult {
                node: n.name,
                ok: lat.len() as u64,
                errors,
                first_error,
                per_s: lat.len() as f64 / ended.duration_since(started).as_secs_f64(),
                p50_ms: percentile_ms(&lat, 0.50),
                p99_ms: percentile_ms(&lat, 0.99),
                control_cpu_s: cpu_after.saturating_sub(cpu_before[i]) as f64 / cx.ticks,
                statements,
            });
        }
        let errors: u64 = sample.nodes.iter().map(|n| n.errors).sum();
        if errors > 0 {
            let first = sample.nodes.iter().find_map(|n| n.first_error.clone()).unwrap_or_default();
            bail!("{errors} request(s) failed, the first: {first}");
        }
        if sample.ok_ops() == 0 {
            bail!("no request succeeded");
        }
        Ok(())
    })();
    if let Err(e) = result {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

// ---------------------------------------------------------------------------------------------
// The run and its report
// ---------------------------------------------------------------------------------------------

/// Starts the nodes, measures, and writes the report to `out` (when given) and stdout. `Ok(false)`
/// when some run failed (the report is written anyway).
pub(crate) fn run(s: &AuthSettings, dir: &Path, out: Option<&Path>, command: &str) -> Result<bool> {
    let started_at = time::OffsetDateTime::now_utc();
    let wall = Instant::now();
    let load_at_start = loadavg();
    progress!("load average: {load_at_start}");
    let ticks = clock_ticks();
    let creds = AwsCreds::demo();
    let password = format!("pw-{}", random_secret(8));

    // SQLite: one node on its embedded state (the default).
    progress!("starting control on SQLite");
    let sqlite = ControlProc::start_edited(&dir.join("sqlite"), vec![bench_database()], &creds, None, |_| {})?;
    let sqlite_state = sqlite.state()?;
    add_user(&sqlite_state, &password)?;
    let sqlite_ca = sqlite_state.ensure_ca(&sqlite.config.auth_service.cluster_name)?.cert_pem;
    drop(sqlite_state);

    // PostgreSQL: a second cluster over verify-full, the CA key sealed under a KEK file both
    // nodes hold; A starts first (it migrates the schema and creates the CA), then B.
    progress!("starting the storage PostgreSQL (TLS, verify-full) and two auth nodes on it");
    let storage = start_storage(&dir.join("storage"))?;
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).map_err(|e| anyhow!("{e}"))?;
    let pg_storage = StorageConfig::Postgres(PostgresStorage {
        conn_string: storage.conn_string.clone(),
        password_file: Some(storage.password_file.clone()),
        aws_iam: None,
        pool_size: 10,
        kek: KekConfig { file: Some(kek.clone()), aws_kms: None },
        previous_keks: Vec::new(),
    });
    let start_pg_node = |name: &str| {
        let storage = pg_storage.clone();
        ControlProc::start_edited(&dir.join(name), vec![bench_database()], &creds, None, move |c| {
            c.auth_service.storage = storage
        })
        .with_context(|| format!("starting auth node {name} on PostgreSQL"))
    };
    let pg_a = start_pg_node("pg-a")?;
    let pg_b = start_pg_node("pg-b")?;
    // The users go in through an admin connection of this process, as `control users add` would.
    let mut admin_cfg = pg_a.config.clone();
    admin_cfg.data_dir = dir.join("admin");
    let admin = State::open_configured(&admin_cfg, OpenMode::Admin).context("opening the PostgreSQL state")?;
    if admin.backend() != "postgres" {
        bail!("the admin state opened {} instead of PostgreSQL", admin.backend());
    }
    add_user(&admin, &password)?;
    let pg_ca = admin.ensure_ca(&pg_a.config.auth_service.cluster_name)?.cert_pem;
    drop(admin);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let key = rcgen::KeyPair::generate()?;
    let public_key_pem = key.public_key_pem();
    let node = |name: &'static str, control: ControlProc, ca: &str| -> Result<Node> {
        Ok(Node {
            name,
            addr: format!("127.0.0.1:{}", control.api_port),
            control,
            tls: api_tls(ca)?,
            session: String::new(),
        })
    };
    let mut nodes = vec![node("sqlite", sqlite, &sqlite_ca)?, node("pg-a", pg_a, &pg_ca)?, node("pg-b", pg_b, &pg_ca)?];
    for n in &mut nodes {
        warm_up(&rt, n, &password, &public_key_pem)?;
        progress!(
            "{}: control on {} ({}) answers logins and certificate requests",
            n.name,
            n.addr,
            n.control.config.auth_service.storage.kind()
        );
    }
    let setups = [
        Setup { key: "sqlite", backend: "sqlite", nodes: vec![0], note: "one node, embedded SQLite" },
        Setup {
            key: "postgres-1",
            backend: "postgres",
            nodes: vec![1],
            note: "node pg-a driven alone (pg-b up, idle)",
        },
        Setup { key: "postgres-2", backend: "postgres", nodes: vec![1, 2], note: "pg-a and pg-b driven at once" },
    ];
    let cx = Ctx {
        rt: &rt,
        nodes: &nodes,
        password: &password,
        public_key_pem: &public_key_pem,
        postmaster: postmaster_pid(&storage.pg)?,
        ticks,
        s,
    };
    progress!(
        "measuring: {} rounds × {} operations × {} setups × {} s, {} clients per node (about {:.1} min)",
        s.reps,
        OPS.len(),
        setups.len(),
        s.duration,
        s.clients,
        (s.reps * OPS.len() * setups.len()) as f64 * (s.duration as f64 + 0.5) / 60.0
    );
    let mut samples = Vec::new();
    for rep in 1..=s.reps {
        for op in OPS {
            for i in 0..setups.len() {
                check_interrupted()?;
                let setup = &setups[(i + rep - 1) % setups.len()];
                let x = measure(&cx, setup, op, rep);
                let per_node =
                    x.nodes.iter().map(|n| format!("{} {:.1}/s", n.node, n.per_s)).collect::<Vec<_>>().join(", ");
                match &x.error {
                    Some(e) => progress!("round {rep} {} {}: FAILED: {} ({per_node})", op.key(), setup.key, short(e)),
                    None => progress!("round {rep} {} {}: {per_node}", op.key(), setup.key),
                }
                samples.push(x);
            }
        }
    }
    check_interrupted()?;
    let report = AuthReport {
        s,
        setups: &setups,
        samples: &samples,
        header: header(s, command, started_at, wall, &load_at_start, &nodes, &storage),
    };
    let md = report.markdown();
    println!("{md}");
    if let Some(out) = out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
        progress!("wrote {}", out.display());
    }
    Ok(samples.iter().all(|x| x.error.is_none()))
}

fn header(
    s: &AuthSettings,
    command: &str,
    started_at: time::OffsetDateTime,
    wall: Instant,
    load_at_start: &str,
    nodes: &[Node],
    storage: &StorageDb,
) -> String {
    let mut o = String::from("# Sluice auth API rates: logins and certificate issue per auth node\n\n");
    o += &format!(
        "* date: {}\n",
        started_at
            .format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC"))
            .unwrap_or_else(|_| started_at.to_string())
    );
    for (k, v) in machine_info().into_iter().filter(|(k, _)| k != "pgbouncer" && k != "haproxy") {
        o += &format!("* {k}: {v}\n");
    }
    o += &format!(
        "* build profile: {}\n* command: `{command}`\n* settings: {} round(s), {} s per run, {} client(s) per auth node\n* total wall time: {:.1} min\n",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        s.reps,
        s.duration,
        s.clients,
        wall.elapsed().as_secs_f64() / 60.0,
    );
    o += &format!("* load average (1, 5, 15 min) at the start: {load_at_start}; at the end: {}\n", loadavg());
    o += "\nAuth nodes (control processes on loopback; each request is one TLS connection to the client API):\n\n";
    for n in nodes {
        o += &format!(
            "* `{}`: control, API on {}, storage `{}`\n",
            n.name,
            n.addr,
            n.control.config.auth_service.storage.kind()
        );
    }
    o += &format!(
        "* storage PostgreSQL on 127.0.0.1:{} (a second cluster: TLS, `sslmode=verify-full` against its own CA, role `sluice` \
         with a SCRAM password from a 0600 file and `hostssl` only, pool_size 10 per node, CA key sealed under a KEK file)\n",
        storage.pg.port
    );
    o
}

struct AuthReport<'a> {
    s: &'a AuthSettings,
    setups: &'a [Setup],
    samples: &'a [AuthSample],
    header: String,
}

/// A row of the table: one node of a setup, or the sum of its nodes.
#[derive(Clone, Copy)]
enum RowOf {
    Node(usize),
    Sum,
}

impl AuthReport<'_> {
    fn ok(&self, op: Op, setup: &str) -> impl Iterator<Item = &AuthSample> + '_ {
        let setup = setup.to_owned();
        self.samples.iter().filter(move |x| x.op == op && x.setup == setup && x.error.is_none())
    }

    fn node_median(&self, op: Op, setup: &str, row: RowOf, f: impl Fn(&NodeResult) -> Option<f64>) -> Option<f64> {
        median(
            self.ok(op, setup)
                .filter_map(|x| match row {
                    RowOf::Node(i) => x.nodes.get(i).and_then(&f),
                    RowOf::Sum => Some(x.nodes.iter().filter_map(&f).sum()),
                })
                .collect(),
        )
    }

    /// Control CPU ms per operation (for a sum row: all nodes' CPU over all nodes' operations).
    fn cpu_ms(&self, op: Op, setup: &str, row: RowOf) -> Option<f64> {
        median(
            self.ok(op, setup)
                .filter_map(|x| {
                    let (cpu, ops): (f64, u64) = match row {
                        RowOf::Node(i) => x.nodes.get(i).map(|n| (n.control_cpu_s, n.ok))?,
                        RowOf::Sum => (x.nodes.iter().map(|n| n.control_cpu_s).sum(), x.ok_ops()),
                    };
                    (ops > 0).then(|| cpu * 1e3 / ops as f64)
                })
                .collect(),
        )
    }

    fn statements_per_op(&self, op: Op, setup: &str, row: RowOf) -> Option<f64> {
        median(
            self.ok(op, setup)
                .filter_map(|x| {
                    let (st, ops) = match row {
                        RowOf::Node(i) => x.nodes.get(i).map(|n| (n.statements, n.ok))?,
                        RowOf::Sum => (x.nodes.iter().map(|n| n.statements).sum::<Option<u64>>(), x.ok_ops()),
                    };
                    (ops > 0).then(|| st.map(|st| st as f64 / ops as f64)).flatten()
                })
                .collect(),
        )
    }

    fn storage_ms(&self, op: Op, setup: &str) -> Option<f64> {
        median(
            self.ok(op, setup)
                .filter_map(|x| x.storage_cpu_s.filter(|_| x.ok_ops() > 0).map(|c| c * 1e3 / x.ok_ops() as f64))
                .collect(),
        )
    }

    fn table(&self) -> String {
        let mut o = format!(
            "### Rates per auth node ({} clients per node, {} s per run, median of {} rounds)\n\n",
            self.s.clients, self.s.duration, self.s.reps
        );
        o += "| setup | backend | auth nodes driven | node | login/s | login p50 / p99 ms | control CPU ms per login | certificates/s | issue p50 / p99 ms | control CPU ms per certificate | state statements per certificate | storage PostgreSQL CPU ms per certificate | runs ok (login, issue) |\n";
        o += "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        let f1 = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into());
        let f2 = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
        for setup in self.setups {
            let names: Vec<&'static str> = self
                .samples
                .iter()
                .find(|x| x.setup == setup.key && !x.nodes.is_empty())
                .map(|x| x.nodes.iter().map(|n| n.node).collect())
                .unwrap_or_default();
            let mut rows: Vec<(RowOf, String)> =
                names.iter().enumerate().map(|(i, n)| (RowOf::Node(i), format!("`{n}`"))).collect();
            if names.len() > 1 {
                rows.push((RowOf::Sum, "**all (sum)**".into()));
            }
            for (row, label) in rows {
                let rate = |op| {
                    let v = self.node_median(op, setup.key, row, |n| Some(n.per_s));
                    match (v, row) {
                        (Some(x), RowOf::Sum) => format!("**{}**", thousands_or_1(x)),
                        (Some(x), _) => thousands_or_1(x),
                        (None, _) => "–".into(),
                    }
                };
                let lat = |op| match row {
                    RowOf::Node(_) => format!(
                        "{} / {}",
                        f1(self.node_median(op, setup.key, row, |n| n.p50_ms)),
                        f1(self.node_median(op, setup.key, row, |n| n.p99_ms))
                    ),
                    RowOf::Sum => String::new(),
                };
                let storage = match (setup.backend, row, names.len()) {
                    ("postgres", RowOf::Sum, _) | ("postgres", RowOf::Node(_), 1) => {
                        f2(self.storage_ms(Op::Issue, setup.key))
                    }
                    ("postgres", _, _) => String::new(),
                    _ => "–".into(),
                };
                let runs = |op| {
                    format!(
                        "{}/{}",
                        self.ok(op, setup.key).count(),
                        self.samples.iter().filter(|x| x.op == op && x.setup == setup.key).count()
                    )
                };
                o += &format!(
                    "| {} | {} | {} | {label} | {} | {} | {} | {} | {} | {} | {} | {storage} | {}, {} |\n",
                    setup.key,
                    setup.backend,
                    setup.nodes.len(),
                    rate(Op::Login),
                    lat(Op::Login),
                    f1(self.cpu_ms(Op::Login, setup.key, row)),
                    rate(Op::Issue),
                    lat(Op::Issue),
                    f2(self.cpu_ms(Op::Issue, setup.key, row)),
                    f1(self.statements_per_op(Op::Issue, setup.key, row)),
                    runs(Op::Login),
                    runs(Op::Issue),
                );
            }
        }
        o += "\nSetups: ";
        o += &self.setups.iter().map(|s| format!("`{}`: {}", s.key, s.note)).collect::<Vec<_>>().join("; ");
        o += ".\n";
        o
    }

    fn raw(&self) -> String {
        let mut o = String::from(
            "| round | op | setup | node | ok | errors | per s | p50 ms | p99 ms | control CPU s | statements | storage PG CPU s | clients CPU s | machine CPU s | wall s | error |\n\
             |---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        let opt = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into());
        for x in self.samples {
            if x.nodes.is_empty() {
                o += &format!(
                    "| {} | {} | {} | – | 0 | – | – | – | – | – | – | – | {:.2} | {:.2} | {:.1} | {} |\n",
                    x.rep,
                    x.op.key(),
                    x.setup,
                    x.clients_cpu_s,
                    x.machine_cpu_s,
                    x.wall_s,
                    x.error.as_deref().map(|e| short(e).replace('|', "/")).unwrap_or_default()
                );
            }
            for (i, n) in x.nodes.iter().enumerate() {
                let shared = |v: String| if i == 0 { v } else { String::new() };
                o += &format!(
                    "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
                    x.rep,
                    x.op.key(),
                    x.setup,
                    n.node,
                    n.ok,
                    n.errors,
                    n.per_s,
                    opt(n.p50_ms, 2),
                    opt(n.p99_ms, 2),
                    n.control_cpu_s,
                    n.statements.map(|v| v.to_string()).unwrap_or_else(|| "–".into()),
                    shared(opt(x.storage_cpu_s, 2)),
                    shared(format!("{:.2}", x.clients_cpu_s)),
                    shared(format!("{:.2}", x.machine_cpu_s)),
                    shared(format!("{:.1}", x.wall_s)),
                    shared(x.error.as_deref().map(|e| short(e).replace('|', "/")).unwrap_or_default()),
                );
            }
        }
        o
    }

    fn markdown(&self) -> String {
        let mut o = self.header.clone();
        o += "\n## Results (medians)\n\n";
        o += &self.table();
        o += "\n## How to read this\n\n\
              * `login` is the client API's password login (`sluice login`): the user's Argon2id hash is checked \
              (default parameters: 19 MiB, 2 passes) and a login session row written. Each node hashes one password at \
              a time (a semaphore, so a burst of logins cannot take every core from the handshakes), so login/s per node \
              is bounded by one core's Argon2 rate whatever the backend.\n\
              * `certificates` is `sluice db login` with an existing login session: the session, the user, their roles \
              and the databases are read from the state, access is checked and a client certificate signed. On \
              PostgreSQL each statement is a round trip over TLS on a pooled connection, which is the difference \
              between the backends here; `state statements per certificate` is read from each node's \
              `sluice_state_statements_total` (so it includes the node's background work during the run).\n\
              * Every request is a new TLS connection with a full handshake (no resumption), as the CLI makes one; \
              the clients are tasks of the harness on the same cores as control and PostgreSQL. The client's key pair \
              is generated once (the CLI makes one per `db login`: its cost is the client's).\n\
              * With two nodes driven at once the nodes share the machine's cores (and PostgreSQL's), so the sum, not \
              each node, shows whether a second node adds capacity here.\n";
        o += "\n## Raw numbers (every run)\n\n";
        o += &self.raw();
        o
    }
}

/// Rates below 100 keep a decimal.
fn thousands_or_1(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        thousands(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&v, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&v[..1], 0.99), Some(1.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn counts_own_process_tree() {
        // This process has no children here, but its own ticks are read like a postmaster's.
        assert!(cluster_ticks(std::process::id()).is_ok());
        assert!(cluster_ticks(u32::MAX).is_err());
    }
}
