"""Benchmark: pull, create and run a container to its first output, through containerd,
with its overlayfs snapshotter (full pull) against blockfs (lazy pull).

``python -m tools.ctr_bench`` builds a base image (busybox, Python 3.11, a layer of data
nothing reads), converts it to eStargz and pushes it to a docker-registry on loopback.
Then, side by side in one run and over that same registry and image, each time with a
new private containerd and blockfs-snapshotter (empty content store and chunk cache):

- overlayfs: ``ctr images pull`` (every layer downloaded and unpacked), then
  ``ctr run --rm REF NAME python3 -c …``;
- blockfs: ``blockfs image pull`` (layers mounted lazily), then
  ``ctr run --rm --snapshotter blockfs REF NAME python3 -c …``.

It times each from the start of the pull to the container's first line of output, counts
the bytes the registry sent (its access log), reports the median of ``--runs`` runs and
with ``--record FILE`` appends a Markdown section to FILE. ``--quick`` uses a busybox
image with 1 MiB of data and one run (for the smoke test). Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools.demo_container import PROGRAM, FirstOutput, first_output, image_size, remove_image
from tools.local_containerd import short_tempdir, start_blockfs_containerd
from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import build_base_image
from tools.pull_bench import machine, publish

SECTION = "## containerd: overlayfs full pull vs blockfs"
SNAPSHOTTERS = ("overlayfs", "blockfs")
QUICK_COMMAND = ["/bin/busybox", "echo", "hello"]


def _one_run(
    registry: LocalRegistry, ref: str, argv: list[str], snapshotter: str, name: str
) -> FirstOutput:
    # A new containerd and snapshotter each time: nothing cached from the previous run.
    work = short_tempdir("bfs-cb-")
    try:
        with start_blockfs_containerd(work) as stack:
            try:
                return first_output(stack, registry, ref, argv, snapshotter=snapshotter, name=name)
            finally:
                remove_image(stack.containerd, ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _summary(runs: list[FirstOutput]) -> dict[str, float]:
    fields = ("pull_seconds", "first_output_seconds", "registry_bytes")
    return {f: float(statistics.median(getattr(r, f) for r in runs)) for f in fields}


def _measure(
    registry: LocalRegistry, workdir: Path, random_mb: int, runs: int, *, quick: bool
) -> dict[str, Any]:
    base = workdir / f"base-{random_mb}"
    print(f"building an image with {random_mb} MiB of unread data", flush=True)
    build_base_image(base, python=not quick, random_mb=random_mb)
    ref = f"{registry.host}/bench/ctr:random-{random_mb}"
    print(f"converting and pushing {ref}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "blockfs.cli", "image", "convert", "--plain-http",
         f"oci:{base}:latest", ref],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    shutil.rmtree(base)
    argv = QUICK_COMMAND if quick else ["/usr/bin/python3", "-c", PROGRAM]
    done: dict[str, list[FirstOutput]] = {name: [] for name in SNAPSHOTTERS}
    for i in range(runs):
        for snapshotter in SNAPSHOTTERS:
            run = _one_run(registry, ref, argv, snapshotter, f"bench-{i}-{snapshotter}")
            done[snapshotter].append(run)
            print(
                f"  run {i + 1} {snapshotter:9}: pull {run.pull_seconds:.2f} s, first output "
                f"after {run.first_output_seconds:.2f} s, {run.registry_bytes} bytes from "
                f"the registry ({run.line!r})",
                flush=True,
            )
    return {
        "random_mb": random_mb,
        "image_bytes": image_size(ref),
        "command": argv,
        **{name: _summary(runs) for name, runs in done.items()},
    }


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    mib = 1 << 20
    command = " ".join(["python -m tools.ctr_bench", result["args"]]).strip()
    lines = [
        SECTION,
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"- Date: {result['date']}",
        f"- Command: `.venv/bin/{command}`",
        f"- Load average (1, 5, 15 min) at start: {result['load_start']}; "
        f"at end: {result['load_end']}",
        "- Images: made by `tools/mkimage`: busybox, "
        + ("" if result["quick"] else "Debian's Python 3.11 with its standard library, ")
        + "and a layer of N MiB of random data that nothing reads; converted to "
        "eStargz (gzip) and pushed to a docker-registry on 127.0.0.1",
        f"- Command run in the container: `{shlex.join(result['images'][0]['command'])}`",
        "- containerd 1.6 (Debian), private instance, blockfs-snapshotter as its proxy "
        "plugin `blockfs`",
        "",
        f"Median of {result['runs']} runs of each, alternating, each with a new containerd "
        "and blockfs-snapshotter (empty content store, snapshots and chunk cache), over the "
        "same registry and image. overlayfs is `ctr images pull` (download, check and "
        "unpack every layer) then `ctr run --rm REF`; blockfs is `blockfs image pull` "
        "(layers mounted lazily from footer and TOC) then `ctr run --rm --snapshotter "
        "blockfs REF`. Time to first output runs from the start of the pull to the "
        "container's first line on stdout. Bytes are what the registry's access log says "
        "it sent (manifests and configs included).",
        "",
        "| image (compressed) | snapshotter | pull | pull to first output "
        "| MiB from the registry | share of the image |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for image in result["images"]:
        size = image["image_bytes"]
        for name in SNAPSHOTTERS:
            r = image[name]
            label = (
                f"{image['random_mb']} MiB unread data ({size / mib:.1f} MiB)"
                if name == SNAPSHOTTERS[0]
                else ""
            )
            lines.append(
                f"| {label} | {name} | {r['pull_seconds']:.2f} s | "
                f"{r['first_output_seconds']:.2f} s | {r['registry_bytes'] / mib:.1f} | "
                f"{100 * r['registry_bytes'] / size:.1f}% |"
            )
    lines += [
        "",
        "blockfs's pull reads each layer's footer and TOC and mounts it, whatever the image's "
        "size; the container then fetches the chunks of the files it opens (the Python "
        "binary, its libraries, the modules it imports) as the kernel asks for them, the "
        "missing members of each kernel read with one coalesced range request, so its run "
        "takes longer than one from unpacked files. "
        "Its cost depends on what the command reads; a full pull's grows with the whole "
        "image. On loopback the network is nearly free, so the full pull's cost here is "
        "mostly decompression, hashing and unpacking; over a real network every unread MiB "
        "also costs transfer time, and every lazy round trip costs latency.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.ctr_bench",
        description="Time pull, create and run to first output through containerd: "
        "overlayfs (full pull) against blockfs (lazy), over one local registry.",
    )
    parser.add_argument(
        "--random-mb", type=int, nargs="+", default=[32, 256], metavar="N",
        help="sizes of the unread data layer, one image each (default: 32 256)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="busybox image, 1 MiB of data, one run"
    )
    parser.add_argument("--record", metavar="FILE", help="append a Markdown section to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures to FILE")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ctr_bench: run me as root (containerd, mounts)", file=sys.stderr)
        return 1
    sizes, runs = ([1], 1) if args.quick else (args.random_mb, args.runs)
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = short_tempdir("bfs-ctr-bench-")
    try:
        with start_registry(workdir / "registry", access_log=True) as registry:
            images = [_measure(registry, workdir, n, runs, quick=args.quick) for n in sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "load_start": load_start,
        "load_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": runs,
        "quick": args.quick,
        "images": images,
    }
    publish(result, _markdown(result), json_path=args.json, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
