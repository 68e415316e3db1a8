//! The worker thread: one io_uring, the session table, and the rules that keep kernel operations
//! and the memory/descriptors they use consistent.
//!
//! Invariants that make the `unsafe` SQE pushes sound:
//! * each direction has at most one operation in flight, tracked in `Sess::busy`;
//! * a direction does not touch, move out or free the buffer an operation uses until that
//!   operation's completion has been handed back to it;
//! * a session (its descriptors, pipes and buffers) is dropped only when neither direction is
//!   busy, so no in-flight operation names a closed (and possibly reused) descriptor;
//! * ending a session shuts its sockets down (pending polls fire, peers see EOF at once) and
//!   cancels what is still in flight; the session is dropped when the last completion arrives;
//! * if the thread unwinds or gives up with operations still in flight, their memory is leaked,
//!   never freed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use io_uring::{opcode, squeue, types, IoUring};
use nix::libc;
use nix::sys::eventfd::EventFd;
use tracing::{debug, error, info, warn};

use super::ktls_rx::KtlsRx;
use super::pipes::PipePool;
use super::pool::Pool;
use super::record::RecordDir;
use super::splice::SpliceDir;
use super::{
    set_nonblocking, Command, Failure, Leg, MovedSession, Op, Report, Session, SessionBytes, SpliceIssue, Stats, Step,
};
use crate::ktls;
use crate::tls_record::{RecordDecrypter, RecordEncrypter, TLS13};
use sluice_handoff::handoff::{DirPath, DirState, EndReason, LegCrypto};

const RING_ENTRIES: u32 = 4096;
/// How often idle timeouts, certificate expiry and stuck endings are checked.
const TICK: Duration = Duration::from_millis(200);
/// io-wq threads only ever run non-blocking splices, so a few per worker are enough.
const MAX_UNBOUND_IOWQ_WORKERS: u32 = 4;
/// After this, an ending session's operations are cancelled again (they should finish at once).
const END_RECANCEL: Duration = Duration::from_secs(1);
/// At shutdown, operations still in flight after this are abandoned and their memory leaked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Splices one direction may run inline in a row before its next one goes through the ring, so
/// a session streaming bulk data cannot starve the others on this worker.
const INLINE_SPLICES: u32 = 8;
/// An inline splice that moves this much is bulk transfer, not a query message.
const INLINE_BULK_BYTES: u64 = 32 * 1024;
const WAKE_TOKEN: u64 = u64::MAX;
const CANCEL_TOKEN: u64 = u64::MAX - 1;

fn token(slot: u32, gen: u32, dir: usize) -> u64 {
    ((slot as u64) << 32) | (((gen & 0x00ff_ffff) as u64) << 8) | dir as u64
}

fn untoken(t: u64) -> (u32, u32, usize) {
    ((t >> 32) as u32, ((t >> 8) & 0x00ff_ffff) as u32, (t & 1) as usize)
}

enum Dir {
    Splice(SpliceDir),
    /// Boxed: its crypto state and buffers dwarf a splice direction.
    Record(Box<RecordDir>),
}

impl Dir {
    fn step(&mut self, pool: &mut Pool, pipes: &mut PipePool) -> Step {
        match self {
            Dir::Splice(d) => d.step(pipes),
            Dir::Record(d) => d.step(pool),
        }
    }
    fn complete(&mut self, res: i32) -> Result<u64, Failure> {
        match self {
            Dir::Splice(d) => d.complete(res),
            Dir::Record(d) => d.complete(res),
        }
    }
    fn release(&mut self, pool: &mut Pool, pipes: &mut PipePool) {
        match self {
            Dir::Splice(d) => d.release(pipes),
            Dir::Record(d) => d.release(pool),
        }
    }
    fn bytes(&self) -> u64 {
        match self {
            Dir::Splice(d) => d.bytes,
            Dir::Record(d) => d.bytes,
        }
    }
}

/// A session made ready in the caller's thread: sockets non-blocking, pipes made, keys loaded
/// (into the kernel where it has kTLS).
pub(crate) struct Prepared {
    id: String,
    client: OwnedFd,
    upstream: OwnedFd,
    /// `[client → upstream, upstream → client]`.
    dirs: [Dir; 2],
    /// `[client, upstream]`: the kernel protects the leg's records both ways.
    ktls: [bool; 2],
    idle_timeout: Option<Duration>,
    not_after: Option<SystemTime>,
    added: Instant,
    /// `[client, upstream]` as handed over (keys and the sequence numbers at that point).
    crypto: [LegCrypto; 2],
    /// `[client, upstream]`: bit 0 the kernel opens the leg's records, bit 1 it seals them.
    kernel_tls: [u8; 2],
    /// State a predecessor data plane passed on.
    resumed: Option<Resumed>,
}

struct Resumed {
    wire: [[u64; 2]; 2],
    first_close: Option<EndReason>,
    done: [bool; 2],
    idle: Duration,
}

