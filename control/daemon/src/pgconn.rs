//! Connections to the PostgreSQL that holds the auth state (`auth_service.storage: {type:
//! postgres}`): the operator's conn string checked and split into what tokio-postgres takes, TLS
//! with verify-full over rustls, the password read fresh from a file or an RDS IAM token minted
//! per connection, and the spawned connection drivers (one of which forwards LISTEN/NOTIFY).
//!
//! The storage holds the CA key envelope, password hashes and login tokens, so anything short of
//! verify-full (the server's certificate chained to `sslrootcert` and issued for the host) is
//! refused: a man in the middle could otherwise read or rewrite the auth state. Passwords never
//! live in the conn string, a log line, an error or Debug output.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::iam::{CredentialSource, IamError, TokenMinter, TokenTarget};

/// Every storage statement is a point query or a short transaction; one running longer is stuck
/// (a lock, a sick server) and would hold a pool slot and a blocked caller.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Used when the conn string sets no `connect_timeout`: an unreachable server fails a connect
/// instead of hanging the caller for the OS's TCP timeout (minutes).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Used when the conn string sets no `keepalives_idle`: a LISTEN connection is idle for long
/// stretches, and a server that vanished must be noticed in well under the OS default of 2 h.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// The `application_name` unless the conn string sets one (it shows in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "sluice";
/// A password file larger than this is not a password file.
const MAX_PASSWORD_FILE: u64 = 64 * 1024;

/// `auth_service.storage` with `type: postgres`: where the shared auth state lives and how to
/// log in to it. The KEK that wraps the CA key is configured beside it, not here.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgStorage {
    /// libpq key=value (`host=… port=… dbname=… user=… sslmode=verify-full sslrootcert=…`) or a
    /// `postgres://` URL. `sslmode=verify-full` and `sslrootcert` (a PEM file or `system`) are
    /// required except for a Unix-socket host; `password` is refused.
    pub conn_string: String,
    /// A file holding the password (one trailing newline ignored), read at every new connection
    /// so a rotated password needs no restart. Mode 0600 or stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Log in with an RDS IAM auth token (RDS, Aurora, RDS Proxy), minted per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iam: Option<PgAwsIam>,
    /// Connections kept open to the storage (the pool's ceiling).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    10
}

/// IAM authentication for the storage: credentials from the standard AWS chain (environment,
/// profile, IMDS, ECS/EKS), optionally through `sts:AssumeRole`, exactly as for databases.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgAwsIam {
    /// The region the token is signed for; optional for `*.REGION.rds.amazonaws.com` hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

