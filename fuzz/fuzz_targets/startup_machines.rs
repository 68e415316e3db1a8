//! Fuzzes both connection-setup state machines of the PostgreSQL codec as their drivers run
//! them: the first byte picks the machine and its configuration and how many bytes each read
//! returns; the rest is what the peer sent. Neither may panic or ask for zero bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_pgwire::{Event, ServerNegotiation, TlsOffer, UpstreamEvent, UpstreamStartup};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    // 1..=16 bytes per read, or exactly what the machine asks for.
    let chunk = match usize::from(mode >> 3) {
        0 => usize::MAX,
        n => n.min(16),
    };
    match mode & 3 {
        0 => server(TlsOffer::Required, rest, chunk),
        1 => server(TlsOffer::None, rest, chunk),
        2 => upstream(true, rest, chunk),
        _ => upstream(false, rest, chunk),
    }
});

fn server(offer: TlsOffer, mut rest: &[u8], chunk: usize) {
    let mut m = ServerNegotiation::new(offer);
    if let Some(Event::StartTls { .. }) = rest.first().and_then(|&b| m.peeked_first_byte(b)) {
        rest = &rest[1..];
        m.tls_established();
    }
    loop {
        match m.next_event() {
            Ok(Event::NeedMore(n)) => {
                assert!(n > 0);
                if rest.is_empty() {
                    return;
                }
                let take = n.min(chunk).min(rest.len());
                m.feed(&rest[..take]);
                rest = &rest[take..];
            }
            Ok(Event::StartTls { .. }) => m.tls_established(),
            Ok(Event::Reply(_)) => {}
            Ok(Event::Cancel(_) | Event::Startup(_)) => return,
            Err(e) => {
                let _ = e.error_response();
                return;
            }
        }
    }
}

fn upstream(tls: bool, mut rest: &[u8], chunk: usize) {
    let mut m = UpstreamStartup::new(tls, vec![("user".into(), "u".into())], "token".into());
    loop {
        match m.next_event() {
            Ok(UpstreamEvent::NeedMore(n)) => {
                assert!(n > 0);
                if rest.is_empty() {
                    return;
                }
                let take = n.min(chunk).min(rest.len());
                m.feed(&rest[..take]);
                rest = &rest[take..];
            }
            Ok(UpstreamEvent::Send(_)) => {}
            Ok(UpstreamEvent::StartTls) => m.tls_established(),
            Ok(UpstreamEvent::Done(_)) | Err(_) => return,
        }
    }
}
