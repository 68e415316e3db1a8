//! One full connection setup through control, in-process: a client's TLS handshake with a
//! client certificate, the startup exchange, RBAC, control's own TLS login to a real PostgreSQL
//! with an `auth: cert` client certificate, ReadyForQuery, and the close. No data plane: control
//! relays. A second case (`denied`) stops after the client's TLS, identity and policy decision
//! (a route the role does not allow), which separates the client leg's cost from the upstream's.
//!
//! Control's proxy runs on its own multi-thread tokio runtime (threads named `control`, as in
//! `control start`); the client runs on the main thread. Under callgrind with
//! `--separate-threads=yes` the client's instructions and control's are in separate files
//! (see bench/README.md). `HANDSHAKES=N` skips criterion and runs N handshakes (after one
//! warm-up) for callgrind or perf; `HANDSHAKE_CASE=denied` picks the other case.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::ClientConfig;
use sluice_control::audit::AuditLog;
use sluice_control::config::{Config, DatabaseSpec, DbService, ProxyService, StaticDatabase, UpstreamAuth};
use sluice_control::demo::{dev_role, PgOpts, Postgres};
use sluice_control::iam::TokenMinter;
use sluice_control::policy::PolicyStore;
use sluice_control::proxy::{self, ProxyContext};
use sluice_control::state::{OpenMode, State};
use sluice_control::tls;
use sluice_tests::{client_config_from_pem, route_identity, ClientCert};
use time::OffsetDateTime;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// PostgreSQL behind control, and what a client needs to connect.
struct Stack {
    port: u16,
    /// Alice's certificate for app_user (allowed) and for ghost2 (not in her role).
    allowed: ClientConfig,
    denied: ClientConfig,
    _postgres: Postgres,
    _control: tokio::runtime::Runtime,
    dir: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> anyhow::Result<Stack> {
    let dir = std::env::temp_dir().join(format!("sluice-bench-handshake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let mut cfg = Config {
        data_dir: dir.join("data"),
        auth_service: Default::default(),
        proxy_service: ProxyService {
            postgres_listen_addr: ([127, 0, 0, 1], port).into(),
            postgres_public_addr: Some(format!("localhost:{port}")),
            ..Default::default()
        },
        db_service: DbService::default(),
        discovery_service: Default::default(),
        audit: Default::default(),
        dataplane: None,
        metrics: None,
        join: None,
    };
    let state = Arc::new(State::open_configured(&cfg, OpenMode::Serve)?);
    let ca = Arc::new(state.ensure_ca(&cfg.auth_service.cluster_name)?);
    let db_ca = ca.derive_db_ca()?;

    // PostgreSQL with `auth sign --format=db`'s files: TLS, and only `hostssl … cert` over TCP.
    let (crt, key) =
        db_ca.issue_server_pem(&["localhost".to_owned(), "127.0.0.1".to_owned()], Duration::from_secs(86400))?;
    let (crt_file, key_file, cas_file) = (dir.join("db.crt"), dir.join("db.key"), dir.join("db.cas"));
    std::fs::write(&crt_file, crt)?;
    std::fs::write(&key_file, key)?;
    std::fs::write(&cas_file, &db_ca.cert_pem)?;
    let postgres = Postgres::start_opts(
        &dir.join("pg"),
        PgOpts {
            tls: Some((crt_file, key_file)),
            client_ca: Some(cas_file),
            hba: Some("local all all trust\nhostssl all all 127.0.0.1/32 cert\n".into()),
            // Connections close faster than backends exit under a fast loop.
            max_connections: Some(200),
        },
    )?;
    postgres.psql("postgres", "CREATE ROLE app_user LOGIN")?;
    postgres.psql("postgres", "CREATE DATABASE appdb OWNER app_user")?;

    cfg.db_service.databases = vec![StaticDatabase {
        name: "selfhosted".into(),
        description: String::new(),
        static_labels: [("env".to_owned(), "dev".to_owned())].into_iter().collect(),
        spec: DatabaseSpec {
            protocol: "postgres".into(),
            uri: format!("localhost:{}", postgres.port),
            aws: Default::default(),
            tls: Default::default(),
            connect_addr: Some(format!("127.0.0.1:{}", postgres.port)),
            auth: UpstreamAuth::Cert,
        },
    }];
    state.upsert_role(&dev_role("dev", &["appdb"], &["app_user"])?)?;
    state.add_user("alice", "pw-unused-here", &["dev".to_owned()])?;

    // As daemon.rs builds the auth server's proxy.
    let cfg = Arc::new(cfg);
    let (chain, server_key) =
        ca.issue_server(&sluice_control::daemon::server_names(&cfg), Duration::from_secs(86400))?;
    let cert = tls::ReloadableCert::new(chain, server_key)?;
    let pg_tls = tls::postgres_server_config(&ca.cert_der, cert)?;
    let audit = Arc::new(AuditLog::for_state(state.clone(), cfg.audit_json_file())?);
    let policy = Arc::new(PolicyStore::open(cfg.clone(), state.clone())?);
    let ctx = Arc::new(
        ProxyContext::new(cfg.clone(), state, policy, audit, Arc::new(TokenMinter::new()), pg_tls)
            .with_upstream_ca(Arc::new(db_ca)),
    );
    let control = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("control").build()?;
    {
        let _guard = control.enter();
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        control.spawn(proxy::serve(ctx, listener));
    }

    let client = |db_user: &str| -> anyhow::Result<ClientConfig> {
        let key = rcgen::KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let cert_pem = ca.issue_client(
            &route_identity("alice", "selfhosted", db_user, "appdb"),
            &key.public_key_pem(),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(24),
        )?;
        let mut tls =
            client_config_from_pem(&ca.cert_pem, Some(&ClientCert { cert_pem, key_pem: key.serialize_pem() }))?;
        // psql (libpq) keeps no TLS sessions between processes: every handshake is a full one.
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(tls)
    };
    Ok(Stack {
        port,
        allowed: client("app_user")?,
        denied: client("ghost2")?,
        _postgres: postgres,
        _control: control,
        dir,
    })
}

fn pg_config(port: u16, user: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(port)
        .user(user)
        .dbname("appdb")
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(20));
    cfg
}

/// One session set up to ReadyForQuery and closed (Terminate, then the connection's end).
async fn session(pg: &tokio_postgres::Config, tls: &MakeRustlsConnect) {
    let (client, conn) = match pg.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => panic!("connecting through control: {e}"),
    };
    drop(client);
    if let Err(e) = conn.await {
        panic!("closing: {e}");
    }
}

