//! Kernel TLS (kTLS): handing a leg's record protection to the kernel so the leg can be spliced.
//!
//! After control's handshake the data plane holds each TLS leg's traffic keys, IVs and sequence
//! numbers ([`LegCrypto::Tls`]). Where the kernel has kTLS (`CONFIG_TLS`), `install` puts them
//! into the socket (`TCP_ULP` "tls", then `SOL_TLS`/`TLS_TX` and `TLS_RX`): from then on the socket
//! reads and writes plaintext while the kernel opens and seals the records, so the relay treats the
//! leg as plain and splices it (socket → pipe → socket) without the payload entering userspace.
//! Where it cannot (no kTLS, a Unix socket, a cipher the kernel lacks) the leg stays on the
//! userspace record path ([`crate::tls_record`]); which path is in use is logged once per process.
//!
//! What the kernel leaves to us: a record that is not application data (a post-handshake
//! NewSessionTicket or KeyUpdate, an alert) makes splice fail with EINVAL and recv without room for
//! a control message fail with EIO, until it is read with recvmsg and a `TLS_GET_RECORD_TYPE`
//! control message (`recv_record`); and close_notify has to be sent as an alert record with a
//! `TLS_SET_RECORD_TYPE` control message (`send_close_notify`).
//!
//! How rustls' 12-byte IV maps onto the kernel's `tls12_crypto_info_*` (Documentation/networking/
//! tls.rst and net/tls/tls_sw.c):
//! * AES-GCM, TLS 1.3: the kernel builds the nonce as `(salt || iv) XOR seq`, so salt = IV[0..4]
//!   and iv = IV[4..12], exactly the RFC 8446 per-record nonce.
//! * ChaCha20-Poly1305, TLS 1.3 and TLS 1.2 (RFC 7905): no salt; iv = the whole 12-byte IV, XORed
//!   with the sequence number by the kernel.
//! * AES-GCM, TLS 1.2: salt = IV[0..4] is the implicit part. On receive the kernel takes the explicit
//!   8 bytes from each record, so `iv` is unused. On send it writes `iv` as the first record's
//!   explicit nonce and *increments* it per record, where rustls XORs IV[4..12] with the sequence
//!   number: see `tls12_gcm_tx_explicit` for the start value that keeps nonces unique.
//! * `rec_seq` is the sequence number of the next record, big-endian.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use nix::sys::socket::{recvmsg, setsockopt, ControlMessageOwned, MsgFlags, TlsGetRecordType};
use tracing::{debug, info, warn};

use crate::tls_record::{CLOSE_NOTIFY, CONTENT_ALERT, TLS12, TLS13};
use sluice_handoff::handoff::LegCrypto;

/// Largest plaintext of one TLS record: a buffer this size holds any control record read off a leg.
pub(crate) const MAX_RECORD_PLAINTEXT: usize = 16384;

/// Whether the kernel has kTLS at all: probes `TCP_ULP` "tls" on a connected loopback socket.
/// `Err` carries the errno (ENOENT when `CONFIG_TLS` is off or the `tls` module cannot be loaded).
pub fn probe() -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    setsockopt(&client, TcpUlp::default(), b"tls")?;
    Ok(())
}

/// Which halves of a leg the kernel protects after [`install`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Installed {
    /// The kernel seals what is written to the leg.
    pub(crate) tx: bool,
    /// The kernel opens what is read from the leg.
    pub(crate) rx: bool,
}

/// Set once a `TCP_ULP` failure showed the kernel has no kTLS: later legs skip the attempt, since
/// each failing attempt makes a privileged process's kernel run modprobe for "tcp-ulp-tls".
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);
static LOGGED_KERNEL: AtomicBool = AtomicBool::new(false);
static LOGGED_USERSPACE: AtomicBool = AtomicBool::new(false);

