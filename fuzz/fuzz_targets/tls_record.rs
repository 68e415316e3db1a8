//! Fuzzes the userspace TLS record path (`sluice_dataplane::tls_record`) for every supported
//! suite, with keys fixed here. Two modes: arbitrary bytes fed to the opening side as records
//! read from a peer, and a round trip in which arbitrary plaintext chunks are sealed, the stream
//! is delivered in arbitrary read sizes (and maybe corrupted at one byte), and the opening side
//! must give back exactly what was sealed, up to the corruption and never past it.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice_dataplane::tls_record::{
    RecordDecrypter, RecordEncrypter, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, MAX_PLAINTEXT,
    MAX_RECORD_LEN, TLS12, TLS13,
};

/// (version, suite, key length): every suite the record path accepts.
const SUITES: &[(u16, u16, usize)] = &[
    (TLS13, 0x1301, 16),
    (TLS13, 0x1302, 32),
    (TLS13, 0x1303, 32),
    (TLS12, 0xc02f, 16),
    (TLS12, 0xc02b, 16),
    (TLS12, 0x009c, 16),
    (TLS12, 0x009e, 16),
    (TLS12, 0xc030, 32),
    (TLS12, 0xc02c, 32),
    (TLS12, 0x009d, 32),
    (TLS12, 0x009f, 32),
    (TLS12, 0xcca8, 32),
    (TLS12, 0xcca9, 32),
    (TLS12, 0xccaa, 32),
];

const CONTENT_TYPES: [u8; 3] = [CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, CONTENT_ALERT];

#[derive(Debug, Arbitrary)]
struct RoundTrip {
    suite: u8,
    /// TLS 1.2 AES-GCM also takes a bare 4-byte salt as the IV.
    short_salt: bool,
    /// Records already protected with the keys: high values reach the exhaustion check.
    seq: u64,
    records: Vec<(u8, Vec<u8>)>,
    /// How many bytes each read delivers (0 is taken as 1).
    reads: Vec<u16>,
    corrupt: Option<(u32, u8)>,
}

fn keys(key_len: usize, iv_len: usize) -> (Vec<u8>, Vec<u8>) {
    ((0..key_len as u8).collect(), (100..100 + iv_len as u8).collect())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        open_garbage(mode >> 1, rest);
    } else if let Ok(rt) = RoundTrip::arbitrary_take_rest(Unstructured::new(rest)) {
        round_trip(rt);
    }
});

/// Bytes no encrypter produced: whatever the decrypter does, it must not panic, read past the
/// buffer, or touch a record it has not got whole.
fn open_garbage(which: u8, data: &[u8]) {
    let (version, suite, key_len) = SUITES[usize::from(which) % SUITES.len()];
    let (key, iv) = keys(key_len, 12);
    let Ok(mut dec) = RecordDecrypter::new(version, suite, &key, &iv, 0) else { panic!("suite {suite:#x}") };
    let mut buf = data.to_vec();
    let mut off = 0;
    loop {
        let before = buf[off..].to_vec();
        let seq = dec.seq();
        if let Ok(Some(n)) = dec.record_len(&buf[off..]) {
            assert!(n <= MAX_RECORD_LEN);
        }
        match dec.open(&mut buf[off..]) {
            Ok(Some(o)) => {
                assert!(o.record_len <= buf.len() - off);
                assert!(o.plaintext.start <= o.plaintext.end && o.plaintext.end <= o.record_len);
                assert!(o.plaintext.len() <= MAX_PLAINTEXT);
                assert_eq!(dec.seq(), seq + 1);
                off += o.record_len;
            }
            Ok(None) => {
                assert_eq!(&buf[off..], &before[..], "an incomplete record is left untouched");
                assert_eq!(dec.seq(), seq);
                return;
            }
            Err(_) => return,
        }
    }
}

fn round_trip(rt: RoundTrip) {
    let (version, suite, key_len) = SUITES[usize::from(rt.suite) % SUITES.len()];
    let gcm12 = version == TLS12 && !(0xcca8..=0xccaa).contains(&suite);
    let (key, iv) = keys(key_len, 12);
    let enc_iv = if gcm12 && rt.short_salt { &iv[..4] } else { &iv[..] };
    let mut enc = RecordEncrypter::new(version, suite, &key, enc_iv, rt.seq).expect("valid keys");
    let mut dec = RecordDecrypter::new(version, suite, &key, &iv, rt.seq).expect("valid keys");

    let mut wire = Vec::new();
    let mut sent = Vec::new();
    for (typ, plain) in rt.records.iter().take(64) {
        let typ = CONTENT_TYPES[usize::from(*typ) % CONTENT_TYPES.len()];
        let plain = &plain[..plain.len().min(MAX_PLAINTEXT)];
        let mut out = vec![0; plain.len() + enc.overhead()];
        match enc.seal(typ, plain, &mut out) {
            Ok(n) => {
                assert_eq!(n, out.len());
                wire.extend_from_slice(&out);
                sent.push((typ, plain.to_vec()));
            }
            // Only the sequence number may run out; then nothing more is sent under this key.
            Err(e) => {
                assert_eq!(e, sluice_dataplane::tls_record::RecordError::SequenceExhausted);
                break;
            }
        }
    }
    let corrupt_at = rt.corrupt.filter(|(_, x)| *x != 0).filter(|_| !wire.is_empty()).map(|(at, x)| {
        let at = at as usize % wire.len();
        wire[at] ^= x;
        at
    });

    // Deliver the stream in the fuzzer's read sizes, opening what is complete after each read.
    let mut buf: Vec<u8> = Vec::new();
    let mut delivered = 0;
    let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut consumed = 0;
    let mut reads = rt.reads.iter().map(|r| usize::from(*r).max(1)).chain(std::iter::repeat(4096));
    let mut failed = false;
    while delivered < wire.len() && !failed {
        let n = reads.next().unwrap_or(4096).min(wire.len() - delivered);
        buf.extend_from_slice(&wire[delivered..delivered + n]);
        delivered += n;
        loop {
            match dec.open(&mut buf) {
                Ok(Some(o)) => {
                    got.push((o.content_type, buf[o.plaintext.clone()].to_vec()));
                    consumed += o.record_len;
                    buf.drain(..o.record_len);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    }
    match corrupt_at {
        None => {
            assert!(!failed, "an intact stream fails to open");
            assert!(buf.is_empty(), "{} bytes left over", buf.len());
            assert_eq!(got, sent);
        }
        Some(at) => {
            // Records before the corrupted byte open as sent; the corrupted one never does.
            assert!(consumed <= at, "a record spanning the corruption at {at} opened (consumed {consumed})");
            assert_eq!(&got[..], &sent[..got.len()]);
        }
    }
}
