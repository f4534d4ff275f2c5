// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tern's kernel fast path for established TURN channel bindings (RFC 8656 §12), IPv4/UDP,
 * as an XDP program: `turn.kernel_fast_path = "xdp"`. Same maps, match, budgets, counters
 * and new headers as the TC program (tern_fastpath.h); what differs is the way out:
 *
 * - the next hop and both MAC addresses come from the kernel's FIB (`bpf_fib_lookup`, which
 *   also checks the egress MTU, and needs `net.ipv4.conf.<ingress>.forwarding = 1`: Tern
 *   checks that before attaching). XDP has no bpf_redirect_neigh (the TC program's way),
 *   so it looks up per packet and ignores the bindings' `ifindex`;
 * - the datagram leaves by XDP_TX when the egress is the interface it came in on, else by
 *   `bpf_redirect_map` into `tern_egress`, which holds the interfaces Tern attached to (an
 *   egress outside it, a missing neighbour entry, a route elsewhere: up to user space,
 *   untouched, which sends it and so resolves the neighbour for the next one).
 *
 * Must not: decide anything (as the TC program). The IP header checksum is recomputed; the
 * UDP checksum is 0, as in the TC program (tern_fastpath.h says why).
 */
#include "tern_fastpath.h"

static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen,
                              __u32 flags) = (void *)BPF_FUNC_fib_lookup;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)BPF_FUNC_xdp_adjust_head;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)BPF_FUNC_redirect_map;

/* The interfaces XDP frames may be redirected to: key and value the ifindex. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct bpf_devmap_val);
} tern_egress SEC(".maps");

/* The way out for a datagram from `src` to `dst` of IP length `tot_len` (host order): 0
 * when there is none the program may take (no route, no neighbour entry yet, past the MTU,
 * local, or an egress Tern did not attach to). */
INLINE int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 src, __u32 dst,
                 __u16 sport, __u16 dport, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = 2; /* AF_INET */
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = tot_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	__u32 oif = fib->ifindex;
	return oif == ctx->ingress_ifindex || bpf_map_lookup_elem(&tern_egress, &oif) != 0;
}

/* Writes the Ethernet and IP headers for `fib` at the (moved) start of the frame, with
 * `l4` (the new UDP header, and for a client the ChannelData header) after them; then out. */
#define EMIT(ctx, fib, ip, l4)                                                                 \
	do {                                                                                   \
		void *data = (void *)(long)(ctx)->data;                                        \
		void *end = (void *)(long)(ctx)->data_end;                                     \
		if (data + L4_OFF + sizeof(l4) > end)                                          \
			return XDP_DROP;                                                       \
		struct ethhdr *eth = data;                                                     \
		__builtin_memcpy(eth->h_dest, (fib).dmac, ETH_ALEN);                           \
		__builtin_memcpy(eth->h_source, (fib).smac, ETH_ALEN);                         \
		eth->h_proto = bswap16(ETH_P_IP);                                              \
		__builtin_memcpy(data + ETH_LEN, &(ip), IP_LEN);                               \
		__builtin_memcpy(data + L4_OFF, &(l4), sizeof(l4));                            \
	} while (0)

INLINE int out(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect_map(&tern_egress, fib->ifindex, 0);
}

#define NOT_MINE -1

/* ChannelData from a client: strip the 4-byte header, send the data from the relay
 * address to the peer. */
INLINE int client_to_peer(struct xdp_md *ctx)
{
	struct hdrs h;
	if (!parse_at((void *)(long)ctx->data, (void *)(long)ctx->data_end, &h, CD_LEN))
		return NOT_MINE;
	__u16 data_len;
	struct c2p_val *v = c2p_match(&h, &data_len);
	if (!v)
		return NOT_MINE;
	__u16 tot = IP_LEN + UDP_LEN + data_len;
	struct bpf_fib_lookup fib;
	if (!route(ctx, &fib, v->relay_ip, v->peer_ip, v->relay_port, v->peer_port, tot) ||
	    !WITHIN_CAP(v, v->relay_ip, v->relay_port, data_len, 1))
		return XDP_PASS;
	struct iphdr ip = *h.ip;
	ip_rewrite(&ip, v->relay_ip, v->peer_ip, bswap16(tot));
	struct udphdr nu = c2p_udp(v, data_len);
	/* The frame starts 4 bytes later: the new headers end where the data begins. */
	if (bpf_xdp_adjust_head(ctx, CD_LEN))
		return XDP_DROP;
	EMIT(ctx, fib, ip, nu);
	COUNT(v, data_len);
	return out(ctx, &fib);
}

/* A datagram from a peer to a relay address with a channel bound: prepend the ChannelData
 * header, send it from the server address to the client. */
INLINE int peer_to_client(struct xdp_md *ctx)
{
	struct hdrs h;
	if (!parse_at((void *)(long)ctx->data, (void *)(long)ctx->data_end, &h, 0))
		return XDP_PASS;
	__u16 data_len;
	struct p2c_val *v = p2c_match(&h, &data_len);
	if (!v)
		return XDP_PASS;
	__u16 tot = IP_LEN + UDP_LEN + CD_LEN + data_len;
	struct bpf_fib_lookup fib;
	if (!route(ctx, &fib, v->server_ip, v->client_ip, v->server_port, v->client_port, tot) ||
	    !WITHIN_CAP(v, h.ip->daddr, h.udp->dest, data_len, 0))
		return XDP_PASS;
	struct iphdr ip = *h.ip;
	ip_rewrite(&ip, v->server_ip, v->client_ip, bswap16(tot));
	struct cd_hdrs nh = p2c_hdrs(v, data_len);
	/* The frame starts 4 bytes earlier (XDP keeps headroom for that). */
	if (bpf_xdp_adjust_head(ctx, -CD_LEN))
		return XDP_DROP;
	EMIT(ctx, fib, ip, nh);
	COUNT(v, data_len);
	return out(ctx, &fib);
}

SEC("xdp")
int tern_xdp(struct xdp_md *ctx)
{
	int rc = client_to_peer(ctx);
	if (rc != NOT_MINE)
		return rc;
	return peer_to_client(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
