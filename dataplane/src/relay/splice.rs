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
//!
//! The pipe comes from the worker's [`PipePool`] when the source is readable and goes back as
//! soon as it is empty and the direction waits for its source again, so an idle direction holds
//! none; a direction that stays readable (bulk data) keeps its pipe from one splice to the next.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;

use super::ktls_rx::{read_error, Control, KtlsRx};
use super::pipes::{Pipe, PipePool};
use super::{failure_for, shutdown_write, Failure, Leg, Op, Step};
use crate::ktls::{send_close_notify, MAX_RECORD_PLAINTEXT};
use sluice_handoff::handoff::{DirPath, DirState};

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
    /// Held only while bytes are in it (or about to be spliced in).
    pipe: Option<Pipe>,
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
    /// A fresh direction; it takes a pipe when its source first has bytes.
    pub(crate) fn new(src: RawFd, dst: RawFd, src_leg: Leg, dst_leg: Leg) -> Self {
        SpliceDir {
            src,
            dst,
            src_leg,
            dst_leg,
            pipe: None,
            in_pipe: 0,
            readable: false,
            blocked_out: false,
            eof: false,
            ktls_rx: None,
            ktls_tx: false,
            notify_sent: false,
            pending: Pending::None,
            bytes: 0,
        }
    }

    /// Marks the source as a kTLS leg (`rx`) and/or the destination as one (`tx`).
    pub(crate) fn with_ktls(mut self, rx: Option<KtlsRx>, tx: bool) -> Self {
        self.ktls_rx = rx;
        self.ktls_tx = tx;
        self
    }

    /// The direction as a predecessor left it: its pipe (`[read end, write end]`, with
    /// `state.held_in` bytes in it) and flags. The first step polls, whatever the socket was. An
    /// empty pipe (older data planes pass one for every spliced direction) is closed: the
    /// direction takes one from the pool when it needs one.
    pub(crate) fn resume(
        src: RawFd,
        dst: RawFd,
        src_leg: Leg,
        dst_leg: Leg,
        pipe: Option<[OwnedFd; 2]>,
        state: &DirState,
    ) -> std::io::Result<Self> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
        let mut d = Self::new(src, dst, src_leg, dst_leg);
        if state.path != DirPath::Splice {
            return Err(bad("a resumed spliced direction was not spliced"));
        }
        match pipe {
            Some(p) if state.held_in > 0 => d.pipe = Some(Self::check_pipe(p)?),
            // Checked all the same: a frame that names a pipe must carry one.
            Some(p) => drop(Self::check_pipe(p)?),
            None if state.held_in > 0 => return Err(bad("a resumed spliced direction holds bytes but no pipe")),
            None => {}
        }
        if state.held_in > d.pipe.as_ref().map_or(0, |p| p.cap) {
            return Err(bad("a resumed spliced direction holds more than its pipe"));
        }
        d.in_pipe = state.held_in;
        d.eof = state.eof;
        d.notify_sent = state.notify_sent;
        d.bytes = state.bytes;
        Ok(d)
    }

    /// A predecessor's pipe: a FIFO, made non-blocking here.
    fn check_pipe([pipe_r, pipe_w]: [OwnedFd; 2]) -> std::io::Result<Pipe> {
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
        Pipe::from_fds([pipe_r, pipe_w])
    }

    /// Whether the direction holds a pipe (which the pool then counts as in use).
    pub(crate) fn has_pipe(&self) -> bool {
        self.pipe.is_some()
    }

    /// Hands the direction over (no operation in flight): its state and its pipe if it holds
    /// bytes, which stay in the kernel; an empty pipe goes back to the pool.
    pub(crate) fn export(mut self, done: bool, pipes: &mut PipePool) -> (DirState, Option<[OwnedFd; 2]>) {
        debug_assert_eq!(self.pending, Pending::None);
        let pipe = match self.pipe.take() {
            Some(p) if self.in_pipe > 0 => Some(pipes.hand_over(p)),
            Some(p) => {
                pipes.give(p);
                None
            }
            None => None,
        };
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
        (state, pipe)
    }

    /// The session is gone: its pipe goes back to the pool if empty, else is closed.
    pub(crate) fn release(&mut self, pipes: &mut PipePool) {
        debug_assert_eq!(self.pending, Pending::None);
        if let Some(p) = self.pipe.take() {
            if self.in_pipe == 0 {
                pipes.give(p);
            } else {
                pipes.discard(p);
            }
        }
    }

    /// Gives the pipe back to the pool; only called while it is empty.
    fn put_back(&mut self, pipes: &mut PipePool) {
        debug_assert_eq!(self.in_pipe, 0);
        if let Some(p) = self.pipe.take() {
            pipes.give(p);
        }
    }

    /// Whether to read another kTLS record into the pipe before draining it.
    fn fill_more(&self) -> bool {
        self.ktls_rx.is_some()
            && self.readable
            && !self.eof
            && self.pipe.as_ref().is_some_and(|p| self.in_pipe as usize + MAX_RECORD_PLAINTEXT <= p.cap as usize)
    }

    /// Next operation; called only while none is in flight.
    pub(crate) fn step(&mut self, pipes: &mut PipePool) -> Step {
        debug_assert_eq!(self.pending, Pending::None);
        if self.in_pipe > 0 && !self.fill_more() {
            let Some(pipe) = &self.pipe else {
                return Step::Fail(Failure::Error("bytes in flight without a pipe".into()));
            };
            if self.blocked_out {
                self.pending = Pending::PollOut;
                return Step::Submit(Op::PollOut(self.dst));
            }
            self.pending = Pending::SpliceOut;
            return Step::Submit(Op::Splice { from: pipe.r.as_raw_fd(), to: self.dst, len: self.in_pipe });
        }
        if self.eof {
            // Nothing more will go through the pipe.
            self.put_back(pipes);
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
            let pipe = match self.pipe.take() {
                Some(p) => p,
                None => match pipes.take() {
                    Ok(p) => p,
                    Err(e) => return Step::WaitPipe(e),
                },
            };
            let room = pipe.cap - self.in_pipe;
            let to = pipe.w.as_raw_fd();
            self.pipe = Some(pipe);
            self.pending = Pending::SpliceIn(room);
            return Step::Submit(Op::Splice { from: self.src, to, len: room });
        }
        // Waiting for the source with an empty pipe: an idle direction holds none.
        self.put_back(pipes);
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
