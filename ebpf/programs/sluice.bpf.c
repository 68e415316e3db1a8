// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Sluice's per-socket counters: payload bytes and packets each way, and TCP health, for every
 * socket the data plane relays, keyed by socket cookie (bpf_get_socket_cookie, equal to
 * userspace getsockopt(SO_COOKIE)).
 *
 * Why these programs (facts measured on the target kernel, 6.18 with BTF, lockdown=integrity):
 * - cgroup_skb ingress/egress sees every packet of a socket in the cgroup, spliced traffic
 *   included, so payload is counted exactly; fentry/fexit/LSM are refused (EPERM), kprobes are
 *   not configured and tracepoints miss splice reads, so nothing else counts splice.
 * - The TCP health fields come from the same packets through bpf_tcp_sock() (srtt, retransmits,
 *   segments), refreshed on every packet of the socket. sock_ops could read them too, but only
 *   at the callbacks it is given, is exact only up to SYN/FIN and unacknowledged bytes, and
 *   would need callbacks enabled on every socket of the cgroup; one program type is cheaper.
 * - A socket belongs to the cgroup it was created in (accepted sockets take the listener's), and
 *   control creates both legs of a session before handing them to the data plane, so the
 *   programs are attached to the cgroup control and the data plane run in (see the loader).
 *
 * Only sockets the data plane registered are counted: userspace inserts a zeroed entry per leg at
 * handoff and deletes it at session end, and these programs only update existing entries, so the
 * map never grows with unrelated traffic of the cgroup. Programs always return 1 (allow): they
 * observe and never filter.
 *
 * What is counted. Bytes are TCP payload (the SYN and FIN carry none), each byte once:
 * - sent: skb->len minus the IP and TCP headers, only the part beyond the highest sequence number
 *   already sent, so retransmissions do not count again. A socket's output runs under its lock,
 *   so these updates never race.
 * - received: the kernel's own tcp_sock bytes_received (in-order payload, duplicates and
 *   retransmissions excluded) plus the segment at hand when it is the next in order (the program
 *   runs before TCP processes it). Ingress of one socket can run on two CPUs at once (loopback
 *   delivers on the sender's CPU), so the program only ever raises the stored value, and any
 *   later segment re-reads the kernel's count. Once the peer's FIN is processed bytes_received
 *   includes it (+1), which is taken off. The userspace loader subtracts the value at
 *   registration.
 * Packets are TCP segments of any kind (pure ACKs and retransmissions too), a GSO/GRO
 * super-packet counting as its gso_segs. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sluice.h"

#define SLUICE_AT(field, off) _Static_assert(__builtin_offsetof(struct sock_counters, field) == off, #field)
_Static_assert(sizeof(struct sock_key) == SLUICE_SOCK_KEY_SIZE, "sock_key size");
_Static_assert(sizeof(struct sock_counters) == SLUICE_SOCK_COUNTERS_SIZE, "sock_counters size");
SLUICE_AT(rx_bytes, SLUICE_OFF_RX_BYTES);
SLUICE_AT(tx_bytes, SLUICE_OFF_TX_BYTES);
SLUICE_AT(rx_packets, SLUICE_OFF_RX_PACKETS);
SLUICE_AT(tx_packets, SLUICE_OFF_TX_PACKETS);
SLUICE_AT(srtt_us, SLUICE_OFF_SRTT_US);
SLUICE_AT(total_retrans, SLUICE_OFF_TOTAL_RETRANS);
SLUICE_AT(segs_in, SLUICE_OFF_SEGS_IN);
SLUICE_AT(segs_out, SLUICE_OFF_SEGS_OUT);
SLUICE_AT(rx_seq_next, SLUICE_OFF_RX_SEQ_NEXT);
SLUICE_AT(tx_seq_next, SLUICE_OFF_TX_SEQ_NEXT);
SLUICE_AT(flags, SLUICE_OFF_FLAGS);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, struct sock_counters);
	/* Entries are allocated as sessions register, not up front: an idle data plane (or one
	 * left pinned) costs kilobytes, not max_entries' worth. The programs never insert, so no
	 * allocation happens on the packet path. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	/* Pinned under the loader's directory so counters survive a data-plane restart. */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} SLUICE_SOCK_COUNTERS_MAP SEC(".maps");

