//! A data plane out of descriptors keeps its sessions: with RLIMIT_NOFILE lowered so that no pipe
//! can be made, a session whose client sends bytes waits for a pipe (counted in `pipe_waits`)
//! instead of ending, and relays them once descriptors are available again; idle sessions (which
//! hold no pipe) are not affected at all.
//!
//! Its own test binary (so its own process): the lowered limit would break tests running
//! alongside.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use sluice_dataplane::relay::Worker;

/// The lowest descriptor number not in use: with the soft limit set to it, no new descriptor fits.
fn lowest_free_fd() -> u64 {
    let open: Vec<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    // The listing's own descriptor is closed by now; its number counts as free.
    let listing = open.iter().copied().max().unwrap_or(0);
    (0u64..).find(|n| !open.contains(n) || *n == listing).unwrap_or(0)
}

#[test]
fn a_session_waits_for_a_pipe_instead_of_dying() {
    let (tx, reports) = mpsc::channel();
    let w = Worker::spawn(0, tx).unwrap();
    let (mut c, mut u, s) = plain_session("starved");
    w.add(s).unwrap();
    let (mut idle_c, mut idle_u, idle) = plain_session("idle");
    w.add(idle).unwrap();
    assert_eq!(w.pipes_in_use() + w.pipes_spare(), 0, "a fresh worker holds no pipe");

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, lowest_free_fd(), hard).unwrap();
    c.write_all(b"while starved").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.pipe_waits() < 2 {
        // The direction tries again at every tick (200 ms) while it waits.
        assert!(Instant::now() < deadline, "the direction never tried for a pipe ({} waits)", w.pipe_waits());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut live = w.sessions();
    live.sort();
    assert_eq!(live, ["idle", "starved"], "a session ended for want of a pipe");
    assert!(reports.try_recv().is_err());

    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 13];
    u.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"while starved");
    u.write_all(b"fed").unwrap();
    let mut back = [0u8; 3];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"fed");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(w.pipes_in_use(), 0, "the pipes went back once drained");
    assert!(w.pipes_spare() >= 1);

    // The idle session went through the shortage untouched.
    idle_u.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    idle_c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle_c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");

    drop((c, u));
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!(r.id, "starved");
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (13, 3), "{r:?}");
    drop((idle_c, idle_u));
    assert_eq!(next_report(&reports, Duration::from_secs(5)).bytes_upstream_to_client, 10);
    w.shutdown();
}
