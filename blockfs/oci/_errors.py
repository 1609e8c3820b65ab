"""Errors of the OCI image model: bad references, documents, digests and layouts."""

from __future__ import annotations

from blockfs.errors import BlockfsError


class OCIError(BlockfsError):
    """Something about an image reference, manifest, index, config or layout is wrong."""


class InvalidReference(OCIError, ValueError):
    """A string is not a valid image reference (``[host[:port]/]repo[:tag][@digest]``)."""


class InvalidDigest(OCIError, ValueError):
    """A string is not a supported content digest (``sha256:<64 hex>`` or ``sha512:<128 hex>``)."""


class InvalidDocument(OCIError):
    """A manifest, index, descriptor or image config is not valid JSON of the expected shape."""


class NoMatchingPlatform(OCIError):
    """An image index has no manifest for the requested platform."""


class OCILayoutError(OCIError):
    """An OCI image layout directory is missing, malformed, or lacks what was asked for.

    ``path`` is the layout directory (or the file inside it) concerned.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def context(self) -> list[str]:
        return [self.path] if self.path else []


class LayoutDigestMismatch(OCILayoutError):
    """A blob in an image layout does not hash to the digest it is stored under."""
