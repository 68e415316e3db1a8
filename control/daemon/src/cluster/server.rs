//! The cluster API on the auth server (`auth_service.cluster_listen_addr`): HTTPS with JSON
//! bodies, served by axum over our own TLS accept loop (rustls with the ring provider, the same
//! CA as every other listener). `POST /v1/join` needs no client certificate: an agent with a
//! valid join token gets a host certificate over the key pair it generated. Every other call
//! needs that host certificate ([`AgentIdentity`]): `POST /v1/renew` and `/v1/heartbeat`
//! (`cluster::renew`, `cluster::heartbeat`), `POST /v1/audit`, and `POST /v1/watch`, which
//! streams the policy the agent decides from as NDJSON lines fed by the [`Hub`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::hub::Hub;
use super::view::{Change, ClusterView, StreamFilter, WatchEvent, WatchRequest};
use super::{
    AuditStored, AuditUpload, ErrorBody, ErrorDetail, JoinRequest, JoinResponse, DB_KIND, MAX_AUDIT_BATCH,
    MAX_DNS_NAMES,
};
use crate::audit::{AuditLog, CLUSTER_JOIN};
use crate::ca::{CaError, CertAuthority, HostIdentity};
use crate::config::{validate_name, Config};
use crate::https::TlsListener;
use crate::limits::{ConnLimiter, LoginThrottle};
use crate::state::{State, StateError, TokenCheck};

/// What the handlers need.
pub struct ClusterContext {
    pub cfg: Arc<Config>,
    pub state: Arc<State>,
    pub ca: Arc<CertAuthority>,
    pub audit: Arc<AuditLog>,
    /// What the watch streams send.
    pub hub: Arc<Hub>,
    /// Failed joins per source: a join token is a secret worth guessing.
    throttle: LoginThrottle,
}

impl ClusterContext {
    pub fn new(
        cfg: Arc<Config>,
        state: Arc<State>,
        ca: Arc<CertAuthority>,
        audit: Arc<AuditLog>,
        hub: Arc<Hub>,
    ) -> Self {
        ClusterContext { cfg, state, ca, audit, hub, throttle: LoginThrottle::default() }
    }
}

/// How often a watch stream says it is alive when nothing changes; agents give up on a stream
/// after [`super::watch::SILENCE_LIMIT`] without a line.
pub const PING_EVERY: Duration = Duration::from_secs(2);

/// Why a join was refused; [`JoinError::code`] and the text are what the agent is told.
#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error("join token not found (create one with `control tokens add --type=db`)")]
    TokenUnknown,
    #[error("join token expired at {}", .0.format(&Rfc3339).unwrap_or_default())]
    TokenExpired(OffsetDateTime),
    #[error("join token is of type {0:?}; this agent joins as {1:?}")]
    TokenWrongType(String, String),
    #[error("too many failed joins from your address; try again in {} s", .0.as_secs().max(1))]
    Throttled(Duration),
    #[error("bad join request: {0}")]
    BadRequest(String),
    #[error("bad public key or name in the join request: {0}")]
    Certificate(#[from] CaError),
    #[error("internal error: {0}")]
    State(#[from] StateError),
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl JoinError {
    fn code(&self) -> &'static str {
        match self {
            JoinError::TokenUnknown => "token_unknown",
            JoinError::TokenExpired(_) => "token_expired",
            JoinError::TokenWrongType(..) => "token_wrong_type",
            JoinError::Throttled(_) => "throttled",
            JoinError::BadRequest(_) | JoinError::Certificate(_) => "bad_request",
            JoinError::State(_) | JoinError::Task(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            JoinError::TokenUnknown | JoinError::TokenExpired(_) | JoinError::TokenWrongType(..) => {
                StatusCode::FORBIDDEN
            }
            JoinError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            JoinError::BadRequest(_) | JoinError::Certificate(_) => StatusCode::BAD_REQUEST,
            JoinError::State(_) | JoinError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for JoinError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code().to_owned(), message: self.to_string() } };
        json_response(self.status(), &body)
    }
}

pub(super) fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (status, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The client of one connection: its address as the accept loop saw it, and the agent its
/// certificate names, if it presented one (checked against the cluster CA in the handshake).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub host: Option<HostIdentity>,
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let host = stream
            .io()
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| crate::ca::host_identity_from_cert(leaf).ok());
        Peer { addr: *stream.remote_addr(), host }
    }
}

/// The agent a request comes from: its host certificate verified in the TLS handshake, for
/// this cluster, and the node still registered (`control nodes rm` cuts it off). Anything else
/// gets 401 or 403 with a JSON error.
#[derive(Debug, Clone)]
pub struct AgentIdentity(pub HostIdentity);

