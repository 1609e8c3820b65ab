"""Lay a TOC out as an EROFS image: the metadata region bytes and the map of file extents.

The image is ``[metadata region][data region]``. The metadata region (superblock, inodes,
inline xattrs, directories, symlink targets) is built here from the TOC alone. The data
region is virtual: every non-empty regular file owns one block-aligned run of blocks,
in blob order, that the block image fills lazily from the file's chunks.
"""

from __future__ import annotations

import bisect
import stat
from collections.abc import Mapping, Sequence
from typing import BinaryIO

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
from blockfs.estargz import LANDMARKS, TOC, Entry

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

_FILE_TYPES: Mapping[str, int] = {
    "reg": FT_REG_FILE,
    "dir": FT_DIR,
    "symlink": FT_SYMLINK,
    "char": FT_CHRDEV,
    "block": FT_BLKDEV,
    "fifo": FT_FIFO,
}
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


def _check_extents(instance: ErofsIndex, attribute: attrs.Attribute[object], value: object) -> None:
    previous_end = instance.meta_blocks
    for extent in instance.extents:
        if extent.size <= 0 or extent.start_block < previous_end:
            raise ValueError(f"extent {extent!r} is empty, overlaps or is out of order")
        previous_end = extent.start_block + ((extent.size + _BLOCK_MASK) >> BLOCK_SIZE_BITS)
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
    extents: tuple[Extent, ...] = attrs.field(validator=_check_extents)
    skipped_xattrs: tuple[tuple[str, str], ...] = ()
    _starts: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(e.start_block for e in self.extents))

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
        i = bisect.bisect_right(self._starts, block) - 1
        if i < 0:
            return None
        extent = self.extents[i]
        return extent if block < extent.end_block else None


class _Inode:
    """One inode being laid out (mutable scratch state, private to this module)."""

    __slots__ = (
        "blkaddr",
        "dirents",
        "entry",
        "ftype",
        "layout",
        "nid",
        "nlink",
        "opaque",
        "path",
        "rdev",
        "size",
        "splits",
        "target",
        "whiteout",
        "xattrs",
    )

    def __init__(self, entry: Entry, path: str, ftype: int, whiteout: bool = False) -> None:
        self.entry = entry
        self.path = path
        self.ftype = ftype
        self.whiteout = whiteout
        self.nlink = 0
        self.size = 0
        self.rdev = 0
        self.opaque = False
        # Set for directories only; the shared empty tuples keep other inodes cheap.
        self.dirents: Sequence[tuple[bytes, int]] = ()
        self.splits: Sequence[int] = ()
        self.target = b""
        self.xattrs = b""
        self.nid = 0
        self.layout = LAYOUT_FLAT_PLAIN
        self.blkaddr = 0


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

    ``out`` receives ``meta_blocks`` whole blocks in one write. ``layer`` only names the
    layer in errors. Raises ErofsLayoutError (before writing anything) if the TOC cannot be
    represented.
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
    image, index = layout.build(build_time=build_time, uuid=uuid, label=label)
    out.write(image)
    return index


