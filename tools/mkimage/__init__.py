"""Realistic base images built offline as OCI image layouts, from Debian packages.

``python -m tools.mkimage OUT [--python] [--random-mb N]`` writes an OCI layout with plain
gzip layers (convert it with ``blockfs image convert``):

1. busybox: a static busybox with a link for every applet, ``/etc/passwd``, ``/tmp``;
2. with ``--python``: Debian's Python 3.11 and its standard library (thousands of files);
3. with ``--random-mb N``: ``/data/random.bin``, N MiB that nothing reads (for laziness).

Packages are the candidate versions of the host's apt index (tools/debs.py), downloaded
with ``apt-get download`` into ``.cache/debs``, checked against apt's SHA256 and reused
from there (offline) as long as apt's candidate stays the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from blockfs.oci import Descriptor, ImageLayout
from tools.debs import DEFAULT_CACHE, DebCache, DebError
from tools.mkimage._layers import (
    Layer,
    add_layer,
    busybox_tree,
    python_tree,
    random_tree,
    tree_size,
    write_image,
    write_tar,
)

__all__ = [
    "DEFAULT_CACHE",
    "DebCache",
    "DebError",
    "Layer",
    "add_layer",
    "build_base_image",
    "busybox_tree",
    "python_tree",
    "random_tree",
    "tree_size",
    "write_image",
    "write_tar",
]


def build_base_image(
    out: str | os.PathLike[str],
    *,
    tag: str = "latest",
    python: bool = False,
    random_mb: int = 0,
    cache: str | os.PathLike[str] = DEFAULT_CACHE,
    report: Callable[[str], None] = lambda line: None,
) -> Descriptor:
    """Build the base image into the OCI layout ``out`` (created if need be) under ``tag``."""
    layout = ImageLayout.create(out)
    debs = DebCache(cache)
    steps: list[tuple[str, Callable[[Path], None]]] = [("busybox", lambda d: busybox_tree(d, debs))]
    if python:
        steps.append(("python3.11", lambda d: python_tree(d, debs)))
    if random_mb:
        steps.append((f"random {random_mb} MiB", lambda d: random_tree(d, random_mb)))
    layers: list[Layer] = []
    with tempfile.TemporaryDirectory(prefix="blockfs-mkimage-") as tmp:
        for name, make in steps:
            tree = Path(tmp) / name.replace(" ", "-")
            tree.mkdir()
            make(tree)
            layer = add_layer(layout, tree, f"blockfs mkimage: {name}")
            entries, size = tree_size(tree)
            report(
                f"layer {name}: {entries} entries, {size} bytes -> "
                f"{layer.descriptor.size} bytes gzip ({layer.descriptor.digest})"
            )
            shutil.rmtree(tree)
            layers.append(layer)
    return write_image(layout, layers, tag)
