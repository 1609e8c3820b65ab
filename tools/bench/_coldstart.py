"""One cold start of a container through containerd, timed phase by phase, with what
crossed the link in each.

:func:`cold_start` starts a new private containerd and blockfs-snapshotter (empty
content store, snapshots and chunk cache: ``tools.local_containerd``), drops the page
cache (ctr, the client of the create and run phases, is read back in every mode), then:

1. pull: ``ctr images pull`` for containerd's own snapshotters (every layer downloaded
   and unpacked), ``blockfs image pull`` for blockfs (layers mounted lazily), or with
   ``cri`` a CRI ``PullImage`` call to containerd's CRI plugin pulling for blockfs, as
   the kubelet makes it (containerd pulls, the snapshotter serves the layers lazily);
2. create: ``ctr containers create`` (the container's snapshot);
3. run: ``ctr tasks start`` until the container's first line of output (ready).

It reads the shaping proxy's counters at the end of each phase, so that the requests and
bytes of each phase, and those at ready, are known, and keeps the proxy's log of the
run's requests. Then it lets the container finish, removes the image and stops
everything. Needs root.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from tools.demo_container import pull_command, remove_image
from tools.local_containerd import cri_call, short_tempdir, start_blockfs_containerd
from tools.shaping_proxy import Counters, ShapingProxy

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# Where runc keeps its state when ctr is not told (ctr tasks start has no --runc-root):
# a directory per containerd namespace, ours unique and removed afterwards.
RUNC_STATE = Path("/run/containerd/runc")


class ColdStartError(BlockfsError):
    """A step of the cold start failed."""


@attrs.frozen
class ColdStart:
    """One pull, create and run of a container, from a cold state, to its first output."""

    pull_seconds: float
    create_seconds: float
    run_seconds: float  # task start to the first line of output
    line: str  # that line
    pull: Counters  # what crossed the link during each phase
    create: Counters
    run: Counters
    after: Counters  # from the first line until the container and its image were gone
    requests: list[dict[str, Any]]  # the proxy's log of the run, times from its start

    @property
    def total_seconds(self) -> float:
        return self.pull_seconds + self.create_seconds + self.run_seconds

    @property
    def at_ready(self) -> Counters:
        """What crossed the link from the start of the pull to the first line of output."""
        return Counters(
            *(
                getattr(self.pull, f) + getattr(self.create, f) + getattr(self.run, f)
                for f in ("requests", "bytes", "request_bytes")
            )
        )


def drop_caches() -> None:
    """Write dirty pages back and drop the page cache, dentries and inodes."""
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("3\n")


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise ColdStartError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-3000:]}")


def cold_start(
    proxy: ShapingProxy,
    ref: str,
    argv: Sequence[str],
    *,
    snapshotter: str,
    snapshotter_args: Sequence[str] = (),
    name: str = "wan",
    cri: bool = False,
) -> ColdStart:
    """Pull ``ref`` (which names ``proxy``) for ``snapshotter`` (with ``cri``, through
    containerd's CRI plugin for blockfs), create a container and run ``argv`` in it to its
    first line of output, from a cold state."""
    work = short_tempdir("bfs-wan-")
    try:
        with start_blockfs_containerd(
            work,
            snapshotter_args=snapshotter_args,
            cri_plain_http=[proxy.host] if cri else None,
        ) as stack:
            ctd = stack.containerd
            # As on a node, whose daemon runs long before a pull: its NBD server has
            # started, the code of a pull is loaded.
            stack.snapshotter.wait_settled()
            try:
                drop_caches()
                # ctr, which creates and starts the container, from a warm page cache in
                # every mode: an overlayfs pull runs it before its create, a blockfs pull
                # does not, and a node's kubelet is a process that runs all along.
                ctd.ctr("version")
                first_request = proxy.counters().requests
                marks = [proxy.counters()]
                started = time.monotonic()
                if cri:
                    cri_call(str(ctd.address), "PullImage", ref)
                else:
                    pull, shown = pull_command(stack, ref, snapshotter)
                    _run(pull, shown)
                pulled = time.monotonic()
                marks.append(proxy.counters())
                # "--": ctr moves flags found among the arguments (python3's -c is its
                # --config) before them, except after "--".
                ctd.ctr("containers", "create", "--snapshotter", snapshotter, "--", ref, name,
                        *argv)  # fmt: skip
                created = time.monotonic()
                marks.append(proxy.counters())
                start = ctd.ctr_argv("tasks", "start", "--fifo-dir", str(ctd.dir / "fifo"), name)
                with subprocess.Popen(
                    start, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True,
                ) as proc:  # fmt: skip
                    assert proc.stdout is not None and proc.stderr is not None
                    line = proc.stdout.readline()
                    ready = time.monotonic()
                    marks.append(proxy.counters())
                    proc.stdout.read()
                    errors = proc.stderr.read()
                if proc.returncode != 0 or not line:
                    raise ColdStartError(
                        f"`ctr tasks start` of {ref} failed ({proc.returncode}): {errors.strip()}"
                    )
                ctd.ctr("containers", "rm", name)
            finally:
                remove_image(ctd, ref)
                with contextlib.suppress(OSError):
                    (RUNC_STATE / ctd.namespace).rmdir()
            marks.append(proxy.counters())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ColdStart(
        pull_seconds=pulled - started,
        create_seconds=created - pulled,
        run_seconds=ready - created,
        line=line.rstrip("\n"),
        pull=marks[1] - marks[0],
        create=marks[2] - marks[1],
        run=marks[3] - marks[2],
        after=marks[4] - marks[3],
        requests=[
            {
                "method": r.method,
                "path": r.path,
                "range": r.range,
                "status": r.status,
                "bytes": r.bytes,
                "start": round(r.started - started, 4),
                "end": None if r.finished is None else round(r.finished - started, 4),
            }
            for r in proxy.records()[first_request:]
        ],
    )
