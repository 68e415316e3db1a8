//! Per-session traffic counters and where they come from: the kernel (Sluice's cgroup_skb programs,
//! loaded by `sluice-ebpf`, keyed by each leg's socket cookie) when BPF can load, else the relay's
//! own syscall results. The source is chosen once at start and logged once; `--counters` forces it
//! (`userspace` is how tests and benches compare the two).
//!
//! Each session's two cookies are registered when the session is taken over and their map entries
//! removed when it ends, so the map holds exactly the live sessions' legs.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use sluice_ebpf::{socket_cookie, Counters, Options, SockCounters};
use thiserror::Error;
use tracing::{info, warn};

use sluice_handoff::handoff::{CounterBaseline, CounterSource, LegCounters, SessionCounters};

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
    /// The cgroup the programs observe (with BPF counters).
    cgroup: Option<std::path::PathBuf>,
    /// Sessions counted by BPF.
    cookies: Mutex<HashMap<String, Registered>>,
}

/// A session's legs as registered with the BPF map.
#[derive(Debug, Clone, Copy)]
struct Registered {
    /// `[client, upstream]` socket cookies.
    cookies: [u64; 2],
    /// Per leg, bytes the kernel had received but the data plane not yet read when counting
    /// began (the relay will move them), added to rx.
    queued_rx: [u64; 2],
    /// Per leg, the kernel's `bytes_received` at registration: the programs store the absolute
    /// count, the session's share is what came after (plus `queued_rx`).
    rx_at_registration: [u64; 2],
    /// Per leg, bytes control wrote that the kernel had not yet sent when counting began (they
    /// will pass the egress program, though the relay did not move them), taken off tx.
    unsent_tx: [u64; 2],
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionCounting {
    /// Chooses the source for `mode`; the BPF map is pinned under the instance's directory and
    /// the programs attached to `cgroup` (default: this process's cgroup, see `sluice_ebpf`).
    pub fn start(mode: Mode, instance: &str, cgroup: Option<PathBuf>) -> Result<SessionCounting, CountersError> {
        Self::start_opts(mode, instance, cgroup, false)
    }

    /// As [`SessionCounting::start`]; `takeover`: the entries in the pinned map belong to
    /// sessions a predecessor is about to pass on, and are kept.
    pub fn start_opts(
        mode: Mode,
        instance: &str,
        cgroup: Option<PathBuf>,
        takeover: bool,
    ) -> Result<SessionCounting, CountersError> {
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
                        // Unless it passes them on, the previous process's sessions died with it
                        // (it held their only sockets), so what it left in the pinned map is stale.
                        let stale = if takeover { Vec::new() } else { c.cookies() };
                        for cookie in &stale {
                            let _ = c.remove(*cookie);
                        }
                        info!(
                            source = "bpf",
                            cgroup = %c.cgroup().display(),
                            pin_dir = ?opts.pin_dir,
                            stale_entries_removed = stale.len(),
                            adopted_from_predecessor = c.adopted(),
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
        let cgroup = bpf.as_ref().map(|c| lock(c).cgroup().to_path_buf());
        Ok(SessionCounting { bpf, cgroup, cookies: Mutex::new(HashMap::new()) })
    }

    /// The relay's counts only (tests of the relay without a process-wide choice).
    pub fn userspace() -> SessionCounting {
        SessionCounting { bpf: None, cgroup: None, cookies: Mutex::new(HashMap::new()) }
    }

    /// With BPF counters: the cgroup whose sockets they see.
    pub fn cgroup(&self) -> Option<&std::path::Path> {
        self.cgroup.as_deref()
    }

    /// Warns when the control at the other end of a link runs outside the counted cgroup: the
    /// sockets it creates would go uncounted (the sessions would show no traffic).
    pub fn check_peer_cgroup(&self, peer_pid: u32) {
        let Some(counted) = &self.cgroup else { return };
        let Ok(mount) = sluice_handoff::cgroup::mount() else { return };
        let Ok(peer) = sluice_handoff::cgroup::relative_of(Some(peer_pid)) else { return };
        let Ok(rel) = counted.strip_prefix(&mount) else { return };
        let rel = format!("/{}", rel.display());
        if !sluice_handoff::cgroup::is_within(&peer, &rel) {
            warn!(
                control_pid = peer_pid,
                control_cgroup = %peer,
                counted_cgroup = %counted.display(),
                "control runs outside the cgroup the BPF counters observe: its sessions' sockets will not be \
                 counted; run both in one cgroup (sluice.slice, a container) or pass --bpf-cgroup"
            );
        }
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
        // cgroup_skb sees IP packets only: a session with a Unix-socket leg (a local client)
        // keeps the relay's counts, which are exact for it.
        if !(is_inet(client) && is_inet(upstream)) {
            return;
        }
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
        // Read after the entries exist. The queue and the kernel's count are read one after the
        // other: a segment landing in between (microseconds, while the client waits for its
        // first reply) would be counted twice.
        let rx_at_registration = [bytes_received(client), bytes_received(upstream)];
        let queued_rx = [queued(client, nix::libc::FIONREAD), queued(upstream, nix::libc::FIONREAD)];
        let unsent_tx = [queued(client, SIOCOUTQNSD), queued(upstream, SIOCOUTQNSD)];
        lock(&self.cookies).insert(id.to_owned(), Registered { cookies, queued_rx, rx_at_registration, unsent_tx });
    }

    /// What a successor needs to go on counting the session where this process stops: its
    /// registration's adjustments. `None` when the session is on the relay's counts. Forgets the
    /// session without touching its map entries.
    pub fn pass_on(&self, id: &str) -> Option<CounterBaseline> {
        let r = lock(&self.cookies).remove(id)?;
        Some(CounterBaseline {
            cookies: r.cookies,
            queued_rx: r.queued_rx,
            rx_at_registration: r.rx_at_registration,
            unsent_tx: r.unsent_tx,
        })
    }

    /// Goes on counting a session a predecessor passed on. With its `baseline` and BPF here, its
    /// existing map entries keep counting (the cookies must be the legs'); otherwise the session
    /// stays on the relay's counts, which came with it.
    pub fn resume(
        &self,
        id: &str,
        baseline: Option<CounterBaseline>,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) {
        let (Some(bpf), Some(b)) = (&self.bpf, baseline) else { return };
        match (socket_cookie(client), socket_cookie(upstream)) {
            (Ok(c), Ok(u)) if [c, u] == b.cookies => {}
            _ => {
                warn!(session_id = %id, "a resumed session's cookies do not match its sockets; it uses the relay's counts");
                return;
            }
        }
        let mut map = lock(bpf);
        for cookie in b.cookies {
            // Kept if present (the usual case): the programs went on counting into it.
            if let Err(e) = map.register(cookie) {
                warn!(session_id = %id, error = %e, "re-registering a resumed session's socket failed");
            }
        }
        let r = Registered {
            cookies: b.cookies,
            queued_rx: b.queued_rx,
            rx_at_registration: b.rx_at_registration,
            unsent_tx: b.unsent_tx,
        };
        lock(&self.cookies).insert(id.to_owned(), r);
    }

    /// Keeps the programs counting after this process exits, for a successor to adopt (see
    /// `sluice_ebpf::Counters::pin_links`). Nothing to do on the relay's counts.
    pub fn pin_for_successor(&self) {
        if let Some(bpf) = &self.bpf {
            match lock(bpf).pin_links() {
                Ok(()) => info!("BPF program links pinned for the successor"),
                Err(e) => warn!(error = %e, "pinning the BPF program links failed; the successor attaches its own"),
            }
        }
    }

    /// The session's counters so far; `wire` is the relay's own per-leg count
    /// (`[client, upstream]` × `[rx, tx]`, see `relay::Report::wire`), used without BPF.
    pub fn snapshot(&self, id: &str, wire: [[u64; 2]; 2]) -> SessionCounters {
        self.read(id, wire, false)
    }

    /// The session's final counters; its map entries are removed.
    pub fn finish(&self, id: &str, wire: [[u64; 2]; 2]) -> SessionCounters {
        self.read(id, wire, true)
    }

    fn read(&self, id: &str, wire: [[u64; 2]; 2], remove: bool) -> SessionCounters {
        let leg = |w: [u64; 2]| LegCounters { rx_bytes: w[0], tx_bytes: w[1], ..Default::default() };
        let userspace =
            SessionCounters { source: CounterSource::Userspace, client: leg(wire[0]), upstream: leg(wire[1]) };
        let Some(bpf) = &self.bpf else { return userspace };
        let cookies = if remove { lock(&self.cookies).remove(id) } else { lock(&self.cookies).get(id).copied() };
        let Some(Registered { cookies: [c, u], queued_rx, rx_at_registration, unsent_tx }) = cookies else {
            return userspace;
        };
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
        let adjust = |mut l: LegCounters, i: usize| {
            let base = rx_at_registration[i];
            l.rx_bytes = l.rx_bytes.max(base) - base + queued_rx[i];
            l.tx_bytes = l.tx_bytes.saturating_sub(unsent_tx[i]);
            l
        };
        match (client, upstream) {
            (Some(client), Some(upstream)) => {
                SessionCounters { source: CounterSource::Bpf, client: adjust(client, 0), upstream: adjust(upstream, 1) }
            }
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

fn is_inet(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|a| matches!(a.family(), Some(AddressFamily::Inet | AddressFamily::Inet6)))
}

/// `SIOCOUTQNSD`: bytes in a TCP socket's send queue not yet sent (linux/sockios.h).
const SIOCOUTQNSD: nix::libc::c_ulong = 0x894b;

/// A socket-queue size ioctl (`FIONREAD`, `SIOCOUTQNSD`); 0 if the socket cannot tell.
fn queued(fd: BorrowedFd<'_>, request: nix::libc::c_ulong) -> u64 {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer, which points at `n`; `fd` is a
    // live socket for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), request as _, &mut n as *mut nix::libc::c_int) };
    if rc == 0 && n > 0 {
        n as u64
    } else {
        0
    }
}

/// The kernel's `tcpi_bytes_received` (in-order payload received since the connection opened); 0
/// if the socket cannot tell.
fn bytes_received(fd: BorrowedFd<'_>) -> u64 {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info` and stores the length written;
    // `fd` is a live socket for the duration of the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            (&mut info as *mut nix::libc::tcp_info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(nix::libc::tcp_info, tcpi_bytes_received) + 8;
    if rc == 0 && len as usize >= needed {
        info.tcpi_bytes_received
    } else {
        0
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
