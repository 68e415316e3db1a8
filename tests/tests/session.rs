//! The happy path end to end: `sluice login`, `sluice db login`, `sluice db env`, then a query
//! through Sluice with stock psql and with tokio-postgres (using the certificate files `sluice`
//! wrote, with the SSLRequest and with PostgreSQL 17's direct TLS), and `sluice db ls` in text and
//! JSON.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::{
    client_config_from_files, connect, env_get, pg_config, psql_query, raw_connect, role, runtime, Harness,
};
use tokio_postgres::config::SslNegotiation;
use tokio_postgres_rustls::MakeRustlsConnect;

#[test]
fn query_through_sluice_with_psql_and_tokio_postgres() {
    let h = Harness::start("session").unwrap();
    let env = h.login_demo().unwrap();

    // What `sluice db env demo` tells libpq.
    assert_eq!(env_get(&env, "PGHOST").unwrap(), "localhost");
    assert_eq!(env_get(&env, "PGPORT").unwrap(), h.pg_port().to_string());
    assert_eq!(env_get(&env, "PGSSLMODE").unwrap(), "verify-full");
    assert_eq!(env_get(&env, "PGUSER").unwrap(), "alice");
    assert_eq!(env_get(&env, "PGDATABASE").unwrap(), "demo");
    for var in ["PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"] {
        let path = env_get(&env, var).unwrap();
        assert!(path.starts_with(h.home.to_str().unwrap()), "{var}={path} is not under SLUICE_HOME");
        assert!(Path::new(path).is_file(), "{var}={path} does not exist");
    }

    // psql with nothing but that environment.
    let out = psql_query(&env, "select current_user, current_database(), 6 * 7").unwrap();
    assert_eq!(out, "alice|demo|42");
    // Several statements and a larger result on one session.
    let out = psql_query(
        &env,
        "create temp table t as select g from generate_series(1, 5000) g; select count(*), sum(g) from t",
    )
    .unwrap();
    assert_eq!(out, "5000|12502500");

    // tokio-postgres with the same files.
    let tls = client_config_from_files(
        Path::new(env_get(&env, "PGSSLROOTCERT").unwrap()),
        Path::new(env_get(&env, "PGSSLCERT").unwrap()),
        Path::new(env_get(&env, "PGSSLKEY").unwrap()),
    )
    .unwrap();
    runtime().unwrap().block_on(async {
        let c = connect(h.pg_port(), "alice", "demo", tls).await.expect("tokio-postgres connects through Sluice");
        let row = c.client.query_one("select current_user::text, current_database()::text, 6 * 7", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "alice");
        assert_eq!(row.get::<_, String>(1), "demo");
        assert_eq!(row.get::<_, i32>(2), 42);
        // The extended protocol with parameters, and a result bigger than one TLS record.
        let rows = c
            .client
            .query("select $1::text || g::text from generate_series(1, $2::int4) g", &[&"row-", &20_000i32])
            .await
            .unwrap();
        assert_eq!(rows.len(), 20_000);
        assert_eq!(rows[19_999].get::<_, String>(0), "row-20000");
        // The session's server side runs as the database user the certificate names.
        let who: String = c.client.query_one("select session_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, "alice");
        c.close().await.unwrap();

        // PostgreSQL 17's direct TLS (no SSLRequest first; `sslnegotiation=direct`), same files.
        let mut tls = client_config_from_files(
            Path::new(env_get(&env, "PGSSLROOTCERT").unwrap()),
            Path::new(env_get(&env, "PGSSLCERT").unwrap()),
            Path::new(env_get(&env, "PGSSLKEY").unwrap()),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
        let mut cfg = pg_config(h.pg_port(), "alice", "demo");
        cfg.ssl_negotiation(SslNegotiation::Direct);
        let (client, conn) = cfg.connect(MakeRustlsConnect::new(tls)).await.expect("direct TLS connects");
        let conn = tokio::spawn(conn);
        let row = client.query_one("select current_user::text, 2 * 21", &[]).await.unwrap();
        assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, i32>(1)), ("alice", 42));
        drop(client);
        conn.await.unwrap().unwrap();
    });
}

/// libpq 17 with `sslnegotiation=direct` insists that the server selects ALPN "postgresql" (and
/// PostgreSQL 17 servers do); control's PostgreSQL listener configures no ALPN at all.
#[test]
fn direct_tls_negotiates_alpn_postgresql() {
    let h = Harness::start("alpn").unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let mut tls = h.tls(Some(&cert)).unwrap();
    tls.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut conn = rustls::ClientConnection::new(Arc::new(tls), "localhost".try_into().unwrap()).unwrap();
    let mut sock = raw_connect(h.pg_port(), Duration::from_secs(5)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    assert_eq!(conn.alpn_protocol(), Some(&b"postgresql"[..]));
}

#[test]
fn db_ls_lists_demo_with_labels() {
    let h = Harness::start("dbls").unwrap();
    h.login().unwrap();

    let text = h.sluice_ok(&["db", "ls"]).unwrap();
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("Name") && header.contains("Description") && header.contains("Labels"), "{text}");
    let rows: Vec<&str> = lines.filter(|l| !l.starts_with('-')).collect();
    // The stack serves `demo` and `demo-plain` (the same emulator without TLS).
    assert_eq!(rows.len(), 2, "two databases expected:\n{text}");
    let cols: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(cols.first(), Some(&"demo"), "{text}");
    assert_eq!(cols.last(), Some(&"env=dev"), "{text}");
    assert!(rows[0].contains("RDS Proxy in us-east-1"), "{text}");

    let json = h.sluice_ok(&["db", "ls", "--format", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let dbs = v.as_array().expect("a JSON array");
    assert_eq!(dbs.len(), 2, "{json}");
    assert_eq!(dbs[0]["name"], "demo");
    assert_eq!(dbs[1]["name"], "demo-plain");
    assert_eq!(dbs[0]["protocol"], "postgres");
    assert_eq!(dbs[0]["labels"], serde_json::json!({ "env": "dev" }));
    let uri = dbs[0]["uri"].as_str().unwrap();
    assert_eq!(uri, format!("{}:{}", h.stack.emulator.endpoint, h.stack.emulator.port));

    // A user whose roles match no label sees nothing.
    h.state.upsert_role(&prod_only_role()).unwrap();
    h.state.add_user("carol", "carol-pw", &["prod-only".into()]).unwrap();
    let carol_home = h.dir.join("carol-home");
    let ca = h.ca_file.to_string_lossy().into_owned();
    let out = h
        .sluice_as(&carol_home, "carol-pw", ["login", "--proxy", &h.api_addr(), "--user", "carol", "--ca-file", &ca])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = h.sluice_as(&carol_home, "carol-pw", ["db", "ls", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));

    // A wrong password is refused.
    let out = h
        .sluice_as(
            &h.dir.join("eve-home"),
            "wrong",
            ["login", "--proxy", &h.api_addr(), "--user", "alice", "--ca-file", &ca],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid user name or password"));
}

fn prod_only_role() -> sluice_tests::sluice_control::rbac::Role {
    role(serde_json::json!({
        "kind": "role",
        "metadata": { "name": "prod-only" },
        "spec": { "allow": { "db_labels": { "env": "prod" }, "db_names": ["*"], "db_users": ["*"] } }
    }))
    .unwrap()
}
