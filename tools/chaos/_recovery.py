"""Crash recovery times on this host's attach path (nbdfuse without ``nbd.ko``).

Three crashes, each tried ``tries`` times, every try reading files nobody read before (so
that each read must reach the restarted NBD server and the registry):

- **nbdkit under the snapshotter**, while a container holds a file of the lazy data layer
  open: ``kill -9`` of the NBD server; at once a new container from the image is started
  (``ctr run``, it prints a data file's sha256) and the holding container reads another
  file (``ctr tasks exec``). Timed from the kill: the new container's output, and the
  old container's read, each checked against the file's true sha256;
- **the blockfs-snapshotter daemon**: ``kill -9``, a new daemon started at once (as
  systemd's ``Restart=always`` would, one second later), a new container started over and
  over until it prints; timed from the kill;
- **nbdkit under a standalone** ``blockfs image mount``: ``kill -9`` of every layer's NBD
  server, then a read of a file nobody read; timed from the kill to its right bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from tools.chaos import BLOCKFS, ChaosError, _run
from tools.chaos._stack import LazyImage, containerd_stack, ctr_run, lazy_image, pull, remove_image
from tools.local_containerd import BlockfsContainerd, mounts_under, start_snapshotter

DEADLINE = 120.0


@attrs.define
class Measure:
    what: str
    seconds: list[float] = attrs.field(factory=list)
    failures: list[str] = attrs.field(factory=list)

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


@attrs.define
class RecoveryResult:
    tries: int
    measures: list[Measure] = attrs.field(factory=list)
    total_seconds: float = 0.0

    def ok(self) -> bool:
        return all(not m.failures and len(m.seconds) == self.tries for m in self.measures)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _replaced(pidfiles: list[Path], old: set[int]) -> bool:
    """Whether each pid file names a live process that is none of ``old``."""
    pids = [_pid(f) for f in pidfiles]
    return all(p is not None and p not in old and _alive(p) for p in pids)


def _wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise ChaosError(f"gave up waiting: {what}")
        time.sleep(0.1)


def _timed(measure: Measure, killed: float, step: Callable[[], None]) -> None:
    try:
        step()
    except (ChaosError, OSError, subprocess.SubprocessError) as e:
        measure.failures.append(str(e)[:300])
    else:
        measure.seconds.append(time.monotonic() - killed)


def _check_digest(out: str, want: str, what: str) -> None:
    if out.split()[:1] != [want]:
        raise ChaosError(f"{what}: read {out.strip()!r}, expected sha256 {want}")


def snapshotter_nbdkit(
    stack: BlockfsContainerd, image: LazyImage, files: list[str], tries: int, new: Measure,
    old: Measure, report: Callable[[str], None],
) -> None:  # fmt: skip
    ctd = stack.containerd
    ctd.ctr("run", "-d", "--snapshotter", "blockfs", image.ref, "holder",
            "/bin/busybox", "sh", "-c", f"exec 3</{files.pop()}; exec /bin/busybox sleep 3600")  # fmt: skip
    try:
        _wait(lambda: "RUNNING" in ctd.ctr("tasks", "ls").stdout, "the holding container runs")
        pidfile = stack.work / "root" / "run" / "nbdkit.pid"
        for i in range(tries):
            server = _pid(pidfile)
            if server is None:
                raise ChaosError(f"no NBD server pid in {pidfile}")
            a, b = files.pop(), files.pop()

            def start_new(a: str = a, i: int = i) -> None:
                out = ctr_run(stack, image.ref, f"after-{i}", "/bin/busybox", "sha256sum", f"/{a}")
                _check_digest(out, image.digests[a], f"new container {i}")

            def read_old(b: str = b, i: int = i) -> None:
                done = ctd.ctr("tasks", "exec", "--exec-id", f"read-{i}", "holder",
                               "/bin/busybox", "sha256sum", f"/{b}", check=False)  # fmt: skip
                if done.returncode != 0:
                    raise ChaosError(f"holding container's read {i}: {done.stderr.strip()}")
                _check_digest(done.stdout, image.digests[b], f"holding container {i}")

            killed = time.monotonic()
            os.kill(server, signal.SIGKILL)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(_timed, new, killed, start_new),
                        pool.submit(_timed, old, killed, read_old)]  # fmt: skip
                for job in jobs:
                    job.result()
            report(f"kill -9 of the snapshotter's nbdkit {i}: new container {new.seconds[-1:]}, "
                   f"holding container {old.seconds[-1:]}, failures {new.failures + old.failures}")  # fmt: skip
            _wait(functools.partial(_replaced, [pidfile], {server}), "the NBD server restarted")
            time.sleep(2)  # the relays reconnect
    finally:
        ctd.ctr("tasks", "kill", "--signal", "SIGKILL", "holder", check=False)
        _wait(lambda: ctd.ctr("tasks", "delete", "holder", check=False).returncode == 0
              or "holder" not in ctd.ctr("tasks", "ls").stdout, "the holding container ends")  # fmt: skip
        ctd.ctr("containers", "delete", "holder", check=False)


def snapshotter_daemon(
    stack: BlockfsContainerd, image: LazyImage, files: list[str], tries: int, measure: Measure,
    exits: contextlib.ExitStack, report: Callable[[str], None],
) -> None:  # fmt: skip
    for i in range(tries):
        a = files.pop()
        daemon = stack.snapshotter
        killed = time.monotonic()
        daemon.stop(signal.SIGKILL)
        stack.snapshotter = exits.enter_context(
            start_snapshotter(daemon.root, daemon.socket, log_path=daemon.log_path)
        )

        def start_new(a: str = a, i: int = i) -> None:
            deadline = time.monotonic() + DEADLINE
            while True:
                try:
                    out = ctr_run(stack, image.ref, f"daemon-{i}", "/bin/busybox", "sha256sum",
                                  f"/{a}")  # fmt: skip
                    break
                except ChaosError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            _check_digest(out, image.digests[a], f"container after the daemon's restart {i}")

        _timed(measure, killed, start_new)
        report(f"kill -9 of blockfs-snapshotter {i}: {measure.seconds[-1:]} {measure.failures}")


def standalone_nbdkit(
    image: LazyImage, work: Path, files: list[str], tries: int, measure: Measure,
    report: Callable[[str], None],
) -> None:  # fmt: skip
    root, mnt = work / "root", work / "mnt"
    mnt.mkdir(parents=True)
    _run([*BLOCKFS, "image", "mount", "--plain-http", "--root", str(root), image.ref, str(mnt)],
         "blockfs image mount")  # fmt: skip
    try:
        for i in range(tries):
            pidfiles = sorted(root.glob("mounts/**/nbdkit.pid"))
            servers = [p for p in map(_pid, pidfiles) if p is not None and _alive(p)]
            if not servers:
                raise ChaosError(f"no running NBD server under {root}/mounts")
            a = files.pop()

            def read(a: str = a, i: int = i) -> None:
                digest = hashlib.sha256((mnt / a).read_bytes()).hexdigest()
                _check_digest(digest, image.digests[a], f"standalone read {i}")

            killed = time.monotonic()
            for pid in servers:
                os.kill(pid, signal.SIGKILL)
            _timed(measure, killed, read)
            report(f"kill -9 of a standalone mount's nbdkit {i}: {measure.seconds[-1:]} "
                   f"{measure.failures}")  # fmt: skip
            _wait(functools.partial(_replaced, pidfiles, set(servers)),
                  "the standalone NBD servers restarted")  # fmt: skip
    finally:
        _run([*BLOCKFS, "image", "umount", "--root", str(root), str(mnt)], "blockfs image umount")
    left = mounts_under(work)
    if left:
        measure.failures.append(f"left mounted: {left}")


def recovery(tries: int, *, report: Callable[[str], None] = lambda line: None) -> RecoveryResult:
    result = RecoveryResult(tries)
    new = Measure("new container prints, after kill -9 of the snapshotter's nbdkit")
    old = Measure("running container reads unread data, after kill -9 of the snapshotter's nbdkit")
    daemon = Measure("new container prints, after kill -9 of blockfs-snapshotter")
    standalone = Measure("read of unread data, after kill -9 of `blockfs image mount`'s nbdkit")
    result.measures = [new, old, daemon, standalone]
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="blockfs-chaos-recovery-") as tmp,
        lazy_image(Path(tmp), report, files=8 * tries + 2) as image,
    ):
        files = sorted(image.digests, reverse=True)
        with containerd_stack(report) as stack, contextlib.ExitStack() as exits:
            pull(stack, image.ref)
            try:
                snapshotter_nbdkit(stack, image, files, tries, new, old, report)
                snapshotter_daemon(stack, image, files, tries, daemon, exits, report)
            finally:
                remove_image(stack, image.ref)
        standalone_nbdkit(image, Path(tmp) / "standalone", files, tries, standalone, report)
    result.total_seconds = time.monotonic() - started
    return result


def markdown(result: RecoveryResult, *, machine: str, date: str, command: str) -> str:
    lines = [
        "## Crash recovery times",
        "",
        "`python -m tools.chaos recovery` (`tools/chaos/_recovery.py`), on this host's "
        "nbdfuse path: a lazy image (busybox and random files, eStargz) in a docker-registry "
        "on loopback, a private containerd with blockfs-snapshotter, and a standalone "
        "`blockfs image mount` of the same image. Each try kills with `kill -9` and reads "
        "files nobody read before, each checked against its sha256; seconds from the kill. "
        "The daemon is started again at once after its kill (the systemd unit waits 1 s: "
        "`RestartSec=1`).",
        "",
        f"### Run of {date}",
        "",
        machine,
        f"- Command: `{command}` ({result.total_seconds:.0f} s in all)",
        "",
        "| crash, then | tries | median s | each try, s | failures |",
        "|---|---:|---:|---|---:|",
    ]
    for m in result.measures:
        median = m.median()
        lines.append(
            f"| {m.what} | {len(m.seconds) + len(m.failures)} "
            f"| {'-' if median is None else f'{median:.2f}'} "
            f"| {', '.join(f'{s:.2f}' for s in m.seconds)} | {len(m.failures)} |"
        )
    lines += [
        "",
        "On hosts with `nbd.ko` the VM test measures the same for nbdkit under the "
        "snapshotter: `tools/vm-test --scenario snapshotter` prints *recovery: a new "
        "container printed its output N s after kill -9 of nbdkit*.",
        "",
        "The standalone mount's supervising shell starts a dead server again at once, then "
        "after 1, 2, 4 and 8 s if it dies again within 60 s of its start; the tries here "
        "follow one another, so its later tries show that back-off.",
    ]
    for m in result.measures:
        for failure in m.failures[:5]:
            lines.append(f"\n- {m.what}: {failure}")
    return "\n".join(lines) + "\n"
