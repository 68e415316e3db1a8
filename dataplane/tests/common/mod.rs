//! Helpers shared by the relay integration tests: loopback socket pairs, a deterministic byte
//! pattern to verify relayed content, and rustls peers whose secrets are extracted after the
//! handshake and handed to the worker, the way control does it.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, ExtractedSecrets, ServerConfig, ServerConnection,
};
use sluice_dataplane::relay::{Report, Session, Worker};
use sluice_handoff::handoff::{DirPath, EndReason, LegCrypto};
pub use sluice_test_support::tcp_pair;

pub const MIB: u64 = 1024 * 1024;

/// Pseudo-random bytes with a period of 1 MiB + 7, so a dropped, duplicated or reordered chunk
/// (which all come in round sizes) shows up as a mismatch; different seeds per direction catch
/// bytes relayed the wrong way.
#[derive(Clone)]
pub struct Pattern(Arc<Vec<u8>>);

const PERIOD: usize = (1 << 20) + 7;

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v = Vec::with_capacity(PERIOD + 8);
        while v.len() < PERIOD {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        v.truncate(PERIOD);
        Pattern(Arc::new(v))
    }

    /// Up to `max` bytes of the stream starting at `off`.
    pub fn at(&self, off: u64, max: usize) -> &[u8] {
        let i = (off % PERIOD as u64) as usize;
        &self.0[i..(i + max).min(PERIOD)]
    }

    /// Whether `data` is the stream's content at `off`.
    pub fn matches(&self, mut off: u64, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let want = self.at(off, data.len());
            if &data[..want.len()] != want {
                return false;
            }
            off += want.len() as u64;
            data = &data[want.len()..];
        }
        true
    }
}

/// A stream socket the tests can split into a reader and a writer thread.
pub trait Duplex: Read + Write + Send + 'static + Sized {
    fn dup(&self) -> Self;
    fn shut_write(&self);
}

impl Duplex for TcpStream {
    fn dup(&self) -> Self {
        self.try_clone().unwrap()
    }
    fn shut_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Duplex for UnixStream {
    fn dup(&self) -> Self {
        self.try_clone().unwrap()
    }
    fn shut_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

pub fn send_pattern(w: &mut impl Write, p: &Pattern, total: u64) -> io::Result<()> {
    let mut off = 0;
    while off < total {
        let chunk = p.at(off, (total - off).min(256 * 1024) as usize);
        w.write_all(chunk)?;
        off += chunk.len() as u64;
    }
    Ok(())
}

/// Reads exactly `total` bytes and checks them against `p`.
pub fn recv_pattern(r: &mut impl Read, p: &Pattern, total: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < total {
        let want = (total - off).min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {off} of {total} bytes")));
        }
        if !p.matches(off, &buf[..n]) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("content mismatch at offset {off}")));
        }
        off += n as u64;
    }
    Ok(())
}

/// Reads until EOF; returns what came.
pub fn read_to_eof(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

/// Sends `send_total` bytes of `send` then half-closes, while reading `recv_total` bytes of
/// `recv` and then expecting EOF; the two halves run on two threads.
pub fn plain_exchange<S: Duplex>(
    s: S,
    send: Pattern,
    send_total: u64,
    recv: Pattern,
    recv_total: u64,
) -> io::Result<()> {
    let mut w = s.dup();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        send_pattern(&mut w, &send, send_total)?;
        w.shut_write();
        Ok(())
    });
    let mut r = s;
    recv_pattern(&mut r, &recv, recv_total)?;
    let rest = read_to_eof(&mut r)?;
    if !rest.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} bytes past the end", rest.len())));
    }
    writer.join().unwrap()
}

/// A worker with the default options, and where its reports arrive.
pub fn worker() -> (Worker, mpsc::Receiver<Report>) {
    let (tx, rx) = mpsc::channel();
    (Worker::spawn(0, tx).unwrap(), rx)
}

pub fn session(
    id: &str,
    client: OwnedFd,
    client_crypto: LegCrypto,
    upstream: OwnedFd,
    upstream_crypto: LegCrypto,
) -> Session {
    Session { id: id.to_owned(), client, upstream, client_crypto, upstream_crypto, idle_timeout: None, not_after: None }
}

