"""The NBD server process: nbdkit running blockfs's Python plugin over a unix socket.

It runs apart from whatever starts it (the CLI or the snapshotter daemon), in its own
session, under a detached shell (:class:`~blockfs.host._nbdkit.DetachedNBDKit`), so that
restarting the starter never takes a mounted layer away. Its pid file, socket and log
live in one run directory, which is also how a new starter finds and adopts a server
that is already running.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import blockfs
from blockfs.host._nbdkit import (
    RUNTIME_DIR,
    DetachedNBDKit,
    NBDRelay,
    NBDServerError,
    socket_path,
)
from blockfs.image import ControlError, ServerConfig, query_stats

__all__ = [
    "PLUGIN",
    "RUNTIME_DIR",
    "DetachedNBDKit",
    "NBDRelay",
    "NBDServer",
    "NBDServerError",
    "plugin_pythonpath",
    "socket_path",
]

# The plugin file nbdkit loads: plugins/blockfs_nbdkit.py in the repository, installed as
# package data of blockfs.host.plugin (pyproject.toml maps the folder there).
PLUGIN = Path(str(importlib.resources.files("blockfs.host.plugin") / "blockfs_nbdkit.py"))


def plugin_pythonpath() -> str:
    """PYTHONPATH that lets nbdkit's embedded Python import blockfs and its dependencies."""
    project = Path(blockfs.__file__).resolve().parent.parent
    paths = [str(project), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


class NBDServer(DetachedNBDKit):
    """An nbdkit process serving the layers of ``config.root`` on ``run_dir/nbd.sock``.

    ``restart``: its supervising shell starts it again whenever it dies (standalone mounts,
    which have no daemon to do it; the snapshotter's daemon restarts its server itself).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: ServerConfig,
        *,
        socket: str | os.PathLike[str] | None = None,
        threads: int = 16,
        restart: bool = False,
    ):
        run_dir = Path(run_dir)
        super().__init__(
            run_dir,
            Path(socket).absolute() if socket else socket_path(run_dir, "nbd.sock"),
            restart=restart,
        )
        self.config = config
        self.threads = threads

    def command(self) -> list[str]:
        """The nbdkit command line."""
        return [
            *self.serving(),
            "--threads",
            str(self.threads),
            "python",
            str(PLUGIN),
            *self.config.to_params(),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = plugin_pythonpath()
        env.pop("PYTHONHOME", None)
        # nbdkit's embedded interpreter finds the venv through the python3 first on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def ready(self) -> bool:
        """Its NBD socket exists and its control socket answers. nbdkit listens before
        the plugin has opened the control socket (in ``after_fork``, after scanning the
        cache), and whoever starts the server may send a control request at once."""
        if not super().ready():
            return False
        if self.config.control is None:
            return True
        try:
            query_stats(str(self.config.control), timeout=1.0)
        except ControlError:
            return False
        return True

    def run(self) -> int:
        """Run the server in the foreground until it exits or this process is told to stop.

        SIGTERM and SIGINT are passed on to nbdkit, which finishes its requests and exits;
        the socket is removed afterwards. Returns nbdkit's exit status.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        proc = subprocess.Popen(self.command(), env=self.environment())

        def forward(signum: int, frame: object) -> None:
            proc.send_signal(signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
