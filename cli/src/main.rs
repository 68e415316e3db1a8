//! `sluice`: the user CLI, modelled on `tsh`. `login` authenticates against control's API and keeps
//! a profile under `$SLUICE_HOME` (default `~/.sluice`); `db login` fetches a short-lived client
//! certificate for one database route over a key pair generated here; `db env`/`db config`/
//! `db connect` hand those files to stock libpq tools, or for a MySQL database to the `mariadb` or
//! `mysql` client (through an option file); `proxy db --tunnel` serves them to PostgreSQL clients
//! that cannot use a certificate. `aws rds-token` prints an RDS IAM token.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use sluice_api::addr::split_host_port;
use sluice_api::api::{self, DbCertResponse, DbInfo, LoginResponse, Request};
use sluice_api::iam::{generate_auth_token, CredentialSource, TokenMinter, TokenTarget};
use sluice_api::private_fs;

mod mysql;
mod tunnel;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice client: log in and connect to databases through Sluice")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log in to a Sluice control (password from $SLUICE_PASSWORD or a prompt).
    Login {
        /// control's API address, HOST:PORT.
        #[arg(long)]
        proxy: String,
        #[arg(long)]
        user: String,
        /// PEM file of the cluster CA (first login; `control status` shows its pin).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// End the login session and remove all credentials.
    Logout,
    /// Show the current login.
    Status,
    #[command(subcommand)]
    Db(DbCmd),
    /// Local proxies for clients that cannot present a certificate.
    #[command(subcommand)]
    Proxy(ProxyCmd),
    #[command(subcommand)]
    Aws(AwsCmd),
}

#[derive(Subcommand)]
enum ProxyCmd {
    /// A local plaintext listener (127.0.0.1, no password) that opens sessions to a database
    /// through Sluice with your certificate, for GUI tools and drivers (`sluice db login` first).
    Db {
        name: String,
        /// Required: the tunnel mode is the only one (as `tsh proxy db --tunnel`).
        #[arg(long)]
        tunnel: bool,
        /// Port on 127.0.0.1 (default: any free one, printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Listen on this Unix socket (0600) instead of TCP.
        #[arg(long, conflicts_with = "port")]
        socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// List the databases you can access.
    Ls {
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Fetch a certificate for a database route.
    Login {
        name: String,
        #[arg(long)]
        db_user: String,
        #[arg(long, default_value = "")]
        db_name: String,
    },
    /// Remove a database's certificate.
    Logout { name: String },
    /// Print `export PG...` lines for libpq tools (for MySQL: host, port and the option file).
    Env { name: String },
    /// Print connection details (files, host, a libpq connection string; for MySQL the client's
    /// options, and an option file for `--defaults-extra-file`).
    Config { name: String },
    /// Run psql (or for MySQL the mariadb or mysql client) against the database (logs in to it
    /// first when --db-user is given).
    Connect {
        name: String,
        #[arg(long)]
        db_user: Option<String>,
        #[arg(long)]
        db_name: Option<String>,
        /// Extra arguments for psql (or the MySQL client), after `--`.
        #[arg(last = true)]
        psql_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AwsCmd {
    /// Print an RDS IAM auth token, like `aws rds generate-db-auth-token`.
    RdsToken {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 5432)]
        port: u16,
        #[arg(long)]
        user: String,
        #[arg(long, env = "AWS_REGION")]
        region: String,
        /// Assume this role first (credentials from the standard chain).
        #[arg(long)]
        assume_role_arn: Option<String>,
        #[arg(long)]
        external_id: Option<String>,
    },
}

/// What `sluice login` remembers.
#[derive(Debug, Serialize, Deserialize)]
struct Profile {
    proxy: String,
    user: String,
    session: String,
    expires: String,
    cluster: String,
    postgres_public_addr: String,
    /// Control's MySQL address; none without a MySQL listener (or from servers before MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mysql_public_addr: Option<String>,
}

/// The route a database certificate was issued for.
#[derive(Debug, Serialize, Deserialize)]
struct DbProfile {
    db_user: String,
    db_name: String,
    expires: String,
    /// Where the database was served when the certificate was issued: used when the auth
    /// server cannot be asked for where it is served now.
    #[serde(default)]
    endpoints: Vec<String>,
    /// `postgres` or `mysql`; empty from CLIs before MySQL (PostgreSQL then).
    #[serde(default)]
    protocol: String,
}

impl DbProfile {
    fn is_mysql(&self) -> bool {
        self.protocol == PROTOCOL_MYSQL
    }
}

/// [`DbInfo::protocol`] of MySQL and MariaDB databases.
const PROTOCOL_MYSQL: &str = "mysql";

fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("SLUICE_HOME") {
        return Ok(PathBuf::from(h));
    }
    let h = std::env::var_os("HOME").ok_or_else(|| anyhow!("neither SLUICE_HOME nor HOME is set"))?;
    Ok(PathBuf::from(h).join(".sluice"))
}

/// Every credential file is 0600 (libpq refuses a private key readable by others) in 0700
/// directories under the home, which is 0700 itself (tightened if an older CLI left it looser).
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let home = home()?;
    private_fs::private_dir(&home).with_context(|| format!("creating {}", home.display()))?;
    if let Some(dir) = path.parent() {
        private_fs::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    private_fs::write_private(path, contents).with_context(|| format!("writing {}", path.display()))
}

#[derive(Clone)]
struct Paths {
    home: PathBuf,
}

impl Paths {
    fn profile(&self) -> PathBuf {
        self.home.join("profile.json")
    }
    fn ca(&self) -> PathBuf {
        self.home.join("ca.pem")
    }
    fn db_dir(&self) -> PathBuf {
        self.home.join("db")
    }
    fn db_file(&self, name: &str, ext: &str) -> PathBuf {
        self.db_dir().join(format!("{name}.{ext}"))
    }
}

fn load_profile(p: &Paths) -> Result<Profile> {
    let text = std::fs::read_to_string(p.profile())
        .map_err(|_| anyhow!("not logged in: run `sluice login --proxy HOST:PORT --user NAME`"))?;
    Ok(serde_json::from_str(&text)?)
}

fn tls_for(p: &Paths) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read_to_string(p.ca()).context("reading the cluster CA; log in again with --ca-file")?;
    Ok(sluice_api::tls::client_config_for_ca(&pem)?)
}