/// client side (test) ↔ [worker client leg … worker upstream leg] ↔ upstream side (test).
pub fn plain_session(id: &str) -> (TcpStream, TcpStream, Session) {
    let (client, client_leg) = tcp_pair();
    let (upstream_leg, upstream) = tcp_pair();
    let s = session(id, client_leg.into(), LegCrypto::Plain, upstream_leg.into(), LegCrypto::Plain);
    (client, upstream, s)
}

pub fn next_report(rx: &mpsc::Receiver<Report>, within: Duration) -> Report {
    rx.recv_timeout(within).unwrap_or_else(|e| panic!("no report within {within:?}: {e}"))
}

pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `s` reports EOF (or a reset) or `within` passes; returns when it happened.
pub fn wait_eof(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return None,
            Err(_) => return Some(start.elapsed()),
        }
    }
}

// ---- TLS ----

pub struct Pki {
    roots: Arc<rustls::RootCertStore>,
    ecdsa: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
    rsa: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
}

#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    Ecdsa,
    Rsa,
}

/// A throwaway 2048-bit RSA key for the ECDHE-RSA suites: ring signs with RSA but cannot generate
/// RSA keys, so rcgen gets this one.
const RSA_TEST_KEY: &str = include_str!("rsa_test_key.pem");

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "sluice dataplane test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |key: KeyPair| {
            let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
            (vec![cert.der().clone(), ca_cert.der().clone()], PrivatePkcs8KeyDer::from(key.serialize_der()))
        };
        let ecdsa = leaf(KeyPair::generate().unwrap());
        let rsa = leaf(KeyPair::from_pem(RSA_TEST_KEY).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        Pki { roots: Arc::new(roots), ecdsa, rsa }
    })
}

/// A ring provider that offers only `suite`, so the handshake must pick it.
fn provider(suite: u16) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| u16::from(s.suite()) == suite);
    assert_eq!(p.cipher_suites.len(), 1, "suite {suite:#06x} not in the ring provider");
    Arc::new(p)
}

fn versions(suite: u16) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    if suite >> 8 == 0x13 {
        TLS13
    } else {
        TLS12
    }
}

pub fn server_config(suite: u16, key: KeyKind) -> Arc<ServerConfig> {
    let (chain, k) = match key {
        KeyKind::Ecdsa => &pki().ecdsa,
        KeyKind::Rsa => &pki().rsa,
    };
    let mut c = ServerConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(versions(suite))
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain.clone(), PrivateKeyDer::Pkcs8(k.clone_key()))
        .unwrap();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

pub fn client_config(suite: u16) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(versions(suite))
        .unwrap()
        .with_root_certificates(pki().roots.clone())
        .with_no_client_auth();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

fn key_iv(s: ConnectionTrafficSecrets) -> (Vec<u8>, Vec<u8>) {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref().to_vec(), iv.as_ref().to_vec()),
        _ => panic!("unexpected traffic secret kind"),
    }
}

/// What control does after its handshake: take the secrets of *our* end of the leg.
pub fn leg_crypto(version: u16, suite: u16, s: ExtractedSecrets) -> LegCrypto {
    let (tx_seq, tx) = s.tx;
    let (rx_seq, rx) = s.rx;
    let (tx_key, tx_iv) = key_iv(tx);
    let (rx_key, rx_iv) = key_iv(rx);
    LegCrypto::Tls { version, cipher_suite: suite, tx_key, tx_iv, tx_seq, rx_key, rx_iv, rx_seq }
}

fn flush_tls(conn: &mut rustls::Connection, sock: &mut impl Write) {
    while conn.wants_write() {
        conn.write_tls(sock).unwrap();
    }
}

fn handshake(conn: &mut rustls::Connection, sock: &mut (impl Read + Write)) {
    while conn.is_handshaking() {
        conn.complete_io(sock).unwrap();
    }
    flush_tls(conn, sock);
}

