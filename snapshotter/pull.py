"""Pull an image through containerd so that blockfs-snapshotter serves its layers lazily.

What ``blockfs image pull`` does, like ctr-remote's ``rpull``: resolve the manifest for
this platform, store manifest and config in containerd's content store (with the
``containerd.io/gc.ref.*`` labels containerd's own pull writes), then prepare each
layer's snapshot *through containerd* with ``containerd.io/snapshot.ref`` set to its
chainID, the layer's TOC-digest annotation and blockfs's source labels, exactly as
containerd's unpacker would. The snapshotter answers ALREADY_EXISTS for each layer it
mounts lazily; a layer it cannot (not eStargz) is downloaded into the content store,
applied by containerd's differ and committed, as an ordinary pull does. Last, the
image record is created, so that ``ctr run --snapshotter blockfs REF`` starts it.

Everything is made under a containerd lease, so that nothing is garbage collected
before the image refers to it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import attrs

from blockfs.errors import BlockfsError
from blockfs.oci import Descriptor, ImageConfig, Manifest, Platform, Reference
from blockfs.registry import RegistryClient
from snapshotter.defaults import SNAPSHOTTER_NAME
from snapshotter.remote import (
    BLOCKFS_IMAGE_LAYERS_LABEL,
    BLOCKFS_IMAGE_REF_LABEL,
    BLOCKFS_LAYER_DIGEST_LABEL,
    BLOCKFS_LAYER_SIZE_LABEL,
    BLOCKFS_PLAIN_HTTP_LABEL,
    REMOTE_LABEL,
    REMOTE_VALUE,
    TARGET_LABEL,
)

if TYPE_CHECKING:
    # gRPC: `blockfs image pull` loads it while the registry answers (snapshotter.pullcmd).
    from snapshotter._gen.containerd.types import mount_pb2
    from snapshotter.ctrclient import ContainerdClient

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER = SNAPSHOTTER_NAME
# Labels containerd passes on to a snapshotter; layer annotations with this prefix become
# Prepare labels, as containerd's unpacker does it.
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_CONFIG_LABEL = "containerd.io/gc.ref.content.config"
GC_LAYER_LABEL = "containerd.io/gc.ref.content.l.{}"
GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot.{}"
# containerd's limit on one label, key plus value.
MAX_LABEL_BYTES = 4096


class PullError(BlockfsError):
    """The image cannot be pulled: a bad config, or a layer that fails to unpack."""


@attrs.frozen
class PulledLayer:
    """One layer of a pulled image: its blob, chainID, and how it got there."""

    digest: str
    chain_id: str
    lazy: bool
    size: int


@attrs.frozen
class PullResult:
    """The image as recorded in containerd."""

    name: str
    manifest: Descriptor
    layers: tuple[PulledLayer, ...]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chainID of each layer from the config's diffIDs (OCI image spec)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def _label_list(key: str, digests: Sequence[str]) -> str:
    """Comma-separated ``digests``, as many as fit in one label."""
    kept: list[str] = []
    used = len(key.encode())
    for digest in digests:
        extra = len(digest) + (1 if kept else 0)
        if used + extra > MAX_LABEL_BYTES:
            break
        kept.append(digest)
        used += extra
    return ",".join(kept)


def layer_labels(
    ref: Reference, manifest: Manifest, index: int, chain_id: str, *, plain_http: bool
) -> dict[str, str]:
    """The Prepare labels of layer ``index``: the target, its annotations, blockfs's source."""
    layer = manifest.layers[index]
    labels = {k: v for k, v in layer.annotations.items() if k.startswith(SNAPSHOT_LABEL_PREFIX)}
    labels.update(
        {
            TARGET_LABEL: chain_id,
            BLOCKFS_IMAGE_REF_LABEL: str(ref),
            BLOCKFS_LAYER_DIGEST_LABEL: layer.digest,
            BLOCKFS_LAYER_SIZE_LABEL: str(layer.size),
            BLOCKFS_IMAGE_LAYERS_LABEL: _label_list(
                BLOCKFS_IMAGE_LAYERS_LABEL, [d.digest for d in manifest.layers[index:]]
            ),
        }
    )
    if plain_http:
        labels[BLOCKFS_PLAIN_HTTP_LABEL] = "true"
    return labels


@attrs.frozen
class ResolvedImage:
    """An image's manifest and config, as the registry gave them."""

    ref: Reference
    manifest_descriptor: Descriptor
    manifest: Manifest
    config_bytes: bytes
    config: ImageConfig


