"""The EROFS on-disk structures and constants an uncompressed image writer needs.

Every structure is one ``struct.Struct`` (little-endian) with its size and field offsets in
a comment, and a ``NamedTuple`` of the same field order for reading it back. Names follow
erofs-utils 1.5 / Linux <= 6.14 headers.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

BLOCK_SIZE_BITS = 12
BLOCK_SIZE = 1 << BLOCK_SIZE_BITS

MAGIC = 0xE0F5E1E2
SUPERBLOCK_OFFSET = 1024
# Inodes live in 32-byte slots; with meta_blkaddr 0 the slots up to the end of the
# superblock (1024 + 128 = 36 * 32) are taken, so the first inode has nid 36.
SLOT_SIZE = 32
FIRST_NID = 36

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2

# i_format: bit 0 = extended inode, bits 1-3 = data layout.
INODE_EXTENDED_FORMAT = 0x1
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_SHIFT = 1

# raw_blkaddr of a FLAT_INLINE inode whose whole content is inline (as mkfs 1.5 writes).
NULL_ADDR = 0xFFFFFFFF
# Block addresses are 32 bits, and NULL_ADDR is reserved.
MAX_BLOCKS = 0xFFFFFFFF

# Directory entry file types.
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

MAX_NAME_LEN = 255

# Superblock, 128 bytes at byte 1024 of the image:
#   0 magic u32           4 checksum u32        8 feature_compat u32   12 blkszbits u8
#  13 sb_extslots u8     14 root_nid u16       16 inos u64            24 build_time u64
#  32 build_time_nsec u32 36 blocks u32        40 meta_blkaddr u32    44 xattr_blkaddr u32
#  48 uuid [16]          64 volume_name [16]   80 feature_incompat u32
#  84 available_compr_algs u16                 86 extra_devices u16   88 devt_slotoff u16
#  90 reserved [38]
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHH38s")
# Byte offset of the checksum field inside the superblock.
SUPERBLOCK_CHECKSUM_OFFSET = 4


class Superblock(NamedTuple):
    """The fields of ``SUPERBLOCK`` in order."""

    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    sb_extslots: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_incompat: int
    available_compr_algs: int
    extra_devices: int
    devt_slotoff: int
    reserved2: bytes


# Compact inode, 32 bytes:
#   0 i_format u16   2 i_xattr_icount u16   4 i_mode u16   6 i_nlink u16   8 i_size u32
#  12 i_reserved u32 16 i_u u32 (raw_blkaddr / rdev)      20 i_ino u32
#  24 i_uid u16     26 i_gid u16           28 i_reserved2 u32
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")


class CompactInode(NamedTuple):
    """The fields of ``INODE_COMPACT`` in order."""

    i_format: int
    i_xattr_icount: int
    i_mode: int
    i_nlink: int
    i_size: int
    i_reserved: int
    i_u: int
    i_ino: int
    i_uid: int
    i_gid: int
    i_reserved2: int


# Extended inode, 64 bytes:
#   0 i_format u16   2 i_xattr_icount u16   4 i_mode u16   6 i_reserved u16
#   8 i_size u64    16 i_u u32 (raw_blkaddr / rdev)      20 i_ino u32
#  24 i_uid u32     28 i_gid u32           32 i_mtime s64  40 i_mtime_nsec u32
#  44 i_nlink u32   48 i_reserved2 [16]
# i_mtime is packed signed: the kernel reads it into a time64_t, so times before 1970
# round-trip as two's complement.
INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16s")


class ExtendedInode(NamedTuple):
    """The fields of ``INODE_EXTENDED`` in order."""

    i_format: int
    i_xattr_icount: int
    i_mode: int
    i_reserved: int
    i_size: int
    i_u: int
    i_ino: int
    i_uid: int
    i_gid: int
    i_mtime: int
    i_mtime_nsec: int
    i_nlink: int
    i_reserved2: bytes


# Directory entry, 12 bytes; names follow the entry array inside the same block:
#   0 nid u64   8 nameoff u16   10 file_type u8   11 reserved u8
DIRENT = struct.Struct("<QHBB")


class Dirent(NamedTuple):
    """The fields of ``DIRENT`` in order."""

    nid: int
    nameoff: int
    file_type: int
    reserved: int


# Inline xattr area header, 12 bytes (followed by 4 * h_shared_count shared ids, none here):
#   0 h_name_filter u32   4 h_shared_count u8   5 reserved [7]
XATTR_IBODY_HEADER = struct.Struct("<IB7s")

# Xattr entry, 4 bytes, then the name suffix and the value, padded to 4 bytes:
#   0 e_name_len u8   1 e_name_index u8   2 e_value_size u16
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_ENTRY_ALIGN = 4
MAX_XATTR_VALUE = 0xFFFF
MAX_XATTR_ICOUNT = 0xFFFF

# Short xattr name prefixes: (prefix, index, whole name). A whole-name prefix stores an
# empty suffix and matches only the exact name.
XATTR_PREFIXES: tuple[tuple[str, int, bool], ...] = (
    ("user.", 1, False),
    ("system.posix_acl_access", 2, True),
    ("system.posix_acl_default", 3, True),
    ("trusted.", 4, False),
    ("lustre.", 5, False),
    ("security.", 6, False),
)


def split_xattr_name(name: str) -> tuple[int, bytes] | None:
    """The (name index, stored suffix) of an xattr name, or None if EROFS cannot store it."""
    for prefix, index, whole in XATTR_PREFIXES:
        if whole:
            if name == prefix:
                return index, b""
        elif name.startswith(prefix):
            return index, name[len(prefix) :].encode("utf-8", "surrogateescape")
    return None


def xattr_icount(area_size: int) -> int:
    """``i_xattr_icount`` for an inline xattr area of ``area_size`` bytes (0 for none)."""
    if area_size == 0:
        return 0
    return 1 + (area_size - XATTR_IBODY_HEADER.size) // 4


def xattr_area_size(icount: int) -> int:
    """Bytes of the inline xattr area that ``i_xattr_icount`` describes."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's "new" 32-bit device number encoding, as stored in ``i_u``."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(rdev: int) -> tuple[int, int]:
    """(major, minor) of a ``i_u`` device number."""
    return (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


# Largest major and minor that fit the 32-bit encoding (12 and 20 bits).
MAX_DEV_MAJOR = 0xFFF
MAX_DEV_MINOR = 0xFFFFF


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c_raw(data: bytes | bytearray | memoryview, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C (Castagnoli, reflected) as the kernel's ``crc32c(crc, data)``: no final inversion.

    The standard CRC-32C of ``data`` is ``crc32c_raw(data) ^ 0xFFFFFFFF``.
    """
    table = _CRC32C_TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def superblock_checksum(block0: bytes | bytearray | memoryview) -> int:
    """The superblock ``checksum`` of an image whose first block is ``block0``.

    It covers bytes [1024, block size) with the checksum field taken as zero.
    """
    if len(block0) < BLOCK_SIZE:
        raise ValueError(f"need the whole first block ({BLOCK_SIZE} bytes), got {len(block0)}")
    data = bytearray(block0[SUPERBLOCK_OFFSET:BLOCK_SIZE])
    data[SUPERBLOCK_CHECKSUM_OFFSET : SUPERBLOCK_CHECKSUM_OFFSET + 4] = bytes(4)
    return crc32c_raw(data)
