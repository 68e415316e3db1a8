//! The dataplane process's side of the link: accepts control, takes handed-off sessions onto the
//! workers, and reports every session end back.
//!
//! Sessions belong to the workers, not to the link: when control goes away (a restart, a crash)
//! sessions keep flowing, end reports queue up, and the next control to connect receives them and
//! can ask which sessions are still live.
//!
//! A data plane can also be replaced without ending its sessions (an upgrade, a restart): the new
//! process ([`Predecessor::connect`], [`Server::take_over`]) asks the running one for them, and
//! the running one passes each live session on, sockets, pipes, buffered bytes, TLS state and
//! counters included, then its queued reports, then exits (see the handoff module's takeover
//! section). The peers of a session notice nothing but a pause of a few milliseconds.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sluice_handoff::handoff::{
    DirPath, EndReason, Handoff, LegCrypto, Message, Resume, Role, SessionEnded, SessionStats,
};
use sluice_handoff::link::{Link, LinkError, Listener};
use thiserror::Error;
use tracing::{error, info, warn};

use crate::counters::SessionCounting;
use crate::relay::{MovedSession, RelayOptions, Report, Session, Worker};

/// End reports kept while no control is connected; beyond this the oldest are dropped (and
/// logged), so a long control outage cannot grow memory without bound.
const MAX_PENDING_REPORTS: usize = 100_000;

