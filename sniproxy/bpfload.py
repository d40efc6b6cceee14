"""The one BPF loader: compile bpf/<name>.c with BCC, load, attach, and pin.

Layout under pin_path: every map under its own name (SOCK_MAP, CONNECTION_MAP,
...), every program under its function name, and a LAYOUT array map holding
the layout version; LAYOUT is pinned last, so its presence means "complete".
"""
import atexit
import ctypes as ct
import dataclasses
import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path

from . import bpfsys, kernel_btf
from .kernel_abi import LAYOUT, LAYOUT_VALUE, LAYOUT_VERSION, PROGRAMS

log = logging.getLogger("sniproxy.bpf")

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
_LAYOUT_SOURCE = """
struct layout { u32 version; u32 owner_pid; };
BPF_ARRAY(LAYOUT, struct layout, 1);
int btf_anchor_layout(void *ctx) { return 0; }
"""
# BCC emits BTF (field names for bpftool) only for a module with a function;
# a file that only defines maps adds a function whose name contains
# "btf_anchor", never loaded.
BTF_ANCHOR = "btf_anchor"


class BpfLoadError(RuntimeError):
    """Loading failed; the message names the program and what to do about it."""


@dataclasses.dataclass
class Capabilities:
    bpffs: bool = False
    privileges: bool = False
    bcc: bool = False
    sockmap: bool = False
    btf: bool = False
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # missing -> what to do

    @property
    def ok(self) -> bool:
        return not self.reasons

    def problems(self) -> list[str]:
        """One line per missing piece, with what to do about it."""
        return [f"{name}: {why}" for name, why in self.reasons.items()]


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _bpffs_mount_of(path: str) -> str | None:
    """The bpffs mount point that holds path, if any."""
    best = None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount_point, fs_type, *_ = line.split()
            if fs_type == "bpf" and (path + "/").startswith(mount_point.rstrip("/") + "/"):
                if best is None or len(mount_point) > len(best):
                    best = mount_point
    return best


def _kernel_headers() -> Path:
    return Path("/lib/modules") / os.uname().release / "build"


def probe(pin_path: str) -> Capabilities:
    caps = Capabilities()
    eff = _effective_caps()
    has_bpf, has_admin = bool(eff & (1 << 39)), bool(eff & (1 << 21))
    caps.privileges = has_bpf or has_admin
    if not caps.privileges:
        caps.reasons["privileges"] = "needs CAP_BPF (run as root)"
    caps.bpffs = _bpffs_mount_of(pin_path) is not None or has_admin  # root can mount it
    if not caps.bpffs:
        caps.reasons["bpffs"] = "mount bpffs: mount -t bpf bpf /sys/fs/bpf"
    try:
        import bcc  # noqa: F401
        caps.bcc = _kernel_headers().is_dir()
        if not caps.bcc:
            caps.reasons["bcc"] = f"kernel headers missing at {_kernel_headers()}: run scripts/setup"
    except ImportError:
        caps.reasons["bcc"] = "BCC not importable: install python3-bpfcc (scripts/setup)"
    if caps.privileges:
        try:
            os.close(bpfsys.create_map(bpfsys.MAP_TYPE_SOCKHASH, "probe", 8, 8, 1))
            caps.sockmap = True
        except OSError as e:
            caps.reasons["sockmap"] = f"kernel refuses a sockhash ({e}): needs CONFIG_BPF_SYSCALL and NET_SOCK_MSG"
    caps.btf = Path("/sys/kernel/btf/vmlinux").exists()
    if not caps.btf:
        caps.reasons["btf"] = "no /sys/kernel/btf/vmlinux: kernel built without DEBUG_INFO_BTF"
    return caps


def _ensure_bpffs(pin_path: str) -> None:
    if _bpffs_mount_of(pin_path):
        return
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None) != 0:
        raise BpfLoadError(f"bpffs not mounted and mounting failed ({os.strerror(ct.get_errno())}): "
                           "mount -t bpf bpf /sys/fs/bpf")
    log.info("mounted bpffs at /sys/fs/bpf")
    if not _bpffs_mount_of(pin_path):
        raise BpfLoadError(f"{pin_path} is not under a bpffs mount")


def read_layout(pin_path: str) -> int | None:
    """The layout version pinned at pin_path, or None when there is none readable."""
    try:
        with bpfsys.PinnedMap.open(os.path.join(pin_path, LAYOUT)) as layout:
            value = layout.lookup(b"\0\0\0\0")
    except OSError:
        return None
    return LAYOUT_VALUE.unpack(value)[0] if value else None


