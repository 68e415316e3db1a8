//! Sluice's data plane. After control authenticates a session it hands both sockets, with the
//! session's metadata and TLS state, to a dataplane worker over a Unix socket; the worker relays
//! the bytes zero-copy. This crate owns that handoff protocol ([`handoff`]); the io_uring splice
//! workers and the `dataplane` binary build on it.

pub mod handoff;
