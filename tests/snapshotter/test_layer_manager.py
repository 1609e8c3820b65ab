"""The snapshotter's layer manager with a real NBD server, nbdfuse and kernel mounts:
one mount per layer, release, and adoption by a manager that replaces a dead one."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from remote_testkit import Layer, estargz_layer, gzip_layer

from blockfs.host.attach import (
    AUTO,
    AttachChoice,
    AttachError,
    AttachMode,
    attach_and_mount,
    read_attachment,
)
from blockfs.image import file_source_spec
from snapshotter.daemon import watch_nbd_server
from snapshotter.layers import LayerManager, LayerUnavailable
from snapshotter.metrics import MetricsServer, metric_value
from snapshotter.remote import RemoteLayer, layer_name
from tests.helpers.containerd import layer_tar, mounts_under, require_root_tools, short_tempdir
from tests.host.attach_testkit import force_cleanup, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow]

MOTD = b"served lazily\n"


@pytest.fixture
def root() -> Iterator[Path]:
    require_root_tools("/usr/bin/nbdkit", "/usr/bin/nbdfuse")
    work = short_tempdir("bfs-lm-")
    try:
        yield work / "root"
    finally:
        left = leftovers(work)
        force_cleanup(work)
        shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"left behind: {left}"


def blob_layer(root: Path, layer: Layer) -> RemoteLayer:
    """``layer`` written to a file next to ``root``, as the remote layer to acquire."""
    path = root.parent / layer.digest.replace(":", "-")
    path.write_bytes(layer.blob)
    return RemoteLayer(
        digest=layer.digest,
        toc_digest=layer.toc_digest or "sha256:" + "0" * 64,
        source=file_source_spec(path),
        labeller="test",
    )


@pytest.fixture
def motd_layer(root: Path) -> RemoteLayer:
    return blob_layer(root, estargz_layer(layer_tar({"etc/motd": MOTD})))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("nbdfuse", AttachMode.NBDFUSE),
        ("auto", AUTO),
        (AttachMode.KERNEL_NBD, AttachMode.KERNEL_NBD),
    ],
)
def test_the_attach_word_of_the_configuration_is_parsed_at_once(
    tmp_path: Path, given: AttachChoice | str, expected: AttachChoice
) -> None:
    layers = LayerManager(tmp_path, attach=given)
    layers.close()
    assert layers.attach is expected


def test_an_unknown_attach_word_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(AttachError, match="unknown attach mode 'loop'"):
        LayerManager(tmp_path, attach="loop")


def test_a_layer_acquired_twice_is_mounted_once_and_release_removes_it(
    root: Path, motd_layer: RemoteLayer
) -> None:
    layers = LayerManager(root)
    layers.start(lambda name: True)
    name = layer_name(motd_layer.digest)
    with layers.holding(name):
        first = layers.acquire(motd_layer)
    with layers.holding(name):
        second = layers.acquire(motd_layer)
    assert first == second == layers.mountpoint(name)
    assert (first / "etc" / "motd").read_bytes() == MOTD
    assert layers.attached() == [name]
    assert mounts_under(first) == [str(first)]
    stats = layers.stats()["layers"][name]
    assert stats["bytes_fetched"] > 0
    with layers.holding(name):
        assert layers.release(name)
    assert not layers.layer_dir(name).exists()
    assert name not in layers.stats()["layers"]  # the server let go of the export too
    layers.close()
    assert not layers.server.is_running()


def test_a_layer_indexed_ahead_keeps_no_toc_in_memory(root: Path, motd_layer: RemoteLayer) -> None:
    # A TOC read ahead is held until the layer is indexed; a large layer's parsed TOC is
    # hundreds of megabytes, and its Prepare needs only the index then.
    layers = LayerManager(root)
    layers.start(lambda name: True)
    name = layer_name(motd_layer.digest)
    layers.read_ahead({motd_layer.digest: motd_layer.source})
    deadline = time.monotonic() + 30
    while not layers.attached():
        assert time.monotonic() < deadline, "the layer was not attached ahead"
        time.sleep(0.02)
    assert layers._ahead == {}  # what the manager holds of the TOCs read ahead
    with layers.holding(name):
        assert layers.acquire(motd_layer) == layers.mountpoint(name)  # the index serves
        assert layers.release(name)
    layers.close()


def test_a_wrong_toc_digest_leaves_nothing_behind(root: Path, motd_layer: RemoteLayer) -> None:
    layers = LayerManager(root)
    wrong = RemoteLayer(motd_layer.digest, "sha256:" + "f" * 64, motd_layer.source, "test")
    name = layer_name(wrong.digest)
    with layers.holding(name), pytest.raises(LayerUnavailable, match="TOC digest"):
        layers.acquire(wrong)
    assert not layers.layer_dir(name).exists()
    layers.close()


def test_a_gzip_layer_without_toc_cannot_be_served(root: Path) -> None:
    plain = blob_layer(root, gzip_layer(layer_tar({"etc/motd": MOTD})))
    layers = LayerManager(root)
    with layers.holding("x"), pytest.raises(LayerUnavailable, match="footer"):
        layers.acquire(plain)
    assert layers.attached() == []
    layers.close()


def test_a_new_manager_restarts_a_server_that_died_with_the_old_one_and_keeps_the_mounts(
    root: Path,
) -> None:
    # kill -9 of the daemon and of nbdkit together: the next daemon starts a server, and
    # the mounts' relays reconnect to it; nothing is attached again.
    files = {f"data/f{i}": os.urandom(128 << 10) for i in range(2)}
    layer = blob_layer(root, estargz_layer(layer_tar(files)))
    dead = LayerManager(root, attach=AttachMode.NBDFUSE)
    name = layer_name(layer.digest)
    with dead.holding(name):
        mountpoint = dead.acquire(layer)
    assert (mountpoint / "data" / "f0").read_bytes() == files["data/f0"]
    attachment = read_attachment(str(dead.layer_dir(name) / "attach"))
    server = dead.server.pid()
    assert server is not None
    os.kill(server, signal.SIGKILL)
    _wait_gone(server)
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    layers.start(lambda n: n == name)
    assert layers.server.is_running()
    assert read_attachment(str(layers.layer_dir(name) / "attach")) == attachment
    assert (mountpoint / "data" / "f1").read_bytes() == files["data/f1"]
    with layers.holding(name):
        assert layers.release(name)
    layers.close()


def test_a_new_manager_adopts_the_server_and_mounts_of_a_dead_one(
    root: Path, motd_layer: RemoteLayer
) -> None:
    dead = LayerManager(root)
    name = layer_name(motd_layer.digest)
    with dead.holding(name):
        mountpoint = dead.acquire(motd_layer)
    server_pid = dead.server.pid()
    attachment = read_attachment(str(dead.layer_dir(name) / "attach"))
    # The dead manager is never closed, as after kill -9.
    layers = LayerManager(root)
    layers.start(lambda n: n == name)
    assert layers.server.pid() == server_pid
    assert read_attachment(str(layers.layer_dir(name) / "attach")) == attachment
    with layers.holding(name):
        assert layers.ensure_mounted(name) == mountpoint
    assert (mountpoint / "etc" / "motd").read_bytes() == MOTD
    # Layers that no snapshot uses are released at start.
    again = LayerManager(root)
    again.start(lambda n: False)
    assert again.attached() == [] and not again.layer_dir(name).exists()
    again.close()
    assert not again.server.is_running()


@pytest.mark.parametrize("process", ["nbdfuse", "relay"])
def test_a_layer_whose_nbdfuse_or_relay_died_is_attached_again_when_needed(
    root: Path, motd_layer: RemoteLayer, process: str
) -> None:
    dead = LayerManager(root, attach=AttachMode.NBDFUSE)
    name = layer_name(motd_layer.digest)
    with dead.holding(name):
        mountpoint = dead.acquire(motd_layer)
    before = read_attachment(str(dead.layer_dir(name) / "attach"))
    assert before is not None and before.nbdfuse_pid is not None and before.relay is not None
    pid = before.nbdfuse_pid if process == "nbdfuse" else before.relay.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    layers.start(lambda n: True)
    assert layers.attached() == []  # the stale mount was undone
    with layers.holding(name):
        assert layers.ensure_mounted(name) == mountpoint
    assert (mountpoint / "etc" / "motd").read_bytes() == MOTD
    with layers.holding(name):
        assert layers.release(name)
    layers.close()


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _watch_until(layers: LayerManager, done: Callable[[], bool], what: str) -> None:
    """Run the daemon's watchdog (checking every 0.1 s) until ``done()``."""
    stop = threading.Event()
    watchdog = threading.Thread(target=watch_nbd_server, args=(layers, stop, 0.1))
    watchdog.start()
    try:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)
    finally:
        stop.set()
        watchdog.join()


