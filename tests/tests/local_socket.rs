//! Control's local Unix sockets (`proxy_service.local_socket`): one per served database, where a
//! client on this host connects in plaintext and the kernel-reported peer uid, mapped to a Sluice
//! user, is the identity. RBAC, audit and the dataplane handoff apply as on the TLS listener.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use sluice_control::demo::{unprivileged_user, DEMO_PLAIN_DB};
use sluice_tests::{only_error, psql_cmd, psql_query, sluice_control, startup_packet, wait_until, Harness};

#[test]
fn local_clients_connect_as_their_mapped_user_and_others_are_refused() {
    let h = Harness::start("local-socket").unwrap();
    let plain = h.local_env(DEMO_PLAIN_DB).unwrap();
    assert_eq!(psql_query(&plain, "select current_user || ' ' || current_database()").unwrap(), "alice demo");
    // A local client to a TLS upstream: the client leg is plain, the upstream leg TLS.
    let tls_upstream = h.local_env("demo").unwrap();
    assert_eq!(psql_query(&tls_upstream, "select 41 + 1").unwrap(), "42");

    let ends = wait_until(Duration::from_secs(10), "two db.session.end events", || {
        let ends: Vec<_> = h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        Ok((ends.len() >= 2).then_some(ends))
    })
    .unwrap();
    let legs: Vec<_> = ends.iter().map(|e| e.data["legs"].clone()).collect();
    assert!(legs.contains(&serde_json::json!({"client": "plain", "upstream": "plain"})), "{legs:?}");
    assert!(legs.contains(&serde_json::json!({"client": "plain", "upstream": "tls"})), "{legs:?}");
    let start = h.audit().unwrap().into_iter().find(|e| e.event == "db.session.start").unwrap();
    assert_eq!(start.user.as_deref(), Some("alice"));
    let uid = nix::unistd::geteuid().as_raw();
    assert_eq!(start.data["client_addr"], format!("unix:uid={uid}"), "{:?}", start.data);

    // RBAC still applies: alice's role allows database user alice only.
    let mut other_user = plain.clone();
    other_user.retain(|(k, _)| k != "PGUSER");
    other_user.push(("PGUSER".into(), "postgres".into()));
    let out = psql_cmd(&other_user).args(["-c", "select 1"]).output().unwrap();
    assert!(!out.status.success(), "RBAC let database user postgres through");
    assert!(String::from_utf8_lossy(&out.stderr).contains("access denied"), "{}", String::from_utf8_lossy(&out.stderr));

    // Garbage gets a protocol-violation error, and the socket keeps serving.
    let socket = h.stack.control.config.proxy_service.local_socket.as_ref().unwrap().dir.join(DEMO_PLAIN_DB);
    let mut s = UnixStream::connect(socket.join(".s.PGSQL.5432")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0, 0, 0, 9, 1, 2, 3, 4, 5]).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(only_error(&reply).unwrap()[&'C'], "08P01");
    // A startup without a user is refused, not a crash.
    let mut s = UnixStream::connect(socket.join(".s.PGSQL.5432")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&startup_packet(&[("database", "demo")])).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(only_error(&reply).unwrap()[&'C'], "28000");
    assert_eq!(psql_query(&plain, "select 'still serving'").unwrap(), "still serving");

    // An OS user with no mapping is refused, with the reason.
    if let Some(user) = unprivileged_user().unwrap() {
        let mut cmd = psql_cmd(&plain);
        cmd.args(["-c", "select 1"]).uid(user.uid.as_raw()).gid(user.gid.as_raw());
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "unmapped OS user {} connected", user.name);
        assert!(err.contains("not mapped to a Sluice user"), "{err}");
    } else {
        eprintln!("not root: the unmapped-user case needs a second OS user and is skipped");
    }
}
