// DNS_CACHE: resolved backend addresses shared by every worker through the
// pinned map. Userspace reads and writes it; no program looks at it.
//
// Key: BLAKE2b with an 8-byte digest over the lower-cased name (u64, host order).
// The name itself is kept in the value to reject hash collisions.
#include <uapi/linux/bpf.h>

#ifndef DNS_CACHE_SIZE
#define DNS_CACHE_SIZE 65536
#endif
#define DNS_NAME_MAX 128
#define DNS_ADDRS_PER_FAMILY 4

struct dns_entry {
    char name[DNS_NAME_MAX];    // lower-cased, NUL-padded, truncated
    u64 expires_boottime_ns;    // CLOCK_BOOTTIME: the same in every process
    u8 v4_count;
    u8 v6_count;
    u8 v6_first;                // the resolver listed IPv6 before IPv4
    u8 pad[5];
    u8 v4[DNS_ADDRS_PER_FAMILY][4];
    u8 v6[DNS_ADDRS_PER_FAMILY][16];
};

BPF_TABLE("lru_hash", u64, struct dns_entry, DNS_CACHE, DNS_CACHE_SIZE);

// BCC emits BTF (so `bpftool map dump` names the fields) only for a module
// that has at least one function; a map-only file gets a BTF-less map. The
// loader never loads functions named btf_anchor_*.
int btf_anchor_dns_cache(struct __sk_buff *skb)
{
    return 0;
}
