"""Pinned BPF maps from Python: a thin ctypes layer over libbcc's syscall wrappers.

Workers use this after fork to reach the maps the master pinned, so it must not
import `bcc` (slow, and it registers atexit cleanups of its own).
"""
import ctypes as ct
import errno
import functools
import os

MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
    10: "lru_percpu_hash", 11: "lpm_trie", 15: "sockmap", 18: "sockhash",
}
PERCPU_MAP_TYPES = {5, 6, 10}
MAP_TYPE_SOCKHASH = 18
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
_OBJ_NAME_LEN = 16


class BpfError(OSError):
    """A BPF syscall failed; the message names the object and the errno in words."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


class _MapInfo(ct.Structure):
    # The head of the kernel's struct bpf_map_info; the kernel accepts a shorter struct.
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
        ("name", ct.c_char * _OBJ_NAME_LEN),
    ]


@functools.cache
def _lib() -> ct.CDLL:
    lib = ct.CDLL("libbcc.so.0", use_errno=True)
    for name, argtypes in {
        "bpf_obj_get": [ct.c_char_p],
        "bpf_obj_pin": [ct.c_int, ct.c_char_p],
        "bpf_lookup_elem": [ct.c_int, ct.c_void_p, ct.c_void_p],
        "bpf_update_elem": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong],
        "bpf_delete_elem": [ct.c_int, ct.c_void_p],
        "bpf_lookup_and_delete": [ct.c_int, ct.c_void_p, ct.c_void_p],
        "bpf_get_next_key": [ct.c_int, ct.c_void_p, ct.c_void_p],
        "bpf_lookup_batch": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                             ct.POINTER(ct.c_uint32)],
        "bpf_obj_get_info": [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)],
        "bcc_create_map": [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int],
        "bpf_prog_query": [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                           ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ct.c_int
    return lib


def _errno_of(ret: int) -> int:
    # libbpf returns -errno and also sets errno; older wrappers return -1 and set errno.
    return ct.get_errno() or (-ret if ret < -1 else errno.EIO)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(_errno_of(ret), what)
    return ret


def attached_programs(target_fd: int, attach_type: int, most: int = 8) -> list[int]:
    """Ids of the programs attached to a map (or cgroup) for attach_type."""
    ids, count, flags = (ct.c_uint32 * most)(), ct.c_uint32(most), ct.c_uint32()
    _check(_lib().bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(count)),
           f"query programs attached to fd {target_fd}")
    return list(ids[:count.value])


def obj_get(path: str) -> int:
    """The fd of the object pinned at path."""
    ct.set_errno(0)
    return _check(_lib().bpf_obj_get(os.fsencode(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    ct.set_errno(0)
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin fd {fd} at {path}")


def create_map(map_type: int, name: str, key_size: int, value_size: int,
               max_entries: int) -> int:
    """A new, unpinned map's fd (used to probe what the kernel allows)."""
    ct.set_errno(0)
    ret = _lib().bcc_create_map(map_type, name.encode(), key_size, value_size, max_entries, 0)
    return _check(ret, f"create {MAP_TYPE_NAMES.get(map_type, map_type)} map {name}")


def map_info(fd: int) -> _MapInfo:
    info, size = _MapInfo(), ct.c_uint32(ct.sizeof(_MapInfo))
    ct.set_errno(0)
    _check(_lib().bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)), f"map info of fd {fd}")
    return info


def fd_info(fd: int) -> dict[str, str]:
    """/proc/self/fdinfo of a BPF fd: map_type, prog_type, prog_id, ..."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _is_map(fd: int) -> bool:
    # bpf_obj_get_info fills in program info for a program fd, so ask fdinfo.
    return "map_type" in fd_info(fd)


@functools.cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU ("0-3" or "0,2-5" in sysfs)."""
    with open("/sys/devices/system/cpu/possible") as f:
        count = 0
        for part in f.read().strip().split(","):
            low, _, high = part.partition("-")
            count += int(high or low) - int(low) + 1
    return count


