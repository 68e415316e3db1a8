//! The daemon's YAML configuration and the database resource format (`kind: db`, `version: v3`).
//!
//! The layout follows Teleport's teleport.yaml where it can (`db_service.databases`,
//! `db_service.resources`) so that users of the seed workflow recognise it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: Box<serde_saphyr::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite state (users, roles, CA, tokens, resources, audit) lives.
    pub data_dir: PathBuf,
    #[serde(default, serialize_with = "serialize_auth_service")]
    pub auth_service: AuthService,
    #[serde(default)]
    pub proxy_service: ProxyService,
    #[serde(default)]
    pub db_service: DbService,
    /// Cloud discovery: RDS Proxies in the configured accounts and regions become databases.
    #[serde(default, skip_serializing_if = "DiscoveryService::is_empty")]
    pub discovery_service: DiscoveryService,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Hand authenticated sessions to a `dataplane` process; without it control relays them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneConfig>,
    /// Serve Prometheus metrics; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// An agent (`auth_service.enabled: false`) joins the auth server named here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinConfig>,
}

/// How an agent joins its cluster: the auth server's cluster API, a join token, and the pin of
/// the cluster CA (`control status` prints it) that the auth server's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// `host:port` of each auth server's `cluster_listen_addr`: the agent uses the first that
    /// answers and moves to another when it fails. An old `auth_server: host:port` is read as
    /// a one-element list (setting both is a duplicate field).
    #[serde(alias = "auth_server", deserialize_with = "one_or_many")]
    pub auth_servers: Vec<String>,
    /// File holding the join token (`control tokens add --type=db`); read only for the first join.
    pub token_file: PathBuf,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo.
    pub ca_pin: String,
    /// The node's name in the cluster; defaults to the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// A list that may also be written as one string (`auth_server: x` before `auth_servers`).
pub(crate) fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a host:port or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
}

/// Whether `pin` has the form `sha256:<64 lowercase hex digits>`.
pub fn valid_ca_pin(pin: &str) -> bool {
    pin.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// A disabled auth service is written as `{enabled: false}`: its other settings mean nothing on
/// an agent, and spelling them out would suggest they do.
fn serialize_auth_service<S: serde::Serializer>(a: &AuthService, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Disabled {
        enabled: bool,
    }
    if a.enabled {
        a.serialize(s)
    } else {
        Disabled { enabled: false }.serialize(s)
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain HTTP listener serving `/metrics` (keep it on loopback or a private network: the
    /// per-session series name users and databases).
    pub listen_addr: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// The dataplane's control socket (`dataplane --control-socket`).
    pub socket: PathBuf,
    /// End sessions without traffic in either direction for this long (0s: never).
    #[serde(default = "zero_duration", with = "duration_str")]
    pub idle_timeout: Duration,
}

fn zero_duration() -> Duration {
    Duration::ZERO
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthService {
    /// Off on an agent, which then needs `join`.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// TLS listener for `sluice login` and the other client API calls.
    #[serde(default = "default_auth_addr")]
    pub listen_addr: SocketAddr,
    /// How long a `sluice login` lasts (and so the database certificates issued under it).
    #[serde(default = "default_session_ttl", with = "duration_str")]
    pub session_ttl: Duration,
    /// Database certificates last this long at most, within the login (`sluice proxy db --tunnel`
    /// fetches new ones as they expire); unset, as long as the login.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_str")]
    pub db_cert_ttl: Option<Duration>,
    /// Concurrent connections and unfinished requests on the API listener, in all and per source.
    #[serde(default)]
    pub limits: crate::limits::ConnectionLimits,
    /// HTTPS listener of the cluster API that agents join (and later renew and watch) through;
    /// off unless set (3026 by convention), so a single-process Sluice opens no port it does not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_listen_addr: Option<SocketAddr>,
    /// HTTPS listener of the web console (off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_listen_addr: Option<SocketAddr>,
    /// Lifetime of the host certificates issued to agents.
    #[serde(default = "default_host_cert_ttl", with = "duration_str")]
    pub host_cert_ttl: Duration,
    /// Where the cluster's state lives: embedded SQLite in `data_dir` (the default), or a
    /// PostgreSQL that several auth nodes share.
    #[serde(default, skip_serializing_if = "StorageConfig::is_default")]
    pub storage: StorageConfig,
}

/// `auth_service.storage`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    Sqlite {
        /// Seals the CA key in `sluice.db` (it is plaintext in a 0600 file otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kek: Option<crate::kek::KekConfig>,
        /// Keys still accepted while a rotation moves to `kek`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        previous_keks: Vec<crate::kek::KekConfig>,
    },
    Postgres(PostgresStorage),
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig::Sqlite { kek: None, previous_keks: Vec::new() }
    }
}

impl StorageConfig {
    fn is_default(&self) -> bool {
        *self == StorageConfig::default()
    }

    /// `sqlite` or `postgres`, as configured.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageConfig::Sqlite { .. } => "sqlite",
            StorageConfig::Postgres(_) => "postgres",
        }
    }

    /// The configured key-encryption keys: the current one first, then those kept for a rotation.
    pub fn keks(&self) -> (Option<&crate::kek::KekConfig>, &[crate::kek::KekConfig]) {
        match self {
            StorageConfig::Sqlite { kek, previous_keks } => (kek.as_ref(), previous_keks),
            StorageConfig::Postgres(p) => (Some(&p.kek), &p.previous_keks),
        }
    }
}

