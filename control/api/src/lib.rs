//! What the `sluice` CLI and control share, and nothing of control's server side: the client API's
//! request and response types and the client that sends them ([`api`]), RDS IAM token minting
//! ([`iam`]), the client's TLS configuration ([`tls`]), files only this user may read
//! ([`private_fs`]) and `host:port` parsing ([`addr`]). The CLI depends on this crate, not on
//! control, so it builds without SQLite, the RDS and IAM SDKs or the data plane.

#![forbid(unsafe_code)]

pub mod addr;
pub mod api;
pub mod iam;
pub mod private_fs;
pub mod tls;
