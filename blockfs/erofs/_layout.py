"""Lay a TOC out as an EROFS image: the metadata region bytes and the map of file extents.

The image is ``[metadata region][data region]``. The metadata region (superblock, inodes,
inline xattrs, directories, symlink targets) is built here from the TOC alone. The data
region is virtual: every non-empty regular file owns one block-aligned run of blocks,
in blob order, that the block image fills lazily from the file's chunks.
"""

from __future__ import annotations

import bisect
import stat
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO, overload

import attrs

from blockfs.erofs._errors import ErofsLayoutError
from blockfs.erofs._format import (
    BLOCK_SIZE,
    BLOCK_SIZE_BITS,
    DIRENT,
    FEATURE_COMPAT_MTIME,
    FEATURE_COMPAT_SB_CHKSUM,
    FIRST_NID,
    FT_BLKDEV,
    FT_CHRDEV,
    FT_DIR,
    FT_FIFO,
    FT_REG_FILE,
    FT_SYMLINK,
    INODE_EXTENDED,
    INODE_EXTENDED_FORMAT,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    LAYOUT_SHIFT,
    MAGIC,
    MAX_BLOCKS,
    MAX_DEV_MAJOR,
    MAX_DEV_MINOR,
    MAX_NAME_LEN,
    MAX_XATTR_ICOUNT,
    MAX_XATTR_VALUE,
    NULL_ADDR,
    SLOT_SIZE,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    encode_rdev,
    split_xattr_name,
    superblock_checksum,
    xattr_icount,
)
from blockfs.estargz import LANDMARKS, TOC
from blockfs.estargz._model import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    NO_MODTIME,
    REG,
    SYMLINK,
    TOCTable,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Names starting with this are AUFS bookkeeping (e.g. ``.wh..wh.plnk``): never emitted.
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"

_MAX_SYMLINK = 4095  # PATH_MAX - 1
_MAX_U32 = 0xFFFFFFFF
_MIN_S64 = -(1 << 63)
_MAX_S64 = (1 << 63) - 1
_INODE_SIZE = INODE_EXTENDED.size
_DIRENT_SIZE = DIRENT.size
_BLOCK_MASK = BLOCK_SIZE - 1

_MODE_TYPES: Mapping[int, int] = {
    FT_REG_FILE: stat.S_IFREG,
    FT_DIR: stat.S_IFDIR,
    FT_SYMLINK: stat.S_IFLNK,
    FT_CHRDEV: stat.S_IFCHR,
    FT_BLKDEV: stat.S_IFBLK,
    FT_FIFO: stat.S_IFIFO,
}


@attrs.frozen(slots=True)
class Extent:
    """The data blocks of one regular file: ``size`` bytes from block ``start_block`` on.

    ``entry_name`` is the TOC name of the entry holding the data (hardlinks share it). The
    last block is zero-padded past ``size``.
    """

    start_block: int
    size: int
    entry_name: str

    @property
    def blocks(self) -> int:
        """Number of blocks the extent covers."""
        return -(-self.size // BLOCK_SIZE)

    @property
    def end_block(self) -> int:
        """First block after the extent."""
        return self.start_block + self.blocks


class Extents(Sequence[Extent]):
    """The extents of an image in compact arrays; an :class:`Extent` is made when asked for.

    ``rows`` are the TOC table rows of the files (their names are read from ``table``),
    or, without a table, indexes into ``names``.
    """

    __slots__ = ("_names", "_table", "rows", "sizes", "starts")

    def __init__(
        self,
        starts: array[int],
        sizes: array[int],
        rows: array[int],
        *,
        table: TOCTable | None = None,
        names: Sequence[str] = (),
    ) -> None:
        self.starts = starts
        self.sizes = sizes
        self.rows = rows
        self._table = table
        self._names = names

    @classmethod
    def of(cls, extents: Iterable[Extent]) -> Extents:
        """Extents holding the given values."""
        if isinstance(extents, Extents):
            return extents
        items = list(extents)
        return cls(
            array("Q", [e.start_block for e in items]),
            array("Q", [e.size for e in items]),
            array("i", range(len(items))),
            names=[e.entry_name for e in items],
        )

    @property
    def table(self) -> TOCTable | None:
        """The TOC table whose rows ``rows`` are, if any."""
        return self._table

    def name(self, i: int) -> str:
        """The entry name of extent ``i``."""
        if self._table is not None:
            return self._table.name(self.rows[i])
        return self._names[self.rows[i]]

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> Extent: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Extent]: ...
    def __getitem__(self, index: int | slice) -> Extent | Sequence[Extent]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        return Extent(self.starts[index], self.sizes[index], self.name(index))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Extents, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} extents>"


