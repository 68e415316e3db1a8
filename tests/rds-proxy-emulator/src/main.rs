//! rds-proxy-emulator: a stand-in for AWS RDS Proxy (PostgreSQL or MySQL, IAM auth and TLS
//! required) for Sluice's tests and demo. This file parses the CLI, prepares TLS, listens, announces readiness
//! on stdout with one `READY <endpoint>` line (the contract with the code that spawns it) and
//! runs until SIGINT or SIGTERM.

#![forbid(unsafe_code)]

mod lookup;
mod mysql;
mod proxy;
mod scram;
mod sigv4;
mod tls;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, info_span, warn, Instrument};
use tracing_subscriber::EnvFilter;

use proxy::ProxyConfig;
use sigv4::{CredentialStore, Credentials};

#[derive(Parser)]
#[command(
    name = "rds-proxy-emulator",
    about = "Emulates AWS RDS Proxy (IAM auth, TLS) in front of a real PostgreSQL or MySQL/MariaDB"
)]
struct Args {
    /// The database engine the proxy fronts.
    #[arg(long, value_enum, default_value_t = Engine::Postgres)]
    engine: Engine,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Proxy name: the first label of the endpoint DNS name.
    #[arg(long, default_value = "sluice-demo", value_parser = dns_label)]
    name: String,
    #[arg(long, default_value = "us-east-1", value_parser = dns_label)]
    region: String,
    /// The 12-character proxy id in `NAME.proxy-ID.REGION.rds.amazonaws.com`.
    #[arg(long, default_value = "abcdefghijkl", value_parser = proxy_id)]
    proxy_id: String,
    /// Port that tokens must name; defaults to the listening port.
    #[arg(long)]
    endpoint_port: Option<u16>,
    /// Where the test CA and server certificate are kept (created if missing).
    #[arg(long)]
    tls_dir: PathBuf,
    /// A file (mode 0600) of secrets, one per line, never on the command line where any local
    /// user could read them in /proc: `credentials AKID:SECRET[:SESSION_TOKEN]` (access keys whose
    /// signatures are accepted) and `secret USER=PASSWORD` (the stored secret used to log in to
    /// the database as USER). Blank lines and lines starting with `#` are ignored.
    #[arg(long)]
    secrets_file: Option<PathBuf>,
    /// Look up unknown access keys here (`GET URL?access_key_id=AKID`, JSON answer): the test AWS
    /// API emulator, so tokens signed with assumed-role credentials can be verified.
    #[arg(long)]
    credentials_url: Option<String>,
    /// The real PostgreSQL server, HOST:PORT (with `--engine postgres`).
    #[arg(long, required_if_eq("engine", "postgres"))]
    postgres: Option<String>,
    /// The real MySQL or MariaDB server, HOST:PORT (with `--engine mysql`).
    #[arg(long, required_if_eq("engine", "mysql"))]
    mysql: Option<String>,
    /// Accept clients without TLS (PostgreSQL: answer SSLRequest with `N`; MySQL: do not offer
    /// CLIENT_SSL): a non-TLS test upstream.
    #[arg(long)]
    plaintext: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    Postgres,
    Mysql,
}

fn dns_label(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then(|| s.to_owned()).ok_or_else(|| "expected lowercase letters, digits and '-'".to_owned())
}

fn proxy_id(s: &str) -> Result<String, String> {
    let ok = s.len() == 12 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then(|| s.to_owned()).ok_or_else(|| "expected 12 characters from [a-z0-9]".to_owned())
}

fn credentials(s: &str) -> Option<(String, Credentials)> {
    let mut parts = s.splitn(3, ':');
    let (akid, secret) = (parts.next()?, parts.next()?);
    (!akid.is_empty() && !secret.is_empty()).then(|| {
        let session_token = parts.next().filter(|t| !t.is_empty()).map(str::to_owned);
        let secret_access_key = secret.to_owned();
        (akid.to_owned(), Credentials { secret_access_key, session_token })
    })
}