/// A session the policy refuses: control answers after the client's TLS handshake, identity
/// and policy decision, without an upstream.
async fn refused(pg: &tokio_postgres::Config, tls: &MakeRustlsConnect) {
    match pg.connect(tls.clone()).await {
        Ok(_) => panic!("a route outside the role was let in"),
        Err(e) if e.as_db_error().is_some() => {}
        Err(e) => panic!("not control's refusal: {e}"),
    }
}

/// Linux's USER_HZ: what /proc's utime and stime count in.
const CLK_TCK: f64 = 100.0;

/// utime + stime from a /proc stat file (fields 14 and 15, counted after the command's closing
/// parenthesis, since the command may hold spaces).
fn cpu_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // After the ')' field 3 (state) is index 0, so utime (14) is index 11 and stime (15) 12.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn handshake(c: &mut Criterion) {
    let stack = match start() {
        Ok(s) => s,
        Err(e) => panic!("starting PostgreSQL and control: {e:#}"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("client runtime: {e}"),
    };
    let (allowed, denied) =
        (MakeRustlsConnect::new(stack.allowed.clone()), MakeRustlsConnect::new(stack.denied.clone()));
    let (pg_allowed, pg_denied) = (pg_config(stack.port, "app_user"), pg_config(stack.port, "ghost2"));

    if let Ok(n) = std::env::var("HANDSHAKES") {
        let n: u32 = n.parse().unwrap_or_else(|_| panic!("HANDSHAKES={n}: not a number"));
        let denied_case = std::env::var("HANDSHAKE_CASE").is_ok_and(|c| c == "denied");
        let one = || async {
            if denied_case {
                refused(&pg_denied, &denied).await
            } else {
                session(&pg_allowed, &allowed).await
            }
        };
        rt.block_on(one());
        let (t, process0, client0) =
            (Instant::now(), cpu_ticks("/proc/self/stat"), cpu_ticks("/proc/thread-self/stat"));
        for _ in 0..n {
            rt.block_on(one());
        }
        let took = t.elapsed();
        // Everything but this (the client's) thread is control's: its runtime, the audit
        // writer, blocking-pool threads.
        let control = (cpu_ticks("/proc/self/stat") - process0) - (cpu_ticks("/proc/thread-self/stat") - client0);
        let per = |x: f64| x * 1e6 / f64::from(n.max(1));
        println!(
            "{} handshakes ({}) in {:?}: {:.0} µs wall each; control CPU {:.0} µs each (utime+stime of its threads, {} Hz ticks)",
            n,
            if denied_case { "denied" } else { "full" },
            took,
            per(took.as_secs_f64()),
            per(control as f64 / CLK_TCK),
            CLK_TCK
        );
        return;
    }

    let mut g = c.benchmark_group("handshake");
    // A full setup takes ~10 ms (PostgreSQL forks a backend for each).
    g.sample_size(20).measurement_time(Duration::from_secs(15));
    g.bench_function("full_cert_upstream", |b| b.iter(|| rt.block_on(session(&pg_allowed, &allowed))));
    g.sample_size(50).measurement_time(Duration::from_secs(10));
    g.bench_function("denied_no_upstream", |b| b.iter(|| rt.block_on(refused(&pg_denied, &denied))));
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
