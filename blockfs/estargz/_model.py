"""Values of a normalised eStargz TOC: chunks, entries and the tree they form.

These are what the reader produces after validating and normalising the TOC JSON, and
what the EROFS layout and the block image consume. They are immutable.

A layer can list millions of entries, so a TOC does not keep one Python object per
entry: its rows, chunks and tree live in a :class:`TOCTable` of compact arrays (a
hundred-odd bytes per entry), and an :class:`Entry` of a parsed TOC is a small view of
one row, made when asked for. ``Entry(...)`` made directly holds its own values.
"""

from __future__ import annotations

import bisect
import weakref
from array import array
from collections.abc import Iterator, Mapping, MutableSequence, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal, overload

import attrs

EntryType = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]
Compression = Literal["gzip", "zstd"]
FooterKind = Literal["estargz", "stargz", "zstd"]

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENT = b"\x0f"

NO_XATTRS: Final[Mapping[str, bytes]] = MappingProxyType({})
EMPTY_SHA256: Final = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
IMPLICIT_DIR_MODE: Final = 0o755


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


# Entry's fields, in the order of its constructor's arguments.
ENTRY_FIELDS: Final = (
    "name", "type", "mode", "uid", "gid", "user_name", "group_name", "size", "modtime",
    "link_name", "dev_major", "dev_minor", "xattrs", "digest", "chunks",
)  # fmt: skip


class Entry:
    """A TOC entry after normalisation (clean name, owner names carried forward, chunks attached).

    ``mode`` holds only the permission, setuid, setgid and sticky bits; the file type is
    ``type``. ``modtime`` is whole seconds since the Unix epoch, or None when the TOC has none.
    For a hardlink, ``link_name`` is the cleaned name of the entry it refers to.

    Entries compare equal when all their fields are equal; they are immutable and, like
    the values they hold (``xattrs`` is a mapping), not hashable.
    """

    __slots__ = ("__weakref__", "_key", "_table")

    # A row number of _table, or (no table) the tuple of the fields' values.
    _key: Any
    _table: TOCTable | None

    def __init__(
        self,
        name: str,
        type: EntryType,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        user_name: str = "",
        group_name: str = "",
        size: int = 0,
        modtime: int | None = None,
        link_name: str = "",
        dev_major: int = 0,
        dev_minor: int = 0,
        xattrs: Mapping[str, bytes] | None = None,
        digest: str = "",
        chunks: tuple[Chunk, ...] = (),
    ) -> None:
        self._table = None
        self._key = (
            name, type, mode, uid, gid, user_name, group_name, size, modtime, link_name,
            dev_major, dev_minor, {} if xattrs is None else xattrs, digest, chunks,
        )  # fmt: skip

    @classmethod
    def _of_row(cls, table: TOCTable, row: int) -> Entry:
        e = cls.__new__(cls)
        e._table = table
        e._key = row
        return e

    def _values(self) -> tuple[Any, ...]:
        t = self._table
        return self._key if t is None else t.row_values(self._key)

    @property
    def name(self) -> str:
        t = self._table
        return self._key[0] if t is None else t.name(self._key)

    @property
    def type(self) -> EntryType:
        t = self._table
        return self._key[1] if t is None else t.type_name(self._key)

    @property
    def mode(self) -> int:
        t = self._table
        return self._key[2] if t is None else t.modes[self._key]  # type: ignore[no-any-return]

    @property
    def uid(self) -> int:
        t = self._table
        return self._key[3] if t is None else t.uids[self._key]  # type: ignore[no-any-return]

    @property
    def gid(self) -> int:
        t = self._table
        return self._key[4] if t is None else t.gids[self._key]  # type: ignore[no-any-return]

    @property
    def user_name(self) -> str:
        t = self._table
        return self._key[5] if t is None else t.owner_names[t.users[self._key]]  # type: ignore[no-any-return]

    @property
    def group_name(self) -> str:
        t = self._table
        return self._key[6] if t is None else t.owner_names[t.groups[self._key]]  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        t = self._table
        return self._key[7] if t is None else t.sizes[self._key]  # type: ignore[no-any-return]

    @property
    def modtime(self) -> int | None:
        t = self._table
        return self._key[8] if t is None else t.modtime(self._key)

    @property
    def link_name(self) -> str:
        t = self._table
        return self._key[9] if t is None else t.link(self._key)

    @property
    def dev_major(self) -> int:
        t = self._table
        return self._key[10] if t is None else t.devs.get(self._key, (0, 0))[0]

    @property
    def dev_minor(self) -> int:
        t = self._table
        return self._key[11] if t is None else t.devs.get(self._key, (0, 0))[1]

    @property
    def xattrs(self) -> Mapping[str, bytes]:
        t = self._table
        return self._key[12] if t is None else t.xattrs.get(self._key, NO_XATTRS)

    @property
    def digest(self) -> str:
        t = self._table
        return self._key[13] if t is None else t.digest(self._key)

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        t = self._table
        return self._key[14] if t is None else t.chunks(self._key)

    def chunk_at(self, file_offset: int) -> int:
        """Index in ``chunks`` of the piece holding byte ``file_offset`` of the file."""
        if not 0 <= file_offset < self.size:
            raise ValueError(f"offset {file_offset} outside {self.name!r} of size {self.size}")
        t = self._table
        if t is None:
            chunks: tuple[Chunk, ...] = self._key[14]
            return bisect.bisect_right(chunks, file_offset, key=lambda c: c.chunk_offset) - 1
        lo, hi = t.chunk_range(self._key)
        return bisect.bisect_right(t.c_file_offset, file_offset, lo, hi) - 1 - lo

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Entry)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in zip(ENTRY_FIELDS, self._values(), strict=True))
        return f"Entry({fields})"


