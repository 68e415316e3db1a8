//! What the auth server shares with its agents over the watch stream: the users (names and
//! roles, never password hashes), roles, locks, the dynamic and discovered databases and the
//! agents that heartbeated (where they serve, for cancel forwarding), as a
//! [`ClusterView`]; and the stream's events, a snapshot (`init`) and then one `put` or `delete`
//! per changed item, and `kill_session` requests, which are not part of the view. Pure: loading from the state, diffing two views, filtering by an agent's
//! selectors and applying events are all here, without I/O but [`ClusterView::load`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{Config, DbResource};
use crate::rbac::{labels_match, LabelValues, Role};
use crate::state::{Lock, State, StateError, User};

/// `POST /v1/watch`: which databases the agent serves (its `db_service.resources` selectors;
/// a database is sent if any selector matches its labels).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    pub selectors: Vec<BTreeMap<String, String>>,
}

/// A database the auth server knows, under the name it is served by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDb {
    pub resource: DbResource,
    /// `dynamic` (`control db add`) or `cloud` (discovery).
    pub origin: String,
    /// For discovered databases whose last fetch failed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// An agent as the others see it: where it serves PostgreSQL and what, as its last heartbeat
/// said. No health: that is a matter of time, judged where it is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub host_id: String,
    /// The top bits of the cancel keys it hands out.
    pub node_index: u16,
    pub name: String,
    pub postgres_addr: String,
    pub databases: Vec<String>,
}

/// Everything an agent decides from, keyed by name (locks by id, nodes by host id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
    pub locks: BTreeMap<String, Lock>,
    pub databases: BTreeMap<String, SharedDb>,
    /// Agents that heartbeated at least once (an auth server from before nodes sends none).
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    User,
    Role,
    Lock,
    Db,
    Node,
}

/// One changed item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "resource", rename_all = "snake_case")]
pub enum WatchItem {
    User(User),
    Role(Box<Role>),
    Lock(Lock),
    Db(Box<SharedDb>),
    Node(NodeEntry),
}

/// One line of the watch stream (NDJSON). `rev` grows by one per change; `ping` repeats the
/// last one, so an agent can tell a quiet stream from a dead one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WatchEvent {
    Init {
        rev: u64,
        view: ClusterView,
    },
    Put {
        rev: u64,
        item: WatchItem,
    },
    Delete {
        rev: u64,
        kind: WatchKind,
        name: String,
    },
    /// `control sessions kill` on the auth server: whichever agent holds the session ends it.
    KillSession {
        rev: u64,
        session_id: String,
    },
    Ping {
        rev: u64,
    },
}

impl WatchEvent {
    pub fn rev(&self) -> u64 {
        match self {
            WatchEvent::Init { rev, .. }
            | WatchEvent::Put { rev, .. }
            | WatchEvent::Delete { rev, .. }
            | WatchEvent::KillSession { rev, .. }
            | WatchEvent::Ping { rev } => *rev,
        }
    }
}

/// A change between two views, before it gets a revision; or a kill request, which travels
/// the same stream in order but changes no view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(WatchItem),
    Delete(WatchKind, String),
    KillSession(String),
}

impl Change {
    pub fn at(self, rev: u64) -> WatchEvent {
        match self {
            Change::Put(item) => WatchEvent::Put { rev, item },
            Change::Delete(kind, name) => WatchEvent::Delete { rev, kind, name },
            Change::KillSession(session_id) => WatchEvent::KillSession { rev, session_id },
        }
    }
}

/// Whether any selector matches `labels` (every key of a selector present with its value).
pub fn selected(selectors: &[BTreeMap<String, String>], labels: &BTreeMap<String, String>) -> bool {
    selectors.iter().any(|s| {
        let selector: BTreeMap<String, LabelValues> =
            s.iter().map(|(k, v)| (k.clone(), LabelValues::One(v.clone()))).collect();
        labels_match(&selector, labels)
    })
}

impl ClusterView {
    /// Reads what agents are sent (blocking: SQLite). Discovered databases get the names this
    /// auth server serves them under, so that every process calls a database the same.
    pub fn load(cfg: &Config, state: &State) -> Result<Self, StateError> {
        let databases = crate::catalog::shared_databases(cfg, state)?
            .into_iter()
            .map(|db| (db.resource.metadata.name.clone(), db))
            .collect();
        Ok(ClusterView {
            users: state.users()?.into_iter().map(|u| (u.name.clone(), u)).collect(),
            roles: state.roles()?.into_iter().map(|r| (r.metadata.name.clone(), r)).collect(),
            locks: state.active_locks()?.into_iter().map(|l| (l.id.clone(), l)).collect(),
            databases,
            nodes: state
                .nodes()?
                .into_iter()
                .filter_map(|n| {
                    let hb = n.heartbeat?;
                    let entry = NodeEntry {
                        host_id: n.host_id.clone(),
                        node_index: n.node_index,
                        name: n.name,
                        postgres_addr: hb.postgres_addr,
                        databases: hb.databases,
                    };
                    Some((n.host_id, entry))
                })
                .collect(),
        })
    }