#[derive(Debug, Error)]
pub enum PgConnError {
    /// The conn string or the credential settings are unusable; the message names the key.
    #[error("storage conn_string: {0}")]
    Config(String),
    #[error("storage password_file {path}: {message}")]
    PasswordFile { path: PathBuf, message: String },
    #[error("storage sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("storage TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The server's certificate does not chain to `sslrootcert`.
    #[error(
        "the storage server's certificate failed verification against sslrootcert {roots} ({reason}); \
         sslrootcert must hold the CA that issued it (for RDS, the regional or global bundle)"
    )]
    Untrusted { roots: String, reason: String },
    /// The server's certificate chains to `sslrootcert` but is not issued for the host dialed.
    #[error(
        "the storage server's certificate is not valid for host {host} ({reason}); verify-full checks \
         that the certificate names the conn string's host"
    )]
    WrongName { host: String, reason: String },
    #[error("minting an RDS IAM token for the storage: {0}")]
    Iam(#[from] IamError),
    #[error("connecting to the storage ({target}): {detail}")]
    Connect {
        /// The redacted conn string.
        target: String,
        /// `source` with its causes (tokio-postgres's own message is only "db error").
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("setting up a storage connection: {detail}")]
    Setup {
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `e` and its causes, `: `-separated: tokio-postgres puts the useful part (the server's
/// message, the unknown option) in the cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// The TLS requirement of a parsed conn string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// verify-full against the PEM CAs in this file.
    RootCertFile(PathBuf),
    /// verify-full against the system's trust store (`sslrootcert=system`).
    System,
    /// No TLS: every host is a Unix-socket directory.
    UnixSocket,
}

/// A conn string split into what tokio-postgres parses and what Sluice enforces itself; no I/O.
#[derive(Debug, Clone)]
pub struct ParsedConnString {
    /// tokio-postgres's config, without sslmode, sslrootcert or any password.
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
    /// The conn string safe to log (a password, if one was there, masked).
    pub redacted: String,
    /// Keys the operator set (after aliases), so defaults apply only to the rest.
    keys: Vec<String>,
}

/// Splits and checks a conn string: libpq key=value or a `postgres://`/`postgresql://` URL.
pub fn parse_conn_string(conn_string: &str) -> Result<ParsedConnString, PgConnError> {
    let (pairs, rebuild): (Vec<(String, String)>, Rebuild) = if is_url(conn_string) {
        let url = split_url(conn_string)?;
        if url.has_userinfo_password {
            return Err(password_refused());
        }
        (url.params.iter().map(|p| (p.key.clone(), p.value.clone())).collect(), Rebuild::Url(url))
    } else {
        let pairs = tokenize_key_values(conn_string)?;
        (pairs, Rebuild::KeyValue)
    };
    if pairs.iter().any(|(k, _)| k == "password" || k == "passfile") {
        return Err(password_refused());
    }
    let mut sslmode = None;
    let mut sslrootcert = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "sslmode" => sslmode = Some(v.clone()),
            "sslrootcert" => sslrootcert = Some(v.clone()),
            // Client certificates are not supported: say so rather than "unknown option".
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" | "sslcompression" | "requiressl" => {
                return Err(PgConnError::Config(format!(
                    "{k} is not supported (the storage connection uses verify-full with sslrootcert and a password or \
                     IAM token)"
                )))
            }
            _ => {}
        }
    }
    let kept: Vec<(String, String)> =
        pairs.iter().filter(|(k, _)| k != "sslmode" && k != "sslrootcert").cloned().collect();
    let rebuilt = match &rebuild {
        Rebuild::KeyValue => kept.iter().map(|(k, v)| format!("{k}={}", quote_value(v))).collect::<Vec<_>>().join(" "),
        Rebuild::Url(url) => url.rebuild(&["sslmode", "sslrootcert"]),
    };
    let mut config = tokio_postgres::Config::from_str(&rebuilt)
        .map_err(|e| PgConnError::Config(format!("{} (in {})", error_chain(&e), redact(conn_string))))?;
    let hosts = config.get_hosts().to_vec();
    if hosts.is_empty() {
        return Err(PgConnError::Config(
            "no host: set host= (a DNS name or IP for TLS verification, or a Unix-socket directory)".into(),
        ));
    }
    let unix = hosts.iter().filter(|h| is_unix(h)).count();
    let tls =
        if unix == hosts.len() {
            match sslmode.as_deref() {
                None | Some("disable") | Some("verify-full") => PgTls::UnixSocket,
                Some(m) => return Err(weak_sslmode(m)),
            }
        } else if unix > 0 {
            return Err(PgConnError::Config(
                "host mixes Unix-socket directories and network hosts; use one kind (TLS runs only over TCP)".into(),
            ));
        } else {
            match sslmode.as_deref() {
            Some("verify-full") => {}
            Some(m) => return Err(weak_sslmode(m)),
            None => return Err(PgConnError::Config(
                "no sslmode: set sslmode=verify-full (with sslrootcert); the storage holds Sluice's CA key envelope, \
                     users and login tokens, and only verify-full stops a man in the middle"
                    .into(),
            )),
        }
            match sslrootcert.as_deref() {
                Some("system") => PgTls::System,
                Some("") | None => return Err(PgConnError::Config(
                    "no sslrootcert: verify-full needs the CA to check the server against, a PEM file (for RDS, the \
                     region's or the global bundle) or `system` for the system trust store"
                        .into(),
                )),
                Some(path) => PgTls::RootCertFile(PathBuf::from(path)),
            }
        };
    if config.get_user().is_none_or(str::is_empty) {
        return Err(PgConnError::Config("no user: set user= (the role Sluice logs in as)".into()));
    }
    let keys: Vec<String> = pairs.iter().map(|(k, _)| canonical_key(k).to_owned()).collect();
    if tls == PgTls::UnixSocket {
        config.ssl_mode(SslMode::Disable);
    } else {
        // The TLS connector does the verification; Require only makes tokio-postgres insist on TLS.
        config.ssl_mode(SslMode::Require);
    }
    Ok(ParsedConnString { config, tls, redacted: redact(conn_string), keys })
}

