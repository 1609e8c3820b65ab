"""Errors of the EROFS writer: a TOC that cannot become a correct image says why and where."""

from __future__ import annotations

from blockfs.errors import BlockfsError


class ErofsLayoutError(BlockfsError):
    """A TOC cannot be laid out as an EROFS image (a limit of the format, or a conflict).

    ``entry`` names the TOC path concerned and ``layer`` the layer, when they are known.
    Nothing has been written to the output when this is raised.
    """

    def __init__(self, message: str, *, entry: str | None = None, layer: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry
        self.layer = layer

    def context(self) -> list[str]:
        where = []
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.entry is not None:
            where.append(f"entry {self.entry!r}")
        return where
