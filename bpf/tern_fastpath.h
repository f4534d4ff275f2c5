// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * What Tern's two kernel fast path programs share (RFC 8656 §12 channel bindings, IPv4/UDP):
 * the maps and their layouts, the match of a datagram against them, the byte budgets, the
 * counters and the rewritten headers. `tern_fastpath.bpf.c` (TC) and
 * `tern_fastpath_xdp.bpf.c` (XDP) include it and differ only in how they get at the packet,
 * change its length and send it.
 *
 * Owns: the exact-match rules (what is offloaded and what goes up to user space), one for
 * both programs. Must not: decide anything Tern's workers decide (which bindings exist).
 */
#ifndef TERN_FASTPATH_H
#define TERN_FASTPATH_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

/* Self-contained instead of libbpf's headers: the rebuild needs clang and the kernel UAPI
 * headers only. */
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static __attribute__((always_inline)) inline
#define bswap16(x) __builtin_bswap16(x)

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;

/* Keys and values: byte-for-byte the `#[repr(C)]` structs in src/fastpath/maps.rs.
 * Addresses and ports in network byte order, as on the wire. */
struct c2p_key {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel; /* host byte order */
	__u16 pad;
};

struct c2p_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 ifindex; /* where the peer is routed (Tern asks the kernel when it adds this) */
	__u32 capped;  /* 1: the relay has a byte budget in tern_budget (see spend()) */
	__u32 pad;
	__u64 packets;
	__u64 bytes; /* application data: the ChannelData payload */
};

struct p2c_key {
	__u32 peer_ip;
	__u32 relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

struct p2c_val {
	__u32 server_ip;
	__u32 client_ip;
	__u32 ifindex; /* where the client is routed */
	__u16 server_port;
	__u16 client_port;
	__u16 channel; /* host byte order */
	__u16 pad;
	__u32 capped; /* as in c2p_val */
	__u64 packets;
	__u64 bytes; /* application data: the peer's UDP payload */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct c2p_key);
	__type(value, struct c2p_val);
} tern_c2p SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct p2c_key);
	__type(value, struct p2c_val);
} tern_p2c SEC(".maps");

/* `turn.max_bytes_per_sec` budgets of a capped relayed address, in payload bytes per
 * direction. Tern grants what its token buckets hold twice a second and takes back what is
 * left; a datagram over the budget goes up to user space, whose bucket then drops it. Only
 * bindings whose value says `capped` look here: an uncapped one (the common case) costs no
 * lookup per packet. */
struct budget_key {
	__u32 relay_ip;
	__u16 relay_port;
	__u16 pad;
};

struct budget {
	__s64 to_peer;
	__s64 to_client;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct budget_key);
	__type(value, struct budget);
} tern_budget SEC(".maps");

/* Takes `len` bytes from the budget of capped relay `ip`:`port` (`to_peer` or the other
 * direction); 0 when it cannot, or when the budget entry is missing (Tern puts it in before
 * a capped binding and takes it out after: a gap sends the datagram up, where the token
 * bucket decides). Racing CPUs may overdraw by a datagram each: Tern takes that off the
 * next grant. Called last before the rewrite, so a datagram that goes up spent nothing. */
INLINE int spend(__u32 ip, __u16 port, __u16 len, int to_peer)
{
	struct budget_key k = {.relay_ip = ip, .relay_port = port};
	struct budget *b = bpf_map_lookup_elem(&tern_budget, &k);
	if (!b)
		return 0;
	__s64 *left = to_peer ? &b->to_peer : &b->to_client;
	if (*left < (__s64)len)
		return 0;
	__sync_fetch_and_add(left, -(__s64)len);
	return 1;
}

/* What a binding forwarded (the map values' counters, read by Tern at housekeeping). */
/* Whether binding `v` may forward `len` bytes now: always when uncapped (no map lookup). */
#define WITHIN_CAP(v, ip, port, len, to_peer) (!(v)->capped || spend(ip, port, len, to_peer))

#define COUNT(v, len)                                                                          \
	do {                                                                                   \
		__sync_fetch_and_add(&(v)->packets, 1);                                        \
		__sync_fetch_and_add(&(v)->bytes, (len));                                      \
	} while (0)

#define ETH_LEN 14
#define IP_LEN 20
#define UDP_LEN 8
#define CD_LEN 4
#define L4_OFF (ETH_LEN + IP_LEN)

