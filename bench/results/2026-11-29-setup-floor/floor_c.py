# For NOTES.md: ../2026-11-29-connrate-floor/floor.py (the least a gevent worker can do per
# connection: accept, read the first flight, connect, send it on, relay until both ends close;
# no parsing, routing, limits, counters or log), with its relay in the proxy's C pairs
# (sniproxy/copypair.c) instead of Python watchers: what is left is the setup in Python at its
# least. argv: PORT BACKEND_PORT.
import _socket
import socket
import sys
from pathlib import Path

import gevent
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sniproxy import copypair  # noqa: E402
from sniproxy.relay import RelayResult  # noqa: E402
port, bport = int(sys.argv[1]), int(sys.argv[2])
loop = gevent.get_hub().loop
D = socket.MSG_DONTWAIT
core = sys.modules[type(loop).__module__]
live = set()
copier = copypair.Copier(loop.ptr, core.__file__, 256 * 1024, live, RelayResult, "userspace")


def Pair(c, u):
    copier.pair(c.fileno(), u.fileno(), 600.0, None, None, lambda result: (c.close(), u.close()))


def serve(c):
    try:
        data = c.recv(16384, D)
    except BlockingIOError:
        w = loop.io(c.fileno(), 1)
        def ready():
            w.close(); serve(c)
        w.start(ready)
        return
    u = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    u.connect_ex(("127.0.0.1", bport))
    u.send(data, D)
    Pair(c, u)

L = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
L.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
L.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
L.bind(("127.0.0.1", port)); L.listen(4096); L.setblocking(False)

def on_accept():
    while True:
        try:
            fd, peer = L._accept()
        except BlockingIOError:
            return
        serve(_socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd))
aw = loop.io(L.fileno(), 1)
aw.start(on_accept)
gevent.wait()
