//! The agent's client of the cluster API: one HTTP/1.1 exchange per call over a fresh TLS
//! connection to the auth server, whose certificate must chain to the pinned CA
//! ([`PinVerifier`]). After the join, the agent authenticates with its host certificate (a
//! [`ReloadableCert`], so a renewed one is used from the next call on). Calls are few (a
//! heartbeat every few seconds, a renewal a day, one long-lived watch), so connections are not
//! pooled.
//!
//! An agent may know several auth servers (they share their state). Clones of a client share
//! one [`Addrs`], so the watch, heartbeats, renewals and audit uploads move together: a call
//! that cannot reach the current address (or gets a 5xx) moves on and tries every other one once
//! within its time. A 4xx answer is the cluster's answer, the same from every node, and is final.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::agent::{AgentError, PinVerifier};
use super::ErrorBody;
use crate::config::split_host_port;
use crate::tls::ReloadableCert;

/// Connecting, the TLS handshake and the answer's head together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JSON answer read from the auth server.
const MAX_RESPONSE: usize = 4 << 20;

/// Talks to the cluster's auth servers, one at a time.
#[derive(Clone)]
pub struct AuthClient {
    addrs: Arc<Addrs>,
    verifier: Arc<PinVerifier>,
    tls: Arc<ClientConfig>,
}

/// The auth servers' addresses and the one in use, shared by every clone of a client (sans-IO:
/// the rotation rules live here, the dialling in [`AuthClient`]).
#[derive(Debug)]
pub struct Addrs {
    list: Vec<String>,
    current: AtomicUsize,
}

