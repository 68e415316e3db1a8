//! The IO half of the handoff protocol: a Unix SOCK_SEQPACKET socket between control and a
//! dataplane process, one [`handoff`](crate::handoff) frame per packet, with socket descriptors in
//! SCM_RIGHTS beside a `Handoff` frame.
//!
//! SEQPACKET keeps frame boundaries, so a descriptor can never be attached to the wrong frame.
//! The listening socket is created 0600 and every peer's SO_PEERCRED uid must be ours (or root).
//!
//! A frame is at most `HEADER_LEN + MAX_PAYLOAD` bytes, and `recv` takes one that large: a larger
//! one is refused before it is sent (the peer would drop the link over it), and replies that can
//! grow with the number of sessions go in parts ([`Link::send_reply`], [`Link::recv_reply`]).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use thiserror::Error;

use crate::handoff::{self, HandoffError, Message, Role, HEADER_LEN, MAX_PAYLOAD};

/// Descriptors a single frame may carry (a Handoff carries two, a Resume up to seven).
const MAX_FDS: usize = 8;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] HandoffError),
    #[error("peer closed the link")]
    Closed,
    #[error("peer uid {uid} is not allowed (expected {expected} or root)")]
    PeerNotAllowed { uid: u32, expected: u32 },
    #[error("frame arrived truncated")]
    Truncated,
    /// A non-blocking send found the socket buffer full (the peer is not reading).
    #[error("the peer is not reading (socket buffer full)")]
    WouldBlock,
    /// The first frame each way must be a `Hello` (a data plane's, when we introduced ourselves).
    #[error("expected a Hello, got {0:?}")]
    NotHello(Box<Message>),
}

/// One end of a control ↔ dataplane link.
pub struct Link {
    fd: OwnedFd,
}

/// The dataplane's listening socket.
pub struct Listener {
    fd: OwnedFd,
}

fn seqpacket() -> Result<OwnedFd, LinkError> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

