//! The control ↔ dataplane handoff protocol, version 1: a sans-IO codec.
//!
//! Control and a dataplane talk over a Unix SOCK_SEQPACKET socket (mode 0600, peers checked with
//! SO_PEERCRED by the IO layer). Every message is one frame:
//!
//! ```text
//! offset size  field
//! 0      4     magic "SLDP"
//! 4      2     protocol version (big endian), currently 1
//! 6      2     message type (big endian), see `MessageType`
//! 8      4     payload length N (big endian), at most MAX_PAYLOAD
//! 12     N     payload: a sequence of fields, each `tag u16 | len u32 | len bytes` (big endian)
//! ```
//!
//! Field tags are per message type (see each `encode`/`decode` pair). Decoders skip unknown tags,
//! so a newer sender can add fields within version 1; a missing required field is an error.
//! A `Handoff` frame is sent with `sendmsg` carrying exactly two descriptors in SCM_RIGHTS, client
//! leg first, then the upstream leg; the frame itself never contains descriptors.
//! Integers are big endian; strings are UTF-8; secrets are raw bytes.
//!
//! Counters (added within v1; receivers that predate them skip the tags): `SessionEnded` may carry
//! tag 6 (counter source, one byte: 1 BPF, 2 userspace), 16 (client leg) and 32 (upstream leg),
//! each leg a 40-byte field `rx_bytes u64 | tx_bytes u64 | rx_packets u64 | tx_packets u64 |
//! srtt_us u32 | total_retrans u32` (see `LegCounters`). `StatsRequest` (type 8, empty) asks for
//! live counters; `Stats` (type 9) answers with one tag-1 field per live session, each holding a
//! nested field sequence: 1 session id, 2/3 application bytes client→upstream/upstream→client,
//! 4 duration_ms, then the counter tags 6/16/32 as in `SessionEnded`.
//!
//! Replies of any size (added within v1): a `Sessions` or `Stats` reply that does not fit one
//! frame is split into several, each a complete frame of the same type holding some of the
//! entries; every frame but the last carries tag 2 (empty: "more follows"), and the receiver
//! concatenates the entries until a frame without it (see [`split_reply`] and [`Reassembly`]). A
//! single frame without tag 2 is a whole reply, as from a sender that predates chunking. The
//! sender never interleaves two replies to one link; other frames (`SessionEnded`) may come
//! between the parts. No frame of any type exceeds MAX_PAYLOAD: senders refuse to send one.
//!
//! `SessionEnded` may also carry tag 7 (added within v1): one byte, bit 0 set when the kernel
//! protected the client leg's TLS records (kTLS) and bit 1 for the upstream leg; a TLS leg without
//! its bit went through the userspace record path. Absent from a data plane that predates it.
//!
//! Takeover (added within v1): a data plane started with `--take-over` connects to the running
//! one's socket with `Hello` role 4 (successor). The running one stops taking handoffs, drops its
//! control links, and passes every live session as a `Resume` frame (type 10), answered by a
//! `HandoffAck`; then any end reports it still queued as `SessionEnded` frames, then
//! `TakeoverDone` (type 11, empty), and exits. A `Resume` payload is a `Handoff` payload (the
//! legs' sequence numbers are the current ones) plus tags 64 (kernel TLS, two bytes: per leg bit
//! 0 the kernel opens its records, bit 1 it seals them), 65 age_ms, 66 idle_ms, 67 wire (four u64:
//! client rx, client tx, upstream rx, upstream tx), 68 first close (a reason byte, optional), 69
//! BPF counter baseline (optional, eight u64: two cookies, then per leg queued rx, rx at
//! registration, unsent tx), 80 and 81 the two directions' state (see `DirState`). Its
//! descriptors: client leg, upstream leg, then each spliced direction's pipe (read end, write
//! end; an empty pipe where the direction held no bytes, which the successor may just close), then, when any record-path direction holds bytes, one memfd with them (each
//! direction's unprocessed input, then its unsent output, in direction order).

use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"SLDP";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
/// Frames are small (metadata and a few secrets); anything larger is garbage.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandoffError {
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("payload length {0} exceeds the limit")]
    TooLong(usize),
    #[error("truncated field")]
    Truncated,
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {0} is malformed")]
    Malformed(&'static str),
    #[error("a reply in parts grew past {MAX_REPLY_ENTRIES} entries")]
    TooManyEntries,
}

/// How a leg's bytes are protected once the data plane owns the socket.
#[derive(Clone, PartialEq, Eq)]
pub enum LegCrypto {
    /// Plain TCP or Unix socket: spliced as is.
    Plain,
    /// TLS with traffic secrets extracted from rustls after the handshake.
    Tls {
        /// 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3).
        version: u16,
        /// IANA cipher suite id, e.g. 0x1301 TLS_AES_128_GCM_SHA256.
        cipher_suite: u16,
        tx_key: Vec<u8>,
        tx_iv: Vec<u8>,
        tx_seq: u64,
        rx_key: Vec<u8>,
        rx_iv: Vec<u8>,
        rx_seq: u64,
    },
}

/// Keys and IVs never reach a log line: a frame logged as unexpected shows the rest only.
impl std::fmt::Debug for LegCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LegCrypto::Plain => f.write_str("Plain"),
            LegCrypto::Tls { version, cipher_suite, tx_seq, rx_seq, .. } => f
                .debug_struct("Tls")
                .field("version", &format_args!("{version:#06x}"))
                .field("cipher_suite", &format_args!("{cipher_suite:#06x}"))
                .field("tx_seq", tx_seq)
                .field("rx_seq", rx_seq)
                .finish_non_exhaustive(),
        }
    }
}

/// A session handed to the data plane (the two descriptors travel beside this frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub session_id: String,
    pub user: String,
    pub db_service: String,
    pub db_user: String,
    pub db_name: String,
    /// Unix seconds; the session ends when the client certificate expires.
    pub not_after: i64,
    /// 0 means no idle timeout.
    pub idle_timeout_ms: u64,
    pub client: LegCrypto,
    pub upstream: LegCrypto,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    ClientClosed = 1,
    UpstreamClosed = 2,
    IdleTimeout = 3,
    CertExpired = 4,
    AdminKill = 5,
    Error = 6,
    WorkerShutdown = 7,
    /// A lock (`control locks add`) covers the session's user or database.
    Locked = 8,
    /// Added within v1: the user was removed, or their roles no longer allow the session's route
    /// (or its database was deregistered).
    AccessRevoked = 9,
}

