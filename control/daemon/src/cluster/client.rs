//! The agent's client of the cluster API: one HTTP/1.1 exchange per call over a fresh TLS
//! connection to the auth server, whose certificate must chain to the pinned CA
//! ([`PinVerifier`]). After the join, the agent authenticates with its host certificate (a
//! [`ReloadableCert`], so a renewed one is used from the next call on). Calls are few (a
//! heartbeat every few seconds, a renewal a day, one long-lived watch), so connections are not
//! pooled.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::debug;

use super::agent::{AgentError, PinVerifier};
use super::ErrorBody;
use crate::config::split_host_port;
use crate::tls::ReloadableCert;

/// Connecting, the TLS handshake and the answer's head together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JSON answer read from the auth server.
const MAX_RESPONSE: usize = 4 << 20;

/// Talks to one auth server.
#[derive(Clone)]
pub struct AuthClient {
    addr: String,
    verifier: Arc<PinVerifier>,
    tls: Arc<ClientConfig>,
}

/// An answer whose body is still being received, and the task driving its connection.
pub struct Streaming {
    pub body: Incoming,
    driver: tokio::task::JoinHandle<()>,
}

impl Streaming {
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
    /// A client that presents `cert` (none while joining).
    pub fn new(auth_server: &str, pin: &str, cert: Option<Arc<ReloadableCert>>) -> Result<Self, AgentError> {
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
        Ok(AuthClient { addr: auth_server.to_owned(), verifier, tls: Arc::new(tls) })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// POSTs `req` as JSON and reads the whole JSON answer, within `timeout`.
    pub async fn post_json<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
        timeout: Duration,
    ) -> Result<A, AgentError> {
        let call = async {
            let bytes = self.post(path, req).await?.read_all(MAX_RESPONSE).await?;
            serde_json::from_slice(&bytes).map_err(|e| AgentError::Http(format!("bad answer to {path}: {e}")))
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| AgentError::Timeout(self.addr.clone()))?
    }

    /// POSTs `req` as JSON; a success's body is left to the caller to read as it arrives, any
    /// other answer becomes an error (the auth server's own message when it sent one).
    pub async fn post<Q: Serialize>(&self, path: &str, req: &Q) -> Result<Streaming, AgentError> {
        // A stopped or black-holed auth server must not hold the caller forever.
        tokio::time::timeout(CONNECT_TIMEOUT, self.post_inner(path, req))
            .await
            .map_err(|_| AgentError::Timeout(self.addr.clone()))?
    }

    async fn post_inner<Q: Serialize>(&self, path: &str, req: &Q) -> Result<Streaming, AgentError> {
        let (host, port) =
            split_host_port(&self.addr, 3026).map_err(|e| AgentError::AuthServer(self.addr.clone(), e.to_string()))?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| AgentError::AuthServer(self.addr.clone(), e.to_string()))?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| AgentError::Connect { addr: self.addr.clone(), source })?;
        let stream = match tokio_rustls::TlsConnector::from(self.tls.clone()).connect(server_name, tcp).await {
            Ok(s) => s,
            Err(source) => {
                // The verifier kept why the pin did not match, in words for the operator.
                return Err(match self.verifier.mismatch() {
                    Some(message) => AgentError::PinMismatch(message),
                    None => AgentError::Tls { addr: self.addr.clone(), source },
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
            .header(http::header::HOST, self.addr.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .map_err(|e| AgentError::Http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| AgentError::Http(e.to_string()))?;
        let status = response.status();
        let mut answer = Streaming { body: response.into_body(), driver };
        if status.is_success() {
            return Ok(answer);
        }
        let bytes = answer.read_all(MAX_RESPONSE).await?;
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Err(AgentError::Refused { call: path.to_owned(), code: e.error.code, message: e.error.message }),
            Err(_) => Err(AgentError::Unexpected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            }),
        }
    }
}
