//! The AWS side: control signing with wrong AWS credentials is refused by RDS Proxy (the emulator)
//! with SQLSTATE 28P01, which reaches the client with a hint about the AWS credentials; and
//! `sluice aws rds-token` prints a token the emulator accepts from stock psql.

use std::process::Command;

use sluice_tests::sluice_control::demo::{find_bin, AwsCreds, DEMO_REGION};
use sluice_tests::{check_output, psql, runtime, Harness};
use tokio_postgres::error::SqlState;

#[test]
fn wrong_aws_credentials_are_reported_to_the_client() {
    let creds = AwsCreds { secret_key: "wrong".into(), ..AwsCreds::demo() };
    let h = Harness::start_with_creds("awscreds", &creds).unwrap();
    let env = h.login_demo().unwrap();

    runtime().unwrap().block_on(async {
        let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
        let err =
            h.connect_with(Some(&cert), "alice", "demo").await.err().expect("wrong AWS credentials must fail").pg();
        let db = err.as_db_error().unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{db:?}");
        assert!(db.message().contains("IAM authentication"), "message: {:?}", db.message());
        let hint = db.hint().unwrap_or_else(|| panic!("no hint in {db:?}"));
        assert!(hint.contains("AWS credentials"), "hint: {hint:?}");
    });

    // psql shows the same to a user.
    let out = psql(&env, &["-c", "select 1"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("IAM authentication"), "{stderr}");
    assert!(stderr.contains("AWS credentials"), "{stderr}");

    // The failure is in the audit log with the upstream's reason.
    // Audit events are written off the connection path: wait for it.
    let refused = sluice_tests::wait_until(std::time::Duration::from_secs(10), "a failed db.session.start", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.start" && !e.success))
    })
    .unwrap();
    let reason = refused.data["error"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("IAM authentication") && reason.contains("28P01"), "{reason}");
}

#[test]
fn sluice_aws_rds_token_is_accepted_by_the_emulator() {
    let h = Harness::start("rdstoken").unwrap();
    let emu = &h.stack.emulator;
    let demo = AwsCreds::demo();
    let token_for = |creds: &AwsCreds, user: &str| {
        let mut cmd = Command::new(find_bin("sluice").unwrap());
        cmd.args(["aws", "rds-token", "--host", &emu.endpoint, "--port", &emu.port.to_string()])
            .args(["--user", user, "--region", DEMO_REGION])
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env("AWS_CONFIG_FILE", h.dir.join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", h.dir.join("no-aws-credentials"));
        creds.apply(&mut cmd);
        let out = cmd.output().unwrap();
        check_output("sluice aws rds-token", &out).unwrap().trim().to_owned()
    };
    let token = token_for(&demo, "alice");
    assert!(token.starts_with(&format!("{}:{}/?Action=connect&DBUser=alice&", emu.endpoint, emu.port)), "{token}");
    assert!(token.contains(&format!("X-Amz-Credential={}%2F", demo.access_key)), "{token}");

    let env = |password: &str| -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), emu.port.to_string()),
            ("PGSSLMODE".into(), "verify-full".into()),
            ("PGSSLROOTCERT".into(), emu.ca_file.to_string_lossy().into_owned()),
            ("PGUSER".into(), "alice".into()),
            ("PGDATABASE".into(), "demo".into()),
            ("PGPASSWORD".into(), password.into()),
            ("PGCONNECT_TIMEOUT".into(), "20".into()),
        ]
    };
    let out = psql(&env(&token), &["-c", "select 1, current_user"]).unwrap();
    assert_eq!(check_output("psql to the emulator", &out).unwrap().trim(), "1|alice");

    // The emulator really checks: a token signed with another secret is refused.
    let bad = token_for(&AwsCreds { secret_key: "wrong".into(), ..demo.clone() }, "alice");
    assert_ne!(bad, token);
    let out = psql(&env(&bad), &["-c", "select 1"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("IAM authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and so is alice's token used as another user.
    let mut as_postgres = env(&token);
    as_postgres.retain(|(k, _)| k != "PGUSER");
    as_postgres.push(("PGUSER".into(), "postgres".into()));
    let out = psql(&as_postgres, &["-c", "select 1"]).unwrap();
    assert!(!out.status.success(), "alice's token let psql in as postgres");
}