impl EndReason {
    fn from_u8(v: u8) -> Result<Self, HandoffError> {
        Ok(match v {
            1 => EndReason::ClientClosed,
            2 => EndReason::UpstreamClosed,
            3 => EndReason::IdleTimeout,
            4 => EndReason::CertExpired,
            5 => EndReason::AdminKill,
            6 => EndReason::Error,
            7 => EndReason::WorkerShutdown,
            8 => EndReason::Locked,
            9 => EndReason::AccessRevoked,
            _ => return Err(HandoffError::Malformed("reason")),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnded {
    pub session_id: String,
    /// Application bytes (plaintext after TLS) the relay delivered each way.
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub duration_ms: u64,
    pub reason: EndReason,
    /// Per-leg counters (final values); absent from a data plane that predates them.
    pub counters: Option<SessionCounters>,
    /// `(client, upstream)`: the kernel sealed and opened the leg's TLS records (kTLS).
    pub ktls: Option<(bool, bool)>,
}

/// Where a session's per-leg counters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CounterSource {
    /// The kernel (cgroup_skb programs keyed by socket cookie): TCP payload bytes on the wire
    /// (TLS records included), each byte once (retransmissions are not counted again); segments
    /// (retransmissions included); RTT and retransmits.
    Bpf = 1,
    /// The relay's own syscall results (splice/recv/send): bytes it moved, plaintext on TLS legs;
    /// packets, RTT and retransmits are unknown (0).
    Userspace = 2,
}

/// One leg's traffic, as seen by its socket (rx: from the peer, tx: to the peer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Smoothed RTT in µs (0: unknown).
    pub srtt_us: u32,
    pub total_retrans: u32,
}

/// LEG_COUNTERS_LEN bytes in a field: four u64 then two u32, big endian, in declaration order.
const LEG_COUNTERS_LEN: usize = 40;

impl LegCounters {
    fn encode(&self) -> [u8; LEG_COUNTERS_LEN] {
        let mut b = [0u8; LEG_COUNTERS_LEN];
        b[0..8].copy_from_slice(&self.rx_bytes.to_be_bytes());
        b[8..16].copy_from_slice(&self.tx_bytes.to_be_bytes());
        b[16..24].copy_from_slice(&self.rx_packets.to_be_bytes());
        b[24..32].copy_from_slice(&self.tx_packets.to_be_bytes());
        b[32..36].copy_from_slice(&self.srtt_us.to_be_bytes());
        b[36..40].copy_from_slice(&self.total_retrans.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Result<Self, HandoffError> {
        // Longer is accepted (a newer sender may append), shorter is not.
        if b.len() < LEG_COUNTERS_LEN {
            return Err(HandoffError::Malformed("leg counters"));
        }
        let u64_at =
            |i: usize| u64::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok(LegCounters {
            rx_bytes: u64_at(0),
            tx_bytes: u64_at(8),
            rx_packets: u64_at(16),
            tx_packets: u64_at(24),
            srtt_us: u32_at(32),
            total_retrans: u32_at(36),
        })
    }
}

/// Both legs' counters of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounters {
    pub source: CounterSource,
    pub client: LegCounters,
    pub upstream: LegCounters,
}

/// A live session's numbers so far (the answer to `StatsRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStats {
    pub session_id: String,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    /// Since the data plane took the session.
    pub duration_ms: u64,
    pub counters: Option<SessionCounters>,
}

/// How a direction of a resumed session was relayed, and what it had in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirPath {
    Splice = 0,
    Record = 1,
}

/// One direction's relay state at a takeover (no operation in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirState {
    pub path: DirPath,
    /// The source reached EOF (spliced: read 0; record path: recv 0).
    pub eof: bool,
    /// The source sent close_notify (record path).
    pub notified: bool,
    /// close_notify went to the destination.
    pub notify_sent: bool,
    /// The half-close was passed on; the direction is finished.
    pub done: bool,
    /// Spliced: bytes in the pipe. Record path: unprocessed input bytes (in the memfd).
    pub held_in: u32,
    /// Record path: output bytes not yet sent (in the memfd, after the input).
    pub held_out: u32,
    /// Record path: application bytes within `held_out`.
    pub out_plain: u64,
    /// Record path: bytes of a handshake message that continue in the next record.
    pub hs_skip: u32,
    /// The same for a kTLS source, whose non-data records are read apart.
    pub ktls_hs_skip: u32,
    /// Application bytes delivered so far.
    pub bytes: u64,
}

const DIR_STATE_LEN: usize = 38;

impl DirState {
    fn encode(&self) -> [u8; DIR_STATE_LEN] {
        let mut b = [0u8; DIR_STATE_LEN];
        b[0] = self.path as u8;
        b[1] = u8::from(self.eof)
            | u8::from(self.notified) << 1
            | u8::from(self.notify_sent) << 2
            | u8::from(self.done) << 3;
        b[2..6].copy_from_slice(&self.held_in.to_be_bytes());
        b[6..10].copy_from_slice(&self.held_out.to_be_bytes());
        b[10..18].copy_from_slice(&self.out_plain.to_be_bytes());
        b[18..22].copy_from_slice(&self.hs_skip.to_be_bytes());
        b[22..26].copy_from_slice(&self.ktls_hs_skip.to_be_bytes());
        b[26..34].copy_from_slice(&self.bytes.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Result<Self, HandoffError> {
        let bad = || HandoffError::Malformed("direction state");
        let b: &[u8; DIR_STATE_LEN] = b.try_into().map_err(|_| bad())?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at =
            |i: usize| u64::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let path = match b[0] {
            0 => DirPath::Splice,
            1 => DirPath::Record,
            _ => return Err(bad()),
        };
        if b[1] > 0x0f || (path == DirPath::Splice && u32_at(6) != 0) {
            return Err(bad());
        }
        Ok(DirState {
            path,
            eof: b[1] & 1 != 0,
            notified: b[1] & 2 != 0,
            notify_sent: b[1] & 4 != 0,
            done: b[1] & 8 != 0,
            held_in: u32_at(2),
            held_out: u32_at(6),
            out_plain: u64_at(10),
            hs_skip: u32_at(18),
            ktls_hs_skip: u32_at(22),
            bytes: u64_at(26),
        })
    }
}

/// Where a resumed session's BPF counts start: the adjustments made when it was first registered
/// (see the data plane's `counters` module); its map entries stay as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterBaseline {
    /// `[client, upstream]` socket cookies.
    pub cookies: [u64; 2],
    pub queued_rx: [u64; 2],
    pub rx_at_registration: [u64; 2],
    pub unsent_tx: [u64; 2],
}

/// A live session passed to a successor data plane, with its relay state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Metadata and the legs' keys, with the sequence numbers they have reached.
    pub handoff: Handoff,
    /// `[client, upstream]`: bit 0 the kernel opens the leg's records (TLS_RX), bit 1 it seals
    /// them (TLS_TX); the successor must not install them again.
    pub kernel_tls: [u8; 2],
    /// Since the first data plane took the session.
    pub age_ms: u64,
    /// Since bytes last moved.
    pub idle_ms: u64,
    /// `[client, upstream]` × `[rx, tx]`, the relay's own per-leg counts.
    pub wire: [[u64; 2]; 2],
    pub first_close: Option<EndReason>,
    /// `[client → upstream, upstream → client]`.
    pub dirs: [DirState; 2],
    pub baseline: Option<CounterBaseline>,
}

impl Resume {
    /// Descriptors the frame carries: both legs, a pipe per spliced direction, and the memfd
    /// when a record-path direction holds bytes.
    pub fn fd_count(&self) -> usize {
        2 + self.dirs.iter().filter(|d| d.path == DirPath::Splice).count() * 2 + usize::from(self.held_bytes() > 0)
    }