/// Tries to hand `crypto` to the kernel for socket `fd`. Never fails: whatever the kernel refuses
/// stays with the userspace record path. TX goes first and a failed RX leaves TX installed (the
/// ULP cannot be removed), so a leg can come back half-installed; the caller must honour each half.
/// The key material is validated by the caller beforehand (the userspace ciphers are built first),
/// so a malformed handoff fails the same way with or without kTLS.
pub(crate) fn install(fd: BorrowedFd<'_>, crypto: &LegCrypto, leg: &str) -> Installed {
    let LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq } = crypto else {
        return Installed::default();
    };
    let (Some(tx), Some(rx)) = (
        crypto_info(*version, *cipher_suite, tx_key, tx_iv, *tx_seq, Direction::Tx),
        crypto_info(*version, *cipher_suite, rx_key, rx_iv, *rx_seq, Direction::Rx),
    ) else {
        fallback(leg, &format!("cipher suite {cipher_suite:#06x} of TLS {version:#06x} has no kTLS mapping"));
        return Installed::default();
    };
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return Installed::default();
    }
    if let Err(e) = setsockopt(&fd, TcpUlp::default(), b"tls") {
        if matches!(e, Errno::ENOENT | Errno::ENOPROTOOPT) {
            UNAVAILABLE.store(true, Ordering::Relaxed);
            if !LOGGED_USERSPACE.swap(true, Ordering::Relaxed) {
                info!("kTLS unavailable (TCP_ULP \"tls\": {e}); TLS legs go through the userspace record path");
            }
        } else {
            // A Unix socket (EOPNOTSUPP) or a socket that already has a ULP: this leg only.
            fallback(leg, &format!("TCP_ULP \"tls\" refused for this socket: {e}"));
        }
        return Installed::default();
    }
    // With the ULP and no crypto state the socket still behaves as plain TCP, so a refused TX
    // leaves the userspace path fully usable.
    if let Err(e) = setsockopt(&fd, TcpTlsTx, &tx) {
        fallback(leg, &format!("TLS_TX refused for cipher suite {cipher_suite:#06x}: {e}"));
        return Installed::default();
    }
    if let Err(e) = setsockopt(&fd, TcpTlsRx, &rx) {
        warn!(leg, error = %e, "kTLS TLS_RX refused after TLS_TX was installed; the kernel seals what is \
             written to this leg and its reads stay on the userspace record path");
        return Installed { tx: true, rx: false };
    }
    if !LOGGED_KERNEL.swap(true, Ordering::Relaxed) {
        info!("kTLS in use: TLS legs are sealed and opened by the kernel and spliced like plain ones");
    }
    debug!(leg, version, cipher_suite, "kTLS installed");
    Installed { tx: true, rx: true }
}

/// A leg the kernel could not take: logged once at info (the first time the userspace path is
/// used), then at debug.
fn fallback(leg: &str, why: &str) {
    if !LOGGED_USERSPACE.swap(true, Ordering::Relaxed) {
        info!(leg, "kTLS not used for a leg ({why}); such legs go through the userspace record path");
    } else {
        debug!(leg, "kTLS not used ({why})");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Tx,
    Rx,
}

/// The kernel's view of one direction's state, or `None` for a suite/IV layout it has no mapping
/// for. Key lengths are checked here too, although the caller has validated them already.
fn crypto_info(version: u16, suite: u16, key: &[u8], iv: &[u8], seq: u64, dir: Direction) -> Option<TlsCryptoInfo> {
    #[derive(PartialEq)]
    enum Alg {
        Gcm128,
        Gcm256,
        Chacha,
    }
    let alg = match (version, suite) {
        (TLS13, 0x1301) => Alg::Gcm128,
        (TLS13, 0x1302) => Alg::Gcm256,
        (TLS13, 0x1303) => Alg::Chacha,
        (TLS12, 0xc02f | 0xc02b | 0x009c | 0x009e) => Alg::Gcm128,
        (TLS12, 0xc030 | 0xc02c | 0x009d | 0x009f) => Alg::Gcm256,
        (TLS12, 0xcca8..=0xccaa) => Alg::Chacha,
        _ => return None,
    };
    let info = libc::tls_crypto_info {
        version,
        cipher_type: match alg {
            Alg::Gcm128 => libc::TLS_CIPHER_AES_GCM_128,
            Alg::Gcm256 => libc::TLS_CIPHER_AES_GCM_256,
            Alg::Chacha => libc::TLS_CIPHER_CHACHA20_POLY1305,
        },
    };
    let rec_seq = seq.to_be_bytes();
    if alg == Alg::Chacha {
        return Some(TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
            info,
            iv: iv.try_into().ok()?,
            key: key.try_into().ok()?,
            salt: [],
            rec_seq,
        }));
    }
    // AES-GCM: 4 bytes of salt, then the 8 bytes the kernel calls iv.
    let salt: [u8; 4] = iv.get(..4)?.try_into().ok()?;
    let explicit: [u8; 8] = match (version, iv.len()) {
        (TLS13, 12) => iv[4..].try_into().ok()?,
        (TLS12, 12 | 4) => {
            // A bare 4-byte salt means the sender's explicit nonce was the sequence number.
            let base = iv.get(4..12).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            match dir {
                Direction::Tx => tls12_gcm_tx_explicit(base, seq).to_be_bytes(),
                // Unused on receive (each record carries its explicit nonce); kept for symmetry.
                Direction::Rx => base.to_be_bytes(),
            }
        }
        _ => return None,
    };
    Some(match alg {
        Alg::Gcm128 => TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
            info,
            iv: explicit,
            key: key.try_into().ok()?,
            salt,
            rec_seq,
        }),
        _ => TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
            info,
            iv: explicit,
            key: key.try_into().ok()?,
            salt,
            rec_seq,
        }),
    })
}

