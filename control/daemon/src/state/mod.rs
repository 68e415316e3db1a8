//! Control's durable state: users, roles, the CA, join tokens, database resources, login
//! sessions, agents and the audit log, in embedded SQLite (the default) or in a PostgreSQL that
//! several auth nodes share.
//!
//! [`State`] is the one interface; statements are written once ([`sql`]) and run on either
//! backend. The admin CLI and the daemon open the same store. The daemon decides connections from
//! an in-memory snapshot ([`crate::policy::PolicyStore`]) and learns that anyone committed a
//! policy change from a marker read without SQL ([`State::change_marker`]: SQLite's WAL index
//! header, or the PostgreSQL change feed's revision): `control users add` or `control roles
//! create` take effect for the next connection without a reload protocol, and a handshake runs
//! no SQL.

pub mod export;
pub mod pg;
pub mod sql;
pub mod sqlite;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;
use time::OffsetDateTime;

use crate::ca::{CaError, CertAuthority};
use crate::config::DbResource;
use crate::rbac::Role;
use sql::{vals, Conn};

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("state task failed: {0}")]
    Task(String),
    #[error("encoding a record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} already exists")]
    Exists(String),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("password hashing: {0}")]
    Hash(String),
    #[error("creating data dir: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    /// A uniqueness violation: another writer got there first.
    #[error("conflicting write: {0}")]
    Conflict(String),
    #[error("storage PostgreSQL: {0}")]
    Postgres(String),
    /// The shared store cannot be reached (down, or every pooled connection busy too long).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("CA key encryption: {0}")]
    Kek(String),
    /// A fenced write whose lease is no longer held with its token (it expired, or another
    /// holder took it over): nothing was written.
    #[error("lease {0} is no longer held by this writer")]
    Fenced(String),
}

/// Proof that a write comes from the current holder of a lease ([`State::acquire_lease`]):
/// fenced writes check it in their own transaction and change nothing when it is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub holder: String,
    pub token: u64,
}

/// The lease that elects the one poller of a discovery source (`discovery::source_key`).
pub fn discovery_lease(source: &str) -> String {
    format!("discovery/{source}")
}

/// Statements this process has run against the state, by kind (every [`State`] in the process
/// together): the daemon exports them, so a test can check that handshakes run none.
static STATEMENTS_READ: AtomicU64 = AtomicU64::new(0);
static STATEMENTS_WRITE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The statements run on this thread: what one code path ran, whatever other threads do.
    static STATEMENTS_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts a statement as it starts to run (SQLite also reports each trigger it fires, which
/// counts as part of a write).
fn count_statement(sql: &str) {
    STATEMENTS_HERE.with(|n| n.set(n.get() + 1));
    let head = sql.trim_start().get(..6).unwrap_or_default();
    if head.eq_ignore_ascii_case("select") || head.eq_ignore_ascii_case("pragma") {
        STATEMENTS_READ.fetch_add(1, Ordering::Relaxed);
    } else {
        STATEMENTS_WRITE.fetch_add(1, Ordering::Relaxed);
    }
}

/// (reads, writes): the statements run against the state by this process so far.
pub fn statements_run() -> (u64, u64) {
    (STATEMENTS_READ.load(Ordering::Relaxed), STATEMENTS_WRITE.load(Ordering::Relaxed))
}

/// The statements run against the state on the calling thread so far.
pub fn statements_run_here() -> u64 {
    STATEMENTS_HERE.with(|n| n.get())
}

/// A fingerprint of the last policy commit to the state, by any process, read without SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeMarker {
    /// SQLite's WAL index header, which SQLite rewrites (the change counter, frame count and
    /// checksums) at every commit and readers do not touch
    /// (<https://www.sqlite.org/walformat.html>, "The WAL-Index Header").
    Wal([u8; 48]),
    /// The PostgreSQL store's policy revision, as the change feed last saw it.
    Rev(u64),
}

/// Why a store is opened: a serving daemon follows the change feed; an admin verb does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    Serve,
    Admin,
}

/// A database found in the cloud, with the AWS resource id that IAM policies name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Named as AWS names it; the name it is served under is unique only after
    /// `discovery::served_names` has seen every discovered row.
    pub resource: DbResource,
    /// `prx-…` for RDS Proxies: the `rds-db:connect` resource is `dbuser:prx-…/USER`.
    pub aws_resource_id: String,
    /// What it is in AWS, unique across regions and accounts (the proxy's ARN, plus
    /// `/endpoint/NAME` for a custom endpoint): rows are keyed by it, not by the name.
    pub uid: String,
}

#[derive(Debug, Clone)]
pub struct DiscoveredRow {
    /// Which matcher and region found it (see `discovery::source_key`).
    pub source: String,
    pub item: Discovered,
    /// Why the last fetch failed, while the row is kept from an earlier good one.
    pub stale: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub name: String,
    pub roles: Vec<String>,
}

/// A Teleport-style lock: sessions of `user` (any, if unset) to `db` (any, if unset) are refused
/// and live ones are ended, until it is removed or expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lock {
    pub id: String,
    pub user: Option<String>,
    pub db: Option<String>,
    pub message: String,
    /// Unix seconds; `None` locks until removed.
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

impl Lock {
    /// Whether the lock still holds at `now` (unix seconds).
    pub fn active_at(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }

    pub fn matches(&self, user: &str, db: &str) -> bool {
        self.user.as_deref().is_none_or(|u| u == user) && self.db.as_deref().is_none_or(|d| d == db)
    }
}

/// What a join token is worth, told apart so that an agent's operator learns which fix applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    Unknown,
    Expired {
        at: OffsetDateTime,
    },
    /// The token exists and is current, but for another kind of join.
    WrongType {
        kind: String,
    },
}

/// An agent that joined the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub host_id: String,
    pub node_index: u16,
    pub name: String,
    pub role: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub joined_at: i64,
    pub cert_not_after: i64,
    pub last_seen: i64,
    /// The last heartbeat; `None` until the agent sends one.
    pub heartbeat: Option<NodeHeartbeat>,
}

/// What an agent said in its last heartbeat, and when (unix milliseconds: health is judged
/// against intervals of a second or so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHeartbeat {
    pub postgres_addr: String,
    /// `None` from an agent without a MySQL listener, or from before agents reported one.
    pub mysql_addr: Option<String>,
    pub databases: Vec<String>,
    pub sessions: u32,
    pub version: String,
    pub interval_ms: u64,
    pub at_ms: i64,
}

/// A live session an agent reported in its last heartbeat.
#[derive(Debug, Clone)]
pub struct NodeSession {
    pub host_id: String,
    /// Unix seconds.
    pub started_at: i64,
    pub fields: crate::audit::SessionFields,
}

/// Most agents one cluster numbers (cancel keys give the index 10 bits; 0 is the auth server).
pub const MAX_NODE_INDEX: u16 = 1023;

/// Expired join tokens are kept this long, so that an agent using one is told it expired.
const EXPIRED_TOKEN_GRACE: i64 = 24 * 3600;

#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub kind: String,
    pub expires_at: OffsetDateTime,
}

/// What [`State::audit_query`] selects; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub user: Option<String>,
    pub db: Option<String>,
    pub event: Option<String>,
    /// RFC 3339 (or a prefix of one, such as a date): rows at or after it.
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub time: String,
    pub event: String,
    pub session_id: Option<String>,
    pub user: Option<String>,
    pub db: Option<String>,
    pub success: bool,
    pub data: serde_json::Value,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A random URL-safe secret (join tokens, login session tokens, generated passwords).
