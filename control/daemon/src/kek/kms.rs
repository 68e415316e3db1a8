//! An AWS KMS key as a KEK: only `TrentService.Encrypt` and `Decrypt` (AWS JSON 1.1), signed with
//! `aws-sigv4`, over one HTTP/1.1 exchange (hyper; rustls with the system roots for https).
//! Credentials come from the standard chain ([`TokenMinter::credentials`], as for IAM tokens).
//! The wrap's encryption context (`sluice-cluster`, `sluice-ca`) binds it to its CA as the
//! file KEK's AAD does; KMS refuses a blob presented with another context.
//!
//! The callers are synchronous (blocking threads, the admin CLI without a runtime), so each call
//! runs on a short-lived thread with its own current-thread runtime: that is safe from any
//! thread, never nests runtimes, and KMS calls are rare (loading the CA, sealing, rotating).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use base64::Engine as _;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use sluice_api::iam::{CredentialSource, TokenMinter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;
use zeroize::{Zeroize, Zeroizing};

use super::KekError;

/// Credentials, connecting, signing and the answer together.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// KMS answers are a few hundred bytes.
const MAX_RESPONSE: usize = 64 << 10;

/// `kek.aws_kms` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsConfig {
    /// The key's ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID`); not an alias, whose target can
    /// change under the wraps that name it.
    pub key_id: String,
    /// Defaults to the ARN's region; if set it must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Another endpoint (moto, a VPC endpoint). Without it `AWS_ENDPOINT_URL_KMS` or
    /// `AWS_ENDPOINT_URL` apply, as in the AWS SDKs, then `https://kms.REGION.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

impl KmsConfig {
    /// The key's region (from its ARN), after checking the shape.
    pub fn validate(&self) -> Result<String, KekError> {
        let bad = || {
            KekError::Config(format!(
                "kek.aws_kms.key_id {:?} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)",
                self.key_id
            ))
        };
        let parts: Vec<&str> = self.key_id.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts.as_slice() else {
            return Err(bad());
        };
        let key = resource.strip_prefix("key/").ok_or_else(bad)?;
        if *arn != "arn"
            || !partition.starts_with("aws")
            || *service != "kms"
            || region.is_empty()
            || account.is_empty()
            || key.is_empty()
        {
            return Err(bad());
        }
        if let Some(r) = &self.region {
            if r != region {
                return Err(KekError::Config(format!(
                    "kek.aws_kms.region {r:?} differs from the key ARN's region {region:?}"
                )));
            }
        }
        if let Some(url) = &self.endpoint_url {
            parse_endpoint(url)?;
        }
        Ok((*region).to_owned())
    }
}

/// A KMS key used as a KEK.
#[derive(Debug, Clone)]
pub struct KmsKek {
    id: String,
    arn: String,
    region: String,
    endpoint: http::Uri,
}

impl KmsKek {
    /// Checks the configuration and picks the endpoint; no call is made yet.
    pub fn new(cfg: &KmsConfig) -> Result<KmsKek, KekError> {
        let region = cfg.validate()?;
        let from_env = || {
            ["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        };
        let endpoint = match cfg.endpoint_url.clone().or_else(from_env) {
            Some(url) => parse_endpoint(&url)?,
            None => {
                let suffix = if cfg.key_id.starts_with("arn:aws-cn:") { "amazonaws.com.cn" } else { "amazonaws.com" };
                parse_endpoint(&format!("https://kms.{region}.{suffix}"))?
            }
        };
        Ok(KmsKek { id: format!("kms:{}", cfg.key_id), arn: cfg.key_id.clone(), region, endpoint })
    }

    /// `kms:` + the key ARN.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// `CiphertextBlob` of `plaintext` under this key, bound to `cluster` and `ca`.
    pub fn encrypt(&self, cluster: &str, ca: &str, plaintext: &[u8]) -> Result<Vec<u8>, KekError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let req = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "KeyId": self.arn,
                "Plaintext": Zeroizing::new(b64.encode(plaintext)).as_str(),
                "EncryptionContext": context(cluster, ca),
            }))
            .map_err(|e| KekError::Kms(e.to_string()))?,
        );
        let answer = self.call("Encrypt", req)?;
        #[derive(Deserialize)]
        struct Out {
            #[serde(rename = "CiphertextBlob")]
            blob: String,
            #[serde(rename = "KeyId")]
            key_id: Option<String>,
        }
        let out: Out =
            serde_json::from_slice(&answer).map_err(|e| KekError::Kms(format!("bad Encrypt answer: {e}")))?;
        if let Some(k) = out.key_id.filter(|k| *k != self.arn) {
            return Err(KekError::Kms(format!("Encrypt used key {k}, not {}", self.arn)));
        }
        b64.decode(out.blob).map_err(|e| KekError::Kms(format!("bad CiphertextBlob in the Encrypt answer: {e}")))
    }

    /// The plaintext of `blob`, which KMS opens only for this key and this `cluster` and `ca`.
    pub fn decrypt(&self, cluster: &str, ca: &str, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let req = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "KeyId": self.arn,
                "CiphertextBlob": b64.encode(blob),
                "EncryptionContext": context(cluster, ca),
            }))
            .map_err(|e| KekError::Kms(e.to_string()))?,
        );
        let answer = self.call("Decrypt", req)?;
        #[derive(Deserialize)]
        struct Out {
            #[serde(rename = "Plaintext")]
            plaintext: String,
        }
        let mut out: Out = serde_json::from_slice(&answer)
            .map_err(|_| KekError::Kms("bad Decrypt answer (not the expected JSON)".into()))?;
        let plain = b64.decode(&out.plaintext).map(Zeroizing::new);
        out.plaintext.zeroize();
        plain.map_err(|_| KekError::Kms("bad Plaintext in the Decrypt answer".into()))
    }

    /// One signed `TrentService.<action>` call; the answer's body on HTTP 200.
    fn call(&self, action: &'static str, body: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, KekError> {
        let (endpoint, region, arn) = (self.endpoint.clone(), self.region.clone(), self.arn.clone());
        debug!(action, key = %arn, endpoint = %endpoint, "KMS call");
        on_own_runtime(async move {
            let fut = exchange(&endpoint, &region, &arn, action, body);
            tokio::time::timeout(CALL_TIMEOUT, fut)
                .await
                .map_err(|_| KekError::Kms(format!("{action} at {endpoint}: no answer within {CALL_TIMEOUT:?}")))?
        })
    }
}

