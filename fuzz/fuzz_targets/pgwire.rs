//! Fuzzes every public decoder of the PostgreSQL codec: the first byte picks the stream (a
//! client's first packets, or typed messages from either side), the rest is what a peer sent.
//! Whatever decodes must re-encode to bytes that decode to the same value, where an encoder for
//! that message exists.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_pgwire::{
    decode_message, decode_startup, encode, parse_password, BackendMessage, Message, StartupPacket,
    MAX_SETUP_MESSAGE_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => startup_stream(rest),
        1 => message_stream(rest, MAX_SETUP_MESSAGE_LEN),
        // A small limit reaches the length checks with short inputs.
        _ => message_stream(rest, 64),
    }
});

fn startup_stream(mut buf: &[u8]) {
    while let Ok(Some((packet, n))) = decode_startup(buf) {
        assert!((8..=buf.len()).contains(&n), "consumed {n} of {}", buf.len());
        let again = match &packet {
            StartupPacket::SslRequest => encode::ssl_request(),
            StartupPacket::GssEncRequest => encode::gssenc_request(),
            StartupPacket::Cancel(c) => encode::cancel_request(c.pid, &c.secret),
            StartupPacket::Startup(m) => encode::startup(m.version, &m.params),
        };
        assert_eq!(decode_startup(&again), Ok(Some((packet.clone(), again.len()))));
        if let StartupPacket::Startup(m) = &packet {
            let _ = (m.user(), m.database());
        }
        buf = &buf[n..];
    }
}

fn message_stream(mut buf: &[u8], max_len: usize) {
    while let Ok(Some((msg, n))) = decode_message(buf, max_len) {
        assert!((5..=buf.len()).contains(&n), "consumed {n} of {}", buf.len());
        assert_eq!(msg.body.len() + 5, n);
        if let Ok(p) = parse_password(msg.body) {
            let again = encode::password(p);
            let (m, _) = decode_message(&again, usize::MAX).ok().flatten().expect("encoded password decodes");
            assert_eq!(parse_password(m.body), Ok(p));
        }
        if let Ok(parsed) = BackendMessage::parse(msg) {
            if let Some(again) = reencode(&parsed) {
                let (m, used) = decode_message(&again, usize::MAX).ok().flatten().expect("encoded message decodes");
                assert_eq!(used, again.len());
                assert_eq!(BackendMessage::parse(m).as_ref(), Ok(&parsed));
            }
        }
        buf = &buf[n..];
    }
    // Parsing a body whatever its tag says reaches each parser with every input.
    for tag in *b"RSKZENv" {
        let _ = BackendMessage::parse(Message { tag, body: buf });
    }
}

/// The encoder for a parsed backend message, for the messages Sluice writes itself.
fn reencode(m: &BackendMessage) -> Option<Vec<u8>> {
    Some(match m {
        BackendMessage::AuthenticationOk => encode::auth_ok(),
        BackendMessage::AuthenticationCleartextPassword => encode::auth_cleartext(),
        BackendMessage::ParameterStatus { name, value } => encode::parameter_status(name, value),
        BackendMessage::BackendKeyData { pid, secret } => encode::backend_key_data(*pid, secret),
        BackendMessage::ReadyForQuery(s) => encode::ready_for_query(*s),
        BackendMessage::ErrorResponse(e) => encode::error_response(e),
        BackendMessage::NoticeResponse(e) => encode::notice_response(e),
        BackendMessage::NegotiateProtocolVersion { newest_minor, unrecognized } => {
            encode::negotiate_protocol_version(u16::try_from(*newest_minor).ok()?, unrecognized)
        }
        _ => return None,
    })
}
