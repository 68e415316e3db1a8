//! The state on PostgreSQL (issue 12): the same `State` API as on SQLite, against a real
//! PostgreSQL over verify-full TLS, with the CA key sealed under a KEK, several writers at once,
//! and the change feed that tells every auth node a policy changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_control::config::Config;
use sluice_control::state::{OpenMode, State, StateError, TokenCheck};
use sluice_tests::{StoragePg, TestDir};

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

#[test]
fn the_state_api_behaves_the_same_on_postgres() {
    let dir = TestDir::new("storage-pg-api").unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let cfg = pg.config(&dir.join("a"), &kek).unwrap();
    let a = State::open_configured(&cfg, OpenMode::Serve).unwrap();
    assert_eq!(a.backend(), "postgres");

    // Users, roles, passwords, login sessions.
    a.add_user("alice", "pw1", &["dev".into()]).unwrap();
    assert!(matches!(a.add_user("alice", "x", &[]), Err(StateError::Exists(_))));
    assert!(a.verify_password("alice", "pw1").unwrap());
    assert!(!a.verify_password("alice", "pw2").unwrap());
    assert!(!a.verify_password("nobody", "pw1").unwrap());
    a.update_user_roles("alice", &["dev".into(), "ops".into()]).unwrap();
    assert_eq!(a.user("alice").unwrap().unwrap().roles, vec!["dev".to_string(), "ops".to_string()]);
    let (tok, _) = a.create_web_session("alice", Duration::from_secs(60)).unwrap();
    assert_eq!(a.web_session(&tok).unwrap().map(|x| x.0).as_deref(), Some("alice"));

    // A second node on the same database sees all of it (a login made via A works on B).
    let cfg_b = pg.config(&dir.join("b"), &kek).unwrap();
    let b = State::open_configured(&cfg_b, OpenMode::Serve).unwrap();
    assert_eq!(b.web_session(&tok).unwrap().map(|x| x.0).as_deref(), Some("alice"));
    assert!(b.verify_password("alice", "pw1").unwrap());
    b.delete_web_session(&tok).unwrap();
    assert_eq!(a.web_session(&tok).unwrap(), None);

    // Join tokens.
    let (db, _) = a.add_token("db", Duration::from_secs(60)).unwrap();
    assert_eq!(b.check_join_token(&db, "db").unwrap(), TokenCheck::Valid);
    assert_eq!(b.check_join_token(&db, "node").unwrap(), TokenCheck::WrongType { kind: "db".into() });
    assert_eq!(b.check_join_token("nope", "db").unwrap(), TokenCheck::Unknown);
    let (old, _) = a.add_token("db", Duration::ZERO).unwrap();
    assert!(matches!(b.check_join_token(&old, "db").unwrap(), TokenCheck::Expired { .. }));
    assert_eq!(a.tokens().unwrap().len(), 1);

    // Locks expire by time; the janitor removes their rows (and a day-old token) exactly once.
    let lock = a.add_lock(Some("alice"), None, "offboarding", Some(Duration::from_secs(1))).unwrap();
    assert_eq!(b.active_locks().unwrap(), vec![lock.clone()]);
    let later = time::OffsetDateTime::now_utc().unix_timestamp() + 2 * 86400;
    let swept = a.janitor_pass(later).unwrap();
    assert_eq!((swept.locks, swept.tokens), (1, 2), "{swept:?}");
    assert_eq!(b.janitor_pass(later).unwrap(), Default::default());

    // Nodes: concurrent joins through two nodes get distinct indexes.
    let (a, b) = (Arc::new(a), Arc::new(b));
    let joins: Vec<_> = (0..8)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                s.add_node(&format!("agent-{i}"), "db", &Default::default(), time::OffsetDateTime::now_utc()).unwrap()
            })
        })
        .collect();
    let mut indexes: Vec<u16> = joins.into_iter().map(|j| j.join().unwrap().node_index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (1..=8).collect::<Vec<u16>>());
    let node = a.nodes().unwrap().remove(0);
    assert_eq!(b.node(&node.host_id).unwrap().as_ref(), Some(&node));
    assert!(b.delete_node(&node.host_id).unwrap());
    assert_eq!(a.node(&node.host_id).unwrap(), None);

    // Audit: an event stored through A and again through B (a retried upload) is stored once.
    let ev = serde_json::json!({"event": "db.session.start", "event_id": "e-1", "time": "2026-12-01T00:00:00Z",
        "sid": "s1", "user": "alice", "db_service": "prod", "success": true});
    assert!(a.insert_audit(&ev).unwrap().is_some());
    assert_eq!(b.insert_audit_batch(&[ev.clone(), ev]).unwrap(), vec![None, None]);
    let rows = b
        .audit_query(&sluice_control::state::AuditFilter {
            user: Some("alice".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].success);

    // Live sessions are each node's own (node.db), never shared.
    a.insert_live_session("s1", &serde_json::json!({"x": 1})).unwrap();
    assert_eq!(a.live_sessions().unwrap().len(), 1);
    assert_eq!(b.live_sessions().unwrap().len(), 0);
}

