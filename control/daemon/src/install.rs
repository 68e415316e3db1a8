//! `control install systemd`: the unit files that run Sluice as the seed's step 3 runs Teleport
//! (`teleport install systemd`), written from the control config they serve. Three units:
//!
//! * `sluice.slice`: both processes run in it, so its cgroup holds every socket control opens and
//!   hands off, and the data plane attaches its eBPF counters there (`--bpf-cgroup`), never to the
//!   host's root cgroup.
//! * `sluice-dataplane@.service`: the data plane, an instance per generation. Each instance starts
//!   with `--take-over-if-running`: starting a new one while another runs moves the live sessions
//!   to it and the old one exits, which is how a package upgrade keeps sessions
//!   (`systemctl start sluice-dataplane@$(date +%s)`); with none running it starts afresh.
//!   Root's uid (it pins maps in bpffs, which only root may enter) but only the capabilities the
//!   eBPF programs and io_uring need.
//! * `sluice-control.service`: the daemon, with no capability at all unless it binds a port
//!   below 1024.
//!
//! Generating is pure ([`systemd_units`]); the tests check the result with `systemd-analyze
//! verify` and run the `ExecStart=` lines as written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What the units are written for.
#[derive(Debug, Clone)]
pub struct UnitOptions {
    pub control_bin: PathBuf,
    pub dataplane_bin: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    /// `dataplane.socket` from the config; no data plane unit without one.
    pub dataplane_socket: Option<PathBuf>,
    /// Other directories control writes to (local sockets, the audit file's).
    pub writable: Vec<PathBuf>,
    /// The cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup_root: PathBuf,
    /// Some listener binds a port below 1024.
    pub privileged_port: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// systemd splits `ExecStart=` on whitespace; quoting paths is possible but a path with a
    /// space or `%` is almost always a mistake here.
    #[error("{0}: paths in unit files must not contain whitespace, quotes, '%' or '\\\\'")]
    UnsafePath(PathBuf),
}

pub const SLICE: &str = "sluice.slice";
pub const CONTROL_UNIT: &str = "sluice-control.service";
pub const DATAPLANE_TEMPLATE: &str = "sluice-dataplane@.service";
/// The data plane instance enabled at boot.
pub const DATAPLANE_BOOT: &str = "sluice-dataplane@boot.service";

/// The capabilities the data plane keeps: loading BPF programs and maps (CAP_BPF), tracepoint
/// programs (CAP_PERFMON), cgroup_skb/sock_ops programs and kTLS (CAP_NET_ADMIN), and locked
/// memory for maps and io_uring rings on kernels that still charge RLIMIT_MEMLOCK
/// (CAP_SYS_RESOURCE).
pub const DATAPLANE_CAPS: &[&str] = &["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"];

/// Hardening both services share.
const HARDENING: &str = "NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RuntimeDirectory=sluice
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
UMask=0077
";

fn checked(path: &Path) -> Result<String, InstallError> {
    let text = path.to_string_lossy();
    let unsafe_char = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '%' | '\\');
    if text.is_empty() || text.chars().any(unsafe_char) || !path.is_absolute() {
        return Err(InstallError::UnsafePath(path.to_path_buf()));
    }
    Ok(text.into_owned())
}

/// Directories in order, without repeats, each marked `-` (a directory that does not exist yet
/// does not stop the service from starting; it stays read-only until it does).
fn paths(list: &[PathBuf]) -> Result<String, InstallError> {
    let mut seen: Vec<String> = Vec::new();
    for p in list {
        let p = format!("-{}", checked(p)?);
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    Ok(seen.join(" "))
}

/// `StateDirectory=` for a data directory under /var/lib (systemd creates it, 0700, writable).
fn state_directory(data_dir: &Path) -> String {
    match data_dir.strip_prefix("/var/lib") {
        Ok(rest) if !rest.as_os_str().is_empty() => {
            format!("StateDirectory={}\nStateDirectoryMode=0700\n", rest.display())
        }
        _ => String::new(),
    }
}

/// `PrivateTmp=yes` unless a path the two processes share is under a temporary directory: each
/// unit would see its own, and control would not find the data plane's socket.
fn private_tmp(o: &UnitOptions) -> &'static str {
    let shared = o.dataplane_socket.iter().chain([&o.data_dir]).chain(&o.writable);
    let tmp = |p: &PathBuf| p.starts_with("/tmp") || p.starts_with("/var/tmp");
    if shared.into_iter().any(tmp) {
        ""
    } else {
        "PrivateTmp=yes\n"
    }
}

