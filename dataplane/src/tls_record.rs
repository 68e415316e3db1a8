//! Sans-IO TLS record protection for relayed sessions.
//!
//! Control finishes each TLS handshake with rustls and hands the data plane only the traffic keys
//! (`LegCrypto::Tls`). Without kTLS the worker must frame, seal and open records itself; this
//! module does exactly that and nothing more: pure functions over byte slices, one
//! [`RecordDecrypter`] for the bytes read from a leg and one [`RecordEncrypter`] for the bytes
//! written to it. Handshake state machines, alerts policy and IO live in the relay.
//!
//! Supported: TLS 1.3 with AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305, and TLS 1.2 with the
//! AES-GCM suites (explicit 8-byte nonce on the wire) and the ChaCha20-Poly1305 suites (RFC 7905).
//! The IV layout follows rustls' `ConnectionTrafficSecrets`: 12 bytes, and for TLS 1.2 AES-GCM the
//! 4-byte salt followed by 8 bytes that rustls XORs with the sequence number to make the explicit
//! nonce (a bare 4-byte salt is accepted too; then the explicit nonce is the sequence number).

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use thiserror::Error;

/// Largest plaintext a record may carry (RFC 8446 5.1, RFC 5246 6.2.1).
pub const MAX_PLAINTEXT: usize = 16384;
/// `type(1) | legacy_version(2) | length(2)`.
pub const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const GCM_EXPLICIT_LEN: usize = 8;
/// TLS 1.3 allows 256 bytes of expansion (tag, type byte, padding) over the plaintext limit.
const TLS13_MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// TLS 1.2 allows 2048 bytes of expansion.
const TLS12_MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 2048;
/// The largest complete record either version accepts; receive buffers must hold one.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + TLS12_MAX_CIPHERTEXT;

pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

pub const TLS12: u16 = 0x0303;
pub const TLS13: u16 = 0x0304;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("unsupported TLS version {0:#06x}")]
    UnsupportedVersion(u16),
    #[error("unsupported cipher suite {0:#06x} for this TLS version")]
    UnsupportedSuite(u16),
    #[error("key length does not match the cipher suite")]
    BadKeyLength,
    #[error("IV length does not match the cipher suite")]
    BadIvLength,
    #[error("unexpected outer record content type {0}")]
    BadContentType(u8),
    #[error("record version {0:#06x} is not TLS")]
    BadRecordVersion(u16),
    #[error("record length {0} is out of range")]
    BadRecordLength(usize),
    #[error("record failed authentication (wrong key, sequence or tampered)")]
    Decrypt,
    #[error("decrypted record has no content type")]
    NoContentType,
    #[error("plaintext of {0} bytes exceeds the record limit")]
    RecordOverflow(usize),
    #[error("sequence number exhausted; a key update would be needed")]
    SequenceExhausted,
    #[error("output buffer too small for the record")]
    OutputTooSmall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tls13,
    /// TLS 1.2 AES-GCM: explicit nonce on the wire, salt from the key block.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: implicit nonce like TLS 1.3, TLS 1.2 AAD.
    Tls12Chacha,
}

/// One direction's AEAD state; `seq` is the number of records already protected with this key.
struct Cipher {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// 4 when the caller handed only the GCM salt.
    iv_len: usize,
    proto: Proto,
    seq: u64,
}

