//! Control's side of the data-plane link: hands authenticated sessions (both sockets, the TLS
//! secrets rustls extracted, the session's metadata) to a `dataplane` process, and turns its end
//! reports into `db.session.end` audit events.
//!
//! The link lives on its own thread (blocking SEQPACKET IO); it reconnects when the dataplane
//! restarts, and after every (re)connect it asks which sessions the dataplane still holds, so
//! sessions that outlived a control restart are audited by the new control, and sessions lost
//! with a dead dataplane are recorded as ended.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use sluice_dataplane::handoff::{EndReason, Handoff, LegCrypto, Message, Role, SessionEnded, SessionStats};
use sluice_dataplane::link::{Link, LinkError};
use tokio::sync::oneshot;
use tracing::{info, warn};

type Acks = Mutex<HashMap<String, oneshot::Sender<Option<String>>>>;

/// What control does with the dataplane's news.
pub trait Events: Send + Sync + 'static {
    /// A session ended in the dataplane.
    fn ended(&self, e: SessionEnded);
    /// The dataplane (re)connected and holds exactly `live` sessions; others it was given are gone.
    fn sync(&self, live: Vec<String>);
}

pub struct DataplaneClient {
    link: Mutex<Option<Link>>,
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
        loop {
            match self.connect(path) {
                Ok(reader) => {
                    info!(socket = %path.display(), "connected to the dataplane");
                    logged_down = false;
                    self.read(reader, events);
                    *lock(&self.link) = None;
                    for (_, ack) in lock(&self.acks).drain() {
                        let _ = ack.send(Some("dataplane link closed".into()));
                    }
                    // Dropping the senders tells the waiters the link closed.
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

    fn connect(&self, path: &std::path::Path) -> Result<Link, LinkError> {
        let link = Link::connect(path)?;
        link.set_read_timeout(Some(Duration::from_secs(5)))?;
        link.send(&Message::Hello { role: Role::Control, pid: std::process::id() }, &[])?;
        match link.recv()? {
            (Message::Hello { role: Role::Dataplane, .. }, _) => {}
            (other, _) => {
                warn!(?other, "dataplane answered Hello with something else");
                return Err(LinkError::Closed);
            }
        }
        link.set_read_timeout(None)?;
        let reader = link.try_clone()?;
        link.send(&Message::ListSessions, &[])?;
        *lock(&self.link) = Some(link);
        Ok(reader)
    }

    fn read(&self, link: Link, events: &dyn Events) {
        loop {
            match link.recv() {
                Ok((Message::HandoffAck { session_id, error }, _)) => {
                    if let Some(ack) = lock(&self.acks).remove(&session_id) {
                        let _ = ack.send(error);
                    }
                }
                Ok((Message::SessionEnded(e), _)) => events.ended(e),
                Ok((Message::Sessions { session_ids }, _)) => events.sync(session_ids),
                Ok((Message::Stats { sessions }, _)) => {
                    if let Some(waiter) = lock(&self.stats_waiters).pop_front() {
                        let _ = waiter.send(sessions);
                    }
                }
                Ok((other, _)) => warn!(?other, "unexpected frame from the dataplane"),
                Err(e) => {
                    warn!(error = %e, "dataplane link failed");
                    return;
                }
            }
        }
    }

    /// Hands a session over; `Ok` once the dataplane has taken it.
    pub async fn handoff(&self, h: Handoff, client: OwnedFd, upstream: OwnedFd) -> Result<(), String> {
        let id = h.session_id.clone();
        let (tx, rx) = oneshot::channel();
        lock(&self.acks).insert(id.clone(), tx);
        let sent = {
            let link = lock(&self.link);
            match link.as_ref() {
                // SEQPACKET sends of a few hundred bytes do not block in practice; the socket
                // buffer holds many frames.
                Some(l) => l.send(&Message::Handoff(Box::new(h)), &[client.as_raw_fd(), upstream.as_raw_fd()]),
                None => Err(LinkError::Closed),
            }
        };
        // Our copies close here; the dataplane holds its own.
        drop((client, upstream));
        if let Err(e) = sent {
            lock(&self.acks).remove(&id);
            return Err(format!("sending to the dataplane: {e}"));
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(e))) => Err(e),
            Ok(Err(_)) => Err("dataplane link closed before it answered".into()),
            Err(_) => {
                lock(&self.acks).remove(&id);
                Err("dataplane did not answer within 5 s".into())
            }
        }
    }

    /// Every live session's counters so far.
    pub async fn stats(&self) -> Result<Vec<SessionStats>, String> {
        let (tx, rx) = oneshot::channel();
        {
            // Queued under the link lock so waiters are in the order the requests are sent.
            let link = lock(&self.link);
            let l = link.as_ref().ok_or("dataplane is not connected")?;
            lock(&self.stats_waiters).push_back(tx);
            l.send(&Message::StatsRequest, &[]).map_err(|e| e.to_string())?;
        }
        // A late answer still goes to this (then dropped) waiter, keeping the queue in step.
        match tokio::time::timeout(Duration::from_secs(2), rx).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err("dataplane link closed before it answered".into()),
            Err(_) => Err("dataplane did not answer within 2 s".into()),
        }
    }

    /// Asks the dataplane to end a session (lock, expiry, admin kill).
    pub fn end_session(&self, id: &str, reason: EndReason) -> Result<(), String> {
        match lock(&self.link).as_ref() {
            Some(l) => {
                l.send(&Message::EndSession { session_id: id.to_owned(), reason }, &[]).map_err(|e| e.to_string())
            }
            None => Err("dataplane is not connected".into()),
        }
    }
}

/// Converts rustls' extracted secrets for one leg into the handoff's form.
pub fn leg_crypto(version: u16, cipher_suite: u16, s: ExtractedSecrets) -> Result<LegCrypto, String> {
    fn parts(s: ConnectionTrafficSecrets) -> Result<(Vec<u8>, Vec<u8>), String> {
        match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                Ok((key.as_ref().to_vec(), iv.as_ref().to_vec()))
            }
            _ => Err("negotiated cipher has no data-plane support".into()),
        }
    }
    let (tx_seq, tx) = s.tx;
    let (rx_seq, rx) = s.rx;
    let (tx_key, tx_iv) = parts(tx)?;
    let (rx_key, rx_iv) = parts(rx)?;
    Ok(LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq })
}
