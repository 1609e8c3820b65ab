"""Standalone mounts of one layer, for ``blockfs layer mount|stats|umount|serve``.

Each mount gets a private run directory under ``ROOT/mounts/`` holding its layer index,
its own NBD server (socket, pid file, log, stats socket) and the record of how it was
attached, so that ``umount`` can undo exactly what ``mount`` did. The chunk cache under
``ROOT/cache/chunks`` is shared by every mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobReader, CountingSource, FileBlobSource
from blockfs.image import ServerConfig, index_layer, query_stats
from snapshotter.attach import Attachment, attach_and_mount, choose_mode, unmount_and_detach
from snapshotter.nbdserver import NBDServer, socket_path

MOUNT_JSON = "mount.json"


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


def _run_dir(root: str | os.PathLike[str], mountpoint: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:20]
    return Path(root).absolute() / "mounts" / key


def _server_config(root: str | os.PathLike[str], run_dir: Path, *, prefetch: bool) -> ServerConfig:
    return ServerConfig(
        root=run_dir / "layers",
        cache_dir=Path(root).absolute() / "cache" / "chunks",
        control=socket_path(run_dir, "control.sock"),
        prefetch=prefetch,
    )


def _index(blob: str, toc_digest: str | None, layers_dir: Path, export: str | None = None) -> str:
    """Index ``blob`` into ``layers_dir``; returns the export name (default: from the TOC digest)."""
    path = os.path.abspath(blob)
    source = CountingSource(FileBlobSource(path))
    reader = BlobReader.open(source, toc_digest=toc_digest)
    export = export or reader.toc_digest.replace(":", "-")
    index_layer(
        reader,
        layers_dir / export,
        name=export,
        source={"type": "file", "path": path},
        bytes_fetched=source.bytes_read,
    )
    return export


def mount_layer(
    blob: str,
    mountpoint: str,
    *,
    toc_digest: str | None,
    root: str,
    attach: str = "auto",
    prefetch: bool = False,
) -> LayerMount:
    """Index ``blob``, serve it and mount it read-only at ``mountpoint``."""
    if not os.path.isdir(mountpoint):
        raise LayerMountError(f"mount point {mountpoint} is not a directory; create it first")
    run_dir = _run_dir(root, mountpoint)
    if (run_dir / MOUNT_JSON).exists():
        raise LayerMountError(
            f"{mountpoint} already has a blockfs layer mount; run `blockfs layer umount {mountpoint}`"
        )
    mode = choose_mode(attach)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, mode=0o700)
    server = NBDServer(run_dir, _server_config(root, run_dir, prefetch=prefetch))
    try:
        export = _index(blob, toc_digest, run_dir / "layers")
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
        blob=os.path.abspath(blob),
        export=export,
        run_dir=str(run_dir),
        attachment=attachment,
    )
    (run_dir / MOUNT_JSON).write_text(json.dumps(mounted.to_json(), indent=2) + "\n")
    return mounted


def _load(mountpoint: str, root: str) -> LayerMount:
    record = _run_dir(root, mountpoint) / MOUNT_JSON
    try:
        return LayerMount.from_json(json.loads(record.read_text()))
    except FileNotFoundError:
        raise LayerMountError(
            f"{mountpoint} is not a blockfs layer mount (no record under {root}/mounts)"
        ) from None


def layer_stats(mountpoint: str, *, root: str) -> dict[str, Any]:
    """Statistics of the layer mounted at ``mountpoint``, as its NBD server counts them."""
    mounted = _load(mountpoint, root)
    reply = query_stats(str(socket_path(mounted.run_dir, "control.sock")), mounted.export)
    stats: dict[str, Any] = dict(reply["layers"].get(mounted.export, {}))
    stats["attach"] = mounted.attachment.mode.value
    stats["mount_method"] = mounted.attachment.mount_method
    return stats


def umount_layer(mountpoint: str, *, root: str) -> None:
    """Undo ``mount_layer``: unmount, detach, stop the server, remove the run directory."""
    mounted = _load(mountpoint, root)
    run_dir = Path(mounted.run_dir)
    unmount_and_detach(mounted.attachment)
    NBDServer(run_dir, _server_config(root, run_dir, prefetch=False)).stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def serve_layer(
    blob: str, *, socket: str, toc_digest: str | None, root: str, export: str | None = None
) -> int:
    """Serve ``blob`` as an NBD export on ``socket`` in the foreground (for debugging)."""
    key = hashlib.sha256(os.path.abspath(socket).encode()).hexdigest()[:20]
    run_dir = Path(root).absolute() / "serve" / key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, mode=0o700)
    try:
        name = _index(blob, toc_digest, run_dir / "layers", export)
        server = NBDServer(run_dir, _server_config(root, run_dir, prefetch=False), socket=socket)
        print(f"serving {blob} as export {name!r} on {os.path.abspath(socket)}", flush=True)
        print(f"  nbdinfo 'nbd+unix:///{name}?socket={os.path.abspath(socket)}'", flush=True)
        return server.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
