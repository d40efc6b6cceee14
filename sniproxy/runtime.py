"""Where a running master keeps its files, for the master and the other commands.

The pidfile names the master; beside it, with other suffixes, the workers'
shared counters, the state file that `status` and `stats` read, and the
daemon's log. All are derived from the config path unless master.pidfile is set.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config

RUN_DIR = Path("/run/sniproxy")


@dataclass(frozen=True)
class RuntimePaths:
    pidfile: Path

    @classmethod
    def of(cls, cfg: Config, config_path: str | None) -> "RuntimePaths":
        if cfg.master.pidfile:
            return cls(Path(cfg.master.pidfile))
        if config_path:
            real = os.path.realpath(config_path)
            digest = hashlib.sha1(real.encode()).hexdigest()[:8]
            return cls(RUN_DIR / f"{Path(real).stem}-{digest}.pid")
        return cls(RUN_DIR / "default.pid")

    @property
    def counters(self) -> Path:
        return self.pidfile.with_suffix(".counters")

    @property
    def state(self) -> Path:
        return self.pidfile.with_suffix(".state")

    @property
    def log(self) -> Path:
        return self.pidfile.with_suffix(".log")

    def running_pid(self) -> int | None:
        """The pid of the master that runs now, or None."""
        pid = read_pid(self.pidfile)
        return pid if pid and alive(pid) else None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
