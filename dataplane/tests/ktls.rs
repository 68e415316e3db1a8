//! kTLS relay tests: TLS legs whose keys go into the kernel and are spliced like plain ones.
//!
//! They need a kernel with kTLS (`CONFIG_TLS`), which CI's does not have: there each test checks
//! that, says it skipped, and passes, and `fallback_without_ktls` asserts the userspace record path
//! is what such a session gets. `dataplane/vm/run-ktls-test` boots a stock Debian kernel under QEMU
//! with the `tls` module loaded and runs this binary there with `SLUICE_REQUIRE_KTLS=1`, which
//! turns a missing kTLS into a failure instead of a skip.
//!
//! Each scenario: rustls client ↔ worker ↔ rustls server (or a plain upstream), 64 MiB each way
//! (`SLUICE_KTLS_TEST_MIB` overrides), content verified, close_notify both ways, and the report
//! must say which legs the kernel protected.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
use sluice_dataplane::relay::{Report, Worker};
use sluice_handoff::handoff::{EndReason, LegCrypto};
use sluice_test_support::mb_per_s;

fn transfer_size() -> u64 {
    std::env::var("SLUICE_KTLS_TEST_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64) * MIB
}

/// Whether this kernel has kTLS: `TCP_ULP` "tls" on a connected loopback socket, checked here
/// rather than through the crate's own probe so a bug there cannot turn every test into a skip.
fn ktls_available() -> Result<(), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let c = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let _s = l.accept().map_err(|e| e.to_string())?;
    let ours = setsockopt(&c, TcpUlp::default(), b"tls").map_err(|e| format!("TCP_ULP \"tls\": {e}"));
    assert_eq!(ours.is_ok(), sluice_dataplane::ktls::probe().is_ok(), "the crate's probe disagrees");
    ours
}

/// `true` when the test should run; prints why it skips otherwise (or fails, in the VM).
fn need_ktls(test: &str) -> bool {
    match ktls_available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("SLUICE_REQUIRE_KTLS").is_some() => {
            panic!("{test}: kTLS required (SLUICE_REQUIRE_KTLS) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped, no kTLS on this kernel ({e})");
            false
        }
    }
}

/// TLS client leg ↔ TLS upstream leg, `n` bytes each way at once, then close_notify from the client
/// (upstream sees close_notify), then from the upstream (client sees close_notify).
fn both_legs<C: Sock, U: Sock>(
    name: &str,
    client_pair: (C, C),
    upstream_pair: (U, U),
    (cs, ck): (u16, KeyKind),
    (us, uk): (u16, KeyKind),
    n: u64,
) -> (Report, Worker)
where
    OwnedFd: From<C> + From<U>,
{
    let (w, reports) = worker();
    let (mut client, c_leg, c_crypto) = tls_client_leg(client_pair, cs, ck);
    let (mut upstream, u_leg, u_crypto) = tls_upstream_leg(upstream_pair, us, uk);
    w.add(session(name, c_leg, c_crypto, u_leg, u_crypto)).unwrap();
    let (c2u, u2c) = (Pattern::new(11), Pattern::new(12));
    let start = Instant::now();
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || {
        upstream.exchange(&b, n, &a, n).unwrap();
        assert_eq!(upstream.read_to_close().unwrap(), b"", "the client's close_notify arrives as close_notify");
        upstream.close_notify();
    });
    client.exchange(&c2u, n, &u2c, n).unwrap();
    client.close_notify();
    assert_eq!(client.read_to_close().unwrap(), b"", "the upstream's close_notify arrives as close_notify");
    up.join().unwrap();
    let took = start.elapsed();
    let r = next_report(&reports, Duration::from_secs(10));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n), "{r:?}");
    assert_eq!(r.reason, EndReason::ClientClosed, "{r:?}");
    eprintln!(
        "{name} {cs:#06x}/{us:#06x} (kTLS client {}, upstream {}): {} MiB each way in {took:.2?}: {:.1} MB/s \
         aggregate",
        r.client_ktls,
        r.upstream_ktls,
        n / MIB,
        mb_per_s(2 * n, took)
    );
    (r, w)
}

/// Both legs kTLS: the session is pure splice (no userspace buffer ever allocated) and the
/// upstream's NewSessionTickets (TLS 1.3), sent after the handoff, were read and dropped.
fn both_legs_spliced(name: &str, client: (u16, KeyKind), upstream: (u16, KeyKind)) {
    if !need_ktls(name) {
        return;
    }
    let (r, w) = both_legs(name, tcp_pair(), tcp_pair(), client, upstream, transfer_size());
    assert!(r.client_ktls && r.upstream_ktls, "both legs should have kTLS: {r:?}");
    assert_eq!(w.ktls_legs(), 2);
    assert_eq!(w.buffers_allocated(), 0, "a session with kTLS on both legs never uses the record path");
    // Two close_notify alerts, plus the tickets of a TLS 1.3 upstream.
    let tickets = if upstream.0 >> 8 == 0x13 { 1 } else { 0 };
    assert!(w.ktls_control_records() >= 2 + tickets, "control records read: {}", w.ktls_control_records());
    w.shutdown();
}

