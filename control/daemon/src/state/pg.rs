//! The shared backend: the state in a PostgreSQL that several auth nodes use at once.
//!
//! [`super::State`] is synchronous (it runs on blocking threads and in the runtime-less admin
//! CLI), so this backend owns a small tokio runtime of its own that drives the connections, and
//! each statement is sent there and waited for. A pool of at most `pool_size` connections is
//! kept, each made by [`crate::pgconn::PgConnector`] (verify-full TLS; the password file read,
//! or an IAM token minted, per connection).
//!
//! Change detection is LISTEN/NOTIFY over a durable counter, not logical decoding: a trigger on
//! every table a policy or the cluster view reads bumps `sluice_policy_rev` once per
//! transaction and notifies `sluice_policy` with the new revision, delivered at commit. The
//! feed listens on a connection of its own and also re-reads the counter every
//! [`FEED_POLL`], so a lost notification (a reconnect, a pooler in between) costs at most that
//! long. Logical decoding would need `wal_level=logical` (a parameter-group change and a reboot
//! on RDS), a role with REPLICATION (read access to the whole cluster), an output plugin that
//! stock packages lack, and a slot that fills the disk when its reader dies; and Sluice needs no
//! row events, only "the policy changed" (each auth node reloads and diffs its whole view).
//! LISTEN needs only CONNECT and works on RDS and on Aurora's writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::Client;

use super::sql::{to_postgres, Conn, Row, Val};
use super::{ChangeMarker, OpenMode, StateError};
use crate::config::PostgresStorage;
use crate::pgconn::PgConnector;

/// How often the feed re-reads the revision, whatever notifications say.
pub const FEED_POLL: Duration = Duration::from_millis(500);
/// How long the feed waits for the revision before it drops its connection and reconnects.
const FEED_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a pooled connection or a statement's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Serialises schema migrations of every node (a constant key: "sluice" in ASCII, roughly).
const MIGRATION_LOCK: i64 = 0x736c_7569_6365;

/// Schema versions, applied in order, each once, in one transaction under [`MIGRATION_LOCK`].
/// Columns mean what they mean in SQLite (unix seconds as BIGINT, JSON as TEXT, booleans as
/// 0/1), so rows move between the backends unchanged.
const MIGRATIONS: &[(&str, &str)] = &[
    ("baseline", BASELINE),
    ("leases", LEASES),
    ("auth nodes", super::AUTH_NODES_TABLE),
    ("node MySQL address", NODE_MYSQL_ADDR),
];

/// [`super::NODE_MYSQL_ADDR`], and the view trigger made to see it: an agent's new MySQL
/// address is a change to the cluster view (`sluice db ls`), as a new PostgreSQL one is.
const NODE_MYSQL_ADDR: &str = r#"
ALTER TABLE nodes ADD COLUMN hb_mysql_addr TEXT;
DROP TRIGGER nodes_view_bump ON nodes;
CREATE TRIGGER nodes_view_bump AFTER UPDATE ON nodes FOR EACH ROW
    WHEN (OLD.hb_postgres_addr IS DISTINCT FROM NEW.hb_postgres_addr OR OLD.hb_databases IS DISTINCT FROM NEW.hb_databases
          OR OLD.hb_mysql_addr IS DISTINCT FROM NEW.hb_mysql_addr
          OR OLD.name IS DISTINCT FROM NEW.name OR OLD.labels IS DISTINCT FROM NEW.labels)
    EXECUTE FUNCTION sluice_bump();
"#;

/// Named leases (one discovery poller per source across auth nodes): `token` is the fencing
/// token, raised whenever the holder changes; `expires_at_ms` is unix milliseconds on the
/// database's clock. Bookkeeping: no trigger, so taking or renewing a lease never moves the
/// change feed.
const LEASES: &str = "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL);";

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const BASELINE: &str = r#"
CREATE TABLE cert_authorities (name TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, key_pem TEXT NOT NULL DEFAULT '',
    key_envelope BYTEA, key_wraps TEXT);
CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, roles TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE roles (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE tokens (hash TEXT PRIMARY KEY, kind TEXT NOT NULL, expires_at BIGINT NOT NULL, created_at BIGINT NOT NULL);
CREATE INDEX tokens_expiry ON tokens (expires_at);
CREATE TABLE databases (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE web_sessions (hash TEXT PRIMARY KEY, "user" TEXT NOT NULL, expires_at BIGINT NOT NULL);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
CREATE TABLE live_sessions (id TEXT PRIMARY KEY, started_at BIGINT NOT NULL, data TEXT NOT NULL);
CREATE TABLE locks (id TEXT PRIMARY KEY, "user" TEXT, db TEXT, message TEXT NOT NULL, expires_at BIGINT,
    created_at BIGINT NOT NULL);
CREATE TABLE nodes (
    host_id TEXT PRIMARY KEY,
    node_index BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    labels TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    cert_not_after BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    hb_postgres_addr TEXT,
    hb_databases TEXT,
    hb_sessions BIGINT,
    hb_version TEXT,
    hb_interval_ms BIGINT,
    hb_at_ms BIGINT
);
CREATE TABLE node_sessions (host_id TEXT NOT NULL, session_id TEXT NOT NULL, started_at BIGINT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (host_id, session_id));
CREATE INDEX node_sessions_by_id ON node_sessions (session_id);
CREATE TABLE session_kills (id BIGSERIAL PRIMARY KEY, session_id TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    "user" TEXT,
    db TEXT,
    success BIGINT NOT NULL,
    data TEXT NOT NULL,
    event_id TEXT
);
CREATE UNIQUE INDEX audit_event_id ON audit (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX audit_by_session ON audit (session_id, id);
CREATE TABLE discovered (
    source TEXT NOT NULL,
    uid TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    aws_resource_id TEXT NOT NULL,
    stale TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (source, uid)
);
CREATE TABLE sluice_policy_rev (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), rev BIGINT NOT NULL);
INSERT INTO sluice_policy_rev (one, rev) VALUES (true, 0);
-- Once per transaction: the row lock orders revisions by commit, and NOTIFY is delivered at
-- commit, in commit order.
CREATE FUNCTION sluice_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r BIGINT;
BEGIN
    IF current_setting('sluice.bumped', true) IS DISTINCT FROM txid_current()::text THEN
        PERFORM set_config('sluice.bumped', txid_current()::text, true);
        UPDATE sluice_policy_rev SET rev = rev + 1 RETURNING rev INTO r;
        PERFORM pg_notify('sluice_policy', r::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER users_bump AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER roles_bump AFTER INSERT OR UPDATE OR DELETE ON roles FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER locks_bump AFTER INSERT OR UPDATE OR DELETE ON locks FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER databases_bump AFTER INSERT OR UPDATE OR DELETE ON databases FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER discovered_bump AFTER INSERT OR UPDATE OR DELETE ON discovered FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER session_kills_bump AFTER INSERT ON session_kills FOR EACH ROW EXECUTE FUNCTION sluice_bump();
CREATE TRIGGER nodes_bump AFTER INSERT OR DELETE ON nodes FOR EACH ROW EXECUTE FUNCTION sluice_bump();
-- Heartbeats and renewals are bookkeeping: only what the cluster view shows moves the feed.
CREATE TRIGGER nodes_view_bump AFTER UPDATE ON nodes FOR EACH ROW
    WHEN (OLD.hb_postgres_addr IS DISTINCT FROM NEW.hb_postgres_addr OR OLD.hb_databases IS DISTINCT FROM NEW.hb_databases
          OR OLD.name IS DISTINCT FROM NEW.name OR OLD.labels IS DISTINCT FROM NEW.labels)
    EXECUTE FUNCTION sluice_bump();
"#;

/// The PostgreSQL store of one process.
pub struct Pg {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Arc<Pool>,
    /// Follows the policy revision (serving processes only).
    feed: Option<Arc<Feed>>,
}

/// What the change feed knows.
pub struct Feed {
    rev: AtomicU64,
    /// When the revision was last read from the database (not just notified).
    confirmed: Mutex<Instant>,
}

impl Feed {
    /// How long ago the feed last heard from the database.
    pub fn age(&self) -> Duration {
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

impl Pg {
    /// Connects, brings the schema to [`SCHEMA_VERSION`] and, for a serving process, starts the
    /// change feed and waits for its first revision.
    pub fn open(cfg: &PostgresStorage, mode: OpenMode) -> Result<Self, StateError> {
        let connector = Arc::new(PgConnector::new(&cfg.connection()).map_err(|e| StateError::Invalid(e.to_string()))?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-pg")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let size = match mode {
            OpenMode::Serve => cfg.pool_size.max(2),
            OpenMode::Admin => 2,
        };
        let pool =
            Arc::new(Pool { connector: connector.clone(), size, inner: Mutex::default(), freed: Condvar::new() });
        let mut pg = Pg { rt: Some(rt), handle, pool, feed: None };
        pg.migrate()?;
        tracing::info!(storage = %connector.redacted(), schema = SCHEMA_VERSION, "state in PostgreSQL");
        if mode == OpenMode::Admin {
            return Ok(pg);
        }
        let feed = Arc::new(Feed { rev: AtomicU64::new(0), confirmed: Mutex::new(Instant::now()) });
        let first = pg.run(false, |c| c.query_one("SELECT rev FROM sluice_policy_rev", &[])?.get::<i64>(0))?;
        feed.rev.store(first as u64, Ordering::Release);
        pg.handle.spawn(follow(connector, feed.clone()));
        pg.feed = Some(feed);
        Ok(pg)
    }

    /// The policy revision the feed last saw: no SQL.
    pub fn change_marker(&self) -> Option<ChangeMarker> {
        self.feed.as_ref().map(|f| ChangeMarker::Rev(f.rev.load(Ordering::Acquire)))
    }

    pub fn feed(&self) -> Option<&Arc<Feed>> {
        self.feed.as_ref()
    }

    /// Runs `f` on a pooled connection, in one transaction if `tx`.
    pub fn run<T>(&self, tx: bool, f: impl FnOnce(&mut dyn Conn) -> Result<T, StateError>) -> Result<T, StateError> {
        let client = self.pool.get(&self.handle)?;
        let mut conn = PgConn { client: client.clone(), rt: self.handle.clone() };
        let out = if tx {
            conn.batch("BEGIN")
                .and_then(|()| f(&mut conn))
                .and_then(|out| conn.batch("COMMIT").map(|()| out))
                .inspect_err(|_| {
                    let _ = conn.batch("ROLLBACK");
                })
        } else {
            f(&mut conn)
        };
        self.pool.put(client);
        out
    }

    fn migrate(&self) -> Result<(), StateError> {
        self.run(true, |c| {
            c.query_one("SELECT pg_advisory_xact_lock(?1)", &[Val::Int(MIGRATION_LOCK)])?;
            c.exec(
                "CREATE TABLE IF NOT EXISTS sluice_schema (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
                &[],
            )?;
            let at: i64 = c.query_one("SELECT coalesce(max(version), 0) FROM sluice_schema", &[])?.get(0)?;
            if at > SCHEMA_VERSION {
                return Err(StateError::Invalid(format!(
                    "the storage schema is version {at}; this control knows up to {SCHEMA_VERSION}: upgrade control"
                )));
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for (i, (name, sql)) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                if version <= at {
                    continue;
                }
                c.batch(sql)?;
                c.exec(
                    "INSERT INTO sluice_schema (version, name, applied_at) VALUES (?1, ?2, ?3)",
                    &[Val::Int(version), Val::Text((*name).into()), Val::Int(now)],
                )?;
                tracing::info!(version, name, "storage schema migrated");
            }
            Ok(())
        })
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The feed task and connection drivers live on the runtime; stop them with it without
        // blocking (dropping a runtime blocks, which panics on another runtime's thread).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Listens for `sluice_policy` on a connection of its own, re-reading the revision at each
/// notification's arrival and every [`FEED_POLL`]; reconnects with backoff.
async fn follow(connector: Arc<PgConnector>, feed: Arc<Feed>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match connector.connect_listening().await {
            Ok((client, mut notes)) => {
                let listened = client.batch_execute("LISTEN sluice_policy").await;
                if let Err(e) = listened {
                    tracing::warn!(error = %e, "storage change feed: LISTEN failed");
                } else {
                    backoff = Duration::from_millis(250);
                    loop {
                        // LISTEN first, then read: a change committed in between is in the read.
                        // Bounded: a silent network (no RST) would otherwise hold the feed on a
                        // dead connection until TCP keepalives give up.
                        let read = tokio::time::timeout(
                            FEED_READ_TIMEOUT,
                            client.query_one("SELECT rev FROM sluice_policy_rev", &[]),
                        );
                        match read.await {
                            Ok(Ok(row)) => {
                                let rev: i64 = row.get(0);
                                feed.rev.fetch_max(rev as u64, Ordering::AcqRel);
                                *feed.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "storage change feed lost its connection");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    timeout_s = FEED_READ_TIMEOUT.as_secs(),
                                    "storage change feed: no answer; reconnecting"
                                );
                                break;
                            }
                        }
                        tokio::select! {
                            note = notes.recv() => match note {
                                Some(n) => {
                                    if let Ok(rev) = n.payload().parse::<u64>() {
                                        feed.rev.fetch_max(rev, Ordering::AcqRel);
                                    }
                                }
                                None => {
                                    tracing::warn!("storage change feed: connection closed");
                                    break;
                                }
                            },
                            () = tokio::time::sleep(FEED_POLL) => {}
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "storage change feed cannot connect"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// At most `size` connections, handed to one caller at a time.
struct Pool {
    connector: Arc<PgConnector>,
    size: usize,
    inner: Mutex<PoolInner>,
    freed: Condvar,
}

#[derive(Default)]
struct PoolInner {
    idle: Vec<Arc<Client>>,
    open: usize,
}

impl Pool {
    fn get(&self, rt: &tokio::runtime::Handle) -> Result<Arc<Client>, StateError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            while let Some(c) = inner.idle.pop() {
                if !c.is_closed() {
                    return Ok(c);
                }
                inner.open -= 1;
            }
            if inner.open < self.size {
                inner.open += 1;
                drop(inner);
                let connector = self.connector.clone();
                let made = wait(rt, async move { connector.connect().await });
                return match made {
                    Ok(Ok(c)) => Ok(Arc::new(c)),
                    Ok(Err(e)) | Err(e) => {
                        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                        inner.open -= 1;
                        self.freed.notify_one();
                        Err(StateError::Unavailable(e.to_string()))
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StateError::Unavailable(format!(
                    "all {} storage connections stayed busy for {}s",
                    self.size,
                    CALL_TIMEOUT.as_secs()
                )));
            }
            inner = self.freed.wait_timeout(inner, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn put(&self, c: Arc<Client>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_closed() {
            inner.open -= 1;
        } else {
            inner.idle.push(c);
        }
        self.freed.notify_one();
    }
}

/// Runs `fut` on the store's runtime and waits for it on this thread (a blocking thread, the
/// admin CLI's main thread, or, briefly, an async worker, as SQLite calls there do).
fn wait<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<Result<T, String>, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let out = tokio::time::timeout(CALL_TIMEOUT, fut).await;
        let _ = tx.send(out);
    });
    match rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1)) {
        Ok(Ok(Ok(v))) => Ok(Ok(v)),
        Ok(Ok(Err(e))) => Ok(Err(e.to_string())),
        Ok(Err(_)) | Err(_) => Err(format!("no answer from the storage database in {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// One pooled connection as a [`Conn`].
struct PgConn {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
}

impl PgConn {
    fn call<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, fut).await);
        });
        match rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(r)) => r.map_err(pg_error),
            Ok(Err(_)) | Err(_) => Err(StateError::Unavailable(format!(
                "no answer from the storage database in {}s",
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }
}

impl Conn for PgConn {
    fn batch(&mut self, sql: &str) -> Result<(), StateError> {
        super::count_statement(sql);
        let (client, sql) = (self.client.clone(), sql.to_owned());
        self.call(async move { client.batch_execute(&sql).await })
    }

    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, StateError> {
        super::count_statement(sql);
        let (client, sql, params) = (self.client.clone(), to_postgres(sql), params.to_vec());
        let n = self.call(async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            client.execute(&sql, &refs).await
        })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StateError> {
        super::count_statement(sql);
        let (client, sql, params) = (self.client.clone(), to_postgres(sql), params.to_vec());
        let rows = self.call(async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            client.query(&sql, &refs).await
        })?;
        rows.iter().map(pg_row).collect()
    }
}

fn pg_error(e: tokio_postgres::Error) -> StateError {
    use tokio_postgres::error::SqlState;
    let text = e.as_db_error().map_or_else(|| e.to_string(), |d| d.to_string());
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StateError::Conflict(text),
        Some(_) => StateError::Postgres(text),
        // No SQLSTATE: the connection broke or never came up.
        None => StateError::Unavailable(text),
    }
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row, StateError> {
    let bad = |e: tokio_postgres::Error| StateError::Corrupt(e.to_string());
    (0..r.len())
        .map(|i| {
            let ty = r.columns()[i].type_();
            Ok(if *ty == Type::INT8 {
                r.try_get::<_, Option<i64>>(i).map_err(bad)?.map_or(Val::Null, Val::Int)
            } else if *ty == Type::INT4 {
                r.try_get::<_, Option<i32>>(i).map_err(bad)?.map_or(Val::Null, |v| Val::Int(v.into()))
            } else if *ty == Type::INT2 {
                r.try_get::<_, Option<i16>>(i).map_err(bad)?.map_or(Val::Null, |v| Val::Int(v.into()))
            } else if *ty == Type::BOOL {
                r.try_get::<_, Option<bool>>(i).map_err(bad)?.map_or(Val::Null, |v| Val::Int(v.into()))
            } else if *ty == Type::BYTEA {
                r.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)?.map_or(Val::Null, Val::Blob)
            } else if *ty == Type::VOID {
                Val::Null
            } else {
                r.try_get::<_, Option<String>>(i).map_err(bad)?.map_or(Val::Null, Val::Text)
            })
        })
        .collect::<Result<Vec<_>, StateError>>()
        .map(Row)
}

impl ToSql for Val {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) if *ty == Type::INT8 => i.to_sql(ty, out),
            Val::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
            Val::Int(i) if *ty == Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
            Val::Int(i) if *ty == Type::BOOL => (*i != 0).to_sql(ty, out),
            Val::Text(s) if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME, Type::UNKNOWN].contains(ty) => {
                s.as_str().to_sql(ty, out)
            }
            Val::Blob(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            v => Err(format!("a {v:?} parameter where the statement has {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`, which refuses a mismatch with the driver's error.
        true
    }

    tokio_postgres::types::to_sql_checked!();
}