impl Cipher {
    fn new(version: u16, suite: u16, key: &[u8], iv: &[u8], seq: u64) -> Result<Self, RecordError> {
        let (alg, proto) = match (version, suite) {
            (TLS13, 0x1301) => (&aead::AES_128_GCM, Proto::Tls13),
            (TLS13, 0x1302) => (&aead::AES_256_GCM, Proto::Tls13),
            (TLS13, 0x1303) => (&aead::CHACHA20_POLY1305, Proto::Tls13),
            // ECDHE-RSA, ECDHE-ECDSA, RSA and DHE-RSA key exchange with AES-GCM.
            (TLS12, 0xc02f | 0xc02b | 0x009c | 0x009e) => (&aead::AES_128_GCM, Proto::Tls12Gcm),
            (TLS12, 0xc030 | 0xc02c | 0x009d | 0x009f) => (&aead::AES_256_GCM, Proto::Tls12Gcm),
            (TLS12, 0xcca8..=0xccaa) => (&aead::CHACHA20_POLY1305, Proto::Tls12Chacha),
            (TLS12 | TLS13, s) => return Err(RecordError::UnsupportedSuite(s)),
            (v, _) => return Err(RecordError::UnsupportedVersion(v)),
        };
        let iv_ok = iv.len() == NONCE_LEN || (proto == Proto::Tls12Gcm && iv.len() == 4);
        if !iv_ok {
            return Err(RecordError::BadIvLength);
        }
        let unbound = UnboundKey::new(alg, key).map_err(|_| RecordError::BadKeyLength)?;
        let mut full = [0u8; NONCE_LEN];
        full[..iv.len()].copy_from_slice(iv);
        Ok(Cipher { key: LessSafeKey::new(unbound), iv: full, iv_len: iv.len(), proto, seq })
    }

    /// `iv XOR seq`, the sequence right-aligned big-endian (RFC 8446 5.3, RFC 7905 2).
    fn xor_nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn next_seq(&mut self) -> Result<(), RecordError> {
        // The record at u64::MAX may not be sent; RFC 8446 5.3 requires a rekey before wrapping.
        self.seq = self.seq.checked_add(1).filter(|s| *s != u64::MAX).ok_or(RecordError::SequenceExhausted)?;
        Ok(())
    }

    fn max_ciphertext(&self) -> usize {
        match self.proto {
            Proto::Tls13 => TLS13_MAX_CIPHERTEXT,
            Proto::Tls12Gcm | Proto::Tls12Chacha => TLS12_MAX_CIPHERTEXT,
        }
    }
}

fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// One opened record: its real content type and where its plaintext now lies in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    /// Plaintext range within the slice passed to [`RecordDecrypter::open`].
    pub plaintext: Range<usize>,
    /// Bytes of the slice the record occupied (header included).
    pub record_len: usize,
}

/// Opens the records read from one leg.
pub struct RecordDecrypter {
    c: Cipher,
}

impl RecordDecrypter {
    /// `key`/`iv` are the leg's *read* secrets; `seq` the number of records already read with them.
    pub fn new(version: u16, suite: u16, key: &[u8], iv: &[u8], seq: u64) -> Result<Self, RecordError> {
        Ok(RecordDecrypter { c: Cipher::new(version, suite, key, iv, seq)? })
    }

    pub fn seq(&self) -> u64 {
        self.c.seq
    }

