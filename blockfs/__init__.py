"""blockfs: eStargz container image layers served lazily as EROFS block images."""

from blockfs.errors import BlockfsError

__all__ = ["BlockfsError"]
