//! The protocol's basic types: fixed-width little-endian integers, length-encoded integers and
//! strings, NUL-terminated strings. [`Reader`] reads them from an untrusted payload without
//! panicking; the `put_*` functions write them.

use bytes::{BufMut, BytesMut};

use crate::{malformed, Error};

/// First byte of a length-encoded integer that is followed by 2 bytes.
pub const LENENC_2: u8 = 0xFC;
/// First byte of a length-encoded integer that is followed by 3 bytes.
pub const LENENC_3: u8 = 0xFD;
/// First byte of a length-encoded integer that is followed by 8 bytes.
pub const LENENC_8: u8 = 0xFE;
/// A length-encoded NULL (only in text result rows).
pub const LENENC_NULL: u8 = 0xFB;

/// A cursor over a payload; every read checks the remaining length and names the field it was
/// reading in the error.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next byte without consuming it.
    pub fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u24(&mut self, what: &'static str) -> Result<u32, Error> {
        let [a, b, c] = self.array(what)?;
        Ok(u32::from_le_bytes([a, b, c, 0]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-encoded integer, or `None` for the NULL marker 0xFB. 0xFF is not a valid first
    /// byte (it would be an ERR packet's header). Non-minimal forms are accepted, as servers do.
    pub fn lenenc_int_or_null(&mut self, what: &'static str) -> Result<Option<u64>, Error> {
        match self.u8(what)? {
            b @ 0..=0xFA => Ok(Some(u64::from(b))),
            LENENC_NULL => Ok(None),
            LENENC_2 => Ok(Some(u64::from(self.u16(what)?))),
            LENENC_3 => Ok(Some(u64::from(self.u24(what)?))),
            LENENC_8 => Ok(Some(self.u64(what)?)),
            0xFF => Err(malformed(what)),
        }
    }

    /// A length-encoded integer where NULL is not allowed.
    pub fn lenenc_int(&mut self, what: &'static str) -> Result<u64, Error> {
        self.lenenc_int_or_null(what)?.ok_or(malformed(what))
    }

    /// A length-encoded string: a length-encoded integer, then that many bytes.
    pub fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], Error> {
        let len = self.lenenc_int(what)?;
        // A length past the payload is truncation whatever its size; usize::MAX never fits.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.bytes(len, what)
    }

    /// Bytes up to the next NUL, which is consumed and not returned.
    pub fn nul_bytes(&mut self, what: &'static str) -> Result<&'a [u8], Error> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(Error::Truncated { what })?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A NUL-terminated string that must be UTF-8.
    pub fn nul_str(&mut self, what: &'static str) -> Result<String, Error> {
        utf8(self.nul_bytes(what)?, what)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

pub(crate) fn utf8(b: &[u8], what: &'static str) -> Result<String, Error> {
    String::from_utf8(b.to_vec()).map_err(|_| malformed(what))
}

/// Writes `v` in the shortest length-encoded form.
pub fn put_lenenc_int(out: &mut BytesMut, v: u64) {
    if v < 0xFB {
        out.put_u8(v as u8);
    } else if v <= 0xFFFF {
        out.put_u8(LENENC_2);
        out.put_u16_le(v as u16);
    } else if v <= 0xFF_FFFF {
        out.put_u8(LENENC_3);
        out.put_slice(&(v as u32).to_le_bytes()[..3]);
    } else {
        out.put_u8(LENENC_8);
        out.put_u64_le(v);
    }
}

/// Writes a length-encoded string.
pub fn put_lenenc_bytes(out: &mut BytesMut, b: &[u8]) {
    put_lenenc_int(out, b.len() as u64);
    out.put_slice(b);
}

/// Writes a NUL-terminated string. A NUL inside `b` would end the string there on the reader's
/// side and leave the rest to be misread as the next field, so the string is cut at it: what is
/// written always decodes, and to exactly what a reader would make of `b`. Decoded strings never
/// contain one.
pub fn put_nul_bytes(out: &mut BytesMut, b: &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    out.put_slice(&b[..end]);
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lenenc_int_forms() {
        // (value, its encoding) at each boundary of the four forms.
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (250, &[0xFA]),
            (251, &[0xFC, 0xFB, 0x00]),
            (0xFFFF, &[0xFC, 0xFF, 0xFF]),
            (0x1_0000, &[0xFD, 0x00, 0x00, 0x01]),
            (0xFF_FFFF, &[0xFD, 0xFF, 0xFF, 0xFF]),
            (0x100_0000, &[0xFE, 0, 0, 0, 1, 0, 0, 0, 0]),
            (u64::MAX, &[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
        ];
        for &(v, enc) in cases {
            let mut out = BytesMut::new();
            put_lenenc_int(&mut out, v);
            assert_eq!(&out[..], enc, "{v}");
            let mut r = Reader::new(enc);
            assert_eq!(r.lenenc_int("x"), Ok(v));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn lenenc_null_and_invalid() {
        assert_eq!(Reader::new(&[0xFB]).lenenc_int_or_null("x"), Ok(None));
        assert_eq!(Reader::new(&[0xFB]).lenenc_int("x"), Err(malformed("x")));
        assert_eq!(Reader::new(&[0xFF]).lenenc_int_or_null("x"), Err(malformed("x")));
        // Non-minimal: 5 in the 2-byte form is still 5.
        assert_eq!(Reader::new(&[0xFC, 5, 0]).lenenc_int("x"), Ok(5));
        for short in [&[][..], &[0xFC, 1], &[0xFD, 1, 2], &[0xFE, 1, 2, 3, 4, 5, 6, 7]] {
            assert_eq!(Reader::new(short).lenenc_int("x"), Err(Error::Truncated { what: "x" }), "{short:?}");
        }
    }

    #[test]
    fn lenenc_string_longer_than_payload_is_truncation() {
        let mut r = Reader::new(&[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, b'a']);
        assert_eq!(r.lenenc_bytes("s"), Err(Error::Truncated { what: "s" }));
        assert_eq!(Reader::new(&[3, b'a', b'b']).lenenc_bytes("s"), Err(Error::Truncated { what: "s" }));
    }

    #[test]
    fn nul_strings() {
        let mut r = Reader::new(b"root\0db\0tail");
        assert_eq!(r.nul_str("user").as_deref(), Ok("root"));
        assert_eq!(r.nul_bytes("db"), Ok(&b"db"[..]));
        assert_eq!(r.nul_bytes("x"), Err(Error::Truncated { what: "x" }));
        assert_eq!(r.rest(), b"tail");
        assert_eq!(Reader::new(b"\xff\xfe\0").nul_str("u"), Err(malformed("u")));
        let mut out = BytesMut::new();
        put_nul_bytes(&mut out, b"ab\0cd");
        assert_eq!(&out[..], b"ab\0");
    }

    proptest! {
        #[test]
        fn lenenc_roundtrip(v in any::<u64>(), s in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = BytesMut::new();
            put_lenenc_int(&mut out, v);
            put_lenenc_bytes(&mut out, &s);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.lenenc_int("v"), Ok(v));
            prop_assert_eq!(r.lenenc_bytes("s"), Ok(&s[..]));
            prop_assert!(r.is_empty());
        }

        #[test]
        fn reader_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&b);
            let _ = r.lenenc_bytes("a");
            let _ = r.lenenc_int_or_null("b");
            let _ = r.nul_str("c");
            let _ = r.u64("d");
        }
    }
}