def resolve_image(
    registry: RegistryClient,
    ref: Reference,
    platform: Platform | None = None,
    *,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> ResolvedImage:
    """Fetch ``ref``'s manifest for ``platform`` and its config, and check that they
    agree; ``on_manifest`` gets the manifest before the config is fetched."""
    manifest_descriptor, manifest = registry.get_image_manifest(ref, platform)
    if on_manifest is not None:
        on_manifest(manifest)
    config_bytes = registry.get_blob(ref, manifest.config.digest)
    config = ImageConfig.from_bytes(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise PullError(
            f"{ref}: the config lists {len(config.diff_ids)} diffIDs for "
            f"{len(manifest.layers)} layers"
        )
    return ResolvedImage(ref, manifest_descriptor, manifest, config_bytes, config)


def pull_image(
    ctr: ContainerdClient,
    registry: RegistryClient,
    image: ResolvedImage,
    *,
    snapshotter: str = DEFAULT_SNAPSHOTTER,
    plain_http: bool = False,
    report: Callable[[PulledLayer], None] | None = None,
) -> PullResult:
    """Pull ``image`` (:func:`resolve_image`) into containerd for ``snapshotter``, lazily
    where the snapshotter can.

    ``report`` is called after each layer.
    """
    ref, manifest_descriptor, manifest = image.ref, image.manifest_descriptor, image.manifest
    config_bytes, config = image.config_bytes, image.config
    diff_ids = config.diff_ids
    chains = chain_ids(diff_ids)
    name = str(ref)
    layers: list[PulledLayer] = []
    with ctr.lease(), ThreadPoolExecutor(1, thread_name_prefix="pull-content") as pool:

        def write_content() -> None:
            config_labels = {GC_SNAPSHOT_LABEL.format(snapshotter): chains[-1]} if chains else {}
            ctr.write_content(config.digest, len(config_bytes), config_bytes, config_labels)
            manifest_labels = {GC_CONFIG_LABEL: manifest.config.digest}
            manifest_labels.update(
                {GC_LAYER_LABEL.format(i): layer.digest for i, layer in enumerate(manifest.layers)}
            )
            manifest_bytes = manifest.to_bytes()
            ctr.write_content(
                manifest_descriptor.digest, len(manifest_bytes), manifest_bytes, manifest_labels
            )

        # The config and manifest go into the content store while the layers are
        # prepared (under the same lease): only the image record needs them.
        written = pool.submit(write_content)
        parent = ""
        for i, layer in enumerate(manifest.layers):
            labels = layer_labels(ref, manifest, i, chains[i], plain_http=plain_http)
            lazy = _prepare_layer(
                ctr, registry, ref, snapshotter, layer, diff_ids[i], parent, labels
            )
            pulled = PulledLayer(layer.digest, chains[i], lazy, layer.size)
            layers.append(pulled)
            if report is not None:
                report(pulled)
            parent = chains[i]
        written.result()
        ctr.put_image(name, manifest_descriptor)
    return PullResult(name, manifest_descriptor, tuple(layers))


def _prepare_layer(
    ctr: ContainerdClient,
    registry: RegistryClient,
    ref: Reference,
    snapshotter: str,
    layer: Descriptor,
    diff_id: str,
    parent: str,
    labels: dict[str, str],
) -> bool:
    """Make the snapshot of one layer; True if the snapshotter serves it lazily.

    Two calls to containerd for a layer served lazily or there before, as containerd's
    own unpacker makes: the Prepare, which containerd answers ALREADY_EXISTS when the
    target snapshot exists (whatever the snapshotter) or the snapshotter has just
    committed it, and a Stat, whose labels say whether the snapshotter serves it."""
    chain_id = labels[TARGET_LABEL]
    key = f"extract-{uuid.uuid4().hex[:16]} {chain_id}"
    mounts = ctr.prepare_snapshot(snapshotter, key, parent, labels)
    if mounts is None:
        committed = ctr.snapshot_labels(snapshotter, chain_id)
        if committed is None:
            raise PullError(f"snapshot {chain_id} of layer {layer.digest} was not committed")
        return committed.get(REMOTE_LABEL) == REMOTE_VALUE
    try:
        _unpack(ctr, registry, ref, layer, diff_id, mounts)
        ctr.commit_snapshot(snapshotter, chain_id, key, labels)
    except BaseException:
        try:
            ctr.remove_snapshot(snapshotter, key)
        except BlockfsError as e:
            log.warning("cannot remove snapshot %s after a failed unpack: %s", key, e)
        raise
    return False


def _unpack(
    ctr: ContainerdClient,
    registry: RegistryClient,
    ref: Reference,
    layer: Descriptor,
    diff_id: str,
    mounts: Sequence[mount_pb2.Mount],
) -> None:
    """Download ``layer`` into the content store and have containerd apply it."""
    labels = {UNCOMPRESSED_LABEL: diff_id}
    if ctr.content_labels(layer.digest) is None:
        with tempfile.TemporaryDirectory(prefix="blockfs-pull-") as tmp:
            path = f"{tmp}/blob"
            registry.stream_blob(ref, layer.digest, path)
            with open(path, "rb") as blob:
                ctr.write_content(layer.digest, layer.size, blob, labels)
    else:
        ctr.set_content_labels(layer.digest, labels)
    applied = ctr.apply_layer(layer, mounts)
    if applied != diff_id:
        raise PullError(f"layer {layer.digest} unpacks to {applied}, but the config says {diff_id}")
