"""A small gRPC client of containerd itself: content, images, leases, snapshots and diff.

``blockfs image pull`` uses it to do what containerd's own pull does, through
containerd's socket: store the manifest and config, prepare each layer's snapshot with
the labels that let blockfs-snapshotter serve it lazily, unpack the layers it cannot,
and record the image. Every call carries the namespace (and, inside :meth:`lease`, the
lease) as containerd's gRPC metadata.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import grpc

from blockfs.errors import BlockfsError
from blockfs.oci import Descriptor
from snapshotter._gen.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from snapshotter._gen.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter._gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from snapshotter._gen.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from snapshotter._gen.containerd.types import descriptor_pb2, mount_pb2
from snapshotter.defaults import CONTAINERD_ADDRESS

NAMESPACE_METADATA = "containerd-namespace"
LEASE_METADATA = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
DEFAULT_ADDRESS = CONTAINERD_ADDRESS
# containerd accepts messages up to 16 MiB; content is written in smaller pieces.
WRITE_PIECE = 1 << 20


class ContainerdError(BlockfsError):
    """A call to containerd failed; ``code`` is the gRPC status (None: not reached)."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _failed(what: str, error: grpc.RpcError) -> ContainerdError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"{details} (is containerd running, and is this its socket?)"
    name = code.name if code is not None else "error"
    return ContainerdError(f"{what}: {name}: {details}", code=code)


def _descriptor_message(descriptor: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=descriptor.media_type,
        digest=descriptor.digest,
        size=descriptor.size,
        annotations=dict(descriptor.annotations),
    )


def warm_up() -> None:
    """Load now what a process's first client channel loads (gRPC's channel code: 20 ms
    and more from a cold page cache). A long-running process (the snapshotter's daemon)
    calls it at start, so that its first pull does not."""
    grpc.insecure_channel("unix:///dev/null").close()


