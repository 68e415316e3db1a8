//! `control`: the daemon (`start`), the demo, and admin verbs in the spirit of Teleport's `tctl`
//! (users, roles, tokens, db resources, status, audit). Admin verbs open the same SQLite state the
//! daemon uses; the daemon sees their commits and reads the state again, so changes apply to the
//! next connection.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice_control::config::{parse_duration, Config, DbResource};
use sluice_control::demo::{dev_role, find_bin, AwsCreds, Stack, DEMO_MYSQL_DB, DEMO_PLAIN_DB};
use sluice_control::rbac::Role;
use sluice_control::state::{random_secret, State};
use sluice_control::{bootstrap, catalog, daemon};

#[derive(Parser)]
#[command(name = "control", version, about = "Sluice control: daemon and admin CLI")]
struct Cli {
    /// Configuration file (admin verbs read data_dir from it).
    #[arg(short, long, global = true, env = "SLUICE_CONFIG", default_value = "/etc/sluice/control.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Start {
        /// Log as JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
    },
    /// Run PostgreSQL, the RDS Proxy emulator and control on loopback, with user alice logged in.
    Demo {
        #[arg(long, default_value = ".sluice-demo")]
        dir: PathBuf,
    },
    /// Cluster name, CA pin and counts.
    Status,
    #[command(subcommand)]
    Users(UsersCmd),
    #[command(subcommand)]
    Roles(RolesCmd),
    #[command(subcommand)]
    Tokens(TokensCmd),
    #[command(subcommand)]
    Db(DbCmd),
    #[command(subcommand)]
    Sessions(SessionsCmd),
    #[command(subcommand)]
    Aws(AwsCmd),
    #[command(subcommand)]
    Configure(ConfigureCmd),
    /// Teleport-style locks: refuse new sessions and end live ones of a user or database.
    #[command(subcommand)]
    Locks(LocksCmd),
    /// The agents that joined the cluster.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Install Sluice as a service.
    #[command(subcommand)]
    Install(InstallCmd),
    /// Recent audit events as JSON lines.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The shared state's storage.
    #[command(subcommand)]
    Storage(StorageCmd),
    /// Certificates from Sluice's CA for other software.
    #[command(subcommand)]
    Auth(AuthCmd),
}