fn password_refused() -> PgConnError {
    PgConnError::Config(
        "a password in conn_string is refused (it would sit in the config and show in logs); use password_file or \
         aws_iam"
            .into(),
    )
}

fn weak_sslmode(mode: &str) -> PgConnError {
    let hint =
        if mode == "disable" { "; sslmode=disable is accepted only with a Unix-socket host (host=/dir)" } else { "" };
    PgConnError::Config(format!(
        "sslmode={mode} is refused: sslmode=verify-full is required (the server's certificate checked against \
         sslrootcert and for the host name). The storage holds Sluice's CA key envelope, users and login tokens; \
         anything weaker lets a man in the middle read or change them{hint}"
    ))
}

fn is_unix(h: &Host) -> bool {
    matches!(h, Host::Unix(_))
}

/// libpq's URL query spelling of a few keys, mapped to the key=value name.
fn canonical_key(k: &str) -> &str {
    match k {
        "ssl" => "sslmode",
        other => other,
    }
}

enum Rebuild {
    KeyValue,
    Url(SplitUrl),
}

fn is_url(s: &str) -> bool {
    let s = s.trim_start();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Splits libpq's key=value form: `key = value` pairs separated by whitespace; a value is either
/// single-quoted (`\'` and `\\` escape) or runs to the next whitespace (a backslash escapes the
/// next character).
pub fn tokenize_key_values(s: &str) -> Result<Vec<(String, String)>, PgConnError> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(PgConnError::Config(format!("missing \"=\" after {:?}", short(&key))));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(PgConnError::Config(format!("unterminated quoted value for {}", short(&key)))),
                    Some('\'') => break,
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(PgConnError::Config(format!("unterminated quoted value for {}", short(&key))))
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(PgConnError::Config("a value with no key".into()));
        }
        out.push((key, value));
    }
}

/// A key from operator input, cut short for an error message.
fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

fn quote_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

struct UrlParam {
    raw: String,
    key: String,
    value: String,
}

struct SplitUrl {
    base: String,
    params: Vec<UrlParam>,
    has_userinfo_password: bool,
}

impl SplitUrl {
    fn rebuild(&self, drop: &[&str]) -> String {
        let kept: Vec<&str> =
            self.params.iter().filter(|p| !drop.contains(&p.key.as_str())).map(|p| p.raw.as_str()).collect();
        if kept.is_empty() {
            self.base.clone()
        } else {
            format!("{}?{}", self.base, kept.join("&"))
        }
    }
}

fn split_url(s: &str) -> Result<SplitUrl, PgConnError> {
    let s = s.trim();
    let (base, query) = match s.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (s, None),
    };
    let after_scheme = base.split_once("://").map(|(_, r)| r).unwrap_or("");
    let authority = after_scheme.split('/').next().unwrap_or("");
    let has_userinfo_password = authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'));
    let mut params = Vec::new();
    for raw in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = raw.split_once('=').unwrap_or((raw, ""));
        let key = percent_decode(k)?;
        let key = canonical_key(&key).to_owned();
        params.push(UrlParam { raw: raw.to_owned(), key, value: percent_decode(v)? });
    }
    Ok(SplitUrl { base: base.to_owned(), params, has_userinfo_password })
}

/// `%XX` decoding as libpq does it for URLs (`+` stays `+`).
fn percent_decode(s: &str) -> Result<String, PgConnError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(v) => out.push(v),
                None => return Err(PgConnError::Config("a bad %-escape in the URL".into())),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgConnError::Config("a %-escape in the URL that is not UTF-8".into()))
}