    /// The view an agent with these selectors is sent: databases it does not serve left out.
    pub fn for_selectors(&self, selectors: &[BTreeMap<String, String>]) -> ClusterView {
        let mut out = self.clone();
        out.databases.retain(|_, db| selected(selectors, &db.resource.metadata.labels));
        out
    }

    /// What turns `self` into `next`, in a stable order (kind, then name).
    pub fn diff(&self, next: &ClusterView) -> Vec<Change> {
        let mut out = Vec::new();
        diff_map(&self.users, &next.users, WatchKind::User, WatchItem::User, &mut out);
        diff_map(&self.roles, &next.roles, WatchKind::Role, |r| WatchItem::Role(Box::new(r)), &mut out);
        diff_map(&self.locks, &next.locks, WatchKind::Lock, WatchItem::Lock, &mut out);
        diff_map(&self.databases, &next.databases, WatchKind::Db, |d| WatchItem::Db(Box::new(d)), &mut out);
        diff_map(&self.nodes, &next.nodes, WatchKind::Node, WatchItem::Node, &mut out);
        out
    }

    /// Applies one change (as received: an item keyed by its own name).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Put(WatchItem::User(u)) => {
                self.users.insert(u.name.clone(), u);
            }
            Change::Put(WatchItem::Role(r)) => {
                self.roles.insert(r.metadata.name.clone(), *r);
            }
            Change::Put(WatchItem::Lock(l)) => {
                self.locks.insert(l.id.clone(), l);
            }
            Change::Put(WatchItem::Db(d)) => {
                self.databases.insert(d.resource.metadata.name.clone(), *d);
            }
            Change::Put(WatchItem::Node(n)) => {
                self.nodes.insert(n.host_id.clone(), n);
            }
            Change::Delete(WatchKind::User, name) => {
                self.users.remove(&name);
            }
            Change::Delete(WatchKind::Role, name) => {
                self.roles.remove(&name);
            }
            Change::Delete(WatchKind::Lock, name) => {
                self.locks.remove(&name);
            }
            Change::Delete(WatchKind::Db, name) => {
                self.databases.remove(&name);
            }
            Change::Delete(WatchKind::Node, name) => {
                self.nodes.remove(&name);
            }
            Change::KillSession(_) => {}
        }
    }
}

fn diff_map<T: Clone + PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    kind: WatchKind,
    wrap: fn(T) -> WatchItem,
    out: &mut Vec<Change>,
) {
    for (name, item) in new {
        if old.get(name) != Some(item) {
            out.push(Change::Put(wrap(item.clone())));
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push(Change::Delete(kind, name.clone()));
        }
    }
}

/// Per watch stream: turns the hub's changes into what one agent is sent. A database whose
/// labels stop matching the agent's selectors is sent as deleted; one that starts matching, as
/// put.
pub struct StreamFilter {
    selectors: Vec<BTreeMap<String, String>>,
    /// Databases this agent was sent and not told were deleted.
    sent: BTreeSet<String>,
}

impl StreamFilter {
    /// The filter, and the snapshot to start the stream with.
    pub fn start(selectors: Vec<BTreeMap<String, String>>, view: &ClusterView) -> (StreamFilter, ClusterView) {
        let first = view.for_selectors(&selectors);
        let sent = first.databases.keys().cloned().collect();
        (StreamFilter { selectors, sent }, first)
    }

