//! Handing a set-up session to the data plane: what rustls buffered is forwarded, the TLS
//! legs are taken apart into sockets and traffic secrets, the session is recorded so a
//! restarted control can follow it, and its end is audited when the data plane reports it.

use std::os::fd::OwnedFd;

use serde_json::json;
use thiserror::Error;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{ClientStream, ProxyContext, Ready};
use crate::audit::{SessionFields, SESSION_END};
use crate::dataplane::{leg_crypto, DataplaneClient, DataplaneError, Events, UnsupportedCipher};
use crate::leg::Leg;
use crate::metrics::{counters_json, METRICS};
use crate::state::StateError;
use crate::upstream::{self, UpstreamStream};
use sluice_handoff::handoff::LegCrypto;

pub(super) enum Outcome {
    /// The dataplane owns the session now.
    Done,
    /// The TLS state was already taken apart; the session is lost (its sockets close).
    Failed(HandoffError, u32),
}

/// Why a session could not be handed to the data plane.
#[derive(Debug, Error)]
pub(super) enum HandoffError {
    #[error("forwarding buffered bytes: {0}")]
    Forward(#[source] LegError),
    #[error("taking the {leg} leg apart: {source}")]
    TakeApart { leg: &'static str, source: LegError },
    #[error("recording the session: {0}")]
    Record(#[from] StateError),
    /// The link failed or the data plane refused the session.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Why a leg's buffered bytes or its TLS state could not be taken.
#[derive(Debug, Error)]
pub(super) enum LegError {
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The traffic secrets have no form the data plane takes.
    #[error(transparent)]
    Secrets(#[from] UnsupportedCipher),
}

/// Takes the plaintext a TLS connection received but nobody read yet (a client that pipelined
/// its first query behind its StartupMessage; an upstream that sent a notice after
/// ReadyForQuery): such bytes live only in rustls' buffers and would be lost by a handoff.
fn take_buffered_plaintext<D: rustls::SideData>(conn: &mut rustls::ConnectionCommon<D>) -> Result<Vec<u8>, LegError> {
    use std::io::Read;
    let pending = conn.process_new_packets()?.plaintext_bytes_to_read();
    let mut out = vec![0u8; pending];
    conn.reader().read_exact(&mut out)?;
    Ok(out)
}

/// Moves what rustls buffered on one leg to the other leg, so both legs can be handed over with
/// nothing left behind; returns how many bytes moved.
async fn forward_buffered(ready: &mut Ready) -> Result<(usize, usize), LegError> {
    let from_client = match &mut ready.client {
        Leg::Tls(t) => take_buffered_plaintext(t.get_mut().1)?,
        Leg::Plain(_) => Vec::new(),
    };
    let from_upstream = match &mut ready.upstream {
        Leg::Tls(t) => take_buffered_plaintext(t.get_mut().1)?,
        Leg::Plain(_) => Vec::new(),
    };
    if !from_client.is_empty() {
        upstream::write_all_flush(&mut ready.upstream, &from_client).await?;
    }
    if !from_upstream.is_empty() {
        upstream::write_all_flush(&mut ready.client, &from_upstream).await?;
    }
    Ok((from_client.len(), from_upstream.len()))
}

/// How a leg is described in audit events: `tls` (the data plane runs the record layer, in the
/// kernel with kTLS or in userspace) or `plain` (spliced as is).
pub(super) fn leg_kind(tls: bool) -> &'static str {
    if tls {
        "tls"
    } else {
        "plain"
    }
}

fn describe_tls(v: Option<rustls::ProtocolVersion>, s: Option<rustls::SupportedCipherSuite>) -> (u16, u16) {
    (v.map(u16::from).unwrap_or(0), s.map(|s| u16::from(s.suite())).unwrap_or(0))
}

/// A TLS leg taken apart for the data plane: its socket and the traffic secrets.
fn tls_handoff_leg(tcp: TcpStream, conn: rustls::Connection) -> Result<(OwnedFd, LegCrypto), LegError> {
    let (v, s) = describe_tls(conn.protocol_version(), conn.negotiated_cipher_suite());
    let crypto = leg_crypto(v, s, conn.dangerous_extract_secrets()?)?;
    Ok((OwnedFd::from(tcp.into_std()?), crypto))
}

fn client_handoff_leg(leg: ClientStream) -> Result<(OwnedFd, LegCrypto), LegError> {
    match leg {
        Leg::Tls(t) => {
            let (tcp, conn) = t.into_inner();
            tls_handoff_leg(tcp, conn.into())
        }
        Leg::Plain(u) => Ok((OwnedFd::from(u.into_std()?), LegCrypto::Plain)),
    }
}

fn upstream_handoff_leg(leg: UpstreamStream) -> Result<(OwnedFd, LegCrypto), LegError> {
    match leg {
        Leg::Tls(t) => {
            let (tcp, conn) = t.into_inner();
            tls_handoff_leg(tcp, conn.into())
        }
        Leg::Plain(t) => Ok((OwnedFd::from(t.into_std()?), LegCrypto::Plain)),
    }
}

pub(super) async fn hand_off(
    ctx: &ProxyContext,
    dp: &DataplaneClient,
    mut ready: Ready,
    fields: &SessionFields,
) -> Outcome {
    // Nothing is read from the sockets here, so one pass empties rustls' buffers.
    match forward_buffered(&mut ready).await {
        Ok((0, 0)) => {}
        Ok((to_upstream, to_client)) => {
            info!(to_upstream, to_client, "forwarded bytes buffered during the startup before the handoff")
        }
        Err(e) => return Outcome::Failed(HandoffError::Forward(e), ready.our_pid),
    }
    let Ready { client, upstream, our_pid, not_after } = ready;
    let legs = Legs { client: leg_kind(client.is_tls()).to_owned(), upstream: leg_kind(upstream.is_tls()).to_owned() };
    let (client_fd, client_leg) = match client_handoff_leg(client) {
        Ok(x) => x,
        Err(source) => return Outcome::Failed(HandoffError::TakeApart { leg: "client", source }, our_pid),
    };
    let (upstream_fd, upstream_leg) = match upstream_handoff_leg(upstream) {
        Ok(x) => x,
        Err(source) => return Outcome::Failed(HandoffError::TakeApart { leg: "upstream", source }, our_pid),
    };
    // What a restarted control needs to route this session's cancel requests.
    let cancel = ctx.cancels().get(&our_pid).map(|(ours, t)| CancelRecord {
        our_secret: hex::encode(ours),
        upstream_pid: t.pid,
        upstream_secret: hex::encode(&t.secret),
    });
    let started_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let mysql_kill = ctx.mysql_kill_record(our_pid);
    let record = LiveRecord { fields: fields.clone(), our_pid, cancel, legs, started_at, mysql_kill };
    // Written by the audit thread while the data plane takes the session (one ordered queue, so
    // before the end's delete); waited for before the handoff counts as done.
    let recorded = match serde_json::to_value(&record) {
        Ok(json) => ctx.audit.record_live_session(&fields.session_id, json),
        Err(e) => return Outcome::Failed(StateError::from(e).into(), our_pid),
    };
    ctx.handed().insert(fields.session_id.clone(), record);
    ctx.sessions_changed();
    let idle = ctx.cfg.idle_timeout();
    let h = sluice_handoff::handoff::Handoff {
        session_id: fields.session_id.clone(),
        user: fields.user.clone(),
        db_service: fields.db_service.clone(),
        db_user: fields.db_user.clone(),
        db_name: fields.db_name.clone(),
        not_after,
        idle_timeout_ms: idle.as_millis() as u64,
        client: client_leg,
        upstream: upstream_leg,
    };
    match dp.handoff(h, client_fd, upstream_fd).await {
        Ok(()) => {
            let _ = recorded.await;
            info!("session handed to the dataplane");
            Outcome::Done
        }
        Err(e) => {
            ctx.handed().remove(&fields.session_id);
            ctx.sessions_changed();
            ctx.audit.forget_live_session(&fields.session_id);
            Outcome::Failed(e.into(), our_pid)
        }
    }
}

/// The legs as the dataplane ran them: a TLS leg whose records the kernel protected is `ktls`;
/// one the userspace record path handled stays `tls`.
fn with_ktls(legs: &Legs, ktls: Option<(bool, bool)>) -> serde_json::Value {
    let (client, upstream) = ktls.unwrap_or_default();
    let refine = |leg: &str, on: bool| if on && leg == "tls" { "ktls".to_owned() } else { leg.to_owned() };
    json!({ "client": refine(&legs.client, client), "upstream": refine(&legs.upstream, upstream) })
}

impl ProxyContext {
    /// Audits the end of a session the dataplane held.
    fn finish_handed_off(&self, id: &str, ended: Option<&sluice_handoff::handoff::SessionEnded>) {
        let Some(record) = self.handed().remove(id) else {
            warn!(session_id = %id, "end report for a session control does not know");
            return;
        };
        self.sessions_changed();
        self.audit.forget_live_session(id);
        let fields = record.fields;
        self.forget_key(record.our_pid);
        let extra = match ended {
            Some(e) => json!({
                "duration_ms": e.duration_ms,
                "bytes_from_client": e.bytes_client_to_upstream,
                "bytes_to_client": e.bytes_upstream_to_client,
                "reason": format!("{:?}", e.reason),
                "data_plane": true,
                "legs": with_ktls(&record.legs, e.ktls),
                "counters": e.counters.as_ref().map(counters_json),
            }),
            None => {
                json!({ "error": "the dataplane no longer holds the session", "data_plane": true, "legs": with_ktls(&record.legs, None) })
            }
        };
        let success = ended.is_some_and(|e| e.reason != sluice_handoff::handoff::EndReason::Error);
        if let Some(c) = ended.and_then(|e| e.counters.as_ref()) {
            METRICS.session_ended(c);
        }
        info!(session_id = %id, user = %fields.user, db = %fields.db_service, "session ended in the dataplane");
        self.audit.emit(SESSION_END, &fields, success, extra);
    }
}

impl Events for ProxyContext {
    fn ended(&self, e: sluice_handoff::handoff::SessionEnded) {
        self.finish_handed_off(&e.session_id.clone(), Some(&e));
    }

    fn sync(&self, live: Vec<String>) {
        // The records this process queued must be in the state before it is read.
        self.audit.flush();
        let known = match self.state.live_sessions() {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "listing live sessions");
                return;
            }
        };
        if !known.is_empty() {
            self.sessions_changed();
        }
        for (id, started_at, json) in known {
            let mut record: LiveRecord = match serde_json::from_value(json) {
                Ok(r) => r,
                Err(e) => {
                    warn!(session_id = %id, error = %e, "unreadable live-session record; forgetting it");
                    self.audit.forget_live_session(&id);
                    continue;
                }
            };
            if record.started_at == 0 {
                record.started_at = started_at;
            }
            self.handed().entry(id.clone()).or_insert_with(|| record.clone());
            if !live.contains(&id) {
                self.finish_handed_off(&id, None);
            } else if let Err(e) = self.restore_cancel(&record).and_then(|()| self.restore_mysql_kill(&record)) {
                warn!(session_id = %id, error = %e, "cannot route cancel requests for a session from before the restart");
            }
        }
    }
}

/// What control keeps about a session the data plane holds (`live_sessions` in the state), so
/// a restarted control can audit its end, route its cancels and enforce policy on it.
/// Its JSON is read back by the next control version: fields are only ever added.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct LiveRecord {
    pub(super) fields: SessionFields,
    pub(super) our_pid: u32,
    /// How to cancel the upstream query (absent when the upstream sent no key).
    pub(super) cancel: Option<CancelRecord>,
    /// How each leg was carried when handed off: `tls` or `plain`.
    pub(super) legs: Legs,
    /// When it started (unix seconds); 0 in records of earlier versions, which the
    /// `live_sessions` row's own time stands in for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) started_at: i64,
    /// Where a MySQL session's `KILL` goes (MySQL sessions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) mysql_kill: Option<super::mysql::KillRecord>,
}

fn is_zero(t: &i64) -> bool {
    *t == 0
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct CancelRecord {
    /// Hex: the key our client holds.
    pub(super) our_secret: String,
    pub(super) upstream_pid: u32,
    /// Hex: the upstream's key.
    pub(super) upstream_secret: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Legs {
    pub(super) client: String,
    pub(super) upstream: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktls_flags_refine_tls_legs_only() {
        let legs = Legs { client: "tls".into(), upstream: "plain".into() };
        let json = json!({ "client": "tls", "upstream": "plain" });
        assert_eq!(with_ktls(&legs, None), json);
        assert_eq!(with_ktls(&legs, Some((false, false))), json);
        assert_eq!(with_ktls(&legs, Some((true, true))), json!({ "client": "ktls", "upstream": "plain" }));
        let both = Legs { client: "tls".into(), upstream: "tls".into() };
        assert_eq!(with_ktls(&both, Some((false, true))), json!({ "client": "tls", "upstream": "ktls" }));
    }

    /// A record written by the previous control version (untyped JSON) reads back as a
    /// [`LiveRecord`], so sessions survive a control upgrade.
    #[test]
    fn live_records_of_the_previous_version_read_back() {
        let old = json!({
            "fields": { "session_id": "s1", "user": "alice", "db_service": "orders", "db_user": "alice",
                        "db_name": "app", "client_addr": "127.0.0.1:5" },
            "our_pid": 42,
            "cancel": { "our_secret": "00ff", "upstream_pid": 7, "upstream_secret": "0a0b" },
            "legs": { "client": "tls", "upstream": "plain" },
        });
        let r: LiveRecord = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((r.fields.user.as_str(), r.our_pid, r.legs.upstream.as_str()), ("alice", 42, "plain"));
        assert_eq!(serde_json::to_value(&r).unwrap(), old);
        let no_cancel = json!({ "fields": old["fields"], "our_pid": 1, "cancel": null, "legs": old["legs"] });
        assert!(serde_json::from_value::<LiveRecord>(no_cancel).unwrap().cancel.is_none());
    }
}
