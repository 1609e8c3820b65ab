"""The NBD server process: nbdkit under its supervising shell, started and stopped for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_testkit import force_cleanup, leftovers

from blockfs.host import _process
from blockfs.host.nbdserver import NBDServer
from blockfs.image import ServerConfig, query_stats

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NBDServer]:
    (tmp_path / "layers").mkdir()
    config = ServerConfig(root=tmp_path / "layers", cache_dir=tmp_path / "cache")
    try:
        yield NBDServer(tmp_path / "run", config)
    finally:
        force_cleanup(tmp_path)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_stop_returns_once_nbdkit_and_its_supervising_shell_are_gone(server: NBDServer) -> None:
    for _ in range(3):
        pid = server.start()
        supervisor = server.supervisor_pid()
        assert supervisor is not None and _parent(pid) == supervisor
        assert len(leftovers(server.run_dir)) == 2  # nbdkit and the shell

        server.stop()

        # At once: nothing may still be on its way out.
        assert leftovers(server.run_dir) == []
        assert not server.is_running() and server.supervisor_pid() is None
        assert not server.supervisor_pidfile.exists()


def test_stop_after_nbdkit_died_waits_for_the_shell_it_leaves(server: NBDServer) -> None:
    for _ in range(3):
        pid = server.start()
        os.kill(pid, signal.SIGKILL)

        server.stop()

        assert leftovers(server.run_dir) == []


def _restarted(server: NBDServer, old: int) -> int:
    deadline = time.monotonic() + 60
    while True:
        pid = server.pid()
        if pid is not None and pid != old and server.socket.exists():
            return pid
        assert time.monotonic() < deadline, f"nbdkit was not started again:\n{server.log_tail()}"
        time.sleep(0.05)


def test_with_restart_the_shell_starts_a_dead_nbdkit_again(tmp_path: Path) -> None:
    (tmp_path / "layers").mkdir()
    config = ServerConfig(root=tmp_path / "layers", cache_dir=tmp_path / "cache")
    server = NBDServer(tmp_path / "run", config, restart=True)
    try:
        pid = server.start()
        supervisor = server.supervisor_pid()
        for _ in range(2):
            os.kill(pid, signal.SIGKILL)
            pid = _restarted(server, pid)
            # The same shell, and a server that answers on the same socket.
            assert server.supervisor_pid() == supervisor and _parent(pid) == supervisor
            listing = subprocess.run(
                ["nbdinfo", "--list", f"nbd+unix:///?socket={server.socket}"],
                capture_output=True, check=False,
            )  # fmt: skip
            assert listing.returncode == 0, listing.stderr
        assert server.log_tail().count("starting it again") == 2

        # Killed again at once, it waits before the next start: stop ends that wait too.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "starting it again in 2 s" not in server.log_tail():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        server.stop()
        assert leftovers(server.run_dir) == []
        assert not server.is_running() and server.supervisor_pid() is None
    finally:
        force_cleanup(tmp_path)


def test_a_process_that_is_execing_still_counts_as_running() -> None:
    # execve installs the new program's memory before its arguments: for a moment the
    # command line reads empty. A start that polled then took nbdkit (or nbdfuse) for
    # dead, killed it and reported "exited while starting" with an empty log.
    for _ in range(50):
        proc = subprocess.Popen(["/bin/sh", "-c", "exec /bin/sleep 31.4159"])
        try:
            while True:
                assert _process.running(proc.pid, "31.4159")
                if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"/bin/sleep"):
                    break
        finally:
            proc.kill()
            proc.wait()
        assert not _process.running(proc.pid, "31.4159")


def test_a_kernel_thread_is_not_taken_for_a_process_of_ours() -> None:
    kthreads = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and p.joinpath("cmdline").exists()
        and _is_kthread(p)
    ]  # fmt: skip
    if not kthreads:
        pytest.skip("no kernel thread is visible here")
    assert not _process.running(kthreads[0], "")


def _is_kthread(proc: Path) -> bool:
    try:
        flags = int((proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[6])
    except (OSError, IndexError, ValueError):
        return False
    return bool(flags & 0x00200000)


def test_start_returns_once_the_control_socket_answers(tmp_path: Path) -> None:
    # nbdkit accepts NBD connections before the plugin's after_fork has opened the
    # control socket; a node with a big cache widens that gap (the cache is scanned
    # first), and a control request sent as soon as start() returned (the snapshotter's
    # preload) found no socket.
    cache = tmp_path / "cache"
    for n in range(20000):
        name = f"{n:064x}"
        sub = cache / name[:2]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(b"")
    (tmp_path / "layers").mkdir()
    control = tmp_path / "control.sock"
    config = ServerConfig(root=tmp_path / "layers", cache_dir=cache, control=control)
    server = NBDServer(tmp_path / "run", config)
    try:
        server.start()
        assert query_stats(str(control))["layers"] == {}
    finally:
        force_cleanup(tmp_path)
