"""Test images: OCI layouts made with tools.mkimage, the tree a layer stack should give,
and a comparable snapshot of a directory tree."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from blockfs.oci import Descriptor, ImageLayout, Manifest
from tools.mkimage import DebCache, add_layer, busybox_tree, write_image

HOST_BUSYBOX = Path("/bin/busybox")
TreeMaker = Callable[[Path], None]


def with_busybox(dest: Path) -> None:
    """A busybox userland tree (the host's static busybox when installed: no download)."""
    if HOST_BUSYBOX.is_file():
        busybox_tree(dest, binary=HOST_BUSYBOX)
    else:
        try:
            busybox_tree(dest, DebCache())
        except Exception as e:  # no busybox and no apt: nothing to run in a chroot
            pytest.skip(f"no static busybox: {e}")


def make_layout(root: Path, layers: Sequence[TreeMaker], tag: str = "v1") -> Descriptor:
    """An OCI layout at ``root`` whose image ``tag`` has one gzip layer per tree maker."""
    layout = ImageLayout.create(root)
    made = []
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        for i, make in enumerate(layers):
            tree = Path(tmp) / f"layer{i}"
            tree.mkdir()
            make(tree)
            made.append(add_layer(layout, tree, f"test layer {i}"))
    return write_image(layout, made, tag)


def layer_blobs(root: Path, tag: str = "v1") -> list[Path]:
    """The layer blob files of the image ``tag`` in the layout at ``root``, bottom first."""
    layout = ImageLayout(root)
    manifest = layout.read_document(layout.resolve(tag))
    assert isinstance(manifest, Manifest)
    return [layout.blob_path(d.digest) for d in manifest.layers]


def expected_tree(blobs: Sequence[Path], dest: Path) -> Path:
    """What ``tar -x`` of the gzip layer ``blobs`` in order gives, whiteouts applied."""
    dest.mkdir()
    for i, blob in enumerate(blobs):
        layer = dest.parent / f".{dest.name}.layer{i}"
        layer.mkdir()
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(layer)], check=True)
        for dirpath, dirnames, filenames in os.walk(layer):
            rel = Path(dirpath).relative_to(layer)
            for name in [*dirnames, *filenames]:
                if name == ".wh..wh..opq":
                    for child in (dest / rel).iterdir():
                        _remove(child)
                elif name.startswith(".wh."):
                    _remove(dest / rel / name[4:])
        for dirpath, dirnames, filenames in os.walk(layer):
            rel = Path(dirpath).relative_to(layer)
            for name in dirnames:
                target = dest / rel / name
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    _remove(target)
                target.mkdir(exist_ok=True)
                shutil.copystat(Path(dirpath) / name, target, follow_symlinks=False)
            for name in filenames:
                if name.startswith(".wh."):
                    continue
                target = dest / rel / name
                if target.exists() or target.is_symlink():
                    _remove(target)
                shutil.copy2(Path(dirpath) / name, target, follow_symlinks=False)
        shutil.rmtree(layer)
    return dest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, str]]:
    """Every entry below ``root``: path → (kind, mode, uid, gid, sha256 or link target).

    Overlay whiteouts (0/0 character devices) are what a merged tree never shows, so they
    are left out as they would be by overlayfs.
    """
    out: dict[str, tuple[str, int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue
            if stat.S_ISLNK(st.st_mode):
                kind, what = "symlink", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                kind, what = "dir", ""
            elif stat.S_ISREG(st.st_mode):
                kind, what = "file", hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                kind, what = "other", str(st.st_rdev)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def gunzipped_digest(blob: Path) -> str:
    """sha256 of a gzip blob's decompressed bytes (a layer's diff_id)."""
    hasher = hashlib.sha256()
    with gzip.open(blob, "rb") as f:
        while piece := f.read(1 << 20):
            hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A docker config directory (for DOCKER_CONFIG) with credentials for ``host``."""
    import base64

    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory
