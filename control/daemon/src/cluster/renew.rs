//! Host certificate renewal. On the auth server, `POST /v1/renew` issues a new host certificate
//! for the calling agent (authenticated by its current one, as Teleport's `ReRegister`) over a
//! key pair the agent just generated, for the same host id, node index and name. On the agent,
//! [`run`] renews at two thirds of the current certificate's lifetime, installs the new key and
//! certificate in `identity/` and swaps them into the [`ReloadableCert`] that the PostgreSQL
//! listener and the cluster API client share. A failed renewal is retried with backoff for as
//! long as the agent runs: an agent whose certificate expired keeps serving what it can and
//! keeps trying, rather than exit and lose its sessions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::agent::AgentError;
use super::client::AuthClient;
use super::server::{json_response, AgentIdentity, ClusterContext, Peer};
use super::{ErrorBody, ErrorDetail, JoinResponse, RenewRequest, MAX_DNS_NAMES};
use crate::ca::{CaError, HostIdentity};
use crate::state::StateError;
use crate::tls::ReloadableCert;

/// Audit event of a renewal, granted or refused.
pub const CLUSTER_RENEW: &str = "cluster.renew";

/// The most a host certificate is backdated, for agents whose clocks run behind the auth server's.
const MAX_BACKDATE: Duration = Duration::from_secs(300);

/// How long one renewal call may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);

/// First and longest wait between failed renewals.
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The validity of a host certificate issued at `now` for `ttl`. The backdate is at most a tenth
/// of the lifetime, so that two thirds of a short-lived certificate's validity (when the agent
/// renews) still lie ahead of its issue.
pub fn host_cert_validity(now: OffsetDateTime, ttl: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let backdate = MAX_BACKDATE.min(ttl / 10);
    (now - backdate, now + ttl)
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal: two thirds of
/// the way through, which leaves a third of its lifetime for retries.
pub fn renew_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    not_before + (not_after - not_before) * 2 / 3
}

// ---- the auth server ----

