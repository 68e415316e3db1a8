//! Idle sessions must cost the worker no kernel threads, no userspace buffers and no pipes: 1,000
//! idle plain and 200 idle TLS sessions on one worker leave zero `iou-wrk` threads (a waiting
//! SPLICE or RECV would pin one each), zero pool buffers and zero pipes (each session holds its two
//! sockets and nothing else), and all of them still relay afterwards.
//!
//! Its own test binary (so its own process): io-wq threads of other tests' workers would be
//! counted otherwise.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use sluice_dataplane::relay::{RelayOptions, SpliceIssue, Worker};
use sluice_handoff::handoff::EndReason;
use sluice_test_support::io_wq_threads;

const PLAIN: usize = 1000;
const TLS: usize = 200;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn idle_sessions_hold_no_threads_or_buffers() {
    // Per session: 2 test sockets and 2 worker legs (pipes only while bytes pass).
    let needed = ((PLAIN + TLS) * 4 + 256) as u64;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < needed {
        eprintln!("skipping: RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs");
        return;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let fds_before = open_fds();

    let (tx, reports) = mpsc::channel();
    // IORING_OP_SPLICE is the mode that could pin io-wq threads (a splice issued on an idle
    // socket would wait on one); inline splices never touch io-wq.
    let options = RelayOptions { ktls: true, splice: SpliceIssue::IoUring };
    let w = Worker::spawn_with(0, tx, options).unwrap();
    let start = Instant::now();
    let mut plain = Vec::new();
    for i in 0..PLAIN {
        let (c, u, s) = plain_session(&format!("plain-{i}"));
        w.add(s).unwrap();
        plain.push((c, u));
    }
    let mut tls = Vec::new();
    for i in 0..TLS {
        let (client, c_leg, c_crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
        let (upstream, u_leg, u_crypto) = tls_upstream_leg(tcp_pair(), 0x1303, KeyKind::Ecdsa);
        w.add(session(&format!("tls-{i}"), c_leg, c_crypto, u_leg, u_crypto)).unwrap();
        tls.push((client, upstream));
    }
    eprintln!("{PLAIN} plain + {TLS} TLS sessions set up in {:.2?}", start.elapsed());
    assert_eq!(w.sessions().len(), PLAIN + TLS);

    std::thread::sleep(Duration::from_secs(1));
    let threads = io_wq_threads();
    let fds = open_fds() - fds_before;
    eprintln!(
        "idle: {threads} iou-wrk threads, {} pool buffers and {} pipes in use, {fds} descriptors opened",
        w.buffers_in_use(),
        w.pipes_in_use()
    );
    assert_eq!(threads, 0, "idle sessions pinned io-wq threads");
    assert_eq!(w.buffers_in_use(), 0, "idle sessions hold userspace buffers");
    assert_eq!(w.pipes_in_use(), 0, "idle sessions hold pipes");
    // Both ends of each session here, and the worker's ring, eventfd and spare pipes.
    assert!(fds <= (PLAIN + TLS) * 4 + 32, "{fds} descriptors for {} idle sessions", PLAIN + TLS);

    let start = Instant::now();
    for (i, (c, u)) in plain.iter_mut().enumerate() {
        let msg = format!("hello {i}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        u.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
        u.write_all(b"pong").unwrap();
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"pong");
    }
    for (i, (c, u)) in tls.iter_mut().enumerate() {
        let msg = format!("tls hello {i}");
        c.write_all(msg.as_bytes());
        assert_eq!(u.read_exact(msg.len()), msg.as_bytes());
        u.write_all(b"pong");
        assert_eq!(c.read_exact(4), b"pong");
    }
    eprintln!(
        "all {} sessions relayed a round trip in {:.2?}; {} iou-wrk threads now",
        PLAIN + TLS,
        start.elapsed(),
        io_wq_threads()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.buffers_in_use(), 0, "buffers go back to the pool once drained");
    assert_eq!(w.pipes_in_use(), 0, "pipes go back to the pool once drained");
    assert!(w.pipes_spare() > 0 && w.pipes_spare() <= 8, "{} spare pipes", w.pipes_spare());

    drop(plain);
    drop(tls);
    let mut closed = 0;
    for _ in 0..PLAIN + TLS {
        let r = next_report(&reports, Duration::from_secs(10));
        assert!(matches!(r.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{r:?}");
        assert!(r.bytes_client_to_upstream > 0 && r.bytes_upstream_to_client == 4, "{r:?}");
        closed += 1;
    }
    assert_eq!(closed, PLAIN + TLS);
    w.shutdown();
    assert_eq!(open_fds(), fds_before, "every leg and pipe was closed");
}
