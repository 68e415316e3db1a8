//! Up to 10,000 concurrent sessions on two workers: per-session state stays bounded (the resident
//! set grows by a few KiB per session, no pool buffers and no io-wq threads while idle), every
//! session still relays, and every one is reported when it ends.
//!
//! Its own test binary (so its own process and descriptor table). Each session costs 4
//! descriptors here (2 test sockets, 2 legs; an idle session holds no pipe), so the count is capped
//! by RLIMIT_NOFILE's hard limit (20,000 on the project's VMs, which allows 4,700 sessions); the
//! test says how many it ran. tests/tests/dataplane_scale.rs puts 9,000 on a data plane process.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use sluice_dataplane::relay::Worker;
use sluice_test_support::io_wq_threads;

const WANTED: usize = 10_000;

#[test]
fn many_concurrent_sessions_stay_bounded() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Root may raise the hard limit; where that is refused, run as many sessions as fit.
    let wanted_fds = (WANTED * 4 + 1024) as u64;
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, wanted_fds, wanted_fds).is_ok() { wanted_fds } else { hard };
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).unwrap();
    let sessions = WANTED.min((limit.saturating_sub(1024) / 4) as usize);
    if sessions < 1000 {
        eprintln!("skipping: RLIMIT_NOFILE {limit} allows only {sessions} sessions");
        return;
    }
    eprintln!("running {sessions} sessions (RLIMIT_NOFILE {limit})");
    let (tx, reports) = mpsc::channel();
    let workers = [Worker::spawn(0, tx.clone()).unwrap(), Worker::spawn(1, tx).unwrap()];
    let rss_before = rss_kib();
    let start = Instant::now();
    let mut legs = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (c, u, s) = plain_session(&format!("s-{i}"));
        workers[i % 2].add(s).unwrap();
        legs.push((c, u));
    }
    let setup = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = rss_kib();
    let per_session = (rss_idle.saturating_sub(rss_before)) * 1024 / sessions as u64;
    let threads = io_wq_threads();
    let buffers: usize = workers.iter().map(|w| w.buffers_in_use()).sum();
    let pipes: usize = workers.iter().map(|w| w.pipes_in_use()).sum();
    eprintln!(
        "{sessions} sessions set up in {setup:.2?}; RSS {rss_before} KiB -> {rss_idle} KiB \
         ({per_session} bytes per session, test-side sockets included); {threads} iou-wrk threads, {buffers} buffers, {pipes} pipes"
    );
    assert_eq!(workers.iter().map(|w| w.sessions().len()).sum::<usize>(), sessions);
    assert_eq!(threads, 0, "idle sessions pinned io-wq threads");
    assert_eq!(buffers, 0, "idle sessions hold pool buffers");
    assert_eq!(pipes, 0, "idle sessions hold pipes");
    assert!(per_session < 16 * 1024, "{per_session} bytes of userspace state per session");

    let start = Instant::now();
    for (i, (c, u)) in legs.iter_mut().enumerate() {
        let msg = format!("ping {i}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        u.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
        u.write_all(b"pong").unwrap();
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"pong");
    }
    eprintln!("every session relayed a round trip in {:.2?}", start.elapsed());

    drop(legs);
    for _ in 0..sessions {
        let r = next_report(&reports, Duration::from_secs(30));
        assert_eq!(r.bytes_upstream_to_client, 4, "{r:?}");
    }
    for w in workers {
        w.shutdown();
    }
}
