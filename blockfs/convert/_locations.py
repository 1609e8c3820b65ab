"""Where images are read from and written to: OCI image layouts and registries.

Both kinds answer the same questions (what does the name resolve to, give me this blob,
store this blob and this manifest), so conversion does not care which it talks to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, Protocol

import attrs

from blockfs.convert._errors import ConvertError
from blockfs.estargz import BlobSource, FileBlobSource
from blockfs.oci import (
    Descriptor,
    ImageLayout,
    Index,
    Manifest,
    Platform,
    Reference,
    host_platform,
    parse_document,
    parse_layout_reference,
    select_platform,
)
from blockfs.oci import media_types as mt
from blockfs.registry import RegistryBlobSource, RegistryClient

Transfer = Literal["exists", "mounted", "uploaded", "written"]
ProgressCallback = Callable[[int], None]
_COPY_PIECE = 1 << 20


class ImageLocation(Protocol):
    """An image by name in a layout or a registry, with the blobs around it."""

    @property
    def name(self) -> str:
        """How to call the image in messages."""
        ...

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        """The manifest or index that the name points at."""
        ...

    def document(self, descriptor: Descriptor) -> Manifest | Index:
        """A manifest or index by descriptor (an entry of an index)."""
        ...

    def read_blob(self, descriptor: Descriptor) -> bytes:
        """A small blob (a config), verified."""
        ...

    def blob_source(self, descriptor: Descriptor) -> BlobSource:
        """A blob for ranged reads (to check an eStargz TOC without fetching the layer)."""
        ...

    def local_blob(self, descriptor: Descriptor, workdir: Path, progress: ProgressCallback) -> Path:
        """A verified local file holding the blob: fetched into ``workdir`` if need be."""
        ...

    def present(self, descriptor: Descriptor, source: ImageLocation) -> Transfer | None:
        """Make the blob present without sending it, if possible (it exists, or the
        registry mounts it from ``source``); None if it must be sent."""
        ...

    def put_blob(
        self, descriptor: Descriptor, data: Path | bytes, progress: ProgressCallback
    ) -> Transfer:
        """Store a blob."""
        ...

    def put_manifest(self, manifest: Manifest) -> Descriptor:
        """Store the manifest under this location's tag."""
        ...


class LayoutLocation:
    """An image in an OCI image layout directory, by tag (``oci:DIR[:TAG]``)."""

    def __init__(self, layout: ImageLayout, tag: str | None) -> None:
        self.layout = layout
        self.tag = tag

    @property
    def name(self) -> str:
        return f"oci:{self.layout.root}" + (f":{self.tag}" if self.tag else "")

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        descriptor = self.layout.resolve(self.tag)
        return descriptor, self.layout.read_document(descriptor)

    def document(self, descriptor: Descriptor) -> Manifest | Index:
        return self.layout.read_document(descriptor)

    def read_blob(self, descriptor: Descriptor) -> bytes:
        return self.layout.read_blob(descriptor.digest)

    def blob_source(self, descriptor: Descriptor) -> BlobSource:
        return FileBlobSource(self.layout.blob_path(descriptor.digest))

    def local_blob(self, descriptor: Descriptor, workdir: Path, progress: ProgressCallback) -> Path:
        self.layout.verify_blob(descriptor.digest)
        progress(descriptor.size)
        return self.layout.blob_path(descriptor.digest)

    def present(self, descriptor: Descriptor, source: ImageLocation) -> Transfer | None:
        return "exists" if self.layout.has_blob(descriptor.digest) else None

    def put_blob(
        self, descriptor: Descriptor, data: Path | bytes, progress: ProgressCallback
    ) -> Transfer:
        if self.layout.has_blob(descriptor.digest):
            return "exists"
        if isinstance(data, bytes):
            self.layout.write_blob(data, descriptor.digest)
        else:
            self.layout.write_blob_stream(_read_pieces(data, progress), descriptor.digest)
        return "written"

    def put_manifest(self, manifest: Manifest) -> Descriptor:
        descriptor = self.layout.write_document(manifest)
        self.layout.add_manifest(descriptor, self.tag or "latest")
        return descriptor


