//! The auth server's side of the watch streams: one [`Hub`] holds the current [`ClusterView`]
//! and a revision, and broadcasts each change to every stream. It notices changes the way the
//! policy snapshot does (the state's change marker, no SQL while nothing changes): whenever
//! the auth server's [`PolicyStore`] takes a new snapshot, the hub reads the view again and
//! publishes the difference. It also reads the kill requests `control sessions kill` left in
//! `session_kills` then, and sends each to every agent (requests a minute old are dropped).
//!
//! A stream subscribes and takes the snapshot under one lock, so it misses no change made
//! between the two and gets none twice (Teleport's watchers wait for `OpInit` for the same
//! reason). A stream that falls too far behind is closed; its agent reconnects and starts over.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::view::{Change, ClusterView};
use crate::config::Config;
use crate::policy::PolicyStore;
use crate::state::State;

/// How often the hub looks for a new policy snapshot: well inside the second a revocation
/// has to reach every agent.
const POLL: Duration = Duration::from_millis(100);

/// Changes buffered per stream before a slow one is dropped.
const BACKLOG: usize = 4096;

/// How long a kill request is kept after it was sent: long enough for a CLI to see it, not
/// long enough to grow.
const KILL_KEPT: Duration = Duration::from_secs(60);

pub struct Hub {
    inner: Mutex<Published>,
    tx: broadcast::Sender<Arc<(u64, Change)>>,
    /// Loads of the state begun so far; a stream compares it with the load that produced
    /// [`Hub::registered`], so that only a load begun after the stream opened can end it.
    loads_begun: AtomicU64,
    registered: RwLock<Registered>,
}

/// The agents registered in the state, as of one load.
#[derive(Default)]
struct Registered {
    load: u64,
    host_ids: HashSet<String>,
}

struct Published {
    rev: u64,
    view: Arc<ClusterView>,
}

/// What a new stream starts from.
pub struct Subscription {
    pub rev: u64,
    pub view: Arc<ClusterView>,
    pub changes: broadcast::Receiver<Arc<(u64, Change)>>,
}

impl Hub {
    pub fn new(view: ClusterView) -> Arc<Hub> {
        let (tx, _) = broadcast::channel(BACKLOG);
        Arc::new(Hub {
            inner: Mutex::new(Published { rev: 1, view: Arc::new(view) }),
            tx,
            loads_begun: AtomicU64::new(0),
            registered: RwLock::new(Registered::default()),
        })
    }

    /// The hub for the state as it is now (blocking: SQLite).
    pub fn load(cfg: &Config, state: &State) -> Result<Arc<Hub>, crate::state::StateError> {
        let hub = Hub::new(ClusterView::load(cfg, state)?);
        let load = hub.begin_load();
        hub.set_registered(load, state.nodes()?.into_iter().map(|n| n.host_id).collect());
        Ok(hub)
    }

