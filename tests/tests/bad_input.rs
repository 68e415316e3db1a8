//! Malformed and hostile input on control's PostgreSQL port, from a raw TCP socket: garbage, a
//! huge length prefix, a plaintext StartupMessage, a truncated packet, an SSLRequest followed by
//! garbage instead of TLS, a client that sends nothing, trickles its startup packet or goes silent
//! after TLS (each dropped at the handshake timeout), and a certificate routed to an unknown
//! database. Each is refused on its own connection and a normal query still works afterwards.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::{
    only_error, psql_query, raw_connect, read_to_close, runtime, ssl_request, startup_packet, write_lenient, Harness,
};
use tokio_postgres::error::SqlState;

const QUICK: Duration = Duration::from_secs(5);

/// Sends `bytes` on a fresh connection and returns everything received until control closes it.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = raw_connect(port, QUICK).unwrap();
    write_lenient(&mut s, bytes).unwrap();
    read_to_close(&mut s, QUICK).unwrap().0
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Completes TLS with a client certificate, sends nothing, and returns when control hangs up.
fn silent_after_tls(port: u16, tls: Arc<rustls::ClientConfig>) -> Duration {
    let conn = rustls::ClientConnection::new(tls, "localhost".try_into().unwrap()).unwrap();
    let mut s = raw_connect(port, Duration::from_secs(20)).unwrap();
    s.write_all(&ssl_request()).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    let started = Instant::now();
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS with a good certificate");
    }
    let mut buf = [0u8; 256];
    match tls.read(&mut buf) {
        Ok(0) => started.elapsed(),
        Ok(n) => panic!("a silent client got {n} bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("still open after {:?}", started.elapsed())
        }
        // Control drops the connection without close_notify.
        Err(_) => started.elapsed(),
    }
}

