//! Verification of RDS IAM authentication tokens (SigV4 presigned `connect` URLs).
//!
//! Written by hand rather than with aws-sigv4 so the emulator is an independent check on the
//! signer Sluice uses: if both shared a library, a canonicalization bug would cancel out. The
//! verifier is a pure function of the token, what the proxy expects, the known credentials and
//! the clock, so every rejection path is unit-testable.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use time::macros::format_description;
use time::{Duration, OffsetDateTime, PrimitiveDateTime};

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const SERVICE: &str = "rds-db";
const TERMINATOR: &str = "aws4_request";
const MAX_EXPIRES_SECS: i64 = 900;
/// AWS tolerates this much clock skew for requests signed "in the future".
const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);
/// Presigned URLs sign no body; SigV4 then hashes the empty payload.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// SigV4 URI encoding keeps only the RFC 3986 unreserved characters.
const SIGV4_ENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The secret half of an AWS credential whose signatures the proxy accepts.
#[derive(Clone)]
pub struct Credentials {
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

// Hand-written so that secrets can never reach a log line through `{:?}`.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Credentials by access key id.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    keys: BTreeMap<String, Credentials>,
}

impl CredentialStore {
    pub fn insert(&mut self, access_key_id: impl Into<String>, credentials: Credentials) {
        self.keys.insert(access_key_id.into(), credentials);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a token must have been issued for.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub host: &'a str,
    pub port: u16,
    pub region: &'a str,
    pub db_user: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub access_key_id: String,
    pub expires_at: OffsetDateTime,
}

/// Why a token was refused. Never carries the signature or the security token.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token does not start with host:port/")]
    NoEndpoint,
    #[error("token is for host {0:?}")]
    WrongHost(String),
    #[error("token is for port {0:?}")]
    WrongPort(String),
    #[error("token path is not /")]
    WrongPath,
    #[error("malformed query string")]
    MalformedQuery,
    #[error("query parameter {0:?} appears more than once")]
    DuplicateParam(String),
    #[error("missing query parameter {0}")]
    MissingParam(&'static str),
    #[error("Action is {0:?}, not connect")]
    WrongAction(String),
    #[error("token is for DB user {0:?}")]
    WrongUser(String),
    #[error("algorithm {0:?} is not {ALGORITHM}")]
    WrongAlgorithm(String),
    #[error("malformed X-Amz-Credential")]
    MalformedCredential,
    #[error("credential scope region {0:?} is not this proxy's region")]
    WrongRegion(String),
    #[error("credential scope is for {0:?}, not {SERVICE}/{TERMINATOR}")]
    WrongService(String),
    #[error("credential scope date differs from X-Amz-Date")]
    ScopeDateMismatch,
    #[error("signed headers are {0:?}, not host")]
    WrongSignedHeaders(String),
    #[error("X-Amz-Expires {0:?} is not an integer in 1..=900")]
    BadExpires(String),
    #[error("X-Amz-Date {0:?} is not YYYYMMDDTHHMMSSZ")]
    BadDate(String),
    #[error("token is dated {0} seconds in the future")]
    FromFuture(i64),
    #[error("token expired {0} seconds ago")]
    Expired(i64),
    #[error("unknown access key id {0:?}")]
    UnknownAccessKey(String),
    #[error("the credentials have a session token but the token carries none")]
    MissingSecurityToken,
    #[error("the token carries a session token but the credentials have none")]
    UnexpectedSecurityToken,
    #[error("session token differs from the credentials'")]
    WrongSecurityToken,
    #[error("signature mismatch")]
    SignatureMismatch,
}

/// Checks an IAM auth token the way RDS Proxy does, returning who signed it.
pub fn verify_token(
    token: &str,
    expect: &Expectation<'_>,
    creds: &CredentialStore,
    now: OffsetDateTime,
) -> Result<VerifiedToken, TokenError> {
    let (authority, rest) = token.split_once('/').ok_or(TokenError::NoEndpoint)?;
    let (host, port) = authority.rsplit_once(':').ok_or(TokenError::NoEndpoint)?;
    // DNS names compare case-insensitively; the signature still covers the exact bytes sent.
    if !host.eq_ignore_ascii_case(expect.host) {
        return Err(TokenError::WrongHost(host.to_owned()));
    }
    if port != expect.port.to_string() {
        return Err(TokenError::WrongPort(port.to_owned()));
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(TokenError::WrongPath);
    }
    let params = parse_query(query)?;
    let get = |name: &'static str| params.get(name).map(String::as_str).ok_or(TokenError::MissingParam(name));

    let action = get("Action")?;
    if action != "connect" {
        return Err(TokenError::WrongAction(action.to_owned()));
    }
    let user = get("DBUser")?;
    if user != expect.db_user {
        return Err(TokenError::WrongUser(user.to_owned()));
    }
    let algorithm = get("X-Amz-Algorithm")?;
    if algorithm != ALGORITHM {
        return Err(TokenError::WrongAlgorithm(algorithm.to_owned()));
    }
    let credential = get("X-Amz-Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, scope_date, region, service, terminator] = scope[..] else {
        return Err(TokenError::MalformedCredential);
    };
    if access_key_id.is_empty() {
        return Err(TokenError::MalformedCredential);
    }
    if region != expect.region {
        return Err(TokenError::WrongRegion(region.to_owned()));
    }
    if service != SERVICE || terminator != TERMINATOR {
        return Err(TokenError::WrongService(format!("{service}/{terminator}")));
    }
    let signed_headers = get("X-Amz-SignedHeaders")?;
    if signed_headers != "host" {
        return Err(TokenError::WrongSignedHeaders(signed_headers.to_owned()));
    }
    let expires = parse_expires(get("X-Amz-Expires")?)?;
    let amz_date = get("X-Amz-Date")?;
    let signed_at = parse_amz_date(amz_date)?;
    // parse_amz_date only accepts 16 ASCII characters, so this slice is in bounds.
    if amz_date[..8] != *scope_date {
        return Err(TokenError::ScopeDateMismatch);
    }
    let ahead = (signed_at - now).whole_seconds();
    if ahead > MAX_CLOCK_SKEW.whole_seconds() {
        return Err(TokenError::FromFuture(ahead));
    }
    let expires_at = signed_at + Duration::seconds(expires);
    if expires_at <= now {
        return Err(TokenError::Expired((now - expires_at).whole_seconds()));
    }

    let known = creds.keys.get(access_key_id).ok_or_else(|| TokenError::UnknownAccessKey(access_key_id.to_owned()))?;
    match (&known.session_token, params.get("X-Amz-Security-Token")) {
        (None, None) => {}
        (Some(_), None) => return Err(TokenError::MissingSecurityToken),
        (None, Some(_)) => return Err(TokenError::UnexpectedSecurityToken),
        (Some(want), Some(got)) => {
            if !bool::from(want.as_bytes().ct_eq(got.as_bytes())) {
                return Err(TokenError::WrongSecurityToken);
            }
        }
    }

    let signature = get("X-Amz-Signature")?;
    let expected = compute_signature(&known.secret_access_key, authority, amz_date, region, &params);
    if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        return Err(TokenError::SignatureMismatch);
    }
    Ok(VerifiedToken { access_key_id: access_key_id.to_owned(), expires_at })
}