fn context(cluster: &str, ca: &str) -> serde_json::Value {
    serde_json::json!({ "sluice-cluster": cluster, "sluice-ca": ca })
}

fn parse_endpoint(url: &str) -> Result<http::Uri, KekError> {
    let bad = |why: &str| KekError::Config(format!("KMS endpoint {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("needs http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// Runs `fut` to completion on a new thread with its own current-thread runtime, so that a
/// synchronous caller anywhere (a runtime worker included) can wait for it.
fn on_own_runtime<T: Send + 'static>(
    fut: impl Future<Output = Result<T, KekError>> + Send + 'static,
) -> Result<T, KekError> {
    let thread = std::thread::Builder::new()
        .name("sluice-kms".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| KekError::Kms(format!("starting a runtime: {e}")))?;
            rt.block_on(fut)
        })
        .map_err(|e| KekError::Kms(format!("starting a thread: {e}")))?;
    thread.join().map_err(|_| KekError::Kms("the KMS call's thread panicked".into()))?
}

async fn exchange(
    endpoint: &http::Uri,
    region: &str,
    arn: &str,
    action: &'static str,
    body: Zeroizing<Vec<u8>>,
) -> Result<Zeroizing<Vec<u8>>, KekError> {
    let kms = |m: String| KekError::Kms(format!("{action} at {endpoint}: {m}"));
    // Connect first: an unreachable endpoint fails fast, before the credential chain runs.
    let host = endpoint.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let https = endpoint.scheme_str() == Some("https");
    let port = endpoint.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| kms(format!("connecting: {e}")))?;
    let source = CredentialSource { region: region.to_owned(), assume_role_arn: None, external_id: None };
    let creds = TokenMinter::new().credentials(&source).await.map_err(|e| kms(e.to_string()))?;
    let identity: Identity = creds.into();

    let authority = endpoint.authority().map(|a| a.as_str().to_owned()).ok_or_else(|| kms("no host".into()))?;
    let target = format!("TrentService.{action}");
    let url = format!("{}://{authority}{}", endpoint.scheme_str().unwrap_or("https"), endpoint.path());
    let headers = [
        ("host", authority.as_str()),
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target.as_str()),
    ];
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kms")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| kms(format!("signing: {e}")))?
        .into();
    let signable = SignableRequest::new("POST", &url, headers.iter().copied(), SignableBody::Bytes(&body))
        .map_err(|e| kms(format!("signing: {e}")))?;
    let (instructions, _) = sign(signable, &params).map_err(|e| kms(format!("signing: {e}")))?.into_parts();

    let mut request = http::Request::post(endpoint.path());
    for (name, value) in headers.iter().copied().chain(instructions.headers()) {
        request = request.header(name, value);
    }
    let request = request.body(axum::body::Body::from(body.to_vec())).map_err(|e| kms(e.to_string()))?;

    let (status, answer) = if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| kms(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| kms(format!("TLS: {e}")))?;
        send(tls, request).await
    } else {
        send(tcp, request).await
    }
    .map_err(kms)?;
    if status == http::StatusCode::OK {
        return Ok(answer);
    }
    Err(refusal(action, arn, status, &answer))
}

