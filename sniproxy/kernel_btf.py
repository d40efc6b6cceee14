"""Offsets of members of the running kernel's own structs, read from its BTF
(/sys/kernel/btf/vmlinux), for a program that reads kernel memory the BPF
context does not expose: the relay verdict reads an skb's TCP sequence number.
Struct layouts change between kernel builds, so they are never hard-coded.

The format is the kernel's (Documentation/bpf/btf.rst): a header, then the type
section (each type a btf_type, followed by data whose size its kind sets), then
the string section.
"""
from __future__ import annotations

import struct
from functools import lru_cache

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_HEADER = struct.Struct("<HBBIIIII")   # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")          # name_off, info, size or type
_MEMBER = struct.Struct("<III")        # name_off, type, offset (bits; with kflag, bitfield size << 24 | bits)
_STRUCT, _UNION = 4, 5
# Bytes after the btf_type of each kind: fixed, plus per-entry times vlen.
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
          17: (4, 0), 19: (0, 12)}   # int, array, struct, union, enum, func_proto, var, datasec, decl_tag, enum64


class BtfError(Exception):
    pass


class Btf:
    def __init__(self, raw: bytes):
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(raw)
        if magic != 0xEB9F:
            raise BtfError("not BTF (bad magic)")
        self._types = raw[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strings = raw[hdr_len + str_off:hdr_len + str_off + str_len]
        self._at = [0]        # type id -> offset of its btf_type in the type section (id 0 is void)
        self._structs: dict[str, int] = {}
        pos = 0
        while pos < len(self._types):
            name_off, info, _ = _TYPE.unpack_from(self._types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind in (_STRUCT, _UNION) and name_off:
                self._structs.setdefault(self._name(name_off), len(self._at))
            self._at.append(pos)
            fixed, each = _EXTRA.get(kind, (0, 0))
            pos += _TYPE.size + fixed + each * vlen

    def _name(self, off: int) -> str:
        return self._strings[off:self._strings.index(b"\0", off)].decode()

    def _members(self, type_id: int):
        pos = self._at[type_id]
        _, info, _ = _TYPE.unpack_from(self._types, pos)
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            name_off, member_type, offset = _MEMBER.unpack_from(self._types, pos + _TYPE.size + i * _MEMBER.size)
            yield (self._name(name_off) if name_off else ""), member_type, (offset & 0xFFFFFF if kflag else offset)

    def _resolve(self, type_id: int) -> int:
        """Through typedefs and qualifiers to the struct or union itself."""
        while True:
            _, info, target = _TYPE.unpack_from(self._types, self._at[type_id])
            if (info >> 24) & 0x1F in (_STRUCT, _UNION):
                return type_id
            type_id = target

    def _find(self, type_id: int, member: str) -> int | None:
        """Bit offset of member in the struct or union type_id, looking into anonymous members."""
        for name, member_type, bits in self._members(type_id):
            if name == member:
                return bits
            if not name:
                try:
                    inner = self._find(self._resolve(member_type), member)
                except (IndexError, struct.error):
                    continue
                if inner is not None:
                    return bits + inner
        return None

    def offset(self, struct_name: str, member: str) -> int:
        """Byte offset of struct_name.member."""
        type_id = self._structs.get(struct_name)
        bits = None if type_id is None else self._find(type_id, member)
        if bits is None or bits % 8:
            raise BtfError(f"the kernel's BTF has no byte-aligned {struct_name}.{member}")
        return bits // 8


@lru_cache(maxsize=1)
def relay_offsets(path: str = VMLINUX_BTF) -> dict[str, int]:
    """The -D flags bpf/relay.c needs: where an skb keeps its socket and its TCP
    control block, where that block keeps the sequence number, and where a TCP
    socket keeps copied_seq."""
    try:
        with open(path, "rb") as f:
            btf = Btf(f.read())
    except OSError as e:
        raise BtfError(f"the kernel's BTF is unreadable ({e}); the kernel relay needs CONFIG_DEBUG_INFO_BTF") from e
    return {"SKB_SK_OFFSET": btf.offset("sk_buff", "sk"), "SKB_CB_OFFSET": btf.offset("sk_buff", "cb"),
            "TCP_SKB_CB_SEQ_OFFSET": btf.offset("tcp_skb_cb", "seq"),
            "TCP_COPIED_SEQ_OFFSET": btf.offset("tcp_sock", "copied_seq")}
