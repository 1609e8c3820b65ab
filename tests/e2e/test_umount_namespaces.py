"""`blockfs image|layer umount` while another mount namespace holds copies of the mounts
(`unshare -m`, as containers and services with a private mount namespace do on a node),
and while a process here still uses the image: real nbdkit, nbdfuse, EROFS, overlayfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.host import mounts
from tests.helpers.cli import blockfs
from tests.helpers.images import make_layout
from tests.helpers.namespaces import mountpoints_of, namespace_sleeper
from tests.helpers.testdata import TESTDATA
from tests.host.attach_testkit import leftovers

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]

MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20

# `unshare -m` makes its copies private; `--propagation unchanged` leaves them as the
# mounts here are (private on this host, shared under systemd).
PROPAGATIONS = {"private": (), "unchanged": ("--propagation", "unchanged")}


def base_layer(tree: Path) -> None:
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("from the base layer\n")
    (tree / "data").write_bytes(os.urandom(200_000))


def top_layer(tree: Path) -> None:
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("blockfs\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small two-layer image in eStargz, as an OCI layout reference."""
    base = tmp_path_factory.mktemp("image")
    make_layout(base / "plain", [base_layer, top_layer])
    blockfs("image", "convert", f"oci:{base / 'plain'}:v1", f"oci:{base / 'esgz'}:v1")
    return f"oci:{base / 'esgz'}:v1"


@pytest.fixture(scope="module")
def one_layer_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A one-layer image, plain (extracted when mounted) and in eStargz (lazy): read-only,
    either is mounted as a bind mount of its layer's directory."""
    base = tmp_path_factory.mktemp("one-layer")
    make_layout(base / "plain", [base_layer])
    blockfs("image", "convert", f"oci:{base / 'plain'}:v1", f"oci:{base / 'esgz'}:v1")
    return {"lazy": f"oci:{base / 'esgz'}:v1", "extracted": f"oci:{base / 'plain'}:v1"}


def mount_image(image: str, at: Path) -> tuple[Path, Path]:
    """`blockfs image mount` of ``image`` at ``at``/mnt with state in ``at``/root."""
    mnt, root = at / "mnt", at / "root"
    mnt.mkdir()
    blockfs("image", "mount", "--root", str(root), image, str(mnt))
    assert (mnt / "etc" / "motd").read_text() == "from the base layer\n"
    return mnt, root


def ours_mounted_here(under: Path) -> list[str]:
    """What is mounted at or below ``under`` in this mount namespace."""
    prefix = str(under.resolve())
    return [
        entry.mountpoint
        for entry in mounts.read_mountinfo()
        if entry.mountpoint == prefix or entry.mountpoint.startswith(prefix + "/")
    ]


@pytest.mark.parametrize("propagation", PROPAGATIONS)
def test_image_umount_succeeds_while_another_namespace_holds_copies(
    image: str, workdir: Path, propagation: str
) -> None:
    mnt, root = mount_image(image, workdir)
    with namespace_sleeper(*PROPAGATIONS[propagation]) as sleeper:
        assert str(mnt) in mountpoints_of(sleeper, workdir)  # it holds copies

        done = blockfs("image", "umount", "--root", str(root), str(mnt), check=False)

        assert done.returncode == 0, done.stderr
        assert f"pid {sleeper} (sleep) in mount namespace" in done.stderr
        assert ours_mounted_here(workdir) == []
        # No mount, loop device, nbdkit or nbdfuse of the run directory is left.
        assert leftovers(workdir) == []
        assert list((root / "mounts").iterdir()) == []
        # The copies now fail reads rather than return stale data.
        copy = Path(f"/proc/{sleeper}/root") / str(mnt).lstrip("/")
        with pytest.raises(OSError):
            (copy / "data").read_bytes()


@pytest.mark.parametrize("propagation", PROPAGATIONS)
def test_layer_umount_succeeds_while_another_namespace_holds_copies(
    workdir: Path, propagation: str
) -> None:
    mnt, root = workdir / "mnt", workdir / "root"
    mnt.mkdir()
    blockfs("layer", "mount", "--root", str(root), str(TESTDATA / "zstd-64k.esgz"), str(mnt))
    with namespace_sleeper(*PROPAGATIONS[propagation]) as sleeper:
        assert str(mnt) in mountpoints_of(sleeper, workdir)

        done = blockfs("layer", "umount", "--root", str(root), str(mnt), check=False)

        assert done.returncode == 0, done.stderr
        assert f"pid {sleeper} (sleep) in mount namespace" in done.stderr
        assert ours_mounted_here(workdir) == []
        assert leftovers(workdir) == []
        assert list((root / "mounts").iterdir()) == []


@pytest.fixture
def shared(workdir: Path) -> Iterator[Path]:
    """A shared mount, as systemd makes every mount of a node: mounts made below it get
    peers in namespaces copied with ``--propagation unchanged``."""
    top = workdir / "shared"
    top.mkdir()
    mounts.mount(str(top), str(top), "", MS_BIND)
    try:
        mounts.mount("", str(top), "", MS_SHARED)
        yield top
    finally:
        mounts.umount(str(top), lazy=True)


def test_under_shared_mounts_umount_reaches_the_copies_of_peer_namespaces(
    image: str, shared: Path
) -> None:
    mnt, root = mount_image(image, shared)
    with namespace_sleeper("--propagation", "unchanged") as sleeper:
        assert len(mountpoints_of(sleeper, shared)) > 1

        done = blockfs("image", "umount", "--root", str(root), str(mnt), check=False)

        assert done.returncode == 0, done.stderr
        assert "mount namespace" not in done.stderr  # nothing had to be detached
        assert mountpoints_of(sleeper, shared) == [str(shared)]  # the copies are gone too
        assert ours_mounted_here(shared) == [str(shared)]


def test_a_process_here_inside_the_image_makes_umount_fail_naming_it(
    image: str, workdir: Path
) -> None:
    mnt, root = mount_image(image, workdir)
    holder = subprocess.Popen(["sleep", "600"], cwd=mnt / "etc", stdin=subprocess.DEVNULL)
    try:
        refused = blockfs("image", "umount", "--root", str(root), str(mnt), check=False)
        assert refused.returncode == 1
        assert f"pid {holder.pid} (sleep): working directory {mnt}/etc" in refused.stderr
        assert f"then run `blockfs image umount {mnt}` again" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert (mnt / "etc" / "motd").exists()  # still mounted, nothing undone
    finally:
        holder.kill()
        holder.wait()
    blockfs("image", "umount", "--root", str(root), str(mnt))
    assert ours_mounted_here(workdir) == []


@pytest.mark.parametrize("kind", ["lazy", "extracted"])
def test_a_one_layer_image_bound_from_its_layer_unmounts_with_a_copy_elsewhere(
    one_layer_images: dict[str, str], workdir: Path, kind: str
) -> None:
    # The bind mount shares its filesystem with the layer's EROFS mount (lazy) or with
    # the filesystem the run directory is on (extracted): neither is a user of it.
    mnt, root = mount_image(one_layer_images[kind], workdir)
    assert mounts.find_mount(str(mnt)).fstype != "overlay"  # type: ignore[union-attr]
    with namespace_sleeper() as sleeper:
        assert str(mnt) in mountpoints_of(sleeper, workdir)
        done = blockfs("image", "umount", "--root", str(root), str(mnt), check=False)
        assert done.returncode == 0, done.stderr
        assert ours_mounted_here(workdir) == []
        assert leftovers(workdir) == []