impl Listener {
    /// Binds `path` with mode 0600, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<Listener, LinkError> {
        if path.exists() {
            // A socket nobody accepts on is stale (a previous dataplane died); a live one means
            // another dataplane owns the path, and we must not steal it.
            if Link::connect(path).is_ok() {
                return Err(LinkError::Io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by a running dataplane", path.display()),
                )));
            }
            std::fs::remove_file(path)?;
        }
        let fd = seqpacket()?;
        // Create the socket file without group/other access in the first place: a chmod after
        // bind would leave a window where anyone could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?);
        nix::sys::stat::umask(old);
        bound?;
        socket::listen(&fd, Backlog::new(16)?)?;
        Ok(Listener { fd })
    }

    /// Accepts a peer whose uid is ours or root.
    pub fn accept(&self) -> Result<Link, LinkError> {
        let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor and nothing else owns it.
        let link = Link { fd: unsafe { OwnedFd::from_raw_fd(raw) } };
        link.check_peer()?;
        Ok(link)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Link {
    pub fn connect(path: &Path) -> Result<Link, LinkError> {
        let fd = seqpacket()?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        let link = Link { fd };
        link.check_peer()?;
        Ok(link)
    }

    fn check_peer(&self) -> Result<(), LinkError> {
        let creds = socket::getsockopt(&self.fd, sockopt::PeerCredentials)?;
        let expected = nix::unistd::geteuid().as_raw();
        if creds.uid() != expected && creds.uid() != 0 {
            return Err(LinkError::PeerNotAllowed { uid: creds.uid(), expected });
        }
        Ok(())
    }

    pub fn try_clone(&self) -> Result<Link, LinkError> {
        Ok(Link { fd: self.fd.try_clone()? })
    }

    /// Sends one frame, with `fds` attached (duplicated into the peer; ours stay open). Blocks
    /// while the socket buffer is full (see [`Link::try_send`] for code that must not).
    pub fn send(&self, msg: &Message, fds: &[RawFd]) -> Result<(), LinkError> {
        self.send_flags(msg, fds, MsgFlags::MSG_NOSIGNAL)
    }

    /// Sends one frame without blocking: `Err(LinkError::WouldBlock)` when the socket buffer is
    /// full, and nothing was sent (a SEQPACKET frame goes whole or not at all).
    pub fn try_send(&self, msg: &Message, fds: &[RawFd]) -> Result<(), LinkError> {
        self.send_flags(msg, fds, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)
    }

    fn send_flags(&self, msg: &Message, fds: &[RawFd], flags: MsgFlags) -> Result<(), LinkError> {
        let frame = handoff::encode(msg);
        if frame.len() > HEADER_LEN + MAX_PAYLOAD {
            return Err(LinkError::Protocol(HandoffError::TooLong(frame.len() - HEADER_LEN)));
        }
        let iov = [IoSlice::new(&frame)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        let n = match socket::sendmsg::<UnixAddr>(self.fd.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) => return Err(LinkError::WouldBlock),
            Err(e) => return Err(e.into()),
        };
        if n != frame.len() {
            return Err(LinkError::Truncated);
        }
        Ok(())
    }

    /// Sends a reply that may not fit one frame (`Sessions`, `Stats`) in as many parts as it
    /// takes; returns the ids of entries too large for any frame, which were left out.
    pub fn send_reply(&self, msg: Message) -> Result<Vec<String>, LinkError> {
        let split = handoff::split_reply(msg);
        for part in &split.frames {
            self.send(part, &[])?;
        }
        Ok(split.left_out)
    }

    /// Receives frames until one is a whole reply: the parts of a `Sessions` or `Stats` reply
    /// are gathered into one message; any other frame is returned as it comes. For peers that
    /// receive nothing but replies (admin tools), descriptors are dropped.
    pub fn recv_reply(&self) -> Result<Message, LinkError> {
        let mut parts = handoff::Reassembly::default();
        loop {
            if let Some(m) = parts.push(self.recv()?.0)? {
                return Ok(m);
            }
        }
    }

    /// Receives one frame and the descriptors that came with it.
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), LinkError> {
        let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (n, truncated, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<UnixAddr>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            // Take ownership of every descriptor first, so they are closed even if the frame is bad.
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel installed these descriptors in our table for
                            // this message; nothing else refers to them yet.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
            }
            let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, truncated, fds)
        };
        if n == 0 {
            return Err(LinkError::Closed);
        }
        if truncated {
            return Err(LinkError::Truncated);
        }
        match handoff::decode(&buf[..n])? {
            Some((m, used)) if used == n => Ok((m, fds)),
            _ => Err(LinkError::Truncated),
        }
    }

    /// The client's side of the opening exchange: introduces us as `role` and waits for the data
    /// plane's `Hello`, whose pid it returns. Anything else first means the peer is not a data
    /// plane. Blocks for the answer as long as the read timeout allows.
    pub fn hello(&self, role: Role) -> Result<u32, LinkError> {
        self.send(&Message::Hello { role, pid: std::process::id() }, &[])?;
        match self.recv()?.0 {
            Message::Hello { role: Role::Dataplane, pid } => Ok(pid),
            other => Err(LinkError::NotHello(Box::new(other))),
        }
    }

    /// The data plane's side: reads the peer's `Hello` (its role and pid) without answering,
    /// so the caller can decide first (a successor must find the counters pinned before it is
    /// answered); [`Link::answer_hello`] answers.
    pub fn recv_hello(&self) -> Result<(Role, u32), LinkError> {
        match self.recv()?.0 {
            Message::Hello { role, pid } => Ok((role, pid)),
            other => Err(LinkError::NotHello(Box::new(other))),
        }
    }

    /// Answers a peer's `Hello` as a data plane.
    pub fn answer_hello(&self) -> Result<(), LinkError> {
        self.send(&Message::Hello { role: Role::Dataplane, pid: std::process::id() }, &[])
    }

    /// Sets a receive timeout (None blocks forever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> Result<(), LinkError> {
        let tv = match t {
            Some(d) => nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _),
            None => nix::sys::time::TimeVal::new(0, 0),
        };
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// Wakes a thread blocked in `recv` on a clone of this link (used on shutdown).
    pub fn shutdown(&self) {
        let _ = socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("sluice-link-{}-{name}", std::process::id()))
    }

    #[test]
    fn frames_and_descriptors_cross_the_link() {
        let path = temp_path("fds");
        let listener = Listener::bind(&path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let link = Link::connect(&path).unwrap();
                let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
                link.send(&Message::Hello { role: Role::Control, pid: 7 }, &[a.as_raw_fd(), b.as_raw_fd()]).unwrap();
                // Keep `b` to check the passed duplicate of `a` is connected to it.
                let mut got = [0u8; 5];
                std::io::Read::read_exact(&mut &b, &mut got).unwrap();
                got
            }
        });
        let server = listener.accept().unwrap();
        let (msg, fds) = server.recv().unwrap();
        assert_eq!(msg, Message::Hello { role: Role::Control, pid: 7 });
        assert_eq!(fds.len(), 2);
        let a = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        std::io::Write::write_all(&mut &a, b"hello").unwrap();
        assert_eq!(&client.join().unwrap(), b"hello");
        // A second dataplane must not steal a live socket path.
        assert!(Listener::bind(&path).is_err());
        drop(listener);
        std::fs::remove_file(&path).unwrap();
    }

    fn pair() -> (Link, Link) {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        (Link { fd: a }, Link { fd: b })
    }

    /// The largest legal frame crosses; a larger one is refused before it is sent, and the link
    /// stays usable.
    #[test]
    fn the_largest_frame_crosses_and_a_larger_one_is_refused() {
        let (a, b) = pair();
        // A `Sessions` frame of one id filling the payload exactly (6 bytes of field header).
        let full = Message::Sessions { session_ids: vec!["x".repeat(MAX_PAYLOAD - 6)], more: false };
        assert_eq!(handoff::encode(&full).len(), HEADER_LEN + MAX_PAYLOAD);
        a.send(&full, &[]).unwrap();
        assert_eq!(b.recv().unwrap().0, full);
        let over = Message::Sessions { session_ids: vec!["x".repeat(MAX_PAYLOAD - 5)], more: false };
        assert!(matches!(a.try_send(&over, &[]), Err(LinkError::Protocol(HandoffError::TooLong(_)))));
        a.send(&Message::ListSessions, &[]).unwrap();
        assert_eq!(b.recv().unwrap().0, Message::ListSessions);
    }

    /// 2,000 sessions' ids (three times what one frame holds) come across as one reply, with an
    /// unrelated frame between the parts still delivered first.
    #[test]
    fn replies_in_parts_come_back_whole() {
        let (a, b) = pair();
        let ids: Vec<String> = (0..2000).map(|i| format!("{i:08x}-289d-2a04-d778-31ee77127561")).collect();
        let reply = Message::Sessions { session_ids: ids.clone(), more: false };
        let t = std::thread::spawn(move || {
            a.send(&Message::TakeoverDone, &[]).unwrap();
            a.send_reply(reply).unwrap()
        });
        assert_eq!(b.recv_reply().unwrap(), Message::TakeoverDone);
        assert_eq!(b.recv_reply().unwrap(), Message::Sessions { session_ids: ids, more: false });
        assert!(t.join().unwrap().is_empty());
    }

    /// A peer that stops reading makes `try_send` fail at once instead of blocking.
    #[test]
    fn try_send_does_not_block_on_a_full_buffer() {
        let (a, _b) = pair();
        let started = std::time::Instant::now();
        let mut sent = 0;
        loop {
            match a.try_send(&Message::ListSessions, &[]) {
                Ok(()) => sent += 1,
                Err(LinkError::WouldBlock) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 1_000_000, "the buffer never filled");
        }
        assert!(sent > 0);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Both sides of the opening exchange, and a peer that answers with something else.
    #[test]
    fn hello_exchange_and_a_peer_that_is_not_a_data_plane() {
        let (a, b) = pair();
        let server = std::thread::spawn(move || {
            let got = b.recv_hello().unwrap();
            b.answer_hello().unwrap();
            assert!(matches!(b.recv_hello(), Err(LinkError::NotHello(m)) if *m == Message::ListSessions));
            b.send(&Message::Hello { role: Role::Admin, pid: 9 }, &[]).unwrap();
            // Kept open: the client's next Hello must not meet a closed socket.
            (got, b)
        });
        assert_eq!(a.hello(Role::Admin).unwrap(), std::process::id());
        a.send(&Message::ListSessions, &[]).unwrap();
        // An admin tool answering as an admin is not a data plane.
        assert!(matches!(a.hello(Role::Control), Err(LinkError::NotHello(m))
            if *m == Message::Hello { role: Role::Admin, pid: 9 }));
        assert_eq!(server.join().unwrap().0, (Role::Admin, std::process::id()));
    }

    #[test]
    fn garbage_is_a_protocol_error_not_a_panic() {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let (a, b) = (Link { fd: a }, Link { fd: b });
        socket::send(a.fd.as_raw_fd(), b"garbage!garbage!", MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv(), Err(LinkError::Protocol(HandoffError::BadMagic))));
        drop(a);
        assert!(matches!(b.recv(), Err(LinkError::Closed)));
    }
}
