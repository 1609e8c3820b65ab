"""The on-disk state of one indexed layer, and how it is made from an eStargz blob.

A layer directory holds ``layer.json`` (this record), ``index.erofs`` (the metadata
region of the block image) and ``extents.bin`` (the extent map). The NBD server serves
a layer directory as an export named after it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import attrs

from blockfs.erofs import build_index
from blockfs.errors import BlockfsError
from blockfs.estargz import BlobReader
from blockfs.estargz._model import Compression
from blockfs.image._extents import ExtentMap

LAYER_JSON = "layer.json"
INDEX_FILE = "index.erofs"
EXTENTS_FILE = "extents.bin"

_EXPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LayerStateError(BlockfsError):
    """A layer directory is missing, incomplete or damaged."""


def check_export_name(name: str) -> str:
    """``name`` if it is a safe export (and directory) name, else LayerStateError."""
    if not _EXPORT_NAME.match(name):
        raise LayerStateError(f"invalid export name {name!r}: use letters, digits, '.', '_', '-'")
    return name


@attrs.frozen
class LayerRecord:
    """What the NBD server needs to know to serve an indexed layer.

    ``source`` says where the blob is (``{"type": "file", "path": ...}`` or a registry blob).
    ``index_bytes_fetched`` counts the blob bytes read to index it (footer and TOC).
    """

    name: str
    source: dict[str, Any]
    toc_digest: str
    compression: Compression = attrs.field(validator=attrs.validators.in_(("gzip", "zstd")))
    blob_size: int
    image_size: int
    index_bytes_fetched: int
    prefetch_end: int | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRecord:
        return cls(**{f.name: data[f.name] for f in attrs.fields(cls)})

    @classmethod
    def load(cls, layer_dir: str | os.PathLike[str]) -> LayerRecord:
        path = Path(layer_dir) / LAYER_JSON
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise LayerStateError(
                f"{layer_dir} is not an indexed layer (no {LAYER_JSON})"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LayerStateError(f"{path} is damaged: {exc}; re-index the layer") from exc


def index_layer(
    reader: BlobReader,
    layer_dir: str | os.PathLike[str],
    *,
    name: str,
    source: dict[str, Any],
    bytes_fetched: int,
) -> LayerRecord:
    """Build the block image index of ``reader``'s layer into ``layer_dir``.

    The directory is written whole or not at all: the files are built in a temporary
    sibling directory that is renamed into place.
    """
    check_export_name(name)
    final = Path(layer_dir)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / INDEX_FILE, "wb") as f:
            index = build_index(reader.toc, f)
        ExtentMap.build(index, reader.toc).save(tmp / EXTENTS_FILE)
        prefetch = reader.prefetch_range()
        record = LayerRecord(
            name=name,
            source=source,
            toc_digest=reader.toc_digest,
            compression=reader.compression,
            blob_size=reader.source.size,
            image_size=index.image_size,
            index_bytes_fetched=bytes_fetched,
            prefetch_end=prefetch[1] if prefetch else None,
        )
        (tmp / LAYER_JSON).write_text(json.dumps(record.to_json(), indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
