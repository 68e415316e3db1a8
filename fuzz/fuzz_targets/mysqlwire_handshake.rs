//! Fuzzes every public decoder of the MySQL codec: the first byte picks how the rest is read
//! (a packet stream, or one payload), the next four are the capabilities that select optional
//! fields, the rest is what a peer sent. Whatever decodes must re-encode to bytes that decode
//! to the same value. The seeds under `fuzz/seeds/mysqlwire_handshake/` are the packets captured
//! from MariaDB (`control/mysqlwire/src/captures.rs`) as a packet stream (mode 0) under the
//! capabilities that client and server agreed on. Mode 3 runs the connection-phase state
//! machines (`ServerHandshake`, `UpstreamHandshake`) on the bytes.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice_mysqlwire::{
    decode_clear_password, encode_clear_password, parse_kill, AuthMoreData, AuthReply, AuthSwitchRequest,
    AuthSwitchResponse, CapabilityFlags, ClientHello, Command, EofPacket, ErrPacket, Handshake, HandshakeResponse,
    KillKind, OkPacket, PacketDecoder, PacketEncoder, ServerEvent, ServerHandshake, SslRequest, UpstreamEvent,
    UpstreamHandshake, UpstreamLogin, DEFAULT_CHARSET, HEADER_LEN, PRE_AUTH_MAX_PAYLOAD,
};

/// The connection-phase state machines on untrusted bytes: a client's to the server side
/// (after a TLS switch when the capabilities' SSL bit says so), a server's to the upstream side.
fn machines(bytes: &[u8], caps: CapabilityFlags) {
    let tls = caps.contains(CapabilityFlags::SSL);
    let mut s = ServerHandshake::new("8.0.36-Sluice", 1, [b'x'; 20], DEFAULT_CHARSET);
    let mut rest = bytes;
    for _ in 0..16 {
        match s.next_event() {
            Ok(ServerEvent::NeedMore(n)) => {
                assert!(n > 0);
                if rest.is_empty() {
                    break;
                }
                let k = n.min(rest.len());
                s.feed(&rest[..k]);
                rest = &rest[k..];
            }
            Ok(ServerEvent::StartTls) => s.tls_established(),
            Ok(_) => {}
            Err(e) => {
                let _ = s.frame_err(&e.err_packet());
                break;
            }
        }
    }
    let login = UpstreamLogin {
        user: "u".into(),
        database: Some("d".into()),
        client_capabilities: caps,
        charset: DEFAULT_CHARSET,
        max_packet_size: 1 << 24,
        connect_attrs: Vec::new(),
        password: "token".into(),
        tls,
    };
    let mut u = UpstreamHandshake::new(login);
    u.feed(bytes);
    for _ in 0..16 {
        match u.next_event() {
            Ok(UpstreamEvent::NeedMore(n)) => assert!(n > 0),
            Ok(UpstreamEvent::StartTls) => u.tls_established(),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((caps, rest)) = rest.split_first_chunk::<4>() else { return };
    let caps = CapabilityFlags::from_bits(u32::from_le_bytes(*caps));
    match mode % 4 {
        0 => packet_stream(rest, caps, PRE_AUTH_MAX_PAYLOAD),
        // A small limit reaches the length checks with short inputs.
        1 => packet_stream(rest, caps, 64),
        2 => payload(rest, caps),
        _ => machines(rest, caps),
    }
});

fn packet_stream(bytes: &[u8], caps: CapabilityFlags, max: usize) {
    let mut decoder = PacketDecoder::new(max);
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        let needed = decoder.needed(&buf);
        let Ok(Some(p)) = decoder.next_packet(&mut buf) else { break };
        assert_eq!(needed, Ok(0));
        assert!(p.payload.len() <= max);
        assert_eq!(before - buf.len(), p.payload.len() + HEADER_LEN, "only one fragment fits the limits here");
        let mut again = BytesMut::new();
        PacketEncoder::new(p.seq).write(&p.payload, &mut again);
        assert_eq!(decoder.next_packet(&mut again), Ok(Some(p.clone())));
        payload(&p.payload, caps);
    }
}

fn payload(b: &[u8], caps: CapabilityFlags) {
    if let Ok(h) = Handshake::decode(b) {
        let mut out = BytesMut::new();
        h.encode(&mut out);
        assert_eq!(Handshake::decode(&out), Ok(h));
    }
    if let Ok(hello) = ClientHello::decode(b) {
        let mut out = BytesMut::new();
        match &hello {
            ClientHello::SslRequest(s) => s.encode(&mut out),
            ClientHello::Response(r) => r.encode(&mut out).expect("a decoded response re-encodes"),
        }
        assert_eq!(ClientHello::decode(&out), Ok(hello));
    }
    let _ = (HandshakeResponse::decode(b), SslRequest::decode(b));
    if let Ok(a) = AuthSwitchRequest::decode(b) {
        let mut out = BytesMut::new();
        a.encode(&mut out);
        assert_eq!(AuthSwitchRequest::decode(&out), Ok(a));
    }
    if let Ok(m) = AuthMoreData::decode(b) {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(AuthMoreData::decode(&out), Ok(m));
    }
    let _ = AuthSwitchResponse::decode(b);
    if let Ok(pw) = decode_clear_password(b) {
        let mut out = BytesMut::new();
        encode_clear_password(pw, &mut out).expect("a decoded password has no NUL");
        assert_eq!(decode_clear_password(&out), Ok(pw));
    }
    // Round trips under protocol 4.1 only: without it an OK-for-EOF's length is not fixed.
    let p41 = caps.contains(CapabilityFlags::PROTOCOL_41);
    if let Ok(ok) = OkPacket::decode(b, caps) {
        let mut out = BytesMut::new();
        ok.encode(caps, &mut out);
        if p41 {
            assert_eq!(OkPacket::decode(&out, caps), Ok(ok));
        }
    }
    if let Ok(e) = ErrPacket::decode(b) {
        let mut out = BytesMut::new();
        e.encode(&mut out);
        // Without a state, a message that starts like one cannot be told from one.
        if e.sql_state.is_some() || !e.message.starts_with('#') {
            assert_eq!(ErrPacket::decode(&out), Ok(e));
        }
    }
    if let Ok(e) = EofPacket::decode(b, caps) {
        let mut out = BytesMut::new();
        e.encode(caps, &mut out);
        assert_eq!(EofPacket::decode(&out, caps), Ok(e));
    }
    let _ = AuthReply::decode(b, caps);
    if let Ok(Command::Query(sql)) = Command::parse(b, caps) {
        let _ = parse_kill(sql);
    }
    if let Ok(k) = parse_kill(b) {
        let kw = match k.kind {
            KillKind::Query => "QUERY",
            KillKind::Connection => "CONNECTION",
        };
        assert_eq!(parse_kill(format!("kill {kw} {}", k.id).as_bytes()), Ok(k));
    }
}
