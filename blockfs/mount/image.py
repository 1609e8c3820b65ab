"""Standalone mounts of a whole image, for ``blockfs image mount|stats|umount``.

No containerd is involved. The image (a registry reference or ``oci:DIR[:TAG]``) is
resolved for this host's platform, and each layer, bottom first, becomes a directory:

- an eStargz layer with a ``toc.digest`` annotation is indexed from its footer and TOC
  alone and served lazily by one NBD server private to this mount (one export per layer),
  attached and mounted read-only as EROFS;
- any other layer is downloaded, checked against its diff_id and extracted into a plain
  directory, its OCI whiteouts turned into overlayfs ones. The reason is logged.

The layers are stacked with overlayfs at the mount point (read-only, or writable with an
upper directory in the run directory). The run directory's ``image.json`` records all of
it, so that ``umount`` undoes exactly that.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import attrs
import zstandard

from blockfs.convert import (
    ImageLocation,
    LayoutLocation,
    RegistryLocation,
    open_location,
    resolve_image,
)
from blockfs.erofs import ErofsLayoutError
from blockfs.errors import BlockfsError
from blockfs.estargz import BlobReader, CountingSource, FormatError
from blockfs.host import mounts
from blockfs.host.attach import (
    AUTO,
    AttachChoice,
    AttachError,
    Attachment,
    attach_and_mount,
    choose_mode,
    unmount_and_detach,
)
from blockfs.host.nbdserver import NBDServer, socket_path
from blockfs.host.overlay import MountPlan, mounts_for, overlay_index_off_supported
from blockfs.image import (
    BlobSources,
    LayerRecord,
    SourceSpec,
    docker_config_path,
    file_source_spec,
    index_layer,
    query_stats,
    registry_source_spec,
)
from blockfs.mount._rundir import (
    IMAGE_RECORD,
    fresh_run_dir,
    read_record,
    run_dir_of,
    server_config,
)
from blockfs.mount._rundir import write_record as _write_record
from blockfs.oci import Descriptor, ImageConfig, Platform, new_hasher
from blockfs.oci import annotations as ann
from blockfs.oci import media_types as mt

log = logging.getLogger("blockfs.imagemount")

MS_BIND = 4096
MS_REMOUNT = 32
MS_REC = 16384
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Names starting with this are AUFS bookkeeping (``.wh..wh.plnk``), not whiteouts.
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
_PIECE = 1 << 20

LayerKind = Literal["lazy", "extracted"]


class ImageMountError(BlockfsError):
    """An image could not be mounted, found or unmounted."""


@attrs.frozen
class MountedLayer:
    """One layer of a mounted image: where its directory is and how it got there."""

    digest: str
    size: int
    kind: LayerKind
    path: str
    export: str | None = None
    attachment: Attachment | None = None
    reason: str = ""  # why an extracted layer is not lazy

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["attachment"] = self.attachment.to_json() if self.attachment else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountedLayer:
        fields = dict(data)
        if fields.get("attachment") is not None:
            fields["attachment"] = Attachment.from_json(fields["attachment"])
        return cls(**fields)


def _layer_tuple(layers: Iterable[MountedLayer]) -> tuple[MountedLayer, ...]:
    return tuple(layers)


@attrs.frozen
class ImageMount:
    """An image mounted by :func:`mount_image`; ``layers`` bottom first."""

    mountpoint: str
    reference: str
    manifest: str
    platform: str | None
    run_dir: str
    writable: bool
    layers: tuple[MountedLayer, ...] = attrs.field(converter=_layer_tuple)

    @property
    def lazy_layers(self) -> list[MountedLayer]:
        """The layers served lazily over NBD."""
        return [layer for layer in self.layers if layer.kind == "lazy"]

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["layers"] = [layer.to_json() for layer in self.layers]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageMount:
        fields = dict(data)
        fields["layers"] = [MountedLayer.from_json(layer) for layer in fields["layers"]]
        return cls(**fields)


@attrs.frozen
class _Registry:
    """How to reach registries: the options every source spec of the mount repeats."""

    plain_http: bool
    hosts_dir: str | None
    docker_config: str | None


def mount_image(
    ref: str,
    mountpoint: str,
    *,
    root: str,
    writable: bool = False,
    plain_http: bool = False,
    hosts_dir: str | None = None,
    attach: AttachChoice = AUTO,
    prefetch: bool = False,
    lazy: bool = True,
    platform: Platform | None = None,
    trace: str | None = None,
) -> ImageMount:
    """Mount the image ``ref`` (registry reference or ``oci:DIR[:TAG]``) at ``mountpoint``.

    With ``lazy`` False every layer is downloaded and extracted (what a full pull does).
    With ``trace`` (a directory), the server appends to ``trace/<export>`` the files of
    each lazy layer at the first read of their data (ServerConfig ``trace``).
    On failure, everything done so far is undone.
    """
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ImageMountError(f"mount point {mountpoint} is not a directory; create it first")
    if any(c in str(Path(root).absolute()) for c in ",:"):
        raise ImageMountError(f"the state directory {root} must not contain ',' or ':' (overlay)")
    if mounts.find_mount(os.path.realpath(mountpoint)) is not None:
        raise ImageMountError(f"something is already mounted on {mountpoint}: unmount it first")
    mode = choose_mode(attach) if lazy else attach
    try:
        run_dir = fresh_run_dir(root, mountpoint)
    except FileExistsError as e:
        raise ImageMountError(str(e)) from None
    registry = _Registry(
        plain_http, os.path.abspath(hosts_dir) if hosts_dir else None, docker_config_path()
    )
    served = server_config(root, run_dir, prefetch=prefetch)
    if trace is not None:
        served = attrs.evolve(served, trace=Path(trace).absolute())
    # No daemon watches a standalone mount's server: its shell starts it again if it dies.
    server = NBDServer(run_dir, served, restart=True)
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, run_dir, ignore_errors=True)
        with BlobSources() as sources:
            client = sources.client(
                plain_http=registry.plain_http,
                hosts_dir=registry.hosts_dir,
                docker_config=registry.docker_config,
            )
            location = open_location(ref, lambda: client)
            image = resolve_image(location, platform)
            if image.platform is not None:
                log.info("%s is a multi-platform index; mounting %s", ref, image.platform)
            config = ImageConfig.from_bytes(location.read_blob(image.manifest.config))
            diff_ids = config.diff_ids
            if not image.manifest.layers:
                raise ImageMountError(f"{ref} has no layers: there is nothing to mount")
            if len(diff_ids) != len(image.manifest.layers):
                raise ImageMountError(
                    f"{ref}: the config lists {len(diff_ids)} diff_ids for "
                    f"{len(image.manifest.layers)} layers"
                )
            layers = [
                _prepare_layer(
                    location, sources, registry, layer, diff_id, position, run_dir, lazy=lazy
                )
                for position, (layer, diff_id) in enumerate(
                    zip(image.manifest.layers, diff_ids, strict=True)
                )
            ]
        if any(layer.kind == "lazy" for layer in layers):
            undo.callback(server.stop)
            server.start()
        for position, layer in enumerate(layers):
            if layer.kind == "lazy":
                assert layer.export is not None
                os.makedirs(layer.path)
                attachment = attach_and_mount(
                    str(server.socket),
                    layer.export,
                    layer.path,
                    state_dir=str(run_dir / "attach" / layer.export),
                    mode=mode,
                )
                undo.callback(unmount_and_detach, attachment)
                layers[position] = attrs.evolve(layer, attachment=attachment)
        _mount_overlay(run_dir, layers, mountpoint, writable)
        undo.callback(mounts.umount, mountpoint, lazy=True)
        mounted = ImageMount(
            mountpoint=mountpoint,
            reference=ref,
            manifest=image.descriptor.digest,
            platform=str(image.platform) if image.platform else None,
            run_dir=str(run_dir),
            writable=writable,
            layers=layers,
        )
        _write_record(run_dir, IMAGE_RECORD, mounted.to_json())
        undo.pop_all()
    return mounted


def _lazy_refusal(layer: Descriptor) -> str | None:
    """Why ``layer`` cannot be mounted lazily (before looking at its bytes), or None."""
    if ann.ESTARGZ_TOC_DIGEST not in layer.annotations:
        return "no eStargz TOC digest annotation"
    if mt.layer_compression(layer.media_type) not in ("gzip", "zstd"):
        return f"media type {layer.media_type} cannot be eStargz"
    return None


def _source_spec(location: ImageLocation, layer: Descriptor, registry: _Registry) -> SourceSpec:
    if isinstance(location, LayoutLocation):
        return file_source_spec(location.layout.blob_path(layer.digest))
    assert isinstance(location, RegistryLocation)
    return registry_source_spec(
        location.ref.with_digest(layer.digest),
        plain_http=registry.plain_http,
        hosts_dir=registry.hosts_dir,
        docker_config=registry.docker_config,
        size=layer.size,
    )


def _prepare_layer(
    location: ImageLocation,
    sources: BlobSources,
    registry: _Registry,
    layer: Descriptor,
    diff_id: str,
    position: int,
    run_dir: Path,
    *,
    lazy: bool,
) -> MountedLayer:
    """Index ``layer`` for lazy serving or, failing that, extract it; its MountedLayer."""
    name = f"{position:03d}-{layer.digest.partition(':')[2][:12]}"
    reason = _lazy_refusal(layer) if lazy else "a full pull was asked for"
    if reason is None:
        spec = _source_spec(location, layer, registry)
        source = CountingSource(sources.open(spec))
        try:
            reader = BlobReader.open(source, toc_digest=layer.annotations[ann.ESTARGZ_TOC_DIGEST])
            index_layer(
                reader,
                run_dir / "layers" / name,
                name=name,
                source=spec,
                bytes_fetched=source.bytes_read,
            )
        except (FormatError, ErofsLayoutError) as e:
            reason = f"not servable lazily: {e}"
        else:
            path = str(run_dir / "lower" / name)
            return MountedLayer(layer.digest, layer.size, "lazy", path, export=name)
    if lazy:
        log.warning("layer %s of %s is downloaded whole: %s", layer.digest, location.name, reason)
    target = run_dir / "extracted" / name
    _extract_layer(location, layer, diff_id, target, run_dir)
    return MountedLayer(layer.digest, layer.size, "extracted", str(target), reason=reason)


def _extract_layer(
    location: ImageLocation, layer: Descriptor, diff_id: str, target: Path, run_dir: Path
) -> None:
    """Download ``layer``, check its diff_id and extract it into ``target`` for overlayfs."""
    compression = mt.layer_compression(layer.media_type)
    if compression is None:
        raise ImageMountError(f"layer {layer.digest} has media type {layer.media_type!r}")
    downloads = run_dir / "downloads"
    downloads.mkdir(exist_ok=True)
    blob = location.local_blob(layer, downloads, lambda n: None)
    target.mkdir(parents=True)
    try:
        with open(blob, "rb") as raw, _decompressed(raw, compression) as tar:
            actual = _untar(tar, target, diff_id)
    finally:
        if blob.parent == downloads:
            blob.unlink()
    if actual != diff_id:
        raise ImageMountError(
            f"layer {layer.digest} of {location.name} uncompresses to {actual}, "
            f"but the image config says {diff_id}"
        )
    apply_whiteouts(target)


@contextlib.contextmanager
def _decompressed(raw: IO[bytes], compression: str) -> Iterator[IO[bytes]]:
    if compression == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as plain:
            yield plain  # type: ignore[misc]
    elif compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with reader:
            yield reader
    else:
        yield raw


def _untar(tar: IO[bytes], target: Path, diff_id: str) -> str:
    """Feed the layer tar to GNU tar (which refuses paths leaving ``target`` and defers
    symlinks so that none is followed while extracting); returns the tar's digest."""
    hasher = new_hasher(diff_id)
    command = [
        "tar", "--extract", "--file=-", f"--directory={target}", "--numeric-owner",
        "--same-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*",
    ]  # fmt: skip
    # tar's messages go to a file: a pipe that fills up would stall it, and us with it.
    with tempfile.TemporaryFile() as messages:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=messages
        )
        assert proc.stdin is not None
        feeding = True
        while piece := tar.read(_PIECE):
            hasher.update(piece)
            if feeding:
                try:
                    proc.stdin.write(piece)
                except BrokenPipeError:
                    # tar stops at the end-of-archive blocks; what follows (padding) still
                    # counts for the diff_id. If it stopped early, its status says why.
                    feeding = False
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        status = proc.wait()
        messages.seek(0)
        errors = messages.read().decode(errors="replace").strip()
    if status != 0:
        raise ImageMountError(f"tar could not extract a layer into {target}: {errors}")
    return f"{hasher.name}:{hasher.hexdigest()}"


