"""nbdkit processes that run apart from whoever starts them: the supervising shell they
run under, and the relay between nbdfuse and the NBD server.

Each runs in its own session, so that restarting its starter (the CLI or the snapshotter
daemon) never takes a mounted layer away. It is an nbdkit under a detached shell that
stays as its parent (:class:`DetachedNBDKit`); its pid files, socket and log live in one
directory, which is also how a new starter finds and adopts a process that is already
running. The shell can also start nbdkit again whenever it dies (``restart``), with a
growing wait when it keeps dying at once.

Nothing here imports :mod:`blockfs.image`: the attach code (and the VM test's guest,
which has only the standard library and attrs) needs the relay, not the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from blockfs.errors import BlockfsError
from blockfs.host import _process

# Runs "$@" (output appended to the log "$1") under a subshell that prints the child's pid,
# lets go of the caller's pipes and stays as the child's parent until it ends; the
# subshell's own pid goes to the file "$2". With "$3" = 1 it starts the child again each
# time it exits, at once after a run of a minute or more, else after 1, 2, 4, 8, 16, then
# 30 s, removing the dead child's socket "$4" first. SIGTERM stops it: the subshell passes
# the signal on to the child (or the wait) and exits once the child has.
_SUPERVISE = """\
log=$1 supervisor=$2 restart=$3 socket=$4; shift 4
(
  stop= child= announced= delay=0
  trap 'stop=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM
  while :; do
    "$@" </dev/null >>"$log" 2>&1 &
    child=$!
    if [ -z "$announced" ]; then echo "$child"; exec >/dev/null 2>&1; announced=1; fi
    [ -z "$stop" ] || kill -TERM "$child" 2>/dev/null
    began=$(date +%s)
    wait "$child"; status=$?
    # A trapped signal ends the wait early: wait on until the child itself has exited.
    while kill -0 "$child" 2>/dev/null; do
      wait "$child"; status=$?; [ "$status" -ne 127 ] || break
    done
    [ "$restart" = 1 ] && [ -z "$stop" ] || break
    [ $(( $(date +%s) - began )) -lt 60 ] || delay=0
    echo "blockfs: $1 exited with status $status; starting it again in $delay s" >>"$log"
    if [ "$delay" -gt 0 ]; then sleep "$delay" & child=$!; wait "$child"; fi
    [ -z "$stop" ] || break
    rm -f "$socket"
    if [ "$delay" -eq 0 ]; then delay=1
    elif [ "$delay" -lt 16 ]; then delay=$((delay * 2))
    else delay=30; fi
  done
) &
echo $! >"$supervisor"
"""

# sockaddr_un holds at most 107 bytes of path.
_MAX_SOCKET_PATH = 107
RUNTIME_DIR = Path("/run/blockfs")


def socket_path(run_dir: str | os.PathLike[str], name: str, *, create: bool = True) -> Path:
    """Where the unix socket ``name`` of ``run_dir`` lives.

    Inside ``run_dir`` when the path fits in a socket address; otherwise in a private
    directory under /run/blockfs named after ``run_dir`` (made here with ``create``), so
    it is still found again.
    """
    path = Path(run_dir).absolute() / name
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    key = hashlib.sha256(os.fsencode(Path(run_dir).absolute())).hexdigest()[:16]
    short = RUNTIME_DIR / key
    if create:
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


class DetachedNBDKit:
    """An nbdkit serving on the unix socket ``socket``, detached from whoever starts it.

    Its pid file, the pid file of its supervising shell and its log are in ``run_dir``,
    named by the subclass. With ``restart`` the shell starts nbdkit again whenever it dies
    (see ``_SUPERVISE``); :meth:`stop` ends both either way.
    """

    PIDFILE = "nbdkit.pid"
    SUPERVISOR_PIDFILE = "supervisor.pid"
    LOGFILE = "nbdkit.log"
    # How long stop() waits after each signal.
    STOP_TIMEOUT = 10.0

    def __init__(
        self, run_dir: str | os.PathLike[str], socket: Path, *, restart: bool = False
    ) -> None:
        self.run_dir = Path(run_dir)
        self.socket = socket
        self.restart = restart

    @property
    def pidfile(self) -> Path:
        return self.run_dir / self.PIDFILE

    @property
    def supervisor_pidfile(self) -> Path:
        """The pid file of the shell that stays as nbdkit's parent (see :meth:`start`)."""
        return self.run_dir / self.SUPERVISOR_PIDFILE

    @property
    def logfile(self) -> Path:
        return self.run_dir / self.LOGFILE

    def command(self) -> list[str]:
        """The nbdkit command line."""
        raise NotImplementedError

    def serving(self) -> list[str]:
        """The start of every command line: nbdkit in the foreground, read-only, on the
        socket, with the pid file; the plugin and its parameters follow."""
        return [
            "nbdkit",
            "--foreground",
            "--readonly",
            "--unix",
            str(self.socket),
            "--pidfile",
            str(self.pidfile),
        ]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        """Whether the nbdkit whose pid file is written serves: its socket exists."""
        return self.socket.exists()

    def pid(self) -> int | None:
        """Pid of the running nbdkit, or None if it is not running."""
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
        """Start nbdkit detached from this process and wait until it accepts connections."""
        if (pid := self.pid()) is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.parent.parent == RUNTIME_DIR:
            self.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        # detached shell that only waits for it (and starts it again, with restart) is
        # that parent. Its pid is recorded too, so that stop() can end it.
        launcher = [
            "/bin/sh",
            "-c",
            _SUPERVISE,
            "sh",
            str(self.logfile),
            str(self.supervisor_pidfile),
            "1" if self.restart else "0",
            str(self.socket),
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
            if (pid := self.pid()) is not None and self.ready():
                return pid
            if not _process.running(child, str(self.socket)):
                self.stop()
                raise NBDServerError(
                    f"nbdkit exited while starting; its log {self.logfile} says:\n{self.log_tail()}"
                )
            time.sleep(0.01)
        _process.end(child, str(self.socket), (signal.SIGKILL,), timeout)
        self.stop()
        raise NBDServerError(f"nbdkit did not start within {timeout} s; see {self.logfile}")

    def stop(self, timeout: float | None = None) -> None:
        """Stop nbdkit (SIGTERM, then SIGKILL) and remove its socket and pid files.

        Returns once nbdkit and its supervising shell have both exited: nothing of it is
        left running, and it is not started again.
        """
        timeout = self.STOP_TIMEOUT if timeout is None else timeout
        supervisor = self.supervisor_pid()
        if supervisor is not None:
            # No more restarts; the shell passes SIGTERM on to nbdkit.
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGTERM)
        if (pid := self.pid()) is not None:
            _process.end(pid, str(self.socket), (signal.SIGTERM, signal.SIGKILL), timeout)
        if supervisor is not None:
            # It exits as soon as it has reaped nbdkit (which may have died before).
            _process.end(supervisor, str(self.logfile), (None, signal.SIGKILL), timeout)
        if (pid := self.pid()) is not None:
            # One that a restarting shell had just started when it was told to stop.
            _process.end(pid, str(self.socket), (signal.SIGKILL,), timeout)
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