# --------------------------------------------------------------------------------------
# The column store

# Entry types as stored in TOCTable.types; ODD_TYPE marks a type string outside these
# (only make_toc can store one; it is kept aside).
TYPE_NAMES: Final[tuple[EntryType, ...]] = (
    "dir", "reg", "symlink", "hardlink", "char", "block", "fifo",
)  # fmt: skip
TYPE_CODES: Final[Mapping[str, int]] = {name: code for code, name in enumerate(TYPE_NAMES)}
DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = range(7)
ODD_TYPE: Final = 7

# Row flags.
DEAD: Final = 1  # replaced by a later entry of the same name: not among the TOC's entries
IMPLICIT: Final = 2  # the root or a parent directory that no entry lists

# modtime of a row that has none.
NO_MODTIME: Final = -(1 << 63)
# digest index of a row or chunk without a digest, and of one kept aside (make_toc only).
NO_DIGEST: Final = -1
ODD_DIGEST: Final = -2

IntColumn = MutableSequence[int]


def encode_name(name: str) -> bytes:
    """The bytes a name is stored (and written into the filesystem) as."""
    return name.encode("utf-8", "surrogateescape")


def decode_name(raw: bytes | bytearray) -> str:
    """The inverse of :func:`encode_name`."""
    return raw.decode("utf-8", "surrogateescape")


