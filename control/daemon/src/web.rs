//! The web console (`auth_service.web_listen_addr`, HTTPS with control's server certificate):
//! server-rendered pages with a little script, everything served by control (no CDN).
//!
//! Users log in with their Sluice password (the same login sessions, throttle and expiry as the
//! client API; the token is an `HttpOnly; Secure; SameSite=Strict` cookie) and see the databases
//! their roles let them see, with the commands that connect to each. Holders of a role with
//! `spec.admin: true` also watch live sessions (bytes, packets, RTT and rates from the data
//! plane's counters, refreshed every second), end them, manage locks and read the audit log with
//! filters. Every form that changes something carries a CSRF token bound to the login session,
//! and each admin action is audited with the admin's name.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{RawQuery, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use sha2::{Digest, Sha256};
use sluice_handoff::handoff::EndReason;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::audit::AuditLog;
use crate::config::Config;
use crate::https::TlsListener;
use crate::limits::{ConnLimiter, LoginThrottle};
use crate::proxy::ProxyContext;
use crate::rbac::can_see;
use crate::state::{AuditFilter, State, StateError, User};

const COOKIE: &str = "sluice_session";
/// Audit rows shown at most on one page.
const AUDIT_PAGE: usize = 500;

/// Audit events of the console's admin actions.
pub const WEB_SESSION_KILL: &str = "web.session.kill";
pub const WEB_LOCK_CREATE: &str = "web.lock.create";
pub const WEB_LOCK_DELETE: &str = "web.lock.delete";

pub struct WebContext {
    pub cfg: Arc<Config>,
    pub state: Arc<State>,
    pub proxy: Arc<ProxyContext>,
    pub audit: Arc<AuditLog>,
    throttle: LoginThrottle,
    /// One password hash at a time, as on the client API.
    hashing: tokio::sync::Semaphore,
}

