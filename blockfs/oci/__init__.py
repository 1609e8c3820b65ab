"""The OCI image model: references, media types, descriptors, manifests, indexes, configs,
platforms and image layout directories. Nothing here speaks HTTP.
"""

from blockfs.oci import _annotations as annotations
from blockfs.oci import _mediatypes as media_types
from blockfs.oci._descriptors import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    ProcessConfig,
    host_platform,
    parse_document,
    select_platform,
)
from blockfs.oci._digest import digest_matches, new_hasher, sha256_digest, validate_digest
from blockfs.oci._errors import (
    InvalidDigest,
    InvalidDocument,
    InvalidReference,
    LayoutDigestMismatch,
    NoMatchingPlatform,
    OCIError,
    OCILayoutError,
)
from blockfs.oci._json import canonical_json
from blockfs.oci._layout import ImageLayout, parse_layout_reference
from blockfs.oci._reference import DOCKER_HUB, DOCKER_HUB_API, Reference

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "Descriptor",
    "ImageConfig",
    "ImageLayout",
    "Index",
    "InvalidDigest",
    "InvalidDocument",
    "InvalidReference",
    "LayoutDigestMismatch",
    "Manifest",
    "NoMatchingPlatform",
    "OCIError",
    "OCILayoutError",
    "Platform",
    "ProcessConfig",
    "Reference",
    "annotations",
    "canonical_json",
    "digest_matches",
    "host_platform",
    "media_types",
    "new_hasher",
    "parse_document",
    "parse_layout_reference",
    "select_platform",
    "sha256_digest",
    "validate_digest",
]
