"""Realistic base images built offline as OCI image layouts, from Debian packages.

``python -m tools.mkimage OUT [--python] [--random-mb N]`` writes an OCI layout with plain
gzip layers (convert it with ``blockfs image convert``):

1. busybox: a static busybox with a link for every applet, ``/etc/passwd``, ``/tmp``;
2. with ``--python``: Debian's Python 3.11 and its standard library (thousands of files);
3. with ``--random-mb N``: ``/data/random.bin``, N MiB that nothing reads (for laziness).

``python -m tools.mkimage OUT --app python|gcc [--random-mb N]`` (``--gcc`` for short)
writes an app image instead (:func:`build_app_image`, ``_apps.py``): busybox and the C
library, a runtime (byte-compiled Python 3.11, or the gcc-12 toolchain), the unread data
and an app layer.

Packages are the candidate versions of the host's apt index (tools/debs.py), downloaded
with ``apt-get download`` into ``.cache/debs``, checked against apt's SHA256 and reused
from there (offline) as long as apt's candidate stays the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from blockfs.oci import Descriptor, ImageLayout
from tools.debs import DEFAULT_CACHE, DebCache, DebError
from tools.mkimage._apps import APPS, App, base_tree, files_tree
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
    "APPS",
    "DEFAULT_CACHE",
    "App",
    "DebCache",
    "DebError",
    "Layer",
    "add_layer",
    "build_app_image",
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
    return _build(layout, steps, tag, report)


def build_app_image(
    out: str | os.PathLike[str],
    app: str | App,
    *,
    tag: str = "latest",
    random_mb: int = 0,
    cache: str | os.PathLike[str] = DEFAULT_CACHE,
    report: Callable[[str], None] = lambda line: None,
) -> Descriptor:
    """Build the app image ``app`` (a name of :data:`APPS`) into the OCI layout ``out``:
    busybox and the C library, its runtime, ``random_mb`` MiB nothing reads, its files."""
    spec = APPS[app] if isinstance(app, str) else app
    layout = ImageLayout.create(out)
    debs = DebCache(cache)
    base: list[str] = []
    steps: list[tuple[str, Callable[[Path], None]]] = [
        ("busybox and libc", lambda d: base.extend(base_tree(d, debs))),
        (spec.runtime, lambda d: spec.make_runtime(d, debs, base)),
    ]
    if random_mb:
        steps.append((f"random {random_mb} MiB", lambda d: random_tree(d, random_mb)))
    steps.append((f"{spec.name} app", lambda d: files_tree(d, spec.files)))
    return _build(layout, steps, tag, report, cmd=spec.cmd)


def _build(
    layout: ImageLayout,
    steps: list[tuple[str, Callable[[Path], None]]],
    tag: str,
    report: Callable[[str], None],
    *,
    cmd: Sequence[str] = ("/bin/sh",),
) -> Descriptor:
    """Make each step's tree, bottom first, store it as a layer and tag the image."""
    layers: list[Layer] = []
    with tempfile.TemporaryDirectory(prefix="blockfs-mkimage-") as tmp:
        for name, make in steps:
            tree = Path(tmp) / name.replace(" ", "-").replace(",", "")
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
    return write_image(layout, layers, tag, cmd=cmd)
