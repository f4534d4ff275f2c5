// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tern's kernel fast path for established TURN channel bindings (RFC 8656 §12), IPv4/UDP.
 *
 * Owns: rewriting and forwarding, in the kernel, the two kinds of datagram an active
 * channel carries: ChannelData from the client (client 5-tuple + channel number in
 * `c2p`) leaves as a plain UDP datagram from the relay address to the peer, and a UDP
 * datagram from the peer to the relay address (`p2c`) leaves as ChannelData to the client.
 * Counts packets and payload bytes per binding in the map values, and keeps capped relays
 * within the byte budgets Tern grants them (`tern_budget`).
 * Must not: decide anything. Tern's workers alone put bindings into the maps (channel
 * bound, permission alive) and take them out (expiry, deletion). Anything not matched
 * exactly (STUN, Send/Data indications, padded ChannelData, fragments, GSO packets, IPv6,
 * datagrams that would exceed the egress MTU) goes up to user space untouched.
 *
 * Dual-licensed so that the GPL-only helpers (bpf_redirect_neigh, bpf_check_mtu) can be
 * used; the rest of Tern is MIT OR Apache-2.0. Rebuild with `bpf/build.sh`; the object
 * next to this file is what Tern embeds (the test fastpath_object_matches_its_source checks
 * they match).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>

/* Self-contained instead of libbpf's headers: the rebuild needs clang and the kernel UAPI
 * headers only. */
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static __attribute__((always_inline)) inline
#define bswap16(x) __builtin_bswap16(x)

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 off, const void *from, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 off, __u64 from, __u64 to,
                                   __u64 size) = (void *)BPF_FUNC_l3_csum_replace;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode,
                                   __u64 flags) = (void *)BPF_FUNC_skb_adjust_room;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static long (*bpf_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff,
                             __u64 flags) = (void *)BPF_FUNC_check_mtu;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen,
                                  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

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
	__u32 pad2;
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

/* `turn.max_bytes_per_sec` budgets of a capped relayed address (absent: no cap), in payload
 * bytes per direction. Tern grants what its token buckets hold twice a second and takes back
 * what is left; a datagram over the budget goes up to user space, whose bucket then drops it. */
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

/* Takes `len` bytes from the budget of relay `ip`:`port` (`to_peer` or the other direction);
 * 0 when it cannot. Racing CPUs may overdraw by a datagram each: Tern takes that off the
 * next grant. */
INLINE int spend(__u32 ip, __u16 port, __u16 len, int to_peer)
{
	struct budget_key k = {.relay_ip = ip, .relay_port = port};
	struct budget *b = bpf_map_lookup_elem(&tern_budget, &k);
	if (!b)
		return 1;
	__s64 *left = to_peer ? &b->to_peer : &b->to_client;
	if (*left < (__s64)len)
		return 0;
	__sync_fetch_and_add(left, -(__s64)len);
	return 1;
}

#define ETH_LEN 14
#define IP_LEN 20
#define UDP_LEN 8
#define CD_LEN 4
#define L4_OFF (ETH_LEN + IP_LEN)
#define IP_CSUM_OFF (ETH_LEN + 10)

struct hdrs {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	__u8 *payload;
};

/* An unfragmented IPv4/UDP datagram without IP options, not aggregated, with `need` payload
 * bytes readable. */
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
		if (data + n > end)
			return 0;
	}
	h->eth = data;
	h->ip = data + ETH_LEN;
	h->udp = data + L4_OFF;
	h->payload = data + L4_OFF + UDP_LEN;
	if (h->eth->h_proto != bswap16(ETH_P_IP) || h->ip->version != 4 || h->ip->ihl != 5 ||
	    h->ip->protocol != IPPROTO_UDP || (h->ip->frag_off & bswap16(0x3fff)) != 0)
		return 0;
	return 1;
}

/* Out through `ifindex`, the link-layer header from the neighbour table (the next hop is
 * the route's for the rewritten destination; no forwarding sysctl involved). */
INLINE long send(__u32 ifindex)
{
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

/* The IP header checksum for new addresses and length. The UDP checksum is set to 0 (none,
 * allowed over IPv4: RFC 768): an incremental update goes wrong when the skb's checksum is
 * partial (a sender on the same host, e.g. behind a veth), whose offsets move with the
 * header. */
INLINE int fix_ip_csum(struct __sk_buff *skb, __u32 old_src, __u32 new_src, __u32 old_dst,
                       __u32 new_dst, __u16 old_tot, __u16 new_tot)
{
	return !(bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_src, new_src, 4) ||
	         bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_dst, new_dst, 4) ||
	         bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_tot, new_tot, 2));
}

/* ChannelData from a client (RFC 8656 §12.5): strip the 4-byte header, send the data from
 * the relay address to the peer. */
