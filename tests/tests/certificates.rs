//! Client certificates at control's PostgreSQL listener: no certificate, a certificate from a
//! different CA (both a look-alike Sluice CA carrying a valid identity and a plain self-signed
//! rcgen certificate) and a not-yet-valid one are rejected during TLS; an expired certificate from
//! Sluice's CA is refused right after TLS with SQLSTATE 28000 saying when it expired. No session
//! starts for any of them, and the daemon keeps serving good clients afterwards.

use sluice_tests::sluice_control::ca::CertAuthority;
use sluice_tests::{check_output, psql, route_identity, runtime, ClientCert, Harness};
use time::OffsetDateTime;

/// Number of `db.session.start` events so far (refusals during TLS must not produce any).
fn session_starts(h: &Harness) -> usize {
    h.audit().unwrap().iter().filter(|e| e.event == "db.session.start").count()
}

#[test]
fn bad_client_certificates_are_rejected() {
    let mut h = Harness::start("certs").unwrap();
    let now = OffsetDateTime::now_utc();
    let identity = route_identity("alice", "demo", "alice", "demo");

    // A look-alike: another CA issuing a certificate with a perfectly valid Sluice identity.
    let other_ca = CertAuthority::generate("sluice").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let foreign = ClientCert {
        cert_pem: other_ca
            .issue_client(
                &identity,
                &key.public_key_pem(),
                now - time::Duration::minutes(1),
                now + time::Duration::hours(1),
            )
            .unwrap(),
        key_pem: key.serialize_pem(),
    };
    // A plain self-signed client certificate.
    let self_signed = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["alice".to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).unwrap();
        ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    };
    // From the right CA, but expired an hour ago.
    let expired =
        h.issue_cert_window(&identity, now - time::Duration::hours(2), now - time::Duration::hours(1)).unwrap();
    // From the right CA, but not valid for another hour.
    let not_yet =
        h.issue_cert_window(&identity, now + time::Duration::hours(1), now + time::Duration::hours(2)).unwrap();
    let good = h.issue_cert("alice", "demo", "alice", "demo").unwrap();

    let starts_before = session_starts(&h);
    let rt = runtime().unwrap();
    rt.block_on(async {
        // Each case with the TLS alerts control may answer it with (rustls names).
        let cases: [(&str, Option<&ClientCert>, &[&str]); 4] = [
            ("no client certificate", None, &["CertificateRequired"]),
            // Same issuer name as the real CA, so the signature check is what fails.
            ("certificate from another Sluice CA", Some(&foreign), &["DecryptError", "BadCertificate", "UnknownCA"]),
            ("self-signed certificate", Some(&self_signed), &["UnknownCA", "BadCertificate"]),
            (
                "not yet valid certificate",
                Some(&not_yet),
                &["CertificateExpired", "CertificateNotValidYet", "BadCertificate"],
            ),
        ];
        for (what, cert, alerts) in cases {
            match h.connect_with(cert, "alice", "demo").await {
                Ok(c) => {
                    // Even if the handshake looked fine to the client, no query may run.
                    let q = c.client.query_one("select 1", &[]).await;
                    panic!("{what}: connection accepted (query result: {q:?})");
                }
                Err(e) => {
                    let e = e.pg();
                    // Refused during TLS: control never got as far as an ErrorResponse.
                    assert!(e.as_db_error().is_none(), "{what}: expected a TLS failure, got {e:?}");
                    let mut chain = format!("{e}");
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        chain.push_str(&format!(" <- {s}"));
                        src = s.source();
                    }
                    eprintln!("{what}: refused with {chain}");
                    assert!(
                        alerts.iter().any(|a| chain.contains(&format!("received fatal alert: {a}"))),
                        "{what}: expected one of the TLS alerts {alerts:?}, got {chain}"
                    );
                }
            }
        }

        // Expired: the chain is still checked, then the client is told why, in PostgreSQL's terms.
        let e = h.connect_with(Some(&expired), "alice", "demo").await.map(|_| ()).unwrap_err().pg();
        let db = e.as_db_error().unwrap_or_else(|| panic!("expired certificate: expected 28000, got {e:?}"));
        assert_eq!(db.code().code(), "28000");
        assert!(db.message().contains("expired at"), "{db:?}");

        // Still serving good clients.
        let c = h
            .connect_with(Some(&good), "alice", "demo")
            .await
            .unwrap_or_else(|e| panic!("good certificate refused: {e}"));
        let n: i32 = c.client.query_one("select 1 + 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 2);
        c.close().await.unwrap();
    });

    // psql without a client certificate: the same refusal through libpq.
    h.login().unwrap();
    let port = h.pg_port().to_string();
    let env: Vec<(String, String)> = vec![
        ("PGHOST".into(), "localhost".into()),
        ("PGPORT".into(), port.clone()),
        ("PGSSLMODE".into(), "verify-full".into()),
        ("PGSSLROOTCERT".into(), h.ca_file.to_string_lossy().into_owned()),
        // No such files: libpq then sends no certificate.
        ("PGSSLCERT".into(), h.dir.join("absent.crt").to_string_lossy().into_owned()),
        ("PGSSLKEY".into(), h.dir.join("absent.key").to_string_lossy().into_owned()),
        ("PGUSER".into(), "alice".into()),
        ("PGDATABASE".into(), "demo".into()),
        ("PGCONNECT_TIMEOUT".into(), "20".into()),
    ];
    let out = psql(&env, &["-c", "select 'ran-' || 41 + 1"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql without a certificate succeeded");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran-"), "a query ran");
    assert!(stderr.to_lowercase().contains("certificate") || stderr.contains("SSL"), "{stderr}");

    // psql with the expired certificate.
    let crt = h.dir.join("expired.crt");
    let key = h.dir.join("expired.key");
    std::fs::write(&crt, &expired.cert_pem).unwrap();
    write_key(&key, &expired.key_pem);
    let mut env_expired = env.clone();
    env_expired.retain(|(k, _)| k != "PGSSLCERT" && k != "PGSSLKEY");
    env_expired.push(("PGSSLCERT".into(), crt.to_string_lossy().into_owned()));
    env_expired.push(("PGSSLKEY".into(), key.to_string_lossy().into_owned()));
    let out = psql(&env_expired, &["-c", "select 'ran-' || 41 + 1"]).unwrap();
    assert!(!out.status.success(), "psql with an expired certificate succeeded");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran-"), "a query ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("psql with an expired certificate: {}", stderr.trim());
    assert!(stderr.contains("expired"), "{stderr}");

    // None of the refusals reached the session stage.
    assert_eq!(session_starts(&h), starts_before + 1, "only the good session may have started");
    assert!(h.control_alive(), "control died");

    // And psql with the files from `sluice db login` still works.
    h.sluice_ok(&["db", "login", "demo", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    let env = sluice_tests::parse_env_exports(&h.sluice_ok(&["db", "env", "demo"]).unwrap()).unwrap();
    let out = psql(&env, &["-c", "select 'ran-' || 41 + 1"]).unwrap();
    assert_eq!(check_output("psql", &out).unwrap().trim(), "ran-42");
}

/// libpq refuses a private key that others can read.
fn write_key(path: &std::path::Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path).unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}
