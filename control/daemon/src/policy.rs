//! Whether a user may hold a session to a database route: one pure decision ([`authorize`] at
//! connect time, [`PolicyView::decide`] again for every live session whenever the state changed:
//! user removed, roles changed, a lock placed, the database deregistered), so a session ends as
//! soon as it would no longer be allowed to start.
//!
//! The inputs are a snapshot in memory ([`PolicyStore`]): databases (static, dynamic and
//! discovered), users, roles and locks, read from the state in one go and read again only when
//! the state changed, so a handshake runs no SQL. A cluster's agents have no state: their
//! snapshot is fed by the auth server's watch stream ([`PolicyStore::feed`]) and admits new
//! sessions only while it is no older than `db_service.max_policy_staleness`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sluice_pgwire::StartupMessage;

use crate::ca::Identity;
use crate::catalog::{self, Database};
use crate::config::Config;
use crate::rbac::{check_access, AccessRequest, Role};
use crate::state::{ChangeMarker, Lock, State, StateError, User};

/// A session's route: who, to which database, as which database user and name.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub user: &'a str,
    pub db_service: &'a str,
    pub db_user: &'a str,
    pub db_name: &'a str,
}

/// Why a route is not (or no longer) allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The certificate names no database (it was issued by `sluice login`, not `sluice db login`).
    NoRoute {
        user: String,
    },
    NoStartupUser,
    /// The startup message asks for another database user than the certificate's.
    DbUserMismatch {
        service: String,
        asked: String,
        allowed: String,
    },
    /// The startup message asks for another database name than the certificate's.
    DbNameMismatch {
        service: String,
        asked: String,
        allowed: String,
    },
    UnknownDatabase,
    UnknownUser,
    /// Roles deny it or do not allow it; the text says which.
    Denied(String),
    Locked {
        id: String,
        message: String,
    },
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::NoRoute { user } => {
                write!(f, "certificate of {user:?} has no database route; run `sluice db login <database>`")
            }
            Denial::NoStartupUser => write!(f, "startup message has no user"),
            Denial::DbUserMismatch { service, asked, allowed } => write!(
                f,
                "database user {asked:?} does not match the certificate's {allowed:?}; run `sluice db login {service} --db-user {asked}`"
            ),
            Denial::DbNameMismatch { service, asked, allowed } => write!(
                f,
                "database name {asked:?} does not match the certificate's {allowed:?}; run `sluice db login {service} --db-name {asked}`"
            ),
            Denial::UnknownDatabase => write!(f, "the database is not registered with Sluice"),
            Denial::UnknownUser => write!(f, "the user does not exist"),
            Denial::Denied(why) => write!(f, "access denied: {why}"),
            Denial::Locked { id, message } if message.is_empty() => write!(f, "access is locked (lock {id})"),
            Denial::Locked { id, message } => write!(f, "access is locked (lock {id}): {message}"),
        }
    }
}

/// What a connection may do: the route it is allowed, the database and the roles that allowed it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub database: Database,
    pub db_user: String,
    pub db_name: String,
    /// The user's roles (session options such as replication come from them).
    pub roles: Vec<Role>,
}

/// The route a connection asks for: the certificate's, with the startup message filling what the
/// certificate leaves open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskedRoute {
    pub db_service: String,
    pub db_user: String,
    pub db_name: String,
}

/// The certificate's route against what the startup message asks for. Pure.
pub fn resolve_route(identity: &Identity, startup: &StartupMessage) -> Result<AskedRoute, Denial> {
    let route = identity.route.as_ref().ok_or_else(|| Denial::NoRoute { user: identity.user.clone() })?;
    let startup_user = startup.user().ok_or(Denial::NoStartupUser)?;
    let db_user = if route.db_user.is_empty() { startup_user } else { route.db_user.as_str() };
    if startup_user != db_user {
        return Err(Denial::DbUserMismatch {
            service: route.service.clone(),
            asked: startup_user.to_owned(),
            allowed: db_user.to_owned(),
        });
    }
    let startup_db = startup.database().unwrap_or(db_user);
    let db_name = if route.db_name.is_empty() { startup_db } else { route.db_name.as_str() };
    if startup_db != db_name {
        return Err(Denial::DbNameMismatch {
            service: route.service.clone(),
            asked: startup_db.to_owned(),
            allowed: db_name.to_owned(),
        });
    }
    Ok(AskedRoute { db_service: route.service.clone(), db_user: db_user.to_owned(), db_name: db_name.to_owned() })
}

