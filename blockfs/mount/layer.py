"""Standalone mounts of one layer, for ``blockfs layer mount|stats|umount|serve``.

Each mount gets a private run directory under ``ROOT/mounts/`` holding its layer index,
its own NBD server (socket, pid file, log, stats socket) and the record of how it was
attached, so that ``umount`` can undo exactly what ``mount`` did. The chunk cache under
``ROOT/cache/chunks`` is shared by every mount.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobReader, CountingSource
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
from blockfs.image import BlobSources, index_layer, open_blob, query_stats
from blockfs.mount._rundir import (
    LAYER_RECORD,
    fresh_run_dir,
    read_record,
    run_dir_of,
    server_config,
    write_record,
)

MOUNT_JSON = LAYER_RECORD


class LayerMountError(BlockfsError):
    """A standalone layer mount could not be made, found or undone."""


@attrs.frozen
class LayerMount:
    """A layer mounted by ``mount_layer``."""

    mountpoint: str
    blob: str
    export: str
    run_dir: str
    attachment: Attachment

    @property
    def attach_summary(self) -> str:
        a = self.attachment
        return f"{a.mode.value}, {a.mount_method} mount of {a.mount_source}"

    def to_json(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "blob": self.blob,
            "export": self.export,
            "run_dir": self.run_dir,
            "attachment": self.attachment.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerMount:
        return cls(
            mountpoint=data["mountpoint"],
            blob=data["blob"],
            export=data["export"],
            run_dir=data["run_dir"],
            attachment=Attachment.from_json(data["attachment"]),
        )


def _index(
    blob: str,
    toc_digest: str | None,
    layers_dir: Path,
    export: str | None = None,
    *,
    plain_http: bool = False,
    hosts_dir: str | None = None,
) -> tuple[str, str]:
    """Index ``blob`` (a file or ``REF@sha256:…``) into ``layers_dir``.

    Returns the export name (default: from the TOC digest) and what the blob is called.
    """
    with BlobSources() as sources:
        opened, spec = open_blob(blob, sources, plain_http=plain_http, hosts_dir=hosts_dir)
        source = CountingSource(opened)
        reader = BlobReader.open(source, toc_digest=toc_digest)
        export = export or reader.toc_digest.replace(":", "-")
        index_layer(
            reader,
            layers_dir / export,
            name=export,
            source=spec,
            bytes_fetched=source.bytes_read,
        )
    return export, spec.get("path") or spec["ref"]


def mount_layer(
    blob: str,
    mountpoint: str,
    *,
    toc_digest: str | None,
    root: str,
    attach: AttachChoice = AUTO,
    prefetch: bool = False,
    plain_http: bool = False,
    hosts_dir: str | None = None,
) -> LayerMount:
    """Index ``blob`` (a file or a registry blob ``REF@sha256:…``), serve it and mount it
    read-only at ``mountpoint``."""
    if not os.path.isdir(mountpoint):
        raise LayerMountError(f"mount point {mountpoint} is not a directory; create it first")
    mode = choose_mode(attach)
    try:
        run_dir = fresh_run_dir(root, mountpoint)
    except FileExistsError as e:
        raise LayerMountError(str(e)) from None
    # No daemon watches a standalone mount's server: its shell starts it again if it dies.
    server = NBDServer(run_dir, server_config(root, run_dir, prefetch=prefetch), restart=True)
    try:
        export, name = _index(
            blob, toc_digest, run_dir / "layers", plain_http=plain_http, hosts_dir=hosts_dir
        )
        server.start()
        attachment = attach_and_mount(
            str(server.socket), export, os.path.abspath(mountpoint),
            state_dir=str(run_dir / "attach"), mode=mode,
        )  # fmt: skip
    except BaseException:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    mounted = LayerMount(
        mountpoint=os.path.abspath(mountpoint),
        blob=name,
        export=export,
        run_dir=str(run_dir),
        attachment=attachment,
    )
    write_record(run_dir, MOUNT_JSON, mounted.to_json())
    return mounted


def _load(mountpoint: str, root: str) -> LayerMount:
    record = read_record(run_dir_of(root, mountpoint), MOUNT_JSON)
    if record is None:
        raise LayerMountError(
            f"{mountpoint} is not a blockfs layer mount (no record under {root}/mounts)"
        )
    return LayerMount.from_json(record)


def layer_stats(mountpoint: str, *, root: str) -> dict[str, Any]:
    """Statistics of the layer mounted at ``mountpoint``, as its NBD server counts them."""
    mounted = _load(mountpoint, root)
    reply = query_stats(str(socket_path(mounted.run_dir, "control.sock")), mounted.export)
    stats: dict[str, Any] = dict(reply["layers"].get(mounted.export, {}))
    stats["attach"] = mounted.attachment.mode.value
    stats["mount_method"] = mounted.attachment.mount_method
    return stats


def umount_layer(mountpoint: str, *, root: str) -> None:
    """Undo ``mount_layer``: unmount, detach, stop the server, remove the run directory.

    Copies of the mount in other mount namespaces do not stop it (the layer is detached
    here, with a warning naming those namespaces); what in this namespace still uses it
    (processes inside it, mounts on it) makes it fail, naming them.
    """
    mounted = _load(mountpoint, root)
    run_dir = Path(mounted.run_dir)
    try:
        unmount_and_detach(mounted.attachment)
    except AttachError as e:
        raise LayerMountError(
            f"{e}; then run `blockfs layer umount {mounted.mountpoint}` again"
        ) from e
    NBDServer(run_dir, server_config(root, run_dir, prefetch=False)).stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def serve_layer(
    blob: str,
    *,
    socket: str,
    toc_digest: str | None,
    root: str,
    export: str | None = None,
    plain_http: bool = False,
    hosts_dir: str | None = None,
) -> int:
    """Serve ``blob`` (a file or ``REF@sha256:…``) as an NBD export on ``socket`` in the
    foreground (for debugging)."""
    socket_dir = Path(socket).absolute().parent
    if not socket_dir.is_dir():
        raise LayerMountError(
            f"cannot serve on {socket}: directory {socket_dir} does not exist; create it or "
            "pass a --socket in an existing directory"
        )
    key = hashlib.sha256(os.path.abspath(socket).encode()).hexdigest()[:20]
    run_dir = Path(root).absolute() / "serve" / key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, mode=0o700)
    try:
        name, _ = _index(
            blob,
            toc_digest,
            run_dir / "layers",
            export,
            plain_http=plain_http,
            hosts_dir=hosts_dir,
        )
        server = NBDServer(run_dir, server_config(root, run_dir, prefetch=False), socket=socket)
        print(f"serving {blob} as export {name!r} on {os.path.abspath(socket)}", flush=True)
        print(f"  nbdinfo 'nbd+unix:///{name}?socket={os.path.abspath(socket)}'", flush=True)
        return server.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
