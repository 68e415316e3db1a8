//! The data plane's eBPF loader: loads Sluice's per-socket counter programs
//! (`ebpf/programs/sluice.bpf.c`, compiled by `build.rs` and embedded) with aya, attaches them to
//! a cgroup v2, and reads the per-socket counters map by socket cookie.
//!
//! Which cgroup: a socket belongs to the cgroup it was *created* in, and accepted sockets take the
//! listener's. Control creates both legs of a session (the client leg by `accept()` on its
//! listener, the upstream leg by `connect()`) and only then hands them to the data plane, so the
//! programs must see the cgroup control runs in. The default is the data plane's own cgroup, which
//! is control's when both run in one service or container; deploy them apart and `--bpf-cgroup`
//! must name control's cgroup (or a common ancestor). Both leave the hierarchy's root cgroup for
//! `sluice` below it when started there (`sluice_handoff::cgroup`), so the programs never run for
//! the whole host's traffic.
//!
//! The map is pinned under `/sys/fs/bpf/sluice/<instance>/` (bpffs is mounted there if needed)
//! and reused on the next load, so a restarted data plane finds the counters it left. Only
//! registered sockets are counted: [`Counters::register`] inserts a zeroed entry, the programs
//! only update existing entries, and [`Counters::remove`] deletes it at session end.
//!
//! A data plane handing its sessions to a successor pins its program links beside the map
//! ([`Counters::pin_links`]); the successor's [`Counters::load`] adopts them instead of attaching
//! programs of its own. So the programs never stop counting the sessions passed on, and never
//! count them twice (two attached sets would both add to the one map).

use std::error::Error as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
pub use sluice_ebpf_common::{SockCounters, SockKey, SOCK_COUNTERS_MAP};
use thiserror::Error;

/// The compiled programs (clang -target bpf), aligned as the ELF parser needs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

/// The C header the programs and [`SockCounters`] share; the layout test parses its constants.
pub const HEADER: &str = include_str!("../../programs/sluice.h");

/// Root of Sluice's pins on bpffs; each data-plane instance has its own directory below it.
pub const PIN_ROOT: &str = "/sys/fs/bpf/sluice";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("no cgroup v2 hierarchy is mounted")]
    NoCgroup2,
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("preparing the bpffs pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {name}: {error}{}", error.source().map(|s| format!(": {s}")).unwrap_or_default())]
    Program { name: &'static str, error: ProgramError },
    #[error("the eBPF object lacks {0}")]
    Missing(&'static str),
    #[error("eBPF map: {0}")]
    Map(#[from] MapError),
    #[error("eBPF link {path}: {error}")]
    Link { path: PathBuf, error: String },
}

impl LoadError {
    /// Whether this machine or process cannot run the programs at all (no privilege, no cgroup v2
    /// or bpffs, no BPF syscall), as opposed to the programs or the loader being wrong. Tests skip
    /// the BPF half on such machines, saying why.
    pub fn is_unavailable(&self) -> bool {
        use nix::libc::{EACCES, ENOSYS, EOPNOTSUPP, EPERM};
        match self {
            LoadError::NoCgroup2 | LoadError::Cgroup { .. } | LoadError::PinDir { .. } => true,
            _ => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
                while let Some(e) = cur {
                    if let Some(io) = e.downcast_ref::<std::io::Error>() {
                        if matches!(io.raw_os_error(), Some(EPERM | EACCES | ENOSYS | EOPNOTSUPP)) {
                            return true;
                        }
                    }
                    cur = e.source();
                }
                false
            }
        }
    }
}

/// Where to attach and pin.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cgroup v2 directory whose sockets are observed; `None`: this process's own cgroup.
    pub cgroup: Option<PathBuf>,
    /// Pin directory of the counters map; `None`: not pinned (counters die with the process).
    pub pin_dir: Option<PathBuf>,
}

impl Options {
    /// The defaults for data-plane instance `instance`: own cgroup, pinned under [`PIN_ROOT`].
    pub fn for_instance(instance: &str) -> Options {
        Options { cgroup: None, pin_dir: Some(Path::new(PIN_ROOT).join(instance)) }
    }
}

/// Loaded and attached programs with their counters map; detached when dropped (the pinned map
/// stays).
pub struct Counters {
    map: HashMap<MapData, SockKey, SockCounters>,
    cgroup: PathBuf,
    pin_dir: Option<PathBuf>,
    /// The cgroup links (ingress, egress): dropping them detaches the programs, unless pinned.
    links: Vec<OwnedLink>,
    /// The programs, when this process loaded them (not when it adopted a predecessor's links).
    _ebpf: Option<Ebpf>,
}

enum OwnedLink {
    Fd(FdLink),
    /// Pinned for a successor; stays attached after this process exits.
    Pinned(PinnedLink),
}

/// Pin names of the links a data plane leaves for its successor.
const LINK_PINS: [&str; 2] = ["sluice_ingress_link", "sluice_egress_link"];

