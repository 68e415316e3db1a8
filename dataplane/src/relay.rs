//! Relay workers: after control authenticates a session it hands both connected sockets (client leg,
//! upstream leg) and each leg's TLS state to a [`Worker`], which moves the bytes until the session
//! ends and then sends one [`Report`].
//!
//! Each worker is one thread owning one io_uring. Plain legs, and TLS legs whose keys the kernel
//! took ([`crate::ktls`]), are spliced socket → pipe → socket inside the kernel; a direction that
//! reads or writes a TLS leg the kernel could not take goes through the userspace record layer
//! ([`crate::tls_record`]). So a session whose legs all have kTLS (or are plain) is pure splice, and
//! one with a single kTLS leg treats that leg as plain in the record path.
//!
//! Every operation is *poll first*: an idle session holds only `POLL_ADD`s, never a blocked io-wq
//! thread (`IORING_OP_SPLICE` always runs on one), a userspace buffer or a pipe. The process must
//! ignore SIGPIPE (Rust's runtime does), since a splice into a reset socket raises it on the io-wq
//! thread.
//!
//! Layout: this file is the thread-safe handle; `event_loop` the ring and session table; `splice`
//! and `record` the per-direction state machines; `ktls_rx` the non-data records of kTLS legs;
//! `pool` the shared buffer pool; `pipes` the pool of splice pipes.

mod event_loop;
mod ktls_rx;
mod pipes;
mod pool;
mod record;
mod splice;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::eventfd::{EfdFlags, EventFd};

use sluice_handoff::handoff::{DirState, EndReason, LegCrypto};

/// How a worker relays; fixed for the worker's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOptions {
    /// Offer TLS legs' keys to the kernel (kTLS) where it has it; `false` keeps every TLS leg on
    /// the userspace record path (to compare the two, or to avoid a kernel's kTLS bugs).
    pub ktls: bool,
    pub splice: SpliceIssue,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions { ktls: true, splice: SpliceIssue::Inline }
    }
}

/// Who performs a splice once POLL_ADD says its socket is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceIssue {
    /// `IORING_OP_SPLICE`. io_uring never runs a splice inline (io_uring/splice.c returns
    /// -EAGAIN to a non-blocking issue), so each one is a hand-off to an io-wq thread and back:
    /// cheap per byte for bulk data, but a thread wake-up per ~100-byte query message.
    IoUring,
    /// `splice(2)` with SPLICE_F_NONBLOCK from the worker thread itself, right after the poll
    /// completion, for message-sized traffic; once a splice moves 32 KiB or more (bulk data, or
    /// 8 in a row) the direction continues with IORING_OP_SPLICE. The bytes move socket → pipe →
    /// socket inside the kernel either way; only the thread hop per message goes.
    Inline,
}

/// A session handed to a worker: both connected sockets (TCP or Unix stream) and their crypto.
pub struct Session {
    pub id: String,
    pub client: OwnedFd,
    pub upstream: OwnedFd,
    pub client_crypto: LegCrypto,
    pub upstream_crypto: LegCrypto,
    /// Ends the session after this long without bytes moving in *either* direction.
    pub idle_timeout: Option<Duration>,
    /// Ends the session at this time (the client certificate's expiry).
    pub not_after: Option<SystemTime>,
}

/// The most bytes a session's record-path directions can hold when it is passed on: an input
/// and an output pool buffer each.
pub const MAX_HELD_BYTES: u64 = 4 * pool::BUF_SIZE as u64;

/// A live session on its way from one worker to another, usually in a successor process (see
/// [`sluice_handoff::handoff::Resume`]): [`Worker::export`] gives them, [`Worker::resume`] takes them.
/// The crypto in `session` has the sequence numbers the ciphers reached.
pub struct MovedSession {
    pub session: Session,
    /// `[client, upstream]`: bit 0 the kernel opens the leg's records, bit 1 it seals them.
    pub kernel_tls: [u8; 2],
    pub age: Duration,
    pub idle: Duration,
    pub wire: [[u64; 2]; 2],
    pub first_close: Option<EndReason>,
    pub dirs: [DirState; 2],
    /// Each spliced direction's pipe (`[read end, write end]`), in direction order: `None` where
    /// the direction held no bytes, and so no pipe (see `relay::pipes`).
    pub pipes: Vec<Option<[OwnedFd; 2]>>,
    /// The record-path directions' bytes, in direction order (see `RecordDir::resume`).
    pub held: Vec<u8>,
}

/// Sent exactly once per session when it has ended and both legs are closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub id: String,
    /// Application bytes (plaintext after TLS) delivered to the upstream.
    pub bytes_client_to_upstream: u64,
    /// Application bytes delivered to the client.
    pub bytes_upstream_to_client: u64,
    pub duration: Duration,
    pub reason: EndReason,
    /// The kernel sealed and opened the client leg's records (kTLS), both ways.
    pub client_ktls: bool,
    /// The kernel sealed and opened the upstream leg's records (kTLS), both ways.
    pub upstream_ktls: bool,
    /// `[client, upstream]` × `[rx, tx]`: bytes each leg's socket gave and took, from the
    /// relay's syscall results (splice, recv, send): TLS records on a userspace-TLS leg,
    /// plaintext on a kTLS leg (the kernel decrypts before splice sees the bytes).
    pub wire: [[u64; 2]; 2],
}

