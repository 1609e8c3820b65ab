"""Benchmark: mount an image lazily and run a command, against pulling and extracting it.

``python -m tools.pull_bench`` builds a base image (busybox, Python 3.11, a layer of
data nothing reads), converts it to eStargz and pushes it to a docker-registry on
loopback, then, side by side in one run and over that same registry, each time with an
empty state directory (cold chunk cache):

- lazy: ``blockfs image mount REF DIR``, then ``chroot DIR python3 -c …``;
- full pull: ``blockfs image mount --no-lazy REF DIR`` (every layer downloaded, checked
  against its diff_id and extracted, as a normal pull does), then the same command.

It reports the median of ``--runs`` runs of each, the bytes each fetched, and with
``--record FILE`` appends the figures to FILE as a Markdown section. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import build_base_image

PROGRAM = "import json, sqlite3, ssl; print(json.dumps({'ok': True}))"
SECTION = "## Registry: lazy mount vs full pull"


@attrs.frozen
class Run:
    """One mount-and-run: seconds to mount, seconds to run the command, bytes fetched."""

    mount_seconds: float
    run_seconds: float
    bytes_fetched: int
    registry_bytes: int
    image_bytes: int  # the image's compressed size
    layers: int

    @property
    def total_seconds(self) -> float:
        return self.mount_seconds + self.run_seconds


def _blockfs(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"blockfs {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _one_run(ref: str, workdir: Path, registry: LocalRegistry, *, lazy: bool) -> Run:
    root, rootfs = workdir / "state", workdir / "rootfs"
    rootfs.mkdir()
    before = registry.bytes_sent()
    started = time.monotonic()
    extra = [] if lazy else ["--no-lazy"]
    _blockfs("image", "mount", "--plain-http", "--root", str(root), *extra, ref, str(rootfs))
    mounted = time.monotonic()
    try:
        subprocess.run(
            ["chroot", str(rootfs), "/usr/bin/python3", "-c", PROGRAM],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ran = time.monotonic()
        stats = json.loads(_blockfs("image", "stats", "--json", "--root", str(root), str(rootfs)))
    finally:
        _blockfs("image", "umount", "--root", str(root), str(rootfs))
        shutil.rmtree(root, ignore_errors=True)
        rootfs.rmdir()
    return Run(
        mounted - started,
        ran - mounted,
        stats["bytes_fetched"],
        registry.bytes_sent() - before,
        stats["image_size"],
        len(stats["layers"]),
    )


def _median(runs: list[Run], field: str) -> float:
    return float(statistics.median(getattr(r, field) for r in runs))


def _summary(runs: list[Run]) -> dict[str, float]:
    fields = ("mount_seconds", "run_seconds", "total_seconds", "bytes_fetched", "registry_bytes")
    return {field: _median(runs, field) for field in fields}


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / (1 << 20)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _comparison(lazy: dict[str, float], full: dict[str, float]) -> str:
    if lazy["total_seconds"] <= full["total_seconds"]:
        return f"lazy {full['total_seconds'] / lazy['total_seconds']:.1f}x faster"
    return f"full pull {lazy['total_seconds'] / full['total_seconds']:.1f}x faster"


def publish(
    result: dict[str, Any], text: str, *, json_path: str | None, record: str | None
) -> None:
    """Print a benchmark's Markdown section; also write its raw figures and append the
    section to a record file (docs/benchmarks.md) when asked."""
    print()
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if record:
        with open(record, "a") as f:
            f.write("\n" + text)


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    mib = 1 << 20
    lines = [
        SECTION,
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"- Date: {result['date']}",
        f"- Command: `{' '.join(['.venv/bin/python -m tools.pull_bench', result['args']]).strip()}`",
        f"- Load average (1, 5, 15 min) at start: {result['load_start']}; "
        f"at end: {result['load_end']}",
        "- Images: made by `tools/mkimage`: busybox, Debian's Python 3.11 with its standard "
        "library, and a layer of N MiB of random data that nothing reads; converted to "
        "eStargz (gzip) and pushed to a docker-registry on 127.0.0.1",
        f'- Command run in the image: `chroot DIR /usr/bin/python3 -c "{PROGRAM}"`',
        "",
        f"Median of {result['runs']} runs of each, alternating, each with an empty state "
        "directory (cold chunk cache), over the same registry. Lazy is `blockfs image "
        "mount`; full pull is `blockfs image mount --no-lazy`, which downloads every layer, "
        "checks it against its diff_id and extracts it with tar before anything runs. "
        "Bytes are what the registry's access log says it sent (manifests and configs "
        "included).",
        "",
        "| image (compressed) | | mount | run the command | total | MiB from the registry "
        "| share of the image | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for image in result["images"]:
        size = image["image_bytes"]
        label = f"{image['random_mb']} MiB unread data ({size / mib:.1f} MiB)"
        for name in ("lazy", "full"):
            r = image[name]
            lines.append(
                f"| {label if name == 'lazy' else ''} | {'lazy' if name == 'lazy' else 'full pull'} "
                f"| {r['mount_seconds']:.2f} s | {r['run_seconds']:.2f} s | "
                f"{r['total_seconds']:.2f} s | {r['registry_bytes'] / mib:.1f} | "
                f"{100 * r['registry_bytes'] / size:.1f}% | "
                f"{_comparison(image['lazy'], image['full']) if name == 'lazy' else ''} |"
            )
    lines += [
        "",
        "The lazy mount reads each layer's footer and TOC only; the command then fetches "
        "the chunks of the files it opens (the Python binary, its shared libraries, the "
        "modules it imports) as the kernel asks for them, each kernel read's missing "
        "members with one coalesced range request. That cost depends on what the command reads, not on "
        "the image. A full pull's cost grows with the whole image. On loopback the "
        "network is nearly free, so the full pull's cost here is mostly decompression, "
        "hashing and extraction; over a real network every unread MiB also costs transfer "
        "time, and the lazy mount's round trips cost latency.",
        "",
    ]
    return "\n".join(lines)


def _measure(registry: LocalRegistry, workdir: Path, random_mb: int, runs: int) -> dict[str, Any]:
    base = workdir / f"base-{random_mb}"
    print(f"building an image with {random_mb} MiB of unread data")
    build_base_image(base, python=True, random_mb=random_mb)
    ref = f"{registry.host}/bench/image:random-{random_mb}"
    print(f"converting and pushing {ref}")
    _blockfs("image", "convert", "--plain-http", f"oci:{base}:latest", ref)
    shutil.rmtree(base)
    lazy: list[Run] = []
    full: list[Run] = []
    for i in range(runs):
        for name, done, is_lazy in (("lazy", lazy, True), ("full", full, False)):
            run = _one_run(ref, workdir, registry, lazy=is_lazy)
            done.append(run)
            print(
                f"  run {i + 1} {name:4}: mount {run.mount_seconds:.2f} s, "
                f"command {run.run_seconds:.2f} s, {run.registry_bytes} bytes from the registry"
            )
    return {
        "random_mb": random_mb,
        "image_bytes": lazy[0].image_bytes,
        "layers": lazy[0].layers,
        "lazy": _summary(lazy),
        "full": _summary(full),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.pull_bench",
        description="Time a lazy image mount and a command, against pulling and extracting "
        "the image, over one local registry.",
    )
    parser.add_argument(
        "--random-mb", type=int, nargs="+", default=[0, 256], metavar="N",
        help="sizes of the unread data layer, one image each (default: 0 256)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--record", metavar="FILE", help="append a Markdown section to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures to FILE")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("pull_bench: run me as root (mounts and chroot)", file=sys.stderr)
        return 1
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="blockfs-pull-bench-"))
    try:
        with start_registry(workdir / "registry", access_log=True) as registry:
            images = [_measure(registry, workdir, n, args.runs) for n in args.random_mb]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "load_start": load_start,
        "load_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": args.runs,
        "images": images,
    }
    publish(result, _markdown(result), json_path=args.json, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
