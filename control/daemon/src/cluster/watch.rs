//! The agent's side of the watch stream: it asks the auth server for the policy of the
//! databases its selectors name, applies the snapshot and each change to its [`ClusterView`],
//! and installs the result in the agent's [`PolicyStore`], where the next handshake and the
//! live-session enforcer see it. A `kill_session` line is handed to the agent's proxy, which
//! ends the session if it holds it. A stream that breaks or goes quiet for [`SILENCE_LIMIT`] is
//! opened again; every line, pings included, counts as contact with the auth server for
//! `max_policy_staleness`. With several auth servers, a lost stream is opened at once on the next
//! one while some remain untried, and only a whole round of failures backs off. Every stream
//! starts with a full snapshot, and the policy store keeps the last view meanwhile, so moving to
//! another auth server ends no session.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::client::{fails_over, AuthClient};
use super::view::{Change, ClusterView, WatchEvent, WatchRequest};
use crate::config::Config;
use crate::policy::{PolicyStore, PolicyView};

/// No line for this long (three missed pings) and the stream is taken for dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// Longest line accepted (a snapshot of a large cluster is one line).
const MAX_LINE: usize = 64 << 20;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// A stream that lived this long was healthy: the next failure starts a new round.
const HEALTHY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Call(#[from] super::agent::AgentError),
    #[error("the auth server sent nothing for {} s", SILENCE_LIMIT.as_secs())]
    Silent,
    #[error("the auth server ended the stream")]
    Ended,
    #[error("bad line in the watch stream: {0}")]
    BadLine(String),
    #[error("a change arrived before the snapshot")]
    NoSnapshot,
}

/// Splits the stream's bytes into events, however they are chunked (sans-IO).
#[derive(Default)]
pub struct LineDecoder {
    buf: Vec<u8>,
}

impl LineDecoder {
    /// Takes the next chunk; the complete lines in it as events. A line that is not an event,
    /// or longer than [`MAX_LINE`], is an error: the stream cannot be trusted past it.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<WatchEvent>, WatchError> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(len) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + len];
            start += len + 1;
            if line.len() > MAX_LINE {
                return Err(WatchError::BadLine(format!("a line longer than {MAX_LINE} bytes")));
            }
            events.push(serde_json::from_slice(line).map_err(|e| WatchError::BadLine(e.to_string()))?);
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err(WatchError::BadLine(format!("a line longer than {MAX_LINE} bytes")));
        }
        Ok(events)
    }
}

/// What the stream has built so far.
struct Following {
    view: Option<ClusterView>,
    rev: u64,
}

impl Following {
    /// Applies one line; whether the view changed. Kill requests not seen before go to `kills`.
    fn apply(&mut self, event: WatchEvent, kills: &mut Vec<String>) -> Result<bool, WatchError> {
        match event {
            WatchEvent::KillSession { rev, session_id } => {
                if self.view.is_none() {
                    return Err(WatchError::NoSnapshot);
                }
                if rev > self.rev {
                    self.rev = rev;
                    kills.push(session_id);
                }
                Ok(false)
            }
            WatchEvent::Init { rev, view } => {
                self.rev = rev;
                self.view = Some(view);
                Ok(true)
            }
            WatchEvent::Ping { .. } => Ok(false),
            WatchEvent::Put { rev, item } => self.change(rev, Change::Put(item)),
            WatchEvent::Delete { rev, kind, name } => self.change(rev, Change::Delete(kind, name)),
        }
    }

    fn change(&mut self, rev: u64, change: Change) -> Result<bool, WatchError> {
        let view = self.view.as_mut().ok_or(WatchError::NoSnapshot)?;
        if rev <= self.rev {
            return Ok(false);
        }
        self.rev = rev;
        view.apply(change);
        Ok(true)
    }
}

/// What the agent does with a kill request: end the session if it holds it.
pub type KillSession = Arc<dyn Fn(&str) + Send + Sync>;

/// What to do after a stream ended: which addresses this round has used, and when to back off.
#[derive(Debug)]
struct Rounds {
    tried: Vec<bool>,
    retry: Duration,
}

impl Rounds {
    fn new(addrs: usize) -> Self {
        Rounds { tried: vec![false; addrs.max(1)], retry: FIRST_RETRY }
    }

    /// A stream on address `served` (`None`: the call found no address to answer, having tried
    /// them all, or was refused) ended after `lived`, with an error that another auth server
    /// may not have (`fails_over`). `None`: reconnect at once, to the next address; else how
    /// long to wait (before jitter).
    fn ended(&mut self, served: Option<usize>, lived: Duration, fails_over: bool) -> Option<Duration> {
        if lived > HEALTHY {
            self.tried.fill(false);
            self.retry = FIRST_RETRY;
        }
        if let (Some(i), true) = (served, fails_over) {
            if let Some(t) = self.tried.get_mut(i) {
                *t = true;
            }
            if self.tried.iter().any(|t| !t) {
                return None;
            }
        }
        self.tried.fill(false);
        let wait = self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        Some(wait)
    }
}

