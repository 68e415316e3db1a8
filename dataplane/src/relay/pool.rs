//! The per-worker pool of record-path buffers. A direction takes buffers only while it has bytes
//! in flight and returns them when drained, so idle sessions hold none and memory follows the
//! number of *active* directions, not of sessions.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Stats;

/// Holds several full TLS records (at most 18,437 bytes each) plus the sealing overhead.
pub(crate) const BUF_SIZE: usize = 64 * 1024;
/// Idle buffers kept for reuse; beyond this they are freed so a burst does not pin memory.
const MAX_FREE: usize = 64;

pub(crate) struct Pool {
    free: Vec<Box<[u8]>>,
    stats: Arc<Stats>,
}

impl Pool {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Pool { free: Vec::new(), stats }
    }

    pub(crate) fn take(&mut self) -> Box<[u8]> {
        self.stats.buffers_in_use.fetch_add(1, Ordering::Relaxed);
        self.free.pop().unwrap_or_else(|| {
            self.stats.buffers_allocated.fetch_add(1, Ordering::Relaxed);
            vec![0u8; BUF_SIZE].into_boxed_slice()
        })
    }

    pub(crate) fn give(&mut self, buf: Box<[u8]>) {
        self.stats.buffers_in_use.fetch_sub(1, Ordering::Relaxed);
        if self.free.len() < MAX_FREE {
            self.free.push(buf);
        } else {
            self.stats.buffers_allocated.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stats.buffers_allocated.fetch_sub(self.free.len(), Ordering::Relaxed);
    }
}
