"""Values of a normalised eStargz TOC: chunks, entries and the tree they form.

These are what the reader produces after validating and normalising the TOC JSON, and
what the EROFS layout and the block image consume. They are immutable.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from typing import Literal

import attrs

EntryType = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]
Compression = Literal["gzip", "zstd"]
FooterKind = Literal["estargz", "stargz", "zstd"]

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENT = b"\x0f"


@attrs.frozen(slots=True)
class Chunk:
    """One piece of a regular file's payload, and where its compressed bytes live.

    The piece is decompressed from the stream that starts at ``offset`` (a gzip member or
    zstd frame) after skipping ``inner_offset`` bytes; ``end`` is where the compressed
    run that holds it ends (the next member start, or the end of the payload region).
    """

    offset: int
    end: int
    inner_offset: int
    chunk_offset: int
    size: int
    digest: str


@attrs.frozen(slots=True, hash=False)
class Entry:
    """A TOC entry after normalisation (clean name, owner names carried forward, chunks attached).

    ``mode`` holds only the permission, setuid, setgid and sticky bits; the file type is
    ``type``. ``modtime`` is whole seconds since the Unix epoch, or None when the TOC has none.
    For a hardlink, ``link_name`` is the cleaned name of the entry it refers to.
    """

    name: str
    type: EntryType
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    size: int = 0
    modtime: int | None = None
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = attrs.field(factory=dict)
    digest: str = ""
    chunks: tuple[Chunk, ...] = ()

    def chunk_at(self, file_offset: int) -> int:
        """Index in ``chunks`` of the piece holding byte ``file_offset`` of the file."""
        if not 0 <= file_offset < self.size:
            raise ValueError(f"offset {file_offset} outside {self.name!r} of size {self.size}")
        return bisect.bisect_right(self.chunks, file_offset, key=lambda c: c.chunk_offset) - 1


@attrs.frozen(slots=True, hash=False)
class TOC:
    """A validated, normalised table of contents and the directory tree it describes.

    ``entries`` are the TOC's entries in blob order (chunk pieces folded into their file,
    hardlinks kept as ``hardlink`` entries). The tree adds the root (name ``""``) and
    implicit parent directories, and resolves hardlinks to the entry they name.
    """

    version: int
    entries: tuple[Entry, ...]
    # Every path in the tree -> the entry that holds its data and metadata. A hardlink's
    # path maps to its resolved target; implicit directories and the root are included.
    nodes: Mapping[str, Entry]
    # Directory path -> base names of its children, in order of first appearance.
    children: Mapping[str, tuple[str, ...]]
    # Name of an entry that holds data (never a hardlink) -> number of paths naming it
    # (for directories: 2 + number of child directories).
    link_counts: Mapping[str, int]

    def lookup(self, path: str) -> Entry:
        """The entry at ``path`` (a cleaned name; hardlinks resolved). KeyError if absent."""
        return self.nodes[path]

    def walk(self, top: str = "") -> Iterator[tuple[str, Entry]]:
        """Depth-first (path, entry) pairs of the tree under ``top``, parents before children."""
        stack = [top]
        while stack:
            path = stack.pop()
            yield path, self.nodes[path]
            kids = self.children.get(path, ())
            stack.extend(join(path, k) for k in reversed(kids))

    def nlink(self, entry: Entry) -> int:
        """How many names refer to ``entry`` (directories count ``.`` and children's ``..``)."""
        return self.link_counts[entry.name]

    def regular_files(self) -> Iterator[Entry]:
        """Each non-empty regular file once, in blob order (hardlinks not repeated)."""
        for e in self.entries:
            if e.type == "reg" and e.size > 0:
                yield e


def join(parent: str, base: str) -> str:
    """Path of ``base`` inside directory ``parent`` ("" is the root)."""
    return f"{parent}/{base}" if parent else base