/// `auth_service.storage` with `type: postgres`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresStorage {
    /// libpq-style: `host=… port=… dbname=… user=… sslmode=verify-full sslrootcert=…`; no password.
    pub conn_string: String,
    /// A file holding the password, read at each new connection (so it can be rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Log in with an RDS IAM auth token instead of a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iam: Option<crate::pgconn::PgAwsIam>,
    /// Connections this node keeps to the database at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Seals the CA key: required, since the database is shared and backed up elsewhere.
    pub kek: crate::kek::KekConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_keks: Vec<crate::kek::KekConfig>,
}

impl PostgresStorage {
    /// The connection settings, as the connection layer takes them.
    pub fn connection(&self) -> crate::pgconn::PgStorage {
        crate::pgconn::PgStorage {
            conn_string: self.conn_string.clone(),
            password_file: self.password_file.clone(),
            aws_iam: self.aws_iam.clone(),
            pool_size: self.pool_size,
        }
    }
}

fn default_pool_size() -> usize {
    10
}

impl Default for AuthService {
    fn default() -> Self {
        AuthService {
            enabled: true,
            cluster_name: default_cluster_name(),
            listen_addr: default_auth_addr(),
            session_ttl: default_session_ttl(),
            db_cert_ttl: None,
            limits: Default::default(),
            cluster_listen_addr: None,
            web_listen_addr: None,
            host_cert_ttl: default_host_cert_ttl(),
            storage: StorageConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyService {
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Where PostgreSQL clients connect (TLS with client certificates).
    #[serde(default = "default_pg_addr")]
    pub postgres_listen_addr: SocketAddr,
    /// The host:port clients are told to use; defaults to the listen address.
    #[serde(default)]
    pub postgres_public_addr: Option<String>,
    /// Where MySQL and MariaDB clients connect (TLS with client certificates); no MySQL listener
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_listen_addr: Option<SocketAddr>,
    /// The host:port MySQL clients are told to use; defaults to the MySQL listen address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_public_addr: Option<String>,
    /// Extra DNS names and IPs for control's server certificate (localhost and the listen IPs are
    /// always included).
    #[serde(default)]
    pub public_names: Vec<String>,
    /// A client must finish TLS and the startup exchange within this time.
    #[serde(default = "default_handshake_timeout", with = "duration_str")]
    pub handshake_timeout: Duration,
    /// Plaintext PostgreSQL for clients on this host, over Unix sockets (see [`LocalSocket`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_socket: Option<LocalSocket>,
    /// End sessions without traffic in either direction for this long (0s, the default: never),
    /// whoever relays them; `dataplane.idle_timeout` says the same for older configs.
    #[serde(default = "zero_duration", with = "duration_str")]
    pub idle_timeout: Duration,
    /// Concurrent connections and unauthenticated handshakes per listener and per source;
    /// past them a client gets SQLSTATE 53300.
    #[serde(default)]
    pub limits: crate::limits::ConnectionLimits,
}

/// Local clients connect to `DIR/<database>/.s.PGSQL.5432` (`psql "host=DIR/<database> ..."`)
/// without TLS or certificates: the kernel tells control the peer's uid (SO_PEERCRED), which
/// `users` maps to a Sluice user whose roles then apply as usual. With a `tls.mode: disable`
/// upstream, both legs of such a session are spliced as is by the data plane.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSocket {
    pub dir: PathBuf,
    /// OS user name → Sluice user name. Unmapped OS users are refused.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
}

/// The PostgreSQL convention for a socket's file name; clients derive it from the port.
pub const LOCAL_SOCKET_PORT: u16 = 5432;

impl Default for ProxyService {
    fn default() -> Self {
        ProxyService {
            enabled: true,
            postgres_listen_addr: default_pg_addr(),
            postgres_public_addr: None,
            mysql_listen_addr: None,
            mysql_public_addr: None,
            public_names: Vec::new(),
            handshake_timeout: default_handshake_timeout(),
            local_socket: None,
            idle_timeout: Duration::ZERO,
            limits: Default::default(),
        }
    }
}

impl ProxyService {
    pub fn public_addr(&self) -> String {
        self.postgres_public_addr.clone().unwrap_or_else(|| self.postgres_listen_addr.to_string())
    }

    /// Where MySQL clients are told to connect: `mysql_public_addr`, else the MySQL listen
    /// address; none without either.
    pub fn mysql_addr(&self) -> Option<String> {
        self.mysql_public_addr.clone().or_else(|| self.mysql_listen_addr.map(|a| a.to_string()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DbService {
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Statically configured databases.
    #[serde(default)]
    pub databases: Vec<StaticDatabase>,
    /// Label selectors for dynamic resources (`control db add`) this control serves.
    #[serde(default)]
    pub resources: Vec<ResourceMatcher>,
    /// An agent admits new sessions from its cached policy for this long after it last heard
    /// from the auth server; live sessions are never ended for it.
    #[serde(default = "default_max_policy_staleness", with = "duration_str")]
    pub max_policy_staleness: Duration,
    /// How often an agent reports to its auth server; it counts as offline after 1.5 times this.
    #[serde(default = "default_heartbeat_interval", with = "duration_str")]
    pub heartbeat_interval: Duration,
}

impl Default for DbService {
    fn default() -> Self {
        DbService {
            enabled: true,
            databases: Vec::new(),
            resources: Vec::new(),
            max_policy_staleness: default_max_policy_staleness(),
            heartbeat_interval: default_heartbeat_interval(),
        }
    }
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticDatabase {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub static_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    pub spec: DatabaseSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceMatcher {
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub aws: Option<AwsSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryService {
    /// One matcher per account (role) and set of regions.
    #[serde(default)]
    pub aws: Vec<AwsMatcher>,
    /// How often every matcher is polled (and once at start).
    #[serde(default = "default_poll_interval", with = "duration_str")]
    pub poll_interval: Duration,
}

impl Default for DiscoveryService {
    fn default() -> Self {
        DiscoveryService { aws: Vec::new(), poll_interval: default_poll_interval() }
    }
}

impl DiscoveryService {
    pub fn is_empty(&self) -> bool {
        self.aws.is_empty() && self.poll_interval == default_poll_interval()
    }
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(300)
}

/// `discovery_service.aws[]`, as in teleport.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsMatcher {
    /// Resource types to discover; `rdsproxy` is supported.
    pub types: Vec<String>,
    pub regions: Vec<String>,
    /// Label selector over every label a discovered database gets (AWS tags included);
    /// `{"*": "*"}` or none matches all.
    #[serde(default)]
    pub tags: BTreeMap<String, crate::rbac::LabelValues>,
    /// Role assumed (from the default credential chain) for discovery, and for the IAM tokens of
    /// the databases this matcher finds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Dial discovered endpoints at this `host[:port]` instead of resolving them (like curl's
    /// --resolve; for private DNS or a local emulator). Names, TLS and tokens are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_addr_override: Option<String>,
    /// TLS settings given to every discovered database (e.g. a private CA).
    #[serde(default)]
    pub tls: TlsSpec,
}

impl AwsMatcher {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.types.is_empty() {
            return Err(ConfigError::Invalid("discovery_service.aws[].types is empty".into()));
        }
        if let Some(t) = self.types.iter().find(|t| t.as_str() != "rdsproxy") {
            return Err(ConfigError::Invalid(format!("discovery type {t:?} is not supported (rdsproxy is)")));
        }
        if self.regions.is_empty() {
            return Err(ConfigError::Invalid("discovery_service.aws[].regions is empty".into()));
        }
        if self.external_id.is_some() && self.assume_role_arn.is_none() {
            return Err(ConfigError::Invalid("external_id needs assume_role_arn".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines copy of the audit log; defaults to `<data_dir>/audit.log`.
    #[serde(default)]
    pub json_file: Option<PathBuf>,
}

#[allow(clippy::derivable_impls)]
impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { json_file: None }
    }
}

/// `DatabaseSpec::protocol` of PostgreSQL databases (and RDS Proxies of engine family POSTGRESQL).
pub const PROTOCOL_POSTGRES: &str = "postgres";
/// `DatabaseSpec::protocol` of MySQL and MariaDB databases (engine family MYSQL).
pub const PROTOCOL_MYSQL: &str = "mysql";

/// How to reach one database: shared by static databases and `kind: db` resources.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    pub protocol: String,
    /// `host:port` of the RDS Proxy endpoint. The host is also what the IAM token is signed for.
    pub uri: String,
    #[serde(default)]
    pub aws: AwsSpec,
    #[serde(default)]
    pub tls: TlsSpec,
    /// Dial this `host[:port]` instead of resolving the URI (like curl's --resolve): private DNS,
    /// or a local RDS Proxy emulator. The URI still names the endpoint for TLS and the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_addr: Option<String>,
    /// How Sluice logs in to the database as the route's database user.
    #[serde(default, skip_serializing_if = "UpstreamAuth::is_iam")]
    pub auth: UpstreamAuth,
}

/// How Sluice authenticates to the upstream database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuth {
    /// An RDS IAM auth token as the cleartext password (RDS Proxy, or RDS/Aurora directly).
    #[default]
    Iam,
    /// A short-lived client certificate from Sluice's CA with the database user as its Common
    /// Name, for PostgreSQL's `hostssl … cert` (self-hosted PostgreSQL; no AWS involved). Without
    /// `tls.ca_cert_file` the server certificate must also come from Sluice's CA
    /// (`control auth sign --format=db`).
    Cert,
}

impl UpstreamAuth {
    fn is_iam(&self) -> bool {
        *self == UpstreamAuth::Iam
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// Overrides the name checked in the server certificate (custom endpoints, IP URIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A CA added to the system roots for this database (for RDS/Aurora directly: the RDS
    /// global bundle). With `auth: cert` and no file, only Sluice's CA is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "TlsMode::is_verify_full")]
    pub mode: TlsMode,
}

/// How the upstream leg is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// TLS with the certificate checked against the name (what RDS Proxy needs).
    #[default]
    VerifyFull,
    /// No TLS: the leg is plain TCP and the data plane splices it as is. The IAM token crosses
    /// it in clear, so it is only accepted for a loopback dial target (a sidecar or test upstream).
    Disable,
}

impl TlsMode {
    fn is_verify_full(&self) -> bool {
        *self == TlsMode::VerifyFull
    }
}

impl DatabaseSpec {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.protocol != PROTOCOL_POSTGRES && self.protocol != PROTOCOL_MYSQL {
            return Err(ConfigError::Invalid(format!(
                "protocol {:?} is not supported (postgres and mysql are)",
                self.protocol
            )));
        }
        self.host_port()?;
        if self.auth == UpstreamAuth::Cert && self.protocol != PROTOCOL_POSTGRES {
            return Err(ConfigError::Invalid("auth: cert is only supported for protocol: postgres".into()));
        }
        if self.auth == UpstreamAuth::Cert && self.tls.mode != TlsMode::VerifyFull {
            return Err(ConfigError::Invalid(
                "auth: cert needs tls.mode: verify-full (the certificate is presented in the TLS handshake)".into(),
            ));
        }
        if self.tls.mode == TlsMode::Disable {
            let (host, _) = self.dial_target()?;
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(ConfigError::Invalid(format!(
                    "tls.mode: disable sends the IAM token in clear; it is only allowed for a loopback address, not {host:?}"
                )));
            }
        }
        Ok(())
    }

    /// Whether clients reach this database through the MySQL listener.
    pub fn is_mysql(&self) -> bool {
        self.protocol == PROTOCOL_MYSQL
    }

    /// Splits the URI into host and port (default 5432, or 3306 for MySQL).
    pub fn host_port(&self) -> Result<(String, u16), ConfigError> {
        let default_port = if self.is_mysql() { 3306 } else { 5432 };
        Ok(split_host_port(&self.uri, default_port)?)
    }

    /// The region: configured, or read from an `*.REGION.rds.amazonaws.com` host.
    pub fn region(&self) -> Option<String> {
        if let Some(r) = &self.aws.region {
            return Some(r.clone());
        }
        let (host, _) = self.host_port().ok()?;
        let labels: Vec<&str> = host.split('.').collect();
        let n = labels.len();
        (n >= 4 && labels[n - 3] == "rds" && labels[n - 2] == "amazonaws" && labels[n - 1] == "com")
            .then(|| labels[n - 4].to_owned())
    }

    pub fn dial_target(&self) -> Result<(String, u16), ConfigError> {
        let (host, port) = self.host_port()?;
        match &self.connect_addr {
            Some(addr) => Ok(split_host_port(addr, port)?),
            None => Ok((host, port)),
        }
    }

    pub fn tls_server_name(&self) -> Result<String, ConfigError> {
        match &self.tls.server_name {
            Some(n) => Ok(n.clone()),
            None => Ok(self.host_port()?.0),
        }
    }
}

pub use sluice_api::addr::split_host_port;

/// Inside a configuration, a bad address is a configuration error like any other.
impl From<sluice_api::addr::AddrError> for ConfigError {
    fn from(e: sluice_api::addr::AddrError) -> Self {
        ConfigError::Invalid(e.to_string())
    }
}

/// The `kind: db` resource, as `control db add -f` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DbResource {
    pub kind: String,
    pub version: String,
    pub metadata: Metadata,
    pub spec: DatabaseSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl DbResource {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kind != "db" || self.version != "v3" {
            return Err(ConfigError::Invalid(format!(
                "expected kind: db, version: v3; got kind: {}, version: {}",
                self.kind, self.version
            )));
        }
        validate_name(&self.metadata.name)?;
        self.spec.validate()
    }
}

pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!("name {name:?} must be 1-128 of [A-Za-z0-9._-]")))
    }
}

