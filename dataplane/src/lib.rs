//! Sluice's data plane. After control authenticates a session it hands both sockets, with the
//! session's metadata and TLS state, to a dataplane worker over the handoff link (the
//! `sluice-handoff` crate); the worker relays the bytes zero-copy. This crate owns the server end
//! of that link ([`server`]), the io_uring relay workers ([`relay`]), kernel TLS for the legs
//! where the kernel has it ([`ktls`]) and the userspace TLS record layer used where it does not
//! ([`tls_record`]).

pub mod counters;
pub mod ktls;
pub mod relay;
pub mod server;
pub mod tls_record;
