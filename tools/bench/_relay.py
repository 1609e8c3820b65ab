"""``tools.bench relay``: what the relay between nbdfuse and the NBD server costs.

Where the kernel has no ``nbd.ko``, a layer is attached with nbdfuse, which reaches the
blockfs server through a relay of its own (nbdkit's nbd plugin behind its retry filter,
``blockfs.host.nbdserver.NBDRelay``) so that it survives a restart of the server. This
measures reads through the mounted layer, as a container makes them, with the relay and
without it (``attach_and_mount(relay=False)``: nbdfuse connected to the server itself),
in the same run, against the same server and layer:

- cold: a fresh server with an empty chunk cache, the blob a local file, so that every
  read fetches, decompresses and verifies its chunks (the server's own cost);
- warm: every chunk in the server's memory LRU, so that what is left is the path from
  the kernel to the server and back (where the relay's hop shows most).

Page caches (the mounted file's and nbdfuse's file's) are dropped with
``posix_fadvise(DONTNEED)`` before each timed read. Needs root.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from blockfs.estargz import BlobReader, BuildOptions, CountingSource, FileBlobSource, build_file
from blockfs.host.attach import Attachment, AttachMode, attach_and_mount, unmount_and_detach
from blockfs.host.nbdserver import NBDServer
from blockfs.image import ServerConfig, index_layer
from tools.bench._data import text_bytes, write_tar
from tools.bench._report import MB, Machine, MiB, Report, progress

EXPORT = "layer"
FILE = "data/big.bin"
BLOCK = 4096
PIECE = 1 << 20
# The ways nbdfuse reaches the server, as the table names them.
PATHS = {"nbdfuse → server (no relay)": False, "nbdfuse → relay → server": True}


@attrs.frozen
class RelayBench:
    """What to run: full size, or ``quick`` (tiny inputs, one repetition) for a smoke run."""

    workdir: Path
    quick: bool = False
    repeat: int = 3
    file_size: int = 128 * MiB
    random_reads: int = 2000
    threads: int = 8

    @property
    def repeats(self) -> int:
        return 1 if self.quick else self.repeat

    @property
    def size(self) -> int:
        return 4 * MiB if self.quick else self.file_size

    def run(self, command: str) -> Report:
        if os.geteuid() != 0:
            raise SystemExit("tools.bench relay mounts layers: run it as root")
        report = Report(
            "nbdfuse's relay",
            command,
            Machine.describe(
                [("nbdkit", ["nbdkit", "--version"]), ("nbdfuse", ["nbdfuse", "--version"])]
            ),
        )
        # Socket paths must fit in a socket address: state lives in a short directory.
        short = Path(tempfile.mkdtemp(prefix="bfsr-"))
        try:
            layers = self.layer(short / "layers")
            # The paths take turns, run after run, so that both see the same machine load.
            runs: dict[str, list[dict[str, float]]] = {label: [] for label in PATHS}
            for i in range(self.repeats):
                for label, relay in PATHS.items():
                    progress(f"{label}: cold and warm reads ({i + 1}/{self.repeats})")
                    runs[label].append(self.measure(short, layers, relay))
            figures = {
                label: {key: min(run[key] for run in done) for key in done[0]}
                for label, done in runs.items()
            }
        finally:
            shutil.rmtree(short, ignore_errors=True)
        self.tabulate(report, figures)
        return report

    def layer(self, layers_dir: Path) -> Path:
        """One layer holding one large compressible file, gzip, indexed as EXPORT."""
        progress(f"building a layer with one {self.size / MiB:.0f} MiB file")
        tar = self.workdir / "big.tar"
        write_tar(tar, [(FILE, text_bytes(self.size, seed=11))])
        blob = self.workdir / "big.esgz"
        result = build_file(tar, blob, BuildOptions(compression="gzip"))
        tar.unlink()
        source = CountingSource(FileBlobSource(blob))
        reader = BlobReader.open(source, toc_digest=result.toc_digest)
        index_layer(
            reader,
            layers_dir / EXPORT,
            name=EXPORT,
            source={"type": "file", "path": str(blob)},
            bytes_fetched=source.bytes_read,
        )
        return layers_dir

    @contextlib.contextmanager
    def mounted(self, short: Path, layers: Path, *, relay: bool) -> Iterator[tuple[Path, float]]:
        """A fresh server (empty chunk cache) and the layer mounted through it; the file
        and the seconds that attaching and mounting took."""
        shutil.rmtree(short / "cache", ignore_errors=True)
        server = NBDServer(
            short / "run",
            ServerConfig(root=layers, cache_dir=short / "cache", control=short / "ctl.sock"),
            socket=short / "nbd.sock",
        )
        server.start()
        att: Attachment | None = None
        try:
            mnt = short / "mnt"
            mnt.mkdir(exist_ok=True)
            start = time.perf_counter()
            att = attach_and_mount(
                str(server.socket), EXPORT, str(mnt), state_dir=str(short / "attach"),
                mode=AttachMode.NBDFUSE, relay=relay,
            )  # fmt: skip
            attached = time.perf_counter() - start
            path = mnt / FILE
            path.stat()
            yield path, attached
        finally:
            if att is not None:
                unmount_and_detach(att)
            server.stop()

    def measure(self, short: Path, layers: Path, relay: bool) -> dict[str, float]:
        """Seconds of each read pattern, for nbdfuse with or without the relay."""
        offsets = random.Random(7).sample(range(self.size // BLOCK), self.sample)
        with self.mounted(short, layers, relay=relay) as (path, attached):
            cold = self.sequential(path)
            self.sequential(path)  # every chunk in the server's memory now
            return {
                "attach": attached,
                "cold": cold,
                "warm": self.sequential(path),
                "random": self.scattered(path, offsets, threads=1),
                "parallel": self.scattered(path, offsets, threads=self.threads),
            }

    @property
    def sample(self) -> int:
        return min(200 if self.quick else self.random_reads, self.size // BLOCK)

    def sequential(self, path: Path) -> float:
        """Seconds to read the whole file in 1 MiB reads, page caches dropped first."""
        _drop(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            start = time.perf_counter()
            offset = 0
            while chunk := os.pread(fd, PIECE, offset):
                offset += len(chunk)
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
        if offset != self.size:
            raise RuntimeError(f"read {offset} bytes of {path}, expected {self.size}")
        return seconds

    def scattered(self, path: Path, offsets: list[int], *, threads: int) -> float:
        """Seconds for 4 KiB reads at ``offsets`` (blocks), page caches dropped first."""
        _drop(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            # No readahead: each read asks for its own block.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda block: os.pread(fd, BLOCK, block * BLOCK), offsets))
            return time.perf_counter() - start
        finally:
            os.close(fd)

    def tabulate(self, report: Report, figures: dict[str, dict[str, float]]) -> None:
        table = report.table(
            f"Reads of one {self.size / MiB:.0f} MiB file (gzip, 4 MiB chunks) through a "
            "mounted layer: nbdfuse with and without the relay",
            "path",
            "attach and mount, ms",
            "cold sequential MB/s",
            "warm sequential MB/s",
            "warm random 4 KiB, 1 thread: µs per read",
            f"warm random 4 KiB, {self.threads} threads: reads/s",
        )
        n = self.sample
        for label, f in figures.items():
            table.add(
                label,
                f["attach"] * 1000,
                self.size / MB / f["cold"],
                self.size / MB / f["warm"],
                f["random"] / n * 1e6,
                n / f["parallel"],
            )
        direct, relayed = (figures[label] for label in PATHS)
        table.add(
            "**relay / no relay**",
            f"{relayed['attach'] / direct['attach']:.0%}",
            f"{direct['cold'] / relayed['cold']:.0%}",
            f"{direct['warm'] / relayed['warm']:.0%}",
            f"{relayed['random'] / direct['random']:.0%}",
            f"{direct['parallel'] / relayed['parallel']:.0%}",
        )
        table.notes.append(
            "Each run: a fresh server (`NBDServer`, `--threads 16`, empty chunk cache, the blob "
            "a local file), the layer attached with `attach_and_mount(mode=NBDFUSE)` (nbdfuse "
            "`-C 4`; EROFS mounted from nbdfuse's file; timed: with the relay, that includes "
            "starting it), then, page caches dropped with "
            "`posix_fadvise(DONTNEED)` before each: the whole file read in 1 MiB reads (cold: "
            "every chunk fetched, decompressed and verified), read again once, then timed "
            f"warm; {n} random 4 KiB reads with `POSIX_FADV_RANDOM`, in one thread and in "
            f"{self.threads}. The two paths take turns, {self.repeats} runs each; the best "
            "of each figure. The last row is throughput with "
            "the relay as a share of throughput without it (for times, ms and µs: time with "
            "it as a share of time without)."
        )
        for label, key in zip(("direct", "relay"), PATHS, strict=True):
            f = figures[key]
            report.figures[f"relay.{label}.attach_ms"] = f["attach"] * 1000
            report.figures[f"relay.{label}.cold_mbps"] = self.size / MB / f["cold"]
            report.figures[f"relay.{label}.warm_mbps"] = self.size / MB / f["warm"]
            report.figures[f"relay.{label}.random_us"] = f["random"] / n * 1e6
            report.figures[f"relay.{label}.parallel_rps"] = n / f["parallel"]


def _drop(path: Path) -> None:
    """Drop the page cache of ``path`` (in the EROFS mount) and of nbdfuse's file under it."""
    files = [path]
    # The layer's mount is EROFS on nbdfuse's file: that file has a page cache of its own.
    state = path.parents[2] / "attach" / "fuse" / "image"
    if state.exists():
        files.append(state)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