/// First explicit nonce the kernel will send on a TLS 1.2 AES-GCM leg whose records up to `seq`
/// were sealed by rustls with explicit nonces `base XOR n` (n < `seq`).
///
/// GCM breaks if a nonce repeats under one key. The kernel sends `start, start + 1, ...`; rustls'
/// nonces all lie in the aligned block of `base` whose low bits cover 0..seq. Starting right after
/// that block, the kernel's nonces cannot meet it before 2^64 records. (Starting at `base XOR seq`,
/// the obvious choice, can: base = ...11, seq = 2 gives start ...01, then ...10 = base XOR 1.)
fn tls12_gcm_tx_explicit(base: u64, seq: u64) -> u64 {
    let span = seq.checked_next_power_of_two().map_or(u64::MAX, |p| p.saturating_sub(1));
    (base | span).wrapping_add(1)
}

/// Reads the record at the head of kTLS leg `fd` into `buf` (which must hold
/// [`MAX_RECORD_PLAINTEXT`] bytes) without blocking: `(content type, length)`. Meant for the
/// non-data records that made a splice or recv fail; EAGAIN means no record is waiting.
pub(crate) fn recv_record(fd: RawFd, buf: &mut [u8]) -> Result<(u8, usize), Errno> {
    let mut cmsg = nix::cmsg_space!(u8);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let len = msg.bytes;
    let mut content_type = None;
    // ENOBUFS when the type did not fit (MSG_CTRUNC): cannot happen with room for one byte.
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::TlsGetRecordType(t) = c {
            content_type = Some(match t {
                TlsGetRecordType::ChangeCipherSpec => 20,
                TlsGetRecordType::Alert => 21,
                TlsGetRecordType::Handshake => 22,
                TlsGetRecordType::ApplicationData => 23,
                TlsGetRecordType::Unknown(x) => x,
                _ => 0,
            });
        }
    }
    // A kTLS receive always names the record type; no type means the socket is not kTLS.
    content_type.map(|t| (t, len)).ok_or(Errno::EPROTO)
}

/// Sends close_notify on kTLS leg `fd` as an alert record, without blocking (EAGAIN: poll for
/// POLLOUT and try again). Any record still open in the kernel is pushed out first.
pub(crate) fn send_close_notify(fd: RawFd) -> Result<(), Errno> {
    send_control(fd, CONTENT_ALERT, &CLOSE_NOTIFY)
}

