//! The SQL seam between [`super::State`] and its two backends: statements are written once, in
//! the dialect SQLite and PostgreSQL share (`ON CONFLICT`, `RETURNING`, `IS DISTINCT FROM`),
//! with numbered parameters (`?1`; the PostgreSQL backend rewrites them to `$1`), over a small
//! value type both drivers convert. Everything the two disagree on (DDL, migrations, change
//! detection) stays inside each backend.

use super::StateError;

/// A parameter or column value. Integers are 64-bit on both backends (PostgreSQL columns are
/// `BIGINT`) and booleans are stored as 0/1, so rows export identically from either.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<u16> for Val {
    fn from(v: u16) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_owned())
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&[u8]> for Val {
    fn from(v: &[u8]) -> Self {
        Val::Blob(v.to_vec())
    }
}
impl From<Vec<u8>> for Val {
    fn from(v: Vec<u8>) -> Self {
        Val::Blob(v)
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}
impl From<&Option<String>> for Val {
    fn from(v: &Option<String>) -> Self {
        v.as_deref().map_or(Val::Null, Into::into)
    }
}
impl From<&Option<i64>> for Val {
    fn from(v: &Option<i64>) -> Self {
        v.map_or(Val::Null, Val::Int)
    }
}

/// `vals![a, b]`: a parameter list.
macro_rules! vals {
    () => { &[] as &[$crate::state::sql::Val] };
    ($($v:expr),+ $(,)?) => { &[$($crate::state::sql::Val::from($v)),+] };
}
pub(crate) use vals;

/// One result row.
#[derive(Debug, Clone, Default)]
pub struct Row(pub Vec<Val>);

impl Row {
    pub fn get<T: FromVal>(&self, i: usize) -> Result<T, StateError> {
        let v = self.0.get(i).ok_or_else(|| StateError::Corrupt(format!("row has no column {i}")))?;
        T::from_val(v).ok_or_else(|| StateError::Corrupt(format!("column {i} holds {v:?}")))
    }
}

/// Conversion from a column value; `None` when the value has another type.
pub trait FromVal: Sized {
    fn from_val(v: &Val) -> Option<Self>;
}

impl FromVal for i64 {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromVal for bool {
    fn from_val(v: &Val) -> Option<Self> {
        i64::from_val(v).map(|i| i != 0)
    }
}
impl FromVal for String {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl FromVal for Vec<u8> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}
impl<T: FromVal> FromVal for Option<T> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Null => Some(None),
            v => T::from_val(v).map(Some),
        }
    }
}

/// A connection (or an open transaction on one) of either backend.
pub trait Conn {
    /// Runs several statements without parameters (a migration).
    fn batch(&mut self, sql: &str) -> Result<(), StateError>;
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, StateError>;
    /// Runs a query; every row.
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StateError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>, StateError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Exactly one row (an aggregate, say).
    fn query_one(&mut self, sql: &str, params: &[Val]) -> Result<Row, StateError> {
        self.query_opt(sql, params)?.ok_or_else(|| StateError::Corrupt(format!("no row from {sql}")))
    }
}

impl rusqlite::types::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(i) => ValueRef::Integer(*i),
            Val::Text(s) => ValueRef::Text(s.as_bytes()),
            Val::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_val(v: rusqlite::types::ValueRef<'_>) -> Result<Val, StateError> {
    use rusqlite::types::ValueRef;
    Ok(match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        // No column is REAL; an aggregate that yields one is a query to fix, not data to round.
        ValueRef::Real(f) => return Err(StateError::Corrupt(format!("unexpected real value {f}"))),
        ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Val::Blob(b.to_vec()),
    })
}

/// Runs one SQLite statement; a uniqueness violation is [`StateError::Conflict`], as on
/// PostgreSQL, so callers can retry a race the same way on both.
pub(super) fn sqlite_exec(conn: &rusqlite::Connection, sql: &str, params: &[Val]) -> Result<usize, StateError> {
    conn.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params)).map_err(sqlite_error)
}

pub(super) fn sqlite_query(conn: &rusqlite::Connection, sql: &str, params: &[Val]) -> Result<Vec<Row>, StateError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let width = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params)).map_err(sqlite_error)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        out.push(Row((0..width).map(|i| sqlite_val(r.get_ref(i)?)).collect::<Result<_, StateError>>()?));
    }
    Ok(out)
}

fn sqlite_error(e: rusqlite::Error) -> StateError {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StateError::Conflict(msg.clone().unwrap_or_else(|| f.to_string()))
        }
        _ => StateError::Sqlite(e),
    }
}

impl Conn for rusqlite::Connection {
    fn batch(&mut self, sql: &str) -> Result<(), StateError> {
        Ok(self.execute_batch(sql)?)
    }

    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, StateError> {
        sqlite_exec(self, sql, params)
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StateError> {
        sqlite_query(self, sql, params)
    }
}

/// Rewrites `?N` parameters to PostgreSQL's `$N`. Statements hold no string literal with a `?`
/// in it (they are all in this crate), so a plain scan is exact.
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollar_parameters() {
        assert_eq!(to_postgres("SELECT a FROM t WHERE b = ?1 AND c = ?12"), "SELECT a FROM t WHERE b = $1 AND c = $12");
        assert_eq!(to_postgres("SELECT ?"), "SELECT ?");
    }

    #[test]
    fn values_round_trip_through_sqlite() {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        c.exec("CREATE TABLE t (a INTEGER, b TEXT, c BLOB, d INTEGER)", vals![]).unwrap();
        let n = c.exec("INSERT INTO t VALUES (?1, ?2, ?3, ?4)", vals![7i64, "x", vec![1u8, 2], None::<i64>]).unwrap();
        assert_eq!(n, 1);
        let r = Conn::query_one(&mut c, "SELECT a, b, c, d FROM t", vals![]).unwrap();
        assert_eq!(r.get::<i64>(0).unwrap(), 7);
        assert_eq!(r.get::<String>(1).unwrap(), "x");
        assert_eq!(r.get::<Vec<u8>>(2).unwrap(), vec![1, 2]);
        assert_eq!(r.get::<Option<i64>>(3).unwrap(), None);
        assert!(r.get::<String>(0).is_err(), "a type mismatch is an error, not a default");
        assert!(r.get::<i64>(9).is_err());
    }
}