fn secret(s: &str) -> Option<(String, String)> {
    let (user, password) = s.split_once('=')?;
    (!user.is_empty()).then(|| (user.to_owned(), password.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Logs usually land in files collected by tests; colour codes would only garble them.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();
    // Installed first so a stop request during startup is not lost.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let mut store = CredentialStore::default();
    let mut secrets = HashMap::new();
    if let Some(path) = &args.secrets_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // Errors name the line, never its (secret) value.
        for (i, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(' ') {
                Some(("credentials", v)) => {
                    let (akid, creds) = credentials(v.trim()).with_context(|| {
                        format!("{} line {i}: expected AKID:SECRET[:SESSION_TOKEN]", path.display())
                    })?;
                    store.insert(akid, creds);
                }
                Some(("secret", v)) => {
                    let (user, password) = secret(v.trim())
                        .with_context(|| format!("{} line {i}: expected USER=PASSWORD", path.display()))?;
                    secrets.insert(user, password);
                }
                _ => anyhow::bail!("{} line {i}: expected `credentials …` or `secret …`", path.display()),
            }
        }
    }
    let endpoint_host = format!("{}.proxy-{}.{}.rds.amazonaws.com", args.name, args.proxy_id, args.region);
    let wildcard = format!("*.proxy-{}.{}.rds.amazonaws.com", args.proxy_id, args.region);
    let tls_config = tls::server_config(&args.tls_dir, &[endpoint_host.clone(), wildcard])
        .with_context(|| format!("preparing TLS in {}", args.tls_dir.display()))?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;

    if store.is_empty() && args.credentials_url.is_none() {
        warn!("no credentials in --secrets-file: every IAM token will be refused");
    }
    let backend = match args.engine {
        Engine::Postgres => args.postgres,
        Engine::Mysql => args.mysql,
    }
    .context("no backend address (--postgres or --mysql)")?;
    let cfg = Arc::new(ProxyConfig {
        endpoint_port: args.endpoint_port.unwrap_or(local.port()),
        endpoint_host: endpoint_host.clone(),
        region: args.region,
        credentials: store,
        credentials_url: args.credentials_url,
        secrets,
        backend,
        tls: tls_config.into(),
        plaintext: args.plaintext,
    });

    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "READY {endpoint_host}").context("writing READY")?;
        stdout.flush().context("flushing READY")?;
    }
    info!(listen = %local, endpoint = %endpoint_host, endpoint_port = cfg.endpoint_port, backend = %cfg.backend, engine = ?args.engine, "ready");

    // Connection ids double as MySQL connection ids in the greeting (what `KILL QUERY` names).
    // There they start far above the backend's thread ids, as RDS Proxy's do, so that a KILL
    // that was not rewritten names no backend thread instead of an unrelated one.
    let mut next_id: u32 = match args.engine {
        Engine::Postgres => 0,
        Engine::Mysql => rand::Rng::gen_range(&mut rand::thread_rng(), 1_000_000..2_000_000),
    };
    let kills = mysql::KillMap::default();
    loop {
        tokio::select! {
            _ = sigint.recv() => break info!("SIGINT received, stopping"),
            _ = sigterm.recv() => break info!("SIGTERM received, stopping"),
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Wrapping past u32::MAX skips 0, which MySQL clients read as "no id".
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    if let Err(e) = tcp.set_nodelay(true) {
                        warn!(error = %e, %peer, "could not set TCP_NODELAY");
                    }
                    let span = info_span!("conn", id = next_id, %peer, user = tracing::field::Empty);
                    match args.engine {
                        Engine::Postgres => tokio::spawn(proxy::handle_connection(tcp, cfg.clone()).instrument(span)),
                        Engine::Mysql => tokio::spawn(
                            mysql::handle_connection(tcp, cfg.clone(), kills.clone(), next_id).instrument(span),
                        ),
                    };
                }
                Err(e) => {
                    // Typically EMFILE; pausing avoids spinning while descriptors are scarce.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    Ok(())
}