impl Counters {
    /// Loads the programs, reusing the pinned map if one exists, and attaches them (ingress and
    /// egress) to the cgroup, alongside any other programs there.
    pub fn load(opts: &Options) -> Result<Counters, LoadError> {
        let loaded = Self::load_inner(opts);
        if let (Err(_), Some(dir)) = (&loaded, &opts.pin_dir) {
            // Only removes the directory if nothing was pinned in it (a failed first load).
            let _ = std::fs::remove_dir(dir);
        }
        loaded
    }

    fn load_inner(opts: &Options) -> Result<Counters, LoadError> {
        let cgroup = match &opts.cgroup {
            Some(c) => c.clone(),
            None => own_cgroup()?,
        };
        let cgroup_dir =
            std::fs::File::open(&cgroup).map_err(|source| LoadError::Cgroup { path: cgroup.clone(), source })?;
        if let Some(dir) = &opts.pin_dir {
            prepare_pin_dir(dir).map_err(|source| LoadError::PinDir { path: dir.clone(), source })?;
        }
        if let Some(dir) = &opts.pin_dir {
            if let Some(adopted) = Self::adopt(dir, &cgroup)? {
                return Ok(adopted);
            }
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &opts.pin_dir {
            loader.default_map_pin_directory(dir);
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        let mut links = Vec::new();
        for (name, attach) in
            [("sluice_ingress", CgroupSkbAttachType::Ingress), ("sluice_egress", CgroupSkbAttachType::Egress)]
        {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(LoadError::Missing(name))?
                .try_into()
                .map_err(|error| LoadError::Program { name, error })?;
            prog.load().map_err(|error| LoadError::Program { name, error })?;
            // aya attaches with a bpf_link (kernel ≥ 5.7), which always coexists with other programs
            // of the cgroup and takes no flags: any mode but Single is refused with EINVAL.
            let id = prog
                .attach(cgroup_dir.as_fd(), attach, CgroupAttachMode::Single)
                .map_err(|error| LoadError::Program { name, error })?;
            let link = prog.take_link(id).map_err(|error| LoadError::Program { name, error })?;
            let link = FdLink::try_from(link)
                .map_err(|e| LoadError::Link { path: cgroup.clone(), error: format!("{name}: {e}") })?;
            links.push(OwnedLink::Fd(link));
        }
        let map = ebpf.take_map(SOCK_COUNTERS_MAP).ok_or(LoadError::Missing(SOCK_COUNTERS_MAP))?;
        let map = HashMap::try_from(map)?;
        Ok(Counters { map, cgroup, pin_dir: opts.pin_dir.clone(), links, _ebpf: Some(ebpf) })
    }

    /// Takes over the links and map a predecessor pinned in `dir` for its successor, if it did.
    fn adopt(dir: &Path, cgroup: &Path) -> Result<Option<Counters>, LoadError> {
        if !LINK_PINS.iter().all(|n| dir.join(n).exists()) {
            return Ok(None);
        }
        let mut links = Vec::new();
        for name in LINK_PINS {
            let path = dir.join(name);
            let pinned = PinnedLink::from_pin(&path)
                .map_err(|e| LoadError::Link { path: path.clone(), error: e.to_string() })?;
            // Ours now: unpinned, it stays attached exactly as long as this process holds it.
            let fd = pinned.unpin().map_err(|e| LoadError::Link { path: path.clone(), error: e.to_string() })?;
            links.push(OwnedLink::Fd(fd));
        }
        let data = MapData::from_pin(dir.join(SOCK_COUNTERS_MAP))?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))?;
        Ok(Some(Counters { map, cgroup: cgroup.to_path_buf(), pin_dir: Some(dir.to_path_buf()), links, _ebpf: None }))
    }

    /// Pins the program links beside the map so that they stay attached after this process
    /// exits, for a successor's [`Counters::load`] to adopt.
    pub fn pin_links(&mut self) -> Result<(), LoadError> {
        let Some(dir) = self.pin_dir.clone() else {
            return Err(LoadError::Link { path: PathBuf::new(), error: "no pin directory".into() });
        };
        let mut result = Ok(());
        for (link, name) in std::mem::take(&mut self.links).into_iter().zip(LINK_PINS) {
            let path = dir.join(name);
            match link {
                OwnedLink::Pinned(p) => self.links.push(OwnedLink::Pinned(p)),
                OwnedLink::Fd(fd) => {
                    // A pin left by an earlier, failed takeover would make BPF_OBJ_PIN fail.
                    let _ = std::fs::remove_file(&path);
                    // aya's pin consumes the link: on failure it is gone (detached), which the
                    // error reports; the successor then attaches programs of its own.
                    match fd.pin(&path) {
                        Ok(p) => self.links.push(OwnedLink::Pinned(p)),
                        Err(e) => result = Err(LoadError::Link { path, error: e.to_string() }),
                    }
                }
            }
        }
        result
    }

