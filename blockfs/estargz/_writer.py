"""Write an eStargz blob (gzip or zstd) from a layer tar, as the reference builder lays it out.

The output is streamed to the destination in blob order. Memory is bounded by a few
members (each about one chunk: 4 MiB by default) being compressed at once; the TOC's
entry list is the only thing that grows with the layer.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import secrets
import struct
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import attrs
import zstandard

from blockfs.estargz._errors import BuildError
from blockfs.estargz._footer import (
    ZSTD_SKIPPABLE_HEADER,
    ZSTD_SKIPPABLE_MAGIC,
    encode_estargz_footer,
    encode_zstd_footer,
)
from blockfs.estargz._model import (
    LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    Compression,
)
from blockfs.estargz._tarinput import (
    IO_PIECE,
    XATTR_PREFIX,
    InputEntry,
    decompressed_tar,
    order_entries,
    read_entries,
)

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"

# gzip member header, 10 bytes (RFC 1952): 0 ID1 ID2, 2 CM (8 = deflate), 3 FLG,
# 4 MTIME (u32 LE), 8 XFL, 9 OS. Written with FLG 0 and MTIME 0 so blobs are reproducible.
_GZIP_HEADER = struct.Struct("<2sBBIBB")
# gzip member trailer, 8 bytes: 0 CRC32 of the uncompressed data, 4 ISIZE (size mod 2**32).
_GZIP_TRAILER = struct.Struct("<II")
_GZIP_OS_UNKNOWN = 0xFF

_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = bytes(2 * _BLOCK)
# PAX records that tarfile derives again from the header fields we set; the input's copies
# are dropped so that they cannot contradict them (a hardlink's stale "size", say).
_DERIVED_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname", "hdrcharset"})
# A member is compressed in one piece (a zstd frame header then records the content size)
# unless it holds more than this beyond one chunk, or chunks are larger than this.
_ONE_SHOT_SLACK = 1 << 20
_ONE_SHOT_CHUNK_MAX = 16 << 20


def _check_positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise BuildError(f"{attribute.name} must be positive, not {value}")


def _check_range(low: int, high: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not low <= value <= high:
            raise BuildError(f"{attribute.name} must be in [{low}, {high}], not {value}")

    return check


def _names(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise BuildError("prioritized must be a sequence of names, not one string")
    return tuple(names)


def _check_compression(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("gzip", "zstd"):
        raise BuildError(f"compression must be 'gzip' or 'zstd', not {value!r}")


@attrs.frozen
class BuildOptions:
    """How to build a blob. The defaults are the reference builder's (gzip, 4 MiB chunks, level 9).

    ``min_chunk_size`` > 0 lets small payloads share a compressed member (``innerOffset``);
    ``prioritized`` names files to put before the ``.prefetch.landmark``.
    """

    compression: Compression = attrs.field(default="gzip", validator=_check_compression)
    chunk_size: int = attrs.field(default=4 << 20, validator=_check_positive)
    min_chunk_size: int = attrs.field(default=0, validator=_check_range(0, 1 << 62))
    prioritized: tuple[str, ...] = attrs.field(default=(), converter=_names)
    allow_missing_prioritized: bool = False
    gzip_level: int = attrs.field(default=9, validator=_check_range(0, 9))
    zstd_level: int = attrs.field(default=3, validator=_check_range(1, 22))
    # Threads compressing members; 0 picks one per CPU (up to 4). It never changes the blob.
    workers: int = attrs.field(default=0, validator=_check_range(0, 64))


@attrs.frozen
class BuildResult:
    """What a build produced: the digests and sizes an image manifest and config need."""

    toc_digest: str
    diff_id: str
    blob_digest: str
    blob_size: int
    uncompressed_size: int
    missed_prioritized: tuple[str, ...] = ()
    compression: Compression = "gzip"
    toc_offset: int = 0
    # zstd only: sha256 of the compressed TOC frame, and the compressed and raw TOC sizes.
    toc_frame_digest: str = ""
    toc_compressed_size: int = 0
    toc_uncompressed_size: int = 0
    # Where the prioritised files end (the offset of the prefetch landmark's member), when
    # some file data is prioritised.
    prefetch_end: int | None = None

    @property
    def annotations(self) -> dict[str, str]:
        """The layer descriptor annotations a registry image carries for this blob."""
        ann = {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }
        if self.compression == "zstd":
            ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = self.toc_frame_digest
            ann[ZSTD_MANIFEST_POSITION_ANNOTATION] = (
                f"{self.toc_offset}:{self.toc_compressed_size}:{self.toc_uncompressed_size}:1"
            )
        return ann

    def to_json(self) -> dict[str, Any]:
        """The result as the CLI prints it (keys as in the reference builder's report)."""
        return {
            "tocDigest": self.toc_digest,
            "diffID": self.diff_id,
            "blobDigest": self.blob_digest,
            "blobSize": self.blob_size,
            "uncompressedSize": self.uncompressed_size,
            "compression": self.compression,
            "missedPrioritized": list(self.missed_prioritized),
            "annotations": self.annotations,
        }


def build(
    src: IO[bytes],
    dst: IO[bytes],
    options: BuildOptions = BuildOptions(),
    *,
    tmpdir: str | None = None,
) -> BuildResult:
    """Read a layer tar (plain, gzip or zstd) from ``src`` and write an eStargz blob to ``dst``.

    ``dst`` is written sequentially and never sought. The input is decompressed into a
    temporary file in ``tmpdir`` unless it is a plain tar in a seekable file. Raises
    BuildError for input that cannot become a blob.
    """
    with decompressed_tar(src, tmpdir) as tar:
        ordered = order_entries(
            read_entries(tar),
            options.prioritized,
            allow_missing=options.allow_missing_prioritized,
        )
        out = _CountingOutput(dst)
        one_shot_max = min(options.chunk_size, _ONE_SHOT_CHUNK_MAX) + _ONE_SHOT_SLACK
        # With a minimum chunk size the layout depends on compressed sizes: no parallelism.
        workers = 1 if options.min_chunk_size else options.workers or _default_workers()
        members: _Members
        if options.compression == "zstd":
            members = _ZstdFrames(
                out, options.zstd_level, one_shot_max=one_shot_max, workers=workers
            )
        else:
            members = _GzipMembers(
                out, options.gzip_level, one_shot_max=one_shot_max, workers=workers
            )
        writer = _BlobWriter(tar, members, options)
        try:
            for e in ordered.prioritized:
                writer.add_entry(e)
            landmark = PREFETCH_LANDMARK if options.prioritized else NO_PREFETCH_LANDMARK
            writer.add_landmark(landmark)
            for e in ordered.rest:
                writer.add_entry(e)
            result = writer.finish()
        finally:
            members.shutdown()
    return attrs.evolve(result, missed_prioritized=ordered.missed)


def build_file(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    *,
    tmpdir: str | None = None,
) -> BuildResult:
    """Build ``dst_path`` from the layer tar at ``src_path``; the blob appears whole or not at all.

    The blob is written to a temporary file beside ``dst_path``, synced, then renamed.
    """
    dst_path = os.fspath(dst_path)
    directory = os.path.dirname(os.path.abspath(dst_path))
    tmp_path = os.path.join(directory, f".{os.path.basename(dst_path)}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 lets the umask decide the blob's permissions.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as dst:
            result = build(src, dst, options, tmpdir=tmpdir)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp_path, dst_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    return result


class _CountingOutput:
    """The blob being written: counts and hashes every compressed byte."""

    def __init__(self, dst: IO[bytes]) -> None:
        self._dst = dst
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if data:
            self._dst.write(data)
            self.size += len(data)
            self.sha256.update(data)


class _Members:
    """A sequence of independently decompressible members (gzip members or zstd frames).

    A member's uncompressed bytes are gathered in memory while they stay small (up to a
    chunk and the tar headers that follow it) and then compressed whole, on a worker thread
    when there are several, so that members are compressed in parallel and written in
    order. A member that grows larger, or whose compressed size is asked for (minimum
    chunk size), is compressed as a stream on the calling thread instead. Which way a
    member goes depends only on its content and the options, so the blob is the same for
    any number of workers.
    """

    def __init__(self, out: _CountingOutput, *, one_shot_max: int, workers: int) -> None:
        self.out = out
        # Blob offset of each member by index; known once the member is written.
        self.offsets: list[int] = []
        self.is_open = False
        self.uncompressed_in_member = 0
        self.uncompressed_size = 0
        self.diff = hashlib.sha256()
        self._one_shot_max = one_shot_max
        self._pending = bytearray()
        self._streaming = False
        self._pool = ThreadPoolExecutor(workers, "estargz-compress") if workers > 1 else None
        self._max_in_flight = workers
        self._in_flight: collections.deque[tuple[int, Future[bytes]]] = collections.deque()

    @property
    def index(self) -> int:
        """Index of the open (or last) member."""
        return len(self.offsets) - 1

    def open(self) -> None:
        """Start a new member after the previous one."""
        self.offsets.append(-1)
        self.uncompressed_in_member = 0
        self.is_open = True
        self._streaming = False

    def write(self, data: bytes) -> None:
        """Add ``data`` to the open member, opening one if none is."""
        if not data:
            return
        if not self.is_open:
            self.open()
        self.diff.update(data)
        self.uncompressed_size += len(data)
        self.uncompressed_in_member += len(data)
        if self._streaming:
            self._stream_write(data)
        elif len(self._pending) + len(data) <= self._one_shot_max:
            self._pending += data
        else:
            self._start_streaming()
            self._stream_write(data)

    def compressed_in_member(self) -> int:
        """Compressed bytes of the open member so far (the member is streamed from now on)."""
        if not self._streaming:
            self._start_streaming()
        self._stream_flush()
        return self.out.size - self.offsets[-1]

    def close(self) -> None:
        """End the open member, if any."""
        if not self.is_open:
            return
        self.is_open = False
        if self._streaming:
            self._stream_end()
            return
        data = bytes(self._pending)
        self._pending.clear()
        if self._pool is None:
            self._emit(self.index, self._compress_whole(data))
        else:
            job = self._pool.submit(self._compress_whole, data)
            self._in_flight.append((self.index, job))
            self._drain(self._max_in_flight)

    def finish(self) -> None:
        """Close the open member and write every member still being compressed."""
        self.close()
        self._drain(0)

    def shutdown(self) -> None:
        """Stop the worker threads (after finish, or to abandon a failed build)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _start_streaming(self) -> None:
        self._drain(0)  # members before this one must be in the blob first
        self.offsets[-1] = self.out.size
        self._streaming = True
        self._stream_begin()
        if self._pending:
            self._stream_write(bytes(self._pending))
            self._pending.clear()

    def _drain(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            index, job = self._in_flight.popleft()
            self._emit(index, job.result())

    def _emit(self, index: int, member: bytes) -> None:
        self.offsets[index] = self.out.size
        self.out.write(member)

    def _compress_whole(self, data: bytes) -> bytes:
        """One complete member holding ``data`` (runs on worker threads)."""
        raise NotImplementedError

    def _stream_begin(self) -> None:
        raise NotImplementedError

    def _stream_write(self, data: bytes) -> None:
        raise NotImplementedError

    def _stream_flush(self) -> None:
        raise NotImplementedError

    def _stream_end(self) -> None:
        raise NotImplementedError


class _GzipMembers(_Members):
    def __init__(self, out: _CountingOutput, level: int, *, one_shot_max: int, workers: int):
        super().__init__(out, one_shot_max=one_shot_max, workers=workers)
        self._level = level
        # XFL as Go's gzip writer sets it: 2 for best compression, 4 for fastest.
        self._header = _GZIP_HEADER.pack(
            b"\x1f\x8b", 8, 0, 0, {9: 2, 1: 4}.get(level, 0), _GZIP_OS_UNKNOWN
        )
        self._z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0

    def _compress_whole(self, data: bytes) -> bytes:
        deflated = zlib.compress(data, self._level, -zlib.MAX_WBITS)
        trailer = _GZIP_TRAILER.pack(zlib.crc32(data), len(data) & 0xFFFFFFFF)
        return self._header + deflated + trailer

    def _stream_begin(self) -> None:
        self.out.write(self._header)
        self._z = zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0

    def _stream_write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self.out.write(self._z.compress(data))

    def _stream_flush(self) -> None:
        self.out.write(self._z.flush(zlib.Z_SYNC_FLUSH))

    def _stream_end(self) -> None:
        self.out.write(self._z.flush(zlib.Z_FINISH))
        self.out.write(_GZIP_TRAILER.pack(self._crc, self._size & 0xFFFFFFFF))


class _ZstdFrames(_Members):
    def __init__(self, out: _CountingOutput, level: int, *, one_shot_max: int, workers: int):
        super().__init__(out, one_shot_max=one_shot_max, workers=workers)
        self._level = level
        # A compression context serves one thread at a time: one per thread.
        self._local = threading.local()
        self._stream: Any = None

    def _cctx(self) -> Any:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True
            )
            self._local.cctx = cctx
        return cctx

    def _compress_whole(self, data: bytes) -> bytes:
        frame: bytes = self._cctx().compress(data)
        return frame

    def _stream_begin(self) -> None:
        self._stream = self._cctx().compressobj()

    def _stream_write(self, data: bytes) -> None:
        self.out.write(self._stream.compress(data))

    def _stream_flush(self) -> None:
        self.out.write(self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def _stream_end(self) -> None:
        self.out.write(self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        self._stream = None


@attrs.define(slots=True)
class _TOCEntry:
    """One TOC entry as it is being written; serialised with the reference's key order."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0
    inner_offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, str] = attrs.field(factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    # Index of the member holding this piece; its offset is known once it is written.
    member: int = -1

    def to_json(self) -> dict[str, Any]:
        """The JSON object, without the keys whose value is zero or empty (like the reference)."""
        fields = (
            ("size", self.size), ("modtime", self.modtime), ("linkName", self.link_name),
            ("mode", self.mode), ("uid", self.uid), ("gid", self.gid),
            ("userName", self.user_name), ("groupName", self.group_name),
            ("offset", self.offset), ("innerOffset", self.inner_offset),
            ("devMajor", self.dev_major), ("devMinor", self.dev_minor),
            ("xattrs", self.xattrs), ("digest", self.digest),
            ("chunkOffset", self.chunk_offset), ("chunkSize", self.chunk_size),
            ("chunkDigest", self.chunk_digest),
        )  # fmt: skip
        obj: dict[str, Any] = {"name": self.name, "type": self.type}
        obj.update((k, v) for k, v in fields if v)
        return obj


class _BlobWriter:
    """Lays tar entries out into members and collects their TOC entries."""

    def __init__(self, tar: IO[bytes], members: _Members, options: BuildOptions) -> None:
        self._tar = tar
        self._members = members
        self._options = options
        self._entries: list[_TOCEntry] = []
        self._prefetch_landmark: _TOCEntry | None = None
        # The reference writes a user or group name only when it differs from the last one
        # written for the same ID; readers carry names forward by ID.
        self._last_user: dict[int, str] = {}
        self._last_group: dict[int, str] = {}

    def add_entry(self, e: InputEntry) -> None:
        """Write one input entry: its header, and for a regular file its payload in chunks."""
        info = e.info
        header = _encode_header(e)
        self._members.write(header)
        toc = _TOCEntry(
            name=info.name + "/" if e.type == "dir" else info.name,  # as tarfile writes it
            type=e.type,
            modtime=_format_modtime(info.mtime, e.info.name),
            mode=info.mode & 0o7777,
            uid=info.uid,
            gid=info.gid,
            user_name=_name_if_changed(self._last_user, info.uid, info.uname),
            group_name=_name_if_changed(self._last_group, info.gid, info.gname),
            xattrs=_xattrs(info),
        )
        if e.type in ("symlink", "hardlink"):
            toc.link_name = info.linkname
        elif e.type in ("char", "block"):
            toc.dev_major, toc.dev_minor = info.devmajor, info.devminor
        if e.type == "reg":
            toc.size = e.size
            self._payload(toc, self._payload_reader(e), own_member=False)
        else:
            self._entries.append(toc)

    def add_landmark(self, name: str) -> None:
        """Write the prefetch landmark: a 1-byte file with only name, type and size set."""
        info = tarfile.TarInfo(name)
        info.size = len(LANDMARK_CONTENT)
        info.mode = 0
        self._members.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        toc = _TOCEntry(name=name, type="reg", size=len(LANDMARK_CONTENT))
        # Only a region with file data in it is worth a request of its own.
        holds_data = any(e.member >= 0 for e in self._entries)
        # Its own member, even with a minimum chunk size: its offset marks the prefetch end.
        self._payload(toc, lambda n: LANDMARK_CONTENT[:n], own_member=True)
        if name == PREFETCH_LANDMARK and holds_data:
            self._prefetch_landmark = toc

    def _payload(self, first: _TOCEntry, read: Callable[[int], bytes], *, own_member: bool) -> None:
        """Write a regular file's payload in chunks, each at a member start (see _start_chunk).

        ``read(n)`` returns the next 1 to ``n`` bytes of the payload.
        """
        size = first.size
        chunk_size = self._options.chunk_size
        file_hash = hashlib.sha256()
        written = 0
        piece = first
        while written < size:
            n = min(chunk_size, size - written)
            piece.member, piece.inner_offset = self._start_chunk(own_member)
            piece.chunk_offset = written
            # As the reference: a piece gets chunkSize when it is a whole chunk.
            piece.chunk_size = chunk_size if n == chunk_size else 0
            chunk_hash = hashlib.sha256()
            need = n
            while need:
                part = read(min(need, IO_PIECE))
                need -= len(part)
                chunk_hash.update(part)
                file_hash.update(part)
                self._members.write(part)
            piece.chunk_digest = "sha256:" + chunk_hash.hexdigest()
            self._entries.append(piece)
            written += n
            piece = _TOCEntry(name=first.name, type="chunk")
        first.digest = "sha256:" + file_hash.hexdigest()
        if size == 0:
            self._entries.append(first)
        self._members.write(bytes(-size % _BLOCK))

    def _start_chunk(self, own_member: bool) -> tuple[int, int]:
        """Where the next chunk starts: (index of its member, uncompressed offset inside it).

        A chunk starts a new member, except with a minimum chunk size while the open member
        has fewer compressed bytes than that minimum.
        """
        m = self._members
        min_size = self._options.min_chunk_size
        # Never share the blob's first member: readers take offset 0 to mean "no payload".
        shareable = min_size and not own_member and m.is_open and m.index > 0
        if shareable and m.compressed_in_member() < min_size:
            return m.index, m.uncompressed_in_member
        m.close()
        m.open()
        return m.index, 0

    def _payload_reader(self, e: InputEntry) -> Callable[[int], bytes]:
        """Reads the payload of ``e`` from the decompressed input, in order."""
        offset = e.data_offset

        def read(n: int) -> bytes:
            nonlocal offset
            self._tar.seek(offset)
            data = self._tar.read(n)
            if not data:
                raise BuildError(
                    "input tar ends inside a payload", entry=e.info.name, offset=offset
                )
            offset += len(data)
            return data

        return read

    def finish(self) -> BuildResult:
        """Write the TOC and the footer; return the digests."""
        m = self._members
        m.finish()
        for e in self._entries:
            if e.member >= 0:
                e.offset = m.offsets[e.member]
        toc_json = json.dumps(
            {"version": 1, "entries": [e.to_json() for e in self._entries]},
            indent="\t",
            ensure_ascii=False,
        ).encode("utf-8")
        out = m.out
        toc_offset = out.size
        frame_digest, frame_size = "", 0
        if self._options.compression == "zstd":
            # zstd: the raw JSON in one frame, wrapped in a skippable frame (not in the stream).
            frame = zstandard.ZstdCompressor(
                level=self._options.zstd_level, write_checksum=True, write_content_size=True
            ).compress(toc_json)
            out.write(ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(frame)))
            toc_offset = out.size
            out.write(frame)
            out.write(encode_zstd_footer(toc_offset, len(frame), len(toc_json)))
            frame_digest, frame_size = "sha256:" + hashlib.sha256(frame).hexdigest(), len(frame)
        else:
            # gzip: a member holding a one-entry tar (the TOC) and the end-of-archive blocks.
            info = tarfile.TarInfo(TOC_TAR_NAME)
            info.size = len(toc_json)
            info.mode = 0
            m.open()
            m.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            m.write(toc_json)
            m.write(bytes(-len(toc_json) % _BLOCK) + _END_OF_ARCHIVE)
            m.finish()
            out.write(encode_estargz_footer(toc_offset))
        return BuildResult(
            toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
            diff_id="sha256:" + m.diff.hexdigest(),
            blob_digest="sha256:" + out.sha256.hexdigest(),
            blob_size=out.size,
            uncompressed_size=m.uncompressed_size,
            compression=self._options.compression,
            toc_offset=toc_offset,
            toc_frame_digest=frame_digest,
            toc_compressed_size=frame_size,
            toc_uncompressed_size=len(toc_json) if frame_size else 0,
            prefetch_end=None
            if self._prefetch_landmark is None
            else self._prefetch_landmark.offset,
        )


def _default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _encode_header(e: InputEntry) -> bytes:
    """The entry's tar header, re-encoded as PAX (long names, big IDs and xattrs survive)."""
    src = e.info
    info = tarfile.TarInfo(src.name)
    info.type = tarfile.REGTYPE if e.type == "reg" else src.type
    info.mode = src.mode & 0o7777
    info.uid, info.gid = src.uid, src.gid
    info.uname, info.gname = src.uname, src.gname
    info.mtime = src.mtime
    info.size = e.size
    if e.type in ("symlink", "hardlink"):
        info.linkname = src.linkname
    if e.type in ("char", "block"):
        info.devmajor, info.devminor = src.devmajor, src.devminor
    info.pax_headers = {k: v for k, v in src.pax_headers.items() if k not in _DERIVED_PAX}
    try:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError as err:  # a field tarfile cannot encode (an enormous device number)
        raise BuildError(f"cannot encode tar header: {err}", entry=src.name) from None


def _xattrs(info: tarfile.TarInfo) -> dict[str, str]:
    """SCHILY.xattr.* records as the TOC holds them: base64 of the raw bytes, keys sorted."""
    found = {
        k[len(XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
        for k, v in info.pax_headers.items()
        if k.startswith(XATTR_PREFIX)
    }
    return dict(sorted(found.items()))


def _name_if_changed(last: dict[int, str], ident: int, name: str) -> str:
    if not name or last.get(ident) == name:
        return ""
    last[ident] = name
    return name


def _format_modtime(mtime: float, entry: str) -> str:
    """RFC 3339 UTC rounded to the second; empty for the Unix epoch itself (like the reference)."""
    if math.floor(mtime) == 0:
        return ""
    seconds = math.floor(mtime + 0.5)
    try:
        when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        raise BuildError(f"modification time {mtime} cannot be written", entry=entry) from None
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
        f"T{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"
    )