class PinnedMap:
    """One BPF map reached by fd; keys and values are raw bytes in kernel layout."""

    def __init__(self, fd: int, label: str):
        self.fd, self.label = fd, label
        if not _is_map(fd):
            raise BpfError(errno.EINVAL, f"{label} is not a map")
        info = map_info(fd)
        self.name = info.name.decode()
        self.map_type = info.type
        self.key_size, self.value_size = info.key_size, info.value_size
        self.max_entries = info.max_entries
        self._percpu = info.type in PERCPU_MAP_TYPES
        # The kernel copies one value per possible CPU, each padded to 8 bytes.
        self._slot = (self.value_size + 7) & ~7
        self._buffer_size = self._slot * possible_cpus() if self._percpu else self.value_size

    @classmethod
    def open(cls, path: str) -> "PinnedMap":
        fd = obj_get(path)
        try:
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.map_type, str(self.map_type))

    def _key(self, key: bytes) -> ct.Array:
        if len(key) != self.key_size:
            raise ValueError(f"{self.label}: key is {len(key)} bytes, map wants {self.key_size}")
        return ct.create_string_buffer(bytes(key), self.key_size)

    def _raw_lookup(self, key: bytes, delete: bool = False) -> bytes | None:
        value = ct.create_string_buffer(self._buffer_size)
        ct.set_errno(0)
        call = _lib().bpf_lookup_and_delete if delete else _lib().bpf_lookup_elem
        ret = call(self.fd, self._key(key), value)
        if ret < 0:
            err = _errno_of(ret)
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"{'pop' if delete else 'lookup'} in {self.label}")
        return value.raw

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None when absent (for per-CPU maps: CPU 0's value)."""
        raw = self._raw_lookup(key)
        return None if raw is None else raw[:self.value_size]

    def pop(self, key: bytes) -> bytes | None:
        """Remove the entry and return its value in one call (hash maps), or None when absent."""
        raw = self._raw_lookup(key, delete=True)
        return None if raw is None else raw[:self.value_size]

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        raw = self._raw_lookup(key)
        if raw is None:
            return None
        return [raw[i:i + self.value_size] for i in range(0, len(raw), self._slot)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if self._percpu and len(value) == self.value_size:
            value = bytes(value).ljust(self._slot, b"\0") * possible_cpus()
        elif not self._percpu and len(value) != self.value_size:
            raise ValueError(f"{self.label}: value is {len(value)} bytes, map wants {self.value_size}")
        buf = ct.create_string_buffer(bytes(value), max(len(value), 1))
        ct.set_errno(0)
        _check(_lib().bpf_update_elem(self.fd, self._key(key), buf, flags), f"update in {self.label}")

    def delete(self, key: bytes) -> bool:
        """True when an entry was removed, False when there was none."""
        ct.set_errno(0)
        ret = _lib().bpf_delete_elem(self.fd, self._key(key))
        if ret < 0:
            err = _errno_of(ret)
            if err == errno.ENOENT:
                return False
            raise BpfError(err, f"delete in {self.label}")
        return True

    def keys(self):
        lib, current = _lib(), None
        next_key = ct.create_string_buffer(self.key_size)
        while True:
            ct.set_errno(0)
            ret = lib.bpf_get_next_key(self.fd, current, next_key)
            if ret < 0:
                err = _errno_of(ret)
                if err == errno.ENOENT:
                    return
                raise BpfError(err, f"iterate {self.label}")
            key = next_key.raw
            yield key
            current = ct.create_string_buffer(key, self.key_size)

    def items(self):
        """(key, value) pairs; entries deleted during the walk are skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def batches(self, chunk: int = 4096):
        """Every entry of a (non-per-CPU) map, a chunk per syscall (BPF_MAP_LOOKUP_BATCH),
        as (keys, values, count): the chunk's keys and its values, each packed end to end.
        A hash map's walk resumes from a bucket number, so a caller may do other work
        between chunks; entries added or deleted meanwhile may be missed or seen twice."""
        lib = _lib()
        keys = ct.create_string_buffer(chunk * self.key_size)
        values = ct.create_string_buffer(chunk * self.value_size)
        token, count = ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            count.value = chunk
            ct.set_errno(0)
            ret = lib.bpf_lookup_batch(self.fd, None if first else ct.byref(token), ct.byref(token),
                                       keys, values, ct.byref(count))
            err = _errno_of(ret) if ret < 0 else 0
            if err not in (0, errno.ENOENT):
                raise BpfError(err, f"batch lookup in {self.label}")
            n = count.value
            yield ct.string_at(keys, n * self.key_size), ct.string_at(values, n * self.value_size), n
            if err == errno.ENOENT:   # the walk is complete
                return
            first = False

    def lookup_all(self, chunk: int = 4096) -> dict[bytes, bytes]:
        """Every entry, read in batches: for one pass over thousands of entries, where a
        lookup each would cost a syscall each."""
        found, ks, vs = {}, self.key_size, self.value_size
        for keys, values, n in self.batches(chunk):
            found.update(zip([keys[i:i + ks] for i in range(0, n * ks, ks)],
                             [values[i:i + vs] for i in range(0, n * vs, vs)]))
        return found

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"PinnedMap({self.label!r}, {self.type_name}, key={self.key_size}, "
                f"value={self.value_size}, max={self.max_entries})")