    /// Whether the programs came attached from a predecessor (see [`Counters::pin_links`]).
    pub fn adopted(&self) -> bool {
        self._ebpf.is_none()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts counting the socket with this cookie. An entry already there (a restarted data
    /// plane taking over its pinned map) keeps its counts.
    pub fn register(&mut self, cookie: u64) -> Result<(), MapError> {
        const BPF_NOEXIST: u64 = 1;
        match self.map.insert(SockKey { cookie }, SockCounters::default(), BPF_NOEXIST) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The socket's counters, `None` if it is not registered.
    pub fn get(&self, cookie: u64) -> Result<Option<SockCounters>, MapError> {
        match self.map.get(&SockKey { cookie }, 0) {
            Ok(c) => Ok(Some(c)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stops counting the socket and drops its entry; an absent entry is not an error.
    pub fn remove(&mut self, cookie: u64) -> Result<(), MapError> {
        match self.map.remove(&SockKey { cookie }) {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Registered sockets (map entries).
    pub fn len(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cookies of every registered socket (after a restart: those the previous process left).
    pub fn cookies(&self) -> Vec<u64> {
        self.map.keys().filter_map(Result::ok).map(|k| k.cookie).collect()
    }

    /// Removes the pinned map (a clean shutdown with no live session has nothing to keep).
    pub fn unpin(&self) {
        if let Some(dir) = &self.pin_dir {
            for name in LINK_PINS {
                let _ = std::fs::remove_file(dir.join(name));
            }
            let _ = std::fs::remove_file(dir.join(SOCK_COUNTERS_MAP));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Entries of the counters map pinned in `pin_dir` (another process's: tests check that a data
/// plane leaves none behind for ended sessions).
pub fn pinned_entries(pin_dir: &Path) -> Result<usize, LoadError> {
    let data = MapData::from_pin(pin_dir.join(SOCK_COUNTERS_MAP))?;
    let map: HashMap<MapData, SockKey, SockCounters> = HashMap::try_from(aya::maps::Map::HashMap(data))?;
    Ok(map.keys().filter(Result::is_ok).count())
}

/// The kernel's socket cookie (`SO_COOKIE`), the key the programs count under.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: SO_COOKIE writes one u64 into `cookie`, whose size `len` states; `fd` is a live
    // descriptor for the duration of the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// This process's cgroup v2 directory (the `0::` line of /proc/self/cgroup under the cgroup2
/// mount).
pub fn own_cgroup() -> Result<PathBuf, LoadError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|_| LoadError::NoCgroup2)?;
    let mount = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next(), f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(LoadError::NoCgroup2)?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|_| LoadError::NoCgroup2)?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or(LoadError::NoCgroup2)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Creates the pin directory on bpffs, mounting bpffs on /sys/fs/bpf first where it is not.
fn prepare_pin_dir(dir: &Path) -> std::io::Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if !is_bpffs(bpffs) {
        nix::mount::mount(Some("bpf"), bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(std::io::Error::from)?;
    }
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir) {
        return Err(std::io::Error::other("not on a bpffs mount"));
    }
    Ok(())
}

// The statfs magic's type (__fsword_t) differs between architectures, hence the cast.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    fn define(name: &str) -> usize {
        HEADER
            .lines()
            .find_map(|l| l.strip_prefix("#define ")?.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from sluice.h"))
    }

    /// The C header (held to these numbers by static asserts in sluice.bpf.c) and the Rust types
    /// must agree byte for byte.
    #[test]
    fn rust_layout_matches_the_c_header() {
        assert_eq!(size_of::<SockKey>(), define("SLUICE_SOCK_KEY_SIZE "));
        assert_eq!(size_of::<SockCounters>(), define("SLUICE_SOCK_COUNTERS_SIZE "));
        assert_eq!(offset_of!(SockCounters, rx_bytes), define("SLUICE_OFF_RX_BYTES "));
        assert_eq!(offset_of!(SockCounters, tx_bytes), define("SLUICE_OFF_TX_BYTES "));
        assert_eq!(offset_of!(SockCounters, rx_packets), define("SLUICE_OFF_RX_PACKETS "));
        assert_eq!(offset_of!(SockCounters, tx_packets), define("SLUICE_OFF_TX_PACKETS "));
        assert_eq!(offset_of!(SockCounters, srtt_us), define("SLUICE_OFF_SRTT_US "));
        assert_eq!(offset_of!(SockCounters, total_retrans), define("SLUICE_OFF_TOTAL_RETRANS "));
        assert_eq!(offset_of!(SockCounters, segs_in), define("SLUICE_OFF_SEGS_IN "));
        assert_eq!(offset_of!(SockCounters, segs_out), define("SLUICE_OFF_SEGS_OUT "));
        assert_eq!(offset_of!(SockCounters, rx_seq_next), define("SLUICE_OFF_RX_SEQ_NEXT "));
        assert_eq!(offset_of!(SockCounters, tx_seq_next), define("SLUICE_OFF_TX_SEQ_NEXT "));
        assert_eq!(offset_of!(SockCounters, flags), define("SLUICE_OFF_FLAGS "));
        assert!(HEADER.contains(&format!("#define SLUICE_SOCK_COUNTERS_MAP {SOCK_COUNTERS_MAP}")));
    }
}
