"""OCI image layout directories (``oci:DIR[:TAG]``): blobs by digest plus an index.json.

Blobs are written to a temporary file and renamed into place, so a reader never sees a
partial blob; every read through :meth:`ImageLayout.read_blob` is checked against its digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

from blockfs.oci import _mediatypes as mt
from blockfs.oci._annotations import REF_NAME
from blockfs.oci._descriptors import Descriptor, ImageConfig, Index, Manifest, parse_document
from blockfs.oci._digest import digest_hex, new_hasher, sha256_digest, validate_digest
from blockfs.oci._errors import (
    InvalidDocument,
    InvalidReference,
    LayoutDigestMismatch,
    OCILayoutError,
)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
_COPY_CHUNK = 1 << 20
_TAG = re.compile(r"[\w][\w.-]{0,127}")


def parse_layout_reference(text: str) -> tuple[Path, str | None]:
    """Split ``oci:DIR[:TAG]`` into the directory and the tag (None when absent)."""
    if not text.startswith("oci:") or len(text) == 4:
        raise InvalidReference(f"invalid image layout reference {text!r}: expected oci:DIR[:TAG]")
    rest = text[4:]
    path, sep, tag = rest.rpartition(":")
    if sep and path and _TAG.fullmatch(tag):
        return Path(path), tag
    return Path(rest), None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` via a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class ImageLayout:
    """An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Open an existing layout; raises :class:`OCILayoutError` if ``root`` is not one."""
        self._root = Path(root)
        marker = self._root / LAYOUT_FILE
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except FileNotFoundError:
            raise OCILayoutError(
                "not an OCI image layout: no oci-layout file", path=str(self._root)
            ) from None
        except (ValueError, AttributeError):
            raise OCILayoutError("oci-layout is not a JSON object", path=str(marker)) from None
        if version != LAYOUT_VERSION:
            raise OCILayoutError(f"unsupported imageLayoutVersion {version!r}", path=str(marker))

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> ImageLayout:
        """Open the layout at ``root``, creating an empty one if the directory has none."""
        path = Path(root)
        (path / BLOBS_DIR / "sha256").mkdir(parents=True, exist_ok=True)
        if not (path / INDEX_FILE).exists():
            _atomic_write(path / INDEX_FILE, [Index(manifests=()).to_bytes()])
        if not (path / LAYOUT_FILE).exists():
            marker = json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()
            _atomic_write(path / LAYOUT_FILE, [marker])
        return cls(path)

    @property
    def root(self) -> Path:
        """The layout directory."""
        return self._root

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        algorithm = validate_digest(digest).partition(":")[0]
        return self._root / BLOBS_DIR / algorithm / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        """Whether the blob ``digest`` is present (its content is not checked)."""
        return self.blob_path(digest).is_file()

    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` and return its digest; ``digest``, when given, must match."""
        return self.write_blob_stream([data], digest or sha256_digest(data))

    def write_blob_stream(self, chunks: Iterable[bytes], digest: str) -> str:
        """Store a blob made of ``chunks``, verifying that it is ``digest``."""
        path = self.blob_path(digest)
        if path.is_file():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        hasher = new_hasher(digest)

        def hashed() -> Iterator[bytes]:
            for chunk in chunks:
                hasher.update(chunk)
                yield chunk
            actual = f"{hasher.name}:{hasher.hexdigest()}"
            if actual != digest:
                raise LayoutDigestMismatch(
                    f"refusing to store blob: content hashes to {actual}, not {digest}",
                    path=str(path),
                )

        _atomic_write(path, hashed())
        return digest

    def read_blob(self, digest: str) -> bytes:
        """The whole blob ``digest``, verified; raises :class:`LayoutDigestMismatch` if altered."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise OCILayoutError(f"blob {digest} is not in the layout", path=str(path)) from None
        hasher = new_hasher(digest)
        hasher.update(data)
        _check(hasher.name, hasher.hexdigest(), digest, path)
        return data

    def verify_blob(self, digest: str) -> None:
        """Hash the stored blob ``digest`` without holding it in memory; raise if it differs."""
        path = self.blob_path(digest)
        hasher = new_hasher(digest)
        try:
            with path.open("rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError:
            raise OCILayoutError(f"blob {digest} is not in the layout", path=str(path)) from None
        _check(hasher.name, hasher.hexdigest(), digest, path)

    def write_document(self, document: Manifest | Index | ImageConfig) -> Descriptor:
        """Store a manifest, index or config as a blob and return its descriptor."""
        descriptor = document.descriptor()
        self.write_blob(document.to_bytes(), descriptor.digest)
        return descriptor

    def read_document(self, descriptor: Descriptor) -> Manifest | Index:
        """Read and parse (verified) the manifest or index that ``descriptor`` points at."""
        data = self.read_blob(descriptor.digest)
        try:
            return parse_document(data, descriptor.media_type)
        except InvalidDocument as e:
            raise OCILayoutError(str(e), path=str(self.blob_path(descriptor.digest))) from None

    def index(self) -> Index:
        """The layout's ``index.json``."""
        path = self._root / INDEX_FILE
        try:
            return Index.from_bytes(path.read_bytes(), mt.OCI_INDEX)
        except FileNotFoundError:
            raise OCILayoutError("the layout has no index.json", path=str(path)) from None
        except InvalidDocument as e:
            raise OCILayoutError(str(e), path=str(path)) from None

    def tags(self) -> list[str]:
        """The ``org.opencontainers.image.ref.name`` of every tagged manifest, in index order."""
        return [
            d.annotations[REF_NAME] for d in self.index().manifests if REF_NAME in d.annotations
        ]

    def add_manifest(self, descriptor: Descriptor, tag: str | None = None) -> None:
        """List ``descriptor`` in index.json, under ``tag`` (replacing what had that tag)."""
        if tag is not None:
            if not _TAG.fullmatch(tag):
                raise InvalidReference(f"invalid tag {tag!r}")
            descriptor = attrs.evolve(
                descriptor, annotations={**descriptor.annotations, REF_NAME: tag}
            )
        with self._index_lock():
            current = self.index()
            kept = [
                d
                for d in current.manifests
                if not (tag is not None and d.annotations.get(REF_NAME) == tag)
                and not (d.digest == descriptor.digest and d.annotations == descriptor.annotations)
            ]
            updated = Index(manifests=(*kept, descriptor), annotations=current.annotations)
            _atomic_write(self._root / INDEX_FILE, [updated.to_bytes()])

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The descriptor tagged ``tag``; without a tag, the layout's only manifest."""
        manifests = self.index().manifests
        if tag is None:
            if len(manifests) == 1:
                return manifests[0]
            raise OCILayoutError(
                f"the layout holds {len(manifests)} manifests; name one of the tags "
                f"{self.tags()} as oci:DIR:TAG",
                path=str(self._root),
            )
        for descriptor in manifests:
            if descriptor.annotations.get(REF_NAME) == tag:
                return descriptor
        raise OCILayoutError(
            f"no manifest tagged {tag!r}; tags: {self.tags()}", path=str(self._root)
        )

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        # Lock the directory itself so that no extra file appears in the layout.
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _check(algorithm: str, hexdigest: str, digest: str, path: Path) -> None:
    actual = f"{algorithm}:{hexdigest}"
    if actual != digest:
        raise LayoutDigestMismatch(
            f"blob {digest} is corrupt: its content hashes to {actual}", path=str(path)
        )
