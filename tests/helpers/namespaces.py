"""A process in a new mount namespace, as containers and services with a private mount
namespace make them on a node: it holds a copy of every mount there was when it started."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def namespace_sleeper(*unshare_options: str) -> Iterator[int]:
    """``unshare -m [OPTIONS] sleep 600`` for the block: its pid, once it runs in its new
    namespace (unshare execs sleep there); killed afterwards.

    ``unshare -m`` alone makes every mount of the new namespace private, so unmounts here
    no longer reach its copies; ``--propagation unchanged`` keeps them peers or slaves of
    the mounts here where those are shared."""
    proc = subprocess.Popen(
        ["unshare", "-m", *unshare_options, "sleep", "600"], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while _comm(proc.pid) != "sleep":
            assert proc.poll() is None, "unshare -m failed"
            assert time.monotonic() < deadline, "unshare -m did not start sleep"
            time.sleep(0.01)
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def mountpoints_of(pid: int | str, under: Path) -> list[str]:
    """The mount points at or below ``under`` in the mount namespace of ``pid``."""
    prefix = str(under.resolve())
    found = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        mountpoint = line.split(" ")[4].replace("\\040", " ")
        if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
            found.append(mountpoint)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
