//! Control's side of the data-plane link: hands authenticated sessions (both sockets, the TLS
//! secrets rustls extracted, the session's metadata) to a `dataplane` process, and turns its end
//! reports into `db.session.end` audit events.
//!
//! The link's reading side lives on its own thread (blocking SEQPACKET IO); it reconnects when
//! the dataplane restarts, and after every (re)connect it asks which sessions the dataplane still
//! holds, so sessions that outlived a control restart are audited by the new control, and sessions
//! lost with a dead dataplane are recorded as ended. Replies too large for one frame arrive in
//! parts and are gathered before use.
//!
//! Sends come from async code and never block: each is a non-blocking `sendmsg`, retried with
//! short sleeps while the socket buffer is full, for at most [`SEND_DEADLINE`]. A dataplane that
//! stops reading for that long is logged and its link dropped (the reader reconnects), the send
//! fails and its caller refuses the session; meanwhile new sessions are relayed by control.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use sluice_handoff::handoff::{EndReason, Handoff, LegCrypto, Message, Reassembly, Role, SessionEnded, SessionStats};
use sluice_handoff::link::{Link, LinkError};
use thiserror::Error;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Each waiting handoff's answer: `None` when taken, else the data plane's reason.
type Acks = Mutex<HashMap<String, oneshot::Sender<Option<String>>>>;

/// Why a request to the data plane did not go through. Callers fall back or refuse the session;
/// the text ends up in logs and audit events.
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// No link: the data plane is down or restarting.
    #[error("dataplane is not connected")]
    NotConnected,
    /// The data plane stopped reading its link; the link was dropped.
    #[error("the dataplane did not read the {what} within {SEND_DEADLINE:?}")]
    Stuck { what: &'static str },
    #[error("sending the {what} to the dataplane: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: LinkError,
    },
    /// The link broke while the request waited for its answer.
    #[error("dataplane link closed before it answered")]
    Closed,
    #[error("dataplane did not answer within {} s", .0.as_secs())]
    NoAnswer(Duration),
    /// The data plane's own reason for not taking a session, as it sent it.
    #[error("the dataplane refused the session: {0}")]
    Refused(String),
}

/// The negotiated TLS cipher has no record layer in the data plane, so the leg cannot be handed
/// over.
#[derive(Debug, Error)]
#[error("negotiated cipher suite {cipher_suite:#06x} has no data-plane support")]
pub struct UnsupportedCipher {
    pub cipher_suite: u16,
}

/// What control does with the dataplane's news.
pub trait Events: Send + Sync + 'static {
    /// A session ended in the dataplane.
    fn ended(&self, e: SessionEnded);
    /// The dataplane (re)connected and holds exactly `live` sessions; others it was given are gone.
    fn sync(&self, live: Vec<String>);
}

pub struct DataplaneClient {
    /// The sending side and its connection number (to drop only the link a failed send used).
    /// Held only for a non-blocking send, never across an await or a blocking call.
    link: Mutex<Option<(u64, Link)>>,
    acks: Acks,
    /// Callers waiting for `Stats`, in the order their `StatsRequest`s went out (the data plane
    /// answers each link's requests in order).
    stats_waiters: Mutex<VecDeque<oneshot::Sender<Vec<SessionStats>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// After the link breaks, a dataplane that has not come back within this long is taken to have
/// lost its sessions (their sockets closed with its process).
const LOST_AFTER: Duration = Duration::from_secs(3);

/// How long a send waits for room in the link's socket buffer before the dataplane is taken to
/// be stuck.
pub const SEND_DEADLINE: Duration = Duration::from_secs(2);

impl DataplaneClient {
    /// Starts the link thread for `path`.
    pub fn start(path: PathBuf, events: Arc<dyn Events>) -> Arc<DataplaneClient> {
        let client = Arc::new(DataplaneClient {
            link: Mutex::new(None),
            acks: Mutex::new(HashMap::new()),
            stats_waiters: Mutex::new(VecDeque::new()),
        });
        let c = client.clone();
        let spawned =
            std::thread::Builder::new().name("sluice-dataplane-link".into()).spawn(move || c.run(&path, &*events));
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the dataplane link thread; control will relay sessions itself");
        }
        client
    }

    pub fn connected(&self) -> bool {
        lock(&self.link).is_some()
    }