    /// Length of the complete record at the front of `buf` once its header is in: lets the caller
    /// size its reads and check the record fits. `Ok(None)` while fewer than 5 bytes are present.
    pub fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            // Reject garbage as soon as the first byte shows it, not after 5 bytes.
            return match buf.first() {
                Some(t) => self.check_type(*t).map(|_| None),
                None => Ok(None),
            };
        };
        self.check_type(h[0])?;
        let version = u16::from_be_bytes([h[1], h[2]]);
        // Both versions put 0x0303 here after the handshake; accept any 3.x as peers are lenient.
        if h[1] != 3 {
            return Err(RecordError::BadRecordVersion(version));
        }
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        let min = match self.c.proto {
            Proto::Tls13 => TAG_LEN + 1,
            Proto::Tls12Gcm => GCM_EXPLICIT_LEN + TAG_LEN,
            Proto::Tls12Chacha => TAG_LEN,
        };
        if len < min || len > self.c.max_ciphertext() {
            return Err(RecordError::BadRecordLength(len));
        }
        Ok(Some(HEADER_LEN + len))
    }

    fn check_type(&self, t: u8) -> Result<(), RecordError> {
        let ok = match self.c.proto {
            // Everything after the handshake is wrapped as application_data.
            Proto::Tls13 => t == CONTENT_APPLICATION_DATA,
            // No change_cipher_spec: that would be a renegotiation, which the relay cannot follow.
            Proto::Tls12Gcm | Proto::Tls12Chacha => {
                matches!(t, CONTENT_ALERT | CONTENT_HANDSHAKE | CONTENT_APPLICATION_DATA)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(RecordError::BadContentType(t))
        }
    }

    /// Opens the record at the front of `buf` in place. `Ok(None)` when the record is not complete
    /// yet (nothing is consumed, the sequence does not advance). After an error the stream is
    /// unusable: the caller must end the session.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        let Some(record_len) = self.record_len(buf)? else { return Ok(None) };
        if buf.len() < record_len {
            return Ok(None);
        }
        let (header, rest) = buf.split_at_mut(HEADER_LEN);
        let payload = &mut rest[..record_len - HEADER_LEN];
        let seq = self.c.seq;
        let (content_type, plaintext) = match self.c.proto {
            Proto::Tls13 => {
                let nonce = Nonce::assume_unique_for_key(self.c.xor_nonce());
                let aad: [u8; HEADER_LEN] = [header[0], header[1], header[2], header[3], header[4]];
                let inner =
                    self.c.key.open_in_place(nonce, Aad::from(aad), payload).map_err(|_| RecordError::Decrypt)?;
                // Inner plaintext is content || type || zeros: the type is the last non-zero byte.
                let Some(pos) = inner.iter().rposition(|b| *b != 0) else {
                    return Err(RecordError::NoContentType);
                };
                if pos > MAX_PLAINTEXT {
                    return Err(RecordError::RecordOverflow(pos));
                }
                (inner[pos], HEADER_LEN..HEADER_LEN + pos)
            }
            Proto::Tls12Gcm => {
                let mut n = [0u8; NONCE_LEN];
                n[..4].copy_from_slice(&self.c.iv[..4]);
                n[4..].copy_from_slice(&payload[..GCM_EXPLICIT_LEN]);
                let plain_len = payload.len() - GCM_EXPLICIT_LEN - TAG_LEN;
                let aad = tls12_aad(seq, header[0], [header[1], header[2]], plain_len);
                let nonce = Nonce::assume_unique_for_key(n);
                let out = self
                    .c
                    .key
                    .open_within(nonce, Aad::from(aad), payload, GCM_EXPLICIT_LEN..)
                    .map_err(|_| RecordError::Decrypt)?;
                let len = out.len();
                if len > MAX_PLAINTEXT {
                    return Err(RecordError::RecordOverflow(len));
                }
                (header[0], HEADER_LEN..HEADER_LEN + len)
            }
            Proto::Tls12Chacha => {
                let plain_len = payload.len() - TAG_LEN;
                let aad = tls12_aad(seq, header[0], [header[1], header[2]], plain_len);
                let nonce = Nonce::assume_unique_for_key(self.c.xor_nonce());
                let out = self.c.key.open_in_place(nonce, Aad::from(aad), payload).map_err(|_| RecordError::Decrypt)?;
                let len = out.len();
                if len > MAX_PLAINTEXT {
                    return Err(RecordError::RecordOverflow(len));
                }
                (header[0], HEADER_LEN..HEADER_LEN + len)
            }
        };
        self.c.next_seq()?;
        Ok(Some(Opened { content_type, plaintext, record_len }))
    }
}

/// Seals the records written to one leg.
pub struct RecordEncrypter {
    c: Cipher,
}

impl RecordEncrypter {
    /// `key`/`iv` are the leg's *write* secrets; `seq` the number of records already written.
    pub fn new(version: u16, suite: u16, key: &[u8], iv: &[u8], seq: u64) -> Result<Self, RecordError> {
        Ok(RecordEncrypter { c: Cipher::new(version, suite, key, iv, seq)? })
    }

    pub fn seq(&self) -> u64 {
        self.c.seq
    }

