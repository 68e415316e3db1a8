//! The client side of TLS to control's API: the crypto provider both ends use, and a client
//! configuration that trusts exactly the cluster's CA (the `sluice` CLI pins it at login).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("reading the CA certificates: {0}")]
    CaPem(String),
}

/// One crypto provider for the whole process (ring: builds without cmake or a C++ toolchain).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting exactly the PEM CAs in `ca_pem` (the `sluice` CLI talking to control).
pub fn client_config_for_ca(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::CaPem(e.to_string()))?;
        roots.add(cert)?;
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
