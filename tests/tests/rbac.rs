//! Role-based access at connect time. Certificates are issued directly with control's CA, so the
//! API's pre-check in `sluice db login` is bypassed and control's own check when the PostgreSQL
//! session starts is what allows or refuses: by database user, by database name, by labels, and a
//! deny rule winning over an allow. `sluice db login` itself must refuse a disallowed database user.

use serde_json::json;
use sluice_tests::{role, runtime, Harness};
use tokio_postgres::error::SqlState;

/// Asserts a refusal by control: SQLSTATE 28000 with `needle` in the message.
fn assert_denied(err: &tokio_postgres::Error, needle: &str) {
    let db = err.as_db_error().unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    assert_eq!(err.code(), Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{db:?}");
    assert!(db.message().contains(needle), "message {:?} does not contain {needle:?}", db.message());
}

#[test]
fn connect_time_checks_allow_and_deny() {
    let h = Harness::start("rbac").unwrap();
    h.state
        .upsert_role(
            &role(json!({
                "kind": "role",
                "metadata": { "name": "prod-only" },
                "spec": { "allow": { "db_labels": { "env": "prod" }, "db_names": ["*"], "db_users": ["*"] } }
            }))
            .unwrap(),
        )
        .unwrap();
    h.state
        .upsert_role(
            &role(json!({
                "kind": "role",
                "metadata": { "name": "no-alice-user" },
                "spec": { "deny": { "db_users": ["alice"] } }
            }))
            .unwrap(),
        )
        .unwrap();
    h.state.add_user("carol", "carol-pw", &["prod-only".into()]).unwrap();
    h.state.add_user("dave", "dave-pw", &["dev".into(), "no-alice-user".into()]).unwrap();

    runtime().unwrap().block_on(async {
        // Allowed: role dev grants env=dev, database name demo, database user alice.
        let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
        let c = h
            .connect_with(Some(&cert), "alice", "demo")
            .await
            .unwrap_or_else(|e| panic!("allowed session refused: {e}"));
        let n: i32 = c.client.query_one("select 7", &[]).await.unwrap().get(0);
        assert_eq!(n, 7);
        c.close().await.unwrap();

        // Denied by database user.
        let cert = h.issue_cert("alice", "demo", "bob", "demo").unwrap();
        let err = h.connect_with(Some(&cert), "bob", "demo").await.err().expect("db user bob must be refused").pg();
        assert_denied(&err, "database user \"bob\"");

        // Denied by database name.
        let cert = h.issue_cert("alice", "demo", "alice", "other").unwrap();
        let err =
            h.connect_with(Some(&cert), "alice", "other").await.err().expect("db name other must be refused").pg();
        assert_denied(&err, "database name \"other\"");

        // Denied by labels: carol's only role allows env=prod; demo is env=dev.
        let cert = h.issue_cert("carol", "demo", "alice", "demo").unwrap();
        let err = h.connect_with(Some(&cert), "alice", "demo").await.err().expect("labels must not match").pg();
        assert_denied(&err, "labels do not match");

        // Deny wins over allow: dave has dev (allows alice) and no-alice-user (denies alice).
        let dave = h.issue_cert("dave", "demo", "alice", "demo").unwrap();
        let err = h.connect_with(Some(&dave), "alice", "demo").await.err().expect("the deny rule must win").pg();
        assert_denied(&err, "role \"no-alice-user\" denies database user \"alice\"");

        // Roles are read per connection: without the deny role, the same certificate works.
        h.state.update_user_roles("dave", &["dev".into()]).unwrap();
        let c = h.connect_with(Some(&dave), "alice", "demo").await.unwrap_or_else(|e| panic!("dave without deny: {e}"));
        let who: String = c.client.query_one("select current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, "alice");
        c.close().await.unwrap();
        // ... and taking every role away refuses it again.
        h.state.update_user_roles("dave", &[]).unwrap();
        let err = h.connect_with(Some(&dave), "alice", "demo").await.err().expect("no roles, no access").pg();
        assert_denied(&err, "has no roles");

        // The StartupMessage must agree with the certificate's route.
        let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
        let err = h.connect_with(Some(&cert), "postgres", "demo").await.err().expect("user mismatch").pg();
        assert_denied(&err, "does not match the certificate");
        let err = h.connect_with(Some(&cert), "alice", "postgres").await.err().expect("db name mismatch").pg();
        assert_denied(&err, "does not match the certificate");

        // A certificate of a user who no longer exists.
        let ghost = h.issue_cert("ghost", "demo", "alice", "demo").unwrap();
        let err = h.connect_with(Some(&ghost), "alice", "demo").await.err().expect("unknown user").pg();
        assert_denied(&err, "user \"ghost\" does not exist");
    });

    // The API refuses to issue a certificate for a database user no role allows.
    h.login().unwrap();
    let out = h.sluice(["db", "login", "demo", "--db-user", "bob", "--db-name", "demo"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sluice db login --db-user bob succeeded");
    assert!(stderr.contains("access denied") && stderr.contains("database user \"bob\""), "{stderr}");
    assert!(!h.home.join("db").join("demo.crt").exists(), "a certificate was written despite the refusal");
    // ... and for a database name no role allows.
    let out = h.sluice(["db", "login", "demo", "--db-user", "alice", "--db-name", "secrets"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database name \"secrets\""));
    // The allowed route is issued.
    h.sluice_ok(&["db", "login", "demo", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    assert!(h.home.join("db").join("demo.crt").is_file());
}