    /// Bytes the memfd holds.
    pub fn held_bytes(&self) -> u64 {
        self.dirs
            .iter()
            .filter(|d| d.path == DirPath::Record)
            .map(|d| u64::from(d.held_in) + u64::from(d.held_out))
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame each way: who is talking, and its process id for logs.
    Hello {
        role: Role,
        pid: u32,
    },
    Handoff(Box<Handoff>),
    /// The data plane took the session (or refused it, with the error).
    HandoffAck {
        session_id: String,
        error: Option<String>,
    },
    /// Control asks a worker to end a session (lock, expiry, admin kill).
    EndSession {
        session_id: String,
        reason: EndReason,
    },
    SessionEnded(SessionEnded),
    /// Control asks which sessions a worker holds (after control restarts).
    ListSessions,
    /// The answer to `ListSessions`, or a part of it when `more` is set (tag 2).
    Sessions {
        session_ids: Vec<String>,
        more: bool,
    },
    /// Control or an admin tool asks for every live session's counters so far.
    StatsRequest,
    /// The answer to `StatsRequest`: one entry per live session (or a part of them when `more`
    /// is set, tag 2).
    Stats {
        sessions: Vec<SessionStats>,
        more: bool,
    },
    /// A live session passed to a successor data plane (answered by `HandoffAck`).
    Resume(Box<Resume>),
    /// Every session and queued report has been passed; the sender exits.
    TakeoverDone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The control daemon: receives every session's end report.
    Control = 1,
    Dataplane = 2,
    /// An admin tool (`control sessions kill`): may end and list sessions, receives no reports.
    Admin = 3,
    /// A data plane taking over the running one's sessions (`dataplane --take-over`).
    Successor = 4,
}

#[repr(u16)]
#[derive(Debug, Clone, Copy)]
enum MessageType {
    Hello = 1,
    Handoff = 2,
    HandoffAck = 3,
    EndSession = 4,
    SessionEnded = 5,
    ListSessions = 6,
    Sessions = 7,
    StatsRequest = 8,
    Stats = 9,
    Resume = 10,
    TakeoverDone = 11,
}

struct Writer(Vec<u8>);

impl Writer {
    fn field(&mut self, tag: u16, bytes: &[u8]) {
        self.0.extend_from_slice(&tag.to_be_bytes());
        self.0.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        self.0.extend_from_slice(bytes);
    }
    fn str(&mut self, tag: u16, s: &str) {
        self.field(tag, s.as_bytes());
    }
    fn u64(&mut self, tag: u16, v: u64) {
        self.field(tag, &v.to_be_bytes());
    }
    /// Tags 6 (source), 16 (client leg) and 32 (upstream leg), shared by `SessionEnded` and each
    /// `Stats` entry.
    fn counters(&mut self, c: &Option<SessionCounters>) {
        if let Some(c) = c {
            self.field(6, &[c.source as u8]);
            self.field(16, &c.client.encode());
            self.field(32, &c.upstream.encode());
        }
    }
    fn handoff(&mut self, h: &Handoff) {
        self.str(1, &h.session_id);
        self.str(2, &h.user);
        self.str(3, &h.db_service);
        self.str(4, &h.db_user);
        self.str(5, &h.db_name);
        self.u64(6, h.not_after as u64);
        self.u64(7, h.idle_timeout_ms);
        self.leg(16, &h.client);
        self.leg(32, &h.upstream);
    }
    fn leg(&mut self, base: u16, leg: &LegCrypto) {
        match leg {
            LegCrypto::Plain => self.field(base, &[0]),
            LegCrypto::Tls { version, cipher_suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq } => {
                let mut head = vec![1];
                head.extend_from_slice(&version.to_be_bytes());
                head.extend_from_slice(&cipher_suite.to_be_bytes());
                self.field(base, &head);
                self.field(base + 1, tx_key);
                self.field(base + 2, tx_iv);
                self.u64(base + 3, *tx_seq);
                self.field(base + 4, rx_key);
                self.field(base + 5, rx_iv);
                self.u64(base + 6, *rx_seq);
            }
        }
    }
}

/// Fields of one payload, by tag (the last occurrence wins).
struct Fields<'a>(Vec<(u16, &'a [u8])>);

impl<'a> Fields<'a> {
    fn parse(mut p: &'a [u8]) -> Result<Self, HandoffError> {
        let mut out = Vec::new();
        while !p.is_empty() {
            if p.len() < 6 {
                return Err(HandoffError::Truncated);
            }
            let tag = u16::from_be_bytes([p[0], p[1]]);
            let len = u32::from_be_bytes([p[2], p[3], p[4], p[5]]) as usize;
            let rest = &p[6..];
            if rest.len() < len {
                return Err(HandoffError::Truncated);
            }
            out.push((tag, &rest[..len]));
            p = &rest[len..];
        }
        Ok(Fields(out))
    }
    fn get(&self, tag: u16) -> Option<&'a [u8]> {
        self.0.iter().rev().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }
    fn bytes(&self, tag: u16, name: &'static str) -> Result<&'a [u8], HandoffError> {
        self.get(tag).ok_or(HandoffError::Missing(name))
    }
    fn str(&self, tag: u16, name: &'static str) -> Result<String, HandoffError> {
        std::str::from_utf8(self.bytes(tag, name)?).map(str::to_owned).map_err(|_| HandoffError::Malformed(name))
    }
    fn u64(&self, tag: u16, name: &'static str) -> Result<u64, HandoffError> {
        let b: [u8; 8] = self.bytes(tag, name)?.try_into().map_err(|_| HandoffError::Malformed(name))?;
        Ok(u64::from_be_bytes(b))
    }
    fn counters(&self) -> Result<Option<SessionCounters>, HandoffError> {
        let Some(source) = self.get(6) else { return Ok(None) };
        let source = match source {
            [1] => CounterSource::Bpf,
            [2] => CounterSource::Userspace,
            _ => return Err(HandoffError::Malformed("counter source")),
        };
        Ok(Some(SessionCounters {
            source,
            client: LegCounters::decode(self.bytes(16, "client counters")?)?,
            upstream: LegCounters::decode(self.bytes(32, "upstream counters")?)?,
        }))
    }
    fn handoff(&self) -> Result<Handoff, HandoffError> {
        Ok(Handoff {
            session_id: self.str(1, "session_id")?,
            user: self.str(2, "user")?,
            db_service: self.str(3, "db_service")?,
            db_user: self.str(4, "db_user")?,
            db_name: self.str(5, "db_name")?,
            not_after: self.u64(6, "not_after")? as i64,
            idle_timeout_ms: self.u64(7, "idle_timeout_ms")?,
            client: self.leg(16, "client leg")?,
            upstream: self.leg(32, "upstream leg")?,
        })
    }
    /// `n` big-endian u64s filling field `tag` exactly.
    fn u64s<const N: usize>(&self, tag: u16, name: &'static str) -> Result<[u64; N], HandoffError> {
        let b = self.bytes(tag, name)?;
        if b.len() != N * 8 {
            return Err(HandoffError::Malformed(name));
        }
        let mut out = [0u64; N];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
            *o = u64::from_be_bytes(c.try_into().map_err(|_| HandoffError::Malformed(name))?);
        }
        Ok(out)
    }
    fn leg(&self, base: u16, name: &'static str) -> Result<LegCrypto, HandoffError> {
        let head = self.bytes(base, name)?;
        match head {
            [0] => Ok(LegCrypto::Plain),
            [1, v0, v1, c0, c1] => Ok(LegCrypto::Tls {
                version: u16::from_be_bytes([*v0, *v1]),
                cipher_suite: u16::from_be_bytes([*c0, *c1]),
                tx_key: self.bytes(base + 1, name)?.to_vec(),
                tx_iv: self.bytes(base + 2, name)?.to_vec(),
                tx_seq: self.u64(base + 3, name)?,
                rx_key: self.bytes(base + 4, name)?.to_vec(),
                rx_iv: self.bytes(base + 5, name)?.to_vec(),
                rx_seq: self.u64(base + 6, name)?,
            }),
            _ => Err(HandoffError::Malformed(name)),
        }
    }
}