class TOCTable:
    """The rows, chunks and tree of one TOC, in columns of compact arrays.

    Rows: row 0 is the implicit root; rows ``1..explicit`` are the TOC's entries in blob
    order (those flagged DEAD were replaced by a later entry of the same name); implicit
    parent directories follow. A row's name and link are UTF-8 slices of ``names`` and
    ``links``; its owner names index ``owner_names``; its digest and its chunks' digests
    are 32-byte slots of ``digests``; its chunks are ``chunk_range(row)``, stored in blob
    order. Nodes: one per path of the tree, in order of first appearance (node 0 is the
    root), with the row at that path (``node_row``: for a hardlink, the hardlink entry;
    ``node_data`` gives its resolved target), its first child and next sibling, and its
    link count. Paths are found through an open-addressing hash index.

    The parser appends to the columns directly; everyone else reads them. Columns are
    arrays of fixed-size numbers; a value that does not fit one (only ``make_toc`` can
    give one) turns that column into a list.
    """

    def __init__(self, *, wide_chunks: bool = True, wide_offsets: bool = True) -> None:
        small = "Q" if wide_chunks else "I"
        offsets = "Q" if wide_offsets else "I"
        # Rows.
        self.names = bytearray()
        self.name_off: IntColumn = array(offsets, [0])
        self.types = bytearray()
        self.flags = bytearray()
        self.modes: IntColumn = array("H")
        self.uids: IntColumn = array("I")
        self.gids: IntColumn = array("I")
        self.users: IntColumn = array("I")
        self.groups: IntColumn = array("I")
        self.sizes: IntColumn = array("Q")
        self.mtimes: IntColumn = array("q")
        self.links = bytearray()
        self.link_off: IntColumn = array(offsets, [0])
        self.digest_of: IntColumn = array("i")
        self.chunk_lo: IntColumn = array(offsets)
        self.owner_names: list[str] = [""]
        self.owner_index: dict[str, int] = {"": 0}
        # Rare values, by row: xattrs, device numbers, and what make_toc could not store
        # in a column (type names and digests of any form).
        self.xattrs: dict[int, Mapping[str, bytes]] = {}
        self.devs: dict[int, tuple[int, int]] = {}
        self.odd: dict[tuple[str, int], str] = {}
        # Chunks.
        self.c_offset: IntColumn = array("Q")
        self.c_end: IntColumn = array("Q")
        self.c_inner: IntColumn = array(small)
        self.c_file_offset: IntColumn = array("Q")
        self.c_size: IntColumn = array(small)
        self.c_digest: IntColumn = array("i")
        self.digests = bytearray()
        self._empty_digest = -1
        # Rows 1..explicit are the TOC's entries; ``dead`` of them were replaced.
        self.explicit = 0
        self.dead = 0
        # make_toc keeps the Entry values it was given (row -> Entry), so that it hands
        # back the very objects.
        self.given: dict[int, Entry] = {}
        # Nodes, and the resolved target row of each hardlink node.
        self.node_row: IntColumn = array("i")
        self.node_first: IntColumn = array("i")
        self.node_last: IntColumn = array("i")
        self.node_next: IntColumn = array("i")
        self.node_links: IntColumn = array("I")
        self.resolved: dict[int, int] = {}
        self._slot_hash: IntColumn = array("i")
        self._slot_node: IntColumn = array("i")
        self._live: IntColumn | None = None
        root = self.new_node(self.add_implicit_dir(b""), -1, b"")
        self.node_links[root] = 2

    # -- building ---------------------------------------------------------------------

    def owner(self, name: str) -> int:
        """The index of ``name`` in ``owner_names``, adding it if new."""
        index = self.owner_index.get(name)
        if index is None:
            index = self.owner_index[name] = len(self.owner_names)
            self.owner_names.append(name)
        return index

    def add_digest(self, digest: str) -> int:
        """Store a digest of the form ``sha256:<64 hex digits>``; its index."""
        if digest == EMPTY_SHA256:
            # Empty files are common, and all have this digest: stored once.
            if self._empty_digest < 0:
                self.digests += bytes.fromhex(digest[7:])
                self._empty_digest = len(self.digests) // 32 - 1
            return self._empty_digest
        self.digests += bytes.fromhex(digest[7:])
        return len(self.digests) // 32 - 1

    def digest_index(self, digest: str, kind: str, key: int) -> int:
        """The index for ``digest`` of any form (``make_toc``): stored, none, or aside."""
        if not digest:
            return NO_DIGEST
        if len(digest) == 71 and digest.startswith("sha256:"):
            hex_ = digest[7:]
            if hex_ == hex_.lower():
                try:
                    return self.add_digest(digest)
                except ValueError:
                    pass
        self.odd[(kind, key)] = digest
        return ODD_DIGEST

    def add_implicit_dir(self, name: bytes) -> int:
        """Append the row of a directory that no entry lists; its row number."""
        row = len(self.types)
        self.names += name
        self._put("name_off", len(self.names))
        self.types.append(DIR)
        self.flags.append(IMPLICIT)
        self.modes.append(IMPLICIT_DIR_MODE)
        self.uids.append(0)
        self.gids.append(0)
        self.users.append(0)
        self.groups.append(0)
        self.sizes.append(0)
        self.mtimes.append(NO_MODTIME)
        self.link_off.append(len(self.links))
        self.digest_of.append(NO_DIGEST)
        self.chunk_lo.append(len(self.c_offset))
        return row

    def add_entry(self, e: Entry) -> int:
        """Append ``e`` as the next explicit row, whatever its values (``make_toc``)."""
        row = len(self.types)
        self.names += encode_name(e.name)
        self.name_off.append(len(self.names))
        code = TYPE_CODES.get(e.type, ODD_TYPE)
        if code == ODD_TYPE:
            self.odd[("type", row)] = e.type
        self.types.append(code)
        self.flags.append(0)
        self._put("modes", e.mode)
        self._put("uids", e.uid)
        self._put("gids", e.gid)
        self.users.append(self.owner(e.user_name))
        self.groups.append(self.owner(e.group_name))
        self._put("sizes", e.size)
        self._put("mtimes", NO_MODTIME if e.modtime is None else e.modtime)
        self.links += encode_name(e.link_name)
        self.link_off.append(len(self.links))
        if e.dev_major or e.dev_minor:
            self.devs[row] = (e.dev_major, e.dev_minor)
        if e.xattrs:
            self.xattrs[row] = e.xattrs
        self.digest_of.append(self.digest_index(e.digest, "digest", row))
        self.chunk_lo.append(len(self.c_offset))
        for c in e.chunks:
            j = len(self.c_offset)
            self._put("c_offset", c.offset)
            self._put("c_end", c.end)
            self._put("c_inner", c.inner_offset)
            self._put("c_file_offset", c.chunk_offset)
            self._put("c_size", c.size)
            self.c_digest.append(self.digest_index(c.digest, "chunk", j))
        self.explicit = row
        self.given[row] = e
        return row

    def _put(self, column: str, value: int) -> None:
        values: IntColumn = getattr(self, column)
        try:
            values.append(value)
        except (OverflowError, TypeError):
            setattr(self, column, [*values, value])

    # -- rows --------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.types)

    def name_bytes(self, row: int) -> bytes:
        return bytes(self.names[self.name_off[row] : self.name_off[row + 1]])

    def name(self, row: int) -> str:
        return decode_name(self.names[self.name_off[row] : self.name_off[row + 1]])

    def link_bytes(self, row: int) -> bytes:
        return bytes(self.links[self.link_off[row] : self.link_off[row + 1]])

    def link(self, row: int) -> str:
        return decode_name(self.links[self.link_off[row] : self.link_off[row + 1]])

    def type_name(self, row: int) -> EntryType:
        code = self.types[row]
        if code == ODD_TYPE:
            return self.odd[("type", row)]  # type: ignore[return-value]
        return TYPE_NAMES[code]

    def modtime(self, row: int) -> int | None:
        m = self.mtimes[row]
        return None if m == NO_MODTIME else m

    def _digest(self, index: int, kind: str, key: int) -> str:
        if index < 0:
            return "" if index == NO_DIGEST else self.odd[(kind, key)]
        return "sha256:" + self.digests[32 * index : 32 * index + 32].hex()

    def digest(self, row: int) -> str:
        return self._digest(self.digest_of[row], "digest", row)

    def chunk_digest(self, j: int) -> str:
        return self._digest(self.c_digest[j], "chunk", j)

    def chunk_digest_bytes(self, j: int) -> bytes | None:
        """The raw 32 bytes of chunk ``j``'s sha256, or None if it has none of that form."""
        index = self.c_digest[j]
        return None if index < 0 else bytes(self.digests[32 * index : 32 * index + 32])

    def chunk_range(self, row: int) -> tuple[int, int]:
        """``(first, end)`` chunk numbers of ``row``."""
        lo = self.chunk_lo[row]
        hi = self.chunk_lo[row + 1] if row + 1 < len(self.chunk_lo) else len(self.c_offset)
        return lo, hi

    def chunk(self, j: int) -> Chunk:
        return Chunk(
            self.c_offset[j],
            self.c_end[j],
            self.c_inner[j],
            self.c_file_offset[j],
            self.c_size[j],
            self.chunk_digest(j),
        )

    def chunks(self, row: int) -> tuple[Chunk, ...]:
        lo, hi = self.chunk_range(row)
        return tuple([self.chunk(j) for j in range(lo, hi)])

    def row_values(self, row: int) -> tuple[Any, ...]:
        major, minor = self.devs.get(row, (0, 0))
        return (
            self.name(row), self.type_name(row), self.modes[row], self.uids[row],
            self.gids[row], self.owner_names[self.users[row]],
            self.owner_names[self.groups[row]], self.sizes[row], self.modtime(row),
            self.link(row), major, minor, self.xattrs.get(row, NO_XATTRS), self.digest(row),
            self.chunks(row),
        )  # fmt: skip

    def entry(self, row: int) -> Entry:
        """A view of ``row`` (or, for make_toc, the Entry it was given)."""
        given = self.given.get(row) if self.given else None
        if given is not None:
            return given
        if self.flags[row] & IMPLICIT:
            return Entry(self.name(row), "dir", IMPLICIT_DIR_MODE, xattrs=NO_XATTRS)
        return Entry._of_row(self, row)

    def live_rows(self) -> Sequence[int]:
        """The rows of the TOC's entries, in blob order."""
        if not self.dead:
            return range(1, self.explicit + 1)
        if self._live is None:
            flags = self.flags
            self._live = array("i", [r for r in range(1, self.explicit + 1) if not flags[r] & DEAD])
        return self._live

    def first_offset(self, row: int) -> int | None:
        """Where the first chunk of ``row`` starts in the blob, if it has chunks."""
        lo, hi = self.chunk_range(row)
        return self.c_offset[lo] if lo < hi else None

    # -- nodes -------------------------------------------------------------------------

    def reserve_nodes(self, count: int) -> None:
        """Size the path index for ``count`` nodes (it grows by itself beyond that)."""
        size = count * 4 // 3 + 8
        if size > len(self._slot_node):
            self._rehash(size)

    def _rehash(self, size: int) -> None:
        old_hash, old_node = self._slot_hash, self._slot_node
        self._slot_hash = slot_hash = array("i", bytes(4 * size))
        self._slot_node = slot_node = array("i", [-1]) * size
        for k, node in enumerate(old_node):
            if node >= 0:
                h = old_hash[k]
                i = h % size
                while slot_node[i] >= 0:
                    i = i + 1 if i + 1 < size else 0
                slot_hash[i] = h
                slot_node[i] = node

    def find(self, key: bytes) -> int:
        """The node whose path is ``key`` (stored bytes), or -1."""
        h = hash(key) & 0x7FFFFFFF
        slot_hash, slot_node = self._slot_hash, self._slot_node
        size = len(slot_node)
        names, name_off, node_row = self.names, self.name_off, self.node_row
        i = h % size
        while True:
            node = slot_node[i]
            if node < 0:
                return -1
            if slot_hash[i] == h:
                row = node_row[node]
                if names[name_off[row] : name_off[row + 1]] == key:
                    return node
            i = i + 1 if i + 1 < size else 0

    def find_path(self, path: str) -> int:
        try:
            key = encode_name(path)
        except UnicodeEncodeError:
            return -1
        return self.find(key)

    def new_node(self, row: int, parent: int, key: bytes) -> int:
        """Add the node of path ``key`` held by ``row``, last among ``parent``'s children."""
        node = len(self.node_row)
        if 4 * (node + 1) > 3 * len(self._slot_node):
            self._rehash(2 * len(self._slot_node) + 8)
        self.node_row.append(row)
        self.node_first.append(-1)
        self.node_last.append(-1)
        self.node_next.append(-1)
        self.node_links.append(0)
        if parent >= 0:
            last = self.node_last[parent]
            if last < 0:
                self.node_first[parent] = node
            else:
                self.node_next[last] = node
            self.node_last[parent] = node
        h = hash(key) & 0x7FFFFFFF
        slot_node = self._slot_node
        size = len(slot_node)
        i = h % size
        while slot_node[i] >= 0:
            i = i + 1 if i + 1 < size else 0
        self._slot_hash[i] = h
        slot_node[i] = node
        return node

    @property
    def nodes(self) -> int:
        return len(self.node_row)

    def node_data(self, node: int) -> int:
        """The row holding the data of ``node``: its entry's, or a hardlink's target's."""
        row = self.node_row[node]
        return self.resolved[node] if self.types[row] == HARDLINK else row

    def node_path(self, node: int) -> str:
        return self.name(self.node_row[node])

    def child_nodes(self, node: int) -> Iterator[int]:
        """The children of ``node`` in order of first appearance."""
        nxt = self.node_next
        child = self.node_first[node]
        while child >= 0:
            yield child
            child = nxt[child]

    def base_name_bytes(self, node: int) -> bytes:
        """The last component of the node's path, as stored."""
        row = self.node_row[node]
        lo, hi = self.name_off[row], self.name_off[row + 1]
        names = self.names
        slash = names.rfind(b"/", lo, hi)
        return bytes(names[slash + 1 if slash >= 0 else lo : hi])

    def is_hardlink_node(self, node: int) -> bool:
        return self.types[self.node_row[node]] == HARDLINK


