"""Container start/stop cycles through real containerd, runc and blockfs-snapshotter.

The lazy image (:mod:`tools.chaos._stack`) is pulled once with ``blockfs image pull``;
then each cycle starts a container from it with ``ctr run --rm`` that checks the sha256 of
one of the image's data files (a different one each cycle, round robin, so that early
cycles fetch from the registry and later ones hit the cache), and the container is
removed. After the cycles, with the image still there, no container, task or active
snapshot may be left, and the daemon's open fds and RSS are compared with what they were
after the first cycle. Then the image is removed: no layer mount, layer directory,
nbdfuse or relay process, container or snapshot may be left.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from tools.chaos import ChaosError
from tools.chaos._stack import (
    containerd_stack,
    ctr_run,
    daemon_fds,
    lazy_image,
    leftovers,
    pull,
    remove_image,
    rss_kib,
    snapshots,
)


@attrs.define
class CyclesResult:
    cycles: int
    failures: list[str] = attrs.field(factory=list)
    seconds: list[float] = attrs.field(factory=list)  # each cycle's
    fds_before: int = 0  # the daemon's, after the first cycle
    fds_after: int = 0  # after the last
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    left_with_image: list[str] = attrs.field(factory=list)  # containers, tasks, active snapshots
    left_after_removal: list[str] = attrs.field(factory=list)
    total_seconds: float = 0.0

    def ok(self) -> bool:
        return (
            not self.failures
            and not self.left_with_image
            and not self.left_after_removal
            and len(self.seconds) == self.cycles
            and self.fds_after <= self.fds_before
        )


def cycles(count: int, *, report: Callable[[str], None] = lambda line: None) -> CyclesResult:
    result = CyclesResult(count)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="blockfs-chaos-cycles-") as tmp,
        lazy_image(Path(tmp), report) as image,
        containerd_stack(report) as stack,
    ):
        pull(stack, image.ref)
        daemon = stack.snapshotter.process.pid
        paths = sorted(image.digests)
        try:
            for i in range(count):
                path = paths[i % len(paths)]
                t0 = time.monotonic()
                try:
                    out = ctr_run(stack, image.ref, f"cycle-{i}", "/bin/busybox", "sha256sum",
                                  f"/{path}")  # fmt: skip
                    if out.split()[:1] != [image.digests[path]]:
                        result.failures.append(f"cycle {i}: /{path} read as {out.strip()!r}")
                except (ChaosError, OSError) as e:
                    result.failures.append(f"cycle {i}: {e}")
                result.seconds.append(time.monotonic() - t0)
                if i == 0:
                    result.fds_before, result.rss_before_kib = daemon_fds(daemon), rss_kib(daemon)
                if (i + 1) % 20 == 0 or i + 1 == count:
                    report(f"{i + 1}/{count} cycles, {len(result.failures)} failed, "
                           f"daemon fds {daemon_fds(daemon)}")  # fmt: skip
            result.fds_after, result.rss_after_kib = daemon_fds(daemon), rss_kib(daemon)
            result.left_with_image = [
                r for r in leftovers(stack) if not r.startswith(("mount ", "layer dir ", "pid "))
            ]
            # The image's own committed snapshots stay while it exists; nothing else may.
            result.left_with_image = [
                r for r in result.left_with_image if not r.endswith(" Committed")
            ]
        finally:
            remove_image(stack, image.ref)
        result.left_after_removal = leftovers(stack)
        if snapshots(stack):
            result.left_after_removal.append("snapshots remain")
    result.total_seconds = time.monotonic() - started
    return result


def markdown(result: CyclesResult, *, machine: str, date: str, command: str) -> str:
    s = result.seconds
    per_cycle = f"median {statistics.median(s):.2f} s, max {max(s):.2f} s" if s else "none ran"
    lines = [
        "## Container start/stop cycles",
        "",
        "`python -m tools.chaos cycles` (`tools/chaos/_cycles.py`): one lazy image (busybox "
        "and 48 random files, eStargz) in a docker-registry on loopback, pulled once with "
        "`blockfs image pull` into a private containerd whose proxy snapshotter is "
        "blockfs-snapshotter; each cycle runs `ctr run --rm` of a container that checks one "
        "data file's sha256 (round robin), which runc starts and containerd removes. "
        "*Left* lists containers, tasks and active snapshots after the cycles, then (after "
        "`ctr images rm --sync`) mounts, layer directories, nbdfuse and relay processes and "
        "snapshots. The daemon's fds and RSS are taken after the first cycle and after the "
        "last. `tests/e2e/test_chaos_containers.py` runs 5 cycles in CI.",
        "",
        f"### Run of {date}",
        "",
        machine,
        f"- Command: `{command}` ({result.total_seconds:.0f} s in all, image build and pull "
        "included)",
        "",
        "| cycles | failed | s per cycle | daemon fds before → after | daemon RSS MB before → "
        "after | left with the image | left after removal |",
        "|---:|---:|---|---|---|---|---|",
        f"| {len(s)} | {len(result.failures)} | {per_cycle} | {result.fds_before} → "
        f"{result.fds_after} | {result.rss_before_kib / 1024:.0f} → "
        f"{result.rss_after_kib / 1024:.0f} | {', '.join(result.left_with_image) or 'nothing'} "
        f"| {', '.join(result.left_after_removal) or 'nothing'} |",
    ]
    for failure in result.failures[:10]:
        lines.append(f"\n- {failure[:300]}")
    return "\n".join(lines) + "\n"
