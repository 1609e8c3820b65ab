"""nbdfuse's relay for real: an NBD server killed with SIGKILL under a mounted layer and
started again on the same socket; reads in the meantime wait and then get their bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from attach_testkit import force_cleanup, leftovers

from blockfs.host import mounts
from blockfs.host.attach import (
    AttachError,
    AttachMode,
    attach_and_mount,
    backend_alive,
    reconnect,
    unmount_and_detach,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("nbdkit", "nbdfuse", "mkfs.erofs")),
        reason="needs nbdkit, nbdfuse and mkfs.erofs",
    ),
]

EXPORT = "layer"
FILES = 6
FILE_SIZE = 256 << 10

# Serves one file as the export EXPORT; its reads fail with EIO while the file named by
# ``fail`` exists.
PLUGIN = """
import builtins
import errno
import os

import nbdkit

API_VERSION = 2
_params = {}


def config(key, value):
    _params[key] = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    if nbdkit.export_name() != "layer":
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError("no such export")
    return os.open(_params["image"], os.O_RDONLY)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    if os.path.exists(_params["fail"]):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("failing on purpose")
    buf[:] = os.pread(h, len(buf), offset)
"""


@attrs.define
class Server:
    """nbdkit with :data:`PLUGIN` on ``socket``, which the test kills and starts again."""

    work: Path
    image: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.work / "nbd.sock"

    @property
    def fail_flag(self) -> Path:
        return self.work / "fail"

    def start(self) -> None:
        (self.work / "plugin.py").write_text(PLUGIN)
        self.socket.unlink(missing_ok=True)
        pidfile = self.work / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        log = (self.work / "nbdkit.log").open("ab")
        self.proc = subprocess.Popen(
            ["nbdkit", "-U", str(self.socket), "-P", str(pidfile), "-f", "--exit-with-parent",
             "-r", "python", str(self.work / "plugin.py"), f"image={self.image}",
             f"fail={self.fail_flag}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert self.proc.poll() is None, (self.work / "nbdkit.log").read_text()
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("relay-tree")
    for i in range(FILES):
        (root / f"f{i}").write_bytes(os.urandom(FILE_SIZE))
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Path:
    path = tmp_path_factory.mktemp("relay-image") / "layer.erofs"
    subprocess.run(["mkfs.erofs", str(path), str(tree)], check=True, capture_output=True)
    return path


@pytest.fixture
def server(tmp_path: Path, image: Path) -> Iterator[Server]:
    work = tmp_path / "server"
    work.mkdir()
    served = Server(work, image)
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    mountpoint, state_dir = tmp_path / "mnt", tmp_path / "state"
    mountpoint.mkdir()
    try:
        yield mountpoint, state_dir
    finally:
        force_cleanup(mountpoint)
        force_cleanup(state_dir)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_in_background(paths: list[Path]) -> tuple[threading.Thread, dict[str, object]]:
    """Read each of ``paths`` in a thread; the result maps a name to its sha256 or error."""
    results: dict[str, object] = {}

    def read() -> None:
        for path in paths:
            try:
                results[path.name] = _sha256(path)
            except OSError as e:
                results[path.name] = e

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, results


def test_reads_wait_while_the_server_is_down_and_then_get_their_bytes(
    server: Server, tree: Path, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs
    att = attach_and_mount(
        str(server.socket), EXPORT, str(mountpoint), state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )  # fmt: skip
    assert _sha256(mountpoint / "f0") == _sha256(tree / "f0")
    relay = att.relay
    assert relay is not None
    relay_pid, nbdfuse_pid = relay.pid(), att.nbdfuse_pid

    server.kill()
    # Files never read: their blocks are in no page cache, so every read needs the server.
    unread = [mountpoint / f"f{i}" for i in range(1, FILES)]
    reader, results = _read_in_background(unread)
    reader.join(2)
    assert reader.is_alive(), f"reads did not wait for the server: {results}"
    assert backend_alive(att)  # nbdfuse and the relay carry on

    server.start()
    reader.join(60)
    assert not reader.is_alive(), "reads did not resume once the server was back"
    assert results == {p.name: _sha256(tree / p.name) for p in unread}
    # The same processes and mounts: nothing was attached again.
    assert (relay.pid(), att.nbdfuse_pid) == (relay_pid, nbdfuse_pid)
    assert reconnect(att, str(server.socket)) == att  # nothing to do
    with pytest.raises(AttachError, match="its relay forwards to"):
        reconnect(att, str(server.work / "elsewhere.sock"))

    unmount_and_detach(att)
    assert not mounts.find_mount(str(mountpoint))
    assert leftovers(state_dir) == []
    assert not relay.socket.exists()


def test_a_read_the_server_fails_still_fails_through_the_relay(
    server: Server, dirs: tuple[Path, Path]
) -> None:
    # The relay retries a failed request (RELAY_RETRIES times, a second apart) before it
    # passes the error on: an I/O error of a live server still reaches the reader.
    mountpoint, state_dir = dirs
    att = attach_and_mount(
        str(server.socket), EXPORT, str(mountpoint), state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )  # fmt: skip
    server.fail_flag.touch()
    reader, results = _read_in_background([mountpoint / "f1"])
    reader.join(60)
    assert not reader.is_alive(), "the read hung instead of failing"
    error = results["f1"]
    assert isinstance(error, OSError) and error.errno == errno.EIO, error
    server.fail_flag.unlink()

    unmount_and_detach(att)
    assert leftovers(state_dir) == []


def test_a_dead_relay_is_reported_and_cleaned_up(server: Server, dirs: tuple[Path, Path]) -> None:
    mountpoint, state_dir = dirs
    att = attach_and_mount(
        str(server.socket), EXPORT, str(mountpoint), state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )  # fmt: skip
    relay = att.relay
    assert relay is not None
    pid = relay.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while relay.is_running() or relay.supervisor_pid() is not None:
        assert time.monotonic() < deadline, "the relay and its shell did not exit"
        time.sleep(0.05)

    assert not backend_alive(att)
    with pytest.raises(AttachError, match="nbdfuse or relay is no longer running"):
        reconnect(att, str(server.socket))
    unmount_and_detach(att, lazy=True)
    assert leftovers(state_dir) == []
