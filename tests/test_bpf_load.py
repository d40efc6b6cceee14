"""The loader and pinned-map access, checked against the kernel with bpftool."""
import atexit
import json
import os
import subprocess

import pytest

from bpf_fixtures import relay_pins  # noqa: F401 - fixtures
from sniproxy import bpfload, bpfsys, kernel_abi
from sniproxy.bpfsys import BpfError, PinnedMap
from sniproxy.bpfsetup import PROGRAMS
from sniproxy.config import load
from sniproxy.kernel_abi import COOKIE, LAYOUT_VALUE, PERCPU_COUNTERS, RELAY_STATS, Connection

pytestmark = pytest.mark.bpf


def bpftool(*args: str, check: bool = True):
    result = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
    if check:
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return result


def test_probe_finds_everything_on_this_machine(pin_path):
    caps = bpfload.probe(pin_path)
    assert caps.ok, caps.problems()
    assert (caps.bpffs, caps.privileges, caps.bcc, caps.sockmap, caps.btf) == (True,) * 5


def test_pinned_maps_and_program_have_the_right_kernel_types(relay_pins):
    pins = relay_pins.pin_path
    assert sorted(os.listdir(pins)) == sorted(
        ["LAYOUT", "SOCK_MAP", "SOCK_TARGETS", "CONNECTION_MAP", "RELAY_CONTROL", "RELAY_STATS",
         "relay_verdict"])
    assert bpftool("map", "show", "pinned", f"{pins}/SOCK_MAP")["type"] == "sockhash"
    assert bpftool("map", "show", "pinned", f"{pins}/SOCK_TARGETS")["type"] == "sockhash"
    connections = bpftool("map", "show", "pinned", f"{pins}/CONNECTION_MAP")
    assert (connections["type"], connections["bytes_key"], connections["bytes_value"]) == ("hash", 8, Connection.LAYOUT.size)
    assert connections["max_entries"] == 1024  # the -D knob reached the C text
    assert bpftool("prog", "show", "pinned", f"{pins}/relay_verdict")["type"] == "sk_skb"


def test_verdict_is_attached_to_sock_map(relay_pins):
    # bpftool shows no sockmap attachments; detaching does: it succeeds only
    # for an attached program, and only once.
    pins = relay_pins.pin_path
    detach = ["prog", "detach", "pinned", f"{pins}/relay_verdict", "sk_skb_stream_verdict",
              "pinned", f"{pins}/SOCK_MAP"]
    assert bpftool(*detach, check=False).returncode == 0
    assert bpftool(*detach, check=False).returncode != 0


def test_maps_carry_btf_field_names(relay_pins):
    pins = relay_pins.pin_path
    with PinnedMap.open(f"{pins}/CONNECTION_MAP") as connections:
        connections.update(COOKIE.pack(7), Connection(peer=8, bytes=1234, skbs=5, passed=6, direction=2, next_seq=9,
                                                      trimmed=10, flags=1).pack())
    dumped = bpftool("map", "dump", "pinned", f"{pins}/CONNECTION_MAP")
    assert [e["formatted"] for e in dumped] == [{"key": 7, "value": {
        "peer": 8, "bytes": 1234, "skbs": 5, "passed": 6, "direction": 2, "next_seq": 9, "trimmed": 10, "flags": 1}}]
    stats = bpftool("map", "dump", "pinned", f"{pins}/RELAY_STATS")
    assert set(stats[0]["formatted"]["values"][0]["value"]) == {"relayed_bytes", "relayed_skbs", "redirect_failures",
                                                           "up_bytes", "down_bytes", "trimmed_bytes", "trim_failures"}
    layout = bpftool("map", "dump", "pinned", f"{pins}/LAYOUT")
    assert layout[0]["formatted"]["value"] == {"version": bpfload.LAYOUT_VERSION, "owner_pid": os.getpid()}


