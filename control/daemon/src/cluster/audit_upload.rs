//! The agent's audit delivery: events wait in the agent's [`Spool`] (in `agent.db` and in
//! memory) and are uploaded in order, in batches, to `POST /v1/audit`. A batch leaves the spool
//! only once the auth server has answered that it stored it; a batch whose answer was lost is
//! sent again, and the auth server, which keys events by `event_id`, stores nothing twice. While
//! the auth server is unreachable the spool grows and the agent says so once.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::client::AuthClient;
use super::{AuditStored, AuditUpload};
use crate::audit::AuditLog;

/// Events per upload.
const BATCH: usize = 500;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Uploads the spool until aborted.
pub async fn upload(client: AuthClient, audit: Arc<AuditLog>) {
    let Some(spool) = audit.spool() else { return };
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    loop {
        if spool.is_empty() {
            // A permit stored by an event added since the check wakes this at once.
            let _ = tokio::time::timeout(Duration::from_secs(5), spool.added.notified()).await;
            continue;
        }
        let batch = spool.peek(BATCH);
        let Some(last) = batch.last().map(|(row, _)| *row) else { continue };
        let upload = AuditUpload { events: batch.into_iter().map(|(_, e)| e).collect() };
        match client.post_json::<_, AuditStored>("/v1/audit", &upload, CALL_TIMEOUT).await {
            Ok(stored) => {
                let state = audit.state().clone();
                match tokio::task::spawn_blocking(move || state.delete_audit_through(last)).await {
                    Ok(Ok(_)) => {}
                    // Kept in agent.db, the events are sent again after a restart: stored once all the same.
                    Ok(Err(e)) => warn!(error = %e, "dropping delivered audit events from agent.db"),
                    Err(e) => warn!(error = %e, "dropping delivered audit events from agent.db"),
                }
                spool.drop_through(last);
                if failing {
                    info!(auth_server = %client.addr(), left = spool.len(), "delivering audit events to the auth server again");
                }
                debug!(stored = stored.stored, duplicates = stored.duplicates, "audit events delivered");
                failing = false;
                retry = FIRST_RETRY;
            }
            Err(e) => {
                if !failing {
                    warn!(
                        auth_server = %client.addr(),
                        error = %e,
                        spooled = spool.len(),
                        "cannot deliver audit events; keeping them in agent.db until the auth server answers"
                    );
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}
