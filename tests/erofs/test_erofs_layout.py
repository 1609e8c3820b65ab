"""build_index: the metadata region and extent map it lays out, read back byte by byte."""

from __future__ import annotations

import io
import stat

import pytest
from erofs_testkit import build, directory, reg

from blockfs.erofs import BLOCK_SIZE, ErofsIndex, ErofsLayoutError, Extent, build_index
from blockfs.erofs import _format as fmt
from blockfs.estargz import Entry, make_toc


def names_of(reader_dirents: list[tuple[bytes, int, int]]) -> list[bytes]:
    return [name for name, _, _ in reader_dirents]


def test_superblock_describes_the_image() -> None:
    uuid = bytes(range(16))
    r, index = build(
        [directory("etc"), reg("etc/passwd", 10)],
        build_time=1700000000,
        uuid=uuid,
        volume_name="layer",
    )
    sb = r.sb
    assert sb.magic == fmt.MAGIC
    assert sb.checksum == fmt.superblock_checksum(r.data[:BLOCK_SIZE])
    assert sb.feature_compat == fmt.FEATURE_COMPAT_SB_CHKSUM | fmt.FEATURE_COMPAT_MTIME
    assert sb.feature_incompat == 0
    assert sb.blkszbits == 12
    assert sb.root_nid == 36
    assert sb.inos == index.inodes == 3
    assert sb.build_time == 1700000000
    assert sb.blocks == index.total_blocks == index.meta_blocks + 1
    assert sb.meta_blkaddr == 0
    assert sb.uuid == uuid
    assert sb.volume_name == b"layer" + bytes(11)
    assert index.image_size == index.total_blocks * 4096


def test_root_dot_and_dotdot_are_the_root() -> None:
    r, _ = build([reg("a", 1)])
    ents = {name: nid for name, nid, _ in r.dirents(36)}
    assert ents[b"."] == ents[b".."] == 36
    assert r.inode(36).i_mode == stat.S_IFDIR | 0o755


def test_dirents_are_sorted_by_bytes_with_dot_entries_and_prefixes() -> None:
    names = ["b", "ab", "a", "a.b", "-x", "+", " sp", "\u00e9", "A", "a-"]
    r, _ = build([reg(n) for n in names])
    got = names_of(r.dirents(36))
    expected = sorted([b".", b"..", *(n.encode() for n in names)])
    assert got == expected
    # Names below "." sort before the dot entries.
    assert got[:5] == [b" sp", b"+", b"-x", b".", b".."]


def test_large_directory_spans_self_contained_blocks() -> None:
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(3000)]
    r, index = build([directory("big"), *(reg(f"big/{n}") for n in names)])
    big = r.lookup("big")
    ino = r.inode(big)
    assert ino.i_size > 10 * BLOCK_SIZE
    # Directory blocks live in the metadata region, never in the data region.
    assert ino.i_u + ino.i_size // BLOCK_SIZE <= index.meta_blocks
    got = names_of(r.dirents(big))
    assert got == sorted([b".", b"..", *(n.encode() for n in names)])
    assert r.inode(big).i_nlink == 2


