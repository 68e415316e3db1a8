//! Table tests of the server's negotiation machine: each row is what a client sends and what
//! the machine must answer, run once feeding exactly the bytes asked for and once byte by byte.

use proptest::prelude::*;
use sluice_pgwire::{
    choose_protocol, encode, sqlstate, CancelRequest, Event, NegotiationError, ProtocolVersion, ServerNegotiation,
    StartupMessage, TlsOffer, WireError, MAX_STARTUP_LEN,
};

/// What the driver saw, in order; the run ends at a Startup, a Cancel, an error, or when the
/// input runs out while the machine needs more (`Eof`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Got(Event),
    Failed(NegotiationError),
    Eof,
}

/// Drives the machine as the listener does: peek, then read what it asks for. `max_chunk`
/// caps each read (1 = byte by byte). A TLS handshake is simulated by going on with the input.
fn drive(offer: TlsOffer, input: &[u8], max_chunk: usize) -> Vec<Seen> {
    let mut m = ServerNegotiation::new(offer);
    let mut rest = input;
    let mut seen = Vec::new();
    if let Some(e) = rest.first().and_then(|&b| m.peeked_first_byte(b)) {
        seen.push(Seen::Got(e));
        // The TLS handshake consumed the record.
        rest = &rest[1..];
        m.tls_established();
    }
    loop {
        match m.next_event() {
            Ok(Event::NeedMore(n)) => {
                assert!(n > 0, "asked for nothing");
                if rest.is_empty() {
                    seen.push(Seen::Eof);
                    return seen;
                }
                let take = n.min(max_chunk).min(rest.len());
                m.feed(&rest[..take]);
                rest = &rest[take..];
            }
            Ok(e @ Event::StartTls { .. }) => {
                seen.push(Seen::Got(e));
                m.tls_established();
            }
            Ok(e @ Event::Reply(_)) => seen.push(Seen::Got(e)),
            Ok(e @ (Event::Cancel(_) | Event::Startup(_))) => {
                seen.push(Seen::Got(e));
                return seen;
            }
            Err(e) => {
                seen.push(Seen::Failed(e));
                return seen;
            }
        }
    }
}

