//! Per-session traffic counters and where they come from: the kernel (Sluice's cgroup_skb programs,
//! loaded by `sluice-ebpf`, keyed by each leg's socket cookie) when BPF can load, else the relay's
//! own syscall results. The source is chosen once at start and logged once; `--counters` forces it
//! (`userspace` is how tests and benches compare the two).
//!
//! Each session's two cookies are registered when the session is taken over and their map entries
//! removed when it ends, so the map holds exactly the live sessions' legs.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use sluice_ebpf::{socket_cookie, Counters, Options, SockCounters};
use thiserror::Error;
use tracing::{info, warn};

use crate::handoff::{CounterSource, LegCounters, SessionCounters};

/// `--counters`: which source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// BPF where it loads (root or CAP_BPF+CAP_NET_ADMIN, cgroup v2), else userspace.
    Auto,
    /// BPF or fail to start.
    Bpf,
    /// The relay's own counts; BPF is not tried.
    Userspace,
}

#[derive(Debug, Error)]
pub enum CountersError {
    #[error("BPF counters were required (--counters bpf) but cannot load: {0}")]
    BpfRequired(sluice_ebpf::LoadError),
}

/// The counters of every live session.
pub struct SessionCounting {
    bpf: Option<Mutex<Counters>>,
    /// Session id → `[client, upstream]` socket cookies, for sessions counted by BPF.
    cookies: Mutex<HashMap<String, [u64; 2]>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionCounting {
    /// Chooses the source for `mode`; the BPF map is pinned under the instance's directory and
    /// the programs attached to `cgroup` (default: this process's cgroup, see `sluice_ebpf`).
    pub fn start(mode: Mode, instance: &str, cgroup: Option<PathBuf>) -> Result<SessionCounting, CountersError> {
        let bpf = match mode {
            Mode::Userspace => {
                info!(
                    source = "userspace",
                    "session counters: the relay's own counts (forced by --counters userspace)"
                );
                None
            }
            Mode::Auto | Mode::Bpf => {
                let opts = Options { cgroup, ..Options::for_instance(instance) };
                match Counters::load(&opts) {
                    Ok(mut c) => {
                        // The previous process's sessions died with it (it held their only
                        // sockets), so what it left in the pinned map is stale.
                        let stale = c.cookies();
                        for cookie in &stale {
                            let _ = c.remove(*cookie);
                        }
                        info!(
                            source = "bpf",
                            cgroup = %c.cgroup().display(),
                            pin_dir = ?opts.pin_dir,
                            stale_entries_removed = stale.len(),
                            "session counters: eBPF cgroup_skb programs"
                        );
                        Some(Mutex::new(c))
                    }
                    Err(e) if mode == Mode::Bpf => return Err(CountersError::BpfRequired(e)),
                    Err(e) => {
                        warn!(source = "userspace", error = %e, "session counters: eBPF unavailable, using the relay's own counts");
                        None
                    }
                }
            }
        };
        Ok(SessionCounting { bpf, cookies: Mutex::new(HashMap::new()) })
    }

    /// The relay's counts only (tests of the relay without a process-wide choice).
    pub fn userspace() -> SessionCounting {
        SessionCounting { bpf: None, cookies: Mutex::new(HashMap::new()) }
    }

    pub fn source(&self) -> CounterSource {
        if self.bpf.is_some() {
            CounterSource::Bpf
        } else {
            CounterSource::Userspace
        }
    }

    /// Starts counting a session's legs. A leg BPF cannot count (no cookie, map full) leaves the
    /// session on the relay's counts, with a warning; the session itself goes on.
    pub fn register(&self, id: &str, client: BorrowedFd<'_>, upstream: BorrowedFd<'_>) {
        let Some(bpf) = &self.bpf else { return };
        let cookies = match (socket_cookie(client), socket_cookie(upstream)) {
            (Ok(c), Ok(u)) => [c, u],
            (Err(e), _) | (_, Err(e)) => {
                warn!(session_id = %id, error = %e, "no socket cookie; this session uses the relay's counts");
                return;
            }
        };
        let mut map = lock(bpf);
        for (i, cookie) in cookies.iter().enumerate() {
            if let Err(e) = map.register(*cookie) {
                warn!(session_id = %id, error = %e, "registering a socket for BPF counting failed; this session uses the relay's counts");
                for c in &cookies[..i] {
                    let _ = map.remove(*c);
                }
                return;
            }
        }
        lock(&self.cookies).insert(id.to_owned(), cookies);
    }

    /// The session's counters so far; `c2u`/`u2c` are the relay's application bytes.
    pub fn snapshot(&self, id: &str, c2u: u64, u2c: u64) -> SessionCounters {
        self.read(id, c2u, u2c, false)
    }

    /// The session's final counters; its map entries are removed.
    pub fn finish(&self, id: &str, c2u: u64, u2c: u64) -> SessionCounters {
        self.read(id, c2u, u2c, true)
    }

    fn read(&self, id: &str, c2u: u64, u2c: u64, remove: bool) -> SessionCounters {
        let userspace = SessionCounters {
            source: CounterSource::Userspace,
            client: LegCounters { rx_bytes: c2u, tx_bytes: u2c, ..Default::default() },
            upstream: LegCounters { rx_bytes: u2c, tx_bytes: c2u, ..Default::default() },
        };
        let Some(bpf) = &self.bpf else { return userspace };
        let cookies = if remove { lock(&self.cookies).remove(id) } else { lock(&self.cookies).get(id).copied() };
        let Some([c, u]) = cookies else { return userspace };
        let mut map = lock(bpf);
        let leg = |map: &Counters, cookie: u64| match map.get(cookie) {
            Ok(v) => v.map(leg_counters),
            Err(e) => {
                warn!(session_id = %id, error = %e, "reading BPF counters");
                None
            }
        };
        let (client, upstream) = (leg(&map, c), leg(&map, u));
        if remove {
            for cookie in [c, u] {
                if let Err(e) = map.remove(cookie) {
                    warn!(session_id = %id, error = %e, "removing a BPF counters entry");
                }
            }
        }
        match (client, upstream) {
            (Some(client), Some(upstream)) => SessionCounters { source: CounterSource::Bpf, client, upstream },
            _ => userspace,
        }
    }

    /// Entries in the BPF map (0 with the userspace source).
    pub fn map_entries(&self) -> usize {
        self.bpf.as_ref().map(|b| lock(b).len()).unwrap_or(0)
    }

    /// At a clean stop with every session ended the pinned map has nothing worth keeping: it is
    /// unpinned (it goes with the process).
    pub fn unpin_if_empty(&self) {
        if let Some(bpf) = &self.bpf {
            let map = lock(bpf);
            if map.is_empty() {
                map.unpin();
            }
        }
    }
}

fn leg_counters(c: SockCounters) -> LegCounters {
    LegCounters {
        rx_bytes: c.rx_bytes,
        tx_bytes: c.tx_bytes,
        rx_packets: c.rx_packets,
        tx_packets: c.tx_packets,
        srtt_us: c.srtt_us,
        total_retrans: c.total_retrans,
    }
}
