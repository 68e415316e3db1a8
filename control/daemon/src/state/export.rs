//! `control storage export` / `import`: the whole state as NDJSON, the same from either backend,
//! so a cluster can start on embedded SQLite and move to a shared PostgreSQL (or back).
//!
//! A header line (`{"kind":"sluice-export","version":1,…}`), then one line per row
//! (`{"t":"users","row":[…]}`, values as JSON: null, integers, strings, `{"b64":…}` for bytes),
//! then a trailer with the row counts and the SHA-256 of every line before it, so a truncated
//! or edited file is refused. Node rows keep their host ids and indexes (host certificates and
//! cancel keys stay valid) and password hashes are portable PHC strings. The CA row moves as it
//! is stored: sealed under a KEK, or plaintext if the source had none (the file is 0600 then,
//! like the database it came from); a target with a KEK seals a plaintext key when it first
//! loads it. `pg_dump` or `.dump` would need external tools, be backend-specific and unversioned.

use std::io::{BufRead, Write};

use base64::Engine;
use sha2::{Digest, Sha256};

use super::sql::Val;
use super::{State, StateError};

/// What moves, table by table, with the columns both backends have. Live sessions (each
/// node's own), kill requests (transient) and the audit log (unless asked for) stay behind.
const TABLES: &[(&str, &[&str])] = &[
    ("cert_authorities", &["name", "cert_pem", "key_pem", "key_envelope", "key_wraps"]),
    ("users", &["name", "password_hash", "roles", "created_at"]),
    ("roles", &["name", "spec"]),
    ("databases", &["name", "spec"]),
    ("locks", &["id", "\"user\"", "db", "message", "expires_at", "created_at"]),
    ("tokens", &["hash", "kind", "expires_at", "created_at"]),
    ("web_sessions", &["hash", "\"user\"", "expires_at"]),
    (
        "nodes",
        &[
            "host_id",
            "node_index",
            "name",
            "role",
            "labels",
            "joined_at",
            "cert_not_after",
            "last_seen",
            "hb_postgres_addr",
            "hb_databases",
            "hb_sessions",
            "hb_version",
            "hb_interval_ms",
            "hb_at_ms",
            "hb_mysql_addr",
        ],
    ),
    ("node_sessions", &["host_id", "session_id", "started_at", "data"]),
    ("discovered", &["source", "uid", "name", "spec", "aws_resource_id", "stale", "updated_at"]),
];

const AUDIT: (&str, &[&str]) =
    ("audit", &["time", "event", "session_id", "\"user\"", "db", "success", "data", "event_id"]);

const FORMAT_VERSION: u64 = 1;

/// Nullable columns added at the end of a table's list after [`FORMAT_VERSION`] 1 was first
/// written: a row from an older export may lack them (they are left null), so its files still
/// import.
fn added_later(table: &str) -> usize {
    match table {
        "nodes" => 1, // hb_mysql_addr
        _ => 0,
    }
}

/// Rows per table, as written or read.
pub type Counts = std::collections::BTreeMap<String, u64>;

