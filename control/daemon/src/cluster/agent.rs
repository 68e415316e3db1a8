//! The agent side of the cluster: a process with `auth_service.enabled: false` joins the auth
//! server named in `join` once (a token, and the pin of the cluster CA that the auth server's
//! certificate must chain to), keeps the host identity it gets in `data_dir/identity/`, and
//! serves PostgreSQL with its host certificate, deciding from the policy it follows
//! ([`super::watch`]). It opens no `sluice.db`: users, password hashes and the CA key stay on
//! the auth server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::info;

use super::client::AuthClient;
use super::{JoinRequest, JoinResponse, DB_KIND};
use crate::ca::spki_pin;
use crate::config::{Config, JoinConfig};
use crate::private_fs;

/// How long one join may take, connection and answer together.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no identity in {dir} yet, and the join token file {token_file} cannot be read: {source}")]
    TokenFile { dir: PathBuf, token_file: PathBuf, source: std::io::Error },
    #[error("join token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("bad auth_server {0:?}: {1}")]
    AuthServer(String, String),
    #[error("connecting to the auth server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The auth server's CA is not the pinned one: someone else may be answering.
    #[error("{0}")]
    PinMismatch(String),
    #[error("TLS to the auth server {addr}: {source}")]
    Tls { addr: String, source: std::io::Error },
    #[error("HTTP to the auth server: {0}")]
    Http(String),
    #[error("the auth server refused {}: {message}", if call == "/v1/join" { "the join" } else { call.as_str() })]
    Refused { call: String, status: u16, code: String, message: String },
    #[error("the auth server answered HTTP {status}: {body}")]
    Unexpected { status: u16, body: String },
    #[error("joining the auth server {0} timed out")]
    Timeout(String),
    #[error("generating the host key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the identity in {dir} is unusable: {reason} (remove the directory to join again)")]
    BadIdentity { dir: PathBuf, reason: String },
    #[error(transparent)]
    Tls2(#[from] crate::tls::TlsError),
}

/// `identity/identity.json`: who this agent is in the cluster, and where it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityFile {
    pub host_id: String,
    pub node_index: u16,
    pub node_name: String,
    pub cluster: String,
    /// The config's auth servers at the join (an identity from before several were supported
    /// holds one `auth_server`).
    #[serde(alias = "auth_server", deserialize_with = "crate::config::one_or_many")]
    pub auth_servers: Vec<String>,
    pub ca_pin: String,
}