struct hdrs {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	__u8 *payload;
};

/* The headers at `data`..`end`: Ethernet, IPv4 without options, unfragmented, UDP whose
 * length is the IP payload's, with `need` payload bytes readable. */
INLINE int parse_at(void *data, void *end, struct hdrs *h, __u32 need)
{
	if (data + L4_OFF + UDP_LEN + need > end)
		return 0;
	h->eth = data;
	h->ip = data + ETH_LEN;
	h->udp = data + L4_OFF;
	h->payload = data + L4_OFF + UDP_LEN;
	if (h->eth->h_proto != bswap16(ETH_P_IP) || h->ip->version != 4 || h->ip->ihl != 5 ||
	    h->ip->protocol != IPPROTO_UDP || (h->ip->frag_off & bswap16(0x3fff)) != 0)
		return 0;
	__u16 udp_len = bswap16(h->udp->len);
	return udp_len >= UDP_LEN && bswap16(h->ip->tot_len) == IP_LEN + udp_len;
}

/* ChannelData from a bound client (RFC 8656 §12.5), parsed with CD_LEN payload bytes: its
 * binding and its data length, or NULL. A ChannelData's first two bits are 01
 * (0x4000-0x7FFF: RFC 8656 §12 numbers, and the RFC 5766 range Tern still accepts); padded
 * ChannelData goes up. */
INLINE struct c2p_val *c2p_match(struct hdrs *h, __u16 *data_len)
{
	__u16 channel = bswap16(*(__u16 *)h->payload);
	__u16 len = bswap16(*(__u16 *)(h->payload + 2));
	if ((channel & 0xC000) != 0x4000 || bswap16(h->udp->len) != UDP_LEN + CD_LEN + len)
		return 0;
	struct c2p_key k = {
		.client_ip = h->ip->saddr,
		.server_ip = h->ip->daddr,
		.client_port = h->udp->source,
		.server_port = h->udp->dest,
		.channel = channel,
	};
	*data_len = len;
	return bpf_map_lookup_elem(&tern_c2p, &k);
}

/* A datagram from a peer to a relay address with a channel bound to it (RFC 8656 §11.6,
 * §12.5): its binding and its data length, or NULL (also when the 4-byte header would not
 * fit an IP datagram). */
INLINE struct p2c_val *p2c_match(struct hdrs *h, __u16 *data_len)
{
	__u16 len = bswap16(h->udp->len) - UDP_LEN;
	if (len > 0xffff - IP_LEN - UDP_LEN - CD_LEN)
		return 0;
	struct p2c_key k = {
		.peer_ip = h->ip->saddr,
		.relay_ip = h->ip->daddr,
		.peer_port = h->udp->source,
		.relay_port = h->udp->dest,
	};
	*data_len = len;
	return bpf_map_lookup_elem(&tern_p2c, &k);
}

/* The UDP header of client data leaving for the peer. The UDP checksum is 0 (none, allowed
 * over IPv4: RFC 768) in both programs: an incremental update goes wrong when the checksum
 * is partial (a sender on the same host, e.g. behind a veth, leaves only the pseudo-header
 * sum in the field), and a full one would read the whole payload. */
INLINE struct udphdr c2p_udp(struct c2p_val *v, __u16 data_len)
{
	struct udphdr u = {
		.source = v->relay_port,
		.dest = v->peer_port,
		.len = bswap16(UDP_LEN + data_len),
	};
	return u;
}

/* The UDP and ChannelData headers of peer data leaving for the client (checksum 0 as
 * above). */
struct cd_hdrs {
	struct udphdr udp;
	__u16 channel;
	__u16 len;
};

INLINE struct cd_hdrs p2c_hdrs(struct p2c_val *v, __u16 data_len)
{
	struct cd_hdrs n = {
		.udp = {
			.source = v->server_port,
			.dest = v->client_port,
			.len = bswap16(UDP_LEN + CD_LEN + data_len),
		},
		.channel = bswap16(v->channel),
		.len = bswap16(data_len),
	};
	return n;
}

/* New addresses and total length (network order) in an IPv4 header without options, and
 * its checksum recomputed over its 20 bytes. */
INLINE void ip_rewrite(struct iphdr *ip, __u32 saddr, __u32 daddr, __u16 tot_len)
{
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->tot_len = tot_len;
	ip->check = 0;
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < IP_LEN / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = (__u16)~sum;
}

#endif
