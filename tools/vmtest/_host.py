"""Host side of the VM test's data: the layer, its expected contents and its NBD server.

The layer is an eStargz blob indexed into a layer directory with blockfs.image, served by
the production NBD server (nbdkit with plugins/blockfs_nbdkit.py, through
blockfs.host.nbdserver). What the guest must read back comes from the layer's source tar,
independently of blockfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import attrs

from blockfs.estargz import BlobReader, CountingSource, FileBlobSource
from blockfs.host.nbdserver import NBDServer
from blockfs.image import ServerConfig, index_layer
from tools.vmtest._errors import VMTestError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def default_vectors() -> Path:
    """The reference eStargz vectors kept with the tests (tests/data/estargz)."""
    return Path(__file__).resolve().parents[2] / "tests" / "data" / "estargz"


@attrs.frozen
class LayerSpec:
    """An eStargz blob, its expected TOC digest and the tar it was made from."""

    blob: Path
    toc_digest: str | None
    source_tar: Path

    @classmethod
    def from_vectors(cls, directory: Path, blob_name: str = "gzip-64k.esgz") -> LayerSpec:
        blob = directory / blob_name
        build = directory / f"{blob_name}.build.json"
        if not blob.exists() or not build.exists():
            raise VMTestError(f"no test vector {blob} (with its .build.json)")
        toc_digest = json.loads(build.read_text())["tocDigest"]
        return cls(blob=blob, toc_digest=toc_digest, source_tar=directory / "layer.tar")


@attrs.frozen
class Expected:
    """What the mounted layer must contain."""

    files: dict[str, str]  # path -> sha256 of its contents
    sizes: dict[str, int]  # path -> size in bytes
    whiteouts: tuple[str, ...]  # paths the layer deletes (0/0 devices in EROFS)


def _clean(name: str) -> str:
    return name.removeprefix("./").strip("/")


def expected_contents(source_tar: Path) -> Expected:
    """The sha256 of every regular file (hard links too) and the whiteouts of a layer tar."""
    whiteouts: list[str] = []
    with tarfile.open(source_tar) as tar:
        members = tar.getmembers()
        digests: dict[str, tuple[str, int]] = {}
        for m in members:
            name = _clean(m.name)
            base = os.path.basename(name)
            if base == OPAQUE_MARKER:
                continue
            if base.startswith(WHITEOUT_PREFIX):
                whiteouts.append(os.path.join(os.path.dirname(name), base[len(WHITEOUT_PREFIX) :]))
                continue
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                digests[name] = (hashlib.sha256(f.read()).hexdigest(), m.size)
        for m in members:
            if m.islnk():
                target = _clean(m.linkname)
                if target in digests:
                    digests[_clean(m.name)] = digests[target]
    files = {name: digest for name, (digest, _) in digests.items()}
    sizes = {name: size for name, (_, size) in digests.items()}
    return Expected(files=files, sizes=sizes, whiteouts=tuple(sorted(whiteouts)))


def index(spec: LayerSpec, layers_dir: Path) -> str:
    """Index the blob into ``layers_dir``; returns its export name (from the TOC digest)."""
    source = CountingSource(FileBlobSource(str(spec.blob)))
    reader = BlobReader.open(source, toc_digest=spec.toc_digest)
    export = reader.toc_digest.replace(":", "-")
    index_layer(
        reader,
        layers_dir / export,
        name=export,
        source={"type": "file", "path": str(spec.blob.resolve())},
        bytes_fetched=source.bytes_read,
    )
    return export


def make_server(work: Path) -> NBDServer:
    """The production NBD server over the layers in ``work/layers``, socket in ``work/run``."""
    run = work / "run"
    config = ServerConfig(
        root=work / "layers",
        cache_dir=work / "cache",
        control=run / "control.sock",
    )
    return NBDServer(run, config)