/// `d` moved by up to ±20 % (`r` in [0, 1)), so that agents that lost the same auth server do not
/// all come back in step.
fn jittered(d: Duration, r: f64) -> Duration {
    d.mul_f64(0.8 + 0.4 * r.clamp(0.0, 1.0))
}

/// Follows the auth servers until aborted, reconnecting as needed.
pub async fn follow(client: AuthClient, cfg: Arc<Config>, policy: Arc<PolicyStore>, kill: KillSession) {
    let req = WatchRequest { selectors: cfg.db_service.resources.iter().map(|m| m.labels.clone()).collect() };
    let mut rounds = Rounds::new(client.addrs().len());
    loop {
        let started = std::time::Instant::now();
        let (err, served) = follow_once(&client, &req, &cfg, &policy, &kill).await;
        crate::metrics::METRICS.following(None);
        let failover = match &err {
            WatchError::Call(e) => fails_over(e),
            _ => true,
        };
        // The call that found no auth server tried them all; its error names the last one.
        let auth_server = match served {
            Some(i) => client.addrs().get(i).to_owned(),
            None => (0..client.addrs().len()).map(|i| client.addrs().get(i)).collect::<Vec<_>>().join(","),
        };
        match policy.staleness() {
            Some((age, max)) => warn!(
                auth_server = %auth_server,
                error = %err,
                policy_age_s = age.as_secs(),
                max_policy_staleness_s = max.as_secs(),
                "lost the auth server's watch; admitting new sessions from the cached policy until it is {} s old",
                max.as_secs()
            ),
            None => warn!(auth_server = %auth_server, error = %err, "lost the auth server's watch"),
        }
        match rounds.ended(served, started.elapsed(), failover) {
            None => {
                if let Some(i) = served {
                    // Calls in flight may have moved on already; only one move is made.
                    if let Some(next) = client.addrs().failed(i) {
                        warn!(
                            from = %auth_server,
                            to = %client.addrs().get(next),
                            why = %err,
                            "moving to another auth server"
                        );
                    }
                }
            }
            Some(wait) => tokio::time::sleep(jittered(wait, rand::random::<f64>())).await,
        }
    }
}

/// One stream, until it fails: why, and the address that served it (if one answered).
async fn follow_once(
    client: &AuthClient,
    req: &WatchRequest,
    cfg: &Config,
    policy: &PolicyStore,
    kill: &KillSession,
) -> (WatchError, Option<usize>) {
    let stream = match client.post("/v1/watch", req).await {
        Ok(s) => s,
        Err(e) => return (e.into(), None),
    };
    let served = stream.index();
    (stream_events(stream, cfg, policy, kill).await, Some(served))
}