fn startup(version: ProtocolVersion, params: &[(&str, &str)]) -> (Vec<u8>, StartupMessage) {
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    (encode::startup(version, &params), StartupMessage { version, params })
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn negotiation_table() {
    use Seen::*;
    use TlsOffer::{None as Local, Required as Tls};
    let (alice, alice_msg) = startup(ProtocolVersion::V3_0, &[("user", "alice"), ("database", "demo")]);
    let (alice32, alice32_msg) = startup(ProtocolVersion::V3_2, &[("user", "alice")]);
    let ssl = encode::ssl_request();
    let gss = encode::gssenc_request();
    let cancel4 = encode::cancel_request(7, &[1, 2, 3, 4]);
    let cancel32 = encode::cancel_request(9, &[5; 32]);
    let huge = (MAX_STARTUP_LEN as u32 + 1).to_be_bytes();
    let (v2, _) = startup(ProtocolVersion { major: 2, minor: 0 }, &[("user", "alice")]);
    let start_tls = Got(Event::StartTls { reply: Some(b'S') });

    let rows: Vec<(&str, TlsOffer, Vec<u8>, Vec<Seen>)> = vec![
        (
            "ssl then startup over TLS",
            Tls,
            cat(&[&ssl, &alice]),
            vec![start_tls.clone(), Got(Event::Startup(alice_msg.clone()))],
        ),
        (
            "gss refused, then ssl",
            Tls,
            cat(&[&gss, &ssl, &alice32]),
            vec![Got(Event::Reply(b'N')), start_tls.clone(), Got(Event::Startup(alice32_msg.clone()))],
        ),
        (
            "direct TLS",
            Tls,
            cat(&[&[0x16], &alice]),
            vec![Got(Event::StartTls { reply: None }), Got(Event::Startup(alice_msg.clone()))],
        ),
        ("plaintext startup where TLS is required", Tls, alice.clone(), vec![Failed(NegotiationError::TlsRequired)]),
        (
            "cancel, 3.0 key",
            Tls,
            cancel4.clone(),
            vec![Got(Event::Cancel(CancelRequest { pid: 7, secret: vec![1, 2, 3, 4] }))],
        ),
        (
            "cancel, 3.2 key",
            Local,
            cancel32.clone(),
            vec![Got(Event::Cancel(CancelRequest { pid: 9, secret: vec![5; 32] }))],
        ),
        (
            "cancel inside TLS",
            Tls,
            cat(&[&ssl, &cancel4]),
            vec![start_tls.clone(), Got(Event::Cancel(CancelRequest { pid: 7, secret: vec![1, 2, 3, 4] }))],
        ),
        (
            "ssl request inside TLS",
            Tls,
            cat(&[&ssl, &ssl]),
            vec![start_tls.clone(), Failed(NegotiationError::EncryptionRequestInsideTls)],
        ),
        (
            "gss request inside TLS",
            Tls,
            cat(&[&ssl, &gss]),
            vec![start_tls.clone(), Failed(NegotiationError::EncryptionRequestInsideTls)],
        ),
        (
            "two gss requests",
            Tls,
            cat(&[&gss, &gss]),
            vec![Got(Event::Reply(b'N')), Failed(NegotiationError::RepeatedRequest("GSSENCRequest"))],
        ),
        (
            "local: both requests refused, plaintext startup",
            Local,
            cat(&[&ssl, &gss, &alice]),
            vec![Got(Event::Reply(b'N')), Got(Event::Reply(b'N')), Got(Event::Startup(alice_msg.clone()))],
        ),
        (
            "local: two ssl requests",
            Local,
            cat(&[&ssl, &ssl]),
            vec![Got(Event::Reply(b'N')), Failed(NegotiationError::RepeatedRequest("SSLRequest"))],
        ),
        (
            "local: no direct TLS, the record is a bad length",
            Local,
            vec![0x16, 3, 1, 0, 0x80],
            vec![Failed(NegotiationError::Invalid(WireError::BadLength(0x1603_0100)))],
        ),
        (
            "huge length refused from the header",
            Tls,
            huge.to_vec(),
            vec![Failed(NegotiationError::Invalid(WireError::BadLength(MAX_STARTUP_LEN + 1)))],
        ),
        (
            "protocol 2",
            Tls,
            v2,
            vec![Failed(NegotiationError::Invalid(WireError::UnsupportedVersion { major: 2, minor: 0 }))],
        ),
        ("truncated startup", Tls, alice[..alice.len() - 1].to_vec(), vec![Eof]),
        ("nothing", Tls, Vec::new(), vec![Eof]),
        ("startup after TLS, truncated", Tls, cat(&[&ssl, &alice[..9]]), vec![start_tls.clone(), Eof]),
    ];
    for (name, offer, input, want) in rows {
        assert_eq!(drive(offer, &input, usize::MAX), want, "{name}: exact reads");
        assert_eq!(drive(offer, &input, 1), want, "{name}: byte by byte");
    }
}

#[test]
fn bytes_in_the_same_read_as_the_ssl_request_are_refused() {
    let mut m = ServerNegotiation::new(TlsOffer::Required);
    m.feed(&[encode::ssl_request(), vec![0x16]].concat());
    let e = m.next_event().unwrap_err();
    assert_eq!(e, NegotiationError::DataAfterSslRequest);
    assert_eq!(e.error_fields().code(), Some(sqlstate::PROTOCOL_VIOLATION));
    assert_eq!(m.next_event(), Err(NegotiationError::Finished));
}

#[test]
fn errors_carry_the_sqlstate_and_message_clients_see() {
    let e = NegotiationError::Invalid(WireError::BadLength(10_485_761));
    let f = e.error_fields();
    assert_eq!((f.get(b'S'), f.code()), (Some("FATAL"), Some(sqlstate::PROTOCOL_VIOLATION)));
    assert_eq!(f.message(), Some("invalid startup packet: packet length 10485761 is out of range"));
    assert_eq!(
        NegotiationError::TlsRequired.error_fields().code(),
        Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    let bytes = e.error_response();
    assert_eq!(bytes[0], b'E');
}

#[test]
fn protocol_choice() {
    let (_, v30) = startup(ProtocolVersion::V3_0, &[("user", "a")]);
    let c = choose_protocol(&v30);
    assert_eq!((c.minor, c.cancel_key_len, c.negotiate), (0, 4, None));
    let (_, v32) = startup(ProtocolVersion::V3_2, &[("user", "a")]);
    let c = choose_protocol(&v32);
    assert_eq!((c.minor, c.cancel_key_len, c.negotiate), (2, 32, None));
    let (_, v39) = startup(ProtocolVersion { major: 3, minor: 9 }, &[("user", "a"), ("_pq_.x", "1")]);
    let c = choose_protocol(&v39);
    assert_eq!((c.minor, c.cancel_key_len), (2, 32));
    assert_eq!(c.negotiate, Some(encode::negotiate_protocol_version(2, &["_pq_.x".to_owned()])));
    let (_, opt) = startup(ProtocolVersion::V3_0, &[("user", "a"), ("_pq_.y", "1")]);
    assert_eq!(choose_protocol(&opt).negotiate, Some(encode::negotiate_protocol_version(0, &["_pq_.y".to_owned()])));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        tls in any::<bool>(),
        chunk in 1usize..64,
    ) {
        let offer = if tls { TlsOffer::Required } else { TlsOffer::None };
        let exact = drive(offer, &bytes, usize::MAX);
        prop_assert_eq!(drive(offer, &bytes, 1), exact);
        // Arbitrary chunks may only differ by refusing bytes sent along with an SSLRequest.
        let chunked = drive(offer, &bytes, chunk);
        prop_assert!(!chunked.is_empty());
    }

    #[test]
    fn valid_packets_in_any_order(ops in proptest::collection::vec(0u8..4, 0..6), tls in any::<bool>()) {
        let offer = if tls { TlsOffer::Required } else { TlsOffer::None };
        let mut input = Vec::new();
        for op in ops {
            input.extend(match op {
                0 => encode::ssl_request(),
                1 => encode::gssenc_request(),
                2 => encode::cancel_request(1, &[0; 4]),
                _ => encode::startup(ProtocolVersion::V3_0, &[("user".into(), "u".into())]),
            });
        }
        let seen = drive(offer, &input, usize::MAX);
        // Every run ends in exactly one terminal outcome, and nothing follows it.
        let terminal = seen.iter().filter(|s| !matches!(s, Seen::Got(Event::Reply(_) | Event::StartTls { .. }))).count();
        prop_assert_eq!(terminal, 1);
    }
}
