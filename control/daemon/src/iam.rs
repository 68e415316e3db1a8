//! RDS IAM authentication tokens.
//!
//! A token is a SigV4 presigned `GET https://HOST:PORT/?Action=connect&DBUser=USER` for service
//! `rds-db`, valid 900 s, written without the scheme. The signature comes from `aws-sigv4`; the
//! query string is laid out in botocore's order (request params, then the auth params, the session
//! token, the signature) so Sluice's tokens are byte-for-byte what `aws rds generate-db-auth-token`
//! prints. Credentials come from the standard AWS chain (`aws-config`: env, profile, IMDS), optionally
//! through `sts:AssumeRole`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use thiserror::Error;

/// How long a token is valid (the maximum RDS accepts).
pub const TOKEN_TTL: Duration = Duration::from_secs(900);
/// A cached token is reused only while it has more than this left.
pub const TOKEN_REUSE_MARGIN: Duration = Duration::from_secs(300);

/// SigV4's URI encoding: everything but unreserved characters is %XX.
const SIGV4_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

#[derive(Debug, Error)]
pub enum IamError {
    #[error("no AWS credentials: {0}")]
    NoCredentials(String),
    #[error("assuming role {role}: {message}")]
    AssumeRole { role: String, message: String },
    #[error("signing the token: {0}")]
    Signing(String),
    #[error("no AWS region: set aws.region for the database or use an *.rds.amazonaws.com host")]
    NoRegion,
}

/// What a token is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub region: String,
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, SIGV4_SET).to_string()
}

/// Mints a token at `now` from `creds`, exactly as botocore's `generate_db_auth_token`.
pub fn generate_auth_token(creds: &Credentials, target: &TokenTarget, now: SystemTime) -> Result<String, IamError> {
    let identity: Identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_TTL);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name("rds-db")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into();
    let request_query = format!("Action=connect&DBUser={}", enc(&target.user));
    let url = format!("https://{}:{}/?{request_query}", target.host, target.port);
    let signable = SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| IamError::Signing(e.to_string()))?;
    let (instructions, _) = sign(signable, &params).map_err(|e| IamError::Signing(e.to_string()))?.into_parts();
    let signed: HashMap<&str, &str> = instructions.params().iter().map(|(k, v)| (*k, v.as_ref())).collect();
    let mut token = format!("{}:{}/?{request_query}", target.host, target.port);
    for name in [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
    ] {
        match signed.get(name) {
            Some(v) => token.push_str(&format!("&{name}={}", enc(v))),
            None if name == "X-Amz-Security-Token" => {}
            None => return Err(IamError::Signing(format!("signer returned no {name}"))),
        }
    }
    Ok(token)
}

/// Where credentials come from for one database: the default chain, or a role assumed from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialSource {
    pub region: String,
    pub assume_role_arn: Option<String>,
    pub external_id: Option<String>,
}

/// Resolves credentials and mints tokens, caching both.
#[derive(Default)]
pub struct TokenMinter {
    providers: tokio::sync::Mutex<HashMap<CredentialSource, aws_credential_types::provider::SharedCredentialsProvider>>,
    credentials: Mutex<HashMap<CredentialSource, Credentials>>,
    tokens: Mutex<HashMap<(String, TokenTarget), (String, SystemTime)>>,
}

