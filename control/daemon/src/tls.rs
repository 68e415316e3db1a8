//! rustls configurations for control's TLS roles: the PostgreSQL listener (client certificate
//! required, from Sluice's CA), the client API listener (server-only), the cluster API (agents
//! present host certificates; joining ones present none), and the upstream leg to RDS Proxy
//! (verify-full against the system roots plus an optional per-database CA, or against Sluice's
//! database CA alone for `auth: cert`, which presents a client certificate). An agent's host
//! certificate is a [`ReloadableCert`], renewed in place while listeners and clients use it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

use crate::ca::CertAuthority;
use crate::config::{DatabaseSpec, UpstreamAuth};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("reading CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error(
        "auth: cert needs Sluice's database CA to sign the client certificate, and only the auth server \
         holds it: serve this database from the auth server"
    )]
    NoCaKey,
    #[error("issuing the upstream client certificate: {0}")]
    Issue(String),
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

/// What a database's server certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Roots {
    /// The system roots plus an optional CA file.
    System(Option<PathBuf>),
    /// Sluice's database CA alone: `auth: cert` with no `tls.ca_cert_file`, a server
    /// certificate from `control auth sign --format=db`.
    SluiceCa,
}

impl Roots {
    fn of(spec: &DatabaseSpec) -> Roots {
        match (spec.auth, &spec.tls.ca_cert_file) {
            (UpstreamAuth::Cert, None) => Roots::SluiceCa,
            (_, file) => Roots::System(file.clone()),
        }
    }
}

/// Upstream client configs, built once per set of roots (loading the system roots reads
/// hundreds of certificates from disk) and, for `auth: cert`, once per database user: every
/// session of a user presents the same short-lived certificate until it is renewed.
#[derive(Default)]
pub struct UpstreamTls {
    configs: Mutex<HashMap<Roots, Arc<ClientConfig>>>,
    cert_configs: Mutex<HashMap<(Roots, String), Arc<ClientConfig>>>,
    /// The database CA ([`CertAuthority::derive_db_ca`]): signs the `auth: cert` client
    /// certificates; only the auth server holds it.
    ca: Option<Arc<CertAuthority>>,
}

/// How long an upstream client certificate is valid, and after how long it is replaced: a
/// session presents one at least [`DB_CLIENT_CERT_TTL`] − [`DB_CLIENT_CERT_RENEW`] from expiry.
const DB_CLIENT_CERT_TTL: Duration = Duration::from_secs(10 * 60);
const DB_CLIENT_CERT_RENEW: Duration = Duration::from_secs(5 * 60);

impl UpstreamTls {
    /// Upstream configs that can also sign `auth: cert` client certificates with `ca` (the
    /// database CA).
    pub fn with_ca(ca: Arc<CertAuthority>) -> Self {
        UpstreamTls { ca: Some(ca), ..Default::default() }
    }

    fn roots(&self, roots: &Roots) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        match roots {
            Roots::SluiceCa => {
                let ca = self.ca.as_ref().ok_or(TlsError::NoCaKey)?;
                store.add(ca.cert_der.clone())?;
            }
            Roots::System(extra_ca) => {
                // Unreadable individual system certificates are skipped, as every TLS client does.
                let native = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(native.certs);
                if let Some(path) = extra_ca {
                    let pem = std::fs::read(path)
                        .map_err(|e| TlsError::CaFile { path: path.clone(), message: e.to_string() })?;
                    for cert in CertificateDer::pem_slice_iter(&pem) {
                        let cert = cert.map_err(|e| TlsError::CaFile { path: path.clone(), message: e.to_string() })?;
                        store.add(cert)?;
                    }
                }
            }
        }
        Ok(store)
    }

    fn builder(
        &self,
        roots: &Roots,
    ) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots(roots)?))
    }

    /// The config that checks `spec`'s server and presents no certificate: IAM sessions, and
    /// every database's cancel requests (PostgreSQL asks for no authentication on those).
    pub fn server_config(&self, spec: &DatabaseSpec) -> Result<Arc<ClientConfig>, TlsError> {
        let key = Roots::of(spec);
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let mut cfg = self.builder(&key)?.with_no_client_auth();
        // The dataplane continues the session from the traffic secrets.
        cfg.enable_secret_extraction = true;
        let cfg = Arc::new(cfg);
        configs.insert(key, cfg.clone());
        Ok(cfg)
    }

    /// The config for a session of `db_user` on `spec`: with `auth: cert` it presents a client
    /// certificate for `db_user`, otherwise none.
    pub fn session_config(&self, spec: &DatabaseSpec, db_user: &str) -> Result<Arc<ClientConfig>, TlsError> {
        if spec.auth != UpstreamAuth::Cert {
            return self.server_config(spec);
        }
        let ca = self.ca.clone().ok_or(TlsError::NoCaKey)?;
        let key = (Roots::of(spec), db_user.to_owned());
        let mut configs = self.cert_configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let cert = Arc::new(DbClientCert::issue(ca, db_user.to_owned())?);
        let mut cfg = self.builder(&key.0)?.with_client_cert_resolver(cert);
        cfg.enable_secret_extraction = true;
        let cfg = Arc::new(cfg);
        configs.insert(key, cfg.clone());
        Ok(cfg)
    }
}

