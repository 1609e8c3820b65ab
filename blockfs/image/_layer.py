"""LayerImage: the block image of one layer, read with ``pread``.

The image is ``[metadata region][data region]``. The metadata region is the EROFS index
file built on the node; the data region holds each regular file in its own block-aligned
extent, and its bytes come from the eStargz chunks behind that extent: from the chunk
cache when present, else fetched, decompressed and verified, then cached.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Protocol

import attrs

from blockfs.cache import ChunkCache
from blockfs.errors import BlockfsError
from blockfs.estargz import Chunk, ChunkVerificationError, DecompressionError, FormatError
from blockfs.image._elf import (
    ELF_MAGIC,
    HEAD_BYTES,
    MAX_DYNAMIC_BYTES,
    NAME_BYTES,
    PATH_BYTES,
    LibraryFinder,
    LoaderNeeds,
    interpreter_path,
    library_dirs,
    parse_dynamic,
    parse_layout,
    string_at,
)
from blockfs.image._extents import ExtentMap
from blockfs.image._reader import Compressed, MemberOutcome

# Compressed bytes fetched together by one step of the background fetch.
PREFETCH_BATCH = 4 << 20
# Threads of a layer that fetch the rest of files in the background, and the compressed
# bytes each of their requests asks for.
BACKGROUND_FETCHERS = 4
BACKGROUND_STEP = 1 << 20
# Threads of a layer that read programs' dynamic sections for the libraries they need: a
# workload starts a few programs, a scanner that reads every file's header many.
LIBRARY_READERS = 2
# How far from a file read, in directory windows of compressed span, the files fetched
# around it may lie (large files passed over still cost the search a look).
WINDOW_REACH = 4
# Times a member is fetched, in all, before bytes that fail verification fail the read: a
# 206 body damaged on the way must not become a permanent I/O error, but bytes that are
# wrong at the source are not fetched for ever.
MAX_FETCH_ATTEMPTS = 3
# Compressed bytes of members fetched on a guess (along with a read, or in a directory
# window) that the layers of a server keep as they came, at most (KeptBudget):
# decompressed, verified and cached only when a read needs them. Most guesses are never
# read, and decoding and storing a member costs the NBD server about 0.3 ms of CPU.
KEPT_MAX = 64 << 20
_ZEROS = memoryview(bytes(64 << 10))


def _zero(buf: memoryview, start: int, end: int) -> None:
    """Write zeros to ``buf[start:end]``."""
    while start < end:
        n = min(end - start, len(_ZEROS))
        buf[start : start + n] = _ZEROS[:n]
        start += n


@attrs.frozen
class FetchPolicy:
    """How much a read that must fetch asks for beyond the members it lacks.

    ``unit``: the least compressed span of its request; the members that follow its own
    come along up to it. Below the bandwidth-delay product of a registry link (100 Mbit/s
    x 20 ms is 250 kB) more bytes in a request cost next to nothing beside its round trip,
    and the files next to a file in the blob are those of the same directory.
    ``whole_file_max``: a file that a read fetches part of is fetched whole, the rest in
    the background while the read returns, when its compressed span is at most this; a
    process that touches an executable, a library or a module reads much of it.
    ``directory_window``: the first read of a file in a directory also fetches, in the
    background, the files of that directory next to it in the blob, up to half this
    compressed span on each side: a process that imports one module of a package, or
    loads one library, reads others beside it, and each of them would otherwise cost a
    page fault and a round trip of its own, one after another.
    ``libraries``: the first read of an ELF program or library also fetches, whole and in
    the background, the libraries its dynamic section names (``DT_NEEDED``) where the
    loader would find them in this layer: the loader opens them one after another, each
    a page fault and a round trip of its own.
    """

    unit: int = 256 << 10
    whole_file_max: int = 64 << 20
    directory_window: int = 2 << 20
    libraries: bool = True

    @classmethod
    def exact(cls) -> FetchPolicy:
        """Fetch only the members a read lacks."""
        return cls(unit=0, whole_file_max=0, directory_window=0, libraries=False)


class KeptBudget:
    """How many compressed bytes of guesses the layers that share it may keep, at most
    ``limit`` (:data:`KEPT_MAX` unless given); thread-safe."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = KEPT_MAX if limit is None else limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes kept, if they fit; whether they did."""
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def give_back(self, n: int) -> None:
        """``n`` bytes kept are no longer."""
        with self._lock:
            self._used -= n


class ImageReadError(BlockfsError):
    """A read of the block image cannot return verified bytes."""


class ChunkReader(Protocol):
    """Fetches chunks of one blob and returns their verified plaintext."""

    @property
    def name(self) -> str: ...

    def read_members(
        self,
        members: Sequence[Sequence[tuple[str, Chunk]]],
        on_member: Callable[[int, MemberOutcome], None] | None = None,
        *,
        keep: Callable[[int], bool] | None = None,
    ) -> list[MemberOutcome]:
        """For each member (its ``(file name, chunk)`` pairs), the chunks' verified
        plaintext, or the :class:`blockfs.errors.BlockfsError` that kept it from being
        fetched or verified (a :class:`blockfs.estargz.FormatError` for bad data); for
        a member for which ``keep(i)`` is true once its bytes are in, those bytes
        (:class:`Compressed`). ``on_member(i, outcome)`` gets each outcome once, as soon
        as it is known, from any thread."""
        ...

    def decode(self, member: Sequence[tuple[str, Chunk]], data: bytes) -> list[bytes]:
        """The verified plaintext of ``member``'s chunks from its compressed bytes; a
        :class:`blockfs.estargz.FormatError` if they are not right."""
        ...