impl Prepared {
    pub(crate) fn new(s: Session, added: Instant, stats: &Arc<Stats>, ktls: bool) -> io::Result<Prepared> {
        set_nonblocking(&s.client)?;
        set_nonblocking(&s.upstream)?;
        // Both legs' keys are checked before either goes to the kernel, so a bad handoff is refused
        // the same way with or without kTLS.
        let client_keys = keys(&s.client_crypto, "client")?;
        let upstream_keys = keys(&s.upstream_crypto, "upstream")?;
        let mut client = LegIo::new(&s.client, &s.client_crypto, client_keys, Leg::Client, stats, ktls);
        let mut upstream = LegIo::new(&s.upstream, &s.upstream_crypto, upstream_keys, Leg::Upstream, stats, ktls);
        let ktls = [client.ktls_both, upstream.ktls_both];
        let kernel_tls = [client.kernel_bits(), upstream.kernel_bits()];
        let (c, u) = (s.client.as_raw_fd(), s.upstream.as_raw_fd());
        let dirs = [
            direction(c, u, Leg::Client, Leg::Upstream, &mut client, &mut upstream)?,
            direction(u, c, Leg::Upstream, Leg::Client, &mut upstream, &mut client)?,
        ];
        Ok(Prepared {
            id: s.id,
            client: s.client,
            upstream: s.upstream,
            dirs,
            ktls,
            idle_timeout: s.idle_timeout,
            not_after: s.not_after,
            added,
            crypto: [s.client_crypto, s.upstream_crypto],
            kernel_tls,
            resumed: None,
        })
    }

    /// A session as a predecessor data plane left it: keys already in the kernel stay there,
    /// the others continue from the sequence numbers reached; pipes and buffered bytes are put
    /// back in their directions.
    pub(crate) fn resume(r: MovedSession, stats: &Arc<Stats>) -> io::Result<Prepared> {
        let s = r.session;
        set_nonblocking(&s.client)?;
        set_nonblocking(&s.upstream)?;
        let mut client = LegIo::resumed(&s.client_crypto, r.kernel_tls[0], r.dirs[0].ktls_hs_skip, "client", stats)?;
        let mut upstream =
            LegIo::resumed(&s.upstream_crypto, r.kernel_tls[1], r.dirs[1].ktls_hs_skip, "upstream", stats)?;
        let (c, u) = (s.client.as_raw_fd(), s.upstream.as_raw_fd());
        let mut pipes = r.pipes.into_iter();
        let mut held = &r.held[..];
        let dirs = [
            resumed_direction(
                (c, u, Leg::Client, Leg::Upstream),
                &mut client,
                &mut upstream,
                &r.dirs[0],
                &mut pipes,
                &mut held,
            )?,
            resumed_direction(
                (u, c, Leg::Upstream, Leg::Client),
                &mut upstream,
                &mut client,
                &r.dirs[1],
                &mut pipes,
                &mut held,
            )?,
        ];
        if pipes.next().is_some() || !held.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a resumed session came with state it does not use",
            ));
        }
        let now = Instant::now();
        Ok(Prepared {
            id: s.id,
            client: s.client,
            upstream: s.upstream,
            dirs,
            ktls: [client.ktls_both, upstream.ktls_both],
            idle_timeout: s.idle_timeout,
            not_after: s.not_after,
            added: now.checked_sub(r.age).unwrap_or(now),
            crypto: [s.client_crypto, s.upstream_crypto],
            kernel_tls: r.kernel_tls,
            resumed: Some(Resumed {
                wire: r.wire,
                first_close: r.first_close,
                done: [r.dirs[0].done, r.dirs[1].done],
                idle: r.idle,
            }),
        })
    }
}

/// One direction of a resumed session: spliced or record path as its legs' crypto dictates
/// (which must be what the predecessor used), taking its pipe or its bytes.
fn resumed_direction(
    (src_fd, dst_fd, src_leg, dst_leg): (RawFd, RawFd, Leg, Leg),
    src: &mut LegIo,
    dst: &mut LegIo,
    state: &DirState,
    pipes: &mut impl Iterator<Item = Option<[OwnedFd; 2]>>,
    held: &mut &[u8],
) -> io::Result<Dir> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    let (dec, enc, ktls_rx) = (src.dec.take(), dst.enc.take(), src.ktls_rx.take());
    Ok(if dec.is_none() && enc.is_none() {
        let pipe = pipes.next().ok_or_else(|| bad("a resumed spliced direction came without its pipe slot"))?;
        Dir::Splice(SpliceDir::resume(src_fd, dst_fd, src_leg, dst_leg, pipe, state)?.with_ktls(ktls_rx, dst.ktls_tx))
    } else {
        let n = state.held_in as usize + state.held_out as usize;
        if held.len() < n {
            return Err(bad("a resumed session's buffered bytes are short"));
        }
        let (mine, rest) = held.split_at(n);
        *held = rest;
        Dir::Record(Box::new(
            RecordDir::new(src_fd, dst_fd, src_leg, dst_leg, dec, enc, src.tls13)
                .with_ktls(ktls_rx, dst.ktls_tx)
                .resume(state, mine)?,
        ))
    })
}

