"""App images: a base layer, a runtime layer, optional unread data and an app layer.

They are laid out as images are in practice (``FROM debian`` then a runtime, then the
application), for the WAN benchmark (``python -m tools.bench wan``):

- ``python``: busybox and the C library; Debian's Python 3.11 with its standard library
  byte-compiled, as the package's installation leaves it; ``--random-mb`` of data
  nothing reads; ``/app/hello.py``;
- ``gcc``: busybox and the C library; the gcc-12 toolchain (gcc-12, cpp-12, binutils,
  libc6-dev and what they need to run, ``gcc`` and ``cc`` naming gcc-12); optional
  unread data; ``/hello.c``.

Each app's :class:`App` also says what command its workload runs.
"""

from __future__ import annotations

import compileall
import contextlib
import importlib.util
import io
import os
import py_compile
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import attrs

from tools.debs import DebCache, DebError
from tools.mkimage._layers import MTIME, busybox_tree, debian_tree, entries, python_tree

# The C library, which every other package needs: the base layer's.
LIBC = ("libc6",)
GCC = ("gcc-12", "cpp-12", "binutils", "libc6-dev")

PYTHON_PROGRAM = "import json, email, asyncio, http.client; print('hello')"
HELLO_C = b'#include <stdio.h>\n\nint main(void)\n{\n    puts("hello");\n    return 0;\n}\n'


@attrs.frozen
class App:
    """An app image: how to build its runtime layer, its app files and its workload."""

    name: str
    runtime: str  # the runtime layer's name in the image history
    make_runtime: Callable[[Path, DebCache, Collection[str]], None]
    files: Mapping[str, bytes]  # the app layer: path in the image -> content
    workload: tuple[str, ...]  # the command the benchmark runs in a container
    cmd: tuple[str, ...]  # the image's default command


def base_tree(dest: Path, debs: DebCache) -> list[str]:
    """The base layer: busybox and the C library. Returns the packages it holds."""
    busybox_tree(dest, debs)
    return debian_tree(dest, debs, LIBC)


def byte_compile(tree: Path, directory: str) -> int:
    """Byte-compile every module below ``tree / directory`` as Debian's ``py3compile``
    does when it installs the package; returns how many ``.pyc`` files it wrote.

    The ``.pyc`` files record their source's mtime and size (timestamp invalidation, the
    default), so every file of ``tree`` first gets the fixed mtime that the layer's tar
    gives it: the interpreter in the image then takes the ``.pyc`` without opening the
    source. This interpreter compiles them, so it must be the image's version (3.11);
    the paths they record are the image's.
    """
    if sys.version_info[:2] != (3, 11):
        raise DebError(f"byte-compiling Python 3.11's library needs Python 3.11, not {sys.version}")
    for path in entries(tree):
        if not path.is_symlink():
            os.utime(path, (MTIME, MTIME))
    top = tree / directory
    # Modules that do not compile (Python 2 examples in the library's data) are skipped,
    # as py3compile skips them; compile_dir reports them on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        compileall.compile_dir(
            str(top),
            quiet=2,
            stripdir=str(tree),
            prependdir="/",
            workers=0,
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
        )
    # A module that is a symlink out of the library (Debian's sitecustomize.py points to
    # /etc) was compiled from the host's file: compile it from the tree's.
    for link in top.rglob("*.py"):
        target = os.readlink(link) if link.is_symlink() else ""
        if target.startswith("/") and (tree / target[1:]).is_file():
            py_compile.compile(
                str(tree / target[1:]),
                cfile=importlib.util.cache_from_source(str(link)),
                dfile="/" + str(link.relative_to(tree)),
                invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
            )
    return sum(1 for _ in top.rglob("*.pyc"))


def python_runtime(dest: Path, debs: DebCache, base: Collection[str]) -> None:
    """Debian's Python 3.11, its standard library byte-compiled, without the base's packages."""
    python_tree(dest, debs, exclude=base)
    if byte_compile(dest, "usr/lib/python3.11") == 0:
        raise DebError("the Python layer has no byte-compiled module")


def gcc_runtime(dest: Path, debs: DebCache, base: Collection[str]) -> None:
    """The gcc-12 toolchain without the base's packages; ``gcc`` and ``cc`` run gcc-12."""
    debian_tree(dest, debs, GCC, exclude=base)
    bin_dir = dest / "usr" / "bin"
    if not (bin_dir / "gcc-12").exists():
        raise DebError("gcc-12 has no usr/bin/gcc-12")
    for name in ("gcc", "cc"):
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to("gcc-12")


def files_tree(dest: Path, files: Mapping[str, bytes]) -> None:
    """``files`` (path in the image -> content) below ``dest``, mode 0644."""
    for name, content in files.items():
        path = dest / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, 0o644)


APPS: dict[str, App] = {
    "python": App(
        name="python",
        runtime="python3.11, byte-compiled",
        make_runtime=python_runtime,
        files={"/app/hello.py": PYTHON_PROGRAM.encode() + b"\n"},
        workload=("/usr/bin/python3", "-c", PYTHON_PROGRAM),
        cmd=("/usr/bin/python3", "/app/hello.py"),
    ),
    "gcc": App(
        name="gcc",
        runtime="gcc-12 toolchain",
        make_runtime=gcc_runtime,
        files={"/hello.c": HELLO_C},
        workload=("/bin/sh", "-c", "gcc -o /tmp/h /hello.c && /tmp/h"),
        cmd=("/bin/sh", "-c", "gcc -o /tmp/h /hello.c && /tmp/h"),
    ),
}
