"""Benchmark: a cold start of an image optimized for its workload, against the same image
converted without a profile.

``python -m tools.optimize_bench`` builds the Python app image of ``tools.mkimage``
(busybox and libc, Python 3.11 byte-compiled, an app layer whose default command imports
a few modules and prints), pushes it to a docker-registry on loopback twice:

- ``esgz``: ``blockfs image convert`` (no prioritised files);
- ``opt``: ``blockfs image optimize`` (its default command profiled once, ``--period``),

then, each time with an empty state directory (cold chunk cache) and through a shaping
proxy in front of the registry (``tools.shaping_proxy``: ``--rate-mbit``, ``--delay-ms``
per request, as a WAN link), mounts the image with ``blockfs image mount`` and runs the
image's command in it with ``chroot``:

- ``esgz``: the plain conversion, without prefetch;
- ``esgz + prefetch``: the same with ``--prefetch`` (nothing is prioritised: no effect);
- ``opt + prefetch``: the optimized image with ``--prefetch``.

It reports the median of ``--runs`` runs of each: seconds to mount and to run the
command, the requests and bytes that crossed the link (counted by the proxy), and with
``--record FILE`` appends them to FILE as a Markdown section. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from tools.local_registry import start_registry
from tools.mkimage import APPS, build_app_image
from tools.mkimage._layers import PATH
from tools.shaping_proxy import ShapingProxy

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]
SECTION = "## Optimized images: a cold start with the workload's files prefetched"


@attrs.frozen
class Run:
    mount_seconds: float
    run_seconds: float
    requests: int
    bytes: int


@attrs.frozen
class Mode:
    name: str
    tag: str
    prefetch: bool


MODES = (Mode("esgz", "esgz", False), Mode("esgz + prefetch", "esgz", True),
         Mode("opt + prefetch", "opt", True))  # fmt: skip


def _blockfs(*args: str) -> str:
    done = subprocess.run([*BLOCKFS, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"blockfs {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def cold_start(proxy: ShapingProxy, ref: str, prefetch: bool, work: Path) -> Run:
    """Mount ``ref`` through ``proxy`` with an empty state directory and run its command."""
    root, mnt = work / "root", work / "mnt"
    mnt.mkdir(parents=True)
    before = proxy.counters()
    started = time.monotonic()
    _blockfs("image", "mount", "--plain-http", *(["--prefetch"] if prefetch else []),
             "--root", str(root), ref, str(mnt))  # fmt: skip
    mounted = time.monotonic()
    try:
        run = subprocess.run(
            ["chroot", str(mnt), *APPS["python"].cmd],
            env={"PATH": PATH}, capture_output=True, text=True, check=False,
        )  # fmt: skip
        done = time.monotonic()
        if run.returncode != 0 or run.stdout != "hello\n":
            raise SystemExit(f"the command failed in {ref}: {run.stderr}")
        used = proxy.counters() - before
    finally:
        _blockfs("image", "umount", "--root", str(root), str(mnt))
        subprocess.run(["rm", "-rf", str(work)], check=True)
    return Run(mounted - started, done - mounted, used.requests, used.bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--period", type=float, default=30.0)
    parser.add_argument("--record", metavar="FILE", help="append the figures to FILE")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="blockfs-optimize-bench-") as tmp:
        work = Path(tmp)
        print("building the python app image ...", file=sys.stderr)
        build_app_image(work / "layout", "python")
        src = f"oci:{work / 'layout'}:latest"
        with start_registry(work / "registry") as registry:
            base = f"{registry.host}/optimize-bench"
            _blockfs("image", "convert", "--plain-http", src, f"{base}:esgz")
            started = time.monotonic()
            optimized = _blockfs(
                "image", "optimize", "--plain-http", "--period", str(args.period),
                "--record-out", str(work / "profile.json"), src, f"{base}:opt",
            )  # fmt: skip
            optimize_seconds = time.monotonic() - started
            profile = json.loads((work / "profile.json").read_text())
            print(optimized, file=sys.stderr)
            rate = args.rate_mbit * 1e6
            results: dict[str, list[Run]] = {m.name: [] for m in MODES}
            with ShapingProxy(registry.host, rate_bps=rate, delay=args.delay_ms / 1000) as link:
                for i in range(args.runs):
                    for mode in MODES:
                        ref = f"{link.host}/optimize-bench:{mode.tag}"
                        run = cold_start(link, ref, mode.prefetch, work / f"run-{i}")
                        print(f"run {i + 1} {mode.name}: {run}", file=sys.stderr)
                        results[mode.name].append(run)
    files = [len(layer["files"]) for layer in profile["layers"]]
    lines = [
        SECTION,
        "",
        f"- Machine: {os.cpu_count()} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Command: `.venv/bin/python -m tools.optimize_bench --runs {args.runs} "
        f"--rate-mbit {args.rate_mbit:g} --delay-ms {args.delay_ms:g}`",
        f"- Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load_start)}; "
        f"at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "- Image: `tools/mkimage` python app (busybox and libc, Python 3.11 byte-compiled, "
        f"the app); its command `{' '.join(APPS['python'].cmd)}`",
        f"- `blockfs image optimize` took {optimize_seconds:.1f} s and prioritised "
        f"{' + '.join(map(str, files))} files (per layer, bottom first)",
        f"- Link: a shaping proxy, {args.rate_mbit:g} Mbit/s and {args.delay_ms:g} ms per "
        "request, in front of a docker-registry on 127.0.0.1",
        "",
        f"Median of {args.runs} runs of each, alternating, each with an empty state directory. "
        "Requests and bytes are what crossed the link from the mount to the command's exit "
        "(footers and TOCs included).",
        "",
        "| image | mount | run the command | total | requests | MiB over the link |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        runs = results[mode.name]
        mount = statistics.median(r.mount_seconds for r in runs)
        run_s = statistics.median(r.run_seconds for r in runs)
        total = statistics.median(r.mount_seconds + r.run_seconds for r in runs)
        requests = statistics.median(r.requests for r in runs)
        mib = statistics.median(r.bytes for r in runs) / (1 << 20)
        lines.append(
            f"| {mode.name} | {mount:.2f} s | {run_s:.2f} s | {total:.2f} s | "
            f"{requests:.0f} | {mib:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with open(args.record, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
