// SPDX-License-Identifier: MIT OR GPL-2.0-only
//
// tenet's eBPF GRE datapath: kernel gretap's wire format (RFC 2784 + RFC 2890 key, protocol
// 0x6558, TTL inherit, ECN per RFC 6040, DF) done by two tc programs, for kernels without
// ip_gre. The agent fills the maps; see src/net/tunnel/ebpf/mod.rs.
//
// * tenet_gre_encap runs on the egress of each tunnel port (the device enslaved to the
//   tenant bridge). It looks the port up by ifindex, grows the frame by 42 bytes (outer IPv4
//   20 + GRE with key 8 + the inner Ethernet header moved down 14), writes the outer headers
//   and redirects to the underlay device. GSO packets stay GSO: the kernel (or the NIC)
//   segments them as GRE. A frame that does not fit the path MTU is answered with ICMP
//   fragmentation-needed / packet-too-big, written back into the port like kernel gretap.
// * tenet_gre_decap runs on the underlay's ingress. GRE from a known (peer, local, key) is
//   stripped, ECN applied to the inner packet, and redirected into the port's ingress;
//   anything else that is GRE is dropped and counted; what is not GRE passes.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define MAX_TUNNELS 8192
#define GRE_HLEN 8
#define OUTER_LEN (sizeof(struct iphdr) + GRE_HLEN)            /* 28 */
#define OVERHEAD (OUTER_LEN + ETH_HLEN)                         /* 42 */
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define GRE_CSUM 0x8000
#define GRE_UNSUPPORTED 0x4007 /* routing bit, version */
#define ETH_P_TEB 0x6558
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define ECN_MASK 3
#define ECT_1 1
#define ECT_0 2
#define CE 3
#define IPV6_MIN_MTU 1280
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_ECHO 8
#define ICMPV6_PKT_TOOBIG 2

/* linux/icmp.h would pull in libc headers: the two ICMP headers used here. */
struct icmp_frag_needed {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu;
};

struct icmp6_too_big {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 mtu;
};

/* Per-tunnel counters, in the order of tenet's stats::Counter. */
enum counter {
	TX_PACKETS,
	TX_BYTES,
	TX_ERRORS,
	TX_TOO_BIG,
	ICMP_SENT,
	RX_PACKETS,
	RX_BYTES,
	RX_ERRORS,
	RX_ECN_DROPPED,
	RX_ECN_MARKED,
	COUNTERS,
};

/* Drops before any tunnel, in the order of tenet's stats::DropReason (+ no neighbour). */
enum drop {
	DROP_MALFORMED,
	DROP_UNKNOWN_KEY,
	DROP_UNKNOWN_PEER,
	DROP_NO_NEIGHBOUR,
	DROPS,
};

struct flow_key {
	__u32 remote; /* network order */
	__u32 local;  /* network order */
	__u32 key;    /* host order */
};

struct flow_val {
	__u32 ifindex;
	__u32 slot;
};

struct port_val {
	__u32 local;    /* network order */
	__u32 remote;   /* network order */
	__u32 key;      /* network order, as written on the wire */
	__u32 slot;
	__u32 ttl;      /* 0: inherit */
};

struct counters {
	__u64 v[COUNTERS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} tenet_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, __u32);
	__type(value, struct port_val);
} tenet_ports SEC(".maps");

/* Remote address (network order) → how many tunnels go there: tells an unknown key from an
 * unknown peer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, __u32);
	__type(value, __u32);
} tenet_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, __u32);
	__type(value, struct counters);
} tenet_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROPS);
	__type(key, __u32);
	__type(value, __u64);
} tenet_drops SEC(".maps");

static __always_inline void count_drop(__u32 reason)
{
	__u64 *d = bpf_map_lookup_elem(&tenet_drops, &reason);
	if (d)
		*d += 1;
}

/* The outer ECN field for an inner traffic class: copied, CE as ECT(0) (the kernel's
 * INET_ECN_encapsulate). */
