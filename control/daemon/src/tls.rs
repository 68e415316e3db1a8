//! rustls configurations for control's TLS roles: the PostgreSQL listener (client certificate
//! required, from Sluice's CA), the client API listener (server-only), the cluster API (agents
//! present host certificates; joining ones present none), and the upstream leg to RDS Proxy
//! (verify-full against the system roots plus an optional per-database CA). An agent's host
//! certificate is a [`ReloadableCert`], renewed in place while listeners and clients use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::ResolvesClientCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("reading CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

pub use sluice_api::tls::{client_config_for_ca, provider};

/// The PostgreSQL listener: TLS 1.2/1.3, a client certificate chained to `ca_der` is required.
///
/// No session resumption: a resumed TLS session would carry the identity of the certificate
/// its first handshake checked, past that certificate's expiry and past the user's removal.
/// Every connection presents its certificate, and control checks expiry and the user after
/// every handshake (an expired certificate passes the TLS layer only so that the client gets a
/// PostgreSQL error, SQLSTATE 28000, that says so, instead of a bare TLS alert).
pub fn postgres_server_config(
    ca_der: &CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ExpiryDeferringVerifier { inner }))
        .with_cert_resolver(cert);
    // libpq 17 requires ALPN "postgresql" for direct TLS (sslnegotiation=direct).
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    // The dataplane continues the session from the traffic secrets.
    cfg.enable_secret_extraction = true;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.ticketer = Arc::new(NoTickets);
    Ok(Arc::new(cfg))
}

/// Never issues TLS 1.2 session tickets (rustls' default already doesn't; stated here so that a
/// change of default cannot bring resumption back).
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// WebPKI client verification, except that a certificate whose only fault is its expiry is
/// let through: the chain and signatures are still checked as of its last valid second, and the
/// connection is then refused at the PostgreSQL layer (see [`check_not_expired`]).
#[derive(Debug)]
struct ExpiryDeferringVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExpiryDeferringVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) => {
                let last_valid = crate::ca::not_after(end_entity)
                    .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
                let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    u64::try_from(last_valid.unix_timestamp()).unwrap_or(0),
                ));
                self.inner.verify_client_cert(end_entity, intermediates, at)
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The check that runs after every TLS handshake on the PostgreSQL listener: the client
/// certificate (`der`) must not have expired by `now`. Returns when it expired, if it did.
pub fn check_not_expired(der: &[u8], now: time::OffsetDateTime) -> Result<(), time::OffsetDateTime> {
    match crate::ca::not_after(der) {
        Ok(t) if t >= now => Ok(()),
        Ok(t) => Err(t),
        // Unparseable: the verifier would not have accepted it; refuse all the same.
        Err(_) => Err(time::OffsetDateTime::UNIX_EPOCH),
    }
}

/// The client API listener: server authentication only (users authenticate with a password).
pub fn api_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The cluster API on the auth server: a client certificate is asked for but optional, since a
/// joining agent has none yet; handlers other than the join refuse a request without an agent's
/// host certificate.
pub fn cluster_server_config(
    ca_der: &CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    Ok(Arc::new(cfg))
}

/// A certificate chain and key that can be replaced while servers present it and clients
/// authenticate with it: an agent's host certificate, renewed before it expires. Handshakes
/// already under way keep the one they started with.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ReloadableCert { current: RwLock::new(certified(chain, key)?) }))
    }

    /// Presents `chain` from the next handshake on.
    pub fn replace(&self, chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), TlsError> {
        let next = certified(chain, key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = provider().key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signer);
    // A key that does not match the leaf would fail every handshake; refuse it here instead.
    certified.keys_match()?;
    Ok(Arc::new(certified))
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadableCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Upstream client configs, one per extra CA file, built once: loading the system roots reads
/// hundreds of certificates from disk.
#[derive(Default)]
pub struct UpstreamTls {
    configs: Mutex<HashMap<Option<PathBuf>, Arc<ClientConfig>>>,
}

impl UpstreamTls {
    pub fn config(&self, extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
        let key = extra_ca.map(Path::to_path_buf);
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let mut roots = RootCertStore::empty();
        // Unreadable individual system certificates are skipped, as every TLS client does.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca {
            let pem =
                std::fs::read(path).map_err(|e| TlsError::CaFile { path: path.into(), message: e.to_string() })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::CaFile { path: path.into(), message: e.to_string() })?;
                roots.add(cert)?;
            }
        }
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The dataplane continues the session from the traffic secrets.
        cfg.enable_secret_extraction = true;
        let cfg = Arc::new(cfg);
        configs.insert(key, cfg.clone());
        Ok(cfg)
    }
}