# --------------------------------------------------------------------------------------
# The TOC and its read-only views


class TOC:
    """A validated, normalised table of contents and the directory tree it describes.

    ``entries`` are the TOC's entries in blob order (chunk pieces folded into their file,
    hardlinks kept as ``hardlink`` entries). The tree adds the root (name ``""``) and
    implicit parent directories, and resolves hardlinks to the entry they name.

    ``nodes`` maps every path in the tree to the entry that holds its data and metadata
    (a hardlink's path maps to its resolved target; implicit directories and the root are
    included); ``children`` maps each directory path to the base names of its children, in
    order of first appearance; ``link_counts`` maps the name of each entry that holds
    data (never a hardlink) to the number of paths naming it (for directories: 2 + number
    of child directories). All of them are views of ``table``.
    """

    __slots__ = ("_cache", "children", "entries", "link_counts", "nodes", "table", "version")

    version: int
    table: TOCTable
    _cache: weakref.WeakValueDictionary[int, Entry]
    entries: Sequence[Entry]
    nodes: Mapping[str, Entry]
    children: Mapping[str, tuple[str, ...]]
    link_counts: Mapping[str, int]

    def __init__(self, table: TOCTable, *, version: int = 1) -> None:
        init = object.__setattr__
        init(self, "version", version)
        init(self, "table", table)
        # Entries handed out by lookup, so that two lookups of one entry give one object.
        init(self, "_cache", weakref.WeakValueDictionary())
        init(self, "entries", _Entries(table))
        init(self, "nodes", _Nodes(self))
        init(self, "children", _Children(table))
        init(self, "link_counts", _LinkCounts(table))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"TOC is immutable: cannot set {name!r}")

    def row_entry(self, row: int) -> Entry:
        """The entry of ``table`` row ``row``: while it is alive, the same object as
        lookups of its path give."""
        cache = self._cache
        cached = cache.get(row)
        if cached is None:
            cached = cache[row] = self.table.entry(row)
        return cached

    def lookup(self, path: str) -> Entry:
        """The entry at ``path`` (a cleaned name; hardlinks resolved). KeyError if absent."""
        return self.nodes[path]

    def walk(self, top: str = "") -> Iterator[tuple[str, Entry]]:
        """Depth-first (path, entry) pairs of the tree under ``top``, parents before children."""
        t = self.table
        node = t.find_path(top)
        if node < 0:
            raise KeyError(top)
        stack = [(top, node)]
        while stack:
            path, node = stack.pop()
            yield path, self.row_entry(t.node_data(node))
            kids = list(t.child_nodes(node))
            for kid in reversed(kids):
                stack.append((join(path, decode_name(t.base_name_bytes(kid))), kid))

    def nlink(self, entry: Entry) -> int:
        """How many names refer to ``entry`` (directories count ``.`` and children's ``..``)."""
        return self.link_counts[entry.name]

    def regular_files(self) -> Iterator[Entry]:
        """Each non-empty regular file once, in blob order (hardlinks not repeated)."""
        t = self.table
        types, sizes = t.types, t.sizes
        for row in t.live_rows():
            if types[row] == REG and sizes[row] > 0:
                yield t.entry(row)

    def __repr__(self) -> str:
        return f"<TOC version {self.version}: {len(self.entries)} entries>"


