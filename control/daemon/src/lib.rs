//! Sluice control: the daemon that terminates client TLS, speaks the PostgreSQL startup protocol,
//! applies RBAC, mints RDS IAM auth tokens and opens the upstream session; plus its state, CA,
//! audit log, client API and the demo orchestration. The `control` binary is a thin CLI over this.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod bootstrap;
pub mod ca;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod discovery;
pub mod https;
pub mod install;
pub mod leg;
pub mod limits;
pub mod metrics;
pub mod pgconn;
pub mod policy;
pub mod proxy;
pub mod rbac;
pub mod startup_params;
pub mod state;
pub mod tls;
pub mod troubleshoot;
pub mod upstream;
pub mod web;

// Shared with the `sluice` CLI; re-exported so control reads them where it always did.
pub use sluice_api::{iam, private_fs};

/// Sets up `tracing` for a binary: human-readable to stderr, `RUST_LOG` to filter. Control
/// characters in every field and message are escaped (`\n` and friends), so a user name or
/// database name sent by a client cannot forge or split log lines; JSON output escapes them
/// by its nature.
pub fn init_logging(json: bool) {
    init_logging_at(json, "info")
}

/// As [`init_logging`], with `default` as the filter when `RUST_LOG` is unset (admin verbs log
/// only warnings, such as state files found readable by others).
pub fn init_logging_at(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.fmt_fields(escaping_fields()).init();
    }
}

/// The text formatter's field writer: `name=value` pairs (the message bare), with control
/// characters escaped.
pub fn escaping_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape_controls(&text);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// `s` with every control character written as an escape (`\n`, `\r`, `\t`, `\u{1b}`).
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_newline_in_a_field_cannot_forge_a_log_line() {
        let buf = Buf::default();
        let writer = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(escaping_fields())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let user = "mallory\n2026-01-01T00:00:00Z  INFO forged: user logged in user=admin";
            let span = tracing::info_span!("api", client = %"1.2.3.4\r\x1b[2J");
            let _g = span.enter();
            tracing::warn!(user = %user, db = ?"a\nb", "login failed\nreally");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("user=mallory\\n2026"), "{out}");
        assert!(out.contains("client=1.2.3.4\\r\\u{1b}[2J"), "{out}");
        assert!(out.contains("login failed\\nreally"), "{out}");
    }

    #[test]
    fn plain_text_is_left_alone() {
        assert!(matches!(escape_controls("alice"), std::borrow::Cow::Borrowed("alice")));
        assert_eq!(escape_controls("a\u{7f}b\u{85}"), "a\\u{7f}b\\u{85}");
    }
}
