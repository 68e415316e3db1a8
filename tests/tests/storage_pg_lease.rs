//! The discovery lease on a real PostgreSQL shared by two auth nodes (issue 12, item 3): one
//! holder at a time, a takeover only after expiry with a new fencing token, a stale holder's
//! fenced writes refused without changing a row, renewals invisible to the change feed, and
//! pruning that keeps the sources another live node polls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_control::state::{discovery_lease, Discovered, Fence, OpenMode, State, StateError};
use sluice_tests::{StoragePg, TestDir};

fn item(name: &str, uri: &str) -> Discovered {
    Discovered {
        resource: serde_saphyr::from_str(&format!(
            "kind: db\nversion: v3\nmetadata: {{name: {name}}}\nspec: {{protocol: postgres, uri: \"{uri}\"}}"
        ))
        .unwrap(),
        aws_resource_id: format!("prx-{name}"),
        uid: format!("arn:aws:rds:us-west-2:1:db-proxy:prx-{name}"),
    }
}

fn two_nodes(name: &str) -> (TestDir, StoragePg, State, State) {
    let dir = TestDir::new(name).unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let a = State::open_configured(&pg.config(&dir.join("a"), &kek).unwrap(), OpenMode::Serve).unwrap();
    let b = State::open_configured(&pg.config(&dir.join("b"), &kek).unwrap(), OpenMode::Serve).unwrap();
    (dir, pg, a, b)
}

#[test]
fn one_holder_until_expiry_then_a_new_token_fences_the_old_one() {
    let (_dir, _pg, a, b) = two_nodes("storage-pg-lease");
    let name = discovery_lease("aws/rdsproxy/us-west-2/-");
    let ttl = Duration::from_millis(1500);

    let marker = b.change_marker();
    let t1 = a.acquire_lease(&name, "node-a", ttl).unwrap().expect("a free lease is taken");
    assert_eq!(b.acquire_lease(&name, "node-b", ttl).unwrap(), None, "B took a live lease");
    assert_eq!(a.acquire_lease(&name, "node-a", ttl).unwrap(), Some(t1), "a renewal changed the token");
    let (holder, token, left) = b.lease(&name).unwrap().expect("B sees A's lease");
    assert_eq!((holder.as_str(), token), ("node-a", t1));
    assert!(left > 0 && left <= 1500, "{left} ms left, on the database's clock");

    let fence_a = Fence { name: name.clone(), holder: "node-a".into(), token: t1 };
    let found = [item("orders", "o:5432"), item("billing", "b:5432")];
    assert_eq!(a.replace_discovered_fenced("src", &found, Some(&fence_a)).unwrap(), (2, 0, 0));

    // B keeps trying; it gets the lease only once A's has expired, and with a new token.
    let t0 = Instant::now();
    let t2 = loop {
        if let Some(t) = b.acquire_lease(&name, "node-b", ttl).unwrap() {
            break t;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "B never took the expired lease over");
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = t0.elapsed();
    eprintln!("B took the lease over after {waited:?}");
    assert!(waited >= Duration::from_millis(1200), "B took a live lease over after {waited:?}");
    assert_eq!(t2, t1 + 1, "a new holder must get a new token");

    // A (paused, say) writes late with its old token: refused, and no row changes.
    let before: Vec<_> = b.discovered().unwrap().into_iter().map(|r| (r.item, r.stale)).collect();
    let e = a.replace_discovered_fenced("src", &[item("orders", "elsewhere:1")], Some(&fence_a)).unwrap_err();
    assert!(matches!(e, StateError::Fenced(_)), "{e}");
    let e = a.mark_discovered_stale_fenced("src", "Throttling", Some(&fence_a)).unwrap_err();
    assert!(matches!(e, StateError::Fenced(_)), "{e}");
    let after: Vec<_> = b.discovered().unwrap().into_iter().map(|r| (r.item, r.stale)).collect();
    assert_eq!(before, after, "a fenced write changed rows");
    assert_eq!(a.acquire_lease(&name, "node-a", ttl).unwrap(), None, "A took B's live lease back");

    // B's writes with its token go through.
    let fence_b = Fence { name: name.clone(), holder: "node-b".into(), token: t2 };
    assert_eq!(b.replace_discovered_fenced("src", &[item("orders", "o:5432")], Some(&fence_b)).unwrap(), (0, 0, 1));
    // A guessed token is no better than a stale one.
    let forged = Fence { token: t2 + 1, ..fence_b.clone() };
    assert!(matches!(b.mark_discovered_stale_fenced("src", "x", Some(&forged)), Err(StateError::Fenced(_))));

    // Leases are bookkeeping: taking, renewing and moving them never moved the feed (the
    // discovered rows did, and are allowed to).
    std::thread::sleep(Duration::from_millis(1200));
    let settled = b.change_marker();
    for _ in 0..3 {
        b.acquire_lease(&name, "node-b", ttl).unwrap().expect("B renews");
    }
    assert!(b.release_lease(&name, "node-b").unwrap());
    a.acquire_lease(&name, "node-a", ttl).unwrap().expect("a released lease is free at once");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(b.change_marker(), settled, "lease writes moved the policy revision");
    assert_ne!(marker, settled, "the discovered rows should have moved it");
}

/// Many nodes racing for a free lease: exactly one wins, and the rest learn who.
#[test]
fn racing_nodes_elect_exactly_one_holder() {
    let (_dir, _pg, a, b) = two_nodes("storage-pg-lease-race");
    let (a, b) = (Arc::new(a), Arc::new(b));
    for round in 0..5 {
        let name = format!("race/{round}");
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let name = name.clone();
                std::thread::spawn(move || s.acquire_lease(&name, &format!("n{i}"), Duration::from_secs(30)).unwrap())
            })
            .collect();
        let won: Vec<u64> = racers.into_iter().filter_map(|r| r.join().unwrap()).collect();
        assert_eq!(won, vec![1], "round {round}: winners {won:?}");
    }
}

/// A node prunes only sources that neither it configures nor any live node polls.
#[test]
fn pruning_keeps_what_another_live_node_polls() {
    let (_dir, _pg, a, b) = two_nodes("storage-pg-lease-prune");
    a.replace_discovered("mine", &[item("m", "m:1")]).unwrap();
    b.replace_discovered("theirs", &[item("t", "t:1")]).unwrap();
    b.replace_discovered("gone", &[item("g", "g:1")]).unwrap();
    let ttl = Duration::from_millis(800);
    b.acquire_lease(&discovery_lease("theirs"), "node-b", ttl).unwrap().unwrap();
    assert_eq!(a.prune_discovered(&["mine".to_owned()], ttl).unwrap(), 1);
    let sources = |s: &State| s.discovered().unwrap().into_iter().map(|r| r.source).collect::<Vec<_>>();
    assert_eq!(sources(&a), ["mine", "theirs"]);
    // B dies: after its lease and the grace run out, A drops B's rows.
    std::thread::sleep(ttl * 2 + Duration::from_millis(300));
    assert_eq!(a.prune_discovered(&["mine".to_owned()], ttl).unwrap(), 1);
    assert_eq!(sources(&a), ["mine"]);
}