/// Encodes one frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    let ty = match msg {
        Message::Hello { role, pid } => {
            w.field(1, &[*role as u8]);
            w.field(2, &pid.to_be_bytes());
            MessageType::Hello
        }
        Message::Handoff(h) => {
            w.handoff(h);
            MessageType::Handoff
        }
        Message::Resume(r) => {
            w.handoff(&r.handoff);
            w.field(64, &r.kernel_tls);
            w.u64(65, r.age_ms);
            w.u64(66, r.idle_ms);
            let wire: Vec<u8> = r.wire.iter().flatten().flat_map(|v| v.to_be_bytes()).collect();
            w.field(67, &wire);
            if let Some(reason) = r.first_close {
                w.field(68, &[reason as u8]);
            }
            if let Some(b) = &r.baseline {
                let words = [b.cookies, b.queued_rx, b.rx_at_registration, b.unsent_tx];
                let bytes: Vec<u8> = words.iter().flatten().flat_map(|v| v.to_be_bytes()).collect();
                w.field(69, &bytes);
            }
            w.field(80, &r.dirs[0].encode());
            w.field(81, &r.dirs[1].encode());
            MessageType::Resume
        }
        Message::TakeoverDone => MessageType::TakeoverDone,
        Message::HandoffAck { session_id, error } => {
            w.str(1, session_id);
            if let Some(e) = error {
                w.str(2, e);
            }
            MessageType::HandoffAck
        }
        Message::EndSession { session_id, reason } => {
            w.str(1, session_id);
            w.field(2, &[*reason as u8]);
            MessageType::EndSession
        }
        Message::SessionEnded(e) => {
            w.str(1, &e.session_id);
            w.u64(2, e.bytes_client_to_upstream);
            w.u64(3, e.bytes_upstream_to_client);
            w.u64(4, e.duration_ms);
            w.field(5, &[e.reason as u8]);
            w.counters(&e.counters);
            if let Some((c, u)) = e.ktls {
                w.field(7, &[u8::from(c) | (u8::from(u) << 1)]);
            }
            MessageType::SessionEnded
        }
        Message::ListSessions => MessageType::ListSessions,
        Message::Sessions { session_ids, more } => {
            for id in session_ids {
                w.str(1, id);
            }
            if *more {
                w.field(2, &[]);
            }
            MessageType::Sessions
        }
        Message::StatsRequest => MessageType::StatsRequest,
        Message::Stats { sessions, more } => {
            for st in sessions {
                w.field(1, &stats_entry(st));
            }
            if *more {
                w.field(2, &[]);
            }
            MessageType::Stats
        }
    };
    let mut out = Vec::with_capacity(HEADER_LEN + w.0.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(ty as u16).to_be_bytes());
    out.extend_from_slice(&(w.0.len() as u32).to_be_bytes());
    out.extend_from_slice(&w.0);
    out
}

/// One `Stats` entry's nested field sequence (the value of a tag-1 field).
fn stats_entry(st: &SessionStats) -> Vec<u8> {
    let mut e = Writer(Vec::new());
    e.str(1, &st.session_id);
    e.u64(2, st.bytes_client_to_upstream);
    e.u64(3, st.bytes_upstream_to_client);
    e.u64(4, st.duration_ms);
    e.counters(&st.counters);
    e.0
}

/// Bytes a field holding `len` bytes takes in a payload.
const fn field_len(len: usize) -> usize {
    6 + len
}

/// A reply split for the link: frames that each fit MAX_PAYLOAD, and the ids of entries too
/// large for any frame (left out; a session id of tens of KiB is not one control makes).
#[derive(Debug)]
pub struct SplitReply {
    pub frames: Vec<Message>,
    pub left_out: Vec<String>,
}

/// Splits a `Sessions` or `Stats` reply into frames of at most MAX_PAYLOAD bytes each, every one
/// but the last marked `more`; entries keep their order. Any other message comes back as is.
pub fn split_reply(msg: Message) -> SplitReply {
    // Room for the entries once the "more follows" marker is in.
    const ROOM: usize = MAX_PAYLOAD - field_len(0);
    fn pack<T>(
        items: Vec<T>,
        size: impl Fn(&T) -> usize,
        id: impl Fn(&T) -> &str,
        frame: impl Fn(Vec<T>, bool) -> Message,
    ) -> SplitReply {
        let mut parts: Vec<Vec<T>> = vec![Vec::new()];
        let mut used = 0;
        let mut left_out = Vec::new();
        for item in items {
            let n = size(&item);
            if n > ROOM {
                left_out.push(id(&item).to_owned());
                continue;
            }
            if used + n > ROOM {
                parts.push(Vec::new());
                used = 0;
            }
            used += n;
            if let Some(last) = parts.last_mut() {
                last.push(item);
            }
        }
        let count = parts.len();
        let frames = parts.into_iter().enumerate().map(|(i, p)| frame(p, i + 1 < count)).collect();
        SplitReply { frames, left_out }
    }
    match msg {
        Message::Sessions { session_ids, .. } => pack(
            session_ids,
            |id| field_len(id.len()),
            |id| id,
            |session_ids, more| Message::Sessions { session_ids, more },
        ),
        Message::Stats { sessions, .. } => pack(
            sessions,
            |st| field_len(stats_entry(st).len()),
            |st| &st.session_id,
            |sessions, more| Message::Stats { sessions, more },
        ),
        other => SplitReply { frames: vec![other], left_out: Vec::new() },
    }
}

/// Entries a reassembled reply may gather; a peer sending parts without end is cut off here.
pub const MAX_REPLY_ENTRIES: usize = 1 << 20;

/// The receiving half of [`split_reply`]: gathers the parts of `Sessions` and `Stats` replies.
#[derive(Debug, Default)]
pub struct Reassembly {
    sessions: Vec<String>,
    stats: Vec<SessionStats>,
}

