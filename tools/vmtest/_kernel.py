"""The guest kernel: vmlinuz and the modules the VM test needs, from Debian's kernel package.

The package is unpacked once into a temporary directory; only vmlinuz and the closure of
the wanted modules under their dependencies are kept in the cache. Dependencies are read
from each module's ``.modinfo`` ELF section, because the package ships no modules.dep
(depmod writes it at installation) and the host may have no modinfo(8).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from tools.debs import Deb, extract
from tools.vmtest._errors import VMTestError

# ELF64 little-endian header fields used here: 40 e_shoff (u64), 58 e_shentsize (u16),
# 60 e_shnum (u16), 62 e_shstrndx (u16).
_ELF_SH = struct.Struct("<Q10xHHH")
_ELF_SH_OFFSET = 40
# ELF64 section header, 64 bytes: 0 sh_name (offset in the section name table), 4 sh_type,
# 8 sh_flags, 16 sh_addr, 24 sh_offset, 32 sh_size, 40 sh_link, 44 sh_info,
# 48 sh_addralign, 56 sh_entsize.
_SECTION = struct.Struct("<IIQQQQIIQQ")

_KERNEL_JSON = "kernel.json"


@attrs.frozen
class GuestKernel:
    """A kernel to boot and its modules in load order (dependencies first), with arguments."""

    release: str  # what uname -r prints in the guest
    package: str  # the package it came from, name_version_arch
    vmlinuz: Path
    modules: tuple[tuple[Path, str], ...]  # (module file, insmod arguments)


def module_name(filename: str) -> str:
    """The kernel's name for a module file: ``crc32c-intel.ko`` -> ``crc32c_intel``."""
    return filename.removesuffix(".ko").replace("-", "_")


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (first value of each key)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, shentsize, shnum, shstrndx = _ELF_SH.unpack_from(data, _ELF_SH_OFFSET)
    if shentsize != _SECTION.size or shstrndx >= shnum:
        raise ValueError("unexpected ELF section header table")
    sections = [_SECTION.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for section in sections:
        name_start = names_offset + section[0]
        name = data[name_start : data.index(b"\0", name_start)]
        if name == b".modinfo":
            offset, size = section[4], section[5]
            info: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    return {}


def prepare_kernel(
    deb: Deb, deb_path: Path, cache: Path, wanted: Sequence[tuple[str, str]]
) -> GuestKernel:
    """vmlinuz and the ``wanted`` modules (name, insmod arguments) with their dependencies.

    Modules built into the kernel are left out. Cached under ``cache/deb.key``.
    """
    target = cache / deb.key
    record = target / _KERNEL_JSON
    wanted_key = [list(w) for w in wanted]
    if record.exists():
        data = json.loads(record.read_text())
        if data.get("wanted") == wanted_key:
            return _load(target, data)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".kernel-"))
    try:
        extract(deb_path, tmp)
        staged = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".kernel-out-"))
        try:
            data = _select(tmp, staged, wanted)
            data["wanted"] = wanted_key
            (staged / _KERNEL_JSON).write_text(json.dumps(data, indent=2))
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staged, target)
            except OSError:
                if not record.exists():  # else a concurrent run prepared it first
                    raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(target, json.loads(record.read_text()))


def _load(target: Path, data: dict[str, object]) -> GuestKernel:
    modules = data["modules"]
    assert isinstance(modules, list)
    return GuestKernel(
        release=str(data["release"]),
        package=target.name,
        vmlinuz=target / "vmlinuz",
        modules=tuple((target / "modules" / name, args) for name, args in modules),
    )


def _select(tree: Path, out: Path, wanted: Sequence[tuple[str, str]]) -> dict[str, object]:
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise VMTestError(f"the kernel package holds {len(vmlinuz)} vmlinuz files, not one")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    moddir = tree / "lib" / "modules" / release
    if not moddir.is_dir():
        raise VMTestError(f"the kernel package has no lib/modules/{release}")
    builtin = {
        module_name(os.path.basename(line.strip()))
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko"):
        files[module_name(path.name)] = path

    order: list[tuple[str, str]] = []
    seen: set[str] = set()
    args_of = {module_name(name): args for name, args in wanted}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise VMTestError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise VMTestError(f"kernel {release} has no module {name!r} (needed by {chain})")
        info = modinfo(files[name].read_bytes())
        for dep in filter(None, info.get("depends", "").split(",")):
            visit(module_name(dep), (*chain, name))
        seen.add(name)
        order.append((name, args_of.get(name, "")))

    for name, _ in wanted:
        visit(module_name(name), ())

    (out / "modules").mkdir(parents=True)
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    listed = []
    for name, args in order:
        filename = f"{name}.ko"
        shutil.copyfile(files[name], out / "modules" / filename)
        listed.append([filename, args])
    return {"release": release, "modules": listed}