def apply_whiteouts(root: Path) -> None:
    """Turn the OCI whiteouts of an extracted layer into what overlayfs reads.

    ``.wh.NAME`` becomes a 0/0 character device ``NAME`` (unless the layer itself has
    ``NAME``: a whiteout only hides lower layers); ``.wh..wh..opq`` becomes the xattr
    ``trusted.overlay.opaque=y`` on its directory. Other ``.wh..wh.`` names are dropped.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                dirnames.remove(name)
            else:
                os.unlink(path)
            if name == OPAQUE_MARKER:
                os.setxattr(dirpath, OPAQUE_XATTR, b"y", follow_symlinks=False)
            elif not name.startswith(WHITEOUT_META_PREFIX):
                hidden = os.path.join(dirpath, name[len(WHITEOUT_PREFIX) :])
                if not os.path.lexists(hidden):
                    os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _mount_overlay(
    run_dir: Path, layers: list[MountedLayer], mountpoint: str, writable: bool
) -> None:
    """Stack ``layers`` (bottom first) at ``mountpoint`` as containerd's overlayfs would."""
    upper, work = run_dir / "upper", run_dir / "work"
    if writable:
        upper.mkdir()
        work.mkdir()
    plan = MountPlan(
        writable=writable,
        fs=upper,
        work=work,
        lowers=[layer.path for layer in reversed(layers)],
    )
    (spec,) = mounts_for(plan, index_off=overlay_index_off_supported())
    try:
        if spec.type == "bind":
            mounts.mount(spec.source, mountpoint, "", MS_BIND | MS_REC)
            if "ro" in spec.options:
                mounts.mount("", mountpoint, "", MS_REMOUNT | MS_BIND | MS_REC | mounts.MS_RDONLY)
        else:
            flags = 0 if writable else mounts.MS_RDONLY
            mounts.mount("overlay", mountpoint, "overlay", flags, ",".join(spec.options))
    except mounts.MountError as e:
        raise ImageMountError(f"cannot stack the image's layers at {mountpoint}: {e}") from e