#[derive(Subcommand)]
enum AuthCmd {
    /// `--format=db`: a server certificate and key for a self-hosted PostgreSQL that Sluice
    /// logs in to with `auth: cert`, and Sluice's database CA for its `ssl_ca_file` (as `tctl auth sign
    /// --format=db`): writes PREFIX.crt, PREFIX.key and PREFIX.cas.
    Sign {
        #[arg(long)]
        format: String,
        /// The server's DNS names or IPs, comma-separated (the first is Sluice's `uri` host).
        #[arg(long, value_delimiter = ',', required = true)]
        host: Vec<String>,
        /// Path prefix of the files written.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "2190h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum StorageCmd {
    /// The key-encryption key (KEK) under which the CA keys are stored.
    #[command(subcommand)]
    Kek(KekCmd),
    /// Write the whole state (users, roles, the CA, databases, locks, tokens, agents, discovered
    /// resources) to a file, mode 0600, to import into another backend.
    Export {
        #[arg(long)]
        out: PathBuf,
        /// Include the audit log.
        #[arg(long)]
        include_audit: bool,
    },
    /// Load an export into this config's storage, which must be empty (e.g. a new PostgreSQL).
    Import {
        #[arg(long = "in")]
        input: PathBuf,
    },
}

#[derive(Subcommand)]
enum KekCmd {
    /// Write a new random KEK (32 bytes as hex) to a new file, mode 0600, and print its id.
    Generate {
        /// The file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Wrap the CA key for another KEK, in one step and without re-encrypting it: the current
    /// KEK's wrap goes unless --keep-old (for a rolling change of the nodes' configs).
    Rotate {
        /// A KEK file (`control storage kek generate`).
        #[arg(long, conflicts_with = "to_kms", required_unless_present = "to_kms")]
        to_file: Option<PathBuf>,
        /// An AWS KMS key ARN.
        #[arg(long)]
        to_kms: Option<String>,
        /// Keep the existing wraps, so nodes still configured with the old KEK keep working.
        #[arg(long)]
        keep_old: bool,
    },
    /// Remove a wrap kept with --keep-old, once no node uses its KEK.
    Retire {
        /// The KEK id (`file:…` or `kms:…`).
        id: String,
    },
    /// List the KEKs the CA key is wrapped for.
    Ls,
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Create a user. Reads the password from stdin with --password-stdin, else generates one.
    Add {
        name: String,
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Replace a user's roles.
    Update {
        name: String,
        #[arg(long, value_delimiter = ',')]
        set_roles: Vec<String>,
    },
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    Rm {
        name: String,
    },
}

#[derive(Subcommand)]
enum RolesCmd {
    /// Create or replace a role from a `kind: role` YAML file.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The roles (text: YAML documents, as `roles create` takes them).
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    Rm {
        name: String,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a join token.
    Add {
        #[arg(long = "type")]
        kind: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Join tokens (their kind and expiry; the secret is shown only when created).
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

/// How a list is printed: a table for people, JSON (one array) for scripts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

fn print_json<T: serde::Serialize>(rows: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(rows)?);
    Ok(())
}

/// Unix seconds as RFC 3339 (UTC).
fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// How long until (or since) `unix`, for people: "in 59m", "3h ago".
fn relative(unix: i64) -> String {
    let delta = unix - time::OffsetDateTime::now_utc().unix_timestamp();
    if delta >= 0 {
        format!("in {}", short_duration(delta))
    } else {
        format!("{} ago", short_duration(-delta))
    }
}

#[derive(Subcommand)]
enum InstallCmd {
    /// systemd units for control and its data plane, made from the config (--config): printed,
    /// or written to --output DIR (e.g. /etc/systemd/system).
    Systemd {
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Where `control` and `dataplane` are installed (default: this control's directory).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The cgroup v2 mount (default: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// Agents with their address, databases, sessions, last heartbeat and health.
    Ls {
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Removes an agent: its host certificate is refused from then on (it must join again).
    Rm {
        /// Host ID, or node name if only one node has it.
        node: String,
    },
}

#[derive(Subcommand)]
enum AwsCmd {
    /// Print the IAM policy Sluice needs for discovery and IAM auth (all proxies, any account).
    PrintIam {
        #[arg(long, value_delimiter = ',', default_value = "rdsproxy")]
        types: Vec<String>,
        /// Say how to attach it to this role.
        #[arg(long, conflicts_with = "user")]
        role: Option<String>,
        /// Say how to attach it to this user.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigureCmd {
    /// Compute the IAM policies the config (-c) needs and attach them (or print them with --manual).
    Bootstrap {
        #[arg(long, conflicts_with = "attach_to_user", required_unless_present = "attach_to_user")]
        attach_to_role: Option<String>,
        #[arg(long)]
        attach_to_user: Option<String>,
        /// Print the policies instead of attaching them.
        #[arg(long)]
        manual: bool,
    },
}

#[derive(Subcommand)]
enum DbConfigureCmd {
    /// Write a control config serving the dynamic and discovered resources with these labels.
    Create {
        /// k=v[,k=v...]: a `db_service.resources` matcher (repeatable).
        #[arg(long = "dynamic-resources-labels", required = true)]
        dynamic_resources_labels: Vec<String>,
        #[arg(long)]
        assume_role_arn: Option<String>,
        #[arg(long, requires = "assume_role_arn")]
        external_id: Option<String>,
        #[arg(long, default_value = "/var/lib/sluice")]
        data_dir: PathBuf,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Write an agent's config: join the auth server at HOST:PORT (its cluster API; repeat
        /// the flag or give a comma list for several auth servers, tried in order)...
        #[arg(long, value_delimiter = ',', requires_all = ["token", "ca_pin"])]
        auth_server: Vec<String>,
        /// ...with the join token in this file (`control tokens add --type=db`)...
        #[arg(long, requires_all = ["auth_server", "ca_pin"])]
        token: Option<PathBuf>,
        /// ...trusting it only if its CA has this pin (`control status` prints it).
        #[arg(long, requires_all = ["auth_server", "token"])]
        ca_pin: Option<String>,
    },
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// Live sessions: those the dataplane holds here and, on an auth server, those its agents
    /// reported (the Node column names the agent).
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// End a session now (the dataplane closes both legs within a second); on an auth server,
    /// also a session an agent reported, waiting up to 5 s for the agent to report it ended.
    Kill { id: String },
}

#[derive(Subcommand)]
enum LocksCmd {
    /// Lock a user, a database, or a user on a database. A running control ends matching live
    /// sessions within a second.
    Add {
        #[arg(long)]
        user: Option<String>,
        /// A database (service) name.
        #[arg(long)]
        db: Option<String>,
        /// Shown to refused clients.
        #[arg(long, default_value = "")]
        message: String,
        /// Lift the lock after this long (default: until removed).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    Rm {
        id: String,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// Register a `kind: db, version: v3` resource.
    Add {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The databases this control serves (static, matching dynamic and discovered ones).
    Ls {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    #[command(subcommand)]
    Configure(DbConfigureCmd),
    Rm {
        name: String,
    },
}

/// One live session's client-leg traffic and its rates over the sampling interval.
#[derive(Clone)]
struct LiveStats {
    bytes_in: u64,
    bytes_out: u64,
    rate_in: f64,
    rate_out: f64,
    rtt_us: Option<u32>,
}

/// Asks the dataplane (as an admin peer) for its sessions' counters twice, 500 ms apart.
fn live_stats(socket: &Path) -> Result<(std::collections::HashMap<String, LiveStats>, &'static str)> {
    use sluice_handoff::handoff::{CounterSource, Message, Role, SessionStats};
    let link = sluice_handoff::link::Link::connect(socket)
        .with_context(|| format!("connecting to the dataplane at {}", socket.display()))?;
    link.set_read_timeout(Some(Duration::from_secs(5)))?;
    link.hello(Role::Admin).with_context(|| format!("greeting the dataplane at {}", socket.display()))?;
    let sample = || -> Result<Vec<SessionStats>> {
        link.send(&Message::StatsRequest, &[])?;
        match link.recv_reply()? {
            Message::Stats { sessions, .. } => Ok(sessions),
            other => bail!("unexpected answer from the dataplane: {other:?}"),
        }
    };
    let first = sample()?;
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let second = sample()?;
    let dt = t0.elapsed().as_secs_f64();
    let leg = |s: &SessionStats| s.counters.map(|c| (c.client.rx_bytes, c.client.tx_bytes)).unwrap_or_default();
    let mut source = "-";
    let mut out = std::collections::HashMap::new();
    for s in &second {
        let (rx, tx) = leg(s);
        let (rx0, tx0) = first.iter().find(|f| f.session_id == s.session_id).map(leg).unwrap_or((rx, tx));
        let rtt = s.counters.filter(|c| c.source == CounterSource::Bpf).map(|c| c.client.srtt_us);
        if let Some(c) = s.counters {
            source = sluice_control::metrics::source_name(c.source);
        }
        out.insert(
            s.session_id.clone(),
            LiveStats {
                bytes_in: rx,
                bytes_out: tx,
                rate_in: rx.saturating_sub(rx0) as f64 / dt,
                rate_out: tx.saturating_sub(tx0) as f64 / dt,
                rtt_us: rtt,
            },
        );
    }
    Ok((out, source))
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("loading {}", path.display()))
}

fn open_state(cfg: &Config) -> Result<State> {
    // An agent's data dir holds its host identity, never a state (users, the CA key).
    if cfg.is_agent() {
        bail!("this is an agent's config (auth_service.enabled: false): run admin commands against the auth server's config");
    }
    State::open_configured(cfg, sluice_control::state::OpenMode::Admin).with_context(|| {
        format!("opening the state ({} in {})", cfg.auth_service.storage.kind(), cfg.data_dir.display())
    })
}

/// The CA key as stored, which must be sealed for the KEK verbs.
fn sealed_ca_key(state: &State) -> Result<sluice_control::kek::SealedKey> {
    let row = state.ca_row()?.context("the state has no CA yet: start control once")?;
    let envelope = row.key_envelope.context(
        "the CA key is stored in plaintext: set auth_service.storage.kek and run any control command to seal it",
    )?;
    let wraps = serde_json::from_str(row.key_wraps.as_deref().unwrap_or("[]")).context("the CA key's wraps")?;
    Ok(sluice_control::kek::SealedKey { envelope, wraps })
}

fn format_counts(counts: &sluice_control::state::export::Counts) -> String {
    counts.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ")
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    sluice_control::config::from_yaml(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `control install systemd`.
fn install_systemd(
    config: &Path,
    output: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
) -> Result<()> {
    use sluice_control::install;
    let cfg = load_config(config)?;
    let absolute = |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    let bin_dir = match bin_dir {
        Some(d) => absolute(&d)?,
        None => std::env::current_exe()?.parent().context("this binary has no directory")?.to_path_buf(),
    };
    let mut writable = Vec::new();
    if let Some(local) = &cfg.proxy_service.local_socket {
        writable.push(absolute(&local.dir)?);
    }
    if let Some(dir) = absolute(&cfg.audit_json_file())?.parent() {
        writable.push(dir.to_path_buf());
    }
    let mut ports = vec![cfg.proxy_service.postgres_listen_addr.port()];
    if cfg.auth_service.enabled {
        ports.push(cfg.auth_service.listen_addr.port());
        ports.extend(cfg.auth_service.cluster_listen_addr.map(|a| a.port()));
    }
    ports.extend(cfg.metrics.as_ref().map(|m| m.listen_addr.port()));
    let options = install::UnitOptions {
        control_bin: bin_dir.join("control"),
        dataplane_bin: bin_dir.join("dataplane"),
        config_path: absolute(config)?,
        data_dir: absolute(&cfg.data_dir)?,
        dataplane_socket: cfg.dataplane.as_ref().map(|d| absolute(&d.socket)).transpose()?,
        writable,
        cgroup_root: cgroup_root.unwrap_or_else(install::cgroup_root),
        privileged_port: ports.iter().any(|p| *p < 1024),
    };
    let units = install::systemd_units(&options)?;
    let Some(dir) = output else {
        for (name, text) in &units {
            println!("# ---- {name}\n{text}");
        }
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in &units {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if cfg.dataplane.is_none() {
        println!("(no data plane unit: the config has no dataplane section; control relays sessions itself)");
    }
    println!(
        "Next: systemctl daemon-reload && systemctl enable --now {}{}",
        if cfg.dataplane.is_some() { "sluice-dataplane@boot.service " } else { "" },
        install::CONTROL_UNIT
    );
    if cfg.dataplane.is_some() {
        println!(
            "Upgrade without ending sessions: install the new binaries, then \
             `systemctl start sluice-dataplane@$(date +%s).service` (it takes the sessions over; the old instance exits) \
             and `systemctl restart {}`.",
            install::CONTROL_UNIT
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Start { .. } | Cmd::Demo { .. }) {
        sluice_control::init_logging_at(false, "warn");
    }
    match cli.cmd {
        Cmd::Start { json_logs } => {
            sluice_control::init_logging(json_logs);
            let cfg = load_config(&cli.config)?;
            // Before any socket exists: sockets stay in the cgroup they were created in, and the
            // data plane's counters observe `sluice`, not the whole host's root cgroup.
            match sluice_handoff::cgroup::leave_root() {
                Ok(Some(group)) => tracing::info!(cgroup = %group.display(), "moved from the root cgroup"),
                Ok(None) => {}
                Err(e) => tracing::info!(error = %e, "staying in the root cgroup"),
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let bound = daemon::bind(&cfg).await?;
                daemon::serve(cfg, bound, Some(cli.config.clone())).await?;
                Ok::<_, anyhow::Error>(())
            })
        }
        Cmd::Install(InstallCmd::Systemd { output, bin_dir, cgroup_root }) => {
            install_systemd(&cli.config, output, bin_dir, cgroup_root)
        }
        Cmd::Demo { dir } => {
            sluice_control::init_logging(false);
            run_demo(&dir)
        }
        Cmd::Status => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let ca = state.ensure_ca(&cfg.auth_service.cluster_name)?;
            let (users, roles, dbs) = state.counts()?;
            println!("Cluster           {}", cfg.auth_service.cluster_name);
            println!("CA pin            {}", ca.pin()?);
            println!("API address       {}", cfg.auth_service.listen_addr);
            match cfg.auth_service.cluster_listen_addr {
                Some(addr) => println!("Cluster API       {addr}"),
                None => println!("Cluster API       off (set auth_service.cluster_listen_addr for agents to join)"),
            }
            println!(
                "PostgreSQL        {} (public {})",
                cfg.proxy_service.postgres_listen_addr,
                cfg.proxy_service.public_addr()
            );
            println!("Users             {users}");
            println!("Roles             {roles}");
            println!("Databases         {} static, {dbs} dynamic", cfg.db_service.databases.len());
            println!("Storage           {}", state.backend());
            let (sources, here) = sluice_control::discovery::lease_summary(&cfg, &state)?;
            if sources > 0 {
                println!("Discovery         {sources} sources, polled here: {here}");
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for n in state.auth_nodes()? {
                let age = now - n.last_seen;
                let status = if age <= 15 { "serving" } else { "silent" };
                println!(
                    "Auth node         {} {} (api {}, cluster {}, {status}, seen {}s ago)",
                    n.name,
                    n.id,
                    n.api_addr,
                    n.cluster_addr.as_deref().unwrap_or("off"),
                    age.max(0)
                );
            }
            Ok(())
        }
        Cmd::Users(cmd) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            match cmd {
                UsersCmd::Add { name, roles, password_stdin } => {
                    let known: Vec<String> = state.roles()?.into_iter().map(|r| r.metadata.name).collect();
                    if let Some(missing) = roles.iter().find(|r| !known.contains(r)) {
                        bail!("role {missing:?} does not exist (create it with `control roles create -f`)");
                    }
                    let (password, generated) = if password_stdin {
                        let mut s = String::new();
                        std::io::stdin().read_to_string(&mut s)?;
                        let p = s.trim_end_matches(['\n', '\r']).to_owned();
                        if p.is_empty() {
                            bail!("empty password on stdin");
                        }
                        (p, false)
                    } else {
                        (random_secret(12), true)
                    };
                    state.add_user(&name, &password, &roles)?;
                    println!("User {name:?} created with roles {roles:?}.");
                    if generated {
                        println!("Password (shown once): {password}");
                    }
                    println!("Log in with: sluice login --proxy {} --user {name}", cfg.auth_service.listen_addr);
                }
                UsersCmd::Update { name, set_roles } => {
                    state.update_user_roles(&name, &set_roles)?;
                    println!("User {name:?} now has roles {set_roles:?}.");
                }
                UsersCmd::Ls { format } => {
                    let users = state.users()?;
                    if format == Format::Json {
                        return print_json(&users);
                    }
                    println!("{:<24} Roles", "User");
                    for u in users {
                        println!("{:<24} {}", u.name, u.roles.join(","));
                    }
                }
                UsersCmd::Rm { name } => {
                    state.delete_user(&name)?;
                    println!("User {name:?} deleted.");
                }
            }
            Ok(())
        }
        Cmd::Roles(cmd) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            match cmd {
                RolesCmd::Create { file } => {
                    let role: Role = read_yaml(&file)?;
                    role.validate()?;
                    state.upsert_role(&role)?;
                    println!("role {:?} has been created", role.metadata.name);
                }
                RolesCmd::Ls { format } => {
                    let roles = state.roles()?;
                    if format == Format::Json {
                        return print_json(&roles);
                    }
                    for r in roles {
                        println!("{}", serde_saphyr::to_string(&r)?);
                        println!("---");
                    }
                }
                RolesCmd::Rm { name } => {
                    state.delete_role(&name)?;
                    println!("role {name:?} has been deleted");
                }
            }
            Ok(())
        }
        Cmd::Auth(AuthCmd::Sign { format, host, out, ttl }) => {
            if format != "db" {
                bail!("format {format:?} is not supported (db is)");
            }
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let ca = state.ensure_ca(&cfg.auth_service.cluster_name)?;
            sign_db_server(&ca.derive_db_ca()?, &host, &out, ttl)
        }
        Cmd::Tokens(cmd) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            match cmd {
                TokensCmd::Add { kind, ttl, format } => {
                    if kind != "db" {
                        bail!("token type {kind:?} is not supported (db is)");
                    }
                    let (token, expires) = state.add_token(&kind, ttl)?;
                    match format.as_str() {
                        "text" => println!("{token}"),
                        "json" => println!(
                            "{}",
                            serde_json::json!({ "token": token, "type": kind, "expires": expires.unix_timestamp() })
                        ),
                        other => bail!("unknown format {other:?} (text or json)"),
                    }
                }
                TokensCmd::Ls { format } => {
                    let tokens = state.tokens()?;
                    if format == Format::Json {
                        let rows: Vec<_> = tokens
                            .iter()
                            .map(|t| serde_json::json!({ "type": t.kind, "expires": rfc3339(t.expires_at.unix_timestamp()) }))
                            .collect();
                        return print_json(&rows);
                    }
                    println!("{:<6} {:<26} In", "Type", "Expires");
                    for t in tokens {
                        let at = t.expires_at.unix_timestamp();
                        println!("{:<6} {:<26} {}", t.kind, rfc3339(at), relative(at));
                    }
                }
            }
            Ok(())
        }
        Cmd::Db(DbCmd::Configure(DbConfigureCmd::Create {
            dynamic_resources_labels,
            assume_role_arn,
            external_id,
            data_dir,
            output,
            auth_server,
            token,
            ca_pin,
        })) => {
            let mut resources = Vec::new();
            for spec in &dynamic_resources_labels {
                let mut labels = std::collections::BTreeMap::new();
                for pair in spec.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').with_context(|| format!("expected k=v in {pair:?}"))?;
                    labels.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                let aws = assume_role_arn.as_ref().map(|arn| sluice_control::config::AwsSpec {
                    region: None,
                    assume_role_arn: Some(arn.clone()),
                    external_id: external_id.clone(),
                });
                resources.push(sluice_control::config::ResourceMatcher { labels, aws });
            }
            let mut cfg: Config = sluice_control::config::from_yaml(&format!("data_dir: {}", data_dir.display()))?;
            cfg.db_service.resources = resources;
            if let (false, Some(token_file), Some(ca_pin)) = (auth_server.is_empty(), token, ca_pin) {
                cfg.auth_service = sluice_control::config::AuthService { enabled: false, ..Default::default() };
                let auth_servers = auth_server.into_iter().map(|a| a.trim().to_owned()).filter(|a| !a.is_empty());
                cfg.join = Some(sluice_control::config::JoinConfig {
                    auth_servers: auth_servers.collect(),
                    token_file,
                    ca_pin,
                    node_name: None,
                });
            }
            cfg.validate()?;
            let yaml = serde_saphyr::to_string(&cfg)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
                    println!("Wrote config to {}", path.display());
                }
                None => print!("{yaml}"),
            }
            Ok(())
        }
        Cmd::Aws(AwsCmd::PrintIam { types, role, user }) => {
            let doc = bootstrap::print_iam_document(&types)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            // Accept a name or an ARN (`arn:aws:iam::ACCOUNT:role/PATH/NAME`); the CLI wants the name.
            let name = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
            let hint = match (role, user) {
                (Some(r), _) => Some(format!("aws iam put-role-policy --role-name {}", name(&r))),
                (_, Some(u)) => Some(format!("aws iam put-user-policy --user-name {}", name(&u))),
                _ => None,
            };
            if let Some(h) = hint {
                eprintln!(
                    "Attach it with: {h} --policy-name {} --policy-document file://POLICY.json",
                    bootstrap::POLICY_NAME
                );
            }
            Ok(())
        }
        Cmd::Configure(ConfigureCmd::Bootstrap { attach_to_role, attach_to_user, manual }) => {
            let cfg = load_config(&cli.config)?;
            let discovered = open_state(&cfg)?.discovered()?;
            let target = match (attach_to_role, attach_to_user) {
                (Some(r), _) => bootstrap::Target::Role(r),
                (_, Some(u)) => bootstrap::Target::User(u),
                _ => bail!("give --attach-to-role or --attach-to-user"),
            };
            let plan = bootstrap::plan(&cfg, &discovered, target)?;
            for p in &plan {
                eprintln!("{}", bootstrap::report(p));
                if manual {
                    println!("# {} ({})", p.target, bootstrap::POLICY_NAME);
                    println!("{}", p.compact_json());
                }
            }
            if !manual {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(bootstrap::attach(&plan))?;
                for p in &plan {
                    println!("Attached {} to {}", bootstrap::POLICY_NAME, p.target);
                }
            }
            Ok(())
        }
        Cmd::Db(cmd) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            match cmd {
                DbCmd::Add { file } => {
                    let db: DbResource = read_yaml(&file)?;
                    db.validate()?;
                    state.upsert_database(&db)?;
                    println!("db {:?} has been created", db.metadata.name);
                }
                DbCmd::Ls { format } => {
                    let dbs = catalog::databases(&cfg, &state)?;
                    if format == Format::Json {
                        return print_json(&dbs);
                    }
                    println!("{:<28} {:<8} {:<60} Labels", "Name", "Origin", "URI");
                    for d in dbs {
                        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        let stale = d.stale.as_ref().map(|why| format!(" [stale: {why}]")).unwrap_or_default();
                        println!("{:<28} {:<8} {:<60} {}{stale}", d.name, d.origin, d.spec.uri, labels.join(","));
                    }
                }
                DbCmd::Rm { name } => {
                    state.delete_database(&name)?;
                    println!("db {name:?} has been deleted");
                }
                DbCmd::Configure(_) => bail!("db configure is handled before the state is opened"),
            }
            Ok(())
        }
        Cmd::Sessions(SessionsCmd::Ls { format }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            // Live counters come from the dataplane: two samples half a second apart give rates.
            let (stats, source) = match &cfg.dataplane {
                Some(dp) => match live_stats(&dp.socket) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("no live counters: {e:#}");
                        (Default::default(), "-")
                    }
                },
                None => (Default::default(), "-"),
            };
            let mut rows: Vec<SessionRow> = state
                .live_sessions()?
                .into_iter()
                .map(|(id, started, record)| {
                    let f = &record["fields"];
                    let s = |k: &str| f[k].as_str().unwrap_or("").to_owned();
                    SessionRow {
                        live: stats.get(&id).cloned(),
                        user: s("user"),
                        db: s("db_service"),
                        db_user: s("db_user"),
                        db_name: s("db_name"),
                        started,
                        node: None,
                        id,
                    }
                })
                .collect();
            // On an auth server: the sessions its agents reported in their last heartbeats.
            let offline = agent_sessions(&state, &mut rows)?;
            if format == Format::Json {
                return print_json(&rows.iter().map(SessionRow::json).collect::<Vec<_>>());
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            println!(
                "{:<36} {:<12} {:<16} {:<12} {:<12} {:<20} {:>14} {:>14} {:>12} {:>12} {:>8} Node",
                "ID",
                "User",
                "Database",
                "DB user",
                "DB name",
                "Started",
                "Client→DB B",
                "DB→Client B",
                "In B/s",
                "Out B/s",
                "RTT µs"
            );
            for r in &rows {
                let (bytes_in, bytes_out, rate_in, rate_out, rtt) = match &r.live {
                    Some(l) => (
                        l.bytes_in.to_string(),
                        l.bytes_out.to_string(),
                        format!("{:.0}", l.rate_in),
                        format!("{:.0}", l.rate_out),
                        l.rtt_us.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                    ),
                    None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
                };
                println!(
                    "{:<36} {:<12} {:<16} {:<12} {:<12} {:<20} {:>6} {bytes_in:>14} {bytes_out:>14} {rate_in:>12} {rate_out:>12} {rtt:>8} {}",
                    r.id,
                    r.user,
                    r.db,
                    r.db_user,
                    r.db_name,
                    rfc3339(r.started),
                    short_duration(now - r.started),
                    r.node.as_deref().unwrap_or("-")
                );
            }
            println!("(bytes: TCP payload of the client leg, counted by {source})");
            if offline > 0 {
                println!("({offline} session(s) on offline agents: as of their last heartbeat)");
            }
            Ok(())
        }
        Cmd::Sessions(SessionsCmd::Kill { id }) => {
            use sluice_handoff::handoff::{EndReason, Message, Role};
            let cfg = load_config(&cli.config)?;
            if cfg.auth_service.enabled {
                let state = open_state(&cfg)?;
                if let Some(host_id) = state.node_holding_session(&id)? {
                    return kill_on_agent(&state, &id, &host_id);
                }
            }
            let dp = cfg.dataplane.as_ref().with_context(|| {
                format!("no agent reported a session {id:?}, and no dataplane is configured here (dataplane.socket)")
            })?;
            let link = sluice_handoff::link::Link::connect(&dp.socket)
                .with_context(|| format!("connecting to the dataplane at {}", dp.socket.display()))?;
            link.set_read_timeout(Some(Duration::from_secs(5)))?;
            link.hello(Role::Admin).with_context(|| format!("greeting the dataplane at {}", dp.socket.display()))?;
            link.send(&Message::ListSessions, &[])?;
            match link.recv_reply()? {
                Message::Sessions { session_ids, .. } if session_ids.contains(&id) => {}
                Message::Sessions { .. } => bail!("the dataplane holds no session {id:?}"),
                other => bail!("unexpected answer from the dataplane: {other:?}"),
            }
            link.send(&Message::EndSession { session_id: id.clone(), reason: EndReason::AdminKill }, &[])?;
            println!("session {id} is being ended");
            Ok(())
        }
        Cmd::Locks(LocksCmd::Add { user, db, message, ttl }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let lock = state.add_lock(user.as_deref(), db.as_deref(), &message, ttl)?;
            println!("lock {} created", lock.id);
            Ok(())
        }
        Cmd::Locks(LocksCmd::Ls { format }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let locks = state.active_locks()?;
            if format == Format::Json {
                let rows: Vec<_> = locks
                    .iter()
                    .map(|l| {
                        serde_json::json!({ "id": l.id, "user": l.user, "db": l.db, "message": l.message,
                            "expires": l.expires_at.map(rfc3339), "created": rfc3339(l.created_at) })
                    })
                    .collect();
                return print_json(&rows);
            }
            println!("{:<10} {:<16} {:<20} {:<26} Message", "ID", "User", "Database", "Expires");
            for l in locks {
                let expires = l.expires_at.map(rfc3339).unwrap_or_else(|| "never".into());
                let any = || "*".to_owned();
                println!(
                    "{:<10} {:<16} {:<20} {:<26} {}",
                    l.id,
                    l.user.unwrap_or_else(any),
                    l.db.unwrap_or_else(any),
                    expires,
                    l.message
                );
            }
            Ok(())
        }
        Cmd::Locks(LocksCmd::Rm { id }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            if !state.delete_lock(&id)? {
                bail!("no lock {id:?}");
            }
            println!("lock {id} removed");
            Ok(())
        }
        Cmd::Nodes(NodesCmd::Ls { format }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            print_nodes(&state.nodes()?, &format)
        }
        Cmd::Nodes(NodesCmd::Rm { node }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let nodes = state.nodes()?;
            let found: Vec<_> = match nodes.iter().find(|n| n.host_id == node) {
                Some(n) => vec![n],
                None => nodes.iter().filter(|n| n.name == node).collect(),
            };
            match found.as_slice() {
                [] => bail!("no node with host ID or name {node:?} (see `control nodes ls`)"),
                [n] => {
                    if !state.delete_node(&n.host_id)? {
                        bail!("node {} was removed meanwhile", n.host_id);
                    }
                    println!("node {:?} (host ID {}) removed", n.name, n.host_id);
                }
                many => {
                    let ids: Vec<&str> = many.iter().map(|n| n.host_id.as_str()).collect();
                    bail!("{} nodes are named {node:?}; remove one by host ID: {}", many.len(), ids.join(", "))
                }
            }
            Ok(())
        }
        Cmd::Storage(StorageCmd::Export { out, include_audit }) => {
            let state = open_state(&load_config(&cli.config)?)?;
            let file = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&out)
            }
            .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let counts = state.export(&mut w, include_audit)?;
            eprintln!("exported from {} to {}: {}", state.backend(), out.display(), format_counts(&counts));
            Ok(())
        }
        Cmd::Storage(StorageCmd::Import { input }) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let file = std::fs::File::open(&input).with_context(|| format!("opening {}", input.display()))?;
            let counts = state.import(&mut std::io::BufReader::new(file))?;
            // Seals a plaintext CA key under this storage's KEK, if one is configured.
            state.ensure_ca(&cfg.auth_service.cluster_name)?;
            eprintln!("imported into {}: {}", state.backend(), format_counts(&counts));
            Ok(())
        }
        Cmd::Storage(StorageCmd::Kek(KekCmd::Rotate { to_file, to_kms, keep_old })) => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            let sealed = sealed_ca_key(&state)?;
            let (kek, previous) = cfg.auth_service.storage.keks();
            let ring = sluice_control::kek::KeyRing::load(
                kek.context("this config has no auth_service.storage.kek to open the CA key with")?,
                previous,
            )?;
            let to = sluice_control::kek::Kek::load(&sluice_control::kek::KekConfig {
                file: to_file,
                aws_kms: to_kms.map(|key_id| sluice_control::kek::KmsConfig {
                    key_id,
                    region: None,
                    endpoint_url: None,
                }),
            })?;
            let wrap = ring.rewrap(&cfg.auth_service.cluster_name, sluice_control::state::CA_NAME, &sealed, &to)?;
            let mut wraps: Vec<_> = if keep_old {
                sealed.wraps.into_iter().filter(|w| w.kek_id != wrap.kek_id).collect()
            } else {
                Vec::new()
            };
            wraps.push(wrap);
            state.set_ca_wraps(&wraps)?;
            let ids: Vec<&str> = wraps.iter().map(|w| w.kek_id.as_str()).collect();
            println!("the CA key is wrapped for {}", ids.join(", "));
            eprintln!("Now set auth_service.storage.kek to {} on every auth node.", to.id());
            Ok(())
        }
        Cmd::Storage(StorageCmd::Kek(KekCmd::Retire { id })) => {
            let state = open_state(&load_config(&cli.config)?)?;
            let sealed = sealed_ca_key(&state)?;
            if !sealed.wraps.iter().any(|w| w.kek_id == id) {
                bail!("the CA key has no wrap for {id}");
            }
            let left: Vec<_> = sealed.wraps.into_iter().filter(|w| w.kek_id != id).collect();
            if left.is_empty() {
                bail!("{id} is the CA key's only KEK: rotate to another one first");
            }
            state.set_ca_wraps(&left)?;
            println!(
                "retired {id}; the CA key is wrapped for {}",
                left.iter().map(|w| w.kek_id.as_str()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Cmd::Storage(StorageCmd::Kek(KekCmd::Ls)) => {
            let state = open_state(&load_config(&cli.config)?)?;
            for w in sealed_ca_key(&state)?.wraps {
                println!("{}", w.kek_id);
            }
            Ok(())
        }
        Cmd::Storage(StorageCmd::Kek(KekCmd::Generate { out })) => {
            let kek = sluice_control::kek::generate_file(&out)?;
            println!("{}", kek.id());
            eprintln!(
                "Wrote KEK {} to {} (mode 0600). Copy it to every auth node as a 0600 file and keep a copy \
                 offline: losing every KEK loses the CA.",
                kek.id(),
                out.display()
            );
            Ok(())
        }
        Cmd::Audit { limit } => {
            let cfg = load_config(&cli.config)?;
            let state = open_state(&cfg)?;
            for e in state.audit_events(limit)? {
                println!("{}", e.data);
            }
            Ok(())
        }
    }
}

/// How long `control sessions kill` waits for an agent to report a session gone.
const AGENT_KILL_WAIT: Duration = Duration::from_secs(5);

/// The rows of `control sessions ls` for the sessions agents reported; how many of them are on
/// offline agents (listed as of their last heartbeat).
fn agent_sessions(state: &State, rows: &mut Vec<SessionRow>) -> Result<usize> {
    use sluice_control::cluster::heartbeat::{now_ms, status_of, NodeStatus};
    let nodes: std::collections::HashMap<String, sluice_control::state::Node> =
        state.nodes()?.into_iter().map(|n| (n.host_id.clone(), n)).collect();
    let now = now_ms();
    let mut offline = 0;
    for s in state.node_sessions()? {
        let Some(node) = nodes.get(&s.host_id) else { continue };
        let where_ = match status_of(node, now) {
            NodeStatus::Offline => {
                offline += 1;
                let seen = node.heartbeat.as_ref().map(|h| h.at_ms).unwrap_or(node.last_seen * 1000);
                format!("{} (offline, last heartbeat {} ago)", node.name, short_duration((now - seen).div_euclid(1000)))
            }
            _ => node.name.clone(),
        };
        let f = s.fields;
        rows.push(SessionRow {
            id: f.session_id,
            user: f.user,
            db: f.db_service,
            db_user: f.db_user,
            db_name: f.db_name,
            started: s.started_at,
            live: None,
            node: Some(where_),
        });
    }
    Ok(offline)
}

/// One row of `control sessions ls`.
struct SessionRow {
    id: String,
    user: String,
    db: String,
    db_user: String,
    db_name: String,
    /// Unix seconds.
    started: i64,
    live: Option<LiveStats>,
    /// The agent holding it; `None` for this process's own.
    node: Option<String>,
}

impl SessionRow {
    fn json(&self) -> serde_json::Value {
        let live = self.live.as_ref();
        serde_json::json!({
            "session_id": self.id, "user": self.user, "db": self.db, "db_user": self.db_user,
            "db_name": self.db_name, "started": rfc3339(self.started), "node": self.node,
            "bytes_in": live.map(|l| l.bytes_in), "bytes_out": live.map(|l| l.bytes_out),
            "rate_in": live.map(|l| l.rate_in), "rate_out": live.map(|l| l.rate_out),
            "rtt_us": live.and_then(|l| l.rtt_us),
        })
    }
}

/// `control sessions kill` for a session an agent reported: a kill request the running auth
/// server sends to every agent, then a wait until that agent's heartbeats no longer list it.
fn kill_on_agent(state: &State, id: &str, host_id: &str) -> Result<()> {
    use sluice_control::cluster::heartbeat::{now_ms, status_of, NodeStatus};
    let node = state.node(host_id)?.with_context(|| format!("agent {host_id} was removed"))?;
    if status_of(&node, now_ms()) == NodeStatus::Offline {
        eprintln!(
            "warning: agent {} ({host_id}) is offline; it learns of the request only if it is still connected",
            node.name
        );
    }
    state.add_session_kill(id)?;
    let deadline = std::time::Instant::now() + AGENT_KILL_WAIT;
    loop {
        if state.node_holding_session(id)?.as_deref() != Some(host_id) {
            println!("session {id} on agent {} has ended", node.name);
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "asked agent {} ({host_id}) to end session {id}, but its heartbeats still list it after {} s: \
                 is the auth server running (`control start`), and the agent connected to it (`control nodes ls`)?",
                node.name,
                AGENT_KILL_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `control nodes ls`: a table, or JSON (one array) for scripts.
fn print_nodes(nodes: &[sluice_control::state::Node], format: &str) -> Result<()> {
    use sluice_control::cluster::heartbeat::{now_ms, status_of};
    let now = now_ms();
    match format {
        "json" => {
            let rows: Vec<serde_json::Value> = nodes
                .iter()
                .map(|n| {
                    let hb = n.heartbeat.as_ref();
                    serde_json::json!({
                        "host_id": n.host_id,
                        "name": n.name,
                        "node_index": n.node_index,
                        "role": n.role,
                        "labels": n.labels,
                        "postgres_addr": hb.map(|h| h.postgres_addr.as_str()),
                        "mysql_addr": hb.and_then(|h| h.mysql_addr.as_deref()),
                        "databases": hb.map(|h| h.databases.clone()).unwrap_or_default(),
                        "sessions": hb.map(|h| h.sessions).unwrap_or_default(),
                        "version": hb.map(|h| h.version.as_str()),
                        "heartbeat_interval_ms": hb.map(|h| h.interval_ms),
                        "last_heartbeat_ms": hb.map(|h| h.at_ms),
                        "joined_at": n.joined_at,
                        "last_seen": n.last_seen,
                        "cert_not_after": n.cert_not_after,
                        "status": status_of(n, now).as_str(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(rows));
        }
        "text" => {
            println!(
                "{:<32} {:<20} {:>5} {:<22} {:<22} {:<24} {:>8} {:<10} {:<14} Status",
                "Host ID", "Name", "Index", "Address", "MySQL", "Databases", "Sessions", "Last seen", "Cert expires"
            );
            let now_s = now.div_euclid(1000);
            for n in nodes {
                let hb = n.heartbeat.as_ref();
                let databases =
                    hb.map(|h| h.databases.join(",")).filter(|d| !d.is_empty()).unwrap_or_else(|| "-".into());
                let seen = hb.map(|h| h.at_ms.div_euclid(1000)).unwrap_or(n.last_seen);
                let expires = n.cert_not_after - now_s;
                println!(
                    "{:<32} {:<20} {:>5} {:<22} {:<22} {:<24} {:>8} {:<10} {:<14} {}",
                    n.host_id,
                    n.name,
                    n.node_index,
                    hb.map(|h| h.postgres_addr.as_str()).unwrap_or("-"),
                    hb.and_then(|h| h.mysql_addr.as_deref()).unwrap_or("-"),
                    databases,
                    hb.map(|h| h.sessions.to_string()).unwrap_or_else(|| "-".into()),
                    format!("{} ago", short_duration(now_s - seen)),
                    if expires >= 0 {
                        format!("in {}", short_duration(expires))
                    } else {
                        format!("expired {} ago", short_duration(-expires))
                    },
                    status_of(n, now).as_str()
                );
            }
        }
        other => bail!("unknown format {other:?} (text or json)"),
    }
    Ok(())
}

/// `42s`, `5m`, `3h`, `2d`: the largest whole unit.
fn short_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `control demo --dir DIR`: a [`Stack`], alice logged in, until Ctrl-C.
fn run_demo(dir: &Path) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Take over SIGINT/SIGTERM before starting anything, so a signal at any point runs the
    // cleanup below (Drop of the stack) instead of killing us with children left behind.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut interrupt, mut terminate) = {
        let _guard = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    let stack = Stack::start_demo(dir, &AwsCreds::demo())?;
    let state = stack.control.state()?;
    state.upsert_role(&dev_role("dev", &["demo"], &["alice"])?)?;
    // alice also administers the web console (live sessions, locks, audit).
    let admin: Role =
        sluice_control::config::from_yaml("kind: role\nversion: v7\nmetadata: {name: admin}\nspec: {admin: true}\n")?;
    state.upsert_role(&admin)?;
    let password = random_secret(8);
    state.add_user("alice", &password, &["dev".to_owned(), "admin".to_owned()])?;
    let home = stack.dir.join("home");
    let sluice = find_bin("sluice")?;
    let api = format!("127.0.0.1:{}", stack.control.api_port);
    let ca_file = stack.dir.join("control-ca.pem");
    std::fs::write(&ca_file, state.ensure_ca("sluice")?.cert_pem)?;
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(&sluice)
            .args(args)
            .env("SLUICE_HOME", &home)
            .env("SLUICE_PASSWORD", &password)
            .output()
            .with_context(|| format!("running sluice {args:?}"))?;
        if !out.status.success() {
            bail!("sluice {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["login", "--proxy", &api, "--user", "alice", "--ca-file", &ca_file.to_string_lossy()])?;
    run(&["db", "login", "demo", "--db-user", "alice", "--db-name", "demo"])?;
    let env = run(&["db", "env", "demo"])?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(stack.dir.join("alice-password"))?;
        writeln!(f, "{password}")?;
    }
    std::fs::write(stack.dir.join("env"), &env)?;
    let metrics_url = stack.control.metrics_url().unwrap_or_default();
    std::fs::write(stack.dir.join("metrics-url"), format!("{metrics_url}\n"))?;
    let d = stack.dir.display();
    let local = stack.control.config.proxy_service.local_socket.clone().context("the demo serves local sockets")?;
    // MySQL clients go through control's MySQL listener; the same role and user cover it.
    let mysql = match (&stack.mysql, stack.control.config.proxy_service.mysql_listen_addr) {
        (Some(m), Some(listen)) => format!(
            "\n\nMySQL: MariaDB 127.0.0.1:{mport} behind the emulator's MySQL mode \
             ({mendpoint}:{meport}), served as {mydb} on control's MySQL listener {listen}:\n\n\
             \x20 {sluice} db login {mydb} --db-user alice --db-name demo\n\
             \x20 {sluice} db connect {mydb}\n\n\
             (logs in {d}/emulator-mysql/emulator.log and {d}/mariadb/mariadb.log)",
            mport = m.mariadb.port(),
            mendpoint = m.emulator.endpoint,
            meport = m.emulator.port,
            mydb = DEMO_MYSQL_DB,
            sluice = sluice.display(),
        ),
        _ => "\n\nNo MySQL database: MariaDB is not installed or did not start (see above).".to_owned(),
    };
    std::fs::write(stack.dir.join("local-socket-dir"), local.dir.to_string_lossy().as_bytes())?;
    println!(
        "Sluice demo is running.\n\n\
         \x20 control (PostgreSQL)  localhost:{pg}\n\
         \x20 control (API)         {api}\n\
         \x20 RDS Proxy emulator    {endpoint}:{eport} (dialled on 127.0.0.1)\n\
         \x20 PostgreSQL            127.0.0.1:{pgport}\n\
         \x20 Metrics (Prometheus)  {metrics_url} (also in {d}/metrics-url)\n\
         \x20 Web console           {web} (alice; your browser does not know Sluice's CA)\n\n\
         Connect as alice (her `sluice login` password is in {d}/alice-password):\n\n\
         \x20 eval \"$(cat {d}/env)\"; psql\n\n\
         or with the CLI:\n\n\
         \x20 export SLUICE_HOME={d}/home\n\
         \x20 {sluice} db ls\n\
         \x20 {sluice} db connect demo\n\n\
         or, from this machine as {os_user} (mapped to alice; no TLS, both legs spliced):\n\n\
         \x20 psql \"host={local}/{plain} user=alice dbname=demo\"\n\n\
         Logs are in {d}/control/control.log, {d}/dataplane/dataplane.log and {d}/emulator/emulator.log.\n\
         Live sessions: {control} --config {d}/control/control.yaml sessions ls{mysql}\n\n\
         Ctrl-C stops everything.",
        pg = stack.control.pg_port,
        web = stack.control.config.auth_service.web_listen_addr.map(|a| format!("https://{a}/")).unwrap_or_default(),
        endpoint = stack.emulator.endpoint,
        eport = stack.emulator.port,
        pgport = stack.postgres.port,
        sluice = sluice.display(),
        os_user = local.users.keys().next().map(String::as_str).unwrap_or("?"),
        local = local.dir.display(),
        plain = DEMO_PLAIN_DB,
        control = std::env::current_exe().unwrap_or_else(|_| "control".into()).display(),
    );
    rt.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    });
    println!("stopping the demo");
    drop(stack);
    Ok(())
}

/// `control auth sign --format=db`: the server certificate (with the database CA after it, so
/// a client that trusts the CA can build the chain), its key (0600) and the database CA, which
/// PostgreSQL checks Sluice's client certificates against (users' own certificates do not chain
/// to it).
fn sign_db_server(ca: &sluice_control::ca::CertAuthority, hosts: &[String], out: &Path, ttl: Duration) -> Result<()> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        bail!("--host needs at least one name");
    }
    let (cert_pem, key_pem) = ca.issue_server_pem(&hosts, ttl)?;
    let with_ext = |ext: &str| {
        let mut p = out.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (crt, key_file, cas) = (with_ext(".crt"), with_ext(".key"), with_ext(".cas"));
    std::fs::write(&crt, cert_pem).with_context(|| format!("writing {}", crt.display()))?;
    sluice_control::private_fs::write_private(&key_file, key_pem.as_bytes())
        .with_context(|| format!("writing {}", key_file.display()))?;
    std::fs::write(&cas, &ca.cert_pem).with_context(|| format!("writing {}", cas.display()))?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    println!("Wrote {}, {} and {} for {}.", crt.display(), key_file.display(), cas.display(), hosts.join(", "));
    println!();
    println!("postgresql.conf:");
    println!("  ssl = on");
    println!("  ssl_cert_file = '{}'", abs(&crt));
    println!("  ssl_key_file = '{}'", abs(&key_file));
    println!("  ssl_ca_file = '{}'", abs(&cas));
    println!();
    println!("pg_hba.conf (Sluice's address instead of 0.0.0.0/0 where it is fixed):");
    println!("  hostssl all all 0.0.0.0/0 cert");
    println!("  hostssl all all ::/0 cert");
    println!();
    println!("Sluice's database entry:");
    println!("  uri: {}:5432", hosts[0]);
    println!("  auth: cert");
    Ok(())
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn list_times_read_as_dates_and_spans() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_547_200), "2025-12-01T00:00:00Z");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(relative(now + 3600 + 30), "in 1h");
        assert_eq!(relative(now - 3 * 86_400), "3d ago");
        assert!(relative(now + 30).starts_with("in "));
    }
}
