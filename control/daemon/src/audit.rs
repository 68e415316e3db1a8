//! The audit log: `db.session.start` (success and failure), `db.session.end` and the cluster's
//! `cluster.join`, written to the SQLite state and appended as JSON lines to a file that log
//! shippers can tail.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::state::State;

pub const SESSION_START: &str = "db.session.start";
pub const SESSION_END: &str = "db.session.end";
pub const CLUSTER_JOIN: &str = "cluster.join";

pub struct AuditLog {
    state: Arc<State>,
    file: Mutex<Option<std::fs::File>>,
    path: PathBuf,
}

/// Fields every session event carries.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionFields {
    pub session_id: String,
    pub user: String,
    pub db_service: String,
    pub db_user: String,
    pub db_name: String,
    pub client_addr: String,
}

impl AuditLog {
    pub fn new(state: Arc<State>, path: PathBuf) -> Self {
        AuditLog { state, file: Mutex::new(None), path }
    }

    /// Records an event. Failures to write are logged, never fatal to the session: losing the
    /// audit file must not take the proxy down (the SQLite copy is tried independently).
    pub fn emit(&self, event: &str, s: &SessionFields, success: bool, extra: Value) {
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let mut record = json!({
            "event": event,
            "time": time,
            "success": success,
            "sid": s.session_id,
            "user": s.user,
            "db_service": s.db_service,
            "db_user": s.db_user,
            "db_name": s.db_name,
            "db_protocol": "postgres",
            "client_addr": s.client_addr,
        });
        if let (Some(obj), Value::Object(more)) = (record.as_object_mut(), extra) {
            obj.extend(more);
        }
        self.write(&record, &s.session_id);
    }

    /// Records an event that is about no session (a node joining the cluster): `fields` are
    /// added to the event name, time and outcome.
    pub fn emit_event(&self, event: &str, success: bool, fields: Value) {
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let mut record = json!({ "event": event, "time": time, "success": success });
        if let (Some(obj), Value::Object(more)) = (record.as_object_mut(), fields) {
            obj.extend(more);
        }
        self.write(&record, "");
    }

    fn write(&self, record: &Value, session_id: &str) {
        if let Err(e) = self.state.insert_audit(record) {
            tracing::error!(session_id = %session_id, error = %e, "writing audit event to state");
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
            if let Err(e) = writeln!(f, "{record}") {
                tracing::error!(session_id = %session_id, error = %e, "appending audit event");
                *file = None;
            }
        }
    }
}
