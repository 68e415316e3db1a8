//! Table tests of the upstream startup machine: each row is what the server sends and what the
//! machine must write and conclude, run once feeding exactly the bytes asked for and once byte
//! by byte.

use proptest::prelude::*;
use sluice_pgwire::{
    encode, ErrorFields, Greeting, ProtocolVersion, UpstreamEvent, UpstreamStartup, UpstreamStartupError, WireError,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Sent(Vec<u8>),
    StartTls,
    Done(Greeting),
    Failed(UpstreamStartupError),
    Eof,
}

const TOKEN: &str = "iam-token";

fn params() -> Vec<(String, String)> {
    vec![("user".into(), "alice".into()), ("database".into(), "demo".into())]
}

/// Drives the machine as the upstream dialer does: write what it sends, read what it asks for
/// (at most `max_chunk` bytes at a time); a TLS handshake is simulated by going on with the input.
fn drive(tls: bool, server: &[u8], max_chunk: usize) -> Vec<Seen> {
    drive_machine(UpstreamStartup::new(tls, params(), TOKEN.into()), server, max_chunk)
}

fn drive_machine(mut m: UpstreamStartup, server: &[u8], max_chunk: usize) -> Vec<Seen> {
    let mut rest = server;
    let mut seen = Vec::new();
    loop {
        match m.next_event() {
            Ok(UpstreamEvent::Send(b)) => seen.push(Seen::Sent(b)),
            Ok(UpstreamEvent::NeedMore(n)) => {
                assert!(n > 0, "asked for nothing");
                if rest.is_empty() {
                    seen.push(Seen::Eof);
                    return seen;
                }
                let take = n.min(max_chunk).min(rest.len());
                m.feed(&rest[..take]);
                rest = &rest[take..];
            }
            Ok(UpstreamEvent::StartTls) => {
                seen.push(Seen::StartTls);
                m.tls_established();
            }
            Ok(UpstreamEvent::Done(g)) => {
                seen.push(Seen::Done(g));
                return seen;
            }
            Err(e) => {
                seen.push(Seen::Failed(e));
                return seen;
            }
        }
    }
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn upstream_startup_table() {
    use Seen::*;
    let startup = Sent(encode::startup(ProtocolVersion::V3_0, &params()));
    let password = Sent(encode::password(TOKEN));
    let ssl = Sent(encode::ssl_request());
    let ps = encode::parameter_status("server_version", "16.4");
    let notice = encode::notice_response(&ErrorFields::fatal("00000", "hello").with(b'S', "NOTICE"));
    let greeting_bytes = cat(&[
        encode::auth_ok(),
        ps.clone(),
        encode::backend_key_data(42, &[1, 2, 3, 4]),
        encode::ready_for_query(b'I'),
    ]);
    let greeting =
        Greeting { messages: vec![ps.clone()], backend_key: Some((42, vec![1, 2, 3, 4])), ready_status: b'I' };
    let rejected = ErrorFields::fatal("28P01", "PAM authentication failed");
    let mut md5 = vec![b'R', 0, 0, 0, 12, 0, 0, 0, 5];
    md5.extend_from_slice(&[9, 9, 9, 9]);
    let mut sasl = vec![b'R', 0, 0, 0, 23, 0, 0, 0, 10];
    sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
    let gss = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 7];

    let rows: Vec<(&str, bool, Vec<u8>, Vec<Seen>)> = vec![
        (
            "TLS, cleartext password, greeting",
            true,
            cat(&[b"S".to_vec(), encode::auth_cleartext(), greeting_bytes.clone()]),
            vec![ssl.clone(), StartTls, startup.clone(), password.clone(), Done(greeting.clone())],
        ),
        ("TLS refused", true, b"N".to_vec(), vec![ssl.clone(), Failed(UpstreamStartupError::NoTls)]),
        (
            "no TLS: trust, notices and NegotiateProtocolVersion",
            false,
            cat(&[
                notice.clone(),
                encode::negotiate_protocol_version(0, &["_pq_.x".into()]),
                encode::auth_ok(),
                notice.clone(),
                encode::backend_key_data(7, &[3; 32]),
                encode::ready_for_query(b'T'),
            ]),
            vec![
                startup.clone(),
                Done(Greeting {
                    messages: vec![notice.clone()],
                    backend_key: Some((7, vec![3; 32])),
                    ready_status: b'T',
                }),
            ],
        ),
        (
            "no backend key",
            false,
            cat(&[encode::auth_ok(), encode::ready_for_query(b'I')]),
            vec![startup.clone(), Done(Greeting { messages: vec![], backend_key: None, ready_status: b'I' })],
        ),
        (
            "rejected",
            false,
            cat(&[encode::auth_cleartext(), encode::error_response(&rejected)]),
            vec![startup.clone(), password.clone(), Failed(UpstreamStartupError::Rejected(rejected.clone()))],
        ),
        ("md5", false, md5, vec![startup.clone(), Failed(UpstreamStartupError::UnsupportedAuth("MD5".into()))]),
        (
            "sasl",
            false,
            sasl,
            vec![startup.clone(), Failed(UpstreamStartupError::UnsupportedAuth("SASL (SCRAM-SHA-256)".into()))],
        ),
        ("gss", false, gss, vec![startup.clone(), Failed(UpstreamStartupError::UnsupportedAuth("method 7".into()))]),
        (
            "parameter status before authentication",
            false,
            ps.clone(),
            vec![
                startup.clone(),
                Failed(UpstreamStartupError::Protocol(
                    "unexpected ParameterStatus { name: \"server_version\", value: \"16.4\" } during startup".into(),
                )),
            ],
        ),
        (
            "absurd length",
            false,
            vec![b'R', 0x7f, 0, 0, 0],
            vec![startup.clone(), Failed(UpstreamStartupError::Wire(WireError::BadLength(0x7f00_0000)))],
        ),
        (
            "malformed ReadyForQuery",
            false,
            cat(&[encode::auth_ok(), vec![b'Z', 0, 0, 0, 5, b'x']]),
            vec![startup.clone(), Failed(UpstreamStartupError::Wire(WireError::Malformed { what: "ready for query" }))],
        ),
        ("server goes silent", false, encode::auth_cleartext(), vec![startup.clone(), password.clone(), Eof]),
    ];
    for (name, tls, server, want) in rows {
        assert_eq!(drive(tls, &server, usize::MAX), want, "{name}: exact reads");
        assert_eq!(drive(tls, &server, 1), want, "{name}: byte by byte");
    }
}