fn val_json(v: &Val) -> serde_json::Value {
    match v {
        Val::Null => serde_json::Value::Null,
        Val::Int(i) => (*i).into(),
        Val::Text(s) => s.clone().into(),
        Val::Blob(b) => serde_json::json!({ "b64": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

fn json_val(v: &serde_json::Value) -> Result<Val, StateError> {
    Ok(match v {
        serde_json::Value::Null => Val::Null,
        serde_json::Value::Number(n) => {
            Val::Int(n.as_i64().ok_or_else(|| StateError::Invalid(format!("export: {n} is not an integer")))?)
        }
        serde_json::Value::String(s) => Val::Text(s.clone()),
        serde_json::Value::Object(o) => match o.get("b64").and_then(|b| b.as_str()) {
            Some(b) => Val::Blob(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| StateError::Invalid(format!("export: bad base64: {e}")))?,
            ),
            None => return Err(StateError::Invalid("export: an object value that is not {\"b64\":…}".into())),
        },
        other => return Err(StateError::Invalid(format!("export: unexpected value {other}"))),
    })
}

/// Writes lines while hashing them.
struct Hashed<'a> {
    out: &'a mut dyn Write,
    hash: Sha256,
}

impl Hashed<'_> {
    fn line(&mut self, v: &serde_json::Value) -> Result<(), StateError> {
        let mut text = serde_json::to_string(v)?;
        text.push('\n');
        self.hash.update(text.as_bytes());
        self.out.write_all(text.as_bytes())?;
        Ok(())
    }
}

impl State {
    /// Writes the whole state (and the audit log if `audit`) to `out`.
    pub fn export(&self, out: &mut dyn Write, audit: bool) -> Result<Counts, StateError> {
        let mut w = Hashed { out, hash: Sha256::new() };
        w.line(&serde_json::json!({
            "kind": "sluice-export",
            "version": FORMAT_VERSION,
            "source": self.backend(),
            "exported_at": time::OffsetDateTime::now_utc().unix_timestamp(),
        }))?;
        let mut counts = Counts::new();
        let tables = TABLES.iter().copied().chain(audit.then_some(AUDIT));
        // One transaction: the export is one consistent moment of the state.
        let rows = self.tx(|c| {
            tables
                .map(|(table, cols)| {
                    let order = if table == "audit" { " ORDER BY id" } else { "" };
                    let rows = c.query(&format!("SELECT {} FROM {table}{order}", cols.join(", ")), &[])?;
                    Ok((table, rows))
                })
                .collect::<Result<Vec<_>, StateError>>()
        })?;
        for (table, rows) in rows {
            for row in &rows {
                w.line(&serde_json::json!({ "t": table, "row": row.0.iter().map(val_json).collect::<Vec<_>>() }))?;
            }
            counts.insert(table.to_owned(), rows.len() as u64);
        }
        let sha = hex::encode(w.hash.clone().finalize());
        w.line(&serde_json::json!({ "kind": "end", "rows": counts, "sha256": sha }))?;
        w.out.flush()?;
        Ok(counts)
    }

    /// Reads an export into this (empty) state in one transaction: all of it or nothing.
    pub fn import(&self, input: &mut dyn BufRead) -> Result<Counts, StateError> {
        let bad = |why: &str| StateError::Invalid(format!("not a usable export: {why}"));
        let mut hash = Sha256::new();
        let mut lines = Vec::new();
        let mut trailer = None;
        for line in input.lines() {
            let line = line?;
            if trailer.is_some() {
                return Err(bad("lines after the end marker"));
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| bad(&format!("a line is not JSON: {e}")))?;
            if v.get("kind").and_then(|k| k.as_str()) == Some("end") {
                trailer = Some(v);
                continue;
            }
            hash.update(line.as_bytes());
            hash.update(b"\n");
            lines.push(v);
        }
        let trailer = trailer.ok_or_else(|| bad("no end marker (the file is truncated)"))?;
        if trailer.get("sha256").and_then(|s| s.as_str()) != Some(hex::encode(hash.finalize()).as_str()) {
            return Err(bad("its checksum does not match (the file was changed or cut)"));
        }
        let mut lines = lines.into_iter();
        let header = lines.next().ok_or_else(|| bad("empty"))?;
        if header.get("kind").and_then(|k| k.as_str()) != Some("sluice-export") {
            return Err(bad("no sluice-export header"));
        }
        if header.get("version").and_then(|v| v.as_u64()) != Some(FORMAT_VERSION) {
            return Err(bad(&format!("format version {} (this control reads {FORMAT_VERSION})", header["version"])));
        }
        let mut counts = Counts::new();
        self.tx(|c| {
            let (users, cas, nodes): (i64, i64, i64) = {
                let r = c.query_one(
                    "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM cert_authorities), (SELECT count(*) FROM nodes)",
                    &[],
                )?;
                (r.get(0)?, r.get(1)?, r.get(2)?)
            };
            if users + cas + nodes > 0 {
                return Err(StateError::Invalid(format!(
                    "the target state is not empty ({users} users, {cas} CAs, {nodes} nodes): import only into a new store"
                )));
            }
            for line in lines {
                let table = line.get("t").and_then(|t| t.as_str()).ok_or_else(|| bad("a row without a table"))?;
                let (table, cols) = TABLES
                    .iter()
                    .copied()
                    .chain(std::iter::once(AUDIT))
                    .find(|(t, _)| *t == table)
                    .ok_or_else(|| bad(&format!("unknown table {table:?}")))?;
                let row = line.get("row").and_then(|r| r.as_array()).ok_or_else(|| bad("a row that is not a list"))?;
                if row.len() > cols.len() || row.len() < cols.len() - added_later(table) {
                    return Err(bad(&format!("a {table} row has {} values, not {}", row.len(), cols.len())));
                }
                let cols = &cols[..row.len()];
                let vals = row.iter().map(json_val).collect::<Result<Vec<_>, _>>()?;
                let params = (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
                c.exec(&format!("INSERT INTO {table} ({}) VALUES ({params})", cols.join(", ")), &vals)?;
                *counts.entry(table.to_owned()).or_default() += 1;
            }
            Ok(())
        })?;
        let expected: Counts = serde_json::from_value(trailer["rows"].clone()).map_err(|_| bad("bad row counts"))?;
        let expected: Counts = expected.into_iter().filter(|(_, n)| *n > 0).collect();
        if expected != counts {
            return Err(bad("row counts differ from the end marker"));
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_state() -> (State, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sluice-export-{}", super::super::random_secret(6)));
        (State::open(&dir).unwrap(), dir)
    }

    #[test]
    fn an_export_imports_into_an_empty_state_and_only_whole() {
        let (a, dir_a) = temp_state();
        a.ensure_ca("sluice").unwrap();
        a.add_user("alice", "pw", &["dev".into()]).unwrap();
        a.add_lock(Some("bob"), None, "x", None).unwrap();
        let node = a.add_node("agent", "db", &Default::default(), time::OffsetDateTime::now_utc()).unwrap();
        let hb = super::super::NodeHeartbeat {
            postgres_addr: "10.0.0.1:5433".into(),
            mysql_addr: Some("10.0.0.1:3306".into()),
            databases: vec!["orders".into()],
            sessions: 0,
            version: "0.1.0".into(),
            interval_ms: 1000,
            at_ms: 1_700_000_000_000,
        };
        assert!(a.record_heartbeat(&node.host_id, &hb).unwrap());
        a.insert_audit(&serde_json::json!({"event": "e", "event_id": "1"})).unwrap();
        let mut file = Vec::new();
        let counts = a.export(&mut file, true).unwrap();
        assert_eq!(counts["users"], 1);
        assert_eq!(counts["audit"], 1);

        let (b, dir_b) = temp_state();
        // Truncated, edited, or into a non-empty state: refused, nothing written.
        let cut = &file[..file.len() - 10];
        assert!(b.import(&mut &cut[..]).is_err());
        let edited = String::from_utf8(file.clone()).unwrap().replace("alice", "mallory");
        let e = b.import(&mut edited.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        assert!(b.users().unwrap().is_empty());
        b.import(&mut &file[..]).unwrap();
        assert!(b.verify_password("alice", "pw").unwrap());
        assert_eq!(b.node(&node.host_id).unwrap().map(|n| n.node_index), Some(node.node_index));
        assert_eq!(b.node(&node.host_id).unwrap().and_then(|n| n.heartbeat), Some(hb.clone()));
        assert_eq!(b.ensure_ca("sluice").unwrap().cert_pem, a.ensure_ca("sluice").unwrap().cert_pem);
        assert_eq!(b.active_locks().unwrap(), a.active_locks().unwrap());
        let e = b.import(&mut &file[..]).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        // And back: the same rows (apart from the header's time).
        let mut again = Vec::new();
        b.export(&mut again, true).unwrap();
        let body =
            |f: &[u8]| String::from_utf8(f.to_vec()).unwrap().lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(body(&again)[..body(&again).len() - 1], body(&file)[..body(&file).len() - 1]);
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }

    /// An export written before node rows carried a MySQL address (one value fewer) still
    /// imports, with none; a row missing more than that is refused.
    #[test]
    fn an_export_from_before_mysql_addresses_imports() {
        let (a, dir_a) = temp_state();
        let node = a.add_node("agent", "db", &Default::default(), time::OffsetDateTime::now_utc()).unwrap();
        let mut file = Vec::new();
        a.export(&mut file, false).unwrap();
        // Rewrite the node row as the previous build wrote it, with its checksum.
        let shorten = |drop: usize| {
            let text = String::from_utf8(file.clone()).unwrap();
            let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            let trailer = lines.pop().unwrap();
            let mut hash = Sha256::new();
            let mut out = String::new();
            for mut line in lines {
                if line["t"] == "nodes" {
                    let row = line["row"].as_array_mut().unwrap();
                    row.truncate(row.len() - drop);
                }
                let text = serde_json::to_string(&line).unwrap() + "\n";
                hash.update(text.as_bytes());
                out.push_str(&text);
            }
            let end =
                serde_json::json!({"kind": "end", "rows": trailer["rows"], "sha256": hex::encode(hash.finalize())});
            out + &serde_json::to_string(&end).unwrap() + "\n"
        };
        let (b, dir_b) = temp_state();
        let e = b.import(&mut shorten(2).as_bytes()).unwrap_err().to_string();
        assert!(e.contains("nodes row has 13 values, not 15"), "{e}");
        b.import(&mut shorten(1).as_bytes()).unwrap();
        let imported = b.node(&node.host_id).unwrap().unwrap();
        assert_eq!((imported.node_index, imported.heartbeat), (node.node_index, None));
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }
}
