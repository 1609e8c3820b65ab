"""What the container parts of ``tools.chaos`` run on: a lazy image in a docker-registry
on loopback, and a private containerd whose proxy snapshotter is blockfs-snapshotter.

The image has two layers, both eStargz: busybox, and ``data/NNN.bin`` random files (from
:func:`tools.chaos.random_files_tree`), so that each read of a file nobody read before
reaches the registry through the NBD server. Its command prints ``hello``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout
from tools.chaos import ChaosError, _run, random_files_tree, regular_files
from tools.local_containerd import (
    BlockfsContainerd,
    mounts_under,
    short_tempdir,
    start_blockfs_containerd,
)
from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import DEFAULT_CACHE, DebCache, add_layer, busybox_tree, write_image

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]
HOST_BUSYBOX = Path("/bin/busybox")
REPOSITORY = "chaos-ctr"
DATA_FILES = 48
CMD = ("/bin/busybox", "echo", "hello")


@attrs.frozen
class LazyImage:
    """The image in the registry: its reference and each data file's sha256 by path."""

    registry: LocalRegistry
    ref: str
    digests: dict[str, str]  # "data/NNN.bin" -> sha256 hex


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def lazy_image(
    workdir: Path, report: Callable[[str], None], *, files: int = DATA_FILES
) -> Iterator[LazyImage]:
    """Build the image, convert it to eStargz into a registry on loopback; stop the
    registry when the block exits."""
    layout = ImageLayout.create(workdir / "layout")
    busybox, data = workdir / "src" / "busybox", workdir / "src" / "data"
    busybox.mkdir(parents=True)
    data.mkdir()
    if HOST_BUSYBOX.is_file():
        busybox_tree(busybox, binary=HOST_BUSYBOX)
    else:
        busybox_tree(busybox, DebCache(DEFAULT_CACHE))
    random_files_tree(data, files, 512)
    layers = [add_layer(layout, busybox, "busybox"), add_layer(layout, data, "random data")]
    write_image(layout, layers, "latest", cmd=CMD)
    digests = {rel: _sha256(path) for rel, path in regular_files(data).items()}
    with start_registry(workdir / "registry") as registry:
        ref = f"{registry.host}/{REPOSITORY}:latest"
        _run([*BLOCKFS, "image", "convert", "--plain-http", f"oci:{workdir / 'layout'}:latest", ref],
             "blockfs image convert")  # fmt: skip
        report(f"image {ref}: busybox + {files} random files, eStargz")
        yield LazyImage(registry, ref, digests)


@contextlib.contextmanager
def containerd_stack(report: Callable[[str], None]) -> Iterator[BlockfsContainerd]:
    """containerd with blockfs-snapshotter in a short directory under /tmp, removed after."""
    work = short_tempdir("bfs-chaos-")
    try:
        with start_blockfs_containerd(work) as stack:
            report(f"containerd and blockfs-snapshotter (pid {stack.snapshotter.process.pid})")
            yield stack
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull(stack: BlockfsContainerd, ref: str) -> None:
    ctd = stack.containerd
    out = _run([*BLOCKFS, "image", "pull", "--plain-http", "--address", str(ctd.address),
                "--namespace", ctd.namespace, ref], "blockfs image pull")  # fmt: skip
    if out.count(": lazy (") != 2:
        raise ChaosError(f"the image's layers were not both mounted lazily: {out.strip()}")


def ctr_run(stack: BlockfsContainerd, ref: str, name: str, *argv: str, timeout: float = 300) -> str:
    """Run a container to its end (removed after); its output, or ChaosError."""
    done = subprocess.run(
        stack.containerd.ctr_argv("run", "--rm", "--snapshotter", "blockfs", ref, name, *argv),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ChaosError(f"container {name} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def remove_image(stack: BlockfsContainerd, ref: str) -> None:
    stack.containerd.ctr("images", "rm", "--sync", ref, check=False)


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def snapshots(stack: BlockfsContainerd) -> list[str]:
    """``ctr snapshots ls`` rows: "KEY KIND"."""
    out = stack.containerd.ctr("snapshots", "--snapshotter", "blockfs", "ls").stdout
    return [" ".join((f[0], f[-1])) for f in (line.split() for line in out.splitlines()[1:]) if f]


def leftovers(stack: BlockfsContainerd) -> list[str]:
    """What is left once the image is removed: layer mounts, layer directories, NBD
    exports' nbdfuse and relay processes, containers, tasks, snapshots."""
    left = [f"mount {m}" for m in mounts_under(stack.work / "root")]
    layers = stack.work / "root" / "layers"
    left += [f"layer dir {p}" for p in (sorted(os.listdir(layers)) if layers.is_dir() else [])]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(stack.work).encode() in argv and (b"nbdfuse" in argv or b"relay" in argv):
            shown = argv.replace(b"\0", b" ").decode(errors="replace")[:160]
            left.append(f"pid {entry.name}: {shown}")
    for what in ("containers", "tasks"):
        rows = stack.containerd.ctr(what, "ls", check=False).stdout.splitlines()[1:]
        left += [f"{what[:-1]} {r.split()[0]}" for r in rows if r.strip()]
    left += [f"snapshot {s}" for s in snapshots(stack)]
    return left


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