class RegistryLocation:
    """An image in a registry repository, by tag or digest."""

    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client = client
        self.ref = ref

    @property
    def name(self) -> str:
        return str(self.ref)

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        descriptor, data = self.client.resolve(self.ref)
        return descriptor, parse_document(data, descriptor.media_type)

    def document(self, descriptor: Descriptor) -> Manifest | Index:
        return self.client.get_manifest(self.ref.with_digest(descriptor.digest))

    def read_blob(self, descriptor: Descriptor) -> bytes:
        return self.client.get_blob(self.ref, descriptor.digest)

    def blob_source(self, descriptor: Descriptor) -> BlobSource:
        return RegistryBlobSource(self.client, self.ref, descriptor.digest, descriptor.size)

    def local_blob(self, descriptor: Descriptor, workdir: Path, progress: ProgressCallback) -> Path:
        dest = workdir / descriptor.digest.replace(":", "-")
        self.client.stream_blob(self.ref, descriptor.digest, dest, progress=progress)
        return dest

    def present(self, descriptor: Descriptor, source: ImageLocation) -> Transfer | None:
        mount_from = self.ref.repository
        if isinstance(source, RegistryLocation) and source.ref.registry == self.ref.registry:
            mount_from = source.ref.repository
        return self.client.mount_blob(self.ref, descriptor.digest, mount_from)

    def put_blob(
        self, descriptor: Descriptor, data: Path | bytes, progress: ProgressCallback
    ) -> Transfer:
        return self.client.push_blob(
            self.ref, descriptor.digest, descriptor.size, data, progress=progress
        )

    def put_manifest(self, manifest: Manifest) -> Descriptor:
        if self.ref.tag is None:
            raise ConvertError(f"cannot push to {self.ref}: name a tag to push to, not a digest")
        data = manifest.to_bytes()
        return self.client.push_manifest(
            self.ref, self.ref.tag, manifest.media_type or mt.OCI_MANIFEST, data
        )


def _read_pieces(path: Path, progress: ProgressCallback) -> Iterator[bytes]:
    """The file at ``path`` in pieces, reporting how much was read."""
    done = 0
    with open(path, "rb") as f:
        while piece := f.read(_COPY_PIECE):
            done += len(piece)
            progress(done)
            yield piece


def open_location(
    text: str, client: Callable[[], RegistryClient], *, create: bool = False
) -> ImageLocation:
    """The image named by ``text``: ``oci:DIR[:TAG]`` or a registry reference.

    ``client`` makes the registry client when one is needed. With ``create``, a layout
    directory that does not exist yet is created (for a destination).
    """
    if text.startswith("oci:"):
        root, tag = parse_layout_reference(text)
        if create:
            os.makedirs(root, exist_ok=True)
            return LayoutLocation(ImageLayout.create(root), tag)
        return LayoutLocation(ImageLayout(root), tag)
    return RegistryLocation(client(), Reference.parse(text))


@attrs.frozen
class ResolvedImage:
    """The image manifest a name resolves to on one platform.

    ``platform`` and ``index_size`` say what was chosen when the name is a multi-platform
    index (None and 0 otherwise).
    """

    descriptor: Descriptor
    manifest: Manifest
    platform: Platform | None = None
    index_size: int = 0


def resolve_image(location: ImageLocation, platform: Platform | None = None) -> ResolvedImage:
    """The image manifest of ``location``; from an index, the one for ``platform``
    (default: this host's)."""
    descriptor, document = location.resolve()
    if isinstance(document, Manifest):
        return ResolvedImage(descriptor, document)
    want = platform or host_platform()
    images = attrs.evolve(
        document, manifests=[d for d in document.manifests if mt.is_manifest(d.media_type)]
    )
    chosen = select_platform(images, want.os, want.architecture, want.variant or None)
    child = location.document(chosen)
    if not isinstance(child, Manifest):
        raise ConvertError(
            f"{location.name}: the index entry for {chosen.platform} is not an image manifest"
        )
    return ResolvedImage(chosen, child, chosen.platform, len(document.manifests))
