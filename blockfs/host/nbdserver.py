"""The NBD server process: nbdkit running blockfs's Python plugin over a unix socket.

It runs apart from whatever starts it (the CLI or the snapshotter daemon), in its own
session, so that restarting the starter never takes a mounted layer away. Its pid file,
socket and log live in one run directory, which is also how a new starter finds and
adopts a server that is already running.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import blockfs
from blockfs.errors import BlockfsError
from blockfs.host import _process
from blockfs.image import ServerConfig

# The plugin file nbdkit loads: plugins/blockfs_nbdkit.py in the repository, installed as
# package data of blockfs.host.plugin (pyproject.toml maps the folder there).
PLUGIN = Path(str(importlib.resources.files("blockfs.host.plugin") / "blockfs_nbdkit.py"))

# Runs "$@" (with output appended to the log "$1") under a subshell that prints the
# child's pid, lets go of the caller's pipes and stays as the child's parent until it ends;
# the subshell's own pid goes to the file "$2".
_SUPERVISE = (
    "log=$1 supervisor=$2; shift 2; "
    '( "$@" </dev/null >>"$log" 2>&1 & echo $!; exec >/dev/null 2>&1; wait ) & '
    'echo $! >"$supervisor"'
)


# sockaddr_un holds at most 107 bytes of path.
_MAX_SOCKET_PATH = 107
RUNTIME_DIR = Path("/run/blockfs")


def socket_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where the unix socket ``name`` of ``run_dir`` lives.

    Inside ``run_dir`` when the path fits in a socket address; otherwise in a private
    directory under /run/blockfs named after ``run_dir``, so it is still found again.
    """
    path = Path(run_dir).absolute() / name
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    key = hashlib.sha256(os.fsencode(Path(run_dir).absolute())).hexdigest()[:16]
    short = RUNTIME_DIR / key
    short.mkdir(mode=0o700, parents=True, exist_ok=True)
    return short / name


def _private_file(path: Path, *, truncate: bool) -> None:
    """Create ``path`` 0600 (emptied with ``truncate``), or take group and other
    permissions off it if an older version left it with them."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class NBDServerError(BlockfsError):
    """The NBD server could not be started or stopped."""


def plugin_pythonpath() -> str:
    """PYTHONPATH that lets nbdkit's embedded Python import blockfs and its dependencies."""
    project = Path(blockfs.__file__).resolve().parent.parent
    paths = [str(project), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


class NBDServer:
    """An nbdkit process serving the layers of ``config.root`` on ``run_dir/nbd.sock``."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: ServerConfig,
        *,
        socket: str | os.PathLike[str] | None = None,
        threads: int = 16,
    ):
        self.run_dir = Path(run_dir)
        self.config = config
        self.socket = Path(socket).absolute() if socket else socket_path(self.run_dir, "nbd.sock")
        self.threads = threads

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "nbdkit.pid"

    @property
    def supervisor_pidfile(self) -> Path:
        """The pid file of the shell that stays as nbdkit's parent (see :meth:`start`)."""
        return self.run_dir / "supervisor.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / "nbdkit.log"

    def command(self) -> list[str]:
        """The nbdkit command line."""
        return [
            "nbdkit",
            "--foreground",
            "--readonly",
            "--unix",
            str(self.socket),
            "--pidfile",
            str(self.pidfile),
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

    def pid(self) -> int | None:
        """Pid of the running server, or None if it is not running."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if b"nbdkit" not in cmdline or str(self.socket).encode() not in cmdline:
            return None  # a stale pid file whose number was reused
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def supervisor_pid(self) -> int | None:
        """Pid of the shell supervising nbdkit, or None if it is not running."""
        try:
            pid = int(self.supervisor_pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        # Its command line is the launcher's: the shell, the log, then nbdkit's.
        return pid if _process.running(pid, str(self.logfile)) else None

    def start(self, timeout: float = 30.0) -> int:
        """Start the server detached from this process and wait until it accepts connections."""
        if (pid := self.pid()) is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        # The log names the layers and registries this node uses. It and the pid files are
        # made 0600 here: nbdkit sets its own umask (022), and it only truncates a pid
        # file that exists. An empty pid file reads as "not running".
        _private_file(self.logfile, truncate=False)
        _private_file(self.pidfile, truncate=True)
        _private_file(self.supervisor_pidfile, truncate=True)
        # nbdkit 1.32 as packaged by Debian arms a parent-death signal (SIGTERM) even
        # without --exit-with-parent, so its parent must outlive whoever starts it: a
        # detached shell that only waits for it is that parent. Its pid is recorded too,
        # so that stop() can wait for it.
        launcher = [
            "/bin/sh",
            "-c",
            _SUPERVISE,
            "sh",
            str(self.logfile),
            str(self.supervisor_pidfile),
        ]
        launched = subprocess.run(
            [*launcher, *self.command()],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.environment(),
            start_new_session=True,
            check=False,
        )
        if launched.returncode != 0 or not launched.stdout.strip().isdigit():
            raise NBDServerError(f"cannot start nbdkit: {launched.stderr.strip()}")
        child = int(launched.stdout.strip())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (pid := self.pid()) is not None and self.socket.exists():
                return pid
            if not _process.running(child, str(self.socket)):
                self.stop()
                raise NBDServerError(
                    f"nbdkit exited while starting; its log {self.logfile} says:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        _process.end(child, str(self.socket), (signal.SIGKILL,), timeout)
        self.stop()
        raise NBDServerError(f"nbdkit did not start within {timeout} s; see {self.logfile}")

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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its socket and pid files.

        Returns once nbdkit and its supervising shell have both exited: nothing of the
        server is left running.
        """
        supervisor = self.supervisor_pid()
        pid = self.pid()
        if pid is not None:
            _process.end(pid, str(self.socket), (signal.SIGTERM, signal.SIGKILL), timeout)
        if supervisor is not None:
            # It exits as soon as it has reaped nbdkit (which may have died before).
            _process.end(supervisor, str(self.logfile), (None, signal.SIGKILL), timeout)
        for path in (self.socket, self.pidfile, self.supervisor_pidfile):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.socket.parent.parent == RUNTIME_DIR:
            shutil.rmtree(self.socket.parent, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
