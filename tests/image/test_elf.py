"""Reading the libraries an ELF file needs from its headers, and where the loader looks."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from blockfs.image._elf import (
    ElfLayout,
    LoaderNeeds,
    interpreter_path,
    library_dirs,
    parse_dynamic,
    parse_layout,
    string_at,
)
from tests.helpers.elf import EM_X86_64, elf_file


def needed_of(data: bytes) -> list[str] | None:
    """The names ``data``'s dynamic section needs, read as a layer reads them."""
    layout = parse_layout(data)
    if layout is None or layout.dynamic is None:
        return None
    at, size = layout.dynamic
    dynamic = parse_dynamic(layout, data[at : at + size])
    table_at = None if dynamic is None else layout.file_offset(dynamic.string_table)
    if dynamic is None or table_at is None:
        return None
    table = data[table_at : table_at + dynamic.string_table_size]
    return [n for n in (string_at(table, off) for off in dynamic.needed) if n is not None]


@pytest.mark.parametrize(("is64", "order"), [(True, "<"), (True, ">"), (False, "<"), (False, ">")])
def test_the_needed_libraries_of_every_class_and_byte_order(is64, order):
    data = elf_file(["libfoo.so.1", "libc.so.6"], is64=is64, order=order, body=b"x" * 5000)
    layout = parse_layout(data)
    assert layout is not None
    assert (layout.is64, layout.byte_order, layout.machine) == (is64, order, EM_X86_64)
    assert needed_of(data) == ["libfoo.so.1", "libc.so.6"]


def test_a_real_program_needs_libc():
    # The interpreter running this test is a dynamically linked Debian program.
    program = os.path.realpath("/usr/bin/python3")
    with open(program, "rb") as f:
        data = f.read()
    needed = needed_of(data)
    assert needed is not None and "libc.so.6" in needed
    # The same list readelf finds, where binutils is installed.
    try:
        out = subprocess.run(["readelf", "-d", program], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        return
    expected = [
        line.split("[", 1)[1].split("]", 1)[0]
        for line in out.stdout.splitlines()
        if "(NEEDED)" in line
    ]
    assert needed == expected
    # And the interpreter it names (the loader's path readelf prints, where it can).
    layout = parse_layout(data)
    assert layout is not None and layout.interpreter is not None
    at, size = layout.interpreter
    interpreter = interpreter_path(data[at : at + size])
    assert interpreter is not None and interpreter.startswith("/")
    segments = subprocess.run(["readelf", "-l", program], capture_output=True, text=True)
    assert f"[Requesting program interpreter: {interpreter}]" in segments.stdout


@pytest.mark.parametrize(("is64", "order"), [(True, "<"), (False, ">")])
def test_a_program_names_its_interpreter_and_a_library_none(is64, order):
    loader = "/lib64/ld-linux-x86-64.so.2"
    program = elf_file(["libc.so.6"], is64=is64, order=order, interpreter=loader)
    layout = parse_layout(program)
    assert layout is not None and layout.interpreter is not None
    at, size = layout.interpreter
    assert interpreter_path(program[at : at + size]) == loader
    assert needed_of(program) == ["libc.so.6"]
    library = parse_layout(elf_file(["libc.so.6"], is64=is64, order=order))
    assert library is not None and library.interpreter is None


def test_an_interpreter_must_be_a_plain_absolute_path():
    assert interpreter_path(b"/lib/ld.so\0") == "/lib/ld.so"
    assert interpreter_path(b"/lib/ld.so") is None  # unterminated: cut short
    assert interpreter_path(b"ld.so\0") is None
    assert interpreter_path(b"/lib/\x01ld.so\0") is None
    assert interpreter_path(b"\0") is None and interpreter_path(b"") is None


def test_a_static_file_or_no_elf_needs_nothing():
    static = bytearray(elf_file([]))
    # Turn the PT_DYNAMIC program header into a PT_NOTE one.
    static[64 + 56 : 64 + 56 + 4] = (4).to_bytes(4, "little")
    layout = parse_layout(bytes(static))
    assert layout is not None and layout.dynamic is None
    assert parse_layout(b"#!/bin/sh\necho hello\n" * 10) is None
    assert parse_layout(b"\x7fELF") is None


def test_hostile_headers_give_nothing_known_never_an_error():
    good = elf_file(["libfoo.so.1"], body=bytes(300))
    rng = random.Random(7)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.choice([len(data), rng.randrange(len(data))])
        result = needed_of(bytes(data[:cut]))
        assert result is None or all(isinstance(n, str) and "/" not in n for n in result)
    # Counts and offsets far beyond the bytes at hand.
    huge = bytearray(good)
    huge[56:58] = (0xFFFF).to_bytes(2, "little")  # e_phnum
    assert parse_layout(bytes(huge)) is None
    far = bytearray(good)
    far[32:40] = (1 << 62).to_bytes(8, "little")  # e_phoff
    assert parse_layout(bytes(far)) is None


def test_strings_must_be_plain_file_names():
    table = b"\0libz.so.1\0../../etc/passwd\0lib\x01bad\0unterminated"
    assert string_at(table, 1) == "libz.so.1"
    assert string_at(table, 11) is None  # a path
    assert string_at(table, table.index(b"lib\x01")) is None
    assert string_at(table, table.index(b"unterminated")) is None
    assert string_at(table, 0) is None and string_at(table, 10_000) is None


def test_virtual_addresses_map_to_file_offsets_through_loaded_segments():
    layout = ElfLayout(
        True, "<", EM_X86_64, None, None, ((0x1000, 0, 0x800), (0x5000, 0x2000, 0x100))
    )
    assert layout.file_offset(0x1010) == 0x10
    assert layout.file_offset(0x5080) == 0x2080
    assert layout.file_offset(0x1800) is None and layout.file_offset(0x4FFF) is None


def test_where_the_loader_looks():
    x86_64 = parse_layout(elf_file([]))
    assert x86_64 is not None
    assert library_dirs(x86_64) == (
        "lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
        "lib64",
        "usr/lib64",
        "lib",
        "usr/lib",
        "usr/local/lib",
    )
    # A machine without a multiarch name here: the classic directories of its class.
    other = parse_layout(elf_file([], is64=False, machine=9999))
    assert other is not None and library_dirs(other)[:2] == ("lib32", "usr/lib32")


def test_loader_needs_go_over_the_control_socket_as_json_and_back():
    needs = LoaderNeeds("/lib64/ld-linux-x86-64.so.2", ("libc.so.6",), ("usr/lib",))
    assert LoaderNeeds.from_json(json.loads(json.dumps(needs.to_json()))) == needs
    assert LoaderNeeds.from_json({"interpreter": None, "needed": [], "dirs": []}).needed == ()
    for bad in (
        {},
        {"interpreter": 1, "needed": [], "dirs": []},
        {"interpreter": None, "needed": [2], "dirs": []},
        None,
    ):
        with pytest.raises(ValueError, match="not a loader's needs"):
            LoaderNeeds.from_json(bad)