def _as_extents(value: Iterable[Extent]) -> Extents:
    return Extents.of(value)


def _check_extents(instance: ErofsIndex, value: Extents) -> None:
    previous_end = instance.meta_blocks
    starts, sizes = value.starts, value.sizes
    for i in range(len(starts)):
        start, size = starts[i], sizes[i]
        if size <= 0 or start < previous_end:
            raise ValueError(f"extent {value[i]!r} is empty, overlaps or is out of order")
        previous_end = start + ((size + _BLOCK_MASK) >> BLOCK_SIZE_BITS)
    if previous_end > instance.total_blocks:
        raise ValueError(
            f"extents end at block {previous_end} > total_blocks {instance.total_blocks}"
        )


@attrs.frozen(slots=True)
class ErofsIndex:
    """What ``build_index`` laid out: region sizes in blocks and the file extents.

    Blocks ``[0, meta_blocks)`` are the metadata region that was written out; blocks
    ``[meta_blocks, total_blocks)`` are the data region, where each extent holds one
    file's bytes (zero-padded to its last block) and every other block reads as zeros.
    ``skipped_xattrs`` lists (path, xattr name) pairs EROFS has no name prefix for.
    """

    block_size: int
    meta_blocks: int
    total_blocks: int
    inodes: int
    extents: Extents = attrs.field(converter=_as_extents)
    skipped_xattrs: tuple[tuple[str, str], ...] = ()

    def __attrs_post_init__(self) -> None:
        _check_extents(self, self.extents)

    @property
    def image_size(self) -> int:
        """Size in bytes of the whole image (metadata and data regions)."""
        return self.total_blocks * self.block_size

    @property
    def meta_size(self) -> int:
        """Size in bytes of the metadata region."""
        return self.meta_blocks * self.block_size

    def extent_at(self, block: int) -> Extent | None:
        """The extent holding ``block``, or None for metadata and padding blocks."""
        i = bisect.bisect_right(self.extents.starts, block) - 1
        if i < 0:
            return None
        extent = self.extents[i]
        return extent if block < extent.end_block else None


# Inode flags.
_WHITEOUT = 1
_OPAQUE = 2
_INLINE = 4

# Dirent targets that are not nodes of the TOC's tree.
_DOT = -1
_DOTDOT = -2

_FT_OF_TYPE = {DIR: FT_DIR, REG: FT_REG_FILE, SYMLINK: FT_SYMLINK, CHAR: FT_CHRDEV,
               BLOCK: FT_BLKDEV, FIFO: FT_FIFO}  # fmt: skip
_WHITEOUT_PREFIX_BYTES = WHITEOUT_PREFIX.encode()
_OPAQUE_MARKER_BYTES = OPAQUE_MARKER.encode()
_WHITEOUT_META_PREFIX_BYTES = WHITEOUT_META_PREFIX.encode()
_LANDMARK_BYTES = frozenset(name.encode() for name in LANDMARKS)
# Metadata is written out in pieces of about this size.
_WRITE_PIECE = 1 << 20


def build_index(
    toc: TOC,
    out: BinaryIO,
    *,
    build_time: int = 0,
    uuid: bytes | None = None,
    volume_name: str = "",
    layer: str | None = None,
) -> ErofsIndex:
    """Write the EROFS metadata region for ``toc`` to ``out`` and return the image's layout.

    ``out`` receives ``meta_blocks`` whole blocks, in order, in pieces of about a MiB.
    ``layer`` only names the layer in errors. Raises ErofsLayoutError (before writing
    anything) if the TOC cannot be represented.

    The layout keeps a few dozen bytes per inode and per directory entry in arrays, and
    none of the metadata region beyond the piece being written.
    """
    if uuid is None:
        uuid = bytes(16)
    if len(uuid) != 16:
        raise ValueError(f"uuid must be 16 bytes, got {len(uuid)}")
    label = volume_name.encode("utf-8")
    if len(label) > 15:
        raise ValueError(f"volume name {volume_name!r} is longer than 15 bytes")
    if not 0 <= build_time <= _MAX_S64:
        raise ValueError(f"build_time {build_time} out of range")
    layout = _Layout(toc, layer)
    return layout.build(out, build_time=build_time, uuid=uuid, label=label)