async fn call<T: serde::de::DeserializeOwned>(p: &Paths, proxy: &str, req: &Request) -> Result<T> {
    let (host, _) = split_host_port(proxy, 3025)?;
    Ok(api::call(proxy, &host, tls_for(p)?, req).await?)
}

fn read_password() -> Result<String> {
    if let Ok(p) = std::env::var("SLUICE_PASSWORD") {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    eprint!("Enter password for Sluice user: ");
    std::io::stderr().flush()?;
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let old = tcgetattr(&stdin)?;
    let mut quiet = old.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    tcsetattr(&stdin, SetArg::TCSANOW, &old)?;
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

async fn db_login(p: &Paths, name: &str, db_user: &str, db_name: &str) -> Result<()> {
    let profile = load_profile(p)?;
    let key = rcgen::KeyPair::generate()?;
    let req = Request::DbLogin {
        session: profile.session.clone(),
        db: name.to_owned(),
        db_user: db_user.to_owned(),
        db_name: db_name.to_owned(),
        public_key_pem: key.public_key_pem(),
    };
    let resp: DbCertResponse = call(p, &profile.proxy, &req).await?;
    write_private(&p.db_file(name, "key"), key.serialize_pem().as_bytes())?;
    write_private(&p.db_file(name, "crt"), resp.cert_pem.as_bytes())?;
    write_private(&p.ca(), resp.ca_pem.as_bytes())?;
    let mysql = resp.protocol == PROTOCOL_MYSQL;
    let meta = DbProfile {
        db_user: db_user.to_owned(),
        db_name: db_name.to_owned(),
        expires: resp.expires.clone(),
        endpoints: if mysql { resp.mysql_endpoints.clone() } else { resp.postgres_endpoints.clone() },
        protocol: resp.protocol.clone(),
    };
    write_private(&p.db_file(name, "json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    // An option file from an earlier login would name the old route's files and address.
    let _ = std::fs::remove_file(p.db_file(name, "cnf"));
    println!("Logged into database {name} as {db_user} (valid until {}).", resp.expires);
    if mysql {
        println!(
            "It is a MySQL database: `sluice db connect {name}`, or `sluice db config {name}` for an option file."
        );
    }
    Ok(())
}

/// Where to connect to a PostgreSQL database: the endpoints the auth server lists now (the
/// agents serving it are healthy), else those it listed at `db login`, else the login's
/// PostgreSQL address. A MySQL database has no such fallback: with no MySQL endpoint listed now
/// (or, when the server cannot be asked, at `db login` or at `sluice login`) there is no MySQL
/// listener to connect to, which is an error.
async fn db_endpoints(p: &Paths, profile: &Profile, name: &str, meta: &DbProfile) -> Result<Vec<String>> {
    let listed: Result<Vec<DbInfo>> =
        call(p, &profile.proxy, &Request::DbList { session: profile.session.clone() }).await;
    // listed: None when the server could not be asked, Some(false) when it does not list `name`.
    let (endpoints, listed) = match listed {
        Ok(dbs) => {
            let found = dbs.into_iter().find(|d| d.name == name);
            let listed = found.is_some();
            (found.map(|d| d.endpoints).unwrap_or_default(), Some(listed))
        }
        Err(e) => {
            eprintln!(
                "note: could not ask {} where {name} is served ({e:#}); using what `sluice db login` saw",
                profile.proxy
            );
            (meta.endpoints.clone(), None)
        }
    };
    if !endpoints.is_empty() {
        return Ok(endpoints);
    }
    if !meta.is_mysql() {
        return Ok(vec![profile.postgres_public_addr.clone()]);
    }
    match (&profile.mysql_public_addr, listed) {
        (Some(addr), None) => Ok(vec![addr.clone()]),
        (_, Some(false)) => bail!("{} no longer lists database {name:?} for you: see `sluice db ls`", profile.proxy),
        _ => Err(no_mysql_listener(&profile.proxy, name)),
    }
}

fn no_mysql_listener(proxy: &str, name: &str) -> anyhow::Error {
    anyhow!(
        "database {name:?} is a MySQL database, but {proxy} names no MySQL listener for it: \
         control needs proxy_service.mysql_listen_addr (or mysql_public_addr where agents serve it)"
    )
}

/// libpq's host and port lists for `endpoints`, in random order: libpq tries them in turn
/// (multi-host), so clients spread over the agents and move on past one that is down.
fn host_lists(endpoints: &[String]) -> Result<(String, String)> {
    use rand::seq::SliceRandom;
    let mut pairs =
        endpoints.iter().map(|e| split_host_port(e, 5433).map_err(anyhow::Error::from)).collect::<Result<Vec<_>>>()?;
    pairs.shuffle(&mut rand::thread_rng());
    let hosts = pairs.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>().join(",");
    let ports = pairs.iter().map(|(_, p)| p.to_string()).collect::<Vec<_>>().join(",");
    Ok((hosts, ports))
}

/// How to reach a logged-in database.
enum Conn {
    /// libpq's environment.
    Postgres(Vec<(&'static str, String)>),
    Mysql(mysql::Target),
}

/// Where and how to connect to a logged-in database.
async fn db_conn(p: &Paths, name: &str) -> Result<Conn> {
    let profile = load_profile(p)?;
    let meta_text = std::fs::read_to_string(p.db_file(name, "json"))
        .map_err(|_| anyhow!("not logged into database {name:?}: run `sluice db login {name} --db-user USER`"))?;
    let meta: DbProfile = serde_json::from_str(&meta_text)?;
    let endpoints = db_endpoints(p, &profile, name, &meta).await?;
    if meta.is_mysql() {
        use rand::seq::SliceRandom;
        // The clients take one host: a random one spreads them over the endpoints.
        let chosen =
            endpoints.choose(&mut rand::thread_rng()).ok_or_else(|| no_mysql_listener(&profile.proxy, name))?;
        let (host, port) = split_host_port(chosen, 3306)?;
        return Ok(Conn::Mysql(mysql::Target {
            host,
            port,
            user: meta.db_user,
            database: meta.db_name,
            ca: p.ca().display().to_string(),
            cert: p.db_file(name, "crt").display().to_string(),
            key: p.db_file(name, "key").display().to_string(),
        }));
    }
    let (host, port) = host_lists(&endpoints)?;
    let mut env = vec![
        ("PGHOST", host),
        ("PGPORT", port),
        ("PGSSLMODE", "verify-full".to_owned()),
        ("PGSSLROOTCERT", p.ca().display().to_string()),
        ("PGSSLCERT", p.db_file(name, "crt").display().to_string()),
        ("PGSSLKEY", p.db_file(name, "key").display().to_string()),
        ("PGUSER", meta.db_user.clone()),
    ];
    if !meta.db_name.is_empty() {
        env.push(("PGDATABASE", meta.db_name));
    }
    Ok(Conn::Postgres(env))
}

/// libpq environment for a logged-in PostgreSQL database.
async fn db_env(p: &Paths, name: &str) -> Result<Vec<(&'static str, String)>> {
    match db_conn(p, name).await? {
        Conn::Postgres(env) => Ok(env),
        Conn::Mysql(_) => Err(mysql_tunnel_refused(name)),
    }
}

/// A MySQL tunnel would have to take over the handshake (the server speaks first, TLS starts
/// inside it) rather than pass bytes on; not there yet.
fn mysql_tunnel_refused(name: &str) -> anyhow::Error {
    anyhow!(
        "database {name:?} is a MySQL database: `sluice proxy db --tunnel` serves PostgreSQL only; \
         MySQL clients connect with the certificate directly (`sluice db connect {name}`, or the option \
         file of `sluice db config {name}`)"
    )
}

/// The installed MySQL client, or MariaDB's options (the likelier client) when there is none.
fn mysql_client() -> (mysql::Client, bool) {
    match mysql::detect() {
        Some(c) => (c, true),
        None => (mysql::Client { program: "mariadb", flavour: mysql::Flavour::MariaDb }, false),
    }
}

/// Writes the option file of a MySQL database (0600, like the key it names) and returns its path.
fn write_option_file(p: &Paths, name: &str, flavour: mysql::Flavour, t: &mysql::Target) -> Result<PathBuf> {
    let path = p.db_file(name, "cnf");
    write_private(&path, mysql::option_file(flavour, t, name).as_bytes())?;
    Ok(path)
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:=@".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn print_table(dbs: &[DbInfo]) {
    let labels = |l: &BTreeMap<String, String>| l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let w_name = dbs.iter().map(|d| d.name.len()).max().unwrap_or(0).max(4);
    let w_desc = dbs.iter().map(|d| d.description.len()).max().unwrap_or(0).max(11);
    let w_proto = dbs.iter().map(|d| d.protocol.len()).max().unwrap_or(0).max(8);
    println!("{:<w_name$} {:<w_desc$} {:<w_proto$} Agents Labels", "Name", "Description", "Protocol");
    let rule = |w: usize| "-".repeat(w);
    println!("{} {} {} {} {}", rule(w_name), rule(w_desc), rule(w_proto), rule(6), rule(6));
    for d in dbs {
        let row = (&d.name, &d.description, &d.protocol, d.agents, labels(&d.labels));
        println!("{:<w_name$} {:<w_desc$} {:<w_proto$} {:<6} {}", row.0, row.1, row.2, row.3, row.4);
    }
    // On stderr, so that the table stays as scripts read it.
    for d in dbs.iter().filter(|d| d.protocol == PROTOCOL_MYSQL && d.endpoints.is_empty()) {
        eprintln!(
            "note: {} is a MySQL database, but no MySQL listener serves it (proxy_service.mysql_listen_addr)",
            d.name
        );
    }
}

/// `sluice db config` for a MySQL database: the details, the client's options, and the option
/// file (written, and printed).
fn print_mysql_config(p: &Paths, name: &str, t: &mysql::Target) -> Result<()> {
    let (client, found) = mysql_client();
    let path = write_option_file(p, name, client.flavour, t)?;
    println!("Name:      {name}");
    println!("Protocol:  mysql");
    println!("Host:      {}", t.host);
    println!("Port:      {}", t.port);
    println!("User:      {}", t.user);
    println!("Database:  {}", t.database);
    println!("CA:        {}", t.ca);
    println!("Cert:      {}", t.cert);
    println!("Key:       {}", t.key);
    println!("Options:   {}", path.display());
    println!();
    if !found {
        println!("(neither mariadb nor mysql is in PATH: the options below are MariaDB's client's)");
    }
    println!("Connect with: {}", mysql::with_option_file(client.program, &path));
    let args: Vec<String> = mysql::client_args(client.flavour, t).iter().map(|a| shell_quote(a)).collect();
    println!("or: {} {}", client.program, args.join(" "));
    println!();
    print!("{}", mysql::option_file(client.flavour, t, name));
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let p = Paths { home: home()? };
    match cli.cmd {
        Cmd::Login { proxy, user, ca_file } => {
            if let Some(ca) = &ca_file {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                write_private(&p.ca(), &pem)?;
            } else if !p.ca().exists() {
                bail!("first login needs --ca-file with the cluster CA (its pin is in `control status`)");
            }
            let password = read_password()?;
            let resp: LoginResponse = call(&p, &proxy, &Request::Login { user: user.clone(), password }).await?;
            write_private(&p.ca(), resp.ca_pem.as_bytes())?;
            let profile = Profile {
                proxy,
                user: resp.user.clone(),
                session: resp.session,
                expires: resp.expires.clone(),
                cluster: resp.cluster.clone(),
                postgres_public_addr: resp.postgres_public_addr,
                mysql_public_addr: resp.mysql_public_addr,
            };
            write_private(&p.profile(), serde_json::to_string_pretty(&profile)?.as_bytes())?;
            println!("> Profile URL:  {}", profile.proxy);
            println!("  Logged in as: {}", resp.user);
            println!("  Cluster:      {}", resp.cluster);
            println!("  Roles:        {}", resp.roles.join(", "));
            println!("  Valid until:  {}", resp.expires);
        }
        Cmd::Logout => {
            if let Ok(profile) = load_profile(&p) {
                // Best effort: the local files go either way.
                let _ =
                    call::<serde_json::Value>(&p, &profile.proxy, &Request::Logout { session: profile.session }).await;
            }
            let _ = std::fs::remove_dir_all(p.db_dir());
            let _ = std::fs::remove_file(p.profile());
            println!("Logged out.");
        }
        Cmd::Status => {
            let profile = load_profile(&p)?;
            println!("> Profile URL:  {}", profile.proxy);
            println!("  Logged in as: {}", profile.user);
            println!("  Cluster:      {}", profile.cluster);
            println!("  Valid until:  {}", profile.expires);
        }
        Cmd::Db(cmd) => match cmd {
            DbCmd::Ls { format } => {
                let profile = load_profile(&p)?;
                let dbs: Vec<DbInfo> = call(&p, &profile.proxy, &Request::DbList { session: profile.session }).await?;
                match format.as_str() {
                    "json" => println!("{}", serde_json::to_string_pretty(&dbs)?),
                    "text" => print_table(&dbs),
                    other => bail!("unknown format {other:?} (text or json)"),
                }
            }
            DbCmd::Login { name, db_user, db_name } => db_login(&p, &name, &db_user, &db_name).await?,
            DbCmd::Logout { name } => {
                for ext in ["crt", "key", "json", "cnf"] {
                    let _ = std::fs::remove_file(p.db_file(&name, ext));
                }
                println!("Logged out of database {name}.");
            }
            DbCmd::Env { name } => match db_conn(&p, &name).await? {
                Conn::Postgres(env) => {
                    for (k, v) in env {
                        println!("export {k}={}", shell_quote(&v));
                    }
                }
                Conn::Mysql(t) => {
                    let (client, _) = mysql_client();
                    let path = write_option_file(&p, &name, client.flavour, &t)?;
                    println!("export MYSQL_HOST={}", shell_quote(&t.host));
                    println!("export MYSQL_TCP_PORT={}", t.port);
                    println!("# MySQL clients read no TLS settings from the environment; use the option file:");
                    println!("#   {}", mysql::with_option_file(client.program, &path));
                }
            },
            DbCmd::Config { name } => {
                let env = match db_conn(&p, &name).await? {
                    Conn::Postgres(env) => env,
                    Conn::Mysql(t) => {
                        print_mysql_config(&p, &name, &t)?;
                        return Ok(());
                    }
                };
                let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap_or_default();
                println!("Name:      {name}");
                println!("Host:      {}", get("PGHOST"));
                println!("Port:      {}", get("PGPORT"));
                println!("User:      {}", get("PGUSER"));
                println!("Database:  {}", get("PGDATABASE"));
                println!("CA:        {}", get("PGSSLROOTCERT"));
                println!("Cert:      {}", get("PGSSLCERT"));
                println!("Key:       {}", get("PGSSLKEY"));
                println!();
                println!(
                    "Connect with: psql \"host={} port={} user={} dbname={} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\"",
                    get("PGHOST"),
                    get("PGPORT"),
                    get("PGUSER"),
                    get("PGDATABASE"),
                    get("PGSSLROOTCERT"),
                    get("PGSSLCERT"),
                    get("PGSSLKEY")
                );
            }
            DbCmd::Connect { name, db_user, db_name, psql_args } => {
                if let Some(u) = &db_user {
                    db_login(&p, &name, u, db_name.as_deref().unwrap_or("")).await?;
                }
                use std::os::unix::process::CommandExt;
                let (program, mut cmd) = match db_conn(&p, &name).await? {
                    Conn::Postgres(env) => {
                        let mut cmd = std::process::Command::new("psql");
                        cmd.envs(env);
                        ("psql", cmd)
                    }
                    Conn::Mysql(t) => {
                        let client = mysql::detect().ok_or_else(|| {
                            anyhow!("{name} is a MySQL database, and neither mariadb nor mysql is in PATH")
                        })?;
                        let mut cmd = std::process::Command::new(client.program);
                        cmd.args(mysql::client_args(client.flavour, &t));
                        (client.program, cmd)
                    }
                };
                cmd.args(psql_args);
                let err = cmd.exec();
                bail!("running {program}: {err}");
            }
        },
        Cmd::Proxy(ProxyCmd::Db { name, tunnel, port, socket }) => {
            if !tunnel {
                bail!("only the tunnel mode exists: add --tunnel");
            }
            if let Conn::Mysql(_) = db_conn(&p, &name).await? {
                return Err(mysql_tunnel_refused(&name));
            }
            let listen = match socket {
                Some(path) => tunnel::Listen::Unix(path),
                None => tunnel::Listen::Tcp(port),
            };
            tunnel::run(p.clone(), name, listen).await?;
        }
        Cmd::Aws(AwsCmd::RdsToken { host, port, user, region, assume_role_arn, external_id }) => {
            let source = CredentialSource { region: region.clone(), assume_role_arn, external_id };
            let creds = TokenMinter::new().credentials(&source).await?;
            let token =
                generate_auth_token(&creds, &TokenTarget { host, port, user, region }, std::time::SystemTime::now())?;
            println!("{token}");
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ERROR: starting runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("ERROR: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_becomes_a_host_with_its_port() {
        let endpoints: Vec<String> = ["10.0.0.1:5433", "10.0.0.2:6433", "db.example"].map(String::from).to_vec();
        for _ in 0..20 {
            let (hosts, ports) = host_lists(&endpoints).unwrap();
            let pairs: BTreeMap<&str, &str> = hosts.split(',').zip(ports.split(',')).collect();
            let want: BTreeMap<&str, &str> =
                [("10.0.0.1", "5433"), ("10.0.0.2", "6433"), ("db.example", "5433")].into_iter().collect();
            assert_eq!(pairs, want, "{hosts} {ports}");
        }
        assert_eq!(host_lists(&["127.0.0.1:7000".to_owned()]).unwrap(), ("127.0.0.1".into(), "7000".into()));
        assert!(host_lists(&["127.0.0.1:notaport".to_owned()]).is_err());
    }
}
