"""The private run directory of a standalone mount (``blockfs layer|image mount``).

Each mount point gets ``ROOT/mounts/<hash of its real path>``, holding what the mount
made (layer indexes, its NBD server's socket, pid file and log, attachment state) and a
JSON record that ``umount`` reads to undo exactly that. Every mount's server shares the
chunk cache ``ROOT/cache/chunks``.

All of it is private to root: ``ROOT/mounts``, each run directory and ``ROOT/cache`` are
0700 (tightened if an older version left them wider), and a missing ``ROOT`` is made
0700 too. An existing ``ROOT`` is left as it is: ``--root`` may name any directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from blockfs.cache import private_dir
from blockfs.host.nbdserver import socket_path
from blockfs.image import ServerConfig

# The record of each kind of mount, and the command that undoes it.
LAYER_RECORD = "mount.json"
IMAGE_RECORD = "image.json"
_UNDO = {LAYER_RECORD: "blockfs layer umount", IMAGE_RECORD: "blockfs image umount"}


def run_dir_of(root: str | os.PathLike[str], mountpoint: str | os.PathLike[str]) -> Path:
    """The run directory of the mount at ``mountpoint``."""
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:20]
    return Path(root).absolute() / "mounts" / key


def server_config(root: str | os.PathLike[str], run_dir: Path, *, prefetch: bool) -> ServerConfig:
    """The NBD server of a run directory: its layers, the shared cache, its stats socket."""
    return ServerConfig(
        root=run_dir / "layers",
        cache_dir=Path(root).absolute() / "cache" / "chunks",
        control=socket_path(run_dir, "control.sock"),
        prefetch=prefetch,
    )


def existing_mount(run_dir: Path) -> str | None:
    """The command that undoes the mount recorded in ``run_dir``, or None if there is none."""
    for record, command in _UNDO.items():
        if (run_dir / record).exists():
            return command
    return None


def fresh_run_dir(root: str | os.PathLike[str], mountpoint: str) -> Path:
    """An empty run directory for a new mount at ``mountpoint``.

    Raises FileExistsError naming the undo command if a mount is recorded there.
    """
    run_dir = run_dir_of(root, mountpoint)
    command = existing_mount(run_dir)
    if command is not None:
        raise FileExistsError(
            f"{mountpoint} already has a blockfs mount; run `{command} {mountpoint}`"
        )
    top = Path(root).absolute()
    private_dir(top, tighten=False)
    private_dir(top / "mounts")
    private_dir(top / "cache")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700)
    return run_dir


def write_record(run_dir: Path, name: str, data: dict[str, Any]) -> None:
    """Write a mount record whole (temporary file, then rename)."""
    tmp = run_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, run_dir / name)


def read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The mount record ``name`` of ``run_dir``, or None if there is none."""
    try:
        data: dict[str, Any] = json.loads((run_dir / name).read_text())
    except FileNotFoundError:
        return None
    return data
