"""Media types of OCI and Docker manifests, indexes, configs and layers."""

from __future__ import annotations

from typing import Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# Docker schema 1 manifests are recognised only to refuse them with a clear message.
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# What a client may accept when it fetches a manifest by tag or digest, most preferred first.
MANIFEST_ACCEPT = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

Compression = Literal["gzip", "zstd", "none"]

_LAYER_COMPRESSION: dict[str, Compression] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDISTRIBUTABLE: "none",
    OCI_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
}
LAYER_MEDIA_TYPES = frozenset(_LAYER_COMPRESSION)
_NONDISTRIBUTABLE = frozenset(
    {
        OCI_LAYER_NONDISTRIBUTABLE,
        OCI_LAYER_NONDISTRIBUTABLE_GZIP,
        OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
        DOCKER_FOREIGN_LAYER_GZIP,
    }
)


def base_media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value, without parameters, lowercased."""
    return content_type.split(";", 1)[0].strip().lower()


def is_manifest(media_type: str) -> bool:
    """Whether ``media_type`` is an image manifest (OCI or Docker schema 2)."""
    return media_type in MANIFEST_MEDIA_TYPES


def is_index(media_type: str) -> bool:
    """Whether ``media_type`` is an image index or Docker manifest list."""
    return media_type in INDEX_MEDIA_TYPES


def is_layer(media_type: str) -> bool:
    """Whether ``media_type`` is a known layer type (tar, gzip or zstd; OCI or Docker)."""
    return media_type in _LAYER_COMPRESSION


def is_nondistributable(media_type: str) -> bool:
    """Whether a layer of this type is, by convention, not pushed to other registries."""
    return media_type in _NONDISTRIBUTABLE


def layer_compression(media_type: str) -> Compression | None:
    """How a layer of this type is compressed, or None if it is not a known layer type."""
    return _LAYER_COMPRESSION.get(media_type)