def test_the_watchdog_restarts_a_dead_nbd_server_under_attached_layers(
    root: Path, motd_layer: RemoteLayer, caplog: pytest.LogCaptureFixture
) -> None:
    # nbd.ko is missing here, so the layer is attached with nbdfuse, through its relay:
    # this proves the restart and the relay's reconnect; the VM test proves the kernel's.
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    assert not layers.revive_server()  # nothing attached: nothing to restart
    assert not layers.server.is_running()
    name = layer_name(motd_layer.digest)
    with layers.holding(name):
        layers.acquire(motd_layer)
    before = read_attachment(str(layers.layer_dir(name) / "attach"))
    first = layers.server.pid()
    assert first is not None and not layers.revive_server()  # running: left alone
    os.kill(first, signal.SIGKILL)
    _wait_gone(first)
    caplog.set_level(logging.INFO, logger="snapshotter.layers")
    _watch_until(
        layers, lambda: layers.server_restarts == 1, "the watchdog did not restart the server"
    )
    assert "reconnected layer" in caplog.text
    second = layers.server.pid()
    assert second is not None and second != first
    assert layers.server_restarts == 1
    metrics = MetricsServer("127.0.0.1:0", layers)
    try:
        with urllib.request.urlopen(f"http://{metrics.address}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        metrics.close()
    assert metric_value(text, "blockfs_nbd_server_restarts_total") == 1
    # The layer kept its mount, nbdfuse and relay: nothing was attached again.
    assert "attached layer again" not in caplog.text
    assert read_attachment(str(layers.layer_dir(name) / "attach")) == before
    drop_caches()
    assert (layers.mountpoint(name) / "etc" / "motd").read_bytes() == MOTD
    # The restarted server serves new attachments.
    other = blob_layer(root, estargz_layer(layer_tar({"etc/issue": b"after the restart\n"})))
    other_name = layer_name(other.digest)
    with layers.holding(other_name):
        mounted = layers.acquire(other)
    assert (mounted / "etc" / "issue").read_bytes() == b"after the restart\n"
    for n in (name, other_name):
        with layers.holding(n):
            assert layers.release(n)
    layers.close()
    assert not layers.server.is_running()


def test_the_watchdog_backs_off_while_the_server_cannot_start_and_restarts_it_later(
    root: Path,
    motd_layer: RemoteLayer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    name = layer_name(motd_layer.digest)
    with layers.holding(name):
        layers.acquire(motd_layer)
    first = layers.server.pid()
    assert first is not None
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(root.parent / "no-programs-here"))  # nbdkit is not found
    stop = threading.Event()
    watchdog = threading.Thread(target=watch_nbd_server, args=(layers, stop, 0.05))
    watchdog.start()
    try:
        os.kill(first, signal.SIGKILL)
        _wait_gone(first)
        deadline = time.monotonic() + 30
        while caplog.text.count("cannot restart the NBD server") < 3:
            assert time.monotonic() < deadline, "the watchdog did not try to restart the server"
            time.sleep(0.05)
        waits = [r.retry_seconds for r in caplog.records if hasattr(r, "retry_seconds")]
        assert waits[:3] == [0.1, 0.2, 0.4]  # doubling, not one attempt per interval
        monkeypatch.setenv("PATH", path)
        while layers.server_restarts == 0:
            assert time.monotonic() < deadline, "the watchdog did not restart the server"
            time.sleep(0.05)
    finally:
        stop.set()
        watchdog.join()
    assert layers.server.is_running()
    with layers.holding(name):
        assert layers.release(name)
    layers.close()


@contextlib.contextmanager
def container_overlay(root: Path, lower: Path) -> Iterator[Path]:
    """What a running container holds: an overlay with ``lower`` as its lower directory."""
    merged, upper, work = (root.parent / d for d in ("merged", "upper", "work"))
    for d in (merged, upper, work):
        d.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
        check=True,
    )  # fmt: skip
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)  # the container stops