/// Parses YAML (config, roles) with only `true`/`false` as booleans, as YAML 1.2 and serde_yaml
/// have it: serde-saphyr would also take YAML 1.1's `yes`/`on`/`off` by default.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Box<serde_saphyr::Error>> {
    serde_saphyr::from_str_with_options(text, serde_saphyr::options! { strict_booleans: true, null_as_string: true })
        .map_err(Box::new)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg: Config = from_yaml(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for db in &self.db_service.databases {
            validate_name(&db.name)?;
            db.spec.validate()?;
            if !seen.insert(db.name.as_str()) {
                return Err(ConfigError::Invalid(format!("database {:?} is defined twice", db.name)));
            }
        }
        for m in &self.discovery_service.aws {
            m.validate()?;
        }
        if self.db_service.heartbeat_interval.is_zero()
            || self.db_service.heartbeat_interval > crate::cluster::heartbeat::MAX_INTERVAL
        {
            return Err(ConfigError::Invalid(format!(
                "db_service.heartbeat_interval must be between 1s and {}s",
                crate::cluster::heartbeat::MAX_INTERVAL.as_secs()
            )));
        }
        match (&self.join, self.auth_service.enabled) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid(
                    "join is for agents: set auth_service.enabled: false, or remove join".into(),
                ))
            }
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "auth_service is disabled, so this is an agent: it needs a join section \
                     (auth_servers, token_file, ca_pin)"
                        .into(),
                ))
            }
            _ => {}
        }
        if let Some(join) = &self.join {
            if !(self.proxy_service.enabled && self.db_service.enabled) {
                return Err(ConfigError::Invalid(
                    "an agent serves databases: proxy_service and db_service must be enabled".into(),
                ));
            }
            if !valid_ca_pin(&join.ca_pin) {
                return Err(ConfigError::Invalid(format!(
                    "join.ca_pin {:?} must be sha256:<64 lowercase hex digits> (as `control status` prints it)",
                    join.ca_pin
                )));
            }
            if join.auth_servers.is_empty() {
                return Err(ConfigError::Invalid("join.auth_servers names no auth server".into()));
            }
            for addr in &join.auth_servers {
                split_host_port(addr, 3026)
                    .map_err(|e| ConfigError::Invalid(format!("join.auth_servers: {addr:?}: {e}")))?;
            }
            if !self.discovery_service.aws.is_empty() {
                return Err(ConfigError::Invalid("discovery_service runs on the auth server, not on an agent".into()));
            }
        }
        Ok(())
    }

    /// Whether this process is an agent: no auth service, identity from joining one.
    pub fn is_agent(&self) -> bool {
        !self.auth_service.enabled
    }

    /// The idle timeout of every session: `proxy_service.idle_timeout`, else the data plane's.
    pub fn idle_timeout(&self) -> Duration {
        match self.proxy_service.idle_timeout {
            d if !d.is_zero() => d,
            _ => self.dataplane.as_ref().map(|d| d.idle_timeout).unwrap_or_default(),
        }
    }

    pub fn audit_json_file(&self) -> PathBuf {
        self.audit.json_file.clone().unwrap_or_else(|| self.data_dir.join("audit.log"))
    }
}