/// Splits and percent-decodes the query. A map keyed by name makes duplicate detection cheap
/// even for hostile tokens with many parameters.
fn parse_query(query: &str) -> Result<BTreeMap<String, String>, TokenError> {
    let mut params = BTreeMap::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').ok_or(TokenError::MalformedQuery)?;
        let name = percent_decode(name)?;
        if name.is_empty() {
            return Err(TokenError::MalformedQuery);
        }
        let value = percent_decode(value)?;
        if params.contains_key(&name) {
            return Err(TokenError::DuplicateParam(name));
        }
        params.insert(name, value);
    }
    Ok(params)
}

/// Strict decoding: a stray `%` would be re-encoded differently than it was signed, so it is
/// reported as malformed instead of surfacing later as a confusing signature mismatch.
fn percent_decode(s: &str) -> Result<String, TokenError> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        match bytes.get(at + 1..at + 3) {
            Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => i = at + 3,
            _ => return Err(TokenError::MalformedQuery),
        }
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TokenError::MalformedQuery)
}

fn parse_expires(s: &str) -> Result<i64, TokenError> {
    let bad = || TokenError::BadExpires(s.to_owned());
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<i64>() {
        Ok(n) if (1..=MAX_EXPIRES_SECS).contains(&n) => Ok(n),
        _ => Err(bad()),
    }
}