fn negotiated(conn: &rustls::Connection) -> (u16, u16) {
    let v = u16::from(conn.protocol_version().unwrap());
    let s = u16::from(conn.negotiated_cipher_suite().unwrap().suite());
    (v, s)
}

/// Blocking `Read`/`Write` over a rustls connection of either side (`rustls::Stream` needs the
/// concrete connection type).
struct ConnIo<'a, S>(&'a mut rustls::Connection, &'a mut S);

impl<S: Read + Write> Read for ConnIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    while self.0.wants_write() {
                        self.0.write_tls(self.1)?;
                    }
                    // At EOF rustls' reader reports it (clean after close_notify, an error if not).
                    self.0.read_tls(self.1)?;
                    self.0.process_new_packets().map_err(io::Error::other)?;
                }
                r => return r,
            }
        }
    }
}

impl<S: Read + Write> Write for ConnIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.writer().write(buf)?;
        while self.0.wants_write() {
            self.0.write_tls(self.1)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        while self.0.wants_write() {
            self.0.write_tls(self.1)?;
        }
        Ok(())
    }
}

const GREETING: &[u8] = b"greeting before the handoff";

/// The test's end of a TLS leg: a rustls connection (client or server) over a blocking socket.
pub struct TlsPeer<S> {
    pub conn: rustls::Connection,
    pub sock: S,
}

pub trait Sock: Read + Write + AsFd + Send + 'static {}
impl Sock for TcpStream {}
impl Sock for UnixStream {}

/// A client leg: the test plays the database client (rustls client) against our end, a rustls
/// server whose secrets go to the worker. Our end writes a greeting first so its sequence numbers
/// are not zero at the handoff.
pub fn tls_client_leg<S: Sock>(pair: (S, S), suite: u16, key: KeyKind) -> (TlsPeer<S>, OwnedFd, LegCrypto)
where
    OwnedFd: From<S>,
{
    let (mut outer, mut ours) = pair;
    let cfg = server_config(suite, key);
    let ours_side = std::thread::spawn(move || {
        let mut conn = rustls::Connection::Server(ServerConnection::new(cfg).unwrap());
        handshake(&mut conn, &mut ours);
        conn.writer().write_all(GREETING).unwrap();
        flush_tls(&mut conn, &mut ours);
        let (v, s) = negotiated(&conn);
        let rustls::Connection::Server(server) = conn else { unreachable!() };
        let secrets = server.dangerous_extract_secrets().unwrap();
        (ours, leg_crypto(v, s, secrets))
    });
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::Connection::Client(ClientConnection::new(client_config(suite), name).unwrap());
    handshake(&mut conn, &mut outer);
    let mut greeting = vec![0u8; GREETING.len()];
    ConnIo(&mut conn, &mut outer).read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, GREETING);
    let (ours, crypto) = ours_side.join().unwrap();
    (TlsPeer { conn, sock: outer }, OwnedFd::from(ours), crypto)
}

/// An upstream leg: our end is the rustls client (as control dialing RDS Proxy), the test plays
/// the TLS server. We extract right after the handshake, so the TLS 1.3 server's
/// NewSessionTickets are still on the wire and reach the worker, which must drop them.
pub fn tls_upstream_leg<S: Sock>(pair: (S, S), suite: u16, key: KeyKind) -> (TlsPeer<S>, OwnedFd, LegCrypto)
where
    OwnedFd: From<S>,
{
    let (mut ours, mut outer) = pair;
    let cfg = server_config(suite, key);
    let upstream_side = std::thread::spawn(move || {
        let mut conn = rustls::Connection::Server(ServerConnection::new(cfg).unwrap());
        handshake(&mut conn, &mut outer);
        let mut greeting = vec![0u8; GREETING.len()];
        ConnIo(&mut conn, &mut outer).read_exact(&mut greeting).unwrap();
        assert_eq!(greeting, GREETING);
        TlsPeer { conn, sock: outer }
    });
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::Connection::Client(ClientConnection::new(client_config(suite), name).unwrap());
    handshake(&mut conn, &mut ours);
    conn.writer().write_all(GREETING).unwrap();
    flush_tls(&mut conn, &mut ours);
    let (v, s) = negotiated(&conn);
    let rustls::Connection::Client(client) = conn else { unreachable!() };
    let crypto = leg_crypto(v, s, client.dangerous_extract_secrets().unwrap());
    (upstream_side.join().unwrap(), OwnedFd::from(ours), crypto)
}

