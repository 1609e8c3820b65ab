"""ExportTable: the layers one NBD server process serves, by export name.

Exports are the layer directories under one root: adding a layer is writing its
directory (see ``index_layer``), so the server needs no other signal to serve it.
A layer is opened on first use and shared by every connection to it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from blockfs.cache import ChunkCache
from blockfs.estargz import BlobSource, CountingSource
from blockfs.image._elf import LoaderNeeds
from blockfs.image._extents import ExtentMap
from blockfs.image._layer import FetchPolicy, KeptBudget, LayerImage
from blockfs.image._preload import PRELOAD_TTL, Preload, PreloadedSource
from blockfs.image._reader import BlobChunkReader
from blockfs.image._record import (
    EXTENTS_FILE,
    INDEX_FILE,
    LayerRecord,
    check_export_name,
)
from blockfs.image._sources import BlobSources, SourceSpec

log = logging.getLogger(__name__)

SourceOpener = Callable[[SourceSpec], BlobSource]
# Background fetching waits until no read of any layer has had to fetch for this long.
BACKGROUND_IDLE = 1.0


class _Served:
    def __init__(
        self,
        record: LayerRecord,
        image: LayerImage,
        source: CountingSource,
        preload: Preload | None = None,
    ) -> None:
        self.record = record
        self.image = image
        self.source = source
        self.preload = preload
        self.prefetch_thread: threading.Thread | None = None

    def close(self) -> None:
        if self.preload is not None:
            self.preload.release()
        self.image.close()


def _blob_of(spec: SourceSpec) -> tuple[Any, ...]:
    """What names the blob of a source spec (the digest is in the reference)."""
    return (spec.get("type"), spec.get("ref"), spec.get("path"))


def _trace_log(path: Path) -> Callable[[str], None]:
    """Appends each name it is given to ``path`` as a JSON string, one write a line."""

    def append(name: str) -> None:
        line = json.dumps(name) + "\n"  # ASCII: any name, even one not UTF-8
        with open(path, "a", encoding="ascii") as f:
            f.write(line)

    return append


class ExportTable:
    """Opens and keeps the LayerImage of each export under ``root``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        cache: ChunkCache,
        *,
        open_source: SourceOpener | None = None,
        prefetch: bool = False,
        background_fetch: bool = False,
        background_idle: float = BACKGROUND_IDLE,
        fetch: FetchPolicy = FetchPolicy(),  # noqa: B008 - frozen, shared safely
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        """With ``trace`` (a directory), each layer appends to ``trace/<export>`` the name
        of each file at the first read of its data, one JSON string a line."""
        self.root = Path(root)
        self.trace = Path(trace) if trace is not None else None
        self.cache = cache
        # The guesses its layers keep compressed share one bound.
        self.kept = KeptBudget()
        # Without an opener given, the table opens files and registry blobs, with one
        # registry client per configuration shared by all its layers.
        self._own_sources: BlobSources | None = None
        if open_source is None:
            self._own_sources = open_source = BlobSources()
        self.open_source = open_source
        self.prefetch = prefetch
        self.background_fetch = background_fetch
        self.background_idle = background_idle
        self.fetch = fetch
        self._lock = threading.Lock()
        self._served: dict[str, _Served] = {}
        self._preloads: dict[str, Preload] = {}
        self._stop = threading.Event()
        # When a read last had to fetch, or a layer was opened (a container starting).
        self._last_demand = time.monotonic()
        # Layers are fetched in the background one at a time.
        self._background_slot = threading.Lock()

    def names(self) -> list[str]:
        """Export names of every complete layer directory under the root."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / INDEX_FILE).exists()
        )

    def open(self, name: str) -> LayerImage:
        """The image of export ``name``, opened on first use."""
        check_export_name(name)
        with self._lock:
            served = self._served.get(name)
            if served is None:
                served = self._load(name)
                self._served[name] = served
            return served.image

    def preload(self, name: str, spec: SourceSpec, end: int) -> bool:
        """Start reading ``[0, end)`` of the blob of ``spec``, the prioritised region of
        the layer that will be export ``name``, before that layer is indexed (see
        ``blockfs.image._preload``); its prefetch takes the bytes when it opens. False
        (nothing done) without the prefetch setting, or when the export is open or
        preloading already."""
        check_export_name(name)
        if not self.prefetch or end <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            for stale in [n for n, p in self._preloads.items() if now - p.started > PRELOAD_TTL]:
                self._preloads.pop(stale).release()
            if name in self._served or name in self._preloads:
                return False
            source = CountingSource(self.open_source(spec))
            self._preloads[name] = Preload(source, end, _blob_of(spec))
        return True

    def _load(self, name: str) -> _Served:
        layer_dir = self.root / name
        record = LayerRecord.load(layer_dir)
        extents = ExtentMap.load(layer_dir / EXTENTS_FILE)
        preload = self._preloads.pop(name, None)
        if preload is not None:
            unused = (
                "another blob" if preload.blob != _blob_of(record.source)
                else "no prioritised files in the TOC" if not record.prefetch_end
                else "it failed" if preload.failed
                else None
            )  # fmt: skip
            if unused is not None:
                log.info("preload of %s not used: %s", name, unused)
                preload.release()
                preload = None
        if preload is None:
            source = CountingSource(self.open_source(record.source))
            reader = BlobChunkReader(source, record.compression)
        else:
            source = preload.source  # counts the preload's request too
            reader = BlobChunkReader(PreloadedSource(source, preload), record.compression)
        image = LayerImage(
            name, layer_dir / INDEX_FILE, extents, reader, self.cache,
            on_demand_fetch=self._demand, policy=self.fetch,
            prioritized_end=record.prefetch_end or 0,
            trace=_trace_log(self.trace / name) if self.trace is not None else None,
            kept=self.kept,
        )  # fmt: skip
        self._demand()
        served = _Served(record, image, source, preload)
        prefetch_end = record.prefetch_end if self.prefetch else None
        if prefetch_end or self.background_fetch:
            served.prefetch_thread = threading.Thread(
                target=self._warm,
                args=(served, prefetch_end, record.blob_size if self.background_fetch else None),
                name=f"prefetch-{name}",
                daemon=True,
            )
            served.prefetch_thread.start()
        return served

    def _warm(self, served: _Served, prefetch_end: int | None, fetch_end: int | None) -> None:
        """Fetch the prioritized files first, then (background fetch) the rest of the layer,
        one layer at a time and only while no read of any layer has to fetch."""
        image = served.image
        if prefetch_end:
            image.prefetch(prefetch_end, self._stop)
        if served.preload is not None:
            served.preload.release()  # its bytes are in the cache now, or failed
        if fetch_end:
            with self._background_slot:
                image.prefetch(fetch_end, self._stop, pace=self._wait_until_idle)

    def _demand(self) -> None:
        self._last_demand = time.monotonic()

    def _wait_until_idle(self) -> bool:
        """Wait until no read has fetched for ``background_idle`` seconds; False if the
        table is closing."""
        while not self._stop.is_set():
            quiet = time.monotonic() - self._last_demand
            if quiet >= self.background_idle:
                return True
            self._stop.wait(self.background_idle - quiet)
        return False

    def fetch_ahead(self, name: str, offset: int, *, around: bool) -> LoaderNeeds | None:
        """``LayerImage.fetch_ahead`` of export ``name`` (opened if need be)."""
        return self.open(name).fetch_ahead(offset, around=around)

    def forget(self, name: str) -> None:
        """Drop export ``name`` from memory (its directory is left alone)."""
        with self._lock:
            served = self._served.pop(name, None)
            preload = self._preloads.pop(name, None)
        if preload is not None:
            preload.release()
        if served is not None:
            served.close()

    def stats(self, name: str | None = None) -> dict[str, Any]:
        """Per-export statistics: bytes fetched (indexing included), chunk and cache counters."""
        with self._lock:
            items = list(self._served.items())
        layers: dict[str, Any] = {}
        for export, served in items:
            if name is not None and export != name:
                continue
            layers[export] = {
                **served.image.stats.to_json(),
                "bytes_fetched": served.record.index_bytes_fetched + served.source.bytes_read,
                "range_requests": served.source.requests,
                "image_size": served.image.size,
                "blob_size": served.record.blob_size,
            }
        return {"layers": layers, "cache": attrs.asdict(self.cache.stats)}

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            served = list(self._served.values())
            self._served.clear()
            preloads = list(self._preloads.values())
            self._preloads.clear()
        for p in preloads:
            p.release()
        for s in served:
            s.close()
        if self._own_sources is not None:
            self._own_sources.close()