fn default_cluster_name() -> String {
    "sluice".to_owned()
}
fn default_auth_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3025))
}
fn default_max_policy_staleness() -> Duration {
    Duration::from_secs(600)
}
fn default_host_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_pg_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5433))
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Why a duration (a command-line flag or a config value) did not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error("bad duration {0:?}")]
    Number(String),
    #[error("bad duration unit in {0:?} (use s, m, h or d)")]
    Unit(String),
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

/// Parses `90s`, `15m`, `12h`, `2d` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| DurationError::Number(s.to_owned()))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(DurationError::Unit(s.to_owned())),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| DurationError::TooLarge(s.to_owned()))
}

mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod option_duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_style_config() {
        let y = r#"
data_dir: /tmp/x
db_service:
  databases:
    - name: rds-proxy
      description: RDS Proxy in us-west-1
      protocol: postgres
      uri: my-proxy.proxy-abcdefghijkl.us-west-1.rds.amazonaws.com:5432
      static_labels: {env: dev}
      aws:
        assume_role_arn: arn:aws:iam::123456789012:role/example-rds-access-role
      tls:
        server_name: my-proxy.proxy-abcdefghijkl.us-west-1.rds.amazonaws.com
  resources:
    - labels: {env: prod}
      aws: {assume_role_arn: "arn:aws:iam::123456789012:role/x"}
"#;
        let c: Config = serde_saphyr::from_str(y).unwrap();
        c.validate().unwrap();
        assert_eq!(c.db_service.databases[0].spec.region().as_deref(), Some("us-west-1"));
        assert_eq!(c.proxy_service.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn rejects_unknown_fields_and_protocols() {
        assert!(serde_saphyr::from_str::<Config>("data_dir: /x\nbogus: 1\n").is_err());
        let mut spec = DatabaseSpec {
            protocol: "sqlserver".into(),
            uri: "h:1".into(),
            aws: Default::default(),
            tls: Default::default(),
            connect_addr: None,
            auth: Default::default(),
        };
        assert!(spec.validate().is_err());
        spec.protocol = PROTOCOL_MYSQL.into();
        spec.validate().unwrap();
        spec.uri = "h".into();
        assert_eq!(spec.host_port().unwrap().1, 3306);
        spec.auth = UpstreamAuth::Cert;
        assert!(spec.validate().is_err(), "auth: cert is PostgreSQL's");
    }

    const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn agent_yaml(pin: &str) -> String {
        format!(
            "data_dir: /x\nauth_service: {{enabled: false}}\njoin:\n  auth_server: auth.example:3026\n  \
             token_file: /x/token\n  ca_pin: {pin}\n"
        )
    }

    #[test]
    fn agent_config_parses_and_validates() {
        let c: Config = from_yaml(&agent_yaml(PIN)).unwrap();
        c.validate().unwrap();
        assert!(c.is_agent());
        assert!(c.proxy_service.enabled && c.db_service.enabled);
        assert_eq!(c.join.as_ref().unwrap().token_file, PathBuf::from("/x/token"));
        // Serialized back, it parses to the same agent (defaults stay implicit).
        let again: Config = from_yaml(&serde_saphyr::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.join, c.join);
        assert!(!again.auth_service.enabled);
    }

    #[test]
    fn existing_configs_are_single_process() {
        let c: Config = from_yaml("data_dir: /x\n").unwrap();
        c.validate().unwrap();
        assert!(!c.is_agent());
        assert!(c.auth_service.enabled && c.proxy_service.enabled && c.db_service.enabled);
        assert_eq!(c.auth_service.cluster_listen_addr, None, "the cluster API is opt-in");
        assert_eq!(c.auth_service.host_cert_ttl, Duration::from_secs(86400));
        // `enabled: true` is the default and is not written out.
        assert!(!serde_saphyr::to_string(&c).unwrap().contains("enabled"));
    }

    #[test]
    fn agent_validation_refusals() {
        let no_join: Config = from_yaml("data_dir: /x\nauth_service: {enabled: false}\n").unwrap();
        assert!(no_join.validate().unwrap_err().to_string().contains("needs a join section"));
        let join_with_auth: Config = from_yaml(&agent_yaml(PIN).replace("enabled: false", "enabled: true")).unwrap();
        assert!(join_with_auth.validate().unwrap_err().to_string().contains("auth_service.enabled: false"));
        for bad in ["sha256:abc", "md5:0123", &PIN.to_uppercase(), &PIN.replace("sha256:", "sha256:x")] {
            let c: Config = from_yaml(&agent_yaml(&format!("\"{bad}\""))).unwrap();
            assert!(c.validate().unwrap_err().to_string().contains("ca_pin"), "{bad}");
        }
        let no_proxy: Config = from_yaml(&format!("{}proxy_service: {{enabled: false}}\n", agent_yaml(PIN))).unwrap();
        assert!(no_proxy.validate().unwrap_err().to_string().contains("must be enabled"));
        let discovery: Config = from_yaml(&format!(
            "{}discovery_service:\n  aws: [{{types: [rdsproxy], regions: [us-east-1]}}]\n",
            agent_yaml(PIN)
        ))
        .unwrap();
        assert!(discovery.validate().unwrap_err().to_string().contains("discovery_service"));
    }

    #[test]
    fn auth_servers_are_a_list_and_the_old_single_address_still_reads() {
        let old: Config = from_yaml(&agent_yaml(PIN)).unwrap();
        old.validate().unwrap();
        assert_eq!(old.join.as_ref().unwrap().auth_servers, ["auth.example:3026"]);
        // Written back as the list.
        let text = serde_saphyr::to_string(&old).unwrap();
        assert!(text.contains("auth_servers") && !text.contains("auth_server:"), "{text}");

        let list =
            agent_yaml(PIN).replace("auth_server: auth.example:3026", "auth_servers: [a.example:3026, '[::1]:4000']");
        let c: Config = from_yaml(&list).unwrap();
        c.validate().unwrap();
        assert_eq!(c.join.as_ref().unwrap().auth_servers, ["a.example:3026", "[::1]:4000"]);
        let again: Config = from_yaml(&serde_saphyr::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.join, c.join);

        let both = agent_yaml(PIN).replace("  auth_server:", "  auth_servers: [b.example:3026]\n  auth_server:");
        assert!(from_yaml::<Config>(&both).is_err(), "auth_server and auth_servers both set");
        let empty = agent_yaml(PIN).replace("auth_server: auth.example:3026", "auth_servers: []");
        let c: Config = from_yaml(&empty).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("names no auth server"));
        let bad = agent_yaml(PIN).replace("auth_server: auth.example:3026", "auth_servers: [a.example:3026, 'b:x']");
        let c: Config = from_yaml(&bad).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("join.auth_servers") && err.contains("b:x"), "{err}");
    }

    #[test]
    fn heartbeat_interval_defaults_and_is_checked() {
        let c: Config = from_yaml(&agent_yaml(PIN)).unwrap();
        assert_eq!(c.db_service.heartbeat_interval, Duration::from_secs(10));
        let fast: Config = from_yaml(&format!("{}db_service: {{heartbeat_interval: 1s}}\n", agent_yaml(PIN))).unwrap();
        fast.validate().unwrap();
        assert_eq!(fast.db_service.heartbeat_interval, Duration::from_secs(1));
        for bad in ["0s", "2h"] {
            let c: Config =
                from_yaml(&format!("{}db_service: {{heartbeat_interval: {bad}}}\n", agent_yaml(PIN))).unwrap();
            assert!(c.validate().unwrap_err().to_string().contains("heartbeat_interval"), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43200)));
        assert_eq!(parse_duration("3w"), Err(DurationError::Unit("3w".into())));
        assert_eq!(parse_duration("x"), Err(DurationError::Number("x".into())));
        // Too many digits for a u64 is a bad number; a product past it is too large.
        assert_eq!(parse_duration("99999999999999999999d"), Err(DurationError::Number("99999999999999999999d".into())));
        assert_eq!(parse_duration("9999999999999999d"), Err(DurationError::TooLarge("9999999999999999d".into())));
    }

    #[test]
    fn upstream_auth_defaults_to_iam_and_cert_needs_verify_full() {
        let db = |extra: &str| {
            let y = format!("protocol: postgres\nuri: db.example.com:5432\n{extra}");
            from_yaml::<DatabaseSpec>(&y).unwrap()
        };
        let old = db("");
        assert_eq!(old.auth, UpstreamAuth::Iam);
        assert!(!serde_saphyr::to_string(&old).unwrap().contains("auth"), "the default is not written out");
        let cert = db("auth: cert\n");
        assert_eq!(cert.auth, UpstreamAuth::Cert);
        cert.validate().unwrap();
        assert!(serde_saphyr::to_string(&cert).unwrap().contains("auth: cert"));
        let plain = db("auth: cert\nconnect_addr: 127.0.0.1:5432\ntls: {mode: disable}\n");
        let err = plain.validate().unwrap_err().to_string();
        assert!(err.contains("verify-full"), "{err}");
        assert!(from_yaml::<DatabaseSpec>("protocol: postgres\nuri: h:1\nauth: password\n").is_err());
    }
}
