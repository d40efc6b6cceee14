# For NOTES.md (run as root with the project's .venv python: [TREE]). How often the proxy's workers
# call glibc's malloc_trim under the connection-rate load (h2load, 30,000 TLS connections, 16 at a
# time; two workers, relay.policy = "auto"), and how long each call takes: a BCC uprobe and
# uretprobe on libc's malloc_trim. TREE: run the package in TREE/sniproxy instead of this checkout.
import sys
import time
from pathlib import Path

from bcc import BPF

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import measure, origins, tools  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

PROGRAM = r"""
BPF_HASH(start, u32, u64);
BPF_HISTOGRAM(us);
BPF_ARRAY(total, u64, 2);   // calls, microseconds

int enter(void *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    start.update(&tid, &now);
    return 0;
}

int leave(void *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 *began = start.lookup(&tid);
    if (!began)
        return 0;
    u64 took = (bpf_ktime_get_ns() - *began) / 1000;
    us.increment(bpf_log2l(took));
    int calls = 0, micros = 1;
    u64 *n = total.lookup(&calls);
    if (n)
        __sync_fetch_and_add(n, 1);
    u64 *sum = total.lookup(&micros);
    if (sum)
        __sync_fetch_and_add(sum, took);
    start.delete(&tid);
    return 0;
}
"""

tree = Path(sys.argv[1]) if len(sys.argv) > 1 else None
bpf = BPF(text=PROGRAM)
bpf.attach_uprobe(name="c", sym="malloc_trim", fn_name="enter")
bpf.attach_uretprobe(name="c", sym="malloc_trim", fn_name="leave")
with origins.running("trim-latency-") as (workdir, backends):
    proxy = Sniproxy(backends, workdir, "auto", (tree.name, tree) if tree else None)
    proxy.start(2)
    try:
        time.sleep(2)
        calls0, micros0 = bpf["total"][0].value, bpf["total"][1].value
        began = time.monotonic()
        rate = tools.h2load_connections(proxy.address("tls"), 30000, 120)
        seconds = time.monotonic() - began
        calls, micros = bpf["total"][0].value - calls0, bpf["total"][1].value - micros0
    finally:
        proxy.stop()
print("\n".join(measure.machine()))
print(f"{proxy.name}: {rate:,.0f} conn/s over {seconds:.1f} s; malloc_trim during the load: {calls} calls, "
      f"{micros / max(calls, 1):,.0f} µs each on average, {micros / 1000:.1f} ms in all")
bpf["us"].print_log2_hist("µs")