    /// Bytes a record adds around its plaintext: `seal` needs `plaintext.len() + overhead()`.
    pub fn overhead(&self) -> usize {
        HEADER_LEN
            + TAG_LEN
            + match self.c.proto {
                Proto::Tls13 => 1,
                Proto::Tls12Gcm => GCM_EXPLICIT_LEN,
                Proto::Tls12Chacha => 0,
            }
    }

    /// Writes one record carrying `plaintext` (at most [`MAX_PLAINTEXT`] bytes) of `content_type`
    /// to the front of `out`; returns its length.
    pub fn seal(&mut self, content_type: u8, plaintext: &[u8], out: &mut [u8]) -> Result<usize, RecordError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow(plaintext.len()));
        }
        let total = plaintext.len() + self.overhead();
        let out = out.get_mut(..total).ok_or(RecordError::OutputTooSmall)?;
        let payload_len = total - HEADER_LEN;
        let outer_type = match self.c.proto {
            Proto::Tls13 => CONTENT_APPLICATION_DATA,
            Proto::Tls12Gcm | Proto::Tls12Chacha => content_type,
        };
        let [v0, v1] = TLS12.to_be_bytes();
        let [l0, l1] = (payload_len as u16).to_be_bytes();
        let header = [outer_type, v0, v1, l0, l1];
        out[..HEADER_LEN].copy_from_slice(&header);
        let seq = self.c.seq;
        let body = &mut out[HEADER_LEN..total - TAG_LEN];
        let tag = match self.c.proto {
            Proto::Tls13 => {
                body[..plaintext.len()].copy_from_slice(plaintext);
                body[plaintext.len()] = content_type;
                let nonce = Nonce::assume_unique_for_key(self.c.xor_nonce());
                self.c.key.seal_in_place_separate_tag(nonce, Aad::from(header), body)
            }
            Proto::Tls12Gcm => {
                // Like rustls: the nonce is iv XOR seq and its last 8 bytes go on the wire, so the
                // explicit part never repeats under one key.
                let n = if self.c.iv_len == NONCE_LEN {
                    self.c.xor_nonce()
                } else {
                    let mut n = self.c.iv;
                    n[4..].copy_from_slice(&seq.to_be_bytes());
                    n
                };
                body[..GCM_EXPLICIT_LEN].copy_from_slice(&n[4..]);
                body[GCM_EXPLICIT_LEN..].copy_from_slice(plaintext);
                let aad = tls12_aad(seq, content_type, [v0, v1], plaintext.len());
                let nonce = Nonce::assume_unique_for_key(n);
                self.c.key.seal_in_place_separate_tag(nonce, Aad::from(aad), &mut body[GCM_EXPLICIT_LEN..])
            }
            Proto::Tls12Chacha => {
                body.copy_from_slice(plaintext);
                let aad = tls12_aad(seq, content_type, [v0, v1], plaintext.len());
                let nonce = Nonce::assume_unique_for_key(self.c.xor_nonce());
                self.c.key.seal_in_place_separate_tag(nonce, Aad::from(aad), body)
            }
        }
        // ring only fails sealing for inputs beyond the AEAD's limits, far above 16 KiB.
        .map_err(|_| RecordError::RecordOverflow(plaintext.len()))?;
        out[total - TAG_LEN..].copy_from_slice(tag.as_ref());
        self.c.next_seq()?;
        Ok(total)
    }
}

