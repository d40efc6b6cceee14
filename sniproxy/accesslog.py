"""The access log: one line per connection, written when it closes."""
from __future__ import annotations

import sys
import time


class AccessLog:
    FIELDS = ("client", "listener", "name", "alpn", "backend", "up", "down", "duration", "relay", "outcome")

    def __init__(self, path: str):
        self.path = path          # "-" = stderr, "" = off
        self._file = None
        self._second, self._stamp = -1, ""
        self.reopen()

    def reopen(self) -> None:
        """On SIGUSR1, after the log was rotated away."""
        if self._file not in (None, sys.stderr):
            self._file.close()
        self._file = sys.stderr if self.path == "-" else open(self.path, "a", buffering=1) if self.path else None

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        second = int(time.time())
        if second != self._second:   # formatted once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields = " ".join([f"{k}={_fmt(record.get(k, '-'))}" for k in self.FIELDS])
        self._file.write(f"{self._stamp} {fields}\n")
        if self._file is sys.stderr:
            self._file.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    # Names come from clients (SNI, Host, ALPN): one field, one line, whatever they sent.
    if text.isascii() and text.isprintable() and " " not in text and "\\" not in text:
        return text or "-"   # all but hostile ones, found with no Python loop
    if text.isascii():
        return text.translate(_ESCAPE)
    return "".join(_ESCAPE.get(ord(ch)) or (ch if ch.isascii() else f"\\x{ord(ch):02x}") for ch in text)


# Control characters and DEL as \xNN, the space as _ and the backslash doubled.
_ESCAPE = {**{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f)}, ord(" "): "_", ord("\\"): "\\\\"}
