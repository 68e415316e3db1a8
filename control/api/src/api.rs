//! The client API's messages, as `sluice` and control exchange them (one JSON request line and one
//! JSON response line per TLS connection), and the client that sends one. Control's server side
//! (`sluice_control::api`) answers them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long the server gives one connection; the client waits three times that for its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Login { user: String, password: String },
    Logout { session: String },
    DbList { session: String },
    DbLogin { session: String, db: String, db_user: String, db_name: String, public_key_pem: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    pub session: String,
    pub user: String,
    pub roles: Vec<String>,
    pub expires: String,
    pub cluster: String,
    pub postgres_public_addr: String,
    /// Where MySQL and MariaDB clients connect (`proxy_service.mysql_public_addr`, else the
    /// MySQL listen address); absent when control has no MySQL listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_public_addr: Option<String>,
    pub ca_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbInfo {
    pub name: String,
    pub description: String,
    /// `postgres` or `mysql`: which listener (and which client) the endpoints are for.
    pub protocol: String,
    pub uri: String,
    pub labels: BTreeMap<String, String>,
    /// How many healthy agents serve it.
    #[serde(default)]
    pub agents: u32,
    /// Where clients connect to it (HOST:PORT, any one will do): the healthy agents serving it
    /// and the auth server's own proxy if it serves it too; only the configured
    /// `proxy_service.postgres_public_addr` (a load balancer) where there is one. Empty from
    /// servers before clusters (use the login's `postgres_public_addr`). For a `mysql` database
    /// these are MySQL addresses: `proxy_service.mysql_public_addr`, else the auth server's own
    /// MySQL listener and the MySQL addresses of the healthy agents serving it (and `agents`
    /// counts only agents with one); empty when there is none.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbCertResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    pub expires: String,
    pub postgres_public_addr: String,
    /// The database's [`DbInfo::endpoints`] when the certificate was issued, for a PostgreSQL
    /// database.
    #[serde(default)]
    pub postgres_endpoints: Vec<String>,
    /// [`DbInfo::protocol`]; empty from servers before MySQL (PostgreSQL then).
    #[serde(default)]
    pub protocol: String,
    /// The database's [`DbInfo::endpoints`] when the certificate was issued, for a MySQL
    /// database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mysql_endpoints: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    Refused(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("timed out talking to {0}")]
    Timeout(String),
}

/// Client side: sends `req` to `addr` and decodes the result.
pub async fn call<T: DeserializeOwned>(
    addr: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    req: &Request,
) -> Result<T, ApiError> {
    let fut = async {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| ApiError::Connect { addr: addr.to_owned(), source })?;
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| ApiError::Tls(e.to_string()))?;
        let mut s =
            tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| ApiError::Tls(e.to_string()))?;
        let mut line = serde_json::to_string(req).map_err(|e| ApiError::BadResponse(e.to_string()))?;
        line.push('\n');
        s.write_all(line.as_bytes()).await?;
        s.flush().await?;
        let mut resp = String::new();
        BufReader::new((&mut s).take(16 * 1024 * 1024)).read_line(&mut resp).await?;
        let v: Value = serde_json::from_str(&resp).map_err(|e| ApiError::BadResponse(e.to_string()))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            serde_json::from_value(v.get("result").cloned().unwrap_or(Value::Null))
                .map_err(|e| ApiError::BadResponse(e.to_string()))
        } else {
            Err(ApiError::Refused(v.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_owned()))
        }
    };
    tokio::time::timeout(IO_TIMEOUT * 3, fut).await.map_err(|_| ApiError::Timeout(addr.to_owned()))?
}
