"""Convert an image's layers to eStargz and store the result as a new image.

For each layer of the chosen manifest, bottom first:

- an eStargz layer whose ``toc.digest`` annotation verifies against its TOC is kept as it
  is (copied, or mounted from the source repository when both are in one registry);
- any other layer is fetched, rebuilt as eStargz, and its descriptor gets the TOC digest
  and uncompressed-size annotations.

The config's ``rootfs.diff_ids`` are replaced by those of the new layers; the manifest is
an OCI manifest, pushed (or written) under the destination's tag.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, BinaryIO, Literal, cast

import attrs

from blockfs.convert._errors import ConvertError
from blockfs.convert._locations import ImageLocation, Transfer, resolve_image
from blockfs.convert._progress import Progress, ProgressTask, SilentProgress
from blockfs.defaults import CHUNK_SIZE
from blockfs.estargz import (
    BlobReader,
    BuildOptions,
    BuildResult,
    FileBlobSource,
    FormatError,
    build,
    clean_name,
)
from blockfs.estargz._model import Compression
from blockfs.estargz._tarinput import decompressed_tar, read_entries
from blockfs.oci import (
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
)
from blockfs.oci import annotations as ann
from blockfs.oci import media_types as mt

# Annotations a converted layer must not inherit from its source: they described the
# old blob.
_STALE_ANNOTATIONS = frozenset(
    {
        ann.ESTARGZ_TOC_DIGEST,
        ann.ESTARGZ_TOC_TAIL,
        ann.ESTARGZ_PREFETCH_END,
        ann.ESTARGZ_UNCOMPRESSED_SIZE,
        ann.ZSTD_CHUNKED_MANIFEST_CHECKSUM,
        ann.ZSTD_CHUNKED_MANIFEST_POSITION,
    }
)
# Docker layer types of a kept layer, renamed for the OCI manifest (the bytes are the same).
_OCI_LAYER_TYPE = {
    mt.DOCKER_LAYER: mt.OCI_LAYER,
    mt.DOCKER_LAYER_GZIP: mt.OCI_LAYER_GZIP,
    mt.DOCKER_LAYER_ZSTD: mt.OCI_LAYER_ZSTD,
}


@attrs.frozen
class ConvertOptions:
    """How to build the eStargz layers (see :class:`blockfs.estargz.BuildOptions`).

    ``platform`` chooses the manifest of a multi-platform index (default: this host's).
    ``tmpdir`` is where layers are fetched and built (default: the system's).

    ``layer_priorities`` (source diff_id -> files, see :class:`Profile`) replaces
    ``prioritized`` with a list per layer: every layer is then rebuilt, even one that is
    eStargz already, with the files of its list that it holds first, in that order, and
    the prefetch landmark after them; a layer holding none of them gets the no-prefetch
    landmark.
    """

    compression: Compression = "gzip"
    chunk_size: int = CHUNK_SIZE
    min_chunk_size: int = 0
    prioritized: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    platform: Platform | None = None
    tmpdir: str | None = None
    layer_priorities: Mapping[str, tuple[str, ...]] | None = attrs.field(
        default=None, eq=False, hash=False
    )

    def build_options(self, prioritized: tuple[str, ...] | None = None) -> BuildOptions:
        """The writer's options; prioritized files missing from a layer are fine (they are
        in another layer). ``prioritized`` replaces the options' own list."""
        return BuildOptions(
            compression=self.compression,
            chunk_size=self.chunk_size,
            min_chunk_size=self.min_chunk_size,
            prioritized=self.prioritized if prioritized is None else prioritized,
            allow_missing_prioritized=True,
        )


@attrs.frozen
class LayerConversion:
    """What happened to one layer: ``kept`` as it was, or ``converted`` to ``result``
    (``prioritized``: the files put before its landmark, with ``layer_priorities``)."""

    source: Descriptor
    result: Descriptor
    action: Literal["kept", "converted"]
    transfer: Transfer
    note: str = ""
    prioritized: tuple[str, ...] = ()


@attrs.frozen
class ConvertResult:
    """The new image: its manifest descriptor and each layer's fate, bottom first."""

    manifest: Descriptor
    config: Descriptor
    layers: tuple[LayerConversion, ...]
    platform: Platform | None = None  # the platform chosen, when the source was an index


def convert_image(
    src: ImageLocation,
    dst: ImageLocation,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the image at ``src`` to eStargz and store it at ``dst``."""
    progress = progress or SilentProgress()
    image = resolve_image(src, options.platform)
    manifest, platform = image.manifest, image.platform
    if platform is not None:
        whose = "this host's platform" if options.platform is None else "the platform asked for"
        progress.note(
            f"{src.name} is an index of {image.index_size} manifests; converting only the "
            f"one for {platform} ({whose}): the result is a single-platform image"
        )
    config = ImageConfig.from_bytes(src.read_blob(manifest.config))
    diff_ids = config.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise ConvertError(
            f"{src.name}: the config lists {len(diff_ids)} diff_ids for "
            f"{len(manifest.layers)} layers"
        )
    with tempfile.TemporaryDirectory(prefix="blockfs-convert-", dir=options.tmpdir) as tmp:
        workdir = Path(tmp)
        outcomes: list[LayerConversion] = []
        new_diff_ids: list[str] = []
        for position, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
            label = f"layer {position + 1}/{len(manifest.layers)} {_short(layer.digest)}"
            outcome, new_diff_id = _convert_layer(
                src, dst, layer, diff_id, options, workdir, label, progress
            )
            outcomes.append(outcome)
            new_diff_ids.append(new_diff_id)
    new_config = config.with_diff_ids(new_diff_ids)
    config_data = new_config.to_bytes()
    config_descriptor = new_config.descriptor(mt.OCI_CONFIG)
    dst.put_blob(config_descriptor, config_data, lambda n: None)
    new_manifest = Manifest(
        config=config_descriptor,
        layers=tuple(o.result for o in outcomes),
        media_type=mt.OCI_MANIFEST,
        annotations=manifest.annotations,
    )
    descriptor = dst.put_manifest(new_manifest)
    progress.note(f"stored {dst.name} ({descriptor.digest})")
    return ConvertResult(descriptor, config_descriptor, tuple(outcomes), platform)


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


def _verified_estargz(src: ImageLocation, layer: Descriptor) -> str | None:
    """Why ``layer`` cannot be kept as it is, or None if it is verifiable eStargz."""
    toc_digest = layer.annotations.get(ann.ESTARGZ_TOC_DIGEST)
    if toc_digest is None:
        return "no TOC digest annotation"
    if mt.layer_compression(layer.media_type) not in ("gzip", "zstd"):
        return f"media type {layer.media_type} cannot be eStargz"
    source = src.blob_source(layer)
    try:
        BlobReader.open(source, toc_digest=toc_digest)
    except FormatError as e:
        return f"its eStargz TOC does not verify: {e}"
    finally:
        if isinstance(source, FileBlobSource):
            source.close()
    return None


def _convert_layer(
    src: ImageLocation,
    dst: ImageLocation,
    layer: Descriptor,
    diff_id: str,
    options: ConvertOptions,
    workdir: Path,
    label: str,
    progress: Progress,
) -> tuple[LayerConversion, str]:
    if not mt.is_layer(layer.media_type):
        raise ConvertError(
            f"{src.name}: {layer.digest} has media type {layer.media_type!r}, not a layer"
        )
    if mt.is_nondistributable(layer.media_type):
        progress.note(f"{label}: non-distributable layer, kept as it is and not copied")
        return LayerConversion(layer, layer, "kept", "exists", "non-distributable"), diff_id
    per_layer = options.layer_priorities
    reason = (
        "rewritten in profile order" if per_layer is not None else _verified_estargz(src, layer)
    )
    if reason is None:
        kept = attrs.evolve(
            layer, media_type=_OCI_LAYER_TYPE.get(layer.media_type, layer.media_type)
        )
        transfer = _copy_blob(src, dst, layer, workdir, label, progress)
        progress.note(f"{label}: already eStargz with a verified TOC, kept ({transfer})")
        return LayerConversion(layer, kept, "kept", transfer), diff_id

    fetch = progress.task(f"{label} fetch", layer.size)
    local = src.local_blob(layer, workdir, fetch.update)
    fetch.finish()
    out_path = workdir / f"{_short(layer.digest)}.esgz"
    task = progress.task(f"{label} convert", os.path.getsize(local))
    prioritized: tuple[str, ...] = ()
    try:
        with open(local, "rb") as raw, open(out_path, "wb") as out:
            counted = cast(IO[bytes], _ReadCounter(raw, task))
            if per_layer is None:
                result = build(counted, out, options.build_options(), tmpdir=str(workdir))
            else:
                with decompressed_tar(counted, str(workdir)) as tar:
                    prioritized = _present(tar, per_layer.get(diff_id, ()))
                    build_options = options.build_options(prioritized)
                    result = build(tar, out, build_options, tmpdir=str(workdir))
    finally:
        if local.parent == workdir:
            local.unlink()
    task.finish(f"{_human(result.blob_size)} eStargz ({options.compression})")
    media_type = mt.OCI_LAYER_ZSTD if options.compression == "zstd" else mt.OCI_LAYER_GZIP
    annotations: Mapping[str, str] = {
        **{k: v for k, v in layer.annotations.items() if k not in _STALE_ANNOTATIONS},
        **converted_annotations(result),
    }
    converted = Descriptor(media_type, result.blob_digest, result.blob_size, annotations)
    upload = progress.task(f"{label} store", result.blob_size)
    try:
        transfer = dst.put_blob(converted, out_path, upload.update)
    finally:
        out_path.unlink()
    upload.finish(transfer)
    outcome = LayerConversion(layer, converted, "converted", transfer, reason, prioritized)
    return outcome, result.diff_id


def converted_annotations(result: BuildResult) -> dict[str, str]:
    """The annotations of a layer descriptor for the blob of ``result``: the writer's (TOC
    digest, uncompressed size, zstd:chunked position), the TOC tail size
    (:data:`blockfs.oci.annotations.ESTARGZ_TOC_TAIL`) and, when files are prioritised,
    where they end (:data:`blockfs.oci.annotations.ESTARGZ_PREFETCH_END`)."""
    converted = {
        **result.annotations,
        ann.ESTARGZ_TOC_TAIL: str(result.blob_size - result.toc_offset),
    }
    if result.prefetch_end is not None:
        converted[ann.ESTARGZ_PREFETCH_END] = str(result.prefetch_end)
    return converted


def _present(tar: IO[bytes], names: tuple[str, ...]) -> tuple[str, ...]:
    """The names of ``names`` that the plain tar ``tar`` holds (``tar`` is left at its start).

    Only these are handed to the writer: it writes the prefetch landmark whenever it is
    given names, and a layer that holds none of them must get the no-prefetch one.
    """
    if not names:
        return ()
    held = {e.key for e in read_entries(tar)}
    tar.seek(0)
    return tuple(n for n in names if clean_name(n) in held)


def _copy_blob(
    src: ImageLocation,
    dst: ImageLocation,
    layer: Descriptor,
    workdir: Path,
    label: str,
    progress: Progress,
) -> Transfer:
    """Put ``layer``'s blob at ``dst`` as it is, without fetching it if the registry can mount it."""
    done = dst.present(layer, src)
    if done is not None:
        return done
    fetch = progress.task(f"{label} fetch", layer.size)
    local = src.local_blob(layer, workdir, fetch.update)
    fetch.finish()
    upload = progress.task(f"{label} store", layer.size)
    try:
        transfer = dst.put_blob(layer, local, upload.update)
    finally:
        if local.parent == workdir:
            local.unlink()
    upload.finish(transfer)
    return transfer


class _ReadCounter:
    """A read-only, unseekable view of a file that reports how much has been read."""

    def __init__(self, inner: BinaryIO, task: ProgressTask) -> None:
        self._inner = inner
        self._task = task
        self._done = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        self._done += len(data)
        self._task.update(self._done)
        return data

    def seekable(self) -> bool:
        return False


def _human(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"
