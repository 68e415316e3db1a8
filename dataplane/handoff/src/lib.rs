//! The boundary between control and a data plane: the sans-IO frame codec of the handoff protocol
//! ([`handoff`]) and the Unix SOCK_SEQPACKET link that carries its frames and the sessions'
//! sockets ([`link`]). Both sides, and the admin commands, depend on this crate alone, so none of
//! them pulls in the other's runtime. [`cgroup`] is where both keep the sockets of sessions, so
//! that the data plane's counters see them.

pub mod cgroup;
pub mod handoff;
pub mod link;