/// Why a renewal was refused; the code and text are what the agent is told.
#[derive(Debug, thiserror::Error)]
enum RenewError {
    #[error("node {0} was removed from the cluster; join again with a new token")]
    Removed(String),
    #[error("bad renewal request: {0}")]
    BadRequest(String),
    #[error("bad public key or name in the renewal request: {0}")]
    Certificate(#[from] CaError),
    #[error("internal error: {0}")]
    State(#[from] StateError),
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl RenewError {
    fn code(&self) -> &'static str {
        match self {
            RenewError::Removed(_) => "node_removed",
            RenewError::BadRequest(_) | RenewError::Certificate(_) => "bad_request",
            RenewError::State(_) | RenewError::Task(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            RenewError::Removed(_) => StatusCode::FORBIDDEN,
            RenewError::BadRequest(_) | RenewError::Certificate(_) => StatusCode::BAD_REQUEST,
            RenewError::State(_) | RenewError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for RenewError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code().to_owned(), message: self.to_string() } };
        json_response(self.status(), &body)
    }
}

/// `POST /v1/renew`.
pub async fn handle(
    Extract(ctx): Extract<Arc<ClusterContext>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    AgentIdentity(host): AgentIdentity,
    body: Bytes,
) -> Response {
    let result = match serde_json::from_slice::<RenewRequest>(&body) {
        Ok(req) => {
            let (task_ctx, task_host) = (ctx.clone(), host.clone());
            tokio::task::spawn_blocking(move || reissue(&task_ctx, &task_host, req))
                .await
                .unwrap_or_else(|e| Err(e.into()))
        }
        Err(e) => Err(RenewError::BadRequest(e.to_string())),
    };
    let fields = json!({ "client_addr": peer.addr.to_string(), "host_id": host.host_id,
                         "node_name": host.node_name, "node_index": host.node_index });
    match result {
        Ok(resp) => {
            info!(client = %peer.addr, host_id = %host.host_id, expires = %resp.expires, "host certificate renewed");
            ctx.audit.emit_event(CLUSTER_RENEW, true, with(fields, json!({ "expires": resp.expires })));
            json_response(StatusCode::OK, &resp)
        }
        Err(e) => {
            warn!(client = %peer.addr, host_id = %host.host_id, code = e.code(), error = %e, "renewal refused");
            let more = json!({ "code": e.code(), "error": e.to_string() });
            ctx.audit.emit_event(CLUSTER_RENEW, false, with(fields, more));
            e.into_response()
        }
    }
}

fn with(mut base: serde_json::Value, more: serde_json::Value) -> serde_json::Value {
    if let (Some(obj), serde_json::Value::Object(more)) = (base.as_object_mut(), more) {
        obj.extend(more);
    }
    base
}

/// Issues the new certificate for the node as registered (blocking: SQLite and signing).
fn reissue(ctx: &ClusterContext, host: &HostIdentity, req: RenewRequest) -> Result<JoinResponse, RenewError> {
    if req.dns_names.len() > MAX_DNS_NAMES {
        return Err(RenewError::BadRequest(format!("more than {MAX_DNS_NAMES} dns_names")));
    }
    let removed = || RenewError::Removed(host.host_id.clone());
    let node = ctx.state.node(&host.host_id)?.ok_or_else(removed)?;
    let (not_before, not_after) = host_cert_validity(OffsetDateTime::now_utc(), ctx.cfg.auth_service.host_cert_ttl);
    let cluster = ctx.cfg.auth_service.cluster_name.clone();
    let identity = HostIdentity {
        v: 1,
        host_id: node.host_id.clone(),
        node_name: node.name,
        node_index: node.node_index,
        role: node.role,
        cluster: cluster.clone(),
    };
    let cert_pem = ctx.ca.issue_host(&identity, &req.public_key_pem, &req.dns_names, not_before, not_after)?;
    // `control nodes rm` may have run since the lookup: then the certificate is not handed out.
    if !ctx.state.record_renewal(&node.host_id, not_after)? {
        return Err(removed());
    }
    Ok(JoinResponse {
        host_id: node.host_id,
        node_index: node.node_index,
        cluster,
        cert_pem,
        ca_pems: vec![ctx.ca.cert_pem.clone()],
        expires: not_after.format(&Rfc3339).unwrap_or_default(),
        renew_after: renew_at(not_before, not_after).format(&Rfc3339).unwrap_or_default(),
    })
}

// ---- the agent ----

/// Doubling waits between failed attempts, from [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`].
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_FIRST }
    }
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// Renews the agent's host certificate for as long as the agent runs: at two thirds of the
/// current certificate's lifetime (a little earlier, at random, so that agents that joined
/// together do not renew together), then again for the new one. `dir` is the identity
/// directory, `dns_names` the names to ask for (as at the join).
pub async fn run(client: AuthClient, cert: Arc<ReloadableCert>, dir: PathBuf, dns_names: Vec<String>) {
    let mut backoff = Backoff::default();
    loop {
        let wait = match leaf_validity(&cert) {
            Ok((not_before, not_after)) => {
                let lifetime = (not_after - not_before).max(time::Duration::ZERO);
                let jitter = lifetime * rand::random::<f64>() / 20;
                let due = renew_at(not_before, not_after) - jitter;
                let wait = until(due);
                info!(expires = %fmt(not_after), renew_in_s = wait.as_secs(), "host certificate renewal scheduled");
                wait
            }
            Err(e) => {
                warn!(error = %e, "cannot read the host certificate's validity; renewing now");
                Duration::ZERO
            }
        };
        tokio::time::sleep(wait).await;
        loop {
            match renew_once(&client, &cert, &dir, &dns_names).await {
                Ok(not_after) => {
                    info!(expires = %fmt(not_after), "host certificate renewed");
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let expired = leaf_validity(&cert).is_ok_and(|(_, na)| na <= OffsetDateTime::now_utc());
                    warn!(
                        error = %e,
                        code = refusal_code(&e).unwrap_or("-"),
                        expired,
                        retry_in_s = delay.as_secs(),
                        "renewing the host certificate failed"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// The auth server's code for a refusal (`node_removed`, ...), if it was one.
pub fn refusal_code(e: &AgentError) -> Option<&str> {
    match e {
        AgentError::Refused { code, .. } => Some(code.as_str()),
        _ => None,
    }
}

fn fmt(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// How long from now until `t` (zero if it passed).
fn until(t: OffsetDateTime) -> Duration {
    Duration::try_from(t - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
}

/// The validity of the certificate the agent presents now.
fn leaf_validity(cert: &ReloadableCert) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let current = cert.current();
    let leaf = current.end_entity_cert().map_err(|e| CaError::Parse(e.to_string()))?;
    Ok((crate::ca::not_before(leaf)?, crate::ca::not_after(leaf)?))
}

/// One renewal: a new key pair, the call, the files, the swap. Returns the new expiry.
async fn renew_once(
    client: &AuthClient,
    cert: &ReloadableCert,
    dir: &Path,
    dns_names: &[String],
) -> Result<OffsetDateTime, AgentError> {
    let key = rcgen::KeyPair::generate()?;
    let req = RenewRequest { public_key_pem: key.public_key_pem(), dns_names: dns_names.to_vec() };
    let resp: JoinResponse = client.post_json("/v1/renew", &req, RENEW_TIMEOUT).await?;
    let bad = |reason: String| AgentError::Http(format!("bad renewal answer: {reason}"));
    let leaf = CertificateDer::from_pem_slice(resp.cert_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let current = cert.current();
    let current_leaf = current.end_entity_cert().map_err(|e| bad(e.to_string()))?;
    let (was, now) = (crate::ca::host_identity_from_cert(current_leaf), crate::ca::host_identity_from_cert(&leaf));
    match (was, now) {
        (Ok(was), Ok(now)) if was.host_id == now.host_id && was.node_index == now.node_index => {}
        (_, Err(e)) => return Err(bad(format!("the certificate names no host: {e}"))),
        _ => return Err(bad("the certificate is for another node".into())),
    }
    // The chain keeps the CA the agent trusts; rotating it is not supported yet.
    let trusted_ca = current
        .cert
        .last()
        .filter(|_| current.cert.len() > 1)
        .ok_or_else(|| bad("no CA in the current chain".into()))?;
    let ca_pem = resp
        .ca_pems
        .iter()
        .find(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).is_ok_and(|der| der == *trusted_ca))
        .ok_or_else(|| bad("the auth server's CA is not the one this agent joined under".into()))?;
    let chain = vec![leaf.clone(), trusted_ca.clone()];
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Check that the key fits the certificate before anything is written.
    ReloadableCert::new(chain.clone(), key_der.clone_key())?;
    let chain_pem = format!("{}{}", with_newline(&resp.cert_pem), with_newline(ca_pem));
    install(dir, key.serialize_pem().as_bytes(), chain_pem.as_bytes())?;
    cert.replace(chain, key_der)?;
    crate::ca::not_after(&leaf).map_err(|e| bad(e.to_string()))
}

fn with_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

const KEY: &str = "host.key";
const CERT: &str = "host.crt";

fn staged(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.new"))
}

/// Replaces `host.key` and `host.crt`. Both are written to `.new` files (0600, synced) first,
/// then moved in place, the key first: [`finish_interrupted`] can then always tell a
/// half-done replacement from a whole one after a crash.
fn install(dir: &Path, key_pem: &[u8], chain_pem: &[u8]) -> Result<(), AgentError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    for (name, contents) in [(KEY, key_pem), (CERT, chain_pem)] {
        let path = staged(dir, name);
        crate::private_fs::write_private(&path, contents).map_err(io(&path))?;
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
    }
    for name in [KEY, CERT] {
        std::fs::rename(staged(dir, name), dir.join(name)).map_err(io(&dir.join(name)))?;
    }
    Ok(())
}

/// Completes or undoes a replacement of the host key and certificate that a crash interrupted
/// (see [`install`]), so that the two files on disk always belong together.
pub fn finish_interrupted(dir: &Path) -> Result<(), AgentError> {
    let (key, cert) = (staged(dir, KEY), staged(dir, CERT));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    if key.exists() {
        // The key was not moved yet: the old pair is whole; drop the new one.
        std::fs::remove_file(&key).map_err(io(&key))?;
        if cert.exists() {
            std::fs::remove_file(&cert).map_err(io(&cert))?;
        }
    } else if cert.exists() {
        // The new key is in place: its certificate must follow.
        warn!(dir = %dir.display(), "finishing a host certificate renewal interrupted by a crash");
        std::fs::rename(&cert, dir.join(CERT)).map_err(io(&dir.join(CERT)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        // Short-lived: backdated by a tenth, renewed well before it expires.
        let (nb, na) = host_cert_validity(now, Duration::from_secs(15));
        assert_eq!((now - nb, na - now), (time::Duration::milliseconds(1500), time::Duration::seconds(15)));
        assert_eq!(renew_at(nb, na), now + time::Duration::milliseconds(9500));
        // A day: backdated by five minutes.
        let (nb, na) = host_cert_validity(now, Duration::from_secs(86400));
        assert_eq!(now - nb, time::Duration::minutes(5));
        assert_eq!(renew_at(nb, na), nb + time::Duration::seconds((86400 + 300) * 2 / 3));
        assert!(renew_at(nb, na) > now);
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let mut b = Backoff::default();
        let secs: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }

    /// An agent whose certificate expired and whose auth server is unreachable keeps trying;
    /// nothing it has is touched meanwhile.
    #[tokio::test]
    async fn failures_never_end_the_renewal_task() {
        let ca = crate::ca::CertAuthority::generate("test").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let host = HostIdentity {
            v: 1,
            host_id: "h".into(),
            node_name: "a".into(),
            node_index: 1,
            role: "db".into(),
            cluster: "test".into(),
        };
        let now = OffsetDateTime::now_utc();
        let pem = ca
            .issue_host(
                &host,
                &key.public_key_pem(),
                &["127.0.0.1".into()],
                now - time::Duration::hours(2),
                now - time::Duration::hours(1),
            )
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(), ca.cert_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = ReloadableCert::new(chain.clone(), key_der).unwrap();
        // Nothing listens on port 1.
        let client = AuthClient::new(&["127.0.0.1:1".into()], &ca.pin().unwrap(), Some(cert.clone())).unwrap();
        let dir = temp_dir();
        let task = tokio::spawn(run(client, cert.clone(), dir.clone(), vec!["127.0.0.1".into()]));
        // The first attempt at once, the second 2 s later.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!task.is_finished(), "the renewal task ended");
        task.abort();
        assert_eq!(cert.current().cert, chain, "the certificate changed");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "files were written");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-renew-{}", crate::state::random_secret(6)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_interrupted_install_leaves_a_matching_pair() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        std::fs::write(dir.join(KEY), "old key").unwrap();
        std::fs::write(dir.join(CERT), "old cert").unwrap();

        install(&dir, b"new key", b"new cert").unwrap();
        assert_eq!((read(KEY), read(CERT)), ("new key".into(), "new cert".into()));
        assert_eq!(std::fs::metadata(dir.join(KEY)).unwrap().permissions().mode() & 0o777, 0o600);
        finish_interrupted(&dir).unwrap();
        assert_eq!((read(KEY), read(CERT)), ("new key".into(), "new cert".into()), "a whole install was undone");

        // Crash before any move: the old pair stays.
        std::fs::write(staged(&dir, KEY), "newer key").unwrap();
        std::fs::write(staged(&dir, CERT), "newer cert").unwrap();
        finish_interrupted(&dir).unwrap();
        assert_eq!((read(KEY), read(CERT)), ("new key".into(), "new cert".into()));
        assert!(!staged(&dir, KEY).exists() && !staged(&dir, CERT).exists());

        // Crash between the moves: the certificate follows its key.
        std::fs::write(dir.join(KEY), "newer key").unwrap();
        std::fs::write(staged(&dir, CERT), "newer cert").unwrap();
        finish_interrupted(&dir).unwrap();
        assert_eq!((read(KEY), read(CERT)), ("newer key".into(), "newer cert".into()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
