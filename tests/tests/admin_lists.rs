//! Every `control … ls` prints a table for people (times as RFC 3339, with how long until or
//! since) or, with `--format json`, one JSON array for scripts.

use anyhow::{Context, Result};
use sluice_tests::{auth_control, Harness};

fn json(h: &Harness, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let out = auth_control(&h.stack.control, &all)?;
    serde_json::from_str(&out).with_context(|| format!("{args:?} --format json printed {out}"))
}

#[test]
fn lists_come_as_tables_with_dates_or_as_json() -> Result<()> {
    let h = Harness::start("admin-lists")?;
    auth_control(&h.stack.control, &["tokens", "add", "--type=db", "--ttl", "1h"])?;
    auth_control(&h.stack.control, &["locks", "add", "--user", "bob", "--ttl", "2h", "--message", "audit"])?;

    let users = json(&h, &["users", "ls"])?;
    assert!(users.iter().any(|u| u["name"] == "alice" && u["roles"][0] == "dev"), "{users:?}");
    let roles = json(&h, &["roles", "ls"])?;
    assert!(roles.iter().any(|r| r["metadata"]["name"] == "dev"), "{roles:?}");
    assert!(json(&h, &["sessions", "ls"])?.is_empty(), "no session is live yet");
    let dbs = json(&h, &["db", "ls"])?;
    assert!(dbs.iter().any(|d| d["name"] == "demo"), "{dbs:?}");

    let tokens = json(&h, &["tokens", "ls"])?;
    let expires = tokens[0]["expires"].as_str().context("no expiry")?;
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)?;
    let table = auth_control(&h.stack.control, &["tokens", "ls"])?;
    assert!(table.contains(expires) && (table.contains("in 59m") || table.contains("in 1h")), "{table}");

    let locks = json(&h, &["locks", "ls"])?;
    assert_eq!(locks[0]["user"], "bob");
    assert_eq!(locks[0]["db"], serde_json::Value::Null);
    let lock_expiry = locks[0]["expires"].as_str().context("no expiry")?;
    time::OffsetDateTime::parse(lock_expiry, &time::format_description::well_known::Rfc3339)?;
    let table = auth_control(&h.stack.control, &["locks", "ls"])?;
    assert!(table.contains(lock_expiry) && table.contains("audit"), "{table}");
    Ok(())
}
