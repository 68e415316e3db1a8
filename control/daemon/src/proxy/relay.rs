//! Sessions control keeps: its own relay (when no data plane is connected), with byte counts
//! and the idle clock, and the policy loop that ends live sessions a lock, a removal, a role
//! change, an expired certificate or the idle timeout no longer allows.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use super::handoff::{hand_off, leg_kind, Outcome};
use super::{HandshakeFailure, ProxyContext, Ready};
use crate::audit::{SessionFields, SESSION_END};
use crate::metrics::{counters_json, METRICS};
use crate::policy::{self, Denial};
use sluice_handoff::handoff::{CounterSource, EndReason, LegCounters, SessionCounters};

/// Relays (or hands off) a session once its setup finished, and audits its end.
pub(super) async fn run_session(
    ctx: Arc<ProxyContext>,
    setup: Result<Result<Option<Ready>, HandshakeFailure>, tokio::time::error::Elapsed>,
    fields: SessionFields,
    started: Instant,
) {
    let deadline = ctx.cfg.proxy_service.handshake_timeout;
    let ready = match setup {
        Err(_) => {
            info!(timeout_s = deadline.as_secs(), "handshake deadline passed; dropping client");
            METRICS.handshake_failed(HandshakeFailure::Timeout.label());
            return;
        }
        Ok(Ok(Some(ready))) => ready,
        Ok(Ok(None)) => return,
        Ok(Err(reason)) => {
            METRICS.handshake_failed(reason.label());
            return;
        }
    };
    METRICS.session_started(started.elapsed());
    info!(user = %fields.user, db = %fields.db_service, db_user = %fields.db_user, db_name = %fields.db_name, "session started");
    let ready = match ctx.dataplane.get().filter(|d| d.connected()) {
        // With a data plane there, control relays nothing itself.
        Some(dp) => match hand_off(&ctx, dp, ready, &fields).await {
            Outcome::Done => return,
            Outcome::Failed(why, our_pid) => {
                warn!(reason = %why, "handoff to the dataplane failed; session closed");
                METRICS.handshake_failed(HandshakeFailure::Handoff.label());
                ctx.forget_key(our_pid);
                ctx.audit.emit(SESSION_END, &fields, false, json!({ "error": format!("handoff failed: {why}") }));
                return;
            }
        },
        None => ready,
    };
    let Ready { client, upstream, our_pid, not_after } = ready;
    let legs = json!({ "client": leg_kind(client.is_tls()), "upstream": leg_kind(upstream.is_tls()) });
    // Count what each side delivered as it is read, so the totals survive a relay that ends in
    // an error (a client killed mid-transfer still gets an accurate audit record).
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(ctx.epoch.elapsed().as_millis() as u64));
    let mut client = CountingReader::new(client, ctx.epoch, activity.clone());
    let mut upstream = CountingReader::new(upstream, ctx.epoch, activity.clone());
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let started_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let relayed = Relayed { fields: fields.clone(), end: end_tx, not_after, activity, started_at };
    ctx.relayed().insert(fields.session_id.clone(), relayed);
    ctx.sessions_changed();
    METRICS.local_session(true);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 * 1024, 64 * 1024) => r.map(|_| None),
        Ok(reason) = end_rx => Ok(Some(reason)),
    };
    ctx.relayed().remove(&fields.session_id);
    ctx.sessions_changed();
    METRICS.local_session(false);
    ctx.forget_key(our_pid);
    let (to_upstream, to_client) = (client.read, upstream.read);
    let (error, reason) = match result {
        Ok(reason) => (None, reason),
        // A peer that closes TCP without TLS close_notify (a killed psql, many drivers) has ended
        // its session, not failed it.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => (None, None),
        Err(e) => (Some(e.to_string()), None),
    };
    if let Some(reason) = reason {
        // No ErrorResponse: the relay may be in the middle of a message, and a frame spliced into
        // it would corrupt the stream. Both legs close, as the data plane does.
        let _ = client.inner.shutdown().await;
        info!(reason = ?reason, "session ended by control");
    }
    let duration = started.elapsed();
    info!(bytes_from_client = to_upstream, bytes_to_client = to_client, duration_ms = duration.as_millis() as u64, error = ?error, "session ended");
    // Control's own relay counts plaintext it read; packets and TCP health are not visible here.
    let counters = SessionCounters {
        source: CounterSource::Userspace,
        client: LegCounters { rx_bytes: to_upstream, tx_bytes: to_client, ..Default::default() },
        upstream: LegCounters { rx_bytes: to_client, tx_bytes: to_upstream, ..Default::default() },
    };
    METRICS.session_ended(&counters);
    ctx.audit.emit(
        SESSION_END,
        &fields,
        error.is_none(),
        json!({
            "duration_ms": duration.as_millis() as u64,
            "bytes_from_client": to_upstream,
            "bytes_to_client": to_client,
            "counters": counters_json(&counters),
            "error": error,
            "reason": reason.map(|r| format!("{r:?}")),
            "data_plane": false,
            "legs": legs,
        }),
    );
}

