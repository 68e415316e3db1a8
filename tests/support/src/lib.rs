//! Helpers that the data plane's tests, the integration tests (`sluice-tests`) and the benches each
//! had a copy of. Only std: the data plane dev-depends on this crate, so it may depend on no Sluice
//! crate. They panic on failure, as the tests that call them would.

#![forbid(unsafe_code)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// A connected loopback TCP pair with Nagle off on both ends (a relay's legs and their peers:
/// small writes must not wait for an ACK, or latency checks measure Nagle).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback listener");
    let a = TcpStream::connect(l.local_addr().expect("the listener's address")).expect("connecting on loopback");
    let (b, _) = l.accept().expect("accepting on loopback");
    a.set_nodelay(true).expect("TCP_NODELAY");
    b.set_nodelay(true).expect("TCP_NODELAY");
    (a, b)
}

/// io_uring worker threads (`iou-wrk-*`) of this process now: an operation io_uring could not
/// complete inline holds one.
pub fn io_wq_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("reading /proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .count()
}

/// Throughput in MB/s (10^6 bytes).
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// How often `needle` occurs in the file at `path` (0 when it cannot be read yet, as a log file
/// a process has not created).
pub fn count_in(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().matches(needle).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_pair_is_connected_both_ways_without_nagle() {
        let (mut a, mut b) = tcp_pair();
        assert!(a.nodelay().unwrap() && b.nodelay().unwrap());
        a.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").unwrap();
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }

    #[test]
    fn throughput_and_counts() {
        assert_eq!(mb_per_s(3_000_000, Duration::from_millis(1500)), 2.0);
        let path = std::env::temp_dir().join(format!("sluice-test-support-{}", std::process::id()));
        assert_eq!(count_in(&path, "x"), 0);
        std::fs::write(&path, "a x b x\nx").unwrap();
        assert_eq!(count_in(&path, "x"), 3);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn threads_are_counted_by_their_name() {
        // This test process has no ring; a thread named like an io-wq worker stands in for one.
        let before = io_wq_threads();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel();
        // The name is set before the closure runs, so once it reports in, the name is visible.
        let t = std::thread::Builder::new()
            .name("iou-wrk-test".into())
            .spawn(move || {
                started_tx.send(()).unwrap();
                rx.recv()
            })
            .unwrap();
        started.recv().unwrap();
        assert_eq!(io_wq_threads(), before + 1);
        drop(tx);
        t.join().unwrap().unwrap_err();
    }
}