# How long the relay keeps trying to reach its server when the connection is lost: as
# long as the kernel NBD driver waits on a dead connection (30 days).
RELAY_RECONNECT_SECONDS = 30 * 24 * 3600
# How often one request is sent again after it failed, one second apart, before the
# relay passes the failure on: once for a request cut off with the connection, once
# more in case the restarted server died again at once.
RELAY_RETRIES = 2


class NBDRelay(DetachedNBDKit):
    """nbdkit's nbd plugin behind its retry filter, forwarding one export of the server at
    ``backend`` from its own socket in ``state_dir``: nbdfuse's stable peer.

    nbdfuse cannot reconnect, so it connects here instead of to the server. When the
    server dies, a request that fails (also one in flight) makes the retry filter reopen
    the connection to the server, trying once a second until the server is back (for
    :data:`RELAY_RECONNECT_SECONDS`), and send the request again; nbdfuse only sees a
    slow read. The retry filter serialises the requests of each connection, so nbdfuse's
    connections set how many are in flight.
    """

    PIDFILE = "relay.pid"
    SUPERVISOR_PIDFILE = "relay-supervisor.pid"
    LOGFILE = "relay.log"
    # A thread waiting for the server does not let nbdkit exit on SIGTERM, and the relay
    # holds nothing worth waiting for.
    STOP_TIMEOUT = 2.0

    def __init__(self, state_dir: str | os.PathLike[str], backend: str, export: str) -> None:
        # A directory under /run/blockfs for it (long state_dir) is made by start() alone,
        # not by each look at an attachment's relay.
        super().__init__(state_dir, socket_path(state_dir, "relay.sock", create=False))
        self.backend = backend
        self.export = export

    def command(self) -> list[str]:
        """The nbdkit command line."""
        return [
            *self.serving(),
            "--filter=retry",
            "nbd",
            f"socket={self.backend}",
            f"export={self.export}",
            f"retry={RELAY_RECONNECT_SECONDS}",
            f"retries={RELAY_RETRIES}",
            "retry-delay=1",
            "retry-exponential=no",
        ]

    def remove_files(self) -> None:
        """Remove its log (:meth:`stop` removes the rest)."""
        with contextlib.suppress(FileNotFoundError):
            self.logfile.unlink()