/// `conn_string` fit for a log line or an error: any password (key=value or in a URL's user
/// info or query) is replaced by `<redacted>`. A string that does not tokenize is replaced whole,
/// since where its password is cannot be told.
pub fn redact(conn_string: &str) -> String {
    const MASK: &str = "<redacted>";
    if is_url(conn_string) {
        let Ok(url) = split_url(conn_string) else { return "<unparseable conn_string>".into() };
        let base = match url.base.split_once("://") {
            Some((scheme, rest)) => {
                let (authority, path) = match rest.find('/') {
                    Some(i) => rest.split_at(i),
                    None => (rest, ""),
                };
                let authority = match authority.rsplit_once('@') {
                    Some((userinfo, hosts)) => match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:{MASK}@{hosts}"),
                        None => authority.to_owned(),
                    },
                    None => authority.to_owned(),
                };
                format!("{scheme}://{authority}{path}")
            }
            None => url.base.clone(),
        };
        let params: Vec<String> = url
            .params
            .iter()
            .map(|p| if p.key == "password" { format!("password={MASK}") } else { p.raw.clone() })
            .collect();
        if params.is_empty() {
            base
        } else {
            format!("{base}?{}", params.join("&"))
        }
    } else {
        match tokenize_key_values(conn_string) {
            Ok(pairs) => pairs
                .iter()
                .map(|(k, v)| {
                    if k == "password" {
                        format!("{k}={MASK}")
                    } else if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
                        format!("{k}={}", quote_value(v))
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => "<unparseable conn_string>".into(),
        }
    }
}

enum Credential {
    /// Peer or trust authentication over a Unix socket.
    None,
    PasswordFile(PathBuf),
    Iam {
        minter: Arc<TokenMinter>,
        source: CredentialSource,
        target: TokenTarget,
    },
}

/// Opens connections to the storage PostgreSQL: built once from [`PgStorage`], then each
/// [`PgConnector::connect`] logs in afresh (a rotated password or a new IAM token is picked up).
pub struct PgConnector {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    /// How `sslrootcert` is named in errors: the file, or `system`.
    roots: String,
    redacted: String,
    credential: Credential,
    pool_size: usize,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let credential = match &self.credential {
            Credential::None => "none".to_owned(),
            Credential::PasswordFile(p) => format!("password_file {}", p.display()),
            Credential::Iam { source, .. } => format!("aws_iam (region {})", source.region),
        };
        f.debug_struct("PgConnector")
            .field("conn_string", &self.redacted)
            .field("credential", &credential)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PgConnector {
    /// Checks `storage` and prepares TLS: reads `sslrootcert`, and checks that the password file
    /// exists with a private mode (so a wrong setting fails at start, not at the first query).
    pub fn new(storage: &PgStorage) -> Result<PgConnector, PgConnError> {
        Self::with_minter(storage, Arc::new(TokenMinter::new()))
    }

    /// As [`PgConnector::new`], minting IAM tokens with `minter` (shared with the upstream
    /// connections, so credentials are resolved once).
    pub fn with_minter(storage: &PgStorage, minter: Arc<TokenMinter>) -> Result<PgConnector, PgConnError> {
        let parsed = parse_conn_string(&storage.conn_string)?;
        if storage.pool_size == 0 {
            return Err(PgConnError::Config("pool_size must be at least 1".into()));
        }
        let mut config = parsed.config.clone();
        let set = |k: &str| parsed.keys.iter().any(|key| key == k);
        if !set("application_name") {
            config.application_name(APPLICATION_NAME);
        }
        if !set("connect_timeout") {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if !set("keepalives_idle") {
            config.keepalives_idle(DEFAULT_KEEPALIVES_IDLE);
        }
        let direct = config.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Direct;
        let (tls, roots) = match &parsed.tls {
            PgTls::UnixSocket => (None, String::new()),
            PgTls::System => (Some(tls_connector(system_roots()?, direct)?), "system".to_owned()),
            PgTls::RootCertFile(path) => (Some(tls_connector(file_roots(path)?, direct)?), path.display().to_string()),
        };
        let unix = parsed.tls == PgTls::UnixSocket;
        let credential = match (&storage.password_file, &storage.aws_iam) {
            (Some(_), Some(_)) => {
                return Err(PgConnError::Config("set one of password_file and aws_iam, not both".into()));
            }
            (None, None) if unix => Credential::None,
            (None, None) => {
                return Err(PgConnError::Config(
                    "set password_file or aws_iam (a password in conn_string is refused)".into(),
                ))
            }
            (Some(path), None) => {
                read_password_file(path)?;
                Credential::PasswordFile(path.clone())
            }
            (None, Some(_)) if unix => {
                return Err(PgConnError::Config("aws_iam needs a TCP host with TLS, not a Unix socket".into()));
            }
            (None, Some(iam)) => {
                let target = iam_target(&config, iam)?;
                let source = CredentialSource {
                    region: target.region.clone(),
                    assume_role_arn: iam.assume_role_arn.clone(),
                    external_id: iam.external_id.clone(),
                };
                Credential::Iam { minter, source, target }
            }
        };
        Ok(PgConnector { config, tls, roots, redacted: parsed.redacted, credential, pool_size: storage.pool_size })
    }

    /// The conn string for logs and errors.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// A new logged-in connection whose driver runs on a spawned task (its error, if any, is
    /// logged); `statement_timeout` is set. Call from within a tokio runtime.
    pub async fn connect(&self) -> Result<Client, PgConnError> {
        let config = self.login_config().await?;
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = config.connect(tls.clone()).await.map_err(|e| self.connect_error(e))?;
                spawn_driver(conn, self.redacted.clone());
                client
            }
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| self.connect_error(e))?;
                spawn_driver(conn, self.redacted.clone());
                client
            }
        };
        set_session(&client).await?;
        Ok(client)
    }

    /// As [`PgConnector::connect`], with the asynchronous messages forwarded: each NOTIFY for a
    /// channel this client LISTENs on arrives on the receiver. The receiver ends when the
    /// connection does.
    pub async fn connect_listening(
        &self,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<Notification>), PgConnError> {
        let config = self.login_config().await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = config.connect(tls.clone()).await.map_err(|e| self.connect_error(e))?;
                spawn_listening_driver(conn, tx, self.redacted.clone());
                client
            }
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| self.connect_error(e))?;
                spawn_listening_driver(conn, tx, self.redacted.clone());
                client
            }
        };
        set_session(&client).await?;
        Ok((client, rx))
    }

    /// The config with this connection's password or token in it; it lives only until connect.
    async fn login_config(&self) -> Result<tokio_postgres::Config, PgConnError> {
        let mut config = self.config.clone();
        match &self.credential {
            Credential::None => {}
            Credential::PasswordFile(path) => {
                config.password(read_password_file(path)?);
            }
            Credential::Iam { minter, source, target } => {
                config.password(minter.token(source, target).await?);
            }
        }
        Ok(config)
    }

    fn connect_error(&self, e: tokio_postgres::Error) -> PgConnError {
        if let Some(rustls::Error::InvalidCertificate(cert)) = find_rustls_error(&e) {
            use rustls::CertificateError as C;
            let reason = cert.to_string();
            match cert {
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    let host = self
                        .config
                        .get_hosts()
                        .iter()
                        .filter_map(|h| match h {
                            Host::Tcp(h) => Some(h.as_str()),
                            Host::Unix(_) => None,
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    return PgConnError::WrongName { host, reason };
                }
                _ => return PgConnError::Untrusted { roots: self.roots.clone(), reason },
            }
        }
        PgConnError::Connect { target: self.redacted.clone(), detail: error_chain(&e), source: e }
    }
}

