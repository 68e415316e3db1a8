//! Packet framing: a 3-byte little-endian payload length and a 1-byte sequence id before each
//! payload. A payload of 0xFFFFFF bytes or more is sent as fragments of exactly 0xFFFFFF bytes
//! followed by a shorter one (possibly empty), with consecutive sequence ids; the decoder
//! reassembles them and the encoder splits.
//!
//! The payload limit is the caller's: before authentication a small one
//! ([`PRE_AUTH_MAX_PAYLOAD`]) bounds what an unauthenticated peer can make Sluice buffer, and since
//! it is below [`MAX_FRAGMENT_LEN`] it also refuses every multi-packet payload there, as no
//! connection-phase message needs one. The limit counts all fragments together and is checked on
//! each header as it arrives, before the bytes it announces are buffered.

use bytes::{BufMut, Bytes, BytesMut};

use crate::Error;

/// Bytes before each payload: length (3) and sequence id (1).
pub const HEADER_LEN: usize = 4;
/// Longest fragment; a fragment this long says another follows.
pub const MAX_FRAGMENT_LEN: usize = 0xFF_FFFF;
/// A payload limit for the connection phase: the largest real message there is a client's
/// handshake response with connection attributes, a few hundred bytes to a few KiB.
pub const PRE_AUTH_MAX_PAYLOAD: usize = 64 * 1024;

/// One whole (reassembled) payload and its sequence ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Sequence id of the first fragment.
    pub seq: u8,
    /// Sequence id of the last fragment (equal to `seq` unless the payload was split).
    pub last_seq: u8,
    pub payload: Bytes,
}

impl Packet {
    /// The sequence id the peer's answer to this packet carries.
    pub fn reply_seq(&self) -> u8 {
        self.last_seq.wrapping_add(1)
    }
}

/// Where the packet at the front of a buffer ends, once it is all there.
struct Frame {
    end: usize,
    first_seq: u8,
    last_seq: u8,
    payload_len: usize,
    fragments: usize,
}

/// Splits a byte stream into packets. It holds no bytes itself: the driver owns the buffer it
/// reads into, so that after an SSLRequest it can hand the socket to TLS knowing nothing past the
/// packet was consumed (see [`PacketDecoder::needed`]).
#[derive(Debug, Clone)]
pub struct PacketDecoder {
    max_payload: usize,
}

impl PacketDecoder {
    /// A decoder refusing payloads (all fragments together) longer than `max_payload`.
    pub fn new(max_payload: usize) -> Self {
        PacketDecoder { max_payload }
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Changes the limit, e.g. raises it once the peer has authenticated.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload;
    }

    /// How many more bytes the next packet needs beyond those in `buf` (0: it is complete). A
    /// driver that must not read past a packet reads at most this many.
    pub fn needed(&self, buf: &[u8]) -> Result<usize, Error> {
        Ok(match self.scan(buf)? {
            Ok(_) => 0,
            Err(n) => n,
        })
    }