static __always_inline __u8 ecn_encap(__u8 inner)
{
	__u8 ecn = inner & ECN_MASK;
	return ecn == CE ? ECT_0 : ecn;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Turns the frame (an IPv4 packet with DF that does not fit `mtu`) into ICMP fragmentation
 * needed back to its sender, and sends it into the port. */
static __always_inline int answer_v4(struct __sk_buff *skb, struct counters *c, __u32 mtu)
{
	/* Two bytes of padding in front keep the IP header 4-byte aligned on the stack. */
	struct {
		__u8 pad[2];
		struct ethhdr eth;
		struct iphdr ip;
		struct icmp_frag_needed icmp;
		__u8 quote[sizeof(struct iphdr) + 8];
	} r;
	const __u32 reply_len = ETH_HLEN + sizeof(r.ip) + sizeof(r.icmp) + sizeof(r.quote);
	_Static_assert(sizeof(r) == 2 + ETH_HLEN + 20 + 8 + 28, "no holes");
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, r.quote, sizeof(r.quote)))
		return TC_ACT_SHOT;
	struct iphdr *orig = (struct iphdr *)r.quote;
	if (orig->ihl != 5 || (orig->frag_off & bpf_htons(IP_OFFSET)))
		return TC_ACT_SHOT;
	if (orig->protocol == IPPROTO_ICMP) {
		__u8 type = r.quote[sizeof(struct iphdr)];
		if (type != ICMP_ECHO && type != ICMP_ECHOREPLY)
			return TC_ACT_SHOT; /* no error about an error */
	}
	__builtin_memcpy(r.eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(r.eth.h_source, eth.h_dest, ETH_ALEN);
	r.eth.h_proto = bpf_htons(ETH_P_IP);
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tos = 0xc0;
	r.ip.tot_len = bpf_htons(reply_len - ETH_HLEN);
	r.ip.id = 0;
	r.ip.frag_off = 0;
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.check = 0;
	r.ip.saddr = orig->daddr;
	r.ip.daddr = orig->saddr;
	r.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_FRAG_NEEDED;
	r.icmp.checksum = 0;
	r.icmp.unused = 0;
	r.icmp.mtu = bpf_htons(mtu > 0xffff ? 0xffff : mtu);
	r.icmp.checksum = csum_fold(
		bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), 0));
	if (bpf_skb_change_tail(skb, reply_len, 0) ||
	    bpf_skb_store_bytes(skb, 0, &r.eth, reply_len, 0))
		return TC_ACT_SHOT;
	c->v[ICMP_SENT] += 1;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* The same for IPv6: packet too big, quoting the header and 8 bytes. */
static __always_inline int answer_v6(struct __sk_buff *skb, struct counters *c, __u32 mtu)
{
	struct {
		__u8 pad[2];
		struct ethhdr eth;
		struct ipv6hdr ip;
		struct icmp6_too_big icmp;
		__u8 quote[sizeof(struct ipv6hdr) + 8];
	} r;
	const __u32 reply_len = ETH_HLEN + sizeof(r.ip) + sizeof(r.icmp) + sizeof(r.quote);
	_Static_assert(sizeof(r) == 2 + ETH_HLEN + 40 + 8 + 48, "no holes");
	struct ethhdr eth;
	if (mtu < IPV6_MIN_MTU)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, r.quote, sizeof(r.quote)))
		return TC_ACT_SHOT;
	struct ipv6hdr *orig = (struct ipv6hdr *)r.quote;
	if (orig->nexthdr == IPPROTO_ICMPV6 && r.quote[sizeof(struct ipv6hdr)] < 128)
		return TC_ACT_SHOT; /* no error about an error */
	__builtin_memcpy(r.eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(r.eth.h_source, eth.h_dest, ETH_ALEN);
	r.eth.h_proto = bpf_htons(ETH_P_IPV6);
	__builtin_memset(&r.ip, 0, sizeof(r.ip));
	r.ip.version = 6;
	r.ip.payload_len = bpf_htons(sizeof(r.icmp) + sizeof(r.quote));
	r.ip.nexthdr = IPPROTO_ICMPV6;
	r.ip.hop_limit = 64;
	r.ip.saddr = orig->daddr;
	r.ip.daddr = orig->saddr;
	r.icmp.type = ICMPV6_PKT_TOOBIG;
	r.icmp.code = 0;
	r.icmp.checksum = 0;
	r.icmp.mtu = bpf_htonl(mtu);
	/* Pseudo-header: addresses, upper-layer length, next header. */
	__be32 pseudo[2] = {bpf_htonl(sizeof(r.icmp) + sizeof(r.quote)),
			    bpf_htonl(IPPROTO_ICMPV6)};
	__u32 sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip.saddr, 32, 0);
	sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), sum);
	r.icmp.checksum = csum_fold(sum);
	if (bpf_skb_change_tail(skb, reply_len, 0) ||
	    bpf_skb_store_bytes(skb, 0, &r.eth, reply_len, 0))
		return TC_ACT_SHOT;
	c->v[ICMP_SENT] += 1;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

