"""A private containerd (Debian's 1.6) for tests, and OCI image archives to import into it.

The process management lives in :mod:`tools.local_containerd` (the demo and benchmarks
use it too); :func:`start_containerd` here skips the test unless we are root and
containerd is installed, and names the namespace after the tests.

:func:`write_image_archive` builds an OCI image layout tar, the format ``ctr images
import`` reads, from layers given as {path: bytes} dictionaries.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import pytest

from blockfs.oci import Descriptor, ImageConfig, ImageLayout, Manifest, host_platform
from blockfs.oci import media_types as mt
from tools import local_containerd
from tools.local_containerd import (
    CONTAINERD,
    CTR,
    RUNC,
    Containerd,
    ContainerdProcessError,
    CRISettings,
    mounts_under,
    short_tempdir,
)

__all__ = [
    "CONTAINERD",
    "CTR",
    "IMAGE_NAME_ANNOTATION",
    "RUNC",
    "CRISettings",
    "Containerd",
    "ImageArchive",
    "layer_tar",
    "mounts_under",
    "require_root_tools",
    "short_tempdir",
    "start_containerd",
    "write_image_archive",
]

# containerd keeps the image name in this index annotation when it imports an archive.
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"


def require_root_tools(*tools: str) -> None:
    """Skip the test unless we are root and every tool exists."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in tools:
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed")


@contextlib.contextmanager
def start_containerd(
    proxy_snapshotters: Mapping[str, Path] | None = None,
    *,
    namespace: str | None = None,
    cri: CRISettings | None = None,
) -> Iterator[Containerd]:
    """Run a private containerd until the block exits; its namespace is unique per call.

    With ``cri``, the CRI plugin runs too (its images live in namespace ``k8s.io``).
    """
    require_root_tools(CONTAINERD, CTR)
    namespace = namespace or f"blockfs-test-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as exits:
        try:
            daemon = exits.enter_context(
                local_containerd.start_containerd(proxy_snapshotters, namespace=namespace, cri=cri)
            )
        except ContainerdProcessError as e:
            pytest.fail(str(e))
        yield daemon


# -- OCI image archives ------------------------------------------------------------------


def layer_tar(
    files: Mapping[str, bytes | None], *, modes: Mapping[str, int] | None = None
) -> bytes:
    """An uncompressed layer tar: ``path: bytes`` is a file, ``path: None`` a directory.

    Parent directories are added as needed; ``modes`` overrides a member's mode.
    """
    modes = modes or {}
    members: dict[str, bytes | None] = {}
    for path, data in sorted(files.items()):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            members.setdefault("/".join(parts[:i]), None)
        members["/".join(parts)] = data
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = modes.get(name, 0o755)
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = modes.get(name, 0o644)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class ImageArchive:
    """An OCI archive written by :func:`write_image_archive`."""

    path: Path
    name: str
    diff_ids: tuple[str, ...]

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """The chainID of each layer, bottom first (the names of the committed snapshots)."""
        chain: list[str] = []
        for diff_id in self.diff_ids:
            chain.append(diff_id if not chain else _sha256(f"{chain[-1]} {diff_id}".encode()))
        return tuple(chain)


def write_image_archive(
    path: Path, name: str, layers: Sequence[bytes], *, cmd: Sequence[str]
) -> ImageArchive:
    """Write an OCI layout tar holding one image made of the gzip-compressed ``layers``."""
    with tempfile.TemporaryDirectory(prefix="bfs-oci-") as tmp:
        layout = ImageLayout.create(tmp)
        descriptors = []
        diff_ids = []
        for tar_bytes in layers:
            blob = gzip.compress(tar_bytes, mtime=0)
            digest = layout.write_blob(blob)
            descriptors.append(Descriptor(mt.OCI_LAYER_GZIP, digest, len(blob)))
            diff_ids.append(_sha256(tar_bytes))
        platform = host_platform()
        config = ImageConfig.from_json(
            {
                "architecture": platform.architecture,
                "os": platform.os,
                "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        )
        manifest = Manifest(
            config=layout.write_document(config),
            layers=tuple(descriptors),
        )
        descriptor = attrs.evolve(
            layout.write_document(manifest),
            annotations={IMAGE_NAME_ANNOTATION: name},
            platform=platform,
        )
        layout.add_manifest(descriptor, tag="latest")
        with tarfile.open(path, "w") as tar:
            tar.add(tmp, arcname=".")
    return ImageArchive(path=path, name=name, diff_ids=tuple(diff_ids))
