//! The relay alone, over loopback TCP: the dataplane worker's splice path against a plain
//! userspace copy loop (read into a 64 KiB buffer, write it out: what a naive proxy does).
//!
//! Two measurements per relay: `wall` (elapsed time to move the bytes) and `relay_cpu` (CPU time
//! of the relaying threads only: the worker thread and its io-wq threads for splice, the copy
//! thread for the loop), so the CPU-seconds-per-GB figure excludes the load generator and sink.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_dataplane::relay::{Session, Worker};
use sluice_handoff::handoff::LegCrypto;
use sluice_test_support::tcp_pair;

const MB: usize = 1024 * 1024;
/// Bytes moved per iteration.
const TRANSFER: usize = 64 * MB;

/// CPU time (user + system) of this process's threads whose name starts with one of `prefixes`.
fn threads_cpu(prefixes: &[&str]) -> Duration {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) else { continue };
        if !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        // Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (u, s) = (f.get(11).and_then(|v| v.parse::<f64>().ok()), f.get(12).and_then(|v| v.parse::<f64>().ok()));
        total += u.unwrap_or(0.0) + s.unwrap_or(0.0);
    }
    Duration::from_secs_f64(total / tick)
}

/// Pushes `TRANSFER` bytes into `src` and drains them from `dst`; returns the elapsed time.
fn pump(src: &mut TcpStream, dst: &mut TcpStream) -> Duration {
    let start = std::time::Instant::now();
    let mut writer = src.try_clone().expect("clone");
    let w = std::thread::spawn(move || {
        let chunk = vec![0x5au8; MB];
        for _ in 0..TRANSFER / MB {
            writer.write_all(&chunk).expect("write");
        }
    });
    let mut buf = vec![0u8; MB];
    let mut got = 0;
    while got < TRANSFER {
        let n = dst.read(&mut buf).expect("read");
        assert!(n > 0, "relay closed early");
        got += n;
    }
    w.join().expect("writer");
    start.elapsed()
}

/// A splice relay: one dataplane worker with a plain/plain session.
struct SpliceRelay {
    client: TcpStream,
    upstream: TcpStream,
    _worker: Worker,
}

fn splice_relay() -> SpliceRelay {
    let (client, client_leg) = tcp_pair();
    let (upstream_leg, upstream) = tcp_pair();
    let (tx, _rx) = mpsc::channel();
    let worker = Worker::spawn(0, tx).expect("worker");
    worker
        .add(Session {
            id: "bench".into(),
            client: OwnedFd::from(client_leg),
            upstream: OwnedFd::from(upstream_leg),
            client_crypto: LegCrypto::Plain,
            upstream_crypto: LegCrypto::Plain,
            idle_timeout: None,
            not_after: None,
        })
        .expect("add");
    SpliceRelay { client, upstream, _worker: worker }
}

/// A userspace copy loop on its own named thread.
fn copy_relay() -> (TcpStream, TcpStream) {
    let (client, mut client_leg) = tcp_pair();
    let (mut upstream_leg, upstream) = tcp_pair();
    std::thread::Builder::new()
        .name("copy-loop".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match client_leg.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if upstream_leg.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .expect("spawn");
    (client, upstream)
}

fn relay(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(TRANSFER as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));

    let mut s = splice_relay();
    g.bench_function("splice/wall", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| pump(&mut s.client, &mut s.upstream)).sum())
    });
    g.bench_function("splice/relay_cpu", |b| {
        b.iter_custom(|iters| {
            let before = threads_cpu(&["sluice-dp", "iou-wrk"]);
            for _ in 0..iters {
                pump(&mut s.client, &mut s.upstream);
            }
            threads_cpu(&["sluice-dp", "iou-wrk"]).saturating_sub(before)
        })
    });

    let (mut client, mut upstream) = copy_relay();
    g.bench_function("copy_loop/wall", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| pump(&mut client, &mut upstream)).sum())
    });
    g.bench_function("copy_loop/relay_cpu", |b| {
        b.iter_custom(|iters| {
            let before = threads_cpu(&["copy-loop"]);
            for _ in 0..iters {
                pump(&mut client, &mut upstream);
            }
            threads_cpu(&["copy-loop"]).saturating_sub(before)
        })
    });
    g.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