/// The unit files, as (file name, contents).
pub fn systemd_units(o: &UnitOptions) -> Result<Vec<(&'static str, String)>, InstallError> {
    let control = checked(&o.control_bin)?;
    let private_tmp = private_tmp(o);
    let config = checked(&o.config_path)?;
    let slice_cgroup = o.cgroup_root.join(SLICE);
    let mut units = vec![(
        SLICE,
        "[Unit]\n\
         Description=Sluice database access proxy (control and data plane)\n\
         Before=slices.target\n"
            .to_owned(),
    )];

    let mut dataplane_after = String::new();
    if let Some(socket) = &o.dataplane_socket {
        let dataplane = checked(&o.dataplane_bin)?;
        let socket_dir = socket.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/run/sluice"));
        let caps = DATAPLANE_CAPS.join(" ");
        let mut unit = String::new();
        let _ = write!(
            unit,
            "[Unit]\n\
             Description=Sluice data plane (%i)\n\
             After=network.target\n\
             \n\
             [Service]\n\
             Type=simple\n\
             Slice={SLICE}\n\
             # A new instance takes the running one's sessions over; with none running it starts afresh.\n\
             ExecStart={dataplane} --control-socket {socket} --bpf-cgroup {cgroup} --take-over-if-running\n\
             Restart=on-failure\n\
             RestartSec=1s\n\
             # SIGTERM ends the sessions cleanly; an instance that handed them over has already exited.\n\
             TimeoutStopSec=30s\n\
             CapabilityBoundingSet={caps}\n\
             AmbientCapabilities={caps}\n\
             ReadWritePaths={rw}\n\
             LimitNOFILE=65536\n\
             LimitMEMLOCK=infinity\n\
             {private_tmp}\
             {HARDENING}\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            socket = checked(socket)?,
            cgroup = checked(&slice_cgroup)?,
            rw = paths(&[socket_dir, PathBuf::from("/sys/fs/bpf")])?,
        );
        units.push((DATAPLANE_TEMPLATE, unit));
        dataplane_after = format!(" {DATAPLANE_BOOT}");
    }

    let caps = if o.privileged_port { "CAP_NET_BIND_SERVICE" } else { "" };
    let mut writable = vec![o.data_dir.clone()];
    if let Some(socket) = &o.dataplane_socket {
        writable.extend(socket.parent().map(Path::to_path_buf));
    }
    writable.extend(o.writable.iter().cloned());
    let mut unit = String::new();
    let _ = write!(
        unit,
        "[Unit]\n\
         Description=Sluice control (auth, proxy and database services)\n\
         Wants=network-online.target\n\
         After=network-online.target{dataplane_after}\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Slice={SLICE}\n\
         ExecStart={control} --config {config} start\n\
         Restart=on-failure\n\
         RestartSec=1s\n\
         # Sessions handed to the data plane outlive control: stopping it ends none of them.\n\
         TimeoutStopSec=15s\n\
         CapabilityBoundingSet={caps}\n\
         AmbientCapabilities={caps}\n\
         {state}\
         ReadWritePaths={rw}\n\
         LimitNOFILE=65536\n\
         {private_tmp}\
         {HARDENING}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        state = state_directory(&o.data_dir),
        rw = paths(&writable)?,
    );
    units.push((CONTROL_UNIT, unit));
    Ok(units)
}