impl WebContext {
    pub fn new(cfg: Arc<Config>, state: Arc<State>, proxy: Arc<ProxyContext>, audit: Arc<AuditLog>) -> Self {
        WebContext {
            cfg,
            state,
            proxy,
            audit,
            throttle: LoginThrottle::default(),
            hashing: tokio::sync::Semaphore::new(1),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// Serves the console until the task is aborted.
pub async fn serve(ctx: Arc<WebContext>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let Ok(local) = listener.local_addr() else { return };
    let limiter: Arc<ConnLimiter<IpAddr>> = ConnLimiter::new(ctx.cfg.auth_service.limits);
    let (incoming, accept) = TlsListener::start(listener, local, tls, limiter, "web console");
    let app = Router::new()
        .route("/", get(databases_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/sessions", get(sessions_page))
        .route("/sessions/end", post(end_session))
        .route("/api/sessions", get(sessions_json))
        .route("/locks", get(locks_page).post(add_lock))
        .route("/locks/remove", post(remove_lock))
        .route("/audit", get(audit_page))
        .route("/static/console.js", get(script))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(ctx);
    if let Err(e) = axum::serve(incoming, app.into_make_service_with_connect_info::<PeerAddr>()).await {
        warn!(error = %e, "web console stopped");
    }
    accept.abort();
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "cache-control", "no-store");
    set(h, "x-frame-options", "DENY");
    r
}

// ---- sessions, CSRF, forms ----

/// Who is asking: the login behind the cookie.
struct Viewer {
    user: User,
    token: String,
    admin: bool,
}

impl Viewer {
    fn csrf(&self) -> String {
        csrf_token(&self.token)
    }
}

/// The CSRF token of a login session: derived from the (HttpOnly) session token, so a page of
/// another site can neither read nor compute it.
fn csrf_token(session: &str) -> String {
    hex::encode(Sha256::digest(format!("sluice-web-csrf\0{session}").as_bytes()))
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// The viewer, or the response that sends them to the login page.
async fn viewer(ctx: &Arc<WebContext>, headers: &HeaderMap) -> Result<Viewer, Response> {
    let Some(token) = cookie_value(headers, COOKIE) else { return Err(to_login()) };
    let state = ctx.state.clone();
    let t = token.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<Option<(User, bool)>, StateError> {
        let Some((name, _)) = state.web_session(&t)? else { return Ok(None) };
        let Some(user) = state.user(&name)? else { return Ok(None) };
        let admin = state.roles_of(&user)?.iter().any(|r| r.spec.admin);
        Ok(Some((user, admin)))
    })
    .await;
    match found {
        Ok(Ok(Some((user, admin)))) => Ok(Viewer { user, token, admin }),
        Ok(Ok(None)) => Err(to_login()),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

async fn admin(ctx: &Arc<WebContext>, headers: &HeaderMap) -> Result<Viewer, Response> {
    let v = viewer(ctx, headers).await?;
    if !v.admin {
        return Err(page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            Some(&v),
            "<p>This page needs a role with <code>admin: true</code>.</p>",
        ));
    }
    Ok(v)
}

fn form(body: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// Whether a form carries the viewer's CSRF token.
fn csrf_ok(v: &Viewer, fields: &BTreeMap<String, String>) -> bool {
    let given = fields.get("csrf").map(String::as_str).unwrap_or_default();
    subtle::ConstantTimeEq::ct_eq(given.as_bytes(), v.csrf().as_bytes()).into()
}

fn csrf_refused() -> Response {
    (StatusCode::FORBIDDEN, "bad or missing CSRF token").into_response()
}

/// An admin's form: the viewer (an admin) and the fields, the CSRF token checked; else the
/// response that refuses it.
async fn admin_form(
    ctx: &Arc<WebContext>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Viewer, BTreeMap<String, String>), Box<Response>> {
    let v = admin(ctx, headers).await.map_err(Box::new)?;
    let fields = form(body);
    if !csrf_ok(&v, &fields) {
        return Err(Box::new(csrf_refused()));
    }
    Ok((v, fields))
}

fn to_login() -> Response {
    redirect("/login")
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    warn!(error = %e, "web console");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

/// HTML-escapes user-supplied text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, v: Option<&Viewer>, body: &str) -> Response {
    let mut nav = String::new();
    if let Some(v) = v {
        nav.push_str("<nav><a href=\"/\">Databases</a>");
        if v.admin {
            nav.push_str(
                " <a href=\"/sessions\">Sessions</a> <a href=\"/locks\">Locks</a> <a href=\"/audit\">Audit</a>",
            );
        }
        let _ = write!(
            nav,
            " <form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><span>{}</span> <button id=\"logout\">Log out</button></form></nav>",
            v.csrf(),
            esc(&v.user.name)
        );
    }
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · Sluice</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         code{{background:#f4f4f4;padding:2px 4px}}nav{{margin-bottom:1em}}nav a{{margin-right:1em}}.inline{{display:inline}}.error{{color:#b00}}</style>\
         </head><body>{nav}<h1>{title}</h1>{body}<script src=\"/static/console.js\"></script></body></html>",
        title = esc(title)
    );
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

// ---- login ----

async fn login_page() -> Response {
    login_form(StatusCode::OK, "")
}

fn login_form(status: StatusCode, error: &str) -> Response {
    let error =
        if error.is_empty() { String::new() } else { format!("<p class=\"error\" id=\"error\">{}</p>", esc(error)) };
    page(
        status,
        "Log in",
        None,
        &format!(
            "{error}<form method=\"post\" action=\"/login\">\
             <p><label>User <input name=\"user\" id=\"user\" autocomplete=\"username\"></label></p>\
             <p><label>Password <input name=\"password\" id=\"password\" type=\"password\" autocomplete=\"current-password\"></label></p>\
             <p><button id=\"login\">Log in</button></p></form>"
        ),
    )
}

async fn login(
    Extract(ctx): Extract<Arc<WebContext>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    let user = fields.get("user").cloned().unwrap_or_default();
    let password = fields.get("password").cloned().unwrap_or_default();
    if let Err(t) = ctx.throttle.begin(peer.ip(), &user, Instant::now()) {
        return login_form(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Too many failed logins; try again in {} s.", t.retry_after.as_secs().max(1)),
        );
    }
    let Ok(_permit) = ctx.hashing.acquire().await else { return internal("shutting down") };
    let (state, name, ttl) = (ctx.state.clone(), user.clone(), ctx.cfg.auth_service.session_ttl);
    let result = tokio::task::spawn_blocking(move || -> Result<Option<(String, OffsetDateTime)>, StateError> {
        if !state.verify_password(&name, &password)? {
            return Ok(None);
        }
        state.create_web_session(&name, ttl).map(Some)
    })
    .await;
    let created = match result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    ctx.throttle.finish(peer.ip(), &user, created.is_some(), Instant::now());
    let Some((token, expires)) = created else {
        warn!(user = %user.escape_debug(), client = %peer, "web console login failed");
        return login_form(StatusCode::UNAUTHORIZED, "Invalid user name or password.");
    };
    info!(user = %user.escape_debug(), client = %peer, "web console login");
    let max_age = (expires - OffsetDateTime::now_utc()).whole_seconds().max(0);
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}");
    let mut r = redirect("/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap, body: Bytes) -> Response {
    let v = match viewer(&ctx, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !csrf_ok(&v, &form(&body)) {
        return csrf_refused();
    }
    let state = ctx.state.clone();
    let token = v.token.clone();
    let _ = tokio::task::spawn_blocking(move || state.delete_web_session(&token)).await;
    let mut r = redirect("/login");
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

// ---- databases ----

async fn databases_page(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap) -> Response {
    let v = match viewer(&ctx, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (cfg, state, user) = (ctx.cfg.clone(), ctx.state.clone(), v.user.clone());
    let dbs = tokio::task::spawn_blocking(move || -> Result<_, StateError> {
        let roles = state.roles_of(&user)?;
        // What `sluice db ls` lists: this server's databases and those only its agents serve.
        Ok(crate::api::cluster_databases(&cfg, &state, now_ms())?
            .into_iter()
            .filter(|(d, _)| can_see(&roles, &d.labels))
            .collect::<Vec<_>>())
    })
    .await;
    let dbs = match dbs {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let api = ctx.cfg.auth_service.listen_addr;
    let mut body = format!(
        "<p>Log in once: <code class=\"copy\">sluice login --proxy {api} --user {} --ca-file ca.pem</code></p>",
        esc(&v.user.name)
    );
    body.push_str(
        "<table id=\"databases\"><tr><th>Name</th><th>Description</th><th>Labels</th><th>Agents</th><th>Connect</th></tr>",
    );
    for (d, served) in &dbs {
        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))).collect();
        let _ = write!(
            body,
            "<tr data-db=\"{name}\"><td>{name}</td><td>{desc}</td><td>{labels}</td><td>{agents}</td><td>\
             <code class=\"copy\">sluice db login {name} --db-user DB_USER --db-name DB_NAME</code><br>\
             <code class=\"copy\">sluice db connect {name}</code></td></tr>",
            name = esc(&d.name),
            desc = esc(&d.description),
            labels = labels.join(", "),
            agents = served.agents,
        );
    }
    body.push_str("</table>");
    if dbs.is_empty() {
        body.push_str("<p>No database is open to your roles.</p>");
    }
    page(StatusCode::OK, "Databases", Some(&v), &body)
}

// ---- sessions ----

async fn sessions_page(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap) -> Response {
    let v = match admin(&ctx, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let body = format!(
        "<p id=\"status\">Loading…</p><table id=\"sessions\" data-csrf=\"{}\"><thead><tr><th>Session</th><th>User</th><th>Database</th>\
         <th>Client → DB</th><th>DB → client</th><th>Rate in</th><th>Rate out</th><th>Packets</th><th>RTT</th><th>Age</th><th></th></tr></thead>\
         <tbody></tbody></table>",
        v.csrf()
    );
    page(StatusCode::OK, "Live sessions", Some(&v), &body)
}

async fn sessions_json(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&ctx, &headers).await {
        return r;
    }
    let (live, linked) = ctx.proxy.live_stats().await;
    let rows: Vec<serde_json::Value> = live
        .iter()
        .map(|s| {
            let c = s.stats.counters.as_ref();
            json!({
                "session_id": s.stats.session_id,
                "user": s.user,
                "db": s.db,
                "bytes_in": s.stats.bytes_client_to_upstream,
                "bytes_out": s.stats.bytes_upstream_to_client,
                "packets": c.map(|c| c.client.rx_packets + c.client.tx_packets),
                "rtt_us": c.map(|c| c.client.srtt_us),
                "duration_ms": s.stats.duration_ms,
            })
        })
        .collect();
    let body = json!({ "dataplane": linked, "sessions": rows, "at_ms": now_ms() }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    now.unix_timestamp() * 1000 + i64::from(now.millisecond())
}

async fn end_session(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap, body: Bytes) -> Response {
    let (v, fields) = match admin_form(&ctx, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let id = fields.get("id").cloned().unwrap_or_default();
    let Some(dp) = ctx.proxy.dataplane.get() else {
        return (StatusCode::CONFLICT, "no data plane holds sessions here").into_response();
    };
    if !ctx.proxy.handed_sessions().contains_key(&id) {
        return (StatusCode::NOT_FOUND, "no such live session").into_response();
    }
    if let Err(e) = dp.end_session(&id, EndReason::AdminKill) {
        return internal(e);
    }
    info!(session_id = %id, by = %v.user.name, "session ended from the web console");
    ctx.audit.emit_event(WEB_SESSION_KILL, true, json!({ "sid": id, "user": v.user.name, "target_session": id }));
    redirect("/sessions")
}

// ---- locks ----

async fn locks_page(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap) -> Response {
    let v = match admin(&ctx, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let state = ctx.state.clone();
    let locks = match tokio::task::spawn_blocking(move || state.active_locks()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let csrf = v.csrf();
    let mut body = String::from(
        "<table id=\"locks\"><tr><th>ID</th><th>User</th><th>Database</th><th>Message</th><th>Expires</th><th></th></tr>",
    );
    for l in &locks {
        let expires = l.expires_at.map(rfc3339).unwrap_or_else(|| "never".into());
        let _ = write!(
            body,
            "<tr><td>{id}</td><td>{user}</td><td>{db}</td><td>{msg}</td><td>{expires}</td><td>\
             <form method=\"post\" action=\"/locks/remove\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"id\" value=\"{id}\"><button>Remove</button></form></td></tr>",
            id = esc(&l.id),
            user = esc(l.user.as_deref().unwrap_or("*")),
            db = esc(l.db.as_deref().unwrap_or("*")),
            msg = esc(&l.message),
        );
    }
    let _ = write!(
        body,
        "</table><h2>Add a lock</h2><form method=\"post\" action=\"/locks\" id=\"add-lock\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>User <input name=\"user\"></label> <label>Database <input name=\"db\"></label> \
         <label>Message <input name=\"message\"></label> <label>For (e.g. 1h, empty: until removed) <input name=\"ttl\"></label> \
         <button>Lock</button></form>"
    );
    page(StatusCode::OK, "Locks", Some(&v), &body)
}

async fn add_lock(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap, body: Bytes) -> Response {
    let (v, fields) = match admin_form(&ctx, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let field = |k: &str| fields.get(k).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let ttl = match field("ttl").map(|t| crate::config::parse_duration(&t)) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("bad duration: {e}")).into_response(),
        None => None,
    };
    let (user, db, message) = (field("user"), field("db"), field("message").unwrap_or_default());
    let state = ctx.state.clone();
    let (u, d, m) = (user.clone(), db.clone(), message.clone());
    let added = tokio::task::spawn_blocking(move || state.add_lock(u.as_deref(), d.as_deref(), &m, ttl)).await;
    match added {
        Ok(Ok(lock)) => {
            info!(lock = %lock.id, by = %v.user.name, "lock added from the web console");
            ctx.audit.emit_event(
                WEB_LOCK_CREATE,
                true,
                json!({ "user": v.user.name, "lock": lock.id, "target_user": user, "target_db": db, "message": message }),
            );
            redirect("/locks")
        }
        Ok(Err(StateError::Invalid(why))) => (StatusCode::BAD_REQUEST, why).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn remove_lock(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap, body: Bytes) -> Response {
    let (v, fields) = match admin_form(&ctx, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let id = fields.get("id").cloned().unwrap_or_default();
    let state = ctx.state.clone();
    let lock = id.clone();
    match tokio::task::spawn_blocking(move || state.delete_lock(&lock)).await {
        Ok(Ok(true)) => {
            ctx.audit.emit_event(WEB_LOCK_DELETE, true, json!({ "user": v.user.name, "lock": id }));
            redirect("/locks")
        }
        Ok(Ok(false)) => (StatusCode::NOT_FOUND, "no such lock").into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default()
}

// ---- audit ----

async fn audit_page(Extract(ctx): Extract<Arc<WebContext>>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let v = match admin(&ctx, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let q = form(query.unwrap_or_default().as_bytes());
    let field = |k: &str| q.get(k).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let filter = AuditFilter {
        user: field("user"),
        db: field("db"),
        event: field("event"),
        since: field("since"),
        until: field("until"),
        limit: AUDIT_PAGE,
    };
    let state = ctx.state.clone();
    let f = filter.clone();
    let rows = match tokio::task::spawn_blocking(move || state.audit_query(&f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let value = |o: &Option<String>| esc(o.as_deref().unwrap_or_default());
    let mut body = format!(
        "<form method=\"get\" action=\"/audit\" id=\"audit-filter\"><label>User <input name=\"user\" value=\"{}\"></label> \
         <label>Database <input name=\"db\" value=\"{}\"></label> <label>Event <input name=\"event\" value=\"{}\"></label> \
         <label>Since <input name=\"since\" placeholder=\"2026-12-01T00:00:00Z\" value=\"{}\"></label> \
         <label>Until <input name=\"until\" value=\"{}\"></label> <button>Filter</button></form>\
         <table id=\"audit\"><tr><th>Time</th><th>Event</th><th>User</th><th>Database</th><th>OK</th><th>Session</th><th>Details</th></tr>",
        value(&filter.user),
        value(&filter.db),
        value(&filter.event),
        value(&filter.since),
        value(&filter.until)
    );
    for r in &rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&r.time),
            esc(&r.event),
            esc(r.user.as_deref().unwrap_or_default()),
            esc(r.db.as_deref().unwrap_or_default()),
            if r.success { "yes" } else { "no" },
            esc(r.session_id.as_deref().unwrap_or_default()),
            esc(&r.data.to_string())
        );
    }
    body.push_str("</table>");
    page(StatusCode::OK, "Audit log", Some(&v), &body)
}

// ---- script ----

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

/// Copy buttons, and the live sessions table (polled every second; rates from the last two
/// samples). Kept small and dependency-free; the CSP allows only this file.
const SCRIPT: &str = r#""use strict";
document.querySelectorAll("code.copy").forEach(function (c) {
  var b = document.createElement("button");
  b.textContent = "Copy";
  b.addEventListener("click", function () { navigator.clipboard && navigator.clipboard.writeText(c.textContent); });
  c.after(" ", b);
});
var table = document.getElementById("sessions");
if (table) {
  var last = {};
  var fmt = function (n) { return n < 1024 ? Math.round(n) + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB"; };
  var cell = function (tr, text) { var td = document.createElement("td"); td.textContent = text; tr.appendChild(td); return td; };
  var tick = function () {
    fetch("/api/sessions", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (d) {
      var body = table.tBodies[0];
      body.textContent = "";
      document.getElementById("status").textContent = d.sessions.length + " live session(s)" + (d.dataplane === false ? " — no link to the data plane" : "");
      var seen = {};
      d.sessions.forEach(function (s) {
        var p = last[s.session_id];
        var dt = p ? (d.at_ms - p.at) / 1000 : 0;
        var rin = p && dt > 0 ? fmt(Math.max(0, (s.bytes_in - p.bin) / dt)) + "/s" : "";
        var rout = p && dt > 0 ? fmt(Math.max(0, (s.bytes_out - p.bout) / dt)) + "/s" : "";
        seen[s.session_id] = { at: d.at_ms, bin: s.bytes_in, bout: s.bytes_out };
        var tr = document.createElement("tr");
        tr.dataset.session = s.session_id;
        cell(tr, s.session_id); cell(tr, s.user); cell(tr, s.db);
        cell(tr, fmt(s.bytes_in)).className = "bytes-in";
        cell(tr, fmt(s.bytes_out)).className = "bytes-out";
        cell(tr, rin); cell(tr, rout);
        cell(tr, s.packets == null ? "" : String(s.packets));
        cell(tr, s.rtt_us ? (s.rtt_us / 1000).toFixed(2) + " ms" : "");
        cell(tr, Math.round(s.duration_ms / 1000) + " s");
        var f = document.createElement("form");
        f.method = "post"; f.action = "/sessions/end"; f.className = "inline";
        [["csrf", table.dataset.csrf], ["id", s.session_id]].forEach(function (kv) {
          var i = document.createElement("input"); i.type = "hidden"; i.name = kv[0]; i.value = kv[1]; f.appendChild(i);
        });
        var b = document.createElement("button"); b.textContent = "End"; b.className = "end"; f.appendChild(b);
        cell(tr, "").appendChild(f);
        body.appendChild(tr);
      });
      last = seen;
    }).catch(function (e) { document.getElementById("status").textContent = "refresh failed: " + e; });
  };
  tick();
  setInterval(tick, 1000);
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_is_escaped_and_csrf_tokens_are_bound_to_the_session() {
        assert_eq!(esc("<script>alert('x')&\"</script>"), "&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;");
        assert_ne!(csrf_token("a"), csrf_token("b"));
        assert_eq!(csrf_token("a").len(), 64);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("other=1; sluice_session=tok; x=y"));
        assert_eq!(cookie_value(&h, COOKIE).as_deref(), Some("tok"));
        assert_eq!(cookie_value(&HeaderMap::new(), COOKIE), None);
        let f = form(b"user=al%20ice&csrf=abc&empty=");
        assert_eq!(f.get("user").map(String::as_str), Some("al ice"));
        assert_eq!(f.get("empty").map(String::as_str), Some(""));
    }
}
