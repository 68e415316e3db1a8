//! Cancel requests: clients hold keys of ours, each mapped to the upstream session's own key
//! and where to send it; a restarted control rebuilds the map from the live-session records.
//! In a cluster a key names the process that gave it out (its node index in the top bits of the
//! pid), so a request that reaches another agent (libpq sends it to whichever host it connected
//! to first, which may not be the one of the session) is passed on to the owner as is.

use std::time::Duration;

use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::handoff::LiveRecord;
use super::ProxyContext;
use crate::config::ConfigError;
use crate::state::StateError;
use crate::tls::TlsError;
use crate::upstream::{self, CancelTarget};
use sluice_pgwire as pg;

/// Bits of a cancel key's pid under the node index: 2M keys per process.
const NODE_SHIFT: u32 = 21;
const NODE_MASK: u32 = 0x3ff;
/// How long passing a cancel request on to its owner may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A pid for the keys of node `node_index` (0: a process with the auth service): the index in
/// bits 21-30, `random` below, bit 31 clear (libpq takes the pid as a signed int).
fn key_pid(node_index: u16, random: u32) -> u32 {
    ((u32::from(node_index) & NODE_MASK) << NODE_SHIFT) | (random & ((1 << NODE_SHIFT) - 1))
}

/// The node that gave out a key.
fn key_node(pid: u32) -> u16 {
    u16::try_from((pid >> NODE_SHIFT) & NODE_MASK).unwrap_or_default()
}

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
        None if key_node(req.pid) != ctx.node_index => forward_cancel(ctx, req).await,
        // PostgreSQL ignores unknown cancel keys silently; so do we (no oracle for key guessing).
        None => info!(pid = req.pid, "cancel request with unknown key ignored"),
    }
}

/// Passes a cancel request for another node's key on to that node, as the client sent it
/// (plaintext, as libpq sends it); the owner checks the secret. A node it does not know of is
/// treated as an unknown key. The owner's index is its own, so it never passes it on again.
async fn forward_cancel(ctx: &ProxyContext, req: pg::CancelRequest) {
    let node = key_node(req.pid);
    // The auth server's snapshot may be due for a re-read; an agent cut off from it still
    // knows where its peers were.
    let view = match ctx.policy.current_async().await {
        Ok((view, _)) => view,
        Err(_) => ctx.policy.last().0,
    };
    let Some(addr) = view.nodes.get(&node).cloned() else {
        info!(pid = req.pid, node_index = node, "cancel request with unknown key ignored");
        return;
    };
    if addr == ctx.cfg.proxy_service.public_addr() {
        info!(pid = req.pid, node_index = node, "cancel request names this process under another index; ignored");
        return;
    }
    let send = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(&pg::encode::cancel_request(req.pid, &req.secret)).await?;
        s.flush().await?;
        // The owner closes after reading it; wait for that so it is read before we close.
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink).await;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, send).await {
        Ok(Ok(())) => info!(pid = req.pid, node_index = node, to = %addr, "cancel request passed on to its agent"),
        Ok(Err(e)) => {
            warn!(pid = req.pid, node_index = node, to = %addr, error = %e, "passing a cancel request on failed")
        }
        Err(_) => warn!(pid = req.pid, node_index = node, to = %addr, "passing a cancel request on timed out"),
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
            crate::config::TlsMode::VerifyFull => Some(self.upstream_tls.server_config(&db.spec)?),
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
            let pid = key_pid(self.node_index, rand::random::<u32>());
            if pid != 0 && !cancels.contains_key(&pid) {
                if let Some(target) = target {
                    cancels.insert(pid, (secret.to_vec(), target));
                }
                return pid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_keys_name_their_node() {
        for (node, random) in [(0u16, u32::MAX), (1, 0x1234_5678), (1023, u32::MAX), (517, 0)] {
            let pid = key_pid(node, random);
            assert_eq!(key_node(pid), node, "{pid:#x}");
            assert_eq!(pid & 0x8000_0000, 0, "bit 31 set in {pid:#x}");
            assert_eq!(pid & 0x1f_ffff, random & 0x1f_ffff);
        }
        // The auth server's keys (index 0) keep 21 random bits; the test of a bogus key
        // (0x12345678) names node 145.
        assert!(key_pid(0, u32::MAX) < 1 << 21);
        assert_eq!(key_node(0x1234_5678), 145);
    }
}