def test_every_map_value_has_the_layout_of_kernel_abi(pin_path):
    """Each map the loader pins holds values of the size kernel_abi declares, and the
    config's sizes reach the C: bpf.max_pairs sizes the relay maps (two sockets a pair)."""
    cfg = load(text="[bpf]\nmax_pairs = 300\n[resolver]\ncache_size = 77\n")
    loaded = bpfload.load(pin_path, PROGRAMS, cflags=kernel_abi.map_sizes(cfg.bpf.max_pairs, cfg.resolver.cache_size))
    try:
        maps = {}
        for name in os.listdir(pin_path):
            shown = bpftool("map", "show", "pinned", f"{pin_path}/{name}", check=False)
            if shown.returncode == 0:
                maps[name] = json.loads(shown.stdout)
        assert set(maps) == set(kernel_abi.VALUE_SIZES)
        assert {name: m["bytes_value"] for name, m in maps.items()} == kernel_abi.VALUE_SIZES
        assert {name: maps[name]["max_entries"] for name in ("SOCK_MAP", "SOCK_TARGETS", "CONNECTION_MAP",
                                                             "RELAY_CONTROL", "DNS_CACHE")} == {
            "SOCK_MAP": 600, "SOCK_TARGETS": 600, "CONNECTION_MAP": 600, "RELAY_CONTROL": 600, "DNS_CACHE": 77}
    finally:
        loaded.unpin()


def test_incompatible_pins_are_replaced_loudly(pin_path, caplog):
    old = bpfload.load(pin_path)
    old_id = bpftool("map", "show", "pinned", f"{pin_path}/SOCK_MAP")["id"]
    with PinnedMap.open(f"{pin_path}/LAYOUT") as layout:
        layout.update(b"\0" * 4, LAYOUT_VALUE.pack(999, 1))
    old.close()  # a crashed master: pins stay, fds gone
    assert bpfload.read_layout(pin_path) == 999

    new = bpfload.load(pin_path)
    try:
        assert "incompatible" in caplog.text and "999" in caplog.text
        assert bpfload.read_layout(pin_path) == bpfload.LAYOUT_VERSION
        assert bpftool("map", "show", "pinned", f"{pin_path}/SOCK_MAP")["id"] != old_id
    finally:
        new.unpin()
    assert not os.path.exists(pin_path)


def test_half_written_pins_without_layout_are_replaced(pin_path, caplog):
    os.makedirs(pin_path)
    fd = bpfsys.create_map(2, "leftover", 4, 4, 1)
    bpfsys.obj_pin(fd, f"{pin_path}/leftover")
    os.close(fd)
    assert bpfload.read_layout(pin_path) is None
    loaded = bpfload.load(pin_path)
    assert "incompatible" in caplog.text
    assert "leftover" not in os.listdir(pin_path)
    loaded.unpin()
    assert not os.path.exists(pin_path)


def test_unpin_removes_everything(relay_pins):
    pins = relay_pins.pin_path
    relay_pins.unpin()
    assert not os.path.exists(pins)
    bpfload.unpin(pins)  # and again is harmless


def test_forked_child_exiting_leaves_parent_pins_and_fds(relay_pins):
    pins = relay_pins.pin_path
    fds = dict(relay_pins.map_fds, **relay_pins.program_fds)
    parent_exit_handlers = atexit._ncallbacks()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # BCC's cleanup of the master's objects (one per compiled module) is gone.
            if atexit._ncallbacks() != parent_exit_handlers - len(relay_pins._modules):
                os._exit(2)
            # A worker: reach the maps by path, write, and leave the way
            # sys.exit does at the end: atexit handlers, then exit.
            with PinnedMap.open(f"{pins}/CONNECTION_MAP") as m:
                m.update(COOKIE.pack(1), Connection(2, 3, 4, 5, 1).pack())
            atexit._run_exitfuncs()
            code = 0
        finally:
            os._exit(code)  # never back into pytest
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for name, fd in fds.items():
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf"), name
    with PinnedMap.open(f"{pins}/CONNECTION_MAP") as m:
        assert m.lookup(COOKIE.pack(1)) == Connection(2, 3, 4, 5, 1).pack()
    bpftool("prog", "show", "pinned", f"{pins}/relay_verdict")