class ContainerdClient:
    """containerd at the unix socket ``address``, working in ``namespace``."""

    def __init__(
        self, address: str | os.PathLike[str], namespace: str, *, timeout: float = 300.0
    ) -> None:
        self.address = os.path.abspath(address)
        self.namespace = namespace
        self.timeout = timeout
        self._lease: str | None = None
        self._channel = grpc.insecure_channel(
            f"unix://{self.address}",
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        self._content: Any = content_pb2_grpc.ContentStub(self._channel)  # type: ignore[no-untyped-call]
        self._images: Any = images_pb2_grpc.ImagesStub(self._channel)  # type: ignore[no-untyped-call]
        self._leases: Any = leases_pb2_grpc.LeasesStub(self._channel)  # type: ignore[no-untyped-call]
        self._snapshots: Any = snapshots_pb2_grpc.SnapshotsStub(self._channel)  # type: ignore[no-untyped-call]
        self._diff: Any = diff_pb2_grpc.DiffStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [(NAMESPACE_METADATA, self.namespace)]
        if self._lease is not None:
            metadata.append((LEASE_METADATA, self._lease))
        return metadata

    def _call(self, what: str, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _failed(what, e) from None

    # -- leases --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, expire: timedelta = timedelta(hours=1)) -> Iterator[str]:
        """Hold a lease for the block: what is made meanwhile is safe from containerd's GC.

        The lease expires after ``expire`` even if this process dies.
        """
        if self._lease is not None:
            yield self._lease
            return
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(
            id=f"blockfs-pull-{uuid.uuid4().hex[:12]}", labels={GC_EXPIRE_LABEL: until}
        )
        created = self._call("create lease", self._leases.Create, request)
        self._lease = created.lease.id
        try:
            yield created.lease.id
        finally:
            self._lease = None
            self._call(
                "delete lease", self._leases.Delete, leases_pb2.DeleteRequest(id=created.lease.id)
            )

    # -- content -------------------------------------------------------------------------

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """The labels of blob ``digest`` in the content store, or None if it is not there."""
        try:
            info = self._content.Info(
                content_pb2.InfoRequest(digest=digest),
                metadata=self._metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise _failed(f"content info {digest}", e) from None
        return dict(info.info.labels)

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Add ``labels`` to blob ``digest`` (others are kept)."""
        if not labels:
            return
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels))
        )
        request.update_mask.paths.extend(f"labels.{key}" for key in labels)
        self._call(f"label content {digest}", self._content.Update, request)

    def write_content(
        self,
        digest: str,
        size: int,
        data: bytes | BinaryIO,
        labels: Mapping[str, str] | None = None,
    ) -> bool:
        """Store ``data`` (bytes or a binary file) as blob ``digest`` with ``labels``.

        containerd checks the size and digest. Returns False when the blob was there
        already; its labels are updated then.
        """
        labels = dict(labels or {})
        if self.content_labels(digest) is not None:
            self.set_content_labels(digest, labels)
            return False
        ref = f"blockfs-{digest}"
        requests = _write_requests(ref, digest, size, data, labels)
        try:
            for _ in self._content.Write(requests, metadata=self._metadata(), timeout=self.timeout):
                pass
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.ALREADY_EXISTS:
                self.set_content_labels(digest, labels)
                return False
            with contextlib.suppress(grpc.RpcError):
                self._content.Abort(
                    content_pb2.AbortRequest(ref=ref),
                    metadata=self._metadata(),
                    timeout=self.timeout,
                )
            raise _failed(f"write content {digest}", e) from None
        return True

    # -- images --------------------------------------------------------------------------

    def put_image(
        self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> None:
        """Create image ``name`` pointing at ``target``, or repoint it if it exists."""
        image = images_pb2.Image(
            name=name, target=_descriptor_message(target), labels=dict(labels or {})
        )
        try:
            self._images.Create(
                images_pb2.CreateImageRequest(image=image),
                metadata=self._metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.ALREADY_EXISTS):
                raise _failed(f"create image {name}", e) from None
            request = images_pb2.UpdateImageRequest(image=image)
            request.update_mask.paths.extend(["target", "labels"])
            self._call(f"update image {name}", self._images.Update, request)

    # -- snapshots -----------------------------------------------------------------------

    def snapshot_labels(self, snapshotter: str, key: str) -> dict[str, str] | None:
        """The labels of ``snapshotter``'s snapshot ``key`` in this namespace, None if
        there is none."""
        try:
            response = self._snapshots.Stat(
                snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                metadata=self._metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise _failed(f"stat snapshot {key}", e) from None
        return dict(response.info.labels)

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[mount_pb2.Mount] | None:
        """Prepare active snapshot ``key``; its mounts, or None if the snapshotter answered
        ALREADY_EXISTS (a remote snapshot: the target is committed already)."""
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        try:
            response = self._snapshots.Prepare(
                request, metadata=self._metadata(), timeout=self.timeout
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise _failed(f"prepare snapshot {key}", e) from None
        return list(response.mounts)

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str] | None = None
    ) -> None:
        """Commit active ``key`` as ``name``; a ``name`` that exists already counts as done."""
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        try:
            self._snapshots.Commit(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.ALREADY_EXISTS):
                raise _failed(f"commit snapshot {key} as {name}", e) from None

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        """Remove snapshot ``key``."""
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(f"remove snapshot {key}", self._snapshots.Remove, request)

    # -- diff ----------------------------------------------------------------------------

    def apply_layer(self, layer: Descriptor, mounts: Sequence[mount_pb2.Mount]) -> str:
        """Unpack layer blob ``layer`` (in the content store) onto ``mounts``; its diffID."""
        request = diff_pb2.ApplyRequest(diff=_descriptor_message(layer), mounts=list(mounts))
        response = self._call(f"apply layer {layer.digest}", self._diff.Apply, request)
        return str(response.applied.digest)


def _write_requests(
    ref: str, digest: str, size: int, data: bytes | BinaryIO, labels: dict[str, str]
) -> Iterable[content_pb2.WriteContentRequest]:
    offset = 0
    while True:
        if isinstance(data, bytes):
            piece = data[offset : offset + WRITE_PIECE]
        else:
            piece = data.read(WRITE_PIECE)
        if not piece:
            break
        yield content_pb2.WriteContentRequest(
            action=content_pb2.WRITE,
            ref=ref,
            total=size,
            expected=digest,
            offset=offset,
            data=piece,
        )
        offset += len(piece)
    yield content_pb2.WriteContentRequest(
        action=content_pb2.COMMIT,
        ref=ref,
        total=size,
        expected=digest,
        offset=offset,
        labels=labels,
    )
