//! One direction of a plain/plain session: socket → pipe → socket with `IORING_OP_SPLICE`, so the
//! payload never enters userspace.
//!
//! io_uring runs every SPLICE on an io-wq thread, and a splice that waits would pin that thread for
//! as long as the socket stays idle. So every splice is non-blocking (socket O_NONBLOCK plus
//! SPLICE_F_NONBLOCK) and is issued only after a POLL_ADD reported the socket ready; -EAGAIN sends
//! the direction back to polling. One operation is in flight per direction at a time, and nothing
//! is read while the pipe holds data, so a stalled reader stalls the writer (bounded memory).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;

use super::{failure_for, shutdown_write, Failure, Leg, Op, Step};

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
    pending: Pending,
    pub(crate) bytes: u64,
}

impl SpliceDir {
    pub(crate) fn new(src: RawFd, dst: RawFd, src_leg: Leg, dst_leg: Leg) -> std::io::Result<Self> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused above /proc/sys/fs/pipe-max-size or the per-user pipe budget: keep the default.
        let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
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
            pending: Pending::None,
            bytes: 0,
        })
    }

    /// Next operation; called only while none is in flight.
    pub(crate) fn step(&mut self) -> Step {
        debug_assert_eq!(self.pending, Pending::None);
        if self.in_pipe > 0 {
            if self.blocked_out {
                self.pending = Pending::PollOut;
                return Step::Submit(Op::PollOut(self.dst));
            }
            self.pending = Pending::SpliceOut;
            return Step::Submit(Op::Splice { from: self.pipe_r.as_raw_fd(), to: self.dst, len: self.in_pipe });
        }
        if self.eof {
            // Pipe drained: pass the half-close on.
            shutdown_write(self.dst);
            return Step::Done;
        }
        if self.readable {
            self.pending = Pending::SpliceIn(self.pipe_cap);
            return Step::Submit(Op::Splice { from: self.src, to: self.pipe_w.as_raw_fd(), len: self.pipe_cap });
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
                0 => {
                    self.eof = true;
                    Ok(0)
                }
                n if n > 0 => {
                    self.in_pipe += n as u32;
                    // A short read most likely emptied the socket: poll before the next one.
                    self.readable = n as u32 == asked;
                    Ok(n as u64)
                }
                e if -e == libc::EAGAIN => {
                    self.readable = false;
                    Ok(0)
                }
                e => Err(failure_for(self.src_leg, -e, "splice read")),
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
