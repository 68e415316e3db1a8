//! Where the sockets of Sluice's sessions live in the cgroup v2 tree: part of the contract between
//! control and a data plane, since the data plane's eBPF counters attach to a cgroup and only see
//! the sockets created in it (accepted sockets take their listener's), and control creates both
//! legs of every session.
//!
//! Under systemd both run in `sluice.slice`; in a container both share the container's cgroup.
//! Started by hand (the demo, the tests, a shell), both would sit in the hierarchy's root cgroup,
//! and programs attached there run for every packet of every process on the host. So a process
//! that finds itself in the root cgroup moves to [`GROUP`] below it, and the data plane's counters
//! attach there: they then cost only Sluice's own traffic.

use std::io;
use std::path::{Path, PathBuf};

/// The cgroup (below the cgroup v2 mount) that control and the data plane move to when they
/// start in the root cgroup.
pub const GROUP: &str = "sluice";

/// The cgroup v2 mount: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
pub fn mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next(), f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 hierarchy is mounted"))
}

/// The cgroup v2 path of a process (`self` when `pid` is `None`) relative to the hierarchy's
/// root: `/` for the root cgroup.
pub fn relative_of(pid: Option<u32>) -> io::Result<String> {
    let file = match pid {
        Some(p) => format!("/proc/{p}/cgroup"),
        None => "/proc/self/cgroup".to_owned(),
    };
    parse_v2_line(&std::fs::read_to_string(file)?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the process is in no cgroup v2"))
}

fn parse_v2_line(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(|r| r.trim().to_owned())
}

/// Whether a process's cgroup (as [`relative_of`] gives it) is `group` or inside it.
pub fn is_within(relative: &str, group: &str) -> bool {
    let group = group.trim_end_matches('/');
    group.is_empty() || relative == group || relative.strip_prefix(group).is_some_and(|rest| rest.starts_with('/'))
}

/// Moves this process into `<mount>/`[`GROUP`] when it is in the root cgroup, creating that
/// cgroup; returns the cgroup it moved to, or `None` when it was already in a cgroup of its
/// own (a systemd unit, a container), which is left as it is. Must run before the process
/// creates the sockets that are to be counted: a socket stays in the cgroup it was created in.
pub fn leave_root() -> io::Result<Option<PathBuf>> {
    if relative_of(None)? != "/" {
        return Ok(None);
    }
    let group = mount()?.join(GROUP);
    enter(&group)?;
    Ok(Some(group))
}

/// Creates `group` if needed and moves this whole process into it.
fn enter(group: &Path) -> io::Result<()> {
    match std::fs::create_dir(group) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // "0" names the writing process; cgroup.procs moves all of its threads.
    std::fs::write(group.join("cgroup.procs"), "0")
}

/// The cgroup whose sockets a data plane's counters observe when none is configured: its own,
/// unless that is the hierarchy's root, where [`GROUP`] below it (created, and entered by the data
/// plane too, so that `control` and it agree without being told).
pub fn counters_default() -> io::Result<PathBuf> {
    match leave_root()? {
        Some(group) => Ok(group),
        None => Ok(mount()?.join(relative_of(None)?.trim_start_matches('/'))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_v2_line_of_a_hybrid_host() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/x\n0::/sluice\n";
        assert_eq!(parse_v2_line(hybrid).as_deref(), Some("/sluice"));
        assert_eq!(parse_v2_line("1:cpu:/\n"), None);
        assert_eq!(parse_v2_line("0::/\n").as_deref(), Some("/"));
    }

    #[test]
    fn within_means_the_group_or_below_it() {
        assert!(is_within("/sluice", "/sluice"));
        assert!(is_within("/sluice/x", "/sluice/"));
        assert!(!is_within("/sluicey", "/sluice"));
        assert!(!is_within("/", "/sluice"));
        assert!(is_within("/anything", "/"));
    }
}
