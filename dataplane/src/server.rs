//! The dataplane process's side of the link: accepts control, takes handed-off sessions onto the
//! workers, and reports every session end back.
//!
//! Sessions belong to the workers, not to the link: when control goes away (a restart, a crash)
//! sessions keep flowing, end reports queue up, and the next control to connect receives them and
//! can ask which sessions are still live.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::counters::SessionCounting;
use crate::handoff::{EndReason, Handoff, Message, Role, SessionEnded, SessionStats};
use crate::link::{Link, LinkError, Listener};
use crate::relay::{RelayOptions, Report, Session, Worker};

/// End reports kept while no control is connected; beyond this the oldest are dropped (and
/// logged), so a long control outage cannot grow memory without bound.
const MAX_PENDING_REPORTS: usize = 100_000;

struct Shared {
    workers: Vec<Worker>,
    next_worker: AtomicUsize,
    /// The control connection that receives reports (the most recent one).
    control: Mutex<Option<Link>>,
    pending: Mutex<VecDeque<SessionEnded>>,
    counting: SessionCounting,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Server {
    /// Binds the control socket and starts `workers` relay workers; sessions are counted by
    /// `counting`.
    pub fn start(path: &Path, workers: usize, counting: SessionCounting) -> Result<Server, LinkError> {
        Self::start_with(path, workers, RelayOptions::default(), counting)
    }

    pub fn start_with(
        path: &Path,
        workers: usize,
        options: RelayOptions,
        counting: SessionCounting,
    ) -> Result<Server, LinkError> {
        let listener = Listener::bind(path)?;
        let (tx, rx) = mpsc::channel::<Report>();
        let workers =
            (0..workers.max(1)).map(|i| Worker::spawn_with(i, tx.clone(), options)).collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            workers,
            next_worker: AtomicUsize::new(0),
            control: Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            counting,
        });
        let reporter = shared.clone();
        std::thread::Builder::new().name("sluice-dp-reports".into()).spawn(move || {
            for r in rx {
                reporter.report(r);
            }
        })?;
        info!(path = %path.display(), workers = shared.workers.len(), "dataplane listening for control");
        Ok(Server { listener, shared, path: path.to_path_buf() })
    }

    /// Serves control connections until the process is stopped.
    pub fn serve(&self) {
        loop {
            match self.listener.accept() {
                Ok(link) => {
                    let shared = self.shared.clone();
                    let spawned =
                        std::thread::Builder::new().name("sluice-dp-control".into()).spawn(move || shared.serve(link));
                    if let Err(e) = spawned {
                        warn!(error = %e, "could not start a control connection thread");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "refused a control connection");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Ends every session (reason WorkerShutdown), waits up to 2 s for their legs to close and
    /// their reports to go out, and removes the socket file.
    pub fn shutdown(&self) {
        let _ = std::fs::remove_file(&self.path);
        for w in &self.shared.workers {
            for id in w.sessions() {
                w.end(&id, EndReason::WorkerShutdown);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline && self.shared.workers.iter().any(|w| !w.sessions().is_empty()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Reports travel through a channel to the reporter thread; let it drain.
        std::thread::sleep(Duration::from_millis(100));
        self.shared.counting.unpin_if_empty();
    }

    /// Entries in the BPF counters map (0 with userspace counters): the live sessions' legs.
    pub fn counter_map_entries(&self) -> usize {
        self.shared.counting.map_entries()
    }
}

impl Shared {
    fn report(&self, r: Report) {
        let counters = self.counting.finish(&r.id, r.wire);
        let ended = SessionEnded {
            session_id: r.id,
            bytes_client_to_upstream: r.bytes_client_to_upstream,
            bytes_upstream_to_client: r.bytes_upstream_to_client,
            duration_ms: r.duration.as_millis() as u64,
            reason: r.reason,
            counters: Some(counters),
        };
        info!(
            session_id = %ended.session_id,
            reason = ?ended.reason,
            bytes_client_to_upstream = ended.bytes_client_to_upstream,
            bytes_upstream_to_client = ended.bytes_upstream_to_client,
            counters_source = ?counters.source,
            client_rx_bytes = counters.client.rx_bytes,
            client_tx_bytes = counters.client.tx_bytes,
            upstream_rx_bytes = counters.upstream.rx_bytes,
            upstream_tx_bytes = counters.upstream.tx_bytes,
            client_srtt_us = counters.client.srtt_us,
            retransmits = counters.client.total_retrans + counters.upstream.total_retrans,
            "session ended"
        );
        let mut control = lock(&self.control);
        if let Some(link) = control.as_ref() {
            match link.send(&Message::SessionEnded(ended.clone()), &[]) {
                Ok(()) => return,
                Err(e) => {
                    warn!(error = %e, "control link failed; queueing reports until control reconnects");
                    *control = None;
                }
            }
        }
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING_REPORTS {
            if let Some(dropped) = pending.pop_front() {
                warn!(session_id = %dropped.session_id, "report queue full; dropped the oldest report");
            }
        }
        pending.push_back(ended);
    }

    fn serve(&self, link: Link) {
        let role = match link.recv() {
            Ok((Message::Hello { role: role @ (Role::Control | Role::Admin), pid }, _)) => {
                info!(peer_pid = pid, ?role, "control connected");
                role
            }
            Ok((other, _)) => {
                warn!(?other, "first frame from a peer was not a control Hello; closing");
                return;
            }
            Err(e) => {
                warn!(error = %e, "control connection failed before Hello");
                return;
            }
        };
        if let Err(e) = link.send(&Message::Hello { role: Role::Dataplane, pid: std::process::id() }, &[]) {
            warn!(error = %e, "answering control's Hello");
            return;
        }
        // The daemon becomes the report sink, receiving what queued up while none was connected.
        match link.try_clone().map(|clone| (clone, role == Role::Control)) {
            Ok((_, false)) => {}
            Ok((clone, true)) => {
                let mut control = lock(&self.control);
                let mut pending = lock(&self.pending);
                while let Some(r) = pending.pop_front() {
                    if let Err(e) = clone.send(&Message::SessionEnded(r.clone()), &[]) {
                        warn!(error = %e, "delivering queued reports");
                        pending.push_front(r);
                        return;
                    }
                }
                *control = Some(clone);
            }
            Err(e) => warn!(error = %e, "cloning the control link; reports will queue"),
        }
        loop {
            match link.recv() {
                Ok((msg, fds)) => self.handle(&link, msg, fds),
                Err(LinkError::Closed) => {
                    info!("control disconnected; sessions keep flowing");
                    return;
                }
                Err(LinkError::Protocol(e)) => {
                    // A frame we cannot parse means the peer is not speaking our protocol; drop
                    // the link, never the sessions.
                    warn!(error = %e, "bad frame from control; closing the link");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "control link failed");
                    return;
                }
            }
        }
    }

    fn handle(&self, link: &Link, msg: Message, fds: Vec<OwnedFd>) {
        let reply = match msg {
            Message::Handoff(h) => {
                let session_id = h.session_id.clone();
                let error = self.take(*h, fds).err();
                if let Some(e) = &error {
                    warn!(session_id = %session_id, error = %e, "refused a handoff");
                }
                Some(Message::HandoffAck { session_id, error })
            }
            Message::EndSession { session_id, reason } => {
                info!(session_id = %session_id, ?reason, "ending session on control's request");
                for w in &self.workers {
                    w.end(&session_id, reason);
                }
                None
            }
            Message::ListSessions => {
                Some(Message::Sessions { session_ids: self.workers.iter().flat_map(Worker::sessions).collect() })
            }
            Message::StatsRequest => Some(Message::Stats {
                sessions: self
                    .workers
                    .iter()
                    .flat_map(Worker::session_bytes)
                    .map(|b| SessionStats {
                        counters: Some(self.counting.snapshot(&b.id, b.wire)),
                        session_id: b.id,
                        bytes_client_to_upstream: b.client_to_upstream,
                        bytes_upstream_to_client: b.upstream_to_client,
                        duration_ms: b.duration.as_millis() as u64,
                    })
                    .collect(),
            }),
            other => {
                warn!(?other, "unexpected frame from control; ignored");
                None
            }
        };
        if let Some(reply) = reply {
            if let Err(e) = link.send(&reply, &[]) {
                warn!(error = %e, "answering control");
            }
        }
    }

    fn take(&self, h: Handoff, fds: Vec<OwnedFd>) -> Result<(), String> {
        let [client, upstream]: [OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<OwnedFd>| format!("a handoff needs 2 descriptors, got {}", v.len()))?;
        for (name, fd) in [("client", &client), ("upstream", &upstream)] {
            let st = nix::sys::stat::fstat(fd).map_err(|e| format!("{name} descriptor: {e}"))?;
            if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode).intersection(nix::sys::stat::SFlag::S_IFMT)
                != nix::sys::stat::SFlag::S_IFSOCK
            {
                return Err(format!("{name} descriptor is not a socket"));
            }
        }
        let not_after = (h.not_after > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(h.not_after as u64));
        let idle_timeout = (h.idle_timeout_ms > 0).then(|| Duration::from_millis(h.idle_timeout_ms));
        let session = Session {
            id: h.session_id.clone(),
            client,
            upstream,
            client_crypto: h.client,
            upstream_crypto: h.upstream,
            idle_timeout,
            not_after,
        };
        // Counting starts before the first byte can move.
        self.counting.register(&h.session_id, session.client.as_fd(), session.upstream.as_fd());
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        if let Err(e) = self.workers[i].add(session) {
            self.counting.finish(&h.session_id, [[0; 2]; 2]);
            return Err(format!("worker {i}: {e}"));
        }
        info!(session_id = %h.session_id, user = %h.user, db = %h.db_service, worker = i, "session taken over");
        Ok(())
    }
}