#[test]
fn tls13_aes128_gcm_both_legs() {
    both_legs_spliced("tls13-aes128", (0x1301, KeyKind::Ecdsa), (0x1301, KeyKind::Ecdsa));
}

#[test]
fn tls13_chacha20_both_legs() {
    both_legs_spliced("tls13-chacha20", (0x1303, KeyKind::Ecdsa), (0x1303, KeyKind::Rsa));
}

#[test]
fn tls12_aes_gcm_both_legs() {
    both_legs_spliced("tls12-aes-gcm", (0xc02f, KeyKind::Rsa), (0xc030, KeyKind::Rsa));
}

#[test]
fn tls13_aes256_client_tls12_chacha20_upstream() {
    both_legs_spliced("mixed-versions", (0x1302, KeyKind::Ecdsa), (0xcca9, KeyKind::Ecdsa));
}

/// kTLS client leg, plain upstream: pure splice; the upstream's half-close becomes close_notify.
#[test]
fn tls13_client_leg_plain_upstream() {
    if !need_ktls("tls13-client-plain-upstream") {
        return;
    }
    let n = transfer_size();
    let (w, reports) = worker();
    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0x1302, KeyKind::Ecdsa);
    let (upstream_leg, upstream) = tcp_pair();
    w.add(session("client-only", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    let (c2u, u2c) = (Pattern::new(13), Pattern::new(14));
    let start = Instant::now();
    let (a, b) = (c2u.clone(), u2c.clone());
    let up = std::thread::spawn(move || plain_exchange(upstream, b, n, a, n));
    peer.exchange(&c2u, n, &u2c, n).unwrap();
    peer.close_notify();
    assert_eq!(peer.read_to_close().unwrap(), b"");
    up.join().unwrap().unwrap();
    let took = start.elapsed();
    let r = next_report(&reports, Duration::from_secs(10));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n));
    assert!((r.client_ktls, r.upstream_ktls) == (true, false), "{r:?}");
    assert_eq!(w.buffers_allocated(), 0);
    let rate = mb_per_s(2 * n, took);
    eprintln!(
        "kTLS client leg 0x1302, plain upstream: {} MiB each way in {took:.2?}: {rate:.1} MB/s aggregate",
        n / MIB
    );
    w.shutdown();
}

/// One leg the kernel cannot take (a Unix socket) stays on the userspace record path, while the
/// other (TCP) has kTLS and is plain to the record path.
#[test]
fn userspace_client_leg_ktls_upstream_leg() {
    if !need_ktls("userspace-client-ktls-upstream") {
        return;
    }
    let (r, w) = both_legs(
        "mixed-legs",
        UnixStream::pair().unwrap(),
        tcp_pair(),
        (0x1301, KeyKind::Ecdsa),
        (0x1301, KeyKind::Ecdsa),
        transfer_size(),
    );
    assert!((r.client_ktls, r.upstream_ktls) == (false, true), "{r:?}");
    assert_eq!(w.ktls_legs(), 1);
    assert!(w.buffers_allocated() > 0, "the userspace leg goes through the record path");
    assert!(w.ktls_control_records() >= 2, "the upstream's tickets and close_notify: {}", w.ktls_control_records());
    w.shutdown();
}

/// More than loopback sockets buffer, so bytes are stuck in the relay when the session moves.
const MOVE_MIB: u64 = 40;

/// A session whose legs the kernel protects moves to another worker mid-transfer, as in a
/// data-plane takeover: the kernel keeps each socket's TLS state, the pipe keeps its bytes, and
/// the second worker goes on splicing without installing keys again.
#[test]
fn a_ktls_session_moves_between_workers_mid_transfer() {
    if !need_ktls("moved-ktls") {
        return;
    }
    let n = MOVE_MIB * MIB;
    let (r, w, (pipe, held)) =
        moved_mid_transfer("moved-ktls", tcp_pair(), tcp_pair(), (0x1301, KeyKind::Ecdsa), (0x1302, KeyKind::Ecdsa), n);
    assert!(r.client_ktls && r.upstream_ktls, "{r:?}");
    assert_eq!(held, 0, "a pure-splice session holds no userspace bytes");
    // Whether the pipe holds bytes at that instant is timing (0 and 128 KiB both seen under TCG);
    // either way the transfer above finished byte-exact.
    eprintln!("moved-ktls: {pipe} bytes in the pipe at the move");
    assert_eq!(w.buffers_allocated(), 0);
    w.shutdown();
}

