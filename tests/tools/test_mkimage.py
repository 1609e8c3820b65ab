"""tools/mkimage: base images from Debian packages, reproducible.

The packages themselves (resolve, download, verify, dependencies) are tested in
test_debs.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

from blockfs.oci import ImageConfig, ImageLayout, Manifest
from tools.mkimage import add_layer, build_base_image


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
