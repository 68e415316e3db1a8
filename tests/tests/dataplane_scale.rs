//! SCALE: 9,000 concurrent live sessions on one data plane process, within a 20,000-descriptor
//! RLIMIT_NOFILE (the hard limit on the project's VMs, which root cannot raise). An idle session
//! holds no pipe (the relay takes one from its pool only while bytes are in flight), so it costs
//! the data plane its two sockets: 18,000 descriptors for 9,000 sessions, where six a session
//! (two pipes more) would need 54,000.
//!
//! The test is control: it connects to the data plane's handoff socket and hands it sessions the
//! way control does (both sockets of each as descriptors over SOCK_SEQPACKET), built from
//! loopback TCP pairs. Its own process holds the peers' 18,000 sockets (the client and upstream
//! ends), so the data plane's descriptor table holds only its own. It measures the data plane's
//! descriptors (`/proc/PID/fd`) and memory (RSS and PSS from `/proc/PID/smaps_rollup`) idle and
//! with the sessions, prints the per-session figures, and checks that every session relays a
//! round trip, that a sample echoes 1 MiB each way, that all 9,000 are reported when they end,
//! and that descriptors go back to the idle count. No root, BPF or PostgreSQL needed
//! (`--counters userspace`, plain legs); `cargo build --workspace --bins` first.
//!
//! `cargo test -p sluice-tests --test dataplane_scale -- --nocapture` prints the figures.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use sluice_control::demo::find_bin;
use sluice_handoff::handoff::{Handoff, LegCrypto, Message, Role};
use sluice_handoff::link::Link;
use sluice_tests::TestDir;

const SESSIONS: usize = 9_000;
/// The data plane's RLIMIT_NOFILE (soft), inherited from this process.
const NOFILE: u64 = 20_000;
const WORKERS: usize = 2;
/// Besides two a session: stdio, log, the handoff listener and link, each worker's ring and
/// eventfd, and up to 8 spare pipes per worker.
const FIXED_FDS: usize = 64;
/// Sessions that also echo 1 MiB each way.
const ECHO_SAMPLE: usize = 100;
const ECHO_BYTES: usize = 1 << 20;

/// Kills the data plane however the test ends.
struct Dp(Child);

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn pipes(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// `(Rss, Pss)` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup: {text}"))
    };
    (field("Rss:"), field("Pss:"))
}

/// The soft "Max open files" of the process.
fn nofile_soft(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// Machine-wide kernel slab memory in KiB (sockets live there; both ends of every session count).
fn slab_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines().find_map(|l| l.strip_prefix("Slab:")?.split_whitespace().next()?.parse().ok()).unwrap()
}

