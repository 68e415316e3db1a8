//! Which StartupMessage parameters reach the upstream: a pure policy over what the client sent.
//!
//! Parameters are settings of the upstream session, and some of them change who the session is
//! or what it may do (`options=-c role=admin`, `replication=database`), which would make the
//! route's RBAC meaningless. So only what libpq, JDBC, npgsql and other common drivers send is
//! passed on; `options` may carry only `-c name=value` settings, never `role` or
//! `session_authorization`; `replication` needs a role with `db_options.replication: true`.
//! Anything else is refused, as PgBouncer refuses unsupported startup parameters.

use sluice_pgwire::sqlstate;

/// Settings a driver may send at startup (compared case-insensitively, as PostgreSQL does).
const ALLOWED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
    "geqo",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
];

/// GUCs that `options` may not set: they change the session's identity.
const DENIED_GUCS: &[&str] = &["role", "session_authorization"];

/// Why the startup parameters were refused; `code` is the SQLSTATE for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamRefusal {
    pub code: &'static str,
    pub message: String,
}

impl ParamRefusal {
    fn new(code: &'static str, message: String) -> Self {
        ParamRefusal { code, message }
    }
}

/// How `replication` asks to run; `None` when it asks for a normal session.
fn replication_kind(value: &str) -> Result<Option<&'static str>, ParamRefusal> {
    match value.to_ascii_lowercase().as_str() {
        "false" | "off" | "no" | "0" => Ok(None),
        "true" | "on" | "yes" | "1" => Ok(Some("physical")),
        "database" => Ok(Some("logical")),
        _ => Err(ParamRefusal::new(
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid value for parameter \"replication\": {value:?}"),
        )),
    }
}

