"""ExportTable: exports opened from layer directories, warmed in the background when asked."""

import time

import pytest

from blockfs.cache import ChunkCache
from blockfs.estargz import LANDMARKS, BlobReader, FileBlobSource
from blockfs.image import (
    ControlError,
    ExportTable,
    FetchPolicy,
    LayerStateError,
    ServedLayers,
    ServerConfig,
    fetch_ahead,
    forget_export,
    index_layer,
    open_export,
    query_stats,
)
from tests.helpers.testdata import TESTDATA
from tests.helpers.waiting import wait_for


def make_table(tmp_path, blob, **options):
    path = TESTDATA / blob
    index_layer(
        BlobReader.open(FileBlobSource(path)),
        tmp_path / "layers" / "l",
        name="l",
        source={"type": "file", "path": str(path)},
        bytes_fetched=0,
    )
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 30)
    return ExportTable(tmp_path / "layers", cache, **options)


def members_of(blob):
    """Compressed members holding file data (landmarks are not part of the filesystem)."""
    toc = BlobReader.open(FileBlobSource(TESTDATA / blob)).toc
    return {c.offset for e in toc.entries if e.name not in LANDMARKS for c in e.chunks}


def test_background_fetch_caches_every_member_without_a_read(tmp_path):
    table = make_table(tmp_path, "gzip-64k.esgz", background_fetch=True)
    try:
        image = table.open("l")
        total = len(members_of("gzip-64k.esgz"))
        wait_for(lambda: image.stats.members_fetched == total)
        assert image.stats.reads == 0
    finally:
        table.close()


def test_background_fetch_waits_while_reads_fetch_on_demand(tmp_path):
    table = make_table(
        tmp_path,
        "gzip-64k.esgz",
        background_fetch=True,
        background_idle=1.0,
        fetch=FetchPolicy.exact(),  # reads fetch only their own member
    )
    try:
        image = table.open("l")
        emap = image.extents
        spans = sorted(emap.extent_span(i) for i in range(emap.extent_count))
        files = [(start, size) for start, size in spans if size > 0][:15]
        wanted = set()
        for start, _ in files:
            # One block of one file, every 50 ms: each read fetches that file's member.
            image.pread(start, 4096)
            wanted.add(emap.chunk(emap.chunk_in_extent(emap.extent_at(start), 0)).offset)
            time.sleep(0.05)
        # Only what the reads asked for was fetched: the background fetch held back.
        assert image.stats.members_fetched == len(wanted)
        total = len(members_of("gzip-64k.esgz"))
        wait_for(lambda: image.stats.members_fetched == total)  # idle now: it goes on
        assert image.stats.reads == len(files)
    finally:
        table.close()


def test_without_prefetch_or_background_fetch_nothing_is_fetched(tmp_path):
    table = make_table(tmp_path, "gzip-prio.esgz")
    try:
        image = table.open("l")
        time.sleep(0.3)
        assert image.stats.members_fetched == 0
        assert table.stats("l")["layers"]["l"]["bytes_fetched"] == 0
    finally:
        table.close()


def test_unknown_or_unsafe_export_names_are_refused(tmp_path):
    table = make_table(tmp_path, "gzip-64k.esgz")
    with pytest.raises(LayerStateError):
        table.open("../l")
    with pytest.raises(LayerStateError):
        table.open("missing")
    assert table.names() == ["l"]


def serve_one_layer(tmp_path, **config):
    """A server process's layers (in this process) with one export ``l`` indexed, and
    its control socket."""
    path = TESTDATA / "gzip-64k.esgz"
    index_layer(
        BlobReader.open(FileBlobSource(path)),
        tmp_path / "layers" / "l",
        name="l",
        source={"type": "file", "path": str(path)},
        bytes_fetched=0,
    )
    control = tmp_path / "ctl.sock"
    served = ServedLayers(
        ServerConfig(
            root=tmp_path / "layers", cache_dir=tmp_path / "cache", control=control, **config
        )
    )
    return served, control


def test_forget_over_the_control_socket_drops_the_served_export(tmp_path):
    served, control = serve_one_layer(tmp_path)
    try:
        served.exports.open("l")
        assert list(query_stats(str(control))["layers"]) == ["l"]
        forget_export(str(control), "l")
        assert query_stats(str(control))["layers"] == {}
        with pytest.raises(ControlError, match="needs an export name"):
            forget_export(str(control), "")
    finally:
        served.close()


def test_open_over_the_control_socket_opens_the_export_and_starts_its_prefetch(tmp_path):
    served, control = serve_one_layer(tmp_path, background_fetch=True)
    try:
        assert query_stats(str(control))["layers"] == {}
        open_export(str(control), "l")  # no read of it yet
        layers = query_stats(str(control))["layers"]
        assert list(layers) == ["l"]
        # Its warm-up runs: with background fetch on, members come without any read.
        deadline = time.monotonic() + 30
        while query_stats(str(control), "l")["layers"]["l"]["members_fetched"] == 0:
            assert time.monotonic() < deadline, "nothing was fetched after the open"
            time.sleep(0.05)
        with pytest.raises(ControlError, match="not an indexed layer"):
            open_export(str(control), "missing")
    finally:
        served.close()


def test_ahead_over_the_control_socket_fetches_one_file_in_one_request(tmp_path):
    whole_files = FetchPolicy(unit=0, whole_file_max=64 << 20, directory_window=0)
    served, control = serve_one_layer(tmp_path, fetch=whole_files)
    try:
        toc = BlobReader.open(FileBlobSource(TESTDATA / "gzip-64k.esgz")).toc
        chunks = toc.lookup("usr/lib/libbig.so").chunks
        # Opens the export; no read of it. Not an ELF file: the loader opens nothing.
        assert fetch_ahead(str(control), "l", chunks[0].offset, around=True) is None
        wait_for(lambda: all(c.digest in served.cache for c in chunks))
        stats = query_stats(str(control), "l")["layers"]["l"]
        assert stats["range_requests"] == 1
        # Nothing outside the file came.
        assert stats["members_fetched"] == len({c.offset for c in chunks})
        with pytest.raises(ControlError, match="ahead NAME OFFSET AROUND"):
            fetch_ahead(str(control), "l", -1, around=False)
        with pytest.raises(ControlError, match="no file's data starts at blob offset"):
            fetch_ahead(str(control), "l", chunks[1].offset, around=False)
    finally:
        served.close()
