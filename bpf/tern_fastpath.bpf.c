// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tern's kernel fast path for established TURN channel bindings (RFC 8656 §12), IPv4/UDP,
 * as a TC (clsact ingress) classifier: `turn.kernel_fast_path = "tc"`.
 *
 * Owns: rewriting and forwarding, in the kernel, the two kinds of datagram an active
 * channel carries: ChannelData from the client (client 5-tuple + channel number in
 * `c2p`) leaves as a plain UDP datagram from the relay address to the peer, and a UDP
 * datagram from the peer to the relay address (`p2c`) leaves as ChannelData to the client.
 * Counts packets and payload bytes per binding in the map values, and keeps capped relays
 * within the byte budgets Tern grants them (`tern_budget`). The maps, the match and the new
 * headers are tern_fastpath.h's, shared with the XDP program (tern_fastpath_xdp.bpf.c).
 * Must not: decide anything. Tern's workers alone put bindings into the maps (channel
 * bound, permission alive) and take them out (expiry, deletion). Anything not matched
 * exactly (STUN, Send/Data indications, padded ChannelData, fragments, GSO packets, IPv6,
 * datagrams that would exceed the egress MTU) goes up to user space untouched.
 *
 * Dual-licensed so that the GPL-only helpers (bpf_redirect_neigh, bpf_check_mtu) can be
 * used; the rest of Tern is MIT OR Apache-2.0. Rebuild with `bpf/build.sh`; the objects
 * next to this file are what Tern embeds (the test fastpath_object_matches_its_source checks
 * they match).
 */
#include <linux/pkt_cls.h>

#include "tern_fastpath.h"

static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 off, const void *from, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode,
                                   __u64 flags) = (void *)BPF_FUNC_skb_adjust_room;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static long (*bpf_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff,
                             __u64 flags) = (void *)BPF_FUNC_check_mtu;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen,
                                  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* A datagram parse_at() accepts, not aggregated, its first `need` payload bytes pulled
 * into the linear area. */
INLINE int parse(struct __sk_buff *skb, struct hdrs *h, __u32 need)
{
	if (skb->protocol != bswap16(ETH_P_IP) || skb->gso_segs > 1)
		return 0;
	__u32 n = L4_OFF + UDP_LEN + need;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + n > end) {
		if (bpf_skb_pull_data(skb, n) != 0)
			return 0;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	return parse_at(data, end, h, need);
}

/* Out through `ifindex` (src/fastpath/route.rs found it for the binding), the kernel filling
 * in the link-layer header: bpf_redirect_neigh (5.10+) looks up the next hop for the
 * rewritten destination in the FIB and its MAC in the neighbour table, resolving it (ARP)
 * when missing instead of dropping, so no MAC handling here and no forwarding sysctl. */
INLINE long send(__u32 ifindex)
{
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

/* ChannelData from a client: strip the 4-byte header, send the data from the relay
 * address to the peer. */
INLINE long client_to_peer(struct __sk_buff *skb)
{
	struct hdrs h;
	if (!parse(skb, &h, CD_LEN))
		return TC_ACT_OK;
	__u16 data_len;
	struct c2p_val *v = c2p_match(&h, &data_len);
	if (!v || !WITHIN_CAP(v, v->relay_ip, v->relay_port, data_len, 1))
		return TC_ACT_OK;
	ip_rewrite(h.ip, v->relay_ip, v->peer_ip, bswap16(IP_LEN + UDP_LEN + data_len));
	struct udphdr nu = c2p_udp(v, data_len);
	/* The new UDP header goes over the old one's last 4 bytes and the ChannelData header;
	 * the 4 bytes removed are then the old header's first 4. */
	if (bpf_skb_store_bytes(skb, L4_OFF + CD_LEN, &nu, sizeof(nu), 0) ||
	    bpf_skb_adjust_room(skb, -CD_LEN, BPF_ADJ_ROOM_NET, 0))
		return TC_ACT_SHOT;
	COUNT(v, data_len);
	return send(v->ifindex);
}

/* A datagram from a peer to a relay address with a channel bound: prepend the ChannelData
 * header, send it from the server address to the client. */
INLINE long peer_to_client(struct __sk_buff *skb)
{
	struct hdrs h;
	if (!parse(skb, &h, 0))
		return TC_ACT_OK;
	__u16 data_len;
	struct p2c_val *v = p2c_match(&h, &data_len);
	if (!v)
		return TC_ACT_OK;
	__u32 relay_ip = h.ip->daddr;
	__u16 relay_port = h.udp->dest;
	/* A datagram the 4 bytes would take past the egress MTU goes up (user space sends it
	 * and the kernel fragments it there). */
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, v->ifindex, &mtu_len, CD_LEN, 0) != 0)
		return TC_ACT_OK;
	if (!WITHIN_CAP(v, relay_ip, relay_port, data_len, 0))
		return TC_ACT_OK;
	ip_rewrite(h.ip, v->server_ip, v->client_ip, bswap16(IP_LEN + UDP_LEN + CD_LEN + data_len));
	struct cd_hdrs nh = p2c_hdrs(v, data_len);
	/* 4 bytes open between the IP and UDP headers; the new UDP header and the ChannelData
	 * header fill them and the old UDP header. */
	if (bpf_skb_adjust_room(skb, CD_LEN, BPF_ADJ_ROOM_NET, 0) ||
	    bpf_skb_store_bytes(skb, L4_OFF, &nh, sizeof(nh), 0))
		return TC_ACT_SHOT;
	COUNT(v, data_len);
	return send(v->ifindex);
}

SEC("classifier")
int tern_tc_ingress(struct __sk_buff *skb)
{
	long rc = client_to_peer(skb);
	if (rc != TC_ACT_OK)
		return rc;
	return peer_to_client(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