fn parse_amz_date(s: &str) -> Result<OffsetDateTime, TokenError> {
    let bad = || TokenError::BadDate(s.to_owned());
    if s.len() != 16 || !s.is_ascii() {
        return Err(bad());
    }
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    PrimitiveDateTime::parse(s, format).map(PrimitiveDateTime::assume_utc).map_err(|_| bad())
}

fn uri_encode(s: &str) -> String {
    utf8_percent_encode(s, SIGV4_ENCODE).to_string()
}

/// Every parameter except the signature, encoded, sorted by name then value.
fn canonical_query(params: &BTreeMap<String, String>) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|(name, _)| name.as_str() != "X-Amz-Signature")
        .map(|(name, value)| (uri_encode(name), uri_encode(value)))
        .collect();
    // Sorting must happen on the encoded form; encoding can change the relative order.
    pairs.sort();
    let pairs: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
    pairs.join("&")
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The hex signature SigV4 yields for a presigned GET of `/` on `authority`.
fn compute_signature(
    secret: &str,
    authority: &str,
    amz_date: &str,
    region: &str,
    params: &BTreeMap<String, String>,
) -> String {
    let canonical_request = format!("GET\n/\n{}\nhost:{authority}\n\nhost\n{EMPTY_SHA256}", canonical_query(params));
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{date}/{region}/{SERVICE}/{TERMINATOR}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, SERVICE, TERMINATOR] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    hex::encode(hmac_sha256(&key, string_to_sign.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    const HOST: &str = "pg-proxy-1.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com";
    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const NOW: OffsetDateTime = datetime!(2024-01-02 03:04:05 UTC);
    const VECTOR: &str = "pg-proxy-1.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app_user&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240102%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=863a2f6b25cd086a34b77900100f5e49ca8a26f87491622016b5c92061a04a44";

    fn expect() -> Expectation<'static> {
        Expectation { host: HOST, port: 5432, region: "us-east-1", db_user: "app_user" }
    }

    fn with(change: impl FnOnce(&mut Expectation<'static>)) -> Expectation<'static> {
        let mut e = expect();
        change(&mut e);
        e
    }

    fn store(secret: &str, session_token: Option<&str>) -> CredentialStore {
        let mut s = CredentialStore::default();
        s.insert(
            AKID,
            Credentials { secret_access_key: secret.to_owned(), session_token: session_token.map(str::to_owned) },
        );
        s
    }

    fn check(
        token: &str,
        expect: Expectation<'_>,
        creds: &CredentialStore,
        now: OffsetDateTime,
    ) -> Result<VerifiedToken, TokenError> {
        verify_token(token, &expect, creds, now)
    }

    /// A minimal presigner sharing the verifier's canonicalization, for tokens the vector lacks.
    fn sign(session_token: Option<&str>) -> String {
        let mut params = BTreeMap::new();
        for (k, v) in [
            ("Action", "connect"),
            ("DBUser", "app_user"),
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", "AKIDEXAMPLE/20240102/us-east-1/rds-db/aws4_request"),
            ("X-Amz-Date", "20240102T030405Z"),
            ("X-Amz-Expires", "900"),
            ("X-Amz-SignedHeaders", "host"),
        ] {
            params.insert(k.to_owned(), v.to_owned());
        }
        if let Some(t) = session_token {
            params.insert("X-Amz-Security-Token".to_owned(), t.to_owned());
        }
        let authority = format!("{HOST}:5432");
        let sig = compute_signature(SECRET, &authority, "20240102T030405Z", "us-east-1", &params);
        params.insert("X-Amz-Signature".to_owned(), sig);
        format!("{authority}/?{}&X-Amz-Signature={}", canonical_query(&params), params["X-Amz-Signature"])
    }

    #[test]
    fn known_vector_verifies() {
        let v = check(VECTOR, expect(), &store(SECRET, None), NOW).unwrap();
        assert_eq!(v.access_key_id, AKID);
        assert_eq!(v.expires_at, datetime!(2024-01-02 03:19:05 UTC));
        // The test signer must agree with the independently produced vector.
        assert_eq!(sign(None), VECTOR);
    }

    #[test]
    fn each_mismatch_has_its_own_error() {
        use TokenError::*;
        let (good, base) = (store(SECRET, None), expect());
        let mut unknown = CredentialStore::default();
        unknown.insert("AKIDOTHER", good.keys[AKID].clone());
        let flipped = VECTOR.replace("a04a44", "a04a45");
        let late = NOW + Duration::minutes(16);
        let early = NOW - Duration::minutes(6);
        let other_host = "x.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com";
        let cases = [
            (VECTOR, base, &store("wrong", None), NOW, SignatureMismatch),
            (&flipped, base, &good, NOW, SignatureMismatch),
            (VECTOR, with(|e| e.db_user = "x"), &good, NOW, WrongUser("app_user".into())),
            (VECTOR, with(|e| e.host = other_host), &good, NOW, WrongHost(HOST.into())),
            (VECTOR, with(|e| e.port = 5433), &good, NOW, WrongPort("5432".into())),
            (VECTOR, with(|e| e.region = "eu-west-1"), &good, NOW, WrongRegion("us-east-1".into())),
            (VECTOR, base, &good, late, Expired(60)),
            (VECTOR, base, &good, early, FromFuture(360)),
            (VECTOR, base, &unknown, NOW, UnknownAccessKey(AKID.into())),
        ];
        for (token, exp, creds, now, want) in cases {
            assert_eq!(check(token, exp, creds, now), Err(want));
        }
    }

    #[test]
    fn malformed_queries_are_refused_before_signature_checks() {
        use TokenError::*;
        let cases = [
            ("Action=connect", "Action=connect&Action=connect", DuplicateParam("Action".into())),
            ("Expires=900", "Expires=901", BadExpires("901".into())),
            ("%2F20240102", "%2F20240101", ScopeDateMismatch),
            ("Headers=host", "Headers=host%3Bx", WrongSignedHeaders("host;x".into())),
            ("%2F2024", "%Z2024", MalformedQuery),
            (":5432/", ":5432/db", WrongPath),
            ("Action=connect", "Action=login", WrongAction("login".into())),
        ];
        for (from, to, want) in cases {
            let token = VECTOR.replace(from, to);
            assert_eq!(check(&token, expect(), &store(SECRET, None), NOW), Err(want));
        }
        assert_eq!(check("x", expect(), &store(SECRET, None), NOW), Err(NoEndpoint));
    }

    #[test]
    fn session_tokens_must_match() {
        let token = sign(Some("FwoGZXIvYXdzEJr//session+token=="));
        assert!(token.contains("X-Amz-Security-Token=FwoGZXIvYXdzEJr%2F%2Fsession%2Btoken%3D%3D"));
        let with = store(SECRET, Some("FwoGZXIvYXdzEJr//session+token=="));
        assert!(check(&token, expect(), &with, NOW).is_ok());
        assert_eq!(check(&token, expect(), &store(SECRET, Some("other")), NOW), Err(TokenError::WrongSecurityToken));
        assert_eq!(check(&token, expect(), &store(SECRET, None), NOW), Err(TokenError::UnexpectedSecurityToken));
        assert_eq!(check(VECTOR, expect(), &with, NOW), Err(TokenError::MissingSecurityToken));
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,400}") {
            let _ = check(&s, expect(), &store(SECRET, None), NOW);
        }

        #[test]
        fn mutated_vector_never_panics_or_verifies(at in 0usize..VECTOR.len(), c in any::<char>(), delete in any::<bool>()) {
            let mut s: Vec<char> = VECTOR.chars().collect();
            let replaced = s[at];
            if delete { s.remove(at); } else { s[at] = c; }
            let s: String = s.into_iter().collect();
            let result = check(&s, expect(), &store(SECRET, None), NOW);
            // Only a case change (in the host, or in a %XX escape) may keep it valid.
            if result.is_ok() && s != VECTOR {
                prop_assert!(!delete && replaced.eq_ignore_ascii_case(&c));
            }
        }
    }
}
