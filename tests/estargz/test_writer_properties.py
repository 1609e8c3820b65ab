"""Properties of the eStargz writer over random small trees, checked by independent decompression."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from typing import Literal

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from writer_testkit import (
    TOC_NAME,
    clean,
    decompress_all,
    decompress_toc_json,
    listing,
    pieces,
    read_piece,
    toc_entries,
)

from blockfs.estargz import BlobReader, BuildOptions, build

DIRS = ("d", "d/e", "f", "d/e/g")


@attrs.frozen
class Tree:
    """A random layer: its tar bytes and the names of its regular files, in tar order."""

    tar: bytes
    files: tuple[str, ...]


@st.composite
def trees(draw: st.DrawFn, chunk_size: int) -> Tree:
    sizes = st.one_of(
        st.sampled_from([0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size]),
        st.integers(0, 3 * chunk_size),
    )
    dirs = draw(st.lists(st.sampled_from(DIRS), unique=True, max_size=len(DIRS)))
    parent = st.sampled_from(["", *DIRS])  # some parents have no entry of their own
    base = st.text(alphabet="abxyzé-_.", min_size=1, max_size=8).filter(
        lambda s: s not in (".", "..")
    )
    files = draw(
        st.lists(st.tuples(parent, base, sizes), max_size=7, unique_by=lambda t: (t[0], t[1]))
    )
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    entries: list[tuple[tarfile.TarInfo, bytes]] = []
    for d in dirs:
        info = tarfile.TarInfo(d + "/")
        info.type = tarfile.DIRTYPE
        info.mode = draw(st.sampled_from([0o755, 0o700, 0o1777]))
        entries.append((info, b""))
    names = []
    for p, b, size in files:
        name = f"{p}/f_{b}" if p else f"f_{b}"
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = draw(st.sampled_from([0o644, 0o4755, 0o600]))
        info.uid = draw(st.sampled_from([0, 1000, 2**21 + 5]))
        info.uname = draw(st.sampled_from(["", "root", "user"]))
        info.mtime = draw(st.sampled_from([0, 1_700_000_000, 1_700_000_000.25]))
        # Mostly incompressible bytes, sometimes runs of one byte value.
        data = rng.randbytes(size) if rng.random() < 0.7 else bytes([rng.randrange(256)]) * size
        if size and rng.random() < 0.3:
            info.pax_headers = {"SCHILY.xattr.user.k": rng.randbytes(5).decode("latin-1")}
        entries.append((info, data))
        names.append(name)
    for i, target in enumerate(draw(st.lists(st.sampled_from(names), max_size=2)) if names else []):
        info = tarfile.TarInfo(f"h_{i}")
        info.type = tarfile.LNKTYPE
        info.linkname = target
        entries.append((info, b""))
    for i in range(draw(st.integers(0, 2))):
        info = tarfile.TarInfo(f"s_{i}")
        info.type = tarfile.SYMTYPE
        info.linkname = draw(st.sampled_from(["f_a", "../x", "/abs/path", "d"]))
        entries.append((info, b""))
    order = draw(st.permutations(range(len(entries))))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in order:
            info, data = entries[i]
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return Tree(buf.getvalue(), tuple(names))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Tree, BuildOptions]:
    chunk_size = draw(st.sampled_from([512, 4096, 65536]))
    tree = draw(trees(chunk_size))
    compression: Literal["gzip", "zstd"] = draw(st.sampled_from(["gzip", "zstd"]))
    prioritized = (
        draw(st.lists(st.sampled_from(tree.files), unique=True, max_size=3)) if tree.files else []
    )
    options = BuildOptions(
        compression=compression,
        chunk_size=chunk_size,
        min_chunk_size=draw(st.sampled_from([0, 0, 100, 2000])),
        prioritized=tuple(prioritized),
        gzip_level=1,
        zstd_level=1,
        workers=draw(st.sampled_from([1, 3])),
    )
    return tree, options


@attrs.frozen
class BytesSource:
    """A blob held in memory, as a BlobSource."""

    data: bytes
    name: str = "memory"

    @property
    def size(self) -> int:
        return len(self.data)

    def read_range(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(self.data)
        return self.data[offset : offset + length]


def _build(tar: bytes, options: BuildOptions) -> bytes:
    dst = io.BytesIO()
    build(io.BytesIO(tar), dst, options)
    return dst.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_any_tree_survives_build_and_independent_decompression(
    case: tuple[Tree, BuildOptions],
) -> None:
    tree, options = case
    blob = _build(tree.tar, options)
    compression = options.compression
    raw = decompress_all(blob, compression)

    # Every source entry comes back with the same metadata and content.
    want = listing(tree.tar)
    got = listing(raw)
    landmark = ".prefetch.landmark" if options.prioritized else ".no.prefetch.landmark"
    assert set(got) == set(want) | {landmark} | ({TOC_NAME} if compression == "gzip" else set())
    for name, member in want.items():
        assert got[name] == member, name

    # The TOC lists the same entries, and every piece decompresses from its offset.
    toc = toc_entries(blob, compression)
    listed = [clean(e["name"]) for e in toc if e["type"] != "chunk"]
    assert sorted(listed) == sorted([*want, landmark])
    for _, e, size in pieces(toc):
        data = read_piece(blob, compression, e["offset"], e.get("innerOffset", 0), size)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == e["chunkDigest"]
    for e in toc:
        if e["type"] == "reg" and clean(e["name"]) in want:
            assert e["digest"] == "sha256:" + want[clean(e["name"])].sha256

    # blockfs's own reader agrees.
    toc_json = decompress_toc_json(blob, compression)
    reader = BlobReader.open(
        BytesSource(blob), toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest()
    )
    assert reader.verify().ok
    contents = {n: m for n, m in want.items() if m.type == tarfile.REGTYPE}
    for name, member in contents.items():
        data = reader.read_file(name)
        assert hashlib.sha256(data).hexdigest() == member.sha256, name

    # Prioritized files come before the landmark, in the order given.
    before = listed[: listed.index(landmark)]
    assert [n for n in before if n in options.prioritized] == list(options.prioritized)


@settings(max_examples=15, deadline=None)
@given(cases())
def test_blob_is_the_same_for_any_number_of_workers(case: tuple[Tree, BuildOptions]) -> None:
    tree, options = case
    blobs = {_build(tree.tar, attrs.evolve(options, workers=w)) for w in (1, 2, 4)}
    assert len(blobs) == 1