/// Ends every live session that could not start now, within the poll interval: a lock covers
/// it, its user was removed, its roles no longer allow the route, or its database is gone;
/// and, for sessions control relays itself, its certificate expired or it sat idle past the
/// idle timeout (the data plane enforces those two for the sessions it holds). The data plane's
/// sessions end through EndSession, control's own by stopping their relay. New sessions meet
/// the same decision at setup.
pub async fn enforce_policy(ctx: Arc<ProxyContext>) {
    let mut asked: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(POLICY_POLL).await;
        let dp = ctx.dataplane.get().filter(|d| d.connected()).cloned();
        if dp.is_none() && ctx.relayed().is_empty() {
            asked.clear();
            continue;
        }
        let live: Vec<(String, SessionFields)> = if dp.is_some() {
            ctx.handed().iter().map(|(id, r)| (id.clone(), r.fields.clone())).collect()
        } else {
            Vec::new()
        };
        if live.is_empty() && ctx.relayed().is_empty() {
            asked.clear();
            continue;
        }
        let view = match ctx.policy.for_live_sessions().await {
            Ok((view, _)) => view,
            Err(e) => {
                warn!(error = %e, "reading the state to enforce policy on live sessions");
                continue;
            }
        };
        let verdict = |f: &SessionFields| {
            let route =
                policy::Route { user: &f.user, db_service: &f.db_service, db_user: &f.db_user, db_name: &f.db_name };
            view.decide(route).err().map(|d| {
                let reason =
                    if matches!(d, Denial::Locked { .. }) { EndReason::Locked } else { EndReason::AccessRevoked };
                (reason, d.to_string())
            })
        };

        let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
        let idle_limit = ctx.cfg.idle_timeout();
        let ending: Vec<(String, EndReason, String)> = ctx
            .relayed()
            .iter()
            .filter_map(|(id, r)| {
                let why = if r.not_after != 0 && now_unix > r.not_after {
                    Some((EndReason::CertExpired, "the client certificate expired".to_owned()))
                } else if !idle_limit.is_zero() && ctx.since_activity(&r.activity) >= idle_limit {
                    Some((EndReason::IdleTimeout, format!("idle for {} s", idle_limit.as_secs())))
                } else {
                    verdict(&r.fields)
                };
                why.map(|(reason, text)| (id.clone(), reason, text))
            })
            .collect();
        for (id, reason, why) in ending {
            if let Some(r) = ctx.relayed().remove(&id) {
                info!(session_id = %id, reason = ?reason, why = %why, "ending a session control relays");
                let _ = r.end.send(reason);
            }
        }

        let Some(dp) = dp else { continue };
        asked.retain(|id| live.iter().any(|(l, _)| l == id));
        for (id, fields) in live {
            let Some((reason, why)) = verdict(&fields) else { continue };
            if asked.insert(id.clone()) {
                info!(session_id = %id, reason = ?reason, why = %why, "ending a session in the dataplane");
                if let Err(e) = dp.end_session(&id, reason) {
                    warn!(session_id = %id, error = %e, "asking the dataplane to end a session");
                    asked.remove(&id);
                }
            }
        }
    }
}

/// How often live sessions are checked against the policy; sessions must end within a second
/// of a lock, a user's removal or a role change.
const POLICY_POLL: Duration = Duration::from_millis(250);

/// A session control relays itself.
pub(super) struct Relayed {
    pub(super) fields: SessionFields,
    /// Stops the relay.
    end: tokio::sync::oneshot::Sender<EndReason>,
    /// The client certificate's expiry (unix seconds; 0 for local clients, who have none).
    not_after: i64,
    /// Milliseconds after `ProxyContext::epoch` of the last byte relayed either way.
    activity: Arc<std::sync::atomic::AtomicU64>,
    /// Unix seconds.
    pub(super) started_at: i64,
}

impl ProxyContext {
    /// Ends a live session on an administrator's request (`control sessions kill` on the auth
    /// server, sent to every agent): the data plane's through EndSession, a relayed one by
    /// stopping its relay. Its end is audited as any other, with the reason `AdminKill`.
    /// Whether this process held it.
    pub fn kill_session(&self, id: &str) -> bool {
        if let Some(r) = self.relayed().remove(id) {
            info!(session_id = %id, "ending a session control relays, as an administrator asked");
            let _ = r.end.send(EndReason::AdminKill);
            return true;
        }
        if !self.handed().contains_key(id) {
            return false;
        }
        match self.dataplane.get().filter(|d| d.connected()) {
            Some(dp) => {
                info!(session_id = %id, "ending a session in the dataplane, as an administrator asked");
                if let Err(e) = dp.end_session(id, EndReason::AdminKill) {
                    warn!(session_id = %id, error = %e, "asking the dataplane to end a session");
                }
            }
            None => warn!(session_id = %id, "cannot end a session: the dataplane is not connected"),
        }
        true
    }
}

/// Passes I/O through, counts the bytes read from the inner stream and stamps when the last
/// ones came (the idle timeout of sessions control relays).
struct CountingReader<S> {
    inner: S,
    read: u64,
    epoch: Instant,
    activity: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> CountingReader<S> {
    fn new(inner: S, epoch: Instant, activity: Arc<std::sync::atomic::AtomicU64>) -> Self {
        CountingReader { inner, read: 0, epoch, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingReader<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.store(self.epoch.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingReader<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
