//! Golden frames of handoff wire version 1: one checked-in fixture per message kind (and per
//! optional part), written by the encoder as it was when the fixtures were made. A data plane
//! started with `--take-over` talks to one built from another version, so the encoder must keep
//! producing these bytes and the decoder must keep reading them; a change that breaks either
//! fails here, not in a live takeover.

use std::path::PathBuf;

use sluice_handoff::handoff::{
    decode, encode, CounterBaseline, CounterSource, DirPath, DirState, EndReason, Handoff, LegCounters, LegCrypto,
    Message, Resume, Role, SessionCounters, SessionEnded, SessionStats,
};

fn handoff() -> Handoff {
    Handoff {
        session_id: "2d757176-289d-2a04-d778-31ee77127561".into(),
        user: "alice".into(),
        db_service: "orders".into(),
        db_user: "app_ro".into(),
        db_name: "shop".into(),
        not_after: 1_800_000_123,
        idle_timeout_ms: 900_000,
        client: LegCrypto::Tls {
            version: 0x0304,
            cipher_suite: 0x1302,
            tx_key: (0..32).collect(),
            tx_iv: (32..44).collect(),
            tx_seq: 3,
            rx_key: (64..96).collect(),
            rx_iv: (96..108).collect(),
            rx_seq: 1,
        },
        upstream: LegCrypto::Tls {
            version: 0x0303,
            cipher_suite: 0xc02f,
            tx_key: vec![0xa5; 16],
            tx_iv: vec![0x5a; 4],
            tx_seq: 1,
            rx_key: vec![0x3c; 16],
            rx_iv: vec![0xc3; 4],
            rx_seq: 0x0102_0304_0506_0708,
        },
    }
}

fn counters() -> SessionCounters {
    SessionCounters {
        source: CounterSource::Bpf,
        client: LegCounters {
            rx_bytes: 1_000,
            tx_bytes: 2_000_000,
            rx_packets: 10,
            tx_packets: 1_500,
            srtt_us: 250,
            total_retrans: 2,
        },
        upstream: LegCounters {
            rx_bytes: 2_000_100,
            tx_bytes: 1_100,
            rx_packets: 1_400,
            tx_packets: 11,
            srtt_us: 90,
            total_retrans: 0,
        },
    }
}

fn resume() -> Resume {
    let record = DirState {
        path: DirPath::Record,
        eof: true,
        notified: true,
        notify_sent: false,
        done: false,
        held_in: 17,
        held_out: 40_000,
        out_plain: 39_000,
        hs_skip: 3,
        ktls_hs_skip: 5,
        bytes: 123_456_789,
    };
    let splice = DirState {
        path: DirPath::Splice,
        eof: false,
        notified: false,
        notify_sent: false,
        done: true,
        held_in: 4_096,
        held_out: 0,
        out_plain: 0,
        hs_skip: 0,
        ktls_hs_skip: 0,
        bytes: 987_654,
    };
    Resume {
        handoff: Handoff { upstream: LegCrypto::Plain, ..handoff() },
        kernel_tls: [3, 0],
        age_ms: 86_400_000,
        idle_ms: 1_234,
        wire: [[10, 20], [30, u64::MAX]],
        first_close: Some(EndReason::UpstreamClosed),
        dirs: [record, splice],
        baseline: Some(CounterBaseline {
            cookies: [0x1111, 0x2222],
            queued_rx: [0, 5],
            rx_at_registration: [100, 200],
            unsent_tx: [7, 0],
        }),
    }
}

/// Every fixture: its file name under `tests/golden/` and the message it holds.
fn cases() -> Vec<(&'static str, Message)> {
    let ended = SessionEnded {
        session_id: "s-1".into(),
        bytes_client_to_upstream: 4_096,
        bytes_upstream_to_client: 1 << 40,
        duration_ms: 61_000,
        reason: EndReason::IdleTimeout,
        counters: None,
        ktls: None,
    };
    vec![
        ("hello_control", Message::Hello { role: Role::Control, pid: 4242 }),
        ("hello_dataplane", Message::Hello { role: Role::Dataplane, pid: 1 }),
        ("hello_admin", Message::Hello { role: Role::Admin, pid: 77 }),
        ("hello_successor", Message::Hello { role: Role::Successor, pid: 0xdead_beef }),
        ("handoff_tls", Message::Handoff(Box::new(handoff()))),
        (
            "handoff_plain",
            Message::Handoff(Box::new(Handoff {
                client: LegCrypto::Plain,
                upstream: LegCrypto::Plain,
                not_after: -1,
                idle_timeout_ms: 0,
                ..handoff()
            })),
        ),
        ("handoff_ack", Message::HandoffAck { session_id: "s-1".into(), error: None }),
        (
            "handoff_ack_error",
            Message::HandoffAck { session_id: "s-1".into(), error: Some("kTLS install failed".into()) },
        ),
        ("end_session", Message::EndSession { session_id: "s-1".into(), reason: EndReason::Locked }),
        ("session_ended", Message::SessionEnded(ended.clone())),
        (
            "session_ended_counters",
            Message::SessionEnded(SessionEnded {
                reason: EndReason::AccessRevoked,
                counters: Some(counters()),
                ktls: Some((true, false)),
                ..ended.clone()
            }),
        ),
        (
            "session_ended_userspace",
            Message::SessionEnded(SessionEnded {
                reason: EndReason::WorkerShutdown,
                counters: Some(SessionCounters { source: CounterSource::Userspace, ..counters() }),
                ktls: Some((false, true)),
                ..ended
            }),
        ),
        ("list_sessions", Message::ListSessions),
        ("sessions", Message::Sessions { session_ids: vec!["s-1".into(), "s-2".into()], more: false }),
        ("sessions_more", Message::Sessions { session_ids: vec!["s-3".into()], more: true }),
        ("sessions_empty", Message::Sessions { session_ids: vec![], more: false }),
        ("stats_request", Message::StatsRequest),
        (
            "stats",
            Message::Stats {
                sessions: vec![
                    SessionStats {
                        session_id: "s-1".into(),
                        bytes_client_to_upstream: 10,
                        bytes_upstream_to_client: 20,
                        duration_ms: 30,
                        counters: Some(counters()),
                    },
                    SessionStats {
                        session_id: "s-2".into(),
                        bytes_client_to_upstream: 0,
                        bytes_upstream_to_client: u64::MAX,
                        duration_ms: 1,
                        counters: None,
                    },
                ],
                more: false,
            },
        ),
        ("stats_more", Message::Stats { sessions: vec![], more: true }),
        ("resume", Message::Resume(Box::new(resume()))),
        (
            "resume_minimal",
            Message::Resume(Box::new(Resume { first_close: None, baseline: None, kernel_tls: [0, 0], ..resume() })),
        ),
        ("takeover_done", Message::TakeoverDone),
    ]
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.bin"))
}

#[test]
fn the_encoder_writes_the_golden_frames() {
    for (name, msg) in cases() {
        let want = std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(encode(&msg), want, "{name}: the encoder no longer writes wire version 1's bytes");
    }
}

#[test]
fn the_decoder_reads_the_golden_frames() {
    for (name, msg) in cases() {
        let bytes = std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (got, used) = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")).expect("a whole frame");
        assert_eq!(used, bytes.len(), "{name}");
        assert_eq!(got, msg, "{name}");
    }
}
