"""Errors of image conversion."""

from __future__ import annotations

from blockfs.errors import BlockfsError


class ConvertError(BlockfsError):
    """An image cannot be converted: what it is, or where it is going, does not allow it."""
