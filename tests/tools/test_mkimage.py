"""tools/mkimage: base images from Debian packages, reproducible.

The packages themselves (resolve, download, verify, dependencies) are tested in
test_debs.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from blockfs.oci import Descriptor, ImageConfig, ImageLayout, Manifest
from tools.mkimage import APPS, add_layer, build_app_image, build_base_image
from tools.mkimage._layers import PATH


def test_base_image_from_debian_packages_is_reproducible_and_has_busybox_applets(tmp_path):
    # The project's package cache (.cache/debs), as the tool uses by default: busybox-static
    # is downloaded there once and reused offline afterwards.
    first = build_base_image(tmp_path / "a", random_mb=1)
    second = build_base_image(tmp_path / "b", random_mb=1)
    assert first.digest == second.digest

    layout = ImageLayout(tmp_path / "a")
    manifest = layout.read_document(layout.resolve("latest"))
    assert isinstance(manifest, Manifest)
    config = ImageConfig.from_bytes(layout.read_blob(manifest.config.digest))
    assert len(manifest.layers) == len(config.diff_ids) == 2
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        plain = gzip.decompress(layout.read_blob(layer.digest))
        assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
    busybox = gzip.decompress(layout.read_blob(manifest.layers[0].digest))
    with tarfile.open(fileobj=io.BytesIO(busybox)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isreg()
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "/bin/busybox"
    assert members["tmp"].mode == 0o1777
    assert all(m.uid == 0 and m.mtime == members["bin/busybox"].mtime for m in members.values())


def test_same_tree_gives_the_same_layer(tmp_path):
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"data")
    (tree / "d" / ".wh.gone").write_bytes(b"")
    layout = ImageLayout.create(tmp_path / "layout")
    one = add_layer(layout, tree, "x")
    (tree / "d" / "f").touch()  # only the mtime changes: the layer does not
    assert add_layer(layout, tree, "x") == one


# -- app images (tools/mkimage/_apps.py), for the WAN benchmark ------------------------------


def _layer_names(layout: ImageLayout, layer: Descriptor) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layout.read_blob(layer.digest)))) as tar:
        return {m.name: m for m in tar.getmembers()}


def _unpacked(layout: ImageLayout, dest: Path) -> Path:
    """The image's layers extracted in order (app images have no whiteouts)."""
    manifest = layout.read_document(layout.resolve("latest"))
    assert isinstance(manifest, Manifest)
    dest.mkdir()
    for layer in manifest.layers:
        subprocess.run(["tar", "-xzf", str(layout.blob_path(layer.digest)), "-C", str(dest)],
                       check=True)  # fmt: skip
    return dest


def _chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, timeout=120,
        env={"PATH": PATH},
    )  # fmt: skip


@pytest.mark.slow
def test_gcc_app_image_layers_and_its_hello_world_compiles(tmp_path: Path) -> None:
    build_app_image(tmp_path / "gcc", "gcc")

    layout = ImageLayout(tmp_path / "gcc")
    manifest = layout.read_document(layout.resolve("latest"))
    assert isinstance(manifest, Manifest)
    base, toolchain, app = (_layer_names(layout, layer) for layer in manifest.layers)
    assert "bin/busybox" in base and "lib/x86_64-linux-gnu/libc.so.6" in base
    assert "usr/bin/gcc" in toolchain and toolchain["usr/bin/gcc"].linkname == "gcc-12"
    assert "usr/lib/gcc/x86_64-linux-gnu/12/cc1" in toolchain
    assert "usr/bin/x86_64-linux-gnu-as" in toolchain
    assert "usr/include/stdio.h" in toolchain
    assert not any(name.startswith("lib/x86_64-linux-gnu/libc.so") for name in toolchain)
    assert list(app) == ["hello.c"]
    config = ImageConfig.from_bytes(layout.read_blob(manifest.config.digest))
    assert config.to_json()["config"]["Cmd"] == list(APPS["gcc"].cmd)

    if os.geteuid() != 0:
        pytest.skip("running the compiler in a chroot needs root")
    root = _unpacked(layout, tmp_path / "root")
    done = _chroot(root, *APPS["gcc"].workload)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"


@pytest.mark.slow
def test_python_app_image_has_a_byte_compiled_library_that_python_uses(tmp_path: Path) -> None:
    build_app_image(tmp_path / "py", "python", random_mb=1)

    layout = ImageLayout(tmp_path / "py")
    manifest = layout.read_document(layout.resolve("latest"))
    assert isinstance(manifest, Manifest)
    base, python, data, app = (_layer_names(layout, layer) for layer in manifest.layers)
    assert "lib/x86_64-linux-gnu/libc.so.6" in base
    assert "usr/bin/python3.11" in python
    assert "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc" in python
    assert not any(name.startswith("lib/x86_64-linux-gnu/libc.so") for name in python)
    assert "data/random.bin" in data
    assert "app/hello.py" in app

    if os.geteuid() != 0:
        pytest.skip("running Python in a chroot needs root")
    root = _unpacked(layout, tmp_path / "root")
    done = _chroot(root, "/usr/bin/python3", "-B", "-v", "-c", APPS["python"].workload[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"
    # Every module came from its .pyc, none had to be compiled again from its source.
    assert "code object from '/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc'" in (
        done.stderr
    )
    assert "bytecode is stale" not in done.stderr
    assert "matches /usr/lib/python3.11/sitecustomize.py" in done.stderr
