//! Integration tests of the relay workers over real loopback sockets: content and byte counts on
//! the splice and TLS record paths, half-close, close_notify, end(), idle timeout, certificate
//! expiry, resets, backpressure and bad input.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sluice_dataplane::relay::{RelayOptions, Report, SpliceIssue, Worker};
use sluice_handoff::handoff::{EndReason, LegCrypto};
use sluice_test_support::mb_per_s;

fn worker_with(options: RelayOptions) -> (Worker, mpsc::Receiver<Report>) {
    let (tx, rx) = mpsc::channel();
    (Worker::spawn_with(0, tx, options).unwrap(), rx)
}

const IO_URING_SPLICE: RelayOptions = RelayOptions { ktls: true, splice: SpliceIssue::IoUring };

#[test]
fn plain_large_transfer_both_ways() {
    plain_large_transfer(RelayOptions::default(), "inline splice");
}

#[test]
fn plain_large_transfer_both_ways_with_io_uring_splice() {
    plain_large_transfer(IO_URING_SPLICE, "IORING_OP_SPLICE");
}

fn plain_large_transfer(options: RelayOptions, how: &str) {
    const N: u64 = 256 * MIB;
    let (w, reports) = worker_with(options);
    let (client, upstream, s) = plain_session("plain-big");
    w.add(s).unwrap();
    assert_eq!(w.sessions(), vec!["plain-big".to_owned()]);
    let (c2u, u2c) = (Pattern::new(1), Pattern::new(2));
    let start = Instant::now();
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || plain_exchange(upstream, b, N, a, N));
    plain_exchange(client, c2u, N, u2c, N).unwrap();
    up.join().unwrap().unwrap();
    let took = start.elapsed();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (N, N));
    assert!(matches!(r.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{r:?}");
    eprintln!(
        "splice path ({how}): {} MiB each way in {took:.2?}: {:.0} MB/s aggregate",
        N / MIB,
        mb_per_s(2 * N, took)
    );
    assert!(w.sessions().is_empty());
    // Nothing of the splice path goes through userspace buffers.
    assert_eq!(w.buffers_allocated(), 0);
    w.shutdown();
}

#[test]
fn plain_half_close_propagates() {
    half_close(RelayOptions::default());
}

#[test]
fn plain_half_close_propagates_with_io_uring_splice() {
    half_close(IO_URING_SPLICE);
}

fn half_close(options: RelayOptions) {
    let (w, reports) = worker_with(options);
    let (mut client, mut upstream, s) = plain_session("half");
    w.add(s).unwrap();
    client.write_all(b"request").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"request");
    // The other direction still works after the client's half-close.
    assert!(w.sessions().contains(&"half".to_owned()));
    upstream.write_all(b"response").unwrap();
    drop(upstream);
    assert_eq!(read_to_eof(&mut client).unwrap(), b"response");
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!(r.reason, EndReason::ClientClosed);
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (7, 8));

    // And the mirror image: the upstream closes first.
    let (mut client, mut upstream, s) = plain_session("half-up");
    w.add(s).unwrap();
    upstream.write_all(b"bye").unwrap();
    upstream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"bye");
    drop(client);
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"");
    assert_eq!(next_report(&reports, Duration::from_secs(2)).reason, EndReason::UpstreamClosed);
    w.shutdown();
}

