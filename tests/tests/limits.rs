//! Limits on unauthenticated work, under load: a flood of idle connections from one address is
//! refused with SQLSTATE 53300 past the per-source limit while a client from another address
//! still connects; 50 parallel wrong logins are throttled (most never reach the password hash)
//! and do not stall a PostgreSQL connect, which stays under a second. One test in this binary, so
//! no other test competes for the two cores while it measures.

use std::time::{Duration, Instant};

use sluice_control::api::{self, Request};
use sluice_control::limits::{ConnectionLimits, LOGIN_ATTEMPTS_PER_SOURCE};
use sluice_tests::{error_fields, runtime, sluice_control, ssl_request, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects from `source` (a loopback address) to control's PostgreSQL port.
async fn connect_from(source: [u8; 4], port: u16) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(source), 0).into()).unwrap();
    sock.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// Sends SSLRequest; returns `S`, or the SQLSTATE of the ErrorResponse that answered it.
async fn answer_to_ssl_request(s: &mut tokio::net::TcpStream) -> String {
    s.write_all(&ssl_request()).await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    if first[0] == b'S' {
        return "S".into();
    }
    assert_eq!(first[0], b'E', "unexpected answer {:?}", first[0] as char);
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    error_fields(&body).unwrap()[&'C'].clone()
}

#[test]
fn floods_and_password_storms_are_refused_without_stalling_clients() {
    let h = Harness::start("limits").unwrap();
    let rt = runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let per_source = ConnectionLimits::default().max_unauthenticated_per_source;
    // Warm up (the first connection loads the system roots for the upstream).
    rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();

    // A flood of idle connections from 127.0.0.2.
    let answers = rt.block_on(async {
        let mut flood = Vec::new();
        for _ in 0..per_source + 8 {
            flood.push(connect_from([127, 0, 0, 2], h.pg_port()).await);
        }
        // Accepted (and counted) in order: give control a moment to see all of them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut answers = Vec::new();
        for s in &mut flood {
            answers.push(tokio::time::timeout(Duration::from_secs(5), answer_to_ssl_request(s)).await.unwrap());
        }
        // The flood is still open while a client from another address connects.
        let started = Instant::now();
        let c = h.connect_with(Some(&cert), "alice", "demo").await.unwrap();
        let v: i32 = c.client.query_one("select 53300", &[]).await.unwrap().get(0);
        assert_eq!(v, 53300);
        eprintln!("connect + query during the flood: {:?}", started.elapsed());
        drop(flood);
        answers
    });
    let accepted = answers.iter().filter(|a| *a == "S").count();
    let refused = answers.iter().filter(|a| *a == "53300").count();
    assert_eq!((accepted, refused), (per_source, 8), "{answers:?}");

    // 50 parallel wrong logins, and a PostgreSQL connect in the middle of them.
    let tls = sluice_control::tls::client_config_for_ca(&h.ca_pem).unwrap();
    let (results, connect_time) = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let (addr, tls) = (h.api_addr(), tls.clone());
            tasks.push(tokio::spawn(async move {
                let req = Request::Login { user: format!("guess{}", i % 3), password: format!("wrong-{i}") };
                api::call::<serde_json::Value>(&addr, "localhost", tls, &req).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let c = h.connect_with(Some(&cert), "alice", "demo").await.unwrap();
        let connect_time = started.elapsed();
        c.client.query_one("select 1", &[]).await.unwrap();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        (results, connect_time)
    });
    let text: Vec<String> = results.iter().map(|r| format!("{:?}", r.as_ref().map(|_| ()))).collect();
    let wrong = text.iter().filter(|t| t.contains("invalid user name or password")).count();
    let throttled = text.iter().filter(|t| t.contains("too many failed logins")).count();
    eprintln!(
        "wrong password: {wrong}, throttled: {throttled}, other: {}, connect took {connect_time:?}",
        50 - wrong - throttled
    );
    assert!(results.iter().all(|r| r.is_err()));
    assert!(wrong as u32 <= LOGIN_ATTEMPTS_PER_SOURCE, "{text:?}");
    // The rest were throttled, or (past the API listener's per-source limit) closed at once.
    assert!(throttled >= 10, "{text:?}");
    assert!(connect_time < Duration::from_secs(1), "connect took {connect_time:?} during the storm");
    // The message says what to do.
    let sample = text.iter().find(|t| t.contains("too many failed logins")).unwrap();
    assert!(sample.contains("try again in"), "{sample}");
}
