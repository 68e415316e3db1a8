//! The web console over HTTPS, as a browser drives it (forms, cookies, the JSON the page polls):
//! login and its refusal, the databases a user may see with their connect commands, and for an
//! admin the live sessions with their counters, ending one (audited with the admin's name),
//! locks and the filtered audit log; a non-admin gets 403 there, a form without the CSRF token
//! is refused, and user-supplied text is escaped.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use sluice_tests::{https_request, shared_db, wait_until, Harness, HttpResponse};

struct Console {
    addr: String,
    ca: String,
}

impl Console {
    fn get(&self, path: &str, cookie: Option<&str>) -> Result<HttpResponse> {
        let headers: Vec<(&str, String)> = cookie.map(|c| vec![("Cookie", c.to_owned())]).unwrap_or_default();
        https_request(&self.addr, &self.ca, "GET", path, &headers, b"")
    }

    fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Result<HttpResponse> {
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded".to_owned())];
        if let Some(c) = cookie {
            headers.push(("Cookie", c.to_owned()));
        }
        https_request(&self.addr, &self.ca, "POST", path, &headers, body.as_bytes())
    }

    /// Logs in; the cookie to send back.
    fn login(&self, user: &str, password: &str) -> Result<String> {
        let r = self.post("/login", None, &[("user", user), ("password", password)])?;
        anyhow::ensure!(r.status == 303, "login as {user}: {} {}", r.status, r.body);
        let set = r.header("set-cookie").context("no cookie")?;
        for flag in ["HttpOnly", "Secure", "SameSite=Strict"] {
            anyhow::ensure!(set.contains(flag), "cookie without {flag}: {set}");
        }
        Ok(set.split(';').next().unwrap_or_default().to_owned())
    }
}

/// The CSRF token a page embeds (`name="csrf" value="…"` or `data-csrf="…"`).
fn csrf(page: &str) -> Result<String> {
    let at = page.find("csrf\" value=\"").map(|i| i + 13).or_else(|| page.find("data-csrf=\"").map(|i| i + 11));
    let at = at.context("no CSRF token in the page")?;
    Ok(page[at..].chars().take_while(|c| c.is_ascii_hexdigit()).collect())
}

#[test]
fn the_console_serves_users_and_admins() -> Result<()> {
    let mut h = Harness::start("web-console")?;
    h.state.add_user("bob", "bob-password", &["dev".to_owned()])?;
    let mut escaped = shared_db(&h, "evil", &[("env", "dev")])?;
    escaped.metadata.description = "<script>alert(1)</script>".into();
    h.state.upsert_database(&escaped)?;
    let resources = vec![serde_json::from_value(json!({"labels": {"env": "dev"}}))?];
    let addr = h.enable_web_console(|c| c.db_service.resources = resources)?;
    let web = Console { addr, ca: h.ca_pem.clone() };

    // Not logged in: to the login page; a wrong password is refused without saying which part.
    assert_eq!(web.get("/", None)?.status, 303);
    let refused = web.post("/login", None, &[("user", "alice"), ("password", "wrong")])?;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("Invalid user name or password"));

    let alice = web.login("alice", &h.password)?;
    let home = web.get("/", Some(&alice))?;
    assert_eq!(home.status, 200, "{}", home.body);
    assert!(home.body.contains("sluice db connect demo"), "{}", home.body);
    assert!(home.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !home.body.contains("<script>alert"));
    let csp = home.header("content-security-policy").context("no CSP")?;
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");

    // A live session in the data plane, with traffic.
    let rt = sluice_tests::runtime()?;
    let cert = h.issue_cert("alice", "demo", "alice", "demo")?;
    let c = rt.block_on(h.connect_with(Some(&cert), "alice", "demo")).map_err(|e| anyhow::anyhow!("{e}"))?;
    rt.block_on(c.client.simple_query("select repeat('x', 100000)"))?;
    let sessions = wait_until(Duration::from_secs(10), "the session in /api/sessions", || {
        let r = web.get("/api/sessions", Some(&alice))?;
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        let s = v["sessions"].as_array().cloned().unwrap_or_default();
        Ok(s.into_iter().find(|s| s["user"] == "alice" && s["bytes_out"].as_u64().unwrap_or(0) > 100_000))
    })?;
    let id = sessions["session_id"].as_str().context("no id")?.to_owned();
    assert_eq!(sessions["db"], "demo");

    // Ending it: refused without the CSRF token, done with it, audited with the admin's name.
    let page = web.get("/sessions", Some(&alice))?;
    let token = csrf(&page.body)?;
    assert_eq!(web.post("/sessions/end", Some(&alice), &[("id", &id)])?.status, 403);
    assert_eq!(web.post("/sessions/end", Some(&alice), &[("id", &id), ("csrf", "0".repeat(64).as_str())])?.status, 403);
    let ended_at = Instant::now();
    assert_eq!(web.post("/sessions/end", Some(&alice), &[("id", &id), ("csrf", &token)])?.status, 303);
    let gone = rt.block_on(c.client.simple_query("select 1"));
    assert!(gone.is_err(), "the session survived the end button");
    assert!(ended_at.elapsed() < Duration::from_secs(2));
    // Audit events are written by control's audit thread, in batches.
    let kills = wait_until(Duration::from_secs(5), "the kill audited", || {
        let kills: Vec<_> = h.audit()?.into_iter().filter(|e| e.event == "web.session.kill").collect();
        Ok((!kills.is_empty()).then_some(kills))
    })?;
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0].data["user"], "alice");
    wait_until(Duration::from_secs(5), "the end audited as an admin kill", || {
        Ok(h.audit()?.into_iter().find(|e| e.event == "db.session.end" && e.data["reason"] == "AdminKill"))
    })?;

    // Locks: add one for bob, see it, remove it.
    assert_eq!(
        web.post("/locks", Some(&alice), &[("csrf", &token), ("user", "bob"), ("message", "offboarding")])?.status,
        303
    );
    let locks = web.get("/locks", Some(&alice))?;
    assert!(locks.body.contains("bob") && locks.body.contains("offboarding"), "{}", locks.body);
    let lock = h.state.active_locks()?.into_iter().find(|l| l.user.as_deref() == Some("bob")).context("no lock")?;
    assert_eq!(web.post("/locks/remove", Some(&alice), &[("csrf", &token), ("id", &lock.id)])?.status, 303);
    assert!(h.state.active_locks()?.is_empty());

    // The audit log, filtered.
    let audit = web.get("/audit?event=web.lock.create", Some(&alice))?;
    assert!(audit.body.contains("web.lock.create") && !audit.body.contains("web.session.kill"), "{}", audit.body);
    let none = web.get("/audit?user=nobody", Some(&alice))?;
    assert_eq!(none.body.matches("<tr>").count(), 1, "rows for nobody: {}", none.body);

    // Bob is no admin; logging out ends the cookie's session.
    let bob = web.login("bob", "bob-password")?;
    assert_eq!(web.get("/", Some(&bob))?.status, 200);
    assert_eq!(web.get("/sessions", Some(&bob))?.status, 403);
    assert_eq!(web.get("/api/sessions", Some(&bob))?.status, 403);
    let bob_token = csrf(&web.get("/", Some(&bob))?.body)?;
    assert_eq!(web.post("/logout", Some(&bob), &[("csrf", &bob_token)])?.status, 303);
    assert_eq!(web.get("/", Some(&bob))?.status, 303, "the session outlived the logout");
    Ok(())
}