@attrs.define
class LayerStats:
    """What a LayerImage has done since it was opened."""

    reads: int = 0
    read_bytes: int = 0
    data_reads: int = 0
    chunks_fetched: int = 0
    members_fetched: int = 0
    # Members fetched on a guess and kept compressed, and those of them a read needed.
    members_kept: int = 0
    kept_members_read: int = 0
    cache_hits: int = 0
    # Fetched members whose bytes did not decompress or verify, counting every attempt.
    verification_failures: int = 0
    # Fetches of a member again after its bytes failed verification.
    refetches: int = 0
    # Members that could not be fetched at all (the source raised).
    fetch_errors: int = 0
    fetch_seconds: float = 0.0

    def to_json(self) -> dict[str, int | float]:
        return attrs.asdict(self)


class LayerImage:
    """A read-only block image of one eStargz layer; ``pread`` is safe from many threads."""

    def __init__(
        self,
        name: str,
        meta_path: str | os.PathLike[str],
        extents: ExtentMap,
        reader: ChunkReader,
        cache: ChunkCache,
        *,
        on_demand_fetch: Callable[[], None] | None = None,
        policy: FetchPolicy = FetchPolicy(),
        prioritized_end: int = 0,
        trace: Callable[[str], None] | None = None,
        kept: KeptBudget | None = None,
    ) -> None:
        """``on_demand_fetch`` is called whenever a read has to fetch from the blob;
        ``policy`` says what such a read fetches besides what it lacks; ``kept`` bounds
        the guesses kept compressed, with the other layers that share it (a budget of
        its own by default);
        ``prioritized_end`` is the blob offset where the layer's prioritised files end
        (its prefetch landmark; 0 for none); ``trace`` gets the name of each file at the
        first read of its data (metadata reads never count)."""
        self.policy = policy
        self.prioritized_end = prioritized_end
        self._trace = trace
        self._traced = bytearray(extents.extent_count) if trace is not None else None
        # Extents whose whole file, and directories whose window, a read has planned to
        # fetch already (see _plan): only those touched, so a layer of many files costs
        # nothing until they are read.
        self._whole_planned: set[int] = set()
        self._dirs_planned: set[str] = set()
        # Extents whose start a read has looked at for an ELF header (see _look_for_libraries).
        self._elf_looked: set[int] = set()
        self._libraries = LibraryFinder(extents)
        self.name = name
        self._on_demand_fetch = on_demand_fetch
        self.extents = extents
        self.reader = reader
        self.cache = cache
        self.stats = LayerStats()
        self._meta_fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
        meta_size = os.fstat(self._meta_fd).st_size
        if meta_size != extents.meta_size:
            os.close(self._meta_fd)
            raise ImageReadError(
                f"layer {name}: index is {meta_size} bytes, its extent map expects "
                f"{extents.meta_size}; re-index the layer"
            )
        self._lock = threading.Lock()
        # Members claimed for a fetch (by blob offset), and those whose fetch has begun:
        # a claim whose fetch has not begun (a later step of a background fetch) can be
        # taken over by a read that needs the member now (see _claim).
        self._inflight: dict[int, Future[dict[str, bytes]]] = {}
        self._started: set[int] = set()
        # Members claimed on a guess, and members a read waits for, while they are
        # fetched: a guess that no read waits for when its bytes come is kept compressed.
        self._guesses: set[int] = set()
        self._wanted: set[int] = set()
        # Members kept compressed (by blob offset), counted in the budget.
        self._kept: dict[int, bytes] = {}
        self._kept_budget = kept if kept is not None else KeptBudget()
        self._background: ThreadPoolExecutor | None = None
        self._library_readers: ThreadPoolExecutor | None = None

    @property
    def size(self) -> int:
        """Size of the block image in bytes."""
        return self.extents.image_size

    def close(self) -> None:
        """Release the index file; fetches in the background that have not begun are
        dropped, and whoever waits for their members gets an error."""
        with self._lock:
            pools = [self._background, self._library_readers]
            self._background = self._library_readers = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            claimed = dict(self._inflight)
        self._fetch_claimed_failed(claimed, ImageReadError(f"layer {self.name}: closed"))
        with self._lock:
            dropped = sum(len(data) for data in self._kept.values())
            self._kept.clear()
        self._kept_budget.give_back(dropped)
        if self._meta_fd >= 0:
            os.close(self._meta_fd)
            self._meta_fd = -1

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no fetch is under way (a read returns once its own members are in,
        while the members that came along with them may still be arriving); whether
        that happened within ``timeout`` seconds. For counting what reads cost."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._inflight:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset``: verified file data, metadata or zeros."""
        out = bytearray(length)
        self.pread_into(memoryview(out), offset)
        return bytes(out)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the image at ``offset`` (what :meth:`pread` returns), writing
        straight into it: the NBD server's buffer gets each byte with one copy."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise ImageReadError(
                f"layer {self.name}: read [{offset}, {offset + length}) outside image of "
                f"{self.size} bytes"
            )
        pos, end = offset, offset + length
        meta_size = self.extents.meta_size
        if pos < meta_size:
            n = min(end, meta_size) - pos
            if os.preadv(self._meta_fd, [buf[:n]], pos) != n:
                raise ImageReadError(f"layer {self.name}: the index file is shorter than its map")
            pos += n
        touched_data = pos < end
        bsize = self.extents.block_size
        missing: list[tuple[int, Chunk, int, int]] = []  # (offset in buf, chunk, start, length)
        kept: list[tuple[int, Chunk, int, int]] = []  # the same, for members kept compressed
        missing_chunks: list[int] = []
        starts: list[tuple[int, int]] = []  # (extent, its offset in buf) of files read from byte 0
        hits = 0
        while pos < end:
            i = self.extents.extent_at(pos)
            if i is None:
                # Not file data (only block padding can be here): zeros, one block at a time.
                stop = min((pos // bsize + 1) * bsize, end)
                _zero(buf, pos - offset, stop - offset)
                pos = stop
                continue
            start, file_size = self.extents.extent_span(i)
            file_offset = pos - start
            if file_offset >= file_size:
                stop = min(start + -(-file_size // bsize) * bsize, end)
                _zero(buf, pos - offset, stop - offset)
                pos = stop
                continue
            if self._traced is not None and not self._traced[i]:
                self._first_read(i)
            if self.policy.libraries and file_offset == 0 and i not in self._elf_looked:
                starts.append((i, pos - offset))
            j = self.extents.chunk_in_extent(i, file_offset)
            chunk = self.extents.chunk(j)
            within = file_offset - chunk.chunk_offset
            take = min(chunk.size - within, end - pos, file_size - file_offset)
            if self.cache.read_into(chunk.digest, within, buf[pos - offset : pos - offset + take]):
                hits += 1
            elif chunk.offset in self._kept:
                kept.append((pos - offset, chunk, within, take))
            else:
                missing.append((pos - offset, chunk, within, take))
                missing_chunks.append(j)
            pos += take
        with self._lock:
            self.stats.reads += 1
            self.stats.read_bytes += length
            self.stats.data_reads += touched_data
            self.stats.cache_hits += hits
        for at, chunk, within, take in kept:
            # Fetched already: decoded now (its claim keeps two reads from doing it twice),
            # and nothing is guessed from it, as from a chunk in the cache.
            self._chunk_range_into(chunk, within, buf[at : at + take])
        if missing:
            if self._on_demand_fetch is not None:
                self._on_demand_fetch()
            # Every member this read lacks, fetched together with the members that follow
            # them (one request for a readahead across many small files, and for the
            # files beside them); the rest of the files it touched comes in the background.
            needed = [c.offset for _, c, _, _ in missing]
            along, later, guessed = self._plan(missing_chunks, needed)
            # Sent at once: the next read of a process is most likely in these (measured:
            # holding them until this read's members are in costs more than sharing the
            # link with it).
            self._fetch_in_background(self._claim(later, guesses=guessed)[0])
            fetched = self._fetch_members(needed, along=along, guesses=guessed)
            for at, chunk, within, take in missing:
                dest = buf[at : at + take]
                plain = fetched.get(chunk.digest)
                if plain is None:  # another reader fetched it: it is in the cache
                    self._chunk_range_into(chunk, within, dest)
                else:
                    dest[:] = memoryview(plain)[within : within + take]
        for i, at in starts:
            self._look_for_libraries(i, buf[at : at + len(ELF_MAGIC)])

    def _look_for_libraries(self, i: int, magic: memoryview) -> None:
        """After the first read of extent ``i``'s first bytes (``magic``): if the file is
        an ELF program or library outside the prioritised files, fetch the libraries it
        needs, in one of :data:`LIBRARY_READERS` threads (:meth:`_fetch_needed_libraries`)."""
        with self._lock:
            if i in self._elf_looked:
                return
            self._elf_looked.add(i)
        if magic != ELF_MAGIC or self._prioritized(i):
            return  # a prioritised file: the image lists what its workload reads
        with self._lock:
            if self._library_readers is None and self._meta_fd >= 0:
                self._library_readers = ThreadPoolExecutor(
                    LIBRARY_READERS, thread_name_prefix=f"libraries-{self.name}"
                )
            pool = self._library_readers
        if pool is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                pool.submit(self._fetch_needed_libraries, i)

    def _fetch_needed_libraries(self, i: int) -> None:
        """Fetch in the background, whole, the libraries that the ELF file of extent ``i``
        names in its dynamic section and that this layer holds where the loader looks."""
        needs = self._loader_needs(i)
        if needs is None:
            return
        wanted: list[int] = []
        for name in needs.needed:
            j = self._libraries.find(name, needs.dirs)
            if j is not None:
                wanted.extend(self._uncached_members(self._whole_file(j)))
        self._fetch_in_background(self._claim(wanted)[0])

    def _loader_needs(self, i: int) -> LoaderNeeds | None:
        """What the loader opens to run the ELF file of extent ``i``; None if it is not
        one, or its headers make no sense, or its bytes cannot be had (nothing here fails
        a read: the loader's own reads are left to say what is wrong).

        Reading its headers, dynamic section and the names in its string table may fetch
        them: the loader reads them all as soon as it maps the file. Only the names
        needed are read, not the whole table (megabytes in a large library).
        """
        try:
            layout = parse_layout(self._file_bytes(i, 0, HEAD_BYTES))
            if layout is None:
                return None
            interpreter = None
            if layout.interpreter is not None:
                at, size = layout.interpreter
                interpreter = interpreter_path(self._file_bytes(i, at, min(size, PATH_BYTES)))
            names: list[str | None] = []
            if layout.dynamic is not None:
                at, size = layout.dynamic
                data = self._file_bytes(i, at, min(size, MAX_DYNAMIC_BYTES))
                dynamic = parse_dynamic(layout, data)
                table_at = None if dynamic is None else layout.file_offset(dynamic.string_table)
                if dynamic is not None and table_at is not None:
                    names = [
                        string_at(self._file_bytes(i, table_at + off, NAME_BYTES), 0)
                        for off in dynamic.needed
                        if off < dynamic.string_table_size
                    ]
        except BlockfsError:
            return None
        needed = tuple(dict.fromkeys(n for n in names if n is not None))
        return LoaderNeeds(interpreter, needed, library_dirs(layout))

    def fetch_ahead(self, offset: int, *, around: bool) -> LoaderNeeds | None:
        """Fetch the file whose data starts at blob ``offset`` before a container reads
        it: the whole file, in one request, and with ``around``, in the background, the
        files around it in its directory, as the container's first read of it would
        have them fetched. What the loader opens to run it (:meth:`_loader_needs`), once
        the bytes that say so are in, not the whole file; the caller finds and fetches
        those, in whichever layer of the image holds them (this layer does not look for
        them itself).

        For a container's command (read as a first read would, ``around``), and the
        loader and libraries it opens (found by name, like those the library fetch
        finds: fetched alone), which lie mostly in the layers beneath. A prioritised
        file is left to the layer's prefetch, and None is answered for it.
        """
        ext = self.extents
        i = next(
            (
                ext.extent_of_chunk(j)
                for j in ext.chunks_in_member(offset)
                if ext.extent_chunks(ext.extent_of_chunk(j))[0] == j
            ),
            None,
        )
        if i is None:
            raise ImageReadError(
                f"layer {self.name}: no file's data starts at blob offset {offset}"
            )
        if self._prioritized(i):
            # The layer's prefetch brings its prioritised files in one request; the
            # image lists what its workload reads, so guess nothing (as _plan does).
            return None
        with self._lock:
            self._elf_looked.add(i)
        whole = self._uncached_members(self._whole_file(i) or ext.extent_chunks(i)[:1])
        owned, _ = self._claim(whole)
        if owned:
            threading.Thread(
                target=self._fetch_claimed_quietly, args=(owned,), name=f"ahead-{self.name}",
                daemon=True,
            ).start()  # fmt: skip
        if around:
            window = self._unfetched_members(self._directory_window(i))
            guessed = [off for off in window if off not in owned]
            self._fetch_in_background(self._claim(guessed, guesses=guessed)[0])
        return self._loader_needs(i)

    def _prioritized(self, i: int) -> bool:
        """Whether extent ``i``'s file is among the layer's prioritised files."""
        span = self.extents.extent_chunks(i)
        return bool(span) and self.extents.chunk(span[0]).offset < self.prioritized_end

    def _uncached_members(self, chunks: Iterable[int]) -> list[int]:
        """The blob offsets of the members of ``chunks`` (chunk numbers) that are not in
        the cache, each once, in order (those kept compressed among them: fetching them
        decodes them, without a request)."""
        members: dict[int, None] = {}
        for k in chunks:
            chunk = self.extents.chunk(k)
            if chunk.digest not in self.cache:
                members[chunk.offset] = None
        return list(members)

    def _unfetched_members(self, chunks: Iterable[int]) -> list[int]:
        """:meth:`_uncached_members` without those kept compressed: for guesses."""
        return [off for off in self._uncached_members(chunks) if off not in self._kept]

    def has_chunk(self, chunk: Chunk) -> bool:
        """Whether ``chunk``'s bytes are at hand: in the cache, or fetched and kept
        compressed until a read needs them."""
        return chunk.digest in self.cache or chunk.offset in self._kept

    def _whole_file(self, i: int) -> range:
        """The chunks of extent ``i``'s file to fetch in the background, the first time
        it is asked for (a read touched the file, or a program needs it): all of them
        for a file of at most the policy's ``whole_file_max``; else, and later, none."""
        with self._lock:
            if i in self._whole_planned:
                return range(0)
            self._whole_planned.add(i)
        span = self.extents.extent_chunks(i)
        if not span:
            return span
        whole = self.extents.chunk(span[-1]).end - self.extents.chunk(span[0]).offset
        return span if whole <= self.policy.whole_file_max else range(0)

    def _file_bytes(self, i: int, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of extent ``i``'s file (fewer past its
        end): from the cache, else fetched."""
        _, size = self.extents.extent_span(i)
        pos, end = max(0, offset), min(size, offset + length)
        out = bytearray(max(0, end - pos))
        view = memoryview(out)
        while pos < end:
            chunk = self.extents.chunk(self.extents.chunk_in_extent(i, pos))
            within = pos - chunk.chunk_offset
            take = min(chunk.size - within, end - pos)
            if take <= 0:
                raise ImageReadError(f"layer {self.name}: no chunk holds byte {pos} of extent {i}")
            start = pos - max(0, offset)
            self._chunk_range_into(chunk, within, view[start : start + take])
            pos += take
        return bytes(out)

    def _first_read(self, i: int) -> None:
        """Trace the first data read of extent ``i`` (once, in the order reads arrive)."""
        assert self._traced is not None and self._trace is not None
        with self._lock:
            if self._traced[i]:
                return
            self._traced[i] = 1
            self._trace(self.extents.extent_name(i))

    def _chunk_range_into(self, chunk: Chunk, start: int, dest: memoryview) -> None:
        """Bytes ``[start, start + len(dest))`` of ``chunk`` into ``dest``: from the cache,
        else fetched (a member kept compressed is decoded then)."""
        for _ in range(3):
            if self.cache.read_into(chunk.digest, start, dest):
                with self._lock:
                    self.stats.cache_hits += 1
                return
            fetched = self._fetch_members([chunk.offset])
            if chunk.digest in fetched:
                dest[:] = memoryview(fetched[chunk.digest])[start : start + len(dest)]
                return
            # Another reader cached the member between our look and our fetch: look again.
        raise ImageReadError(f"layer {self.name}: chunk {chunk.digest} keeps leaving the cache")

    def _plan(
        self, chunks: Sequence[int], needed: Sequence[int]
    ) -> tuple[list[int], list[int], set[int]]:
        """For a read that lacks ``chunks`` (the members at ``needed``): the members to
        fetch along with them, those to fetch in the background, and which of either are
        guesses (members of files the read did not touch).

        Along: the uncached members that follow the last one needed, up to the policy's
        ``unit`` of compressed span from the first. Background: the uncached rest of each
        file the read touched, for files of at most the policy's ``whole_file_max``, the
        first time a read touches the file (later misses in it find those members claimed
        or cached, so its chunks are not looked at again); and the first time a read
        touches a directory, the files around it in that directory
        (:meth:`_directory_window`).

        A read of the layer's prioritised files guesses nothing beyond them: the image
        lists what its workload reads, in the order it reads it, so the members along
        stop at the prioritised region's end, and no directory window is fetched.
        """
        ext = self.extents
        taken = set(needed)
        touched = {ext.extent_of_chunk(j) for j in chunks}
        along: list[int] = []
        guessed: set[int] = set()
        limit = min(needed) + self.policy.unit
        prioritized = max(needed) < self.prioritized_end
        if prioritized:
            limit = min(limit, self.prioritized_end)
        j = max(chunks) + 1
        while j < ext.chunk_count:
            chunk = ext.chunk(j)
            if chunk.end > limit or self.has_chunk(chunk):
                break  # one contiguous range, ending before what is fetched already
            if chunk.offset not in taken:
                taken.add(chunk.offset)
                along.append(chunk.offset)
                if ext.extent_of_chunk(j) not in touched:
                    guessed.add(chunk.offset)
            j += 1
        later: list[int] = []
        for i in sorted(touched):
            if i in self._whole_planned:
                continue
            # The rest of a file read comes whole (members kept compressed are decoded),
            # its directory's window as guesses.
            for off in self._uncached_members(self._whole_file(i)):
                if off not in taken:
                    taken.add(off)
                    later.append(off)
            if prioritized:
                continue
            for off in self._unfetched_members(self._directory_window(i)):
                if off not in taken:
                    taken.add(off)
                    later.append(off)
                    guessed.add(off)
        return along, later, guessed

    def _directory_window(self, i: int) -> list[int]:
        """The chunks of the files of extent ``i``'s directory around it in the blob, the
        first time a read touches that directory; else none.

        On each side, files are taken whole, nearest first, until they add up to half the
        policy's ``directory_window`` of compressed span. A file larger than the fetch
        unit is passed over: fetched on a guess, it would cost more time on the link than
        the round trip it might save (the unit is about the link's bandwidth-delay
        product); a process that needs it pays one round trip and then gets it at full
        speed. The search on each side ends where the directory does, or
        :data:`WINDOW_REACH` times the window away in the blob.
        """
        half = self.policy.directory_window // 2
        if half <= 0:
            return []
        ext = self.extents
        directory = os.path.dirname(ext.extent_name(i))
        if directory in self._dirs_planned:
            return []
        self._dirs_planned.add(directory)
        own = ext.extent_chunks(i)
        if not own:
            return []
        reach = WINDOW_REACH * self.policy.directory_window
        low, high = ext.chunk(own[0]).offset - reach, ext.chunk(own[-1]).end + reach
        chunks: list[int] = []
        for step in (1, -1):
            taken = 0
            j = i + step
            while 0 <= j < ext.extent_count and os.path.dirname(ext.extent_name(j)) == directory:
                span = ext.extent_chunks(j)
                if span:
                    first, last = ext.chunk(span[0]), ext.chunk(span[-1])
                    if first.offset < low or last.end > high:
                        break
                    size = last.end - first.offset
                    if size <= self.policy.unit:
                        taken += size
                        if taken > half:
                            break
                        chunks.extend(span)
                j += step
        return chunks

    def _claim(
        self,
        member_offsets: Iterable[int],
        *,
        take_over: bool = False,
        guesses: Iterable[int] = (),
    ) -> tuple[dict[int, Future[dict[str, bytes]]], list[Future[dict[str, bytes]]]]:
        """Take the fetch of each member at ``member_offsets`` that no thread is fetching:
        (the futures this caller must settle, the futures of members fetched elsewhere).

        With ``take_over``, a member claimed by another fetch that has not begun yet is
        taken too (its future is shared: whichever fetch begins first settles it), so
        that a read never waits behind a background fetch's queue; the members are marked
        as wanted by a read then (see :meth:`_fetch_attempt`). Those of ``guesses`` that
        this caller owns are marked as guesses.
        """
        owned: dict[int, Future[dict[str, bytes]]] = {}
        waiting: list[Future[dict[str, bytes]]] = []
        offsets = list(dict.fromkeys(member_offsets))
        with self._lock:
            if take_over:
                self._wanted.update(offsets)
            for off in offsets:
                future = self._inflight.get(off)
                if future is None:
                    owned[off] = self._inflight[off] = Future()
                elif take_over and off not in self._started:
                    owned[off] = future
                else:
                    waiting.append(future)
            self._guesses.update(off for off in guesses if off in owned)
        return owned, waiting

    def _fetch_claimed_quietly(self, owned: dict[int, Future[dict[str, bytes]]]) -> None:
        """:meth:`_fetch_claimed`, its failures left in the members' futures for the
        reads that wait for them (a bug still raises)."""
        with contextlib.suppress(BlockfsError):
            self._fetch_claimed(owned)

    def _fetch_claimed(self, owned: dict[int, Future[dict[str, bytes]]]) -> None:
        """Fetch the members claimed in ``owned`` whose fetch no other thread has begun
        (a claim may be shared, see :meth:`_claim`), settle their futures and let them go."""
        with self._lock:
            mine = {off: f for off, f in owned.items() if off not in self._started and not f.done()}
            self._started.update(mine)
        try:
            if mine:
                self._fetch_owned(mine)
        finally:
            with self._lock:
                for off, future in mine.items():
                    self._let_go(off, future)

    def _let_go(self, off: int, future: Future[dict[str, bytes]]) -> None:
        """End the claim of member ``off`` by ``future``, unless another claim has taken
        its place (the caller holds the lock)."""
        if self._inflight.get(off) is future:
            del self._inflight[off]
            self._started.discard(off)
            self._guesses.discard(off)
            self._wanted.discard(off)

    def _fetch_members(
        self,
        member_offsets: Sequence[int],
        *,
        along: Iterable[int] = (),
        guesses: Iterable[int] = (),
    ) -> dict[str, bytes]:
        """Fetch (once, however many threads ask) every chunk of the members that start at
        ``member_offsets``; their plaintext by chunk digest.

        Members another thread is fetching are waited for; the rest, and those of
        ``along`` that nobody is fetching, are fetched with one call to the reader, which
        coalesces their ranges. Raises the error of the first member of
        ``member_offsets`` that failed, after every member this call owns is settled;
        the members of ``along`` only go to the cache, or are kept compressed if they are
        among ``guesses`` and no read waits for them (:meth:`_keep`). When some come
        along, the fetch runs in a thread of its own and this call returns as soon as its
        own members are in: they lead the request, and the caller (a kernel read, which
        the next read of a process waits for) need not wait for the rest of it.
        """
        owned, waiting = self._claim(member_offsets, take_over=True)
        extra, _ = self._claim((off for off in along if off not in owned), guesses=guesses)
        claimed = {**owned, **extra}
        if extra:
            threading.Thread(
                target=self._fetch_quietly, args=(claimed,), name=f"fetch-{self.name}",
                daemon=True,
            ).start()  # fmt: skip
        else:
            self._fetch_claimed(claimed)
        result: dict[str, bytes] = {}
        for future in [*owned.values(), *waiting]:
            result.update(future.result())  # raises that member's error
        return result

    def _fetch_in_background(self, owned: dict[int, Future[dict[str, bytes]]]) -> None:
        """Fetch the members claimed in ``owned`` into the cache without waiting.

        A read that needs one of them meanwhile waits for this fetch, or takes the member
        over while its step has not begun. Failures are left for on-demand reads.
        """
        if not owned:
            return
        with self._lock:
            if self._background is None and self._meta_fd >= 0:
                self._background = ThreadPoolExecutor(
                    BACKGROUND_FETCHERS, thread_name_prefix=f"fetch-{self.name}"
                )
            pool = self._background
        try:
            if pool is None:
                raise RuntimeError("closed")
            pool.submit(self._fetch_quietly, owned)
        except RuntimeError:  # closed meanwhile
            self._fetch_claimed_failed(owned, ImageReadError(f"layer {self.name}: closed"))

    def _fetch_quietly(self, owned: dict[int, Future[dict[str, bytes]]]) -> None:
        """Fetch the claimed members in blob order, in steps of about
        :data:`BACKGROUND_STEP` compressed bytes: a read waiting for an early part of a
        large file gets it after the first step, not after the whole file, and a read
        that needs a member of a step not begun takes it over.

        Each step's request goes out once the first half of the step before it is in,
        not once all of it is: the link carries the next step's first bytes while the
        last members of this one arrive and are decoded and verified, instead of
        standing idle for a round trip and a decode between steps.
        """
        steps: list[dict[int, Future[dict[str, bytes]]]] = [{}]
        sizes = [0]
        for off in sorted(owned):
            if sizes[-1] >= BACKGROUND_STEP:
                steps.append({})
                sizes.append(0)
            steps[-1][off] = owned[off]
            first = self.extents.chunk(self.extents.chunks_in_member(off)[0])
            sizes[-1] += first.end - first.offset
        running: list[threading.Thread] = []
        failed: list[BaseException] = []
        for i, step in enumerate(steps):
            if failed:
                self._fetch_claimed_failed(
                    step, ImageReadError(f"layer {self.name}: background fetch: {failed[0]}")
                )
                continue
            halfway = self._first_half(step, sizes[i])
            thread = threading.Thread(
                target=self._fetch_step, args=(step, failed), name=f"fetch-{self.name}",
                daemon=True,
            )  # fmt: skip
            thread.start()
            running.append(thread)
            if i + 1 < len(steps):
                # The next step waits until this one is half in (or over).
                _wait_until_settled(halfway, thread)
        for thread in running:
            thread.join()
        if failed:
            raise failed[0]

    def _fetch_step(
        self, step: dict[int, Future[dict[str, bytes]]], failed: list[BaseException]
    ) -> None:
        try:
            self._fetch_claimed(step)
        except BlockfsError:
            pass  # its futures carry the error; the next step goes on
        except BaseException as exc:
            failed.append(exc)

    def _first_half(
        self, step: dict[int, Future[dict[str, bytes]]], size: int
    ) -> list[Future[dict[str, bytes]]]:
        """The futures of the members that make the first half of ``step`` (``size``
        compressed bytes)."""
        half: list[Future[dict[str, bytes]]] = []
        done = 0
        for off in sorted(step):
            if done >= size // 2:
                break
            first = self.extents.chunk(self.extents.chunks_in_member(off)[0])
            done += first.end - first.offset
            half.append(step[off])
        return half

    def _fetch_claimed_failed(
        self, owned: dict[int, Future[dict[str, bytes]]], error: BlockfsError
    ) -> None:
        with self._lock:
            for off, future in owned.items():
                if off in self._started or future.done():
                    continue  # taken over meanwhile
                future.set_exception(error)
                self._let_go(off, future)

    def _fetch_owned(self, owned: dict[int, Future[dict[str, bytes]]]) -> None:
        """Fetch the members of ``owned`` and settle each one's future.

        A member whose bytes do not decompress or verify is fetched again, up to
        :data:`MAX_FETCH_ATTEMPTS` times in all, before its future gets the error; its
        future stays unsettled meanwhile, so readers waiting for it get the outcome of
        the last attempt. Only verified bytes are cached.
        """
        todo: list[tuple[int, list[tuple[str, Chunk]]]] = []
        try:
            for off, future in owned.items():
                members = self.extents.chunks_in_member(off)
                chunks = [(self.extents.file_of_chunk(k), self.extents.chunk(k)) for k in members]
                if all(c.digest in self.cache for _, c in chunks):
                    # A fetch that finished just before ours began already cached it all.
                    future.set_result({})
                elif not self._decode_kept(off, chunks, future):
                    todo.append((off, chunks))
            attempt = 1
            while todo:
                todo = self._fetch_attempt(owned, todo, attempt)
                attempt += 1
        except BaseException as exc:
            for future in owned.values():
                if not future.done():
                    future.set_exception(exc)
            raise

    def _decode_kept(
        self, off: int, chunks: list[tuple[str, Chunk]], future: Future[dict[str, bytes]]
    ) -> bool:
        """Settle ``future`` with member ``off``'s plaintext from its bytes kept
        compressed, if it has any that verify; whether it did (if not, it is fetched)."""
        with self._lock:
            data = self._kept.pop(off, None)
        if data is None:
            return False
        self._kept_budget.give_back(len(data))
        try:
            outcome = self.reader.decode(chunks, data)
        except FormatError:
            with self._lock:
                self.stats.verification_failures += 1
            return False
        plain = {c.digest: d for (_, c), d in zip(chunks, outcome, strict=True)}
        with self._lock:
            self.stats.kept_members_read += 1
        future.set_result(plain)
        for digest, d in plain.items():
            self.cache.put(digest, d)
        return True

    def _keep(self, off: int) -> bool:
        """Whether member ``off``, whose bytes are in, is kept compressed: a guess that no
        read waits for, while the budget has room for it."""
        with self._lock:
            if off not in self._guesses or off in self._wanted:
                return False
        first = self.extents.chunk(self.extents.chunks_in_member(off)[0])
        return self._kept_budget.take(first.end - first.offset)

    def _fetch_attempt(
        self,
        owned: dict[int, Future[dict[str, bytes]]],
        todo: list[tuple[int, list[tuple[str, Chunk]]]],
        attempt: int,
    ) -> list[tuple[int, list[tuple[str, Chunk]]]]:
        """Fetch the members of ``todo`` once, settling the future of each that is done
        as soon as its bytes are in and verified (a read waiting for the first member of
        a large request goes on before the rest arrives); the members to fetch again."""
        again: list[tuple[int, list[tuple[str, Chunk]]]] = []

        def settle(k: int, outcome: MemberOutcome) -> None:
            off, chunks = todo[k]
            if isinstance(outcome, Compressed):
                # Kept for a read that may need it: a read that claims it from now on
                # decodes it (_decode_kept); one that waits now finds it not cached and
                # claims it.
                with self._lock:
                    self.stats.chunks_fetched += len(chunks)
                    self.stats.members_fetched += 1
                    self.stats.members_kept += 1
                    self._kept[off] = outcome.data
                    self._let_go(off, owned[off])
                owned[off].set_result({})
                return
            if isinstance(outcome, BaseException):
                corrupt = isinstance(outcome, ChunkVerificationError | DecompressionError)
                with self._lock:
                    if corrupt:
                        self.stats.verification_failures += 1
                    else:
                        self.stats.fetch_errors += 1
                    if corrupt and attempt < MAX_FETCH_ATTEMPTS:
                        self.stats.refetches += 1
                        again.append((off, chunks))
                        return
                if corrupt:
                    assert isinstance(outcome, FormatError)
                    outcome = _after_attempts(outcome, attempt)
                owned[off].set_exception(outcome)
                return
            plain = {c.digest: data for (_, c), data in zip(chunks, outcome, strict=True)}
            with self._lock:
                self.stats.chunks_fetched += len(chunks)
                self.stats.members_fetched += 1
            # The reads waiting for the member go on, then its chunks are stored: a read
            # that comes later finds the member's future until the fetch lets go of it,
            # after this (_fetch_claimed), and the chunks in the cache from then on.
            owned[off].set_result(plain)
            for digest, data in plain.items():
                self.cache.put(digest, data)

        started = time.monotonic()
        self.reader.read_members(
            [chunks for _, chunks in todo], settle, keep=lambda k: self._keep(todo[k][0])
        )
        with self._lock:
            self.stats.fetch_seconds += time.monotonic() - started
        return sorted(again)

    def prefetch(
        self,
        end: int,
        stop: threading.Event | None = None,
        *,
        pace: Callable[[], bool] | None = None,
    ) -> int:
        """Fetch into the cache every chunk whose member starts before blob offset ``end``.

        Without ``pace`` (the prioritised files, as a layer opens), every member is
        claimed at once and fetched with as few requests as the reader makes (one per
        16 MiB of the contiguous region, sent together); a read that needs one of them
        meanwhile waits for this fetch. It returns once every member of the range is in
        or failed, those another fetch had claimed too (a preload of the region is kept
        until then). With ``pace`` (the background fetch of the rest),
        members are fetched in batches of about :data:`PREFETCH_BATCH` compressed bytes,
        ``pace`` is called before each batch and may wait, and when it returns False,
        prefetching stops. Returns how many members were fetched. Failures are left for
        on-demand reads.
        """
        if pace is None:
            region = [off for batch in self._uncached_batches(end, stop) for off in batch]
            owned, elsewhere = self._claim(region)
            self._fetch_claimed_quietly(owned)
            wait(elsewhere)
            return sum(1 for f in owned.values() if f.exception() is None)
        fetched = 0
        for batch in self._uncached_batches(end, stop):
            if not pace():
                break
            try:
                self._fetch_members(batch)
                fetched += len(batch)
            except BlockfsError:
                continue
        return fetched

    def _uncached_batches(self, end: int, stop: threading.Event | None) -> Iterator[list[int]]:
        """Offsets of the members before ``end`` not cached yet, in batches of about
        :data:`PREFETCH_BATCH` compressed bytes (looked at as each batch is asked for)."""
        batch: list[int] = []
        batch_bytes = 0
        offsets = sorted({self.extents.chunk(j).offset for j in range(self.extents.chunk_count)})
        for off in offsets:
            if stop is not None and stop.is_set():
                return
            if off >= end:
                break
            members = self.extents.chunks_in_member(off)
            if all(self.extents.chunk(k).digest in self.cache for k in members):
                continue
            first = self.extents.chunk(members[0])
            batch.append(off)
            batch_bytes += first.end - first.offset
            if batch_bytes >= PREFETCH_BATCH:
                yield batch
                batch, batch_bytes = [], 0
        if batch:
            yield batch


def _wait_until_settled(
    futures: Sequence[Future[dict[str, bytes]]], thread: threading.Thread
) -> None:
    """Return once every one of ``futures`` is settled, or ``thread`` has ended."""
    pending = [f for f in futures if not f.done()]
    while pending and thread.is_alive():
        pending = list(wait(pending, timeout=0.05).not_done)


def _after_attempts(error: FormatError, attempts: int) -> FormatError:
    """``error`` (a chunk that failed verification), saying how often it was fetched."""
    if attempts == 1:
        return error
    return type(error)(
        f"{error.message}; fetched {attempts} times, corrupt every time",
        layer=error.layer,
        entry=error.entry,
        offset=error.offset,
    )
