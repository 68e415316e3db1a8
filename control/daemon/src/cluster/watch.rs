//! The agent's side of the watch stream: it asks the auth server for the policy of the
//! databases its selectors name, applies the snapshot and each change to its [`ClusterView`],
//! and installs the result in the agent's [`PolicyStore`], where the next handshake and the
//! live-session enforcer see it. A `kill_session` line is handed to the agent's proxy, which
//! ends the session if it holds it. A stream that breaks or goes quiet for [`SILENCE_LIMIT`] is
//! opened again (with backoff); every line, pings included, counts as contact with the auth
//! server for `max_policy_staleness`.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::client::AuthClient;
use super::view::{Change, ClusterView, WatchEvent, WatchRequest};
use crate::config::Config;
use crate::policy::{PolicyStore, PolicyView};

/// No line for this long (three missed pings) and the stream is taken for dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// Longest line accepted (a snapshot of a large cluster is one line).
const MAX_LINE: usize = 64 << 20;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);

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

/// Follows the auth server until aborted, reconnecting as needed.
pub async fn follow(client: AuthClient, cfg: Arc<Config>, policy: Arc<PolicyStore>, kill: KillSession) {
    let req = WatchRequest { selectors: cfg.db_service.resources.iter().map(|m| m.labels.clone()).collect() };
    let mut retry = FIRST_RETRY;
    loop {
        let started = std::time::Instant::now();
        let err = follow_once(&client, &req, &cfg, &policy, &kill).await;
        if started.elapsed() > Duration::from_secs(30) {
            retry = FIRST_RETRY;
        }
        match policy.staleness() {
            Some((age, max)) => warn!(
                auth_server = %client.addr(),
                error = %err,
                policy_age_s = age.as_secs(),
                max_policy_staleness_s = max.as_secs(),
                "lost the auth server's watch; admitting new sessions from the cached policy until it is {} s old",
                max.as_secs()
            ),
            None => warn!(auth_server = %client.addr(), error = %err, "lost the auth server's watch"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// One stream, until it fails.
async fn follow_once(
    client: &AuthClient,
    req: &WatchRequest,
    cfg: &Config,
    policy: &PolicyStore,
    kill: &KillSession,
) -> WatchError {
    let mut stream = match client.post("/v1/watch", req).await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
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
                    info!(
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