/* Length of the IP and TCP headers at the front of skb (cgroup_skb data starts at the network
 * header), or -1 when the packet is not TCP; *seq gets the segment's sequence number. */
static __always_inline int headers_len(struct __sk_buff *skb, __u32 *seq)
{
	__u8 b;
	int ip_len;

	if (bpf_skb_load_bytes(skb, 0, &b, 1))
		return -1;
	if ((b >> 4) == 4) {
		__u8 proto;
		ip_len = (b & 0x0f) * 4;
		if (bpf_skb_load_bytes(skb, 9, &proto, 1) || proto != IPPROTO_TCP)
			return -1;
	} else if ((b >> 4) == 6) {
		__u8 next;
		/* Sockets of the data plane carry no extension headers; anything else is not ours. */
		ip_len = 40;
		if (bpf_skb_load_bytes(skb, 6, &next, 1) || next != IPPROTO_TCP)
			return -1;
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, ip_len + 4, seq, 4))
		return -1;
	*seq = bpf_ntohl(*seq);
	/* The TCP data offset is the high nibble of byte 12 of the TCP header. */
	if (bpf_skb_load_bytes(skb, ip_len + 12, &b, 1))
		return -1;
	return ip_len + (b >> 4) * 4;
}

static __always_inline void count(struct __sk_buff *skb, int egress)
{
	struct sock_key key = { .cookie = bpf_get_socket_cookie(skb) };
	struct sock_counters *c;
	struct bpf_sock *sk;
	struct bpf_tcp_sock *tp;
	__u64 payload = 0, segs, received;
	__u32 seq = 0, end, next;
	int hl;

	if (!key.cookie)
		return;
	c = bpf_map_lookup_elem(&SLUICE_SOCK_COUNTERS_MAP, &key);
	if (!c)
		return;
	hl = headers_len(skb, &seq);
	if (hl < 0)
		return;
	if (skb->len > (__u32)hl)
		payload = skb->len - hl;
	segs = skb->gso_segs ? skb->gso_segs : 1;
	if (egress) {
		if (payload) {
			/* Count only the part of [seq, end) beyond what was sent (serial arithmetic). */
			end = seq + (__u32)payload;
			next = c->tx_seq_next;
			if (c->flags & SLUICE_TX_SEQ_VALID) {
				if ((__s32)(end - next) <= 0)
					payload = 0;
				else if ((__s32)(next - seq) > 0)
					payload = end - next;
			}
			if (payload) {
				c->tx_seq_next = end;
				c->flags |= SLUICE_TX_SEQ_VALID;
			}
		}
		__sync_fetch_and_add(&c->tx_bytes, payload);
		__sync_fetch_and_add(&c->tx_packets, segs);
	} else {
		__sync_fetch_and_add(&c->rx_packets, segs);
	}
	sk = skb->sk;
	if (!sk)
		return;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return;
	tp = bpf_tcp_sock(sk);
	if (!tp)
		return;
	if (!egress) {
		received = tp->bytes_received;
		if (payload && seq == tp->rcv_nxt)
			received += payload;
		/* CLOSE_WAIT, LAST_ACK, CLOSING: the peer's FIN is in bytes_received. */
		if ((sk->state == 8 || sk->state == 9 || sk->state == 11) && received)
			received -= 1;
		if (received > c->rx_bytes)
			c->rx_bytes = received;
	}
	/* The kernel keeps srtt scaled by 8. */
	c->srtt_us = tp->srtt_us >> 3;
	c->total_retrans = tp->total_retrans;
	c->segs_in = tp->segs_in;
	c->segs_out = tp->segs_out;
}

SEC("cgroup_skb/ingress")
int sluice_ingress(struct __sk_buff *skb)
{
	count(skb, 0);
	return 1;
}

SEC("cgroup_skb/egress")
int sluice_egress(struct __sk_buff *skb)
{
	count(skb, 1);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