/// Splits `options` as the server does: on whitespace, with `\` escaping the next character.
fn split_options(options: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Checks `options`: every token must be a `-c name=value` (or `-cname=value`, `--name=value`)
/// setting whose name is not an identity GUC.
fn check_options(options: &str) -> Result<(), ParamRefusal> {
    let refuse = |what: String| ParamRefusal::new(sqlstate::INSUFFICIENT_PRIVILEGE, what);
    let tokens = split_options(options);
    let mut it = tokens.iter();
    while let Some(tok) = it.next() {
        let setting = if tok == "-c" {
            it.next().map(String::as_str).ok_or_else(|| refuse("options: -c without a setting".into()))?
        } else if let Some(rest) = tok.strip_prefix("-c") {
            rest
        } else if let Some(rest) = tok.strip_prefix("--") {
            rest
        } else {
            return Err(refuse(format!("options: only -c name=value settings pass through Sluice, not {tok:?}")));
        };
        let Some((name, _)) = setting.split_once('=') else {
            return Err(refuse(format!("options: {setting:?} is not name=value")));
        };
        // The server folds case and takes `-` for `_` in option names.
        // Whitespace around the name is trimmed too, to refuse what a server might still read.
        let name = name.trim().to_ascii_lowercase().replace('-', "_");
        if DENIED_GUCS.contains(&name.as_str()) {
            return Err(refuse(format!("options: setting {name:?} is not allowed through Sluice")));
        }
    }
    Ok(())
}

/// The parameters to send upstream (without `user`, `database` and `_pq_.` protocol options,
/// which control sets or answers itself), or why the session is refused. `allow_replication` is
/// whether the user's roles allow replication connections.
pub fn upstream_params(
    params: &[(String, String)],
    allow_replication: bool,
) -> Result<Vec<(String, String)>, ParamRefusal> {
    let mut out = Vec::new();
    for (name, value) in params {
        let lower = name.to_ascii_lowercase();
        if lower == "user" || lower == "database" || name.starts_with("_pq_.") {
            continue;
        }
        if lower == "replication" {
            if let Some(kind) = replication_kind(value)? {
                if !allow_replication {
                    return Err(ParamRefusal::new(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!(
                            "{kind} replication connections are not allowed by your roles (db_options.replication)"
                        ),
                    ));
                }
            }
        } else if lower == "options" {
            check_options(value)?;
        } else if !ALLOWED.contains(&lower.as_str()) {
            return Err(ParamRefusal::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("unsupported startup parameter: {name:?}"),
            ));
        }
        out.push((name.clone(), value.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn what_drivers_send_passes() {
        // libpq/psql, JDBC and npgsql startup packets.
        let libpq = p(&[
            ("user", "alice"),
            ("database", "dev"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("options", "-c statement_timeout=5s --search-path=app"),
            ("_pq_.foo", "x"),
        ]);
        let got = upstream_params(&libpq, false).unwrap();
        assert_eq!(
            got,
            p(&[
                ("application_name", "psql"),
                ("client_encoding", "UTF8"),
                ("options", "-c statement_timeout=5s --search-path=app"),
            ])
        );
        let jdbc = p(&[
            ("user", "a"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("extra_float_digits", "2"),
            ("search_path", "x"),
        ]);
        assert_eq!(upstream_params(&jdbc, false).unwrap().len(), 4);
        assert!(upstream_params(&p(&[("replication", "false")]), false).is_ok());
    }

    #[test]
    fn identity_changes_are_refused() {
        for opts in [
            "-c role=admin",
            "-crole=admin",
            "--role=admin",
            "-c statement_timeout=1 -c SESSION_AUTHORIZATION=postgres",
            "--session-authorization=postgres",
            "-c\\ role=x",
        ] {
            let e = upstream_params(&p(&[("options", opts)]), true).unwrap_err();
            assert_eq!(e.code, sqlstate::INSUFFICIENT_PRIVILEGE, "{opts}");
        }
        for opts in ["-D /tmp", "-c", "-c noequals", "-p 1"] {
            assert!(upstream_params(&p(&[("options", opts)]), true).is_err(), "{opts}");
        }
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let e = upstream_params(&p(&[("session_authorization", "postgres")]), true).unwrap_err();
        assert_eq!(e.code, sqlstate::PROTOCOL_VIOLATION);
        assert!(upstream_params(&p(&[("role", "admin")]), true).is_err());
    }

    #[test]
    fn replication_needs_a_role_that_allows_it() {
        for v in ["database", "true", "on", "1", "YES"] {
            let params = p(&[("replication", v)]);
            let e = upstream_params(&params, false).unwrap_err();
            assert_eq!(e.code, sqlstate::INSUFFICIENT_PRIVILEGE, "{v}");
            assert_eq!(upstream_params(&params, true).unwrap(), params);
        }
        assert_eq!(
            upstream_params(&p(&[("replication", "maybe")]), true).unwrap_err().code,
            sqlstate::PROTOCOL_VIOLATION
        );
    }

    proptest! {
        /// An identity GUC is refused however it is spelled, cased or placed among other settings.
        #[test]
        fn identity_gucs_are_refused_in_any_spelling(
            prefix in prop::sample::select(vec!["-c ", "-c", "--"]),
            name in prop::sample::select(vec!["role", "session_authorization", "session-authorization"]),
            upper in proptest::collection::vec(any::<bool>(), 24),
            before in "(-c [a-z_]{1,8}=[a-z0-9]{0,4} ){0,3}",
            after in "( --[a-z_]{1,8}=[a-z0-9]{0,4}){0,3}",
        ) {
            let name: String = name.chars().zip(upper).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c }).collect();
            let opts = format!("{before}{prefix}{name}=x{after}");
            let e = upstream_params(&p(&[("options", &opts)]), true).unwrap_err();
            prop_assert_eq!(e.code, sqlstate::INSUFFICIENT_PRIVILEGE, "{}", opts);
        }

        #[test]
        fn never_panics(name in ".{0,12}", value in ".{0,40}") {
            let _ = upstream_params(&p(&[(&name, &value)]), false);
        }
    }
}