    fn run(&self, path: &std::path::Path, events: &dyn Events) {
        let mut logged_down = false;
        let mut down_since: Option<Instant> = None;
        for generation in 0u64.. {
            match self.connect(path, generation) {
                Ok(reader) => {
                    info!(socket = %path.display(), "connected to the dataplane");
                    logged_down = false;
                    self.read(reader, events);
                    *lock(&self.link) = None;
                    // Dropping the senders tells the waiters the link closed.
                    lock(&self.acks).clear();
                    lock(&self.stats_waiters).clear();
                    warn!("dataplane link closed; reconnecting");
                    down_since = Some(Instant::now());
                }
                Err(e) => {
                    if !logged_down {
                        warn!(socket = %path.display(), error = %e, "dataplane unreachable; control relays sessions itself until it is back");
                        logged_down = true;
                    }
                    if let Some(since) = down_since {
                        if since.elapsed() > LOST_AFTER {
                            events.sync(Vec::new());
                            down_since = None;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn connect(&self, path: &std::path::Path, generation: u64) -> Result<Link, LinkError> {
        let link = Link::connect(path)?;
        link.set_read_timeout(Some(Duration::from_secs(5)))?;
        link.hello(Role::Control)?;
        link.set_read_timeout(None)?;
        let reader = link.try_clone()?;
        // A fresh link's buffer is empty: this cannot block, and it runs on the link thread.
        link.send(&Message::ListSessions, &[])?;
        *lock(&self.link) = Some((generation, link));
        Ok(reader)
    }

    fn read(&self, link: Link, events: &dyn Events) {
        let mut parts = Reassembly::default();
        loop {
            let msg = match link.recv().and_then(|(m, _)| Ok(parts.push(m)?)) {
                Ok(Some(m)) => m,
                // A part of a reply; the rest follows.
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, "dataplane link failed");
                    return;
                }
            };
            match msg {
                Message::HandoffAck { session_id, error } => {
                    if let Some(ack) = lock(&self.acks).remove(&session_id) {
                        let _ = ack.send(error);
                    }
                }
                Message::SessionEnded(e) => events.ended(e),
                Message::Sessions { session_ids, .. } => events.sync(session_ids),
                Message::Stats { sessions, .. } => {
                    if let Some(waiter) = lock(&self.stats_waiters).pop_front() {
                        let _ = waiter.send(sessions);
                    }
                }
                other => warn!(?other, "unexpected frame from the dataplane"),
            }
        }
    }

    /// Runs `attempt` (a non-blocking send) on the current link until it is sent, the link
    /// fails, or [`SEND_DEADLINE`] passes; then the dataplane is taken to be stuck and its link
    /// is dropped, so the reader reconnects and new sessions stop waiting on it.
    async fn send_with(
        &self,
        what: &'static str,
        mut attempt: impl FnMut(&Link) -> Result<(), LinkError>,
    ) -> Result<(), DataplaneError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let (generation, sent) = {
                let link = lock(&self.link);
                let Some((generation, l)) = link.as_ref() else { return Err(DataplaneError::NotConnected) };
                (*generation, attempt(l))
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(LinkError::WouldBlock) if started.elapsed() < SEND_DEADLINE => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(LinkError::WouldBlock) => {
                    warn!(
                        frame = what,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the dataplane stopped reading its link; dropping the link"
                    );
                    self.drop_link(generation);
                    return Err(DataplaneError::Stuck { what });
                }
                Err(source) => return Err(DataplaneError::Send { what, source }),
            }
        }
    }

    /// Shuts the link down (waking the reader, which reconnects), unless it was replaced already.
    fn drop_link(&self, generation: u64) {
        let mut link = lock(&self.link);
        if link.as_ref().is_some_and(|(g, _)| *g == generation) {
            if let Some((_, l)) = link.take() {
                l.shutdown();
            }
        }
    }

    /// Hands a session over; `Ok` once the dataplane has taken it.
    pub async fn handoff(&self, h: Handoff, client: OwnedFd, upstream: OwnedFd) -> Result<(), DataplaneError> {
        let id = h.session_id.clone();
        let (tx, rx) = oneshot::channel();
        lock(&self.acks).insert(id.clone(), tx);
        let msg = Message::Handoff(Box::new(h));
        let fds: [RawFd; 2] = [client.as_raw_fd(), upstream.as_raw_fd()];
        let sent = self.send_with("handoff", |l| l.try_send(&msg, &fds)).await;
        // Our copies close here; the dataplane holds its own.
        drop((client, upstream));
        if let Err(e) = sent {
            lock(&self.acks).remove(&id);
            return Err(e);
        }
        let within = Duration::from_secs(5);
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(reason))) => Err(DataplaneError::Refused(reason)),
            Ok(Err(_)) => Err(DataplaneError::Closed),
            Err(_) => {
                lock(&self.acks).remove(&id);
                Err(DataplaneError::NoAnswer(within))
            }
        }
    }

    /// Every live session's counters so far.
    pub async fn stats(&self) -> Result<Vec<SessionStats>, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        self.send_with("stats request", |l| {
            // Queued under the link lock, in the order the requests go out (the data plane answers
            // each link's requests in order); taken back when the request could not go.
            let mut waiters = lock(&self.stats_waiters);
            if let Some(tx) = tx.take() {
                waiters.push_back(tx);
            }
            let sent = l.try_send(&Message::StatsRequest, &[]);
            if sent.is_err() {
                tx = waiters.pop_back();
            }
            sent
        })
        .await?;
        // A late answer still goes to this (then dropped) waiter, keeping the queue in step.
        let within = Duration::from_secs(2);
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(DataplaneError::Closed),
            Err(_) => Err(DataplaneError::NoAnswer(within)),
        }
    }

    /// Asks the dataplane to end a session (lock, expiry, admin kill). Never blocks: a link whose
    /// buffer is full is an error now, and the caller asks again on its next round.
    pub fn end_session(&self, id: &str, reason: EndReason) -> Result<(), DataplaneError> {
        match lock(&self.link).as_ref() {
            Some((_, l)) => l
                .try_send(&Message::EndSession { session_id: id.to_owned(), reason }, &[])
                .map_err(|source| DataplaneError::Send { what: "end request", source }),
            None => Err(DataplaneError::NotConnected),
        }
    }
}

