//! The embedded backend: one SQLite file in WAL mode that the daemon and the admin CLI open
//! together. Commits by any process are noticed by reading the WAL index header
//! ([`Sqlite::change_marker`]), not by querying, so a handshake runs no SQL.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::Connection;

use super::sql::Conn;
use super::{ChangeMarker, StateError};

/// Schema versions after the baseline (version 1: the layout every earlier release created,
/// brought up to date by the idempotent `migrate_*` steps). Each is applied once, in order, in
/// the transaction that stamps it; a file stamped with a version this build does not know is
/// refused (it was written by a newer control).
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "CA key envelope",
        "ALTER TABLE cert_authorities ADD COLUMN key_envelope BLOB;
         ALTER TABLE cert_authorities ADD COLUMN key_wraps TEXT;",
    ),
    // As PostgreSQL's `leases` (see `super::pg`): bookkeeping, never exported.
    (
        "leases",
        "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL,
         expires_at_ms INTEGER NOT NULL);",
    ),
    ("auth nodes", super::AUTH_NODES_TABLE),
    ("node MySQL address", super::NODE_MYSQL_ADDR),
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

pub struct Sqlite {
    conn: Mutex<Connection>,
    /// SQLite's WAL index (`sluice.db-shm`), whose header changes with every commit.
    shm: PathBuf,
    /// Recent commits of this handle's bookkeeping ([`Sqlite::write_own`]) as (before, after)
    /// markers: a policy snapshot older than them is still current.
    own: Mutex<std::collections::VecDeque<([u8; 48], [u8; 48])>>,
}

/// How many bookkeeping commits [`Sqlite::only_own_commits`] can see past.
const OWN_COMMITS_KEPT: usize = 1024;

/// SQLite calls this as each statement starts to run (and at each trigger it fires, which
/// counts as part of a write).
fn count_statement(event: rusqlite::trace::TraceEvent<'_>) {
    let rusqlite::trace::TraceEvent::Stmt(_, sql) = event else { return };
    super::count_statement(sql);
}

/// `iChange` of a WAL index header: "incremented with each transaction", in native byte order.
fn wal_counter(m: &[u8; 48]) -> u32 {
    u32::from_ne_bytes([m[8], m[9], m[10], m[11]])
}

impl Sqlite {
    /// Opens (creating if needed) `file` in `data_dir`. The directory is made 0700 and every
    /// file in it 0600 (the CA key may be in it), tightening what an earlier start or an
    /// operator left looser, with a warning. Safe against concurrent openers (the daemon and
    /// admin verbs started at once).
    pub fn open(data_dir: &Path, file: &str) -> Result<Self, StateError> {
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
        migrate(&mut conn)?;
        crate::private_fs::private_files_in(data_dir)?.into_iter().for_each(warn);
        Ok(Sqlite { conn: Mutex::new(conn), shm: data_dir.join(format!("{file}-shm")), own: Mutex::default() })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each call is one statement or
        // transaction), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection, each statement its own transaction.
    pub fn run<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        f(&mut *self.db())
    }

    /// Runs `f` in one transaction, committed if it returns `Ok`.
    pub fn tx<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let out = f(&mut TxConn(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    /// The current WAL index header: one 48-byte read of a file in the page cache, no SQL.
    /// `None` when it cannot be read (callers then treat the state as changed).
    pub fn change_marker(&self) -> Option<ChangeMarker> {
        self.wal_header().map(ChangeMarker::Wal)
    }

    fn wal_header(&self) -> Option<[u8; 48]> {
        use std::os::unix::fs::FileExt;
        let file = held_open(&self.shm)?;
        let mut marker = [0u8; 48];
        file.read_exact_at(&mut marker, 0).ok()?;
        Some(marker)
    }

    /// Runs a bookkeeping write (audit rows, live-session records: nothing a policy reads) in
    /// its own transaction and remembers its commit, so that it does not make policy snapshots
    /// look stale. The marker is read while the transaction holds SQLite's write lock, and the
    /// commit is taken as ours alone only if the change counter moved by exactly one.
    pub fn write_own<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before = self.wal_header();
        let out = f(&mut TxConn(&tx))?;
        tx.commit()?;
        let after = self.wal_header();
        if let (Some(before), Some(after)) = (before, after) {
            if wal_counter(&after) == wal_counter(&before).wrapping_add(1) {
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
    pub fn only_own_commits(&self, from: [u8; 48], to: [u8; 48]) -> bool {
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
}

/// A transaction as a [`Conn`] (a rusqlite `Transaction` derefs to its connection).
struct TxConn<'a>(&'a rusqlite::Transaction<'a>);

impl Conn for TxConn<'_> {
    fn batch(&mut self, sql: &str) -> Result<(), StateError> {
        Ok(self.0.execute_batch(sql)?)
    }

    fn exec(&mut self, sql: &str, params: &[super::sql::Val]) -> Result<usize, StateError> {
        super::sql::sqlite_exec(self.0, sql, params)
    }

    fn query(&mut self, sql: &str, params: &[super::sql::Val]) -> Result<Vec<super::sql::Row>, StateError> {
        super::sql::sqlite_query(self.0, sql, params)
    }
}

/// Brings the file to [`SCHEMA_VERSION`]: the baseline (idempotent, for files made before
/// versions were recorded), then each later step once. Runs under the opener's flock.
fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS sluice_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL);",
    )?;
    let at: i64 = conn.query_row("SELECT coalesce(max(version), 0) FROM sluice_schema", [], |r| r.get(0))?;
    if at > SCHEMA_VERSION {
        return Err(StateError::Invalid(format!(
            "the state's schema is version {at}; this control knows up to {SCHEMA_VERSION}: upgrade control"
        )));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if at < 1 {
        migrate_discovered(conn)?;
        migrate_audit(conn)?;
        migrate_nodes(conn)?;
        conn.execute("INSERT INTO sluice_schema (version, name, applied_at) VALUES (1, 'baseline', ?1)", [now])?;
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 2;
        if version <= at {
            continue;
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO sluice_schema (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, name, now],
        )?;
        tx.commit()?;
    }
    Ok(())
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

/// Creates the `discovered` table, or moves one keyed by name (before rows were keyed by AWS
/// identity) to the current layout. Old rows get a `legacy:` identity that the next good fetch of
/// their source replaces; until then they are served as before (and kept, stale, if fetches fail).
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