def _load(mountpoint: str, root: str) -> ImageMount:
    record = read_record(run_dir_of(root, mountpoint), IMAGE_RECORD)
    if record is None:
        raise ImageMountError(
            f"{mountpoint} is not a blockfs image mount (no record under {root}/mounts)"
        )
    return ImageMount.from_json(record)


def umount_image(mountpoint: str, *, root: str) -> None:
    """Undo :func:`mount_image`: the overlay, every layer mount, the server, the run dir.

    Copies of the mounts in other mount namespaces do not stop it (the mounts are
    detached here, with a warning naming those namespaces); what in this namespace still
    uses the image (processes inside it, mounts on it) makes it fail, naming them, and
    running it again once they are gone finishes the job.
    """
    mounted = _load(mountpoint, root)
    run_dir = Path(mounted.run_dir)
    again = f"then run `blockfs image umount {mounted.mountpoint}` again"
    top = mounts.find_mount(os.path.realpath(mounted.mountpoint))
    try:
        # An overlay is the image's own; a bind mount (of a single layer) shares its
        # filesystem with the layer's mount, which comes next.
        sole = top is not None and top.fstype == "overlay"
        detached = mounts.unmount(os.path.realpath(mounted.mountpoint), sole=sole)
    except mounts.MountBusyError as e:
        raise ImageMountError(
            f"{e.message}: stop those processes or unmount what uses it, {again}"
        ) from e
    except mounts.MountError as e:
        raise ImageMountError(f"cannot unmount {mounted.mountpoint}: {e.strerror}") from e
    if detached is not None:
        log.warning(
            "the image mounted on %s is %s; detached it here: reads through those copies "
            "fail from now on",
            mounted.mountpoint,
            detached.describe(),
        )
    for layer in reversed(mounted.layers):
        if layer.attachment is not None:
            try:
                unmount_and_detach(layer.attachment)
            except AttachError as e:
                raise ImageMountError(f"{e}; {again}") from e
    NBDServer(run_dir, server_config(root, run_dir, prefetch=False)).stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def image_stats(mountpoint: str, *, root: str) -> dict[str, Any]:
    """What the mounted image has fetched: per layer and in total, against its size.

    A lazy layer counts the blob bytes its server read (footer and TOC included); an
    extracted layer counts its whole blob.
    """
    mounted = _load(mountpoint, root)
    served: dict[str, Any] = {}
    if mounted.lazy_layers:
        control = socket_path(mounted.run_dir, "control.sock")
        served = query_stats(str(control))["layers"]
    layers = []
    for layer in mounted.layers:
        entry: dict[str, Any] = {"digest": layer.digest, "kind": layer.kind, "size": layer.size}
        if layer.export is not None:
            stats = served.get(layer.export)
            if stats is None:  # indexed but never opened: only the index was read
                record = LayerRecord.load(Path(mounted.run_dir) / "layers" / layer.export)
                stats = {"bytes_fetched": record.index_bytes_fetched}
            entry.update(stats)
        else:
            entry["bytes_fetched"] = layer.size
            entry["reason"] = layer.reason
        layers.append(entry)
    return {
        "reference": mounted.reference,
        "manifest": mounted.manifest,
        "platform": mounted.platform,
        "writable": mounted.writable,
        "image_size": sum(layer.size for layer in mounted.layers),
        "bytes_fetched": sum(entry["bytes_fetched"] for entry in layers),
        "layers": layers,
    }