impl axum::extract::FromRequestParts<Arc<ClusterContext>> for AgentIdentity {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        ctx: &Arc<ClusterContext>,
    ) -> Result<Self, Self::Rejection> {
        let refuse = |status: StatusCode, code: &str, message: String| {
            json_response(status, &ErrorBody { error: ErrorDetail { code: code.to_owned(), message } })
        };
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<Peer>>().cloned() else {
            return Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no connection info".into()));
        };
        let Some(host) = peer.host else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "no_host_certificate",
                "this call needs an agent's host certificate".into(),
            ));
        };
        if host.cluster != ctx.cfg.auth_service.cluster_name {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "wrong_cluster",
                format!("the host certificate is for cluster {:?}", host.cluster),
            ));
        }
        let state = ctx.state.clone();
        let id = host.host_id.clone();
        let known = tokio::task::spawn_blocking(move || state.node(&id)).await;
        match known {
            Ok(Ok(Some(_))) => Ok(AgentIdentity(host)),
            Ok(Ok(None)) => Err(refuse(
                StatusCode::FORBIDDEN,
                "node_removed",
                format!("node {} was removed from the cluster; join again with a new token", host.host_id),
            )),
            Ok(Err(e)) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
            Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
        }
    }
}

/// Serves the cluster API on `listener` until the task is aborted.
pub async fn serve(ctx: Arc<ClusterContext>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cluster API listener has no address");
            return;
        }
    };
    let limiter = ConnLimiter::new(ctx.cfg.auth_service.limits);
    let (incoming, accept) = TlsListener::start(listener, local, tls, limiter, "cluster API");
    let app = Router::new()
        .route("/v1/join", post(join))
        .route("/v1/watch", post(watch))
        .route("/v1/audit", post(audit_upload))
        .route("/v1/renew", post(super::renew::handle))
        .route("/v1/heartbeat", post(super::heartbeat::handle))
        .with_state(ctx);
    let served = axum::serve(incoming, app.into_make_service_with_connect_info::<Peer>()).await;
    if let Err(e) = served {
        warn!(error = %e, "cluster API stopped");
    }
    accept.abort();
}

/// `POST /v1/join`.
async fn join(
    Extract(ctx): Extract<Arc<ClusterContext>>,
    ConnectInfo(Peer { addr: peer, .. }): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    // Failures count per source; the "user" of the throttle is the source too, so that failures
    // from elsewhere cannot lock a good agent out.
    let key = peer.ip().to_string();
    if let Err(t) = ctx.throttle.begin(peer.ip(), &key, Instant::now()) {
        warn!(client = %peer, "join throttled");
        return JoinError::Throttled(t.retry_after).into_response();
    }
    let req: Result<JoinRequest, _> = serde_json::from_slice(&body);
    let node_name = req.as_ref().map(|r| r.node_name.clone()).unwrap_or_default();
    let result = match req {
        Ok(req) => {
            let task_ctx = ctx.clone();
            tokio::task::spawn_blocking(move || admit(&task_ctx, req)).await.unwrap_or_else(|e| Err(e.into()))
        }
        Err(e) => Err(JoinError::BadRequest(e.to_string())),
    };
    ctx.throttle.finish(peer.ip(), &key, result.is_ok(), Instant::now());
    match result {
        Ok(resp) => {
            info!(client = %peer, node = %node_name, host_id = %resp.host_id, node_index = resp.node_index, "agent joined");
            ctx.audit.emit_event(
                CLUSTER_JOIN,
                true,
                json!({ "client_addr": peer.to_string(), "node_name": node_name, "host_id": resp.host_id,
                        "node_index": resp.node_index, "role": DB_KIND }),
            );
            json_response(StatusCode::OK, &resp)
        }
        Err(e) => {
            warn!(client = %peer, node = %node_name, code = e.code(), error = %e, "join refused");
            ctx.audit.emit_event(
                CLUSTER_JOIN,
                false,
                json!({ "client_addr": peer.to_string(), "node_name": node_name, "code": e.code(),
                        "error": e.to_string() }),
            );
            e.into_response()
        }
    }
}