/// The client certificate of one database user, from Sluice's CA, replaced in the handshake
/// that finds it older than [`DB_CLIENT_CERT_RENEW`]. One key per user, kept in memory only,
/// rather than one per session: a P-256 key pair and a signature per connection would add to
/// the connection setup cost that control is meant to keep low, and a certificate valid for ten
/// minutes bounds what a key read out of the process is good for.
struct DbClientCert {
    ca: Arc<CertAuthority>,
    db_user: String,
    current: RwLock<(Arc<CertifiedKey>, Instant)>,
}

impl DbClientCert {
    fn issue(ca: Arc<CertAuthority>, db_user: String) -> Result<Self, TlsError> {
        let current = RwLock::new((Self::sign(&ca, &db_user)?, Instant::now()));
        Ok(DbClientCert { ca, db_user, current })
    }

    fn sign(ca: &CertAuthority, db_user: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let (cert, key) =
            ca.issue_db_client(db_user, DB_CLIENT_CERT_TTL).map_err(|e| TlsError::Issue(e.to_string()))?;
        certified(vec![cert], key)
    }
}

impl std::fmt::Debug for DbClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbClientCert").field("db_user", &self.db_user).finish_non_exhaustive()
    }
}

impl ResolvesClientCert for DbClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let (cert, issued) = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        if issued.elapsed() < DB_CLIENT_CERT_RENEW {
            return Some(cert);
        }
        match Self::sign(&self.ca, &self.db_user) {
            Ok(next) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (next.clone(), Instant::now());
                Some(next)
            }
            // The current one is still valid for a while; the next handshake tries again.
            Err(e) => {
                tracing::warn!(db_user = %self.db_user, error = %e, "renewing the upstream client certificate");
                Some(cert)
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(auth: UpstreamAuth) -> DatabaseSpec {
        crate::config::from_yaml(&format!(
            "protocol: postgres\nuri: db.example.com:5432\nauth: {}\n",
            if auth == UpstreamAuth::Cert { "cert" } else { "iam" }
        ))
        .unwrap()
    }

    /// One config per database user (built once), presenting a certificate for that user; the
    /// cancel config presents none; without the CA key, `auth: cert` is refused up front.
    #[test]
    fn cert_auth_configs_are_per_user_and_need_the_ca_key() {
        let ca = Arc::new(CertAuthority::generate("test").unwrap());
        let tls = UpstreamTls::with_ca(ca.clone());
        let cert = spec(UpstreamAuth::Cert);
        let a1 = tls.session_config(&cert, "app").unwrap();
        let a2 = tls.session_config(&cert, "app").unwrap();
        let b = tls.session_config(&cert, "other").unwrap();
        assert!(Arc::ptr_eq(&a1, &a2) && !Arc::ptr_eq(&a1, &b));
        let presented = a1.client_auth_cert_resolver.resolve(&[], &[]).expect("no client certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&presented.cert[0]).unwrap();
        let cn: Vec<_> = parsed.subject().iter_common_name().map(|c| c.as_str().unwrap().to_owned()).collect();
        assert_eq!(cn, ["app"]);
        let server = tls.server_config(&cert).unwrap();
        assert!(!server.client_auth_cert_resolver.has_certs());
        // IAM databases present nothing either.
        assert!(!tls.session_config(&spec(UpstreamAuth::Iam), "app").unwrap().client_auth_cert_resolver.has_certs());
        // Renewed in the first handshake past the renewal age, then kept again.
        let aged = DbClientCert::issue(ca, "app".into()).unwrap();
        let first = aged.resolve(&[], &[]).unwrap();
        {
            let mut cur = aged.current.write().unwrap();
            cur.1 = Instant::now().checked_sub(DB_CLIENT_CERT_RENEW + Duration::from_secs(1)).unwrap();
        }
        let renewed = aged.resolve(&[], &[]).unwrap();
        assert_ne!(first.cert[0], renewed.cert[0]);
        assert_eq!(aged.resolve(&[], &[]).unwrap().cert[0], renewed.cert[0]);
        let agent = UpstreamTls::default();
        assert!(matches!(agent.session_config(&cert, "app"), Err(TlsError::NoCaKey)));
    }
}
