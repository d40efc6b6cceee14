// XDP source-address filter: drops packets from denied sources, or from
// sources outside a non-empty allow list, before the stack sees them.
//
// Verdict: deny match -> drop; else allow list active and no allow match ->
// drop; else pass. ARP and IPv6 neighbour discovery always pass, so an allow
// list never cuts the interface off from address resolution.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/icmpv6.h>

#ifndef ACCESS_RULES_MAX
#define ACCESS_RULES_MAX 16384
#endif
#ifndef XDP_PORTS_MAX
#define XDP_PORTS_MAX 256
#endif
// Bounded walk over IPv6 extension headers (the verifier needs a bound).
#define IPV6_EXT_HEADERS_MAX 4

struct lpm_v4_key {
    u32 prefixlen;
    u8 addr[4];
};

struct lpm_v6_key {
    u32 prefixlen;
    u8 addr[16];
};

struct xdp_config {
    u32 allow_list_active;  // 1 when the allow list has entries
    u32 ports_only;         // 1: filter only TCP to XDP_PORTS, pass the rest
};

struct xdp_stats {
    u64 passed;
    u64 dropped_deny;
    u64 dropped_not_allowed;
};

struct vlan_header {
    __be16 tci;
    __be16 encapsulated_proto;
};

BPF_LPM_TRIE(ACCESS_ALLOW_V4, struct lpm_v4_key, u8, ACCESS_RULES_MAX);
BPF_LPM_TRIE(ACCESS_DENY_V4, struct lpm_v4_key, u8, ACCESS_RULES_MAX);
BPF_LPM_TRIE(ACCESS_ALLOW_V6, struct lpm_v6_key, u8, ACCESS_RULES_MAX);
BPF_LPM_TRIE(ACCESS_DENY_V6, struct lpm_v6_key, u8, ACCESS_RULES_MAX);
BPF_ARRAY(XDP_CONFIG, struct xdp_config, 1);
BPF_HASH(XDP_PORTS, u16, u8, XDP_PORTS_MAX);  // key: TCP port, host order
BPF_PERCPU_ARRAY(XDP_STATS, struct xdp_stats, 1);

enum verdict { PASS, DROP_DENY, DROP_NOT_ALLOWED };

static __always_inline int count(enum verdict v)
{
    int zero = 0;
    struct xdp_stats *stats = XDP_STATS.lookup(&zero);
    if (stats) {
        if (v == DROP_DENY)
            stats->dropped_deny++;
        else if (v == DROP_NOT_ALLOWED)
            stats->dropped_not_allowed++;
        else
            stats->passed++;
    }
    return v == PASS ? XDP_PASS : XDP_DROP;
}

// Whether the packet is in scope: in "ports only" mode only TCP to a listed
// port is; a packet whose transport we cannot find stays in scope (fail closed).
static __always_inline int in_scope(struct xdp_config *cfg, int l4_known,
                                    u8 l4_proto, void *l4, void *data_end)
{
    if (!cfg->ports_only)
        return 1;
    if (!l4_known)
        return 1;
    if (l4_proto != IPPROTO_TCP)
        return 0;
    struct tcphdr *tcp = l4;
    if ((void *)(tcp + 1) > data_end)
        return 1;
    u16 port = bpf_ntohs(tcp->dest);
    return XDP_PORTS.lookup(&port) != NULL;
}

static __always_inline enum verdict decide(struct xdp_config *cfg, void *deny,
                                           void *allow)
{
    if (deny)
        return DROP_DENY;
    if (cfg->allow_list_active && !allow)
        return DROP_NOT_ALLOWED;
    return PASS;
}

static __always_inline int filter_v4(struct xdp_config *cfg, void *l3, void *data_end)
{
    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > data_end)
        return XDP_PASS;  // truncated: the stack drops it anyway
    // Non-first fragments carry no transport header.
    int l4_known = !(ip->frag_off & bpf_htons(0x1fff));
    void *l4 = l3 + ip->ihl * 4;
    if (!in_scope(cfg, l4_known, ip->protocol, l4, data_end))
        return count(PASS);

    struct lpm_v4_key key = {.prefixlen = 32};
    __builtin_memcpy(key.addr, &ip->saddr, sizeof(key.addr));
    return count(decide(cfg, ACCESS_DENY_V4.lookup(&key), ACCESS_ALLOW_V4.lookup(&key)));
}

static __always_inline int is_ipv6_extension(u8 nexthdr)
{
    return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
           nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT;
}

static __always_inline int filter_v6(struct xdp_config *cfg, void *l3, void *data_end)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > data_end)
        return XDP_PASS;

    u8 nexthdr = ip6->nexthdr;
    void *l4 = ip6 + 1;
    #pragma unroll
    for (int i = 0; i < IPV6_EXT_HEADERS_MAX; i++) {
        if (!is_ipv6_extension(nexthdr))
            break;
        u8 *ext = l4;
        if ((void *)(ext + 2) > data_end)
            break;
        // The fragment header has a fixed size; the others count 8-byte units.
        l4 += nexthdr == IPPROTO_FRAGMENT ? 8 : (ext[1] + 1) * 8;
        nexthdr = ext[0];
    }
    int l4_known = !is_ipv6_extension(nexthdr);

    if (l4_known && nexthdr == IPPROTO_ICMPV6) {
        struct icmp6hdr *icmp = l4;
        if ((void *)(icmp + 1) <= data_end &&
            icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137)
            return count(PASS);  // neighbour discovery: IPv6's ARP
    }
    if (!in_scope(cfg, l4_known, nexthdr, l4, data_end))
        return count(PASS);

    struct lpm_v6_key key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, &ip6->saddr, sizeof(key.addr));
    return count(decide(cfg, ACCESS_DENY_V6.lookup(&key), ACCESS_ALLOW_V6.lookup(&key)));
}

int xdp_ip_filter(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    u16 proto = eth->h_proto;
    void *l3 = eth + 1;
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
        struct vlan_header *vlan = l3;
        if ((void *)(vlan + 1) > data_end)
            return XDP_PASS;
        proto = vlan->encapsulated_proto;
        l3 = vlan + 1;
    }

    int zero = 0;
    struct xdp_config *cfg = XDP_CONFIG.lookup(&zero);
    if (!cfg)
        return XDP_PASS;
    if (proto == bpf_htons(ETH_P_IP))
        return filter_v4(cfg, l3, data_end);
    if (proto == bpf_htons(ETH_P_IPV6))
        return filter_v6(cfg, l3, data_end);
    return count(PASS);  // ARP and every other non-IP protocol
}
