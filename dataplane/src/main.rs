//! `dataplane`: the process that holds authenticated sessions and relays their bytes. It listens
//! on a Unix SOCK_SEQPACKET socket for control, which hands it both sockets of each session; it
//! outlives control restarts, and ends its sessions cleanly on SIGTERM/SIGINT. Started with
//! `--take-over`, it replaces the data plane running on the same socket without ending its
//! sessions.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use sluice_dataplane::counters::{Mode, SessionCounting};
use sluice_dataplane::relay::{RelayOptions, SpliceIssue};
use sluice_dataplane::server::{Predecessor, Server};
use sluice_handoff::link::LinkError;

#[derive(Parser)]
#[command(name = "dataplane", version, about = "Sluice data plane: io_uring relay workers")]
struct Cli {
    /// Unix SOCK_SEQPACKET socket control connects to (created 0600).
    #[arg(long)]
    control_socket: PathBuf,
    /// Relay workers, one io_uring each (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Log as JSON lines.
    #[arg(long)]
    json_logs: bool,
    /// Per-session counters: eBPF programs in the kernel (`bpf`), the relay's own counts
    /// (`userspace`), or BPF where it loads and userspace otherwise (`auto`).
    #[arg(long, value_enum, default_value = "auto", env = "SLUICE_COUNTERS")]
    counters: Mode,
    /// Cgroup v2 directory whose sockets the BPF programs see: control's (default: this
    /// process's own, right when control and the data plane share a service or container; a
    /// process started in the root cgroup moves to `sluice` below it, as control does).
    #[arg(long)]
    bpf_cgroup: Option<PathBuf>,
    /// Name of the BPF pin directory /sys/fs/bpf/sluice/NAME (default: derived from
    /// --control-socket, so a restarted data plane finds its map).
    #[arg(long)]
    instance: Option<String>,
    /// Offer TLS legs' keys to the kernel (kTLS) where it has it; `off` keeps every TLS leg on
    /// the userspace record path.
    #[arg(long, value_enum, default_value = "on", env = "SLUICE_KTLS")]
    ktls: Switch,
    /// Who runs a splice once its socket is ready: the worker thread (`inline`, splice(2)) or
    /// io_uring (`io-uring`, IORING_OP_SPLICE, which always hops to an io-wq thread).
    #[arg(long, value_enum, default_value = "inline", env = "SLUICE_SPLICE")]
    splice: SpliceArg,
    /// Take the live sessions of the data plane running on --control-socket (an upgrade or a
    /// restart without ending them), then serve the socket in its place; it exits.
    #[arg(long)]
    take_over: bool,
    /// As --take-over when a data plane answers on --control-socket, else start afresh: what a
    /// service manager runs, so that starting a new instance is an upgrade when one is running
    /// and a plain start when none is.
    #[arg(long, conflicts_with = "take_over")]
    take_over_if_running: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SpliceArg {
    Inline,
    IoUring,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.json_logs);
    // Block the stop signals before any thread starts, so every thread inherits the mask and only
    // the wait below sees them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().context("blocking signals")?;
    let workers = cli.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let instance = cli.instance.clone().unwrap_or_else(|| instance_name(&cli.control_socket));
    let predecessor = if cli.take_over {
        let p = Predecessor::connect(&cli.control_socket)
            .with_context(|| format!("--take-over: no data plane answers on {}", cli.control_socket.display()))?;
        tracing::info!(predecessor_pid = p.pid, "taking over the running data plane's sessions");
        Some(p)
    } else if cli.take_over_if_running {
        match Predecessor::connect(&cli.control_socket) {
            Ok(p) => {
                tracing::info!(predecessor_pid = p.pid, "taking over the running data plane's sessions");
                Some(p)
            }
            // No socket, or a socket nobody listens on (left by a data plane that died).
            Err(LinkError::Sys(nix::Error::ENOENT | nix::Error::ECONNREFUSED)) => {
                tracing::info!("no data plane is running on the socket; starting afresh");
                None
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("asking the data plane on {} for its sessions", cli.control_socket.display())
                })
            }
        }
    } else {
        None
    };
    let bpf_cgroup = match (&cli.bpf_cgroup, cli.counters) {
        (Some(c), _) => Some(c.clone()),
        (None, Mode::Userspace) => None,
        // Started in the root cgroup, the programs would run for every packet on the host.
        (None, _) => match sluice_handoff::cgroup::counters_default() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot leave the root cgroup; BPF counters observe this process's own");
                None
            }
        },
    };
    let counting = SessionCounting::start_opts(cli.counters, &instance, bpf_cgroup, predecessor.is_some())?;
    let options = RelayOptions {
        ktls: matches!(cli.ktls, Switch::On),
        splice: match cli.splice {
            SpliceArg::Inline => SpliceIssue::Inline,
            SpliceArg::IoUring => SpliceIssue::IoUring,
        },
    };
    tracing::info!(ktls = options.ktls, splice = ?options.splice, workers, "relay options");
    let server = match predecessor {
        Some(p) => Server::take_over(&cli.control_socket, p, workers, options, counting).map(|(s, _)| s),
        None => Server::start_with(&cli.control_socket, workers, options, counting),
    }
    .with_context(|| format!("starting on {}", cli.control_socket.display()))?;
    let server = std::sync::Arc::new(server);
    let serving = server.clone();
    std::thread::Builder::new().name("sluice-dp-accept".into()).spawn(move || serving.serve())?;
    let sig = stop.wait().context("waiting for a stop signal")?;
    tracing::info!(signal = ?sig, "stopping: ending all sessions");
    server.shutdown();
    Ok(())
}

/// A stable pin-directory name for a control socket path (FNV-1a of the path): one per data-plane
/// instance on the machine, the same after a restart.
fn instance_name(socket: &std::path::Path) -> String {
    let path = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("dp-{hash:016x}")
}

fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
