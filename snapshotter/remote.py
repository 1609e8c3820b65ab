"""Which layer a Prepare asks for, and where to read it: the remote-snapshot labels.

containerd tries a remote (lazy) snapshot when a Prepare carries
``containerd.io/snapshot.ref``. The layer's blob is named by one of three sets of labels,
read in this order (the labels containerd and its remote snapshotters agree on):

- containerd's CRI labels ``cri.image-ref`` and ``cri.layer-digest`` (with
  ``disable_snapshot_annotations = false``);
- blockfs's own labels, set by ``blockfs image pull``: ``blockfs.image-ref``,
  ``blockfs.layer-digest``, ``blockfs.layer-size`` and ``blockfs.plain-http``;
- ctr-remote's ``remote/stargz.reference`` and ``remote/stargz.digest``.

The layer is trusted only through its TOC digest, which containerd copies from the
layer descriptor's annotation into the label ``containerd.io/snapshot/stargz/toc.digest``.
Without it a layer is never served lazily, whatever else the labels say.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs

from blockfs.errors import BlockfsError
from blockfs.image import SourceSpec, registry_source_spec
from blockfs.oci import InvalidDigest, InvalidReference, Reference, validate_digest
from blockfs.oci import annotations as oci_annotations

# -- labels ------------------------------------------------------------------------------

# The chainID the snapshot is to be committed as; its presence asks for a remote snapshot.
TARGET_LABEL = "containerd.io/snapshot.ref"
TOC_DIGEST_LABEL = oci_annotations.ESTARGZ_TOC_DIGEST
TOC_TAIL_LABEL = oci_annotations.ESTARGZ_TOC_TAIL
PREFETCH_END_LABEL = oci_annotations.ESTARGZ_PREFETCH_END
# Set on the snapshots committed lazily, as the reference snapshotter does.
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_VALUE = "true"

CRI_IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
CRI_MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"

BLOCKFS_IMAGE_REF_LABEL = "containerd.io/snapshot/blockfs.image-ref"
BLOCKFS_LAYER_DIGEST_LABEL = "containerd.io/snapshot/blockfs.layer-digest"
BLOCKFS_LAYER_SIZE_LABEL = "containerd.io/snapshot/blockfs.layer-size"
BLOCKFS_PLAIN_HTTP_LABEL = "containerd.io/snapshot/blockfs.plain-http"
BLOCKFS_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/blockfs.image-layers"

STARGZ_REFERENCE_LABEL = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"

# (image ref, layer digest, later layers) label of each labeller, in the order tried.
_LABELLERS = (
    ("cri", CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL, CRI_IMAGE_LAYERS_LABEL),
    ("blockfs", BLOCKFS_IMAGE_REF_LABEL, BLOCKFS_LAYER_DIGEST_LABEL, BLOCKFS_IMAGE_LAYERS_LABEL),
    ("ctr-remote", STARGZ_REFERENCE_LABEL, STARGZ_DIGEST_LABEL, STARGZ_LAYERS_LABEL),
)


class NoRemoteSource(BlockfsError):
    """The labels of a Prepare do not make a layer that can be served lazily.

    ``layer_digest`` is the layer's blob digest when the labels name one.
    """

    def __init__(self, message: str, *, layer_digest: str | None = None) -> None:
        super().__init__(message)
        self.layer_digest = layer_digest

    def context(self) -> list[str]:
        return [f"layer {self.layer_digest}"] if self.layer_digest else []


@attrs.frozen
class RegistrySettings:
    """How the daemon reaches registries: hosts.toml directory and docker credentials."""

    hosts_dir: Path | None = None
    docker_config: str | None = None

    def spec(self, ref: Reference, *, plain_http: bool, size: int | None) -> SourceSpec:
        """The source spec of blob ``ref`` under these settings."""
        hosts_dir = (
            self.hosts_dir if self.hosts_dir is not None and self.hosts_dir.is_dir() else None
        )
        return registry_source_spec(
            ref,
            plain_http=plain_http,
            hosts_dir=hosts_dir,
            docker_config=self.docker_config,
            size=size,
        )


@attrs.frozen
class RemoteLayer:
    """A layer to serve lazily: its blob digest, the TOC digest it must have, its source.

    ``image_layers`` are the digests of the image's later layers, as far as the labels
    list them (their TOCs may be fetched ahead); each shares the source's repository.
    ``toc_tail`` is how many bytes at the blob's end hold its TOC and footer, when the
    image says (:data:`TOC_TAIL_LABEL`). ``manifest`` is the digest of the image's
    manifest, in the same repository, when the labels give it (CRI's do).
    """

    digest: str
    toc_digest: str
    source: SourceSpec
    labeller: str
    image_layers: tuple[str, ...] = ()
    toc_tail: int | None = None
    manifest: str | None = None


def remote_layer(labels: Mapping[str, str], settings: RegistrySettings) -> RemoteLayer:
    """The layer that ``labels`` (of a Prepare) ask for; NoRemoteSource says why there is none."""
    if TARGET_LABEL not in labels:
        raise NoRemoteSource(f"no {TARGET_LABEL} label")
    named = next(
        (entry for entry in _LABELLERS if labels.get(entry[1]) and labels.get(entry[2])), None
    )
    if named is None:
        raise NoRemoteSource(
            "the labels name no layer blob (no CRI labels with disable_snapshot_annotations"
            " = false, no labels of blockfs image pull)",
            layer_digest=labels.get(CRI_LAYER_DIGEST_LABEL) or None,
        )
    labeller, ref_label, digest_label, layers_label = named
    image_ref, digest = labels[ref_label], labels[digest_label]
    try:
        validate_digest(digest)
    except InvalidDigest as e:
        raise NoRemoteSource(f"label {digest_label}: {e}") from None
    toc_digest = labels.get(TOC_DIGEST_LABEL, "")
    if not toc_digest:
        raise NoRemoteSource(
            f"not an eStargz layer: its descriptor has no {TOC_DIGEST_LABEL} annotation",
            layer_digest=digest,
        )
    try:
        validate_digest(toc_digest)
        ref = Reference.parse(image_ref)
    except (InvalidDigest, InvalidReference) as e:
        raise NoRemoteSource(f"invalid remote-snapshot label: {e}", layer_digest=digest) from None
    size: int | None = None
    if labeller == "blockfs":
        size_text = labels.get(BLOCKFS_LAYER_SIZE_LABEL, "")
        size = int(size_text) if size_text.isdigit() else None
    plain_http = labeller == "blockfs" and labels.get(BLOCKFS_PLAIN_HTTP_LABEL) == "true"
    later = tuple(
        d.strip() for d in labels.get(layers_label, "").split(",") if d.strip() and d != digest
    )
    return RemoteLayer(
        digest=digest,
        toc_digest=toc_digest,
        source=settings.spec(ref.with_digest(digest), plain_http=plain_http, size=size),
        labeller=labeller,
        image_layers=later,
        toc_tail=toc_tail(labels),
        manifest=_digest_or_none(labels.get(CRI_MANIFEST_DIGEST_LABEL, "")),
    )


def _digest_or_none(text: str) -> str | None:
    # An optional label: one that is not a digest is left out, not an error.
    try:
        validate_digest(text)
    except InvalidDigest:
        return None
    return text


def toc_tail(annotations: Mapping[str, str]) -> int | None:
    """The TOC tail size that a layer's annotations (or Prepare labels) give, if any."""
    return _size(annotations.get(TOC_TAIL_LABEL, ""))


def prefetch_end(annotations: Mapping[str, str], blob_size: int) -> int | None:
    """Where a layer's prioritised files end, as its annotations give it, if inside the
    blob of ``blob_size`` bytes."""
    end = _size(annotations.get(PREFETCH_END_LABEL, ""))
    return end if end is not None and 0 < end < blob_size else None


def _size(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 20 else None


def sibling_source(layer: RemoteLayer, digest: str) -> SourceSpec:
    """The source spec of another blob ``digest`` of ``layer``'s repository."""
    ref = Reference.parse(layer.source["ref"]).with_digest(digest)
    spec = dict(layer.source)
    spec["ref"] = f"{ref.name}@{digest}"
    spec["size"] = None
    return spec


def layer_name(digest: str) -> str:
    """The name of a layer's directory and NBD export: ``sha256-<hex>``."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"
