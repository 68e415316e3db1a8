//! `sluice proxy db --tunnel`: clients that cannot present a certificate (GUI tools, JDBC-style
//! drivers with `sslmode=disable`) connect in plaintext to a local listener, which opens each
//! session to Sluice with the user's certificate. Tested with psql and tokio-postgres without TLS,
//! including a cancel request passed through the tunnel.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_control::demo::find_bin;
use sluice_tests::{psql_query, Harness};

/// The tunnel process, and its stdout (kept open: the tunnel writes to it).
struct Tunnel {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the tunnel; its port, from the line it prints.
fn start_tunnel(h: &Harness, db: &str) -> Result<(Tunnel, u16)> {
    let mut child = Command::new(find_bin("sluice")?)
        .args(["proxy", "db", "--tunnel", db])
        .env("SLUICE_HOME", &h.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let tunnel = Tunnel { child, _stdout: stdout };
    let port =
        line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).with_context(|| format!("no port in {line:?}"))?;
    Ok((tunnel, port))
}

#[test]
fn plaintext_clients_reach_the_database_through_the_tunnel() -> Result<()> {
    let h = Harness::start("tunnel")?;
    h.login_demo()?;
    let (_tunnel, port) = start_tunnel(&h, "demo")?;

    // psql with no certificate, no TLS, no password.
    let env: Vec<(String, String)> = [
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", port.to_string()),
        ("PGUSER", "alice".to_owned()),
        ("PGDATABASE", "demo".to_owned()),
        ("PGSSLMODE", "disable".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(psql_query(&env, "select 40 + 2")?.trim(), "42");
    // libpq's default sslmode=prefer asks for TLS first and takes the `N`.
    let prefer: Vec<(String, String)> = env.iter().filter(|(k, _)| k != "PGSSLMODE").cloned().collect();
    assert_eq!(psql_query(&prefer, "select current_user")?.trim(), "alice");

    // A driver without TLS, and a cancel sent through the tunnel.
    let rt = sluice_tests::runtime()?;
    rt.block_on(async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(port)
            .user("alice")
            .dbname("demo")
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let v: i32 = client.query_one("select 7", &[]).await?.get(0);
        assert_eq!(v, 7);
        let token = client.cancel_token();
        let sleep = client.simple_query("select pg_sleep(30)");
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        };
        let started = std::time::Instant::now();
        let (result, cancelled) = tokio::join!(sleep, cancel);
        cancelled?;
        let err = result.err().context("the query was not cancelled")?;
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // The session goes on after the cancel.
        let v: i32 = client.query_one("select 8", &[]).await?.get(0);
        assert_eq!(v, 8);
        anyhow::Ok(())
    })?;

    // Another database user than the certificate's is Sluice's refusal, passed through.
    let mut wrong = env.clone();
    wrong.iter_mut().filter(|(k, _)| k == "PGUSER").for_each(|(_, v)| *v = "postgres".into());
    let refused = psql_query(&wrong, "select 1").unwrap_err().to_string();
    assert!(refused.contains("does not match the certificate"), "{refused}");
    Ok(())
}