impl<S: Sock> TlsPeer<S> {
    pub fn write_all(&mut self, data: &[u8]) {
        ConnIo(&mut self.conn, &mut self.sock).write_all(data).unwrap();
        self.flush();
    }

    pub fn flush(&mut self) {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock).unwrap();
        }
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        ConnIo(&mut self.conn, &mut self.sock).read_exact(&mut v).unwrap();
        v
    }

    /// Writes `n` bytes of `p` (blocking while the peer does not read).
    pub fn send_pattern(&mut self, p: &Pattern, n: u64) {
        let mut off = 0;
        while off < n {
            let chunk = p.at(off, (n - off).min(64 * 1024) as usize).to_vec();
            self.write_all(&chunk);
            off += chunk.len() as u64;
        }
    }

    /// Reads `n` bytes and checks they are `p`'s; `what` names the stream in a failure.
    pub fn recv_pattern(&mut self, p: &Pattern, n: u64, what: &str) {
        let mut off = 0;
        while off < n {
            let k = (n - off).min(256 * 1024) as usize;
            assert!(p.matches(off, &self.read_exact(k)), "{what}: content mismatch at offset {off}");
            off += k as u64;
        }
    }

    pub fn close_notify(&mut self) {
        self.conn.send_close_notify();
        self.flush();
    }

    /// Reads plaintext until the stream ends: `Ok(data)` after a close_notify, `Err` on an EOF
    /// without one (rustls reports that as UnexpectedEof) or another error.
    pub fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        ConnIo(&mut self.conn, &mut self.sock).read_to_end(&mut v)?;
        Ok(v)
    }

    /// Sends `send_total` bytes of `send` and receives `recv_total` bytes of `recv` at the same
    /// time on one thread (a rustls connection cannot be split), with a non-blocking socket.
    pub fn exchange(&mut self, send: &Pattern, send_total: u64, recv: &Pattern, recv_total: u64) -> io::Result<()> {
        set_nonblocking(&self.sock, true);
        let r = self.exchange_inner(send, send_total, recv, recv_total);
        set_nonblocking(&self.sock, false);
        r
    }

    fn exchange_inner(&mut self, send: &Pattern, send_total: u64, recv: &Pattern, recv_total: u64) -> io::Result<()> {
        self.conn.set_buffer_limit(Some(256 * 1024));
        let (mut sent, mut got) = (0u64, 0u64);
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + exchange_limit();
        loop {
            let mut progress = false;
            while sent < send_total {
                let chunk = send.at(sent, (send_total - sent).min(64 * 1024) as usize);
                let n = self.conn.writer().write(chunk)?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                progress = true;
            }
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut self.sock) {
                    Ok(n) => progress |= n > 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if got < recv_total {
                match self.conn.read_tls(&mut self.sock) {
                    Ok(0) => {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {got} bytes")))
                    }
                    Ok(_) => {
                        self.conn.process_new_packets().map_err(io::Error::other)?;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                while got < recv_total {
                    let want = (recv_total - got).min(buf.len() as u64) as usize;
                    match self.conn.reader().read(&mut buf[..want]) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("close_notify after {got} bytes"),
                            ))
                        }
                        Ok(n) => {
                            if !recv.matches(got, &buf[..n]) {
                                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("mismatch at {got}")));
                            }
                            got += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            if sent == send_total && !self.conn.wants_write() && got == recv_total {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("sent {sent}, got {got}")));
            }
            if !progress {
                let mut flags = PollFlags::POLLIN;
                if self.conn.wants_write() {
                    flags |= PollFlags::POLLOUT;
                }
                let mut fds = [PollFd::new(self.sock.as_fd(), flags)];
                poll(&mut fds, PollTimeout::from(100u8)).map_err(io::Error::from)?;
            }
        }
    }
}

