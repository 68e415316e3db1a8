//! Startup-phase parsing cost: what control spends per connection before the relay starts.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_pgwire::{decode_message, decode_startup, encode, BackendMessage, ProtocolVersion, MAX_SETUP_MESSAGE_LEN};
use std::hint::black_box;

fn startup(c: &mut Criterion) {
    let params: Vec<(String, String)> = [
        ("user", "alice"),
        ("database", "demo"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let packet = encode::startup(ProtocolVersion::V3_0, &params);
    let mut g = c.benchmark_group("pgwire");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("decode_startup", |b| b.iter(|| decode_startup(black_box(&packet))));

    let mut greeting = encode::auth_ok();
    for (k, v) in
        [("server_version", "15.18"), ("client_encoding", "UTF8"), ("TimeZone", "UTC"), ("integer_datetimes", "on")]
    {
        greeting.extend(encode::parameter_status(k, v));
    }
    greeting.extend(encode::backend_key_data(1234, &[1, 2, 3, 4]));
    greeting.extend(encode::ready_for_query(b'I'));
    g.throughput(Throughput::Bytes(greeting.len() as u64));
    g.bench_function("parse_greeting", |b| {
        b.iter(|| {
            let mut rest = black_box(&greeting[..]);
            let mut n = 0;
            while let Ok(Some((m, used))) = decode_message(rest, MAX_SETUP_MESSAGE_LEN) {
                if BackendMessage::parse(m).is_ok() {
                    n += 1;
                }
                rest = &rest[used..];
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