    /// Takes the next whole packet off the front of `buf`, or returns `Ok(None)` leaving `buf`
    /// as it was when more bytes are needed.
    pub fn next_packet(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, Error> {
        let frame = match self.scan(buf)? {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let mut bytes = buf.split_to(frame.end);
        let payload = if frame.fragments == 1 {
            bytes.split_off(HEADER_LEN).freeze()
        } else {
            let mut payload = BytesMut::with_capacity(frame.payload_len);
            let mut rest = &bytes[..];
            while rest.len() >= HEADER_LEN {
                let len = u24(rest);
                let end = HEADER_LEN + len;
                payload.put_slice(&rest[HEADER_LEN..end]);
                rest = &rest[end..];
            }
            payload.freeze()
        };
        Ok(Some(Packet { seq: frame.first_seq, last_seq: frame.last_seq, payload }))
    }

    /// `Ok(frame)` when the packet at the front is complete, `Err(missing bytes)` otherwise.
    fn scan(&self, buf: &[u8]) -> Result<Result<Frame, usize>, Error> {
        let mut at = 0usize;
        let mut total = 0usize;
        let mut first_seq = None;
        let mut last_seq = 0u8;
        let mut fragments = 0usize;
        loop {
            let Some(header) = buf.get(at..at + HEADER_LEN) else {
                return Ok(Err(at + HEADER_LEN - buf.len()));
            };
            let len = u24(header);
            let seq = header[3];
            match first_seq {
                None => first_seq = Some(seq),
                Some(_) if seq != last_seq.wrapping_add(1) => {
                    return Err(Error::BadSequence { expected: last_seq.wrapping_add(1), got: seq })
                }
                Some(_) => {}
            }
            last_seq = seq;
            fragments += 1;
            total += len;
            if total > self.max_payload {
                return Err(Error::PacketTooLarge { len: total, max: self.max_payload });
            }
            at += HEADER_LEN + len;
            if buf.len() < at {
                // A full fragment is followed by another header at least.
                let more = if len == MAX_FRAGMENT_LEN { HEADER_LEN } else { 0 };
                return Ok(Err(at - buf.len() + more));
            }
            if len < MAX_FRAGMENT_LEN {
                let first_seq = first_seq.unwrap_or(seq);
                return Ok(Ok(Frame { end: at, first_seq, last_seq, payload_len: total, fragments }));
            }
        }
    }
}

fn u24(b: &[u8]) -> usize {
    usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16
}

/// Frames payloads with consecutive sequence ids. A new command starts at 0; an answer starts at
/// the [`Packet::reply_seq`] of what it answers.
#[derive(Debug, Clone)]
pub struct PacketEncoder {
    seq: u8,
}

impl PacketEncoder {
    pub fn new(first_seq: u8) -> Self {
        PacketEncoder { seq: first_seq }
    }

    /// The sequence id the next packet gets.
    pub fn seq(&self) -> u8 {
        self.seq
    }

    pub fn set_seq(&mut self, seq: u8) {
        self.seq = seq;
    }

    /// Writes `payload` as one packet, or as fragments when it is [`MAX_FRAGMENT_LEN`] or longer
    /// (then a payload of an exact multiple ends with an empty fragment, as the protocol wants).
    pub fn write(&mut self, payload: &[u8], out: &mut BytesMut) {
        out.reserve(payload.len() + HEADER_LEN * (1 + payload.len() / MAX_FRAGMENT_LEN));
        let mut rest = payload;
        loop {
            let n = rest.len().min(MAX_FRAGMENT_LEN);
            self.header(n, out);
            out.put_slice(&rest[..n]);
            rest = &rest[n..];
            if n < MAX_FRAGMENT_LEN {
                return;
            }
        }
    }

    /// Writes the payload `f` writes as a packet, without an intermediate buffer when it is
    /// shorter than a fragment.
    pub fn write_with(&mut self, out: &mut BytesMut, f: impl FnOnce(&mut BytesMut)) {
        let r: Result<(), std::convert::Infallible> = self.try_write_with(out, |o| {
            f(o);
            Ok(())
        });
        match r {
            Ok(()) => {}
            Err(never) => match never {},
        }
    }

    /// As [`write_with`](Self::write_with) for encoders that can fail; on error `out` and the
    /// sequence id are left as they were.
    pub fn try_write_with<E>(
        &mut self,
        out: &mut BytesMut,
        f: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = out.len();
        out.put_slice(&[0; HEADER_LEN]);
        if let Err(e) = f(out) {
            out.truncate(start);
            return Err(e);
        }
        let len = out.len() - start - HEADER_LEN;
        if len < MAX_FRAGMENT_LEN {
            let [a, b, c, _] = (len as u32).to_le_bytes();
            out[start..start + HEADER_LEN].copy_from_slice(&[a, b, c, self.seq]);
            self.seq = self.seq.wrapping_add(1);
        } else {
            let payload = out.split_off(start + HEADER_LEN);
            out.truncate(start);
            self.write(&payload, out);
        }
        Ok(())
    }

    fn header(&mut self, len: usize, out: &mut BytesMut) {
        let [a, b, c, _] = (len as u32).to_le_bytes();
        out.put_slice(&[a, b, c, self.seq]);
        self.seq = self.seq.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(seq: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        PacketEncoder::new(seq).write(payload, &mut out);
        out
    }

    #[test]
    fn header_layout() {
        let out = framed(3, b"\x0eabc");
        assert_eq!(&out[..], b"\x04\x00\x00\x03\x0eabc");
    }

    #[test]
    fn split_across_reads_yields_once_whole() {
        let whole = framed(0, b"hello world");
        let mut d = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD);
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(d.next_packet(&mut buf), Ok(None), "at {i}");
            assert_eq!(d.needed(&buf), Ok(if i < 4 { 4 - i } else { whole.len() - i }));
            buf.put_u8(*b);
        }
        assert_eq!(d.needed(&buf), Ok(0));
        let p = d.next_packet(&mut buf).unwrap().unwrap();
        assert_eq!((p.seq, p.reply_seq(), &p.payload[..]), (0, 1, &b"hello world"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn leaves_the_next_packet_in_the_buffer() {
        let mut buf = framed(1, b"a");
        buf.extend_from_slice(&framed(2, b"bc"));
        buf.extend_from_slice(b"\x16\x03\x01"); // a TLS ClientHello's first bytes, say
        let mut d = PacketDecoder::new(16);
        assert_eq!(d.next_packet(&mut buf).unwrap().unwrap().payload, Bytes::from_static(b"a"));
        assert_eq!(d.next_packet(&mut buf).unwrap().unwrap().payload, Bytes::from_static(b"bc"));
        assert_eq!(&buf[..], b"\x16\x03\x01");
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        let mut d = PacketDecoder::new(10);
        let mut buf = BytesMut::from(&b"\x0b\x00\x00\x00"[..]);
        assert_eq!(d.next_packet(&mut buf), Err(Error::PacketTooLarge { len: 11, max: 10 }));
        // The pre-auth limit refuses any continuation.
        let mut d = PacketDecoder::new(PRE_AUTH_MAX_PAYLOAD);
        let mut buf = BytesMut::from(&b"\xff\xff\xff\x00"[..]);
        assert_eq!(d.next_packet(&mut buf), Err(Error::PacketTooLarge { len: MAX_FRAGMENT_LEN, max: 65536 }));
    }

    #[test]
    fn multi_packet_reassembly() {
        for len in [MAX_FRAGMENT_LEN - 1, MAX_FRAGMENT_LEN, MAX_FRAGMENT_LEN + 5, 2 * MAX_FRAGMENT_LEN] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut enc = PacketEncoder::new(250);
            let mut buf = BytesMut::new();
            enc.write(&payload, &mut buf);
            let fragments = len / MAX_FRAGMENT_LEN + 1;
            assert_eq!(buf.len(), len + HEADER_LEN * fragments, "{len}");
            assert_eq!(enc.seq(), 250u8.wrapping_add(fragments as u8));
            let mut d = PacketDecoder::new(3 * MAX_FRAGMENT_LEN);
            // Missing the last byte: the whole payload is not there yet.
            let last = buf.split_off(buf.len() - 1);
            assert_eq!(d.needed(&buf), Ok(1));
            assert_eq!(d.next_packet(&mut buf), Ok(None));
            buf.unsplit(last);
            let p = d.next_packet(&mut buf).unwrap().unwrap();
            assert_eq!(p.seq, 250);
            assert_eq!(p.reply_seq(), enc.seq());
            assert!(p.payload[..] == payload[..], "{len}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn continuation_with_wrong_sequence_is_refused() {
        let mut buf = BytesMut::new();
        PacketEncoder::new(0).write(&vec![7u8; MAX_FRAGMENT_LEN], &mut buf);
        // The trailing empty fragment's sequence id is 1; make it 5.
        let n = buf.len();
        buf[n - 1] = 5;
        let mut d = PacketDecoder::new(usize::MAX);
        assert_eq!(d.next_packet(&mut buf), Err(Error::BadSequence { expected: 1, got: 5 }));
    }

    #[test]
    fn write_with_matches_write_and_rolls_back_on_error() {
        let mut a = BytesMut::new();
        let mut enc = PacketEncoder::new(0);
        enc.write_with(&mut a, |o| o.put_slice(b"xyz"));
        assert_eq!(a, framed(0, b"xyz"));
        assert_eq!(enc.seq(), 1);
        let r: Result<(), ()> = enc.try_write_with(&mut a, |o| {
            o.put_slice(b"junk");
            Err(())
        });
        assert_eq!(r, Err(()));
        assert_eq!((a, enc.seq()), (framed(0, b"xyz"), 1));
        let big = vec![1u8; MAX_FRAGMENT_LEN + 2];
        let mut b = BytesMut::new();
        PacketEncoder::new(9).write_with(&mut b, |o| o.put_slice(&big));
        assert!(b == framed(9, &big));
    }

    proptest! {
        #[test]
        fn roundtrip_in_arbitrary_chunks(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5),
            seq in any::<u8>(),
            chunk in 1usize..40,
        ) {
            let mut enc = PacketEncoder::new(seq);
            let mut wire = BytesMut::new();
            for p in &payloads {
                enc.write(p, &mut wire);
            }
            let mut d = PacketDecoder::new(300);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                buf.extend_from_slice(c);
                while let Some(p) = d.next_packet(&mut buf).unwrap() {
                    got.push(p);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got.len(), payloads.len());
            for (i, (p, want)) in got.iter().zip(&payloads).enumerate() {
                prop_assert_eq!(p.seq, seq.wrapping_add(i as u8));
                prop_assert_eq!(&p.payload[..], &want[..]);
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..64) {
            let mut d = PacketDecoder::new(max);
            let mut buf = BytesMut::from(&b[..]);
            let _ = d.needed(&buf);
            while let Ok(Some(p)) = d.next_packet(&mut buf) {
                prop_assert!(p.payload.len() <= max);
            }
        }
    }
}