INLINE long client_to_peer(struct __sk_buff *skb)
{
	struct hdrs h;
	if (!parse(skb, &h, CD_LEN))
		return TC_ACT_OK;
	__u16 channel = bswap16(*(__u16 *)h.payload);
	__u16 data_len = bswap16(*(__u16 *)(h.payload + 2));
	__u16 udp_len = bswap16(h.udp->len);
	/* A ChannelData's first two bits are 01 (0x4000-0x7FFF: RFC 8656 §12 numbers, and the
	 * RFC 5766 range Tern still accepts); padded ChannelData goes up. */
	if ((channel & 0xC000) != 0x4000 || udp_len != UDP_LEN + CD_LEN + data_len)
		return TC_ACT_OK;
	struct c2p_key k = {
		.client_ip = h.ip->saddr,
		.server_ip = h.ip->daddr,
		.client_port = h.udp->source,
		.server_port = h.udp->dest,
		.channel = channel,
	};
	struct c2p_val *v = bpf_map_lookup_elem(&tern_c2p, &k);
	if (!v)
		return TC_ACT_OK;
	if (!spend(v->relay_ip, v->relay_port, data_len, 1))
		return TC_ACT_OK;
	__u16 old_tot = h.ip->tot_len;
	__u16 new_tot = bswap16(bswap16(old_tot) - CD_LEN);
	__u32 ifindex = v->ifindex;
	struct udphdr nu = {
		.source = v->relay_port,
		.dest = v->peer_port,
		.len = bswap16(UDP_LEN + data_len),
	};
	__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip;
	if (!fix_ip_csum(skb, k.client_ip, relay_ip, k.server_ip, peer_ip, old_tot, new_tot))
		return TC_ACT_SHOT;
	if (!parse(skb, &h, CD_LEN))
		return TC_ACT_SHOT;
	h.ip->saddr = relay_ip;
	h.ip->daddr = peer_ip;
	h.ip->tot_len = new_tot;
	/* The new UDP header goes over the old one's last 4 bytes and the ChannelData header;
	 * the 4 bytes removed are then the old header's first 4. */
	if (bpf_skb_store_bytes(skb, L4_OFF + CD_LEN, &nu, sizeof(nu), 0) ||
	    bpf_skb_adjust_room(skb, -CD_LEN, BPF_ADJ_ROOM_NET, 0))
		return TC_ACT_SHOT;
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, data_len);
	return send(ifindex);
}

/* A datagram from a peer to a relay address with a channel bound (RFC 8656 §11.6, §12.5):
 * prepend the ChannelData header, send it from the server address to the client. */
INLINE long peer_to_client(struct __sk_buff *skb)
{
	struct hdrs h;
	if (!parse(skb, &h, 0))
		return TC_ACT_OK;
	struct p2c_key k = {
		.peer_ip = h.ip->saddr,
		.relay_ip = h.ip->daddr,
		.peer_port = h.udp->source,
		.relay_port = h.udp->dest,
	};
	struct p2c_val *v = bpf_map_lookup_elem(&tern_p2c, &k);
	if (!v)
		return TC_ACT_OK;
	__u16 udp_len = bswap16(h.udp->len);
	if (udp_len < UDP_LEN || udp_len - UDP_LEN > 0xffff - CD_LEN - UDP_LEN)
		return TC_ACT_OK;
	__u16 data_len = udp_len - UDP_LEN;
	if (!spend(k.relay_ip, k.relay_port, data_len, 0))
		return TC_ACT_OK;
	__u16 old_tot = h.ip->tot_len;
	__u16 new_tot = bswap16(bswap16(old_tot) + CD_LEN);
	__u32 ifindex = v->ifindex;
	/* A datagram the 4 bytes would take past the egress MTU goes up (user space sends it
	 * and the kernel fragments it there). */
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, ifindex, &mtu_len, CD_LEN, 0) != 0)
		return TC_ACT_OK;
	__u32 server_ip = v->server_ip, client_ip = v->client_ip;
	struct {
		struct udphdr udp;
		__u16 channel;
		__u16 len;
	} nh = {
		.udp = {
			.source = v->server_port,
			.dest = v->client_port,
			.len = bswap16(UDP_LEN + CD_LEN + data_len),
		},
		.channel = bswap16(v->channel),
		.len = bswap16(data_len),
	};
	if (!fix_ip_csum(skb, k.peer_ip, server_ip, k.relay_ip, client_ip, old_tot, new_tot))
		return TC_ACT_SHOT;
	if (!parse(skb, &h, 0))
		return TC_ACT_SHOT;
	h.ip->saddr = server_ip;
	h.ip->daddr = client_ip;
	h.ip->tot_len = new_tot;
	/* 4 bytes open between the IP and UDP headers; the new UDP header and the ChannelData
	 * header fill them and the old UDP header. */
	if (bpf_skb_adjust_room(skb, CD_LEN, BPF_ADJ_ROOM_NET, 0) ||
	    bpf_skb_store_bytes(skb, L4_OFF, &nh, sizeof(nh), 0))
		return TC_ACT_SHOT;
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, data_len);
	return send(ifindex);
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