/// The agent's identity, loaded: host certificate chain (leaf, CA), key and the cluster CA.
pub struct Joined {
    pub identity: IdentityFile,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

pub fn identity_dir(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("identity")
}

/// Loads the identity from `data_dir/identity/`, joining first if there is none.
pub async fn ensure_joined(cfg: &Config, join: &JoinConfig, dns_names: Vec<String>) -> Result<Joined, AgentError> {
    let dir = identity_dir(cfg);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    private_fs::private_dir(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
    private_fs::private_dir(&dir).map_err(io(&dir))?;
    if dir.join("identity.json").exists() {
        let joined = load(&dir)?;
        if joined.identity.ca_pin != join.ca_pin {
            return Err(AgentError::BadIdentity {
                dir,
                reason: format!(
                    "it was issued under CA {}, but the config pins {}",
                    joined.identity.ca_pin, join.ca_pin
                ),
            });
        }
        info!(host_id = %joined.identity.host_id, node_index = joined.identity.node_index, "using the agent identity");
        return Ok(joined);
    }
    let token = std::fs::read_to_string(&join.token_file).map_err(|source| AgentError::TokenFile {
        dir: dir.clone(),
        token_file: join.token_file.clone(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(AgentError::EmptyToken(join.token_file.clone()));
    }
    let key = rcgen::KeyPair::generate()?;
    let node_name = join.node_name.clone().unwrap_or_else(default_node_name);
    let labels = cfg.db_service.resources.iter().flat_map(|m| m.labels.clone()).collect();
    let req = JoinRequest {
        token: token.to_owned(),
        kind: DB_KIND.to_owned(),
        node_name: node_name.clone(),
        public_key_pem: key.public_key_pem(),
        dns_names,
        labels,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let auth_servers = join.auth_servers.join(",");
    info!(auth_servers = %auth_servers, node = %node_name, "joining the cluster");
    let resp = tokio::time::timeout(JOIN_TIMEOUT, call_join(join, &req))
        .await
        .map_err(|_| AgentError::Timeout(auth_servers))??;
    let ca_pem = resp.ca_pems.first().cloned().ok_or_else(|| AgentError::Http("the answer has no CA".into()))?;
    let identity = IdentityFile {
        host_id: resp.host_id,
        node_index: resp.node_index,
        node_name,
        cluster: resp.cluster,
        auth_servers: join.auth_servers.clone(),
        ca_pin: join.ca_pin.clone(),
    };
    let chain_pem = format!("{}{}", ensure_newline(&resp.cert_pem), ensure_newline(&ca_pem));
    let identity_json = serde_json::to_vec_pretty(&identity).map_err(|e| AgentError::Http(e.to_string()))?;
    // identity.json last: its presence says the other files are complete.
    for (name, contents) in [
        ("host.key", key.serialize_pem().into_bytes()),
        ("host.crt", chain_pem.into_bytes()),
        ("ca.pem", ca_pem.into_bytes()),
        ("identity.json", identity_json),
    ] {
        write_atomic(&dir.join(name), &contents)?;
    }
    info!(host_id = %identity.host_id, node_index = identity.node_index, expires = %resp.expires, "joined the cluster");
    load(&dir)
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

/// Writes a 0600 file through a temporary name, so a crash leaves the old file or the new one.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    private_fs::write_private(&tmp, contents).map_err(|source| AgentError::Io { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| AgentError::Io { path: path.to_path_buf(), source })
}

fn load(dir: &Path) -> Result<Joined, AgentError> {
    super::renew::finish_interrupted(dir)?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| AgentError::Io { path, source })
    };
    let bad = |reason: String| AgentError::BadIdentity { dir: dir.to_path_buf(), reason };
    let identity: IdentityFile =
        serde_json::from_slice(&read("identity.json")?).map_err(|e| bad(format!("identity.json: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&read("host.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("host.crt: {e}")))?;
    if chain.is_empty() {
        return Err(bad("host.crt holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("host.key")?).map_err(|e| bad(format!("host.key: {e}")))?;
    let ca = CertificateDer::from_pem_slice(&read("ca.pem")?).map_err(|e| bad(format!("ca.pem: {e}")))?;
    let pin = spki_pin(&ca).map_err(|e| bad(format!("ca.pem: {e}")))?;
    if pin != identity.ca_pin {
        return Err(bad(format!("ca.pem is {pin}, not the {} it was joined under", identity.ca_pin)));
    }
    Ok(Joined { identity, chain, key, ca })
}

/// The host name, made a valid node name; `agent` if there is none.
pub(crate) fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(128)
        .collect();
    if name.is_empty() {
        "agent".to_owned()
    } else {
        name
    }
}

/// One `POST /v1/join`, before the agent has a certificate to present: the auth servers in
/// order until one answers.
async fn call_join(join: &JoinConfig, req: &JoinRequest) -> Result<JoinResponse, AgentError> {
    AuthClient::new(&join.auth_servers, &join.ca_pin, None)?.post_json("/v1/join", req, JOIN_TIMEOUT).await
}

/// Trusts the auth server's certificate only if its chain ends in a CA whose SPKI pin is the
/// configured one, and the leaf verifies against that CA: one round trip, no unverified first
/// dial to fetch the CA.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
    /// Why the pin did not match, by the server name dialled (one client dials several auth
    /// servers, and each error must name its own).
    mismatch: Mutex<std::collections::HashMap<String, String>>,
}

impl PinVerifier {
    pub fn new(pin: String) -> Self {
        PinVerifier { pin, provider: crate::tls::provider(), mismatch: Mutex::new(Default::default()) }
    }

    /// Why the last verification of `server_name` failed on the pin, if it did.
    pub fn mismatch(&self, server_name: &str) -> Option<String> {
        self.mismatch.lock().unwrap_or_else(|p| p.into_inner()).get(server_name).cloned()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .last()
            .ok_or_else(|| rustls::Error::General("the auth server sent no CA certificate with its own".into()))?;
        let presented = spki_pin(ca).map_err(|e| rustls::Error::General(format!("auth server CA: {e}")))?;
        let same: bool = subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), self.pin.as_bytes()).into();
        let mut mismatch = self.mismatch.lock().unwrap_or_else(|p| p.into_inner());
        if !same {
            let message = format!("auth server CA is {presented}, but the config pins {}", self.pin);
            mismatch.insert(server_name.to_str().into_owned(), message.clone());
            return Err(rustls::Error::General(message));
        }
        mismatch.remove(server_name.to_str().as_ref());
        drop(mismatch);
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        // Agents' host certificates come from the same CA and may name any address the agent
        // asked for: one must never pass for the auth server.
        if crate::ca::host_identity_from_cert(end_entity).is_ok() {
            return Err(rustls::Error::General("the auth server presented an agent's host certificate".into()));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertAuthority;

    fn verify(verifier: &PinVerifier, chain: &[CertificateDer<'static>]) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
    }

    #[test]
    fn an_identity_from_before_several_auth_servers_still_loads() {
        let old = r#"{"host_id": "h", "node_index": 3, "node_name": "a", "cluster": "c",
            "auth_server": "auth.example:3026", "ca_pin": "sha256:00"}"#;
        let id: IdentityFile = serde_json::from_str(old).unwrap();
        assert_eq!(id.auth_servers, ["auth.example:3026"]);
        let new = serde_json::to_string(&id).unwrap();
        assert!(new.contains(r#""auth_servers":["auth.example:3026"]"#), "{new}");
        assert_eq!(serde_json::from_str::<IdentityFile>(&new).unwrap(), id);
    }

    #[test]
    fn pin_verifier_accepts_only_the_pinned_ca() {
        let ca = CertAuthority::generate("test").unwrap();
        let (chain, _) = ca.issue_server(&["127.0.0.1".into()], Duration::from_secs(60)).unwrap();
        verify(&PinVerifier::new(ca.pin().unwrap()), &chain).unwrap();

        let other = CertAuthority::generate("test").unwrap();
        let v = PinVerifier::new(other.pin().unwrap());
        let err = verify(&v, &chain).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "auth server CA is {}, but the config pins {}",
                ca.pin().unwrap(),
                other.pin().unwrap()
            )),
            "{err}"
        );
        assert!(v.mismatch("127.0.0.1").is_some());
        assert!(v.mismatch("auth.example").is_none(), "a mismatch is kept by the name dialled");

        // A leaf from another CA, sent with the pinned CA: the pin matches, the signature does not.
        let (foreign, _) = other.issue_server(&["127.0.0.1".into()], Duration::from_secs(60)).unwrap();
        let spliced = vec![foreign[0].clone(), ca.cert_der.clone()];
        assert!(verify(&PinVerifier::new(ca.pin().unwrap()), &spliced).is_err());
        // The pinned CA but the wrong name.
        let name = ServerName::try_from("auth.example").unwrap();
        assert!(PinVerifier::new(ca.pin().unwrap())
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .is_err());
        // An agent's host certificate, from the pinned CA and valid for the name.
        let key = rcgen::KeyPair::generate().unwrap();
        let host = crate::ca::HostIdentity {
            v: 1,
            host_id: "h".into(),
            node_name: "rogue".into(),
            node_index: 1,
            role: "db".into(),
            cluster: "test".into(),
        };
        let now = time::OffsetDateTime::now_utc();
        let pem = ca
            .issue_host(&host, &key.public_key_pem(), &["127.0.0.1".into()], now, now + time::Duration::hours(1))
            .unwrap();
        let leaf = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let err = verify(&PinVerifier::new(ca.pin().unwrap()), &[leaf, ca.cert_der.clone()]).unwrap_err();
        assert!(err.to_string().contains("host certificate"), "{err}");
        // No CA sent at all.
        assert!(verify(&PinVerifier::new(ca.pin().unwrap()), &chain[..1]).is_err());
    }
}
