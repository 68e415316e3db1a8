//! Bulk data through Sluice, both ways, over both kinds of legs this machine has:
//!
//! - TLS legs: psql with mTLS to control, TLS from control to the emulator (the data plane runs
//!   the userspace TLS record path here; kTLS is covered by `dataplane/vm/run-ktls-test`);
//! - plain legs: psql on control's local Unix socket and the emulator without TLS, so the data
//!   plane splices both legs as they are.
//!
//! A ~1 GiB `COPY ... TO STDOUT` must be byte-for-byte what the same COPY gives straight from
//! PostgreSQL, and the same bytes sent with `COPY ... FROM STDIN` through Sluice must land in
//! the table intact (read back directly from PostgreSQL). Prints sizes and timings.

use sluice_tests::{md5_of_stdout, pipe, psql_cmd, psql_query, wait_until, Harness};

const ROWS: u64 = 1_040_000;
const COPY: &str = "COPY (select repeat('x', 1000) || i from generate_series(1, 1040000) i) TO STDOUT";

/// The exact size of the COPY output: each row is 1000 x's, the row number and a newline.
fn expected_size() -> u64 {
    (1..=ROWS).map(|i| 1000 + i.to_string().len() as u64 + 1).sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn copy_out_and_in(h: &Harness, via: &[(String, String)], label: &str, table: &str) -> serde_json::Value {
    let direct = h.direct_env();
    let mut cmd = psql_cmd(&direct);
    cmd.args(["-c", COPY]);
    let (direct_md5, direct_bytes, direct_time) = md5_of_stdout(cmd).unwrap();
    eprintln!(
        "[{label}] COPY out direct: {direct_bytes} bytes ({:.1} MiB) in {direct_time:.2?} ({:.1} MiB/s), md5 {direct_md5}",
        mib(direct_bytes),
        mib(direct_bytes) / direct_time.as_secs_f64()
    );
    assert_eq!(direct_bytes, expected_size(), "direct COPY size");
    assert!(direct_bytes > 1_000_000_000, "the COPY should be over 1 GB");

    let mut cmd = psql_cmd(via);
    cmd.args(["-c", COPY]);
    let (out_md5, out_bytes, out_time) = md5_of_stdout(cmd).unwrap();
    eprintln!(
        "[{label}] COPY out via Sluice: {out_bytes} bytes in {out_time:.2?} ({:.1} MiB/s), md5 {out_md5}",
        mib(out_bytes) / out_time.as_secs_f64()
    );
    assert_eq!(out_bytes, direct_bytes, "COPY out through Sluice has a different size");
    assert_eq!(out_md5, direct_md5, "COPY out through Sluice has different content");
    // Sessions through Sluice, in order: this COPY out, CREATE TABLE, COPY in, DROP TABLE.
    let out_end = session_end(h, 1);

    // COPY in: the generator's output (read directly) is written through Sluice.
    psql_query(via, &format!("CREATE UNLOGGED TABLE {table} (line text)")).unwrap();
    let mut producer = psql_cmd(&direct);
    producer.args(["-c", COPY]);
    let mut consumer = psql_cmd(via);
    consumer.args(["-c", &format!("COPY {table} FROM STDIN")]);
    let started = std::time::Instant::now();
    pipe(producer, consumer).unwrap();
    let in_time = started.elapsed();
    eprintln!("[{label}] COPY in via Sluice: {direct_bytes} bytes in {in_time:.2?} ({:.1} MiB/s)", {
        mib(direct_bytes) / in_time.as_secs_f64()
    });
    let mut back = psql_cmd(&direct);
    back.args(["-c", &format!("COPY {table} TO STDOUT")]);
    let (in_md5, in_bytes, _) = md5_of_stdout(back).unwrap();
    assert_eq!(in_bytes, direct_bytes, "COPY in through Sluice stored a different size");
    assert_eq!(in_md5, direct_md5, "COPY in through Sluice stored different content");
    let in_end = session_end(h, 3);
    let from_client = in_end["bytes_from_client"].as_u64().unwrap_or(0);
    assert!(from_client >= direct_bytes, "audit says {from_client} bytes came from the client");
    psql_query(via, &format!("DROP TABLE {table}")).unwrap();
    out_end
}

/// The data of this harness's `n`th `db.session.end` event (1 = the first), once it exists.
fn session_end(h: &Harness, n: usize) -> serde_json::Value {
    wait_until(std::time::Duration::from_secs(10), "db.session.end", || {
        let mut ends: Vec<_> = h.audit()?.into_iter().filter(|e| e.event == "db.session.end").collect();
        ends.sort_by_key(|e| e.id);
        Ok(ends.get(n - 1).map(|e| e.data.clone()))
    })
    .unwrap()
}

#[test]
fn one_gib_copy_both_ways_over_tls_legs() {
    let h = Harness::start("copy-tls").unwrap();
    let via_sluice = h.login_demo().unwrap();
    let end = copy_out_and_in(&h, &via_sluice, "tls legs", "copy_in_tls");
    let to_client = end["bytes_to_client"].as_u64().unwrap_or(0);
    eprintln!("audit: bytes_to_client {to_client}, duration_ms {}", end["duration_ms"]);
    assert!(to_client >= expected_size(), "audit says {to_client} bytes went to the client");
    assert_eq!(end["data_plane"], true, "the session should have been handed to the dataplane: {end}");
    assert_eq!(end["legs"], serde_json::json!({"client": "tls", "upstream": "tls"}), "{end}");
}

#[test]
fn one_gib_copy_both_ways_over_spliced_plain_legs() {
    let h = Harness::start("copy-splice").unwrap();
    let local = h.local_env(sluice_tests::sluice_control::demo::DEMO_PLAIN_DB).unwrap();
    let end = copy_out_and_in(&h, &local, "plain legs", "copy_in_plain");
    let to_client = end["bytes_to_client"].as_u64().unwrap_or(0);
    assert!(to_client >= expected_size(), "audit says {to_client} bytes went to the client");
    assert_eq!(end["data_plane"], true, "the session should have been handed to the dataplane: {end}");
    assert_eq!(end["legs"], serde_json::json!({"client": "plain", "upstream": "plain"}), "{end}");
}
