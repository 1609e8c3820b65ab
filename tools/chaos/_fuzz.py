"""Fuzzing the eStargz footer and TOC parsers with inputs made from real blobs.

Four targets, each an entry point :class:`blockfs.estargz.BlobReader` goes through when it
opens a layer:

- ``footer``: :func:`blockfs.estargz.parse_footer` on a real blob's last bytes, mutated
  (bits flipped, bytes replaced, hex offsets and zstd sizes rewritten, cut short), with a
  blob size that is right, off by a little or nonsense;
- ``toc-bytes``: :func:`blockfs.estargz.parse_toc` on a real TOC's JSON text (a run of its
  entries), its bytes mutated: flipped, deleted, doubled, cut, spliced with JSON tokens;
- ``toc-struct``: :func:`~blockfs.estargz.parse_toc` on a real TOC's document mutated as
  a document: wrong types, huge and negative numbers, missing fields, deep nesting,
  duplicate names, path traversal, overlapping offsets and chunks, long names and xattrs,
  thousands of entries;
- ``blob``: :meth:`blockfs.estargz.BlobReader.open` on a whole blob held in memory: a
  real blob's TOC member and footer with bytes mutated, or a real blob's TOC document
  mutated as above, compressed again as its blob compresses it (a gzip member holding a
  tar, or a zstd frame) behind a matching footer, sometimes with the TOC digest expected.

An input either is accepted (and then the result is walked: every entry, its chunks,
xattrs and links, the regular files, the prefetch range) or is refused with the library's
own error, :class:`blockfs.estargz.FormatError`. Anything else is a bug and is reported
with the seed and index that make the same input again (``python -m tools.chaos fuzz
--seed S --replay TARGET:INDEX`` shows its traceback).

Each input is made from its own random generator, seeded by the run's seed, the target and
the input's index, so a run is the same whatever the number of worker processes. Workers
run with an address-space limit, so a parser that would hold gigabytes fails with
MemoryError (counted as an unexpected error) instead of taking the machine down.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import multiprocessing
import resource
import tarfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from random import Random
from typing import Any, Final

import attrs
import zstandard

from blockfs.estargz import (
    TOC_TAR_NAME,
    BlobReader,
    FileBlobSource,
    FormatError,
    TruncatedBlobError,
    parse_footer,
    parse_toc,
)
from blockfs.estargz._compression import read_gzip_toc, read_zstd_toc
from blockfs.estargz._footer import (
    MAX_FOOTER_SIZE,
    ZSTD_SKIPPABLE_HEADER,
    ZSTD_SKIPPABLE_MAGIC,
    encode_estargz_footer,
    encode_legacy_footer,
    encode_zstd_footer,
)

PROJECT = Path(__file__).resolve().parents[2]
TESTDATA = PROJECT / "tests" / "data" / "estargz"
BLOBS = ("gzip-64k.esgz", "gzip-default.esgz", "gzip-prio.esgz", "legacy-64k.stargz",
         "zstd-64k.esgz")  # fmt: skip
TARGETS: Final = ("footer", "toc-bytes", "toc-struct", "blob")
# How a run's inputs are shared among the targets.
SHARES: Final = {"footer": 0.25, "toc-bytes": 0.25, "toc-struct": 0.3, "blob": 0.2}
BATCH: Final = 1000
# Each worker's address space; the parsers hold a few hundred MB at most by design.
ADDRESS_SPACE: Final = 3 << 30
_BIG_NUMBERS: Final = (
    -1, -(1 << 63), (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 53) + 1,
    (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, 10**30, 10**400,
)  # fmt: skip
_TOKENS: Final = (
    b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\u0000", b"\\ud800", b"null",
    b"true", b"1e999", b"-0", b"18446744073709551616", b'"../"', b"\x00", b"\xff", b"\xc3",
)  # fmt: skip
_TRAVERSAL: Final = (
    "../etc/passwd", "/etc/shadow", "a/../../b", "./", "..", "a//b", "a/./b", "\x00", "a\x00b",
    "a/..", "/", "", ".", "\\..\\x", "\udcff", "a/" * 200 + "x", "é" * 200,
)  # fmt: skip
_FIELDS: Final = (
    "name", "type", "size", "offset", "chunkOffset", "chunkSize", "innerOffset", "digest",
    "chunkDigest", "linkName", "mode", "uid", "gid", "userName", "groupName", "modtime",
    "devMajor", "devMinor", "xattrs",
)  # fmt: skip
_TYPES: Final = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "sock",
                 "", "REG")  # fmt: skip


# -- the material: real blobs ----------------------------------------------------------------


@attrs.frozen
class Material:
    """One reference blob, cut into what the targets mutate."""

    name: str
    kind: str  # the footer's kind: estargz, stargz or zstd
    size: int
    tail: bytes  # the last MAX_FOOTER_SIZE bytes
    toc_offset: int
    toc_region: bytes  # from the TOC's start to the footer (zstd: the frame)
    document: dict[str, Any]  # the TOC, decoded
    units: tuple[tuple[dict[str, Any], ...], ...]  # entries grouped: a file and its chunks
    payload_end: int
    toc_digest: str


def load_material(names: Sequence[str] = BLOBS, directory: Path = TESTDATA) -> list[Material]:
    found = []
    for name in names:
        with FileBlobSource(directory / name) as source:
            reader = BlobReader.open(source)
            footer = reader.footer
            size = source.size
            if footer.kind == "zstd":
                region = source.read_range(footer.toc_offset, footer.toc_compressed_size)
                raw = read_zstd_toc(region, footer.toc_uncompressed_size, max_bytes=1 << 30)
            else:
                region = source.read_range(
                    footer.toc_offset, size - footer.size - footer.toc_offset
                )
                raw = read_gzip_toc(region, max_bytes=1 << 30)
            document = json.loads(raw)
            units: list[list[dict[str, Any]]] = []
            for entry in document["entries"]:
                if entry.get("type") == "chunk" and units:
                    units[-1].append(entry)
                else:
                    units.append([entry])
            found.append(
                Material(
                    name=name,
                    kind=footer.kind,
                    size=size,
                    tail=source.read_range(size - MAX_FOOTER_SIZE, MAX_FOOTER_SIZE),
                    toc_offset=footer.toc_offset,
                    toc_region=region,
                    document=document,
                    units=tuple(tuple(u) for u in units),
                    payload_end=footer.payload_end(),
                    toc_digest=reader.toc_digest,
                )
            )
    return found


class MemoryBlob:
    """A blob source over ``prefix_size`` zero bytes (standing in for the data members,
    never read by opening) followed by ``tail``."""

    def __init__(self, prefix_size: int, tail: bytes) -> None:
        self._prefix = prefix_size
        self._tail = tail

    @property
    def name(self) -> str:
        return "fuzz"

    @property
    def size(self) -> int:
        return self._prefix + len(self._tail)

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedBlobError(
                f"range [{offset}, {offset + length}) is outside the blob of {self.size} bytes",
                layer=self.name,
                offset=offset,
            )
        zeros = max(0, min(self._prefix, offset + length) - offset)
        start = max(0, offset - self._prefix)
        return bytes(zeros) + self._tail[start : start + length - zeros]


# -- mutations -----------------------------------------------------------------------------


def mutate_bytes(rng: Random, data: bytes, rounds: int | None = None) -> bytes:
    """``data`` with one to four byte-level changes."""
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 8))
            continue
        at = rng.randrange(len(buf))
        op = rng.randrange(8)
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.choice(
                (0, 0xFF, 0x7F, 0x80, ord("0"), ord("f"), ord("9"), rng.randrange(256))
            )
        elif op == 2:
            del buf[at : at + rng.randint(1, 64)]
        elif op == 3:
            piece = buf[at : at + rng.randint(1, 256)]
            buf[at:at] = piece * rng.randint(1, 4)
        elif op == 4:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 5:
            buf[at:at] = rng.choice(_TOKENS)
        elif op == 6:
            buf[at : at + 8] = rng.randbytes(8)
        else:
            other = rng.randrange(len(buf))
            buf[at], buf[other] = buf[other], buf[at]
    return bytes(buf)


def _odd_value(rng: Random) -> Any:
    """A JSON value of a type or size no TOC field expects."""
    choice = rng.randrange(11)
    if choice == 0:
        return rng.choice(_BIG_NUMBERS)
    if choice == 1:
        return rng.choice((None, True, False, 0, -0.5, 1e308, float(rng.randint(0, 1 << 20))))
    if choice == 2:
        return rng.choice(("", "x" * rng.randint(1, 5000), "sha256:" + "g" * 64, "12", "-1"))
    if choice == 3:
        return [rng.randint(0, 9)] * rng.randint(0, 5)
    if choice == 4:
        return {"a": rng.randint(0, 9)}
    if choice == 5:
        return rng.choice(_TRAVERSAL)
    if choice == 6:
        return "sha256:" + rng.randbytes(32).hex()
    if choice == 7:
        return rng.choice(_TYPES)
    if choice == 8:
        return rng.randint(-(1 << 40), 1 << 40)
    if choice == 9:
        return {"user.x": "A" * rng.randint(0, 100_000)}  # base64 of a large value
    return "2023-13-45T99:99:99Z"


def mutate_document(rng: Random, material: Material) -> tuple[dict[str, Any], list[str]]:
    """A TOC document made from a run of ``material``'s entries with one to three
    structural changes; also the raw JSON snippets to splice in (deep nesting cannot be
    made by ``json.dumps``)."""
    units = material.units
    start = rng.randrange(len(units))
    picked = [list(copy.deepcopy(u)) for u in units[start : start + rng.randint(1, 12)]]
    doc: dict[str, Any] = {"version": 1, "entries": []}
    splices: list[str] = []
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        entries = [e for u in picked for e in u]
        target = rng.choice(entries) if entries else {}
        if op == 0:  # a field gets a value of the wrong type or size
            target[rng.choice(_FIELDS)] = _odd_value(rng)
        elif op == 1:  # a field goes missing
            if target:
                del target[rng.choice(sorted(target))]
        elif op == 2:  # two entries of one name
            if picked:
                twin = copy.deepcopy(rng.choice(picked))
                if rng.random() < 0.5 and len(picked) > 1:
                    twin[0]["type"] = rng.choice(("dir", "reg", "symlink"))
                picked.insert(rng.randrange(len(picked) + 1), twin)
        elif op == 3:  # a name or link target that climbs out or is malformed
            target[rng.choice(("name", "linkName"))] = rng.choice(_TRAVERSAL)
        elif op == 4:  # offsets overlapping another file's, or past the payload
            offsets = [e["offset"] for e in entries if isinstance(e.get("offset"), int)]
            if offsets:
                target["offset"] = rng.choice(
                    (rng.choice(offsets), material.payload_end, material.payload_end - 1, 0)
                )
        elif op == 5:  # chunks that overlap, leave gaps or run past the file
            for e in entries:
                if e.get("type") == "chunk" or "chunkOffset" in e:
                    was = e.get("chunkOffset")
                    was = was if isinstance(was, int) else 0
                    e["chunkOffset"] = max(0, was + rng.randint(-70000, 70000))
                    if rng.random() < 0.5:
                        e["chunkSize"] = rng.choice((0, 1, 1 << 26, 1 << 40, -5))
        elif op == 6:  # deep nesting in place of a value
            depth = rng.choice((64, 1000, 100_000))
            key = rng.choice(_FIELDS)
            target[key] = "__SPLICE__"
            splices.append(
                "[" * depth + "]" * depth
                if rng.random() < 0.5
                else '{"a":' * depth + "1" + "}" * depth
            )
        elif op == 7:  # many entries
            if picked:
                unit = picked[rng.randrange(len(picked))]
                count = rng.choice((100, 1000, 3000))
                for i in range(count):
                    clone = [dict(e) for e in unit]  # shallow: the values are not changed
                    clone[0]["name"] = (
                        f"{clone[0].get('name', 'x')}.{i}"
                        if rng.random() < 0.9
                        else clone[0].get("name")
                    )
                    picked.append(clone)
        elif op == 8:  # a long name, component or link
            target[rng.choice(("name", "linkName"))] = rng.choice(
                ("a/" * 2100, "b" * 256, "c" * 255, "d/" * 10 + "e" * 4096, "f" * 5000)
            )
        elif op == 9:  # large or many xattrs
            target["xattrs"] = rng.choice(
                (
                    {"user.big": "A" * 90_000},
                    {f"user.{i}": "QQ==" for i in range(rng.choice((100, 5000)))},
                    {"": ""},
                    {"user.x": "not base64!"},
                    {"user.x": 5},
                    ["user.x"],
                )
            )
        elif op == 10:  # an unknown or wrong type
            target["type"] = rng.choice(_TYPES)
        elif op == 11:  # the entries list shuffled (chunks before their file)
            flat = [e for u in picked for e in u]
            rng.shuffle(flat)
            picked = [[e] for e in flat]
        elif op == 12:  # the document itself
            doc = rng.choice(
                (
                    {"version": rng.choice((0, 2, "1", None, 1.0))},
                    {"version": 1},
                    {"version": 1, "entries": {}},
                    {"version": 1, "entries": "x"},
                    {"version": 1, "entries": [], "extra": [1] * 10},
                    {"entries": []},
                )
            )
        elif op == 13:  # digests malformed or of the wrong kind
            target[rng.choice(("digest", "chunkDigest"))] = rng.choice(
                ("sha256:" + "0" * 63, "md5:" + "0" * 32, "sha256:" + "A" * 64, "", 7)
            )
        elif op == 14:  # sizes that disagree with the chunks
            target["size"] = rng.choice(
                (
                    0,
                    1,
                    target.get("size", 0) * 2 if isinstance(target.get("size"), int) else 3,
                    1 << 41,
                )
            )
        else:  # hardlinks to what does not exist, or to themselves, or cycles
            target["type"] = "hardlink"
            target["linkName"] = rng.choice((target.get("name", ""), "nosuch", "bin/", "../x"))
    doc.setdefault("entries", [e for u in picked for e in u])
    return doc, splices


def encode_document(doc: Any, splices: Sequence[str]) -> bytes:
    text = json.dumps(doc, ensure_ascii=False)
    for raw in splices:
        text = text.replace('"__SPLICE__"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


def compress_toc(kind: str, toc_json: bytes) -> bytes:
    """The TOC as a blob of ``kind`` carries it: a gzip member holding a tar with the JSON
    (eStargz and legacy stargz), or a zstd frame."""
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
            toc_json
        )
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as out:
        out.addfile(info, io.BytesIO(toc_json))
    return gzip.compress(tar.getvalue(), compresslevel=1, mtime=0)


def footer_for(kind: str, toc_offset: int, frame: bytes, toc_json: bytes) -> bytes:
    if kind == "zstd":
        return encode_zstd_footer(toc_offset, len(frame), len(toc_json))
    if kind == "stargz":
        return encode_legacy_footer(toc_offset)
    return encode_estargz_footer(toc_offset)


# -- the targets ---------------------------------------------------------------------------


@attrs.frozen
class Input:
    """One fuzz input: how to call the target, and a short description."""

    call: Callable[[], object]
    describe: str


def make_footer_input(rng: Random, materials: Sequence[Material]) -> Input:
    m = rng.choice(materials)
    tail = m.tail
    choice = rng.randrange(4)
    if choice == 0:
        tail = mutate_bytes(rng, tail)
    elif choice == 1:  # a valid footer of another kind or offset
        offset = rng.choice(
            (0, 1, m.toc_offset, m.size, m.size + 1, (1 << 64) - 1, rng.randrange(m.size))
        )
        offset = min(offset, (1 << 64) - 1)
        kind = rng.choice(("estargz", "stargz", "zstd"))
        if kind == "zstd":
            tail = encode_zstd_footer(offset, rng.choice((0, 1, 8518, m.size, (1 << 64) - 1)),
                                      rng.choice((0, 41575, (1 << 64) - 1)))  # fmt: skip
        elif kind == "stargz":
            tail = encode_legacy_footer(min(offset, (1 << 40) - 1))
        else:
            tail = encode_estargz_footer(min(offset, (1 << 40) - 1))
        tail = mutate_bytes(rng, tail) if rng.random() < 0.5 else tail
    elif choice == 2:  # cut to less than a footer, or padded
        tail = (
            tail[rng.randrange(len(tail)) :]
            if rng.random() < 0.5
            else rng.randbytes(rng.randint(0, 8)) + tail
        )
    else:  # hex digits of the offset replaced
        buf = bytearray(tail)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.choice(b"0123456789abcdefABCDEF-+x \x00g")
        tail = bytes(buf)
    size = rng.choice(
        (m.size, m.size, len(tail), 0, len(tail) - 1, m.toc_offset, 1 << 62, rng.randrange(m.size))
    )
    return Input(lambda: parse_footer(tail, size, layer="fuzz"), f"footer of {m.name}, size {size}")


def _walk(toc: Any) -> None:
    for _path, entry in toc.walk():
        entry.chunks  # noqa: B018  (reading them is the point)
        entry.xattrs  # noqa: B018
        entry.link_name  # noqa: B018
        toc.nlink(entry)
    for entry in toc.regular_files():
        for c in entry.chunks:
            entry.chunk_at(c.chunk_offset)


def make_toc_bytes_input(rng: Random, materials: Sequence[Material]) -> Input:
    m = rng.choice(materials)
    start = rng.randrange(len(m.units))
    run = [e for u in m.units[start : start + rng.randint(1, 12)] for e in u]
    text = json.dumps({"version": 1, "entries": run}, indent=rng.choice((None, "\t"))).encode()
    data = mutate_bytes(rng, text)
    return Input(lambda: _walk(parse_toc(data, payload_end=m.payload_end, layer="fuzz",
                                         require_chunk_digests=m.kind != "stargz")),
                 f"TOC text of {m.name}, {len(data)} bytes")  # fmt: skip


def make_toc_struct_input(rng: Random, materials: Sequence[Material]) -> Input:
    m = rng.choice(materials)
    doc, splices = mutate_document(rng, m)
    data = encode_document(doc, splices)
    return Input(lambda: _walk(parse_toc(data, payload_end=m.payload_end, layer="fuzz",
                                         require_chunk_digests=m.kind != "stargz")),
                 f"TOC document of {m.name}, {len(data)} bytes")  # fmt: skip


def _open_and_walk(source: MemoryBlob, toc_digest: str | None) -> None:
    reader = BlobReader.open(source, toc_digest=toc_digest)
    _walk(reader.toc)
    reader.prefetch_range()


def make_blob_input(rng: Random, materials: Sequence[Material]) -> Input:
    m = rng.choice(materials)
    if rng.random() < 0.4:  # the real TOC member and footer, bytes mutated
        region = m.toc_region
        if m.kind == "zstd":
            region = ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(region)) + region
            start = m.toc_offset - ZSTD_SKIPPABLE_HEADER.size
        else:
            start = m.toc_offset
        tail = region + m.tail[MAX_FOOTER_SIZE - _footer_size(m.kind) :]
        cut = rng.randrange(len(tail))  # mutate near the footer as often as in the TOC
        tail = (
            mutate_bytes(rng, tail)
            if rng.random() < 0.5
            else tail[:cut] + mutate_bytes(rng, tail[cut:])
        )
        source = MemoryBlob(start, tail)
        digest = m.toc_digest if rng.random() < 0.3 else None
        return Input(lambda: _open_and_walk(source, digest), f"{m.name}'s tail, bytes mutated")
    doc, splices = (
        mutate_document(rng, m) if rng.random() < 0.8 else (copy.deepcopy(m.document), [])
    )
    toc_json = encode_document(doc, splices)
    frame = compress_toc(m.kind, toc_json)
    if rng.random() < 0.2:
        frame = mutate_bytes(rng, frame)
    prefix = m.payload_end
    if m.kind == "zstd":
        head = ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(frame))
        tail = head + frame + footer_for(m.kind, prefix + len(head), frame, toc_json)
    else:
        tail = frame + footer_for(m.kind, prefix, frame, toc_json)
    digest = None
    if rng.random() < 0.3:
        digest = (
            "sha256:" + hashlib.sha256(toc_json).hexdigest() if rng.random() < 0.5 else m.toc_digest
        )
    source = MemoryBlob(prefix, tail)
    return Input(
        lambda: _open_and_walk(source, digest),
        f"{m.name} with a mutated TOC, {len(toc_json)} bytes",
    )


def _footer_size(kind: str) -> int:
    return {"estargz": 51, "stargz": 47, "zstd": 48}[kind]


MAKERS: Final[dict[str, Callable[[Random, Sequence[Material]], Input]]] = {
    "footer": make_footer_input,
    "toc-bytes": make_toc_bytes_input,
    "toc-struct": make_toc_struct_input,
    "blob": make_blob_input,
}


def make_input(seed: int, target: str, index: int, materials: Sequence[Material]) -> Input:
    """Input ``index`` of ``target`` in the run of ``seed``: the same every time."""
    return MAKERS[target](Random(f"{seed}/{target}/{index}"), materials)


# -- running -------------------------------------------------------------------------------


@attrs.define
class TargetResult:
    target: str
    inputs: int = 0
    accepted: int = 0
    refused: dict[str, int] = attrs.field(factory=dict)  # FormatError subclass -> count
    unexpected: list[dict[str, Any]] = attrs.field(factory=list)  # index, error, input
    seconds: float = 0.0  # CPU time spent in this target's inputs, all workers

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


@attrs.define
class FuzzResult:
    seed: int
    workers: int
    targets: dict[str, TargetResult]
    peak_rss_kib: int = 0  # the largest worker's
    seconds: float = 0.0

    @property
    def inputs(self) -> int:
        return sum(t.inputs for t in self.targets.values())

    @property
    def unexpected(self) -> int:
        return sum(len(t.unexpected) for t in self.targets.values())


_MATERIALS: list[Material] = []


def _worker_init(limit: int) -> None:
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _MATERIALS[:] = load_material()


def run_one(made: Input) -> tuple[str, str | None]:
    """``("accepted", None)``, ``("refused", error class)`` or ``("unexpected", traceback)``."""
    try:
        made.call()
    except FormatError as e:
        return "refused", type(e).__name__
    except Exception:  # anything else (MemoryError, RecursionError too) is a bug found
        return "unexpected", traceback.format_exc(limit=-8)
    return "accepted", None


def _batch(
    task: tuple[int, str, int, int],
) -> tuple[str, int, int, Counter[str], list[dict[str, Any]], float, int]:
    seed, target, start, count = task
    accepted, refused, unexpected = 0, Counter[str](), []
    started = time.process_time()
    for index in range(start, start + count):
        made = make_input(seed, target, index, _MATERIALS)
        outcome, detail = run_one(made)
        if outcome == "accepted":
            accepted += 1
        elif outcome == "refused":
            refused[str(detail)] += 1
        else:
            unexpected.append({"index": index, "input": made.describe, "error": detail})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return target, count, accepted, refused, unexpected, time.process_time() - started, rss


def plan(inputs: int) -> dict[str, int]:
    """How many of ``inputs`` each target gets."""
    counts = {t: int(inputs * SHARES[t]) for t in TARGETS}
    counts[TARGETS[0]] += inputs - sum(counts.values())
    return counts


def tasks(seed: int, counts: dict[str, int]) -> Iterator[tuple[int, str, int, int]]:
    # Targets interleaved, so that a run stopped early has seen every one.
    starts = dict.fromkeys(counts, 0)
    while any(starts[t] < counts[t] for t in counts):
        for t in counts:
            if starts[t] < counts[t]:
                n = min(BATCH, counts[t] - starts[t])
                yield seed, t, starts[t], n
                starts[t] += n


def fuzz(
    inputs: int,
    *,
    seed: int = 0,
    workers: int = 2,
    address_space: int = ADDRESS_SPACE,
    report: Callable[[str], None] = lambda line: None,
) -> FuzzResult:
    """Run ``inputs`` fuzz inputs spread over the targets in ``workers`` processes."""
    counts = plan(inputs)
    result = FuzzResult(seed, workers, {t: TargetResult(t) for t in TARGETS})
    started = time.monotonic()
    done = 0
    next_report = max(inputs // 20, 1)
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers, initializer=_worker_init, initargs=(address_space,)) as pool:
        for target, count, accepted, refused, unexpected, seconds, rss in pool.imap_unordered(
            _batch, tasks(seed, counts)
        ):
            r = result.targets[target]
            r.inputs += count
            r.accepted += accepted
            for name, n in refused.items():
                r.refused[name] = r.refused.get(name, 0) + n
            r.unexpected += unexpected
            r.seconds += seconds
            result.peak_rss_kib = max(result.peak_rss_kib, rss)
            for u in unexpected:
                report(
                    f"UNEXPECTED {target}:{u['index']} (seed {seed}): {u['error'].strip().splitlines()[-1]}"
                )
            done += count
            if done >= next_report:
                report(f"{done}/{inputs} inputs, {time.monotonic() - started:.0f} s")
                next_report += max(inputs // 20, 1)
    result.seconds = time.monotonic() - started
    return result


def replay(seed: int, target: str, index: int) -> str:
    """Make input ``index`` of ``target`` again and run it here; what happened."""
    made = make_input(seed, target, index, load_material())
    outcome, detail = run_one(made)
    return f"{target}:{index} (seed {seed}), {made.describe}: {outcome}" + (
        f"\n{detail}" if detail else ""
    )


def markdown(result: FuzzResult, *, machine: str, date: str, command: str) -> str:
    lines = [
        "## Fuzzing the footer and TOC parsers",
        "",
        "`python -m tools.chaos fuzz` (`tools/chaos/_fuzz.py`) feeds mutated footers, TOC "
        "texts, TOC documents and whole blobs made from the reference blobs of "
        "`tests/data/estargz` to the parsers `BlobReader.open` goes through; each input is "
        "accepted (and then walked: entries, chunks, xattrs, links, prefetch range) or "
        "refused with a `FormatError`. *Other* counts anything else, a bug (must be 0; each "
        "is listed with its seed and index for `--replay`). `tests/estargz/test_fuzz.py` "
        "runs 20,000 inputs in CI.",
        "",
        f"### Run of {date}",
        "",
        machine,
        f"- Command: `{command}` ({result.seconds:.0f} s in all)",
        f"- Seed {result.seed}, {result.workers} worker processes, each limited to "
        f"{ADDRESS_SPACE >> 30} GiB of address space; peak RSS of a worker "
        f"{result.peak_rss_kib / 1024:.0f} MB",
        "",
        "| target | inputs | accepted | refused (FormatError) | other | CPU s | refused as |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.targets.values():
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r.refused.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r.target} | {r.inputs:,} | {r.accepted:,} | {r.refused_total:,} "
            f"| {len(r.unexpected)} | {r.seconds:.0f} | {kinds} |"
        )
    total = result.inputs
    lines.append(
        f"| all | {total:,} | {sum(r.accepted for r in result.targets.values()):,} "
        f"| {sum(r.refused_total for r in result.targets.values()):,} | {result.unexpected} "
        f"| {sum(r.seconds for r in result.targets.values()):.0f} | |"
    )
    for r in result.targets.values():
        for u in r.unexpected[:20]:
            last = u["error"].strip().splitlines()[-1]
            lines.append(f"\n- {r.target}:{u['index']} ({u['input']}): `{last}`")
    return "\n".join(lines) + "\n"