/// TLS client leg, plain upstream: `n` bytes each way at once, then close_notify from the client
/// reaches the upstream as EOF and the upstream's close reaches the client as close_notify.
fn tls_client_plain_upstream(suite: u16, key: KeyKind, n: u64) {
    let (w, reports) = worker();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), suite, key);
    let (upstream_leg, upstream) = tcp_pair();
    let id = format!("tls-{suite:04x}");
    w.add(session(&id, leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    let (c2u, u2c) = (Pattern::new(3), Pattern::new(4));
    let start = Instant::now();
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || plain_exchange(upstream, b, n, a, n));
    peer.exchange(&c2u, n, &u2c, n).unwrap();
    peer.close_notify();
    // The upstream half-closed after sending: the worker turns that into close_notify.
    assert_eq!(peer.read_to_close().unwrap(), b"");
    up.join().unwrap().unwrap();
    let took = start.elapsed();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n), "{id}");
    assert!(matches!(r.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{r:?}");
    eprintln!(
        "TLS record path {suite:#06x} ({key:?}): {} MiB each way in {took:.2?}: {:.0} MB/s aggregate",
        n / MIB,
        mb_per_s(2 * n, took)
    );
    assert_eq!(w.buffers_in_use(), 0);
    w.shutdown();
}

#[test]
fn tls13_aes128_gcm_client_leg() {
    tls_client_plain_upstream(0x1301, KeyKind::Ecdsa, 64 * MIB);
}

#[test]
fn tls13_aes256_gcm_client_leg() {
    tls_client_plain_upstream(0x1302, KeyKind::Ecdsa, 64 * MIB);
}

#[test]
fn tls13_chacha20_client_leg() {
    tls_client_plain_upstream(0x1303, KeyKind::Ecdsa, 64 * MIB);
}

#[test]
fn tls12_ecdhe_rsa_aes128_gcm_client_leg() {
    tls_client_plain_upstream(0xc02f, KeyKind::Rsa, 64 * MIB);
}

#[test]
fn tls12_ecdhe_rsa_aes256_gcm_client_leg() {
    tls_client_plain_upstream(0xc030, KeyKind::Rsa, 64 * MIB);
}

#[test]
fn tls12_ecdhe_ecdsa_aes128_gcm_client_leg() {
    tls_client_plain_upstream(0xc02b, KeyKind::Ecdsa, 64 * MIB);
}

#[test]
fn tls12_ecdhe_ecdsa_aes256_gcm_client_leg() {
    tls_client_plain_upstream(0xc02c, KeyKind::Ecdsa, 64 * MIB);
}

#[test]
fn tls12_ecdhe_ecdsa_chacha20_client_leg() {
    tls_client_plain_upstream(0xcca9, KeyKind::Ecdsa, 64 * MIB);
}

/// The production shape: TLS to the client and TLS to the upstream (NewSessionTickets from the
/// upstream are still in flight at the handoff and must be dropped).
fn tls_both_legs<S: Sock>(client_pair: (S, S), upstream_pair: (S, S), cs: u16, us: u16, n: u64)
where
    OwnedFd: From<S>,
{
    let (w, reports) = worker();
    let (mut client, c_leg, c_crypto) = tls_client_leg(client_pair, cs, KeyKind::Ecdsa);
    let (mut upstream, u_leg, u_crypto) = tls_upstream_leg(upstream_pair, us, KeyKind::Rsa);
    w.add(session("both", c_leg, c_crypto, u_leg, u_crypto)).unwrap();
    let (c2u, u2c) = (Pattern::new(5), Pattern::new(6));
    let start = Instant::now();
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || {
        upstream.exchange(&b, n, &a, n).unwrap();
        // The client's close_notify arrives as close_notify.
        assert_eq!(upstream.read_to_close().unwrap(), b"");
        upstream.close_notify();
    });
    client.exchange(&c2u, n, &u2c, n).unwrap();
    client.close_notify();
    assert_eq!(client.read_to_close().unwrap(), b"");
    up.join().unwrap();
    let took = start.elapsed();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n));
    assert_eq!(r.reason, EndReason::ClientClosed);
    eprintln!(
        "TLS both legs {cs:#06x}/{us:#06x}: {} MiB each way in {took:.2?}: {:.0} MB/s aggregate",
        n / MIB,
        mb_per_s(2 * n, took)
    );
    w.shutdown();
}

#[test]
fn tls_both_legs_tls13() {
    tls_both_legs(tcp_pair(), tcp_pair(), 0x1301, 0x1302, 64 * MIB);
}

#[test]
fn tls_both_legs_tls13_client_tls12_upstream() {
    tls_both_legs(tcp_pair(), tcp_pair(), 0x1303, 0xc02f, 64 * MIB);
}

#[test]
fn tls_both_legs_over_unix_sockets() {
    tls_both_legs(UnixStream::pair().unwrap(), UnixStream::pair().unwrap(), 0x1301, 0x1301, 64 * MIB);
}

#[test]
fn plain_over_unix_sockets() {
    let (w, reports) = worker();
    let (client, client_leg) = UnixStream::pair().unwrap();
    let (upstream_leg, upstream) = UnixStream::pair().unwrap();
    w.add(session("unix", client_leg.into(), LegCrypto::Plain, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    let n = 64 * MIB;
    let (c2u, u2c) = (Pattern::new(7), Pattern::new(8));
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || plain_exchange(upstream, b, n, a, n));
    plain_exchange(client, c2u, n, u2c, n).unwrap();
    up.join().unwrap().unwrap();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n));
    w.shutdown();
}