SEC("classifier")
int tenet_gre_encap(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct port_val *p = bpf_map_lookup_elem(&tenet_ports, &ifindex);
	if (!p)
		return TC_ACT_SHOT;
	__u32 slot = p->slot;
	struct counters *c = bpf_map_lookup_elem(&tenet_counters, &slot);
	if (!c)
		return TC_ACT_SHOT;

	/* The headers read below must be in the linear part. */
	__u32 want = ETH_HLEN + sizeof(struct ipv6hdr);
	if (skb->len < want)
		want = skb->len;
	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		goto error;

	__u32 ttl = p->ttl;
	__u8 tos = 0, df = 0;
	int v4 = 0, v6 = 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			goto error;
		if (!ttl)
			ttl = ip->ttl;
		tos = ecn_encap(ip->tos);
		df = !!(ip->frag_off & bpf_htons(IP_DF));
		v4 = 1;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			goto error;
		if (!ttl)
			ttl = ip6->hop_limit;
		tos = ecn_encap((ip6->priority << 4) | (ip6->flow_lbl[0] >> 4));
		v6 = 1;
	}
	if (!ttl)
		ttl = 64;

	__u32 len = skb->len;
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;

	/* Where the outer packet goes (the route to the peer, its neighbour on the underlay)
	 * and whether it fits the path MTU, learned exceptions included (a GSO packet is cut
	 * to the tenant MTU, which leaves room). The lookup is made as if the packet came in
	 * on the port: the helper wants forwarding enabled on the device it is given, and the
	 * agent enables it on the port, where it changes nothing else (a bridge port never
	 * hands packets to IP). */
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.ipv4_src = p->local;
	fib.ipv4_dst = p->remote;
	fib.ifindex = skb->ifindex;
	fib.tot_len = skb->gso_size ? 0 : len + OUTER_LEN;
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		c->v[TX_ERRORS] += 1;
		c->v[TX_TOO_BIG] += 1;
		__u32 mtu = fib.mtu_result > OUTER_LEN + ETH_HLEN ? fib.mtu_result - OUTER_LEN - ETH_HLEN : 0;
		if (v4 && df)
			return answer_v4(skb, c, mtu);
		if (v6)
			return answer_v6(skb, c, mtu);
		return TC_ACT_SHOT;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		c->v[TX_ERRORS] += 1;
		return TC_ACT_SHOT;
	}

	struct ethhdr inner;
	__builtin_memcpy(&inner, eth, sizeof(inner));
	if (v4 || v6) {
		__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
			      BPF_F_ADJ_ROOM_ENCAP_L4_GRE | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
			      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
		/* A frame this datapath decapsulated and a bridge forwarded to another tunnel (a
		 * concentrator's hub traffic) still carries its tunnel state: the kernel refuses to
		 * encapsulate it again (-EALREADY), and has no way to clear that state from BPF.
		 * A plain grow at the same place puts the headers back exactly where that state
		 * (inner and transport header offsets, the GRE GSO type) expects them. */
		if (bpf_skb_adjust_room(skb, OVERHEAD, BPF_ADJ_ROOM_MAC, flags) &&
		    bpf_skb_adjust_room(skb, OVERHEAD, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
			goto error;
	} else {
		/* adjust_room takes IP packets only: ARP and the like get fresh headroom. */
		if (bpf_skb_change_head(skb, OVERHEAD, 0))
			goto error;
	}

	struct {
		__u8 pad[2];
		struct ethhdr eth;
		struct iphdr ip;
		__be16 gre_flags;
		__be16 gre_proto;
		__be32 gre_key;
		struct ethhdr inner;
	} h;
	_Static_assert(__builtin_offsetof(typeof(h), inner) == 2 + OVERHEAD, "no holes");
	__builtin_memcpy(h.eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(h.eth.h_source, fib.smac, ETH_ALEN);
	h.eth.h_proto = bpf_htons(ETH_P_IP);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = tos;
	__u32 total = len + OUTER_LEN;
	h.ip.tot_len = bpf_htons(total > 0xffff ? 0xffff : total);
	h.ip.id = 0;
	h.ip.frag_off = bpf_htons(IP_DF);
	h.ip.ttl = ttl;
	h.ip.protocol = IPPROTO_GRE;
	h.ip.check = 0;
	h.ip.saddr = p->local;
	h.ip.daddr = p->remote;
	h.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
	h.gre_flags = bpf_htons(GRE_KEY);
	h.gre_proto = bpf_htons(ETH_P_TEB);
	h.gre_key = p->key;
	h.inner = inner;
	if (bpf_skb_store_bytes(skb, 0, &h.eth, ETH_HLEN + OVERHEAD, 0))
		goto error;

	c->v[TX_PACKETS] += segs;
	c->v[TX_BYTES] += len;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The neighbour is being resolved: the kernel queues the packet meanwhile. */
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = p->remote};
		if (v4)
			return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
		count_drop(DROP_NO_NEIGHBOUR);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(fib.ifindex, 0);

error:
	c->v[TX_ERRORS] += 1;
	return TC_ACT_SHOT;
}

/* RFC 6040's decapsulation table for one packet: the ECN value to give the inner header,
 * 0 to leave it as it is, or -1 to drop it (CE over a not-ECT packet). */
static __always_inline int ecn_decide(__u8 outer, __u8 inner)
{
	if (inner == 0)
		return outer == CE ? -1 : 0;
	if (outer == CE && inner != CE)
		return CE;
	if (outer == ECT_1 && inner == ECT_0)
		return ECT_1;
	return 0;
}

/* RFC 6040 decapsulation of the ECN field; returns -1 to drop. `off` is where the inner IP
 * header starts. */
static __always_inline int ecn_decap(struct __sk_buff *skb, __u32 off, __u8 outer, __u16 proto,
				     struct counters *c)
{
	outer &= ECN_MASK;
	if (proto == bpf_htons(ETH_P_IP)) {
		__u16 word; /* version/ihl and TOS */
		if (bpf_skb_load_bytes(skb, off, &word, 2))
			return 0;
		int ecn = ecn_decide(outer, ((__u8 *)&word)[1] & ECN_MASK);
		if (ecn <= 0)
			return ecn;
		__u16 updated = word;
		((__u8 *)&updated)[1] = (((__u8 *)&word)[1] & ~ECN_MASK) | ecn;
		bpf_l3_csum_replace(skb, off + offsetof(struct iphdr, check), word, updated, 2);
		bpf_skb_store_bytes(skb, off, &updated, 2, 0);
		c->v[RX_ECN_MARKED] += 1;
		return 0;
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		__u8 b[2];
		if (bpf_skb_load_bytes(skb, off, b, 2))
			return 0;
		int ecn = ecn_decide(outer, (b[1] >> 4) & ECN_MASK);
		if (ecn <= 0)
			return ecn;
		b[1] = (b[1] & ~(ECN_MASK << 4)) | (ecn << 4);
		bpf_skb_store_bytes(skb, off, b, 2, 0);
		c->v[RX_ECN_MARKED] += 1;
		return 0;
	}
	return 0;
}

SEC("classifier")
int tenet_gre_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (ip->protocol != IPPROTO_GRE)
		return TC_ACT_OK;
	/* Fragments and IP options are left to the stack (which has no GRE here: they go). */
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return TC_ACT_OK;
	__u32 need = ETH_HLEN + OUTER_LEN + 8 + ETH_HLEN;
	if ((void *)(long)skb->data + need > (void *)(long)skb->data_end) {
		if (skb->len < need) {
			count_drop(DROP_MALFORMED);
			return TC_ACT_SHOT;
		}
		bpf_skb_pull_data(skb, need);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		ip = (void *)(eth + 1);
		if ((void *)ip + need - ETH_HLEN > data_end)
			return TC_ACT_OK;
	}
	__u8 *gre = (void *)(ip + 1);
	if ((void *)(gre + 16) > data_end)
		return TC_ACT_OK;
	__u16 flags = (gre[0] << 8) | gre[1];
	__u16 proto = (gre[2] << 8) | gre[3];
	/* Checksummed GRE is not what gretap sends by default; the user-space datapath takes it. */
	if ((flags & (GRE_UNSUPPORTED | GRE_CSUM)) || proto != ETH_P_TEB) {
		count_drop(DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	struct flow_key fk = {.remote = ip->saddr, .local = ip->daddr, .key = 0};
	__u32 greh = 4;
	if (!(flags & GRE_KEY)) {
		__u32 remote = ip->saddr;
		count_drop(bpf_map_lookup_elem(&tenet_peers, &remote) ? DROP_UNKNOWN_KEY
								       : DROP_UNKNOWN_PEER);
		return TC_ACT_SHOT;
	}
	fk.key = ((__u32)gre[4] << 24) | ((__u32)gre[5] << 16) | ((__u32)gre[6] << 8) | gre[7];
	greh += 4;
	if (flags & GRE_SEQ)
		greh += 4;
	__u8 outer_tos = ip->tos;
	struct flow_val *t = bpf_map_lookup_elem(&tenet_flows, &fk);
	if (!t) {
		__u32 remote = fk.remote;
		count_drop(bpf_map_lookup_elem(&tenet_peers, &remote) ? DROP_UNKNOWN_KEY
								       : DROP_UNKNOWN_PEER);
		return TC_ACT_SHOT;
	}
	__u32 ifindex = t->ifindex;
	__u32 slot = t->slot;
	struct counters *c = bpf_map_lookup_elem(&tenet_counters, &slot);
	if (!c)
		return TC_ACT_SHOT;

	__u32 inner_off = ETH_HLEN + sizeof(struct iphdr) + greh;
	if (inner_off + ETH_HLEN > skb->len) {
		count_drop(DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	struct ethhdr inner;
	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)))
		goto error;
	if (ecn_decap(skb, inner_off + ETH_HLEN, outer_tos, inner.h_proto, c) < 0) {
		c->v[RX_ERRORS] += 1;
		c->v[RX_ECN_DROPPED] += 1;
		return TC_ACT_SHOT;
	}
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;
	/* Drop outer IPv4, GRE and the inner Ethernet header's old place: the frame is then
	 * [outer Ethernet][inner payload], and the inner Ethernet header goes to the front. */
	__s32 shrink = sizeof(struct iphdr) + greh + ETH_HLEN;
	if (bpf_skb_adjust_room(skb, -shrink, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		goto error;
	if (bpf_skb_store_bytes(skb, 0, &inner, sizeof(inner), 0))
		goto error;
	c->v[RX_PACKETS] += segs;
	c->v[RX_BYTES] += skb->len;
	return bpf_redirect(ifindex, BPF_F_INGRESS);

error:
	c->v[RX_ERRORS] += 1;
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
