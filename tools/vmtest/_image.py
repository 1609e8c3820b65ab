"""Host side of the snapshotter scenario: an eStargz image in a registry's storage.

The host builds a small base image from Debian packages (tools.mkimage: busybox, and a
layer of random data), converts it to eStargz with ``blockfs image convert`` into a
docker-registry it runs for the purpose, and stops that registry. The guest serves the
same storage with a registry of its own. What a container must read back comes from the
gzip layers of the original OCI layout, independently of blockfs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout, Manifest
from tools.local_registry import start_registry
from tools.mkimage import build_base_image
from tools.vmtest._errors import VMTestError
from tools.vmtest._host import Expected, expected_contents

REPOSITORY = "vmtest/app:latest"
RANDOM_MB = 8
PROJECT = Path(__file__).resolve().parents[2]


@attrs.frozen
class RegistryImage:
    """An image pushed into ``registry_dir`` as ``repository``, and its files."""

    registry_dir: Path
    repository: str  # name:tag, without a registry host
    layers: int
    expected: Expected


def merge(layers: Sequence[Expected]) -> Expected:
    """The files an overlay of ``layers`` (lowest first) shows: later layers win, and a
    whiteout hides what the layers below have at and under its path."""
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    whiteouts: set[str] = set()
    for layer in layers:
        for gone in layer.whiteouts:
            for path in [p for p in files if p == gone or p.startswith(gone + "/")]:
                del files[path], sizes[path]
            whiteouts.add(gone)
        files.update(layer.files)
        sizes.update(layer.sizes)
        whiteouts.difference_update(layer.files)
    return Expected(files=files, sizes=sizes, whiteouts=tuple(sorted(whiteouts)))


def prepare_image(work: Path, say: Callable[[str], None]) -> RegistryImage:
    """Build, convert and push the scenario's image into ``work/registry``."""
    layout_dir = work / "oci"
    descriptor = build_base_image(layout_dir, random_mb=RANDOM_MB, report=say)
    layout = ImageLayout(layout_dir)
    manifest = layout.read_document(descriptor)
    if not isinstance(manifest, Manifest):
        raise VMTestError(f"tools.mkimage wrote an index, not a manifest: {descriptor}")
    expected = merge([expected_contents(layout.blob_path(d.digest)) for d in manifest.layers])
    registry_dir = work / "registry"
    with start_registry(registry_dir) as registry:
        ref = f"{registry.host}/{REPOSITORY}"
        convert = [sys.executable, "-m", "blockfs.cli", "image", "convert", "--plain-http",
                   f"oci:{layout_dir}:latest", ref]  # fmt: skip
        done = subprocess.run(
            convert, cwd=PROJECT, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise VMTestError(f"blockfs image convert failed: {done.stderr.strip()[-2000:]}")
    shutil.rmtree(layout_dir, ignore_errors=True)
    say(
        f"image: {len(manifest.layers)} layers converted to eStargz and pushed into "
        f"{registry_dir}; {len(expected.files)} files expected"
    )
    return RegistryImage(registry_dir, REPOSITORY, len(manifest.layers), expected)