class _Entries(Sequence[Entry]):
    """``TOC.entries``: the live explicit rows as entries (made on access, not kept)."""

    __slots__ = ("_table",)

    def __init__(self, table: TOCTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table.explicit - self._table.dead

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Entry]: ...
    def __getitem__(self, index: int | slice) -> Entry | Sequence[Entry]:
        rows = self._table.live_rows()
        if isinstance(index, slice):
            return tuple(self._table.entry(r) for r in rows[index])
        return self._table.entry(rows[index])

    def __iter__(self) -> Iterator[Entry]:
        entry = self._table.entry
        for row in self._table.live_rows():
            yield entry(row)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, _Entries)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} TOC entries>"


class _Nodes(Mapping[str, Entry]):
    """``TOC.nodes``: every path of the tree -> the entry holding its data."""

    __slots__ = ("_toc",)

    def __init__(self, toc: TOC) -> None:
        self._toc = toc

    def __getitem__(self, path: str) -> Entry:
        t = self._toc.table
        node = t.find_path(path) if isinstance(path, str) else -1
        if node < 0:
            raise KeyError(path)
        return self._toc.row_entry(t.node_data(node))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._toc.table.find_path(path) >= 0

    def __len__(self) -> int:
        return self._toc.table.nodes

    def __iter__(self) -> Iterator[str]:
        t = self._toc.table
        for node in range(t.nodes):
            yield t.node_path(node)


