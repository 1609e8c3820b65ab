"""The on-disk structures and encodings of blockfs.erofs._format, against known values."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from blockfs.erofs import _format as fmt


def test_crc32c_gives_the_standard_check_value_once_inverted() -> None:
    # The CRC-32C check value of "123456789" is 0xE3069283; the kernel form does not invert.
    assert fmt.crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert fmt.crc32c_raw(b"") == 0xFFFFFFFF


@pytest.fixture(scope="module")
def mkfs_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs (erofs-utils) is not installed")
    base = tmp_path_factory.mktemp("mkfs")
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "dir" / "a").write_text("a")
    image = base / "img"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T", "1700000000", str(image), str(src)],
        check=True,
        capture_output=True,
    )
    return image.read_bytes()


def test_superblock_checksum_equals_the_one_mkfs_erofs_stored(mkfs_image: bytes) -> None:
    sb = fmt.Superblock._make(fmt.SUPERBLOCK.unpack_from(mkfs_image, fmt.SUPERBLOCK_OFFSET))
    assert sb.feature_compat & fmt.FEATURE_COMPAT_SB_CHKSUM
    assert fmt.superblock_checksum(mkfs_image[: fmt.BLOCK_SIZE]) == sb.checksum


def test_superblock_checksum_changes_when_a_covered_byte_changes(mkfs_image: bytes) -> None:
    block0 = bytearray(mkfs_image[: fmt.BLOCK_SIZE])
    before = fmt.superblock_checksum(block0)
    block0[4000] ^= 1
    assert fmt.superblock_checksum(block0) != before
    # The boot area before the superblock is not covered.
    block0[4000] ^= 1
    block0[10] ^= 1
    assert fmt.superblock_checksum(block0) == before


def test_superblock_fields_sit_where_mkfs_erofs_puts_them(mkfs_image: bytes) -> None:
    sb = fmt.Superblock._make(fmt.SUPERBLOCK.unpack_from(mkfs_image, fmt.SUPERBLOCK_OFFSET))
    assert sb.magic == fmt.MAGIC
    assert mkfs_image[1024:1028] == b"\xe2\xe1\xf5\xe0"
    assert sb.blkszbits == 12
    assert sb.root_nid == fmt.FIRST_NID
    assert sb.build_time == 1700000000
    assert sb.feature_compat == fmt.FEATURE_COMPAT_SB_CHKSUM | fmt.FEATURE_COMPAT_MTIME
    assert sb.feature_incompat == 0
    assert sb.meta_blkaddr == 0
    assert sb.inos == 4  # root, dir, dir/a, hello.txt
    assert sb.blocks * fmt.BLOCK_SIZE == len(mkfs_image)


def test_mkfs_root_inode_reads_through_the_compact_inode_struct(mkfs_image: bytes) -> None:
    root = fmt.CompactInode._make(fmt.INODE_COMPACT.unpack_from(mkfs_image, fmt.FIRST_NID * 32))
    assert root.i_format & 1 == 0  # mkfs used a compact inode
    assert root.i_mode & 0o170000 == 0o040000
    assert root.i_nlink == 3  # ".", "dir/..", and its own ".."


def test_struct_sizes_match_the_format() -> None:
    assert fmt.SUPERBLOCK.size == 128
    assert fmt.INODE_COMPACT.size == 32
    assert fmt.INODE_EXTENDED.size == 64
    assert fmt.DIRENT.size == 12
    assert fmt.XATTR_IBODY_HEADER.size == 12
    assert fmt.XATTR_ENTRY.size == 4
    assert fmt.SUPERBLOCK_OFFSET + fmt.SUPERBLOCK.size == fmt.FIRST_NID * fmt.SLOT_SIZE


def test_extended_inode_packs_each_field_at_its_offset() -> None:
    ino = fmt.ExtendedInode(
        i_format=0x0005,
        i_xattr_icount=6,
        i_mode=0o100644,
        i_reserved=0,
        i_size=(5 << 30) + 7,
        i_u=0x01020304,
        i_ino=0x0A0B0C0D,
        i_uid=100000,
        i_gid=200000,
        i_mtime=-86400,
        i_mtime_nsec=0,
        i_nlink=3,
        i_reserved2=bytes(16),
    )
    raw = fmt.INODE_EXTENDED.pack(*ino)
    assert fmt.ExtendedInode._make(fmt.INODE_EXTENDED.unpack(raw)) == ino
    assert raw[0:2] == b"\x05\x00"
    assert int.from_bytes(raw[8:16], "little") == (5 << 30) + 7
    assert raw[16:20] == b"\x04\x03\x02\x01"
    assert int.from_bytes(raw[24:28], "little") == 100000
    assert int.from_bytes(raw[32:40], "little", signed=True) == -86400
    assert int.from_bytes(raw[44:48], "little") == 3


def test_dirent_packs_nid_nameoff_and_type() -> None:
    raw = fmt.DIRENT.pack(36, 24, fmt.FT_DIR, 0)
    assert raw == (36).to_bytes(8, "little") + b"\x18\x00\x02\x00"
    assert fmt.Dirent._make(fmt.DIRENT.unpack(raw)) == fmt.Dirent(36, 24, fmt.FT_DIR, 0)


@pytest.mark.parametrize(
    ("major", "minor", "rdev"),
    [
        (1, 3, 0x103),
        (8, 0, 0x800),
        (0, 0, 0),
        (0xABC, 0x12345, 0x123ABC45),
        (4095, 0xFFFFF, 0xFFFFFFFF),
    ],
)
def test_rdev_uses_the_kernels_new_encoding(major: int, minor: int, rdev: int) -> None:
    assert fmt.encode_rdev(major, minor) == rdev
    assert fmt.decode_rdev(rdev) == (major, minor)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("user.foo", (1, b"foo")),
        ("system.posix_acl_access", (2, b"")),
        ("system.posix_acl_default", (3, b"")),
        ("trusted.overlay.opaque", (4, b"overlay.opaque")),
        ("lustre.lov", (5, b"lov")),
        ("security.capability", (6, b"capability")),
        ("system.posix_acl_accessX", None),
        ("system.nfs4_acl", None),
        ("btrfs.compression", None),
        ("userfoo", None),
    ],
)
def test_xattr_names_map_to_short_prefix_indexes(
    name: str, split: tuple[int, bytes] | None
) -> None:
    assert fmt.split_xattr_name(name) == split


def test_xattr_icount_and_area_size_are_inverse() -> None:
    assert fmt.xattr_icount(0) == 0
    assert fmt.xattr_icount(12 + 12) == 4  # user.foo=bar
    assert fmt.xattr_icount(12 + 20) == 6  # trusted.overlay.opaque=y
    for icount in (0, 1, 4, 6, 1000):
        assert fmt.xattr_icount(fmt.xattr_area_size(icount)) == icount