/// Why a session handed over by control, or passed on by a predecessor, was not taken. Its text
/// is the reason in the `HandoffAck` (a string on the wire).
#[derive(Debug, Error)]
enum TakeError {
    #[error("this data plane is passing its sessions to a successor")]
    HandingOver,
    #[error("a handoff needs 2 descriptors, got {0}")]
    HandoffDescriptors(usize),
    #[error("a resumed session needs {needs} descriptors, got {got}")]
    ResumeDescriptors { needs: usize, got: usize },
    /// What the frame names but the descriptors lack: its sockets, pipes or buffered bytes.
    #[error("a resumed session came without its {0}")]
    Missing(&'static str),
    #[error("a resumed session claims {0} buffered bytes")]
    TooMuchHeld(u64),
    #[error("reading a resumed session's buffered bytes: {0}")]
    ReadHeld(#[source] std::io::Error),
    #[error("{leg} descriptor: {source}")]
    Fstat {
        leg: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{0} descriptor is not a socket")]
    NotASocket(&'static str),
    #[error("worker {worker}: {source}")]
    Worker {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why a session could not be passed to a successor (it stays here).
#[derive(Debug, Error)]
enum PassOnError {
    #[error("memfd_create: {0}")]
    Memfd(#[source] nix::Error),
    #[error("making an empty pipe for an idle spliced direction: {0}")]
    Pipe(#[source] nix::Error),
    #[error("writing the held bytes: {0}")]
    WriteHeld(#[source] std::io::Error),
    #[error("{got} descriptors for a frame that names {named}")]
    Descriptors { got: usize, named: usize },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the successor refused: {0}")]
    Refused(String),
    #[error("unexpected answer {0:?}")]
    Unexpected(Box<Message>),
}

struct Shared {
    workers: Vec<Worker>,
    next_worker: AtomicUsize,
    /// The control connection that receives reports (the most recent one).
    control: Mutex<Option<Link>>,
    pending: Mutex<VecDeque<SessionEnded>>,
    counting: SessionCounting,
    path: PathBuf,
    /// Live sessions' metadata (their crypto left out), for passing them to a successor.
    meta: Mutex<HashMap<String, Handoff>>,
    /// A successor is taking the sessions: handoffs are refused.
    handing_over: AtomicBool,
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
        let shared = Shared::start(path, workers, options, counting)?;
        info!(path = %path.display(), workers = shared.workers.len(), "dataplane listening for control");
        Ok(Server { listener, shared, path: path.to_path_buf() })
    }

    /// Takes every live session of the data plane behind `predecessor` onto new workers, then
    /// serves `path` in its place. Returns the server and how many sessions it took.
    pub fn take_over(
        path: &Path,
        predecessor: Predecessor,
        workers: usize,
        options: RelayOptions,
        counting: SessionCounting,
    ) -> Result<(Server, usize), LinkError> {
        let shared = Shared::start(path, workers, options, counting)?;
        let link = predecessor.link;
        let mut taken = 0;
        loop {
            match link.recv() {
                Ok((Message::Resume(r), fds)) => {
                    let session_id = r.handoff.session_id.clone();
                    let error = match shared.resume(*r, fds) {
                        Ok(()) => {
                            taken += 1;
                            None
                        }
                        Err(e) => {
                            error!(session_id = %session_id, error = %e, "could not resume a session");
                            Some(e.to_string())
                        }
                    };
                    if let Err(e) = link.send(&Message::HandoffAck { session_id, error }, &[]) {
                        warn!(error = %e, "acknowledging a resumed session");
                    }
                }
                Ok((Message::SessionEnded(e), _)) => shared.queue(e),
                Ok((Message::TakeoverDone, _)) => break,
                Ok((other, _)) => warn!(?other, "unexpected frame from the predecessor; ignored"),
                Err(e) => {
                    error!(error = %e, "the predecessor's link failed before it passed everything on");
                    break;
                }
            }
        }
        // The predecessor exits once the link closes; it unlinked the socket path already.
        drop(link);
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match Listener::bind(path) {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        info!(path = %path.display(), sessions = taken, "took over the sessions; listening for control");
        Ok((Server { listener, shared, path: path.to_path_buf() }, taken))
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

/// The running data plane, as seen by the process replacing it: connected, and ready to pass its
/// sessions on (its BPF program links pinned for [`SessionCounting::start_opts`] to adopt).
pub struct Predecessor {
    link: Link,
    pub pid: u32,
}

impl Predecessor {
    pub fn connect(path: &Path) -> Result<Predecessor, LinkError> {
        let link = Link::connect(path)?;
        let pid = link.hello(Role::Successor)?;
        Ok(Predecessor { link, pid })
    }
}

impl Shared {
    fn start(
        path: &Path,
        workers: usize,
        options: RelayOptions,
        counting: SessionCounting,
    ) -> Result<Arc<Shared>, LinkError> {
        let (tx, rx) = mpsc::channel::<Report>();
        let workers =
            (0..workers.max(1)).map(|i| Worker::spawn_with(i, tx.clone(), options)).collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            workers,
            next_worker: AtomicUsize::new(0),
            control: Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            counting,
            path: path.to_path_buf(),
            meta: Mutex::new(HashMap::new()),
            handing_over: AtomicBool::new(false),
        });
        let reporter = shared.clone();
        std::thread::Builder::new().name("sluice-dp-reports".into()).spawn(move || {
            for r in rx {
                reporter.report(r);
            }
        })?;
        Ok(shared)
    }

    /// Keeps a report for the next control (a predecessor's, passed on at a takeover).
    fn queue(&self, ended: SessionEnded) {
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING_REPORTS {
            if let Some(dropped) = pending.pop_front() {
                warn!(session_id = %dropped.session_id, "report queue full; dropped the oldest report");
            }
        }
        pending.push_back(ended);
    }

    fn report(&self, r: Report) {
        lock(&self.meta).remove(&r.id);
        let counters = self.counting.finish(&r.id, r.wire);
        let ended = SessionEnded {
            session_id: r.id,
            bytes_client_to_upstream: r.bytes_client_to_upstream,
            bytes_upstream_to_client: r.bytes_upstream_to_client,
            duration_ms: r.duration.as_millis() as u64,
            reason: r.reason,
            counters: Some(counters),
            ktls: Some((r.client_ktls, r.upstream_ktls)),
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
        drop(control);
        self.queue(ended);
    }

    fn serve(&self, link: Link) {
        let role = match link.recv_hello() {
            Ok((role @ (Role::Control | Role::Admin), pid)) => {
                info!(peer_pid = pid, ?role, "control connected");
                if role == Role::Control {
                    self.counting.check_peer_cgroup(pid);
                }
                role
            }
            Ok((Role::Successor, pid)) => return self.hand_over(link, pid),
            Ok((role, pid)) => {
                warn!(peer_pid = pid, ?role, "a peer introduced itself as neither control nor a successor; closing");
                return;
            }
            Err(e) => {
                warn!(error = %e, "control connection failed before Hello");
                return;
            }
        };
        if let Err(e) = link.answer_hello() {
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
                let error = self.take(*h, fds).err().map(|e| {
                    warn!(session_id = %session_id, error = %e, "refused a handoff");
                    e.to_string()
                });
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
                let session_ids = self.workers.iter().flat_map(Worker::sessions).collect();
                return self.answer_in_parts(link, Message::Sessions { session_ids, more: false });
            }
            Message::StatsRequest => {
                let sessions = self
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
                    .collect();
                return self.answer_in_parts(link, Message::Stats { sessions, more: false });
            }
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

    /// Sends a reply that grows with the number of sessions, in as many frames as it takes.
    fn answer_in_parts(&self, link: &Link, reply: Message) {
        match link.send_reply(reply) {
            Ok(left_out) => {
                for id in left_out {
                    warn!(session_id_len = id.len(), "a session id too long for any frame was left out of a reply");
                }
            }
            Err(e) => warn!(error = %e, "answering control"),
        }
    }

    fn take(&self, h: Handoff, fds: Vec<OwnedFd>) -> Result<(), TakeError> {
        if self.handing_over.load(Ordering::SeqCst) {
            return Err(TakeError::HandingOver);
        }
        let [client, upstream]: [OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<OwnedFd>| TakeError::HandoffDescriptors(v.len()))?;
        check_sockets(&client, &upstream)?;
        // Counting starts before the first byte can move.
        self.counting.register(&h.session_id, client.as_fd(), upstream.as_fd());
        let (meta, session) = split(h, client, upstream);
        let (id, user, db) = (meta.session_id.clone(), meta.user.clone(), meta.db_service.clone());
        let i = self.place(meta, |w| w.add(session))?;
        info!(session_id = %id, user = ?user, db = ?db, worker = i, "session taken over");
        Ok(())
    }

    /// Gives a session to the next worker (round robin) with `give`, keeping its metadata while
    /// it lives; returns the worker's index.
    fn place(&self, meta: Handoff, give: impl FnOnce(&Worker) -> std::io::Result<()>) -> Result<usize, TakeError> {
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let id = meta.session_id.clone();
        lock(&self.meta).insert(id.clone(), meta);
        give(&self.workers[i]).map_err(|source| {
            self.counting.finish(&id, [[0; 2]; 2]);
            lock(&self.meta).remove(&id);
            TakeError::Worker { worker: i, source }
        })?;
        Ok(i)
    }

    /// Takes a session a predecessor passed on (see [`Server::take_over`]).
    fn resume(&self, r: Resume, fds: Vec<OwnedFd>) -> Result<(), TakeError> {
        if fds.len() != r.fd_count() {
            return Err(TakeError::ResumeDescriptors { needs: r.fd_count(), got: fds.len() });
        }
        let mut fds = fds.into_iter();
        let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
            return Err(TakeError::Missing("sockets"));
        };
        check_sockets(&client, &upstream)?;
        let mut pipes = Vec::new();
        for _ in r.dirs.iter().filter(|d| d.path == DirPath::Splice) {
            let (Some(rd), Some(wr)) = (fds.next(), fds.next()) else {
                return Err(TakeError::Missing("pipes"));
            };
            pipes.push(Some([rd, wr]));
        }
        // Two record-path directions hold at most an input and an output buffer each; checked
        // before allocating what the frame claims.
        if r.held_bytes() > crate::relay::MAX_HELD_BYTES {
            return Err(TakeError::TooMuchHeld(r.held_bytes()));
        }
        let mut held = vec![0u8; r.held_bytes() as usize];
        if !held.is_empty() {
            let memfd = fds.next().ok_or(TakeError::Missing("buffered bytes"))?;
            std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(memfd), &mut held, 0)
                .map_err(TakeError::ReadHeld)?;
        }
        self.counting.resume(&r.handoff.session_id, r.baseline, client.as_fd(), upstream.as_fd());
        let (meta, session) = split(r.handoff, client, upstream);
        let (id, user, db) = (meta.session_id.clone(), meta.user.clone(), meta.db_service.clone());
        let moved = MovedSession {
            session,
            kernel_tls: r.kernel_tls,
            age: Duration::from_millis(r.age_ms),
            idle: Duration::from_millis(r.idle_ms),
            wire: r.wire,
            first_close: r.first_close,
            dirs: r.dirs,
            pipes,
            held,
        };
        let i = self.place(meta, |w| w.resume(moved))?;
        info!(session_id = %id, user = ?user, db = ?db, worker = i, "session resumed from the predecessor");
        Ok(())
    }

    /// Passes every live session and queued report to a successor on `link`, then exits the
    /// process (its sessions are the successor's now; nothing of them may be closed here).
    fn hand_over(&self, link: Link, pid: u32) {
        if self.handing_over.swap(true, Ordering::SeqCst) {
            warn!(successor_pid = pid, "a second successor asked for the sessions; refused");
            return;
        }
        info!(successor_pid = pid, "a successor is taking over the sessions");
        // Before answering: the successor loads its counters right after our Hello, and must find
        // the programs' links to adopt.
        self.counting.pin_for_successor();
        if let Err(e) = link.answer_hello() {
            error!(error = %e, "answering the successor's Hello; keeping the sessions");
            self.handing_over.store(false, Ordering::SeqCst);
            return;
        }
        // New controls wait for the successor's socket; the current one reconnects there. From
        // here on, end reports go to the successor, which hands them to control.
        let _ = std::fs::remove_file(&self.path);
        {
            let mut control = lock(&self.control);
            if let Some(c) = control.take() {
                c.shutdown();
            }
            *control = link.try_clone().ok();
        }
        let _ = link.set_read_timeout(Some(Duration::from_secs(10)));
        let mut passed = 0;
        for w in &self.workers {
            for e in w.export() {
                let id = e.session.id.clone();
                match self.pass_on(&link, e) {
                    Ok(()) => passed += 1,
                    Err(err) => error!(session_id = %id, error = %err, "passing a session to the successor failed"),
                }
            }
        }
        let queued: Vec<SessionEnded> = lock(&self.pending).drain(..).collect();
        for e in queued {
            if let Err(err) = link.send(&Message::SessionEnded(e), &[]) {
                error!(error = %err, "passing a queued report to the successor failed");
            }
        }
        // Reports of sessions that ended during the export are on their way to the successor
        // through the reporter thread; give it a moment.
        std::thread::sleep(Duration::from_millis(100));
        if let Err(e) = link.send(&Message::TakeoverDone, &[]) {
            error!(error = %e, "telling the successor the takeover is done");
        }
        // Exit once the successor has read everything (it closes the link).
        let _ = link.set_read_timeout(Some(Duration::from_secs(5)));
        while link.recv().is_ok() {}
        info!(sessions = passed, "sessions passed to the successor; exiting");
        std::process::exit(0);
    }

    fn pass_on(&self, link: &Link, e: MovedSession) -> Result<(), PassOnError> {
        let MovedSession { session, kernel_tls, age, idle, wire, first_close, dirs, pipes, held } = e;
        let Session { id, client, upstream, client_crypto, upstream_crypto, .. } = session;
        // Always there (kept from the handoff until the report); without it the session still
        // goes on, nameless, rather than being closed here.
        let meta = lock(&self.meta).remove(&id).unwrap_or_else(|| Handoff {
            session_id: id.clone(),
            user: String::new(),
            db_service: String::new(),
            db_user: String::new(),
            db_name: String::new(),
            not_after: 0,
            idle_timeout_ms: 0,
            client: LegCrypto::Plain,
            upstream: LegCrypto::Plain,
        });
        let resume = Resume {
            handoff: Handoff { client: client_crypto, upstream: upstream_crypto, ..meta },
            kernel_tls,
            age_ms: age.as_millis() as u64,
            idle_ms: idle.as_millis() as u64,
            wire,
            first_close,
            dirs,
            baseline: self.counting.pass_on(&id),
        };
        // The frame carries a pipe for every spliced direction; one that held no bytes (and so
        // no pipe) gets an empty one, made for the frame and closed after it, which a successor
        // closes too (older ones use it as the direction's pipe).
        let pipes = pipes
            .into_iter()
            .map(|p| match p {
                Some(p) => Ok(p),
                None => {
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|(r, w)| [r, w]).map_err(PassOnError::Pipe)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut fds: Vec<RawFd> = vec![client.as_raw_fd(), upstream.as_raw_fd()];
        fds.extend(pipes.iter().flat_map(|[r, w]| [r.as_raw_fd(), w.as_raw_fd()]));
        let memfd = if held.is_empty() {
            None
        } else {
            let fd = nix::sys::memfd::memfd_create(c"sluice-held", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(PassOnError::Memfd)?;
            let file = std::fs::File::from(fd);
            std::io::Write::write_all(&mut &file, &held).map_err(PassOnError::WriteHeld)?;
            Some(file)
        };
        if let Some(f) = &memfd {
            fds.push(f.as_raw_fd());
        }
        if fds.len() != resume.fd_count() {
            return Err(PassOnError::Descriptors { got: fds.len(), named: resume.fd_count() });
        }
        link.send(&Message::Resume(Box::new(resume)), &fds)?;
        // Our copies close when this returns; the successor holds its own now.
        match link.recv() {
            Ok((Message::HandoffAck { error: None, .. }, _)) => Ok(()),
            Ok((Message::HandoffAck { error: Some(err), .. }, _)) => Err(PassOnError::Refused(err)),
            Ok((other, _)) => Err(PassOnError::Unexpected(Box::new(other))),
            Err(err) => Err(err.into()),
        }
    }
}

fn check_sockets(client: &OwnedFd, upstream: &OwnedFd) -> Result<(), TakeError> {
    for (name, fd) in [("client", client), ("upstream", upstream)] {
        let st = nix::sys::stat::fstat(fd).map_err(|source| TakeError::Fstat { leg: name, source })?;
        if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode).intersection(nix::sys::stat::SFlag::S_IFMT)
            != nix::sys::stat::SFlag::S_IFSOCK
        {
            return Err(TakeError::NotASocket(name));
        }
    }
    Ok(())
}

/// A handed-over session's metadata, its keys left out (the worker holds them, and knows the
/// sequence numbers reached), and the session for a worker.
fn split(h: Handoff, client: OwnedFd, upstream: OwnedFd) -> (Handoff, Session) {
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
    (Handoff { client: LegCrypto::Plain, upstream: LegCrypto::Plain, ..h }, session)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only sockets are taken; the refusal names the leg (its text travels to control as is).
    #[test]
    fn descriptors_that_are_not_sockets_are_refused_by_leg() {
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        let sock = OwnedFd::from(sock);
        assert!(check_sockets(&sock, &sock).is_ok());
        let refused = check_sockets(&sock, &rd).unwrap_err();
        assert!(matches!(refused, TakeError::NotASocket("upstream")), "{refused:?}");
        assert_eq!(refused.to_string(), "upstream descriptor is not a socket");
        assert_eq!(check_sockets(&rd, &sock).unwrap_err().to_string(), "client descriptor is not a socket");
    }
}
