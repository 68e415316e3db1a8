//! Sluice's data plane. After control authenticates a session it hands both sockets, with the
//! session's metadata and TLS state, to a dataplane worker over a Unix socket; the worker relays
//! the bytes zero-copy. This crate owns that handoff protocol ([`handoff`]), the io_uring relay
//! workers ([`relay`]), kernel TLS for the legs where the kernel has it ([`ktls`]) and the
//! userspace TLS record layer used where it does not ([`tls_record`]).

pub mod counters;
pub mod handoff;
pub mod ktls;
pub mod link;
pub mod relay;
pub mod server;
pub mod tls_record;
