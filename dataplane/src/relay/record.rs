//! One direction of a session with a TLS leg: records are received into a pool buffer, opened in
//! place, resealed for the destination (or passed as plaintext to a plain leg) into a second pool
//! buffer, and sent. Without kTLS this is the only way to relay a leg whose keys we hold.
//!
//! Like the splice path: poll first (a pending RECV would pin a buffer on an idle socket), one
//! operation in flight per direction, and nothing is received while output is unsent, so a
//! stalled reader stalls the writer. Buffers go back to the pool as soon as the direction has
//! drained them; only a partial record keeps the input buffer.
//!
//! Post-handshake messages: NewSessionTicket is dropped (we never resume), KeyUpdate cannot be
//! followed (we hold the key and IV, not the traffic secret) and ends the session, close_notify is
//! the source's EOF and is passed on as close_notify (or a plain half-close).
//!
//! In a session where only one leg has kTLS, that leg is plain here (no decrypter or encrypter):
//! the kernel opens and seals its records. Its non-data records are read by [`KtlsRx`], and the
//! close_notify passed on to it goes out as a kernel alert record.

use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::libc;

use super::ktls_rx::{read_error, Control, KtlsRx};
use super::pool::{Pool, BUF_SIZE};
use super::{failure_for, shutdown_write, Failure, Leg, Op, Step};
use crate::ktls::send_close_notify;
use crate::tls_record::{
    RecordDecrypter, RecordEncrypter, CLOSE_NOTIFY, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE,
    MAX_PLAINTEXT, MAX_RECORD_LEN,
};
use sluice_handoff::handoff::{DirPath, DirState};

const _: () = assert!(BUF_SIZE >= MAX_RECORD_LEN + 64, "a pool buffer must hold a full record and its reseal");

const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
const HS_HELLO_REQUEST: u8 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    PollIn,
    Recv(u32),
    PollOut,
    Send,
}

pub(crate) struct RecordDir {
    src: RawFd,
    dst: RawFd,
    src_leg: Leg,
    dst_leg: Leg,
    /// Present when the source leg is TLS.
    dec: Option<RecordDecrypter>,
    /// Present when the destination leg is TLS.
    enc: Option<RecordEncrypter>,
    tls13_source: bool,
    inb: Option<Box<[u8]>>,
    in_start: usize,
    in_end: usize,
    outb: Option<Box<[u8]>>,
    out_sent: usize,
    out_len: usize,
    /// Application bytes in `outb`; counted once the whole buffer is sent.
    out_plain: u64,
    readable: bool,
    blocked_out: bool,
    /// recv returned 0.
    src_eof: bool,
    /// The source sent close_notify: nothing after it is read.
    notified: bool,
    notify_sent: bool,
    /// Bytes of a NewSessionTicket that continues in the next handshake record.
    hs_skip: usize,
    /// The source is a kTLS leg (so `dec` is `None`): its non-data records are read here.
    ktls_rx: Option<KtlsRx>,
    /// The destination is a kTLS leg (so `enc` is `None`): close_notify goes out through the kernel.
    ktls_tx: bool,
    pending: Pending,
    pub(crate) bytes: u64,
}

impl RecordDir {
    pub(crate) fn new(
        src: RawFd,
        dst: RawFd,
        src_leg: Leg,
        dst_leg: Leg,
        dec: Option<RecordDecrypter>,
        enc: Option<RecordEncrypter>,
        tls13_source: bool,
    ) -> Self {
        RecordDir {
            src,
            dst,
            src_leg,
            dst_leg,
            dec,
            enc,
            tls13_source,
            inb: None,
            in_start: 0,
            in_end: 0,
            outb: None,
            out_sent: 0,
            out_len: 0,
            out_plain: 0,
            readable: false,
            blocked_out: false,
            src_eof: false,
            notified: false,
            notify_sent: false,
            hs_skip: 0,
            ktls_rx: None,
            ktls_tx: false,
            pending: Pending::None,
            bytes: 0,
        }
    }

    /// Marks the source as a kTLS leg (`rx`) and/or the destination as one (`tx`).
    pub(crate) fn with_ktls(mut self, rx: Option<KtlsRx>, tx: bool) -> Self {
        self.ktls_rx = rx;
        self.ktls_tx = tx;
        self
    }

