//! The read side of a kTLS leg: what a direction does with the records the kernel will not hand
//! over as a byte stream.
//!
//! With `TLS_RX` installed the kernel opens application data for splice and recv, but a record of
//! another type stops both (splice fails with EINVAL, a recv without room for a control message
//! with EIO) until it is read with recvmsg and `TLS_GET_RECORD_TYPE` ([`crate::ktls::recv_record`]).
//! The policy is the userspace record path's (`record.rs`), so a session behaves the same on
//! either path: NewSessionTickets are dropped, close_notify is the source's EOF, and anything else
//! (a KeyUpdate we cannot follow, another alert, renegotiation) ends the session with an error.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::errno::Errno;
use nix::libc;

use super::record::post_handshake;
use super::{failure_for, Failure, Leg, Stats};
use crate::ktls::{recv_record, MAX_RECORD_PLAINTEXT};
use crate::tls_record::{CONTENT_ALERT, CONTENT_HANDSHAKE};

/// What a non-data record meant for its direction.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Control {
    /// Dropped (a NewSessionTicket, a TLS 1.2 HelloRequest): keep reading.
    Skipped,
    /// The source sent close_notify: its EOF; nothing after it is read.
    CloseNotify,
}

pub(crate) struct KtlsRx {
    tls13: bool,
    /// Bytes of a handshake message that continue in the next handshake record.
    hs_skip: usize,
    stats: Arc<Stats>,
}

impl KtlsRx {
    pub(crate) fn new(tls13: bool, stats: Arc<Stats>) -> Self {
        KtlsRx { tls13, hs_skip: 0, stats }
    }

    /// Bytes of a handshake message continuing in the next record (passed on at a takeover).
    pub(crate) fn hs_skip(&self) -> usize {
        self.hs_skip
    }

    pub(crate) fn with_hs_skip(mut self, skip: usize) -> Self {
        self.hs_skip = skip;
        self
    }

    /// Reading kTLS leg `fd` failed with `errno` (a splice or recv, named by `what`): reads the
    /// record that caused it, if that is the cause, and says what it means. One recvmsg, which
    /// does not block (the socket is non-blocking and the record is already decrypted and queued).
    pub(crate) fn read_failed(&mut self, fd: RawFd, leg: Leg, errno: i32, what: &str) -> Result<Control, Failure> {
        if errno != libc::EIO && errno != libc::EINVAL {
            // EBADMSG (a record failed authentication), resets, ...
            return Err(failure_for(leg, errno, what));
        }
        let src = leg.name();
        // Rare (a few tickets per session), so allocated here rather than held per direction.
        let mut buf = vec![0u8; MAX_RECORD_PLAINTEXT];
        let (content_type, len) = match recv_record(fd, &mut buf) {
            Ok(r) => r,
            Err(Errno::EAGAIN) => {
                return Err(Failure::Error(format!(
                    "{what} on the {src} leg failed ({}) with no control record waiting",
                    std::io::Error::from_raw_os_error(errno)
                )))
            }
            Err(e) => return Err(failure_for(leg, e as i32, "recvmsg of a kTLS control record")),
        };
        self.stats.ktls_control_records.fetch_add(1, Ordering::Relaxed);
        let payload = &buf[..len];
        match content_type {
            CONTENT_HANDSHAKE => {
                self.hs_skip = post_handshake(payload, self.hs_skip, self.tls13, src)?;
                Ok(Control::Skipped)
            }
            CONTENT_ALERT => match payload {
                [_, 0] => Ok(Control::CloseNotify),
                [level, desc] => Err(Failure::Error(format!(
                    "the {src} leg sent TLS alert {desc} (level {level}); ending the session"
                ))),
                _ => Err(Failure::Error(format!("malformed TLS alert from the {src} leg"))),
            },
            t => Err(Failure::Error(format!("unexpected TLS record type {t} from the {src} leg after {what} failed"))),
        }
    }
}

/// A read from `src` that failed: on a kTLS leg it may be a non-data record (skipped, or
/// close_notify); otherwise, or for any other error, the leg has failed.
pub(crate) fn read_error(
    rx: Option<&mut KtlsRx>,
    src: RawFd,
    leg: Leg,
    errno: i32,
    what: &str,
) -> Result<Control, Failure> {
    match rx {
        Some(rx) => rx.read_failed(src, leg, errno, what),
        None => Err(failure_for(leg, errno, what)),
    }
}