/// How one leg's records are protected: in userspace (`dec`/`enc`), by the kernel (`ktls_*`), or
/// not at all (a plain leg, where everything is `None`/`false`).
struct LegIo {
    /// Opens what is read from the leg, unless the kernel does.
    dec: Option<RecordDecrypter>,
    /// Seals what is written to the leg, unless the kernel does.
    enc: Option<RecordEncrypter>,
    tls13: bool,
    /// The kernel opens what is read from the leg.
    ktls_rx: Option<KtlsRx>,
    /// The kernel seals what is written to the leg.
    ktls_tx: bool,
    ktls_both: bool,
}

impl LegIo {
    fn kernel_bits(&self) -> u8 {
        u8::from(self.ktls_rx.is_some()) | (u8::from(self.ktls_tx) << 1)
    }

    /// A leg of a resumed session: `kernel` (bit 0 rx, bit 1 tx) says which halves the kernel
    /// already holds; the rest get userspace ciphers at the handed-over sequence numbers.
    fn resumed(crypto: &LegCrypto, kernel: u8, hs_skip: u32, leg: &str, stats: &Arc<Stats>) -> io::Result<LegIo> {
        if kernel > 3 || (kernel != 0 && *crypto == LegCrypto::Plain) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{leg} leg: kernel TLS flags on a plain leg"),
            ));
        }
        let k = ktls::Installed { rx: kernel & 1 != 0, tx: kernel & 2 != 0 };
        Ok(Self::with_kernel(keys(crypto, leg)?, k, hs_skip as usize, stats))
    }

    fn new(fd: &OwnedFd, crypto: &LegCrypto, keys: Keys, leg: Leg, stats: &Arc<Stats>, ktls: bool) -> LegIo {
        let k = if ktls { ktls::install(fd.as_fd(), crypto, leg.name()) } else { ktls::Installed::default() };
        Self::with_kernel(keys, k, 0, stats)
    }

    /// The leg with the halves in `k` done by the kernel and the others by `keys`' ciphers.
    fn with_kernel((dec, enc, tls13): Keys, k: ktls::Installed, hs_skip: usize, stats: &Arc<Stats>) -> LegIo {
        LegIo {
            dec: if k.rx { None } else { dec },
            enc: if k.tx { None } else { enc },
            tls13,
            ktls_rx: k.rx.then(|| KtlsRx::new(tls13, stats.clone()).with_hs_skip(hs_skip)),
            ktls_tx: k.tx,
            ktls_both: k.tx && k.rx,
        }
    }
}

/// The direction `src → dst`: spliced when neither end needs userspace crypto, else record path.
fn direction(
    src_fd: RawFd,
    dst_fd: RawFd,
    src_leg: Leg,
    dst_leg: Leg,
    src: &mut LegIo,
    dst: &mut LegIo,
) -> io::Result<Dir> {
    let (dec, enc, ktls_rx) = (src.dec.take(), dst.enc.take(), src.ktls_rx.take());
    Ok(if dec.is_none() && enc.is_none() {
        Dir::Splice(SpliceDir::new(src_fd, dst_fd, src_leg, dst_leg).with_ktls(ktls_rx, dst.ktls_tx))
    } else {
        Dir::Record(Box::new(
            RecordDir::new(src_fd, dst_fd, src_leg, dst_leg, dec, enc, src.tls13).with_ktls(ktls_rx, dst.ktls_tx),
        ))
    })
}

/// `c` with the sequence numbers its userspace ciphers reached (`None`: the kernel holds that
/// half, or nothing used it; the handed-over number stands).
fn with_seqs(c: LegCrypto, rx: Option<u64>, tx: Option<u64>) -> LegCrypto {
    match c {
        LegCrypto::Plain => LegCrypto::Plain,
        LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq } => LegCrypto::Tls {
            version,
            cipher_suite,
            tx_key,
            tx_iv,
            tx_seq: tx.unwrap_or(tx_seq),
            rx_key,
            rx_iv,
            rx_seq: rx.unwrap_or(rx_seq),
        },
    }
}

/// The leg's (decrypter for what we read, encrypter for what we write, is TLS 1.3).
type Keys = (Option<RecordDecrypter>, Option<RecordEncrypter>, bool);

/// Builds the leg's userspace ciphers, which also validates the handed-over key material.
fn keys(c: &LegCrypto, leg: &str) -> io::Result<Keys> {
    match c {
        LegCrypto::Plain => Ok((None, None, false)),
        LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq } => {
            let bad = |e| io::Error::new(io::ErrorKind::InvalidInput, format!("{leg} leg TLS state: {e}"));
            let dec = RecordDecrypter::new(*version, *cipher_suite, rx_key, rx_iv, *rx_seq).map_err(bad)?;
            let enc = RecordEncrypter::new(*version, *cipher_suite, tx_key, tx_iv, *tx_seq).map_err(bad)?;
            Ok((Some(dec), Some(enc), *version == TLS13))
        }
    }
}

