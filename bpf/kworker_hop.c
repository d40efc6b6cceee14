/* For bench/kworker_hop: the relay verdict redirects an skb to its peer by queueing
 * it on the peer's psock and scheduling psock->work; a kworker then runs
 * sk_psock_backlog, which sends it. This measures how long that work waits once
 * queued (the wakeup the design pays per message) and how long it then runs.
 * SK_PSOCK_BACKLOG is the function's address, from /proc/kallsyms, as a signed value;
 * BUCKETS the histogram's length per phase: whole microseconds, the last one for
 * that many or more. Both come from the tool. */
#define IS_BACKLOG(function) ((u64)(function) == (u64)SK_PSOCK_BACKLOG)

enum phase { WAITING, RUNNING };
struct since_key {
    u64 work;
    u32 phase;
    u32 zero;   /* named, so the key has no padding for the stack to fill with garbage */
};

BPF_HASH(SINCE, struct since_key, u64, 65536);   /* when the work entered the phase */
BPF_HISTOGRAM(MICROSECONDS, int, 2 * BUCKETS);    /* phase * BUCKETS + whole microseconds */

static __always_inline void enter(u64 work, u32 phase, u64 now)
{
    struct since_key key = {.work = work, .phase = phase};
    SINCE.update(&key, &now);
}

static __always_inline void leave(u64 work, u32 phase, u64 now)
{
    struct since_key key = {.work = work, .phase = phase};
    u64 *since = SINCE.lookup(&key);
    if (!since)
        return;
    u64 us = (now - *since) / 1000;
    MICROSECONDS.increment(phase * BUCKETS + (us < BUCKETS - 1 ? us : BUCKETS - 1));
    SINCE.delete(&key);
}

TRACEPOINT_PROBE(workqueue, workqueue_queue_work)
{
    if (IS_BACKLOG(args->function))
        enter((u64)args->work, WAITING, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(workqueue, workqueue_execute_start)
{
    if (IS_BACKLOG(args->function)) {
        u64 now = bpf_ktime_get_ns();
        leave((u64)args->work, WAITING, now);
        enter((u64)args->work, RUNNING, now);
    }
    return 0;
}

TRACEPOINT_PROBE(workqueue, workqueue_execute_end)
{
    if (IS_BACKLOG(args->function))
        leave((u64)args->work, RUNNING, bpf_ktime_get_ns());
    return 0;
}
