"""The splice relay: bytes go from socket to pipe to socket with splice(2), by
reference to the kernel's pages, and are never copied into Python.

It drives pairs like the userspace relay (the same event-loop callbacks, limits,
half-close and handoff) and differs only in how a direction moves: through a
pipe, 1 MiB, from a pool. What the reader cannot take yet waits in the pipe. A
direction holds a pipe only while bytes are in it, as HAProxy does: an idle pair
holds none (two pipes a pair, four fds, would exhaust the file limit long before
the connections do). Never on a socket that is in a sockmap (PLATFORM: the two do
not mix). The pairs are the copy relay's, in C where copypair is built (there the
pipes and their pool are the Copier's), else in Python.
"""
from __future__ import annotations

import fcntl
import os
import struct
import termios

from .relay import Limits, OnDone
from .userspace_relay import UserspacePair, UserspaceRelay, _Direction

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def _queued(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class SpliceRelay(UserspaceRelay):
    kind = "splice"

    def __init__(self, pool_size: int = 64):
        self._pool: list[tuple[int, int]] = []   # empty pipes, for the next Python pairs
        self._pool_size = pool_size
        super().__init__(buffer_size=0, pipes=(PIPE_SIZE, pool_size))   # no buffer: the pipes hold the bytes
        self.read_size = PIPE_SIZE

    def start(self, client, upstream, limits: Limits, on_done: OnDone, handoff=None, before=None,
              record=None) -> UserspacePair:
        for sock in (client, upstream):
            # splice(2) follows the socket's own O_NONBLOCK, not SPLICE_F_NONBLOCK.
            sock.setblocking(False)
        return super().start(client, upstream, limits, on_done, handoff)   # the same pair, moved otherwise

    @staticmethod
    def _new_pipe() -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass   # above fs.pipe-max-size without CAP_SYS_RESOURCE: the default 64 KiB still works
        return r, w

    def _release(self, pair: UserspacePair) -> None:
        for d in (pair.up, pair.down):
            if d.pipe is not None:
                # A pair that ended on an error may have left bytes in it: they must
                # never reach another connection.
                self._give_back(d, empty=_queued(d.pipe[0]) == 0, ending=True)

    def _give_back(self, d: _Direction, empty: bool = True, ending: bool = False) -> None:
        """d's empty pipe goes back to the pool, if it has room. Else it stays with d while
        the pair lives (more busy pairs than the pool holds: no pipe made per read), and
        is closed at its end, as is a pipe with bytes left in it."""
        if empty and len(self._pool) < self._pool_size:
            self._pool.append(d.pipe)
        elif empty and not ending:
            return
        else:
            for fd in d.pipe:
                os.close(fd)
        d.pipe = None

    def _read(self, d: _Direction) -> int:
        if d.pipe is None:
            d.pipe = self._pool.pop() if self._pool else self._new_pipe()
        try:
            n = os.splice(d.src.fileno(), d.pipe[1], PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            self._give_back(d)      # nothing came: the pipe is as empty as it was taken
            raise
        if not n:
            self._give_back(d)      # the FIN
        return n

    def _forward(self, d: _Direction, n: int) -> bool:
        try:
            sent = os.splice(d.pipe[0], d.dst.fileno(), n, flags=_FLAGS)
        except BlockingIOError:
            sent = 0
        if sent < n:
            d.pending = n - sent    # waits in the pipe
            return False
        self._give_back(d)          # empty: the pipe holds exactly the n bytes just read
        return True

    def _flush(self, d: _Direction) -> None:
        d.pending = (d.pending - os.splice(d.pipe[0], d.dst.fileno(), d.pending, flags=_FLAGS)) or None
        if d.pending is None:
            self._give_back(d)

    @property
    def pooled(self) -> int:
        """Empty pipes kept for the next pairs."""
        return self._copier.pooled if self._copier is not None else len(self._pool)

    def close(self) -> None:
        if self._copier is not None:
            self._copier.close()
        for pipe in self._pool:
            for fd in pipe:
                os.close(fd)
        self._pool.clear()
        self._pool_size = 0   # pairs that end from now on close their pipes: none would close a pooled one