/// Sends a startup packet's bytes one every 250 ms; returns when control hangs up.
fn trickle(port: u16) -> Duration {
    let packet = startup_packet(&[("user", "alice"), ("database", "demo"), ("application_name", &"x".repeat(60))]);
    let mut s = raw_connect(port, Duration::from_millis(250)).unwrap();
    let started = Instant::now();
    for b in packet.iter().cycle() {
        assert!(started.elapsed() < Duration::from_secs(20), "a trickling client was never dropped");
        if s.write_all(&[*b]).is_err() {
            return started.elapsed();
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(n) => panic!("a trickling client got {:?}", &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return started.elapsed(),
        }
    }
    unreachable!("cycle() never ends")
}

#[test]
fn hostile_input_is_refused_and_control_keeps_serving() {
    let mut h = Harness::start("badinput").unwrap();
    let port = h.pg_port();

    // Started first so their 10 s run in parallel with the other cases. Connect, send nothing:
    let silent = std::thread::spawn(move || {
        let mut s = raw_connect(port, Duration::from_secs(20)).unwrap();
        read_to_close(&mut s, Duration::from_secs(15))
    });
    // finish TLS with a good certificate, then send nothing:
    let tls = Arc::new(h.tls(Some(&h.issue_cert("alice", "demo", "alice", "demo").unwrap())).unwrap());
    let silent_tls = std::thread::spawn(move || silent_after_tls(port, tls));
    // trickle a startup packet one byte every 250 ms (it would take 25 s to finish):
    let trickle = std::thread::spawn(move || trickle(port));

    // Garbage with a huge length prefix ("GET " read as a length): refused at once.
    let got = exchange(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let e = only_error(&got).unwrap();
    assert_eq!(e[&'C'], "08P01", "{e:?}");
    assert!(e[&'M'].contains("invalid startup packet"), "{e:?}");

    // Random bytes behind a plausible length: an unknown protocol version.
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    garbage.extend(noise(56, 0x5eed));
    let e = only_error(&exchange(port, &garbage)).unwrap();
    assert_eq!(e[&'C'], "08P01", "{e:?}");

    // Pure noise (whatever it decodes as, control must close the connection, never hang).
    for seed in 1..=5u64 {
        let bytes = noise(4096, seed);
        let mut s = raw_connect(port, QUICK).unwrap();
        write_lenient(&mut s, &bytes).unwrap();
        // A length that happens to be plausible makes control wait for the rest: end our side.
        let _ = s.shutdown(Shutdown::Write);
        let (got, _) = read_to_close(&mut s, Duration::from_secs(12)).unwrap();
        // Nothing, an ErrorResponse, or (if the noise began like a TLS record) a TLS alert.
        assert!(got.is_empty() || got[0] == b'E' || got[0] == 0x15, "seed {seed}: unexpected answer {got:?}");
    }

    // A length prefix over 10 MB: refused without reading (or waiting for) the body.
    let mut huge = (10 * 1024 * 1024 + 1u32).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 1024]);
    let e = only_error(&exchange(port, &huge)).unwrap();
    assert_eq!(e[&'C'], "08P01", "{e:?}");
    assert!(e[&'M'].contains("10485761"), "{e:?}");

    // A plaintext StartupMessage: told that TLS is required.
    let e = only_error(&exchange(port, &startup_packet(&[("user", "alice"), ("database", "demo")]))).unwrap();
    assert_eq!(e[&'S'], "FATAL", "{e:?}");
    assert_eq!(e[&'C'], "28000", "{e:?}");
    assert!(e[&'M'].contains("TLS"), "{e:?}");

    // A truncated packet, then close: control just closes its side.
    let mut s = raw_connect(port, QUICK).unwrap();
    let full = startup_packet(&[("user", "alice"), ("database", "demo")]);
    s.write_all(&full[..full.len() / 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, took) = read_to_close(&mut s, QUICK).unwrap();
    assert!(got.is_empty(), "a truncated packet got {got:?}");
    assert!(took < QUICK);

    // SSLRequest accepted, then garbage instead of a TLS ClientHello: the handshake fails and
    // control closes the connection.
    let mut s = raw_connect(port, QUICK).unwrap();
    s.write_all(&ssl_request()).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    write_lenient(&mut s, &noise(512, 42)).unwrap();
    let (got, _) = read_to_close(&mut s, QUICK).unwrap();
    // At most a TLS alert record comes back, never PostgreSQL data.
    assert!(got.is_empty() || got[0] == 0x15, "unexpected answer {got:?}");

    // A certificate routed to a database Sluice does not serve: SQLSTATE 3D000.
    runtime().unwrap().block_on(async {
        let cert = h.issue_cert("alice", "nope", "alice", "demo").unwrap();
        let err = h.connect_with(Some(&cert), "alice", "demo").await.err().expect("unknown database accepted").pg();
        let db = err.as_db_error().unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
        assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{db:?}");
        assert!(db.message().contains("\"nope\""), "{db:?}");
    });

    // The silent client is dropped at the handshake timeout (10 s by default).
    let (got, took) = silent.join().unwrap().expect("a silent client must be dropped within 15 s");
    eprintln!("silent client dropped after {took:.2?}");
    assert!(got.is_empty(), "a silent client got {got:?}");
    assert!(took >= Duration::from_secs(8), "dropped after only {took:?}: not the handshake timeout");
    assert!(took < Duration::from_secs(15), "dropped after {took:?}");

    let took = silent_tls.join().unwrap();
    eprintln!("silent client after TLS dropped after {took:.2?}");
    assert!(took >= Duration::from_secs(8) && took < Duration::from_secs(15), "dropped after {took:?}");
    let took = trickle.join().unwrap();
    eprintln!("trickling client dropped after {took:.2?}");
    assert!(took >= Duration::from_secs(8) && took < Duration::from_secs(15), "dropped after {took:?}");

    // Through all of that control stayed up and serves a normal session.
    assert!(h.control_alive(), "control died");
    let env = h.login_demo().unwrap();
    assert_eq!(psql_query(&env, "select 'still serving'").unwrap(), "still serving");
}