/// The decision at connect time: [`resolve_route`], then the route against `view`. Pure: no I/O,
/// no clock but `now`.
pub fn authorize(
    identity: &Identity,
    startup: &StartupMessage,
    view: &PolicyView,
    now: i64,
) -> Result<Decision, Denial> {
    let AskedRoute { db_service, db_user, db_name } = resolve_route(identity, startup)?;
    let route = Route { user: &identity.user, db_service: &db_service, db_user: &db_user, db_name: &db_name };
    let database = view.decide_at(route, now)?.clone();
    let roles = view.users.get(&identity.user).map(|u| view.roles_of(u)).unwrap_or_default();
    Ok(Decision { database, db_user, db_name, roles })
}

/// Why there is no snapshot to decide a new session from.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    State(#[from] StateError),
    /// An agent that has not yet received the auth server's policy.
    #[error("this agent has no policy from the auth server yet")]
    NoPolicyYet,
    /// An agent that has not heard from the auth server for too long.
    #[error("auth server unreachable for {} s; policy older than db_service.max_policy_staleness ({} s)", .age.as_secs(), .max.as_secs())]
    Stale { age: Duration, max: Duration },
    /// An auth node whose shared storage's change feed has not been confirmed for too long: a
    /// change made through another node might not be known here.
    #[error("the shared storage has not answered for {} s; policy older than db_service.max_policy_staleness ({} s)", .age.as_secs(), .max.as_secs())]
    StoreStale { age: Duration, max: Duration },
}

impl PolicyError {
    /// Whether a client may get in by trying again later (the agent's link to auth), as
    /// opposed to a fault of this process.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PolicyError::NoPolicyYet | PolicyError::Stale { .. } | PolicyError::StoreStale { .. })
    }
}

/// The state a decision reads.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    pub databases: HashMap<String, Database>,
    pub users: HashMap<String, User>,
    pub roles: HashMap<String, Role>,
    pub locks: Vec<Lock>,
    /// Where each agent that heartbeated serves PostgreSQL, by node index: a cancel request
    /// for a key another agent gave out is sent there.
    pub nodes: HashMap<u16, String>,
}

impl PolicyView {
    /// Reads everything a decision needs (blocking: SQLite).
    pub fn load(cfg: &Config, state: &State) -> Result<Self, StateError> {
        Ok(PolicyView {
            databases: catalog::databases(cfg, state)?.into_iter().map(|d| (d.name.clone(), d)).collect(),
            users: state.users()?.into_iter().map(|u| (u.name.clone(), u)).collect(),
            roles: state.roles()?.into_iter().map(|r| (r.metadata.name.clone(), r)).collect(),
            locks: state.active_locks()?,
            nodes: state
                .nodes()?
                .into_iter()
                .filter_map(|n| n.heartbeat.map(|hb| (n.node_index, hb.postgres_addr)))
                .collect(),
        })
    }

    /// The view an agent decides from: what the auth server sent, with the agent's own static
    /// databases and its selectors' AWS overrides applied ([`catalog::merge_shared`]).
    pub fn from_cluster(cfg: &Config, view: &crate::cluster::ClusterView) -> Self {
        PolicyView {
            databases: catalog::merge_shared(cfg, view.databases.values())
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect(),
            users: view.users.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            roles: view.roles.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            locks: view.locks.values().cloned().collect(),
            nodes: view.nodes.values().map(|n| (n.node_index, n.postgres_addr.clone())).collect(),
        }
    }

    /// The roles `user` holds that exist (a role deleted after assignment grants nothing).
    pub fn roles_of(&self, user: &User) -> Vec<Role> {
        user.roles.iter().filter_map(|r| self.roles.get(r).cloned()).collect()
    }

    /// Decides a route now; on success returns the database.
    pub fn decide(&self, route: Route<'_>) -> Result<&Database, Denial> {
        self.decide_at(route, time::OffsetDateTime::now_utc().unix_timestamp())
    }

