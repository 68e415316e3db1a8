//! rustls configurations for control's three TLS roles: the PostgreSQL listener (client certificate
//! required, from Sluice's CA), the client API listener (server-only), and the upstream leg to RDS
//! Proxy (verify-full against the system roots plus an optional per-database CA).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

/// One crypto provider for the whole process (ring: builds without cmake or a C++ toolchain).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PostgreSQL listener: TLS 1.2/1.3, a client certificate chained to `ca_der` is required.
pub fn postgres_server_config(
    ca_der: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // libpq 17 requires ALPN "postgresql" for direct TLS (sslnegotiation=direct).
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    // The dataplane continues the session from the traffic secrets.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
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

/// A client config trusting exactly the PEM CAs in `ca_pem` (the `sluice` CLI talking to control).
pub fn client_config_for_ca(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::CaFile { path: PathBuf::from("<pem>"), message: e.to_string() })?;
        roots.add(cert)?;
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
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