/// The two-byte alert payload for close_notify (level warning, description 0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SUITES: &[(u16, u16, usize)] = &[
        (TLS13, 0x1301, 16),
        (TLS13, 0x1302, 32),
        (TLS13, 0x1303, 32),
        (TLS12, 0xc02f, 16),
        (TLS12, 0xc030, 32),
        (TLS12, 0xc02b, 16),
        (TLS12, 0xc02c, 32),
        (TLS12, 0x009c, 16),
        (TLS12, 0x009d, 32),
        (TLS12, 0xcca8, 32),
    ];

    fn pair(version: u16, suite: u16, key_len: usize, seq: u64) -> (RecordEncrypter, RecordDecrypter) {
        let key: Vec<u8> = (0..key_len as u8).collect();
        let iv: Vec<u8> = (100..112).collect();
        (
            RecordEncrypter::new(version, suite, &key, &iv, seq).unwrap(),
            RecordDecrypter::new(version, suite, &key, &iv, seq).unwrap(),
        )
    }

    fn seal_vec(enc: &mut RecordEncrypter, typ: u8, p: &[u8]) -> Vec<u8> {
        let mut out = vec![0; p.len() + enc.overhead()];
        let n = enc.seal(typ, p, &mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn roundtrip_every_suite_and_size() {
        for &(v, s, k) in SUITES {
            let (mut enc, mut dec) = pair(v, s, k, 7);
            for len in [0usize, 1, 100, 4096, MAX_PLAINTEXT] {
                let p: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
                let mut rec = seal_vec(&mut enc, CONTENT_APPLICATION_DATA, &p);
                assert_eq!(dec.record_len(&rec).unwrap(), Some(rec.len()));
                let o = dec.open(&mut rec).unwrap().unwrap();
                assert_eq!(o.content_type, CONTENT_APPLICATION_DATA, "suite {s:#x}");
                assert_eq!(&rec[o.plaintext.clone()], &p[..]);
                assert_eq!(o.record_len, rec.len());
            }
            assert_eq!(enc.seq(), 12);
            assert_eq!(dec.seq(), 12);
        }
    }

    #[test]
    fn tls13_hides_the_type_and_strips_padding() {
        let (mut enc, mut dec) = pair(TLS13, 0x1301, 16, 0);
        let rec = seal_vec(&mut enc, CONTENT_ALERT, &CLOSE_NOTIFY);
        assert_eq!(rec[0], CONTENT_APPLICATION_DATA);
        let mut r = rec.clone();
        let o = dec.open(&mut r).unwrap().unwrap();
        assert_eq!((o.content_type, &r[o.plaintext]), (CONTENT_ALERT, &CLOSE_NOTIFY[..]));

        // A padded record, as other stacks may send: content || type || zeros.
        let key: Vec<u8> = (0..16).collect();
        let iv: Vec<u8> = (100..112).collect();
        let k = LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
        let mut inner = b"hi".to_vec();
        inner.push(CONTENT_APPLICATION_DATA);
        inner.extend([0; 10]);
        let len = (inner.len() + TAG_LEN) as u16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut n = [0u8; 12];
        n.copy_from_slice(&iv);
        n[11] ^= 1; // seq 1
        k.seal_in_place_append_tag(Nonce::assume_unique_for_key(n), Aad::from(header), &mut inner).unwrap();
        let mut rec = header.to_vec();
        rec.extend(inner);
        let o = dec.open(&mut rec).unwrap().unwrap();
        assert_eq!((o.content_type, &rec[o.plaintext]), (CONTENT_APPLICATION_DATA, &b"hi"[..]));
    }

    #[test]
    fn tls12_gcm_sends_iv_xor_seq_as_explicit_nonce() {
        let (mut enc, _) = pair(TLS12, 0xc02f, 16, 0x0102);
        let rec = seal_vec(&mut enc, CONTENT_APPLICATION_DATA, b"x");
        let mut want = [104u8, 105, 106, 107, 108, 109, 110, 111];
        want[6] ^= 1;
        want[7] ^= 2;
        assert_eq!(&rec[5..13], &want);
        assert_eq!(rec[0], CONTENT_APPLICATION_DATA);
    }

    #[test]
    fn tls12_gcm_accepts_a_bare_salt() {
        let key = [9u8; 16];
        let mut enc = RecordEncrypter::new(TLS12, 0xc02b, &key, &[1, 2, 3, 4], 5).unwrap();
        let mut dec = RecordDecrypter::new(TLS12, 0xc02b, &key, &[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0], 5).unwrap();
        let mut rec = seal_vec(&mut enc, CONTENT_APPLICATION_DATA, b"salt");
        assert_eq!(&rec[5..13], &5u64.to_be_bytes());
        let o = dec.open(&mut rec).unwrap().unwrap();
        assert_eq!(&rec[o.plaintext], b"salt");
    }

    #[test]
    fn partial_records_wait() {
        let (mut enc, mut dec) = pair(TLS13, 0x1303, 32, 0);
        let rec = seal_vec(&mut enc, CONTENT_APPLICATION_DATA, b"hello world");
        for cut in 0..rec.len() {
            let mut part = rec[..cut].to_vec();
            assert_eq!(dec.open(&mut part), Ok(None), "cut {cut}");
            assert_eq!(&part[..], &rec[..cut], "a partial record is left untouched");
        }
        assert_eq!(dec.seq(), 0);
        let mut full = rec.clone();
        full.extend_from_slice(&[23, 3]);
        let o = dec.open(&mut full).unwrap().unwrap();
        assert_eq!(o.record_len, rec.len());
    }

    #[test]
    fn rejects_tampering_wrong_sequence_and_bad_headers() {
        for &(v, s, k) in SUITES {
            let (mut enc, _) = pair(v, s, k, 0);
            let rec = seal_vec(&mut enc, CONTENT_APPLICATION_DATA, b"payload");
            for i in 0..rec.len() {
                let (_, mut dec) = pair(v, s, k, 0);
                let mut bad = rec.clone();
                bad[i] ^= 0x40;
                // A flipped length byte may make the record look incomplete; it must never open.
                assert!(!matches!(dec.open(&mut bad), Ok(Some(_))), "suite {s:#x} flip at {i}");
            }
            let (_, mut dec) = pair(v, s, k, 1);
            assert_eq!(dec.open(&mut rec.clone()), Err(RecordError::Decrypt), "suite {s:#x} wrong seq");
        }
        let (_, mut dec) = pair(TLS13, 0x1301, 16, 0);
        assert_eq!(dec.open(&mut [22]), Err(RecordError::BadContentType(22)));
        assert_eq!(dec.open(&mut [23, 1, 0, 0, 20]), Err(RecordError::BadRecordVersion(0x0100)));
        assert_eq!(dec.open(&mut [23, 3, 3, 0x48, 0x01]), Err(RecordError::BadRecordLength(0x4801)));
        assert_eq!(dec.open(&mut [23, 3, 3, 0, 16]), Err(RecordError::BadRecordLength(16)));
        let (_, mut dec12) = pair(TLS12, 0xc02f, 16, 0);
        assert_eq!(dec12.open(&mut [20, 3, 3, 0, 1, 1]), Err(RecordError::BadContentType(20)));
    }

    #[test]
    fn tls13_all_zero_inner_is_an_error() {
        let key = [3u8; 16];
        let iv = [4u8; 12];
        let k = LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
        let mut inner = vec![0u8; 5];
        let header = [23, 3, 3, 0, (5 + TAG_LEN) as u8];
        k.seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::from(header), &mut inner).unwrap();
        let mut rec = header.to_vec();
        rec.extend(inner);
        let mut dec = RecordDecrypter::new(TLS13, 0x1301, &key, &iv, 0).unwrap();
        assert_eq!(dec.open(&mut rec), Err(RecordError::NoContentType));
    }

    #[test]
    fn constructor_validation() {
        assert_eq!(
            RecordDecrypter::new(0x0302, 0x1301, &[0; 16], &[0; 12], 0).err(),
            Some(RecordError::UnsupportedVersion(0x0302))
        );
        assert_eq!(
            RecordDecrypter::new(TLS13, 0xc02f, &[0; 16], &[0; 12], 0).err(),
            Some(RecordError::UnsupportedSuite(0xc02f))
        );
        assert_eq!(
            RecordDecrypter::new(TLS12, 0x1301, &[0; 16], &[0; 12], 0).err(),
            Some(RecordError::UnsupportedSuite(0x1301))
        );
        assert_eq!(RecordDecrypter::new(TLS13, 0x1301, &[0; 32], &[0; 12], 0).err(), Some(RecordError::BadKeyLength));
        assert_eq!(RecordEncrypter::new(TLS13, 0x1301, &[0; 16], &[0; 4], 0).err(), Some(RecordError::BadIvLength));
        let mut enc = RecordEncrypter::new(TLS13, 0x1301, &[0; 16], &[0; 12], u64::MAX - 1).unwrap();
        let mut out = [0u8; 64];
        assert_eq!(enc.seal(23, b"x", &mut out), Err(RecordError::SequenceExhausted));
        assert_eq!(
            enc.seal(23, &[0; MAX_PLAINTEXT + 1], &mut [0; MAX_PLAINTEXT + 64]),
            Err(RecordError::RecordOverflow(MAX_PLAINTEXT + 1))
        );
        assert_eq!(enc.seal(23, b"xyz", &mut out[..10]), Err(RecordError::OutputTooSmall));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), which in 0..SUITES.len()) {
            let (v, s, k) = SUITES[which];
            let (_, mut dec) = pair(v, s, k, 0);
            let mut buf = bytes;
            let mut off = 0;
            while let Ok(Some(o)) = dec.open(&mut buf[off..]) {
                prop_assert!(o.plaintext.end <= o.record_len);
                off += o.record_len;
            }
        }

        #[test]
        fn decoder_never_panics_on_framed_garbage(
            typ in 19u8..25,
            minor in 0u8..5,
            len in 0usize..20_000,
            body in proptest::collection::vec(any::<u8>(), 0..20_000),
            which in 0..SUITES.len(),
        ) {
            let (v, s, k) = SUITES[which];
            let (_, mut dec) = pair(v, s, k, 0);
            let mut buf = vec![typ, 3, minor, (len >> 8) as u8, len as u8];
            buf.extend(body);
            // Garbage under a plausible header reaches the AEAD and must fail there, not open.
            prop_assert!(!matches!(dec.open(&mut buf), Ok(Some(_))));
        }

        #[test]
        fn corrupted_streams_never_open_wrong_data(
            lens in proptest::collection::vec(0usize..2000, 1..5),
            idx in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            which in 0..SUITES.len(),
        ) {
            let (v, s, k) = SUITES[which];
            let (mut enc, mut dec) = pair(v, s, k, 0);
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let p: Vec<u8> = (0..*len).map(|j| (i * 7 + j) as u8).collect();
                wire.extend(seal_vec(&mut enc, CONTENT_APPLICATION_DATA, &p));
                want.extend(p);
            }
            let at = idx.index(wire.len());
            wire[at] ^= flip;
            let mut got = Vec::new();
            let mut off = 0;
            let mut failed = false;
            loop {
                match dec.open(&mut wire[off..]) {
                    Ok(Some(o)) => {
                        got.extend_from_slice(&wire[off..][o.plaintext]);
                        off += o.record_len;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // Whatever opened is a prefix of what was sent, and the flipped record never opens.
            prop_assert!(want.starts_with(&got));
            prop_assert!(failed || off <= at);
        }

        #[test]
        fn stream_of_records_roundtrips(lens in proptest::collection::vec(0usize..3000, 1..8), which in 0..SUITES.len()) {
            let (v, s, k) = SUITES[which];
            let (mut enc, mut dec) = pair(v, s, k, 3);
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let p: Vec<u8> = (0..*len).map(|j| (i + j) as u8).collect();
                wire.extend(seal_vec(&mut enc, CONTENT_APPLICATION_DATA, &p));
                want.extend(p);
            }
            let mut got = Vec::new();
            let mut off = 0;
            while let Some(o) = dec.open(&mut wire[off..]).unwrap() {
                got.extend_from_slice(&wire[off..][o.plaintext]);
                off += o.record_len;
            }
            prop_assert_eq!(off, wire.len());
            prop_assert_eq!(got, want);
        }
    }
}
