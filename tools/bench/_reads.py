"""Cold reads across many small files: coalesced member fetches against one request per member.

The kernel reads a mounted layer in readahead windows (128 KiB by default) that span many
small files, whose eStargz members are adjacent in the blob. ``LayerImage.pread`` fetches
every member a read lacks with one coalesced request; before, each member cost a request
of its own. This benchmark reads a layer of small files cold, window by window, both
ways in the same run: the request count is exact, and the time is measured with an
added round-trip time per request, the cost a registry that far away adds.

The round trip is modelled (a sleep before each read of a local blob), because this
machine has no remote registry; the bytes, decompression and verification are real.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from blockfs.cache import ChunkCache
from blockfs.estargz import (
    BlobReader,
    BlobSource,
    BuildOptions,
    Chunk,
    CountingSource,
    FileBlobSource,
    SourceWrapper,
    build,
)
from blockfs.image import (
    EXTENTS_FILE,
    INDEX_FILE,
    BlobChunkReader,
    ExtentMap,
    LayerImage,
    index_layer,
)
from blockfs.image._reader import MemberOutcome
from tools.bench._data import mixed_files, write_tar
from tools.bench._report import Machine, Report, progress

WINDOW = 128 << 10  # the kernel's default readahead


class RoundTripSource(SourceWrapper):
    """A blob source whose every request first waits ``rtt`` seconds, like a distant registry."""

    def __init__(self, inner: BlobSource, rtt: float) -> None:
        super().__init__(inner)
        self.rtt = rtt

    def read_range(self, offset: int, length: int) -> bytes:
        time.sleep(self.rtt)
        return self.inner.read_range(offset, length)


class PerMemberReader(BlobChunkReader):
    """The baseline: one request per member, as LayerImage fetched before coalescing."""

    def read_members(
        self,
        members: Sequence[Sequence[tuple[str, Chunk]]],
        on_member: Callable[[int, MemberOutcome], None] | None = None,
        *,
        keep: Callable[[int], bool] | None = None,
    ) -> list[MemberOutcome]:
        outcomes = []
        for i, member in enumerate(members):
            one = None if keep is None else (lambda _, i=i: keep(i))
            outcome = super().read_members([member], keep=one)[0]
            if on_member is not None:
                on_member(i, outcome)
            outcomes.append(outcome)
        return outcomes


@attrs.frozen
class ColdRead:
    reader: str
    rtt_ms: float
    seconds: float
    requests: int
    members: int
    bytes_fetched: int


class ReadsBench:
    """Builds a layer of ``files`` small files and reads it cold both ways."""

    def __init__(self, workdir: Path, *, files: int, rtts_ms: Sequence[float], repeat: int) -> None:
        self.workdir = workdir
        self.files = files
        self.rtts_ms = rtts_ms
        self.repeat = repeat

    def run(self, command: str) -> Report:
        blob, layer_dir, data_start, data_end = self._layer()
        rows = []
        for rtt in self.rtts_ms:
            for name, reader_class in (
                ("per member", PerMemberReader),
                ("coalesced", BlobChunkReader),
            ):
                best = min(
                    (self._cold_read(blob, layer_dir, data_start, data_end, reader_class, rtt)
                     for _ in range(self.repeat)),
                    key=lambda r: r.seconds,
                )  # fmt: skip
                progress(f"rtt {rtt} ms, {name}: {best.seconds:.2f} s, {best.requests} requests")
                rows.append(attrs.evolve(best, reader=name))
        report = Report("Cold reads across small files", command, Machine.describe())
        table = report.table(
            f"Cold read of {self.files} small files in {WINDOW >> 10} KiB windows (best of "
            f"{self.repeat})",
            "round trip", "fetches", "requests", "members", "MB fetched", "seconds",
        )  # fmt: skip
        for r in rows:
            table.add(
                f"{r.rtt_ms:g} ms", r.reader, r.requests, r.members,
                round(r.bytes_fetched / 1e6, 2), r.seconds,
            )  # fmt: skip
            key = f"{r.reader.replace(' ', '_')}_rtt{r.rtt_ms:g}ms"
            report.figures[f"{key}_seconds"] = r.seconds
            report.figures[f"{key}_requests"] = r.requests
            report.figures[f"{key}_members"] = r.members
        table.notes.append(
            "The round trip is modelled: each request to the local blob first sleeps that "
            "long. Decompression, verification and caching are real."
        )
        return report

    def _layer(self) -> tuple[Path, Path, int, int]:
        tar = self.workdir / "files.tar"
        write_tar(tar, mixed_files(self.files, seed=7))
        blob = self.workdir / "files.esgz"
        with open(tar, "rb") as src, open(blob, "wb") as dst:
            build(src, dst, BuildOptions())
        reader = BlobReader.open(FileBlobSource(blob))
        layer_dir = self.workdir / "layer"
        index_layer(reader, layer_dir, name="bench", source={"type": "file", "path": str(blob)},
                    bytes_fetched=0)  # fmt: skip
        emap = ExtentMap.load(layer_dir / EXTENTS_FILE)
        spans = [emap.extent_span(i) for i in range(emap.extent_count)]
        start = min(s for s, _ in spans) // 4096 * 4096
        end = max(s + n for s, n in spans)
        progress(f"layer: {self.files} files, blob {blob.stat().st_size} bytes, "
                 f"data region {end - start} bytes")  # fmt: skip
        return blob, layer_dir, start, end

    def _cold_read(
        self,
        blob: Path,
        layer_dir: Path,
        start: int,
        end: int,
        reader_class: type[BlobChunkReader],
        rtt_ms: float,
    ) -> ColdRead:
        cache_dir = self.workdir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache = ChunkCache(cache_dir, max_bytes=1 << 30)
        source = CountingSource(RoundTripSource(FileBlobSource(blob), rtt_ms / 1000))
        record_compression = BlobReader.open(FileBlobSource(blob)).compression
        image = LayerImage(
            "bench",
            layer_dir / INDEX_FILE,
            ExtentMap.load(layer_dir / EXTENTS_FILE),
            reader_class(source, record_compression),
            cache,
        )
        sink = io.BytesIO()
        started = time.perf_counter()
        for offset in range(start, end, WINDOW):
            sink.write(image.pread(offset, min(WINDOW, end - offset)))
        seconds = time.perf_counter() - started
        # The members that came along with the reads' own may still be arriving.
        if not image.wait_idle():
            raise RuntimeError("the fetches of the cold read did not end within 30 s")
        image.close()
        return ColdRead(
            reader=reader_class.__name__,
            rtt_ms=rtt_ms,
            seconds=seconds,
            requests=source.requests,
            members=image.stats.members_fetched,
            bytes_fetched=source.bytes_read,
        )
