"""The whole-image demo: build, convert, push, mount lazily, run, and count the bytes.

``run_demo()`` starts a docker-registry on loopback, builds a base image from Debian
packages (busybox, Python 3.11 and a layer of data nothing reads), converts it to
eStargz and pushes it, mounts it lazily with ``blockfs image mount``, runs Python from it
under ``chroot``, and prints how many bytes were fetched against the image's compressed
size. Then it unmounts and stops everything. It needs root (mounts, chroot).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockfs.errors import BlockfsError
from blockfs.oci import ImageLayout
from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import (
    DebError,
    add_layer,
    build_base_image,
    busybox_tree,
    random_tree,
    write_image,
)

RANDOM_MB = 32
PROGRAM = (
    "import json, platform, sqlite3; "
    "print(json.dumps({'python': platform.python_version(), 'sqlite': sqlite3.sqlite_version}))"
)
FALLBACK_PROGRAM = ["/bin/busybox", "sh", "-c", "echo hello from busybox in $(pwd)"]


def _say(text: str) -> None:
    print(text, flush=True)


def _blockfs(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``blockfs ARGS`` as a user would, showing the command and its output."""
    _say(f"$ blockfs {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", *args], stdout=subprocess.PIPE, text=True
    )
    if done.stdout:
        print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: `blockfs {args[0]} {args[1]}` failed ({done.returncode})")
    return done


def _quiet(*args: str) -> str:
    """The output of ``blockfs ARGS``, not shown."""
    return subprocess.run(
        [sys.executable, "-m", "blockfs.cli", *args], stdout=subprocess.PIPE, text=True, check=True
    ).stdout


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _build(base: Path) -> bool:
    """Build the image into the layout ``base``; whether it has Python."""
    _say("== 1. build a base image from Debian packages (tools/mkimage)")
    try:
        build_base_image(base, python=True, random_mb=RANDOM_MB, report=_say)
        return True
    except DebError as e:
        _say(f"(cannot fetch Debian packages: {e}; using the host's busybox only)")
    layout = ImageLayout.create(base)
    layers = []
    for name in ("busybox", "random"):
        tree = base.parent / f"tree-{name}"
        tree.mkdir()
        if name == "busybox":
            busybox_tree(tree, binary=Path("/bin/busybox"))
        else:
            random_tree(tree, RANDOM_MB)
        layers.append(add_layer(layout, tree, f"demo: {name}"))
        shutil.rmtree(tree)
    write_image(layout, layers, "latest")
    return False


def _report(stats: dict[str, Any], registry: LocalRegistry, sent_before: int) -> None:
    size, fetched = stats["image_size"], stats["bytes_fetched"]
    sent = registry.bytes_sent() - sent_before
    _say("== 5. what was fetched")
    for layer in stats["layers"]:
        _say(
            f"  {layer['kind']:9} layer {layer['digest'][7:19]}: "
            f"{_mib(layer['bytes_fetched']):>10} of {_mib(layer['size'])}"
        )
    _say(
        f"  blockfs fetched {_mib(fetched)} of the image's {_mib(size)} compressed "
        f"({100 * fetched / size:.1f}%); the registry's access log says it sent {_mib(sent)} "
        "(manifest and config included)"
    )


def run_demo() -> int:
    """Run the demo; its exit status."""
    if os.geteuid() != 0:
        print("demo: run me as root (mounts and chroot)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="blockfs-demo-"))
    root, rootfs = workdir / "state", workdir / "rootfs"
    mounted = False
    try:
        with start_registry(workdir / "registry", access_log=True) as registry:
            _say(f"registry: docker-registry on {registry.url} (storage in {registry.root})")
            has_python = _build(workdir / "base")
            ref = f"{registry.host}/demo/app:latest"

            _say("== 2. convert every layer to eStargz and push the image")
            _blockfs("image", "convert", "--plain-http", f"oci:{workdir / 'base'}:latest", ref)

            _say("== 3. mount it lazily: footers and TOCs only, no file data")
            rootfs.mkdir()
            sent_before = registry.bytes_sent()
            started = time.monotonic()
            _blockfs("image", "mount", "--plain-http", "--root", str(root), ref, str(rootfs))
            mounted = True

            _say("== 4. run a program from it")
            command = ["/usr/bin/python3", "-c", PROGRAM] if has_python else FALLBACK_PROGRAM
            _say(f"$ chroot {rootfs} {shlex.join(command)}")
            subprocess.run(["chroot", str(rootfs), *command], check=True)
            _say(f"(mount and run took {time.monotonic() - started:.1f} s)")

            stats = json.loads(_quiet("image", "stats", "--json", "--root", str(root), str(rootfs)))
            _report(stats, registry, sent_before)

            _say("== 6. clean up")
            _blockfs("image", "umount", "--root", str(root), str(rootfs))
            mounted = False
    except (BlockfsError, subprocess.CalledProcessError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        if mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                _quiet("image", "umount", "--root", str(root), str(rootfs))
        shutil.rmtree(workdir, ignore_errors=True)
    _say("done: registry stopped, image unmounted, nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