/// A policy change committed through one node (or by another process) moves every node's change
/// marker within a second, without SQL on the reading side; bookkeeping does not move it.
#[test]
fn policy_changes_reach_every_node_through_the_feed() {
    let dir = TestDir::new("storage-pg-feed").unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let a = State::open_configured(&pg.config(&dir.join("a"), &kek).unwrap(), OpenMode::Serve).unwrap();
    let b = State::open_configured(&pg.config(&dir.join("b"), &kek).unwrap(), OpenMode::Serve).unwrap();
    let before = b.change_marker().expect("a serving node has a marker");
    a.add_lock(Some("alice"), None, "x", None).unwrap();
    let took = wait_for("B sees A's lock", Duration::from_secs(1), || b.change_marker() != Some(before));
    eprintln!("lock via A seen by B's feed in {took:?}");
    // Bookkeeping through A moves nothing.
    let node = a.add_node("agent", "db", &Default::default(), time::OffsetDateTime::now_utc()).unwrap();
    // Let the join's own revision settle on B.
    std::thread::sleep(Duration::from_millis(1200));
    let settled = b.change_marker();
    a.record_renewal(&node.host_id, time::OffsetDateTime::now_utc()).unwrap();
    a.insert_audit(&serde_json::json!({"event": "x", "event_id": "k"})).unwrap();
    a.create_web_session("alice", Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(b.change_marker(), settled, "bookkeeping moved the policy revision");
    // A change from another process (the admin CLI's path) moves it too.
    let admin = State::open_configured(&pg.config(&dir.join("admin"), &kek).unwrap(), OpenMode::Admin).unwrap();
    admin
        .upsert_role(
            &serde_json::from_value(serde_json::json!({"kind": "role", "version": "v7",
        "metadata": {"name": "dev"}, "spec": {"allow": {}}}))
            .unwrap(),
        )
        .unwrap();
    wait_for("B sees the admin's role", Duration::from_secs(1), || b.change_marker() != settled);
}

/// A store at the schema before agents reported MySQL addresses (version 3: no column, the
/// view trigger blind to it) is migrated when a node opens it: heartbeats stored before read as
/// without an address, a new address is shared with every node and moves the change feed, and
/// a heartbeat that repeats it is bookkeeping.
#[test]
fn node_mysql_addresses_are_migrated_shared_and_fed() {
    use sluice_control::state::NodeHeartbeat;
    let dir = TestDir::new("storage-pg-mysql-addr").unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let mut hb = NodeHeartbeat {
        postgres_addr: "10.0.0.1:5433".into(),
        mysql_addr: None,
        databases: vec!["shop".into()],
        sessions: 0,
        version: "0.1.0".into(),
        interval_ms: 1000,
        at_ms: 1_700_000_000_000,
    };
    let node = {
        let admin = State::open_configured(&pg.config(&dir.join("admin"), &kek).unwrap(), OpenMode::Admin).unwrap();
        admin.add_node("agent", "db", &Default::default(), time::OffsetDateTime::now_utc()).unwrap()
    };
    assert_eq!(pg.pg.psql("sluice", "SELECT max(version) FROM sluice_schema").unwrap(), "4");
    // Back to version 3, with a heartbeat as that build stored it.
    pg.pg
        .psql(
            "sluice",
            &format!(
                "DROP TRIGGER nodes_view_bump ON nodes;
                 ALTER TABLE nodes DROP COLUMN hb_mysql_addr;
                 CREATE TRIGGER nodes_view_bump AFTER UPDATE ON nodes FOR EACH ROW
                     WHEN (OLD.hb_postgres_addr IS DISTINCT FROM NEW.hb_postgres_addr
                           OR OLD.hb_databases IS DISTINCT FROM NEW.hb_databases
                           OR OLD.name IS DISTINCT FROM NEW.name OR OLD.labels IS DISTINCT FROM NEW.labels)
                     EXECUTE FUNCTION sluice_bump();
                 DELETE FROM sluice_schema WHERE version = 4;
                 UPDATE nodes SET hb_postgres_addr = '10.0.0.1:5433', hb_databases = '[\"shop\"]', hb_sessions = 0,
                     hb_version = '0.1.0', hb_interval_ms = 1000, hb_at_ms = {} WHERE host_id = '{}';",
                hb.at_ms, node.host_id
            ),
        )
        .unwrap();

    let a = State::open_configured(&pg.config(&dir.join("a"), &kek).unwrap(), OpenMode::Serve).unwrap();
    let b = State::open_configured(&pg.config(&dir.join("b"), &kek).unwrap(), OpenMode::Serve).unwrap();
    assert_eq!(
        pg.pg.psql("sluice", "SELECT version || ' ' || name FROM sluice_schema ORDER BY version DESC LIMIT 1").unwrap(),
        "4 node MySQL address"
    );
    assert_eq!(b.node(&node.host_id).unwrap().and_then(|n| n.heartbeat), Some(hb.clone()));

    // Let the opening's revisions settle on B, then a new MySQL address through A.
    std::thread::sleep(Duration::from_millis(1200));
    let settled = b.change_marker();
    hb.mysql_addr = Some("10.0.0.1:3306".into());
    hb.at_ms += 1000;
    assert!(a.record_heartbeat(&node.host_id, &hb).unwrap());
    wait_for("B sees the MySQL address", Duration::from_secs(2), || b.change_marker() != settled);
    assert_eq!(b.node(&node.host_id).unwrap().and_then(|n| n.heartbeat), Some(hb.clone()));

    // The same address again, with only the time and the sessions changed: no revision.
    std::thread::sleep(Duration::from_millis(1200));
    let settled = b.change_marker();
    hb.sessions = 3;
    hb.at_ms += 1000;
    assert!(a.record_heartbeat(&node.host_id, &hb).unwrap());
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(b.change_marker(), settled, "a repeated MySQL address moved the policy revision");
    assert_eq!(b.node(&node.host_id).unwrap().and_then(|n| n.heartbeat), Some(hb));
}

/// Both nodes starting on an empty database end up with one CA; its key is stored only sealed
/// (no PEM, no base64 of the DER, no DER bytes anywhere in a dump), and a node without the KEK
/// cannot open it.
#[test]
fn one_ca_sealed_under_the_kek() {
    let dir = TestDir::new("storage-pg-ca").unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let cfgs: Vec<Config> = (0..4).map(|i| pg.config(&dir.join(format!("n{i}")), &kek).unwrap()).collect();
    let cas: Vec<_> = cfgs
        .into_iter()
        .map(|cfg| {
            std::thread::spawn(move || {
                let s = State::open_configured(&cfg, OpenMode::Admin).unwrap();
                s.ensure_ca("sluice").unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(cas.iter().all(|c| c.cert_pem == cas[0].cert_pem), "two CAs were created");
    let key_pem = cas[0].key_pem().to_string();
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let der = der.secret_der().to_vec();
    let dump = std::process::Command::new(pg.pg.bin().join("pg_dump"))
        .args(["--data-only", "-h", &pg.pg.dir.display().to_string()])
        .args(["-p", &pg.pg.port.to_string(), "-U", "postgres", "sluice"])
        .output()
        .unwrap();
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("cert_authorities"), "the dump has no CA table");
    assert!(!text.contains("PRIVATE KEY"), "a PEM private key is in the database");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    assert!(!text.contains(&b64[20..80]), "the key's base64 is in the database");
    assert!(!text.contains(&hex::encode(&der)[40..160]), "the key's DER (hex) is in the database");

    // Another KEK opens nothing, and says which KEKs would.
    let other = dir.join("other-kek");
    sluice_control::kek::generate_file(&other).unwrap();
    let s = State::open_configured(&pg.config(&dir.join("x"), &other).unwrap(), OpenMode::Admin).unwrap();
    let e = s.ensure_ca("sluice").err().expect("a foreign KEK opened the CA key").to_string();
    assert!(e.contains("wrapped for [file:"), "{e}");
}

fn control(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(sluice_control::demo::find_bin("control").unwrap())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the harness's control from SQLite to a new storage PostgreSQL (export, import into it,
/// restart), with `edit` applied to the new config too. Returns the storage and the new config.
fn move_to_postgres(h: &mut sluice_tests::Harness, edit: impl Fn(&mut Config)) -> (StoragePg, Config) {
    let sqlite_config = h.stack.control.config_path.clone();
    let export = h.dir.join("state.ndjson");
    control(&sqlite_config, &["storage", "export", "--out", export.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&export).unwrap().permissions().mode() & 0o777, 0o600);

    let pg = StoragePg::start(&h.dir.join("storage")).unwrap();
    let kek = h.dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let storage = pg.storage_config(&kek);
    h.stack.control.proc.stop(nix::sys::signal::Signal::SIGTERM);
    let mut pg_cfg = h.stack.control.config.clone();
    pg_cfg.auth_service.storage = storage.clone();
    edit(&mut pg_cfg);
    let pg_config = h.dir.join("control-pg.yaml");
    std::fs::write(&pg_config, serde_saphyr::to_string(&pg_cfg).unwrap()).unwrap();
    // A truncated file is refused and leaves the target empty (so the real import can follow).
    let text = std::fs::read_to_string(&export).unwrap();
    let cut = h.dir.join("cut.ndjson");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let out = std::process::Command::new(sluice_control::demo::find_bin("control").unwrap())
        .args(["--config", pg_config.to_str().unwrap(), "storage", "import", "--in", cut.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a truncated export was imported");
    control(&pg_config, &["storage", "import", "--in", export.to_str().unwrap()]);
    h.start_control_again(|cfg| {
        cfg.auth_service.storage = storage;
        edit(cfg);
    })
    .unwrap();
    (pg, pg_cfg)
}

/// A control that started on embedded SQLite moves to PostgreSQL with `control storage export`
/// and `import`: the same users, roles and databases, the same CA (a certificate issued before
/// the move still connects), the old password still logs in, the CA key ends up sealed under
/// the KEK, and a lock placed with the admin CLI (another process, writing PostgreSQL) ends a
/// live session through the daemon's change feed within a second.
#[test]
fn a_sqlite_control_moves_to_postgres() {
    let mut h = sluice_tests::Harness::start("storage-move").unwrap();
    let rt = sluice_tests::runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    rt.block_on(c.close()).unwrap();
    let sqlite_config = h.stack.control.config_path.clone();
    let lists = |config: &std::path::Path| {
        ["users", "roles", "db"].map(|what| control(config, &[what, "ls", "--format", "json"]))
    };
    let before = lists(&sqlite_config);
    let (pg, pg_cfg) = move_to_postgres(&mut h, |_| {});
    assert_eq!(lists(&h.stack.control.config_path), before, "users, roles or databases changed in the move");

    // The same CA: a certificate from before the move connects; the password still logs in.
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    let v: i32 = rt.block_on(c.client.query_one("select 7", &[])).unwrap().get(0);
    assert_eq!(v, 7);
    h.login_demo().unwrap();

    // The key is sealed at rest.
    let dump = std::process::Command::new(pg.pg.bin().join("pg_dump"))
        .args(["--data-only", "-h", &pg.pg.dir.display().to_string(), "-p", &pg.pg.port.to_string()])
        .args(["-U", "postgres", "sluice"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("cert_authorities") && !dump.contains("PRIVATE KEY"), "the CA key is not sealed");

    // A lock through the admin CLI ends the live session.
    let (query, elapsed) = rt.block_on(async {
        let sleep = c.client.simple_query("select pg_sleep(30)");
        let lock = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            control(&h.stack.control.config_path, &["locks", "add", "--user", "alice", "--message", "moved"]);
            Instant::now()
        };
        let (r, at) = tokio::join!(sleep, lock);
        (r, at.elapsed())
    });
    assert!(query.is_err(), "the session outlived the lock");
    eprintln!("[storage-move] session ended {elapsed:?} after the lock (PostgreSQL storage)");
    assert!(elapsed < Duration::from_secs(1), "the session ended {elapsed:?} after the lock");

    // The node's audit events reach the shared store through its own spool (node.db), in order,
    // and leave the spool once stored.
    let shared = State::open_configured(&pg_cfg, OpenMode::Admin).unwrap();
    let events = |s: &State| {
        s.audit_query(&sluice_control::state::AuditFilter {
            user: Some("alice".into()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
    };
    wait_for("the session's end stored in PostgreSQL", Duration::from_secs(10), || {
        events(&shared).iter().any(|e| e.event == "db.session.end")
    });
    let session = events(&shared).into_iter().rev().find(|e| e.event == "db.session.end").unwrap().session_id;
    let kinds: Vec<String> = events(&shared).into_iter().filter(|e| e.session_id == session).map(|e| e.event).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("db.session.start"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("db.session.end"), "{kinds:?}");
    let spool = sluice_control::state::sqlite::Sqlite::open(&pg_cfg.data_dir, "node.db").unwrap();
    wait_for("node.db's spool emptied", Duration::from_secs(10), || {
        spool.run(|c| c.query_one("SELECT count(*) FROM audit", &[])?.get::<i64>(0)).unwrap() == 0
    });
}

/// Sends `sig` to every process of the storage PostgreSQL (the postmaster and its children):
/// SIGSTOP freezes it with its sockets open, as a hung or partitioned database looks.
fn signal_storage(pg: &StoragePg, sig: nix::sys::signal::Signal) {
    let text = std::fs::read_to_string(pg.pg.dir.join("data").join("postmaster.pid")).unwrap();
    let postmaster: i32 = text.lines().next().unwrap().trim().parse().unwrap();
    // The postmaster's children, from /proc (the 4th field of /proc/PID/stat is the parent).
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(1)?.parse().ok()
    };
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            if parent(pid) == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// An auth node whose shared storage hangs keeps serving from its snapshot (a handshake reads no
/// SQL), live sessions go on, and the audit events wait in node.db; past
/// `max_policy_staleness` new sessions are refused with 57P03 naming the storage; when the
/// storage answers again sessions are admitted and every spooled event is stored.
#[test]
fn an_auth_node_rides_out_a_storage_outage() {
    let mut h = sluice_tests::Harness::start("storage-outage").unwrap();
    let (pg, pg_cfg) = move_to_postgres(&mut h, |cfg| cfg.db_service.max_policy_staleness = Duration::from_secs(5));
    let rt = sluice_tests::runtime().unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let select =
        |c: &sluice_tests::Connected| -> i32 { rt.block_on(c.client.query_one("select 7", &[])).unwrap().get(0) };
    let live = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).unwrap();
    assert_eq!(select(&live), 7);
    signal_storage(&pg, nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    // Within the limit: admitted from the snapshot.
    std::thread::sleep(Duration::from_secs(1));
    let during = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).expect("refused during a short outage");
    assert_eq!(select(&during), 7);
    rt.block_on(during.close()).unwrap();
    // Past it: refused, saying why; the live session still runs.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(stopped.elapsed()));
    let refused = match rt.block_on(h.connect_with(Some(&cert), "alice", "demo")) {
        Ok(_) => panic!("admitted {:?} into a storage outage", stopped.elapsed()),
        Err(e) => format!("{e:?}"),
    };
    assert!(refused.contains("57P03") && refused.contains("shared storage"), "{refused}");
    assert_eq!(select(&live), 7, "the live session ended in the outage");
    signal_storage(&pg, nix::sys::signal::Signal::SIGCONT);
    wait_for("sessions admitted again", Duration::from_secs(10), || {
        rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).is_ok()
    });
    // The session made during the outage is in the shared audit log.
    let shared = State::open_configured(&pg_cfg, OpenMode::Admin).unwrap();
    wait_for("the outage's session events stored", Duration::from_secs(10), || {
        let rows = shared
            .audit_query(&sluice_control::state::AuditFilter {
                user: Some("alice".into()),
                limit: 1000,
                ..Default::default()
            })
            .unwrap();
        rows.iter().filter(|e| e.event == "db.session.start" && e.success).count() >= 3
    });
    assert_eq!(select(&live), 7);
}
