//! The audit log: `db.session.start` (success and failure), `db.session.end` and the cluster's
//! `cluster.join`, written to the SQLite state and appended as JSON lines to a file that log
//! shippers can tail. Every event has a random `event_id`. An agent's events also wait in its
//! [`Spool`] until the auth server has stored them; the auth server stores each `event_id` once,
//! so an upload retried after a lost answer adds nothing.
//!
//! Events, and the live-session records a restarted control reads, are written by one
//! background thread in batches (one transaction, one fsync and one file write per batch), never
//! on a connection's path: a handshake only queues them. [`AuditLog::flush`] waits for what was
//! queued (shutdown, tests).

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::state::{Bookkeeping, State, StateError};

pub const SESSION_START: &str = "db.session.start";
pub const SESSION_END: &str = "db.session.end";
pub const CLUSTER_JOIN: &str = "cluster.join";

pub struct AuditLog {
    sink: Arc<Sink>,
    /// To the writer thread; `None` only while dropping.
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where events go: the state, the JSON file and (agents, auth nodes beside PostgreSQL) the spool.
struct Sink {
    state: Arc<State>,
    file: Mutex<Option<std::fs::File>>,
    path: PathBuf,
    /// On agents: events the auth server has not stored yet.
    spool: Option<Arc<Spool>>,
}

enum Job {
    /// An event, with the session id its log lines name.
    Audit(Value, String),
    /// A live-session record, and who waits for it to be committed.
    Live(Bookkeeping, Option<tokio::sync::oneshot::Sender<()>>),
    /// Answered once everything queued before it is written.
    Flush(mpsc::SyncSender<()>),
}

/// Most entries written in one transaction.
const MAX_BATCH: usize = 512;

/// How long the writer gathers events nobody waits for before writing them. A connection costs
/// two entries (start, end); written one per batch, their transactions and fsyncs were a quarter
/// of control's CPU per connection at ~100 connections/s (bench/RESULTS.md, "control CPU per
/// connection"). Events reach the state and the JSON file at most this much later.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

impl Job {
    /// Whether somebody blocks until this job is written.
    fn waited_for(&self) -> bool {
        matches!(self, Job::Live(_, Some(_)) | Job::Flush(_))
    }
}

/// An agent's audit events not yet stored by the auth server, oldest first: kept in `agent.db`
/// (they survive a restart) and mirrored here, so that uploading them reads no SQL.
#[derive(Default)]
pub struct Spool {
    pending: Mutex<VecDeque<(i64, Value)>>,
    /// Signalled when an event is added.
    pub added: tokio::sync::Notify,
}

impl Spool {
    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<(i64, Value)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest `n` events, left in the spool.
    pub fn peek(&self, n: usize) -> Vec<(i64, Value)> {
        self.pending().iter().take(n).cloned().collect()
    }

