//! Cancel requests: clients hold keys of ours, each mapped to the upstream session's own key
//! and where to send it; a restarted control rebuilds the map from the live-session records.

use subtle::ConstantTimeEq;
use thiserror::Error;
use tracing::{info, warn};

use super::handoff::LiveRecord;
use super::ProxyContext;
use crate::config::ConfigError;
use crate::state::StateError;
use crate::tls::TlsError;
use crate::upstream::{self, CancelTarget};
use sluice_pgwire as pg;

pub(super) async fn handle_cancel(ctx: &ProxyContext, req: pg::CancelRequest) {
    let target = {
        let cancels = ctx.cancels();
        match cancels.get(&req.pid) {
            Some((secret, target)) if bool::from(secret.as_slice().ct_eq(&req.secret)) => Some(target.clone()),
            _ => None,
        }
    };
    match target {
        Some(t) => match upstream::cancel(&t).await {
            Ok(()) => info!(pid = req.pid, "cancel request forwarded upstream"),
            Err(e) => warn!(pid = req.pid, error = %e, "forwarding cancel request failed"),
        },
        // PostgreSQL ignores unknown cancel keys silently; so do we (no oracle for key guessing).
        None => info!(pid = req.pid, "cancel request with unknown key ignored"),
    }
}

/// Why the cancel route of a session from before a restart cannot be rebuilt.
#[derive(Debug, Error)]
pub(super) enum CancelRouteError {
    #[error("{field}: {source}")]
    Hex { field: &'static str, source: hex::FromHexError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("database {0:?} is no longer registered")]
    Unregistered(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad TLS server name: {0}")]
    ServerName(#[from] rustls_pki_types::InvalidDnsNameError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl ProxyContext {
    /// Rebuilds the cancel route of a session handed off by an earlier control process.
    pub(super) fn restore_cancel(&self, record: &LiveRecord) -> Result<(), CancelRouteError> {
        let Some(c) = &record.cancel else { return Ok(()) };
        if self.cancels().contains_key(&record.our_pid) {
            return Ok(());
        }
        let hex_field = |field: &'static str, text: &str| {
            hex::decode(text).map_err(|source| CancelRouteError::Hex { field, source })
        };
        let (ours, secret) =
            (hex_field("our_secret", &c.our_secret)?, hex_field("upstream_secret", &c.upstream_secret)?);
        let service = &record.fields.db_service;
        // An agent restarted without its auth server still routes the cancels of its sessions.
        let (view, _) = self.policy.current().unwrap_or_else(|_| self.policy.last());
        let db = view.databases.get(service).ok_or_else(|| CancelRouteError::Unregistered(service.clone()))?;
        let dial = db.spec.dial_target()?;
        let server_name = rustls_pki_types::ServerName::try_from(db.spec.tls_server_name()?)?;
        let tls = match db.spec.tls.mode {
            crate::config::TlsMode::VerifyFull => Some(self.upstream_tls.config(db.spec.tls.ca_cert_file.as_deref())?),
            crate::config::TlsMode::Disable => None,
        };
        let target = CancelTarget { dial, server_name, tls, pid: c.upstream_pid, secret };
        self.cancels().insert(record.our_pid, (ours, target));
        Ok(())
    }
}

impl ProxyContext {
    /// Picks a fresh key of ours for a session and, when the upstream gave a key, routes cancel
    /// requests with it to `target`.
    pub(super) fn register_cancel(&self, secret: &[u8], target: Option<CancelTarget>) -> u32 {
        let mut cancels = self.cancels();
        loop {
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !cancels.contains_key(&pid) {
                if let Some(target) = target {
                    cancels.insert(pid, (secret.to_vec(), target));
                }
                return pid;
            }
        }
    }
}
