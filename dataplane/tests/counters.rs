//! Per-session counters end to end through the data plane's server: a control link hands over two
//! TCP loopback legs, the test moves known byte counts through the relay, and the live `Stats`
//! and final `SessionEnded` must carry exactly those counts on both legs, with BPF (as root, as CI
//! runs) and with the userspace fallback forced; BPF map entries must be gone after the session.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_dataplane::counters::{CountersError, Mode, SessionCounting};
use sluice_dataplane::server::Server;
use sluice_handoff::handoff::{
    CounterSource, EndReason, Handoff, LegCrypto, Message, Role, SessionCounters, SessionEnded,
};
use sluice_handoff::link::Link;
use sluice_test_support::tcp_pair;

fn pump(from: &TcpStream, to: &TcpStream, n: usize) {
    let mut w = from.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&vec![0xa5; n]).unwrap());
    let mut got = vec![0; n];
    (&mut &*to).read_exact(&mut got).unwrap();
    writer.join().unwrap();
}

/// The exact counts each leg must show after `c2u` bytes went client → upstream and `u2c` back.
fn assert_exact(c: &SessionCounters, source: CounterSource, c2u: u64, u2c: u64) {
    assert_eq!(c.source, source, "{c:?}");
    assert_eq!((c.client.rx_bytes, c.client.tx_bytes), (c2u, u2c), "client leg: {c:?}");
    assert_eq!((c.upstream.tx_bytes, c.upstream.rx_bytes), (c2u, u2c), "upstream leg: {c:?}");
    if source == CounterSource::Bpf {
        assert!(c.client.rx_packets > 0 && c.upstream.tx_packets > 0, "{c:?}");
        assert!(c.client.srtt_us > 0 && c.upstream.srtt_us > 0, "{c:?}");
    } else {
        assert_eq!((c.client.rx_packets, c.client.srtt_us), (0, 0), "userspace knows no packets: {c:?}");
    }
}

fn run(mode: Mode, name: &str) {
    let instance = format!("test-{name}-{}", std::process::id());
    let counting = match SessionCounting::start(mode, &instance, None) {
        Ok(c) => c,
        Err(CountersError::BpfRequired(e)) if e.is_unavailable() => {
            eprintln!("skipping the BPF half: BPF is unavailable here ({e}); the userspace test still runs");
            return;
        }
        Err(e) => panic!("BPF counters failed to load: {e}"),
    };
    // A failed assertion must not leave the pinned map behind.
    struct Unpin(PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unpin = Unpin(std::path::Path::new(sluice_ebpf::PIN_ROOT).join(&instance));
    let source = counting.source();
    assert_eq!(source == CounterSource::Bpf, mode == Mode::Bpf);
    let dir = std::env::temp_dir().join(format!("sluice-dp-counters-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock: PathBuf = dir.join("dp.sock");
    let server = Arc::new(Server::start(&sock, 1, counting).unwrap());
    let serving = server.clone();
    std::thread::spawn(move || serving.serve());

    let link = Link::connect(&sock).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    link.hello(Role::Control).unwrap();

    let (client_peer, client_leg) = tcp_pair();
    let (upstream_leg, upstream_peer) = tcp_pair();
    // A client that sends before the data plane has its socket (a query right after
    // ReadyForQuery): those bytes wait in the socket, passed the ingress program before counting
    // began, and must still be counted as relayed.
    let early = 1500u64;
    (&client_peer).write_all(&vec![1; early as usize]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let h = Handoff {
        session_id: "sess-counters".into(),
        user: "alice".into(),
        db_service: "db".into(),
        db_user: "alice".into(),
        db_name: "db".into(),
        not_after: 0,
        idle_timeout_ms: 0,
        client: LegCrypto::Plain,
        upstream: LegCrypto::Plain,
    };
    link.send(&Message::Handoff(Box::new(h)), &[client_leg.as_raw_fd(), upstream_leg.as_raw_fd()]).unwrap();
    drop((OwnedFd::from(client_leg), OwnedFd::from(upstream_leg)));
    match link.recv().unwrap().0 {
        Message::HandoffAck { error: None, .. } => {}
        other => panic!("handoff refused: {other:?}"),
    }
    if source == CounterSource::Bpf {
        assert_eq!(server.counter_map_entries(), 2, "both legs registered");
    }

    let (c2u, u2c) = (2_000_003u64, 777_777u64);
    let mut got = vec![0; early as usize];
    (&upstream_peer).read_exact(&mut got).unwrap();
    let c2u_body = c2u - early;
    pump(&client_peer, &upstream_peer, c2u_body as usize);
    pump(&upstream_peer, &client_peer, u2c as usize);

    link.send(&Message::StatsRequest, &[]).unwrap();
    let Message::Stats { sessions, .. } = link.recv_reply().unwrap() else { panic!("expected Stats") };
    assert_eq!(sessions.len(), 1);
    let live = &sessions[0];
    assert_eq!((live.bytes_client_to_upstream, live.bytes_upstream_to_client), (c2u, u2c));
    assert_exact(&live.counters.unwrap(), source, c2u, u2c);

    drop(client_peer);
    drop(upstream_peer);
    let ended: SessionEnded = loop {
        match link.recv().unwrap().0 {
            Message::SessionEnded(e) => break e,
            other => eprintln!("ignoring {other:?}"),
        }
    };
    assert!(matches!(ended.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{ended:?}");
    assert_eq!((ended.bytes_client_to_upstream, ended.bytes_upstream_to_client), (c2u, u2c));
    // The FINs carry no payload: the final counts are the live ones, exactly.
    assert_exact(&ended.counters.unwrap(), source, c2u, u2c);
    assert_eq!(server.counter_map_entries(), 0, "map entries are removed when the session ends");
    server.shutdown();
    if source == CounterSource::Bpf {
        assert!(!std::path::Path::new(sluice_ebpf::PIN_ROOT).join(&instance).exists(), "empty map unpinned at stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bpf_counts_exact_bytes_per_leg() {
    run(Mode::Bpf, "bpf");
}

#[test]
fn userspace_fallback_counts_exact_bytes_per_leg() {
    run(Mode::Userspace, "userspace");
}

/// A data plane that died (its sessions' sockets closed with it) leaves its pinned map; the next
/// one on the same instance reuses the map and removes the dead sessions' entries, so restarts
/// cannot grow it.
#[test]
fn a_restarted_dataplane_removes_entries_its_predecessor_left() {
    let instance = format!("test-restart-{}", std::process::id());
    let pin_dir = std::path::Path::new(sluice_ebpf::PIN_ROOT).join(&instance);
    let first = match SessionCounting::start(Mode::Bpf, &instance, None) {
        Ok(c) => c,
        Err(CountersError::BpfRequired(e)) if e.is_unavailable() => {
            eprintln!("skipping: BPF is unavailable here ({e})");
            return;
        }
        Err(e) => panic!("BPF counters failed to load: {e}"),
    };
    let (a, b) = tcp_pair();
    use std::os::fd::AsFd;
    first.register("s1", a.as_fd(), b.as_fd());
    assert_eq!(first.map_entries(), 2);
    drop(first); // as if killed: no unpin
    assert_eq!(sluice_ebpf::pinned_entries(&pin_dir).unwrap(), 2, "the map outlives the process");
    let second = SessionCounting::start(Mode::Bpf, &instance, None).unwrap();
    assert_eq!(second.map_entries(), 0, "stale entries removed at start");
    second.unpin_if_empty();
    assert!(!pin_dir.exists());
}