    /// What the agent is told of `change`, if anything.
    pub fn pass(&mut self, change: &Change) -> Option<Change> {
        match change {
            Change::Put(WatchItem::Db(db)) => {
                let name = &db.resource.metadata.name;
                if selected(&self.selectors, &db.resource.metadata.labels) {
                    self.sent.insert(name.clone());
                    Some(change.clone())
                } else if self.sent.remove(name) {
                    Some(Change::Delete(WatchKind::Db, name.clone()))
                } else {
                    None
                }
            }
            Change::Delete(WatchKind::Db, name) => self.sent.remove(name).then(|| change.clone()),
            other => Some(other.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str, env: &str) -> SharedDb {
        let resource: DbResource = serde_saphyr::from_str(&format!(
            "kind: db\nversion: v3\nmetadata:\n  name: {name}\n  labels:\n    env: {env}\nspec:\n  protocol: postgres\n  uri: x.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com:5432\n"
        ))
        .unwrap();
        SharedDb { resource, origin: "dynamic".into(), stale: None }
    }

    fn user(name: &str, roles: &[&str]) -> User {
        User { name: name.into(), roles: roles.iter().map(|r| r.to_string()).collect() }
    }

    fn view(users: &[User], dbs: &[SharedDb]) -> ClusterView {
        ClusterView {
            users: users.iter().map(|u| (u.name.clone(), u.clone())).collect(),
            databases: dbs.iter().map(|d| (d.resource.metadata.name.clone(), d.clone())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn applying_the_diff_gives_the_new_view() {
        let a = view(&[user("alice", &["dev"]), user("bob", &[])], &[db("orders", "prod")]);
        let b = view(&[user("alice", &["dev", "ops"]), user("carol", &[])], &[db("billing", "prod")]);
        let changes = a.diff(&b);
        // alice changed, carol added, bob gone; billing added, orders gone.
        assert_eq!(changes.len(), 5, "{changes:?}");
        let mut applied = a.clone();
        for c in changes {
            applied.apply(c);
        }
        assert_eq!(applied, b);
        assert!(b.diff(&b).is_empty());
    }

    fn node(host_id: &str, index: u16, addr: &str) -> NodeEntry {
        NodeEntry {
            host_id: host_id.into(),
            node_index: index,
            name: format!("agent-{index}"),
            postgres_addr: addr.into(),
            databases: vec!["orders".into()],
        }
    }

    #[test]
    fn nodes_are_diffed_and_applied_like_the_rest() {
        let mut a = view(&[], &[]);
        a.nodes.insert("h1".into(), node("h1", 1, "10.0.0.1:5433"));
        a.nodes.insert("h2".into(), node("h2", 2, "10.0.0.2:5433"));
        let mut b = a.clone();
        b.nodes.insert("h1".into(), node("h1", 1, "10.0.0.9:5433"));
        b.nodes.remove("h2");
        b.nodes.insert("h3".into(), node("h3", 3, "10.0.0.3:5433"));
        let changes = a.diff(&b);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes.contains(&Change::Delete(WatchKind::Node, "h2".into())));
        let mut applied = a.clone();
        for c in changes {
            applied.apply(c);
        }
        assert_eq!(applied, b);
        // Nodes go to every agent, whatever its selectors (any of them may get a cancel request
        // for a session on another).
        let (mut filter, first) = StreamFilter::start(Vec::new(), &b);
        assert_eq!(first.nodes.len(), 2);
        let put = Change::Put(WatchItem::Node(node("h4", 4, "10.0.0.4:5433")));
        assert_eq!(filter.pass(&put), Some(put));
        // A snapshot from an auth server without nodes still reads.
        let old: ClusterView = serde_json::from_str(r#"{"users":{},"roles":{},"locks":{},"databases":{}}"#).unwrap();
        assert!(old.nodes.is_empty());
        let line =
            serde_json::to_string(&WatchEvent::Delete { rev: 2, kind: WatchKind::Node, name: "h1".into() }).unwrap();
        assert_eq!(line, r#"{"op":"delete","rev":2,"kind":"node","name":"h1"}"#);
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let events = vec![
            WatchEvent::Init { rev: 3, view: view(&[user("alice", &["dev"])], &[db("orders", "prod")]) },
            WatchEvent::Put { rev: 4, item: WatchItem::User(user("bob", &[])) },
            WatchEvent::Delete { rev: 5, kind: WatchKind::Db, name: "orders".into() },
            WatchEvent::KillSession { rev: 6, session_id: "s1".into() },
            WatchEvent::Ping { rev: 6 },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<WatchEvent>(&line).unwrap(), e);
        }
        let line =
            serde_json::to_string(&WatchEvent::Delete { rev: 1, kind: WatchKind::Lock, name: "l".into() }).unwrap();
        assert_eq!(line, r#"{"op":"delete","rev":1,"kind":"lock","name":"l"}"#);
        let line = serde_json::to_string(&WatchEvent::KillSession { rev: 2, session_id: "s1".into() }).unwrap();
        assert_eq!(line, r#"{"op":"kill_session","rev":2,"session_id":"s1"}"#);
    }

    #[test]
    fn an_agent_is_sent_only_the_databases_it_selects() {
        let selectors = vec![[("env".to_owned(), "dev".to_owned())].into_iter().collect()];
        let full = view(&[], &[db("a", "dev"), db("b", "prod")]);
        let (mut filter, first) = StreamFilter::start(selectors, &full);
        assert_eq!(first.databases.keys().collect::<Vec<_>>(), ["a"]);
        // b starts matching: put; a stops matching: delete; a prod db it never had: nothing.
        assert_eq!(
            filter.pass(&Change::Put(WatchItem::Db(Box::new(db("b", "dev"))))),
            Some(Change::Put(WatchItem::Db(Box::new(db("b", "dev")))))
        );
        assert_eq!(
            filter.pass(&Change::Put(WatchItem::Db(Box::new(db("a", "prod"))))),
            Some(Change::Delete(WatchKind::Db, "a".into()))
        );
        assert_eq!(filter.pass(&Change::Put(WatchItem::Db(Box::new(db("c", "prod"))))), None);
        assert_eq!(filter.pass(&Change::Delete(WatchKind::Db, "c".into())), None);
        assert_eq!(
            filter.pass(&Change::Delete(WatchKind::Db, "b".into())),
            Some(Change::Delete(WatchKind::Db, "b".into()))
        );
        // Users, roles, locks and kill requests go to every agent.
        let u = Change::Put(WatchItem::User(user("alice", &[])));
        assert_eq!(filter.pass(&u), Some(u));
        let kill = Change::KillSession("s1".into());
        assert_eq!(filter.pass(&kill), Some(kill));
        assert!(selected(&[BTreeMap::new()], &BTreeMap::new()), "an empty selector selects everything");
        assert!(!selected(&[], &BTreeMap::new()), "no selector selects nothing");
    }
}
