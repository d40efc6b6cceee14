// Kernel relay: every skb received on a registered socket goes straight out of
// its peer (SK_SKB stream verdict -> egress redirect), never through userspace.
//
// Userspace registers a pair (see sniproxy/kernel_relay.py) by writing
// CONNECTION_MAP both ways, inserting both sockets into SOCK_TARGETS (no
// programs), and only then into SOCK_MAP (which runs relay_verdict). The
// verdict falls back to SOCK_TARGETS, so a redirect target always exists by
// the time any verdict runs: a redirect to a missing socket drops bytes that
// were already ACKed.
#include <uapi/linux/bpf.h>

#ifndef SOCK_MAP_MAX
#define SOCK_MAP_MAX 65536
#endif
#ifndef CONNECTION_MAP_MAX
#define CONNECTION_MAP_MAX 65536
#endif

// BCC's BPF_SOCKHASH declares an int value; the kernel only returns the socket
// cookie on lookup when the value is 8 bytes, so the table is declared here in
// the same form with a u64 leaf (keeping .sk_redirect_hash()).
#define SOCKHASH_BY_COOKIE(_name, _max_entries)                 \
    struct _name##_table_t {                                    \
        u64 key;                                                \
        u64 leaf;                                               \
        int (*update)(u64 *, u64 *);                            \
        int (*delete)(u64 *);                                   \
        int (*sock_hash_update)(void *, void *, u64);           \
        int (*msg_redirect_hash)(void *, void *, u64);          \
        int (*sk_redirect_hash)(void *, void *, u64);           \
        u32 max_entries;                                        \
    };                                                          \
    __attribute__((section("maps/sockhash")))                   \
    struct _name##_table_t _name = {.max_entries = (_max_entries)}; \
    BPF_ANNOTATE_KV_PAIR(_name, u64, u64)

// Socket cookie -> socket. relay_verdict is attached here.
SOCKHASH_BY_COOKIE(SOCK_MAP, SOCK_MAP_MAX);
// The same sockets, without programs: the redirect targets.
SOCKHASH_BY_COOKIE(SOCK_TARGETS, SOCK_MAP_MAX);

// Which way a socket's received bytes travel; set by userspace at registration.
enum relay_direction { DIRECTION_UP = 1, DIRECTION_DOWN = 2 };  // client->upstream, upstream->client
struct connection {
    u64 peer;      // cookie of the socket this one's bytes go to
    u64 bytes;     // received on this socket and redirected to the peer
    u64 skbs;
    u64 passed;    // received while paused: kept on this socket for userspace
    u32 direction;
    u32 next_seq;  // TCP sequence number of the next new byte (once SEQ_KNOWN)
    u64 trimmed;   // bytes received twice, cut off (see trim_old_bytes)
    u32 flags;     // CONNECTION_SEQ_KNOWN | CONNECTION_BROKEN
};
enum connection_flags { CONNECTION_SEQ_KNOWN = 1, CONNECTION_BROKEN = 2 };
BPF_HASH(CONNECTION_MAP, u64, struct connection, CONNECTION_MAP_MAX);

// Backpressure toward a slow reader. Written by userspace only (the verdict
// only reads it), so no update of one side overwrites the other's counters.
// No entry: relay. PAUSED: keep this socket's bytes on it (charged to its
// receive buffer, so TCP's window closes). RESUMING: keep them until userspace
// has forwarded every byte kept so far, then relay again; from that moment
// passed == forwarded, so the order of bytes never changes.
enum relay_mode { MODE_PAUSED = 1, MODE_RESUMING = 2 };
struct relay_control {
    u32 mode;
    u32 pad;
    u64 forwarded;  // of the kept bytes, how many userspace has sent to the peer
};
BPF_HASH(RELAY_CONTROL, u64, struct relay_control, CONNECTION_MAP_MAX);

struct relay_stats {
    u64 relayed_bytes;  // both directions
    u64 relayed_skbs;
    u64 redirect_failures;
    u64 up_bytes;       // client -> upstream
    u64 down_bytes;     // upstream -> client
    u64 trimmed_bytes;  // received twice and cut off (see trim_old_bytes)
    u64 trim_failures;  // skbs that could not be cut: their pair is reset
};
BPF_PERCPU_ARRAY(RELAY_STATS, struct relay_stats, 1);

// Offsets into the kernel's own structs, read from its BTF by the loader
// (bpfload.py): the verdict reads an skb's TCP sequence number, which
// struct __sk_buff does not carry.
#if !defined(SKB_SK_OFFSET) || !defined(SKB_CB_OFFSET) || !defined(TCP_SKB_CB_SEQ_OFFSET) || \
    !defined(TCP_COPIED_SEQ_OFFSET)