struct Sess {
    id: String,
    gen: u32,
    client: OwnedFd,
    upstream: OwnedFd,
    dirs: [Dir; 2],
    ktls: [bool; 2],
    busy: [bool; 2],
    done: [bool; 2],
    added: Instant,
    last_activity: Instant,
    idle_timeout: Option<Duration>,
    not_after: Option<SystemTime>,
    /// Which side's EOF came first, for the report.
    first_close: Option<EndReason>,
    /// Per direction, the legs (index into `wire`) its in-flight operation reads from and
    /// writes to, so its result can be counted as that leg's traffic.
    wire_op: [(Option<usize>, Option<usize>); 2],
    /// `[client, upstream]` × `[rx, tx]`: bytes each leg's socket gave and took, as the syscalls
    /// returned them (what a TLS leg carries on the wire: records, not plaintext).
    wire: [[u64; 2]; 2],
    ending: Option<EndReason>,
    ending_since: Option<Instant>,
    /// `[client, upstream]` crypto as handed over, for a successor.
    crypto: [LegCrypto; 2],
    kernel_tls: [u8; 2],
    /// Being passed to a successor: no new operation starts; taken once none is in flight.
    exporting: bool,
}

/// The ring and what completions need besides the session table.
struct Io {
    ring: IoUring,
    pool: Pool,
    pipes: PipePool,
    /// Completions reaped but not yet processed (reaping can happen while pushing).
    backlog: VecDeque<(u64, i32)>,
    /// Operations submitted and not completed, the wake read included; cancels excluded.
    inflight: usize,
}

impl Io {
    /// Queues one SQE, making room by submitting when the queue is full.
    ///
    /// # Safety
    /// Every buffer and descriptor `sqe` refers to must stay valid, and buffers otherwise
    /// untouched, until its completion has been reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => {
                    warn!(error = %e, "io_uring submit failed; retrying");
                    self.reap();
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            self.backlog.push_back((cqe.user_data(), cqe.result()));
        }
    }

    /// Submits a direction's operation under `tok`.
    fn submit(&mut self, op: &Op, tok: u64) {
        let sqe = match *op {
            Op::PollIn(fd) => opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32).build(),
            Op::PollOut(fd) => opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build(),
            Op::Splice { from, to, len } => opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len)
                .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                .build(),
            // MSG_DONTWAIT makes io_uring return EAGAIN instead of parking the op on an internal
            // poll that would hold the buffer; we poll ourselves.
            Op::Recv { fd, buf, len } => opcode::Recv::new(types::Fd(fd), buf, len).flags(libc::MSG_DONTWAIT).build(),
            Op::Send { fd, buf, len } => {
                opcode::Send::new(types::Fd(fd), buf, len).flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL).build()
            }
        };
        // SAFETY: the fds belong to a session that is dropped only after this op completes
        // (`Sess::busy`), and the buffer of a Recv/Send is a pool buffer owned by the issuing
        // direction, which leaves it alone until `complete` gets this op's result.
        unsafe { self.push(&sqe.user_data(tok)) };
        self.inflight += 1;
    }

    fn cancel(&mut self, tok: u64) {
        let sqe = opcode::AsyncCancel::new(tok).build().user_data(CANCEL_TOKEN);
        // SAFETY: a cancel refers to no memory or descriptor, only to another op's user_data.
        unsafe { self.push(&sqe) };
    }
}

/// `splice(2)`, non-blocking, returning what a completion would: bytes moved or `-errno`.
fn splice_now(from: RawFd, to: RawFd, len: u32) -> i32 {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both descriptors belong to the session being driven (or to its pipe), which stays
    // alive for the duration of this call; null offsets mean "current position", as sockets and
    // pipes require; no memory of ours is passed.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len as usize, flags) };
    if n < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        n.min(i32::MAX as isize) as i32
    }
}

pub(crate) struct EventLoop {
    index: usize,
    io: Io,
    commands: mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    wake_buf: Box<[u8; 8]>,
    wake_inflight: bool,
    slots: Vec<Option<Sess>>,
    gens: Vec<u32>,
    free_slots: Vec<u32>,
    by_id: HashMap<String, u32>,
    reports: mpsc::Sender<Report>,
    stats: Arc<Stats>,
    shutting_down: bool,
    /// Run splices with splice(2) on this thread instead of IORING_OP_SPLICE.
    inline_splice: bool,
    /// Sessions go to a successor: none is taken any more.
    handed_over: bool,
    /// Where the exported sessions go once every session is exported or ended.
    export_reply: Option<mpsc::SyncSender<Vec<MovedSession>>>,
    exported: Vec<MovedSession>,
    /// `(slot, gen, dir)` of directions whose source has bytes but which could get no pipe
    /// (out of descriptors); retried when the pool has a spare pipe, and at every tick.
    pipe_waiters: Vec<(u32, u32, usize)>,
    /// A direction could get no pipe and has not had one since (logged once per shortage).
    pipes_short: bool,
}

