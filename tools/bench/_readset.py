"""The read set of a workload: the files of an image that it opens, in the order it opens them.

:func:`unpack_image` extracts an OCI layout's image into a directory (layers in order);
:func:`trace_read_set` runs the workload there with ``chroot`` under ``strace -f`` and
keeps every file the workload opened or executed that is a regular file of the image:
symlinks are followed inside the image (``/usr/bin/python3`` is ``usr/bin/python3.11``),
and the ELF interpreter or ``#!`` interpreter of each executed file is added, since the
kernel opens it without a system call of the workload's. What the workload creates
(``/tmp/h``) and what it tries and fails to open are left out.

The WAN benchmark computes its ideal transfer, and the bytes it sets against it, from
these; the image it measures is the one ``blockfs image optimize`` makes, which finds the
files from the reads its NBD server serves instead.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout, Manifest

STRACE = "/usr/bin/strace"
# "1700000000.123456 openat(AT_FDCWD, "/usr/lib/x", O_RDONLY) = 3", one system call a line
# (strace -ff writes each process to its own file, so calls are never split).
_CALL = re.compile(
    r'^(?P<time>\d+\.\d+) (?P<call>open|openat|execve|chroot)\((?:AT_FDCWD, )?"(?P<path>(?:[^"\\]|\\.)*)"'
)
_MAX_LINKS = 40  # symlinks followed in one path before giving up, as the kernel does
_PT_INTERP = 3


class ReadSetError(Exception):
    """The workload could not be traced (it failed, or strace is missing)."""


@attrs.frozen
class ReadSet:
    """The image files a workload read, in first-open order (paths from the image root,
    with a leading ``/``), and what the workload printed."""

    paths: tuple[str, ...]
    output: str


def image_layers(layout_dir: Path, tag: str = "latest") -> list[Path]:
    """The layer blobs of ``tag`` in the OCI layout ``layout_dir``, bottom first."""
    layout = ImageLayout(layout_dir)
    manifest = layout.read_document(layout.resolve(tag))
    if not isinstance(manifest, Manifest):
        raise ReadSetError(f"{layout_dir}:{tag} is an index, not an image manifest")
    return [layout.blob_path(layer.digest) for layer in manifest.layers]


def unpack_image(layout_dir: Path, dest: Path, tag: str = "latest") -> Path:
    """Extract the image ``tag`` of an OCI layout into ``dest``, its layers in order.

    The images of tools/mkimage have no whiteouts; an image with one is refused rather
    than unpacked wrong.
    """
    dest.mkdir(parents=True)
    for blob in image_layers(layout_dir, tag):
        listing = subprocess.run(
            ["tar", "-tzf", str(blob)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if any(os.path.basename(name.rstrip("/")).startswith(".wh.") for name in listing):
            raise ReadSetError(f"layer {blob.name} has whiteouts; unpack_image does not apply them")
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(dest)], check=True)
    return dest


def resolve_in_root(root: Path, path: str) -> str | None:
    """``path`` (absolute, as the workload saw it) with every symlink followed inside
    ``root``, relative to ``root``; None if it loops."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return "/".join(resolved)


def interpreter(path: Path) -> str | None:
    """What the kernel loads to run the file ``path``: the ``PT_INTERP`` of a dynamic
    64-bit ELF executable, or the program of a ``#!`` line; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(256)
        if head.startswith(b"#!"):
            words = head[2:].split(b"\n", 1)[0].split()
            return words[0].decode() if words else None
        if head[:4] != b"\x7fELF" or len(head) < 64 or head[4] != 2 or head[5] != 1:
            return None
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            if len(table) < (i + 1) * phentsize:
                break
            (kind,) = struct.unpack_from("<I", table, i * phentsize)
            if kind == _PT_INTERP:
                (offset,) = struct.unpack_from("<Q", table, i * phentsize + 8)
                (size,) = struct.unpack_from("<Q", table, i * phentsize + 32)
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _regular_files(root: Path) -> set[str]:
    found = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found.add(str(path.relative_to(root)))
    return found


def _calls(trace_dir: Path) -> list[tuple[float, str, str]]:
    """Every successful traced call of every process: (time, call, path), in time order."""
    calls = []
    for trace in trace_dir.iterdir():
        for line in trace.read_text(errors="replace").splitlines():
            match = _CALL.match(line)
            if match is not None:
                path = match["path"].replace('\\"', '"').replace("\\\\", "\\")
                calls.append((float(match["time"]), match["call"], path))
    return sorted(calls)


def trace_read_set(root: Path, argv: Sequence[str], *, env: Mapping[str, str]) -> ReadSet:
    """Run ``argv`` chrooted into ``root`` (an unpacked image) under strace; its read set.

    Needs root (chroot). The workload may write into ``root`` (``/tmp``); only files that
    were regular files of the image before it ran are in the read set.
    """
    if not os.access(STRACE, os.X_OK):
        raise ReadSetError(f"{STRACE} is not installed (Debian package strace)")
    image_files = _regular_files(root)
    with tempfile.TemporaryDirectory(prefix="blockfs-strace-") as tmp:
        done = subprocess.run(
            [STRACE, "-ff", "-ttt", "-qq", "-z", "-s", "4096",
             "-e", "trace=open,openat,execve,chroot", "-o", f"{tmp}/trace",
             "chroot", str(root), *argv],
            capture_output=True, text=True, env=dict(env), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            raise ReadSetError(
                f"the workload {list(argv)} failed in a chroot of {root} "
                f"({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        calls = _calls(Path(tmp))
    chrooted = [i for i, (_, call, _) in enumerate(calls) if call == "chroot"]
    if not chrooted:
        raise ReadSetError("strace saw no chroot call")
    paths: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> str | None:
        relative = resolve_in_root(root, path if path.startswith("/") else "/" + path)
        if relative is None or relative not in image_files:
            return None
        if relative not in seen:
            seen.add(relative)
            paths.append("/" + relative)
        return relative

    # Before the chroot call, the calls are those of chroot(8) itself, on the host.
    for _, call, path in calls[chrooted[0] + 1 :]:
        relative = add(path)
        if call == "execve" and relative is not None:
            loader = interpreter(root / relative)
            if loader is not None:
                add(loader)
    return ReadSet(tuple(paths), done.stdout)
