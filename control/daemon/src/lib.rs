//! Sluice control: the daemon that terminates client TLS, speaks the PostgreSQL startup protocol,
//! applies RBAC, mints RDS IAM auth tokens and opens the upstream session; plus its state, CA,
//! audit log, client API and the demo orchestration. The `control` binary is a thin CLI over this.

pub mod api;
pub mod audit;
pub mod bootstrap;
pub mod ca;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod discovery;
pub mod iam;
pub mod leg;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod state;
pub mod tls;
pub mod troubleshoot;
pub mod upstream;

/// Sets up `tracing` for a binary: human-readable to stderr, `RUST_LOG` to filter.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
