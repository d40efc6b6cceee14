"""`sniproxy-master`: start, stop, reload, status, check, stats, maps."""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time

from . import config as config_mod
from .config import Config, ConfigError
from .runtime import RuntimePaths

START_WAIT = 120.0   # seconds `start` waits for every worker to boot (BPF compiles included)

EPILOG = """\
Without -c, the built-in default configuration is used (the same as etc/sniproxy.toml):
a TLS listener on 127.0.0.1:8443 that routes example.com to 127.0.0.1:9443.

Signals to the master: TERM/INT graceful stop, QUIT fast stop, HUP reload, USR1 reopen logs,
USR2 upgrade.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sniproxy-master",
        description="SNI-routing TLS passthrough proxy; the kernel relays the bytes (eBPF sockmap), "
                    "or userspace where BPF is not available.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, config_required: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("-c", "--config", metavar="FILE", required=config_required,
                       help="TOML config file" + ("" if config_required else " (default: the built-in config)"))
        return p

    start = command("start", "Start the master and its workers: in the background, returning once every "
                             "worker serves (or saying why not), unless --foreground.")
    start.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")
    command("stop", "Stop gracefully: stop accepting, let connections finish until master.graceful_timeout.")
    command("reload", "Reload the config (as SIGHUP): new routes for new connections; live ones go on.")
    command("upgrade", "Re-execute the master with the code now on disk (as SIGUSR2), keeping its pid, the "
            "listening sockets, the BPF pins and the kernel-relayed connections.")
    command("status", "Say whether the master runs, its workers and its relay kind.")
    command("check", "Validate the config only; print every error.", config_required=True)
    stats = command("stats", "Counters from the pinned BPF maps and the workers.")
    stats.add_argument("--json", action="store_true", help="print JSON")
    command("maps", "The pinned BPF objects, their types and entry counts.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s sniproxy[%(process)d] %(levelname)s %(message)s")
    try:
        cfg = config_mod.load(args.config) if args.config else config_mod.load()
    except ConfigError as e:
        for problem in e.problems:
            print(f"{e.source}: {problem}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot read config {args.config}: {e.strerror}", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(cfg.log.level.upper())
    try:
        return COMMANDS[args.command](cfg, args)
    except BrokenPipeError:
        # The reader went away (`stats | head`): no traceback, and nothing more to write.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def cmd_check(cfg: Config, args) -> int:
    print(f"{args.config}: ok ({len(cfg.listener)} listeners, {sum(map(len, cfg.table.values()))} routes)")
    return 0


def cmd_start(cfg: Config, args) -> int:
    from .master import Master, StartError
    os.umask(0o077)   # pins, state, counters and logs are the proxy's own: no other user reads them
    if args.foreground:
        try:
            return Master(cfg, args.config).run()
        except StartError as e:
            print(f"sniproxy-master: {e}", file=sys.stderr)
            return 1
    # Daemonize, but wait for the master to say it is serving (or why not).
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _detach_stdio(_daemon_log(cfg, args))
        code = 1
        try:
            code = Master(cfg, args.config, ready_fd=ready_w).run()
        except StartError:
            pass
        except Exception:  # noqa: BLE001 - the master's last word goes to its log
            logging.exception("master failed")
        finally:
            os._exit(code)
    os.close(ready_w)
    os.waitpid(child, 0)
    with os.fdopen(ready_r) as ready:
        # "ok" once every worker serves; a worker stuck in its boot is replaced, and would
        # keep this command waiting.
        answer = ready.readline().strip() if select.select([ready], [], [], START_WAIT)[0] else None
    log_path = _daemon_log(cfg, args)
    if answer == "ok":
        print(f"sniproxy-master: started; its log is {log_path}")
        return 0
    if answer is None:
        print(f"sniproxy-master: its workers have not all booted after {START_WAIT:.0f}s; it runs on, "
              f"see its log ({log_path})", file=sys.stderr)
    else:
        print(f"sniproxy-master: {answer.removeprefix('error: ') or 'the master exited during start'} "
              f"(its log: {log_path})", file=sys.stderr)
    return 1


def _paths(cfg: Config, args) -> RuntimePaths:
    return RuntimePaths.of(cfg, args.config)


def _daemon_log(cfg: Config, args):
    return _paths(cfg, args).log


def _detach_stdio(log_path) -> None:
    """A daemon keeps no terminal: stdin from /dev/null, stdout and stderr to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _master_pid(cfg: Config, args) -> int | None:
    return _paths(cfg, args).running_pid()


def _signal_master(cfg: Config, args, sig: int) -> int | None:
    """Send sig to the running master; its pid, or None (said) when none runs."""
    pid = _master_pid(cfg, args)
    if pid is None:
        print("sniproxy-master: not running", file=sys.stderr)
    else:
        os.kill(pid, sig)
    return pid


def cmd_stop(cfg: Config, args) -> int:
    pid = _signal_master(cfg, args, signal.SIGTERM)
    if pid is None:
        return 1
    deadline = time.monotonic() + cfg.master.graceful_timeout + 10
    while time.monotonic() < deadline:
        if _master_pid(cfg, args) is None:
            print("sniproxy-master: stopped")
            return 0
        time.sleep(0.1)
    print(f"sniproxy-master: pid {pid} still running after {cfg.master.graceful_timeout:.0f}s", file=sys.stderr)
    return 1


def _request(sig: int, what: str):
    """A command that signals the master and leaves it to carry on."""
    def command(cfg: Config, args) -> int:
        pid = _signal_master(cfg, args, sig)
        if pid is None:
            return 1
        print(f"sniproxy-master: {what} requested (pid {pid}); its log says when it is done")
        return 0
    return command


cmd_reload = _request(signal.SIGHUP, "reload")
cmd_upgrade = _request(signal.SIGUSR2, "upgrade")


def _state(cfg: Config, args) -> dict | None:
    if _master_pid(cfg, args) is None:
        return None
    try:
        return json.loads(_paths(cfg, args).state.read_text())
    except (OSError, ValueError):
        return None


def cmd_status(cfg: Config, args) -> int:
    state = _state(cfg, args)
    if state is None:
        print("sniproxy-master: not running")
        return 3
    pids = ", ".join(f"{w['index']}:{w['pid']}" for w in state["workers"])
    booting = "" if state.get("ready", True) else " (booting)"
    print(f"sniproxy-master: running, pid {state['pid']}, relay {state['relay']}, workers {pids}{booting}")
    for line in state.get("bpf", []):
        print(f"  {line}")
    return 0


def cmd_stats(cfg: Config, args) -> int:
    from .stats import collect
    stats = collect(cfg, _state(cfg, args))
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
    else:
        for section, values in stats.items():
            print(f"[{section}]")
            for key, value in values.items():
                print(f"  {key:<32} {value}")
    return 0


def cmd_maps(cfg: Config, args) -> int:
    from .stats import pinned_objects
    rows = pinned_objects(cfg.bpf.pin_path)
    if not rows:
        print(f"no pinned objects under {cfg.bpf.pin_path}")
        return 1
    for row in rows:
        print("  ".join(f"{v!s:<{w}}" for v, w in zip(row, (20, 14, 8, 0))).rstrip())
    return 0


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "reload": cmd_reload, "upgrade": cmd_upgrade, "status": cmd_status,
            "check": cmd_check, "stats": cmd_stats, "maps": cmd_maps}

if __name__ == "__main__":
    sys.exit(main())
