//! Splitting a byte stream into PostgreSQL packets: the one place that reads length prefixes.
//!
//! Drivers read exactly [`Framer::needed`] bytes at a time, so nothing past the current packet
//! is ever taken off the socket: during connection setup a TLS handshake or a relay may take the
//! stream over right after any packet, and bytes buffered here would be lost to it.

use bytes::{Bytes, BytesMut};

use crate::{WireError, MAX_STARTUP_LEN};

/// Which kind of packets a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Untyped: a 4-byte length that counts itself, then the body (the client's first packets).
    Startup,
    /// Typed: a tag byte, then a 4-byte length that counts itself but not the tag.
    Typed,
}

/// Accumulates bytes and yields whole packets, refusing lengths outside the stream's bounds.
#[derive(Debug, Clone)]
pub struct Framer {
    kind: Kind,
    max_len: usize,
    buf: BytesMut,
}

impl Framer {
    /// A stream of untyped startup-phase packets, bounded by [`MAX_STARTUP_LEN`].
    pub fn startup() -> Self {
        Framer { kind: Kind::Startup, max_len: MAX_STARTUP_LEN, buf: BytesMut::new() }
    }

    /// A stream of typed messages whose declared length may not exceed `max_len`.
    pub fn typed(max_len: usize) -> Self {
        Framer { kind: Kind::Typed, max_len, buf: BytesMut::new() }
    }

    /// Appends bytes read from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a packet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn header_len(&self) -> usize {
        match self.kind {
            Kind::Startup => 4,
            Kind::Typed => 5,
        }
    }

    /// The whole length of the packet at the front, once its header is there; an error when
    /// the declared length is out of bounds.
    fn frame_len(&self) -> Option<Result<usize, WireError>> {
        let (at, min, extra) = match self.kind {
            Kind::Startup => (0, 8, 0),
            Kind::Typed => (1, 4, 1),
        };
        let header = self.buf.get(at..at + 4)?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(min..=self.max_len).contains(&len) {
            return Some(Err(WireError::BadLength(len)));
        }
        Some(Ok(len + extra))
    }

    /// How many more bytes complete the packet at the front: reading exactly this many never
    /// reads past it. Zero when a whole packet is buffered or its header is already invalid
    /// (then [`Framer::next_frame`] has the answer).
    pub fn needed(&self) -> usize {
        match self.frame_len() {
            None => self.header_len() - self.buf.len(),
            Some(Ok(total)) => total.saturating_sub(self.buf.len()),
            Some(Err(_)) => 0,
        }
    }

    /// Takes the packet at the front, header included, once it is whole.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, WireError> {
        match self.frame_len() {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(total)) if self.buf.len() < total => Ok(None),
            Some(Ok(total)) => Ok(Some(self.buf.split_to(total).freeze())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_message, decode_startup, encode, ProtocolVersion, StartupPacket, MAX_SETUP_MESSAGE_LEN};
    use proptest::prelude::*;

    #[test]
    fn typed_frames_byte_by_byte() {
        let mut wire = encode::auth_ok();
        wire.extend(encode::parameter_status("a", "b"));
        let mut f = Framer::typed(MAX_SETUP_MESSAGE_LEN);
        let mut frames = Vec::new();
        for b in &wire {
            assert!(f.needed() > 0);
            f.push(&[*b]);
            if let Some(frame) = f.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[0][..], &encode::auth_ok()[..]);
        let (m, _) = decode_message(&frames[1], MAX_SETUP_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(m.tag, b'S');
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn needed_never_reads_past_a_packet() {
        let packet = encode::startup(ProtocolVersion::V3_0, &[("user".into(), "alice".into())]);
        let mut f = Framer::startup();
        assert_eq!(f.needed(), 4);
        f.push(&packet[..4]);
        assert_eq!(f.needed(), packet.len() - 4);
        f.push(&packet[4..]);
        assert_eq!(f.needed(), 0);
        let frame = f.next_frame().unwrap().unwrap();
        assert!(matches!(decode_startup(&frame), Ok(Some((StartupPacket::Startup(_), _)))));
        assert_eq!(f.needed(), 4);
    }

    #[test]
    fn out_of_range_lengths_are_refused_from_the_header() {
        let mut f = Framer::startup();
        f.push(&(MAX_STARTUP_LEN as u32 + 1).to_be_bytes());
        assert_eq!(f.needed(), 0);
        assert_eq!(f.next_frame(), Err(WireError::BadLength(MAX_STARTUP_LEN + 1)));
        let mut f = Framer::startup();
        f.push(&7u32.to_be_bytes());
        assert_eq!(f.next_frame(), Err(WireError::BadLength(7)));
        let mut f = Framer::typed(64);
        f.push(&[b'R', 0, 0, 0, 65]);
        assert_eq!(f.next_frame(), Err(WireError::BadLength(65)));
        let mut f = Framer::typed(64);
        f.push(&[b'R', 0, 0, 0, 3]);
        assert_eq!(f.next_frame(), Err(WireError::BadLength(3)));
    }

    proptest! {
        #[test]
        fn framer_never_panics_and_frames_cover_the_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            typed in any::<bool>(),
            chunk in 1usize..16,
        ) {
            let mut f = if typed { Framer::typed(256) } else { Framer::startup() };
            let mut taken = 0;
            for c in bytes.chunks(chunk) {
                f.push(c);
                while let Ok(Some(frame)) = f.next_frame() {
                    taken += frame.len();
                }
            }
            let _ = f.needed();
            prop_assert!(taken + f.buffered() == bytes.len());
        }
    }
}