impl Sess {
    /// The legs (indexes into `wire`) an operation reads from and writes to; a pipe is neither.
    fn wire_legs(&self, op: &Op) -> (Option<usize>, Option<usize>) {
        let leg = |fd: RawFd| [self.client.as_raw_fd(), self.upstream.as_raw_fd()].iter().position(|l| *l == fd);
        match *op {
            Op::Splice { from, to, .. } => (leg(from), leg(to)),
            Op::Recv { fd, .. } => (leg(fd), None),
            Op::Send { fd, .. } => (None, leg(fd)),
            Op::PollIn(_) | Op::PollOut(_) => (None, None),
        }
    }

    /// Counts an operation's result as the traffic of the legs it touched.
    fn count_wire(&mut self, (rx, tx): (Option<usize>, Option<usize>), res: i32) {
        if res <= 0 {
            return;
        }
        if let Some(leg) = rx {
            self.wire[leg][0] += res as u64;
        }
        if let Some(leg) = tx {
            self.wire[leg][1] += res as u64;
        }
    }
}

impl EventLoop {
    pub(crate) fn new(
        index: usize,
        commands: mpsc::Receiver<Command>,
        wake: Arc<EventFd>,
        reports: mpsc::Sender<Report>,
        stats: Arc<Stats>,
        splice: SpliceIssue,
    ) -> io::Result<Self> {
        // Deferred task work runs completions only when this thread waits on the ring: fewer
        // interruptions, and only this thread submits anyway. Older kernels lack it.
        let ring = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(RING_ENTRIES) {
            Ok(r) => r,
            Err(_) => IoUring::new(RING_ENTRIES)?,
        };
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks EXT_ARG (Linux 5.11+ needed)"));
        }
        let mut max = [0, MAX_UNBOUND_IOWQ_WORKERS];
        if let Err(e) = ring.submitter().register_iowq_max_workers(&mut max) {
            debug!(worker = index, error = %e, "could not cap io-wq workers");
        }
        Ok(EventLoop {
            index,
            io: Io {
                ring,
                pool: Pool::new(stats.clone()),
                pipes: PipePool::new(stats.clone()),
                backlog: VecDeque::new(),
                inflight: 0,
            },
            pipe_waiters: Vec::new(),
            pipes_short: false,
            commands,
            wake,
            wake_buf: Box::new([0; 8]),
            wake_inflight: false,
            slots: Vec::new(),
            gens: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashMap::new(),
            reports,
            stats,
            shutting_down: false,
            inline_splice: splice == SpliceIssue::Inline,
            handed_over: false,
            export_reply: None,
            exported: Vec::new(),
        })
    }

    pub(crate) fn run(mut self) {
        info!(worker = self.index, "relay worker started");
        self.arm_wake();
        let mut next_tick = Instant::now() + TICK;
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            self.drain_commands();
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            if self.shutting_down {
                let deadline = *shutdown_deadline.get_or_insert(now + SHUTDOWN_GRACE);
                if self.io.inflight == 0 {
                    break;
                }
                if now >= deadline {
                    error!(
                        worker = self.index,
                        inflight = self.io.inflight,
                        "operations still in flight at shutdown; leaking their sessions"
                    );
                    break;
                }
            }
            let ts = types::Timespec::from(next_tick.saturating_duration_since(now));
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.io.ring.submitter().submit_with_args(1, &args) {
                match e.raw_os_error() {
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                    _ => {
                        error!(worker = self.index, error = %e, "io_uring wait failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            self.io.reap();
            while let Some((tok, res)) = self.io.backlog.pop_front() {
                self.on_completion(tok, res);
            }
            if !self.pipe_waiters.is_empty() && self.io.pipes.spare() > 0 {
                self.retry_pipe_waiters();
            }
        }
        info!(worker = self.index, "relay worker stopped");
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(types::Fd(self.wake.as_fd().as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is a heap buffer owned by the loop and only written by this read; the
        // loop does not exit (or leaks it, see Drop) while the read is in flight, and `wake` keeps
        // the eventfd open.
        unsafe { self.io.push(&sqe) };
        self.io.inflight += 1;
        self.wake_inflight = true;
    }

    fn drain_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(c) => self.command(c),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.command(Command::Shutdown);
                    return;
                }
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Add(p, reply) => {
                let r = self.add(*p);
                let _ = reply.send(r);
            }
            Command::End(id, reason) => match self.by_id.get(&id) {
                Some(&slot) => self.begin_end(slot, reason),
                None => debug!(session = %id, "end: no such session"),
            },
            Command::List(reply) => {
                let ids = self.slots.iter().flatten().filter(|s| s.ending.is_none()).map(|s| s.id.clone()).collect();
                let _ = reply.send(ids);
            }
            Command::Bytes(reply) => {
                let live = self.slots.iter().flatten().filter(|s| s.ending.is_none());
                let bytes = live
                    .map(|s| SessionBytes {
                        id: s.id.clone(),
                        client_to_upstream: s.dirs[0].bytes(),
                        upstream_to_client: s.dirs[1].bytes(),
                        wire: s.wire,
                        duration: s.added.elapsed(),
                    })
                    .collect();
                let _ = reply.send(bytes);
            }
            Command::Export(reply) => {
                self.handed_over = true;
                self.export_reply = Some(reply);
                let slots: Vec<u32> = self.by_id.values().copied().collect();
                for slot in slots {
                    let Some(Some(s)) = self.slots.get_mut(slot as usize) else { continue };
                    if s.ending.is_some() {
                        continue;
                    }
                    s.exporting = true;
                    for dir in 0..2 {
                        if s.busy[dir] {
                            self.io.cancel(token(slot, s.gen, dir));
                        }
                    }
                    self.maybe_export(slot);
                }
                self.maybe_finish_export();
            }
            Command::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    let slots: Vec<u32> = self.by_id.values().copied().collect();
                    for slot in slots {
                        self.begin_end(slot, EndReason::WorkerShutdown);
                    }
                    if self.wake_inflight {
                        self.io.cancel(WAKE_TOKEN);
                    }
                }
            }
        }
    }

    fn add(&mut self, p: Prepared) -> io::Result<()> {
        if self.shutting_down {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "relay worker is shutting down"));
        }
        if self.handed_over {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "relay worker passed its sessions to a successor"));
        }
        if self.by_id.contains_key(&p.id) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("session {} already relayed", p.id)));
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let path = |d: &Dir| if matches!(d, Dir::Splice(_)) { "splice" } else { "tls-record" };
        info!(
            session = %p.id,
            worker = self.index,
            client_to_upstream = path(&p.dirs[0]),
            upstream_to_client = path(&p.dirs[1]),
            client_ktls = p.ktls[0],
            upstream_ktls = p.ktls[1],
            "relaying session"
        );
        let legs = p.ktls.iter().filter(|k| **k).count();
        self.stats.ktls_legs.fetch_add(legs, Ordering::Relaxed);
        // A resumed direction's buffers were allocated outside the pool, which takes them over.
        let adopted: usize = p.dirs.iter().map(|d| if let Dir::Record(r) = d { r.buffers() } else { 0 }).sum();
        self.stats.buffers_in_use.fetch_add(adopted, Ordering::Relaxed);
        self.stats.buffers_allocated.fetch_add(adopted, Ordering::Relaxed);
        // And so are the pipes of resumed directions that hold bytes.
        let pipes = p.dirs.iter().filter(|d| matches!(d, Dir::Splice(s) if s.has_pipe())).count();
        self.io.pipes.adopt(pipes);
        let now = Instant::now();
        let (wire, first_close, done, last_activity) = match &p.resumed {
            Some(r) => (r.wire, r.first_close, r.done, now.checked_sub(r.idle).unwrap_or(now)),
            None => ([[0; 2]; 2], None, [false; 2], now),
        };
        self.by_id.insert(p.id.clone(), slot);
        self.slots[slot as usize] = Some(Sess {
            id: p.id,
            gen: self.gens[slot as usize],
            client: p.client,
            upstream: p.upstream,
            dirs: p.dirs,
            ktls: p.ktls,
            busy: [false; 2],
            done,
            added: p.added,
            last_activity,
            idle_timeout: p.idle_timeout,
            not_after: p.not_after,
            first_close,
            wire_op: [(None, None); 2],
            wire,
            ending: None,
            ending_since: None,
            crypto: p.crypto,
            kernel_tls: p.kernel_tls,
            exporting: false,
        });
        if p.not_after.is_some_and(|t| SystemTime::now() >= t) {
            self.begin_end(slot, EndReason::CertExpired);
        } else {
            self.drive(slot, 0);
            self.drive(slot, 1);
        }
        Ok(())
    }

    fn on_completion(&mut self, tok: u64, res: i32) {
        match tok {
            CANCEL_TOKEN => return,
            WAKE_TOKEN => {
                self.io.inflight -= 1;
                self.wake_inflight = false;
                if res < 0 && res != -libc::ECANCELED {
                    warn!(worker = self.index, error = %io::Error::from_raw_os_error(-res), "eventfd read failed");
                }
                // Commands are drained at the top of the loop.
                if !self.shutting_down {
                    self.arm_wake();
                }
                return;
            }
            _ => {}
        }
        let (slot, gen, dir) = untoken(tok);
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else {
            error!(worker = self.index, tok, "completion for an unknown slot");
            return;
        };
        if (s.gen & 0x00ff_ffff) != gen || !s.busy[dir] {
            error!(session = %s.id, tok, "completion for an operation not in flight");
            return;
        }
        self.io.inflight -= 1;
        s.busy[dir] = false;
        s.count_wire(s.wire_op[dir], res);
        let outcome = s.dirs[dir].complete(res);
        if s.ending.is_some() {
            self.maybe_finalize(slot);
            return;
        }
        if s.exporting {
            // A cancelled operation fails with ECANCELED, and any other failure will show again
            // to the successor, whose next operation on the socket meets the same condition.
            if let Err(f) = outcome {
                debug!(session = %s.id, failure = ?f, "operation ended while passing the session on");
            }
            self.maybe_export(slot);
            self.maybe_finish_export();
            return;
        }
        match outcome {
            Ok(moved) => {
                if moved > 0 {
                    s.last_activity = Instant::now();
                }
                self.drive(slot, dir);
            }
            Err(f) => self.fail(slot, f),
        }
    }

    /// Lets direction `dir` of `slot` start its next operation (it has none in flight).
    fn drive(&mut self, slot: u32, dir: usize) {
        let mut inline_budget = if self.inline_splice { INLINE_SPLICES } else { 0 };
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        if s.ending.is_some() || s.exporting || s.busy[dir] || s.done[dir] {
            return;
        }
        loop {
            let step = s.dirs[dir].step(&mut self.io.pool, &mut self.io.pipes);
            if let Step::Submit(Op::Splice { from, to, len }) = step {
                if inline_budget > 0 {
                    inline_budget -= 1;
                    let res = splice_now(from, to, len);
                    s.count_wire(s.wire_legs(&Op::Splice { from, to, len }), res);
                    match s.dirs[dir].complete(res) {
                        Ok(moved) => {
                            if moved > 0 {
                                s.last_activity = Instant::now();
                            }
                            // Bulk data: let io-wq take the rest, where its latency lets more
                            // accumulate per splice (fewer, larger ones; measured cheaper per GiB).
                            if moved >= INLINE_BULK_BYTES {
                                inline_budget = 0;
                            }
                            continue;
                        }
                        Err(f) => return self.fail(slot, f),
                    }
                }
            }
            return self.run_step(slot, dir, step);
        }
    }

    fn run_step(&mut self, slot: u32, dir: usize, step: Step) {
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        match step {
            Step::Submit(op) => {
                s.busy[dir] = true;
                s.wire_op[dir] = s.wire_legs(&op);
                self.io.submit(&op, token(slot, s.gen, dir));
            }
            Step::Done => {
                s.done[dir] = true;
                let side = if dir == 0 { EndReason::ClientClosed } else { EndReason::UpstreamClosed };
                debug!(session = %s.id, ?side, "half-close relayed");
                let first = *s.first_close.get_or_insert(side);
                if s.done == [true, true] {
                    self.begin_end(slot, first);
                }
            }
            Step::WaitPipe(e) => {
                // One warning per shortage: a process out of descriptors would otherwise log
                // once per direction, and again at every retry.
                if !self.pipes_short {
                    self.pipes_short = true;
                    warn!(worker = self.index, error = %e, "no pipe could be made; directions with bytes to relay wait for one");
                } else {
                    debug!(session = %s.id, error = %e, "no pipe could be made");
                }
                self.pipe_waiters.push((slot, s.gen, dir));
            }
            Step::Fail(f) => self.fail(slot, f),
        }
    }

    /// Drives again the directions that could get no pipe; those that still get none queue
    /// themselves again. Entries of sessions that ended or moved on since are dropped.
    fn retry_pipe_waiters(&mut self) {
        let waiting = std::mem::take(&mut self.pipe_waiters);
        for &(slot, gen, dir) in &waiting {
            let Some(Some(s)) = self.slots.get(slot as usize) else { continue };
            if s.gen == gen {
                self.drive(slot, dir);
            }
        }
        if self.pipe_waiters.is_empty() && self.pipes_short {
            self.pipes_short = false;
            info!(worker = self.index, "pipes available again; waiting directions resumed");
        }
    }

    fn fail(&mut self, slot: u32, f: Failure) {
        let Some(Some(s)) = self.slots.get(slot as usize) else { return };
        let reason = match f {
            Failure::Closed(leg, errno) => {
                debug!(session = %s.id, leg = leg.name(), error = %io::Error::from_raw_os_error(errno), "leg closed");
                s.first_close.unwrap_or(leg.closed())
            }
            Failure::Error(msg) => {
                error!(session = %s.id, "{msg}");
                EndReason::Error
            }
        };
        self.begin_end(slot, reason);
    }

    /// Starts ending a session: the first reason wins.
    fn begin_end(&mut self, slot: u32, reason: EndReason) {
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        if s.ending.is_some() {
            return;
        }
        info!(session = %s.id, ?reason, "ending session");
        s.ending = Some(reason);
        s.ending_since = Some(Instant::now());
        // Peers see EOF now; polls and receives pending on these sockets complete at once.
        for fd in [&s.client, &s.upstream] {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        for dir in 0..2 {
            if s.busy[dir] {
                self.io.cancel(token(slot, s.gen, dir));
            }
        }
        self.maybe_finalize(slot);
    }

    /// Drops an ending session once nothing is in flight, and reports it.
    fn maybe_finalize(&mut self, slot: u32) {
        let Some(cell) = self.slots.get_mut(slot as usize) else { return };
        let Some(s) = cell.as_ref() else { return };
        if s.ending.is_none() || s.busy.iter().any(|b| *b) {
            return;
        }
        let Some(mut s) = cell.take() else { return };
        for d in &mut s.dirs {
            d.release(&mut self.io.pool, &mut self.io.pipes);
        }
        self.gens[slot as usize] = self.gens[slot as usize].wrapping_add(1);
        self.free_slots.push(slot);
        self.by_id.remove(&s.id);
        let report = Report {
            id: s.id.clone(),
            bytes_client_to_upstream: s.dirs[0].bytes(),
            bytes_upstream_to_client: s.dirs[1].bytes(),
            duration: s.added.elapsed(),
            reason: s.ending.unwrap_or(EndReason::Error),
            client_ktls: s.ktls[0],
            upstream_ktls: s.ktls[1],
            wire: s.wire,
        };
        info!(
            session = %report.id,
            reason = ?report.reason,
            bytes_client_to_upstream = report.bytes_client_to_upstream,
            bytes_upstream_to_client = report.bytes_upstream_to_client,
            duration_ms = report.duration.as_millis() as u64,
            "session ended"
        );
        // Closes both legs and the pipes.
        drop(s);
        let _ = self.reports.send(report);
        self.maybe_finish_export();
    }

    /// Takes an exporting session out of the table once nothing of it is in flight.
    fn maybe_export(&mut self, slot: u32) {
        let Some(cell) = self.slots.get_mut(slot as usize) else { return };
        let Some(s) = cell.as_ref() else { return };
        if !s.exporting || s.ending.is_some() || s.busy.iter().any(|b| *b) {
            return;
        }
        let Some(s) = cell.take() else { return };
        self.gens[slot as usize] = self.gens[slot as usize].wrapping_add(1);
        self.free_slots.push(slot);
        self.by_id.remove(&s.id);
        let Sess {
            id,
            client,
            upstream,
            dirs,
            crypto,
            kernel_tls,
            done,
            added,
            last_activity,
            wire,
            first_close,
            idle_timeout,
            not_after,
            ..
        } = s;
        let mut pipes = Vec::new();
        let mut held = Vec::new();
        // `(read, write)` sequence numbers of each direction's userspace ciphers.
        let mut seqs = [(None, None); 2];
        let (pool, pipe_pool) = (&mut self.io.pool, &mut self.io.pipes);
        let mut i = 0;
        let dirs = dirs.map(|d| {
            let state = match d {
                Dir::Splice(sd) => {
                    let (state, pipe) = sd.export(done[i], pipe_pool);
                    pipes.push(pipe);
                    state
                }
                Dir::Record(mut rd) => {
                    let (state, bytes, sq) = rd.export(done[i], pool);
                    held.extend_from_slice(&bytes);
                    seqs[i] = sq;
                    state
                }
            };
            i += 1;
            state
        });
        let [client_crypto, upstream_crypto] = crypto;
        // Direction 0 reads the client leg and writes the upstream one; direction 1 the reverse.
        let client_crypto = with_seqs(client_crypto, seqs[0].0, seqs[1].1);
        let upstream_crypto = with_seqs(upstream_crypto, seqs[1].0, seqs[0].1);
        info!(
            session = %id,
            worker = self.index,
            pipe_bytes = dirs.iter().filter(|d| d.path == DirPath::Splice).map(|d| u64::from(d.held_in)).sum::<u64>(),
            buffered_bytes = held.len(),
            "session ready for the successor"
        );
        self.exported.push(MovedSession {
            session: Session { id, client, upstream, client_crypto, upstream_crypto, idle_timeout, not_after },
            kernel_tls,
            age: added.elapsed(),
            idle: last_activity.elapsed(),
            wire,
            first_close,
            dirs,
            pipes,
            held,
        });
    }

    /// Answers the export once no session is left (each exported, or ended and reported).
    fn maybe_finish_export(&mut self) {
        if self.export_reply.is_none() || self.slots.iter().any(Option::is_some) {
            return;
        }
        if let Some(reply) = self.export_reply.take() {
            let _ = reply.send(std::mem::take(&mut self.exported));
        }
    }

    fn tick(&mut self, now: Instant) {
        if !self.pipe_waiters.is_empty() {
            self.retry_pipe_waiters();
        }
        let wall = SystemTime::now();
        for slot in 0..self.slots.len() as u32 {
            let Some(Some(s)) = self.slots.get_mut(slot as usize) else { continue };
            if s.exporting {
                continue;
            }
            if let Some(since) = s.ending_since {
                // Shutdown and cancel should have finished these ops already; nudge again.
                if now.duration_since(since) >= END_RECANCEL {
                    warn!(session = %s.id, busy = ?s.busy, "ending session still has operations in flight");
                    s.ending_since = Some(now);
                    for dir in 0..2 {
                        if s.busy[dir] {
                            self.io.cancel(token(slot, s.gen, dir));
                        }
                    }
                }
                continue;
            }
            if s.not_after.is_some_and(|t| wall >= t) {
                self.begin_end(slot, EndReason::CertExpired);
            } else if s.idle_timeout.is_some_and(|t| now.duration_since(s.last_activity) >= t) {
                self.begin_end(slot, EndReason::IdleTimeout);
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if self.io.inflight > 0 {
            // The kernel may still write into these buffers (or use these descriptors) until the
            // thread's ring is torn down; leaking is the only safe option.
            for s in self.slots.drain(..).flatten() {
                std::mem::forget(s);
            }
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}
