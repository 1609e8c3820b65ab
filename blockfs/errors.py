"""The root of every error blockfs raises on purpose."""

from __future__ import annotations


class BlockfsError(Exception):
    """Base class of all blockfs errors; catch it to handle any of them.

    ``str()`` is the message followed by where it happened, from :meth:`context`, which
    subclasses extend with the layer, file, offset, host ... they carry.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def context(self) -> list[str]:
        """Phrases such as ``layer sha256:…`` or ``offset 42`` that locate the error."""
        return []

    def __str__(self) -> str:
        where = self.context()
        return f"{self.message} ({', '.join(where)})" if where else self.message