/// A live session's application bytes so far (the relay's own counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBytes {
    pub id: String,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// As [`Report::wire`].
    pub wire: [[u64; 2]; 2],
    /// Since the worker took the session.
    pub duration: Duration,
}

/// Counters the worker thread publishes for metrics and tests.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Pool buffers currently held by sessions (each `pool::BUF_SIZE` bytes).
    pub(crate) buffers_in_use: AtomicUsize,
    /// Buffers allocated and not yet freed, in use or idle in the pool.
    pub(crate) buffers_allocated: AtomicUsize,
    /// Legs handed to this worker whose TLS records the kernel protects both ways.
    pub(crate) ktls_legs: AtomicUsize,
    /// Non-data records (tickets, alerts, ...) read from kTLS legs.
    pub(crate) ktls_control_records: AtomicU64,
    /// Splice pipes held by directions with bytes in flight.
    pub(crate) pipes_in_use: AtomicUsize,
    /// Empty pipes kept for reuse.
    pub(crate) pipes_spare: AtomicUsize,
    /// Times a direction needed a pipe and none could be made (out of descriptors): it waited.
    pub(crate) pipe_waits: AtomicU64,
}

pub(crate) enum Command {
    Add(Box<event_loop::Prepared>, mpsc::SyncSender<io::Result<()>>),
    End(String, EndReason),
    List(mpsc::SyncSender<Vec<String>>),
    Bytes(mpsc::SyncSender<Vec<SessionBytes>>),
    /// Stop relaying, and pass every live session on (once none is still ending).
    Export(mpsc::SyncSender<Vec<MovedSession>>),
    Shutdown,
}

/// Handle to one relay worker thread; cheap to share (`&Worker` is `Sync`).
pub struct Worker {
    index: usize,
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    stats: Arc<Stats>,
    options: RelayOptions,
    thread: Option<JoinHandle<()>>,
}

// Control shares one handle between its connection tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Worker>();
};

impl Worker {
    /// Starts thread `sluice-dp-{index}` with its own io_uring; reports go to `reports`.
    pub fn spawn(index: usize, reports: mpsc::Sender<Report>) -> io::Result<Worker> {
        Self::spawn_with(index, reports, RelayOptions::default())
    }