    /// Restores what a predecessor left (see [`RecordDir::export`]): `held` is the unprocessed
    /// input (`state.held_in` bytes) followed by the unsent output. Its buffers are allocated
    /// here, outside the pool; the worker adopts them ([`RecordDir::buffers`]).
    pub(crate) fn resume(mut self, state: &DirState, held: &[u8]) -> std::io::Result<Self> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
        let (held_in, held_out) = (state.held_in as usize, state.held_out as usize);
        if state.path != DirPath::Record
            || held.len() != held_in + held_out
            || held_in > BUF_SIZE
            || held_out > BUF_SIZE
        {
            return Err(bad("a resumed record-path direction's buffered bytes do not fit"));
        }
        let buffer = |bytes: &[u8]| {
            let mut b = vec![0u8; BUF_SIZE].into_boxed_slice();
            b[..bytes.len()].copy_from_slice(bytes);
            b
        };
        if held_in > 0 {
            self.inb = Some(buffer(&held[..held_in]));
            self.in_end = held_in;
        }
        if held_out > 0 {
            self.outb = Some(buffer(&held[held_in..]));
            self.out_len = held_out;
        }
        self.out_plain = state.out_plain;
        self.src_eof = state.eof;
        self.notified = state.notified;
        self.notify_sent = state.notify_sent;
        self.hs_skip = state.hs_skip as usize;
        self.bytes = state.bytes;
        Ok(self)
    }

    /// Buffers the direction holds (to account for those [`RecordDir::resume`] allocated).
    pub(crate) fn buffers(&self) -> usize {
        usize::from(self.inb.is_some()) + usize::from(self.outb.is_some())
    }

    /// Hands the direction over (no operation in flight): its state, the bytes it holds (see
    /// [`RecordDir::resume`]) and its ciphers' sequence numbers (`(read, write)`); its buffers
    /// go back to the pool.
    pub(crate) fn export(&mut self, done: bool, pool: &mut Pool) -> (DirState, Vec<u8>, (Option<u64>, Option<u64>)) {
        debug_assert_eq!(self.pending, Pending::None);
        let mut held = Vec::new();
        if let Some(b) = &self.inb {
            held.extend_from_slice(&b[self.in_start..self.in_end]);
        }
        let held_in = held.len() as u32;
        if let Some(b) = &self.outb {
            held.extend_from_slice(&b[self.out_sent..self.out_len]);
        }
        let state = DirState {
            path: DirPath::Record,
            eof: self.src_eof,
            notified: self.notified,
            notify_sent: self.notify_sent,
            done,
            held_in,
            held_out: held.len() as u32 - held_in,
            // Counted once the whole output buffer is sent: still pending unless all of it was.
            out_plain: if self.out_sent < self.out_len { self.out_plain } else { 0 },
            hs_skip: self.hs_skip as u32,
            ktls_hs_skip: self.ktls_rx.as_ref().map_or(0, |k| k.hs_skip() as u32),
            bytes: self.bytes + if self.out_len > 0 && self.out_sent >= self.out_len { self.out_plain } else { 0 },
        };
        let seqs = (self.dec.as_ref().map(RecordDecrypter::seq), self.enc.as_ref().map(RecordEncrypter::seq));
        self.release(pool);
        (state, held, seqs)
    }

    /// Next operation; called only while none is in flight (so the buffers are ours to touch).
    pub(crate) fn step(&mut self, pool: &mut Pool) -> Step {
        debug_assert_eq!(self.pending, Pending::None);
        loop {
            if self.out_sent < self.out_len {
                if self.blocked_out {
                    self.pending = Pending::PollOut;
                    return Step::Submit(Op::PollOut(self.dst));
                }
                let Some(out) = self.outb.as_deref() else {
                    return Step::Fail(Failure::Error("output bytes without a buffer".into()));
                };
                let rest = &out[self.out_sent..self.out_len];
                self.pending = Pending::Send;
                return Step::Submit(Op::Send { fd: self.dst, buf: rest.as_ptr(), len: rest.len() as u32 });
            }
            if self.out_len > 0 {
                self.bytes += self.out_plain;
                self.out_plain = 0;
                self.out_len = 0;
                self.out_sent = 0;
            }
            if !self.notified && self.in_start < self.in_end {
                if let Err(f) = self.transform(pool) {
                    return Step::Fail(f);
                }
                if self.out_len > 0 {
                    continue;
                }
                // Otherwise what is left is an incomplete record: read more.
            }
            if self.notified || self.src_eof {
                if let (Some(enc), false) = (self.enc.as_mut(), self.notify_sent) {
                    self.notify_sent = true;
                    let out = self.outb.get_or_insert_with(|| pool.take());
                    match enc.seal(CONTENT_ALERT, &CLOSE_NOTIFY, &mut out[..]) {
                        Ok(n) => self.out_len = n,
                        Err(e) => return Step::Fail(Failure::Error(format!("sealing close_notify: {e}"))),
                    }
                    continue;
                }
                if self.ktls_tx && !self.notify_sent {
                    if self.blocked_out {
                        self.pending = Pending::PollOut;
                        return Step::Submit(Op::PollOut(self.dst));
                    }
                    match send_close_notify(self.dst) {
                        Ok(()) => self.notify_sent = true,
                        Err(Errno::EAGAIN) => {
                            self.blocked_out = true;
                            continue;
                        }
                        Err(e) => return Step::Fail(failure_for(self.dst_leg, e as i32, "sending close_notify")),
                    }
                }
                self.release(pool);
                shutdown_write(self.dst);
                return Step::Done;
            }
            // Waiting for input: an idle direction holds no buffer unless a record is half in.
            if let Some(b) = self.outb.take() {
                pool.give(b);
            }
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
                if !self.readable {
                    if let Some(b) = self.inb.take() {
                        pool.give(b);
                    }
                }
            }
            if !self.readable {
                self.pending = Pending::PollIn;
                return Step::Submit(Op::PollIn(self.src));
            }
            let inb = self.inb.get_or_insert_with(|| pool.take());
            if self.in_start > 0 {
                inb.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let room = &mut inb[self.in_end..];
            if room.is_empty() {
                // Cannot happen (a full buffer always holds a complete record), but a zero-length
                // RECV would read as EOF.
                return Step::Fail(Failure::Error("receive buffer full without a complete record".into()));
            }
            self.pending = Pending::Recv(room.len() as u32);
            return Step::Submit(Op::Recv { fd: self.src, buf: room.as_mut_ptr(), len: room.len() as u32 });
        }
    }

    /// Takes the result of the operation in flight; `Ok(n)` is the number of bytes moved.
    pub(crate) fn complete(&mut self, res: i32) -> Result<u64, Failure> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => Ok(0),
            Pending::PollIn if res >= 0 => {
                self.readable = true;
                Ok(0)
            }
            Pending::PollOut if res >= 0 => {
                self.blocked_out = false;
                Ok(0)
            }
            Pending::PollIn => Err(failure_for(self.src_leg, -res, "poll")),
            Pending::PollOut => Err(failure_for(self.dst_leg, -res, "poll")),
            Pending::Recv(asked) => match res {
                // A TLS peer that stops without close_notify was cut off (a killed client), not
                // done sending: end the whole session rather than half-close, since a PostgreSQL
                // server behind the other leg would otherwise wait on a half-open session.
                0 if (self.dec.is_some() || self.ktls_rx.is_some()) && !self.notified => {
                    Err(Failure::Closed(self.src_leg, libc::ECONNRESET))
                }
                0 => {
                    self.src_eof = true;
                    Ok(0)
                }
                n if n > 0 => {
                    self.in_end += n as usize;
                    self.readable = n as u32 == asked;
                    Ok(n as u64)
                }
                e if -e == libc::EAGAIN => {
                    self.readable = false;
                    Ok(0)
                }
                e => match read_error(self.ktls_rx.as_mut(), self.src, self.src_leg, -e, "recv")? {
                    Control::Skipped => {
                        self.readable = true;
                        Ok(0)
                    }
                    Control::CloseNotify => {
                        self.notified = true;
                        Ok(0)
                    }
                },
            },
            Pending::Send => match res {
                n if n > 0 => {
                    self.out_sent += n as usize;
                    Ok(n as u64)
                }
                e if -e == libc::EAGAIN => {
                    self.blocked_out = true;
                    Ok(0)
                }
                0 => Err(Failure::Error(format!("send to the {} leg wrote nothing", self.dst_leg.name()))),
                e => Err(failure_for(self.dst_leg, -e, "send")),
            },
        }
    }

    /// Returns both buffers to the pool; only while no operation is in flight.
    pub(crate) fn release(&mut self, pool: &mut Pool) {
        debug_assert_eq!(self.pending, Pending::None);
        if let Some(b) = self.inb.take() {
            pool.give(b);
        }
        if let Some(b) = self.outb.take() {
            pool.give(b);
        }
    }

    /// Moves as much input as fits into the (empty) output buffer: opens complete records and/or
    /// seals plaintext. Stops at an incomplete record, a full output buffer or close_notify.
    fn transform(&mut self, pool: &mut Pool) -> Result<(), Failure> {
        let src = self.src_leg.name();
        let out = self.outb.get_or_insert_with(|| pool.take());
        let Some(inb) = self.inb.as_deref_mut() else { return Ok(()) };
        while self.in_start < self.in_end {
            let input = &mut inb[self.in_start..self.in_end];
            let free = &mut out[self.out_len..];
            let reseal = self.enc.as_ref().map_or(0, |e| e.overhead());
            let Some(dec) = self.dec.as_mut() else {
                // Plain source: cut the stream into records for the TLS destination.
                let n = input.len().min(MAX_PLAINTEXT).min(free.len().saturating_sub(reseal));
                if n == 0 {
                    break;
                }
                match self.enc.as_mut() {
                    Some(enc) => {
                        self.out_len += enc
                            .seal(CONTENT_APPLICATION_DATA, &input[..n], free)
                            .map_err(|e| Failure::Error(format!("sealing for the {} leg: {e}", self.dst_leg.name())))?;
                    }
                    None => {
                        free[..n].copy_from_slice(&input[..n]);
                        self.out_len += n;
                    }
                }
                self.out_plain += n as u64;
                self.in_start += n;
                continue;
            };
            let bad = |e| Failure::Error(format!("TLS record from the {src} leg: {e}"));
            let Some(record_len) = dec.record_len(input).map_err(bad)? else { break };
            if input.len() < record_len {
                break;
            }
            // The plaintext is never longer than the ciphertext.
            if free.len() < record_len + reseal {
                break;
            }
            let Some(opened) = dec.open(input).map_err(bad)? else { break };
            self.in_start += opened.record_len;
            let plain = &input[opened.plaintext];
            match opened.content_type {
                CONTENT_APPLICATION_DATA => {
                    if self.hs_skip > 0 {
                        return Err(Failure::Error(format!(
                            "application data inside a handshake message from the {src} leg"
                        )));
                    }
                    if plain.is_empty() {
                        continue;
                    }
                    match self.enc.as_mut() {
                        Some(enc) => {
                            self.out_len += enc.seal(CONTENT_APPLICATION_DATA, plain, free).map_err(|e| {
                                Failure::Error(format!("sealing for the {} leg: {e}", self.dst_leg.name()))
                            })?;
                        }
                        None => {
                            free[..plain.len()].copy_from_slice(plain);
                            self.out_len += plain.len();
                        }
                    }
                    self.out_plain += plain.len() as u64;
                }
                CONTENT_HANDSHAKE => {
                    self.hs_skip = post_handshake(plain, self.hs_skip, self.tls13_source, src)?;
                }
                CONTENT_ALERT => match plain {
                    [_, 0] => {
                        self.notified = true;
                        break;
                    }
                    [level, desc] => {
                        return Err(Failure::Error(format!(
                            "the {src} leg sent TLS alert {desc} (level {level}); ending the session"
                        )))
                    }
                    _ => return Err(Failure::Error(format!("malformed TLS alert from the {src} leg"))),
                },
                t => return Err(Failure::Error(format!("unexpected TLS content type {t} from the {src} leg"))),
            }
        }
        Ok(())
    }
}

