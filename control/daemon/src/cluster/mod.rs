//! The cluster: an auth server (the process with `auth_service` enabled) and the agents that join
//! it with a token and a CA pin. The messages of the cluster API are here and in [`view`],
//! shared by the server (on the auth server) and the agent side; both speak HTTPS with JSON
//! bodies. By role: `server` answers the API on the auth server and `hub` feeds its watch
//! streams; `agent` joins, `client` calls the API and `watch` follows the stream into the
//! agent's policy snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod agent;
pub mod audit_upload;
pub mod client;
pub mod heartbeat;
pub mod hub;
pub mod renew;
pub mod server;
pub mod view;
pub mod watch;

/// `POST /v1/join`: an agent asks for a host certificate over a key pair it generated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// What the agent joins as: `db`.
    pub kind: String,
    pub node_name: String,
    /// The agent's public key (PEM SubjectPublicKeyInfo); its private key never leaves it.
    pub public_key_pem: String,
    /// Names and IPs the agent's PostgreSQL listener is reached at (the certificate's SANs).
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub version: String,
}

/// The answer to a join: the agent's identity in the cluster and its host certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub host_id: String,
    pub node_index: u16,
    pub cluster: String,
    /// The host certificate (leaf only).
    pub cert_pem: String,
    /// The cluster CA(s): what PostgreSQL client certificates and the auth server chain to.
    pub ca_pems: Vec<String>,
    /// RFC 3339.
    pub expires: String,
    /// RFC 3339: when the agent should renew (two thirds of the lifetime).
    pub renew_after: String,
}

/// A refusal: `{"error": {"code": .., "message": ..}}`; the message is shown to the operator as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The join token kind an agent serving databases uses.
pub const DB_KIND: &str = "db";

/// Most SAN entries a join may ask for.
pub const MAX_DNS_NAMES: usize = 64;

pub use view::{ClusterView, NodeEntry, SharedDb, WatchEvent, WatchItem, WatchKind, WatchRequest};

/// `POST /v1/audit`: audit events an agent recorded, each with its `event_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditUpload {
    pub events: Vec<serde_json::Value>,
}

/// The answer to an upload: how many events were new, and how many were already stored (sent
/// before, their answer lost).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditStored {
    pub stored: usize,
    pub duplicates: usize,
}

/// Most events in one upload.
pub const MAX_AUDIT_BATCH: usize = 1000;
/// `POST /v1/renew`: an agent asks for a new host certificate over a new key pair, authenticated
/// by its current one (no token). The answer is a [`JoinResponse`] for the same host id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub public_key_pem: String,
    #[serde(default)]
    pub dns_names: Vec<String>,
}

/// `POST /v1/heartbeat`: what an agent serves, every `db_service.heartbeat_interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Where PostgreSQL clients reach this agent (`proxy_service.public_addr()`).
    pub postgres_addr: String,
    /// Where MySQL clients reach it (`proxy_service.mysql_addr()`), if it has a MySQL listener.
    /// Left out when unset: an auth server from before it refuses unknown fields (an agent with
    /// one leaves it out while such a server refuses it, see `heartbeat::run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_addr: Option<String>,
    /// The databases it serves.
    #[serde(default)]
    pub databases: Vec<String>,
    /// How many live sessions it holds (all of them, even past [`MAX_REPORTED_SESSIONS`]).
    #[serde(default)]
    pub sessions: u32,
    /// Its live sessions, at most [`MAX_REPORTED_SESSIONS`] of them: what `control sessions ls`
    /// shows and `control sessions kill` finds on the auth server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<ReportedSession>,
    #[serde(default)]
    pub version: String,
    /// How often it heartbeats: the auth server calls it offline after 1.5 times this.
    pub interval_ms: u64,
}

/// One live session of an agent, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedSession {
    #[serde(flatten)]
    pub fields: crate::audit::SessionFields,
    /// Unix seconds.
    pub started_at: i64,
}

/// Most sessions one heartbeat lists; the count in `sessions` stays exact beyond it.
pub const MAX_REPORTED_SESSIONS: usize = 10_000;

/// The answer to a heartbeat: nothing yet (`{}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {}

/// What the daemon reports in each heartbeat; the heartbeat task adds the version and interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    pub postgres_addr: String,
    pub mysql_addr: Option<String>,
    pub databases: Vec<String>,
    pub sessions: u32,
    /// At most [`MAX_REPORTED_SESSIONS`].
    pub live: Vec<ReportedSession>,
}