/// Maps a KMS error answer: a blob that does not open for this key and context is an
/// authentication failure like a bad file-KEK wrap, anything else a KMS error.
fn refusal(action: &str, arn: &str, status: http::StatusCode, answer: &[u8]) -> KekError {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(rename = "__type")]
        kind: Option<String>,
        #[serde(alias = "Message")]
        message: Option<String>,
    }
    let (kind, message) = match serde_json::from_slice::<ErrorBody>(answer) {
        Ok(e) => (e.kind.unwrap_or_default(), e.message.unwrap_or_default()),
        Err(_) => (String::new(), String::from_utf8_lossy(answer).chars().take(300).collect()),
    };
    // `__type` may carry a namespace: `com.amazonaws.kms#InvalidCiphertextException`.
    let kind = kind.rsplit('#').next().unwrap_or_default().to_owned();
    if matches!(kind.as_str(), "InvalidCiphertextException" | "IncorrectKeyException") {
        return KekError::Authentication(format!("KMS refused the DEK wrapped for kms:{arn}: {kind}"));
    }
    KekError::Kms(format!("{action} with {arn}: HTTP {}: {kind} {message}", status.as_u16()))
}

async fn send<S>(
    stream: S,
    request: http::Request<axum::body::Body>,
) -> Result<(http::StatusCode, Zeroizing<Vec<u8>>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "KMS connection ended");
        }
    });
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), MAX_RESPONSE)
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    driver.abort();
    Ok((status, Zeroizing::new(body.to_vec())))
}

fn tls_config() -> Result<Arc<ClientConfig>, KekError> {
    let mut roots = RootCertStore::empty();
    // Unreadable individual system certificates are skipped, as every TLS client does.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let cfg = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| KekError::Kms(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(key_id: &str) -> KmsConfig {
        KmsConfig { key_id: key_id.into(), region: None, endpoint_url: None }
    }

    #[test]
    fn key_arns_are_required() {
        let arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(cfg(arn).validate().unwrap(), "eu-west-1");
        for bad in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/sluice",
            "arn:aws:kms:eu-west-1:123456789012:alias/sluice",
            "arn:aws:kms:eu-west-1:123456789012:key/",
            "arn:aws:s3:eu-west-1:123456789012:key/x",
            "arn:aws:kms::123456789012:key/x",
        ] {
            assert!(matches!(cfg(bad).validate(), Err(KekError::Config(_))), "{bad}");
        }
        let mut c = cfg(arn);
        c.region = Some("us-east-1".into());
        assert!(c.validate().unwrap_err().to_string().contains("differs"));
        c.region = Some("eu-west-1".into());
        c.endpoint_url = Some("ftp://x".into());
        assert!(c.validate().is_err());
        c.endpoint_url = Some("http://127.0.0.1:5000".into());
        c.validate().unwrap();
        let k = KmsKek::new(&c).unwrap();
        assert_eq!(k.id(), format!("kms:{arn}"));
        assert_eq!(k.endpoint.to_string(), "http://127.0.0.1:5000/");
    }

    #[test]
    fn error_answers_map_to_authentication_or_kms() {
        let arn = "arn:aws:kms:us-east-1:1:key/k";
        let e = refusal(
            "Decrypt",
            arn,
            http::StatusCode::BAD_REQUEST,
            br#"{"__type":"com.amazonaws.kms#InvalidCiphertextException","message":""}"#,
        );
        assert!(e.to_string().starts_with("CA key failed authentication"), "{e}");
        let e = refusal(
            "Decrypt",
            arn,
            http::StatusCode::BAD_REQUEST,
            br#"{"__type":"AccessDeniedException","Message":"no"}"#,
        );
        assert!(matches!(&e, KekError::Kms(m) if m.contains("AccessDeniedException no")), "{e}");
        let e = refusal("Encrypt", arn, http::StatusCode::BAD_GATEWAY, b"<html>");
        assert!(e.to_string().contains("HTTP 502"), "{e}");
    }

    #[test]
    fn an_unreachable_endpoint_is_an_error_not_a_hang_even_on_a_runtime_worker() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = cfg("arn:aws:kms:us-east-1:123456789012:key/k");
        c.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
        let k = KmsKek::new(&c).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Called on a runtime worker: no nested-runtime panic.
        let e = rt.block_on(async move { k.encrypt("c", "db", &[0; 32]) });
        let e = e.unwrap_err().to_string();
        assert!(e.starts_with("AWS KMS: Encrypt at http://127.0.0.1"), "{e}");
    }
}