/// `/sys/fs/cgroup` where it is the cgroup v2 mount, `/sys/fs/cgroup/unified` on hybrid hosts.
pub fn cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() && unified.join("cgroup.controllers").exists() {
        return unified.to_path_buf();
    }
    PathBuf::from("/sys/fs/cgroup")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> UnitOptions {
        UnitOptions {
            control_bin: "/usr/local/bin/control".into(),
            dataplane_bin: "/usr/local/bin/dataplane".into(),
            config_path: "/etc/sluice/control.yaml".into(),
            data_dir: "/var/lib/sluice".into(),
            dataplane_socket: Some("/run/sluice/dataplane.sock".into()),
            writable: vec!["/run/sluice/pg".into(), "/var/lib/sluice".into()],
            cgroup_root: "/sys/fs/cgroup".into(),
            privileged_port: false,
        }
    }

    fn line<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        unit.lines().filter_map(|l| l.strip_prefix(key)).collect()
    }

    #[test]
    fn the_data_plane_keeps_only_what_it_needs_and_takes_over_on_start() {
        let units = systemd_units(&options()).unwrap();
        let names: Vec<_> = units.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [SLICE, DATAPLANE_TEMPLATE, CONTROL_UNIT]);
        let dp = &units[1].1;
        assert_eq!(
            line(dp, "ExecStart="),
            ["/usr/local/bin/dataplane --control-socket /run/sluice/dataplane.sock --bpf-cgroup /sys/fs/cgroup/sluice.slice --take-over-if-running"]
        );
        assert_eq!(line(dp, "CapabilityBoundingSet="), ["CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_RESOURCE"]);
        assert_eq!(line(dp, "ReadWritePaths="), ["-/run/sluice -/sys/fs/bpf"]);
        assert_eq!(line(dp, "Slice="), [SLICE]);
        let control = &units[2].1;
        assert_eq!(line(control, "ExecStart="), ["/usr/local/bin/control --config /etc/sluice/control.yaml start"]);
        assert_eq!(line(control, "CapabilityBoundingSet="), [""], "control needs no capability");
        assert_eq!(line(control, "ReadWritePaths="), ["-/var/lib/sluice -/run/sluice -/run/sluice/pg"]);
        assert_eq!(line(control, "StateDirectory="), ["sluice"]);
        assert!(control.contains("After=network-online.target sluice-dataplane@boot.service"));
        for (_, u) in &units[1..] {
            for key in ["NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure"] {
                assert!(u.lines().any(|l| l == key), "{key} missing");
            }
        }
    }

    #[test]
    fn low_ports_and_missing_data_planes_change_the_units() {
        let mut o = options();
        o.privileged_port = true;
        o.dataplane_socket = None;
        let units = systemd_units(&o).unwrap();
        assert_eq!(units.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [SLICE, CONTROL_UNIT]);
        assert_eq!(line(&units[1].1, "CapabilityBoundingSet="), ["CAP_NET_BIND_SERVICE"]);
        assert!(!units[1].1.contains("sluice-dataplane@"));
    }

    #[test]
    fn a_socket_under_tmp_keeps_tmp_shared() {
        let mut o = options();
        assert!(systemd_units(&o).unwrap().iter().skip(1).all(|(_, u)| u.contains("\nPrivateTmp=yes\n")));
        o.dataplane_socket = Some("/tmp/sluice/dataplane.sock".into());
        assert!(systemd_units(&o).unwrap().iter().all(|(_, u)| !u.contains("PrivateTmp")));
    }

    #[test]
    fn paths_that_systemd_would_split_or_expand_are_refused() {
        for bad in ["/opt/my sluice/control", "relative/control", "/opt/50%/control", "/opt/\"q\"/control"] {
            let mut o = options();
            o.control_bin = bad.into();
            assert!(systemd_units(&o).is_err(), "{bad}");
        }
    }
}
