//! Control's durable state in SQLite: users, roles, the CA, join tokens, database resources,
//! login sessions and the audit log.
//!
//! The admin CLI and the daemon open the same file (WAL mode). The daemon decides connections from
//! an in-memory snapshot ([`crate::policy::PolicyStore`]) and learns that another process (or its
//! own API) committed by reading the WAL index header ([`State::change_marker`]), not by querying:
//! `control users add` or `control roles create` take effect for the next connection without a
//! reload protocol, and a handshake runs no SQL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use thiserror::Error;
use time::OffsetDateTime;

use crate::ca::{CaError, CertAuthority};
use crate::config::DbResource;
use crate::rbac::Role;

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
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS cert_authorities (name TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, key_pem TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, roles TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS roles (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, kind TEXT NOT NULL, expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS databases (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS web_sessions (hash TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS live_sessions (id TEXT PRIMARY KEY, started_at INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locks (
    id TEXT PRIMARY KEY,
    user TEXT,
    db TEXT,
    message TEXT NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    host_id TEXT PRIMARY KEY,
    node_index INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    labels TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    cert_not_after INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_sessions (
    host_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (host_id, session_id)
);
CREATE INDEX IF NOT EXISTS node_sessions_by_id ON node_sessions (session_id);
CREATE TABLE IF NOT EXISTS session_kills (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    user TEXT,
    db TEXT,
    success INTEGER NOT NULL,
    data TEXT NOT NULL
);
"#;

/// A descriptor of `path` (SQLite's WAL index) that stays open for the life of the process.
///
/// SQLite's unix VFS locks the WAL index with POSIX advisory locks, and the kernel drops all of
/// a process's locks on a file when the process closes *any* descriptor of it. Opening and
/// closing the file for each read of the marker silently released the connection's WAL write
/// lock in the middle of its transactions (another process could then write the WAL at the
/// same time: commits were lost) and its read locks. So each file (by inode: a WAL index
/// deleted with the last connection and created again is a new file) is opened once and never
/// closed.
fn held_open(path: &Path) -> Option<std::sync::Arc<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    type Held = std::collections::HashMap<(u64, u64), std::sync::Arc<std::fs::File>>;
    static HELD: Mutex<Option<Held>> = Mutex::new(None);
    let meta = std::fs::metadata(path).ok()?;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let held = held.get_or_insert_with(Default::default);
    if let Some(file) = held.get(&(meta.dev(), meta.ino())) {
        return Some(file.clone());
    }
    let file = std::fs::File::open(path).ok()?;
    // The file may have been replaced between the two looks: key it by what was opened, and
    // never drop a descriptor (a second one of a file already held is kept too).
    let opened = match file.metadata() {
        Ok(m) => m,
        Err(_) => {
            std::mem::forget(file);
            return None;
        }
    };
    match held.entry((opened.dev(), opened.ino())) {
        std::collections::hash_map::Entry::Occupied(e) => {
            std::mem::forget(file);
            Some(e.get().clone())
        }
        std::collections::hash_map::Entry::Vacant(e) => Some(e.insert(std::sync::Arc::new(file)).clone()),
    }
}

/// Created by [`migrate_discovered`], which also moves the older layout keyed by name.
const DISCOVERED_TABLE: &str = "CREATE TABLE discovered (
    source TEXT NOT NULL,
    uid TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    aws_resource_id TEXT NOT NULL,
    stale TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (source, uid)
);";

pub struct State {
    conn: Mutex<Connection>,
    /// SQLite's WAL index (`sluice.db-shm`), whose header changes with every commit.
    shm: PathBuf,
    /// Recent commits of this handle's bookkeeping ([`State::write_own`]) as (before, after)
    /// markers: a policy snapshot older than them is still current.
    own: Mutex<std::collections::VecDeque<(ChangeMarker, ChangeMarker)>>,
}

/// How many bookkeeping commits [`State::only_own_commits`] can see past.
const OWN_COMMITS_KEPT: usize = 1024;

/// Statements this process has run against the state, by kind (every [`State`] in the process
/// together): the daemon exports them, so a test can check that handshakes run none.
static STATEMENTS_READ: AtomicU64 = AtomicU64::new(0);
static STATEMENTS_WRITE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The statements run on this thread: what one code path ran, whatever other threads do.
    static STATEMENTS_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// SQLite calls this as each statement starts to run (and at each trigger it fires, which
/// counts as part of a write).
fn count_statement(event: rusqlite::trace::TraceEvent<'_>) {
    let rusqlite::trace::TraceEvent::Stmt(_, sql) = event else { return };
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

/// A fingerprint of the last commit to the state, by any process: the WAL index header.
/// SQLite rewrites it (the change counter, frame count and checksums) at every commit, and
/// readers do not touch it (<https://www.sqlite.org/walformat.html>, "The WAL-Index Header").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeMarker([u8; 48]);

impl ChangeMarker {
    /// `iChange`: "incremented with each transaction", in native byte order.
    fn counter(&self) -> u32 {
        u32::from_ne_bytes([self.0[8], self.0[9], self.0[10], self.0[11]])
    }
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

impl State {
    /// Opens (creating if needed) the state in `data_dir`. The directory is made 0700 and every
    /// file in it 0600 (the CA key is in `sluice.db`), tightening what an earlier start or an
    /// operator left looser, with a warning. Safe against concurrent openers (the daemon and
    /// admin verbs started at once).
    pub fn open(data_dir: &Path) -> Result<Self, StateError> {
        Self::open_file(data_dir, "sluice.db")
    }

    /// An agent's own store, `agent.db`: the same schema, but it only ever holds what the agent
    /// itself records (its live sessions and its audit events). Users, password hashes, roles,
    /// tokens and the CA live on the auth server and are never written here.
    pub fn open_agent(data_dir: &Path) -> Result<Self, StateError> {
        Self::open_file(data_dir, "agent.db")
    }

    fn open_file(data_dir: &Path, file: &str) -> Result<Self, StateError> {
        let warn = |t: crate::private_fs::Tightened| {
            tracing::warn!(path = %t.path.display(), was = %format!("{:o}", t.was), "state was readable by other users; tightened");
        };
        if let Some(t) = crate::private_fs::private_dir(data_dir)? {
            warn(t);
        }
        crate::private_fs::private_files_in(data_dir)?.into_iter().for_each(warn);
        // One opener at a time sets the file up: SQLite answers "database is locked" at once,
        // without waiting for its busy timeout, to a second connection that switches a fresh
        // file to WAL or creates tables while the first one does. The lock is released when
        // `_init` drops, after the schema and migrations.
        let lock_file = crate::private_fs::open_private_append(&data_dir.join(format!("{file}.lock")))?;
        let _init = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| StateError::Io(e.into()))?;
        let path = data_dir.join(file);
        // Create the file 0600 before SQLite does (it would use the umask); SQLite gives its
        // -wal and -shm files the database file's mode. Only if it is missing: closing a
        // descriptor of a database another connection in this process has open would drop that
        // connection's locks (see [`held_open`]).
        if !path.exists() {
            drop(crate::private_fs::open_private_append(&path)?);
        }
        let mut conn = Connection::open(&path)?;
        conn.trace_v2(rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT, Some(count_statement));
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA)?;
        migrate_discovered(&mut conn)?;
        migrate_audit(&mut conn)?;
        migrate_nodes(&mut conn)?;
        crate::private_fs::private_files_in(data_dir)?.into_iter().for_each(warn);
        Ok(State { conn: Mutex::new(conn), shm: data_dir.join(format!("{file}-shm")), own: Mutex::default() })
    }

    /// The current [`ChangeMarker`]: one 48-byte read of a file in the page cache, no SQL. `None`
    /// when it cannot be read (callers then treat the state as changed).
    pub fn change_marker(&self) -> Option<ChangeMarker> {
        use std::os::unix::fs::FileExt;
        let file = held_open(&self.shm)?;
        let mut marker = [0u8; 48];
        file.read_exact_at(&mut marker, 0).ok()?;
        Some(ChangeMarker(marker))
    }

    /// Runs a bookkeeping write (audit rows, live-session records: nothing a policy reads) in
    /// its own transaction and remembers its commit, so that it does not make policy snapshots
    /// look stale. The marker is read while the transaction holds SQLite's write lock, and the
    /// commit is taken as ours alone only if the change counter moved by exactly one.
    fn write_own<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before = self.change_marker();
        let out = f(&tx)?;
        tx.commit()?;
        let after = self.change_marker();
        if let (Some(before), Some(after)) = (before, after) {
            if after.counter() == before.counter().wrapping_add(1) {
                let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
                if own.len() == OWN_COMMITS_KEPT {
                    own.pop_front();
                }
                own.push_back((before, after));
            }
        }
        Ok(out)
    }

    /// Whether every commit from `from` to `to` was this handle's bookkeeping.
    pub fn only_own_commits(&self, from: ChangeMarker, to: ChangeMarker) -> bool {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = from;
        // Each step follows one recorded commit; a chain longer than the record is not ours.
        for _ in 0..=own.len() {
            if at == to {
                return true;
            }
            match own.iter().find(|(before, _)| *before == at) {
                Some((_, after)) => at = *after,
                None => return false,
            }
        }
        false
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each call is one statement or
        // transaction), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the cluster CA, creating it on first use. Several processes may get here at once
    /// on a fresh data dir (`control start` and `control status`): the first insert wins and
    /// everyone loads the stored CA.
    pub fn ensure_ca(&self, cluster: &str) -> Result<CertAuthority, StateError> {
        let load = |db: &Connection| -> Result<Option<CertAuthority>, StateError> {
            let row: Option<(String, String)> = db
                .query_row("SELECT cert_pem, key_pem FROM cert_authorities WHERE name = 'db'", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            Ok(row.map(|(cert, key)| CertAuthority::from_pem(&cert, &key)).transpose()?)
        };
        let db = self.db();
        if let Some(ca) = load(&db)? {
            return Ok(ca);
        }
        let ca = CertAuthority::generate(cluster)?;
        db.execute(
            "INSERT OR IGNORE INTO cert_authorities (name, cert_pem, key_pem) VALUES ('db', ?1, ?2)",
            params![ca.cert_pem, ca.key_pem()],
        )?;
        load(&db)?.ok_or_else(|| StateError::Corrupt("the CA vanished right after it was stored".into()))
    }

    // ---- users ----

    pub fn add_user(&self, name: &str, password: &str, roles: &[String]) -> Result<(), StateError> {
        crate::config::validate_name(name).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let hash = hash_password(password)?;
        let roles_json = serde_json::to_string(roles).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let n = self.db().execute(
            "INSERT OR IGNORE INTO users (name, password_hash, roles, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, hash, roles_json, OffsetDateTime::now_utc().unix_timestamp()],
        )?;
        if n == 0 {
            return Err(StateError::Exists(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn update_user_roles(&self, name: &str, roles: &[String]) -> Result<(), StateError> {
        let roles_json = serde_json::to_string(roles).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let n = self.db().execute("UPDATE users SET roles = ?2 WHERE name = ?1", params![name, roles_json])?;
        if n == 0 {
            return Err(StateError::NotFound(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn delete_user(&self, name: &str) -> Result<(), StateError> {
        let db = self.db();
        let n = db.execute("DELETE FROM users WHERE name = ?1", params![name])?;
        db.execute("DELETE FROM web_sessions WHERE user = ?1", params![name])?;
        if n == 0 {
            return Err(StateError::NotFound(format!("user {name:?}")));
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, StateError> {
        let row: Option<String> =
            self.db().query_row("SELECT roles FROM users WHERE name = ?1", params![name], |r| r.get(0)).optional()?;
        row.map(|roles| {
            let roles =
                serde_json::from_str(&roles).map_err(|e| StateError::Corrupt(format!("roles of {name}: {e}")))?;
            Ok(User { name: name.to_owned(), roles })
        })
        .transpose()
    }

    pub fn users(&self) -> Result<Vec<User>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT name, roles FROM users ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (name, roles) = row?;
            let roles =
                serde_json::from_str(&roles).map_err(|e| StateError::Corrupt(format!("roles of {name}: {e}")))?;
            Ok(User { name, roles })
        })
        .collect()
    }

    /// Checks a password; `Ok(false)` for an unknown user or a wrong password alike.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<bool, StateError> {
        let hash: Option<String> = self
            .db()
            .query_row("SELECT password_hash FROM users WHERE name = ?1", params![name], |r| r.get(0))
            .optional()?;
        let Some(hash) = hash else {
            // Spend the same effort as for a real user, so timing does not reveal which users exist.
            let _ = hash_password(password);
            return Ok(false);
        };
        let parsed = PasswordHash::new(&hash).map_err(|e| StateError::Corrupt(e.to_string()))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    }

    // ---- roles ----

    pub fn upsert_role(&self, role: &Role) -> Result<(), StateError> {
        let spec = serde_json::to_string(role).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.db().execute(
            "INSERT INTO roles (name, spec) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
            params![role.metadata.name, spec],
        )?;
        Ok(())
    }

    pub fn delete_role(&self, name: &str) -> Result<(), StateError> {
        if self.db().execute("DELETE FROM roles WHERE name = ?1", params![name])? == 0 {
            return Err(StateError::NotFound(format!("role {name:?}")));
        }
        Ok(())
    }

    pub fn roles(&self) -> Result<Vec<Role>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT spec FROM roles ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|spec| serde_json::from_str(&spec?).map_err(|e| StateError::Corrupt(format!("role: {e}")))).collect()
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
        self.db().execute(
            "INSERT INTO tokens (hash, kind, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![sha256_hex(&token), kind, expires.unix_timestamp(), now.unix_timestamp()],
        )?;
        Ok((token, expires))
    }

    /// Checks a join token of `kind`; expired tokens are removed and refused.
    pub fn check_token(&self, token: &str, kind: &str) -> Result<bool, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let db = self.db();
        db.execute("DELETE FROM tokens WHERE expires_at <= ?1", params![now])?;
        let found: Option<String> = db
            .query_row("SELECT kind FROM tokens WHERE hash = ?1", params![sha256_hex(token)], |r| r.get(0))
            .optional()?;
        Ok(found.as_deref() == Some(kind))
    }

    /// Checks a join token for a join of `kind`, saying why it is refused. Tokens stay valid
    /// until they expire (several agents may join with one); rows expired for more than a day
    /// are purged here.
    pub fn check_join_token(&self, token: &str, kind: &str) -> Result<TokenCheck, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let db = self.db();
        db.execute("DELETE FROM tokens WHERE expires_at <= ?1", params![now - EXPIRED_TOKEN_GRACE])?;
        let found: Option<(String, i64)> = db
            .query_row("SELECT kind, expires_at FROM tokens WHERE hash = ?1", params![sha256_hex(token)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(match found {
            None => TokenCheck::Unknown,
            Some((_, exp)) if exp <= now => TokenCheck::Expired {
                at: OffsetDateTime::from_unix_timestamp(exp).map_err(|e| StateError::Corrupt(e.to_string()))?,
            },
            Some((k, _)) if k != kind => TokenCheck::WrongType { kind: k },
            Some(_) => TokenCheck::Valid,
        })
    }

    // ---- cluster nodes ----

    /// Records a joining agent under a new host id and the lowest free node index.
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
        let mut db = self.db();
        let tx = db.transaction()?;
        let used: Vec<i64> = tx
            .prepare("SELECT node_index FROM nodes ORDER BY node_index")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let index = (1..=MAX_NODE_INDEX)
            .find(|i| used.binary_search(&i64::from(*i)).is_err())
            .ok_or_else(|| StateError::Invalid(format!("the cluster already has {MAX_NODE_INDEX} agents")))?;
        tx.execute(
            "INSERT INTO nodes (host_id, node_index, name, role, labels, joined_at, cert_not_after, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)",
            params![host_id, index, name, role, labels_json, now, cert_not_after.unix_timestamp()],
        )?;
        tx.commit()?;
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
    /// time and the session count changed this is bookkeeping ([`State::write_own`]): a cluster
    /// of agents heartbeating must not make every policy snapshot stale. A new address or list
    /// of databases is a normal commit, so the auth server's snapshot and the agents' watch
    /// (cancel forwarding, `sluice db ls`) see it.
    pub fn record_heartbeat(&self, host_id: &str, hb: &NodeHeartbeat) -> Result<bool, StateError> {
        let databases = serde_json::to_string(&hb.databases)?;
        let interval = i64::try_from(hb.interval_ms).map_err(|e| StateError::Invalid(e.to_string()))?;
        let update = |db: &Connection| {
            db.execute(
                "UPDATE nodes SET hb_postgres_addr = ?2, hb_databases = ?3, hb_sessions = ?4, hb_version = ?5,
                     hb_interval_ms = ?6, hb_at_ms = ?7, last_seen = ?8
                 WHERE host_id = ?1",
                params![
                    host_id,
                    hb.postgres_addr,
                    databases,
                    hb.sessions,
                    hb.version,
                    interval,
                    hb.at_ms,
                    hb.at_ms.div_euclid(1000)
                ],
            )
        };
        let stored: Option<(Option<String>, Option<String>)> = self
            .db()
            .query_row("SELECT hb_postgres_addr, hb_databases FROM nodes WHERE host_id = ?1", params![host_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((addr, dbs)) = stored else { return Ok(false) };
        let same = addr.as_deref() == Some(hb.postgres_addr.as_str()) && dbs.as_deref() == Some(databases.as_str());
        // An agent heartbeats one call at a time, so the row does not change in between.
        let changed = if same { self.write_own(update)? } else { update(&self.db())? };
        Ok(changed > 0)
    }

    /// Records a renewed host certificate's expiry; `false` if the node is no longer registered.
    /// Bookkeeping, as heartbeats are.
    pub fn record_renewal(&self, host_id: &str, cert_not_after: OffsetDateTime) -> Result<bool, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let changed = self.write_own(|db| {
            db.execute(
                "UPDATE nodes SET cert_not_after = ?2, last_seen = ?3 WHERE host_id = ?1",
                params![host_id, cert_not_after.unix_timestamp(), now],
            )
        })?;
        Ok(changed > 0)
    }

    /// The node with this host id, if it is still registered.
    pub fn node(&self, host_id: &str) -> Result<Option<Node>, StateError> {
        Ok(self.nodes()?.into_iter().find(|n| n.host_id == host_id))
    }

    pub fn delete_node(&self, host_id: &str) -> Result<bool, StateError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let removed = tx.execute("DELETE FROM nodes WHERE host_id = ?1", params![host_id])? > 0;
        tx.execute("DELETE FROM node_sessions WHERE host_id = ?1", params![host_id])?;
        tx.commit()?;
        Ok(removed)
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
        self.write_own(|db| {
            db.execute("DELETE FROM node_sessions WHERE host_id = ?1", params![host_id])?;
            let mut insert = db.prepare(
                "INSERT OR REPLACE INTO node_sessions (host_id, session_id, started_at, data) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (id, started, data) in &rows {
                insert.execute(params![host_id, id, started, data])?;
            }
            Ok(())
        })
    }

    /// Every session the registered agents reported, by agent and start time.
    pub fn node_sessions(&self) -> Result<Vec<NodeSession>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT s.host_id, s.started_at, s.data FROM node_sessions s JOIN nodes n ON n.host_id = s.host_id
             ORDER BY n.node_index, s.started_at, s.session_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
        rows.map(|row| {
            let (host_id, started_at, data) = row?;
            let fields = serde_json::from_str(&data).map_err(|e| StateError::Corrupt(format!("node session: {e}")))?;
            Ok(NodeSession { host_id, started_at, fields })
        })
        .collect()
    }

    /// The registered agent whose last heartbeat lists this session, if any.
    pub fn node_holding_session(&self, session_id: &str) -> Result<Option<String>, StateError> {
        Ok(self
            .db()
            .query_row(
                "SELECT s.host_id FROM node_sessions s JOIN nodes n ON n.host_id = s.host_id
                 WHERE s.session_id = ?1 ORDER BY n.node_index LIMIT 1",
                params![session_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Asks every agent to end a session (`control sessions kill` on the auth server): an
    /// ordinary commit, so that the daemon's hub notices it and tells the agents. The request's id.
    pub fn add_session_kill(&self, session_id: &str) -> Result<i64, StateError> {
        let db = self.db();
        db.execute(
            "INSERT INTO session_kills (session_id, created_at) VALUES (?1, ?2)",
            params![session_id, OffsetDateTime::now_utc().unix_timestamp()],
        )?;
        Ok(db.last_insert_rowid())
    }

    /// Kill requests after the one with id `after`, oldest first, as (id, session id).
    pub fn session_kills_after(&self, after: i64) -> Result<Vec<(i64, String)>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT id, session_id FROM session_kills WHERE id > ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![after], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The id of the latest kill request (0 if none).
    pub fn last_session_kill(&self) -> Result<i64, StateError> {
        Ok(self.db().query_row("SELECT coalesce(max(id), 0) FROM session_kills", [], |r| r.get(0))?)
    }

    /// Forgets kill requests made more than `age` ago (bookkeeping: they were sent already).
    pub fn prune_session_kills(&self, age: std::time::Duration) -> Result<usize, StateError> {
        let cutoff = OffsetDateTime::now_utc().unix_timestamp() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        self.write_own(|db| db.execute("DELETE FROM session_kills WHERE created_at < ?1", params![cutoff]))
    }

    pub fn nodes(&self) -> Result<Vec<Node>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT host_id, node_index, name, role, labels, joined_at, cert_not_after, last_seen,
                    hb_postgres_addr, hb_databases, hb_sessions, hb_version, hb_interval_ms, hb_at_ms
             FROM nodes ORDER BY node_index",
        )?;
        let rows = stmt.query_map([], |r| {
            let heartbeat = match (r.get::<_, Option<i64>>(12)?, r.get::<_, Option<i64>>(13)?) {
                (Some(interval), Some(at)) => Some((
                    r.get::<_, Option<String>>(8)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(9)?.unwrap_or_else(|| "[]".into()),
                    r.get::<_, Option<i64>>(10)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                    interval,
                    at,
                )),
                _ => None,
            };
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ),
                heartbeat,
            ))
        })?;
        rows.map(|row| {
            let ((host_id, index, name, role, labels, joined_at, cert_not_after, last_seen), heartbeat) = row?;
            let corrupt = |e: std::num::TryFromIntError| StateError::Corrupt(e.to_string());
            let heartbeat = match heartbeat {
                Some((postgres_addr, databases, sessions, version, interval, at_ms)) => Some(NodeHeartbeat {
                    postgres_addr,
                    databases: serde_json::from_str(&databases)?,
                    sessions: u32::try_from(sessions).map_err(corrupt)?,
                    version,
                    interval_ms: u64::try_from(interval).map_err(corrupt)?,
                    at_ms,
                }),
                None => None,
            };
            Ok(Node {
                host_id,
                node_index: u16::try_from(index).map_err(|e| StateError::Corrupt(e.to_string()))?,
                name,
                role,
                labels: serde_json::from_str(&labels)?,
                joined_at,
                cert_not_after,
                last_seen,
                heartbeat,
            })
        })
        .collect()
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT kind, expires_at FROM tokens WHERE expires_at > ?1 ORDER BY expires_at")?;
        let rows = stmt.query_map(params![OffsetDateTime::now_utc().unix_timestamp()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        rows.map(|row| {
            let (kind, exp) = row?;
            let expires_at =
                OffsetDateTime::from_unix_timestamp(exp).map_err(|e| StateError::Corrupt(e.to_string()))?;
            Ok(TokenInfo { kind, expires_at })
        })
        .collect()
    }

    // ---- database resources ----

    pub fn upsert_database(&self, db: &DbResource) -> Result<(), StateError> {
        let spec = serde_json::to_string(db).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.db().execute(
            "INSERT INTO databases (name, spec) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
            params![db.metadata.name, spec],
        )?;
        Ok(())
    }

    pub fn delete_database(&self, name: &str) -> Result<(), StateError> {
        if self.db().execute("DELETE FROM databases WHERE name = ?1", params![name])? == 0 {
            return Err(StateError::NotFound(format!("database {name:?}")));
        }
        Ok(())
    }

    pub fn databases(&self) -> Result<Vec<DbResource>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT spec FROM databases ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|spec| serde_json::from_str(&spec?).map_err(|e| StateError::Corrupt(format!("database: {e}"))))
            .collect()
    }

    // ---- discovered (cloud) resources ----

    /// Makes `items` the whole set found by `source` (one matcher and region): adds, updates and
    /// deletes, and clears any stale mark. Returns (added, updated, removed). Rows are keyed by
    /// (source, AWS identity), so sources finding same-named resources never overwrite each other.
    pub fn replace_discovered(&self, source: &str, items: &[Discovered]) -> Result<(usize, usize, usize), StateError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let existing: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT uid, spec FROM discovered WHERE source = ?1")?;
            let rows = stmt.query_map(params![source], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let (mut added, mut updated, mut removed) = (0, 0, 0);
        for (uid, _) in &existing {
            if !items.iter().any(|d| &d.uid == uid) {
                tx.execute("DELETE FROM discovered WHERE source = ?1 AND uid = ?2", params![source, uid])?;
                removed += 1;
            }
        }
        for d in items {
            let spec = serde_json::to_string(&d.resource).map_err(|e| StateError::Corrupt(e.to_string()))?;
            match existing.iter().find(|(u, _)| u == &d.uid) {
                None => added += 1,
                Some((_, old)) if old != &spec => updated += 1,
                Some(_) => {}
            }
            tx.execute(
                "INSERT INTO discovered (source, uid, name, spec, aws_resource_id, stale, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)
                 ON CONFLICT(source, uid) DO UPDATE SET name = excluded.name, spec = excluded.spec,
                 aws_resource_id = excluded.aws_resource_id, stale = NULL, updated_at = excluded.updated_at",
                params![source, d.uid, d.resource.metadata.name, spec, d.aws_resource_id, now],
            )?;
        }
        tx.commit()?;
        Ok((added, updated, removed))
    }

    /// A fetch for `source` failed: keep what it found last, marked stale with the reason.
    pub fn mark_discovered_stale(&self, source: &str, reason: &str) -> Result<usize, StateError> {
        Ok(self.db().execute("UPDATE discovered SET stale = ?2 WHERE source = ?1", params![source, reason])?)
    }

    /// Drops resources whose source is no longer configured (a matcher or region was removed).
    pub fn prune_discovered(&self, keep_sources: &[String]) -> Result<usize, StateError> {
        let db = self.db();
        let mut removed = 0;
        let sources: Vec<String> = {
            let mut stmt = db.prepare("SELECT DISTINCT source FROM discovered")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for s in sources.iter().filter(|s| !keep_sources.contains(s)) {
            removed += db.execute("DELETE FROM discovered WHERE source = ?1", params![s])?;
        }
        Ok(removed)
    }

    /// Every discovered row, under its AWS name (see `discovery::served_names` for the names
    /// they are served under).
    pub fn discovered(&self) -> Result<Vec<DiscoveredRow>, StateError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT source, uid, spec, aws_resource_id, stale FROM discovered ORDER BY name, source, uid")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (source, uid, spec, aws_resource_id, stale) = row?;
            let resource =
                serde_json::from_str(&spec).map_err(|e| StateError::Corrupt(format!("discovered database: {e}")))?;
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
        self.db().execute(
            "INSERT INTO web_sessions (hash, user, expires_at) VALUES (?1, ?2, ?3)",
            params![sha256_hex(&token), user, expires.unix_timestamp()],
        )?;
        Ok((token, expires))
    }

    /// The user and expiry of a live login session.
    pub fn web_session(&self, token: &str) -> Result<Option<(String, OffsetDateTime)>, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let row: Option<(String, i64)> = self
            .db()
            .query_row(
                "SELECT user, expires_at FROM web_sessions WHERE hash = ?1 AND expires_at > ?2",
                params![sha256_hex(token), now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(u, e)| {
            Ok((u, OffsetDateTime::from_unix_timestamp(e).map_err(|e| StateError::Corrupt(e.to_string()))?))
        })
        .transpose()
    }

    pub fn delete_web_session(&self, token: &str) -> Result<(), StateError> {
        self.db().execute("DELETE FROM web_sessions WHERE hash = ?1", params![sha256_hex(token)])?;
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
    /// was a duplicate (by `event_id`).
    pub fn insert_audit_batch(&self, records: &[serde_json::Value]) -> Result<Vec<Option<i64>>, StateError> {
        self.write_own(|db| {
            let mut stmt = db.prepare(
                "INSERT OR IGNORE INTO audit (time, event, session_id, user, db, success, data, event_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            records
                .iter()
                .map(|record| {
                    let text = |k: &str| record.get(k).and_then(serde_json::Value::as_str);
                    let n = stmt.execute(params![
                        text("time").unwrap_or_default(),
                        text("event").unwrap_or_default(),
                        text("sid"),
                        text("user"),
                        text("db_service"),
                        record.get("success").and_then(serde_json::Value::as_bool).unwrap_or(false),
                        record.to_string(),
                        text("event_id"),
                    ])?;
                    Ok((n == 1).then(|| db.last_insert_rowid()))
                })
                .collect()
        })
    }

    /// The oldest `limit` audit rows as (row id, record): an agent's spool, still to upload.
    pub fn audit_spool(&self, limit: usize) -> Result<Vec<(i64, serde_json::Value)>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT id, data FROM audit ORDER BY id LIMIT ?1")?;
        let rows = stmt.query_map(params![limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, data) = row?;
            Ok((id, serde_json::from_str(&data)?))
        })
        .collect()
    }

    /// Drops audit rows up to `id`, once the auth server has stored them (an agent's spool).
    pub fn delete_audit_through(&self, id: i64) -> Result<usize, StateError> {
        self.write_own(|db| db.execute("DELETE FROM audit WHERE id <= ?1", params![id]))
    }

    /// The newest audit rows matching `filter`, oldest first. Times compare as RFC 3339 text
    /// (every row's `time` is UTC with a `Z`), so a date alone (`2026-12-01`) works as a bound.
    pub fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT id, time, event, session_id, user, db, success, data FROM audit
             WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR db = ?2) AND (?3 IS NULL OR event = ?3)
               AND (?4 IS NULL OR time >= ?4) AND (?5 IS NULL OR time <= ?5)
             ORDER BY id DESC LIMIT ?6",
        )?;
        let rows = stmt.query_map(
            params![filter.user, filter.db, filter.event, filter.since, filter.until, filter.limit as i64],
            |r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    event: r.get(2)?,
                    session_id: r.get(3)?,
                    user: r.get(4)?,
                    db: r.get(5)?,
                    success: r.get(6)?,
                    data: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or(serde_json::Value::Null),
                })
            },
        )?;
        let mut out: Vec<AuditRow> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    pub fn audit_events(&self, limit: usize) -> Result<Vec<AuditRow>, StateError> {
        self.audit_query(&AuditFilter { limit, ..AuditFilter::default() })
    }

    // ---- sessions held by the data plane ----

    /// Remembers a handed-off session, so its end can be audited even by a restarted control.
    pub fn insert_live_session(&self, id: &str, data: &serde_json::Value) -> Result<(), StateError> {
        self.write_own(|db| {
            db.execute(
                "INSERT OR REPLACE INTO live_sessions (id, started_at, data) VALUES (?1, ?2, ?3)",
                params![id, OffsetDateTime::now_utc().unix_timestamp(), data.to_string()],
            )
        })?;
        Ok(())
    }

    /// Forgets a live session's record.
    pub fn delete_live_session(&self, id: &str) -> Result<(), StateError> {
        self.write_own(|db| db.execute("DELETE FROM live_sessions WHERE id = ?1", params![id]))?;
        Ok(())
    }

    /// Every live session: (id, started_at unix seconds, record).
    pub fn live_sessions(&self) -> Result<Vec<(String, i64, serde_json::Value)>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT id, started_at, data FROM live_sessions ORDER BY started_at")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
        rows.map(|row| {
            let (id, t, d) = row?;
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
        self.db().execute(
            "INSERT INTO locks (id, user, db, message, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![lock.id, lock.user, lock.db, lock.message, lock.expires_at, lock.created_at],
        )?;
        Ok(lock)
    }

    /// Removes a lock; false if there was none with that id.
    pub fn delete_lock(&self, id: &str) -> Result<bool, StateError> {
        Ok(self.db().execute("DELETE FROM locks WHERE id = ?1", params![id])? > 0)
    }

    /// Locks in force now (expired ones are dropped as they are found).
    pub fn active_locks(&self) -> Result<Vec<Lock>, StateError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let db = self.db();
        db.execute("DELETE FROM locks WHERE expires_at IS NOT NULL AND expires_at <= ?1", params![now])?;
        let mut stmt =
            db.prepare("SELECT id, user, db, message, expires_at, created_at FROM locks ORDER BY created_at, id")?;
        let rows = stmt.query_map([], |r| {
            Ok(Lock {
                id: r.get(0)?,
                user: r.get(1)?,
                db: r.get(2)?,
                message: r.get(3)?,
                expires_at: r.get(4)?,
                created_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn counts(&self) -> Result<(i64, i64, i64), StateError> {
        let db = self.db();
        let users = db.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
        let roles = db.query_row("SELECT count(*) FROM roles", [], |r| r.get(0))?;
        let dbs = db.query_row("SELECT count(*) FROM databases", [], |r| r.get(0))?;
        Ok((users, roles, dbs))
    }
}

/// Creates the `discovered` table, or moves one keyed by name (before rows were keyed by AWS
/// identity) to the current layout. Old rows get a `legacy:` identity that the next good fetch of
/// their source replaces; until then they are served as before (and kept, stale, if fetches fail).
/// Gives audit rows an `event_id`, unique where set, so that an event delivered twice (an
/// agent's upload retried after a lost answer) is stored once.
fn migrate_audit(conn: &mut Connection) -> Result<(), StateError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let has: bool =
        tx.query_row("SELECT coalesce(sum(name = 'event_id'), 0) FROM pragma_table_info('audit')", [], |r| r.get(0))?;
    if !has {
        tx.execute_batch("ALTER TABLE audit ADD COLUMN event_id TEXT;")?;
    }
    tx.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS audit_event_id ON audit (event_id) WHERE event_id IS NOT NULL;",
    )?;
    tx.commit()?;
    Ok(())
}

fn migrate_discovered(conn: &mut Connection) -> Result<(), StateError> {
    // Immediate: the CLI and the daemon may open the same file at once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (columns, has_uid): (i64, bool) = tx.query_row(
        "SELECT count(*), coalesce(sum(name = 'uid'), 0) FROM pragma_table_info('discovered')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if columns == 0 {
        tx.execute_batch(DISCOVERED_TABLE)?;
    } else if !has_uid {
        tx.execute_batch("ALTER TABLE discovered RENAME TO discovered_by_name;")?;
        tx.execute_batch(DISCOVERED_TABLE)?;
        tx.execute_batch(
            "INSERT INTO discovered (source, uid, name, spec, aws_resource_id, stale, updated_at)
                 SELECT source, 'legacy:' || name, name, spec, aws_resource_id, stale, updated_at
                 FROM discovered_by_name;
             DROP TABLE discovered_by_name;",
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The heartbeat columns of `nodes` (nullable: a node that never heartbeated has none), added
/// to a table created before heartbeats existed.
const NODE_HEARTBEAT_COLUMNS: [(&str, &str); 6] = [
    ("hb_postgres_addr", "TEXT"),
    ("hb_databases", "TEXT"),
    ("hb_sessions", "INTEGER"),
    ("hb_version", "TEXT"),
    ("hb_interval_ms", "INTEGER"),
    ("hb_at_ms", "INTEGER"),
];

fn migrate_nodes(conn: &mut Connection) -> Result<(), StateError> {
    // Immediate: the CLI and the daemon may open the same file at once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let present: Vec<String> = tx
        .prepare("SELECT name FROM pragma_table_info('nodes')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (column, kind) in NODE_HEARTBEAT_COLUMNS {
        if !present.iter().any(|p| p == column) {
            tx.execute_batch(&format!("ALTER TABLE nodes ADD COLUMN {column} {kind};"))?;
        }
    }
    tx.commit()?;
    Ok(())
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
        // Long expired: gone.
        s.db().execute("UPDATE tokens SET expires_at = expires_at - 2 * 86400 WHERE kind = 'db'", []).unwrap();
        assert_eq!(s.check_join_token(&old, "db").unwrap(), TokenCheck::Unknown);
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
        assert_eq!(s.prune_discovered(&["b".to_owned()]).unwrap(), 1);
        assert_eq!(s.discovered().unwrap().len(), 1);
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
        // An expired lock disappears on the next read.
        s.db().execute("UPDATE locks SET expires_at = 1 WHERE id = ?1", params![db_lock.id]).unwrap();
        let left: Vec<String> = s.active_locks().unwrap().into_iter().map(|l| l.id).collect();
        assert_eq!(left, vec![both.id]);
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
        let ok: String = s.db().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
