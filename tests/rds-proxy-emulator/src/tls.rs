//! The emulator's test PKI: a private CA standing in for the Amazon RDS root, and a server
//! certificate for the proxy endpoint signed by it.
//!
//! Files live in `--tls-dir` so clients can trust `ca.pem` across restarts. `ca.key` is kept too,
//! so a restart with a different proxy name reissues only the server certificate and a `ca.pem`
//! that clients already hold stays valid.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use tracing::info;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Pem { path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Loads (or first creates) the certificates in `dir` and builds the server's TLS config.
/// `dns_names` are the server certificate's DNS SANs; 127.0.0.1 is always added so clients can
/// verify the name when connecting by address.
pub fn server_config(dir: &Path, dns_names: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let (cert_pem, key_pem) = match (read(&cert_path)?, read(&key_path)?) {
        (Some(cert), Some(key)) if covers(&cert, &cert_path, dns_names)? => (cert, key),
        _ => issue_server_cert(dir, dns_names)?,
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(&cert_path))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_error(&key_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Whether a stored certificate names every endpoint. DNS SANs appear verbatim (IA5String) in
/// the DER, so a byte search answers this without an X.509 parser.
fn covers(cert_pem: &str, path: &Path, dns_names: &[String]) -> Result<bool, TlsError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(pem_error(path))?;
    Ok(dns_names.iter().all(|name| der.windows(name.len()).any(|window| window == name.as_bytes())))
}

fn issue_server_cert(dir: &Path, dns_names: &[String]) -> Result<(String, String), TlsError> {
    let ca = load_or_create_ca(dir)?;
    let mut sans = dns_names.to_vec();
    sans.push("127.0.0.1".to_owned());
    let mut params = CertificateParams::new(sans)?;
    if let Some(first) = dns_names.first() {
        params.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write(&dir.join("server.pem"), &cert_pem, false)?;
    write(&dir.join("server.key"), &key_pem, true)?;
    info!(dir = %dir.display(), "issued a new server certificate");
    Ok((cert_pem, key_pem))
}

fn load_or_create_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if let (Some(cert), Some(key)) = (read(&cert_path)?, read(&key_path)?) {
        return Ok(Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key)?)?);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "Sluice RDS Proxy Emulator Test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    info!(path = %cert_path.display(), "created a new test CA");
    Ok(Issuer::new(params, key))
}

fn read(path: &Path) -> Result<Option<String>, TlsError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Writes via a temporary file and rename so a reader never sees half a PEM file.
fn write(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(io_error(&tmp))?;
    fs::rename(&tmp, path).map_err(io_error(path))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_owned(), source }
}

fn pem_error(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |source| TlsError::Pem { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reuses_and_reissues_for_new_names() {
        let dir = std::env::temp_dir().join(format!("rds-emu-tls-{}", std::process::id()));
        let names = |n: &str| vec![format!("{n}.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com")];
        server_config(&dir, &names("a")).unwrap();
        let ca = fs::read_to_string(dir.join("ca.pem")).unwrap();
        let server = fs::read_to_string(dir.join("server.pem")).unwrap();
        server_config(&dir, &names("a")).unwrap();
        assert_eq!(fs::read_to_string(dir.join("server.pem")).unwrap(), server);
        server_config(&dir, &names("b")).unwrap();
        assert_ne!(fs::read_to_string(dir.join("server.pem")).unwrap(), server);
        assert_eq!(fs::read_to_string(dir.join("ca.pem")).unwrap(), ca);
        fs::remove_dir_all(&dir).unwrap();
    }
}
