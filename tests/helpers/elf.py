"""Small ELF files for tests: a header, a loadable segment over the whole file, a string
table and a dynamic section that names libraries, as a linker lays them out, and for a
program, the path of its interpreter."""

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
    interpreter: str | None = None,
) -> bytes:
    """An ELF file whose dynamic section names ``needed`` (with ``interpreter``, a program
    that asks for it). ``body`` goes between the string table and the dynamic section, as
    a program's code does (a long body puts the dynamic section in a later chunk of the
    file than its header)."""
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    interp = b"" if interpreter is None else interpreter.encode() + b"\0"
    phnum = 3 if interp else 2
    interp_at = ehsize + phnum * phentsize
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    strtab_at = interp_at + len(interp)
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
    e_type = 2 if interp else 3  # ET_EXEC, ET_DYN
    if is64:
        header = struct.pack(
            order + "HHIQQQIHHHHHH",
            e_type, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0,
        )  # fmt: skip

        def segment(p_type: int, flags: int, offset: int, length: int, align: int) -> bytes:
            return struct.pack(
                order + "IIQQQQQQ",
                p_type, flags, offset, VADDR + offset, VADDR + offset, length, length, align,
            )  # fmt: skip
    else:
        header = struct.pack(
            order + "HHIIIIIHHHHHH",
            e_type, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0,
        )  # fmt: skip

        def segment(p_type: int, flags: int, offset: int, length: int, align: int) -> bytes:
            return struct.pack(
                order + "IIIIIIII",
                p_type, offset, VADDR + offset, VADDR + offset, length, length, flags, align,
            )  # fmt: skip

    headers = segment(1, 5, 0, size, 0x1000)  # PT_LOAD over the whole file
    if interp:
        headers += segment(3, 4, interp_at, len(interp), 1)  # PT_INTERP
    headers += segment(2, 6, dynamic_at, len(dynamic), 8 if is64 else 4)  # PT_DYNAMIC
    head = ident + header + headers + interp + strtab + body
    return head + bytes(dynamic_at - len(head)) + dynamic