/// Checks the token and issues the host certificate (blocking: SQLite and signing).
fn admit(ctx: &ClusterContext, req: JoinRequest) -> Result<JoinResponse, JoinError> {
    match ctx.state.check_join_token(&req.token, &req.kind)? {
        TokenCheck::Valid => {}
        TokenCheck::Unknown => return Err(JoinError::TokenUnknown),
        TokenCheck::Expired { at } => return Err(JoinError::TokenExpired(at)),
        TokenCheck::WrongType { kind } => return Err(JoinError::TokenWrongType(kind, req.kind)),
    }
    if req.kind != DB_KIND {
        return Err(JoinError::BadRequest(format!("agents join as {DB_KIND:?}, not {:?}", req.kind)));
    }
    validate_name(&req.node_name).map_err(|e| JoinError::BadRequest(e.to_string()))?;
    if req.dns_names.len() > MAX_DNS_NAMES {
        return Err(JoinError::BadRequest(format!("more than {MAX_DNS_NAMES} dns_names")));
    }
    // Refuse a bad key before a node index is taken for it.
    rcgen::SubjectPublicKeyInfo::from_pem(&req.public_key_pem).map_err(CaError::from)?;
    let (not_before, not_after) =
        super::renew::host_cert_validity(OffsetDateTime::now_utc(), ctx.cfg.auth_service.host_cert_ttl);
    let node = ctx.state.add_node(&req.node_name, DB_KIND, &req.labels, not_after)?;
    let cluster = ctx.cfg.auth_service.cluster_name.clone();
    let identity = HostIdentity {
        v: 1,
        host_id: node.host_id.clone(),
        node_name: node.name.clone(),
        node_index: node.node_index,
        role: DB_KIND.to_owned(),
        cluster: cluster.clone(),
    };
    let cert_pem = match ctx.ca.issue_host(&identity, &req.public_key_pem, &req.dns_names, not_before, not_after) {
        Ok(pem) => pem,
        Err(e) => {
            // Give the index back: nothing holds it.
            let _ = ctx.state.delete_node(&node.host_id);
            return Err(e.into());
        }
    };
    let renew_after = super::renew::renew_at(not_before, not_after);
    Ok(JoinResponse {
        host_id: node.host_id,
        node_index: node.node_index,
        cluster,
        cert_pem,
        ca_pems: vec![ctx.ca.cert_pem.clone()],
        expires: not_after.format(&Rfc3339).unwrap_or_default(),
        renew_after: renew_after.format(&Rfc3339).unwrap_or_default(),
    })
}

/// `POST /v1/watch`: the policy this agent decides from, as NDJSON: the snapshot, then each
/// change, and a ping every [`PING_EVERY`].
async fn watch(
    Extract(ctx): Extract<Arc<ClusterContext>>,
    AgentIdentity(host): AgentIdentity,
    body: Bytes,
) -> Response {
    let req: WatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let detail = ErrorDetail { code: "bad_request".into(), message: format!("bad watch request: {e}") };
            return json_response(StatusCode::BAD_REQUEST, &ErrorBody { error: detail });
        }
    };
    let mark = ctx.hub.mark();
    let sub = ctx.hub.subscribe();
    let (filter, first) = StreamFilter::start(req.selectors, &sub.view);
    info!(host_id = %host.host_id, node = %host.node_name, rev = sub.rev, databases = first.databases.len(), "agent is watching");
    let (tx, rx) = mpsc::channel(64);
    let stream = WatchStream { hub: ctx.hub.clone(), mark, host, filter, changes: sub.changes };
    tokio::spawn(stream.run(tx, sub.rev, first));
    match axum::http::Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::new(LineBody { rx }))
    {
        Ok(r) => r,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn ndjson(event: &WatchEvent) -> Option<Bytes> {
    match serde_json::to_vec(event) {
        Ok(mut line) => {
            line.push(b'\n');
            Some(Bytes::from(line))
        }
        Err(e) => {
            warn!(error = %e, "encoding a watch event");
            None
        }
    }
}

/// One agent's watch stream.
struct WatchStream {
    hub: Arc<Hub>,
    /// [`Hub::mark`] when the stream opened.
    mark: u64,
    host: HostIdentity,
    filter: StreamFilter,
    changes: tokio::sync::broadcast::Receiver<Arc<(u64, Change)>>,
}

impl WatchStream {
    /// Feeds the stream, from `first` at `rev`, until the agent goes away, falls too far behind, or
    /// is removed from the cluster.
    async fn run(self, tx: mpsc::Sender<Bytes>, rev: u64, first: ClusterView) {
        use tokio::sync::broadcast::error::RecvError;
        let WatchStream { hub, mark, host, mut filter, mut changes } = self;
        let Some(init) = ndjson(&WatchEvent::Init { rev, view: first }) else { return };
        if tx.send(init).await.is_err() {
            return;
        }
        let mut last = rev;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            let line = tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        let (at, change) = &*change;
                        if *at <= last {
                            continue;
                        }
                        last = *at;
                        match filter.pass(change) {
                            Some(out) => ndjson(&out.at(*at)),
                            None => continue,
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        warn!(host_id = %host.host_id, missed, "watch stream fell behind; closing it (the agent starts over)");
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = ping.tick() => ndjson(&WatchEvent::Ping { rev: last }),
                _ = tx.closed() => {
                    info!(host_id = %host.host_id, node = %host.node_name, "agent stopped watching");
                    return;
                }
            };
            if hub.removed(&host.host_id, mark) {
                warn!(host_id = %host.host_id, node = %host.node_name, "node removed from the cluster; closing its watch");
                return;
            }
            let Some(line) = line else { continue };
            if tx.send(line).await.is_err() {
                info!(host_id = %host.host_id, node = %host.node_name, "agent stopped watching");
                return;
            }
        }
    }
}