/// Applies a stream's lines until it fails.
async fn stream_events(
    mut stream: super::client::Streaming,
    cfg: &Config,
    policy: &PolicyStore,
    kill: &KillSession,
) -> WatchError {
    let mut following = Following { view: None, rev: 0 };
    let mut lines = LineDecoder::default();
    loop {
        let chunk = match tokio::time::timeout(SILENCE_LIMIT, stream.chunk()).await {
            Err(_) => return WatchError::Silent,
            Ok(Err(e)) => return e.into(),
            Ok(Ok(None)) => return WatchError::Ended,
            Ok(Ok(Some(chunk))) => chunk,
        };
        let events = match lines.feed(&chunk) {
            Ok(events) => events,
            Err(e) => return e,
        };
        let mut changed = false;
        let mut kills = Vec::new();
        for event in events {
            let first = matches!(event, WatchEvent::Init { .. });
            match following.apply(event, &mut kills) {
                Ok(c) => changed |= c,
                Err(e) => return e,
            }
            if first {
                if let Some(view) = &following.view {
                    crate::metrics::METRICS.following(Some(stream.addr()));
                    info!(
                        auth_server = %stream.addr(),
                        rev = following.rev,
                        users = view.users.len(),
                        roles = view.roles.len(),
                        locks = view.locks.len(),
                        databases = view.databases.len(),
                        nodes = view.nodes.len(),
                        "following the auth server's policy"
                    );
                }
            }
        }
        match (&following.view, changed) {
            (Some(view), true) => policy.replace(PolicyView::from_cluster(cfg, view)),
            _ => policy.touch(),
        }
        for id in kills {
            kill(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::view::{WatchItem, WatchKind};
    use crate::state::User;
    use proptest::prelude::*;

    fn sample() -> Vec<WatchEvent> {
        let mut view = ClusterView::default();
        view.users.insert("alice".into(), User { name: "alice".into(), roles: vec!["dev".into()] });
        vec![
            WatchEvent::Init { rev: 1, view },
            WatchEvent::Put { rev: 2, item: WatchItem::User(User { name: "bob".into(), roles: vec![] }) },
            WatchEvent::Ping { rev: 2 },
            WatchEvent::Delete { rev: 3, kind: WatchKind::User, name: "alice".into() },
        ]
    }

    proptest! {
        /// However the stream is cut into chunks, the same events come out.
        #[test]
        fn chunking_does_not_matter(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let events = sample();
            let mut bytes = Vec::new();
            for e in &events {
                bytes.extend(serde_json::to_vec(e).unwrap());
                bytes.push(b'\n');
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut dec = LineDecoder::default();
            let (mut got, mut at) = (Vec::new(), 0);
            for cut in cuts.into_iter().chain([bytes.len()]) {
                got.extend(dec.feed(&bytes[at..cut]).unwrap());
                at = cut;
            }
            prop_assert_eq!(got, events);
        }

        /// Garbage is an error or nothing yet, never a panic; and what the decoder accepts the
        /// follower applies without panicking.
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut dec = LineDecoder::default();
            let mut f = Following { view: None, rev: 0 };
            for c in chunks {
                match dec.feed(&c) {
                    Ok(events) => {
                        for e in events {
                            let _ = f.apply(e, &mut Vec::new());
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn a_lost_stream_moves_on_at_once_and_backs_off_only_after_a_round() {
        let quick = Duration::from_secs(1);
        let mut r = Rounds::new(3);
        // Stream on 0 lost: 1 and 2 are untried, so no wait.
        assert_eq!(r.ended(Some(0), quick, true), None);
        assert_eq!(r.ended(Some(1), quick, true), None);
        // The last one of the round: back off, and the waits grow.
        assert_eq!(r.ended(Some(2), quick, true), Some(FIRST_RETRY));
        assert_eq!(r.ended(Some(0), quick, true), None, "a new round starts after the wait");
        // The watch call itself found no auth server (it tried them all): back off.
        assert_eq!(r.ended(None, quick, true), Some(FIRST_RETRY * 2));
        // A refusal is the same everywhere: back off rather than ask the next one.
        assert_eq!(r.ended(Some(0), quick, false), Some(FIRST_RETRY * 4));
        for _ in 0..10 {
            r.ended(None, quick, true);
        }
        assert_eq!(r.ended(None, quick, true), Some(MAX_RETRY));
        // A stream that lived long was healthy: its loss starts afresh.
        assert_eq!(r.ended(Some(1), HEALTHY + quick, true), None);
        assert_eq!(r.ended(None, quick, true), Some(FIRST_RETRY));
        // One auth server: every loss waits, as before there were several.
        let mut one = Rounds::new(1);
        assert_eq!(one.ended(Some(0), quick, true), Some(FIRST_RETRY));
        assert_eq!(one.ended(Some(0), quick, true), Some(FIRST_RETRY * 2));
    }

    #[test]
    fn waits_are_jittered_by_a_fifth() {
        let d = Duration::from_secs(10);
        assert_eq!(jittered(d, 0.0), Duration::from_secs(8));
        assert_eq!(jittered(d, 0.5), d);
        assert!(jittered(d, 0.999_999) < Duration::from_secs(12));
        assert_eq!(jittered(d, 7.0), Duration::from_secs(12), "clamped");
    }

    #[test]
    fn changes_apply_in_order_after_the_snapshot_only() {
        let mut f = Following { view: None, rev: 0 };
        let mut kills = Vec::new();
        let alice = User { name: "alice".into(), roles: vec!["dev".into()] };
        let put = |rev| WatchEvent::Put { rev, item: WatchItem::User(alice.clone()) };
        assert!(matches!(f.apply(put(2), &mut kills), Err(WatchError::NoSnapshot)));
        assert!(f.apply(WatchEvent::Init { rev: 1, view: ClusterView::default() }, &mut kills).unwrap());
        assert!(!f.apply(WatchEvent::Ping { rev: 1 }, &mut kills).unwrap());
        assert!(f.apply(put(2), &mut kills).unwrap());
        assert!(!f.apply(put(2), &mut kills).unwrap(), "a change seen before is not applied again");
        assert!(f
            .apply(WatchEvent::Delete { rev: 5, kind: WatchKind::User, name: "alice".into() }, &mut kills)
            .unwrap());
        assert!(f.view.as_ref().unwrap().users.is_empty());
        assert_eq!(f.rev, 5);
        // A kill request changes no view, and one seen before is not acted on again.
        let kill = |rev| WatchEvent::KillSession { rev, session_id: "s1".into() };
        assert!(!f.apply(kill(6), &mut kills).unwrap());
        assert!(!f.apply(kill(6), &mut kills).unwrap());
        assert_eq!(kills, ["s1"]);
        assert_eq!(f.rev, 6);
    }
}