impl Addrs {
    /// `list` must not be empty (the config's validation makes sure).
    pub fn new(list: Vec<String>) -> Result<Self, AgentError> {
        if list.is_empty() {
            return Err(AgentError::AuthServer(String::new(), "no auth server address".into()));
        }
        Ok(Addrs { list, current: AtomicUsize::new(0) })
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, i: usize) -> &str {
        &self.list[i % self.list.len()]
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire) % self.list.len()
    }

    /// The address a call tries next: the current one unless this call tried it already, then
    /// the next untried one after it; `None` when the call tried them all.
    pub fn pick(&self, tried: &[bool]) -> Option<usize> {
        let from = self.current();
        (0..self.list.len()).map(|k| (from + k) % self.list.len()).find(|&i| !tried.get(i).copied().unwrap_or(false))
    }

    /// Address `failed` did not answer: moves the shared position past it, if it is still
    /// there. Only one of several calls failing together moves it (the one that gets `Some`, the
    /// new position), so they do not skip a good address between them.
    pub fn failed(&self, failed: usize) -> Option<usize> {
        let next = (failed + 1) % self.list.len();
        (next != failed)
            .then(|| self.current.compare_exchange(failed, next, Ordering::AcqRel, Ordering::Acquire).ok())
            .flatten()
            .map(|_| next)
    }

    /// Address `good` answered a call that found the shared position on an address it had
    /// already seen fail: the position moves to the good one (unless someone moved it since).
    pub fn answered(&self, good: usize, seen: usize) -> bool {
        good != seen && self.current.compare_exchange(seen, good, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// Whether a failed call may be tried at another auth server: the server could not be reached
/// or could not answer (connection, TLS, time, 5xx). A refusal (4xx) is the cluster's answer,
/// the same on every node, and is not.
pub fn fails_over(e: &AgentError) -> bool {
    match e {
        AgentError::Connect { .. }
        | AgentError::Tls { .. }
        | AgentError::PinMismatch(_)
        | AgentError::AuthServer(..)
        | AgentError::Http(_)
        | AgentError::Timeout(_) => true,
        AgentError::Refused { status, code, .. } => *status >= 500 || code == "internal" || code == "unavailable",
        AgentError::Unexpected { status, .. } => *status >= 500,
        AgentError::Io { .. }
        | AgentError::TokenFile { .. }
        | AgentError::EmptyToken(_)
        | AgentError::Key(_)
        | AgentError::BadIdentity { .. }
        | AgentError::Tls2(_) => false,
    }
}

/// An answer whose body is still being received, and the task driving its connection.
pub struct Streaming {
    pub body: Incoming,
    driver: tokio::task::JoinHandle<()>,
    /// The auth server that answered, and its place in the list.
    addr: String,
    index: usize,
}

impl Streaming {
    /// The auth server that answered.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The next chunk of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, AgentError> {
        use hyper::body::Body as _;
        loop {
            let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(AgentError::Http(e.to_string())),
                Some(Ok(frame)) => {
                    // Trailers carry nothing the cluster API uses.
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, refused past `max` bytes.
    pub async fn read_all(&mut self, max: usize) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if out.len() + chunk.len() > max {
                return Err(AgentError::Http(format!("answer larger than {max} bytes")));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl AuthClient {
    /// A client of the auth servers at `auth_servers` (tried in this order) that presents
    /// `cert` (none while joining).
    pub fn new(auth_servers: &[String], pin: &str, cert: Option<Arc<ReloadableCert>>) -> Result<Self, AgentError> {
        let addrs = Arc::new(Addrs::new(auth_servers.to_vec())?);
        let verifier = Arc::new(PinVerifier::new(pin.to_owned()));
        let builder = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(crate::tls::TlsError::from)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let tls = match cert {
            Some(cert) => builder.with_client_cert_resolver(cert),
            None => builder.with_no_client_auth(),
        };
        Ok(AuthClient { addrs, verifier, tls: Arc::new(tls) })
    }

    /// The auth server calls go to now.
    pub fn addr(&self) -> String {
        self.addrs.get(self.addrs.current()).to_owned()
    }

    /// Every address, in the configured order.
    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    /// POSTs `req` as JSON and reads the whole JSON answer, within `timeout`.
    pub async fn post_json<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
        timeout: Duration,
    ) -> Result<A, AgentError> {
        let started = tokio::time::Instant::now();
        let call = async {
            let mut answer = self.post_within(path, req, timeout.min(CONNECT_TIMEOUT)).await?;
            let bytes = answer.read_all(MAX_RESPONSE).await?;
            serde_json::from_slice(&bytes).map_err(|e| AgentError::Http(format!("bad answer to {path}: {e}")))
        };
        tokio::time::timeout_at(started + timeout, call).await.map_err(|_| AgentError::Timeout(self.addr()))?
    }

    /// POSTs `req` as JSON; a success's body is left to the caller to read as it arrives, any
    /// other answer becomes an error (the auth server's own message when it sent one).
    pub async fn post<Q: Serialize>(&self, path: &str, req: &Q) -> Result<Streaming, AgentError> {
        self.post_within(path, req, CONNECT_TIMEOUT).await
    }

    /// [`AuthClient::post`] to the current auth server, then, while the failure is one another
    /// server might not have ([`fails_over`]), to each other one once, all within `budget`
    /// (until the answer's head). Each attempt gets a fair share of what is left, so a
    /// black-holed first server cannot use up the time of the others.
    async fn post_within<Q: Serialize>(&self, path: &str, req: &Q, budget: Duration) -> Result<Streaming, AgentError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut tried = vec![false; self.addrs.len()];
        let mut last = None;
        while let Some(i) = self.addrs.pick(&tried) {
            let seen = self.addrs.current();
            let left = tried.iter().filter(|t| !**t).count();
            tried[i] = true;
            let share = deadline.saturating_duration_since(tokio::time::Instant::now()) / left.max(1) as u32;
            let addr = self.addrs.get(i);
            let outcome = match tokio::time::timeout(share, self.post_to(i, path, req)).await {
                Ok(outcome) => outcome,
                // A stopped or black-holed auth server must not hold the caller forever.
                Err(_) => Err(AgentError::Timeout(addr.to_owned())),
            };
            match outcome {
                Ok(answer) => {
                    if self.addrs.answered(i, seen) {
                        warn!(from = %self.addrs.get(seen), to = %addr, call = path, why = "it answered", "moved to another auth server");
                    }
                    return Ok(answer);
                }
                Err(e) if fails_over(&e) => {
                    if let Some(next) = self.addrs.failed(i) {
                        warn!(
                            from = %addr,
                            to = %self.addrs.get(next),
                            call = path,
                            why = %e,
                            "moving to another auth server"
                        );
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(last.unwrap_or_else(|| AgentError::Timeout(self.addr())))
    }

    /// One attempt at one auth server.
    async fn post_to<Q: Serialize>(&self, index: usize, path: &str, req: &Q) -> Result<Streaming, AgentError> {
        let addr = self.addrs.get(index);
        let (host, port) =
            split_host_port(addr, 3026).map_err(|e| AgentError::AuthServer(addr.to_owned(), e.to_string()))?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| AgentError::AuthServer(addr.to_owned(), e.to_string()))?;
        let name = server_name.to_str().into_owned();
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| AgentError::Connect { addr: addr.to_owned(), source })?;
        let stream = match tokio_rustls::TlsConnector::from(self.tls.clone()).connect(server_name, tcp).await {
            Ok(s) => s,
            Err(source) => {
                // The verifier kept why the pin did not match, in words for the operator.
                return Err(match self.verifier.mismatch(&name) {
                    Some(message) => AgentError::PinMismatch(message),
                    None => AgentError::Tls { addr: addr.to_owned(), source },
                });
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| AgentError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "auth server connection ended");
            }
        });
        let body = serde_json::to_vec(req).map_err(|e| AgentError::Http(e.to_string()))?;
        let request = http::Request::post(path)
            .header(http::header::HOST, addr)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .map_err(|e| AgentError::Http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| AgentError::Http(e.to_string()))?;
        let status = response.status();
        let mut answer = Streaming { body: response.into_body(), driver, addr: addr.to_owned(), index };
        if status.is_success() {
            return Ok(answer);
        }
        let bytes = answer.read_all(MAX_RESPONSE).await?;
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Err(AgentError::Refused {
                call: path.to_owned(),
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
            }),
            Err(_) => Err(AgentError::Unexpected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertAuthority;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    fn addrs(n: usize) -> Addrs {
        Addrs::new((0..n).map(|i| format!("auth-{i}:3026")).collect()).unwrap()
    }

    #[test]
    fn rotation_moves_once_per_failure_and_wraps() {
        assert!(Addrs::new(Vec::new()).is_err());
        let a = addrs(3);
        assert_eq!((a.current(), a.pick(&[false; 3])), (0, Some(0)));
        assert_eq!(a.failed(0), Some(1));
        // A second call that saw address 0 fail too does not skip address 1.
        assert_eq!(a.failed(0), None);
        assert_eq!(a.current(), 1);
        // A call that tried 0 and 1 goes on to 2, then has nothing left.
        assert_eq!(a.pick(&[true, false, false]), Some(1));
        assert_eq!(a.pick(&[true, true, false]), Some(2));
        assert_eq!(a.pick(&[true, true, true]), None);
        assert_eq!(a.failed(1), Some(2));
        assert_eq!(a.failed(2), Some(0), "round-robin wraps to the first address");
        // The position is on an address this call saw fail; the one that answered becomes it.
        assert_eq!(a.pick(&[true, false, true]), Some(1));
        assert!(a.answered(1, 0));
        assert_eq!(a.current(), 1);
        assert!(!a.answered(1, 1), "answering where it was is no move");
        assert!(!a.answered(2, 0), "someone moved it since: left alone");
        assert_eq!(a.current(), 1);
        // One address: there is nowhere to move.
        let one = addrs(1);
        assert_eq!(one.failed(0), None);
        assert_eq!(one.current(), 0);
    }

    #[test]
    fn concurrent_failures_move_the_position_once() {
        for _ in 0..50 {
            let a = Arc::new(addrs(4));
            let moved: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8).map(|_| s.spawn(|| a.failed(0).is_some())).collect();
                handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
            });
            assert_eq!(moved, 1);
            assert_eq!(a.current(), 1, "concurrent failures skipped a good address");
        }
    }

    #[test]
    fn only_unreachable_servers_and_5xx_fail_over() {
        let refused = |status, code: &str| AgentError::Refused {
            call: "/v1/renew".into(),
            status,
            code: code.into(),
            message: String::new(),
        };
        for code in ["token_unknown", "node_removed", "wrong_cluster", "bad_request"] {
            assert!(!fails_over(&refused(403, code)), "{code}");
        }
        assert!(fails_over(&refused(500, "internal")));
        assert!(fails_over(&refused(503, "unavailable")));
        assert!(fails_over(&AgentError::Unexpected { status: 502, body: String::new() }));
        assert!(!fails_over(&AgentError::Unexpected { status: 404, body: String::new() }));
        let connect = AgentError::Connect { addr: "a".into(), source: std::io::ErrorKind::ConnectionRefused.into() };
        assert!(fails_over(&connect));
        assert!(fails_over(&AgentError::Timeout("a".into())));
        assert!(fails_over(&AgentError::PinMismatch("other CA".into())));
    }

    /// A real TLS server with a certificate from `ca`, answering `/ok` with `{}`, `/refuse`
    /// with a 403 `node_removed` and `/broken` with a 500 `internal`; its address.
    async fn server(ca: &CertAuthority) -> String {
        let (chain, key) = ca.issue_server(&["127.0.0.1".into()], Duration::from_secs(600)).unwrap();
        let tls = crate::tls::api_server_config(chain, key).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = tcp.local_addr().unwrap();
        let limiter = crate::limits::ConnLimiter::new(Default::default());
        let (incoming, _accept) = crate::https::TlsListener::start(tcp, local, tls, limiter, "test");
        let error = |status: StatusCode, code: &str| {
            let body = serde_json::json!({"error": {"code": code, "message": "said the server"}});
            (status, [(http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        };
        let app = axum::Router::new()
            .route("/ok", axum::routing::post(|| async { "{}" }))
            .route("/refuse", axum::routing::post(move || async move { error(StatusCode::FORBIDDEN, "node_removed") }))
            .route(
                "/broken",
                axum::routing::post(move || async move { error(StatusCode::INTERNAL_SERVER_ERROR, "internal") }),
            );
        tokio::spawn(async move {
            let _accept = _accept;
            let _ = axum::serve(incoming, app).await;
        });
        local.to_string()
    }

    /// A port nothing listens on.
    fn closed() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        addr
    }

    async fn call(c: &AuthClient, path: &str) -> Result<serde_json::Value, AgentError> {
        c.post_json(path, &serde_json::json!({}), Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn calls_move_past_dead_servers_but_not_past_refusals() {
        let ca = CertAuthority::generate("test").unwrap();
        let pin = ca.pin().unwrap();
        let (good, dead) = (server(&ca).await, closed());

        // The dead address first: the call is answered by the second, and the clones follow.
        let client = AuthClient::new(&[dead.clone(), good.clone()], &pin, None).unwrap();
        let clone = client.clone();
        call(&client, "/ok").await.unwrap();
        assert_eq!(clone.addr(), good);
        call(&clone, "/ok").await.unwrap();
        assert_eq!(client.addrs().current(), 1);

        // A refusal is the cluster's answer: the call ends and the position stays.
        let client = AuthClient::new(&[good.clone(), dead.clone()], &pin, None).unwrap();
        match call(&client, "/refuse").await {
            Err(AgentError::Refused { status: 403, code, .. }) => assert_eq!(code, "node_removed"),
            other => panic!("{other:?}"),
        }
        assert_eq!(client.addr(), good);
        // A 500 moves on (the dead one fails too, and the position wraps around to the first).
        assert!(call(&client, "/broken").await.is_err());
        assert_eq!(client.addr(), good);
        let client = AuthClient::new(&[good.clone(), good.clone()], &pin, None).unwrap();
        assert!(call(&client, "/broken").await.is_err());
        assert_eq!(client.addrs().current(), 0, "two failures, two moves");

        // The pin is checked on every address: a server of another CA is passed over...
        let impostor = server(&CertAuthority::generate("other").unwrap()).await;
        let client = AuthClient::new(&[impostor.clone(), good.clone()], &pin, None).unwrap();
        call(&client, "/ok").await.unwrap();
        assert_eq!(client.addr(), good);
        // ...and is never answered from.
        let client = AuthClient::new(&[impostor, dead], &pin, None).unwrap();
        let err = call(&client, "/ok").await.unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. } | AgentError::PinMismatch(_)), "{err:?}");
        let client = AuthClient::new(&[server(&CertAuthority::generate("x").unwrap()).await], &pin, None).unwrap();
        let err = call(&client, "/ok").await.unwrap_err().to_string();
        assert!(err.contains("but the config pins"), "{err}");
    }
}