def test_a_container_holding_an_nbdfuse_layer_reads_it_on_after_the_server_restarted(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {f"data/f{i}": os.urandom(128 << 10) for i in range(4)}
    layer = blob_layer(root, estargz_layer(layer_tar(files)))
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    name = layer_name(layer.digest)
    with layers.holding(name):
        lower = layers.acquire(layer)
    before = read_attachment(str(layers.layer_dir(name) / "attach"))
    with container_overlay(root, lower) as merged:
        assert (merged / "data" / "f0").read_bytes() == files["data/f0"]
        server = layers.server.pid()
        assert server is not None
        os.kill(server, signal.SIGKILL)
        _wait_gone(server)
        # The container reads files it never read while the server is down.
        results: dict[str, bytes | OSError] = {}

        def read() -> None:
            for i in range(1, 4):
                try:
                    results[f"data/f{i}"] = (merged / "data" / f"f{i}").read_bytes()
                except OSError as e:
                    results[f"data/f{i}"] = e

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        _watch_until(layers, lambda: layers.server_restarts == 1, "no restart")
        reader.join(60)
        assert not reader.is_alive(), "the container's reads did not resume"
        assert results == {f"data/f{i}": files[f"data/f{i}"] for i in range(1, 4)}
        # New containers use the same mount, nbdfuse and relay.
        with layers.holding(name):
            assert layers.ensure_mounted(name) == lower
        assert read_attachment(str(layers.layer_dir(name) / "attach")) == before
        assert "attached layer again" not in caplog.text
    with layers.holding(name):
        assert layers.release(name)
    layers.close()


def test_an_nbdfuse_layer_without_a_relay_is_attached_afresh_while_a_container_holds_it(
    root: Path,
    motd_layer: RemoteLayer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As an earlier version attached it: nbdfuse connected to the server itself.
    monkeypatch.setattr(
        "snapshotter.layers.attach_and_mount", functools.partial(attach_and_mount, relay=False)
    )
    layers = LayerManager(root, attach=AttachMode.NBDFUSE)
    name = layer_name(motd_layer.digest)
    with layers.holding(name):
        lower = layers.acquire(motd_layer)
    monkeypatch.undo()  # this version attaches it again, with a relay
    old_nbdfuse = read_attachment(str(layers.layer_dir(name) / "attach"))
    assert old_nbdfuse is not None and old_nbdfuse.nbdfuse_pid is not None
    assert old_nbdfuse.relay is None
    with container_overlay(root, lower) as merged:
        server = layers.server.pid()
        assert server is not None
        os.kill(server, signal.SIGKILL)
        _wait_gone(server)
        _watch_until(
            layers,
            lambda: "attached layer again" in caplog.text,
            "the layer was not attached again",
        )
        drop_caches()
        # New containers get a working layer on the same mountpoint, from a new nbdfuse...
        with layers.holding(name):
            assert layers.ensure_mounted(name) == lower
        assert (lower / "etc" / "motd").read_bytes() == MOTD
        new = read_attachment(str(layers.layer_dir(name) / "attach"))
        assert new is not None and new.nbdfuse_pid not in (None, old_nbdfuse.nbdfuse_pid)
        assert new.relay is not None
        _wait_gone(old_nbdfuse.nbdfuse_pid)
        # ...while the running one keeps the old view, whose uncached reads fail.
        with pytest.raises(OSError):
            (merged / "etc" / "motd").read_bytes()
    with layers.holding(name):
        assert layers.release(name)
    layers.close()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