/// The rustls error somewhere in `e`'s chain; an `io::Error` hides its inner error from
/// `source()`, so each one is opened.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

async fn set_session(client: &Client) -> Result<(), PgConnError> {
    let ms = STATEMENT_TIMEOUT.as_millis();
    client
        .batch_execute(&format!("SET statement_timeout = {ms}"))
        .await
        .map_err(|e| PgConnError::Setup { detail: error_chain(&e), source: e })
}

fn spawn_driver<T>(conn: Connection<Socket, T>, target: String)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(storage = %target, error = %error_chain(&e), "storage connection ended with an error");
        }
    });
}

fn spawn_listening_driver<T>(
    mut conn: Connection<Socket, T>,
    tx: tokio::sync::mpsc::UnboundedSender<Notification>,
    target: String,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // The receiver gone means nobody listens any more; keep driving the
                    // connection so the client's own queries still complete.
                    let _ = tx.send(n);
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::info!(storage = %target, notice = %notice, "storage notice");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(
                        storage = %target,
                        error = %error_chain(&e),
                        "storage listening connection ended with an error"
                    );
                    return;
                }
                None => return,
            }
        }
    });
}

fn iam_target(config: &tokio_postgres::Config, iam: &PgAwsIam) -> Result<TokenTarget, PgConnError> {
    let [Host::Tcp(host)] = config.get_hosts() else {
        return Err(PgConnError::Config(
            "aws_iam needs exactly one host: the token is signed for one host name and port".into(),
        ));
    };
    let port = match config.get_ports() {
        [] => 5432,
        [p] => *p,
        _ => return Err(PgConnError::Config("aws_iam needs exactly one port".into())),
    };
    let region = match &iam.region {
        Some(r) if !r.is_empty() => r.clone(),
        _ => rds_region(host).ok_or_else(|| {
            PgConnError::Config(format!(
                "aws_iam: no region; set aws_iam.region (the host {host} is not *.REGION.rds.amazonaws.com)"
            ))
        })?,
    };
    let user = config.get_user().unwrap_or_default().to_owned();
    Ok(TokenTarget { host: host.clone(), port, user, region })
}