def test_pinned_map_operations(relay_pins):
    with relay_pins.open_map("CONNECTION_MAP") as m:
        assert (m.name, m.type_name, m.key_size, m.value_size) == ("CONNECTION_MAP", "hash", 8, Connection.LAYOUT.size)
        keys = [COOKIE.pack(i) for i in range(1, 6)]
        for i, key in enumerate(keys):
            m.update(key, Connection(i, i * 10, i * 100, 0, 1).pack())
        assert sorted(m.keys()) == sorted(keys)
        assert dict(m.items())[keys[2]] == Connection(2, 20, 200, 0, 1).pack()
        with pytest.raises(BpfError, match="CONNECTION_MAP.*File exists"):
            m.update(keys[0], bytes(Connection.LAYOUT.size), flags=bpfsys.BPF_NOEXIST)
        assert m.delete(keys[0]) is True
        assert m.delete(keys[0]) is False
        assert m.lookup(keys[0]) is None
        assert m.pop(keys[1]) == Connection(1, 10, 100, 0, 1).pack()
        assert m.pop(keys[1]) is None and m.lookup(keys[1]) is None
        assert len(m) == 3
    with relay_pins.open_map("RELAY_STATS") as stats:
        per_cpu = stats.lookup_percpu(b"\0" * 4)
        assert len(per_cpu) == bpfsys.possible_cpus() and all(v == bytes(8 * len(PERCPU_COUNTERS[RELAY_STATS])) for v in per_cpu)


def test_batch_lookup_reads_every_entry(relay_pins):
    """lookup_all: BPF_MAP_LOOKUP_BATCH in chunks smaller than the map, so the walk
    resumes from the kernel's token; it must return exactly what the map holds."""
    with relay_pins.open_map("CONNECTION_MAP") as m:
        assert m.lookup_all() == {}
        entries = {COOKIE.pack(i): Connection(i, i * 3, i * 5, i * 7, 2).pack() for i in range(1, 1001)}
        for key, value in entries.items():
            m.update(key, value)
        assert m.lookup_all(chunk=64) == entries
        assert m.lookup_all() == entries


def test_errors_name_the_path(pin_path):
    with pytest.raises(BpfError, match=f"{pin_path}/SOCK_MAP.*No such file"):
        PinnedMap.open(f"{pin_path}/SOCK_MAP")


def test_program_objects_are_not_maps(relay_pins):
    with pytest.raises(BpfError, match="not a map"):
        PinnedMap.open(f"{relay_pins.pin_path}/relay_verdict")


def test_compile_errors_name_the_file(pin_path, tmp_path, monkeypatch):
    (tmp_path / "broken.c").write_text("int broken(struct __sk_buff *skb) { return undeclared; }\n")
    monkeypatch.setattr(bpfload, "BPF_SOURCE_DIR", tmp_path)
    with pytest.raises(bpfload.BpfLoadError, match=r"bpf/broken\.c: compiling failed.*SNIPROXY_BPF_DUMP"):
        bpfload.load(pin_path, programs=("broken",))
    with pytest.raises(bpfload.BpfLoadError, match=r"missing\.c"):
        bpfload.load(pin_path, programs=("missing",))
    assert not os.path.exists(pin_path)


def test_dump_prints_c_text_and_flags(pin_path, monkeypatch, capsys):
    monkeypatch.setenv("SNIPROXY_BPF_DUMP", "1")
    bpfload.load(pin_path, cflags={"SOCK_MAP_MAX": 77}).unpin()
    out = capsys.readouterr().out
    assert "int relay_verdict(struct __sk_buff *skb)" in out
    assert "-DSOCK_MAP_MAX=77" in out and f"-DLAYOUT_VERSION={bpfload.LAYOUT_VERSION}" in out