class _Layout:
    """The three passes of one build: collect the tree, place inodes, encode bytes."""

    def __init__(self, toc: TOC, layer: str | None) -> None:
        self.toc = toc
        self.layer = layer
        self.inodes: list[_Inode] = []
        self.skipped_xattrs: list[tuple[str, str]] = []

    def error(self, message: str, path: str | None = None) -> ErofsLayoutError:
        return ErofsLayoutError(message, entry=path, layer=self.layer)

    def build(self, *, build_time: int, uuid: bytes, label: bytes) -> tuple[bytearray, ErofsIndex]:
        self.collect()
        inode_end = self.place()
        meta_blocks = self.place_content(-(-inode_end // BLOCK_SIZE))
        extents = self.place_data(meta_blocks)
        total_blocks = extents[-1].end_block if extents else meta_blocks
        if total_blocks > MAX_BLOCKS:
            raise self.error(
                f"the image needs {total_blocks} blocks, more than 32-bit block addresses reach"
            )
        if len(self.inodes) > _MAX_U32:
            raise self.error(f"{len(self.inodes)} inodes do not fit 32-bit inode numbers")
        image = bytearray(meta_blocks * BLOCK_SIZE)
        self.encode(image)
        root_nid = self.inodes[0].nid
        sb = [
            MAGIC,
            0,
            FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME,
            BLOCK_SIZE_BITS,
            0,
            root_nid,
            len(self.inodes),
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
        SUPERBLOCK.pack_into(image, SUPERBLOCK_OFFSET, *sb)
        # The checksum covers the rest of block 0 (root inode included): computed last.
        sb[1] = superblock_checksum(memoryview(image)[:BLOCK_SIZE])
        SUPERBLOCK.pack_into(image, SUPERBLOCK_OFFSET, *sb)
        index = ErofsIndex(
            block_size=BLOCK_SIZE,
            meta_blocks=meta_blocks,
            total_blocks=total_blocks,
            inodes=len(self.inodes),
            extents=tuple(extents),
            skipped_xattrs=tuple(self.skipped_xattrs),
        )
        return image, index

    # -- pass 1: the tree as the filesystem shows it ----------------------------------

    def collect(self) -> None:
        """Walk the TOC from the root, resolving whiteouts, landmarks and hardlinks.

        Inodes are numbered in breadth-first order, so the root comes first and the
        children of a directory sit together.
        """
        nodes = self.toc.nodes
        children = self.toc.children
        root = nodes.get("")
        if root is None or root.type != "dir":
            raise self.error("the TOC has no root directory", "")
        inodes = self.inodes
        inodes.append(self.new_inode(root, ""))
        index_of: dict[str, int] = {root.name: 0}
        queue: list[tuple[str, int, int]] = [("", 0, 0)]
        q = 0
        while q < len(queue):
            path, me, parent = queue[q]
            q += 1
            dirents: list[tuple[bytes, int]] = [(b".", me), (b"..", parent)]
            subdirs = 0
            kids = children.get(path, ())
            kid_set: frozenset[str] | None = None
            for base in kids:
                child_path = f"{path}/{base}" if path else base
                if base.startswith(WHITEOUT_PREFIX):
                    if base == OPAQUE_MARKER:
                        inodes[me].opaque = True
                        continue
                    if base.startswith(WHITEOUT_META_PREFIX):
                        continue
                    hidden = base[len(WHITEOUT_PREFIX) :]
                    if kid_set is None:
                        kid_set = frozenset(kids)
                    if hidden in kid_set:
                        # A whiteout only hides lower layers; this layer's own NAME already
                        # does that in an overlay, and one name cannot be both.
                        continue
                    entry = self.node(child_path)
                    if entry.type == "dir":
                        raise self.error("a whiteout must not be a directory", child_path)
                    inode = _Inode(entry, child_path, FT_CHRDEV, whiteout=True)
                    inode.nlink = 1
                    dirents.append((self.encode_name(hidden, child_path), len(inodes)))
                    inodes.append(inode)
                    continue
                if not path and base in LANDMARKS:
                    continue
                entry = self.node(child_path)
                key = entry.name
                child = index_of.get(key)
                if child is None:
                    if key != child_path:
                        self.check_link_target(entry, child_path)
                    child = len(inodes)
                    index_of[key] = child
                    inodes.append(self.new_inode(entry, child_path))
                    if entry.type == "dir":
                        queue.append((child_path, child, me))
                        subdirs += 1
                elif inodes[child].ftype == FT_DIR:
                    raise self.error("a directory is reachable under two names", child_path)
                inodes[child].nlink += 1
                dirents.append((self.encode_name(base, child_path), child))
            dirents.sort()
            inode = inodes[me]
            inode.nlink = 2 + subdirs
            inode.dirents = dirents
            self.split_directory(inode)

    def node(self, path: str) -> Entry:
        try:
            return self.toc.nodes[path]
        except KeyError:
            raise self.error("listed as a child but missing from the TOC's nodes", path) from None

    def check_link_target(self, entry: Entry, path: str) -> None:
        if entry.type == "dir":
            raise self.error(f"hardlink to the directory {entry.name!r}", path)
        base = entry.name.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            raise self.error(f"hardlink to the whiteout {entry.name!r}", path)

    def new_inode(self, entry: Entry, path: str) -> _Inode:
        ftype = _FILE_TYPES.get(entry.type)
        if ftype is None:
            raise self.error(f"unresolved entry of type {entry.type!r}", path)
        inode = _Inode(entry, path, ftype)
        if ftype == FT_REG_FILE:
            if entry.size < 0:
                raise self.error(f"negative size {entry.size}", path)
            inode.size = entry.size
        elif ftype == FT_SYMLINK:
            target = entry.link_name.encode("utf-8", "surrogateescape")
            if len(target) > _MAX_SYMLINK:
                raise self.error(
                    f"symlink target of {len(target)} bytes is longer than {_MAX_SYMLINK}", path
                )
            inode.target = target
            inode.size = len(target)
        elif ftype in (FT_CHRDEV, FT_BLKDEV):
            major, minor = entry.dev_major, entry.dev_minor
            if not (0 <= major <= MAX_DEV_MAJOR and 0 <= minor <= MAX_DEV_MINOR):
                raise self.error(f"device number {major}:{minor} does not fit 32 bits", path)
            inode.rdev = encode_rdev(major, minor)
        return inode

    def encode_name(self, name: str, path: str) -> bytes:
        raw = name.encode("utf-8", "surrogateescape")
        if (
            not raw
            or len(raw) > MAX_NAME_LEN
            or raw in (b".", b"..")
            or b"/" in raw
            or b"\0" in raw
        ):
            raise self.error(f"invalid file name ({len(raw)} bytes; at most {MAX_NAME_LEN})", path)
        return raw

    def split_directory(self, inode: _Inode) -> None:
        """Cut the sorted dirents into self-contained blocks; set the directory's size."""
        splits: list[int] = []
        used = BLOCK_SIZE
        previous = b""
        for k, (name, _) in enumerate(inode.dirents):
            if name == previous:
                raise self.error(f"two entries named {name!r} in one directory", inode.path)
            previous = name
            need = _DIRENT_SIZE + len(name)
            if used + need > BLOCK_SIZE:
                splits.append(k)
                used = 0
            used += need
        inode.splits = splits
        inode.size = (len(splits) - 1) * BLOCK_SIZE + used

    # -- pass 2: where each inode goes --------------------------------------------------

    def place(self) -> int:
        """Give every inode its nid and layout; return the end of the inode area (bytes).

        Each inode (with its xattrs and inline tail) is kept inside one block when it can
        be, which is what mkfs does; a directory or symlink tail is inlined when that
        wastes less than giving it a block of its own.
        """
        pos = FIRST_NID * SLOT_SIZE
        for inode in self.inodes:
            if not inode.whiteout and (inode.opaque or inode.entry.xattrs):
                inode.xattrs = self.encode_xattrs(inode)
            fixed = _INODE_SIZE + len(inode.xattrs)
            p = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            room = BLOCK_SIZE - (p & _BLOCK_MASK)
            tail = inode.size & _BLOCK_MASK if inode.ftype in (FT_DIR, FT_SYMLINK) else 0
            inline = False
            if tail:
                need = fixed + tail
                if need <= room:
                    inline = True
                elif need <= BLOCK_SIZE and (fixed > room or room <= BLOCK_SIZE - tail):
                    p += room
                    inline = True
            if inline:
                inode.layout = LAYOUT_FLAT_INLINE
                pos = p + fixed + tail
            else:
                if room < fixed <= BLOCK_SIZE:
                    p += room
                pos = p + fixed
            inode.nid = p // SLOT_SIZE
        if self.inodes[0].nid > 0xFFFF:
            raise self.error("the root inode does not fit a 16-bit nid", "")
        return pos

    def encode_xattrs(self, inode: _Inode) -> bytes:
        """The inline xattr area of an inode (empty when it has none)."""
        items: list[tuple[int, bytes, bytes]] = []
        path = inode.path
        for name, value in inode.entry.xattrs.items():
            if inode.opaque and name == OPAQUE_XATTR:
                continue
            split = split_xattr_name(name)
            if split is None or (not split[1] and split[0] in (1, 4, 5, 6)):
                self.skipped_xattrs.append((path, name))
                continue
            index, suffix = split
            if len(suffix) > 255:
                raise self.error(f"xattr name {name!r} is too long", path)
            if len(value) > MAX_XATTR_VALUE:
                raise self.error(f"xattr {name!r} value of {len(value)} bytes is too large", path)
            items.append((index, suffix, bytes(value)))
        if inode.opaque:
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
            raise self.error(f"{len(area)} bytes of xattrs do not fit one inode", path)
        return area

    def place_content(self, first_block: int) -> int:
        """Give directories and symlinks that need whole blocks their blocks, right after
        the inode area; return the number of blocks in the metadata region."""
        block = first_block
        for inode in self.inodes:
            if inode.ftype not in (FT_DIR, FT_SYMLINK) or not inode.size:
                continue
            if inode.layout == LAYOUT_FLAT_INLINE:
                full = inode.size >> BLOCK_SIZE_BITS
                inode.blkaddr = block if full else NULL_ADDR
            else:
                full = -(-inode.size // BLOCK_SIZE)
                inode.blkaddr = block
            block += full
        return block

    def place_data(self, first_block: int) -> list[Extent]:
        """One extent per emitted non-empty regular file, in blob order."""
        by_name = {
            inode.entry.name: inode
            for inode in self.inodes
            if inode.ftype == FT_REG_FILE and inode.size and not inode.whiteout
        }
        extents: list[Extent] = []
        block = first_block
        for entry in self.toc.regular_files():
            inode = by_name.pop(entry.name, None)
            if inode is None:
                continue  # hidden (landmark, whiteout) or listed twice
            inode.blkaddr = block
            extents.append(Extent(block, inode.size, entry.name))
            block += (inode.size + _BLOCK_MASK) >> BLOCK_SIZE_BITS
            if block > MAX_BLOCKS:
                raise self.error("the image's data does not fit 32-bit block addresses", inode.path)
        if by_name:
            name = next(iter(by_name))
            raise self.error("a regular file of the tree is not among the TOC's entries", name)
        return extents

    # -- pass 3: the bytes ---------------------------------------------------------------

    def encode(self, image: bytearray) -> None:
        """Pack every inode, its xattrs, directory blocks and symlink targets into ``image``."""
        inodes = self.inodes
        nids = [inode.nid for inode in inodes]
        ftypes = [inode.ftype for inode in inodes]
        pack_inode = INODE_EXTENDED.pack_into
        for ino, inode in enumerate(inodes, start=1):
            entry = inode.entry
            ftype = inode.ftype
            offset = inode.nid * SLOT_SIZE
            xattrs = inode.xattrs
            if inode.whiteout:
                mode = stat.S_IFCHR
                i_u = 0
            else:
                mode = _MODE_TYPES[ftype] | (entry.mode & 0o7777)
                i_u = inode.rdev if ftype in (FT_CHRDEV, FT_BLKDEV) else inode.blkaddr
            mtime = entry.modtime or 0
            uid, gid = entry.uid, entry.gid
            if not (0 <= uid <= _MAX_U32 and 0 <= gid <= _MAX_U32):
                raise self.error(f"uid/gid {uid}/{gid} do not fit 32 bits", inode.path)
            if not _MIN_S64 <= mtime <= _MAX_S64:
                raise self.error(f"modification time {mtime} out of range", inode.path)
            pack_inode(
                image,
                offset,
                INODE_EXTENDED_FORMAT | (inode.layout << LAYOUT_SHIFT),
                xattr_icount(len(xattrs)),
                mode,
                0,
                inode.size,
                i_u,
                ino,
                uid,
                gid,
                mtime,
                0,
                inode.nlink,
                b"",
            )
            content = offset + _INODE_SIZE
            if xattrs:
                image[content : content + len(xattrs)] = xattrs
                content += len(xattrs)
            if ftype == FT_DIR:
                self.encode_directory(image, inode, content, nids, ftypes)
            elif ftype == FT_SYMLINK and inode.size:
                start = (
                    content if inode.layout == LAYOUT_FLAT_INLINE else inode.blkaddr * BLOCK_SIZE
                )
                image[start : start + inode.size] = inode.target

    @staticmethod
    def encode_directory(
        image: bytearray, inode: _Inode, tail_offset: int, nids: list[int], ftypes: list[int]
    ) -> None:
        dirents = inode.dirents
        splits = inode.splits
        full = inode.size >> BLOCK_SIZE_BITS
        inline = inode.layout == LAYOUT_FLAT_INLINE
        pack_dirent = DIRENT.pack_into
        ends = [*splits[1:], len(dirents)]
        for j, (a, b) in enumerate(zip(splits, ends, strict=True)):
            base = tail_offset if inline and j == full else (inode.blkaddr + j) * BLOCK_SIZE
            nameoff = (b - a) * _DIRENT_SIZE
            at = base
            names = dirents[a:b]
            for name, child in names:
                pack_dirent(image, at, nids[child], nameoff, ftypes[child], 0)
                at += _DIRENT_SIZE
                nameoff += len(name)
            image[at : base + nameoff] = b"".join([name for name, _ in names])