    /// Forgets events up to row `id` (the auth server stored them).
    pub fn drop_through(&self, id: i64) {
        let mut pending = self.pending();
        while pending.front().is_some_and(|(row, _)| *row <= id) {
            pending.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.pending().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fresh event id: 16 random bytes, hex.
pub fn new_event_id() -> String {
    crate::state::random_secret(16)
}

/// Fields every session event carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionFields {
    pub session_id: String,
    pub user: String,
    pub db_service: String,
    pub db_user: String,
    pub db_name: String,
    pub client_addr: String,
    /// The wire protocol (`config::PROTOCOL_MYSQL`); empty for PostgreSQL, as in records written
    /// before MySQL was served.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub db_protocol: String,
}

impl AuditLog {
    pub fn new(state: Arc<State>, path: PathBuf) -> Self {
        Self::start(Sink { state, file: Mutex::new(None), path, spool: None })
    }

    /// An agent's log: every event is also spooled for the auth server, starting with those an
    /// earlier run left in `state` (blocking: one read).
    pub fn spooling(state: Arc<State>, path: PathBuf) -> Result<Self, StateError> {
        let spool = Spool::default();
        spool.pending().extend(state.audit_spool(usize::MAX >> 1)?);
        Ok(Self::start(Sink { state, file: Mutex::new(None), path, spool: Some(Arc::new(spool)) }))
    }

    fn start(sink: Sink) -> Self {
        let sink = Arc::new(sink);
        let (tx, rx) = mpsc::channel();
        let writer_sink = sink.clone();
        let writer = std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || writer_sink.run(rx))
            .map_err(|e| tracing::error!(error = %e, "cannot start the audit writer; writing on the caller's thread"))
            .ok();
        let queue = writer.is_some().then_some(tx);
        AuditLog { sink, queue: Mutex::new(queue), writer: Mutex::new(writer) }
    }

    /// An auth node's log beside a shared store ([`State::has_local`]): events wait in its own
    /// store and [`deliver_to_store`] moves them, in order, so an outage of the shared
    /// PostgreSQL loses none and never holds up a session.
    pub fn for_state(state: Arc<State>, path: PathBuf) -> Result<Self, StateError> {
        if state.has_local() {
            Self::spooling(state, path)
        } else {
            Ok(Self::new(state, path))
        }
    }

    pub fn spool(&self) -> Option<Arc<Spool>> {
        self.sink.spool.clone()
    }

    /// The state the events are stored in.
    pub fn state(&self) -> &Arc<State> {
        &self.sink.state
    }

    /// Stores events an agent uploaded (auth server): each new `event_id` once, in the state and
    /// the JSON file; returns (stored, already there).
    pub fn ingest(&self, records: &[Value]) -> Result<(usize, usize), StateError> {
        let stored = self.sink.state.insert_audit_batch(records)?;
        let mut lines = String::new();
        let mut new = 0;
        for (record, row) in records.iter().zip(&stored) {
            if row.is_some() {
                new += 1;
                lines.push_str(&record.to_string());
                lines.push('\n');
            }
        }
        self.sink.append_file(&lines, "");
        Ok((new, records.len() - new))
    }

    /// Records an event. Failures to write are logged, never fatal to the session: losing the
    /// audit file must not take the proxy down (the SQLite copy is tried independently).
    pub fn emit(&self, event: &str, s: &SessionFields, success: bool, extra: Value) {
        // Sessions of earlier versions' live records have no protocol: they were PostgreSQL's.
        let protocol = if s.db_protocol.is_empty() { crate::config::PROTOCOL_POSTGRES } else { s.db_protocol.as_str() };
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let mut record = json!({
            "event": event,
            "event_id": new_event_id(),
            "time": time,
            "success": success,
            "sid": s.session_id,
            "user": s.user,
            "db_service": s.db_service,
            "db_user": s.db_user,
            "db_name": s.db_name,
            "db_protocol": protocol,
            "client_addr": s.client_addr,
        });
        if let (Some(obj), Value::Object(more)) = (record.as_object_mut(), extra) {
            obj.extend(more);
        }
        self.send(Job::Audit(record, s.session_id.clone()));
    }

    /// Records an event that is about no session (a node joining the cluster): `fields` are
    /// added to the event name, time and outcome.
    pub fn emit_event(&self, event: &str, success: bool, fields: Value) {
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let mut record = json!({ "event": event, "event_id": new_event_id(), "time": time, "success": success });
        if let (Some(obj), Value::Object(more)) = (record.as_object_mut(), fields) {
            obj.extend(more);
        }
        self.send(Job::Audit(record, String::new()));
    }

    /// Records (in order with the session's events) a session the data plane now holds, for a
    /// restarted control; the answer comes once it is committed (or failed to be, logged), so
    /// that the caller can overlap the write with the handoff yet not report a session a
    /// restarted control would not know.
    pub fn record_live_session(&self, id: &str, data: Value) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Live(Bookkeeping::LiveInsert { id: id.to_owned(), data }, Some(tx)));
        rx
    }

