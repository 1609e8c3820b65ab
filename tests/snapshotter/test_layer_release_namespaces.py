"""LayerManager.release while another mount namespace holds copies of a layer's mounts
(containers and services with a private mount namespace make them all the time on a
node), and while an overlay here still stacks the layer: real NBD server, nbdfuse, EROFS."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_testkit import estargz_layer

from blockfs.host import mounts
from blockfs.host.attach import AttachMode
from blockfs.image import file_source_spec
from snapshotter.layers import LayerManager
from snapshotter.remote import RemoteLayer, layer_name
from tests.helpers.containerd import layer_tar, require_root_tools, short_tempdir
from tests.helpers.namespaces import mountpoints_of, namespace_sleeper
from tests.host.attach_testkit import force_cleanup, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow]

MOTD = b"served lazily\n"
ISSUE = b"held elsewhere\n"


@pytest.fixture
def root() -> Iterator[Path]:
    require_root_tools("/usr/bin/nbdkit", "/usr/bin/nbdfuse", "/usr/bin/unshare")
    work = short_tempdir("bfs-ns-")
    try:
        yield work / "root"
    finally:
        left = leftovers(work)
        force_cleanup(work)
        shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"left behind: {left}"


@pytest.fixture
def layers(root: Path) -> Iterator[LayerManager]:
    manager = LayerManager(root, attach=AttachMode.NBDFUSE)
    manager.start(lambda name: True)
    yield manager
    for name in manager.attached():
        with manager.holding(name):
            manager.release(name)
    manager.close()


def remote(root: Path, files: dict[str, bytes | None]) -> RemoteLayer:
    layer = estargz_layer(layer_tar(files))
    path = root.parent / layer.digest.replace(":", "-")
    path.write_bytes(layer.blob)
    assert layer.toc_digest is not None
    return RemoteLayer(layer.digest, layer.toc_digest, file_source_spec(path), "test")


def ours_mounted_here(under: Path) -> list[str]:
    prefix = str(under)
    return [
        e.mountpoint
        for e in mounts.read_mountinfo()
        if e.mountpoint == prefix or e.mountpoint.startswith(prefix + "/")
    ]


@pytest.mark.parametrize("propagation", [(), ("--propagation", "unchanged")])
def test_a_layer_is_released_while_another_namespace_holds_copies_of_it(
    root: Path,
    layers: LayerManager,
    propagation: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = remote(root, {"etc/motd": MOTD})
    kept = remote(root, {"etc/issue": ISSUE})
    name, other = layer_name(held.digest), layer_name(kept.digest)
    with layers.holding(name):
        mountpoint = layers.acquire(held)
    with layers.holding(other):
        kept_at = layers.acquire(kept)
    with namespace_sleeper(*propagation) as sleeper:
        assert str(mountpoint) in mountpoints_of(sleeper, root)

        with layers.holding(name), caplog.at_level(logging.WARNING):
            assert layers.release(name)

        # Nothing of the layer is mounted or running here any more: its nbdfuse is gone.
        assert not layers.layer_dir(name).exists()
        assert ours_mounted_here(layers.layer_dir(name)) == []
        assert leftovers(layers.layer_dir(name)) == []
        assert f"pid {sleeper} (sleep) in mount namespace" in caplog.text
        assert layers.attached() == [other]
        assert (kept_at / "etc" / "issue").read_bytes() == ISSUE  # the shared server lives on
        # The layer can be mounted again at once, copies elsewhere notwithstanding.
        with layers.holding(name):
            assert layers.acquire(held) == mountpoint
        assert (mountpoint / "etc" / "motd").read_bytes() == MOTD
        with layers.holding(name):
            assert layers.release(name)


def test_a_layer_an_overlay_here_still_stacks_is_kept_and_the_overlay_named(
    root: Path, layers: LayerManager, caplog: pytest.LogCaptureFixture
) -> None:
    # overlayfs holds private clones of its lowers, so umount2 alone would take the layer
    # away from under a running container's rootfs.
    held = remote(root, {"etc/motd": MOTD, "usr/bin": None})
    name = layer_name(held.digest)
    with layers.holding(name):
        mountpoint = layers.acquire(held)
    rootfs = root.parent / "rootfs"
    rootfs.mkdir()
    lowers = f"lowerdir={mountpoint}/etc:{mountpoint}/usr"
    mounts.mount("overlay", str(rootfs), "overlay", mounts.MS_RDONLY, lowers)
    try:
        with layers.holding(name), caplog.at_level(logging.WARNING):
            assert not layers.release(name)  # left for a later cleanup
        errors = [getattr(record, "error", "") for record in caplog.records]
        assert any(f"the overlay mounted on {rootfs} stacks a directory" in e for e in errors)
        assert layers.attached() == [name]
        assert (rootfs / "motd").read_bytes() == MOTD
    finally:
        mounts.umount(str(rootfs))
    with layers.holding(name):
        assert layers.release(name)
    assert layers.attached() == []