fn send_control(fd: RawFd, content_type: u8, payload: &[u8]) -> Result<(), Errno> {
    // u64s keep the buffer aligned for cmsghdr; 32 bytes hold CMSG_SPACE(1) (24 on 64-bit).
    let mut space = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space_len = unsafe { libc::CMSG_SPACE(1) } as usize;
    if space_len > std::mem::size_of_val(&space) {
        return Err(Errno::EOVERFLOW);
    }
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data for which all-zero is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = space_len as _;
    // SAFETY: msg_control points at `space`, aligned and at least CMSG_SPACE(1) bytes, so the first
    // header and its one data byte are inside it; nothing else aliases `space` meanwhile.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(Errno::EINVAL);
        }
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = content_type;
    }
    // SAFETY: `msg` points at `iov` (which points at `payload`) and `space`, all alive for the
    // call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    match Errno::result(n)? as usize {
        // A two-byte record is not split: anything else would be a kernel we do not understand.
        sent if sent == payload.len() => Ok(()),
        _ => Err(Errno::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn iv() -> Vec<u8> {
        (1..=12).collect()
    }

    #[test]
    fn tls13_aes_gcm_splits_salt_and_iv() {
        let key = [7u8; 16];
        let Some(TlsCryptoInfo::Aes128Gcm(c)) = crypto_info(TLS13, 0x1301, &key, &iv(), 0x0102, Direction::Tx) else {
            panic!("no AES-128-GCM mapping");
        };
        assert_eq!((c.info.version, c.info.cipher_type), (0x0304, libc::TLS_CIPHER_AES_GCM_128));
        assert_eq!(c.salt, [1, 2, 3, 4]);
        assert_eq!(c.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(c.key, key);
        assert_eq!(c.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
        let Some(TlsCryptoInfo::Aes256Gcm(c)) = crypto_info(TLS13, 0x1302, &[9; 32], &iv(), 5, Direction::Rx) else {
            panic!("no AES-256-GCM mapping");
        };
        assert_eq!((c.salt, c.iv, c.rec_seq[7]), ([1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], 5));
    }

    #[test]
    fn chacha_takes_the_whole_iv_in_both_versions() {
        for (v, s) in [(TLS13, 0x1303), (TLS12, 0xcca8), (TLS12, 0xcca9)] {
            let Some(TlsCryptoInfo::Chacha20Poly1305(c)) = crypto_info(v, s, &[3; 32], &iv(), 1, Direction::Tx) else {
                panic!("no ChaCha20 mapping for {s:#06x}");
            };
            assert_eq!(c.info.cipher_type, libc::TLS_CIPHER_CHACHA20_POLY1305);
            assert_eq!(c.iv.to_vec(), iv());
            assert_eq!(c.rec_seq, 1u64.to_be_bytes());
        }
    }

    #[test]
    fn tls12_gcm_salt_and_explicit_nonce() {
        let Some(TlsCryptoInfo::Aes128Gcm(rx)) = crypto_info(TLS12, 0xc02f, &[1; 16], &iv(), 3, Direction::Rx) else {
            panic!("no mapping");
        };
        assert_eq!((rx.salt, rx.iv), ([1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]));
        let Some(TlsCryptoInfo::Aes256Gcm(tx)) = crypto_info(TLS12, 0xc030, &[1; 32], &iv(), 3, Direction::Tx) else {
            panic!("no mapping");
        };
        assert_eq!(tx.salt, [1, 2, 3, 4]);
        assert_eq!(u64::from_be_bytes(tx.iv), tls12_gcm_tx_explicit(0x0506_0708_090a_0b0c, 3));
        // A bare salt: rustls-less senders used the sequence number as the explicit nonce.
        let Some(TlsCryptoInfo::Aes128Gcm(bare)) =
            crypto_info(TLS12, 0xc02f, &[1; 16], &[1, 2, 3, 4], 3, Direction::Tx)
        else {
            panic!("no mapping");
        };
        assert_eq!(u64::from_be_bytes(bare.iv), 4);
    }

    #[test]
    fn tls12_gcm_kernel_nonces_never_repeat_userspace_ones() {
        for base in [0u64, 1, 2, 3, 0xff, 0x1234_5678_9abc_def0, u64::MAX, u64::MAX - 2] {
            for seq in [0u64, 1, 2, 3, 4, 5, 17, 1000] {
                let used: Vec<u64> = (0..seq).map(|n| base ^ n).collect();
                let start = tls12_gcm_tx_explicit(base, seq);
                for k in 0..4096u64 {
                    assert!(!used.contains(&start.wrapping_add(k)), "base {base:#x} seq {seq} record {k}");
                }
            }
        }
    }

    #[test]
    fn unknown_suites_and_bad_lengths_have_no_mapping() {
        assert!(crypto_info(TLS13, 0x1304, &[0; 16], &iv(), 0, Direction::Tx).is_none());
        assert!(crypto_info(0x0302, 0xc02f, &[0; 16], &iv(), 0, Direction::Tx).is_none());
        assert!(crypto_info(TLS13, 0x1301, &[0; 15], &iv(), 0, Direction::Tx).is_none());
        assert!(crypto_info(TLS13, 0x1301, &[0; 16], &[0; 4], 0, Direction::Tx).is_none());
        assert!(crypto_info(TLS13, 0x1303, &[0; 32], &[0; 8], 0, Direction::Tx).is_none());
    }

    #[test]
    fn install_on_a_plain_leg_or_unix_socket_does_nothing() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(install(a.as_fd(), &LegCrypto::Plain, "client"), Installed::default());
        let tls = LegCrypto::Tls {
            version: TLS13,
            cipher_suite: 0x1301,
            tx_key: vec![0; 16],
            tx_iv: vec![0; 12],
            tx_seq: 0,
            rx_key: vec![0; 16],
            rx_iv: vec![0; 12],
            rx_seq: 0,
        };
        assert_eq!(install(a.as_fd(), &tls, "client"), Installed::default());
    }
}
