//! Bulk data through Sluice: a 1 GB (~1 GiB) `COPY ... TO STDOUT` read with psql through control (mTLS,
//! the relay, TLS to the emulator, the emulator's relay) must be byte-for-byte what the same COPY
//! gives straight from PostgreSQL. Prints sizes and timings.

use sluice_tests::{md5_of_stdout, psql_cmd, Harness};

const ROWS: u64 = 1_040_000;
const COPY: &str = "COPY (select repeat('x', 1000) || i from generate_series(1, 1040000) i) TO STDOUT";

/// The exact size of the COPY output: each row is 1000 x's, the row number and a newline.
fn expected_size() -> u64 {
    (1..=ROWS).map(|i| 1000 + i.to_string().len() as u64 + 1).sum()
}

#[test]
fn one_gib_copy_matches_direct_postgres() {
    let h = Harness::start("copy").unwrap();
    let via_sluice = h.login_demo().unwrap();
    let direct: Vec<(String, String)> = vec![
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), h.stack.postgres.port.to_string()),
        ("PGUSER".into(), "alice".into()),
        ("PGDATABASE".into(), "demo".into()),
        ("PGPASSWORD".into(), h.stack.db_password.clone()),
        ("PGSSLMODE".into(), "disable".into()),
    ];

    let mut cmd = psql_cmd(&direct);
    cmd.args(["-c", COPY]);
    let (direct_md5, direct_bytes, direct_time) = md5_of_stdout(cmd).unwrap();
    let mut cmd = psql_cmd(&via_sluice);
    cmd.args(["-c", COPY]);
    let (sluice_md5, sluice_bytes, sluice_time) = md5_of_stdout(cmd).unwrap();

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "COPY direct to PostgreSQL: {direct_bytes} bytes ({:.1} MiB) in {direct_time:.2?} ({:.1} MiB/s), md5 {direct_md5}",
        mib(direct_bytes),
        mib(direct_bytes) / direct_time.as_secs_f64()
    );
    eprintln!(
        "COPY through Sluice:       {sluice_bytes} bytes ({:.1} MiB) in {sluice_time:.2?} ({:.1} MiB/s), md5 {sluice_md5}",
        mib(sluice_bytes),
        mib(sluice_bytes) / sluice_time.as_secs_f64()
    );
    assert_eq!(direct_bytes, expected_size(), "direct COPY size");
    assert!(direct_bytes > 1_000_000_000, "the COPY should be over 1 GB");
    assert_eq!(sluice_bytes, direct_bytes, "COPY through Sluice has a different size");
    assert_eq!(sluice_md5, direct_md5, "COPY through Sluice has different content");

    // The session's end is audited with the bytes relayed (the COPY data went to the client).
    let end = sluice_tests::wait_until(std::time::Duration::from_secs(10), "db.session.end", || {
        Ok(h.audit()?.into_iter().rev().find(|e| e.event == "db.session.end"))
    })
    .unwrap();
    let to_client = end.data["bytes_to_client"].as_u64().unwrap_or(0);
    eprintln!("audit: bytes_to_client {to_client}, duration_ms {}", end.data["duration_ms"]);
    assert!(to_client >= sluice_bytes, "audit says {to_client} bytes went to the client");
}
