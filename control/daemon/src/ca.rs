//! Sluice's own certificate authority.
//!
//! The CA signs control's server certificates and the short-lived client certificates that
//! `sluice db login` fetches. Like Teleport's RouteToDatabase, a client certificate carries the
//! user's identity *and* the database route (service, database user, database name) in a private
//! X.509 extension, so a stock libpq client needs nothing but `sslcert`/`sslkey`. It also signs
//! the certificates with which Sluice itself logs in to self-hosted PostgreSQL (`auth: cert`)
//! and those databases' server certificates (`control auth sign --format=db`).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use time::OffsetDateTime;

/// Private-arc OID of the extension that holds [`Identity`] as a DER UTF8String of JSON.
pub const IDENTITY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59_999, 1, 1];
const IDENTITY_OID_STR: &str = "1.3.6.1.4.1.59999.1.1";

/// Private-arc OID of the extension that holds [`HostIdentity`] (an agent's host certificate).
pub const HOST_IDENTITY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59_999, 1, 2];
const HOST_IDENTITY_OID_STR: &str = "1.3.6.1.4.1.59999.1.2";

#[derive(Debug, Error)]
pub enum CaError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate is not parseable: {0}")]
    Parse(String),
    #[error("certificate carries no Sluice identity")]
    NoIdentity,
    #[error("invalid identity in certificate: {0}")]
    BadIdentity(String),
}

/// Where a certificate may be used: which database, as which database user and database name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRoute {
    pub service: String,
    pub db_user: String,
    pub db_name: String,
}

/// Who holds a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Format version of this JSON, so older control versions can refuse newer certificates.
    pub v: u32,
    pub user: String,
    pub route: Option<DbRoute>,
}

/// Who holds a host certificate: an agent that joined the cluster. It lives under its own OID,
/// so a host certificate is no user's certificate (the PostgreSQL listener finds no
/// [`Identity`] in it) and a user's certificate is no host's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    pub v: u32,
    pub host_id: String,
    pub node_name: String,
    /// Small number unique in the cluster (names the agent in cancel keys, from slice S5).
    pub node_index: u16,
    /// What the host serves: `db`.
    pub role: String,
    pub cluster: String,
}