    /// Forgets a live session's record (after its queued insert).
    pub fn forget_live_session(&self, id: &str) {
        self.send(Job::Live(Bookkeeping::LiveDelete(id.to_owned()), None));
    }

    /// Waits until everything queued so far is written.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Job::Flush(tx));
        let _ = rx.recv();
    }

    fn send(&self, job: Job) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.as_ref().map(|q| q.send(job)) {
            Some(Ok(())) => {}
            // No writer thread: write here, as one batch.
            Some(Err(mpsc::SendError(job))) => self.sink.write(vec![job]),
            None => {
                drop(queue);
                // Cannot be reached with a live queue; kept total for a failed thread start.
            }
        }
    }
}

impl Drop for AuditLog {
    /// Writes what is queued: the thread ends once its queue is closed and drained.
    fn drop(&mut self) {
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Sink {
    fn run(&self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            // Nobody waits for events: gather for a while, so that a batch (a transaction, an
            // fsync, a file write) serves several connections even at low rates. A record a
            // handoff waits for, or a flush, ends the wait at once.
            let mut deadline = (!first.waited_for()).then(|| std::time::Instant::now() + LINGER);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                let next = match deadline {
                    // Timed out, or every sender is gone (shutdown): write what there is.
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(std::time::Instant::now())).ok(),
                    None => rx.try_recv().ok(),
                };
                let Some(job) = next else { break };
                if job.waited_for() {
                    deadline = None;
                }
                batch.push(job);
            }
            self.write(batch);
        }
    }

    /// Writes a batch: one transaction in the state, one append to the file.
    fn write(&self, batch: Vec<Job>) {
        let mut entries = Vec::with_capacity(batch.len());
        let mut sessions = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        let mut live_waiters = Vec::new();
        for job in batch {
            match job {
                Job::Audit(record, sid) => {
                    entries.push(Bookkeeping::Audit(record));
                    sessions.push(sid);
                }
                Job::Live(entry, done) => {
                    live_waiters.extend(done);
                    sessions.push(match &entry {
                        Bookkeeping::LiveInsert { id, .. } | Bookkeeping::LiveDelete(id) => id.clone(),
                        Bookkeeping::Audit(_) => String::new(),
                    });
                    entries.push(entry);
                }
                Job::Flush(done) => flushes.push(done),
            }
        }
        if !entries.is_empty() {
            match self.state.write_bookkeeping(&entries, self.spool.is_some()) {
                Ok(rows) => {
                    if let Some(spool) = &self.spool {
                        let mut pending = spool.pending();
                        for (entry, row) in entries.iter().zip(rows) {
                            if let (Bookkeeping::Audit(record), Some(row)) = (entry, row) {
                                pending.push_back((row, record.clone()));
                            }
                        }
                        drop(pending);
                        spool.added.notify_one();
                    }
                }
                Err(e) => {
                    let ids: Vec<&str> = sessions.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
                    tracing::error!(session_ids = ?ids, entries = entries.len(), error = %e, "writing audit events and live-session records to state");
                }
            }
            let mut lines = String::new();
            for entry in &entries {
                if let Bookkeeping::Audit(record) = entry {
                    lines.push_str(&record.to_string());
                    lines.push('\n');
                }
            }
            let first = sessions.first().map(String::as_str).unwrap_or_default();
            self.append_file(&lines, first);
        }
        for done in live_waiters {
            let _ = done.send(());
        }
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// Appends whole lines with one write(2): an O_APPEND write never interleaves with another
    /// writer's.
    fn append_file(&self, lines: &str, session_id: &str) {
        if lines.is_empty() {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if file.is_none() {
            match crate::private_fs::open_private_append(&self.path) {
                Ok(f) => *file = Some(f),
                Err(e) => {
                    tracing::error!(session_id = %session_id, path = %self.path.display(), error = %e, "opening audit log");
                    return;
                }
            }
        }
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(lines.as_bytes()) {
                tracing::error!(session_id = %session_id, error = %e, "appending audit event");
                *file = None;
            }
        }
    }
}

