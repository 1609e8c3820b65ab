"""The least a lazy pull must move to run a workload: the WAN benchmark's "ideal" line.

For an eStargz image in a registry and a workload's read set (``tools.bench._readset``),
:func:`ideal_transfer` counts the compressed bytes of the members that hold the read
set's data (each member once, the topmost layer's copy of a file), plus each layer's
footer and TOC, plus the manifest and config. :meth:`Ideal.seconds` turns that into time
on a link: the bytes at the link's bandwidth, and one round trip each for the manifest,
the config and each layer (its footer and TOC; the chunks are taken to ride along).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from blockfs.estargz import BlobReader
from blockfs.oci import Reference
from blockfs.registry import RegistryBlobSource, RegistryClient


@attrs.frozen
class Ideal:
    """What the ideal lazy start moves, by kind."""

    chunk_bytes: int  # compressed members holding the read set's data
    toc_bytes: int  # every layer's TOC and footer
    manifest_bytes: int
    config_bytes: int
    layers: int
    files: int  # read set files found in the image

    @property
    def bytes(self) -> int:
        return self.chunk_bytes + self.toc_bytes + self.manifest_bytes + self.config_bytes

    @property
    def requests(self) -> int:
        """The manifest, the config and one request per layer."""
        return 2 + self.layers

    def seconds(self, rate_bps: float | None, delay: float) -> float:
        """The transfer time on a link of ``rate_bps`` bits per second (None: unlimited)
        that holds each request ``delay`` seconds."""
        transfer = self.bytes * 8 / rate_bps if rate_bps else 0.0
        return transfer + self.requests * delay


def ideal_transfer(client: RegistryClient, ref: str, read_set: Sequence[str]) -> Ideal:
    """The ideal transfer of the eStargz image ``ref`` for ``read_set`` (image paths)."""
    reference = Reference.parse(ref)
    descriptor, manifest = client.get_image_manifest(reference)
    wanted = {p.lstrip("/") for p in read_set}
    members: set[tuple[int, int, int]] = set()  # (layer, offset, end)
    toc_bytes = files = 0
    layers = list(manifest.layers)
    for index in reversed(range(len(layers))):  # the top layer's copy of a file is read
        layer = layers[index]
        reader = BlobReader.open(RegistryBlobSource(client, reference, layer.digest, layer.size))
        toc_bytes += layer.size - reader.toc_offset
        for path in sorted(wanted):
            entry = reader.toc.nodes.get(path)
            if entry is None:
                continue
            wanted.discard(path)
            files += 1
            members.update((index, c.offset, c.end) for c in entry.chunks)
    return Ideal(
        chunk_bytes=sum(end - offset for _, offset, end in members),
        toc_bytes=toc_bytes,
        manifest_bytes=descriptor.size,
        config_bytes=manifest.config.size,
        layers=len(layers),
        files=files,
    )
