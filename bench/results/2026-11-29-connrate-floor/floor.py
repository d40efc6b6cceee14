# For NOTES.md: the least a gevent worker can do per connection. One process accepts on PORT, reads
# the first flight (it has arrived with the accept), connects to 127.0.0.1:BACKEND_PORT, sends it
# on, and relays with one io watcher per direction until both ends close; no parsing, routing,
# limits, counters or log. argv: PORT BACKEND_PORT ["timer": one idle timer per pair as well, or
# "c": the relay in the proxy's C pairs, sniproxy/copypair.c, for ../2026-11-29-setup-floor].
import _socket
import socket
import sys
from pathlib import Path

import gevent
port, bport = int(sys.argv[1]), int(sys.argv[2])
use_timer = sys.argv[3:] == ["timer"]
loop = gevent.get_hub().loop
BUF = bytearray(256 * 1024)
MV = memoryview(BUF)
D = socket.MSG_DONTWAIT

class Dir:
    __slots__ = ("src", "dst", "w", "eof", "pair")
    def __call__(self):
        src, dst = self.src, self.dst
        while True:
            try:
                n = src.recv_into(BUF, 0, D)
            except BlockingIOError:
                return
            except OSError:
                return self.pair.end()
            if not n:
                self.eof = True
                self.w.close(); self.w = None
                try: dst.shutdown(socket.SHUT_WR)
                except OSError: pass
                if self.pair.a.eof and self.pair.b.eof:
                    self.pair.end()
                return
            dst.send(MV[:n], D)   # floor: assume it fits
            if n < len(BUF):
                return

class Pair:
    __slots__ = ("a", "b", "c", "u", "t")
    def __init__(self, c, u):
        self.c, self.u = c, u
        self.a, self.b = Dir(), Dir()
        for d, s, t in ((self.a, c, u), (self.b, u, c)):
            d.src, d.dst, d.eof, d.pair = s, t, False, self
            d.w = loop.io(s.fileno(), 1)
            d.w.start(d)
        self.t = None
        if use_timer:
            self.t = loop.timer(600.0)
            self.t.start(self.end)
    def end(self):
        for d in (self.a, self.b):
            if d.w is not None:
                d.w.close(); d.w = None
            d.pair = None
        if self.t is not None:
            self.t.close()
        self.c.close(); self.u.close()

if sys.argv[3:] == ["c"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from sniproxy import copypair
    from sniproxy.relay import RelayResult
    copier = copypair.Copier(loop.ptr, sys.modules[type(loop).__module__].__file__, len(BUF), set(), RelayResult,
                             "userspace")

    def Pair(c, u):   # noqa: F811 - this mode's pairs
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