/// How long one [`TlsPeer::exchange`] may take: 60 s, or `SLUICE_TEST_EXCHANGE_SECS` for slow
/// machines (the kTLS VM runs under QEMU's TCG emulation, some 100 times slower).
fn exchange_limit() -> Duration {
    let secs = std::env::var("SLUICE_TEST_EXCHANGE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    Duration::from_secs(secs)
}

fn set_nonblocking(s: &impl AsFd, on: bool) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(s.as_fd(), FcntlArg::F_GETFL).unwrap());
    let flags = if on { flags | OFlag::O_NONBLOCK } else { flags - OFlag::O_NONBLOCK };
    fcntl(s.as_fd(), FcntlArg::F_SETFL(flags)).unwrap();
}

/// A TLS session moved from one worker to another the way a data-plane takeover moves it, while
/// bytes are stuck mid-relay: the client sends `n` bytes the upstream does not read yet, the
/// session is exported from the first worker and resumed on a second, then the upstream reads
/// them all (byte-exact), sends `n` back through the second worker, and both sides close with
/// close_notify. Returns the second worker's report, the second worker, and the exported
/// session's held bytes (pipe bytes, record-path bytes) at the move. `n` must exceed what the
/// sockets buffer (some 20 MiB on loopback), so that the client is still writing at the move.
pub fn moved_mid_transfer<C: Sock, U: Sock>(
    name: &str,
    client_pair: (C, C),
    upstream_pair: (U, U),
    (cs, ck): (u16, KeyKind),
    (us, uk): (u16, KeyKind),
    n: u64,
) -> (Report, Worker, (u64, usize))
where
    OwnedFd: From<C> + From<U>,
{
    let (tx, reports) = mpsc::channel();
    let first = Worker::spawn(0, tx.clone()).unwrap();
    let second = Worker::spawn(1, tx).unwrap();
    let (mut client, c_leg, c_crypto) = tls_client_leg(client_pair, cs, ck);
    let (mut upstream, u_leg, u_crypto) = tls_upstream_leg(upstream_pair, us, uk);
    first.add(session(name, c_leg, c_crypto, u_leg, u_crypto)).unwrap();
    let (c2u, u2c) = (Pattern::new(21), Pattern::new(22));
    let writer = {
        let p = c2u.clone();
        std::thread::spawn(move || {
            client.send_pattern(&p, n);
            client
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Loopback sockets buffer up to ~20 MiB between the two peers: `n` must be larger.
    assert!(!writer.is_finished(), "{name}: the client's writes must be stalled at the move");
    let mut exported = first.export();
    assert_eq!(exported.len(), 1, "the live session is exported");
    assert!(first.sessions().is_empty(), "the first worker holds nothing after the export");
    let e = exported.remove(0);
    let pipe_bytes: u64 = e.dirs.iter().filter(|d| d.path == DirPath::Splice).map(|d| u64::from(d.held_in)).sum();
    let held = (pipe_bytes, e.held.len());
    second.resume(e).unwrap();
    first.shutdown();
    assert!(reports.try_recv().is_err(), "moving a session reports nothing");
    upstream.recv_pattern(&c2u, n, name);
    let mut client = writer.join().unwrap();
    let p = u2c.clone();
    let back = std::thread::spawn(move || {
        upstream.send_pattern(&p, n);
        assert_eq!(upstream.read_to_close().unwrap(), b"", "the client's close_notify arrives as close_notify");
        upstream.close_notify();
    });
    client.recv_pattern(&u2c, n, name);
    client.close_notify();
    assert_eq!(client.read_to_close().unwrap(), b"", "the upstream's close_notify arrives as close_notify");
    back.join().unwrap();
    let r = next_report(&reports, Duration::from_secs(10));
    assert_eq!((r.bytes_client_to_upstream, r.bytes_upstream_to_client), (n, n), "{name}: {r:?}");
    assert_eq!(r.reason, EndReason::ClientClosed, "{name}: {r:?}");
    (r, second, held)
}
