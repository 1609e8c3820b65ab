"""tools/mkimage: base images from cached Debian packages, offline and reproducible."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from blockfs.oci import ImageConfig, ImageLayout, Manifest
from tools.mkimage import DebCache, add_layer, build_base_image

HOST_BUSYBOX = Path("/bin/busybox")


def fake_deb(cache: Path, package: str, files: dict[str, bytes], depends: str = "") -> Path:
    """A minimal .deb named as apt-get download names it, built with dpkg-deb."""
    root = cache / f".build-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    control = f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
    if depends:
        control += f"Depends: {depends}\n"
    control += "Description: test package\n"
    (root / "DEBIAN" / "control").write_text(control)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755)
    deb = cache / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def test_closure_follows_first_alternatives_and_skips_package_managers(tmp_path):
    fake_deb(tmp_path, "app", {"usr/bin/app": b"app"}, "libone (>= 1) | libother, dpkg, libtwo")
    fake_deb(tmp_path, "libone", {"usr/lib/libone": b"1"}, "debconf | debconf-2.0")
    fake_deb(tmp_path, "libtwo", {"usr/lib/libtwo": b"2"})
    names = [p.name.split("_")[0] for p in DebCache(tmp_path).closure(["app"])]
    assert names == ["app", "libone", "libtwo"]


@pytest.mark.skipif(not HOST_BUSYBOX.is_file(), reason="needs a static /bin/busybox")
def test_base_image_from_cached_packages_is_reproducible_and_has_busybox_applets(tmp_path):
    cache = tmp_path / "debs"
    cache.mkdir()
    fake_deb(cache, "busybox-static", {"bin/busybox": HOST_BUSYBOX.read_bytes()})
    first = build_base_image(tmp_path / "a", random_mb=1, cache=cache)
    second = build_base_image(tmp_path / "b", random_mb=1, cache=cache)
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