    /// Decides a route at `now` (unix seconds: locks expire).
    pub fn decide_at(&self, route: Route<'_>, now: i64) -> Result<&Database, Denial> {
        let db = self.databases.get(route.db_service).ok_or(Denial::UnknownDatabase)?;
        let user = self.users.get(route.user).ok_or(Denial::UnknownUser)?;
        let roles = self.roles_of(user);
        let req =
            AccessRequest { db_service: &db.name, labels: &db.labels, db_name: route.db_name, db_user: route.db_user };
        check_access(&user.name, &roles, req).map_err(|d| Denial::Denied(d.to_string()))?;
        if let Some(lock) = self.locks.iter().find(|l| l.active_at(now) && l.matches(&user.name, &db.name)) {
            return Err(Denial::Locked { id: lock.id.clone(), message: lock.message.clone() });
        }
        Ok(db)
    }
}

/// The policy snapshot a daemon decides from, and what it was read at.
///
/// Each [`PolicyStore::current`] compares the state's [`ChangeMarker`] (a 48-byte read, no SQL)
/// with the one taken before the snapshot was read: a commit by any process since then (an admin
/// verb, the API, discovery) makes it read the state again, so the next connection sees the
/// change, as when every connection queried SQLite, without any query while nothing changes.
pub struct PolicyStore {
    source: Source,
    current: RwLock<Snapshot>,
    /// Held while reading the state, so a change seen by many connections at once is read once.
    reading: Mutex<()>,
}

/// Where snapshots come from.
enum Source {
    /// Read from the state when its change marker moves.
    State { cfg: Arc<Config>, state: Arc<State> },
    /// Replaced by the agent's watch of the auth server.
    Feed(Mutex<Feed>),
}

struct Feed {
    /// Set by the first snapshot received.
    has_policy: bool,
    /// When the auth server was last heard from (any line of the watch stream).
    last_contact: Instant,
    max_staleness: Duration,
}

#[derive(Clone)]
struct Snapshot {
    view: Arc<PolicyView>,
    /// `None` when the marker could not be read: every check then reads the state again.
    marker: Option<ChangeMarker>,
    /// Counts the snapshots taken, so watchers can tell a new one from the last they saw.
    generation: u64,
}

impl PolicyStore {
    /// Reads the first snapshot (blocking: SQLite).
    pub fn open(cfg: Arc<Config>, state: Arc<State>) -> Result<Self, StateError> {
        let marker = state.change_marker();
        let view = Arc::new(PolicyView::load(&cfg, &state)?);
        Ok(PolicyStore {
            source: Source::State { cfg, state },
            current: RwLock::new(Snapshot { view, marker, generation: 1 }),
            reading: Mutex::new(()),
        })
    }

    /// An agent's store: empty until [`PolicyStore::replace`] gives it the auth server's policy.
    /// New sessions are refused while it is empty or older than `max_staleness`; live ones are
    /// still decided from the last snapshot ([`PolicyStore::last`]).
    pub fn feed(max_staleness: Duration) -> Self {
        PolicyStore {
            source: Source::Feed(Mutex::new(Feed { has_policy: false, last_contact: Instant::now(), max_staleness })),
            current: RwLock::new(Snapshot { view: Arc::new(PolicyView::default()), marker: None, generation: 0 }),
            reading: Mutex::new(()),
        }
    }