impl Reassembly {
    /// Takes one received message: a part is kept and `None` comes back; the final part comes
    /// back with every earlier part's entries in front; any other message passes through.
    pub fn push(&mut self, msg: Message) -> Result<Option<Message>, HandoffError> {
        match msg {
            Message::Sessions { session_ids, more } => {
                self.sessions.extend(session_ids);
                if self.sessions.len() > MAX_REPLY_ENTRIES {
                    self.sessions = Vec::new();
                    return Err(HandoffError::TooManyEntries);
                }
                Ok((!more).then(|| Message::Sessions { session_ids: std::mem::take(&mut self.sessions), more: false }))
            }
            Message::Stats { sessions, more } => {
                self.stats.extend(sessions);
                if self.stats.len() > MAX_REPLY_ENTRIES {
                    self.stats = Vec::new();
                    return Err(HandoffError::TooManyEntries);
                }
                Ok((!more).then(|| Message::Stats { sessions: std::mem::take(&mut self.stats), more: false }))
            }
            other => Ok(Some(other)),
        }
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, HandoffError> {
    if buf.len() < HEADER_LEN {
        // Reject a wrong magic as early as it is visible, so garbage fails fast.
        if !MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            return Err(HandoffError::BadMagic);
        }
        return Ok(None);
    }
    if &buf[..4] != MAGIC {
        return Err(HandoffError::BadMagic);
    }
    let version = u16::from_be_bytes([buf[4], buf[5]]);
    if version != VERSION {
        return Err(HandoffError::Version(version));
    }
    let ty = u16::from_be_bytes([buf[6], buf[7]]);
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(HandoffError::TooLong(len));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let f = Fields::parse(&buf[HEADER_LEN..HEADER_LEN + len])?;
    let reason = |tag| -> Result<EndReason, HandoffError> {
        match f.bytes(tag, "reason")? {
            [r] => EndReason::from_u8(*r),
            _ => Err(HandoffError::Malformed("reason")),
        }
    };
    let msg = match ty {
        1 => {
            let role = match f.bytes(1, "role")? {
                [1] => Role::Control,
                [2] => Role::Dataplane,
                [3] => Role::Admin,
                [4] => Role::Successor,
                _ => return Err(HandoffError::Malformed("role")),
            };
            let pid: [u8; 4] = f.bytes(2, "pid")?.try_into().map_err(|_| HandoffError::Malformed("pid"))?;
            Message::Hello { role, pid: u32::from_be_bytes(pid) }
        }
        2 => Message::Handoff(Box::new(f.handoff()?)),
        3 => Message::HandoffAck {
            session_id: f.str(1, "session_id")?,
            error: f.get(2).map(|_| f.str(2, "error")).transpose()?,
        },
        4 => Message::EndSession { session_id: f.str(1, "session_id")?, reason: reason(2)? },
        5 => Message::SessionEnded(SessionEnded {
            session_id: f.str(1, "session_id")?,
            bytes_client_to_upstream: f.u64(2, "bytes_client_to_upstream")?,
            bytes_upstream_to_client: f.u64(3, "bytes_upstream_to_client")?,
            duration_ms: f.u64(4, "duration_ms")?,
            reason: reason(5)?,
            counters: f.counters()?,
            ktls: match f.get(7) {
                None => None,
                Some([b]) if *b < 4 => Some((b & 1 != 0, b & 2 != 0)),
                Some(_) => return Err(HandoffError::Malformed("ktls")),
            },
        }),
        6 => Message::ListSessions,
        7 => Message::Sessions {
            session_ids: f
                .0
                .iter()
                .filter(|(t, _)| *t == 1)
                .map(|(_, v)| {
                    std::str::from_utf8(v).map(str::to_owned).map_err(|_| HandoffError::Malformed("session_id"))
                })
                .collect::<Result<_, _>>()?,
            more: f.get(2).is_some(),
        },
        8 => Message::StatsRequest,
        9 => Message::Stats {
            sessions: f
                .0
                .iter()
                .filter(|(t, _)| *t == 1)
                .map(|(_, v)| {
                    let e = Fields::parse(v)?;
                    Ok(SessionStats {
                        session_id: e.str(1, "session_id")?,
                        bytes_client_to_upstream: e.u64(2, "bytes_client_to_upstream")?,
                        bytes_upstream_to_client: e.u64(3, "bytes_upstream_to_client")?,
                        duration_ms: e.u64(4, "duration_ms")?,
                        counters: e.counters()?,
                    })
                })
                .collect::<Result<_, HandoffError>>()?,
            more: f.get(2).is_some(),
        },
        10 => {
            let kernel_tls: [u8; 2] =
                f.bytes(64, "kernel_tls")?.try_into().map_err(|_| HandoffError::Malformed("kernel_tls"))?;
            if kernel_tls.iter().any(|k| *k > 3) {
                return Err(HandoffError::Malformed("kernel_tls"));
            }
            let w = f.u64s::<4>(67, "wire")?;
            let baseline = match f.get(69) {
                None => None,
                Some(_) => {
                    let v = f.u64s::<8>(69, "counter baseline")?;
                    Some(CounterBaseline {
                        cookies: [v[0], v[1]],
                        queued_rx: [v[2], v[3]],
                        rx_at_registration: [v[4], v[5]],
                        unsent_tx: [v[6], v[7]],
                    })
                }
            };
            Message::Resume(Box::new(Resume {
                handoff: f.handoff()?,
                kernel_tls,
                age_ms: f.u64(65, "age_ms")?,
                idle_ms: f.u64(66, "idle_ms")?,
                wire: [[w[0], w[1]], [w[2], w[3]]],
                first_close: f.get(68).map(|_| reason(68)).transpose()?,
                dirs: [DirState::decode(f.bytes(80, "direction")?)?, DirState::decode(f.bytes(81, "direction")?)?],
                baseline,
            }))
        }
        11 => Message::TakeoverDone,
        other => return Err(HandoffError::UnknownType(other)),
    };
    Ok(Some((msg, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Handoff {
        Handoff {
            session_id: "2d757176-289d-2a04-d778-31ee77127561".into(),
            user: "alice".into(),
            db_service: "demo".into(),
            db_user: "alice".into(),
            db_name: "demo".into(),
            not_after: 1_800_000_000,
            idle_timeout_ms: 30_000,
            client: LegCrypto::Tls {
                version: 0x0304,
                cipher_suite: 0x1301,
                tx_key: vec![1; 16],
                tx_iv: vec![2; 12],
                tx_seq: 3,
                rx_key: vec![4; 16],
                rx_iv: vec![5; 12],
                rx_seq: 1,
            },
            upstream: LegCrypto::Plain,
        }
    }

    /// One of each message (two of some), with every optional field both ways.
    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello { role: Role::Control, pid: 42 },
            Message::Handoff(Box::new(sample())),
            Message::HandoffAck { session_id: "s".into(), error: None },
            Message::HandoffAck { session_id: "s".into(), error: Some("no".into()) },
            Message::EndSession { session_id: "s".into(), reason: EndReason::AdminKill },
            Message::SessionEnded(SessionEnded {
                session_id: "s".into(),
                bytes_client_to_upstream: 1,
                bytes_upstream_to_client: 2,
                duration_ms: 3,
                reason: EndReason::IdleTimeout,
                counters: None,
                ktls: None,
            }),
            Message::SessionEnded(SessionEnded {
                session_id: "s".into(),
                bytes_client_to_upstream: 1,
                bytes_upstream_to_client: 2,
                duration_ms: 3,
                reason: EndReason::ClientClosed,
                counters: Some(counters()),
                ktls: Some((true, false)),
            }),
            Message::ListSessions,
            Message::Sessions { session_ids: vec!["a".into(), "b".into()], more: false },
            Message::Sessions { session_ids: vec!["c".into()], more: true },
            Message::StatsRequest,
            Message::Stats { sessions: vec![], more: false },
            Message::Stats { sessions: vec![], more: true },
            Message::Hello { role: Role::Successor, pid: 7 },
            Message::Resume(Box::new(resume())),
            Message::Resume(Box::new(Resume { first_close: None, baseline: None, ..resume() })),
            Message::TakeoverDone,
            Message::Stats {
                sessions: vec![
                    SessionStats {
                        session_id: "a".into(),
                        bytes_client_to_upstream: 10,
                        bytes_upstream_to_client: 20,
                        duration_ms: 30,
                        counters: Some(counters()),
                    },
                    SessionStats {
                        session_id: "b".into(),
                        bytes_client_to_upstream: 0,
                        bytes_upstream_to_client: u64::MAX,
                        duration_ms: 1,
                        counters: None,
                    },
                ],
                more: false,
            },
        ]
    }

    #[test]
    fn roundtrip_every_message() {
        let msgs = every_message();
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode(m));
        }
        let mut rest = &stream[..];
        for m in &msgs {
            let (got, n) = decode(rest).unwrap().unwrap();
            assert_eq!(&got, m);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
    }

    fn resume() -> Resume {
        let dir = DirState {
            path: DirPath::Record,
            eof: true,
            notified: false,
            notify_sent: true,
            done: false,
            held_in: 17,
            held_out: 40_000,
            out_plain: 39_000,
            hs_skip: 3,
            ktls_hs_skip: 0,
            bytes: u64::MAX,
        };
        Resume {
            handoff: sample(),
            kernel_tls: [0, 3],
            age_ms: 12_345,
            idle_ms: 6,
            wire: [[1, 2], [3, u64::MAX]],
            first_close: Some(EndReason::ClientClosed),
            dirs: [dir, DirState { path: DirPath::Splice, held_out: 0, eof: false, done: true, ..dir }],
            baseline: Some(CounterBaseline {
                cookies: [10, 11],
                queued_rx: [0, 5],
                rx_at_registration: [100, 200],
                unsent_tx: [7, 0],
            }),
        }
    }

    #[test]
    fn resume_counts_its_descriptors_and_checks_directions() {
        let r = resume();
        // Both legs, the spliced direction's pipe, the memfd for the record direction's bytes.
        assert_eq!(r.fd_count(), 5);
        assert_eq!(r.held_bytes(), 40_017);
        let idle = DirState { held_in: 0, held_out: 0, ..r.dirs[0] };
        assert_eq!(Resume { dirs: [idle, r.dirs[1]], ..r.clone() }.fd_count(), 4);
        // A spliced direction has no output buffer.
        let mut f = encode(&Message::Resume(Box::new(r.clone())));
        let bad = DirState { path: DirPath::Splice, ..r.dirs[0] }.encode();
        let good = r.dirs[0].encode();
        let at = f.windows(good.len()).position(|w| w == good).unwrap();
        f[at..at + good.len()].copy_from_slice(&bad);
        assert_eq!(decode(&f), Err(HandoffError::Malformed("direction state")));
    }

    fn counters() -> SessionCounters {
        SessionCounters {
            source: CounterSource::Bpf,
            client: LegCounters {
                rx_bytes: 1,
                tx_bytes: 2,
                rx_packets: 3,
                tx_packets: 4,
                srtt_us: 5,
                total_retrans: 6,
            },
            upstream: LegCounters { rx_bytes: u64::MAX, srtt_us: u32::MAX, ..Default::default() },
        }
    }

    /// A receiver that predates the counters decodes a `SessionEnded` carrying them (it skips
    /// the tags); a short leg field is refused rather than read past.
    #[test]
    fn counters_are_optional_and_checked() {
        let full = SessionEnded {
            session_id: "s".into(),
            bytes_client_to_upstream: 1,
            bytes_upstream_to_client: 2,
            duration_ms: 3,
            reason: EndReason::ClientClosed,
            counters: Some(counters()),
            ktls: Some((false, true)),
        };
        let f = encode(&Message::SessionEnded(full.clone()));
        let bare = encode(&Message::SessionEnded(SessionEnded { counters: None, ktls: None, ..full }));
        assert!(f.len() > bare.len() + 2 * LEG_COUNTERS_LEN);
        let mut short = encode(&Message::ListSessions);
        short.truncate(HEADER_LEN);
        let payload = [
            &[0, 1, 0, 0, 0, 1, b's'][..],
            &[0, 2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 4, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 5, 0, 0, 0, 1, 1],
            &[0, 6, 0, 0, 0, 1, 1],
            &[0, 16, 0, 0, 0, 2, 0, 0],
            &[0, 32, 0, 0, 0, 2, 0, 0],
        ]
        .concat();
        short[6..8].copy_from_slice(&5u16.to_be_bytes());
        short[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        short.extend_from_slice(&payload);
        assert_eq!(decode(&short), Err(HandoffError::Malformed("leg counters")));
    }

    #[test]
    fn debug_output_leaves_keys_out() {
        let text = format!("{:?}", Message::Resume(Box::new(resume())));
        assert!(text.contains("tx_seq: 3") && text.contains("0x1301"), "{text}");
        // The sample's keys and IVs are runs of 1, 2, 4 and 5.
        for key in ["[1, 1", "[2, 2", "[4, 4", "[5, 5"] {
            assert!(!text.contains(key), "{text}");
        }
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let f = encode(&Message::Handoff(Box::new(sample())));
        for cut in 0..f.len() {
            assert_eq!(decode(&f[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_garbage_versions_and_lengths() {
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(HandoffError::BadMagic));
        assert_eq!(decode(b"X"), Err(HandoffError::BadMagic));
        let mut f = encode(&Message::ListSessions);
        f[5] = 9;
        assert_eq!(decode(&f), Err(HandoffError::Version(9)));
        let mut f = encode(&Message::ListSessions);
        f[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert_eq!(decode(&f), Err(HandoffError::TooLong(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn unknown_fields_are_skipped_missing_ones_are_errors() {
        let mut f = encode(&Message::HandoffAck { session_id: "s".into(), error: None });
        f.extend_from_slice(&[0, 99, 0, 0, 0, 1, 7]);
        let len = (f.len() - HEADER_LEN) as u32;
        f[8..12].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&f).unwrap().unwrap().0, Message::HandoffAck { session_id: "s".into(), error: None });
        let empty_ack = [&MAGIC[..], &[0, 1, 0, 3, 0, 0, 0, 0]].concat();
        assert_eq!(decode(&empty_ack), Err(HandoffError::Missing("session_id")));
    }

    /// Tags some message type reads (see `encode`), so edits hit real fields most of the time.
    const KNOWN_TAGS: &[u16] =
        &[1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 32, 33, 34, 35, 36, 37, 38, 64, 65, 66, 67, 68, 69, 80, 81];

    /// A payload's fields, as `encode` wrote them.
    fn split_fields(frame: &[u8]) -> Vec<(u16, Vec<u8>)> {
        Fields::parse(&frame[HEADER_LEN..]).unwrap().0.into_iter().map(|(t, v)| (t, v.to_vec())).collect()
    }

    /// A frame with a correct header (magic, version, `ty`, length) around `fields`.
    fn frame(ty: u16, fields: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        for (tag, v) in fields {
            w.field(*tag, v);
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(w.0.len() as u32).to_be_bytes());
        out.extend(w.0);
        out
    }

    fn field_tag() -> impl Strategy<Value = u16> {
        prop_oneof![9 => proptest::sample::select(KNOWN_TAGS), 1 => any::<u16>()]
    }

    /// Values shaped like the fields the decoder reads: strings, u64s, one-byte enums and flags,
    /// leg heads, counters, direction states, nested field sequences; and plain noise.
    fn field_value() -> impl Strategy<Value = Vec<u8>> {
        let bytes = |n| proptest::collection::vec(any::<u8>(), n);
        prop_oneof![
            bytes(0..24),
            "[a-z0-9-]{0,16}".prop_map(String::into_bytes),
            any::<u64>().prop_map(|v| v.to_be_bytes().to_vec()),
            (0u8..12).prop_map(|b| vec![b]),
            Just(vec![0]),
            (any::<u16>(), prop_oneof![Just(0x1301u16), Just(0xc02f), any::<u16>()]).prop_map(|(v, c)| [
                &[1][..],
                &v.to_be_bytes(),
                &c.to_be_bytes()
            ]
            .concat()),
            // One short, exact, one long: the length checks' edges.
            bytes(LEG_COUNTERS_LEN - 1..LEG_COUNTERS_LEN + 2),
            (0u8..3, 0u8..17, bytes(DIR_STATE_LEN - 3..DIR_STATE_LEN))
                .prop_map(|(p, f, rest)| [&[p, f][..], &rest].concat()),
            (0usize..9, any::<u64>()).prop_map(|(n, v)| v.to_be_bytes().repeat(n)),
            bytes(2..3),
            proptest::collection::vec((field_tag(), bytes(0..12)), 0..6).prop_map(|fs| {
                let mut w = Writer(Vec::new());
                for (t, v) in fs {
                    w.field(t, &v);
                }
                w.0
            }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Drop(prop::sample::Index),
        Replace(prop::sample::Index, Vec<u8>),
        Insert(prop::sample::Index, u16, Vec<u8>),
        Retag(prop::sample::Index, u16),
        /// Cut or extend a field's value by a few bytes: every length check's edges.
        Resize(prop::sample::Index, i8),
        Flip(prop::sample::Index, prop::sample::Index, u8),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Edit::Drop),
            (any::<prop::sample::Index>(), field_value()).prop_map(|(i, v)| Edit::Replace(i, v)),
            (any::<prop::sample::Index>(), field_tag(), field_value()).prop_map(|(i, t, v)| Edit::Insert(i, t, v)),
            (any::<prop::sample::Index>(), field_tag()).prop_map(|(i, t)| Edit::Retag(i, t)),
            (any::<prop::sample::Index>(), prop_oneof![3 => -1i8..=1, 1 => -9i8..=9])
                .prop_map(|(i, d)| Edit::Resize(i, d)),
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>())
                .prop_map(|(i, at, x)| Edit::Flip(i, at, x)),
        ]
    }

    /// A well-formed frame: either a real message with a few fields dropped, replaced, inserted
    /// or retagged (so the other required fields are there and the decoder reads deep into the
    /// payload), or a known message type over fields built from scratch.
    fn structured_frame() -> impl Strategy<Value = Vec<u8>> {
        let n = every_message().len();
        let edited = (0..n, proptest::collection::vec(edit(), 0..4)).prop_map(|(which, edits)| {
            let base = encode(&every_message()[which]);
            let ty = u16::from_be_bytes([base[6], base[7]]);
            let mut fields = split_fields(&base);
            for e in edits {
                let len = fields.len();
                match e {
                    Edit::Drop(i) if len > 0 => {
                        fields.remove(i.index(len));
                    }
                    Edit::Replace(i, v) if len > 0 => fields[i.index(len)].1 = v,
                    Edit::Retag(i, t) if len > 0 => fields[i.index(len)].0 = t,
                    Edit::Insert(i, t, v) => fields.insert(i.index(len + 1), (t, v)),
                    Edit::Resize(i, d) if len > 0 => {
                        let v = &mut fields[i.index(len)].1;
                        let n = v.len().saturating_add_signed(d.into());
                        v.resize(n, 0x5a);
                    }
                    Edit::Flip(i, at, x) if len > 0 && !fields[i.index(len)].1.is_empty() => {
                        let v = &mut fields[i.index(len)].1;
                        let at = at.index(v.len());
                        v[at] ^= x;
                    }
                    _ => {}
                }
            }
            frame(ty, &fields)
        });
        let scratch = (1u16..=11, proptest::collection::vec((field_tag(), field_value()), 0..16))
            .prop_map(|(ty, fields)| frame(ty, &fields));
        prop_oneof![3 => edited, 1 => scratch]
    }

    /// The structured frames reach every message type's field checks: some decode, and some are
    /// refused for a missing or malformed field rather than at the header.
    #[test]
    fn structured_frames_get_past_the_header() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = structured_frame();
        let mut decoded = std::collections::BTreeSet::new();
        let (mut missing, mut malformed) = (0, 0);
        for _ in 0..4000 {
            let f = strategy.new_tree(&mut runner).unwrap().current();
            match decode(&f) {
                Ok(Some((_, n))) => {
                    assert_eq!(n, f.len());
                    decoded.insert(u16::from_be_bytes([f[6], f[7]]));
                }
                Err(HandoffError::Missing(_)) => missing += 1,
                Err(HandoffError::Malformed(_)) => malformed += 1,
                // A `Stats` entry holding something other than a field sequence.
                Err(HandoffError::Truncated) => {}
                other => panic!("{other:?} for a frame with a correct header"),
            }
        }
        assert_eq!(decoded, (1..=11).collect(), "message types that decoded");
        assert!(missing > 100 && malformed > 100, "missing {missing}, malformed {malformed}");
    }

    proptest! {
        // Cheap cases (a few microseconds each), and many shapes: more than the default 256.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Frames with a correct header and valid field framing: the decoder never refuses them at
        /// the header, and whatever it decodes re-encodes to a frame that decodes to the same
        /// message (unknown tags and trailing bytes of longer-than-needed fields are dropped).
        #[test]
        fn structured_frames_decode_or_fail_in_the_payload(f in structured_frame()) {
            match decode(&f) {
                Ok(Some((m, n))) => {
                    prop_assert_eq!(n, f.len());
                    let again = encode(&m);
                    prop_assert!(again.len() <= f.len(), "re-encoded {} > {}", again.len(), f.len());
                    prop_assert_eq!(decode(&again), Ok(Some((m, again.len()))));
                }
                // Truncated: a `Stats` entry whose nested field sequence is cut short.
                Err(HandoffError::Missing(_) | HandoffError::Malformed(_) | HandoffError::Truncated) => {}
                other => prop_assert!(false, "{:?} for a frame with a correct header", other),
            }
        }
    }

    /// The frames of a reply as they cross the link, decoded and gathered again.
    fn through_the_wire(frames: &[Message]) -> (Vec<usize>, Option<Message>) {
        let mut sizes = Vec::new();
        let mut r = Reassembly::default();
        let mut whole = None;
        for (i, m) in frames.iter().enumerate() {
            let f = encode(m);
            sizes.push(f.len() - HEADER_LEN);
            let (got, n) = decode(&f).unwrap().unwrap();
            assert_eq!(n, f.len());
            assert_eq!(&got, m);
            let out = r.push(got).unwrap();
            assert_eq!(out.is_some(), i + 1 == frames.len(), "only the last part completes the reply");
            whole = whole.or(out);
        }
        (sizes, whole)
    }

    fn stats_of(id: String, i: u64) -> SessionStats {
        SessionStats {
            session_id: id,
            bytes_client_to_upstream: i,
            bytes_upstream_to_client: i * 2,
            duration_ms: i * 3,
            counters: (!i.is_multiple_of(3)).then(counters),
        }
    }

    /// A reply that fits one frame is sent exactly as before chunking existed.
    #[test]
    fn small_replies_are_one_unmarked_frame() {
        let m = Message::Sessions { session_ids: vec!["ab".into()], more: false };
        assert_eq!(encode(&m), [&b"SLDP"[..], &[0, 1, 0, 7, 0, 0, 0, 8, 0, 1, 0, 0, 0, 2, b'a', b'b']].concat());
        let split = split_reply(m.clone());
        assert_eq!(split.frames, vec![m]);
        let empty = split_reply(Message::Stats { sessions: vec![], more: true });
        assert_eq!(empty.frames, vec![Message::Stats { sessions: vec![], more: false }]);
        // Other messages pass through both halves untouched.
        assert_eq!(split_reply(Message::ListSessions).frames, vec![Message::ListSessions]);
        assert_eq!(Reassembly::default().push(Message::TakeoverDone), Ok(Some(Message::TakeoverDone)));
    }

    /// 400 sessions' stats (the issue's scale) no longer make one oversized frame.
    #[test]
    fn four_hundred_sessions_split_and_reassemble() {
        let sessions: Vec<SessionStats> = (0..400)
            .map(|i| SessionStats {
                counters: Some(counters()),
                ..stats_of(format!("{i:08x}-289d-2a04-d778-31ee77127561"), i)
            })
            .collect();
        assert!(encode(&Message::Stats { sessions: sessions.clone(), more: false }).len() > HEADER_LEN + MAX_PAYLOAD);
        let split = split_reply(Message::Stats { sessions: sessions.clone(), more: false });
        assert!(split.frames.len() >= 2 && split.left_out.is_empty());
        let (sizes, whole) = through_the_wire(&split.frames);
        assert!(sizes.iter().all(|s| *s <= MAX_PAYLOAD), "{sizes:?}");
        assert_eq!(whole, Some(Message::Stats { sessions, more: false }));
    }

    /// An entry no frame can hold is left out and named; the rest still goes.
    #[test]
    fn an_entry_too_large_for_any_frame_is_left_out() {
        let huge = "x".repeat(MAX_PAYLOAD);
        let split =
            split_reply(Message::Sessions { session_ids: vec!["a".into(), huge.clone(), "b".into()], more: false });
        assert_eq!(split.left_out, vec![huge.clone()]);
        assert_eq!(split.frames, vec![Message::Sessions { session_ids: vec!["a".into(), "b".into()], more: false }]);
        let split = split_reply(Message::Stats { sessions: vec![stats_of(huge.clone(), 1)], more: false });
        assert_eq!(split.left_out, vec![huge]);
        assert_eq!(split.frames, vec![Message::Stats { sessions: vec![], more: false }]);
    }

    #[test]
    fn endless_parts_are_cut_off() {
        let mut r = Reassembly::default();
        let part = Message::Sessions { session_ids: vec![String::new(); 1 << 16], more: true };
        let mut got = Ok(None);
        for _ in 0..=(MAX_REPLY_ENTRIES >> 16) {
            got = r.push(part.clone());
            if got.is_err() {
                break;
            }
        }
        assert_eq!(got, Err(HandoffError::TooManyEntries));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any number of sessions, ids of any length up to a few KiB: every frame fits, the
        /// entries come back exactly and in order.
        #[test]
        fn replies_of_any_size_reassemble_exactly(
            lens in proptest::collection::vec(0usize..4096, 0..2500),
            stats in any::<bool>(),
            fill in any::<u8>(),
        ) {
            let ids: Vec<String> = lens
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{i}-{}", char::from(b'a' + fill % 26).to_string().repeat(*n)))
                .collect();
            let msg = if stats {
                Message::Stats { sessions: ids.iter().cloned().zip(0..).map(|(id, i)| stats_of(id, i)).collect(), more: false }
            } else {
                Message::Sessions { session_ids: ids, more: false }
            };
            let split = split_reply(msg.clone());
            prop_assert!(split.left_out.is_empty());
            let (sizes, whole) = through_the_wire(&split.frames);
            prop_assert!(sizes.iter().all(|s| *s <= MAX_PAYLOAD), "{:?}", sizes);
            // No frame is wasted: each but the last could not have taken the next one's first entry.
            prop_assert!(sizes.iter().rev().skip(1).all(|s| *s + 6 + 4096 + 200 > MAX_PAYLOAD), "{:?}", sizes);
            prop_assert_eq!(whole, Some(msg));
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn counters_roundtrip(
            v in proptest::collection::vec(any::<u64>(), 8),
            w in proptest::collection::vec(any::<u32>(), 4),
            bpf in any::<bool>(),
            n in 0usize..4,
        ) {
            let leg = |o: usize| LegCounters {
                rx_bytes: v[o],
                tx_bytes: v[o + 1],
                rx_packets: v[o + 2],
                tx_packets: v[o + 3],
                srtt_us: w[o / 2],
                total_retrans: w[o / 2 + 1],
            };
            let c = SessionCounters {
                source: if bpf { CounterSource::Bpf } else { CounterSource::Userspace },
                client: leg(0),
                upstream: leg(4),
            };
            let sessions = (0..n)
                .map(|i| SessionStats {
                    session_id: format!("s{i}"),
                    bytes_client_to_upstream: v[i],
                    bytes_upstream_to_client: v[i + 1],
                    duration_ms: v[i + 2],
                    counters: (i % 2 == 0).then_some(c),
                })
                .collect();
            for m in [
                Message::Stats { sessions, more: n == 2 },
                Message::SessionEnded(SessionEnded {
                    session_id: "s".into(),
                    bytes_client_to_upstream: v[0],
                    bytes_upstream_to_client: v[1],
                    duration_ms: v[2],
                    reason: EndReason::UpstreamClosed,
                    counters: Some(c),
                    ktls: Some((v[0] % 2 == 0, v[1] % 2 == 0)),
                }),
            ] {
                let f = encode(&m);
                prop_assert_eq!(decode(&f), Ok(Some((m, f.len()))));
            }
        }

        #[test]
        fn decoder_survives_mutated_frames(
            which in 0usize..3,
            idx in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let st = SessionStats {
                session_id: "a".into(),
                bytes_client_to_upstream: 1,
                bytes_upstream_to_client: 2,
                duration_ms: 3,
                counters: Some(counters()),
            };
            let msg = match which {
                0 => Message::Handoff(Box::new(sample())),
                1 => Message::Stats { sessions: vec![st.clone(), st], more: false },
                _ => Message::Resume(Box::new(resume())),
            };
            let mut f = encode(&msg);
            let i = idx.index(f.len());
            f[i] = byte;
            if let Ok(Some((_, n))) = decode(&f) {
                prop_assert!(n <= f.len());
            }
        }
    }
}
