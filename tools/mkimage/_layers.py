"""Layer trees and how they become gzip layers of an OCI image layout.

A layer is first a directory on disk (its tree); :func:`add_layer` writes it as a
reproducible tar (sorted, owned by root, one fixed mtime), gzips it and stores it in the
layout. OCI whiteouts are ordinary files in a tree (``.wh.NAME``, ``.wh..wh..opq``).
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import attrs

from blockfs.oci import Descriptor, ImageConfig, ImageLayout, Manifest, host_platform
from blockfs.oci import media_types as mt
from tools.debs import DebCache, DebError, dependency_closure, download, extract

# Every entry's mtime: a fixed time makes the same tree give the same layer digest.
MTIME = 1_700_000_000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PIECE = 1 << 20
_APPLET = re.compile(r"[a-z0-9][a-z0-9._/-]*")
# What a runtime tree does not need from Debian packages.
_DOCS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian")
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")


@attrs.frozen
class Layer:
    """A gzip layer stored in a layout: its descriptor and diff_id, and what made it."""

    descriptor: Descriptor
    diff_id: str
    created_by: str


def entries(tree: Path) -> Iterator[Path]:
    """Every path below ``tree`` (not ``tree`` itself), parents first, names sorted."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            yield Path(dirpath) / name


def write_tar(tree: Path, out: tarfile.TarFile) -> None:
    """Add the entries of ``tree`` to ``out``, owned by root, with the fixed mtime."""
    for path in entries(tree):
        info = out.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = MTIME
        if info.isreg():
            with open(path, "rb") as f:
                out.addfile(info, f)
        else:
            out.addfile(info)


def add_layer(layout: ImageLayout, tree: Path, created_by: str) -> Layer:
    """Store ``tree`` as a gzip layer blob in ``layout``."""
    with tempfile.TemporaryFile() as tar_file, tempfile.TemporaryFile() as gz_file:
        with tarfile.open(fileobj=tar_file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            write_tar(tree, tar)
        tar_file.seek(0)
        diff = hashlib.sha256()
        with gzip.GzipFile(fileobj=gz_file, mode="wb", mtime=0, compresslevel=6) as gz:
            while piece := tar_file.read(_PIECE):
                diff.update(piece)
                gz.write(piece)
        size = gz_file.tell()
        gz_file.seek(0)
        blob = hashlib.sha256()
        while piece := gz_file.read(_PIECE):
            blob.update(piece)
        digest = "sha256:" + blob.hexdigest()
        gz_file.seek(0)
        layout.write_blob_stream(iter(lambda: gz_file.read(_PIECE), b""), digest)
    descriptor = Descriptor(mt.OCI_LAYER_GZIP, digest, size)
    return Layer(descriptor, "sha256:" + diff.hexdigest(), created_by)


def write_image(
    layout: ImageLayout,
    layers: Sequence[Layer],
    tag: str,
    *,
    cmd: Sequence[str] = ("/bin/sh",),
) -> Descriptor:
    """Write the config and manifest of ``layers`` (bottom first) and tag it."""
    platform = host_platform()
    created = datetime.datetime.fromtimestamp(MTIME, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = ImageConfig.from_json(
        {
            "created": created,
            "architecture": platform.architecture,
            "os": platform.os,
            **({"variant": platform.variant} if platform.variant else {}),
            "config": {"Env": [f"PATH={PATH}"], "Cmd": list(cmd)},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": created, "created_by": layer.created_by} for layer in layers],
        }
    )
    config_descriptor = layout.write_document(config)
    manifest = Manifest(config=config_descriptor, layers=[layer.descriptor for layer in layers])
    descriptor = layout.write_document(manifest)
    layout.add_manifest(descriptor, tag)
    return descriptor


def busybox_tree(dest: Path, debs: DebCache | None = None, *, binary: Path | None = None) -> None:
    """A shell userland: static busybox, a link for each applet, /etc/passwd, /tmp.

    busybox comes from Debian's busybox-static package, or is the static ``binary`` given
    (``/bin/busybox`` of a host with busybox-static installed, say).
    """
    staging = dest.parent / f".{dest.name}.deb"
    if binary is None:
        extract((debs or DebCache()).fetch("busybox-static"), staging)
        busybox = staging / "bin" / "busybox"
        if not busybox.is_file():
            raise DebError("busybox-static has no bin/busybox")
    else:
        busybox = binary
    listed = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    shutil.rmtree(staging, ignore_errors=True)
    for applet in listed:
        if not _APPLET.fullmatch(applet) or ".." in applet or applet == "bin/busybox":
            continue
        link = dest / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to("/bin/busybox")
    etc = dest / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name, mode in (
        ("root", 0o700),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
    ):
        (dest / name).mkdir(exist_ok=True)
        os.chmod(dest / name, mode)


def debian_tree(
    dest: Path, debs: DebCache, packages: Sequence[str], *, exclude: Collection[str] = ()
) -> list[str]:
    """Unpack ``packages`` and their dependencies under ``dest``, without documentation,
    except the packages named in ``exclude`` (those of a lower layer).

    Returns the names of the packages unpacked.
    """
    wanted = [d for d in dependency_closure(packages) if d.package not in exclude]
    paths = download(wanted, debs.directory)
    for deb in wanted:
        extract(paths[deb.package], dest)
    for docs in _DOCS:
        shutil.rmtree(dest / docs, ignore_errors=True)
    return [d.package for d in wanted]


def python_tree(dest: Path, debs: DebCache, *, exclude: Collection[str] = ()) -> None:
    """Debian's Python 3.11 with its standard library and the shared libraries it needs
    (except the packages named in ``exclude``)."""
    debian_tree(dest, debs, PYTHON_PACKAGES, exclude=exclude)
    python3 = dest / "usr" / "bin" / "python3"
    if not python3.exists():
        python3.symlink_to("python3.11")


def random_tree(dest: Path, megabytes: int, *, seed: int = 0) -> None:
    """``data/random.bin``: ``megabytes`` MiB of incompressible bytes nobody reads."""
    rng = random.Random(seed)
    (dest / "data").mkdir(parents=True)
    with open(dest / "data" / "random.bin", "wb") as f:
        for _ in range(megabytes):
            f.write(rng.randbytes(1 << 20))


def tree_size(tree: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) below ``tree``."""
    count = size = 0
    for path in entries(tree):
        count += 1
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return count, size