/// Walks the handshake messages of one record after the handshake; returns how many bytes of a
/// ticket continue in the next record.
pub(super) fn post_handshake(mut p: &[u8], mut skip: usize, tls13: bool, src: &str) -> Result<usize, Failure> {
    while !p.is_empty() {
        if skip > 0 {
            let n = skip.min(p.len());
            p = &p[n..];
            skip -= n;
            continue;
        }
        let [typ, a, b, c, rest @ ..] = p else {
            return Err(Failure::Error(format!("fragmented handshake header from the {src} leg")));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        match (*typ, tls13) {
            // We never resume sessions on these legs; the ticket is useless to us.
            (HS_NEW_SESSION_TICKET, true) => skip = len,
            (HS_KEY_UPDATE, true) => {
                return Err(Failure::Error(format!(
                    "the {src} leg sent a TLS 1.3 KeyUpdate; the data plane holds only the traffic key and IV, \
                     not the traffic secret, so it cannot derive the next key; ending the session"
                )))
            }
            // A TLS 1.2 server may ask for renegotiation; a client may ignore that (RFC 5246 7.4.1.1).
            (HS_HELLO_REQUEST, false) if len == 0 => {}
            (t, _) => {
                return Err(Failure::Error(format!(
                    "unsupported post-handshake message {t} from the {src} leg (renegotiation or client auth)"
                )))
            }
        }
        p = rest;
    }
    Ok(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_skipped_across_records_and_key_updates_fail() {
        let ticket = [4u8, 0, 0, 6, 1, 2, 3, 4, 5, 6];
        assert_eq!(post_handshake(&ticket, 0, true, "t").unwrap(), 0);
        assert_eq!(post_handshake(&ticket[..7], 0, true, "t").unwrap(), 3);
        assert_eq!(post_handshake(&ticket[7..], 3, true, "t").unwrap(), 0);
        let two = [&ticket[..], &ticket[..]].concat();
        assert_eq!(post_handshake(&two, 0, true, "t").unwrap(), 0);
        assert!(post_handshake(&[24, 0, 0, 1, 0], 0, true, "t").is_err());
        assert!(post_handshake(&[4, 0], 0, true, "t").is_err());
        assert_eq!(post_handshake(&[0, 0, 0, 0], 0, false, "t").unwrap(), 0);
        assert!(post_handshake(&[1, 0, 0, 0], 0, false, "t").is_err());
        assert!(post_handshake(&[4, 0, 0, 0], 0, false, "t").is_err());
    }
}
