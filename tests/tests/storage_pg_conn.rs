//! The connection layer of the PostgreSQL auth storage against a real PostgreSQL with TLS
//! ([`StoragePg`]): verify-full is what runs and what is required, a certificate from another CA
//! or for another name is refused (naming `sslrootcert` or the host), a rotated password file is
//! used by the next connection without a restart, and NOTIFY reaches a `connect_listening` client.

use std::time::Duration;

use sluice_tests::sluice_control::pgconn::{PgConnError, PgConnector, PgStorage};
use sluice_tests::{runtime, StoragePg, TestCa, TestDir};

fn start(name: &str) -> (TestDir, StoragePg) {
    let dir = TestDir::new(name).unwrap();
    let pg = StoragePg::start(dir.path()).unwrap();
    (dir, pg)
}

fn with_conn(pg: &StoragePg, conn_string: String) -> PgStorage {
    PgStorage { conn_string, ..pg.storage() }
}

#[test]
fn connects_with_verify_full_over_tls() {
    let (_dir, pg) = start("pgconn-tls");
    let connector = PgConnector::new(&pg.storage()).unwrap();
    runtime().unwrap().block_on(async {
        let client = connector.connect().await.unwrap();
        let row =
            client.query_one("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap();
        assert!(row.get::<_, bool>(0), "the storage connection is not TLS");
        let version: String = row.get(1);
        assert!(version.starts_with("TLSv1."), "{version}");
        let row = client.query_one("select current_setting('statement_timeout'), current_user", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "5s");
        assert_eq!(row.get::<_, String>(1), "sluice");
        let app: String = client.query_one("show application_name", &[]).await.unwrap().get(0);
        assert_eq!(app, "sluice");
    });
    // The role is admitted only over TLS (the harness's pg_hba), so the TLS above is not optional.
    runtime().unwrap().block_on(async {
        let password = std::fs::read_to_string(&pg.password_file).unwrap();
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(pg.pg.port).user("sluice").dbname("sluice").password(password.trim_end());
        let err = cfg.connect(tokio_postgres::NoTls).await.err().expect("a plain-TCP login must be refused");
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
        assert!(db.message().contains("pg_hba.conf rejects"), "{}", db.message());
    });
}

#[test]
fn weaker_sslmodes_and_passwords_in_the_conn_string_are_refused() {
    let (_dir, pg) = start("pgconn-refuse");
    for mode in ["require", "prefer", "verify-ca", "disable"] {
        let s = with_conn(&pg, pg.conn_string.replace("sslmode=verify-full", &format!("sslmode={mode}")));
        let e = PgConnector::new(&s).unwrap_err();
        assert!(matches!(e, PgConnError::Config(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("sslmode={mode} is refused")), "{msg}");
        assert!(msg.contains("verify-full is required"), "{msg}");
    }
    let password = std::fs::read_to_string(&pg.password_file).unwrap();
    let s = with_conn(&pg, format!("{} password={}", pg.conn_string, password.trim_end()));
    let e = PgConnector::new(&s).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("use password_file or aws_iam"), "{msg}");
    assert!(!msg.contains(password.trim_end()) && !format!("{e:?}").contains(password.trim_end()), "{msg}");
}

#[test]
fn a_server_certificate_from_another_ca_fails_naming_sslrootcert() {
    let (dir, pg) = start("pgconn-foreign");
    let foreign = TestCa::new("someone else's CA").unwrap();
    let foreign_file = dir.join("foreign-ca.pem");
    std::fs::write(&foreign_file, foreign.pem()).unwrap();
    let s =
        with_conn(&pg, pg.conn_string.replace(&pg.ca_file.display().to_string(), &foreign_file.display().to_string()));
    let connector = PgConnector::new(&s).unwrap();
    let e = runtime().unwrap().block_on(connector.connect()).expect_err("an untrusted server must be refused");
    assert!(matches!(e, PgConnError::Untrusted { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("sslrootcert {}", foreign_file.display())), "{msg}");
    assert!(msg.contains("failed verification"), "{msg}");
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let (_dir, pg) = start("pgconn-name");
    // The certificate names localhost and 127.0.0.1; dial 127.0.0.1 while verifying another name.
    let s = with_conn(&pg, pg.conn_string.replace("host=localhost", "host=storage.example.invalid hostaddr=127.0.0.1"));
    let connector = PgConnector::new(&s).unwrap();
    let e = runtime().unwrap().block_on(connector.connect()).expect_err("a wrong name must be refused");
    assert!(matches!(e, PgConnError::WrongName { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid for host storage.example.invalid"), "{e}");
    // The same dial with the right name passes: the refusal is the name, not the address.
    let s = with_conn(&pg, pg.conn_string.replace("host=localhost", "host=localhost hostaddr=127.0.0.1"));
    runtime().unwrap().block_on(PgConnector::new(&s).unwrap().connect()).unwrap();
}

#[test]
fn a_rotated_password_is_used_by_the_next_connection() {
    let (dir, pg) = start("pgconn-rotate");
    let connector = PgConnector::new(&pg.storage()).unwrap();
    let old = std::fs::read_to_string(&pg.password_file).unwrap();
    runtime().unwrap().block_on(async {
        let before = connector.connect().await.unwrap();
        let new = pg.rotate_password().unwrap();
        assert_ne!(old.trim_end(), new);
        // Same connector, no restart: the next login reads the new file.
        let after = connector.connect().await.unwrap();
        after.query_one("select 1", &[]).await.unwrap();
        // A connection made before the rotation carries on.
        before.query_one("select 1", &[]).await.unwrap();
        // And the old password really is dead.
        let stale = dir.join("stale-password");
        sluice_tests::sluice_control::private_fs::write_private(&stale, old.as_bytes()).unwrap();
        let stale_connector = PgConnector::new(&PgStorage { password_file: Some(stale), ..pg.storage() }).unwrap();
        let e = stale_connector.connect().await.expect_err("the old password must be refused");
        let msg = e.to_string();
        assert!(msg.contains("password authentication failed"), "{msg}");
        assert!(!msg.contains(old.trim_end()), "{msg}");
    });
}

#[test]
fn notify_reaches_a_listening_connection() {
    let (_dir, pg) = start("pgconn-notify");
    let connector = PgConnector::new(&pg.storage()).unwrap();
    runtime().unwrap().block_on(async {
        let (listener, mut rx) = connector.connect_listening().await.unwrap();
        listener.batch_execute("LISTEN sluice_change").await.unwrap();
        let other = connector.connect().await.unwrap();
        other.execute("select pg_notify('sluice_change', 'rev 7')", &[]).await.unwrap();
        other.execute("select pg_notify('unrelated', 'x')", &[]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no notification within 5 s")
            .expect("the notification stream ended");
        assert_eq!(n.channel(), "sluice_change");
        assert_eq!(n.payload(), "rev 7");
        // The listening client still runs queries while its messages are being forwarded.
        listener.query_one("select 1", &[]).await.unwrap();
        // Only channels listened on arrive; the stream ends when the connection does.
        drop(listener);
        let rest = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the stream did not end");
        assert!(rest.is_none(), "unexpected {rest:?}");
    });
}

#[test]
fn a_unix_socket_needs_neither_tls_nor_a_password() {
    let (_dir, pg) = start("pgconn-unix");
    let s = PgStorage {
        conn_string: format!("host={} port={} dbname=sluice user=sluice", pg.pg.dir.display(), pg.pg.port),
        password_file: None,
        aws_iam: None,
        pool_size: 2,
    };
    let connector = PgConnector::new(&s).unwrap();
    runtime().unwrap().block_on(async {
        let client = connector.connect().await.unwrap();
        let user: String = client.query_one("select current_user", &[]).await.unwrap().get(0);
        assert_eq!(user, "sluice");
    });
}