/// The same with one leg on the userspace record path (a Unix socket) and the other on kTLS.
#[test]
fn a_mixed_session_moves_between_workers_mid_transfer() {
    if !need_ktls("moved-mixed") {
        return;
    }
    let n = MOVE_MIB * MIB;
    let (r, w, _) = moved_mid_transfer(
        "moved-mixed",
        UnixStream::pair().unwrap(),
        tcp_pair(),
        (0x1301, KeyKind::Ecdsa),
        (0x1303, KeyKind::Ecdsa),
        n,
    );
    assert!((r.client_ktls, r.upstream_ktls) == (false, true), "{r:?}");
    w.shutdown();
}

/// The upstream's TLS 1.3 NewSessionTickets reach the worker after the handoff, ahead of its first
/// application data: they must be read off the kTLS leg and dropped, and the data relayed.
#[test]
fn new_session_tickets_after_handoff_are_dropped() {
    if !need_ktls("new-session-tickets") {
        return;
    }
    let (w, reports) = worker();
    let (mut upstream, u_leg, u_crypto) = tls_upstream_leg(tcp_pair(), 0x1301, KeyKind::Ecdsa);
    let (mut client, c_leg) = tcp_pair();
    w.add(session("nst", c_leg.into(), LegCrypto::Plain, u_leg, u_crypto)).unwrap();
    upstream.write_all(b"server first");
    let mut got = [0u8; 12];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"server first");
    assert!(w.ktls_control_records() >= 1, "no NewSessionTicket was read from the kTLS leg");
    eprintln!("NewSessionTickets read and dropped after the handoff: {}", w.ktls_control_records());
    upstream.close_notify();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"");
    drop(client);
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.reason, r.bytes_upstream_to_client, r.upstream_ktls), (EndReason::UpstreamClosed, 12, true));
    w.shutdown();
}

/// What the kernel will not splice and we cannot follow ends the session with an error, as on
/// the userspace path: a KeyUpdate, a record that fails authentication, a fatal alert.
#[test]
fn key_update_bad_record_and_alert_end_with_error() {
    if !need_ktls("errors") {
        return;
    }
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
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.reason, r.bytes_client_to_upstream, r.client_ktls), (EndReason::Error, 6, true));
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"", "nothing after the KeyUpdate is relayed");

    let (mut peer, leg, crypto) = tls_client_leg(tcp_pair(), 0xc02f, KeyKind::Rsa);
    let (upstream_leg, mut upstream) = tcp_pair();
    w.add(session("junk", leg, crypto, upstream_leg.into(), LegCrypto::Plain)).unwrap();
    let mut junk = vec![23, 3, 3, 0, 40];
    junk.extend([0x5a; 40]);
    std::io::Write::write_all(&mut peer.sock, &junk).unwrap();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.reason, r.client_ktls), (EndReason::Error, true));
    assert_eq!(read_to_eof(&mut upstream).unwrap(), b"");

    let (mut upstream_peer, u_leg, u_crypto) = tls_upstream_leg(tcp_pair(), 0x1303, KeyKind::Ecdsa);
    let (mut client, c_leg) = tcp_pair();
    w.add(session("alert", c_leg.into(), LegCrypto::Plain, u_leg, u_crypto)).unwrap();
    // A record rustls cannot open makes it send a fatal (encrypted) alert to the worker.
    upstream_peer
        .conn
        .read_tls(&mut &[23u8, 3, 3, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])
        .unwrap();
    assert!(upstream_peer.conn.process_new_packets().is_err());
    upstream_peer.flush();
    let r = next_report(&reports, Duration::from_secs(5));
    assert_eq!((r.reason, r.upstream_ktls), (EndReason::Error, true));
    assert!(wait_eof(&mut client, Duration::from_secs(2)).is_some());
    w.shutdown();
}

/// Without kTLS (CI's kernel) a TLS session must still relay, on the userspace record path, and
/// say so in its report. With kTLS the same session must report kTLS on both legs.
#[test]
fn fallback_without_ktls() {
    let have = ktls_available();
    let (r, w) =
        both_legs("fallback-check", tcp_pair(), tcp_pair(), (0x1301, KeyKind::Ecdsa), (0xc02f, KeyKind::Rsa), 4 * MIB);
    match have {
        Ok(()) => {
            assert!(r.client_ktls && r.upstream_ktls, "{r:?}");
            assert_eq!(w.buffers_allocated(), 0);
        }
        Err(e) => {
            eprintln!("no kTLS ({e}): checking the userspace record path instead");
            assert!(!r.client_ktls && !r.upstream_ktls, "{r:?}");
            assert_eq!(w.ktls_legs(), 0);
            assert!(w.buffers_allocated() > 0, "the record path allocates pool buffers");
        }
    }
    w.shutdown();
}
