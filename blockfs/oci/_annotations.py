"""Annotation keys that blockfs reads or writes on descriptors and indexes."""

from __future__ import annotations

# The tag of a manifest in an OCI image layout's index.json.
REF_NAME = "org.opencontainers.image.ref.name"
# sha256 of an eStargz layer's uncompressed TOC JSON; the only way a layer is trusted lazily.
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
# Decimal bytes at the end of an eStargz layer that hold its TOC and footer, written by
# blockfs's conversions: a lazy reader fetches exactly those, in one request, instead of
# guessing. Under containerd's snapshot prefix, so that containerd passes it to a remote
# snapshotter's Prepare as it passes the TOC digest.
ESTARGZ_TOC_TAIL = "containerd.io/snapshot/blockfs/toc.tail"
# Where an eStargz layer's prioritised files end (the offset of its prefetch landmark's
# member), also written by blockfs's conversions: a lazy reader can request them, one
# range from the blob's start, before its TOC is in.
ESTARGZ_PREFETCH_END = "containerd.io/snapshot/blockfs/prefetch.end"
# Decimal size of an eStargz layer once decompressed (for containers/storage).
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
# zstd:chunked layers: sha256 and position of the compressed TOC frame.
ZSTD_CHUNKED_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
# Docker's marker of attestation manifests inside an index (they are not images).
DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"
