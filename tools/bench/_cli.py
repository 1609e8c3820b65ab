"""The command line of the benchmarks: ``python -m tools.bench {estargz,image,memory,reads,relay,wan} [options]``."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tools.bench._report import Report, command_line, progress

ESTARGZ_HELP = """\
Measure the eStargz library (issue 2), each figure beside its baseline from the same run:
(1) write throughput of blockfs.estargz.build, MB/s of input tar, for gzip level 9 (the
default) and 6 and zstd level 3, with automatic and with one worker, against `gzip -9`,
`gzip -6` and `zstd -3` compressing the same tar (a tar of --tree made on the fly);
(2) parse_toc of a generated 100,000-entry TOC in fresh subprocesses: wall time and peak
RSS, against a subprocess that only runs json.loads on the same bytes (targets: under
1.5 s and under 300 MB); (3) read throughput of BlobReader.read_file (verified chunks) of a
64 MiB file from local gzip and zstd blobs with 4 MiB and 64 KiB chunks, against plain
decompression of the same members.
Prints Markdown tables for docs/benchmarks.md on stdout, progress on stderr."""

IMAGE_HELP = """\
Measure the lazy block image (issue 3) as served in production (NBDServer, nbdkit with
the blockfs plugin): (1) warm sequential read of a large file through the export with
`nbdcopy URI null:` (all chunks cached), against a trivial nbdkit Python plugin serving
the same bytes from a plain file (target: at least 50% of its MB/s), plus warm from the
disk cache only; (2) cold read from a local blob with an empty chunk cache (decompression
and verification bound), gzip and zstd, beside in-process decompression; (3) index build
time (blockfs.erofs.build_index + ExtentMap.build) for a 100,000-entry TOC, parse timed
apart (target: under 2 s); (4) VmRSS of the nbdkit process with 1 and with 20 layers open
(target: under 8 MiB more per added layer).
Prints Markdown tables for docs/benchmarks.md on stdout, progress on stderr."""

READS_HELP = """\
Measure cold reads of a layer of many small files in 128 KiB windows (the kernel's
readahead) through LayerImage.pread: fetching every member a read lacks with coalesced
requests, against the baseline of one request per member, in the same run, with a
modelled round-trip time per request (0 and 10 ms by default; the bytes, decompression
and verification are real). Prints Markdown for docs/benchmarks.md on stdout."""

MEMORY_HELP = """\
Measure the memory of large layers (issue 13): peak RSS of `blockfs layer inspect` and of
`blockfs layer mount` (the CLI, the blockfs server's nbdkit after a walk of the whole
mounted tree, and nbdfuse and its relay where they attach the layer) for a layer of
--entries TOC entries (a TOC-only eStargz blob made on the fly: many small and empty
files, symlinks, hardlinks, multi-chunk files, directories of 10 to 60 entries), against
the targets (inspect <= 400 MB; mount, CLI plus server, <= 500 MB), and the server's
peak for a 1,000-entry layer beside it. The mount needs root. Prints Markdown on stdout."""

RELAY_HELP = """\
Measure what the relay between nbdfuse and the NBD server costs (issue 13): reads of a
large file through a mounted layer, attached with nbdfuse through the relay and without
it, in the same run on the same server and layer: cold (empty chunk cache: fetch,
decompress, verify) and warm (chunks in the server's memory) sequential MB/s, and warm
random 4 KiB reads in one thread and in several. Needs root. Prints Markdown on stdout."""

WAN_HELP = """\
Measure cold container starts through containerd over a WAN-like link (issue 10): a
shaping proxy (tools/shaping_proxy.py: one token bucket for all connections, a delay per
request) in front of a docker-registry on loopback, checked first (a --check-mb blob must
take its expected time within 5%, else the run stops). Images built offline by
tools/mkimage: `python` (byte-compiled Python 3.11, 40 MiB nothing reads, workload
imports json, email, asyncio, http.client) and `gcc` (gcc-12 toolchain, workload compiles
and runs hello world). Each from a cold state (new containerd and snapshotter, caches
dropped), for each link: overlayfs with `ctr images pull` of the gzip image; blockfs with
its defaults on the eStargz image; blockfs on the image `blockfs image optimize` made for
the workload, prefetch on. Reports pull, create and run-to-first-output seconds, requests
and bytes at ready, and an ideal transfer computed from the workload's read set (strace
of a chroot run); median of --runs. Needs root. Prints Markdown on stdout."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Benchmarks of blockfs. Figures, not tests: nothing here passes or fails "
        "on time. Results and how to read them are in docs/benchmarks.md.",
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = sub.add_parser(
        "estargz",
        help="eStargz write, TOC parse and verified read throughput",
        description=ESTARGZ_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "--tree", type=Path, default=Path("/usr/lib/python3.11"), metavar="DIR",
        help="directory whose tar is the write input (default: %(default)s, about 50 MB)",
    )  # fmt: skip
    e.add_argument("--toc-entries", type=int, default=100_000, metavar="N")
    i = sub.add_parser(
        "image",
        help="NBD export read throughput, index build time and nbdkit memory",
        description=IMAGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--file-size", type=int, default=128, metavar="MiB",
                   help="size of the large file read through the export (default: %(default)s)")  # fmt: skip
    i.add_argument("--toc-entries", type=int, default=100_000, metavar="N")
    i.add_argument("--layers", type=int, default=20, metavar="N",
                   help="layers served for the memory figure (default: %(default)s)")  # fmt: skip
    r = sub.add_parser(
        "reads",
        help="cold reads across small files: coalesced fetches against one request per member",
        description=READS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--files", type=int, default=2000, metavar="N",
                   help="small files in the layer (default: %(default)s)")  # fmt: skip
    r.add_argument("--rtt", type=float, action="append", metavar="MS",
                   help="round-trip time per request, repeatable (default: 0 and 10)")  # fmt: skip
    mem = sub.add_parser(
        "memory",
        help="peak RSS of layer inspect and layer mount for a layer of a million entries",
        description=MEMORY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mem.add_argument("--entries", type=int, default=1_000_000, metavar="N",
                     help="TOC entries of the layer (default: %(default)s)")  # fmt: skip
    mem.add_argument("--no-mount", dest="mount", action="store_false",
                     help="measure layer inspect only (the mount needs root)")  # fmt: skip
    rl = sub.add_parser(
        "relay",
        help="reads through a mounted layer with and without nbdfuse's relay",
        description=RELAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rl.add_argument("--file-size", type=int, default=128, metavar="MiB",
                    help="size of the file read through the mount (default: %(default)s)")  # fmt: skip
    w = sub.add_parser(
        "wan",
        help="cold container starts over a shaped link: full pull, blockfs, optimized",
        description=WAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--images", type=_names, default=["python", "gcc"], metavar="NAMES",
                   help="comma-separated images: python, gcc (default: python,gcc)")  # fmt: skip
    w.add_argument("--links", type=_names, default=["shaped", "loopback"], metavar="NAMES",
                   help="comma-separated links: shaped, loopback (default: shaped,loopback)")  # fmt: skip
    w.add_argument("--runs", type=int, default=3, metavar="N",
                   help="cold starts per mode, link and image; medians are reported "
                   "(default: %(default)s)")  # fmt: skip
    w.add_argument("--rate-mbit", type=float, default=100.0, metavar="MBIT",
                   help="bandwidth of the shaped link in Mbit/s (default: %(default)g)")  # fmt: skip
    w.add_argument("--delay-ms", type=float, default=20.0, metavar="MS",
                   help="delay of each request on the shaped link (default: %(default)g)")  # fmt: skip
    w.add_argument("--check-mb", type=float, default=50.0, metavar="MB",
                   help="size of the blob of the link's self-check, 10^6 bytes "
                   "(default: %(default)g)")  # fmt: skip
    for p in (e, i, mem, r, rl, w):
        p.add_argument("--quick", action="store_true",
                       help="tiny inputs and one repetition: checks that the bench runs, "
                       "its figures mean nothing")  # fmt: skip
        if p is not w and p is not mem:
            p.add_argument("--repeat", type=int, default=3, metavar="N",
                           help="runs per figure; the best is reported (default: %(default)s)")  # fmt: skip
        p.add_argument("--record", type=Path, metavar="FILE",
                       help="append the Markdown section to FILE (docs/benchmarks.md)")  # fmt: skip
        p.add_argument("--workdir", type=Path, metavar="DIR",
                       help="where inputs and blobs go (default: a new directory in /var/tmp)")  # fmt: skip
        p.add_argument("--keep", action="store_true", help="keep the work directory")
        p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tools.bench``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="blockfs-bench-", dir="/var/tmp"))
    try:
        report = _run(args, workdir, command_line(args_list))
    finally:
        if args.keep:
            progress(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.markdown())
    if args.json is not None:
        report.write_json(args.json)
    if args.record is not None:
        with open(args.record, "a") as f:
            f.write("\n" + report.markdown())
    return 0


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _run(args: argparse.Namespace, workdir: Path, command: str) -> Report:
    # Imported here so that `--help` and the one that is not run cost nothing.
    if args.bench == "estargz":
        from tools.bench._estargz import EstargzBench

        return EstargzBench(
            workdir,
            tree=args.tree,
            quick=args.quick,
            repeat=args.repeat,
            toc_entries=args.toc_entries,
        ).run(command)
    if args.bench == "wan":
        from tools.bench._wan import WanBench

        return WanBench(
            workdir,
            images=["busybox"] if args.quick else args.images,
            links=args.links,
            runs=1 if args.quick else args.runs,
            rate_bps=args.rate_mbit * 1e6,
            delay=args.delay_ms / 1000,
            check_bytes=4_000_000 if args.quick else int(args.check_mb * 1e6),
            enforce_check=not args.quick,
        ).run(command)
    if args.bench == "memory":
        from tools.bench._memory import MemoryBench

        return MemoryBench(workdir, entries=args.entries, quick=args.quick, mount=args.mount).run(
            command
        )
    if args.bench == "relay":
        from tools.bench._relay import RelayBench

        return RelayBench(
            workdir, quick=args.quick, repeat=args.repeat, file_size=args.file_size * (1 << 20)
        ).run(command)
    if args.bench == "reads":
        from tools.bench._reads import ReadsBench

        return ReadsBench(
            workdir,
            files=50 if args.quick else args.files,
            rtts_ms=args.rtt or [0.0, 10.0],
            repeat=1 if args.quick else args.repeat,
        ).run(command)
    from tools.bench._image import ImageBench

    return ImageBench(
        workdir,
        quick=args.quick,
        repeat=args.repeat,
        toc_entries=args.toc_entries,
        file_size=args.file_size << 20,
        layers=args.layers,
    ).run(command)
