//! The web console in headless Chromium (Debian's `chromium` and `chromium-driver`, driven over
//! WebDriver): log in, see the database, start a psql session and watch its byte counter grow on
//! the live sessions page, end it with the button, and find the kill in the audit log. With
//! `SLUICE_SCREENSHOTS=DIR` the pages are saved there as PNG (the README's pictures).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use sluice_control::demo::free_port;
use sluice_tests::{psql_cmd, wait_until, Harness};

/// Chromium and its driver, which must be there under CI=true (scripts/setup installs them).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| names.iter().map(PathBuf::from).find(|p| p.exists());
    let found = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]).zip(find(&["/usr/bin/chromedriver"]));
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but chromium or chromedriver is missing (run scripts/setup)");
    }
    found
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// psql reading statements from a pipe.
struct Psql<'a> {
    stdin: &'a Mutex<ChildStdin>,
    child: Mutex<Child>,
    log: PathBuf,
}

impl Psql<'_> {
    fn send(&self, sql: &str) -> Result<()> {
        let mut stdin = self.stdin.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        writeln!(stdin, "{sql}")?;
        Ok(stdin.flush()?)
    }

    /// `Some` once psql has exited.
    fn exited(&self) -> Result<Option<()>> {
        let mut child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(child.try_wait()?.map(|_| ()))
    }
}

impl Drop for Psql<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn text_of(c: &Client, css: &str) -> Result<String> {
    Ok(c.find(Locator::Css(css)).await?.text().await?)
}

/// Polls `f` every 100 ms for up to `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(v)) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shot(c: &Client, dir: Option<&Path>, name: &str) -> Result<()> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(name), c.screenshot().await?)?;
    }
    Ok(())
}

#[test]
fn a_browser_logs_in_watches_a_session_and_ends_it() -> Result<()> {
    let Some((chromium, chromedriver)) = browser() else {
        eprintln!("chromium/chromedriver not installed: browser test skipped (CI requires them)");
        return Ok(());
    };
    let mut h = Harness::start("web-browser")?;
    let web = h.enable_web_console(|_| {})?;
    let shots = std::env::var_os("SLUICE_SCREENSHOTS").map(PathBuf::from);

    let port = free_port()?;
    let driver = Driver(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(h.dir.join("chromedriver.log"))?)
            .spawn()?,
    );
    wait_until(Duration::from_secs(20), "chromedriver", || Ok(std::net::TcpStream::connect(("127.0.0.1", port)).ok()))?;
    let profile = h.dir.join("chromium-profile");
    let rt = sluice_tests::runtime()?;
    // A psql session fed from a pipe, as `eval "$(sluice db env demo)"; psql` would run it.
    let env = h.login_demo()?;
    let psql_log = h.dir.join("psql.log");
    let mut psql =
        psql_cmd(&env).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(std::fs::File::create(&psql_log)?).spawn()?;
    let stdin = Mutex::new(psql.stdin.take().context("no stdin")?);
    let session = Psql { stdin: &stdin, child: Mutex::new(psql), log: psql_log };
    session.send("select 1;")?;
    let result = rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                // The console's certificate is from Sluice's CA, which this profile does not know.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                         "--window-size=1280,800", format!("--user-data-dir={}", profile.display())]
            }),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("starting Chromium through chromedriver")?;
        let outcome = drive(&c, &web, &h, &session, shots.as_deref()).await;
        let _ = c.close().await;
        outcome
    });
    drop(driver);
    result
}

async fn drive(c: &Client, web: &str, h: &Harness, session: &Psql<'_>, shots: Option<&Path>) -> Result<()> {
    // Log in.
    c.goto(&format!("https://{web}/login")).await?;
    shot(c, shots, "console-login.png").await?;
    c.find(Locator::Id("user")).await?.send_keys("alice").await?;
    c.find(Locator::Id("password")).await?.send_keys(&h.password).await?;
    c.find(Locator::Id("login")).await?.click().await?;
    let dbs = eventually(Duration::from_secs(10), "the databases page", || async {
        Ok(text_of(c, "#databases").await.ok().filter(|t| t.contains("demo")))
    })
    .await?;
    assert!(dbs.contains("sluice db connect demo"), "{dbs}");
    shot(c, shots, "console-databases.png").await?;

    // The live session: its row appears and its byte counter grows with traffic.
    c.goto(&format!("https://{web}/sessions")).await?;
    let row = "#sessions tbody tr";
    let first = eventually(Duration::from_secs(10), "the session's row", || async {
        Ok(text_of(c, &format!("{row} .bytes-out")).await.ok())
    })
    .await?;
    session.send("select repeat('x', 2000000);")?;
    let grown = eventually(Duration::from_secs(10), "the byte counter to grow", || async {
        Ok(text_of(c, &format!("{row} .bytes-out")).await.ok().filter(|t| *t != first))
    })
    .await?;
    eprintln!("[web-browser] bytes to the client: {first} -> {grown}");
    assert!(grown.contains("MiB"), "2 MB sent, the page shows {grown}");
    shot(c, shots, "console-sessions.png").await?;

    // End it with the button.
    c.find(Locator::Css(&format!("{row} button.end"))).await?.click().await?;
    // psql finds its connection gone at its next statement: keep sending one until it has (a
    // single one sent right after the click could run before the end took effect, and psql
    // would then wait on stdin for good).
    eventually(Duration::from_secs(5), "psql to lose its session", || async {
        if session.exited()?.is_some() {
            return Ok(Some(()));
        }
        let _ = session.send("select 1;");
        Ok(None)
    })
    .await?;
    let said = std::fs::read_to_string(&session.log)?;
    assert!(said.contains("connection"), "psql said: {said}");
    eventually(Duration::from_secs(10), "the sessions table to empty", || async {
        Ok(c.find_all(Locator::Css(row)).await.ok().filter(|rows| rows.is_empty()).map(|_| ()))
    })
    .await?;

    // The audit log shows who ended it.
    c.goto(&format!("https://{web}/audit?event=web.session.kill")).await?;
    let audit = text_of(c, "#audit").await?;
    assert!(audit.contains("web.session.kill") && audit.contains("alice"), "{audit}");
    shot(c, shots, "console-audit.png").await?;
    Ok(())
}
