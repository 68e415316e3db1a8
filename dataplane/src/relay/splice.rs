//! One direction of a plain/plain session: socket → pipe → socket with `IORING_OP_SPLICE`, so the
//! payload never enters userspace.
//!
//! io_uring runs every SPLICE on an io-wq thread, and a splice that waits would pin that thread for
//! as long as the socket stays idle. So every splice is non-blocking (socket O_NONBLOCK plus
//! SPLICE_F_NONBLOCK) and is issued only after a POLL_ADD reported the socket ready; -EAGAIN sends
//! the direction back to polling. One operation is in flight per direction at a time, and nothing
//! is read while the pipe holds data, so a stalled reader stalls the writer (bounded memory).
//!
//! A kTLS leg is spliced like a plain one (the kernel opens and seals its records), with three
//! differences: a record that is not application data stops the splice and is read with recvmsg
//! ([`KtlsRx`]); an EOF without close_notify is a cut-off peer, which ends the session as on the
//! userspace record path; and the half-close passed on to a kTLS destination starts with a
//! close_notify alert. A kTLS source also splices at most one record (16 KiB) per call, so while
//! full records keep coming the pipe is filled with several before it is drained.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;

use super::ktls_rx::{read_error, Control, KtlsRx};
use super::{failure_for, shutdown_write, Failure, Leg, Op, Step};
use crate::ktls::{send_close_notify, MAX_RECORD_PLAINTEXT};
use sluice_handoff::handoff::{DirPath, DirState};

/// Larger pipes mean fewer splices (each an io-wq round trip) per megabyte.
const PIPE_SIZE: i32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    PollIn,
    PollOut,
    SpliceIn(u32),
    SpliceOut,
}

pub(crate) struct SpliceDir {
    src: RawFd,
    dst: RawFd,
    src_leg: Leg,
    dst_leg: Leg,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    pipe_cap: u32,
    /// Bytes spliced into the pipe and not yet out of it.
    in_pipe: u32,
    /// The last poll or full-length splice says the source has data: splice without polling.
    readable: bool,
    /// The destination returned EAGAIN: wait for POLLOUT before splicing again.
    blocked_out: bool,
    eof: bool,
    /// The source is a kTLS leg: its non-data records are read here.
    ktls_rx: Option<KtlsRx>,
    /// The destination is a kTLS leg: close_notify precedes the half-close.
    ktls_tx: bool,
    notify_sent: bool,
    pending: Pending,
    pub(crate) bytes: u64,
}