    pub fn spawn_with(index: usize, reports: mpsc::Sender<Report>, options: RelayOptions) -> io::Result<Worker> {
        // Blocking on purpose: io_uring then waits on it with an internal poll, while a
        // non-blocking eventfd would make the READ fail with EAGAIN.
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(io::Error::from)?);
        let stats = Arc::new(Stats::default());
        let (commands, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (w, s) = (wake.clone(), stats.clone());
        let thread = std::thread::Builder::new().name(format!("sluice-dp-{index}")).spawn(move || {
            // The ring must be created by the thread that submits to it (single issuer).
            match event_loop::EventLoop::new(index, rx, w, reports, s, options.splice) {
                Ok(lp) => {
                    let _ = ready_tx.send(Ok(()));
                    lp.run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { index, commands, wake, stats, options, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("relay worker thread exited during start"))
            }
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Hands a session to the worker. Sockets are switched to non-blocking, the crypto state is
    /// checked and each TLS leg's keys are offered to the kernel (kTLS) here, so a bad handoff
    /// fails in the caller (for its HandoffAck) rather than later.
    /// A session whose `not_after` has passed is accepted and ends at once (CertExpired).
    /// Blocks until the worker thread has taken the session (one wake-up, microseconds), so a
    /// duplicate id is refused here and `sessions()` lists the session as soon as this returns.
    pub fn add(&self, s: Session) -> io::Result<()> {
        let prepared = event_loop::Prepared::new(s, Instant::now(), &self.stats, self.options.ktls)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Add(Box::new(prepared), tx))?;
        rx.recv().map_err(|_| gone())?
    }

    /// Takes a session over from a predecessor data plane, as it left it.
    pub fn resume(&self, r: MovedSession) -> io::Result<()> {
        let prepared = event_loop::Prepared::resume(r, &self.stats)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Add(Box::new(prepared), tx))?;
        rx.recv().map_err(|_| gone())?
    }

    /// Stops relaying and returns every live session, each at a point where no operation is in
    /// flight, with its sockets untouched (the peers notice nothing). Waits for sessions already
    /// ending to finish (their reports go out as usual). The worker takes no session after this.
    pub fn export(&self) -> Vec<MovedSession> {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.send(Command::Export(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Ends a session: both legs are shut down at once (the peers see EOF) and closed as soon as
    /// the session's in-flight operations complete; its Report carries `reason`. Unknown ids are
    /// ignored (the session may have just ended on its own).
    pub fn end(&self, id: &str, reason: EndReason) {
        let _ = self.send(Command::End(id.to_owned(), reason));
    }

    /// Ids of the live sessions (not those already ending).
    pub fn sessions(&self) -> Vec<String> {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.send(Command::List(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Bytes moved so far by each live session (not those already ending).
    pub fn session_bytes(&self) -> Vec<SessionBytes> {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.send(Command::Bytes(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Userspace buffers currently held by sessions: zero when every session is idle.
    pub fn buffers_in_use(&self) -> usize {
        self.stats.buffers_in_use.load(Ordering::Relaxed)
    }

    /// Buffers allocated by this worker, held by sessions or kept in its pool for reuse.
    pub fn buffers_allocated(&self) -> usize {
        self.stats.buffers_allocated.load(Ordering::Relaxed)
    }

    /// Splice pipes held right now, by directions with bytes on their way through: zero when
    /// every session is idle (an idle session holds no pipe).
    pub fn pipes_in_use(&self) -> usize {
        self.stats.pipes_in_use.load(Ordering::Relaxed)
    }

    /// Empty pipes the worker keeps for reuse (a few; the rest are closed).
    pub fn pipes_spare(&self) -> usize {
        self.stats.pipes_spare.load(Ordering::Relaxed)
    }

    /// Times a direction needed a pipe and none could be made (EMFILE, ENFILE); it waited and
    /// tried again rather than ending its session.
    pub fn pipe_waits(&self) -> u64 {
        self.stats.pipe_waits.load(Ordering::Relaxed)
    }

    /// TLS legs of the sessions added so far whose records the kernel protects (kTLS) both ways.
    pub fn ktls_legs(&self) -> usize {
        self.stats.ktls_legs.load(Ordering::Relaxed)
    }

    /// Non-application-data records (NewSessionTickets, close_notify, ...) read from kTLS legs.
    pub fn ktls_control_records(&self) -> u64 {
        self.stats.ktls_control_records.load(Ordering::Relaxed)
    }

    /// Ends every session (reason WorkerShutdown), waits for their reports to be sent and joins
    /// the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.send(Command::Shutdown);
            let _ = t.join();
        }
    }

    fn send(&self, c: Command) -> io::Result<()> {
        self.commands.send(c).map_err(|_| gone())?;
        self.wake.write(1).map_err(io::Error::from)?;
        Ok(())
    }
}

impl Drop for Worker {
    /// Dropping the handle shuts the worker down like [`Worker::shutdown`].
    fn drop(&mut self) {
        self.stop();
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "relay worker thread has exited")
}

/// Which socket of the session; resets on a leg are reported as that side closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    Client,
    Upstream,
}

impl Leg {
    fn closed(self) -> EndReason {
        match self {
            Leg::Client => EndReason::ClientClosed,
            Leg::Upstream => EndReason::UpstreamClosed,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Upstream => "upstream",
        }
    }
}

/// An operation a direction wants the ring to run next; pointers refer to a buffer the direction
/// owns and leaves untouched until the completion is handed back.
#[derive(Debug)]
pub(crate) enum Op {
    PollIn(std::os::fd::RawFd),
    PollOut(std::os::fd::RawFd),
    Splice { from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: u32 },
    Recv { fd: std::os::fd::RawFd, buf: *mut u8, len: u32 },
    Send { fd: std::os::fd::RawFd, buf: *const u8, len: u32 },
}

/// Why a direction stopped the session.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The leg's peer reset or went away (ECONNRESET, EPIPE, ...).
    Closed(Leg, i32),
    /// Protocol or local error; the message is logged with the session id.
    Error(String),
}

/// What a direction does next when it has no operation in flight.
#[derive(Debug)]
pub(crate) enum Step {
    Submit(Op),
    /// Source EOF relayed (close_notify sent if TLS, destination shut down for writing).
    Done,
    /// Bytes are waiting to be read but no pipe could be had (out of descriptors): ask again
    /// later, when a pipe may be free.
    WaitPipe(io::Error),
    Fail(Failure),
}

/// Errors that mean the peer of `leg` is gone rather than something being wrong locally.
fn failure_for(leg: Leg, errno: i32, what: &str) -> Failure {
    use nix::libc;
    match errno {
        libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN | libc::ECONNABORTED | libc::ETIMEDOUT | libc::ESHUTDOWN => {
            Failure::Closed(leg, errno)
        }
        _ => {
            Failure::Error(format!("{what} on the {} leg failed: {}", leg.name(), io::Error::from_raw_os_error(errno)))
        }
    }
}

/// Half-closes `fd` so its peer sees EOF; a peer already gone is not an error here.
fn shutdown_write(fd: std::os::fd::RawFd) {
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