class _Layout:
    """The passes of one build: collect the tree, place inodes, check, write.

    Each inode is a position in parallel arrays (``ino_*``): the TOC row whose metadata
    it has, the node of the path it was first reached by, its file type, flags, link
    count, size, nid and block address. Each directory's entries, sorted as EROFS wants
    them, are a run of ``dirent_ino``/``dirent_node``; their names are read back from the
    TOC when they are written.
    """

    def __init__(self, toc: TOC, layer: str | None) -> None:
        self.toc = toc
        self.t = toc.table
        self.layer = layer
        self.ino_row = array("i")
        self.ino_node = array("i")
        self.ino_ftype = bytearray()
        self.ino_flags = bytearray()
        self.ino_nlink = array("I")
        self.ino_size = array("Q")
        self.ino_nid = array("Q")
        self.ino_blkaddr = array("Q")
        # The parent of each directory inode (its ".."); other inodes' are unused.
        self.ino_parent = array("i")
        self.xattr_areas: dict[int, bytes] = {}
        # Directories in inode order; dirents of the k-th are dir_start[k]:dir_start[k+1].
        self.dir_start = array("Q", [0])
        self.dirent_ino = array("i")
        self.dirent_node = array("i")
        # Extents, in blob order.
        self.ext_start = array("Q")
        self.ext_size = array("Q")
        self.ext_row = array("i")
        self.skipped_xattrs: list[tuple[str, str]] = []

    def error(self, message: str, path: str | None = None) -> ErofsLayoutError:
        return ErofsLayoutError(message, entry=path, layer=self.layer)

    def path(self, node: int) -> str:
        return self.t.node_path(node)

    @property
    def inodes(self) -> int:
        return len(self.ino_row)

    def build(self, out: BinaryIO, *, build_time: int, uuid: bytes, label: bytes) -> ErofsIndex:
        self.collect()
        inode_end = self.place()
        content_start = -(-inode_end // BLOCK_SIZE)
        meta_blocks = self.place_content(content_start)
        self.place_data(meta_blocks)
        ext_start, ext_size = self.ext_start, self.ext_size
        total_blocks = (
            ext_start[-1] + ((ext_size[-1] + _BLOCK_MASK) >> BLOCK_SIZE_BITS)
            if ext_start
            else meta_blocks
        )
        if total_blocks > MAX_BLOCKS:
            raise self.error(
                f"the image needs {total_blocks} blocks, more than 32-bit block addresses reach"
            )
        if self.inodes > _MAX_U32:
            raise self.error(f"{self.inodes} inodes do not fit 32-bit inode numbers")
        self.check_owners_and_times()
        superblock = [
            MAGIC,
            0,
            FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME,
            BLOCK_SIZE_BITS,
            0,
            self.ino_nid[0],
            self.inodes,
            build_time,
            0,
            total_blocks,
            0,  # meta_blkaddr
            0,  # xattr_blkaddr: no shared xattrs
            uuid,
            label,
            0,  # feature_incompat
            0,
            0,
            0,
            b"",
        ]
        writer = _BlockWriter(out, superblock)
        self.write_inodes(writer)
        writer.pad_to(content_start * BLOCK_SIZE)
        self.write_content(writer)
        writer.pad_to(meta_blocks * BLOCK_SIZE)
        writer.finish()
        return ErofsIndex(
            block_size=BLOCK_SIZE,
            meta_blocks=meta_blocks,
            total_blocks=total_blocks,
            inodes=self.inodes,
            extents=Extents(self.ext_start, self.ext_size, self.ext_row, table=self.t),
            skipped_xattrs=tuple(self.skipped_xattrs),
        )

    # -- pass 1: the tree as the filesystem shows it ----------------------------------

    def collect(self) -> None:
        """Walk the TOC from the root, resolving whiteouts, landmarks and hardlinks.

        Inodes are numbered in breadth-first order, so the root comes first and the
        children of a directory sit together.
        """
        t = self.t
        types = t.types
        root = t.node_data(0)
        if types[root] != DIR:
            raise self.error("the TOC has no root directory", "")
        # The inode of each TOC row reached so far (hardlinks share their target's).
        row_ino = array("i", [-1]) * t.rows
        self.row_ino = row_ino
        row_ino[root] = self.new_inode(root, 0)
        self.ino_parent[0] = 0
        ino_ftype, ino_flags, ino_nlink = self.ino_ftype, self.ino_flags, self.ino_nlink
        base_of, node_data, node_row = t.base_name_bytes, t.node_data, t.node_row
        dirent_ino, dirent_node = self.dirent_ino, self.dirent_node
        me = 0
        while me < len(ino_ftype):
            if ino_ftype[me] != FT_DIR:
                me += 1
                continue
            dnode = self.ino_node[me]
            dirents: list[tuple[bytes, int, int]] = [
                (b".", me, _DOT),
                (b"..", self.ino_parent[me], _DOTDOT),
            ]
            subdirs = 0
            kid_set: frozenset[bytes] | None = None
            for child in t.child_nodes(dnode):
                base = base_of(child)
                if base.startswith(_WHITEOUT_PREFIX_BYTES):
                    if base == _OPAQUE_MARKER_BYTES:
                        ino_flags[me] |= _OPAQUE
                        continue
                    if base.startswith(_WHITEOUT_META_PREFIX_BYTES):
                        continue
                    hidden = base[len(_WHITEOUT_PREFIX_BYTES) :]
                    if kid_set is None:
                        kid_set = frozenset(base_of(k) for k in t.child_nodes(dnode))
                    if hidden in kid_set:
                        # A whiteout only hides lower layers; this layer's own NAME already
                        # does that in an overlay, and one name cannot be both.
                        continue
                    row = node_data(child)
                    if types[row] == DIR:
                        raise self.error("a whiteout must not be a directory", self.path(child))
                    name = self.check_name(hidden, child)
                    ino = self.add_inode(row, child, FT_CHRDEV, _WHITEOUT)
                    ino_nlink[ino] = 1
                    dirents.append((name, ino, child))
                    continue
                if dnode == 0 and base in _LANDMARK_BYTES:
                    continue
                row = node_data(child)
                ino = row_ino[row]
                if ino < 0:
                    if types[node_row[child]] == HARDLINK:
                        self.check_link_target(row, child)
                    ino = row_ino[row] = self.new_inode(row, child)
                    if ino_ftype[ino] == FT_DIR:
                        self.ino_parent[ino] = me
                        subdirs += 1
                elif ino_ftype[ino] == FT_DIR:
                    raise self.error("a directory is reachable under two names", self.path(child))
                ino_nlink[ino] += 1
                dirents.append((self.check_name(base, child), ino, child))
            dirents.sort()
            ino_nlink[me] = 2 + subdirs
            self.ino_size[me] = self.directory_size([name for name, _, _ in dirents], dnode)
            for _, ino, node in dirents:
                dirent_ino.append(ino)
                dirent_node.append(node)
            self.dir_start.append(len(dirent_ino))
            me += 1

    def add_inode(self, row: int, node: int, ftype: int, flags: int = 0) -> int:
        ino = len(self.ino_row)
        self.ino_row.append(row)
        self.ino_node.append(node)
        self.ino_ftype.append(ftype)
        self.ino_flags.append(flags)
        self.ino_nlink.append(0)
        self.ino_size.append(0)
        self.ino_nid.append(0)
        self.ino_blkaddr.append(0)
        self.ino_parent.append(-1)
        return ino

    def check_link_target(self, row: int, node: int) -> None:
        t = self.t
        name = t.name(row)
        if t.types[row] == DIR:
            raise self.error(f"hardlink to the directory {name!r}", self.path(node))
        if name.rpartition("/")[2].startswith(WHITEOUT_PREFIX):
            raise self.error(f"hardlink to the whiteout {name!r}", self.path(node))

    def new_inode(self, row: int, node: int) -> int:
        t = self.t
        ftype = _FT_OF_TYPE.get(t.types[row])
        if ftype is None:
            raise self.error(f"unresolved entry of type {t.type_name(row)!r}", self.path(node))
        size = 0
        if ftype == FT_REG_FILE:
            size = t.sizes[row]
            if size < 0:
                raise self.error(f"negative size {size}", self.path(node))
        elif ftype == FT_SYMLINK:
            size = t.link_off[row + 1] - t.link_off[row]
            if size > _MAX_SYMLINK:
                raise self.error(
                    f"symlink target of {size} bytes is longer than {_MAX_SYMLINK}",
                    self.path(node),
                )
        elif ftype in (FT_CHRDEV, FT_BLKDEV):
            major, minor = t.devs.get(row, (0, 0))
            if not (0 <= major <= MAX_DEV_MAJOR and 0 <= minor <= MAX_DEV_MINOR):
                raise self.error(
                    f"device number {major}:{minor} does not fit 32 bits", self.path(node)
                )
        ino = self.add_inode(row, node, ftype)
        self.ino_size[ino] = size
        return ino

    def check_name(self, raw: bytes, node: int) -> bytes:
        if not raw or len(raw) > MAX_NAME_LEN or raw in (b".", b"..") or b"\0" in raw:
            raise self.error(
                f"invalid file name ({len(raw)} bytes; at most {MAX_NAME_LEN})", self.path(node)
            )
        return raw

    def directory_size(self, names: Sequence[bytes], node: int) -> int:
        """The size of a directory whose sorted dirent names are ``names`` (refusing two
        alike): whole blocks of self-contained dirents, then the last block's used bytes."""
        blocks = 0
        used = BLOCK_SIZE
        previous = b""
        for name in names:
            if name == previous:
                raise self.error(f"two entries named {name!r} in one directory", self.path(node))
            previous = name
            need = _DIRENT_SIZE + len(name)
            if used + need > BLOCK_SIZE:
                blocks += 1
                used = 0
            used += need
        return (blocks - 1) * BLOCK_SIZE + used

    # -- pass 2: where each inode goes --------------------------------------------------

    def place(self) -> int:
        """Give every inode its nid and layout; return the end of the inode area (bytes).

        Each inode (with its xattrs and inline tail) is kept inside one block when it can
        be, which is what mkfs does; a directory or symlink tail is inlined when that
        wastes less than giving it a block of its own.
        """
        row_xattrs = self.t.xattrs
        ino_row, ino_flags, ino_ftype = self.ino_row, self.ino_flags, self.ino_ftype
        ino_size, ino_nid = self.ino_size, self.ino_nid
        pos = FIRST_NID * SLOT_SIZE
        for ino in range(self.inodes):
            flags = ino_flags[ino]
            fixed = _INODE_SIZE
            if not flags & _WHITEOUT and (flags & _OPAQUE or ino_row[ino] in row_xattrs):
                area = self.encode_xattrs(ino)
                if area:
                    self.xattr_areas[ino] = area
                    fixed += len(area)
            p = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            room = BLOCK_SIZE - (p & _BLOCK_MASK)
            ftype = ino_ftype[ino]
            tail = ino_size[ino] & _BLOCK_MASK if ftype in (FT_DIR, FT_SYMLINK) else 0
            inline = False
            if tail:
                need = fixed + tail
                if need <= room:
                    inline = True
                elif need <= BLOCK_SIZE and (fixed > room or room <= BLOCK_SIZE - tail):
                    p += room
                    inline = True
            if inline:
                ino_flags[ino] = flags | _INLINE
                pos = p + fixed + tail
            else:
                if room < fixed <= BLOCK_SIZE:
                    p += room
                pos = p + fixed
            ino_nid[ino] = p // SLOT_SIZE
        if ino_nid[0] > 0xFFFF:
            raise self.error("the root inode does not fit a 16-bit nid", "")
        return pos

    def encode_xattrs(self, ino: int) -> bytes:
        """The inline xattr area of an inode (empty when it has none)."""
        items: list[tuple[int, bytes, bytes]] = []
        node = self.ino_node[ino]
        opaque = self.ino_flags[ino] & _OPAQUE
        for name, value in self.t.xattrs.get(self.ino_row[ino], {}).items():
            if opaque and name == OPAQUE_XATTR:
                continue
            split = split_xattr_name(name)
            if split is None or (not split[1] and split[0] in (1, 4, 5, 6)):
                self.skipped_xattrs.append((self.path(node), name))
                continue
            index, suffix = split
            if len(suffix) > 255:
                raise self.error(f"xattr name {name!r} is too long", self.path(node))
            if len(value) > MAX_XATTR_VALUE:
                raise self.error(
                    f"xattr {name!r} value of {len(value)} bytes is too large", self.path(node)
                )
            items.append((index, suffix, bytes(value)))
        if opaque:
            items.append((4, b"overlay.opaque", b"y"))
        if not items:
            return b""
        items.sort()
        parts = [XATTR_IBODY_HEADER.pack(0, 0, b"")]
        for index, suffix, value in items:
            parts.append(XATTR_ENTRY.pack(len(suffix), index, len(value)))
            parts.append(suffix)
            parts.append(value)
            parts.append(bytes(-(XATTR_ENTRY.size + len(suffix) + len(value)) % 4))
        area = b"".join(parts)
        if xattr_icount(len(area)) > MAX_XATTR_ICOUNT:
            raise self.error(f"{len(area)} bytes of xattrs do not fit one inode", self.path(node))
        return area

    def place_content(self, first_block: int) -> int:
        """Give directories and symlinks that need whole blocks their blocks, right after
        the inode area; return the number of blocks in the metadata region."""
        block = first_block
        ino_ftype, ino_size, ino_flags = self.ino_ftype, self.ino_size, self.ino_flags
        ino_blkaddr = self.ino_blkaddr
        for ino in range(self.inodes):
            size = ino_size[ino]
            if ino_ftype[ino] not in (FT_DIR, FT_SYMLINK) or not size:
                continue
            if ino_flags[ino] & _INLINE:
                full = size >> BLOCK_SIZE_BITS
                ino_blkaddr[ino] = block if full else NULL_ADDR
            else:
                full = -(-size // BLOCK_SIZE)
                ino_blkaddr[ino] = block
            block += full
        return block

    def place_data(self, first_block: int) -> None:
        """One extent per emitted non-empty regular file, in blob order."""
        t = self.t
        types, sizes = t.types, t.sizes
        row_ino = self.row_ino
        ino_size, ino_blkaddr = self.ino_size, self.ino_blkaddr
        # Each non-empty regular file inode is placed once (hardlinks share it).
        pending = sum(
            1 for ino in range(self.inodes) if self.ino_ftype[ino] == FT_REG_FILE and ino_size[ino]
        )
        block = first_block
        for row in t.live_rows():
            if types[row] != REG or not sizes[row]:
                continue
            ino = row_ino[row]
            if ino < 0:
                continue  # hidden (landmark, whiteout)
            row_ino[row] = -1  # placed
            size = ino_size[ino]
            ino_blkaddr[ino] = block
            self.ext_start.append(block)
            self.ext_size.append(size)
            self.ext_row.append(row)
            pending -= 1
            block += (size + _BLOCK_MASK) >> BLOCK_SIZE_BITS
            if block > MAX_BLOCKS:
                raise self.error(
                    "the image's data does not fit 32-bit block addresses",
                    self.path(self.ino_node[ino]),
                )
        if pending:
            ino = next(
                i
                for i in range(self.inodes)
                if self.ino_ftype[i] == FT_REG_FILE
                and ino_size[i]
                and row_ino[self.ino_row[i]] >= 0
            )
            raise self.error(
                "a regular file of the tree is not among the TOC's entries",
                self.path(self.ino_node[ino]),
            )
        del self.row_ino

    def check_owners_and_times(self) -> None:
        """Refuse owners and times that the inodes cannot hold, before anything is written."""
        t = self.t
        uids, gids, mtimes = t.uids, t.gids, t.mtimes
        for ino, row in enumerate(self.ino_row):
            uid, gid = uids[row], gids[row]
            if not (0 <= uid <= _MAX_U32 and 0 <= gid <= _MAX_U32):
                raise self.error(
                    f"uid/gid {uid}/{gid} do not fit 32 bits", self.path(self.ino_node[ino])
                )
            mtime = mtimes[row]
            if mtime != NO_MODTIME and not _MIN_S64 <= mtime <= _MAX_S64:
                raise self.error(
                    f"modification time {mtime} out of range", self.path(self.ino_node[ino])
                )

    # -- pass 3: the bytes ---------------------------------------------------------------

    def dirent_names(self, k: int) -> list[bytes]:
        """The names of the k-th directory's dirents, in their (sorted) order."""
        t = self.t
        base_of = t.base_name_bytes
        ino_flags = self.ino_flags
        names = []
        lo, hi = self.dir_start[k], self.dir_start[k + 1]
        for j in range(lo, hi):
            node = self.dirent_node[j]
            if node == _DOT:
                names.append(b".")
            elif node == _DOTDOT:
                names.append(b"..")
            elif ino_flags[self.dirent_ino[j]] & _WHITEOUT:
                names.append(base_of(node)[len(_WHITEOUT_PREFIX_BYTES) :])
            else:
                names.append(base_of(node))
        return names

    def write_inodes(self, writer: _BlockWriter) -> None:
        """Pack every inode, its xattrs and its inline tail, in nid order."""
        t = self.t
        modes, uids, gids, mtimes = t.modes, t.uids, t.gids, t.mtimes
        ino_row, ino_ftype, ino_flags = self.ino_row, self.ino_ftype, self.ino_flags
        ino_size, ino_nid, ino_blkaddr, ino_nlink = (
            self.ino_size, self.ino_nid, self.ino_blkaddr, self.ino_nlink,
        )  # fmt: skip
        xattr_areas = self.xattr_areas
        pack_inode = INODE_EXTENDED.pack_into
        k = 0  # directories so far
        for ino in range(self.inodes):
            row = ino_row[ino]
            ftype = ino_ftype[ino]
            flags = ino_flags[ino]
            size = ino_size[ino]
            offset = ino_nid[ino] * SLOT_SIZE
            xattrs = xattr_areas.get(ino, b"")
            content = offset + _INODE_SIZE + len(xattrs)
            inline = flags & _INLINE
            tail = size & _BLOCK_MASK if inline else 0
            image, base = writer.at(offset, content + tail)
            if flags & _WHITEOUT:
                mode = stat.S_IFCHR
                i_u = 0
            else:
                mode = _MODE_TYPES[ftype] | (modes[row] & 0o7777)
                if ftype in (FT_CHRDEV, FT_BLKDEV):
                    i_u = encode_rdev(*t.devs.get(row, (0, 0)))
                else:
                    i_u = ino_blkaddr[ino]
            mtime = mtimes[row]
            pack_inode(
                image,
                offset - base,
                INODE_EXTENDED_FORMAT
                | ((LAYOUT_FLAT_INLINE if inline else LAYOUT_FLAT_PLAIN) << LAYOUT_SHIFT),
                xattr_icount(len(xattrs)),
                mode,
                0,
                size,
                i_u,
                ino + 1,
                uids[row],
                gids[row],
                0 if mtime == NO_MODTIME else mtime,
                0,
                ino_nlink[ino],
                b"",
            )
            if xattrs:
                at = offset + _INODE_SIZE - base
                image[at : at + len(xattrs)] = xattrs
            if ftype == FT_DIR:
                if tail:
                    self.encode_directory_block(
                        image,
                        content - base,
                        k,
                        size >> BLOCK_SIZE_BITS,
                        self.directory_plan(k),
                    )
                k += 1
            elif ftype == FT_SYMLINK and tail:
                image[content - base : content - base + size] = t.link_bytes(row)

    def write_content(self, writer: _BlockWriter) -> None:
        """Write the whole blocks of directories and symlinks, in block order."""
        t = self.t
        ino_ftype, ino_flags, ino_size, ino_row = (
            self.ino_ftype, self.ino_flags, self.ino_size, self.ino_row,
        )  # fmt: skip
        k = 0
        for ino in range(self.inodes):
            ftype = ino_ftype[ino]
            if ftype == FT_DIR:
                size = ino_size[ino]
                full = (
                    size >> BLOCK_SIZE_BITS if ino_flags[ino] & _INLINE else -(-size // BLOCK_SIZE)
                )
                if full:
                    plan = self.directory_plan(k)
                    blocks = bytearray(full * BLOCK_SIZE)
                    for j in range(full):
                        self.encode_directory_block(blocks, j * BLOCK_SIZE, k, j, plan)
                    writer.write(blocks)
                k += 1
            elif ftype == FT_SYMLINK and not ino_flags[ino] & _INLINE and ino_size[ino]:
                target = t.link_bytes(ino_row[ino])
                writer.write(target + bytes(BLOCK_SIZE - len(target)))

    def directory_plan(self, k: int) -> tuple[list[bytes], list[int]]:
        """The k-th directory's dirent names and the index where each block starts, as
        :meth:`directory_size` cut them."""
        names = self.dirent_names(k)
        starts = []
        used = BLOCK_SIZE
        for index, name in enumerate(names):
            need = _DIRENT_SIZE + len(name)
            if used + need > BLOCK_SIZE:
                starts.append(index)
                used = 0
            used += need
        starts.append(len(names))
        return names, starts

    def encode_directory_block(
        self, image: bytearray, at: int, k: int, j: int, plan: tuple[list[bytes], list[int]]
    ) -> None:
        """Write block ``j`` of the k-th directory at ``image[at:]``."""
        names, starts = plan
        lo = self.dir_start[k]
        a, b = starts[j], starts[j + 1]
        ino_nid, ino_ftype, dirent_ino = self.ino_nid, self.ino_ftype, self.dirent_ino
        pack_dirent = DIRENT.pack_into
        nameoff = (b - a) * _DIRENT_SIZE
        pos = at
        for index in range(a, b):
            child = dirent_ino[lo + index]
            pack_dirent(image, pos, ino_nid[child], nameoff, ino_ftype[child], 0)
            pos += _DIRENT_SIZE
            nameoff += len(names[index])
        image[pos : at + nameoff] = b"".join(names[a:b])


class _BlockWriter:
    """Writes the metadata region in order, holding only the blocks not yet complete.

    ``at(start, end)`` gives the buffer that holds image bytes ``[start, end)`` and the
    image offset of the buffer's first byte; blocks before ``start``'s are then final
    and may be written out. Block 0 is written last of its kind: its superblock's
    checksum covers the whole block, root inode included.
    """

    def __init__(self, out: BinaryIO, superblock: list[object]) -> None:
        self.out = out
        self.superblock = superblock
        self.buf = bytearray(BLOCK_SIZE)
        self.base = 0  # image offset of buf[0]
        self.block0 = True

    def at(self, start: int, end: int) -> tuple[bytearray, int]:
        flushable = (start & ~_BLOCK_MASK) - self.base
        if flushable >= _WRITE_PIECE:
            self.flush(flushable)
        need = -(-(end - self.base) // BLOCK_SIZE) * BLOCK_SIZE
        if need > len(self.buf):
            self.buf += bytes(need - len(self.buf))
        return self.buf, self.base

    def flush(self, count: int) -> None:
        """Write out the first ``count`` bytes (whole blocks) of the buffer."""
        if not count:
            return
        if self.block0:
            self.block0 = False
            sb = self.superblock
            SUPERBLOCK.pack_into(self.buf, SUPERBLOCK_OFFSET, *sb)
            # The checksum covers the rest of block 0 (root inode included): computed last.
            sb[1] = superblock_checksum(memoryview(self.buf)[:BLOCK_SIZE])
            SUPERBLOCK.pack_into(self.buf, SUPERBLOCK_OFFSET, *sb)
        with memoryview(self.buf) as view:
            self.out.write(view[:count])
        del self.buf[:count]
        self.base += count

    def pad_to(self, offset: int) -> None:
        """Zeros up to image offset ``offset`` (block-aligned), then write all of it."""
        if offset > self.base + len(self.buf):
            self.buf += bytes(offset - self.base - len(self.buf))
        self.flush(len(self.buf))

    def write(self, data: bytes | bytearray) -> None:
        """Whole blocks at the current end of the region."""
        self.flush(len(self.buf))
        self.out.write(data)
        self.base += len(data)

    def finish(self) -> None:
        self.flush(len(self.buf))
