/* The map key and value of Sluice's per-socket counters, shared by sluice.bpf.c and mirrored by
 * the Rust crate sluice-ebpf-common (ebpf/common/src/lib.rs). The loader's tests compare the
 * Rust layout with these definitions through the object's BTF, so the two cannot drift. */
#ifndef SLUICE_H
#define SLUICE_H

#define SLUICE_SOCK_COUNTERS_MAP sluice_sock_counters
/* Sessions are bounded by the data plane; the map only ever holds registered sockets (2 per
 * session), so this is the number of concurrent sessions times two. */
#define SLUICE_MAX_SOCKETS 262144

struct sock_key {
	__u64 cookie;
};

struct sock_counters {
	/* Ingress: the kernel's own tcp_sock bytes_received (in-order payload, each byte once)
	 * including the segment being received, an absolute count since the connection opened; the
	 * loader subtracts its value at registration. Egress: payload counted once per sequence
	 * number since registration. */
	__u64 rx_bytes;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 tx_packets;
	__u32 srtt_us;
	__u32 total_retrans;
	__u32 segs_in;
	__u32 segs_out;
	/* The programs' own state: the TCP sequence number just past the last payload byte sent, so
	 * a retransmitted segment is not counted twice (and a spare, zero). */
	__u32 rx_seq_next;
	__u32 tx_seq_next;
	/* SLUICE_TX_SEQ_VALID once the first payload segment was sent. */
	__u32 flags;
	__u32 _reserved;
};

#define SLUICE_TX_SEQ_VALID 2

/* The layout both sides rely on. The static asserts in sluice.bpf.c hold the structs above to
 * these numbers; the loader's layout test holds the Rust types to them. */
#define SLUICE_SOCK_KEY_SIZE 8
#define SLUICE_SOCK_COUNTERS_SIZE 64
#define SLUICE_OFF_RX_BYTES 0
#define SLUICE_OFF_TX_BYTES 8
#define SLUICE_OFF_RX_PACKETS 16
#define SLUICE_OFF_TX_PACKETS 24
#define SLUICE_OFF_SRTT_US 32
#define SLUICE_OFF_TOTAL_RETRANS 36
#define SLUICE_OFF_SEGS_IN 40
#define SLUICE_OFF_SEGS_OUT 44
#define SLUICE_OFF_RX_SEQ_NEXT 48
#define SLUICE_OFF_TX_SEQ_NEXT 52
#define SLUICE_OFF_FLAGS 56

#endif
