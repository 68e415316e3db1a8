//! Looks up the secret half of an access key the emulator was not started with, from the test's
//! AWS API emulator (moto, through tests/support/moto_server.py's `/_sluice/credentials`), as real
//! RDS Proxy asks IAM. This is how tokens signed with assumed-role credentials are verified.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sigv4::Credentials;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer is a few hundred bytes; anything larger is not the endpoint we expect.
const MAX_ANSWER: usize = 64 * 1024;

/// `GET {url}?access_key_id=AKID` on a plain-HTTP loopback URL; `Ok(None)` when the key is unknown.
pub async fn fetch(url: &str, access_key_id: &str) -> Result<Option<Credentials>, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let akid: String = access_key_id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let request = format!("GET {path}?access_key_id={akid} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, async {
        let mut s = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_ANSWER as u64).read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    })
    .await
    .map_err(|_| "credentials lookup timed out".to_owned())??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    match status {
        "200" => {}
        "404" => return Ok(None),
        other => return Err(format!("credentials lookup answered HTTP {other}")),
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let secret_access_key = v["secret_access_key"].as_str().ok_or("no secret_access_key")?.to_owned();
    let session_token = v["session_token"].as_str().map(str::to_owned);
    Ok(Some(Credentials { secret_access_key, session_token }))
}
