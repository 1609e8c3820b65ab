"""Helpers of the EROFS tests: TOCs from tars and entry lists, full images, kernel mounts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from blockfs.erofs import ErofsIndex, build_index
from blockfs.erofs import _format as fmt
from blockfs.estargz import TOC, Entry, make_toc

_TAR_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def entries_from_tar(path: Path) -> list[Entry]:
    """The tar's members as normalised TOC entries, in tar order."""
    entries = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            kind = _TAR_TYPES[m.type]
            entries.append(
                Entry(
                    name=m.name.rstrip("/"),
                    type=kind,  # type: ignore[arg-type]
                    mode=m.mode & 0o7777,
                    uid=m.uid,
                    gid=m.gid,
                    size=m.size if kind == "reg" else 0,
                    modtime=int(m.mtime),
                    link_name=m.linkname.rstrip("/"),
                    dev_major=m.devmajor,
                    dev_minor=m.devminor,
                    xattrs=tar_xattrs(m),
                )
            )
    return entries


def tar_contents(path: Path) -> dict[str, bytes]:
    """name -> bytes of every regular file in the tar."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


def write_image(
    toc: TOC, path: Path, content: Callable[[str], bytes | None], **kwargs: object
) -> ErofsIndex:
    """Build the index of ``toc`` and write the whole image: the metadata region, then each
    extent filled with ``content(entry_name)`` (None leaves it as zeros), zero-padded."""
    meta = io.BytesIO()
    index = build_index(toc, meta, **kwargs)  # type: ignore[arg-type]
    assert len(meta.getvalue()) == index.meta_size
    with open(path, "wb") as f:
        f.write(meta.getvalue())
        for extent in index.extents:
            data = content(extent.entry_name)
            if data is None:
                continue
            assert len(data) == extent.size, extent
            f.seek(extent.start_block * index.block_size)
            f.write(data)
        f.truncate(index.image_size)
    return index


def run(*argv: str) -> str:
    """Run a command, returning stdout; fail with its output if it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def fsck(image: Path) -> None:
    """Run fsck.erofs on ``image``; fail on any error it reports.

    fsck.erofs 1.5 exits 0 even when it finds corruption, so its messages are what count.
    """
    proc = subprocess.run(["fsck.erofs", "-d3", str(image)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "<E>" in out or "No errors found" not in out:
        raise AssertionError(f"fsck.erofs rejected {image}:\n{out}")


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount ``image`` read-only through a loop device; always unmount and detach."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    loop = run("losetup", "-r", "-f", "--show", str(image)).strip()
    try:
        run("mount", "-t", "erofs", "-o", "ro", loop, str(mountpoint))
        try:
            yield mountpoint
        finally:
            run("umount", str(mountpoint))
    finally:
        run("losetup", "-d", loop)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listxattrs(path: str) -> Mapping[str, bytes]:
    """All xattrs of ``path`` (not following symlinks)."""
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


class ImageReader:
    """An independent, strict reader of the metadata we write: enough EROFS to check layout.

    It asserts the on-disk rules the kernel relies on (self-contained dirent blocks, sorted
    names, inline tails inside one block) while it reads.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sb = fmt.Superblock._make(fmt.SUPERBLOCK.unpack_from(data, fmt.SUPERBLOCK_OFFSET))
        assert self.sb.magic == fmt.MAGIC

    def inode(self, nid: int) -> fmt.ExtendedInode:
        raw = fmt.ExtendedInode._make(fmt.INODE_EXTENDED.unpack_from(self.data, nid * 32))
        assert raw.i_format & 1, f"nid {nid} is not an extended inode"
        return raw

    def layout(self, nid: int) -> int:
        return (self.inode(nid).i_format >> 1) & 7

    def xattrs(self, nid: int) -> dict[str, bytes]:
        ino = self.inode(nid)
        size = fmt.xattr_area_size(ino.i_xattr_icount)
        if not size:
            return {}
        start = nid * 32 + fmt.INODE_EXTENDED.size
        _, shared, _ = fmt.XATTR_IBODY_HEADER.unpack_from(self.data, start)
        assert shared == 0
        prefixes = {index: prefix for prefix, index, _ in fmt.XATTR_PREFIXES}
        pos, end, out = start + fmt.XATTR_IBODY_HEADER.size, start + size, {}
        while pos < end:
            name_len, index, value_size = fmt.XATTR_ENTRY.unpack_from(self.data, pos)
            pos += fmt.XATTR_ENTRY.size
            suffix = self.data[pos : pos + name_len].decode()
            value = self.data[pos + name_len : pos + name_len + value_size]
            out[prefixes[index] + suffix] = value
            pos += -(-(name_len + value_size + 4) // 4) * 4 - 4
        assert pos == end
        return out

    def content(self, nid: int) -> bytes:
        """The bytes of a directory or symlink (which live in the metadata region)."""
        ino = self.inode(nid)
        layout = (ino.i_format >> 1) & 7
        size = ino.i_size
        if layout == fmt.LAYOUT_FLAT_PLAIN:
            start = ino.i_u * fmt.BLOCK_SIZE
            return self.data[start : start + size]
        assert layout == fmt.LAYOUT_FLAT_INLINE
        full = size // fmt.BLOCK_SIZE
        tail = size % fmt.BLOCK_SIZE
        head = (
            self.data[ino.i_u * fmt.BLOCK_SIZE : (ino.i_u + full) * fmt.BLOCK_SIZE] if full else b""
        )
        if full == 0:
            assert ino.i_u == fmt.NULL_ADDR
        at = nid * 32 + fmt.INODE_EXTENDED.size + fmt.xattr_area_size(ino.i_xattr_icount)
        assert at % fmt.BLOCK_SIZE + tail <= fmt.BLOCK_SIZE, "inline tail crosses a block"
        return head + self.data[at : at + tail]

    def dirents(self, nid: int) -> list[tuple[bytes, int, int]]:
        """(name, nid, file_type) of a directory, checking each block stands alone."""
        content = self.content(nid)
        out: list[tuple[bytes, int, int]] = []
        for block_start in range(0, len(content), fmt.BLOCK_SIZE):
            block = content[block_start : block_start + fmt.BLOCK_SIZE]
            first = fmt.Dirent._make(fmt.DIRENT.unpack_from(block, 0))
            count = first.nameoff // 12
            assert 12 <= first.nameoff < fmt.BLOCK_SIZE and first.nameoff % 12 == 0
            ents = [fmt.Dirent._make(fmt.DIRENT.unpack_from(block, 12 * i)) for i in range(count)]
            for i, d in enumerate(ents):
                end = ents[i + 1].nameoff if i + 1 < count else len(block)
                name = block[d.nameoff : end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                out.append((name, d.nid, d.file_type))
        names = [n for n, _, _ in out]
        assert names == sorted(names), "dirents are not in byte order"
        assert len(set(names)) == len(names)
        return out

    def lookup(self, path: str) -> int:
        nid: int = self.sb.root_nid
        for part in filter(None, path.split("/")):
            matches = [n for name, n, _ in self.dirents(nid) if name == part.encode()]
            assert matches, f"{path}: no {part!r}"
            nid = matches[0]
        return nid


def build(entries: Sequence[Entry], **kwargs: object) -> tuple[ImageReader, ErofsIndex]:
    """Lay out ``entries`` (through make_toc) and read the metadata region back."""
    meta = io.BytesIO()
    index = build_index(make_toc(entries), meta, **kwargs)  # type: ignore[arg-type]
    data = meta.getvalue()
    assert len(data) == index.meta_blocks * index.block_size
    return ImageReader(data), index


def reg(name: str, size: int = 0, **kwargs: object) -> Entry:
    kwargs.setdefault("mode", 0o644)
    return Entry(name=name, type="reg", size=size, **kwargs)  # type: ignore[arg-type]


def directory(name: str, **kwargs: object) -> Entry:
    kwargs.setdefault("mode", 0o755)
    return Entry(name=name, type="dir", **kwargs)  # type: ignore[arg-type]


def kernel_can_mount_erofs() -> str | None:
    """Why the kernel tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root"
    with open("/proc/filesystems") as f:
        kinds = f.read().split()
    if "erofs" not in kinds:
        subprocess.run(["modprobe", "erofs"], capture_output=True)
        with open("/proc/filesystems") as f:
            kinds = f.read().split()
    if "erofs" not in kinds:
        return "the kernel has no EROFS"
    if not Path("/dev/loop-control").exists():
        return "no loop devices"
    return None


def tar_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    return {
        k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
        for k, v in m.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }


def _join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


def assert_tree_matches_tar(root: Path, tar_path: Path) -> None:
    """Compare a mounted layer with its source tar entry by entry (whiteouts converted,
    opaque markers as xattrs, implicit parents present, nothing else in the tree)."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        data = {m.name: f.read() for m in members if m.isreg() and (f := tar.extractfile(m))}
    by_name = {m.name.rstrip("/"): m for m in members}
    expected: set[str] = set()
    opaque: set[str] = set()
    implicit: set[str] = set()
    names_of_inode: dict[str, int] = {}
    for m in members:
        name = m.name.rstrip("/")
        parent, _, base = name.rpartition("/")
        p = parent
        while p:
            expected.add(p)
            if p not in by_name:
                implicit.add(p)
            p = p.rpartition("/")[0]
        if base == ".wh..wh..opq":
            opaque.add(parent)
        elif base.startswith(".wh."):
            expected.add(_join(parent, base[4:]))
        else:
            expected.add(name)
            target = m.linkname if m.islnk() else name
            names_of_inode[target] = names_of_inode.get(target, 0) + 1

    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            found.add(n if rel == "." else f"{rel}/{n}")
    assert found == expected

    for m in members:
        name = m.name.rstrip("/")
        parent, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            continue
        if base.startswith(".wh."):
            st = os.lstat(root / _join(parent, base[4:]))
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
            assert stat.S_IMODE(st.st_mode) == 0, name
            assert st.st_nlink == 1
            continue
        t = by_name[m.linkname] if m.islnk() else m
        path = root / name
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == t.mode & 0o7777, name
        assert (st.st_uid, st.st_gid) == (t.uid, t.gid), name
        assert int(st.st_mtime) == int(t.mtime), name
        if t.isreg():
            assert stat.S_ISREG(st.st_mode), name
            assert st.st_size == t.size, name
            assert sha256(path.read_bytes()) == sha256(data[t.name]), name
            assert st.st_nlink == names_of_inode[t.name], name
        elif t.isdir():
            assert stat.S_ISDIR(st.st_mode), name
            subdirs = sum(1 for c in os.scandir(path) if c.is_dir(follow_symlinks=False))
            assert st.st_nlink == 2 + subdirs, name
        elif t.issym():
            assert stat.S_ISLNK(st.st_mode), name
            assert os.readlink(path) == t.linkname, name
            assert st.st_size == len(t.linkname.encode()), name
        elif t.ischr() or t.isblk():
            assert stat.S_ISCHR(st.st_mode) if t.ischr() else stat.S_ISBLK(st.st_mode), name
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (t.devmajor, t.devminor), name
        elif t.isfifo():
            assert stat.S_ISFIFO(st.st_mode), name
        else:
            raise AssertionError(f"unexpected tar member type {t.type!r}")
        if m.islnk():
            assert st.st_ino == os.lstat(root / m.linkname).st_ino, name
        want = tar_xattrs(t)
        if name in opaque:
            want["trusted.overlay.opaque"] = b"y"
        assert dict(listxattrs(str(path))) == want, name

    for d in implicit:
        st = os.lstat(root / d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, d
