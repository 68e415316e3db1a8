//! A data plane replaced without ending its sessions: `dataplane --take-over` asks the running
//! process for its live sessions while bytes are stuck mid-relay (the receiving peers have stopped
//! reading, so pipes, record buffers and socket queues are full), the old process exits, and the
//! transfers then finish byte-exact through the new one. Covered: a spliced plain session, and a
//! session with userspace TLS on both legs (its held records and sequence numbers move over).
//! The final report (from the new process) must count every byte of the session's life, exactly,
//! with the BPF counters (as root, as CI runs) and with the userspace fallback.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{recv_pattern, send_pattern, tcp_pair, tls_client_leg, tls_upstream_leg, KeyKind, Pattern, MIB};
use sluice_dataplane::counters::Mode;
use sluice_handoff::handoff::{CounterSource, EndReason, Handoff, LegCrypto, Message, Role, SessionEnded};
use sluice_handoff::link::{Link, LinkError};

/// Stops a child data plane (and removes the pin directory) however the test ends.
struct Dp(Child);

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(sock: &Path, instance: &str, mode: &str, log: &Path, take_over: bool) -> Dp {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataplane"));
    cmd.arg("--control-socket").arg(sock).args(["--workers", "2", "--counters", mode, "--instance", instance]);
    if take_over {
        cmd.arg("--take-over");
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Dp(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// A control link, once something listens on `sock`.
fn control(sock: &Path) -> Link {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(link) = Link::connect(sock) {
            link.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            if link.hello(Role::Control).is_ok() {
                return link;
            }
        }
        assert!(Instant::now() < deadline, "no data plane answers on {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hand(
    link: &Link,
    id: &str,
    client: OwnedFd,
    client_crypto: LegCrypto,
    upstream: OwnedFd,
    upstream_crypto: LegCrypto,
) {
    let h = Handoff {
        session_id: id.into(),
        user: "alice".into(),
        db_service: "db".into(),
        db_user: "alice".into(),
        db_name: "db".into(),
        not_after: 0,
        idle_timeout_ms: 0,
        client: client_crypto,
        upstream: upstream_crypto,
    };
    link.send(&Message::Handoff(Box::new(h)), &[client.as_raw_fd(), upstream.as_raw_fd()]).unwrap();
    match link.recv().unwrap().0 {
        Message::HandoffAck { error: None, .. } => {}
        other => panic!("handoff refused: {other:?}"),
    }
}

fn pinned_entries(instance: &str) -> Option<usize> {
    sluice_ebpf::pinned_entries(&Path::new(sluice_ebpf::PIN_ROOT).join(instance)).ok()
}

fn run(mode: Mode, name: &str) {
    let instance = format!("test-takeover-{name}-{}", std::process::id());
    let pin_dir = Path::new(sluice_ebpf::PIN_ROOT).join(&instance);
    struct Cleanup(PathBuf, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            if std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_none() {
                let _ = std::fs::remove_dir_all(&self.1);
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("sluice-dp-takeover-{name}-{}", std::process::id()));
    let _cleanup = Cleanup(pin_dir.clone(), dir.clone());
    if mode == Mode::Bpf {
        // Probe first: where BPF cannot run at all, say why and leave the fallback test to run.
        match sluice_ebpf::Counters::load(&sluice_ebpf::Options { cgroup: None, pin_dir: None }) {
            Ok(probe) => drop(probe),
            Err(e) if e.is_unavailable() && std::env::var_os("CI").is_none_or(|v| v != "true") => {
                eprintln!("skipping the BPF half: BPF is unavailable here ({e}); the userspace test still runs");
                return;
            }
            Err(e) => panic!("BPF counters failed to load: {e}"),
        }
        // This test creates the sessions' sockets, as control does: like control, it leaves the
        // root cgroup for the one the data planes observe (`sluice`) before creating any.
        sluice_handoff::cgroup::leave_root().unwrap();
    }
    let mode_arg = if mode == Mode::Bpf { "bpf" } else { "userspace" };
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("dp.sock");
    let log = dir.join("dataplane.log");
    let mut first = spawn(&sock, &instance, mode_arg, &log, false);
    let link = control(&sock);

    // A spliced session and one with userspace TLS on both legs.
    let (plain_client, client_leg) = tcp_pair();
    let (upstream_leg, plain_upstream) = tcp_pair();
    hand(&link, "plain", client_leg.into(), LegCrypto::Plain, upstream_leg.into(), LegCrypto::Plain);
    let (mut tls_client, client_fd, client_crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (mut tls_upstream, upstream_fd, upstream_crypto) = tls_upstream_leg(tcp_pair(), 0x1302, KeyKind::Ecdsa);
    hand(&link, "tls", client_fd, client_crypto, upstream_fd, upstream_crypto);

    // Phase 1: each client sends more than the path can hold while nobody reads at the far end,
    // so bytes sit in the pipe, the record buffers and the socket queues when the takeover comes.
    let (c2u, u2c) = (24 * MIB, 5 * MIB + 123);
    let (p_c2u, p_u2c) = (Pattern::new(1), Pattern::new(2));
    let plain_writer = {
        let (mut w, p) = (plain_client.try_clone().unwrap(), p_c2u.clone());
        std::thread::spawn(move || send_pattern(&mut w, &p, c2u))
    };
    let tls_writer = {
        let p = p_c2u.clone();
        std::thread::spawn(move || {
            tls_client.send_pattern(&p, c2u);
            tls_client
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!plain_writer.is_finished() && !tls_writer.is_finished(), "the writers must be stalled mid-transfer");

    let mut second = spawn(&sock, &instance, mode_arg, &log, true);
    let status = wait_exit(&mut first.0, Duration::from_secs(15));
    assert!(status.success(), "the old data plane exits cleanly after the takeover: {status:?}");
    // Its control link closed with it; control reconnects to the successor on the same path.
    assert!(matches!(link.recv(), Err(LinkError::Closed)), "the old control link closes");
    let link = control(&sock);
    link.send(&Message::ListSessions, &[]).unwrap();
    let Message::Sessions { mut session_ids, .. } = link.recv_reply().unwrap() else { panic!("expected Sessions") };
    session_ids.sort();
    assert_eq!(session_ids, ["plain", "tls"]);

    // Phase 2: the far ends read everything, byte-exact, through the new process.
    recv_pattern(&mut &plain_upstream, &p_c2u, c2u).unwrap();
    plain_writer.join().unwrap().unwrap();
    tls_upstream.recv_pattern(&p_c2u, c2u, "TLS client → upstream");
    let mut tls_client = tls_writer.join().unwrap();
    // And the other way, after the takeover: the new process seals with the next sequence numbers.
    let plain_back = {
        let (mut w, p) = (plain_upstream.try_clone().unwrap(), p_u2c.clone());
        std::thread::spawn(move || send_pattern(&mut w, &p, u2c))
    };
    recv_pattern(&mut &plain_client, &p_u2c, u2c).unwrap();
    plain_back.join().unwrap().unwrap();
    let tls_back = {
        let p = p_u2c.clone();
        std::thread::spawn(move || {
            tls_upstream.send_pattern(&p, u2c);
            tls_upstream
        })
    };
    tls_client.recv_pattern(&p_u2c, u2c, "TLS upstream → client");
    let mut tls_upstream = tls_back.join().unwrap();

    if mode == Mode::Bpf {
        assert_eq!(pinned_entries(&instance), Some(4), "both sessions' legs are still counted");
    }
    // End both sessions: the plain one by its client, the TLS one with close_notify both ways.
    drop(plain_client);
    drop(plain_upstream);
    tls_client.close_notify();
    assert!(tls_upstream.read_to_close().unwrap().is_empty());
    tls_upstream.close_notify();
    assert!(tls_client.read_to_close().unwrap().is_empty());

    let mut ended: Vec<SessionEnded> = Vec::new();
    while ended.len() < 2 {
        match link.recv().unwrap().0 {
            Message::SessionEnded(e) => ended.push(e),
            other => eprintln!("ignoring {other:?}"),
        }
    }
    ended.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    for e in &ended {
        assert_eq!((e.bytes_client_to_upstream, e.bytes_upstream_to_client), (c2u, u2c), "{e:?}");
        assert!(matches!(e.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{e:?}");
        assert!(e.duration_ms >= 500, "the session's age carries over: {e:?}");
    }
    // The spliced session's legs carry the payload and nothing else (the FINs carry no bytes):
    // counted exactly across both processes.
    let c = ended[0].counters.unwrap();
    let source = if mode == Mode::Bpf { CounterSource::Bpf } else { CounterSource::Userspace };
    assert_eq!(c.source, source, "{c:?}");
    assert_eq!((c.client.rx_bytes, c.client.tx_bytes), (c2u, u2c), "client leg: {c:?}");
    assert_eq!((c.upstream.tx_bytes, c.upstream.rx_bytes), (c2u, u2c), "upstream leg: {c:?}");
    // The TLS session's legs carry records: more than the payload, the same both sides of the
    // relay in each direction up to the per-record overhead of two different ciphers.
    let t = ended[1].counters.unwrap();
    assert!(t.client.rx_bytes > c2u && t.upstream.tx_bytes > c2u, "{t:?}");
    assert!(t.client.tx_bytes > u2c && t.upstream.rx_bytes > u2c, "{t:?}");
    if mode == Mode::Bpf {
        assert_eq!(pinned_entries(&instance), Some(0), "map entries are removed when the sessions end");
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let status = wait_exit(&mut second.0, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("took over the sessions"), "{text}");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the data plane did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_successor_takes_live_sessions_with_bpf_counts() {
    run(Mode::Bpf, "bpf");
}

#[test]
fn a_successor_takes_live_sessions_with_userspace_counts() {
    run(Mode::Userspace, "userspace");
}
