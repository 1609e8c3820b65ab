"""containerd's ``containerd.services.snapshots.v1.Snapshots`` gRPC service over a store.

Each RPC is a few lines: read the namespace from the ``containerd-namespace`` metadata,
call the :class:`~snapshotter.store.SnapshotStore`, convert the answer to protobuf.
Store errors become the gRPC status codes containerd turns back into its errdefs
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT).

The method table is written out here instead of using the generated
``snapshots_pb2_grpc`` module, which has no type annotations; the generated messages and
the service name are the same.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from blockfs.errors import BlockfsError
from blockfs.host.overlay import Mount, MountPlan, mounts_for
from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._gen.containerd.types import mount_pb2
from snapshotter.filters import FilterSyntaxError, parse_filters
from snapshotter.layers import LayerManager, LayerUnavailable
from snapshotter.remote import (
    REMOTE_LABEL,
    REMOTE_VALUE,
    TARGET_LABEL,
    NoRemoteSource,
    RegistrySettings,
    layer_name,
    remote_layer,
)
from snapshotter.store import (
    InvalidSnapshotRequest,
    Kind,
    SnapshotExists,
    SnapshotInfo,
    SnapshotNotFound,
    SnapshotStateError,
    SnapshotStore,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_METADATA = "containerd-namespace"
# A List answer is sent in batches so that no message nears gRPC's 4 MiB default limit
# (a snapshot may carry several labels of up to 4 KiB each).
LIST_BATCH_COUNT = 100
LIST_BATCH_BYTES = 1 << 20
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)


class LayerNotMounted(BlockfsError):
    """A lazily served layer below a snapshot cannot be mounted (answered UNAVAILABLE)."""


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (SnapshotStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidSnapshotRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (FilterSyntaxError, grpc.StatusCode.INVALID_ARGUMENT),
    (LayerNotMounted, grpc.StatusCode.UNAVAILABLE),
)


class ServiceSocketError(BlockfsError):
    """The service cannot listen on its socket (in use, path too long, no permission)."""


def _log_fallback(key: str, target: str, layer_digest: str | None, reason: Exception) -> None:
    log.info(
        "remote snapshot not possible; containerd unpacks the layer",
        extra={"key": key, "target": target, "layer_digest": layer_digest, "reason": str(reason)},
    )


def _status_of(error: Exception) -> grpc.StatusCode | None:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return None


def namespace_of(context: grpc.ServicerContext) -> str | None:
    """The caller's containerd namespace, or None (containerd's garbage collector)."""
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_METADATA and isinstance(value, str) and value:
            return value
    return None


def _mount_messages(plan: MountPlan, index_off: bool) -> list[mount_pb2.Mount]:
    return [_mount_message(m) for m in mounts_for(plan, index_off=index_off)]


def _mount_message(mount: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(
        type=mount.type, source=mount.source, target=mount.target, options=mount.options
    )


def info_message(info: SnapshotInfo) -> pb.Info:
    """A store's SnapshotInfo as containerd's ``Info``."""
    message = pb.Info(name=info.name, parent=info.parent, kind=info.kind.name, labels=info.labels)
    message.created_at.FromDatetime(info.created)
    message.updated_at.FromDatetime(info.updated)
    return message


class SnapshotsService:
    """The RPCs of the Snapshots service, served from one SnapshotStore.

    With ``layers``, Prepare serves eStargz layers lazily (remote snapshots) where the
    labels allow it, reading registries as ``registry`` says.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        index_off: bool = False,
        layers: LayerManager | None = None,
        registry: RegistrySettings | None = None,
    ) -> None:
        self.store = store
        self.index_off = index_off
        self.layers = layers
        self.registry = registry if registry is not None else RegistrySettings()

    # Every RPC below takes the request and the caller's namespace.

    def prepare(
        self, request: pb.PrepareSnapshotRequest, namespace: str | None
    ) -> pb.PrepareSnapshotResponse:
        labels = dict(request.labels)
        if self.layers is not None and TARGET_LABEL in labels:
            # Answers ALREADY_EXISTS when the layer is served lazily.
            self._prepare_remote(self.layers, namespace, request.key, request.parent, labels)
        self._mount_layers(namespace, request.parent)
        plan = self.store.create(namespace, Kind.ACTIVE, request.key, request.parent, labels)
        return pb.PrepareSnapshotResponse(mounts=_mount_messages(plan, self.index_off))

    def _prepare_remote(
        self,
        layers: LayerManager,
        namespace: str | None,
        key: str,
        parent: str,
        labels: dict[str, str],
    ) -> None:
        """Commit ``labels``' target from a lazily mounted layer and raise SnapshotExists;
        return (after logging why) when the layer must be unpacked by containerd."""
        target = labels[TARGET_LABEL]
        try:
            existing = self.store.stat(namespace, target)
        except SnapshotNotFound:
            pass
        else:
            if existing.kind is Kind.COMMITTED and existing.parent == parent:
                for name in self.store.chain_layers(namespace, target):
                    layers.mount_soon(name)  # after a reboot; whoever uses it waits
                raise SnapshotExists(f"target snapshot {target!r}: already exists", key=target)
            conflict = (
                f"a {existing.kind.word} snapshot named {target!r} exists on {existing.parent!r}"
            )
            _log_fallback(key, target, None, NoRemoteSource(conflict))
            return
        try:
            layer = remote_layer(labels, self.registry)
        except NoRemoteSource as e:
            _log_fallback(key, target, e.layer_digest, e)
            return
        layers.resolve_ahead(layer)
        name = layer_name(layer.digest)
        with layers.holding(name):
            try:
                # Prepare answers once the TOC is read and checked and the layer indexed;
                # the attach and mount go on in the background, and the container's own
                # Prepare (or Mounts) waits for them in _mount_layers.
                layers.acquire(layer, wait=False)
            except LayerUnavailable as e:
                _log_fallback(key, target, layer.digest, e)
                return
            try:
                self.store.commit_remote(
                    namespace, target, parent, {**labels, REMOTE_LABEL: REMOTE_VALUE}, name
                )
            except SnapshotExists:
                pass  # committed by a concurrent Prepare of the same target
            finally:
                if not self.store.layer_in_use(name):
                    layers.release(name)
        log.info(
            "remote snapshot prepared",
            extra={
                "key": key,
                "target": target,
                "layer_digest": layer.digest,
                "labeller": layer.labeller,
                "mountpoint": str(layers.mountpoint(name)),
            },
        )
        raise SnapshotExists(f"target snapshot {target!r}: already exists", key=target)

    def _mount_layers(self, namespace: str | None, key: str) -> None:
        """Make sure the lazily served layers under ``key`` are mounted: wait for the
        mounts under way in the background (a remote Prepare does not wait for them), and
        mount again what is not (after a reboot)."""
        if self.layers is None:
            return
        for name in self.store.chain_layers(namespace, key):
            with self.layers.holding(name):
                try:
                    self.layers.ensure_mounted(name)
                except LayerUnavailable as e:
                    raise LayerNotMounted(str(e)) from e

    def view(
        self, request: pb.ViewSnapshotRequest, namespace: str | None
    ) -> pb.ViewSnapshotResponse:
        self._mount_layers(namespace, request.parent)
        plan = self.store.create(
            namespace, Kind.VIEW, request.key, request.parent, dict(request.labels)
        )
        return pb.ViewSnapshotResponse(mounts=_mount_messages(plan, self.index_off))

    def mounts(self, request: pb.MountsRequest, namespace: str | None) -> pb.MountsResponse:
        self._mount_layers(namespace, request.key)
        plan = self.store.mount_plan(namespace, request.key)
        return pb.MountsResponse(mounts=_mount_messages(plan, self.index_off))

    def commit(self, request: pb.CommitSnapshotRequest, namespace: str | None) -> empty_pb2.Empty:
        if request.parent:
            # Commit with a parent ("rebase", containerd 2.2+) is only sent to snapshotters
            # that declare the capability; blockfs does not.
            current = self.store.stat(namespace, request.key)
            if current.parent != request.parent:
                raise InvalidSnapshotRequest(
                    f"cannot commit {request.key!r} onto parent {request.parent!r}: rebase "
                    "is not supported"
                )
        self.store.commit(namespace, request.key, request.name, dict(request.labels))
        return empty_pb2.Empty()

    def remove(self, request: pb.RemoveSnapshotRequest, namespace: str | None) -> empty_pb2.Empty:
        layer = self.store.remove(namespace, request.key)
        if layer is not None and self.layers is not None:
            with self.layers.holding(layer):
                if not self.store.layer_in_use(layer) and self.layers.release(layer):
                    log.info("released layer", extra={"layer": layer})
        return empty_pb2.Empty()

    def stat(
        self, request: pb.StatSnapshotRequest, namespace: str | None
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_message(self.store.stat(namespace, request.key)))

    def update(
        self, request: pb.UpdateSnapshotRequest, namespace: str | None
    ) -> pb.UpdateSnapshotResponse:
        info = self.store.update(
            namespace,
            request.info.name,
            dict(request.info.labels),
            list(request.update_mask.paths),
        )
        return pb.UpdateSnapshotResponse(info=info_message(info))

    def list(
        self, request: pb.ListSnapshotsRequest, namespace: str | None
    ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self.store.list_snapshots(namespace, parse_filters(request.filters))
        batch = pb.ListSnapshotsResponse()
        size = 0
        for info in infos:
            message = info_message(info)
            batch.info.append(message)
            size += message.ByteSize()
            if len(batch.info) >= LIST_BATCH_COUNT or size >= LIST_BATCH_BYTES:
                yield batch
                batch = pb.ListSnapshotsResponse()
                size = 0
        if batch.info:
            yield batch

    def usage(self, request: pb.UsageRequest, namespace: str | None) -> pb.UsageResponse:
        usage = self.store.usage(namespace, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def cleanup(self, request: pb.CleanupRequest, namespace: str | None) -> empty_pb2.Empty:
        removed = self.store.cleanup()
        if removed:
            log.info("removed orphan snapshot directories", extra={"directories": removed})
        if self.layers is not None:
            released = self.layers.reconcile(self.store.layer_in_use)
            if released:
                log.info("released layers no snapshot uses", extra={"layers": released})
        return empty_pb2.Empty()

    # -- gRPC plumbing -------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler that serves this service under its containerd name."""
        unary = grpc.unary_unary_rpc_method_handler

        def rpc(
            method: Callable[[_Request, str | None], _Response], request_type: type[_Request]
        ) -> grpc.RpcMethodHandler[_Request, _Response]:
            return unary(
                _unary_call(method),
                request_deserializer=request_type.FromString,
                response_serializer=_serialize,
            )

        table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Prepare": rpc(self.prepare, pb.PrepareSnapshotRequest),
            "View": rpc(self.view, pb.ViewSnapshotRequest),
            "Mounts": rpc(self.mounts, pb.MountsRequest),
            "Commit": rpc(self.commit, pb.CommitSnapshotRequest),
            "Remove": rpc(self.remove, pb.RemoveSnapshotRequest),
            "Stat": rpc(self.stat, pb.StatSnapshotRequest),
            "Update": rpc(self.update, pb.UpdateSnapshotRequest),
            "List": grpc.unary_stream_rpc_method_handler(
                _stream_call(self.list),
                request_deserializer=pb.ListSnapshotsRequest.FromString,
                response_serializer=pb.ListSnapshotsResponse.SerializeToString,
            ),
            "Usage": rpc(self.usage, pb.UsageRequest),
            "Cleanup": rpc(self.cleanup, pb.CleanupRequest),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, table)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _describe(request: Message) -> dict[str, object]:
    fields = {f.name: v for f, v in request.ListFields() if f.name in ("key", "name", "parent")}
    return {"request": fields}


def _abort(
    context: grpc.ServicerContext, error: Exception, method: str, request: Message
) -> NoReturn:
    code = _status_of(error)
    if code is None:
        log.exception("%s failed", method, extra=_describe(request))
        context.abort(grpc.StatusCode.INTERNAL, f"blockfs snapshotter: {error}")
    log.debug("%s answered %s: %s", method, code.name, error, extra=_describe(request))
    context.abort(code, str(error))


def _unary_call(
    method: Callable[[_Request, str | None], _Response],
) -> Callable[[_Request, grpc.ServicerContext], _Response]:
    def call(request: _Request, context: grpc.ServicerContext) -> _Response:
        namespace = namespace_of(context)
        log.debug("%s", method.__name__, extra={"namespace": namespace, **_describe(request)})
        try:
            return method(request, namespace)
        except Exception as e:
            _abort(context, e, method.__name__, request)

    return call


def _stream_call(
    method: Callable[[_Request, str | None], Iterator[_Response]],
) -> Callable[[_Request, grpc.ServicerContext], Iterator[_Response]]:
    def call(request: _Request, context: grpc.ServicerContext) -> Iterator[_Response]:
        namespace = namespace_of(context)
        log.debug("%s", method.__name__, extra={"namespace": namespace})
        try:
            yield from method(request, namespace)
        except Exception as e:
            _abort(context, e, method.__name__, request)

    return call


def _claim_socket(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse one that still answers."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ServiceSocketError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise ServiceSocketError(f"cannot check socket {path}: {e}") from None
    else:
        raise ServiceSocketError(f"another process is listening on {path}")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def start_server(
    service: SnapshotsService, socket_path: str | os.PathLike[str], *, workers: int = 16
) -> grpc.Server:
    """Serve ``service`` on the unix socket ``socket_path``, which only root may use."""
    path = Path(socket_path).absolute()
    _claim_socket(path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots-rpc"),
        handlers=[service.handler()],
    )
    # The socket is created with mode 0600 (umask 0177) rather than chmod-ed afterwards,
    # so that there is no moment at which another user could connect.
    previous = os.umask(0o177)
    try:
        bound = server.add_insecure_port(f"unix://{path}")
        if bound == 0:
            raise ServiceSocketError(f"cannot listen on unix socket {path}")
        server.start()
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    return server