/// A CA held in memory: its certificate (PEM and DER) and signing key.
pub struct CertAuthority {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl CertAuthority {
    /// Creates a new self-signed CA for `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{cluster} Sluice CA"));
        dn.push(DnType::OrganizationName, cluster);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority { cert_pem: cert.pem(), cert_der: cert.der().clone(), key })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Parse(e.to_string()))?;
        Ok(CertAuthority { cert_pem: cert_pem.to_owned(), cert_der, key })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// The CA pin that `control status` prints: sha256 of the CA's SubjectPublicKeyInfo.
    pub fn pin(&self) -> Result<String, CaError> {
        spki_pin(&self.cert_der)
    }

    /// A server certificate for control's listeners, with a fresh key.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let (cert, key) = self.server_leaf(names, ttl)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// A server certificate for `names` (the first is its Common Name) over a fresh key.
    fn server_leaf(&self, names: &[String], ttl: Duration) -> Result<(rcgen::Certificate, KeyPair), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = subject_alt_names(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_else(|| "sluice".into()));
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + ttl;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert, key))
    }

    /// The database CA: signs the certificates with which Sluice logs in to self-hosted
    /// PostgreSQL and those servers' certificates, and is all that their `ssl_ca_file` trusts.
    /// It is not this CA because a user's own Sluice certificate (its Common Name the Sluice
    /// user name) must not log in to such a server directly, past Sluice. Its P-256 key is
    /// derived from this CA's key (HKDF-SHA256), so every auth node, and every start, has the
    /// same one without storing a second key: any certificate of it with the same subject and
    /// key is the same trust anchor.
    pub fn derive_db_ca(&self) -> Result<CertAuthority, CaError> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"sluice database CA");
        let prk = salt.extract(&self.key.serialize_der());
        let mut seed = [0u8; 32];
        // ECDSA P-256, not Ed25519: PostgreSQL's SCRAM channel binding hashes the server
        // certificate with its signature's hash, and Ed25519 has none (libpq's default
        // `channel_binding=prefer` then fails against a server this CA signed).
        let mut counter = 0u8;
        let secret = loop {
            prk.expand(&[b"p256 key v2", &[counter]], ring::hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(&mut seed))
                .map_err(|_| CaError::Parse("deriving the database CA key".into()))?;
            // A seed of zero or past the group order (probability ~2^-32) takes the next one.
            match p256::SecretKey::from_bytes(&seed.into()) {
                Ok(k) => break k,
                Err(_) if counter < 16 => counter += 1,
                Err(_) => return Err(CaError::Parse("deriving the database CA key".into())),
            }
        };
        use p256::pkcs8::EncodePrivateKey;
        let pkcs8 = secret.to_pkcs8_der().map_err(|e| CaError::Parse(format!("encoding the database CA key: {e}")))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )?;
        let (_, root) =
            x509_parser::parse_x509_certificate(&self.cert_der).map_err(|e| CaError::Parse(e.to_string()))?;
        let org =
            root.subject().iter_organization().next().and_then(|o| o.as_str().ok()).unwrap_or("sluice").to_owned();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{org} Sluice database CA"));
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        // Validity from the root's, so the same on every node.
        params.not_before = root.validity().not_before.to_datetime();
        params.not_after = root.validity().not_after.to_datetime();
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority { cert_pem: cert.pem(), cert_der: cert.der().clone(), key })
    }

    /// A server certificate for another program (a self-hosted PostgreSQL), as PEM: the leaf
    /// and this CA's certificate after it, and a fresh key (PKCS#8).
    pub fn issue_server_pem(&self, names: &[String], ttl: Duration) -> Result<(String, String), CaError> {
        let (cert, key) = self.server_leaf(names, ttl)?;
        Ok((format!("{}{}", cert.pem(), self.cert_pem), key.serialize_pem()))
    }

    /// A client certificate with which Sluice logs in to a database as `db_user` (PostgreSQL's
    /// `cert` authentication maps the Common Name to the role), over a fresh P-256 key, valid
    /// from a minute ago (clock skew) for `ttl`. It carries no Sluice identity, so Sluice's own
    /// listener refuses it like a host certificate.
    pub fn issue_db_client(
        &self,
        db_user: &str,
        ttl: Duration,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, db_user);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    }

    /// A client certificate for `identity`, over a public key the client generated (PEM SPKI).
    /// `not_before`/`not_after` are explicit so tests and admins can issue exact windows.
    pub fn issue_client(
        &self,
        identity: &Identity,
        public_key_pem: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let public_key = SubjectPublicKeyInfo::from_pem(public_key_pem)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.user.clone());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let json = serde_json::to_vec(identity).map_err(|e| CaError::BadIdentity(e.to_string()))?;
        params.custom_extensions = vec![CustomExtension::from_oid_content(IDENTITY_OID, der_utf8_string(&json))];
        let cert = params.signed_by(&public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

/// SANs for server names: IP addresses as such, anything else as a DNS name.
fn subject_alt_names(names: &[String]) -> Result<Vec<SanType>, rcgen::Error> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect()
}

impl CertAuthority {
    /// A host certificate for an agent, over the public key the agent generated (PEM SPKI): the
    /// agent's private key never leaves it. Valid for serving (its PostgreSQL listener, with
    /// `names` as SANs) and as a client (towards the auth server).
    pub fn issue_host(
        &self,
        identity: &HostIdentity,
        public_key_pem: &str,
        names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let public_key = SubjectPublicKeyInfo::from_pem(public_key_pem)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = subject_alt_names(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.host_id.clone());
        dn.push(DnType::OrganizationName, identity.cluster.clone());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let json = serde_json::to_vec(identity).map_err(|e| CaError::BadIdentity(e.to_string()))?;
        params.custom_extensions = vec![CustomExtension::from_oid_content(HOST_IDENTITY_OID, der_utf8_string(&json))];
        let cert = params.signed_by(&public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

/// Reads the host identity out of a (chain-verified) host certificate.
pub fn host_identity_from_cert(der: &[u8]) -> Result<HostIdentity, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Parse(e.to_string()))?;
    let ext =
        cert.extensions().iter().find(|e| e.oid.to_id_string() == HOST_IDENTITY_OID_STR).ok_or(CaError::NoIdentity)?;
    let json = parse_der_utf8_string(ext.value).ok_or_else(|| CaError::BadIdentity("not a UTF8String".into()))?;
    let id: HostIdentity = serde_json::from_slice(json).map_err(|e| CaError::BadIdentity(e.to_string()))?;
    if id.v != 1 {
        return Err(CaError::BadIdentity(format!("host identity format v{} is not supported", id.v)));
    }
    Ok(id)
}

/// Encodes bytes (valid UTF-8 JSON) as a DER UTF8String.
fn der_utf8_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0c];
    let n = bytes.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len_bytes: Vec<u8> = n.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | len_bytes.len() as u8);
        out.extend(len_bytes);
    }
    out.extend_from_slice(bytes);
    out
}