#[test]
fn close_notify_from_client_is_eof_upstream() {
    let (w, reports) = worker();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (upstream_leg, mut upstream) = tcp_pair();
    w.add(session("cn", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    peer.write_all(b"SELECT 1;");
    peer.close_notify();
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"SELECT 1;");
    upstream.write_all(b"one row").unwrap();
    drop(upstream);
    assert_eq!(peer.read_to_close().unwrap(), b"one row");
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!((r.reason, r.bytes_client_to_upstream, r.bytes_upstream_to_client), (EndReason::ClientClosed, 9, 7));
    w.shutdown();
}

#[test]
fn end_closes_both_legs_within_a_second() {
    let (w, reports) = worker();
    let (mut client, mut upstream, s) = plain_session("kill-plain");
    w.add(s).unwrap();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1302, KeyKind::Ecdsa);
    let (upstream_leg, mut tls_upstream) = tcp_pair();
    w.add(session("kill-tls", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    // Some traffic first, so the session is mid-stream rather than fresh.
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    upstream.read_exact(&mut b).unwrap();
    peer.write_all(b"ping");
    tls_upstream.read_exact(&mut b).unwrap();

    let mut ids = w.sessions();
    ids.sort();
    assert_eq!(ids, ["kill-plain", "kill-tls"]);
    w.end("kill-plain", EndReason::AdminKill);
    w.end("kill-tls", EndReason::AdminKill);
    w.end("no-such-session", EndReason::AdminKill);
    assert!(w.sessions().is_empty(), "ended sessions are not listed");
    for s in [&mut client, &mut upstream, &mut tls_upstream, &mut peer.sock] {
        let t = wait_eof(s, Duration::from_secs(1)).expect("peer did not see the leg close within 1 s");
        assert!(t < Duration::from_secs(1));
    }
    let mut got: Vec<(String, EndReason)> = (0..2)
        .map(|_| {
            let r = next_report(&reports, Duration::from_secs(1));
            (r.id, r.reason)
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, [("kill-plain".to_owned(), EndReason::AdminKill), ("kill-tls".to_owned(), EndReason::AdminKill)]);
    assert!(reports.recv_timeout(Duration::from_millis(300)).is_err(), "exactly one report per session");
    w.shutdown();
}

#[test]
fn idle_timeout_counts_both_directions() {
    let (w, reports) = worker();
    let idle = Duration::from_millis(600);
    let (_c1, _u1, mut quiet) = plain_session("quiet");
    quiet.idle_timeout = Some(idle);
    let (mut c2, mut u2, mut one_way) = plain_session("one-way");
    one_way.idle_timeout = Some(idle);
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1303, KeyKind::Ecdsa);
    let (upstream_leg, _u3) = tcp_pair();
    let mut tls_quiet = session("tls-quiet", leg, crypto, upstream_leg.into(), LegCrypto::Plain);
    tls_quiet.idle_timeout = Some(idle);
    let start = Instant::now();
    w.add(quiet).unwrap();
    w.add(one_way).unwrap();
    w.add(tls_quiet).unwrap();
    // Only client → upstream traffic on "one-way", every 100 ms for 1.8 s.
    let feeder = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        for _ in 0..18 {
            c2.write_all(b"x").unwrap();
            u2.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        (c2, u2)
    });
    let mut ended = Vec::new();
    for _ in 0..2 {
        let r = next_report(&reports, Duration::from_secs(2));
        assert_eq!(r.reason, EndReason::IdleTimeout, "{r:?}");
        // Checked every 200 ms; the rest is slack for a loaded machine.
        assert!(r.duration >= idle && r.duration < idle + Duration::from_millis(900), "{r:?}");
        ended.push(r.id);
    }
    ended.sort();
    assert_eq!(ended, ["quiet", "tls-quiet"]);
    assert_eq!(w.sessions(), ["one-way"], "traffic in one direction keeps a session alive");
    let (_c2, _u2) = feeder.join().unwrap();
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!((r.id.as_str(), r.reason, r.bytes_client_to_upstream), ("one-way", EndReason::IdleTimeout, 18));
    assert!(start.elapsed() >= Duration::from_millis(1700) + idle);
    assert!(peer.read_to_close().is_err(), "the TLS client sees the connection close");
    w.shutdown();
}

#[test]
fn not_after_ends_the_session() {
    let (w, reports) = worker();
    let (mut client, _upstream, mut s) = plain_session("expiring");
    s.not_after = Some(SystemTime::now() + Duration::from_millis(500));
    w.add(s).unwrap();
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!(r.reason, EndReason::CertExpired);
    assert!(r.duration >= Duration::from_millis(450), "{r:?}");
    assert!(wait_eof(&mut client, Duration::from_secs(1)).is_some());

    let (_client, _upstream, mut s) = plain_session("expired");
    s.not_after = Some(SystemTime::now() - Duration::from_secs(1));
    w.add(s).unwrap();
    let r = next_report(&reports, Duration::from_millis(500));
    assert_eq!((r.id.as_str(), r.reason), ("expired", EndReason::CertExpired));
    w.shutdown();
}

#[test]
fn reset_by_a_peer_ends_the_session() {
    let (w, reports) = worker();
    let (client, mut upstream, s) = plain_session("rst");
    w.add(s).unwrap();
    nix::sys::socket::setsockopt(
        &client,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger { l_onoff: 1, l_linger: 0 },
    )
    .unwrap();
    drop(client); // RST
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!(r.reason, EndReason::ClientClosed);
    assert!(wait_eof(&mut upstream, Duration::from_secs(1)).is_some());
    w.shutdown();
}

/// The upstream writes 64 MiB while the client reads nothing for 2 s: the writer must stall and
/// the process must not buffer the difference.
fn backpressure(tls: bool) {
    let n = 64 * MIB;
    let (w, reports) = worker();
    let (upstream_leg, mut upstream) = tcp_pair();
    let (mut tls_peer, mut plain_client) = (None, None);
    let (leg, crypto) = if tls {
        let (p, leg, crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
        tls_peer = Some(p);
        (leg, crypto)
    } else {
        let (c, leg) = tcp_pair();
        plain_client = Some(c);
        (OwnedFd::from(leg), LegCrypto::Plain)
    };
    w.add(session("bp", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    let pattern = Pattern::new(9);
    let rss_before = rss_kib();
    let (tx, progress) = mpsc::channel::<u64>();
    let p = pattern.clone();
    let writer = std::thread::spawn(move || {
        let mut off = 0;
        while off < n {
            let chunk = p.at(off, (n - off).min(64 * 1024) as usize);
            upstream.write_all(chunk).unwrap();
            off += chunk.len() as u64;
            let _ = tx.send(off);
        }
        upstream.shutdown(std::net::Shutdown::Write).unwrap();
        upstream
    });
    std::thread::sleep(Duration::from_millis(1500));
    let early = progress.try_iter().last().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    let written = progress.try_iter().last().unwrap_or(early);
    let rss_during = rss_kib();
    eprintln!(
        "backpressure ({}): {} MiB written while stalled, RSS {} → {} KiB, {} pool buffers",
        if tls { "tls" } else { "splice" },
        written / MIB,
        rss_before,
        rss_during,
        w.buffers_in_use()
    );
    assert!(written < n, "the writer was not held back");
    assert_eq!(written, early, "the writer kept going while the client read nothing");
    assert!(rss_during < rss_before + 32 * 1024, "RSS grew from {rss_before} to {rss_during} KiB");
    assert!(w.buffers_in_use() <= 2);
    if let Some(mut c) = plain_client {
        recv_pattern(&mut c, &pattern, n).unwrap();
        assert_eq!(read_to_eof(&mut c).unwrap(), b"");
    }
    if let Some(mut p) = tls_peer {
        let empty = Pattern::new(0);
        p.exchange(&empty, 0, &pattern, n).unwrap();
        assert_eq!(p.read_to_close().unwrap(), b"");
    }
    drop(writer.join().unwrap());
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!(r.bytes_upstream_to_client, n);
    w.shutdown();
}

#[test]
fn backpressure_splice_path() {
    backpressure(false);
}

#[test]
fn backpressure_tls_path() {
    backpressure(true);
}

#[test]
fn tls_key_update_ends_with_error() {
    let (w, reports) = worker();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (upstream_leg, mut upstream) = tcp_pair();
    w.add(session("ku", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    peer.write_all(b"before");
    let mut b = [0u8; 6];
    upstream.read_exact(&mut b).unwrap();
    peer.conn.refresh_traffic_keys().unwrap();
    peer.flush();
    peer.write_all(b"after");
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!((r.reason, r.bytes_client_to_upstream), (EndReason::Error, 6));
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"", "nothing after the KeyUpdate is relayed");
    w.shutdown();
}

#[test]
fn garbage_on_a_tls_leg_ends_with_error() {
    let (w, reports) = worker();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0xc02f, KeyKind::Rsa);
    let (upstream_leg, mut upstream) = tcp_pair();
    w.add(session("junk", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    // A well-formed header around bytes that do not authenticate.
    let mut junk = vec![23, 3, 3, 0, 40];
    junk.extend([0x5a; 40]);
    peer.sock.write_all(&junk).unwrap();
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!(r.reason, EndReason::Error);
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"");
    w.shutdown();
}

#[test]
fn other_alerts_end_with_error() {
    let (w, reports) = worker();
    let (mut upstream_peer, u_leg, u_crypto) = tls_upstream_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (mut client, c_leg) = tcp_pair();
    w.add(session("alert", c_leg.into(), LegCrypto::Plain, u_leg, u_crypto)).unwrap();
    // Feeding rustls a record it cannot open makes it send a fatal alert (encrypted, as the
    // handshake is over) to the worker.
    upstream_peer
        .conn
        .read_tls(&mut &[23u8, 3, 3, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])
        .unwrap();
    assert!(upstream_peer.conn.process_new_packets().is_err());
    upstream_peer.flush();
    let r = next_report(&reports, Duration::from_secs(2));
    assert_eq!(r.reason, EndReason::Error);
    assert!(wait_eof(&mut client, Duration::from_secs(1)).is_some());
    w.shutdown();
}

#[test]
fn add_validates_and_rejects_duplicates() {
    let (w, _reports) = worker();
    let (_c, _u, s) = plain_session("dup");
    w.add(s).unwrap();
    let (_c2, _u2, s2) = plain_session("dup");
    assert_eq!(w.add(s2).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    let (_c3, c_leg) = tcp_pair();
    let (u_leg, _u3) = tcp_pair();
    let bad = LegCrypto::Tls {
        version: 0x0304,
        cipher_suite: 0x1301,
        tx_key: vec![0; 15],
        tx_iv: vec![0; 12],
        tx_seq: 0,
        rx_key: vec![0; 16],
        rx_iv: vec![0; 12],
        rx_seq: 0,
    };
    let e = w.add(session("bad", c_leg.into(), bad, u_leg.into(), LegCrypto::Plain)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(!e.to_string().contains("\0\0"), "no key material in errors");
    assert_eq!(w.sessions(), ["dup"]);
    w.shutdown();
}

#[test]
fn shutdown_reports_every_session() {
    let (w, reports) = worker();
    let mut keep = Vec::new();
    for i in 0..5 {
        let (c, u, s) = plain_session(&format!("s{i}"));
        w.add(s).unwrap();
        keep.push((c, u));
    }
    let (peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (u_leg, u) = tcp_pair();
    w.add(session("t", leg, crypto, u_leg.into(), LegCrypto::Plain)).unwrap();
    w.shutdown();
    let mut got: Vec<Report> = reports.try_iter().collect();
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|r| r.reason == EndReason::WorkerShutdown));
    got.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s0", "s1", "s2", "s3", "s4", "t"]);
    for (mut c, _u) in keep {
        assert!(wait_eof(&mut c, Duration::from_millis(100)).is_some());
    }
    drop((peer, u));
}

/// A live session moves to another worker mid-transfer, as in a data-plane takeover (export, then
/// resume): on a kernel without kTLS both legs use the userspace record path, whose buffered
/// records and sequence numbers move with it; the transfer finishes byte-exact both ways.
#[test]
fn a_tls_session_moves_between_workers_mid_transfer() {
    let (r, w, (_, held)) = moved_mid_transfer(
        "moved-tls",
        tcp_pair(),
        UnixStream::pair().unwrap(),
        (0x1301, KeyKind::Ecdsa),
        (0x1303, KeyKind::Ecdsa),
        40 * MIB,
    );
    if !r.client_ktls {
        assert!(held > 0, "records were buffered in userspace at the move: {r:?}");
    }
    w.shutdown();
}