/// Converts rustls' extracted secrets for one leg into the handoff's form.
pub fn leg_crypto(version: u16, cipher_suite: u16, s: ExtractedSecrets) -> Result<LegCrypto, UnsupportedCipher> {
    let parts = |s: ConnectionTrafficSecrets| match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key.as_ref().to_vec(), iv.as_ref().to_vec())),
        _ => Err(UnsupportedCipher { cipher_suite }),
    };
    let (tx_seq, tx) = s.tx;
    let (rx_seq, rx) = s.rx;
    let (tx_key, tx_iv) = parts(tx)?;
    let (rx_key, rx_iv) = parts(rx)?;
    Ok(LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_handoff::link::Listener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct NoEvents;
    impl Events for NoEvents {
        fn ended(&self, _: SessionEnded) {}
        fn sync(&self, _: Vec<String>) {}
    }

    fn handoff(i: usize) -> (Handoff, OwnedFd, OwnedFd) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let h = Handoff {
            session_id: format!("session-{i}"),
            user: "alice".into(),
            db_service: "demo".into(),
            db_user: "alice".into(),
            db_name: "demo".into(),
            not_after: 0,
            idle_timeout_ms: 0,
            client: LegCrypto::Plain,
            upstream: LegCrypto::Plain,
        };
        (h, a.into(), b.into())
    }

    /// A data plane that answers control's Hello and then never reads again: handoffs fill the
    /// link's socket buffer, and control must neither freeze its runtime nor hang its callers.
    #[test]
    fn a_dataplane_that_stops_reading_never_freezes_control() {
        let dir = std::env::temp_dir().join(format!("sluice-stuck-dp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dp.sock");
        let listener = Listener::bind(&path).unwrap();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let fake = std::thread::spawn(move || {
            let link = listener.accept().unwrap();
            assert_eq!(link.recv_hello().unwrap().0, Role::Control);
            link.answer_hello().unwrap();
            // Hold the link (and the listener) without reading until the test is over.
            let _ = stopped.recv();
            drop((link, listener));
        });
        let client = DataplaneClient::start(path, Arc::new(NoEvents));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.connected() {
            assert!(Instant::now() < deadline, "control never connected to the fake dataplane");
            std::thread::sleep(Duration::from_millis(20));
        }

        // The whole exchange runs on one runtime thread; a send that blocks would stop it, so a
        // watchdog turns a freeze into a failure instead of a hung test.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let outcome = rt.block_on(async {
                let ticks = Arc::new(AtomicUsize::new(0));
                let ticker = tokio::spawn({
                    let ticks = ticks.clone();
                    async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            ticks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                let started = Instant::now();
                // Several times what the socket buffer holds (about 170 such frames).
                let tasks: Vec<_> = (0..600)
                    .map(|i| {
                        let client = client.clone();
                        tokio::spawn(async move {
                            let (h, a, b) = handoff(i);
                            let t = Instant::now();
                            (client.handoff(h, a, b).await, t.elapsed())
                        })
                    })
                    .collect();
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await.unwrap());
                }
                let elapsed = started.elapsed();
                let t = Instant::now();
                let stats = client.stats().await;
                let stats_took = t.elapsed();
                let end = client.end_session("session-0", EndReason::AdminKill);
                ticker.abort();
                (results, elapsed, ticks.load(Ordering::Relaxed), stats, stats_took, end)
            });
            let _ = done.send(outcome);
        });
        let (results, elapsed, ticks, stats, stats_took, end) =
            finished.recv_timeout(Duration::from_secs(30)).expect("control froze on a dataplane that stopped reading");
        let _ = stop.send(());
        fake.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        // Nothing was taken (nothing was acknowledged), and each caller got its answer in time.
        assert!(results.iter().all(|(r, _)| r.is_err()), "a handoff succeeded without an ack");
        let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
        assert!(slowest < SEND_DEADLINE + Duration::from_secs(6), "a handoff took {slowest:?}");
        let stuck = results.iter().filter(|(r, _)| matches!(r, Err(DataplaneError::Stuck { .. }))).count();
        assert!(stuck >= 1, "no send hit the deadline: {:?}", &results[results.len() - 3..]);
        // The runtime kept running meanwhile: the ticker saw most of its 50 ms ticks.
        let expected = (elapsed.as_millis() / 50) as usize;
        assert!(ticks * 2 >= expected, "{ticks} ticks in {elapsed:?}");
        assert!(stats.is_err() && stats_took < SEND_DEADLINE + Duration::from_secs(3), "{stats:?} {stats_took:?}");
        assert!(
            matches!(end, Err(DataplaneError::NotConnected)),
            "the link to the stuck dataplane was dropped: {end:?}"
        );
    }
}
