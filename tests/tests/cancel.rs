//! Query cancellation through Sluice: psql 15 sends a plaintext CancelRequest to control's port
//! when it gets SIGINT; tokio-postgres sends its CancelRequest inside TLS (with the client
//! certificate). Both must stop a running `pg_sleep(60)` within seconds.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_tests::{client_config_from_pem, runtime, wait_until, Harness};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How many backends are running `sql` right now (asked of PostgreSQL directly).
fn running(h: &Harness, sql: &str) -> usize {
    let q = format!(
        "select count(*) from pg_stat_activity where state = 'active' and query = '{}'",
        sql.replace('\'', "''")
    );
    h.stack.postgres.psql("postgres", &q).unwrap().parse().unwrap()
}

#[test]
fn psql_sigint_cancels_the_running_query() {
    let h = Harness::start("cancelpsql").unwrap();
    let env = h.login_demo().unwrap();
    let sql = "select pg_sleep(60)";

    let mut cmd = sluice_tests::psql_cmd(&env);
    cmd.args(["-c", sql]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    // Wait until the query really runs in PostgreSQL, then give it about a second more.
    wait_until(Duration::from_secs(30), "pg_sleep to be running", || Ok((running(&h, sql) == 1).then_some(())))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    kill(pid, Signal::SIGINT).unwrap();
    let signalled = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("psql did not exit within 10 s of SIGINT");
        }
    };
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("psql exited {:.2?} after SIGINT: {}", took, stderr.trim());
    assert!(!out.status.success());
    assert!(stderr.contains("canceling statement due to user request"), "{stderr}");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    assert_eq!(running(&h, sql), 0, "pg_sleep still running in PostgreSQL");

    // The session machinery is fine afterwards.
    assert_eq!(sluice_tests::psql_query(&env, "select 'after'").unwrap(), "after");
}

#[test]
fn tokio_postgres_cancel_token_cancels_inside_tls() {
    let h = Harness::start("canceltp").unwrap();
    let cert = h.issue_cert("alice", "demo", "alice", "demo").unwrap();
    let sql = "select pg_sleep(60)";
    runtime().unwrap().block_on(async {
        let c = h.connect_with(Some(&cert), "alice", "demo").await.unwrap_or_else(|e| panic!("connect: {e}"));
        let client = std::sync::Arc::new(c.client);
        let query = {
            let client = client.clone();
            tokio::spawn(async move { client.simple_query(sql).await })
        };
        let started = Instant::now();
        loop {
            let n = tokio::task::block_in_place(|| running(&h, sql));
            if n == 1 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "pg_sleep never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let tls = MakeRustlsConnect::new(client_config_from_pem(&h.ca_pem, Some(&cert)).unwrap());
        let sent = Instant::now();
        client.cancel_token().cancel_query(tls).await.expect("sending the cancel request");
        let result = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the query was not cancelled within 10 s")
            .unwrap();
        let took = sent.elapsed();
        eprintln!("tokio-postgres query ended {took:.2?} after the cancel request");
        let err = result.expect_err("pg_sleep(60) finished instead of being cancelled");
        assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
        assert!(took < Duration::from_secs(5), "cancel took {took:?}");

        // PostgreSQL's postmaster signals a cancelled backend twice (its pid and its process
        // group); a second SIGINT that lands while the backend reads the next query is held
        // back and cancels the query after it. Idle, the backend ignores it: wait that out, or
        // the bogus-key check below sees the legitimate cancel strike again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The same session keeps working.
        let rows = client.simple_query("select 'still here'").await.unwrap();
        let first = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(first.as_deref(), Some("still here"));

        // A cancel request with a wrong key is ignored: a new long query keeps running.
        let query = {
            let client = client.clone();
            tokio::spawn(async move { client.simple_query("select pg_sleep(3)").await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bogus = sluice_tests::cancel_request(0x1234_5678, 0x0bad_cafe);
        let port = h.pg_port();
        tokio::task::block_in_place(|| {
            let mut s = sluice_tests::raw_connect(port, Duration::from_secs(5)).unwrap();
            sluice_tests::write_lenient(&mut s, &bogus).unwrap();
            let (bytes, _) = sluice_tests::read_to_close(&mut s, Duration::from_secs(5)).unwrap();
            assert!(bytes.is_empty(), "a cancel request gets no answer, got {bytes:?}");
        });
        let result = tokio::time::timeout(Duration::from_secs(10), query).await.unwrap().unwrap();
        assert!(result.is_ok(), "a bogus cancel key cancelled the query: {result:?}");
        drop(client);
    });
}
