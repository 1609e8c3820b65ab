"""Images built by blockfs.erofs, checked by erofs-utils and mounted by the real kernel."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_testkit import (
    ImageReader,
    assert_tree_matches_tar,
    directory,
    entries_from_tar,
    fsck,
    kernel_can_mount_erofs,
    mounted,
    reg,
    run,
    tar_contents,
    write_image,
)

from blockfs.erofs import ErofsIndex
from blockfs.erofs import _format as fmt
from blockfs.estargz import NO_PREFETCH_LANDMARK, Entry, make_toc
from blockfs.estargz._model import LANDMARK_CONTENT
from tests.helpers.testdata import LAYER_TAR

_why_not = kernel_can_mount_erofs()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]


# -- the layer.tar image ------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ErofsIndex]:
    """layer.tar as one EROFS image, with a root landmark added as eStargz writers do."""
    contents = tar_contents(LAYER_TAR)
    contents[NO_PREFETCH_LANDMARK] = LANDMARK_CONTENT
    landmark = Entry(name=NO_PREFETCH_LANDMARK, type="reg", size=1)
    toc = make_toc([landmark, *entries_from_tar(LAYER_TAR)])
    path = tmp_path_factory.mktemp("layer") / "layer.erofs"
    index = write_image(toc, path, contents.__getitem__, build_time=1700000000)
    return path, index


@pytest.fixture(scope="module")
def layer_mount(
    layer_image: tuple[Path, ErofsIndex], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with mounted(layer_image[0], tmp_path_factory.mktemp("layer-mnt")) as mnt:
        yield mnt


def test_fsck_erofs_accepts_the_layer_image(layer_image: tuple[Path, ErofsIndex]) -> None:
    fsck(layer_image[0])


def test_fsck_check_catches_a_corrupted_directory_entry(
    layer_image: tuple[Path, ErofsIndex], tmp_path: Path
) -> None:
    data = bytearray(layer_image[0].read_bytes())
    reader = ImageReader(bytes(data))
    root = reader.inode(36)
    first_child = 36 * 32 + 64 + fmt.xattr_area_size(root.i_xattr_icount) + 2 * fmt.DIRENT.size
    _, nameoff, file_type, _ = fmt.DIRENT.unpack_from(data, first_child)
    fmt.DIRENT.pack_into(data, first_child, 99999, nameoff, file_type, 0)
    sb = list(fmt.SUPERBLOCK.unpack_from(data, fmt.SUPERBLOCK_OFFSET))
    sb[1] = fmt.superblock_checksum(data[: fmt.BLOCK_SIZE])
    fmt.SUPERBLOCK.pack_into(data, fmt.SUPERBLOCK_OFFSET, *sb)
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(data)
    with pytest.raises(AssertionError, match="nid 99999"):
        fsck(bad)


def test_dump_erofs_reports_the_inode_and_block_counts(
    layer_image: tuple[Path, ErofsIndex],
) -> None:
    path, index = layer_image
    out = run("dump.erofs", "-s", str(path))
    assert f"Filesystem inode count:                       {index.inodes}\n" in out
    assert f"Filesystem blocks:                            {index.total_blocks}\n" in out
    assert "Filesystem root nid:                          36\n" in out


def test_superblock_inode_count_is_the_number_of_inodes_in_the_tree(
    layer_image: tuple[Path, ErofsIndex], layer_mount: Path
) -> None:
    inodes = {os.lstat(layer_mount).st_ino}
    for dirpath, dirnames, filenames in os.walk(layer_mount):
        inodes.update(os.lstat(os.path.join(dirpath, n)).st_ino for n in dirnames + filenames)
    assert len(inodes) == layer_image[1].inodes
    # statfs reports the superblock's block count: metadata and data regions together.
    assert os.statvfs(layer_mount).f_blocks == layer_image[1].total_blocks


def test_mounted_layer_matches_layer_tar_entry_by_entry(layer_mount: Path) -> None:
    assert_tree_matches_tar(layer_mount, LAYER_TAR)


def test_hardlinks_share_an_inode_with_the_right_link_count(layer_mount: Path) -> None:
    tool = os.lstat(layer_mount / "bin/tool")
    link = os.lstat(layer_mount / "bin/tool-hardlink")
    assert tool.st_ino == link.st_ino
    assert tool.st_nlink == 2
    assert stat.S_IMODE(link.st_mode) == 0o755  # the target's mode, not the link header's


def test_whiteout_is_a_0_0_character_device(layer_mount: Path) -> None:
    st = os.lstat(layer_mount / "etc/removed.conf")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
    assert not (layer_mount / "etc/.wh.removed.conf").exists()


def test_opaque_directory_carries_the_overlay_xattr(layer_mount: Path) -> None:
    assert os.getxattr(layer_mount / "opaque", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(layer_mount / "opaque")) == ["kept"]


def test_landmark_is_hidden_and_implicit_directory_present(layer_mount: Path) -> None:
    assert NO_PREFETCH_LANDMARK not in os.listdir(layer_mount)
    assert not (layer_mount / NO_PREFETCH_LANDMARK).exists()
    var = os.lstat(layer_mount / "var")
    assert stat.S_ISDIR(var.st_mode) and stat.S_IMODE(var.st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(layer_mount / "var/tmp").st_mode) == 0o1777


def test_xattrs_read_back_through_the_kernel(layer_mount: Path) -> None:
    assert os.getxattr(layer_mount / "usr/share/doc", "user.comment") == b"docs dir"
    caps = os.getxattr(layer_mount / "usr/share/doc/caps", "security.capability")
    assert caps[:4] == b"\x01\x00\x00\x02"


# -- overlayfs stacking ------------------------------------------------------------------


@contextlib.contextmanager
def overlay(lowers: list[Path], merged: Path) -> Iterator[Path]:
    merged.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(merged))
    try:
        yield merged
    finally:
        run("umount", str(merged))


def test_overlay_whiteout_hides_lower_file_and_opaque_dir_hides_lower_contents(
    layer_mount: Path, tmp_path: Path
) -> None:
    lower_files = {
        "etc/removed.conf": b"old config\n",
        "etc/lower-only.conf": b"still here\n",
        "opaque/old-file": b"gone\n",
        "opaque/kept": b"lower kept\n",
    }
    toc = make_toc(
        [directory("etc"), directory("opaque")]
        + [reg(name, len(data)) for name, data in lower_files.items()]
    )
    lower_image = tmp_path / "lower.erofs"
    write_image(toc, lower_image, lower_files.__getitem__)
    with (
        mounted(lower_image, tmp_path / "lower") as lower,
        overlay([layer_mount, lower], tmp_path / "merged") as merged,
    ):
        assert (lower / "etc/removed.conf").read_bytes() == b"old config\n"
        assert not (merged / "etc/removed.conf").exists()
        assert "removed.conf" not in os.listdir(merged / "etc")
        assert (merged / "etc/lower-only.conf").read_bytes() == b"still here\n"
        assert (merged / "etc/passwd").exists()
        assert sorted(os.listdir(merged / "opaque")) == ["kept"]
        assert (merged / "opaque/kept").read_bytes() == (layer_mount / "opaque/kept").read_bytes()
        assert not (merged / "opaque/old-file").exists()


# -- an image that stresses the layout ----------------------------------------------------

MANY = [
    *(f"n{i}" for i in range(2500)),  # "n1" < "n10" < "n100": every prefix case
    *(f"{c}name" for c in " !#+-.=@_~"),
    "\u00e9t\u00e9",
    "\u4e2d\u6587",
    "x" * 255,
    "x" * 254,
]
# 15 names of 255 bytes and one of 52 make a directory of exactly one full block.
EXACT = [f"{i:02d}" + "e" * 253 for i in range(15)] + ["f" * 52]
LONG_TARGET = "/" + "/".join(["segment"] * 374) + "/end"  # about 3000 bytes
MANY_XATTRS = {f"user.attr-{i:03d}": f"value {i}".encode() * (i % 5 + 1) for i in range(60)}
HUGE_XATTRS = {f"user.big-{i:02d}": bytes([65 + i]) * 400 for i in range(20)}
BIG_TRUSTED = {f"trusted.pad-{i}": b"p" * 220 for i in range(5)}
HUGE_SIZE = (5 << 30) + 3


@pytest.fixture(scope="module")
def stress_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ErofsIndex, bytes]:
    contents = {f"many/{n}": n.encode() for n in MANY}
    entries = [directory("many"), *(reg(f"many/{n}", len(n.encode())) for n in MANY)]
    entries += [directory("exact"), *(reg(f"exact/{n}") for n in EXACT)]
    entries += [
        reg("xattrs/many", 3, xattrs=MANY_XATTRS),
        reg("xattrs/huge", 3, xattrs=HUGE_XATTRS),
        Entry(
            name="links/long", type="symlink", mode=0o777, link_name=LONG_TARGET, xattrs=BIG_TRUSTED
        ),
        Entry(name="links/short", type="symlink", mode=0o777, link_name="../xattrs/many"),
        reg("old", 4, modtime=-365 * 86400, uid=100000, gid=4000000000),
        reg("huge.bin", HUGE_SIZE),
    ]
    entries += [directory(f"dirs/d{i:03d}") for i in range(200)]
    entries += [reg(f"dirs/d{i:03d}/{'n' * 60}{j}") for i in range(200) for j in range(i % 9)]
    contents |= {"xattrs/many": b"abc", "xattrs/huge": b"xyz", "old": b"1969"}
    path = tmp_path_factory.mktemp("stress") / "stress.erofs"
    index = write_image(make_toc(entries), path, contents.get)
    # The 5 GiB file stays sparse: only its last bytes are written.
    (huge,) = [e for e in index.extents if e.entry_name == "huge.bin"]
    with open(path, "r+b") as f:
        f.seek(huge.start_block * index.block_size + HUGE_SIZE - 3)
        f.write(b"END")
    with open(path, "rb") as f:
        meta = f.read(index.meta_size)
    return path, index, meta


@pytest.fixture(scope="module")
def stress_mount(
    stress_image: tuple[Path, ErofsIndex, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with mounted(stress_image[0], tmp_path_factory.mktemp("stress-mnt")) as mnt:
        yield mnt


def test_erofs_utils_accept_the_stress_image(stress_image: tuple[Path, ErofsIndex, bytes]) -> None:
    path, index, _ = stress_image
    fsck(path)
    out = run("dump.erofs", "-s", str(path))
    assert f"Filesystem inode count:                       {index.inodes}\n" in out


def test_every_name_of_a_multi_block_directory_is_found_by_lookup(
    stress_mount: Path, stress_image: tuple[Path, ErofsIndex, bytes]
) -> None:
    reader = ImageReader(stress_image[2])
    many = reader.lookup("many")
    assert reader.inode(many).i_size > 8 * 4096  # many blocks, each searched by the kernel
    assert sorted(os.listdir(stress_mount / "many")) == sorted(MANY)
    for name in MANY:
        # A lookup by exact name goes through the kernel's binary search over blocks and
        # names, so it only succeeds if the on-disk order is the kernel's order.
        path = stress_mount / "many" / name
        assert os.lstat(path).st_size == len(name.encode()), name
    for name in ("n0", "n1", "n10", "n100", "n1000", "n2499", "x" * 255, "\u4e2d\u6587"):
        assert (stress_mount / "many" / name).read_bytes() == name.encode()
    assert not (stress_mount / "many" / "n2500").exists()
    assert not (stress_mount / "many" / "n").exists()


def test_directory_of_exactly_one_block_lists_and_looks_up(stress_mount: Path) -> None:
    assert sorted(os.listdir(stress_mount / "exact")) == sorted(EXACT)
    for name in EXACT:
        assert os.lstat(stress_mount / "exact" / name).st_size == 0


def test_small_directories_inline_or_not_all_list_their_entries(stress_mount: Path) -> None:
    for i in range(200):
        names = sorted(os.listdir(stress_mount / f"dirs/d{i:03d}"))
        assert names == sorted(f"{'n' * 60}{j}" for j in range(i % 9))
        for name in names:
            assert os.lstat(stress_mount / f"dirs/d{i:03d}" / name).st_size == 0


def test_long_symlink_and_short_symlink_read_back(
    stress_mount: Path, stress_image: tuple[Path, ErofsIndex, bytes]
) -> None:
    assert len(LONG_TARGET) > 2900
    assert os.readlink(stress_mount / "links/long") == LONG_TARGET
    assert os.readlink(stress_mount / "links/short") == "../xattrs/many"
    assert (stress_mount / "links/short").read_bytes() == b"abc"
    assert os.getxattr(stress_mount / "links/long", "trusted.pad-4", follow_symlinks=False) == (
        b"p" * 220
    )


def test_many_xattrs_and_xattrs_spanning_blocks_read_back(stress_mount: Path) -> None:
    for path, want in (("xattrs/many", MANY_XATTRS), ("xattrs/huge", HUGE_XATTRS)):
        full = stress_mount / path
        assert sorted(os.listxattr(full)) == sorted(want)
        for name, value in want.items():
            assert os.getxattr(full, name) == value
    assert (stress_mount / "xattrs/huge").read_bytes() == b"xyz"


def test_file_over_4_gib_has_its_full_size_and_data_at_the_end(stress_mount: Path) -> None:
    path = stress_mount / "huge.bin"
    assert os.lstat(path).st_size == HUGE_SIZE
    with open(path, "rb") as f:
        f.seek(HUGE_SIZE - 4096)
        tail = f.read()
    assert tail == bytes(4093) + b"END"


def test_old_mtime_and_wide_owners_survive_the_kernel(stress_mount: Path) -> None:
    st = os.lstat(stress_mount / "old")
    assert int(st.st_mtime) == -365 * 86400
    assert (st.st_uid, st.st_gid) == (100000, 4000000000)


# -- the reference eStargz blobs ---------------------------------------------------------

REFERENCE_BLOBS = [
    "gzip-64k.esgz",
    "gzip-default.esgz",
    "gzip-prio.esgz",
    "zstd-64k.esgz",
    "legacy-64k.stargz",
]


@pytest.mark.parametrize("blob", REFERENCE_BLOBS)
def test_image_of_reference_blob_toc_mounts_as_layer_tar(blob: str, tmp_path: Path) -> None:
    from blockfs.estargz import BlobReader, FileBlobSource

    testdata = LAYER_TAR.parent
    toc_digest = json.loads((testdata / f"{blob}.build.json").read_text())["tocDigest"]
    reader = BlobReader.open(FileBlobSource(testdata / blob), toc_digest=toc_digest)
    toc = reader.toc
    contents = tar_contents(LAYER_TAR)
    image = tmp_path / "blob.erofs"
    index = write_image(toc, image, contents.__getitem__)
    assert [e.entry_name for e in index.extents] == [
        e.name for e in toc.regular_files() if not e.name.endswith("landmark")
    ]
    if blob == "gzip-prio.esgz":
        # The prioritised files come first in the blob, so their data is contiguous.
        first = [e.entry_name for e in index.extents[:3]]
        assert first == ["bin/tool", "etc/passwd", "usr/share/doc/README"]
    fsck(image)
    with mounted(image, tmp_path / "mnt") as mnt:
        assert_tree_matches_tar(mnt, LAYER_TAR)
