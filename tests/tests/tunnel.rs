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

/// Starts the tunnel (its stderr to `log`); its port, from the line it prints.
fn start_tunnel(h: &Harness, db: &str, log: &std::path::Path) -> Result<(Tunnel, u16)> {
    let mut child = Command::new(find_bin("sluice")?)
        .args(["proxy", "db", "--tunnel", db])
        .env("SLUICE_HOME", &h.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let tunnel = Tunnel { child, _stdout: stdout };
    let port =
        line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).with_context(|| format!("no port in {line:?}"))?;
    Ok((tunnel, port))
}

/// psql's environment for the tunnel: plaintext, no password.
fn tunnel_env(port: u16) -> Vec<(String, String)> {
    [
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", port.to_string()),
        ("PGUSER", "alice".to_owned()),
        ("PGDATABASE", "demo".to_owned()),
        ("PGSSLMODE", "disable".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// With `auth_service.db_cert_ttl` shorter than the login, the tunnel fetches a new database
/// certificate when the one it has is about to expire, and sessions go on opening.
#[test]
fn the_tunnel_renews_the_certificate_within_the_login() -> Result<()> {
    let mut h = Harness::start("tunnel-renew")?;
    h.restart_control(|c| c.auth_service.db_cert_ttl = Some(Duration::from_secs(3)))?;
    h.login_demo()?;
    let first = std::fs::read_to_string(h.home.join("db/demo.crt"))?;
    let log = h.dir.join("tunnel.log");
    let (_tunnel, port) = start_tunnel(&h, "demo", &log)?;
    assert_eq!(psql_query(&tunnel_env(port), "select 1")?.trim(), "1");
    // Past the first certificate's expiry (and the one fetched for that session).
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(psql_query(&tunnel_env(port), "select 2")?.trim(), "2");
    let renewals = std::fs::read_to_string(&log)?.matches("fetched a new certificate").count();
    assert!(renewals >= 2, "{}", std::fs::read_to_string(&log)?);
    assert_ne!(std::fs::read_to_string(h.home.join("db/demo.crt"))?, first, "the certificate file was not replaced");
    Ok(())
}

#[test]
fn plaintext_clients_reach_the_database_through_the_tunnel() -> Result<()> {
    let h = Harness::start("tunnel")?;
    h.login_demo()?;
    let (_tunnel, port) = start_tunnel(&h, "demo", &h.dir.join("tunnel.log"))?;

    // psql with no certificate, no TLS, no password.
    let env = tunnel_env(port);
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