def reuse(pin_path: str) -> "LoadedBpf":
    """What another image of this master pinned at pin_path, taken as it is (an upgrade:
    pairs relay through these maps now); BpfLoadError unless its layout is this code's."""
    found = read_layout(pin_path)
    if found != LAYOUT_VERSION:
        raise BpfLoadError(f"the pins at {pin_path} have layout {found}, this code uses {LAYOUT_VERSION}")
    return LoadedBpf(pin_path)


def unpin(pin_path: str) -> None:
    """Remove every pin under pin_path and the directory itself."""
    if not os.path.isdir(pin_path):
        return
    for root, dirs, files in os.walk(pin_path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(pin_path)


def remove_orphaned(prefix: str, root: str = "/sys/fs/bpf") -> list[str]:
    """Pin directories named <prefix>-<pid>-... whose process is gone (killed outright,
    so no cleanup ran: a test run, a bench run): removed; their paths."""
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        pid = name[len(prefix) + 1:].split("-")[0]
        if name.startswith(prefix + "-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            unpin(os.path.join(root, name))
            removed.append(os.path.join(root, name))
    return removed


# BPF objects of this process. BCC registers an atexit cleanup per object;
# a forked worker must not run it (see forget_in_child).
_live_objects: "weakref.WeakSet" = weakref.WeakSet()


def forget_in_child() -> None:
    """Drop this process's claim on BPF objects loaded before fork.

    BCC registers `atexit(BPF.cleanup)` for every object. A worker forked from
    the master inherits those registrations; when it exits through sys.exit it
    would close the inherited fds and destroy its copy of the module (and any
    attached probes). Workers reach the pinned objects by path instead, so the
    cleanups are unregistered in every child right after fork: this runs as an
    os.register_at_fork hook, and nothing needs to call it.
    """
    for obj in list(_live_objects):
        atexit.unregister(obj.cleanup)
    _live_objects.clear()
    for loaded in list(_live_loads):
        loaded._forget()


_live_loads: "weakref.WeakSet" = weakref.WeakSet()
os.register_at_fork(after_in_child=forget_in_child)


class LoadedBpf:
    """The master's handle on what load() pinned."""

    def __init__(self, pin_path: str):
        self.pin_path = pin_path
        self.map_fds: dict[str, int] = {}
        self.program_fds: dict[str, int] = {}
        self._modules: list = []  # BCC BPF objects; they own the fds above

    def map_path(self, name: str) -> str:
        return os.path.join(self.pin_path, name)

    def open_map(self, name: str) -> bpfsys.PinnedMap:
        return bpfsys.PinnedMap.open(self.map_path(name))

    def close(self) -> None:
        """Close this process's fds; the pins (and attachments) stay."""
        for module in self._modules:
            atexit.unregister(module.cleanup)
            module.cleanup()
        self._forget()

    def unpin(self) -> None:
        self.close()
        unpin(self.pin_path)

    def _forget(self) -> None:
        self._modules.clear()
        self.map_fds.clear()
        self.program_fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cflags(cflags: Mapping[str, int]) -> list[str]:
    flags = {**cflags, "LAYOUT_VERSION": LAYOUT_VERSION}
    for name, value in flags.items():
        if not name.isidentifier() or not isinstance(value, int):
            raise BpfLoadError(f"bad BPF knob {name}={value!r}: names are C identifiers, values integers")
    return [f"-D{name}={value}" for name, value in flags.items()]


def _compile(source_name: str, text: str, cflags: list[str]):
    from bcc import BPF
    if os.environ.get("SNIPROXY_BPF_DUMP") == "1":
        print(f"/* {source_name} cflags: {' '.join(cflags)} */\n{text}", flush=True)
    try:
        module = BPF(text=text.encode(), cflags=cflags)
    except Exception as e:
        raise BpfLoadError(
            f"{source_name}: compiling failed ({e}). Kernel headers must be at {_kernel_headers()} "
            "(run scripts/setup); SNIPROXY_BPF_DUMP=1 prints the C text and flags") from e
    _live_objects.add(module)
    return module


def _module_maps(module) -> list[str]:
    from bcc import libbcc
    lib = libbcc.lib
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_size_t, [ct.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ct.c_char_p, [ct.c_void_p, ct.c_size_t]
    return [lib.bpf_table_name(module.module, i).decode() for i in range(lib.bpf_num_tables(module.module))]


def _module_functions(module) -> list[str]:
    from bcc import libbcc
    lib = libbcc.lib
    return [lib.bpf_function_name(module.module, i).decode()
            for i in range(lib.bpf_num_functions(module.module))]


def _table_fd(module, name: str) -> int:
    from bcc import libbcc
    return libbcc.lib.bpf_table_fd(module.module, name.encode())


def _load_program(module, source_name: str, function: str, loaded: LoadedBpf) -> None:
    from bcc import BPF
    spec = PROGRAMS.get(function)
    if spec is None:
        raise BpfLoadError(f"{source_name}: unknown program {function}(): add it to kernel_abi.PROGRAMS")
    try:
        fn = module.load_func(function.encode(), spec.prog_type)
        if spec.attach_map:
            BPF.attach_func(fn, loaded.map_fds[spec.attach_map], spec.attach_type)
    except KeyError:
        raise BpfLoadError(f"{source_name}: {function}() attaches to {spec.attach_map}, "
                           "which no loaded program defines") from None
    except Exception as e:
        hint = "needs CAP_BPF (run as root)" if "privileges" in str(e) else \
            "the verifier log above says why"
        raise BpfLoadError(f"{source_name}: loading {function}() failed ({e}); {hint}") from e
    loaded.program_fds[function] = fn.fd


def _replace_stale_pins(pin_path: str) -> None:
    if not os.path.isdir(pin_path) or not os.listdir(pin_path):
        return
    found = read_layout(pin_path)
    if found != LAYOUT_VERSION:
        log.warning("removing incompatible BPF pins at %s (layout %s, this version uses %s)",
                    pin_path, found, LAYOUT_VERSION)
    else:
        log.warning("replacing BPF pins left at %s by an earlier run", pin_path)
    unpin(pin_path)


def _read_source(name: str) -> str:
    path = BPF_SOURCE_DIR / f"{name}.c"
    try:
        return path.read_text()
    except OSError as e:
        raise BpfLoadError(f"{path}: {e.strerror}; known programs: "
                           f"{sorted(p.stem for p in BPF_SOURCE_DIR.glob('*.c'))}") from e


def compile_tracer(name: str, cflags: Mapping[str, int] = {}):
    """bpf/<name>.c compiled for a measuring tool (bench/): a BCC module whose
    probes the tool attaches itself, with nothing pinned."""
    return _compile(f"bpf/{name}.c", _read_source(name), _cflags(cflags))


def load(pin_path: str, programs=("relay",), cflags: Mapping[str, int] = {}) -> LoadedBpf:
    """Compile, load and pin bpf/<name>.c for every name in programs.

    Whatever is pinned at pin_path is replaced: the caller makes sure no live
    master owns it (its pidfile).
    """
    pin_path = os.path.abspath(pin_path)
    if "relay" in programs:
        try:
            cflags = {**kernel_btf.relay_offsets(), **cflags}
        except kernel_btf.BtfError as e:
            raise BpfLoadError(str(e)) from e
    flags = _cflags(cflags)
    _ensure_bpffs(pin_path)
    _replace_stale_pins(pin_path)
    os.makedirs(pin_path)
    loaded = LoadedBpf(pin_path)
    try:
        sources = [(f"bpf/{name}.c", _read_source(name)) for name in programs]
        sources.append(("<layout>", _LAYOUT_SOURCE))

        for source_name, text in sources:
            module = _compile(source_name, text, flags)
            loaded._modules.append(module)
            for map_name in _module_maps(module):
                if map_name in loaded.map_fds:
                    raise BpfLoadError(f"{source_name}: map {map_name} is also defined by another program")
                loaded.map_fds[map_name] = _table_fd(module, map_name)
            for function in _module_functions(module):
                if BTF_ANCHOR in function:
                    continue
                _load_program(module, source_name, function, loaded)

        for name, fd in {**loaded.program_fds, **loaded.map_fds}.items():
            if name != LAYOUT:
                bpfsys.obj_pin(fd, loaded.map_path(name))
        with bpfsys.PinnedMap(os.dup(loaded.map_fds[LAYOUT]), LAYOUT) as layout:
            layout.update(b"\0\0\0\0", LAYOUT_VALUE.pack(LAYOUT_VERSION, os.getpid()))
        bpfsys.obj_pin(loaded.map_fds[LAYOUT], loaded.map_path(LAYOUT))
    except BaseException:
        loaded.unpin()
        raise
    _live_loads.add(loaded)
    log.info("loaded BPF %s at %s", ", ".join(programs), pin_path)
    return loaded
