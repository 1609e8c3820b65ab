"""End to end: Debian's containerd 1.6 and runc using ``blockfs-snapshotter`` as a proxy
snapshotter, driven with ``ctr``, on private sockets and directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.helpers.containerd import (
    RUNC,
    Containerd,
    ImageArchive,
    layer_tar,
    mounts_under,
    require_root_tools,
    short_tempdir,
    start_containerd,
    write_image_archive,
)
from tests.helpers.snapshotter_daemon import SnapshotterDaemon, snapshots_stub, start_snapshotter

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUSYBOX = Path("/bin/busybox")
IMAGE = "docker.io/blockfs-test/busybox:latest"
MOTD = b"blockfs second layer\n"
# What the root may hold once every snapshot is gone.
# What a daemon's root holds with no snapshot: the store, and the run directory and chunk
# cache of the NBD server that runs while the daemon does.
CLEAN_ROOT = {"store.db", "store.db-wal", "store.db-shm", "snapshots", "run", "cache"}


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> ImageArchive:
    """A two-layer image: static busybox, then /etc/motd."""
    if not BUSYBOX.is_file():
        pytest.skip("needs the static busybox of the busybox-static Debian package")
    bottom = layer_tar({"bin/busybox": BUSYBOX.read_bytes()}, modes={"bin/busybox": 0o755})
    top = layer_tar({"etc/motd": MOTD, "tmp": None}, modes={"tmp": 0o1777})
    return write_image_archive(
        tmp_path_factory.mktemp("image") / "busybox.tar",
        IMAGE,
        [bottom, top],
        cmd=["/bin/busybox", "cat", "/etc/motd"],
    )


@attrs.frozen
class Stack:
    """blockfs-snapshotter registered as the proxy snapshotter ``blockfs`` of containerd."""

    work: Path
    snapshotter: SnapshotterDaemon
    containerd: Containerd

    @property
    def root(self) -> Path:
        return self.snapshotter.root

    def ctr(self, *args: str, check: bool = True) -> str:
        return self.containerd.ctr(*args, check=check).stdout

    def snapshots(self) -> dict[str, tuple[str, str]]:
        """``ctr snapshots ls``: containerd's name -> (parent, kind)."""
        out = self.ctr("snapshots", "--snapshotter", "blockfs", "ls")
        rows = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3:
                rows[fields[0]] = (fields[1], fields[2])
            elif len(fields) == 2:
                rows[fields[0]] = ("", fields[1])
        return rows

    def backend_snapshots(self) -> list[pb.Info]:
        """Every snapshot the daemon holds, asked directly as containerd's GC asks."""
        with self.snapshotter.channel() as channel:
            stub = snapshots_stub(channel)
            return [i for m in stub.List(pb.ListSnapshotsRequest(), timeout=30) for i in m.info]


@pytest.fixture
def stack() -> Iterator[Stack]:
    require_root_tools(RUNC)
    work = short_tempdir("bfs-e2e-")
    try:
        with (
            start_snapshotter(work / "root", work / "s.sock") as snapshotter,
            start_containerd({"blockfs": work / "s.sock"}) as containerd,
        ):
            yield Stack(work, snapshotter, containerd)
            assert mounts_under(work) == [], "a mount under the snapshotter root was left"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def import_image(stack: Stack, image: ImageArchive) -> None:
    out = stack.ctr("images", "import", "--snapshotter", "blockfs", str(image.path))
    assert f"unpacking {image.name}" in out


def assert_root_clean(stack: Stack) -> None:
    assert stack.backend_snapshots() == []
    assert os.listdir(stack.root / "snapshots") == []
    assert set(os.listdir(stack.root)) <= CLEAN_ROOT