/// Moves an auth node's spooled events into the shared store, in order and in batches; a batch
/// leaves the spool only once it is committed there (an `event_id` already stored is not stored
/// again, so a batch retried after a lost answer is harmless).
pub async fn deliver_to_store(audit: Arc<AuditLog>) {
    let Some(spool) = audit.spool() else { return };
    let mut retry = std::time::Duration::from_millis(200);
    let mut failing = false;
    loop {
        if spool.is_empty() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), spool.added.notified()).await;
            continue;
        }
        let batch = spool.peek(500);
        let Some(last) = batch.last().map(|(row, _)| *row) else { continue };
        let records: Vec<Value> = batch.into_iter().map(|(_, e)| e).collect();
        let state = audit.state().clone();
        let done = tokio::task::spawn_blocking(move || {
            state.insert_audit_batch(&records)?;
            state.delete_audit_through(last)
        })
        .await;
        match done {
            Ok(Ok(_)) => {
                spool.drop_through(last);
                if failing {
                    tracing::info!(left = spool.len(), "storing audit events in the shared store again");
                }
                failing = false;
                retry = std::time::Duration::from_millis(200);
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, spooled = spool.len(), "cannot store audit events in the shared store; keeping them in node.db");
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit delivery task failed");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_state(tag: &str) -> (PathBuf, Arc<State>) {
        let dir = std::env::temp_dir().join(format!("sluice-audit-{tag}-{}", crate::state::random_secret(6)));
        let state = Arc::new(State::open(&dir).unwrap());
        (dir, state)
    }

    #[test]
    fn an_event_delivered_twice_is_stored_once() {
        let (dir, state) = temp_state("ingest");
        let log = AuditLog::new(state.clone(), dir.join("audit.log"));
        let events: Vec<Value> = (0..3)
            .map(|i| json!({ "event": SESSION_START, "event_id": new_event_id(), "sid": format!("s{i}"), "success": true }))
            .collect();
        assert_eq!(log.ingest(&events).unwrap(), (3, 0));
        assert_eq!(log.ingest(&events).unwrap(), (0, 3));
        let mut more = events.clone();
        more.push(json!({ "event": SESSION_END, "event_id": new_event_id(), "success": true }));
        assert_eq!(log.ingest(&more).unwrap(), (1, 3));
        assert_eq!(state.audit_events(100).unwrap().len(), 4);
        // The JSON file holds each event once too.
        assert_eq!(std::fs::read_to_string(dir.join("audit.log")).unwrap().lines().count(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_spool_survives_a_restart_and_empties_on_delivery() {
        let (dir, state) = temp_state("spool");
        let log = AuditLog::spooling(state.clone(), dir.join("audit.log")).unwrap();
        let fields = SessionFields { session_id: "s1".into(), ..Default::default() };
        log.emit(SESSION_START, &fields, true, json!({}));
        log.emit(SESSION_END, &fields, true, json!({}));
        log.flush();
        let spool = log.spool().unwrap();
        assert_eq!(spool.len(), 2);
        let first = spool.peek(1);
        assert_eq!(first[0].1["event"], SESSION_START);
        assert!(first[0].1["event_id"].as_str().is_some_and(|id| id.len() == 32));

        // A restarted agent finds both; delivering the first leaves the second.
        drop(log);
        let again = AuditLog::spooling(state.clone(), dir.join("audit.log")).unwrap();
        let spool = again.spool().unwrap();
        assert_eq!(
            spool.peek(10).iter().map(|(_, e)| e["event"].clone()).collect::<Vec<_>>(),
            [SESSION_START, SESSION_END]
        );
        state.delete_audit_through(first[0].0).unwrap();
        spool.drop_through(first[0].0);
        assert_eq!(spool.len(), 1);
        assert_eq!(state.audit_spool(10).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
