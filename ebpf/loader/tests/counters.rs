//! Loads the real programs (as root, as CI runs) and checks the counters of a TCP loopback
//! connection against the bytes the test moved: exact payload each way, entries only for
//! registered sockets, gone after `remove`, and kept across a reload from the pinned map.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;

use sluice_ebpf::{socket_cookie, Counters, Options, PIN_ROOT};

fn options(name: &str) -> Options {
    Options { cgroup: None, pin_dir: Some(Path::new(PIN_ROOT).join(format!("test-{name}-{}", std::process::id()))) }
}

/// Loads the programs, or says why not: without CAP_BPF/root there is nothing to test here
/// (the data plane's fallback tests cover that case).
fn load(opts: &Options) -> Option<Counters> {
    match Counters::load(opts) {
        Ok(c) => Some(c),
        Err(e) if e.is_unavailable() => {
            eprintln!("skipping: BPF is unavailable here (needs root/CAP_BPF, cgroup v2, bpffs): {e}");
            None
        }
        Err(e) => panic!("loading the BPF programs failed: {e}"),
    }
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

fn send(from: &mut TcpStream, to: &mut TcpStream, n: usize) {
    let data = vec![0x5a; n];
    let writer = {
        let mut from = from.try_clone().unwrap();
        std::thread::spawn(move || from.write_all(&data).unwrap())
    };
    let mut got = vec![0; n];
    to.read_exact(&mut got).unwrap();
    writer.join().unwrap();
}

#[test]
fn counts_registered_sockets_exactly_and_survives_a_reload() {
    let opts = options("exact");
    let Some(mut counters) = load(&opts) else { return };
    let (mut a, mut b) = pair();
    let (ca, cb) = (socket_cookie(a.as_fd()).unwrap(), socket_cookie(b.as_fd()).unwrap());
    assert_ne!(ca, cb);
    counters.register(ca).unwrap();
    counters.register(cb).unwrap();
    // Unregistered traffic in the same cgroup must not add entries.
    let (mut x, mut y) = pair();
    send(&mut x, &mut y, 10_000);

    let (n, m) = (3_000_017usize, 123_457usize);
    send(&mut a, &mut b, n);
    send(&mut b, &mut a, m);
    let (sa, sb) = (counters.get(ca).unwrap().unwrap(), counters.get(cb).unwrap().unwrap());
    assert_eq!((sa.tx_bytes, sa.rx_bytes), (n as u64, m as u64), "{sa:?}");
    assert_eq!((sb.rx_bytes, sb.tx_bytes), (n as u64, m as u64), "{sb:?}");
    assert!(sa.tx_packets > 0 && sb.rx_packets > 0 && sa.segs_out > 0 && sb.segs_in > 0, "{sa:?} {sb:?}");
    assert!(sa.srtt_us > 0, "loopback still has a measured RTT: {sa:?}");
    assert_eq!(counters.len(), 2, "only registered sockets have entries");

    // A restarted loader reuses the pinned map: the counts are there and keep growing.
    drop(counters);
    let mut counters = load(&opts).expect("reload");
    counters.register(ca).unwrap();
    assert_eq!(counters.get(ca).unwrap().unwrap().tx_bytes, n as u64, "registering again keeps the counts");
    send(&mut a, &mut b, 1000);
    assert_eq!(counters.get(cb).unwrap().unwrap().rx_bytes, n as u64 + 1000);

    counters.remove(ca).unwrap();
    counters.remove(cb).unwrap();
    counters.remove(cb).unwrap();
    assert!(counters.is_empty(), "entries are gone after remove");
    assert_eq!(counters.get(ca).unwrap(), None);
    counters.unpin();
    assert!(!opts.pin_dir.unwrap().exists());
}