    /// Installs a snapshot received from the auth server (agents).
    pub fn replace(&self, view: PolicyView) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        cur.view = Arc::new(view);
        cur.generation += 1;
        drop(cur);
        if let Source::Feed(feed) = &self.source {
            let mut feed = feed.lock().unwrap_or_else(|p| p.into_inner());
            feed.has_policy = true;
            feed.last_contact = Instant::now();
        }
    }

    /// Notes that the auth server was heard from, changes or not (agents).
    pub fn touch(&self) {
        if let Source::Feed(feed) = &self.source {
            feed.lock().unwrap_or_else(|p| p.into_inner()).last_contact = Instant::now();
        }
    }

    /// For an agent: how long since the auth server was last heard from, and the limit; `None`
    /// where the policy comes from the state.
    pub fn staleness(&self) -> Option<(Duration, Duration)> {
        match &self.source {
            Source::Feed(feed) => {
                let feed = feed.lock().unwrap_or_else(|p| p.into_inner());
                Some((feed.last_contact.elapsed(), feed.max_staleness))
            }
            Source::State { .. } => None,
        }
    }

    /// Whether an agent can admit new sessions now: the age of its policy (time since the auth
    /// server was last heard from) if so. `Ok(None)` where the policy comes from the state.
    pub fn check_feed(&self) -> Result<Option<Duration>, PolicyError> {
        let Source::Feed(feed) = &self.source else {
            self.check_store()?;
            return Ok(None);
        };
        let feed = feed.lock().unwrap_or_else(|p| p.into_inner());
        if !feed.has_policy {
            return Err(PolicyError::NoPolicyYet);
        }
        let age = feed.last_contact.elapsed();
        if age > feed.max_staleness {
            return Err(PolicyError::Stale { age, max: feed.max_staleness });
        }
        Ok(Some(age))
    }

    /// On an auth node whose state is shared (PostgreSQL): refuses new sessions once the change
    /// feed has not been confirmed for `db_service.max_policy_staleness`, as an agent does when
    /// the auth server is silent (a node cut off from the storage would not learn of a lock placed
    /// through another node).
    fn check_store(&self) -> Result<(), PolicyError> {
        let Source::State { cfg, state } = &self.source else { return Ok(()) };
        match state.feed_age() {
            Some(age) if age > cfg.db_service.max_policy_staleness => {
                Err(PolicyError::StoreStale { age, max: cfg.db_service.max_policy_staleness })
            }
            _ => Ok(()),
        }
    }

    /// The last snapshot, however old (live sessions are decided from it while an agent cannot
    /// reach the auth server).
    pub fn last(&self) -> (Arc<PolicyView>, u64) {
        let snap = self.snapshot();
        (snap.view, snap.generation)
    }

    fn snapshot(&self) -> Snapshot {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The snapshot if the state has not changed since it was read (no SQL), else `None`. An
    /// agent's snapshot is always as fresh as it gets.
    pub fn fresh(&self) -> Option<(Arc<PolicyView>, u64)> {
        let snap = self.snapshot();
        let Source::State { state, .. } = &self.source else { return Some((snap.view, snap.generation)) };
        let (now, then) = (state.change_marker()?, snap.marker?);
        if now == then {
            return Some((snap.view, snap.generation));
        }
        // This process's own audit and session records do not change the policy.
        if !state.only_own_commits(then, now) {
            return None;
        }
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        if cur.generation == snap.generation {
            cur.marker = Some(now);
        }
        Some((snap.view, snap.generation))
    }

    /// The snapshot to admit a new session with: read again first if the state changed
    /// (blocking: SQLite then); on an agent, refused while there is none or it is too old.
    pub fn current(&self) -> Result<(Arc<PolicyView>, u64), PolicyError> {
        let (cfg, state) = match &self.source {
            Source::State { cfg, state } => (cfg, state),
            Source::Feed(_) => {
                self.check_feed()?;
                return Ok(self.last());
            }
        };
        self.check_store()?;
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        let _reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have read it while this one waited.
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        // The marker first: a commit during the read shows as a change at the next check.
        let marker = state.change_marker();
        let view = Arc::new(PolicyView::load(cfg, state)?);
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        let generation = cur.generation + 1;
        *cur = Snapshot { view: view.clone(), marker, generation };
        tracing::debug!(generation, "policy snapshot read from the state");
        Ok((view, generation))
    }

    /// As [`PolicyStore::current`], off the async threads when the state must be read.
    pub async fn current_async(self: &Arc<Self>) -> Result<(Arc<PolicyView>, u64), PolicyError> {
        if matches!(self.source, Source::Feed(_)) {
            return self.current();
        }
        self.check_store()?;
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.current()).await.map_err(|e| StateError::Task(e.to_string()))?
    }

    /// The snapshot live sessions are decided from: as [`PolicyStore::current_async`], except
    /// that an agent cut off from the auth server keeps deciding from its last snapshot (it
    /// knows of no change, so it ends no session on its own).
    pub async fn for_live_sessions(self: &Arc<Self>) -> Result<(Arc<PolicyView>, u64), PolicyError> {
        match self.current_async().await {
            Err(PolicyError::Stale { .. } | PolicyError::StoreStale { .. }) => Ok(self.last()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac::{Conditions, LabelValues, RoleMetadata, RoleSpec};

    fn view() -> PolicyView {
        let db = Database {
            name: "orders".into(),
            description: String::new(),
            labels: [("env".to_owned(), "prod".to_owned())].into_iter().collect(),
            spec: serde_saphyr::from_str(
                "protocol: postgres\nuri: x.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com:5432",
            )
            .unwrap(),
            origin: "static",
            stale: None,
        };
        let role = Role {
            kind: "role".into(),
            version: "v7".into(),
            metadata: RoleMetadata { name: "dev".into(), description: String::new() },
            spec: RoleSpec {
                allow: Conditions {
                    db_labels: [("env".to_owned(), LabelValues::One("prod".into()))].into_iter().collect(),
                    db_names: vec!["app".into()],
                    db_users: vec!["alice".into()],
                },
                ..Default::default()
            },
        };
        PolicyView {
            databases: [("orders".to_owned(), db)].into_iter().collect(),
            users: [("alice".to_owned(), User { name: "alice".into(), roles: vec!["dev".into()] })]
                .into_iter()
                .collect(),
            roles: [("dev".to_owned(), role)].into_iter().collect(),
            locks: Vec::new(),
            nodes: HashMap::new(),
        }
    }

    fn identity(user: &str, service: &str, db_user: &str, db_name: &str) -> Identity {
        Identity {
            v: 1,
            user: user.into(),
            route: Some(crate::ca::DbRoute {
                service: service.into(),
                db_user: db_user.into(),
                db_name: db_name.into(),
            }),
        }
    }

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            version: sluice_pgwire::ProtocolVersion::V3_0,
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Each row: the certificate's route, the startup message, and the decision.
    #[test]
    fn authorize_checks_the_startup_against_the_certificate_then_the_policy() {
        let v = view();
        let ok = |d: Result<Decision, Denial>| d.map(|d| (d.database.name, d.db_user, d.db_name, d.roles.len()));
        let allowed = Ok(("orders".to_owned(), "alice".to_owned(), "app".to_owned(), 1));
        type Allowed = (String, String, String, usize);
        let rows: Vec<(Identity, StartupMessage, Result<Allowed, Denial>)> = vec![
            (
                identity("alice", "orders", "alice", "app"),
                startup(&[("user", "alice"), ("database", "app")]),
                allowed.clone(),
            ),
            // An empty route field takes the startup's value, which the roles then judge.
            (identity("alice", "orders", "", ""), startup(&[("user", "alice"), ("database", "app")]), allowed),
            (
                identity("alice", "orders", "", ""),
                startup(&[("user", "alice")]),
                Err(Denial::Denied("role \"dev\" does not allow database name \"alice\"".into())),
            ),
            (
                Identity { v: 1, user: "alice".into(), route: None },
                startup(&[("user", "alice")]),
                Err(Denial::NoRoute { user: "alice".into() }),
            ),
            (identity("alice", "orders", "alice", "app"), startup(&[("database", "app")]), Err(Denial::NoStartupUser)),
            (
                identity("alice", "orders", "alice", "app"),
                startup(&[("user", "postgres"), ("database", "app")]),
                Err(Denial::DbUserMismatch {
                    service: "orders".into(),
                    asked: "postgres".into(),
                    allowed: "alice".into(),
                }),
            ),
            (
                identity("alice", "orders", "alice", "app"),
                startup(&[("user", "alice"), ("database", "other")]),
                Err(Denial::DbNameMismatch { service: "orders".into(), asked: "other".into(), allowed: "app".into() }),
            ),
            (
                identity("alice", "billing", "alice", "app"),
                startup(&[("user", "alice"), ("database", "app")]),
                Err(Denial::UnknownDatabase),
            ),
            (
                identity("bob", "orders", "alice", "app"),
                startup(&[("user", "alice"), ("database", "app")]),
                Err(Denial::UnknownUser),
            ),
        ];
        for (i, (id, st, want)) in rows.into_iter().enumerate() {
            let got = ok(authorize(&id, &st, &v, 0));
            // Denied's text comes from rbac; only its kind is checked here.
            match (&got, &want) {
                (Err(Denial::Denied(_)), Err(Denial::Denied(_))) => {}
                _ => assert_eq!(got, want, "row {i}"),
            }
        }
    }

    #[test]
    fn refusals_tell_the_user_how_to_get_the_route() {
        let user = Denial::DbUserMismatch { service: "orders".into(), asked: "root".into(), allowed: "app".into() };
        assert!(user.to_string().contains("`sluice db login orders --db-user root`"), "{user}");
        let name = Denial::DbNameMismatch { service: "orders".into(), asked: "x".into(), allowed: "app".into() };
        assert!(name.to_string().contains("`sluice db login orders --db-name x`"), "{name}");
        let none = Denial::NoRoute { user: "alice".into() };
        assert!(none.to_string().contains("`sluice db login <database>`"), "{none}");
    }

    #[test]
    fn locks_hold_until_they_expire() {
        let mut v = view();
        v.locks.push(Lock {
            id: "l1".into(),
            user: None,
            db: Some("orders".into()),
            message: String::new(),
            expires_at: Some(100),
            created_at: 0,
        });
        assert!(matches!(v.decide_at(ROUTE, 99), Err(Denial::Locked { .. })));
        assert!(v.decide_at(ROUTE, 100).is_ok());
    }

    /// The daemon's store and an admin verb's handle are two SQLite connections, as in production.
    #[test]
    fn the_store_rereads_only_after_a_commit_by_anyone() {
        let dir = std::env::temp_dir().join(format!("sluice-policy-{}", crate::state::random_secret(6)));
        let cfg: Config = crate::config::from_yaml(&format!("data_dir: {}", dir.display())).unwrap();
        let daemon = Arc::new(State::open(&dir).unwrap());
        let admin = State::open(&dir).unwrap();
        let store = PolicyStore::open(Arc::new(cfg), daemon.clone()).unwrap();
        let (first, generation) = store.current().unwrap();
        assert!(first.users.is_empty());

        let before = crate::state::statements_run_here();
        for _ in 0..100 {
            assert_eq!(store.current().unwrap().1, generation);
        }
        assert_eq!(crate::state::statements_run_here(), before, "an unchanged state was queried");

        admin.add_user("alice", "pw", &["dev".to_owned()]).unwrap();
        assert!(store.fresh().is_none(), "a commit by another connection went unseen");
        let (after, next) = store.current().unwrap();
        assert!(next > generation && after.users.contains_key("alice"));
        assert!(store.fresh().is_some());

        // The daemon's bookkeeping does not make the snapshot stale; a policy change through the
        // daemon's own connection does.
        daemon.insert_audit(&serde_json::json!({ "event": "db.session.start" })).unwrap();
        daemon.insert_live_session("s1", &serde_json::json!({})).unwrap();
        daemon.delete_live_session("s1").unwrap();
        assert_eq!(store.fresh().map(|(_, g)| g), Some(next), "bookkeeping made the snapshot stale");
        daemon.add_lock(Some("alice"), None, "", None).unwrap();
        let (locked, _) = store.current().unwrap();
        assert_eq!(locked.locks.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    const ROUTE: Route<'static> = Route { user: "alice", db_service: "orders", db_user: "alice", db_name: "app" };

    #[test]
    fn every_change_that_revokes_access_is_seen() {
        let v = view();
        assert_eq!(v.decide(ROUTE).map(|d| d.name.as_str()), Ok("orders"));

        let mut gone = v.clone();
        gone.users.clear();
        assert_eq!(gone.decide(ROUTE).unwrap_err(), Denial::UnknownUser);

        let mut no_role = v.clone();
        no_role.users.get_mut("alice").unwrap().roles = vec!["readonly".into()];
        assert!(matches!(no_role.decide(ROUTE), Err(Denial::Denied(_))));

        let mut narrowed = v.clone();
        narrowed.roles.get_mut("dev").unwrap().spec.allow.db_names = vec!["other".into()];
        assert!(matches!(narrowed.decide(ROUTE), Err(Denial::Denied(_))));

        let mut locked = v.clone();
        locked.locks.push(Lock {
            id: "l1".into(),
            user: Some("alice".into()),
            db: None,
            message: "incident".into(),
            expires_at: None,
            created_at: 0,
        });
        assert_eq!(locked.decide(ROUTE).unwrap_err().to_string(), "access is locked (lock l1): incident");

        let mut deregistered = v;
        deregistered.databases.clear();
        assert_eq!(deregistered.decide(ROUTE).unwrap_err(), Denial::UnknownDatabase);
    }
}