/// Certificate authentication: TLS first, then AuthenticationOk with no password in between; a
/// server that asks for a password anyway gets none.
#[test]
fn without_a_password_the_certificate_must_suffice() {
    use Seen::*;
    let ssl = Sent(encode::ssl_request());
    let startup = Sent(encode::startup(ProtocolVersion::V3_0, &params()));
    let ok =
        cat(&[b"S".to_vec(), encode::auth_ok(), encode::backend_key_data(9, &[5; 4]), encode::ready_for_query(b'I')]);
    let greeting = Greeting { messages: vec![], backend_key: Some((9, vec![5; 4])), ready_status: b'I' };
    let asks = cat(&[b"S".to_vec(), encode::auth_cleartext()]);
    for max_chunk in [usize::MAX, 1] {
        let m = UpstreamStartup::without_password(params());
        assert_eq!(
            drive_machine(m, &ok, max_chunk),
            vec![ssl.clone(), StartTls, startup.clone(), Done(greeting.clone())]
        );
        let m = UpstreamStartup::without_password(params());
        assert_eq!(
            drive_machine(m, &asks, max_chunk),
            vec![
                ssl.clone(),
                StartTls,
                startup.clone(),
                Failed(UpstreamStartupError::UnsupportedAuth("cleartext password".into()))
            ]
        );
    }
}

#[test]
fn bytes_after_the_ssl_answer_are_refused() {
    let mut m = UpstreamStartup::new(true, params(), TOKEN.into());
    assert_eq!(m.next_event(), Ok(UpstreamEvent::Send(encode::ssl_request())));
    assert_eq!(m.next_event(), Ok(UpstreamEvent::NeedMore(1)));
    m.feed(b"SR");
    assert!(matches!(m.next_event(), Err(UpstreamStartupError::Protocol(_))));
}

proptest! {
    #[test]
    fn arbitrary_server_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        tls in any::<bool>(),
    ) {
        let exact = drive(tls, &bytes, usize::MAX);
        prop_assert_eq!(drive(tls, &bytes, 1), exact);
    }

    #[test]
    fn framed_garbage_never_panics(msgs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
        let mut server = encode::auth_ok();
        for (tag, body) in msgs {
            server.push(tag);
            server.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            server.extend_from_slice(&body);
        }
        let seen = drive(false, &server, usize::MAX);
        prop_assert!(matches!(seen.last(), Some(Seen::Done(_) | Seen::Failed(_) | Seen::Eof)));
    }
}