/// The region label of an `*.REGION.rds.amazonaws.com` host.
fn rds_region(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    let n = labels.len();
    (n >= 4 && labels[n - 3] == "rds" && labels[n - 2] == "amazonaws" && labels[n - 1] == "com")
        .then(|| labels[n - 4].to_owned())
}

fn tls_connector(roots: RootCertStore, direct: bool) -> Result<MakeRustlsConnect, PgConnError> {
    let mut cfg = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if direct {
        // PostgreSQL 17 accepts direct TLS (sslnegotiation=direct) only with this ALPN.
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Ok(MakeRustlsConnect::new(cfg))
}

fn file_roots(path: &Path) -> Result<RootCertStore, PgConnError> {
    let err = |message: String| PgConnError::RootCert { path: path.display().to_string(), message };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, PgConnError> {
    let native = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Unreadable individual system certificates are skipped, as every TLS client does.
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        return Err(PgConnError::RootCert {
            path: "system".into(),
            message: "the system trust store has no usable certificate".into(),
        });
    }
    Ok(roots)
}

/// The password in `path`: one trailing newline (`\n` or `\r\n`) dropped. Refused when group or
/// others may access the file, since the password opens the whole auth state.
fn read_password_file(path: &Path) -> Result<String, PgConnError> {
    let err = |message: String| PgConnError::PasswordFile { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!("group or others may access it (mode {mode:04o}); chmod 600 it")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PASSWORD_FILE + 1).read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_PASSWORD_FILE {
        return Err(err(format!("larger than {MAX_PASSWORD_FILE} bytes")));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "host=db.example.com port=5432 dbname=sluice user=sluice sslmode=verify-full sslrootcert=/etc/ca.pem";

    fn err(s: &str) -> String {
        parse_conn_string(s).expect_err(s).to_string()
    }

    #[test]
    fn key_value_verify_full_is_split() {
        let p = parse_conn_string(GOOD).unwrap();
        assert_eq!(p.tls, PgTls::RootCertFile("/etc/ca.pem".into()));
        assert_eq!(p.config.get_hosts(), &[Host::Tcp("db.example.com".into())]);
        assert_eq!(p.config.get_ports(), &[5432]);
        assert_eq!(p.config.get_user(), Some("sluice"));
        assert_eq!(p.config.get_dbname(), Some("sluice"));
        assert_eq!(p.config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn quoted_values_and_system_roots() {
        let p = parse_conn_string(
            r"host = 'db.example.com' user='o\'brien' dbname='my db' sslmode=verify-full sslrootcert=system",
        )
        .unwrap();
        assert_eq!(p.tls, PgTls::System);
        assert_eq!(p.config.get_user(), Some("o'brien"));
        assert_eq!(p.config.get_dbname(), Some("my db"));
    }

    #[test]
    fn url_form_is_split() {
        let p = parse_conn_string(
            "postgresql://sluice@db.example.com:6432/sluice?sslmode=verify-full&sslrootcert=%2Fetc%2Frds%20ca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(p.tls, PgTls::RootCertFile("/etc/rds ca.pem".into()));
        assert_eq!(p.config.get_ports(), &[6432]);
        assert_eq!(p.config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert!(p.keys.iter().any(|k| k == "connect_timeout"));
    }

    #[test]
    fn weak_sslmodes_are_refused_with_the_reason() {
        for mode in ["require", "prefer", "allow", "verify-ca", "disable"] {
            let e = err(&GOOD.replace("verify-full", mode));
            assert!(e.contains(&format!("sslmode={mode} is refused")), "{e}");
            assert!(e.contains("verify-full is required"), "{e}");
            assert!(e.contains("man in the middle"), "{e}");
        }
        assert!(err(&GOOD.replace("verify-full", "disable")).contains("Unix-socket host"));
        let e = err("host=db user=u sslrootcert=/ca.pem");
        assert!(e.contains("no sslmode"), "{e}");
        let e = err("postgres://u@db/x?sslmode=require&sslrootcert=/ca.pem");
        assert!(e.contains("sslmode=require is refused"), "{e}");
    }

    #[test]
    fn verify_full_needs_sslrootcert() {
        let e = err("host=db user=u sslmode=verify-full");
        assert!(e.contains("no sslrootcert"), "{e}");
        assert!(e.contains("system"), "{e}");
    }

    #[test]
    fn passwords_in_the_conn_string_are_refused_and_not_echoed() {
        for s in [
            &format!("{GOOD} password=hunter2"),
            "postgres://sluice:hunter2@db/sluice?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://sluice@db/sluice?password=hunter2&sslmode=verify-full&sslrootcert=/ca.pem",
            &format!("{GOOD} passfile=/x"),
        ] {
            let e = err(s);
            assert!(e.contains("use password_file or aws_iam"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn unix_socket_may_go_without_tls_but_not_mixed() {
        let p = parse_conn_string("host=/var/run/postgresql user=sluice dbname=sluice").unwrap();
        assert_eq!(p.tls, PgTls::UnixSocket);
        assert_eq!(p.config.get_ssl_mode(), SslMode::Disable);
        let p = parse_conn_string("host=/run/pg user=sluice sslmode=disable").unwrap();
        assert_eq!(p.tls, PgTls::UnixSocket);
        let e = err("host=/run/pg user=sluice sslmode=require");
        assert!(e.contains("sslmode=require is refused"), "{e}");
        let e = err("host=/run/pg,db.example.com user=sluice sslmode=verify-full sslrootcert=/ca.pem");
        assert!(e.contains("mixes"), "{e}");
    }

    #[test]
    fn host_and_user_are_required() {
        assert!(err("user=u sslmode=verify-full sslrootcert=/ca.pem").contains("no host"));
        assert!(err("host=db sslmode=verify-full sslrootcert=/ca.pem").contains("no user"));
    }

    #[test]
    fn malformed_strings_are_errors() {
        assert!(err("host").contains("missing \"=\""));
        assert!(err("host='db").contains("unterminated"));
        assert!(err("=x").contains("no key"));
        assert!(err(&format!("{GOOD} bogus=1")).contains("unknown"), "{}", err(&format!("{GOOD} bogus=1")));
        assert!(err(&format!("{GOOD} sslcert=/c.pem")).contains("sslcert is not supported"));
        assert!(err("postgres://u@db/x?sslmode=%zz").contains("%-escape"));
    }

    #[test]
    fn redaction_masks_passwords_everywhere() {
        assert_eq!(redact("host=db password=hunter2 user=u"), "host=db password=<redacted> user=u");
        assert_eq!(redact("host=db password='a b' dbname='my db'"), "host=db password=<redacted> dbname='my db'");
        assert_eq!(
            redact("postgres://u:hunter2@db:5/x?password=hunter2&a=b"),
            "postgres://u:<redacted>@db:5/x?password=<redacted>&a=b"
        );
        assert_eq!(redact("host='unterminated password=x"), "<unparseable conn_string>");
        assert_eq!(redact(GOOD), GOOD);
    }

    fn storage(conn: &str) -> PgStorage {
        PgStorage { conn_string: conn.into(), password_file: None, aws_iam: None, pool_size: 10 }
    }

    #[test]
    fn exactly_one_credential_source() {
        let dir = std::env::temp_dir().join(format!("pgconn-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".into()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let conn = format!("host=db.example.com user=sluice sslmode=verify-full sslrootcert={}", ca.display());
        let pw = dir.join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let iam = PgAwsIam { region: Some("us-east-1".into()), assume_role_arn: None, external_id: None };

        let e = PgConnector::new(&storage(&conn)).unwrap_err().to_string();
        assert!(e.contains("set password_file or aws_iam"), "{e}");
        let both = PgStorage { password_file: Some(pw.clone()), aws_iam: Some(iam.clone()), ..storage(&conn) };
        assert!(PgConnector::new(&both).unwrap_err().to_string().contains("not both"));
        let with_pw = PgStorage { password_file: Some(pw.clone()), ..storage(&conn) };
        let c = PgConnector::new(&with_pw).unwrap();
        assert_eq!(c.pool_size(), 10);
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(read_password_file(&pw).unwrap(), "secret");
        let with_iam = PgStorage { aws_iam: Some(iam.clone()), ..storage(&conn) };
        PgConnector::new(&with_iam).unwrap();
        // No region and a host that does not name one.
        let no_region = PgStorage { aws_iam: Some(PgAwsIam { region: None, ..iam.clone() }), ..storage(&conn) };
        assert!(PgConnector::new(&no_region).unwrap_err().to_string().contains("no region"));
        let rds = conn.replace("db.example.com", "x.cluster-abc.eu-west-3.rds.amazonaws.com");
        let c =
            PgConnector::new(&PgStorage { aws_iam: Some(PgAwsIam { region: None, ..iam.clone() }), ..storage(&rds) })
                .unwrap();
        assert!(format!("{c:?}").contains("eu-west-3"));
        // A Unix socket needs no credential but takes no IAM.
        PgConnector::new(&storage("host=/run/pg user=sluice")).unwrap();
        let unix_iam = PgStorage { aws_iam: Some(iam), ..storage("host=/run/pg user=sluice") };
        assert!(PgConnector::new(&unix_iam).unwrap_err().to_string().contains("Unix socket"));
        let zero = PgStorage { pool_size: 0, ..with_pw };
        assert!(PgConnector::new(&zero).unwrap_err().to_string().contains("pool_size"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_connector_can_be_shared_and_its_futures_spawned() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<PgConnector>();
        let c = PgConnector::new(&storage("host=/run/pg user=sluice")).unwrap();
        send(&c.connect());
        send(&c.connect_listening());
    }

    #[test]
    fn password_file_must_be_private_and_non_empty() {
        let dir = std::env::temp_dir().join(format!("pgconn-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "pa ss\r\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password_file(&pw).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_password_file(&pw).unwrap(), "pa ss");
        std::fs::remove_file(&pw).unwrap();
        std::fs::write(&pw, "\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_password_file(&pw).unwrap_err().to_string().contains("empty"));
        assert!(read_password_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sslrootcert_file_problems_name_the_file() {
        let conn = "host=db user=u sslmode=verify-full sslrootcert=/nonexistent/ca.pem";
        let s = PgStorage { password_file: Some("/x".into()), ..storage(conn) };
        let e = PgConnector::new(&s).unwrap_err().to_string();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn yaml_round_trips_with_defaults() {
        let yaml = "conn_string: host=db user=u sslmode=verify-full sslrootcert=system\npassword_file: /etc/pw\n";
        let s: PgStorage = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(s.pool_size, 10);
        assert_eq!(s.password_file.as_deref(), Some(Path::new("/etc/pw")));
        let back: PgStorage = serde_saphyr::from_str(&serde_saphyr::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let iam: PgStorage = serde_saphyr::from_str(
            "conn_string: x\naws_iam: {region: us-east-1, assume_role_arn: arn:aws:iam::1:role/r}\n",
        )
        .unwrap();
        assert_eq!(iam.aws_iam.unwrap().assume_role_arn.as_deref(), Some("arn:aws:iam::1:role/r"));
        assert!(serde_saphyr::from_str::<PgStorage>("conn_string: x\npasword_file: /p\n").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = parse_conn_string(&s);
            let _ = redact(&s);
        }

        #[test]
        fn parsing_key_value_shapes_never_panics(
            pairs in proptest::collection::vec(("[a-z_]{1,12}", "[ -~]{0,20}", proptest::bool::ANY), 0..8),
            url in proptest::bool::ANY,
        ) {
            let s = if url {
                let q: Vec<String> = pairs.iter().map(|(k, v, _)| format!("{k}={v}")).collect();
                format!("postgres://u@h/db?{}", q.join("&"))
            } else {
                pairs.iter().map(|(k, v, q)| if *q { format!("{k}={}", quote_value(v)) } else { format!("{k}={v}") })
                    .collect::<Vec<_>>().join(" ")
            };
            let _ = parse_conn_string(&s);
            let _ = redact(&s);
        }
    }
}