pub fn random_secret(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub struct State {
    store: Store,
    /// This node's own records next to a shared store (`node.db`): the sessions its data plane
    /// holds are nobody else's business, and must survive the shared store's outage.
    local: Option<Box<sqlite::Sqlite>>,
    /// The key-encryption keys that seal the CA key, when configured.
    keys: Option<crate::kek::KeyRing>,
}

/// Where the shared state lives.
enum Store {
    Sqlite(sqlite::Sqlite),
    Pg(pg::Pg),
}

impl State {
    /// Opens (creating if needed) the embedded state in `data_dir` (`sluice.db`). The directory
    /// is made 0700 and every file in it 0600 (the CA key is in `sluice.db`), tightening what an
    /// earlier start or an operator left looser, with a warning. Safe against concurrent openers
    /// (the daemon and admin verbs started at once).
    pub fn open(data_dir: &Path) -> Result<Self, StateError> {
        Ok(State { store: Store::Sqlite(sqlite::Sqlite::open(data_dir, "sluice.db")?), local: None, keys: None })
    }

    /// An agent's own store, `agent.db`: the same schema, but it only ever holds what the agent
    /// itself records (its live sessions and its audit events). Users, password hashes, roles,
    /// tokens and the CA live on the auth server and are never written here.
    pub fn open_agent(data_dir: &Path) -> Result<Self, StateError> {
        Ok(State { store: Store::Sqlite(sqlite::Sqlite::open(data_dir, "agent.db")?), local: None, keys: None })
    }

    /// Opens the auth service's configured storage: the embedded file by default, or the shared
    /// PostgreSQL (with this node's own `node.db` for what only this process records: the
    /// sessions its data plane holds). `mode` says whether this process serves (it then follows
    /// the change feed) or runs one admin verb.
    pub fn open_configured(cfg: &crate::config::Config, mode: OpenMode) -> Result<Self, StateError> {
        let storage = &cfg.auth_service.storage;
        let keys = key_ring(storage)?;
        match storage {
            crate::config::StorageConfig::Sqlite { .. } => {
                let mut state = Self::open(&cfg.data_dir)?;
                state.keys = keys;
                Ok(state)
            }
            crate::config::StorageConfig::Postgres(pg_cfg) => {
                let local = Box::new(sqlite::Sqlite::open(&cfg.data_dir, "node.db")?);
                let pg = pg::Pg::open(pg_cfg, mode)?;
                Ok(State { store: Store::Pg(pg), local: Some(local), keys })
            }
        }
    }

    /// Which backend holds the shared state (for `control status` and logs).
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Sqlite(_) => "sqlite",
            Store::Pg(_) => "postgres",
        }
    }

    /// Unix milliseconds on the store's clock, as SQL. Leases compare against the database's
    /// clock, never a node's: the nodes sharing a PostgreSQL may disagree about the time, the
    /// server they share does not. (SQLite's clock is the host's, which every process on the
    /// one file shares.) `clock_timestamp()`, not `now()`: a lease checked late in a transaction
    /// must not be judged at the transaction's start.
    fn now_ms_sql(&self) -> &'static str {
        match self.store {
            Store::Sqlite(_) => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Store::Pg(_) => "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Runs `f` on a connection, each statement committed on its own.
    fn run<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        match &self.store {
            Store::Sqlite(s) => s.run(f),
            Store::Pg(p) => p.run(false, f),
        }
    }

    /// Runs `f` in one transaction.
    fn tx<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        match &self.store {
            Store::Sqlite(s) => s.tx(f),
            Store::Pg(p) => p.run(true, f),
        }
    }

    /// Runs bookkeeping (nothing a policy reads) in one transaction that does not make policy
    /// snapshots stale: SQLite remembers the commit as this handle's own; on PostgreSQL only
    /// policy tables move the change feed at all.
    fn own<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        match &self.store {
            Store::Sqlite(s) => s.write_own(f),
            Store::Pg(p) => p.run(true, f),
        }
    }

    /// As [`State::own`], on this node's own store (live sessions).
    fn local_own<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        match &self.local {
            Some(l) => l.write_own(f),
            None => self.own(f),
        }
    }

    fn local_run<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        match &self.local {
            Some(l) => l.run(f),
            None => self.run(f),
        }
    }

    /// The current [`ChangeMarker`], read without SQL: SQLite's WAL index header, or the
    /// PostgreSQL change feed's last revision. `None` when it cannot be read (callers then treat
    /// the state as changed).
    pub fn change_marker(&self) -> Option<ChangeMarker> {
        match &self.store {
            Store::Sqlite(s) => s.change_marker(),
            Store::Pg(p) => p.change_marker(),
        }
    }

    /// How long ago the shared store's change feed last confirmed the policy revision; `None`
    /// for the embedded store, which has no feed to lose.
    pub fn feed_age(&self) -> Option<std::time::Duration> {
        match &self.store {
            Store::Pg(p) => p.feed().map(|f| f.age()),
            Store::Sqlite(_) => None,
        }
    }

    /// Whether every commit from `from` to `to` was this handle's bookkeeping.
    pub fn only_own_commits(&self, from: ChangeMarker, to: ChangeMarker) -> bool {
        match (&self.store, from, to) {
            (Store::Sqlite(s), ChangeMarker::Wal(a), ChangeMarker::Wal(b)) => s.only_own_commits(a, b),
            (_, a, b) => a == b,
        }
    }

    /// Loads the cluster CA, creating it on first use. Several processes (or auth nodes) may get
    /// here at once on a fresh store: the first insert wins and everyone loads the stored CA.
    /// With a key-encryption key configured the private key is stored only sealed under it (a
    /// plaintext key left by an earlier start is sealed in place).
    pub fn ensure_ca(&self, cluster: &str) -> Result<CertAuthority, StateError> {
        if let Some(ca) = self.load_ca(cluster)? {
            return Ok(ca);
        }
        let ca = CertAuthority::generate(cluster)?;
        let (key_pem, envelope, wraps) = match &self.keys {
            Some(keys) => {
                let sealed = keys.seal(cluster, CA_NAME, ca.key_pem().as_bytes())?;
                (String::new(), Some(sealed.envelope.clone()), Some(serde_json::to_string(&sealed.wraps)?))
            }
            None => (ca.key_pem().to_string(), None, None),
        };
        self.run(|c| {
            c.exec(
                "INSERT INTO cert_authorities (name, cert_pem, key_pem, key_envelope, key_wraps)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                vals![CA_NAME, ca.cert_pem.as_str(), key_pem, envelope, wraps],
            )
        })?;
        self.load_ca(cluster)?.ok_or_else(|| StateError::Corrupt("the CA vanished right after it was stored".into()))
    }

    fn load_ca(&self, cluster: &str) -> Result<Option<CertAuthority>, StateError> {
        let row = self.run(|c| {
            c.query_opt(
                "SELECT cert_pem, key_pem, key_envelope, key_wraps FROM cert_authorities WHERE name = ?1",
                vals![CA_NAME],
            )
        })?;
        let Some(row) = row else { return Ok(None) };
        let cert: String = row.get(0)?;
        let key_pem: String = row.get(1)?;
        let envelope: Option<Vec<u8>> = row.get(2)?;
        let wraps: Option<String> = row.get(3)?;
        match (envelope, wraps) {
            (Some(envelope), Some(wraps)) => {
                let keys = self.keys.as_ref().ok_or_else(|| {
                    StateError::Kek("the CA key is sealed under a key-encryption key, and none is configured (auth_service.storage.kek)".into())
                })?;
                let sealed = crate::kek::SealedKey { envelope, wraps: serde_json::from_str(&wraps)? };
                let pem = keys.open(cluster, CA_NAME, &sealed)?;
                let pem =
                    std::str::from_utf8(&pem).map_err(|_| StateError::Kek("the CA key is not PEM text".into()))?;
                Ok(Some(CertAuthority::from_pem(&cert, pem)?))
            }
            _ => {
                let ca = CertAuthority::from_pem(&cert, &key_pem)?;
                if let Some(keys) = &self.keys {
                    // Seal a key stored before a KEK was configured, and drop the plaintext.
                    let sealed = keys.seal(cluster, CA_NAME, key_pem.as_bytes())?;
                    let wraps = serde_json::to_string(&sealed.wraps)?;
                    self.run(|c| {
                        c.exec(
                            "UPDATE cert_authorities SET key_pem = '', key_envelope = ?2, key_wraps = ?3
                             WHERE name = ?1 AND key_envelope IS NULL",
                            vals![CA_NAME, sealed.envelope.clone(), wraps],
                        )
                    })?;
                    tracing::info!("sealed the stored CA key under the configured key-encryption key");
                }
                Ok(Some(ca))
            }
        }
    }

    /// The stored CA row as it is at rest: (cert, plaintext key or "", envelope, wraps JSON), for
    /// KEK rotation and export.
    pub fn ca_row(&self) -> Result<Option<CaRow>, StateError> {
        let row = self.run(|c| {
            c.query_opt(
                "SELECT cert_pem, key_pem, key_envelope, key_wraps FROM cert_authorities WHERE name = ?1",
                vals![CA_NAME],
            )
        })?;
        row.map(|r| {
            Ok(CaRow { cert_pem: r.get(0)?, key_pem: r.get(1)?, key_envelope: r.get(2)?, key_wraps: r.get(3)? })
        })
        .transpose()
    }

    /// Replaces the CA key's wraps (KEK rotation): the envelope itself is unchanged.
    pub fn set_ca_wraps(&self, wraps: &[crate::kek::Wrap]) -> Result<(), StateError> {
        let json = serde_json::to_string(wraps)?;
        let n = self.run(|c| {
            c.exec(
                "UPDATE cert_authorities SET key_wraps = ?2 WHERE name = ?1 AND key_envelope IS NOT NULL",
                vals![CA_NAME, json],
            )
        })?;
        if n == 0 {
            return Err(StateError::NotFound("a sealed CA key".into()));
        }
        Ok(())
    }

    // ---- users ----

    pub fn add_user(&self, name: &str, password: &str, roles: &[String]) -> Result<(), StateError> {
        crate::config::validate_name(name).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let hash = hash_password(password)?;
        let roles_json = serde_json::to_string(roles).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let n = self.run(|c| {
            c.exec(
                "INSERT INTO users (name, password_hash, roles, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO NOTHING",
                vals![name, hash, roles_json, OffsetDateTime::now_utc().unix_timestamp()],
            )
        })?;
        if n == 0 {
            return Err(StateError::Exists(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn update_user_roles(&self, name: &str, roles: &[String]) -> Result<(), StateError> {
        let roles_json = serde_json::to_string(roles).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let n = self.run(|c| c.exec("UPDATE users SET roles = ?2 WHERE name = ?1", vals![name, roles_json]))?;
        if n == 0 {
            return Err(StateError::NotFound(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn delete_user(&self, name: &str) -> Result<(), StateError> {
        let n = self.tx(|c| {
            let n = c.exec("DELETE FROM users WHERE name = ?1", vals![name])?;
            c.exec("DELETE FROM web_sessions WHERE \"user\" = ?1", vals![name])?;
            Ok(n)
        })?;
        if n == 0 {
            return Err(StateError::NotFound(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, StateError> {
        let row = self.run(|c| c.query_opt("SELECT roles FROM users WHERE name = ?1", vals![name]))?;
        row.map(|r| {
            let roles: String = r.get(0)?;
            let roles =
                serde_json::from_str(&roles).map_err(|e| StateError::Corrupt(format!("roles of {name}: {e}")))?;
            Ok(User { name: name.to_owned(), roles })
        })
        .transpose()
    }

    pub fn users(&self) -> Result<Vec<User>, StateError> {
        let rows = self.run(|c| c.query("SELECT name, roles FROM users ORDER BY name", vals![]))?;
        rows.iter()
            .map(|r| {
                let (name, roles): (String, String) = (r.get(0)?, r.get(1)?);
                let roles =
                    serde_json::from_str(&roles).map_err(|e| StateError::Corrupt(format!("roles of {name}: {e}")))?;
                Ok(User { name, roles })
            })
            .collect()
    }

    /// Checks a password; `Ok(false)` for an unknown user or a wrong password alike.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<bool, StateError> {
        let row = self.run(|c| c.query_opt("SELECT password_hash FROM users WHERE name = ?1", vals![name]))?;
        let Some(row) = row else {
            // Spend the same effort as for a real user, so timing does not reveal which users exist.
            let _ = hash_password(password);
            return Ok(false);
        };
        let hash: String = row.get(0)?;
        let parsed = PasswordHash::new(&hash).map_err(|e| StateError::Corrupt(e.to_string()))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    }

    // ---- roles ----

    pub fn upsert_role(&self, role: &Role) -> Result<(), StateError> {
        let spec = serde_json::to_string(role).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.run(|c| {
            c.exec(
                "INSERT INTO roles (name, spec) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                vals![role.metadata.name.as_str(), spec],
            )
        })?;
        Ok(())
    }

    pub fn delete_role(&self, name: &str) -> Result<(), StateError> {
        if self.run(|c| c.exec("DELETE FROM roles WHERE name = ?1", vals![name]))? == 0 {
            return Err(StateError::NotFound(format!("role {name:?}")));
        }
        Ok(())
    }

    pub fn roles(&self) -> Result<Vec<Role>, StateError> {
        let rows = self.run(|c| c.query("SELECT spec FROM roles ORDER BY name", vals![]))?;
        rows.iter()
            .map(|r| serde_json::from_str(&r.get::<String>(0)?).map_err(|e| StateError::Corrupt(format!("role: {e}"))))
            .collect()
    }

    /// The roles of `user` that exist (a role deleted after assignment grants nothing).
    pub fn roles_of(&self, user: &User) -> Result<Vec<Role>, StateError> {
        Ok(self.roles()?.into_iter().filter(|r| user.roles.contains(&r.metadata.name)).collect())
    }

    // ---- join tokens ----

    pub fn add_token(&self, kind: &str, ttl: std::time::Duration) -> Result<(String, OffsetDateTime), StateError> {
        let token = random_secret(16);
        let now = OffsetDateTime::now_utc();
        let expires = now + ttl;
        self.run(|c| {
            c.exec(
                "INSERT INTO tokens (hash, kind, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
                vals![sha256_hex(&token), kind, expires.unix_timestamp(), now.unix_timestamp()],
            )
        })?;
        Ok((token, expires))
    }

    /// Checks a join token of `kind`; expired tokens are refused (and removed later by the
    /// janitor: a read never deletes, so several auth nodes can check at once).
    pub fn check_token(&self, token: &str, kind: &str) -> Result<bool, StateError> {
        Ok(self.check_join_token(token, kind)? == TokenCheck::Valid)
    }

    /// Checks a join token for a join of `kind`, saying why it is refused. Tokens stay valid
    /// until they expire (several agents may join with one); rows expired for more than a day
    /// are purged by [`State::janitor_pass`].
    pub fn check_join_token(&self, token: &str, kind: &str) -> Result<TokenCheck, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let row =
            self.run(|c| c.query_opt("SELECT kind, expires_at FROM tokens WHERE hash = ?1", vals![sha256_hex(token)]))?;
        let found = row.map(|r| Ok::<_, StateError>((r.get::<String>(0)?, r.get::<i64>(1)?))).transpose()?;
        Ok(match found {
            None => TokenCheck::Unknown,
            Some((_, exp)) if exp <= now - EXPIRED_TOKEN_GRACE => TokenCheck::Unknown,
            Some((_, exp)) if exp <= now => TokenCheck::Expired {
                at: OffsetDateTime::from_unix_timestamp(exp).map_err(|e| StateError::Corrupt(e.to_string()))?,
            },
            Some((k, _)) if k != kind => TokenCheck::WrongType { kind: k },
            Some(_) => TokenCheck::Valid,
        })
    }

    // ---- cluster nodes ----

    /// Records a joining agent under a new host id and the lowest free node index. Two auth
    /// nodes may pick the same free index at once: the unique index refuses the second, which
    /// looks again.
    pub fn add_node(
        &self,
        name: &str,
        role: &str,
        labels: &std::collections::BTreeMap<String, String>,
        cert_not_after: OffsetDateTime,
    ) -> Result<Node, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let host_id = random_secret(16);
        let labels_json = serde_json::to_string(labels)?;
        let mut tries = 0;
        let index = loop {
            let attempt = self.tx(|c| {
                let used: Vec<i64> = c
                    .query("SELECT node_index FROM nodes ORDER BY node_index", vals![])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect::<Result<_, _>>()?;
                let index = (1..=MAX_NODE_INDEX)
                    .find(|i| used.binary_search(&i64::from(*i)).is_err())
                    .ok_or_else(|| StateError::Invalid(format!("the cluster already has {MAX_NODE_INDEX} agents")))?;
                c.exec(
                    "INSERT INTO nodes (host_id, node_index, name, role, labels, joined_at, cert_not_after, last_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)",
                    vals![
                        host_id.as_str(),
                        index,
                        name,
                        role,
                        labels_json.as_str(),
                        now,
                        cert_not_after.unix_timestamp()
                    ],
                )?;
                Ok(index)
            });
            match attempt {
                Err(StateError::Conflict(_)) if tries < 50 => {
                    tries += 1;
                    // Spread the racers out, so one of them wins the next round.
                    std::thread::sleep(std::time::Duration::from_millis(rand::random::<u64>() % 10 + 1));
                }
                other => break other?,
            }
        };
        Ok(Node {
            host_id,
            node_index: index,
            name: name.to_owned(),
            role: role.to_owned(),
            labels: labels.clone(),
            joined_at: now,
            cert_not_after: cert_not_after.unix_timestamp(),
            last_seen: now,
            heartbeat: None,
        })
    }

    /// Stores an agent's heartbeat; `false` if the node is no longer registered. When only the
    /// time and the session count changed this is bookkeeping ([`State::own`]): a cluster of
    /// agents heartbeating must not make every policy snapshot stale. A new address or list of
    /// databases is a normal commit, so the auth server's snapshot and the agents' watch
    /// (cancel forwarding, `sluice db ls`) see it.
    pub fn record_heartbeat(&self, host_id: &str, hb: &NodeHeartbeat) -> Result<bool, StateError> {
        let databases = serde_json::to_string(&hb.databases)?;
        let interval = i64::try_from(hb.interval_ms).map_err(|e| StateError::Invalid(e.to_string()))?;
        let update = |c: &mut dyn Conn| {
            c.exec(
                "UPDATE nodes SET hb_postgres_addr = ?2, hb_databases = ?3, hb_sessions = ?4, hb_version = ?5,
                     hb_interval_ms = ?6, hb_at_ms = ?7, last_seen = ?8, hb_mysql_addr = ?9
                 WHERE host_id = ?1",
                vals![
                    host_id,
                    hb.postgres_addr.as_str(),
                    databases.as_str(),
                    hb.sessions,
                    hb.version.as_str(),
                    interval,
                    hb.at_ms,
                    hb.at_ms.div_euclid(1000),
                    &hb.mysql_addr
                ],
            )
        };
        let stored = self.run(|c| {
            c.query_opt(
                "SELECT hb_postgres_addr, hb_databases, hb_mysql_addr FROM nodes WHERE host_id = ?1",
                vals![host_id],
            )
        })?;
        let Some(stored) = stored else { return Ok(false) };
        let (addr, dbs, mysql): (Option<String>, Option<String>, Option<String>) =
            (stored.get(0)?, stored.get(1)?, stored.get(2)?);
        let same = addr.as_deref() == Some(hb.postgres_addr.as_str())
            && dbs.as_deref() == Some(databases.as_str())
            && mysql == hb.mysql_addr;
        // An agent heartbeats one call at a time, so the row does not change in between.
        let changed = if same { self.own(update)? } else { self.run(update)? };
        Ok(changed > 0)
    }

    /// Records a renewed host certificate's expiry; `false` if the node is no longer registered.
    /// Bookkeeping, as heartbeats are.
    pub fn record_renewal(&self, host_id: &str, cert_not_after: OffsetDateTime) -> Result<bool, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let changed = self.own(|c| {
            c.exec(
                "UPDATE nodes SET cert_not_after = ?2, last_seen = ?3 WHERE host_id = ?1",
                vals![host_id, cert_not_after.unix_timestamp(), now],
            )
        })?;
        Ok(changed > 0)
    }

    /// The node with this host id, if it is still registered (every agent call asks: one row).
    pub fn node(&self, host_id: &str) -> Result<Option<Node>, StateError> {
        let rows = self.run(|c| c.query(&format!("{NODE_SELECT} WHERE host_id = ?1"), vals![host_id]))?;
        rows.iter().map(node_from_row).next().transpose()
    }

    pub fn delete_node(&self, host_id: &str) -> Result<bool, StateError> {
        self.tx(|c| {
            let removed = c.exec("DELETE FROM nodes WHERE host_id = ?1", vals![host_id])? > 0;
            c.exec("DELETE FROM node_sessions WHERE host_id = ?1", vals![host_id])?;
            Ok(removed)
        })
    }

    /// Replaces the sessions an agent reported with those of its latest heartbeat, as
    /// (started_at unix seconds, fields). Bookkeeping, as heartbeats are.
    pub fn replace_node_sessions(
        &self,
        host_id: &str,
        sessions: &[(i64, crate::audit::SessionFields)],
    ) -> Result<(), StateError> {
        let rows: Vec<(String, i64, String)> = sessions
            .iter()
            .map(|(started, f)| Ok((f.session_id.clone(), *started, serde_json::to_string(f)?)))
            .collect::<Result<_, StateError>>()?;
        self.own(|c| {
            c.exec("DELETE FROM node_sessions WHERE host_id = ?1", vals![host_id])?;
            for (id, started, data) in &rows {
                c.exec(
                    "INSERT INTO node_sessions (host_id, session_id, started_at, data) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (host_id, session_id) DO UPDATE SET started_at = excluded.started_at, data = excluded.data",
                    vals![host_id, id, *started, data],
                )?;
            }
            Ok(())
        })
    }

    /// Every session the registered agents reported, by agent and start time.
    pub fn node_sessions(&self) -> Result<Vec<NodeSession>, StateError> {
        let rows = self.run(|c| {
            c.query(
                "SELECT s.host_id, s.started_at, s.data FROM node_sessions s JOIN nodes n ON n.host_id = s.host_id
                 ORDER BY n.node_index, s.started_at, s.session_id",
                vals![],
            )
        })?;
        rows.iter()
            .map(|r| {
                let (host_id, started_at, data): (String, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                let fields =
                    serde_json::from_str(&data).map_err(|e| StateError::Corrupt(format!("node session: {e}")))?;
                Ok(NodeSession { host_id, started_at, fields })
            })
            .collect()
    }

    /// The registered agent whose last heartbeat lists this session, if any.
    pub fn node_holding_session(&self, session_id: &str) -> Result<Option<String>, StateError> {
        let row = self.run(|c| {
            c.query_opt(
                "SELECT s.host_id FROM node_sessions s JOIN nodes n ON n.host_id = s.host_id
                 WHERE s.session_id = ?1 ORDER BY n.node_index LIMIT 1",
                vals![session_id],
            )
        })?;
        row.map(|r| r.get(0)).transpose()
    }

    /// Asks every agent to end a session (`control sessions kill` on the auth server): an
    /// ordinary commit, so that the daemon's hub notices it and tells the agents. The request's id.
    pub fn add_session_kill(&self, session_id: &str) -> Result<i64, StateError> {
        self.run(|c| {
            c.query_one(
                "INSERT INTO session_kills (session_id, created_at) VALUES (?1, ?2) RETURNING id",
                vals![session_id, OffsetDateTime::now_utc().unix_timestamp()],
            )?
            .get(0)
        })
    }

    /// Kill requests after the one with id `after`, oldest first, as (id, session id).
    pub fn session_kills_after(&self, after: i64) -> Result<Vec<(i64, String)>, StateError> {
        let rows =
            self.run(|c| c.query("SELECT id, session_id FROM session_kills WHERE id > ?1 ORDER BY id", vals![after]))?;
        rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect()
    }

    /// The id of the latest kill request (0 if none).
    pub fn last_session_kill(&self) -> Result<i64, StateError> {
        self.run(|c| c.query_one("SELECT coalesce(max(id), 0) FROM session_kills", vals![])?.get(0))
    }

    /// Forgets kill requests made more than `age` ago (bookkeeping: they were sent already).
    pub fn prune_session_kills(&self, age: std::time::Duration) -> Result<usize, StateError> {
        let cutoff = OffsetDateTime::now_utc().unix_timestamp() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        self.own(|c| c.exec("DELETE FROM session_kills WHERE created_at < ?1", vals![cutoff]))
    }

    pub fn nodes(&self) -> Result<Vec<Node>, StateError> {
        let rows = self.run(|c| c.query(&format!("{NODE_SELECT} ORDER BY node_index"), vals![]))?;
        rows.iter().map(node_from_row).collect()
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let rows = self.run(|c| {
            c.query("SELECT kind, expires_at FROM tokens WHERE expires_at > ?1 ORDER BY expires_at", vals![now])
        })?;
        rows.iter()
            .map(|r| {
                let (kind, exp): (String, i64) = (r.get(0)?, r.get(1)?);
                let expires_at =
                    OffsetDateTime::from_unix_timestamp(exp).map_err(|e| StateError::Corrupt(e.to_string()))?;
                Ok(TokenInfo { kind, expires_at })
            })
            .collect()
    }

    // ---- database resources ----

    pub fn upsert_database(&self, db: &DbResource) -> Result<(), StateError> {
        let spec = serde_json::to_string(db).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.run(|c| {
            c.exec(
                "INSERT INTO databases (name, spec) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                vals![db.metadata.name.as_str(), spec],
            )
        })?;
        Ok(())
    }

    pub fn delete_database(&self, name: &str) -> Result<(), StateError> {
        if self.run(|c| c.exec("DELETE FROM databases WHERE name = ?1", vals![name]))? == 0 {
            return Err(StateError::NotFound(format!("database {name:?}")));
        }
        Ok(())
    }

    pub fn databases(&self) -> Result<Vec<DbResource>, StateError> {
        let rows = self.run(|c| c.query("SELECT spec FROM databases ORDER BY name", vals![]))?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(&r.get::<String>(0)?).map_err(|e| StateError::Corrupt(format!("database: {e}")))
            })
            .collect()
    }

    // ---- discovered (cloud) resources ----

    /// Makes `items` the whole set found by `source` (one matcher and region): adds, updates and
    /// deletes, and clears any stale mark. Returns (added, updated, removed). Rows are keyed by
    /// (source, AWS identity), so sources finding same-named resources never overwrite each other.
    /// Rows that did not change are not written, so a poll that found nothing new changes nothing
    /// that policy snapshots (or the PostgreSQL change feed) watch.
    pub fn replace_discovered(&self, source: &str, items: &[Discovered]) -> Result<(usize, usize, usize), StateError> {
        self.replace_discovered_fenced(source, items, None)
    }

    /// As [`State::replace_discovered`], by the holder of `fence` only: when the lease is no
    /// longer held with its token (and unexpired), [`StateError::Fenced`] and nothing changes.
    pub fn replace_discovered_fenced(
        &self,
        source: &str,
        items: &[Discovered],
        fence: Option<&Fence>,
    ) -> Result<(usize, usize, usize), StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let specs: Vec<String> = items
            .iter()
            .map(|d| serde_json::to_string(&d.resource).map_err(|e| StateError::Corrupt(e.to_string())))
            .collect::<Result<_, _>>()?;
        self.tx(|c| {
            self.check_fence(c, fence)?;
            let existing: Vec<(String, String)> = c
                .query("SELECT uid, spec FROM discovered WHERE source = ?1", vals![source])?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect::<Result<_, StateError>>()?;
            let (mut added, mut updated, mut removed) = (0, 0, 0);
            for (uid, _) in &existing {
                if !items.iter().any(|d| &d.uid == uid) {
                    c.exec("DELETE FROM discovered WHERE source = ?1 AND uid = ?2", vals![source, uid])?;
                    removed += 1;
                }
            }
            for (d, spec) in items.iter().zip(&specs) {
                match existing.iter().find(|(u, _)| u == &d.uid) {
                    None => added += 1,
                    Some((_, old)) if old != spec => updated += 1,
                    Some(_) => {}
                }
                c.exec(
                    "INSERT INTO discovered (source, uid, name, spec, aws_resource_id, stale, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)
                     ON CONFLICT (source, uid) DO UPDATE SET name = excluded.name, spec = excluded.spec,
                     aws_resource_id = excluded.aws_resource_id, stale = NULL, updated_at = excluded.updated_at
                     WHERE discovered.spec IS DISTINCT FROM excluded.spec OR discovered.name IS DISTINCT FROM excluded.name
                        OR discovered.aws_resource_id IS DISTINCT FROM excluded.aws_resource_id
                        OR discovered.stale IS NOT NULL",
                    vals![source, d.uid.as_str(), d.resource.metadata.name.as_str(), spec.as_str(), d.aws_resource_id.as_str(), now],
                )?;
            }
            Ok((added, updated, removed))
        })
    }

    /// A fetch for `source` failed: keep what it found last, marked stale with the reason.
    pub fn mark_discovered_stale(&self, source: &str, reason: &str) -> Result<usize, StateError> {
        self.mark_discovered_stale_fenced(source, reason, None)
    }

    /// As [`State::mark_discovered_stale`], by the holder of `fence` only (see
    /// [`State::replace_discovered_fenced`]).
    pub fn mark_discovered_stale_fenced(
        &self,
        source: &str,
        reason: &str,
        fence: Option<&Fence>,
    ) -> Result<usize, StateError> {
        self.tx(|c| {
            self.check_fence(c, fence)?;
            c.exec(
                "UPDATE discovered SET stale = ?2 WHERE source = ?1 AND stale IS DISTINCT FROM ?2",
                vals![source, reason],
            )
        })
    }

    /// Drops resources whose source no node polls any more: not in `keep_sources` (what this
    /// node configures) and without a lease ([`discovery_lease`]) that is live or expired less
    /// than `lease_grace` ago. Another node may configure a source this one does not; while it
    /// lives it renews that source's lease, so its rows stay. A node that is only restarting
    /// keeps its rows for `lease_grace`.
    pub fn prune_discovered(&self, keep_sources: &[String], lease_grace: Duration) -> Result<usize, StateError> {
        let grace_ms = i64::try_from(lease_grace.as_millis()).unwrap_or(i64::MAX / 2);
        let now = self.now_ms_sql();
        self.tx(|c| {
            let sources: Vec<String> = c
                .query("SELECT DISTINCT source FROM discovered", vals![])?
                .iter()
                .map(|r| r.get(0))
                .collect::<Result<_, _>>()?;
            let mut removed = 0;
            for s in sources.iter().filter(|s| !keep_sources.contains(s)) {
                let polled = c
                    .query_opt(
                        &format!("SELECT 1 FROM leases WHERE name = ?1 AND expires_at_ms > {now} - ?2"),
                        vals![discovery_lease(s), grace_ms],
                    )?
                    .is_some();
                if !polled {
                    removed += c.exec("DELETE FROM discovered WHERE source = ?1", vals![s])?;
                }
            }
            Ok(removed)
        })
    }

    // ---- leases ----

    /// Takes the lease `name` for `holder` for `ttl`, or renews it: one statement, judged on
    /// the database's clock. It succeeds when the lease is free, expired, or already
    /// `holder`'s; the fencing token is raised when the holder changes (a holder renewing, or
    /// taking back its own expired lease that nobody took meanwhile, keeps its token). `None`:
    /// another holder has it.
    pub fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<u64>, StateError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let now = self.now_ms_sql();
        // Bookkeeping: on SQLite a renewal must not make policy snapshots look stale.
        let row = self.own(|c| {
            c.query_opt(
                &format!(
                    "INSERT INTO leases (name, holder, token, expires_at_ms) VALUES (?1, ?2, 1, {now} + ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                        token = leases.token + CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END,
                        expires_at_ms = excluded.expires_at_ms
                     WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= {now}
                     RETURNING token"
                ),
                vals![name, holder, ttl_ms],
            )
        })?;
        row.map(|r| r.get::<i64>(0).map(|t| t as u64)).transpose()
    }

    /// Gives the lease up (only `holder`'s): another node may take it at once.
    pub fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StateError> {
        Ok(self.own(|c| c.exec("DELETE FROM leases WHERE name = ?1 AND holder = ?2", vals![name, holder]))? > 0)
    }

    /// (holder, token, milliseconds left) of a lease, as the database sees it now; expired
    /// leases show a negative remainder.
    pub fn lease(&self, name: &str) -> Result<Option<(String, u64, i64)>, StateError> {
        let now = self.now_ms_sql();
        let row = self.run(|c| {
            c.query_opt(
                &format!("SELECT holder, token, expires_at_ms - {now} FROM leases WHERE name = ?1"),
                vals![name],
            )
        })?;
        row.map(|r| Ok((r.get(0)?, r.get::<i64>(1)? as u64, r.get(2)?))).transpose()
    }

    /// Inside a write's transaction: the write goes ahead only while `fence` is the live
    /// lease. On PostgreSQL the row is share-locked until the write commits, so a takeover
    /// waits for it (and a write that comes after the takeover sees the new token).
    fn check_fence(&self, c: &mut dyn Conn, fence: Option<&Fence>) -> Result<(), StateError> {
        let Some(f) = fence else { return Ok(()) };
        let lock = match self.store {
            Store::Sqlite(_) => "",
            Store::Pg(_) => " FOR SHARE",
        };
        let token = i64::try_from(f.token).map_err(|_| StateError::Fenced(f.name.clone()))?;
        let held = c
            .query_opt(
                &format!(
                    "SELECT 1 FROM leases WHERE name = ?1 AND holder = ?2 AND token = ?3 AND expires_at_ms > {}{lock}",
                    self.now_ms_sql()
                ),
                vals![f.name.as_str(), f.holder.as_str(), token],
            )?
            .is_some();
        if held {
            Ok(())
        } else {
            Err(StateError::Fenced(f.name.clone()))
        }
    }

    /// Every discovered row, under its AWS name (see `discovery::served_names` for the names
    /// they are served under).
    pub fn discovered(&self) -> Result<Vec<DiscoveredRow>, StateError> {
        let rows = self.run(|c| {
            c.query(
                "SELECT source, uid, spec, aws_resource_id, stale FROM discovered ORDER BY name, source, uid",
                vals![],
            )
        })?;
        rows.iter()
            .map(|r| {
                let (source, uid, spec, aws_resource_id, stale): (String, String, String, String, Option<String>) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
                let resource = serde_json::from_str(&spec)
                    .map_err(|e| StateError::Corrupt(format!("discovered database: {e}")))?;
                Ok(DiscoveredRow { source, item: Discovered { resource, aws_resource_id, uid }, stale })
            })
            .collect()
    }

    // ---- login sessions ----

    pub fn create_web_session(
        &self,
        user: &str,
        ttl: std::time::Duration,
    ) -> Result<(String, OffsetDateTime), StateError> {
        let token = random_secret(32);
        let expires = OffsetDateTime::now_utc() + ttl;
        // Bookkeeping: a login changes no policy, so it must not make every snapshot stale.
        self.own(|c| {
            c.exec(
                "INSERT INTO web_sessions (hash, \"user\", expires_at) VALUES (?1, ?2, ?3)",
                vals![sha256_hex(&token), user, expires.unix_timestamp()],
            )
        })?;
        Ok((token, expires))
    }

    /// The user and expiry of a live login session.
    pub fn web_session(&self, token: &str) -> Result<Option<(String, OffsetDateTime)>, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let row = self.run(|c| {
            c.query_opt(
                "SELECT \"user\", expires_at FROM web_sessions WHERE hash = ?1 AND expires_at > ?2",
                vals![sha256_hex(token), now],
            )
        })?;
        row.map(|r| {
            let (u, e): (String, i64) = (r.get(0)?, r.get(1)?);
            Ok((u, OffsetDateTime::from_unix_timestamp(e).map_err(|e| StateError::Corrupt(e.to_string()))?))
        })
        .transpose()
    }

    pub fn delete_web_session(&self, token: &str) -> Result<(), StateError> {
        self.own(|c| c.exec("DELETE FROM web_sessions WHERE hash = ?1", vals![sha256_hex(token)]))?;
        Ok(())
    }

    // ---- audit ----

    /// Stores an audit record; the indexed columns are taken from its `time`, `event`, `sid`,
    /// `user`, `db_service`, `success` and `event_id` fields. Returns the row id, or `None` when
    /// an event with the same `event_id` is already stored.
    pub fn insert_audit(&self, record: &serde_json::Value) -> Result<Option<i64>, StateError> {
        Ok(self.insert_audit_batch(std::slice::from_ref(record))?.into_iter().next().flatten())
    }

    /// Stores several audit records in one transaction; for each, its row id or `None` if it
    /// was a duplicate (by `event_id`). On PostgreSQL a batch retried through another auth node
    /// while the first is still committing waits on the unique index, then stores nothing twice.
    pub fn insert_audit_batch(&self, records: &[serde_json::Value]) -> Result<Vec<Option<i64>>, StateError> {
        self.own(|c| {
            records
                .iter()
                .map(|record| {
                    let row = c.query_opt(AUDIT_INSERT, &audit_vals(record))?;
                    row.map(|r| r.get(0)).transpose()
                })
                .collect()
        })
    }

    /// Whether this node keeps a store of its own beside a shared one (an auth node on
    /// PostgreSQL): its audit events then wait there until they are in the shared store.
    pub fn has_local(&self) -> bool {
        self.local.is_some()
    }

    /// Stores an audit record in the spool: this node's own store (`node.db` beside a shared
    /// PostgreSQL, or an agent's `agent.db`), from which it is delivered. The row id, or `None`
    /// for a duplicate `event_id`.
    pub fn spool_audit(&self, record: &serde_json::Value) -> Result<Option<i64>, StateError> {
        let insert = |c: &mut dyn Conn| {
            let row = c.query_opt(AUDIT_INSERT, &audit_vals(record))?;
            row.map(|r| r.get(0)).transpose()
        };
        match &self.local {
            Some(l) => l.write_own(insert),
            None => self.own(insert),
        }
    }

    /// The oldest `limit` spooled audit rows as (row id, record), still to deliver.
    pub fn audit_spool(&self, limit: usize) -> Result<Vec<(i64, serde_json::Value)>, StateError> {
        let rows =
            self.local_run(|c| c.query("SELECT id, data FROM audit ORDER BY id LIMIT ?1", vals![limit as i64]))?;
        rows.iter().map(|r| Ok((r.get(0)?, serde_json::from_str(&r.get::<String>(1)?)?))).collect()
    }

    /// Drops spooled audit rows up to `id`, once they are delivered.
    pub fn delete_audit_through(&self, id: i64) -> Result<usize, StateError> {
        self.local_own(|c| c.exec("DELETE FROM audit WHERE id <= ?1", vals![id]))
    }

    /// The newest audit rows matching `filter`, oldest first. Times compare as RFC 3339 text
    /// (every row's `time` is UTC with a `Z`), so a date alone (`2026-12-01`) works as a bound.
    pub fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StateError> {
        let rows = self.run(|c| {
            c.query(
                "SELECT id, time, event, session_id, \"user\", db, success, data FROM audit
                 WHERE (CAST(?1 AS TEXT) IS NULL OR \"user\" = ?1) AND (CAST(?2 AS TEXT) IS NULL OR db = ?2)
                   AND (CAST(?3 AS TEXT) IS NULL OR event = ?3)
                   AND (CAST(?4 AS TEXT) IS NULL OR time >= ?4) AND (CAST(?5 AS TEXT) IS NULL OR time <= ?5)
                 ORDER BY id DESC LIMIT ?6",
                vals![&filter.user, &filter.db, &filter.event, &filter.since, &filter.until, filter.limit as i64],
            )
        })?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    event: r.get(2)?,
                    session_id: r.get(3)?,
                    user: r.get(4)?,
                    db: r.get(5)?,
                    success: r.get(6)?,
                    data: serde_json::from_str(&r.get::<String>(7)?).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        out.reverse();
        Ok(out)
    }

    pub fn audit_events(&self, limit: usize) -> Result<Vec<AuditRow>, StateError> {
        self.audit_query(&AuditFilter { limit, ..AuditFilter::default() })
    }

    // ---- bookkeeping written off the connection path ----

    /// Writes a batch of this node's bookkeeping (audit events, live-session records) in as
    /// few transactions as the stores allow: one where the audit events go to this node's own
    /// store (`spooled`: an agent or an auth node beside PostgreSQL) or there is one store only.
    /// Returns, per entry, the audit row id (`None` for a duplicate `event_id` or a live-session
    /// entry).
    pub fn write_bookkeeping(&self, batch: &[Bookkeeping], spooled: bool) -> Result<Vec<Option<i64>>, StateError> {
        let apply = |c: &mut dyn Conn, audit: bool, live: bool| -> Result<Vec<Option<i64>>, StateError> {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let mut rows = Vec::with_capacity(batch.len());
            for entry in batch {
                rows.push(match entry {
                    Bookkeeping::Audit(record) if audit => {
                        c.query_opt(AUDIT_INSERT, &audit_vals(record))?.map(|r| r.get(0)).transpose()?
                    }
                    Bookkeeping::LiveInsert { id, data } if live => {
                        c.exec(LIVE_INSERT, vals![id.as_str(), now, data.to_string()])?;
                        None
                    }
                    Bookkeeping::LiveDelete(id) if live => {
                        c.exec("DELETE FROM live_sessions WHERE id = ?1", vals![id.as_str()])?;
                        None
                    }
                    _ => None,
                });
            }
            Ok(rows)
        };
        if spooled || self.local.is_none() {
            return self.local_own(|c| apply(c, true, true));
        }
        let rows = self.own(|c| apply(c, true, false))?;
        self.local_own(|c| apply(c, false, true))?;
        Ok(rows)
    }

    // ---- sessions held by the data plane (this node's own store) ----

    /// Remembers a handed-off session, so its end can be audited even by a restarted control.
    pub fn insert_live_session(&self, id: &str, data: &serde_json::Value) -> Result<(), StateError> {
        self.local_own(|c| {
            c.exec(LIVE_INSERT, vals![id, OffsetDateTime::now_utc().unix_timestamp(), data.to_string()])
        })?;
        Ok(())
    }

    /// Forgets a live session's record.
    pub fn delete_live_session(&self, id: &str) -> Result<(), StateError> {
        self.local_own(|c| c.exec("DELETE FROM live_sessions WHERE id = ?1", vals![id]))?;
        Ok(())
    }

    /// Every live session: (id, started_at unix seconds, record).
    pub fn live_sessions(&self) -> Result<Vec<(String, i64, serde_json::Value)>, StateError> {
        let rows =
            self.local_run(|c| c.query("SELECT id, started_at, data FROM live_sessions ORDER BY started_at", vals![]))?;
        rows.iter()
            .map(|r| {
                let (id, t, d): (String, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                Ok((id, t, serde_json::from_str(&d).map_err(|e| StateError::Corrupt(format!("live session: {e}")))?))
            })
            .collect()
    }

    /// Adds a lock; at least one of `user` and `db` must be set (a lock on everything is a typo,
    /// not a policy).
    pub fn add_lock(
        &self,
        user: Option<&str>,
        db: Option<&str>,
        message: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<Lock, StateError> {
        if user.is_none() && db.is_none() {
            return Err(StateError::Invalid("a lock needs a user or a database target".into()));
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let lock = Lock {
            id: random_secret(4),
            user: user.map(str::to_owned),
            db: db.map(str::to_owned),
            message: message.to_owned(),
            expires_at: ttl.map(|t| now + t.as_secs() as i64),
            created_at: now,
        };
        self.run(|c| {
            c.exec(
                "INSERT INTO locks (id, \"user\", db, message, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                vals![lock.id.as_str(), &lock.user, &lock.db, lock.message.as_str(), &lock.expires_at, lock.created_at],
            )
        })?;
        Ok(lock)
    }

    /// Removes a lock; false if there was none with that id.
    pub fn delete_lock(&self, id: &str) -> Result<bool, StateError> {
        Ok(self.run(|c| c.exec("DELETE FROM locks WHERE id = ?1", vals![id]))? > 0)
    }

    /// Locks in force now. Expired ones are left to [`State::janitor_pass`]: a read never
    /// deletes (on a shared store every node reads at once).
    pub fn active_locks(&self) -> Result<Vec<Lock>, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let rows = self.run(|c| {
            c.query(
                "SELECT id, \"user\", db, message, expires_at, created_at FROM locks
                 WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY created_at, id",
                vals![now],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(Lock {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    db: r.get(2)?,
                    message: r.get(3)?,
                    expires_at: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })
            .collect()
    }

    /// Records that this auth server is serving (every few seconds while it runs).
    pub fn record_auth_node(&self, node: &AuthNode) -> Result<(), StateError> {
        self.own(|c| {
            c.exec(
                "INSERT INTO auth_nodes (id, name, api_addr, cluster_addr, version, started_at, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, api_addr = excluded.api_addr,
                     cluster_addr = excluded.cluster_addr, version = excluded.version,
                     started_at = excluded.started_at, last_seen = excluded.last_seen",
                vals![
                    node.id.as_str(),
                    node.name.as_str(),
                    node.api_addr.as_str(),
                    &node.cluster_addr,
                    node.version.as_str(),
                    node.started_at,
                    node.last_seen
                ],
            )
        })?;
        Ok(())
    }

    /// The auth servers that reported themselves, most recently seen first.
    pub fn auth_nodes(&self) -> Result<Vec<AuthNode>, StateError> {
        let rows = self.run(|c| {
            c.query(
                "SELECT id, name, api_addr, cluster_addr, version, started_at, last_seen FROM auth_nodes
                 ORDER BY last_seen DESC, name",
                vals![],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(AuthNode {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    api_addr: r.get(2)?,
                    cluster_addr: r.get(3)?,
                    version: r.get(4)?,
                    started_at: r.get(5)?,
                    last_seen: r.get(6)?,
                })
            })
            .collect()
    }

    /// Removes what has expired: join tokens a day past expiry (until then an agent using one
    /// is told it expired), login sessions, locks. Each table in small batches, so a pass
    /// never holds many rows locked; several nodes running it at once only repeat each
    /// other's work. Returns how many rows went.
    pub fn janitor_pass(&self, now: i64) -> Result<JanitorCounts, StateError> {
        const BATCH: i64 = 1000;
        let sweep = |table: &str, key: &str, cond: &str, at: i64| -> Result<usize, StateError> {
            let sql = format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {cond} LIMIT ?2{lock})",
                lock = if matches!(self.store, Store::Pg(_)) { " FOR UPDATE SKIP LOCKED" } else { "" }
            );
            let mut total = 0;
            loop {
                let n = self.own(|c| c.exec(&sql, vals![at, BATCH]))?;
                total += n;
                if (n as i64) < BATCH {
                    return Ok(total);
                }
            }
        };
        Ok(JanitorCounts {
            tokens: sweep("tokens", "hash", "expires_at <= ?1", now - EXPIRED_TOKEN_GRACE)?,
            web_sessions: sweep("web_sessions", "hash", "expires_at <= ?1", now)?,
            // A policy change (on SQLite an ordinary commit; on PostgreSQL it moves the feed):
            // harmless, the lock had stopped matching already.
            locks: sweep("locks", "id", "expires_at IS NOT NULL AND expires_at <= ?1", now)?,
            auth_nodes: sweep("auth_nodes", "id", "last_seen <= ?1", now - AUTH_NODE_FORGOTTEN)?,
            // Leases of sources nobody has polled for an hour (one row per source ever polled).
            leases: sweep("leases", "name", "expires_at_ms <= ?1", (now - 3600) * 1000)?,
        })
    }

    pub fn counts(&self) -> Result<(i64, i64, i64), StateError> {
        self.run(|c| {
            let r = c.query_one(
                "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM roles), (SELECT count(*) FROM databases)",
                vals![],
            )?;
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
    }
}

/// The configured key-encryption keys, loaded (a KMS key is only described here; it is called
/// when the CA key is opened).
fn key_ring(storage: &crate::config::StorageConfig) -> Result<Option<crate::kek::KeyRing>, StateError> {
    let (kek, previous) = storage.keks();
    Ok(kek.map(|k| crate::kek::KeyRing::load(k, previous)).transpose()?)
}

impl From<crate::kek::KekError> for StateError {
    fn from(e: crate::kek::KekError) -> Self {
        StateError::Kek(e.to_string())
    }
}

/// Auth servers that serve from this state, each upserting its row while it runs (bookkeeping:
/// no policy reads it). Portable DDL, the same on both backends.
/// Where an agent serves MySQL, as its last heartbeat said (nullable: agents without a MySQL
/// listener, and those from before it was reported, say nothing). The PostgreSQL backend also
/// widens its view trigger (see `pg::NODE_MYSQL_ADDR`).
const NODE_MYSQL_ADDR: &str = "ALTER TABLE nodes ADD COLUMN hb_mysql_addr TEXT;";

const AUTH_NODES_TABLE: &str = "CREATE TABLE auth_nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    api_addr TEXT NOT NULL,
    cluster_addr TEXT,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);";

/// An auth server as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthNode {
    pub id: String,
    pub name: String,
    pub api_addr: String,
    pub cluster_addr: Option<String>,
    pub version: String,
    /// Unix seconds.
    pub started_at: i64,
    pub last_seen: i64,
}

/// What one [`State::janitor_pass`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JanitorCounts {
    pub tokens: usize,
    pub web_sessions: usize,
    pub locks: usize,
    pub auth_nodes: usize,
    pub leases: usize,
}

/// An auth server silent this long (seconds) is dropped from the list.
const AUTH_NODE_FORGOTTEN: i64 = 3600;

/// The CA row at rest.
#[derive(Debug, Clone)]
pub struct CaRow {
    pub cert_pem: String,
    /// The plaintext PKCS#8 key, or empty when it is sealed.
    pub key_pem: String,
    pub key_envelope: Option<Vec<u8>>,
    pub key_wraps: Option<String>,
}

const LIVE_INSERT: &str = "INSERT INTO live_sessions (id, started_at, data) VALUES (?1, ?2, ?3)
     ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at, data = excluded.data";

/// One write of a node's bookkeeping, batched by [`State::write_bookkeeping`].
#[derive(Debug, Clone)]
pub enum Bookkeeping {
    Audit(serde_json::Value),
    /// A session the data plane holds (its record, for a restarted control).
    LiveInsert {
        id: String,
        data: serde_json::Value,
    },
    LiveDelete(String),
}

const AUDIT_INSERT: &str = "INSERT INTO audit (time, event, session_id, \"user\", db, success, data, event_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING RETURNING id";

/// The indexed columns of an audit record, in [`AUDIT_INSERT`]'s order.
fn audit_vals(record: &serde_json::Value) -> Vec<sql::Val> {
    let text = |k: &str| record.get(k).and_then(serde_json::Value::as_str);
    vals![
        text("time").unwrap_or_default(),
        text("event").unwrap_or_default(),
        text("sid"),
        text("user"),
        text("db_service"),
        record.get("success").and_then(serde_json::Value::as_bool).unwrap_or(false),
        record.to_string(),
        text("event_id"),
    ]
    .to_vec()
}

/// The name of the one CA row (and of the CA in its key's encryption context).
pub const CA_NAME: &str = "db";

const NODE_SELECT: &str = "SELECT host_id, node_index, name, role, labels, joined_at, cert_not_after, last_seen,
        hb_postgres_addr, hb_databases, hb_sessions, hb_version, hb_interval_ms, hb_at_ms, hb_mysql_addr FROM nodes";

fn node_from_row(r: &sql::Row) -> Result<Node, StateError> {
    let corrupt = |e: std::num::TryFromIntError| StateError::Corrupt(e.to_string());
    let heartbeat = match (r.get::<Option<i64>>(12)?, r.get::<Option<i64>>(13)?) {
        (Some(interval), Some(at_ms)) => Some(NodeHeartbeat {
            postgres_addr: r.get::<Option<String>>(8)?.unwrap_or_default(),
            mysql_addr: r.get::<Option<String>>(14)?,
            databases: serde_json::from_str(&r.get::<Option<String>>(9)?.unwrap_or_else(|| "[]".into()))?,
            sessions: u32::try_from(r.get::<Option<i64>>(10)?.unwrap_or_default()).map_err(corrupt)?,
            version: r.get::<Option<String>>(11)?.unwrap_or_default(),
            interval_ms: u64::try_from(interval).map_err(corrupt)?,
            at_ms,
        }),
        _ => None,
    };
    Ok(Node {
        host_id: r.get(0)?,
        node_index: u16::try_from(r.get::<i64>(1)?).map_err(corrupt)?,
        name: r.get(2)?,
        role: r.get(3)?,
        labels: serde_json::from_str(&r.get::<String>(4)?)?,
        joined_at: r.get(5)?,
        cert_not_after: r.get(6)?,
        last_seen: r.get(7)?,
        heartbeat,
    })
}

fn hash_password(password: &str) -> Result<String, StateError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StateError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{params, Connection};

    fn temp_state() -> (State, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sluice-state-{}", random_secret(6)));
        (State::open(&dir).unwrap(), dir)
    }

    #[test]
    fn users_passwords_sessions() {
        let (s, dir) = temp_state();
        s.add_user("alice", "pw1", &["dev".into()]).unwrap();
        assert!(matches!(s.add_user("alice", "x", &[]), Err(StateError::Exists(_))));
        assert!(s.verify_password("alice", "pw1").unwrap());
        assert!(!s.verify_password("alice", "pw2").unwrap());
        assert!(!s.verify_password("nobody", "pw1").unwrap());
        let (tok, _) = s.create_web_session("alice", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(s.web_session(&tok).unwrap().map(|x| x.0).as_deref(), Some("alice"));
        s.delete_web_session(&tok).unwrap();
        assert!(s.web_session(&tok).unwrap().is_none());
        let ca1 = s.ensure_ca("c").unwrap();
        let ca2 = s.ensure_ca("c").unwrap();
        assert_eq!(ca1.cert_pem, ca2.cert_pem);
        let (t, _) = s.add_token("db", std::time::Duration::from_secs(60)).unwrap();
        assert!(s.check_token(&t, "db").unwrap());
        assert!(!s.check_token(&t, "node").unwrap());
        assert!(!s.check_token("nope", "db").unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn join_tokens_tell_why_they_are_refused() {
        let (s, dir) = temp_state();
        let (db, _) = s.add_token("db", std::time::Duration::from_secs(60)).unwrap();
        let (node, _) = s.add_token("node", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(s.check_join_token(&db, "db").unwrap(), TokenCheck::Valid);
        // Multi-use until it expires.
        assert_eq!(s.check_join_token(&db, "db").unwrap(), TokenCheck::Valid);
        assert_eq!(s.check_join_token("nope", "db").unwrap(), TokenCheck::Unknown);
        assert_eq!(s.check_join_token(&node, "db").unwrap(), TokenCheck::WrongType { kind: "node".into() });
        let (old, expires) = s.add_token("db", std::time::Duration::ZERO).unwrap();
        assert_eq!(
            s.check_join_token(&old, "db").unwrap(),
            TokenCheck::Expired { at: expires.replace_nanosecond(0).unwrap() }
        );
        // Long expired: unknown, and the janitor removes it (and only it).
        s.run(|c| {
            c.exec("UPDATE tokens SET expires_at = expires_at - 2 * 86400 WHERE hash = ?1", vals![sha256_hex(&old)])
        })
        .unwrap();
        assert_eq!(s.check_join_token(&old, "db").unwrap(), TokenCheck::Unknown);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(s.janitor_pass(now).unwrap(), JanitorCounts { tokens: 1, ..Default::default() });
        assert_eq!(s.janitor_pass(now).unwrap(), JanitorCounts::default());
        assert_eq!(s.check_join_token(&db, "db").unwrap(), TokenCheck::Valid);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn nodes_get_the_lowest_free_index() {
        let (s, dir) = temp_state();
        let labels: std::collections::BTreeMap<String, String> = [("env".to_owned(), "dev".to_owned())].into();
        let na = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let a = s.add_node("a", "db", &labels, na).unwrap();
        let b = s.add_node("b", "db", &labels, na).unwrap();
        assert_eq!((a.node_index, b.node_index), (1, 2));
        assert_ne!(a.host_id, b.host_id);
        assert!(s.delete_node(&a.host_id).unwrap());
        let c = s.add_node("c", "db", &Default::default(), na).unwrap();
        assert_eq!(c.node_index, 1);
        let names: Vec<String> = s.nodes().unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["c", "b"]);
        assert_eq!(s.nodes().unwrap()[1].labels, labels);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn agents_sessions_are_replaced_per_heartbeat_and_kills_are_numbered() {
        let (s, dir) = temp_state();
        let na = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let a = s.add_node("a", "db", &Default::default(), na).unwrap();
        let b = s.add_node("b", "db", &Default::default(), na).unwrap();
        let f = |id: &str| crate::audit::SessionFields {
            session_id: id.into(),
            user: "alice".into(),
            ..Default::default()
        };
        s.replace_node_sessions(&a.host_id, &[(10, f("s1")), (11, f("s2"))]).unwrap();
        s.replace_node_sessions(&b.host_id, &[(12, f("s3"))]).unwrap();
        s.replace_node_sessions(&a.host_id, &[(11, f("s2"))]).unwrap();
        let listed: Vec<(String, String, i64)> =
            s.node_sessions().unwrap().into_iter().map(|n| (n.host_id, n.fields.session_id, n.started_at)).collect();
        assert_eq!(listed, [(a.host_id.clone(), "s2".into(), 11), (b.host_id.clone(), "s3".into(), 12)]);
        assert_eq!(s.node_holding_session("s3").unwrap(), Some(b.host_id.clone()));
        assert_eq!(s.node_holding_session("s1").unwrap(), None, "gone from a's last heartbeat");
        // A removed agent's sessions go with it.
        s.delete_node(&b.host_id).unwrap();
        assert_eq!(s.node_holding_session("s3").unwrap(), None);
        assert_eq!(s.node_sessions().unwrap().len(), 1);

        assert_eq!(s.last_session_kill().unwrap(), 0);
        let k1 = s.add_session_kill("s2").unwrap();
        let k2 = s.add_session_kill("s9").unwrap();
        assert!(k2 > k1);
        assert_eq!(s.session_kills_after(k1).unwrap(), [(k2, "s9".to_owned())]);
        assert_eq!(s.last_session_kill().unwrap(), k2);
        assert_eq!(s.prune_session_kills(std::time::Duration::from_secs(60)).unwrap(), 0, "fresh requests stay");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn discovered_reconcile_and_stale() {
        let (s, dir) = temp_state();
        let item = |name: &str, uri: &str| Discovered {
            resource: serde_saphyr::from_str(&format!(
                "kind: db\nversion: v3\nmetadata: {{name: {name}}}\nspec: {{protocol: postgres, uri: \"{uri}\"}}"
            ))
            .unwrap(),
            aws_resource_id: format!("prx-{name}"),
            uid: format!("arn:aws:rds:r:1:db-proxy:prx-{name}"),
        };
        assert_eq!(s.replace_discovered("a", &[item("p1", "h1:1"), item("p2", "h2:1")]).unwrap(), (2, 0, 0));
        assert_eq!(s.replace_discovered("b", &[item("q1", "h:1")]).unwrap(), (1, 0, 0));
        assert_eq!(s.replace_discovered("a", &[item("p1", "h1:2")]).unwrap(), (0, 1, 1));
        assert_eq!(s.mark_discovered_stale("a", "Throttling").unwrap(), 1);
        let rows = s.discovered().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].stale.as_deref(), Some("Throttling"));
        assert_eq!(rows[1].stale, None);
        s.replace_discovered("a", &[item("p1", "h1:2")]).unwrap();
        assert!(s.discovered().unwrap().iter().all(|r| r.stale.is_none()));
        assert_eq!(s.prune_discovered(&["b".to_owned()], Duration::ZERO).unwrap(), 1);
        assert_eq!(s.discovered().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_lease_is_taken_over_only_after_it_expires_and_fences_its_old_holder() {
        let (s, dir) = temp_state();
        let ttl = Duration::from_millis(400);
        let a1 = s.acquire_lease("discovery/x", "a", ttl).unwrap().expect("a free lease is taken");
        assert_eq!(s.acquire_lease("discovery/x", "b", ttl).unwrap(), None, "held: b must wait");
        assert_eq!(s.acquire_lease("discovery/x", "a", ttl).unwrap(), Some(a1), "a renewal keeps the token");
        let (holder, token, left) = s.lease("discovery/x").unwrap().unwrap();
        assert_eq!((holder.as_str(), token), ("a", a1));
        assert!(left > 0 && left <= 400, "{left}");

        let item = Discovered {
            resource: serde_saphyr::from_str(
                "kind: db\nversion: v3\nmetadata: {name: p1}\nspec: {protocol: postgres, uri: \"h:1\"}",
            )
            .unwrap(),
            aws_resource_id: "prx-p1".into(),
            uid: "arn:aws:rds:r:1:db-proxy:prx-p1".into(),
        };
        let fence_a = Fence { name: "discovery/x".into(), holder: "a".into(), token: a1 };
        assert_eq!(s.replace_discovered_fenced("x", std::slice::from_ref(&item), Some(&fence_a)).unwrap(), (1, 0, 0));

        std::thread::sleep(Duration::from_millis(500));
        // Expired: a's fenced writes are refused even before anyone takes over.
        assert!(matches!(s.mark_discovered_stale_fenced("x", "late", Some(&fence_a)), Err(StateError::Fenced(_))));
        let b1 = s.acquire_lease("discovery/x", "b", ttl).unwrap().expect("an expired lease is taken over");
        assert_eq!(b1, a1 + 1, "a new holder gets a new token");
        assert_eq!(s.acquire_lease("discovery/x", "a", ttl).unwrap(), None);
        assert!(matches!(s.replace_discovered_fenced("x", &[], Some(&fence_a)), Err(StateError::Fenced(_))));
        assert!(matches!(s.mark_discovered_stale_fenced("x", "late", Some(&fence_a)), Err(StateError::Fenced(_))));
        let rows = s.discovered().unwrap();
        assert_eq!(rows.len(), 1, "a stale holder's write changed nothing");
        assert_eq!(rows[0].stale, None);
        let fence_b = Fence { name: "discovery/x".into(), holder: "b".into(), token: b1 };
        assert_eq!(s.mark_discovered_stale_fenced("x", "Throttling", Some(&fence_b)).unwrap(), 1);

        // Released: anyone may take it at once, and the token still moves on.
        assert!(!s.release_lease("discovery/x", "a").unwrap(), "only the holder releases");
        assert!(s.release_lease("discovery/x", "b").unwrap());
        assert!(s.acquire_lease("discovery/x", "a", ttl).unwrap().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lease_renewals_do_not_make_policy_snapshots_stale() {
        let (s, dir) = temp_state();
        s.add_user("alice", "pw", &[]).unwrap();
        let before = s.change_marker().unwrap();
        for _ in 0..3 {
            s.acquire_lease("discovery/x", "a", Duration::from_secs(5)).unwrap().unwrap();
        }
        let after = s.change_marker().unwrap();
        assert_ne!(before, after, "renewals commit");
        assert!(s.only_own_commits(before, after), "but only as bookkeeping");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pruning_keeps_sources_another_node_still_polls() {
        let (s, dir) = temp_state();
        let item = |name: &str| Discovered {
            resource: serde_saphyr::from_str(&format!(
                "kind: db\nversion: v3\nmetadata: {{name: {name}}}\nspec: {{protocol: postgres, uri: \"h:1\"}}"
            ))
            .unwrap(),
            aws_resource_id: format!("prx-{name}"),
            uid: format!("arn:aws:rds:r:1:db-proxy:prx-{name}"),
        };
        s.replace_discovered("mine", &[item("m")]).unwrap();
        s.replace_discovered("theirs", &[item("t")]).unwrap();
        s.replace_discovered("gone", &[item("g")]).unwrap();
        s.acquire_lease(&discovery_lease("theirs"), "other-node", Duration::from_millis(300)).unwrap().unwrap();
        let grace = Duration::from_millis(300);
        assert_eq!(s.prune_discovered(&["mine".to_owned()], grace).unwrap(), 1, "only the unpolled source goes");
        let sources = |s: &State| s.discovered().unwrap().into_iter().map(|r| r.source).collect::<Vec<_>>();
        assert_eq!(sources(&s), ["mine", "theirs"]);
        // The other node died: its lease expired, and after the grace its rows go too.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(s.prune_discovered(&["mine".to_owned()], grace).unwrap(), 0, "within the grace");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(s.prune_discovered(&["mine".to_owned()], grace).unwrap(), 1);
        assert_eq!(sources(&s), ["mine"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn same_named_resources_of_two_sources_are_both_kept() {
        let (s, dir) = temp_state();
        let item = |uid: &str, uri: &str| Discovered {
            resource: serde_saphyr::from_str(&format!(
                "kind: db\nversion: v3\nmetadata: {{name: orders}}\nspec: {{protocol: postgres, uri: \"{uri}\"}}"
            ))
            .unwrap(),
            aws_resource_id: "prx-1".into(),
            uid: uid.into(),
        };
        let west = item("arn:aws:rds:us-west-2:1:db-proxy:prx-1", "w:1");
        let east = item("arn:aws:rds:us-east-1:1:db-proxy:prx-1", "e:1");
        // Each poll of one source leaves the other's row alone, however often they alternate.
        for _ in 0..2 {
            assert_eq!(s.replace_discovered("west", std::slice::from_ref(&west)).unwrap().2, 0);
            assert_eq!(s.replace_discovered("east", std::slice::from_ref(&east)).unwrap().2, 0);
        }
        let rows = s.discovered().unwrap();
        let got: Vec<(&str, &str)> =
            rows.iter().map(|r| (r.source.as_str(), r.item.resource.spec.uri.as_str())).collect();
        assert_eq!(got, [("east", "e:1"), ("west", "w:1")]);
        assert_eq!(s.replace_discovered("west", &[]).unwrap(), (0, 0, 1));
        assert_eq!(s.discovered().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_discovered_table_keyed_by_name_is_migrated() {
        let dir = std::env::temp_dir().join(format!("sluice-state-{}", random_secret(6)));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let conn = Connection::open(dir.join("sluice.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE discovered (name TEXT PRIMARY KEY, source TEXT NOT NULL, spec TEXT NOT NULL,
                     aws_resource_id TEXT NOT NULL, stale TEXT, updated_at INTEGER NOT NULL);",
            )
            .unwrap();
            let spec = r#"{"kind":"db","version":"v3","metadata":{"name":"orders"},"spec":{"protocol":"postgres","uri":"h:1"}}"#;
            conn.execute(
                "INSERT INTO discovered VALUES ('orders', 'src', ?1, 'prx-1', 'Throttling', 1)",
                params![spec],
            )
            .unwrap();
        }
        let s = State::open(&dir).unwrap();
        let rows = s.discovered().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].item.uid, "legacy:orders");
        assert_eq!(rows[0].item.resource.metadata.name, "orders");
        assert_eq!(rows[0].stale.as_deref(), Some("Throttling"));
        // The first good fetch replaces the legacy row with the keyed one.
        let mut fresh = rows[0].item.clone();
        fresh.uid = "arn:aws:rds:r:1:db-proxy:prx-1".into();
        assert_eq!(s.replace_discovered("src", &[fresh]).unwrap(), (1, 0, 1));
        drop(s);
        // Opening again (the table is current now) changes nothing.
        let s = State::open(&dir).unwrap();
        assert_eq!(s.discovered().unwrap()[0].item.uid, "arn:aws:rds:r:1:db-proxy:prx-1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn nodes_from_before_heartbeats_keep_working() {
        let dir = std::env::temp_dir().join(format!("sluice-state-{}", random_secret(6)));
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The S1 layout, with a joined node.
            let conn = Connection::open(dir.join("sluice.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE nodes (host_id TEXT PRIMARY KEY, node_index INTEGER NOT NULL UNIQUE,
                     name TEXT NOT NULL, role TEXT NOT NULL, labels TEXT NOT NULL, joined_at INTEGER NOT NULL,
                     cert_not_after INTEGER NOT NULL, last_seen INTEGER NOT NULL);
                 INSERT INTO nodes VALUES ('h1', 1, 'a', 'db', '{}', 10, 20, 10);",
            )
            .unwrap();
        }
        let s = State::open(&dir).unwrap();
        let nodes = s.nodes().unwrap();
        assert_eq!((nodes.len(), nodes[0].host_id.as_str(), nodes[0].heartbeat.clone()), (1, "h1", None));
        let hb = NodeHeartbeat {
            postgres_addr: "10.0.0.1:5433".into(),
            mysql_addr: Some("10.0.0.1:3306".into()),
            databases: vec!["orders".into()],
            sessions: 3,
            version: "0.1.0".into(),
            interval_ms: 10_000,
            at_ms: 1_700_000_000_123,
        };
        assert!(s.record_heartbeat("h1", &hb).unwrap());
        assert!(!s.record_heartbeat("gone", &hb).unwrap(), "an unknown node was updated");
        let na = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert!(s.record_renewal("h1", na).unwrap());
        assert!(!s.record_renewal("gone", na).unwrap());
        drop(s);
        // Opening again (the table is current now) changes nothing.
        let node = State::open(&dir).unwrap().node("h1").unwrap().unwrap();
        assert_eq!(node.heartbeat, Some(hb));
        assert_eq!((node.last_seen >= 1_700_000_000, node.cert_not_after), (true, 1_800_000_000));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A file at the schema before agents reported MySQL addresses (the column absent, the
    /// version not stamped) gains the column on open; the heartbeats stored before read as
    /// without one, and new ones keep theirs.
    #[test]
    fn node_mysql_addresses_are_added_to_an_older_schema() {
        let dir = std::env::temp_dir().join(format!("sluice-state-{}", random_secret(6)));
        let hb = NodeHeartbeat {
            postgres_addr: "10.0.0.1:5433".into(),
            mysql_addr: None,
            databases: vec!["orders".into()],
            sessions: 1,
            version: "0.1.0".into(),
            interval_ms: 10_000,
            at_ms: 1_700_000_000_123,
        };
        {
            let s = State::open(&dir).unwrap();
            s.add_node("a", "db", &Default::default(), OffsetDateTime::now_utc()).unwrap();
        }
        let host_id: String = {
            let conn = Connection::open(dir.join("sluice.db")).unwrap();
            conn.execute_batch(&format!(
                "ALTER TABLE nodes DROP COLUMN hb_mysql_addr;
                 DELETE FROM sluice_schema WHERE version = {};",
                super::sqlite::SCHEMA_VERSION
            ))
            .unwrap();
            let host_id = conn.query_row("SELECT host_id FROM nodes", [], |r| r.get(0)).unwrap();
            // The previous build's heartbeat write.
            conn.execute(
                "UPDATE nodes SET hb_postgres_addr = ?2, hb_databases = '[\"orders\"]', hb_sessions = 1,
                     hb_version = '0.1.0', hb_interval_ms = 10000, hb_at_ms = ?3 WHERE host_id = ?1",
                rusqlite::params![host_id, hb.postgres_addr, hb.at_ms],
            )
            .unwrap();
            host_id
        };
        let s = State::open(&dir).unwrap();
        assert_eq!(s.node(&host_id).unwrap().unwrap().heartbeat, Some(hb.clone()));
        let hb = NodeHeartbeat { mysql_addr: Some("10.0.0.1:3306".into()), ..hb };
        assert!(s.record_heartbeat(&host_id, &hb).unwrap());
        assert_eq!(s.node(&host_id).unwrap().unwrap().heartbeat, Some(hb.clone()));
        let stamped = s.run(|c| c.query_one("SELECT max(version) FROM sluice_schema", vals![])?.get::<i64>(0)).unwrap();
        assert_eq!(stamped, super::sqlite::SCHEMA_VERSION);
        // Back to none when the agent loses its MySQL listener.
        let hb = NodeHeartbeat { mysql_addr: None, ..hb };
        assert!(s.record_heartbeat(&host_id, &hb).unwrap());
        assert_eq!(s.node(&host_id).unwrap().unwrap().heartbeat, Some(hb));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn locks_match_expire_and_are_removed() {
        let (s, dir) = temp_state();
        assert!(matches!(s.add_lock(None, None, "x", None), Err(StateError::Invalid(_))));
        let user_lock = s.add_lock(Some("alice"), None, "offboarding", None).unwrap();
        let db_lock =
            s.add_lock(None, Some("prod"), "maintenance", Some(std::time::Duration::from_secs(3600))).unwrap();
        let both = s.add_lock(Some("bob"), Some("dev"), "", None).unwrap();
        assert!(user_lock.matches("alice", "anything"));
        assert!(!user_lock.matches("bob", "anything"));
        assert!(db_lock.matches("bob", "prod") && !db_lock.matches("bob", "dev2"));
        assert!(both.matches("bob", "dev") && !both.matches("bob", "prod2") && !both.matches("carol", "dev"));
        assert_eq!(s.active_locks().unwrap().len(), 3);
        assert!(s.delete_lock(&user_lock.id).unwrap());
        assert!(!s.delete_lock(&user_lock.id).unwrap());
        // An expired lock stops counting at once; the janitor removes its row.
        s.run(|c| c.exec("UPDATE locks SET expires_at = 1 WHERE id = ?1", vals![db_lock.id.as_str()])).unwrap();
        let left: Vec<String> = s.active_locks().unwrap().into_iter().map(|l| l.id).collect();
        assert_eq!(left, vec![both.id.clone()]);
        let rows = |s: &State| s.run(|c| c.query_one("SELECT count(*) FROM locks", vals![])?.get::<i64>(0)).unwrap();
        assert_eq!(rows(&s), 2);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(s.janitor_pass(now).unwrap().locks, 1);
        assert_eq!(rows(&s), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The other process of [`commits_from_another_process_are_never_lost`]: adds and removes
    /// locks in `SLUICE_STATE_PEER_DIR` (run as this test binary filtered to this test; without
    /// the variable it does nothing).
    #[test]
    fn peer_process_writer() {
        let Some(dir) = std::env::var_os("SLUICE_STATE_PEER_DIR") else { return };
        let s = State::open(std::path::Path::new(&dir)).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        while std::time::Instant::now() < until {
            let lock = s.add_lock(Some("alice"), None, "", None).unwrap();
            assert!(s.delete_lock(&lock.id).unwrap());
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    /// While this process commits bookkeeping (reading the change marker inside its
    /// transactions) another process commits policy changes: none of either is lost, and each
    /// of the other's shows as a change. Reading the marker used to close a descriptor of the
    /// WAL index, which dropped SQLite's locks on it (POSIX locks are per process), so two
    /// processes wrote the WAL at once and commits vanished.
    #[test]
    fn commits_from_another_process_are_never_lost() {
        let (s, dir) = temp_state();
        let node = s.add_node("a", "db", &Default::default(), OffsetDateTime::now_utc()).unwrap();
        let mut peer = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "state::tests::peer_process_writer", "--test-threads=1"])
            .env("SLUICE_STATE_PEER_DIR", &dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut n = 0i64;
        while peer.try_wait().unwrap().is_none() {
            let f = crate::audit::SessionFields { session_id: format!("s{n}"), ..Default::default() };
            s.replace_node_sessions(&node.host_id, &[(n, f)]).unwrap();
            n += 1;
            // Leave the other process room: SQLite's busy wait is not fair to a writer in a loop.
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let out = peer.wait_with_output().unwrap();
        assert!(out.status.success(), "the peer process failed: {}", String::from_utf8_lossy(&out.stdout));
        assert!(n > 0);
        assert_eq!(s.active_locks().unwrap(), Vec::new(), "a lock removal from the other process was lost");
        let (last,): (i64,) = (s.node_sessions().unwrap()[0].started_at,);
        assert_eq!(last, n - 1, "a bookkeeping commit was lost");
        let ok: String = s.run(|c| c.query_one("PRAGMA integrity_check", vals![])?.get(0)).unwrap();
        assert_eq!(ok, "ok");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