def test_import_run_and_gc_through_blockfs(stack: Stack, busybox_image: ImageArchive) -> None:
    import_image(stack, busybox_image)
    bottom, top = busybox_image.chain_ids
    assert stack.snapshots() == {bottom: ("", "Committed"), top: (bottom, "Committed")}
    # The layers really are in blockfs's root, one snapshot directory each.
    assert len(os.listdir(stack.root / "snapshots")) == 2

    out = stack.ctr(
        "run", "--rm", "--snapshotter", "blockfs", IMAGE, "echo-1", "/bin/busybox", "echo", "hello"
    )
    assert out == "hello\n"
    # The image's own command reads the upper layer's file through the overlay.
    assert stack.ctr("run", "--rm", "--snapshotter", "blockfs", IMAGE, "motd-1") == MOTD.decode()
    # The container's writes land in its own upper dir, not in the image's layers.
    layer_dirs = [stack.root / "snapshots" / d / "fs" for d in os.listdir(stack.root / "snapshots")]
    script = "echo written > /tmp/new && /bin/busybox cat /tmp/new"
    out = stack.ctr(
        "run", "--rm", "--snapshotter", "blockfs", IMAGE, "write-1", "/bin/busybox", "sh", "-c",
        script,
    )  # fmt: skip
    assert out == "written\n"
    assert [d for d in layer_dirs if (d / "tmp" / "new").exists()] == []

    stack.ctr("images", "rm", "--sync", IMAGE)
    assert stack.snapshots() == {}
    assert_root_clean(stack)


def test_ctr_snapshot_commands_reach_the_backend(stack: Stack, busybox_image: ImageArchive) -> None:
    import_image(stack, busybox_image)
    bottom, top = busybox_image.chain_ids
    sn = ("snapshots", "--snapshotter", "blockfs")

    # ctr's view has no gc.root label: containerd's GC removes it as soon as ctr exits.
    [view] = json.loads(stack.ctr(*sn, "view", "--mounts", "v1", bottom))
    bottom_fs = view["Source"]
    assert view["Type"] == "bind" and view["Options"] == ["ro", "rbind"]
    assert Path(bottom_fs, "bin", "busybox").is_file()
    [prepared] = json.loads(stack.ctr(*sn, "prepare", "--mounts", "a1", top))
    assert (prepared["Type"], prepared["Source"]) == ("overlay", "overlay")
    options = prepared["Options"]
    lowers = next(o for o in options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
    assert len(lowers) == 2 and lowers[1] == bottom_fs  # nearest parent first
    assert Path(lowers[0], "etc", "motd").read_bytes() == MOTD
    # Mounts of the same snapshot later give the same options (upper, work, lowers).
    assert ",".join(options) in stack.ctr(*sn, "mounts", "/mnt", "a1")

    # Only containerd.io/snapshot/ labels are passed on to the backend.
    stack.ctr(*sn, "label", top, "containerd.io/snapshot/blockfs-test=yes", "other=no")
    [backend_top] = [i for i in stack.backend_snapshots() if i.name.endswith(top)]
    assert dict(backend_top.labels) == {"containerd.io/snapshot/blockfs-test": "yes"}
    assert "blockfs-test" in stack.ctr(*sn, "info", top)

    # Usage recorded at commit: the fs dir, bin/ and bin/busybox (about 2 MB).
    [row] = stack.ctr(*sn, "usage", bottom).splitlines()[1:]
    key, size, unit, inodes = row.split()
    assert (key, unit, inodes) == (bottom, "MiB", "3") and 1 < float(size) < 4

    stack.ctr(*sn, "rm", "a1")
    stack.ctr("images", "rm", "--sync", IMAGE)
    assert_root_clean(stack)


def test_containerd_keeps_using_snapshots_across_a_daemon_restart(
    stack: Stack, busybox_image: ImageArchive
) -> None:
    import_image(stack, busybox_image)
    assert stack.snapshotter.stop(signal.SIGTERM) == 0
    with start_snapshotter(stack.root, stack.snapshotter.socket) as again:
        # containerd redials with a backoff of up to 3 s; wait until it is through.
        deadline = time.monotonic() + 30
        while stack.containerd.ctr(
            "snapshots", "--snapshotter", "blockfs", "ls", check=False
        ).returncode:
            assert time.monotonic() < deadline, stack.containerd.log()[-3000:]
            time.sleep(0.2)
        out = stack.ctr(
            "run", "--rm", "--snapshotter", "blockfs", IMAGE, "after-restart", "/bin/busybox",
            "echo", "still here",
        )  # fmt: skip
        assert out == "still here\n"
        stack.ctr("images", "rm", "--sync", IMAGE)
        with again.channel() as channel:
            stub = snapshots_stub(channel)
            assert [m for m in stub.List(pb.ListSnapshotsRequest(), timeout=30)] == []
    assert os.listdir(stack.root / "snapshots") == []
