"""``tools.bench image``: reads through the NBD export, index build time and nbdkit memory.

The export is served as in production: ``blockfs.host.nbdserver.NBDServer`` running
nbdkit with the blockfs plugin over layers indexed by ``blockfs.image.index_layer``, read
by the stock ``nbdcopy`` with its default settings. The read baseline is a trivial nbdkit
Python plugin (written by this module into the work directory) that serves a plain file
of the same size with ``os.pread``, under the same nbdkit, options and client.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import nbd

from blockfs.erofs import build_index
from blockfs.estargz import (
    BlobReader,
    BuildOptions,
    CountingSource,
    FileBlobSource,
    build_file,
    parse_toc,
)
from blockfs.host.nbdserver import NBDServer
from blockfs.image import EXTENTS_FILE, ExtentMap, ServerConfig, index_layer, query_stats
from tools.bench._data import mixed_files, synthetic_toc, text_bytes, write_tar
from tools.bench._plain import decompress_members
from tools.bench._report import (
    MB,
    Machine,
    MiB,
    Report,
    best_time,
    progress,
    rate,
    rss_kib,
    timed,
    verdict,
)

WARM_RATIO_TARGET = 0.5
INDEX_SECONDS_TARGET = 2.0
PER_LAYER_TARGET = 8 * MiB
BLOCK = 4096

# The baseline server: the least a Python plugin can do to serve a file.
TRIVIAL_PLUGIN = """\
import os

import nbdkit