fn control_link(sock: &Path, dp: &mut Dp) -> Link {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(link) = Link::connect(sock) {
            link.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            if link.hello(Role::Control).is_ok() {
                return link;
            }
        }
        assert!(dp.0.try_wait().unwrap().is_none(), "the data plane exited during start");
        assert!(Instant::now() < deadline, "no data plane answers on {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hand(link: &Link, id: String, client: &TcpStream, upstream: &TcpStream) {
    let h = Handoff {
        session_id: id,
        user: "scale".into(),
        db_service: "db".into(),
        db_user: "scale".into(),
        db_name: "db".into(),
        not_after: 0,
        idle_timeout_ms: 0,
        client: LegCrypto::Plain,
        upstream: LegCrypto::Plain,
    };
    link.send(&Message::Handoff(Box::new(h)), &[client.as_raw_fd(), upstream.as_raw_fd()]).unwrap();
    match link.recv().unwrap().0 {
        Message::HandoffAck { error: None, .. } => {}
        other => panic!("handoff refused: {other:?}"),
    }
}

/// A connected loopback pair from the shared listener: `(connecting end, accepted end)`.
fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` into `from` (from a thread) while reading it back from `to`.
fn relay_check(from: &TcpStream, to: &mut TcpStream, data: &[u8]) {
    let mut writer = from.try_clone().unwrap();
    let payload = data.to_vec();
    let t = std::thread::spawn(move || writer.write_all(&payload).unwrap());
    let mut got = vec![0u8; data.len()];
    to.read_exact(&mut got).unwrap();
    t.join().unwrap();
    assert!(got == data, "relayed bytes differ");
}

#[test]
fn nine_thousand_sessions_on_one_dataplane_within_20000_descriptors() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // This process holds the peers' two sockets a session, as the data plane holds its two.
    let needed = (SESSIONS * 2 + 256) as u64;
    assert!(hard >= needed, "RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs");
    let limit = NOFILE.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();

    let dir = TestDir::new("dp-scale").unwrap();
    let sock = dir.join("dp.sock");
    let log = std::fs::File::create(dir.join("dataplane.log")).unwrap();
    let instance = format!("scale-{}", std::process::id());
    let mut dp = Dp(Command::new(find_bin("dataplane").unwrap())
        .arg("--control-socket")
        .arg(&sock)
        .args(["--workers", &WORKERS.to_string(), "--counters", "userspace", "--instance", &instance])
        // Three info lines a session would make the log the bottleneck.
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap());
    let pid = dp.0.id();
    let link = control_link(&sock, &mut dp);
    let dp_limit = nofile_soft(pid);
    assert!(dp_limit <= NOFILE, "the data plane runs with RLIMIT_NOFILE {dp_limit}");
    std::thread::sleep(Duration::from_millis(200));
    let (fds_idle, pipes_idle, (rss_idle, pss_idle), slab_idle) = (fds(pid), pipes(pid), memory_kib(pid), slab_kib());

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let mut sessions = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let (client, client_leg) = pair(&listener);
        let (upstream_leg, upstream) = pair(&listener);
        hand(&link, format!("scale-{i}"), &client_leg, &upstream_leg);
        // The data plane holds its own copies now, as it does of control's.
        drop((client_leg, upstream_leg));
        sessions.push((client, upstream));
    }
    let setup = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (fds_live, pipes_live, (rss_live, pss_live), slab_live) = (fds(pid), pipes(pid), memory_kib(pid), slab_kib());
    let n = SESSIONS as f64;
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n;
    eprintln!(
        "{SESSIONS} sessions handed over in {setup:.2?} to one data plane ({WORKERS} workers, RLIMIT_NOFILE {dp_limit})"
    );
    eprintln!(
        "data plane descriptors: {fds_idle} idle -> {fds_live} with the sessions = {:.3} per session; pipes {pipes_idle} -> {pipes_live}",
        (fds_live - fds_idle) as f64 / n
    );
    eprintln!(
        "data plane memory: RSS {rss_idle} -> {rss_live} KiB ({:.2} KiB per session), PSS {pss_idle} -> {pss_live} KiB ({:.2} KiB per session)",
        per(rss_idle, rss_live),
        per(pss_idle, pss_live)
    );
    eprintln!(
        "kernel slab, whole machine (four TCP sockets a session, both ends): {slab_idle} -> {slab_live} KiB ({:.2} KiB per session)",
        per(slab_idle, slab_live)
    );
    assert!(fds_live <= 2 * SESSIONS + FIXED_FDS, "{fds_live} descriptors for {SESSIONS} sessions");
    assert!(fds_live >= fds_idle + 2 * SESSIONS, "the data plane does not hold the sessions' sockets ({fds_live})");
    assert_eq!(pipes_live, pipes_idle, "idle sessions hold pipes");

    // Every session relays, both ways.
    let start = Instant::now();
    for (i, (c, u)) in sessions.iter_mut().enumerate() {
        let msg = format!("ping {i}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        u.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes(), "session {i}");
        u.write_all(b"pong").unwrap();
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"pong", "session {i}");
    }
    eprintln!("all {SESSIONS} sessions relayed a round trip in {:.2?}", start.elapsed());

    // A sample echoes 1 MiB: the upstream end sends back what it got.
    let start = Instant::now();
    for i in (0..SESSIONS).step_by(SESSIONS / ECHO_SAMPLE) {
        let data = pattern(i, ECHO_BYTES);
        let (c, u) = &mut sessions[i];
        relay_check(c, u, &data);
        relay_check(u, c, &data);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds_after, pipes_after) = (fds(pid), pipes(pid));
    eprintln!(
        "{ECHO_SAMPLE} sessions echoed {} KiB each way in {:.2?}; data plane now {fds_after} descriptors, {pipes_after} of them pipe ends (spares)",
        ECHO_BYTES / 1024,
        start.elapsed()
    );
    assert!(fds_after <= 2 * SESSIONS + FIXED_FDS, "{fds_after} descriptors after the echoes");
    // Spare pipes only: at most 8 per worker, two ends each.
    assert!(pipes_after <= pipes_idle + WORKERS * 8 * 2, "{pipes_after} pipe ends held after the echoes");

    // Every session is reported when its peers go.
    drop(sessions);
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended < SESSIONS {
        assert!(Instant::now() < deadline, "only {ended} of {SESSIONS} sessions reported");
        if let Message::SessionEnded(e) = link.recv().unwrap().0 {
            assert!(e.bytes_client_to_upstream > 0 && e.bytes_upstream_to_client >= 4, "{e:?}");
            ended += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let fds_end = fds(pid);
    eprintln!("all {SESSIONS} sessions reported; data plane back to {fds_end} descriptors");
    assert!(fds_end <= fds_idle + WORKERS * 8 * 2, "{fds_end} descriptors after every session ended");
    assert!(dp.0.try_wait().unwrap().is_none(), "the data plane exited");
}
