//! The per-worker pool of splice pipes. A spliced direction takes a pipe only while bytes are on
//! their way through it (from the splice in to the splice that empties it) and gives it back when
//! it is empty, so an idle session holds no pipe: it costs its two sockets and nothing else, and
//! the descriptors a worker holds follow the number of *active* directions, as in HAProxy.
//!
//! A few empty pipes are kept for reuse (taking one is then free of syscalls); beyond that they
//! are closed, so a burst does not pin descriptors. When no pipe can be made (EMFILE, ENFILE), the
//! direction waits and retries (see the event loop) rather than ending the session.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tracing::error;

use super::Stats;

/// Larger pipes mean fewer splices (each an io-wq round trip) per megabyte.
const PIPE_SIZE: i32 = 256 * 1024;
/// Empty pipes kept for reuse per worker (two descriptors each).
pub(crate) const MAX_SPARE: usize = 8;

/// A non-blocking pipe: `r` is spliced from, `w` into.
pub(crate) struct Pipe {
    pub(crate) r: OwnedFd,
    pub(crate) w: OwnedFd,
    /// Its capacity in bytes.
    pub(crate) cap: u32,
}

impl Pipe {
    fn create() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused above /proc/sys/fs/pipe-max-size or the per-user pipe budget: keep the default.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Self::from_fds([r, w])
    }

    /// A pipe made elsewhere (a predecessor's), already non-blocking.
    pub(crate) fn from_fds([r, w]: [OwnedFd; 2]) -> io::Result<Pipe> {
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)?.max(4096) as u32;
        Ok(Pipe { r, w, cap })
    }

    pub(crate) fn into_fds(self) -> [OwnedFd; 2] {
        [self.r, self.w]
    }

    /// Bytes in the pipe, by the kernel's count.
    fn queued(&self) -> io::Result<usize> {
        let mut n: nix::libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`, alive for
        // the call; the descriptor is ours and open.
        let rc =
            unsafe { nix::libc::ioctl(self.r.as_raw_fd(), nix::libc::FIONREAD as _, &mut n as *mut nix::libc::c_int) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }
}

pub(crate) struct PipePool {
    spare: Vec<Pipe>,
    max_spare: usize,
    stats: Arc<Stats>,
}

impl PipePool {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Self::with_max_spare(stats, MAX_SPARE)
    }

    pub(crate) fn with_max_spare(stats: Arc<Stats>, max_spare: usize) -> Self {
        PipePool { spare: Vec::new(), max_spare, stats }
    }

    /// An empty pipe, reused or made now. An error (out of descriptors, mostly) is counted; the
    /// caller waits and asks again.
    pub(crate) fn take(&mut self) -> io::Result<Pipe> {
        let pipe = match self.spare.pop() {
            Some(p) => {
                self.stats.pipes_spare.fetch_sub(1, Ordering::Relaxed);
                p
            }
            None => Pipe::create().inspect_err(|_| {
                self.stats.pipe_waits.fetch_add(1, Ordering::Relaxed);
            })?,
        };
        self.stats.pipes_in_use.fetch_add(1, Ordering::Relaxed);
        Ok(pipe)
    }

    /// Takes back a pipe its direction has emptied. The kernel's count is checked too: a pipe
    /// that still held bytes must never reach another session, so such a one is closed.
    pub(crate) fn give(&mut self, pipe: Pipe) {
        self.stats.pipes_in_use.fetch_sub(1, Ordering::Relaxed);
        match pipe.queued() {
            Ok(0) if self.spare.len() < self.max_spare => {
                self.spare.push(pipe);
                self.stats.pipes_spare.fetch_add(1, Ordering::Relaxed);
            }
            Ok(0) => {}
            Ok(n) => error!(bytes = n, "a pipe given back still held bytes; closed instead of reused"),
            Err(e) => error!(error = %e, "could not tell whether a pipe given back is empty; closed"),
        }
    }

    /// Closes a pipe that may hold bytes (its session ended mid-transfer).
    pub(crate) fn discard(&mut self, pipe: Pipe) {
        self.stats.pipes_in_use.fetch_sub(1, Ordering::Relaxed);
        drop(pipe);
    }

    /// Counts pipes that came with resumed sessions (made by a predecessor) as in use here.
    pub(crate) fn adopt(&mut self, n: usize) {
        self.stats.pipes_in_use.fetch_add(n, Ordering::Relaxed);
    }

    /// A pipe leaves with its session for a successor: no longer ours to count.
    pub(crate) fn hand_over(&mut self, pipe: Pipe) -> [OwnedFd; 2] {
        self.stats.pipes_in_use.fetch_sub(1, Ordering::Relaxed);
        pipe.into_fds()
    }

    /// Spare pipes now in the pool.
    pub(crate) fn spare(&self) -> usize {
        self.spare.len()
    }
}

impl Drop for PipePool {
    fn drop(&mut self) {
        self.stats.pipes_spare.fetch_sub(self.spare.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
    }

    fn write(p: &Pipe, b: &[u8]) {
        assert_eq!(nix::unistd::write(&p.w, b).unwrap(), b.len());
    }

    #[test]
    fn reuses_empty_pipes_and_keeps_at_most_max_spare() {
        let stats = Arc::new(Stats::default());
        let mut pool = PipePool::with_max_spare(stats.clone(), 2);
        let taken: Vec<Pipe> = (0..4).map(|_| pool.take().unwrap()).collect();
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), 4);
        assert!(taken.iter().all(|p| p.cap >= 4096));
        let first = taken[0].r.as_raw_fd();
        for p in taken {
            pool.give(p);
        }
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), 0);
        assert_eq!(pool.spare(), 2);
        assert_eq!(stats.pipes_spare.load(Ordering::Relaxed), 2);
        // The two spare ones come back (last in, first out), and nothing new is made for them.
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!(pool.spare(), 0);
        assert_ne!(a.r.as_raw_fd(), b.r.as_raw_fd());
        assert!(a.r.as_raw_fd() == first || b.r.as_raw_fd() == first, "a spare pipe was not reused");
        pool.give(a);
        pool.give(b);
        drop(pool);
        assert_eq!(stats.pipes_spare.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn surplus_pipes_are_closed() {
        let stats = Arc::new(Stats::default());
        let mut pool = PipePool::with_max_spare(stats, 1);
        let before = fds();
        let taken: Vec<Pipe> = (0..3).map(|_| pool.take().unwrap()).collect();
        assert_eq!(fds(), before + 6);
        for p in taken {
            pool.give(p);
        }
        // One spare pipe (two descriptors) stays open, the other two pipes are closed.
        assert_eq!(fds(), before + 2);
        drop(pool);
        assert_eq!(fds(), before);
    }

    #[test]
    fn a_pipe_with_bytes_in_it_is_never_reused() {
        let stats = Arc::new(Stats::default());
        let mut pool = PipePool::with_max_spare(stats.clone(), 4);
        let p = pool.take().unwrap();
        write(&p, b"secret of another session");
        pool.give(p);
        assert_eq!(pool.spare(), 0, "a pipe holding bytes went back to the pool");
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), 0);
        let fresh = pool.take().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(nix::unistd::read(&fresh.r, &mut buf), Err(nix::errno::Errno::EAGAIN));
        pool.discard(fresh);
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_drained_pipe_is_reused() {
        let stats = Arc::new(Stats::default());
        let mut pool = PipePool::with_max_spare(stats, 4);
        let p = pool.take().unwrap();
        write(&p, b"bytes");
        let mut buf = [0u8; 5];
        assert_eq!(nix::unistd::read(&p.r, &mut buf).unwrap(), 5);
        let fd = p.r.as_raw_fd();
        pool.give(p);
        assert_eq!(pool.spare(), 1);
        assert_eq!(pool.take().unwrap().r.as_raw_fd(), fd);
    }

    /// Runs in a child process (this test binary again, this test only): lowering RLIMIT_NOFILE
    /// here would starve the tests running alongside.
    #[test]
    fn running_out_of_descriptors_is_an_error_to_wait_on_not_a_panic() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        const CHILD: &str = "SLUICE_PIPE_POOL_EMFILE_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["relay::pipes::tests::running_out_of_descriptors_is_an_error_to_wait_on_not_a_panic", "--exact"])
                .args(["--test-threads", "1", "--nocapture"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child failed: {text}");
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        let stats = Arc::new(Stats::default());
        let mut pool = PipePool::with_max_spare(stats.clone(), 4);
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // New descriptors take the lowest free numbers, and the limit caps the number: set it
        // where two numbers are free below it, room for one pipe.
        let open: Vec<u64> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .collect();
        let limit = (0u64..).filter(|n| !open.contains(n)).nth(1).unwrap() + 1;
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
        // The directory listing's own descriptor, closed since, may leave room for a second pipe.
        let mut held = Vec::new();
        let err = loop {
            match pool.take() {
                Ok(p) => held.push(p),
                Err(e) => break e,
            }
            assert!(held.len() < 64, "the lowered limit does not bite");
        };
        assert!(!held.is_empty());
        assert_eq!(err.raw_os_error(), Some(nix::libc::EMFILE), "{err}");
        assert_eq!(stats.pipe_waits.load(Ordering::Relaxed), 1);
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), held.len());
        // Once a pipe is back, taking works again: from the pool, with no new descriptor.
        pool.give(held.pop().unwrap());
        let again = pool.take().unwrap();
        assert_eq!(stats.pipes_in_use.load(Ordering::Relaxed), held.len() + 1);
        pool.give(again);
    }
}