API_VERSION = 2
_path = None


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    _path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return os.open(_path, os.O_RDONLY)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)
"""


def nbdcopy(uri: str) -> float:
    """Seconds that ``nbdcopy URI null:`` (default settings) takes to read the whole export."""
    seconds, _ = timed(subprocess.run, ["nbdcopy", uri, "null:"], check=True)
    return seconds


def export_uri(socket: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={socket}"


@contextlib.contextmanager
def trivial_server(workdir: Path, image: Path, *, socket: Path, threads: int) -> Iterator[str]:
    """The trivial plugin serving ``image`` under nbdkit; yields its export URI."""
    plugin = workdir / "trivial_plugin.py"
    plugin.write_text(TRIVIAL_PLUGIN)
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    # Started from this (main) thread, which outlives it: nbdkit's parent-death signal
    # only fires when this process ends.
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--readonly", "--unix", str(socket),
         "--threads", str(threads), "python", str(plugin), f"file={image}"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the trivial nbdkit plugin did not start ({proc.returncode})")
            time.sleep(0.05)
        yield export_uri(socket)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@attrs.frozen
class ImageBench:
    """What to run: full size, or ``quick`` (tiny inputs, one repetition) for the smoke test.

    ``sockets`` is where unix sockets go (``run`` makes a short-named one); ``workdir`` holds
    everything else.
    """

    workdir: Path
    quick: bool = False
    repeat: int = 3
    toc_entries: int = 100_000
    file_size: int = 128 * MiB
    layers: int = 20
    sockets: Path | None = None

    @property
    def repeats(self) -> int:
        return 1 if self.quick else self.repeat

    def run(self, command: str) -> Report:
        report = Report(
            "Block image",
            command,
            Machine.describe(
                [("nbdkit", ["nbdkit", "--version"]), ("nbdcopy", ["nbdcopy", "--version"])]
            ),
        )
        # Unix socket paths must stay under 108 bytes, which a deep work directory (a
        # pytest tmp_path, say) can exceed: sockets live in a short directory of their own.
        sockets = Path(tempfile.mkdtemp(prefix="bfsb-"))
        try:
            bench = attrs.evolve(self, sockets=sockets)
            bench.reads(report)
            bench.index_build(report)
            bench.memory(report)
        finally:
            shutil.rmtree(sockets, ignore_errors=True)
        return report

    # ------------------------------------------------------------------------------------
    # Helpers

    def index(self, blob: Path, layers_dir: Path, name: str, toc_digest: str) -> None:
        """Index ``blob`` as the export ``name`` under ``layers_dir``, as the CLI does."""
        source = CountingSource(FileBlobSource(blob))
        reader = BlobReader.open(source, toc_digest=toc_digest)
        index_layer(
            reader,
            layers_dir / name,
            name=name,
            source={"type": "file", "path": str(blob)},
            bytes_fetched=source.bytes_read,
        )

    def server(self, tag: str, layers_dir: Path, cache: Path, **config: Any) -> NBDServer:
        run_dir = self.workdir / f"run-{tag}"
        shutil.rmtree(run_dir, ignore_errors=True)
        return NBDServer(
            run_dir,
            ServerConfig(
                root=layers_dir,
                cache_dir=cache,
                control=self.socket_dir / f"{tag}.ctl",
                **config,
            ),
            socket=self.socket_dir / f"{tag}.sock",
        )

    @property
    def socket_dir(self) -> Path:
        return self.sockets or self.workdir

    # ------------------------------------------------------------------------------------
    # Reads

    def reads(self, report: Report) -> None:
        size = 4 * MiB if self.quick else self.file_size
        progress(f"{size / MiB:.0f} MiB of file data, gzip and zstd blobs")
        tar = self.workdir / "big.tar"
        write_tar(tar, [("data/big.bin", text_bytes(size, seed=11))])
        layers_dir = self.workdir / "layers-big"
        blobs: dict[str, Path] = {}
        for compression in ("gzip", "zstd"):
            blob = blobs[compression] = self.workdir / f"big.{compression}.esgz"
            result = build_file(tar, blob, BuildOptions(compression=compression))
            self.index(blob, layers_dir, compression, result.toc_digest)
        tar.unlink()

        image = self.workdir / "image.plain"
        cold_gzip, server = self.cold(layers_dir, "gzip")
        try:
            warm = self.warm(server, "gzip", image)
        finally:
            server.stop()
        image_size = image.stat().st_size
        trivial = self.trivial(image)
        image.unlink()
        cold_zstd, server = self.cold(layers_dir, "zstd")
        server.stop()
        disk = self.warm_from_disk(layers_dir, "gzip")

        ratio = trivial / warm
        target = f">= 50%: {verdict(ratio, WARM_RATIO_TARGET, at_least=True)}"
        table = report.table(
            f"Warm sequential read of the whole export with `nbdcopy URI null:`: one "
            f"{size / MiB:.0f} MiB file in 4 MiB chunks (the reference builder's), image of "
            f"{image_size / MiB:.1f} MiB; MB/s of image",
            "server",
            "MB/s",
            "vs trivial plugin",
            "target",
        )
        rows = [
            ("trivial nbdkit Python plugin, plain file in the page cache (baseline)", trivial, ""),
            ("blockfs, every chunk in the memory LRU (256 MiB, the default)", warm,
             "(quick)" if self.quick else target),
            ("blockfs, chunk cache on disk only (`memory_cache=0`)", disk, ""),
        ]  # fmt: skip
        for label, seconds, note in rows:
            table.add(label, rate(image_size, seconds), f"{trivial / seconds:.0%}", note)
        table.notes.append(
            "Each server is nbdkit `--threads 16`, read by `nbdcopy` with its defaults (both "
            "plugins advertise multi-conn, so it opens 4 connections). The trivial plugin serves "
            "a copy of the same image bytes. blockfs warm: the server has read every chunk once "
            "before; the stats show no chunk fetched during the timed runs. Disk cache only: "
            "a new server with `memory_cache=0` over the filled cache directory (files in the "
            f"page cache). Best of {self.repeats} runs."
        )

        table = report.table(
            "Cold sequential read from a local blob, empty chunk cache (decompression and "
            "verification bound), MB/s of file data",
            "blob",
            "blockfs through NBD (`nbdcopy`)",
            "in-process: decompress only",
            "in-process: decompress + sha256",
            "blockfs / (decompress + sha256)",
        )
        for compression, cold in (("gzip", cold_gzip), ("zstd", cold_zstd)):
            plain = self.in_process(blobs[compression], compression, hash_chunks=False)
            hashed = self.in_process(blobs[compression], compression, hash_chunks=True)
            table.add(
                f"{compression}, 4 MiB chunks",
                rate(size, cold),
                rate(size, plain),
                rate(size, hashed),
                f"{hashed / cold:.0%}",
            )
            report.figures[f"image.cold.{compression}_mbps"] = rate(image_size, cold)
            report.figures[f"image.inprocess.{compression}_mbps"] = rate(size, hashed)
        table.notes.append(
            "blockfs: a fresh server and an empty chunk cache directory for each of "
            f"{self.repeats} runs (the best), the blob a local file; every chunk is fetched, "
            "decompressed, hashed and written to the cache. In-process: one thread, no NBD and "
            "no cache, `os.pread` of each member of the same blob and ISA-L's inflate / "
            f"zstandard (best of {self.repeats})."
        )
        report.figures.update(
            {"image.trivial_mbps": rate(image_size, trivial),
             "image.warm_mbps": rate(image_size, warm),
             "image.warm_ratio": ratio,
             "image.warm_disk_mbps": rate(image_size, disk)}
        )  # fmt: skip

    def cold(self, layers_dir: Path, name: str) -> tuple[float, NBDServer]:
        """Best seconds of cold whole-export reads; the last server is left running."""
        times = []
        cache = self.workdir / f"cache-{name}"
        server = None
        for i in range(self.repeats):
            if server is not None:
                server.stop()
            progress(f"cold read, {name} ({i + 1}/{self.repeats})")
            shutil.rmtree(cache, ignore_errors=True)
            server = self.server(f"cold-{name}", layers_dir, cache)
            server.start()
            try:
                times.append(nbdcopy(export_uri(server.socket, name)))
            except BaseException:
                server.stop()
                raise
        assert server is not None
        return min(times), server

    def warm(self, server: NBDServer, name: str, image: Path) -> float:
        """Best seconds of whole-export reads once every chunk is cached.

        Also copies the image to ``image`` for the trivial plugin to serve.
        """
        progress("warm read (chunks in the memory LRU)")
        uri = export_uri(server.socket, name)
        subprocess.run(["nbdcopy", uri, str(image)], check=True)
        fetched = _layer_stats(server, name)["chunks_fetched"]
        seconds = best_time(self.repeats, nbdcopy, uri)
        if _layer_stats(server, name)["chunks_fetched"] != fetched:
            raise RuntimeError("the warm reads fetched chunks from the blob: not warm")
        return seconds

    def warm_from_disk(self, layers_dir: Path, name: str) -> float:
        """Best seconds of whole-export reads served from the on-disk chunk cache alone."""
        progress("warm read from the disk cache only (memory_cache=0)")
        cache = self.workdir / f"cache-{name}"
        server = self.server("disk", layers_dir, cache, memory_cache=0)
        server.start()
        try:
            uri = export_uri(server.socket, name)
            nbdcopy(uri)  # puts the cache files in the page cache
            seconds = best_time(self.repeats, nbdcopy, uri)
            if _layer_stats(server, name)["chunks_fetched"]:
                raise RuntimeError("the disk-cache reads fetched chunks from the blob")
        finally:
            server.stop()
        return seconds

    def trivial(self, image: Path) -> float:
        """Best seconds of whole-export reads of ``image`` served by the trivial plugin."""
        progress("trivial plugin")
        socket = self.socket_dir / "trivial.sock"
        with trivial_server(self.workdir, image, socket=socket, threads=16) as uri:
            nbdcopy(uri)  # page cache
            return best_time(self.repeats, nbdcopy, uri)

    def in_process(self, blob: Path, compression: str, *, hash_chunks: bool) -> float:
        """Best seconds of decompressing (and hashing) every chunk of ``blob`` in-process."""
        toc = BlobReader.open(FileBlobSource(blob)).toc
        chunks = sorted((c for e in toc.entries for c in e.chunks), key=lambda c: c.offset)
        return best_time(
            self.repeats, decompress_members, blob, compression, chunks, hash_chunks=hash_chunks
        )

    # ------------------------------------------------------------------------------------
    # Index build

    def index_build(self, report: Report) -> None:
        count = 2_000 if self.quick else self.toc_entries
        progress(f"index build for a TOC of {count} entries")
        synthetic = synthetic_toc(count)
        steps = ("parse", "build", "extents", "save")
        times: dict[str, list[float]] = {step: [] for step in steps}
        index_file = self.workdir / "index.erofs"
        for _ in range(self.repeats):
            seconds, toc = timed(parse_toc, synthetic.json, payload_end=synthetic.payload_end)
            times["parse"].append(seconds)
            with open(index_file, "wb") as out:
                seconds, index = timed(build_index, toc, out)
            times["build"].append(seconds)
            seconds, emap = timed(ExtentMap.build, index, toc)
            times["extents"].append(seconds)
            seconds, _ = timed(emap.save, self.workdir / EXTENTS_FILE)
            times["save"].append(seconds)
            del toc, index, emap
        meta_size = index_file.stat().st_size
        parse, build, extents, save = (min(times[step]) for step in steps)
        table = report.table(
            f"Index build for a TOC of {synthetic.entries:,} entries "
            f"({len(synthetic.json) / MB:.1f} MB of JSON, the same generator as the TOC parse "
            "figure), seconds",
            "step",
            "seconds (best)",
            "target",
        )
        table.add("`parse_toc` (not part of the target)", parse, "")
        table.add(f"`blockfs.erofs.build_index` ({meta_size / MiB:.1f} MiB of metadata)", build, "")
        table.add("`ExtentMap.build`", extents, "")
        total = build + extents
        table.add(
            "**index build: `build_index` + `ExtentMap.build`**",
            total,
            f"< 2 s: {verdict(total, INDEX_SECONDS_TARGET)}" if not self.quick else "(quick)",
        )
        table.add("`ExtentMap.save` (not part of the target)", save, "")
        table.notes.append(
            f"In one process, in the order `index_layer` runs them; best of {self.repeats}."
        )
        report.figures.update(
            {"index.parse_seconds": parse, "index.build_seconds": build,
             "index.extents_seconds": extents, "index.total_seconds": total}
        )  # fmt: skip

    # ------------------------------------------------------------------------------------
    # Memory

    def memory(self, report: Report) -> None:
        n_layers = 3 if self.quick else self.layers
        layers_dir = self.workdir / "layers-many"
        names = []
        blob_bytes = files_total = 0
        for k in range(n_layers):
            count = 20 if self.quick else 200 + 100 * k
            progress(f"layer {k + 1}/{n_layers}: {count} files")
            tar = self.workdir / "small.tar"
            write_tar(tar, mixed_files(count, seed=100 + k, prefix=f"layer{k}/"))
            blob = self.workdir / f"layer{k}.esgz"
            result = build_file(tar, blob, BuildOptions(gzip_level=6))
            name = f"layer{k:02d}"
            self.index(blob, layers_dir, name, result.toc_digest)
            names.append(name)
            blob_bytes += result.blob_size
            files_total += count
        server = self.server("memory", layers_dir, self.workdir / "cache-memory")
        server.start()
        handles = []
        samples: list[tuple[int, int, int]] = []  # (layers open, VmRSS KiB, LRU bytes)
        lru = 0
        try:
            pid = server.pid()
            assert pid is not None
            time.sleep(0.5)
            samples.append((0, rss_kib(pid), 0))
            for i, name in enumerate(names, start=1):
                h = nbd.NBD()
                h.connect_uri(export_uri(server.socket, name))
                size = h.get_size()
                h.pread(BLOCK, 0)
                h.pread(BLOCK, size - BLOCK)
                handles.append(h)
                lru += _chunk_bytes_at(layers_dir / name, size - BLOCK)
                samples.append((i, rss_kib(pid), lru))
        finally:
            for h in handles:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
            server.stop()
        _, rss1, lru1 = samples[1]
        _, rss_n, lru_n = samples[-1]
        per_layer = (rss_n - rss1) * 1024 / max(n_layers - 1, 1)
        table = report.table(
            f"nbdkit memory (VmRSS) with 1 and with {n_layers} layers served "
            f"({n_layers} distinct layers of {files_total // n_layers:,} files on average, "
            f"{blob_bytes / MB:.0f} MB of blobs)",
            "layers open",
            "VmRSS MiB",
            "chunk plaintext read so far, MiB",
        )
        for opened, rss, lru_bytes in samples:
            if opened in (0, 1, 2, 5, 10, n_layers):
                table.add(str(opened), rss / 1024, lru_bytes / MiB)
        table.add(
            f"**per added layer: (VmRSS[{n_layers}] - VmRSS[1]) / {n_layers - 1}**",
            f"{per_layer / MiB:.2f} MiB",
            f"target < 8 MiB: {verdict(per_layer, PER_LAYER_TARGET)}"
            if not self.quick
            else "(quick)",
        )
        table.notes.append(
            "One server (`NBDServer`, default `ServerConfig`: 256 MiB memory LRU, `--threads 16`). "
            "Each layer is opened by its own libnbd connection, which stays open, and reads the "
            "layer's first block (metadata) and last block (file data: one chunk fetched, "
            "verified and kept in the shared memory LRU; the third column sums those chunks). "
            "Layers are built with `BuildOptions(gzip_level=6)` to keep the run short; "
            "compression does not change what the server holds per layer."
        )
        report.figures["memory.rss1_kib"] = rss1
        report.figures[f"memory.rss{n_layers}_kib"] = rss_n
        report.figures["memory.per_layer_bytes"] = per_layer
        report.figures["memory.lru_bytes"] = lru_n - lru1


def _layer_stats(server: NBDServer, name: str) -> dict[str, Any]:
    assert server.config.control is not None
    stats: dict[str, Any] = query_stats(str(server.config.control), name)["layers"][name]
    return stats


def _chunk_bytes_at(layer_dir: Path, offset: int) -> int:
    """Plaintext bytes of the chunk that a read at image ``offset`` fetches (0 if none)."""
    emap = ExtentMap.load(layer_dir / EXTENTS_FILE)
    i = emap.extent_at(offset)
    if i is None:
        return 0
    start, size = emap.extent_span(i)
    if offset - start >= size:
        return 0
    return emap.chunk(emap.chunk_in_extent(i, offset - start)).size
