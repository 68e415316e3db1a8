//! Fuzzes the control ↔ dataplane handoff frame decoder. Raw bytes rarely get past the 4-byte
//! magic, so half the inputs are read as a structured frame instead: a known message type and a
//! list of fields (tag | len | bytes) under a correct header, which reaches each message's field
//! parsing. Any frame that decodes must re-encode to a frame that decodes to the same message.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice_handoff::handoff::{decode, encode, HandoffError, HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION};

/// Tags some message type reads; the fuzzer picks among them more often than among all 65536.
const KNOWN_TAGS: &[u16] =
    &[1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 32, 33, 34, 35, 36, 37, 38, 64, 65, 66, 67, 68, 69, 80, 81];

#[derive(Debug, Arbitrary)]
enum Tag {
    Known(u8),
    Raw(u16),
}

#[derive(Debug, Arbitrary)]
enum Value {
    Bytes(Vec<u8>),
    U64(u64),
    Byte(u8),
    /// A nested field sequence, as in each `Stats` entry.
    Nested(Vec<(Tag, Vec<u8>)>),
}

#[derive(Debug, Arbitrary)]
struct Frame {
    /// 1..=11 are the known types; 0 and 12 check the unknown-type path.
    ty: u8,
    fields: Vec<(Tag, Value)>,
    /// Bytes cut off the end, so truncated frames and fields are tried too.
    cut: u8,
}

impl Tag {
    fn get(&self) -> u16 {
        match self {
            Tag::Known(i) => KNOWN_TAGS[usize::from(*i) % KNOWN_TAGS.len()],
            Tag::Raw(t) => *t,
        }
    }
}

fn put_field(out: &mut Vec<u8>, tag: u16, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Frame {
    fn build(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        for (tag, value) in &self.fields {
            let bytes = match value {
                Value::Bytes(b) => b.clone(),
                Value::U64(v) => v.to_be_bytes().to_vec(),
                Value::Byte(b) => vec![*b],
                Value::Nested(fs) => {
                    let mut n = Vec::new();
                    for (t, b) in fs {
                        put_field(&mut n, t.get(), b);
                    }
                    n
                }
            };
            put_field(&mut payload, tag.get(), &bytes);
        }
        payload.truncate(MAX_PAYLOAD);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&u16::from(self.ty % 13).to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        let _ = check(rest);
        return;
    }
    let Ok(frame) = Frame::arbitrary_take_rest(Unstructured::new(rest)) else { return };
    let mut bytes = frame.build();
    let whole = bytes.len();
    bytes.truncate(whole.saturating_sub(usize::from(frame.cut)));
    let got = check(&bytes);
    if bytes.len() < whole {
        // A frame cut short waits for the rest; it is never an error or a message.
        assert_eq!(got, Ok(None), "cut {} of {whole}", frame.cut);
    } else if let Err(e) = got {
        // The header is right by construction: only the payload may be refused.
        assert!(
            matches!(
                e,
                HandoffError::Truncated
                    | HandoffError::Missing(_)
                    | HandoffError::Malformed(_)
                    | HandoffError::UnknownType(_)
            ),
            "{e:?}"
        );
    }
});

/// Decodes every frame at the front of `buf`; each must round-trip through `encode`.
fn check(mut buf: &[u8]) -> Result<Option<()>, HandoffError> {
    loop {
        match decode(buf)? {
            None => return Ok(None),
            Some((msg, n)) => {
                assert!((HEADER_LEN..=buf.len()).contains(&n), "consumed {n} of {}", buf.len());
                let again = encode(&msg);
                assert!(again.len() <= HEADER_LEN + MAX_PAYLOAD, "re-encoded frame of {} bytes", again.len());
                assert_eq!(decode(&again), Ok(Some((msg, again.len()))));
                buf = &buf[n..];
                if buf.is_empty() {
                    return Ok(Some(()));
                }
            }
        }
    }
}
