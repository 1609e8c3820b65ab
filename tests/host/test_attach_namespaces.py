"""unmount_and_detach of an nbdfuse attachment while another mount namespace holds copies
of its mounts, and when something in this namespace still uses it: real nbdkit, nbdfuse,
EROFS (file-backed and on a loop device) and ``unshare -m``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attach_testkit import LAYER_EXPORT, ServedExports, force_cleanup, leftovers

from blockfs.host import _process, mounts, nbdfuse
from blockfs.host.attach import (
    AttachError,
    Attachment,
    AttachMode,
    attach_and_mount,
    read_attachment,
    unmount_and_detach,
)
from tests.helpers.namespaces import mountpoints_of, namespace_sleeper

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
]


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A directory for the mountpoint (``mnt``) and the state (``state``); whatever a
    test leaves mounted or running is undone."""
    (tmp_path / "mnt").mkdir()
    yield tmp_path
    try:
        att = read_attachment(str(tmp_path / "state"))
        if att is not None:
            unmount_and_detach(att)
    finally:
        force_cleanup(tmp_path)


def attach(
    nbd_server: ServedExports, work: Path, method: nbdfuse.FileMountMethod = "file-backed"
) -> Attachment:
    return attach_and_mount(
        nbd_server.socket,
        LAYER_EXPORT,
        str(work / "mnt"),
        state_dir=str(work / "state"),
        mode=AttachMode.NBDFUSE,
        mount_method=method,
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)


@pytest.mark.parametrize("method", ["file-backed", "loop"])
def test_a_layer_that_another_namespace_holds_is_detached_and_nbdfuse_stopped(
    nbd_server: ServedExports,
    work: Path,
    method: nbdfuse.FileMountMethod,
    caplog: pytest.LogCaptureFixture,
) -> None:
    att = attach(nbd_server, work, method)
    assert att.nbdfuse_pid is not None
    with namespace_sleeper() as sleeper:
        copied = mountpoints_of(sleeper, work)
        assert str(work / "mnt") in copied and nbdfuse.fuse_dir(att.state_dir) in copied

        unmount_and_detach(att)

        # Nothing of it is left here, and its nbdfuse is gone; the loop device, which the
        # copy of the EROFS mount still holds open, is freed on its last close.
        left = leftovers(work)
        assert [x for x in left if not x.startswith("/dev/loop")] == []
        assert not _process.running(att.nbdfuse_pid, att.state_dir)
        assert f"pid {sleeper} (sleep) in mount namespace" in caplog.text
        # Through its copy, the other namespace now reads errors, not stale data.
        copy = Path(f"/proc/{sleeper}/root") / str(work / "mnt").lstrip("/")
        with pytest.raises(OSError):
            (copy / "usr" / "lib" / "libfoo.so").read_bytes()  # never read: not cached
    wait_until(lambda: leftovers(work) == [], "freeing the loop device")


def test_a_process_here_with_the_fuse_file_open_is_named(
    nbd_server: ServedExports, work: Path
) -> None:
    att = attach(nbd_server, work)
    with open(att.device, "rb") as image:
        holder = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=image)
    try:
        with pytest.raises(AttachError) as caught:
            unmount_and_detach(att)
        assert f"pid {holder.pid} (sleep): open file {att.device}" in str(caught.value)
        assert "stop those processes" in str(caught.value)
        assert _process.running(att.nbdfuse_pid, att.state_dir)  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()
    unmount_and_detach(att)  # once it is let go, unmounting again finishes the job
    assert leftovers(work) == []


def test_an_overlay_here_on_the_layer_is_named_before_anything_is_unmounted(
    nbd_server: ServedExports, work: Path
) -> None:
    att = attach(nbd_server, work)
    merged = work / "merged"
    merged.mkdir()
    lowers = f"lowerdir={work}/mnt/etc:{work}/mnt/usr"
    mounts.mount("overlay", str(merged), "overlay", mounts.MS_RDONLY, lowers)
    try:
        with pytest.raises(AttachError, match=f"the overlay mounted on {merged} stacks"):
            unmount_and_detach(att)
        assert mounts.find_mount(str(work / "mnt")) is not None
        assert (merged / "hostname").read_text() == "blockfs\n"
    finally:
        mounts.umount(str(merged))
    unmount_and_detach(att)
    assert leftovers(work) == []


ABORT = """
import sys
from blockfs.host import mounts, nbdfuse
mounts.mount("fusectl", "/sys/fs/fuse/connections", "fusectl")
entry = mounts.find_mount(sys.argv[1])
sys.exit(0 if entry is not None and nbdfuse._abort_connection(entry) else 1)
"""


def test_aborting_the_fuse_connection_makes_nbdfuse_exit(
    nbd_server: ServedExports, work: Path
) -> None:
    # fusectl is not mounted everywhere (nor here): mount it in a namespace of its own.
    att = attach(nbd_server, work)
    fuse_dir = nbdfuse.fuse_dir(att.state_dir)
    aborted = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", ABORT, fuse_dir],
        capture_output=True,
        text=True,
        check=False,
    )
    assert aborted.returncode == 0, aborted.stderr
    wait_until(
        lambda: not _process.running(att.nbdfuse_pid, fuse_dir),  # type: ignore[arg-type]
        "nbdfuse exiting",
    )
    unmount_and_detach(att)
    assert leftovers(work) == []