/// A response body fed line by line from a channel; it ends when the sender is dropped.
struct LineBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for LineBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|line| line.map(|l| Ok(hyper::body::Frame::data(l))))
    }
}

fn bad_request(message: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, &ErrorBody { error: ErrorDetail { code: "bad_request".into(), message } })
}

/// Checks one uploaded event and stamps it with the agent it came from (from the certificate,
/// so that no agent can record events as another).
fn stamp(mut event: serde_json::Value, host: &HostIdentity) -> Result<serde_json::Value, String> {
    let obj = event.as_object_mut().ok_or("an event is not a JSON object")?;
    let id = obj.get("event_id").and_then(|v| v.as_str()).ok_or("an event has no event_id")?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("an event_id is not 32 hex digits".into());
    }
    if !obj.get("event").is_some_and(|v| v.is_string()) {
        return Err("an event has no event name".into());
    }
    obj.insert("agent".into(), json!({ "host_id": host.host_id, "node": host.node_name }));
    Ok(event)
}

/// `POST /v1/audit`: stores an agent's audit events, each `event_id` once.
async fn audit_upload(
    Extract(ctx): Extract<Arc<ClusterContext>>,
    AgentIdentity(host): AgentIdentity,
    body: Bytes,
) -> Response {
    let upload: AuditUpload = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return bad_request(format!("bad audit upload: {e}")),
    };
    if upload.events.len() > MAX_AUDIT_BATCH {
        return bad_request(format!("more than {MAX_AUDIT_BATCH} events in one upload"));
    }
    let events: Result<Vec<_>, _> = upload.events.into_iter().map(|e| stamp(e, &host)).collect();
    let events = match events {
        Ok(e) => e,
        Err(why) => return bad_request(why),
    };
    let audit = ctx.audit.clone();
    match tokio::task::spawn_blocking(move || audit.ingest(&events)).await {
        Ok(Ok((stored, duplicates))) => {
            info!(host_id = %host.host_id, node = %host.node_name, stored, duplicates, "audit events from an agent");
            json_response(StatusCode::OK, &AuditStored { stored, duplicates })
        }
        Ok(Err(e)) => {
            warn!(host_id = %host.host_id, error = %e, "storing an agent's audit events");
            let detail = ErrorDetail { code: "internal".into(), message: format!("storing the events: {e}") };
            json_response(StatusCode::INTERNAL_SERVER_ERROR, &ErrorBody { error: detail })
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostIdentity {
        HostIdentity {
            v: 1,
            host_id: "h1".into(),
            node_name: "agent-a".into(),
            node_index: 1,
            role: DB_KIND.into(),
            cluster: "sluice".into(),
        }
    }

    #[test]
    fn uploaded_events_are_checked_and_stamped_with_their_agent() {
        let id = "0123456789abcdef0123456789abcdef";
        let ok = stamp(json!({ "event": "db.session.start", "event_id": id }), &host()).unwrap();
        assert_eq!(ok["agent"], json!({ "host_id": "h1", "node": "agent-a" }));
        // An agent cannot record events as another.
        let forged = json!({ "event": "x", "event_id": id, "agent": { "host_id": "h2", "node": "b" } });
        assert_eq!(stamp(forged, &host()).unwrap()["agent"]["host_id"], "h1");
        for bad in [
            json!("text"),
            json!({ "event": "x" }),
            json!({ "event": "x", "event_id": "short" }),
            json!({ "event": "x", "event_id": "0123456789abcdef0123456789abcdeg" }),
            json!({ "event_id": id }),
            json!({ "event": 7, "event_id": id }),
        ] {
            assert!(stamp(bad.clone(), &host()).is_err(), "{bad}");
        }
    }
}