#error "the loader passes the kernel struct offsets as -D flags"
#endif
#define ROOM_STEP 4095          // the most bpf_skb_adjust_room cuts at once (sk_skb)
#define MAX_TRIM_STEPS 128     // unrolled: at most ~512 KiB of old bytes in one skb

static __always_inline u64 read_kernel(u64 address, u32 size)
{
    u64 value = 0;
    bpf_probe_read_kernel(&value, size, (void *)address);
    return value;
}

// TCP queues a retransmitted segment that starts before bytes it already
// received (seq < rcv_nxt) whole; recvmsg() skips the old part by copied_seq,
// but the verdict gets whole skbs (tcp_read_skb) and would send the old part
// again. Measured: one transfer in a few thousand came out with a stretch
// repeated. Cut the old bytes off the front; 0 when none, the bytes cut, or
// -1 when they could not be cut.
static __always_inline s64 trim_old_bytes(struct __sk_buff *skb, struct connection *conn)
{
    u64 kernel_skb = (u64)skb;   // the ctx is the kernel's struct sk_buff
    u32 seq = read_kernel(kernel_skb + SKB_CB_OFFSET + TCP_SKB_CB_SEQ_OFFSET, 4);
    u32 expected = conn->next_seq;
    if (!(conn->flags & CONNECTION_SEQ_KNOWN)) {
        // The first skb since registration: everything before copied_seq was
        // read by userspace, and no verdict has consumed anything yet.
        u64 sk = read_kernel(kernel_skb + SKB_SK_OFFSET, 8);
        expected = read_kernel(sk + TCP_COPIED_SEQ_OFFSET, 4);
    }
    u32 len = skb->len;
    s32 old = (s32)(expected - seq);
    conn->next_seq = seq + len;
    conn->flags |= CONNECTION_SEQ_KNOWN;
    if (old <= 0)
        return 0;
    if ((u32)old >= len)
        return -1;   // TCP never queues a segment with no new byte
    u32 left = old;
#pragma unroll
    for (int i = 0; i < MAX_TRIM_STEPS; i++) {
        if (left == 0)
            break;
        u32 step = left > ROOM_STEP ? ROOM_STEP : left;
        if (bpf_skb_adjust_room(skb, -(s32)step, 0, 0))
            return -1;
        left -= step;
    }
    return left ? -1 : old;
}

int relay_verdict(struct __sk_buff *skb)
{
    // The skb that carries a FIN may be empty. Redirected, its empty send
    // counts as a broken pipe: the peer gets EPIPE and its psock stops
    // sending. Userspace carries the FIN itself (shutdown), so drop it.
    if (skb->len == 0)
        return SK_DROP;

    u64 cookie = bpf_get_socket_cookie(skb);
    int zero = 0;
    struct relay_stats *stats = RELAY_STATS.lookup(&zero);
    struct connection *conn = CONNECTION_MAP.lookup(&cookie);
    struct relay_control *control = RELAY_CONTROL.lookup(&cookie);
    if (conn) {
        s64 cut = trim_old_bytes(skb, conn);
        if (cut < 0) {
            // Neither the old bytes twice nor none of the new: userspace
            // sees the flag and resets the pair.
            conn->flags |= CONNECTION_BROKEN;
            if (stats)
                stats->trim_failures++;
            return SK_DROP;
        }
        conn->trimmed += cut;
        if (stats)
            stats->trimmed_bytes += cut;
    }
    if (conn && control &&
        (control->mode == MODE_PAUSED || conn->passed != control->forwarded)) {
        conn->passed += skb->len;
        return SK_PASS;
    }
    if (conn) {
        u64 peer = conn->peer;
        // The peer is normally in SOCK_MAP too; during registration it may be
        // only in SOCK_TARGETS.
        if (SOCK_MAP.sk_redirect_hash(skb, &peer, 0) == SK_PASS ||
            SOCK_TARGETS.sk_redirect_hash(skb, &peer, 0) == SK_PASS) {
            // The verdict of one socket never runs concurrently with itself
            // (socket lock or softirq), so plain adds are exact.
            conn->bytes += skb->len;
            conn->skbs++;
            if (stats) {
                stats->relayed_bytes += skb->len;
                stats->relayed_skbs++;
                if (conn->direction == DIRECTION_DOWN)
                    stats->down_bytes += skb->len;
                else
                    stats->up_bytes += skb->len;
            }
            return SK_PASS;
        }
    }
    // No pair or no peer: keep the bytes on this socket (readable by
    // userspace) rather than drop bytes the sender already saw ACKed.
    if (stats)
        stats->redirect_failures++;
    return SK_PASS;
}