    fn begin_load(&self) -> u64 {
        self.loads_begun.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn set_registered(&self, load: u64, host_ids: HashSet<String>) {
        let mut r = self.registered.write().unwrap_or_else(|p| p.into_inner());
        if load > r.load {
            *r = Registered { load, host_ids };
        }
    }

    /// A mark to give [`Hub::removed`]: taken when a stream opens.
    pub fn mark(&self) -> u64 {
        self.loads_begun.load(Ordering::Acquire)
    }

    /// Whether a load of the state begun after `mark` found no node `host_id` (`control nodes
    /// rm`): its watch stream must end, so that the agent stops following the cluster's policy.
    pub fn removed(&self, host_id: &str, mark: u64) -> bool {
        let r = self.registered.read().unwrap_or_else(|p| p.into_inner());
        r.load > mark && !r.host_ids.contains(host_id)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Published> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current view and every change after it.
    pub fn subscribe(&self) -> Subscription {
        let published = self.inner();
        Subscription { rev: published.rev, view: published.view.clone(), changes: self.tx.subscribe() }
    }

    /// Makes `next` the current view, sending what changed; returns how many changes.
    pub fn publish(&self, next: ClusterView) -> usize {
        let mut published = self.inner();
        let changes = published.view.diff(&next);
        for change in &changes {
            published.rev += 1;
            // No receiver is not an error: no agent is watching.
            let _ = self.tx.send(Arc::new((published.rev, change.clone())));
        }
        published.view = Arc::new(next);
        changes.len()
    }

    /// Sends a kill request for each session to every stream, after the changes sent so far.
    pub fn publish_kills(&self, session_ids: &[String]) {
        let mut published = self.inner();
        for id in session_ids {
            published.rev += 1;
            let _ = self.tx.send(Arc::new((published.rev, Change::KillSession(id.clone()))));
        }
    }

    pub fn rev(&self) -> u64 {
        self.inner().rev
    }

    /// Follows the auth server's policy snapshot, publishing each change, until aborted.
    pub async fn run(self: Arc<Self>, cfg: Arc<Config>, state: Arc<State>, policy: Arc<PolicyStore>) {
        let mut seen = None;
        // Requests made before this process started are not sent again.
        let state2 = state.clone();
        let mut kills_seen = match tokio::task::spawn_blocking(move || state2.last_session_kill()).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the session kill requests");
                0
            }
            Err(e) => {
                warn!(error = %e, "reading the session kill requests");
                0
            }
        };
        loop {
            tokio::time::sleep(POLL).await;
            let generation = match policy.current_async().await {
                Ok((_, g)) => g,
                Err(e) => {
                    warn!(error = %e, "reading the state for the agents' watch");
                    continue;
                }
            };
            if seen == Some(generation) {
                continue;
            }
            kills_seen = self.send_kills(&state, kills_seen).await;
            let (cfg2, state2) = (cfg.clone(), state.clone());
            let load = self.begin_load();
            let read = move || -> Result<_, crate::state::StateError> {
                let hosts: HashSet<String> = state2.nodes()?.into_iter().map(|n| n.host_id).collect();
                Ok((ClusterView::load(&cfg2, &state2)?, hosts))
            };
            match tokio::task::spawn_blocking(read).await {
                Ok(Ok((view, hosts))) => {
                    seen = Some(generation);
                    self.set_registered(load, hosts);
                    let n = self.publish(view);
                    if n > 0 {
                        info!(changes = n, rev = self.rev(), "policy change sent to agents");
                    } else {
                        debug!(generation, "policy snapshot without changes for agents");
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "reading the state for the agents' watch"),
                Err(e) => warn!(error = %e, "reading the state for the agents' watch"),
            }
        }
    }
}

impl Hub {
    /// Sends the kill requests after `after`; the last one sent.
    async fn send_kills(&self, state: &Arc<State>, after: i64) -> i64 {
        let state = state.clone();
        let read = tokio::task::spawn_blocking(move || {
            let kills = state.session_kills_after(after)?;
            state.prune_session_kills(KILL_KEPT)?;
            Ok::<_, crate::state::StateError>(kills)
        });
        let kills = match read.await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the session kill requests");
                return after;
            }
            Err(e) => {
                warn!(error = %e, "reading the session kill requests");
                return after;
            }
        };
        let Some((last, _)) = kills.last() else { return after };
        let last = *last;
        let ids: Vec<String> = kills.into_iter().map(|(_, id)| id).collect();
        for id in &ids {
            info!(session_id = %id, "asking the agents to end a session");
        }
        self.publish_kills(&ids);
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::User;

    #[test]
    fn a_subscriber_gets_every_change_after_its_snapshot_once() {
        let hub = Hub::new(ClusterView::default());
        let mut v = ClusterView::default();
        v.users.insert("alice".into(), User { name: "alice".into(), roles: vec![] });
        hub.publish(v.clone());
        let mut sub = hub.subscribe();
        assert_eq!(sub.rev, 2);
        assert_eq!(*sub.view, v);
        v.users.insert("bob".into(), User { name: "bob".into(), roles: vec![] });
        v.users.remove("alice");
        assert_eq!(hub.publish(v.clone()), 2);
        let mut got = (*sub.view).clone();
        let mut revs = Vec::new();
        while let Ok(change) = sub.changes.try_recv() {
            revs.push(change.0);
            got.apply(change.1.clone());
        }
        assert_eq!(revs, [3, 4]);
        assert_eq!(got, v);
        assert_eq!(hub.publish(v.clone()), 0, "an unchanged view sends nothing");
        // Kill requests follow in order, and leave the view alone.
        hub.publish_kills(&["s1".into()]);
        let kill = sub.changes.try_recv().unwrap();
        assert_eq!(*kill, (5, Change::KillSession("s1".into())));
        assert_eq!(*hub.subscribe().view, v);
    }

    #[test]
    fn only_a_load_begun_after_a_stream_opened_can_end_it() {
        let hub = Hub::new(ClusterView::default());
        let first = hub.begin_load();
        let mark = hub.mark();
        // A load begun before the stream opened, finishing after, without the new node.
        hub.set_registered(first, HashSet::new());
        assert!(!hub.removed("h1", mark));
        let next = hub.begin_load();
        hub.set_registered(next, ["h1".to_owned()].into_iter().collect());
        assert!(!hub.removed("h1", mark));
        let after_rm = hub.begin_load();
        hub.set_registered(after_rm, HashSet::new());
        assert!(hub.removed("h1", mark));
        // An older load finishing late changes nothing.
        hub.set_registered(next, ["h1".to_owned()].into_iter().collect());
        assert!(hub.removed("h1", mark));
    }
}