class _Children(Mapping[str, tuple[str, ...]]):
    """``TOC.children``: directory path -> base names of its children, in order."""

    __slots__ = ("_table",)

    def __init__(self, table: TOCTable) -> None:
        self._table = table

    def _dir(self, path: object) -> int:
        t = self._table
        node = t.find_path(path) if isinstance(path, str) else -1
        if node < 0 or t.types[t.node_row[node]] != DIR:
            return -1
        return node

    def __getitem__(self, path: str) -> tuple[str, ...]:
        node = self._dir(path)
        if node < 0:
            raise KeyError(path)
        t = self._table
        return tuple(decode_name(t.base_name_bytes(kid)) for kid in t.child_nodes(node))

    def __contains__(self, path: object) -> bool:
        return self._dir(path) >= 0

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[str]:
        t = self._table
        types, node_row = t.types, t.node_row
        for node in range(t.nodes):
            if types[node_row[node]] == DIR:
                yield t.node_path(node)


class _LinkCounts(Mapping[str, int]):
    """``TOC.link_counts``: name of each data-holding entry -> the paths naming it."""

    __slots__ = ("_table",)

    def __init__(self, table: TOCTable) -> None:
        self._table = table

    def _node(self, path: object) -> int:
        t = self._table
        node = t.find_path(path) if isinstance(path, str) else -1
        if node < 0 or t.is_hardlink_node(node):
            return -1
        return node

    def __getitem__(self, path: str) -> int:
        node = self._node(path)
        if node < 0:
            raise KeyError(path)
        return self._table.node_links[node]

    def __contains__(self, path: object) -> bool:
        return self._node(path) >= 0

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[str]:
        t = self._table
        for node in range(t.nodes):
            if not t.is_hardlink_node(node):
                yield t.node_path(node)


def join(parent: str, base: str) -> str:
    """Path of ``base`` inside directory ``parent`` ("" is the root)."""
    return f"{parent}/{base}" if parent else base
