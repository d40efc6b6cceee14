# Scratch A/B for NOTES.md (run with the project's .venv python: ROUNDS POLICY BACKLOGS, e.g. 7 auto 0,4).
# Connection rate with 2 workers: reuseport's hash against a SK_REUSEPORT program that sends each new
# connection to one preferred worker while its accept queue holds at most BACKLOG connections, and to
# the other worker otherwise.
import os, sys, runpy, subprocess, ctypes, socket, re
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import origins, measure
from bench.systems import Sniproxy, Haproxy
from sniproxy import kernel_btf
from bcc import BPF
cr = runpy.run_path(str(REPO / "bench" / "connrate"), run_name="connrate")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
policy = sys.argv[2] if len(sys.argv) > 2 else "copy"
backlogs = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0").split(",")]
libc = ctypes.CDLL(None, use_errno=True)
SO_ATTACH_REUSEPORT_EBPF = 52
OFF = kernel_btf.Btf(open(kernel_btf.VMLINUX_BTF, "rb").read()).offset("sock", "sk_ack_backlog")

def listening_fd(pid, port):
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    fds = [int(m) for line in out.splitlines() for m in re.findall(rf"pid={pid},fd=(\d+)", line)]
    assert len(fds) == 1, (pid, port, out)
    pidfd = os.pidfd_open(pid)
    local = libc.syscall(438, pidfd, fds[0], 0)
    assert local >= 0, ctypes.get_errno()
    os.close(pidfd)
    return local

keep = []
def steer(system, backlog):
    port = system.address("tls")[1]
    workers = sorted(pid for pid in system.pids() if pid != system._proc.pid)
    print(system.name, "workers", workers, "port", port, file=sys.stderr)
    return attach([listening_fd(pid, port) for pid in workers], backlog)

def attach(fds, backlog):
    workers = fds
    maps = BPF(text="BPF_SOCKMAP(LISTEN, 8); BPF_ARRAY(PICKS, u64, 8); BPF_HASH(COOKIES, u64, u32, 16);")
    keep.append(maps)
    from bcc import libbcc
    from sniproxy.bpfsys import PinnedMap
    fd_of = lambda n: libbcc.lib.bpf_table_fd(maps.module, n.encode())
    lfd, pfd, cfd = fd_of("LISTEN"), fd_of("PICKS"), fd_of("COOKIES")
    lmap, pmap, cmap = PinnedMap(lfd, "LISTEN"), PinnedMap(pfd, "PICKS"), PinnedMap(cfd, "COOKIES")
    text = f"""
#include <uapi/linux/bpf.h>
#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))
// ctx->sk is the group's first listener (the lookup's), always the same one: the
// preferred worker's. New connections go to it while its accept queue is short.
int steer(struct sk_reuseport_md *ctx) {{
    struct bpf_sock *first = ctx->sk;
    if (!first) return SK_PASS;
    u64 cookie = bpf_get_socket_cookie(first);
    u32 *idx = bpf_map_lookup_elem(MAP({cfd}), &cookie);
    if (!idx) return SK_PASS;
    u32 key = *idx;
    u64 where = 0;
    u32 queued = 0;
    bpf_probe_read_kernel(&where, sizeof(where), &first);
    bpf_probe_read_kernel(&queued, sizeof(queued), (void *)(where + {OFF}));
    if (queued > {backlog})
        key = (key + 1) % {len(workers)};
    if (bpf_sk_select_reuseport(ctx, MAP({lfd}), &key, 0) == 0) {{
        u64 *n = bpf_map_lookup_elem(MAP({pfd}), &key);
        if (n) __sync_fetch_and_add(n, 1);
    }}
    return SK_PASS;
}}"""
    b = BPF(text=text)
    keep.append(b)
    fn = b.load_func("steer", 21)
    socks = []
    for i, fd in enumerate(fds):
        lmap.update(i.to_bytes(4, "little"), fd.to_bytes(4, "little"))
        cookie = socket.socket(fileno=os.dup(fd))
        c = cookie.getsockopt(socket.SOL_SOCKET, 57, 8); cookie.close()
        cmap.update(c, i.to_bytes(4, "little"))
        socks.append(fd)
    s = socket.socket(fileno=os.dup(socks[0]))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, fn.fd)
    s.detach()
    return pmap

if __name__ == '__main__':
  with origins.running("steer-") as (workdir, backends):
      a = Sniproxy(backends, workdir, policy)
      steered = []
      for bl in backlogs:
          x = Sniproxy(backends, workdir, policy); x.name = f"sniproxy-{policy}-steer{bl}"
          steered.append((x, bl))
      h = Haproxy(backends, workdir, 4096)
      systems = [a, *(x for x, _ in steered), h]
      try:
          for s in systems:
              s.start(2)
          pickmaps = [(x.name, steer(x, bl)) for x, bl in steered]
          runs = cr["measure_rounds"](systems, 3, rounds)
          for name, m in pickmaps:
              print(name, "picks", {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in m.items() if int.from_bytes(v, "little")}, file=sys.stderr)
      finally:
          for s in systems:
              s.stop()
  print("\n".join(measure.machine()))
  cr["print_table"](runs)
