//! The `#[repr(C)]` types of Sluice's eBPF maps as the userspace loader in the data plane reads
//! them. The kernel-side programs are C (`ebpf/programs/sluice.bpf.c`) and declare the same
//! layouts in `ebpf/programs/sluice.h`; the size and offset tests below pin the Rust side to it.
//! `no_std`, no dependencies.
//!
//! Maps are keyed by socket cookie (`bpf_get_socket_cookie`, equal to userspace
//! `getsockopt(SO_COOKIE)`), so the data plane can look up each leg of a session it holds.

#![no_std]

/// Name of the pinned per-socket counters map (under the bpffs pin directory), so counters
/// survive a data-plane restart.
pub const SOCK_COUNTERS_MAP: &str = "sluice_sock_counters";

/// Key of the per-socket counters map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
}

/// Per-socket traffic and TCP health (see `ebpf/programs/sluice.h`): `tx_bytes` is payload sent
/// since registration, each sequence number once; `rx_bytes` is the kernel's absolute
/// `bytes_received` as last seen (the loader subtracts its value at registration); the TCP fields
/// are the kernel's own (smoothed RTT in µs, retransmits, segments).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// The programs' own state (sequence number past the last payload byte counted each way,
    /// and which of the two are set), so a retransmitted segment is not counted twice.
    pub rx_seq_next: u32,
    pub tx_seq_next: u32,
    pub flags: u32,
    pub _reserved: u32,
}

// SAFETY: both are `#[repr(C)]`, `Copy`, made of integers only and without padding (checked by
// the layout test), so every byte pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockCounters {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    /// The kernel side reads and writes these at fixed offsets; a change here is a map-format
    /// change and must be deliberate.
    #[test]
    fn layout_is_stable() {
        assert_eq!((size_of::<SockKey>(), align_of::<SockKey>()), (8, 8));
        assert_eq!((size_of::<SockCounters>(), align_of::<SockCounters>()), (64, 8));
        assert_eq!(offset_of!(SockCounters, tx_bytes), 8);
        assert_eq!(offset_of!(SockCounters, srtt_us), 32);
        assert_eq!(offset_of!(SockCounters, segs_out), 44);
        assert_eq!(offset_of!(SockCounters, flags), 56);
    }
}
