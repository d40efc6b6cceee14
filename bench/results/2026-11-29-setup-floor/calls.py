# For NOTES.md (run with the project's .venv python: [CONNECTIONS [TREE]]). The calls a worker makes for
# one connection, from accept to the end of its relay, counted with sys.setprofile: Python
# functions by name, and calls into C (builtins and methods) by name. The worker's own parts,
# built as worker.py builds them (relay.policy = "auto", no BPF), in this process: a client and
# a backend in the same hub send a captured ClientHello and answer 3,000 bytes. Their gevent
# code (the loop here too) and this script's own are left out.
import collections
import pathlib
import socket
import sys
import tempfile
import time
from types import SimpleNamespace

# TREE, the second argument: the package in TREE/sniproxy instead of this checkout's.
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else str(pathlib.Path(__file__).resolve().parents[3]))
# Made before gevent patches the socket module, as the master makes its listening sockets.
listening = socket.socket()
listening.bind(("127.0.0.1", 0))
listening.listen(128)
listening.setblocking(False)
port = listening.getsockname()[1]
from gevent import monkey  # noqa: E402
monkey.patch_all(thread=False, signal=False, subprocess=False)
import gevent  # noqa: E402
from sniproxy import config
from sniproxy.worker import Worker
from sniproxy.accesslog import AccessLog
from sniproxy.connection import Connection, Context
from sniproxy.counters import CounterTable
from sniproxy.relay import Limits
HELLO = (pathlib.Path(__file__).resolve().parents[3] / "tests/fixtures/hellos/curl.bin").read_bytes()
backend = socket.socket()
backend.bind(("127.0.0.1", 0))
backend.listen(128)


def serve():
    while True:
        c, _ = backend.accept()
        gevent.spawn(lambda c: (c.recv(65536), c.sendall(b"x" * 3000), c.close()), c)


gevent.spawn(serve)
cfg = config.load(text=f'[[listener]]\naddress = "127.0.0.1:{port}"\nprotocol = "tls"\n'
                  f'[[table.default]]\nmatch = "curl.example.test"\nbackend = "127.0.0.1:{backend.getsockname()[1]}"\n'
                  '[log]\naccess = ""\n')
w = Worker.__new__(Worker)
w.cfg, w.relay_kind, w.bpf_pins, w.keeper, w.alive, w.held, w.kernel, w.steering = cfg, "userspace", None, None, True, False, None, None
w.slot = SimpleNamespace(listeners=[])
w.number, w.freed, w.connections, w.handing_over = 0, 0, set(), False
w.loop = gevent.get_hub().loop
tmp = tempfile.mkdtemp()
w.counters = CounterTable(tmp + "/c", create=True).row(0)
w.access_log = AccessLog("")
w.Connection = Connection
w.relay = w._open_relay(w.counters)
w.ctx = Context(loop=w.loop, counters=w.counters, source_filter=w._source_filter(), trusted=w._trusted(),
                router=w._router(), resolver=w._resolver(), relay=w.relay, timeouts=cfg.timeouts,
                limits=Limits(cfg.timeouts.idle, cfg.timeouts.half_closed), allow_private=False,
                access_log=w.access_log, ended=w.connection_ended,
                listener_slots={lc.address: i for i, lc in enumerate(cfg.listener)})
lc = cfg.listener[0]
w.families = {lc.address: int(listening.family)}   # worker.py from 2026-11-29 on


def one():
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(HELLO)
    gevent.sleep(0.002)
    return c


calls = collections.Counter()


def prof(frame, event, arg):
    fn = frame.f_code.co_filename
    if "gevent" in fn or fn == __file__:   # the client, the backend and the loop here
        return
    if event == "call":
        calls[f"{frame.f_code.co_name} ({pathlib.Path(frame.f_code.co_filename).name})"] += 1
    elif event == "c_call":
        calls["C: " + getattr(arg, "__qualname__", str(arg))] += 1


N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
clients = []
for i in range(N + 5):
    c = one()
    if i >= 5:
        sys.setprofile(prof)
        w.loop.run_callback(sys.setprofile, prof)   # and in the hub, where the relay ends
        gevent.sleep(0)
    w._accept_all(lc, listening, None)
    # let the relay run to its end
    deadline = time.monotonic() + 2
    while w.connections and time.monotonic() < deadline:
        c.recv(65536)
        c.close()
        gevent.sleep(0.002)
    sys.setprofile(None)
    w.loop.run_callback(sys.setprofile, None)
    gevent.sleep(0)
    clients.append(c)
py = {k: v for k, v in calls.items() if not k.startswith("C: ")}
cc = {k: v for k, v in calls.items() if k.startswith("C: ")}
print(f"per connection: {sum(py.values())/N:.1f} Python calls, {sum(cc.values())/N:.1f} calls into C (builtins/methods)")
for k, v in sorted(py.items(), key=lambda kv: -kv[1])[:45]:
    print(f"  {v/N:5.1f}  {k}")
print("C:")
for k, v in sorted(cc.items(), key=lambda kv: -kv[1])[:30]:
    print(f"  {v/N:5.1f}  {k}")