impl TokenMinter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The credentials provider for `source` (built once; the assume-role provider caches and refreshes).
    pub async fn provider(
        &self,
        source: &CredentialSource,
    ) -> aws_credential_types::provider::SharedCredentialsProvider {
        let mut providers = self.providers.lock().await;
        if let Some(p) = providers.get(source) {
            return p.clone();
        }
        let region = aws_config::Region::new(source.region.clone());
        let base = aws_config::defaults(BehaviorVersion::latest()).region(region.clone()).load().await;
        let provider = match &source.assume_role_arn {
            Some(arn) => {
                let mut b = aws_config::sts::AssumeRoleProvider::builder(arn.clone())
                    .session_name("sluice")
                    .region(region)
                    .configure(&base);
                if let Some(id) = &source.external_id {
                    b = b.external_id(id.clone());
                }
                aws_credential_types::provider::SharedCredentialsProvider::new(b.build().await)
            }
            None => match base.credentials_provider() {
                Some(p) => p,
                None => aws_credential_types::provider::SharedCredentialsProvider::new(
                    aws_config::default_provider::credentials::default_provider().await,
                ),
            },
        };
        providers.insert(source.clone(), provider.clone());
        provider
    }

    /// Resolves credentials for `source`, reusing cached ones until five minutes before they expire
    /// (assume-role and IMDS credentials cost a network round trip).
    pub async fn credentials(&self, source: &CredentialSource) -> Result<Credentials, IamError> {
        {
            let cache = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(source) {
                let fresh = c.expiry().is_none_or(|exp| exp > SystemTime::now() + TOKEN_REUSE_MARGIN);
                if fresh {
                    return Ok(c.clone());
                }
            }
        }
        let provider = self.provider(source).await;
        let creds = provider.provide_credentials().await.map_err(|e| {
            let message = aws_smithy_types_display(&e);
            match &source.assume_role_arn {
                Some(role) => IamError::AssumeRole { role: role.clone(), message },
                None => IamError::NoCredentials(message),
            }
        })?;
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).insert(source.clone(), creds.clone());
        Ok(creds)
    }

    /// A token for `target`, reusing one minted for the same credentials while it has more than
    /// five minutes left.
    pub async fn token(&self, source: &CredentialSource, target: &TokenTarget) -> Result<String, IamError> {
        let creds = self.credentials(source).await?;
        let key = (creds.access_key_id().to_owned(), target.clone());
        let now = SystemTime::now();
        {
            let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((token, minted)) = tokens.get(&key) {
                if let Ok(age) = now.duration_since(*minted) {
                    if age + TOKEN_REUSE_MARGIN < TOKEN_TTL {
                        return Ok(token.clone());
                    }
                }
            }
        }
        let token = generate_auth_token(&creds, target, now)?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, (_, minted)| now.duration_since(*minted).map(|a| a < TOKEN_TTL).unwrap_or(false));
        tokens.insert(key, (token.clone(), now));
        Ok(token)
    }
}

/// The whole source chain of an AWS error, which is where the useful part usually is.
fn aws_smithy_types_display(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_target() -> TokenTarget {
        TokenTarget {
            host: "pg-proxy-1.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com".into(),
            port: 5432,
            user: "app_user".into(),
            region: "us-east-1".into(),
        }
    }

    fn vector_time() -> SystemTime {
        // 2024-01-02T03:04:05Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645)
    }

    #[test]
    fn matches_botocore_test_vector() {
        let creds = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, "test");
        let token = generate_auth_token(&creds, &vector_target(), vector_time()).unwrap();
        assert_eq!(
            token,
            "pg-proxy-1.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app_user&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240102%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=863a2f6b25cd086a34b77900100f5e49ca8a26f87491622016b5c92061a04a44"
        );
    }

    #[test]
    fn session_token_goes_before_signature_and_is_signed() {
        let with = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("tok/en+=".into()),
            None,
            "t",
        );
        let token = generate_auth_token(&with, &vector_target(), vector_time()).unwrap();
        let (before, sig) = token.rsplit_once("&X-Amz-Signature=").unwrap();
        assert!(before.ends_with("&X-Amz-SignedHeaders=host&X-Amz-Security-Token=tok%2Fen%2B%3D"), "{token}");
        assert!(!token.contains("863a2f6b25cd086a34b77900100f5e49ca8a26f87491622016b5c92061a04a44"));
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn user_names_are_encoded() {
        let creds = Credentials::new("AKID", "secret", None, None, "t");
        let mut t = vector_target();
        t.user = "a b/c".into();
        let token = generate_auth_token(&creds, &t, vector_time()).unwrap();
        assert!(token.contains("DBUser=a%20b%2Fc&"), "{token}");
    }
}