def test_regular_files_get_block_aligned_extents_in_blob_order() -> None:
    sizes = {"z-first": 1, "b": 4096, "empty": 0, "a": 4097, "m": 10000}
    r, index = build([reg(n, s) for n, s in sizes.items()])
    assert [e.entry_name for e in index.extents] == ["z-first", "b", "a", "m"]
    block = index.meta_blocks
    for extent in index.extents:
        assert extent.start_block == block
        assert extent.size == sizes[extent.entry_name]
        block += -(-extent.size // BLOCK_SIZE)
        ino = r.inode(r.lookup(extent.entry_name))
        assert (ino.i_format >> 1) & 7 == fmt.LAYOUT_FLAT_PLAIN
        assert ino.i_u == extent.start_block
        assert ino.i_size == extent.size
    assert index.total_blocks == block
    empty = r.inode(r.lookup("empty"))
    assert (empty.i_size, empty.i_u, (empty.i_format >> 1) & 7) == (0, 0, fmt.LAYOUT_FLAT_PLAIN)


def test_extent_at_finds_the_file_of_each_block_and_nothing_elsewhere() -> None:
    _, index = build([reg("a", 5000), reg("b", 1), reg("c", 8192)])
    m = index.meta_blocks
    assert index.extent_at(0) is None
    assert index.extent_at(m - 1) is None
    assert index.extent_at(m) == index.extent_at(m + 1) == Extent(m, 5000, "a")
    assert index.extent_at(m + 2) == Extent(m + 2, 1, "b")
    assert index.extent_at(m + 3) == index.extent_at(m + 4) == Extent(m + 3, 8192, "c")
    assert index.extent_at(m + 5) is None
    assert index.extent_at(10**9) is None


def test_index_refuses_overlapping_extents() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        ErofsIndex(
            block_size=4096,
            meta_blocks=1,
            total_blocks=10,
            inodes=3,
            extents=(Extent(1, 8192, "a"), Extent(2, 1, "b")),
        )


def test_hardlinks_share_one_inode_and_one_extent() -> None:
    r, index = build(
        [
            reg("bin/tool", 100, mode=0o755),
            Entry(name="bin/tool-link", type="hardlink", link_name="bin/tool"),
            Entry(name="usr/tool", type="hardlink", link_name="bin/tool"),
        ]
    )
    nid = r.lookup("bin/tool")
    assert r.lookup("bin/tool-link") == r.lookup("usr/tool") == nid
    assert r.inode(nid).i_nlink == 3
    assert [e.entry_name for e in index.extents] == ["bin/tool"]
    assert index.inodes == 4  # root, bin, usr and the one file


def test_directory_link_count_is_two_plus_subdirectories() -> None:
    r, _ = build([directory("a"), directory("a/b"), directory("a/c"), reg("a/f"), reg("x/y")])
    assert r.inode(r.lookup("a")).i_nlink == 4
    assert r.inode(r.lookup("a/b")).i_nlink == 2
    assert r.inode(36).i_nlink == 4  # a and the implicit x


def test_whiteout_becomes_a_0_0_character_device_under_the_hidden_name() -> None:
    r, index = build([directory("etc"), reg("etc/.wh.removed.conf", mode=0o644, uid=5)])
    ents = {name: (nid, ft) for name, nid, ft in r.dirents(r.lookup("etc"))}
    assert b".wh.removed.conf" not in ents
    nid, ft = ents[b"removed.conf"]
    assert ft == fmt.FT_CHRDEV
    ino = r.inode(nid)
    assert ino.i_mode == stat.S_IFCHR
    assert (ino.i_u, ino.i_size, ino.i_nlink) == (0, 0, 1)
    assert index.extents == ()


def test_opaque_marker_becomes_the_overlay_opaque_xattr_and_is_not_listed() -> None:
    r, _ = build(
        [
            directory("opaque", xattrs={"user.a": b"1"}),
            reg("opaque/.wh..wh..opq"),
            reg("opaque/kept", 5),
        ]
    )
    nid = r.lookup("opaque")
    assert names_of(r.dirents(nid)) == [b".", b"..", b"kept"]
    assert r.xattrs(nid) == {"trusted.overlay.opaque": b"y", "user.a": b"1"}


def test_opaque_xattr_is_stored_as_the_reference_bytes() -> None:
    r, _ = build([directory("d"), reg("d/.wh..wh..opq")])
    nid = r.lookup("d")
    assert r.inode(nid).i_xattr_icount == 6
    at = nid * 32 + 64 + 12
    assert r.data[at : at + 20] == b"\x0e\x04\x01\x00overlay.opaquey\x00"


def test_user_xattr_is_stored_as_the_reference_bytes() -> None:
    r, _ = build([reg("f", xattrs={"user.foo": b"bar"})])
    nid = r.lookup("f")
    assert r.inode(nid).i_xattr_icount == 4
    at = nid * 32 + 64 + 12
    assert r.data[at : at + 12] == b"\x03\x01\x03\x00foobar\x00\x00"


def test_landmarks_at_the_root_are_hidden_and_get_no_extent() -> None:
    r, index = build(
        [reg("bin/tool", 10), reg(".prefetch.landmark", 1), reg("usr/.no.prefetch.landmark", 1)]
    )
    assert b".prefetch.landmark" not in names_of(r.dirents(36))
    # Only the root's landmarks are markers; elsewhere the name is an ordinary file.
    assert [e.entry_name for e in index.extents] == ["bin/tool", "usr/.no.prefetch.landmark"]


def test_unsupported_xattr_names_are_skipped_and_reported() -> None:
    r, index = build([reg("f", xattrs={"user.ok": b"1", "system.nfs4_acl": b"x", "btrfs.c": b"z"})])
    assert r.xattrs(r.lookup("f")) == {"user.ok": b"1"}
    assert sorted(index.skipped_xattrs) == [("f", "btrfs.c"), ("f", "system.nfs4_acl")]


def test_posix_acl_xattrs_use_whole_name_indexes() -> None:
    acl = b"\x02\x00\x00\x00\x01\x00\x06\x00\xff\xff\xff\xff"
    r, _ = build([directory("d", xattrs={"system.posix_acl_default": acl})])
    assert r.xattrs(r.lookup("d")) == {"system.posix_acl_default": acl}


def test_xattrs_larger_than_a_block_are_stored_whole() -> None:
    xattrs = {f"user.k{i:02d}": bytes([i]) * 300 for i in range(30)}
    r, _ = build([reg("a", 1), reg("f", 1, xattrs=xattrs), reg("g", 1)])
    assert r.xattrs(r.lookup("f")) == xattrs
    assert r.inode(r.lookup("g")).i_size == 1


def test_short_symlink_is_inline_after_its_inode() -> None:
    r, _ = build([Entry(name="bin/sh", type="symlink", mode=0o777, link_name="tool")])
    nid = r.lookup("bin/sh")
    assert r.layout(nid) == fmt.LAYOUT_FLAT_INLINE
    assert r.inode(nid).i_u == fmt.NULL_ADDR
    assert r.content(nid) == b"tool"


def test_long_symlink_that_cannot_share_a_block_gets_its_own_metadata_block() -> None:
    target = "/" + "t" * 2999
    big_xattrs = {f"user.k{i}": b"v" * 200 for i in range(5)}
    r, index = build(
        [
            reg("a", 1, xattrs=big_xattrs),
            Entry(name="link", type="symlink", mode=0o777, link_name=target, xattrs=big_xattrs),
        ]
    )
    nid = r.lookup("link")
    assert r.layout(nid) == fmt.LAYOUT_FLAT_PLAIN
    assert r.inode(nid).i_u < index.meta_blocks
    assert r.content(nid) == target.encode()


def test_directory_tail_is_inline_unless_it_would_cross_a_block() -> None:
    entries = [directory(f"d{i:03d}") for i in range(200)]
    entries += [reg(f"d{i:03d}/{'n' * 60}{j}") for i in range(200) for j in range(i % 7)]
    r, _ = build(entries)
    layouts = set()
    for i in range(200):
        nid = r.lookup(f"d{i:03d}")
        layouts.add(r.layout(nid))
        assert len(r.dirents(nid)) == 2 + i % 7  # content() checks the tail stays in its block
    assert fmt.LAYOUT_FLAT_INLINE in layouts


def test_directory_of_exactly_one_block_is_flat_plain_without_a_tail() -> None:
    # "." and ".." take 27 bytes; 15 names of 255 bytes and one of 52 fill the rest.
    names = [f"{i:02d}" + "e" * 253 for i in range(15)] + ["f" * 52]
    r, index = build([directory("exact"), *(reg(f"exact/{n}") for n in names)])
    nid = r.lookup("exact")
    assert r.inode(nid).i_size == BLOCK_SIZE
    assert r.layout(nid) == fmt.LAYOUT_FLAT_PLAIN
    assert r.inode(nid).i_u < index.meta_blocks
    assert len(r.dirents(nid)) == 18


def test_directory_with_full_blocks_and_a_tail_keeps_the_tail_inline() -> None:
    names = [f"{i:02d}" + "e" * 253 for i in range(16)]
    r, _ = build([directory("d"), *(reg(f"d/{n}") for n in names)])
    nid = r.lookup("d")
    assert BLOCK_SIZE < r.inode(nid).i_size < 2 * BLOCK_SIZE
    assert r.layout(nid) == fmt.LAYOUT_FLAT_INLINE
    assert names_of(r.dirents(nid))[-1] == names[-1].encode()


def test_file_larger_than_4_gib_keeps_its_64_bit_size() -> None:
    size = (5 << 30) + 123
    r, index = build([reg("huge", size)])
    assert r.inode(r.lookup("huge")).i_size == size
    (extent,) = index.extents
    assert extent.blocks == -(-size // BLOCK_SIZE)


def test_times_and_owners_are_stored_in_full() -> None:
    r, _ = build([reg("old", modtime=-86400, uid=100000, gid=4000000000), reg("none")])
    old = r.inode(r.lookup("old"))
    assert (old.i_mtime, old.i_uid, old.i_gid) == (-86400, 100000, 4000000000)
    assert r.inode(r.lookup("none")).i_mtime == 0


def test_devices_and_fifos_encode_their_type_and_number() -> None:
    r, _ = build(
        [
            Entry(name="dev/null", type="char", mode=0o666, dev_major=1, dev_minor=3),
            Entry(name="dev/sda", type="block", mode=0o660, dev_major=8, dev_minor=0),
            Entry(name="dev/fifo", type="fifo", mode=0o660),
        ]
    )
    types = {name: ft for name, _, ft in r.dirents(r.lookup("dev"))}
    assert types[b"null"] == fmt.FT_CHRDEV
    assert types[b"sda"] == fmt.FT_BLKDEV
    assert types[b"fifo"] == fmt.FT_FIFO
    null = r.inode(r.lookup("dev/null"))
    assert (null.i_mode, null.i_u) == (stat.S_IFCHR | 0o666, 0x103)
    assert r.inode(r.lookup("dev/sda")).i_u == 0x800
    assert r.inode(r.lookup("dev/fifo")).i_mode == stat.S_IFIFO | 0o660


def test_same_toc_gives_identical_bytes() -> None:
    entries = [directory("a"), reg("a/x", 10, xattrs={"user.b": b"2", "user.a": b"1"}), reg("b", 3)]
    one, two = io.BytesIO(), io.BytesIO()
    assert build_index(make_toc(entries), one) == build_index(make_toc(entries), two)
    assert one.getvalue() == two.getvalue()


# -- refusals ---------------------------------------------------------------------------


def refuse(entries: list[Entry], match: str) -> ErofsLayoutError:
    out = io.BytesIO()
    with pytest.raises(ErofsLayoutError, match=match) as info:
        build_index(make_toc(entries), out, layer="sha256:abc")
    assert out.getvalue() == b"", "nothing may be written when the layout fails"
    assert "sha256:abc" in str(info.value)
    return info.value


def test_whiteout_of_a_name_present_in_the_same_layer_yields_to_the_file() -> None:
    # OCI: a whiteout applies to lower layers only; the layer's own file stays visible.
    r, index = build([reg("etc/conf", 1), reg("etc/.wh.conf")])
    ents = {name: (nid, ft) for name, nid, ft in r.dirents(r.lookup("etc"))}
    assert b".wh.conf" not in ents
    assert ents[b"conf"][1] == fmt.FT_REG_FILE
    assert len(index.extents) == 1


def test_name_longer_than_255_bytes_is_refused() -> None:
    refuse([reg("d/" + "\u00e9" * 128)], "invalid file name")


def test_image_beyond_32_bit_block_addresses_is_refused() -> None:
    refuse([reg("a", 1 << 44), reg("b", 1)], "32-bit block addresses")


def test_device_number_beyond_32_bits_is_refused() -> None:
    refuse([Entry(name="dev/x", type="char", dev_major=4096)], "device number")


def test_symlink_target_longer_than_path_max_is_refused() -> None:
    refuse([Entry(name="l", type="symlink", link_name="x" * 4096)], "symlink target")


def test_hardlink_to_a_whiteout_is_refused() -> None:
    refuse(
        [reg("etc/.wh.gone"), Entry(name="etc/other", type="hardlink", link_name="etc/.wh.gone")],
        "hardlink to the whiteout",
    )


def test_whiteout_that_is_a_directory_is_refused() -> None:
    refuse([directory("etc/.wh.sub"), reg("etc/.wh.sub/f")], "whiteout must not be a directory")


def test_owner_beyond_32_bits_is_refused() -> None:
    refuse([reg("f", uid=1 << 32)], "uid/gid")


def test_xattr_value_beyond_64_kib_is_refused() -> None:
    refuse([reg("f", xattrs={"user.big": bytes(70000)})], "too large")


def test_bad_uuid_and_volume_name_are_value_errors() -> None:
    toc = make_toc([reg("a")])
    with pytest.raises(ValueError, match="uuid"):
        build_index(toc, io.BytesIO(), uuid=b"short")
    with pytest.raises(ValueError, match="volume name"):
        build_index(toc, io.BytesIO(), volume_name="x" * 16)
