"""Helpers of the attach tests: the test nbdkit plugin, export names, leftover checks."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import attrs

from blockfs.host.mounts import loop_backing_file, loop_detach, read_mountinfo, umount

# A test-only nbdkit Python plugin: serves the files of a JSON map {export name: path}
# read-only, in parallel, with multi-conn, and refuses unknown names with ENOENT.
TEST_PLUGIN = """
import builtins
import errno
import json
import os

import nbdkit

API_VERSION = 2
_exports = {}


def config(key, value):
    if key != "exports":
        raise RuntimeError(f"unknown parameter {key}")
    with builtins.open(value) as f:
        _exports.update(json.load(f))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def list_exports(readonly, is_tls):
    return list(_exports)


def default_export(readonly, is_tls):
    return next(iter(_exports))


def open(readonly):
    name = nbdkit.export_name()
    if name not in _exports:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}")
    return os.open(_exports[name], os.O_RDONLY)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    data = os.pread(h, len(buf), offset)
    if len(data) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("short read")
    buf[:] = data
"""

LAYER_EXPORT = "layer-a"
# Needs percent-encoding in an NBD URI: a colon, a slash and a space.
ODD_EXPORT = "sha256:0123/odd name"
NOT_EROFS_EXPORT = "not-erofs"


@attrs.frozen
class ServedExports:
    """A running nbdkit: its unix socket and the file behind each export name."""

    socket: str
    images: dict[str, Path]


def leftovers(path: Path) -> list[str]:
    """What still uses ``path``: mounts at or below it, loop devices backed by files below
    it, and live (non-zombie) processes whose command line names it."""
    found: list[str] = []
    prefix = str(path.resolve())
    for entry in read_mountinfo():
        if entry.mountpoint == prefix or entry.mountpoint.startswith(prefix + "/"):
            found.append(f"mount {entry.fstype} {entry.source} on {entry.mountpoint}")
    for loop in Path("/sys/block").glob("loop*"):
        backing = loop_backing_file(f"/dev/{loop.name}")
        if backing is not None and backing.startswith(prefix + "/"):
            found.append(f"/dev/{loop.name} backed by {backing}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if prefix.encode() in cmdline and state != b"Z":
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {proc.name}: {args}")
    return found


def tree_listing(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry below ``root``: relative path → (kind, content or symlink target)."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("symlink", os.fsencode(os.readlink(p)))
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def nbd_ko_present() -> bool:
    """Whether this host has the kernel NBD driver, loaded or as a module file."""
    if os.path.isdir("/sys/module/nbd"):
        return True
    return any(Path(f"/lib/modules/{os.uname().release}").rglob("nbd.ko*"))


def force_cleanup(path: Path) -> None:
    """Undo by force whatever still uses ``path``, so a broken attach cannot leak into
    other tests: lazy-unmount mounts below it, detach loop devices, kill processes."""
    prefix = str(path.resolve())
    mounts = [
        e.mountpoint
        for e in read_mountinfo()
        if e.mountpoint == prefix or e.mountpoint.startswith(prefix + "/")
    ]
    for mountpoint in reversed(mounts):  # newest first: EROFS before the FUSE mount under it
        with contextlib.suppress(OSError):
            umount(mountpoint, lazy=True)
    for loop in Path("/sys/block").glob("loop*"):
        backing = loop_backing_file(f"/dev/{loop.name}")
        if backing is not None and backing.startswith(prefix + "/"):
            with contextlib.suppress(OSError):
                loop_detach(f"/dev/{loop.name}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if prefix.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