/// Decodes a DER UTF8String; `None` for anything else.
fn parse_der_utf8_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let k = (first & 0x7f) as usize;
        if k == 0 || k > 4 || rest.len() < k {
            return None;
        }
        let len = rest[..k].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[k..])
    };
    (rest.len() == len).then_some(rest)
}

/// Reads the identity out of a (chain-verified) client certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Parse(e.to_string()))?;
    let ext = cert.extensions().iter().find(|e| e.oid.to_id_string() == IDENTITY_OID_STR).ok_or(CaError::NoIdentity)?;
    let json = parse_der_utf8_string(ext.value).ok_or_else(|| CaError::BadIdentity("not a UTF8String".into()))?;
    let id: Identity = serde_json::from_slice(json).map_err(|e| CaError::BadIdentity(e.to_string()))?;
    if id.v != 1 {
        return Err(CaError::BadIdentity(format!("identity format v{} is not supported", id.v)));
    }
    Ok(id)
}

/// Expiry of a certificate (used to end sessions when the certificate runs out).
pub fn not_after(der: &[u8]) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Parse(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

pub fn not_before(der: &[u8]) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Parse(e.to_string()))?;
    Ok(cert.validity().not_before.to_datetime())
}

/// `sha256:<hex>` of a certificate's SubjectPublicKeyInfo, as Teleport's CA pins are.
pub fn spki_pin(der: &[u8]) -> Result<String, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Parse(e.to_string()))?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(cert.public_key().raw))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cert_carries_identity() {
        let ca = CertAuthority::generate("test").unwrap();
        let client_key = KeyPair::generate().unwrap();
        let id = Identity {
            v: 1,
            user: "alice".into(),
            route: Some(DbRoute { service: "demo".into(), db_user: "alice".into(), db_name: "x".repeat(300) }),
        };
        let now = OffsetDateTime::now_utc();
        let pem = ca.issue_client(&id, &client_key.public_key_pem(), now, now + time::Duration::hours(1)).unwrap();
        let der: CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(identity_from_cert(&der).unwrap(), id);
        let reloaded = CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        assert_eq!(reloaded.pin().unwrap(), ca.pin().unwrap());
    }

    #[test]
    fn db_client_cert_names_the_db_user_and_is_no_sluice_identity() {
        let ca = CertAuthority::generate("test").unwrap();
        let (der, _) = ca.issue_db_client("app_user", Duration::from_secs(600)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> = cert.subject().iter_common_name().map(|c| c.as_str().unwrap().to_owned()).collect();
        assert_eq!(cn, ["app_user"]);
        let left = not_after(&der).unwrap() - OffsetDateTime::now_utc();
        assert!(left > time::Duration::minutes(9) && left <= time::Duration::minutes(10), "{left}");
        assert!(matches!(identity_from_cert(&der), Err(CaError::NoIdentity)));
        assert!(matches!(host_identity_from_cert(&der), Err(CaError::NoIdentity)));
    }

    /// Derived, not random: the same root gives the same database CA (key and subject), another
    /// root another one; certificates it issues chain to it and not to the root.
    #[test]
    fn db_ca_is_derived_and_separate_from_the_root() {
        let root = CertAuthority::generate("test").unwrap();
        let db = root.derive_db_ca().unwrap();
        let again = CertAuthority::from_pem(&root.cert_pem, &root.key_pem()).unwrap().derive_db_ca().unwrap();
        assert_eq!(db.pin().unwrap(), again.pin().unwrap());
        // P-256, so that PostgreSQL's SCRAM channel binding can hash the servers it signs.
        let (_, parsed) = x509_parser::parse_x509_certificate(&db.cert_der).unwrap();
        assert_eq!(parsed.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
        assert_ne!(db.pin().unwrap(), root.pin().unwrap());
        assert_ne!(db.pin().unwrap(), CertAuthority::generate("test").unwrap().derive_db_ca().unwrap().pin().unwrap());
        let (leaf, _) = again.issue_db_client("app", Duration::from_secs(60)).unwrap();
        let verify = |anchor: &CertAuthority| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(anchor.cert_der.clone()).unwrap();
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                crate::tls::provider(),
            )
            .build()
            .unwrap()
            .verify_client_cert(&leaf, &[], rustls_pki_types::UnixTime::now())
            .is_ok()
        };
        assert!(verify(&db));
        assert!(!verify(&root));
    }

    #[test]
    fn server_cert_has_no_identity() {
        let ca = CertAuthority::generate("test").unwrap();
        let (chain, _) = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], Duration::from_secs(60)).unwrap();
        assert!(matches!(identity_from_cert(&chain[0]), Err(CaError::NoIdentity)));
    }

    fn host_cert(ca: &CertAuthority) -> (HostIdentity, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let id = HostIdentity {
            v: 1,
            host_id: "h-1".into(),
            node_name: "agent-1".into(),
            node_index: 1,
            role: "db".into(),
            cluster: "test".into(),
        };
        let now = OffsetDateTime::now_utc();
        let pem = ca
            .issue_host(&id, &key.public_key_pem(), &["127.0.0.1".into()], now, now + time::Duration::hours(1))
            .unwrap();
        (id, rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap())
    }

    #[test]
    fn host_and_user_identities_do_not_cross() {
        let ca = CertAuthority::generate("test").unwrap();
        let (id, der) = host_cert(&ca);
        assert_eq!(host_identity_from_cert(&der).unwrap(), id);
        // The PostgreSQL listener reads `identity_from_cert`: a host certificate is nobody.
        assert!(matches!(identity_from_cert(&der), Err(CaError::NoIdentity)));
        let user_key = KeyPair::generate().unwrap();
        let user = Identity { v: 1, user: "alice".into(), route: None };
        let now = OffsetDateTime::now_utc();
        let pem = ca.issue_client(&user, &user_key.public_key_pem(), now, now + time::Duration::hours(1)).unwrap();
        let user_der: CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(matches!(host_identity_from_cert(&user_der), Err(CaError::NoIdentity)));
    }

    /// The full check the PostgreSQL listener makes: the chain verifies (same CA), but the
    /// session is refused for want of a user identity.
    #[test]
    fn host_cert_is_refused_as_a_postgres_client_cert() {
        let ca = CertAuthority::generate("test").unwrap();
        let (_, der) = host_cert(&ca);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        verifier.verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now()).unwrap();
        assert!(matches!(identity_from_cert(&der), Err(CaError::NoIdentity)));
    }

    #[test]
    fn spki_pin_matches_openssl() {
        let ca = CertAuthority::generate("test").unwrap();
        let dir = std::env::temp_dir().join(format!("sluice-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, &ca.cert_pem).unwrap();
        let script =
            format!("openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | sha256sum", pem.display());
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output();
        let _ = std::fs::remove_dir_all(&dir);
        match out {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => {
                let hex = String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("").to_owned();
                assert_eq!(ca.pin().unwrap(), format!("sha256:{hex}"));
            }
            _ => eprintln!("openssl not available; pin cross-check skipped"),
        }
    }

    #[test]
    fn der_string_roundtrip_and_garbage() {
        for n in [0usize, 5, 127, 128, 255, 256, 70_000] {
            let s = vec![b'a'; n];
            assert_eq!(parse_der_utf8_string(&der_utf8_string(&s)), Some(&s[..]));
        }
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(parse_der_utf8_string(&[0x04, 0x00]), None);
        assert_eq!(parse_der_utf8_string(&[]), None);
    }
}
