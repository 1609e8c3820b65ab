"""Small ELF files for tests: a header, a loadable segment over the whole file, a string
table and a dynamic section that names libraries, as a linker lays them out."""

from __future__ import annotations

import struct

EM_X86_64 = 62
VADDR = 0x10000


def elf_file(
    needed: list[str],
    *,
    is64: bool = True,
    order: str = "<",
    machine: int = EM_X86_64,
    body: bytes = b"",
) -> bytes:
    """An ELF shared object whose dynamic section names ``needed``. ``body`` goes between
    the string table and the dynamic section, as a program's code does (a long body
    puts the dynamic section in a later chunk of the file than its header)."""
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    strtab_at = ehsize + 2 * phentsize
    dynamic_at = strtab_at + len(strtab) + len(body)
    dynamic_at += -dynamic_at % 8
    entry = struct.Struct(order + ("qQ" if is64 else "iI"))
    entries, pos = [], 1
    for name in needed:
        entries.append((1, pos))  # DT_NEEDED
        pos += len(name) + 1
    entries += [(5, VADDR + strtab_at), (10, len(strtab)), (0, 0)]  # STRTAB, STRSZ, NULL
    dynamic = b"".join(entry.pack(tag, value) for tag, value in entries)
    size = dynamic_at + len(dynamic)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    if is64:
        header = struct.pack(
            order + "HHIQQQIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, 2, 0, 0, 0
        )
        load = struct.pack(order + "IIQQQQQQ", 1, 5, 0, VADDR, VADDR, size, size, 0x1000)
        dyn = struct.pack(
            order + "IIQQQQQQ",
            2,
            6,
            dynamic_at,
            VADDR + dynamic_at,
            VADDR + dynamic_at,
            len(dynamic),
            len(dynamic),
            8,
        )
    else:
        header = struct.pack(
            order + "HHIIIIIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, 2, 0, 0, 0
        )
        load = struct.pack(order + "IIIIIIII", 1, 0, VADDR, VADDR, size, size, 5, 0x1000)
        dyn = struct.pack(
            order + "IIIIIIII",
            2,
            dynamic_at,
            VADDR + dynamic_at,
            VADDR + dynamic_at,
            len(dynamic),
            len(dynamic),
            6,
            4,
        )
    head = ident + header + load + dyn + strtab + body
    return head + bytes(dynamic_at - len(head)) + dynamic
