// steer_connection: which worker's listening socket takes a new connection
// (SK_REUSEPORT, attached to each listener's SO_REUSEPORT group by the master).
//
// The kernel's hash spreads connections evenly over the workers whatever their
// load. On a busy machine a Python worker pays for every wakeup, and two half-busy
// workers cost more than one busy one. So a connection goes to the lowest worker
// slot that keeps up: at most `backlog` connections steered to it and not yet
// accepted when this one comes, and at most `margin` connections above the least
// loaded worker (connections it serves; pairs parked in the kernel cost it nothing),
// so that long-lived connections still spread. Where none keeps up, the kernel's
// hash picks. bpf.steering = "hash" detaches the program.
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

// Set by the loader from kernel_abi.py: listeners past the first STEER_LISTENERS_MAX
// are hashed, and so is every connection when there are more workers than slots.
#ifndef STEER_LISTENERS_MAX
#define STEER_LISTENERS_MAX 16
#endif
#ifndef STEER_WORKERS_MAX
#define STEER_WORKERS_MAX 64
#endif

// One worker slot. The program adds to `steered`; the slot's worker writes the
// rest through an mmap of the map (no system call per connection), and corrects
// `accepted` from its listening socket's queue once a second (steering.py).
struct steer_slot {
    u64 live;                              // connections the worker holds
    u64 steered[STEER_LISTENERS_MAX];      // sent to its socket of each listener
    u64 accepted[STEER_LISTENERS_MAX];     // ... and accepted by it
};
BPF_F_TABLE("array", u32, struct steer_slot, STEER_SLOTS, STEER_WORKERS_MAX, BPF_F_MMAPABLE);

struct steer_config {
    u32 workers;    // slots in use (master.workers, at most STEER_WORKERS_MAX)
    u32 backlog;    // bpf.steering_backlog
    u32 margin;     // bpf.steering_margin
    u32 pad;
};
BPF_ARRAY(STEER_CONFIG, struct steer_config, 1);

// A listening socket's own address, as struct bpf_sock shows it -> the listener's index.
struct steer_address {
    u32 family;
    u32 port;       // host order
    u32 ip[4];      // network order; IPv4 in ip[0]
};
BPF_HASH(STEER_LISTENERS, struct steer_address, u32, STEER_LISTENERS_MAX);

// listener index * STEER_WORKERS_MAX + slot -> that slot's listening socket. BCC
// has no table method for bpf_sk_select_reuseport(); it turns .call(ctx, index)
// into bpf_tail_call_(map, ctx, index), which is pointed at the helper here.
struct STEER_SOCKETS_table_t {
    u32 key;
    u32 leaf;
    int (*update)(u32 *, u32 *);
    int (*call)(void *, int);
    u32 max_entries;
};
__attribute__((section("maps/sockmap")))
struct STEER_SOCKETS_table_t STEER_SOCKETS = {.max_entries = STEER_LISTENERS_MAX * STEER_WORKERS_MAX};
BPF_ANNOTATE_KV_PAIR(STEER_SOCKETS, u32, u32);
#define bpf_tail_call_(map, ctx_, index) \
    ({ u32 key_ = (index); bpf_sk_select_reuseport(ctx_, map, &key_, 0); })

int steer_connection(struct sk_reuseport_md *ctx)
{
    struct bpf_sock *sk = ctx->sk;      // the group's listener the lookup found
    u32 zero = 0;
    struct steer_config *cfg = STEER_CONFIG.lookup(&zero);
    if (!sk || !cfg)
        return SK_PASS;
    struct steer_address address = {.family = sk->family, .port = sk->src_port};
    if (sk->family == AF_INET) {
        address.ip[0] = sk->src_ip4;
    } else {
        address.ip[0] = sk->src_ip6[0];
        address.ip[1] = sk->src_ip6[1];
        address.ip[2] = sk->src_ip6[2];
        address.ip[3] = sk->src_ip6[3];
    }
    u32 *found = STEER_LISTENERS.lookup(&address);
    if (!found || *found >= STEER_LISTENERS_MAX)
        return SK_PASS;                 // not steered: the kernel's hash picks
    u32 listener = *found;
    u32 workers = cfg->workers;    // unclamped: each loop keeps its own constant bound

    struct steer_slot *first = STEER_SLOTS.lookup(&zero);
    if (!first)
        return SK_PASS;
    u64 least = first->live;
    for (u32 i = 1; i < STEER_WORKERS_MAX; i++) {
        if (i >= workers)
            break;
        u32 key = i;    // a copy: the counter itself stays in a register the verifier tracks
        struct steer_slot *s = STEER_SLOTS.lookup(&key);
        if (s && s->live < least)
            least = s->live;
    }
    for (u32 i = 0; i < STEER_WORKERS_MAX; i++) {
        if (i >= workers)
            break;
        u32 key = i;
        struct steer_slot *s = STEER_SLOTS.lookup(&key);
        // Signed: a correction counts handshakes not yet queued (TCP_DEFER_ACCEPT) as accepted.
        if (!s || (s64)(s->steered[listener] - s->accepted[listener]) > (s64)cfg->backlog ||
                s->live > least + cfg->margin)
            continue;
        if (STEER_SOCKETS.call(ctx, listener * STEER_WORKERS_MAX + i) == 0)
            __sync_fetch_and_add(&s->steered[listener], 1);
        return SK_PASS;                 // else its socket is not there (a reload in progress): hashed
    }
    return SK_PASS;
}