impl SpliceDir {
    pub(crate) fn new(src: RawFd, dst: RawFd, src_leg: Leg, dst_leg: Leg) -> std::io::Result<Self> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused above /proc/sys/fs/pipe-max-size or the per-user pipe budget: keep the default.
        let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Self::with_pipe(src, dst, src_leg, dst_leg, [pipe_r, pipe_w])
    }

    /// A fresh direction over a non-blocking pipe.
    fn with_pipe(
        src: RawFd,
        dst: RawFd,
        src_leg: Leg,
        dst_leg: Leg,
        [pipe_r, pipe_w]: [OwnedFd; 2],
    ) -> std::io::Result<Self> {
        let pipe_cap = fcntl(&pipe_w, FcntlArg::F_GETPIPE_SZ)?.max(4096) as u32;
        Ok(SpliceDir {
            src,
            dst,
            src_leg,
            dst_leg,
            pipe_r,
            pipe_w,
            pipe_cap,
            in_pipe: 0,
            readable: false,
            blocked_out: false,
            eof: false,
            ktls_rx: None,
            ktls_tx: false,
            notify_sent: false,
            pending: Pending::None,
            bytes: 0,
        })
    }

    /// Marks the source as a kTLS leg (`rx`) and/or the destination as one (`tx`).
    pub(crate) fn with_ktls(mut self, rx: Option<KtlsRx>, tx: bool) -> Self {
        self.ktls_rx = rx;
        self.ktls_tx = tx;
        self
    }

    /// The direction as a predecessor left it: its pipe (`[read end, write end]`, with
    /// `state.held_in` bytes in it) and flags. The first step polls, whatever the socket was.
    pub(crate) fn resume(
        src: RawFd,
        dst: RawFd,
        src_leg: Leg,
        dst_leg: Leg,
        [pipe_r, pipe_w]: [OwnedFd; 2],
        state: &DirState,
    ) -> std::io::Result<Self> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
        for p in [&pipe_r, &pipe_w] {
            let st = nix::sys::stat::fstat(p)?;
            if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
                != nix::sys::stat::SFlag::S_IFIFO
            {
                return Err(bad("a resumed direction's pipe descriptor is not a pipe"));
            }
        }
        // Ours to set, whatever the predecessor's flags were.
        for p in [&pipe_r, &pipe_w] {
            let flags = OFlag::from_bits_truncate(fcntl(p, FcntlArg::F_GETFL)?);
            fcntl(p, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        let mut d = Self::with_pipe(src, dst, src_leg, dst_leg, [pipe_r, pipe_w])?;
        if state.path != DirPath::Splice || state.held_in > d.pipe_cap {
            return Err(bad("a resumed spliced direction holds more than its pipe"));
        }
        d.in_pipe = state.held_in;
        d.eof = state.eof;
        d.notify_sent = state.notify_sent;
        d.bytes = state.bytes;
        Ok(d)
    }

    /// Hands the direction over (no operation in flight): its state and its pipe, whose bytes
    /// stay in the kernel.
    pub(crate) fn export(self, done: bool) -> (DirState, [OwnedFd; 2]) {
        debug_assert_eq!(self.pending, Pending::None);
        let state = DirState {
            path: DirPath::Splice,
            eof: self.eof,
            notified: false,
            notify_sent: self.notify_sent,
            done,
            held_in: self.in_pipe,
            held_out: 0,
            out_plain: 0,
            hs_skip: 0,
            ktls_hs_skip: self.ktls_rx.as_ref().map_or(0, |k| k.hs_skip() as u32),
            bytes: self.bytes,
        };
        (state, [self.pipe_r, self.pipe_w])
    }

    /// Whether to read another kTLS record into the pipe before draining it.
    fn fill_more(&self) -> bool {
        self.ktls_rx.is_some()
            && self.readable
            && !self.eof
            && self.in_pipe as usize + MAX_RECORD_PLAINTEXT <= self.pipe_cap as usize
    }

    /// Next operation; called only while none is in flight.
    pub(crate) fn step(&mut self) -> Step {
        debug_assert_eq!(self.pending, Pending::None);
        if self.in_pipe > 0 && !self.fill_more() {
            if self.blocked_out {
                self.pending = Pending::PollOut;
                return Step::Submit(Op::PollOut(self.dst));
            }
            self.pending = Pending::SpliceOut;
            return Step::Submit(Op::Splice { from: self.pipe_r.as_raw_fd(), to: self.dst, len: self.in_pipe });
        }
        if self.eof {
            // Pipe drained: pass the half-close on.
            if self.ktls_tx && !self.notify_sent {
                if self.blocked_out {
                    self.pending = Pending::PollOut;
                    return Step::Submit(Op::PollOut(self.dst));
                }
                match send_close_notify(self.dst) {
                    Ok(()) => self.notify_sent = true,
                    Err(Errno::EAGAIN) => {
                        self.blocked_out = true;
                        self.pending = Pending::PollOut;
                        return Step::Submit(Op::PollOut(self.dst));
                    }
                    Err(e) => return Step::Fail(failure_for(self.dst_leg, e as i32, "sending close_notify")),
                }
            }
            shutdown_write(self.dst);
            return Step::Done;
        }
        if self.readable {
            let room = self.pipe_cap - self.in_pipe;
            self.pending = Pending::SpliceIn(room);
            return Step::Submit(Op::Splice { from: self.src, to: self.pipe_w.as_raw_fd(), len: room });
        }
        self.pending = Pending::PollIn;
        Step::Submit(Op::PollIn(self.src))
    }

    /// Takes the result of the operation in flight; `Ok(n)` is the number of bytes moved.
    pub(crate) fn complete(&mut self, res: i32) -> Result<u64, Failure> {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        match pending {
            Pending::None => Ok(0),
            // POLLERR/POLLHUP count as ready: the splice that follows reports the actual error.
            Pending::PollIn if res >= 0 => {
                self.readable = true;
                Ok(0)
            }
            Pending::PollOut if res >= 0 => {
                self.blocked_out = false;
                Ok(0)
            }
            Pending::PollIn => Err(failure_for(self.src_leg, -res, "poll")),
            Pending::PollOut => Err(failure_for(self.dst_leg, -res, "poll")),
            Pending::SpliceIn(asked) => match res {
                // A TLS peer that stops without close_notify was cut off: end the session, as the
                // userspace record path does.
                0 if self.ktls_rx.is_some() => Err(Failure::Closed(self.src_leg, libc::ECONNRESET)),
                0 => {
                    self.eof = true;
                    Ok(0)
                }
                n if n > 0 => {
                    self.in_pipe += n as u32;
                    // A short read most likely emptied the socket: poll before the next one. A
                    // kTLS read stops at the record's end, so a full record says nothing either way.
                    self.readable = n as u32 == asked || (self.ktls_rx.is_some() && n as usize == MAX_RECORD_PLAINTEXT);
                    Ok(n as u64)
                }
                e if -e == libc::EAGAIN => {
                    self.readable = false;
                    Ok(0)
                }
                e => match read_error(self.ktls_rx.as_mut(), self.src, self.src_leg, -e, "splice read")? {
                    Control::Skipped => {
                        self.readable = true;
                        Ok(0)
                    }
                    Control::CloseNotify => {
                        self.eof = true;
                        Ok(0)
                    }
                },
            },
            Pending::SpliceOut => match res {
                n if n > 0 => {
                    self.in_pipe -= (n as u32).min(self.in_pipe);
                    self.bytes += n as u64;
                    Ok(n as u64)
                }
                e if -e == libc::EAGAIN => {
                    self.blocked_out = true;
                    Ok(0)
                }
                0 => Err(Failure::Error(format!("splice to the {} leg wrote nothing", self.dst_leg.name()))),
                e => Err(failure_for(self.dst_leg, -e, "splice write")),
            },
        }
    }
}
