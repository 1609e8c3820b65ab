"""mounts.unmount with copies in other mount namespaces, and what it names when something
in this namespace uses a mount: real tmpfs, bind and overlay mounts, ``unshare -m``."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attach_testkit import force_cleanup, leftovers

from blockfs.host import mounts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
]

MS_BIND = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted in tmp_path, holding a file; anything left is undone afterwards."""
    top = tmp_path / "fs"
    top.mkdir()
    mounts.mount("tmpfs", str(top), "tmpfs", 0, "size=1m")
    (top / "sub").mkdir()
    (top / "sub" / "file").write_text("data\n")
    yield top
    if mounts.find_mount(str(top)) is not None:  # the tests that only look leave it
        mounts.umount(str(top))
    left = leftovers(tmp_path)
    force_cleanup(tmp_path)
    assert left == [], f"left behind: {left}"


@contextlib.contextmanager
def process(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the block; once started (in its own mount namespace if it is
    ``unshare -m …``: unshare execs its command), then killed."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 10
        while _command(proc.pid) != os.path.basename(argv[-2]):
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def in_namespace(*argv: str) -> list[str]:
    return ["unshare", "-m", *argv]


def busy(call: Callable[[], object]) -> mounts.MountBusyError:
    with pytest.raises(mounts.MountBusyError) as caught:
        call()
    assert caught.value.errno == 16  # EBUSY
    return caught.value


def test_a_mount_copied_into_another_namespace_is_unmounted_here(tmpfs: Path) -> None:
    with process(in_namespace("sleep", "600")) as sleeper:
        assert mounts.mount_namespace(sleeper.pid) != mounts.mount_namespace()
        copied = Path(f"/proc/{sleeper.pid}/mountinfo").read_text()
        assert f" {tmpfs} " in copied  # a copy, although it is private
        # umount2 does not count a private copy: unmounted outright, not detached.
        assert mounts.unmount(str(tmpfs)) is None
        assert mounts.find_mount(str(tmpfs)) is None


def test_held_only_from_another_namespace_it_is_detached_naming_the_holder(
    tmpfs: Path,
) -> None:
    device = mounts.find_mount(str(tmpfs)).device  # type: ignore[union-attr]
    # The file is opened here and inherited into the new namespace: the process there
    # holds this namespace's mount, not its copy.
    held = open(tmpfs / "sub" / "file", "rb")  # noqa: SIM115
    with process(in_namespace("sleep", "600"), stdout=held) as sleeper:
        held.close()
        copies = mounts.copies_elsewhere([device])
        assert [copy.processes for copy in copies] == [((sleeper.pid, "sleep"),)]
        assert copies[0].mountpoints == (str(tmpfs),)
        detached = mounts.unmount(str(tmpfs))
        assert detached is not None and detached.copies == tuple(copies)
        assert f"pid {sleeper.pid} (sleep) in mount namespace" in detached.describe()
        assert mounts.find_mount(str(tmpfs)) is None


def test_a_process_here_with_its_working_directory_inside_is_named(tmpfs: Path) -> None:
    with process(["sleep", "600"], cwd=tmpfs / "sub") as sleeper:
        error = busy(lambda: mounts.unmount(str(tmpfs)))
        assert f"pid {sleeper.pid} (sleep): working directory {tmpfs}/sub" in error.users
        assert str(tmpfs) in str(error)
        assert mounts.find_mount(str(tmpfs)) is not None  # nothing was undone
        # Told to look away from it, the process no longer counts; nor does anything
        # elsewhere, so it is detached.
        assert mounts.unmount(str(tmpfs), ignore_pids=[sleeper.pid]) is not None


def test_open_and_mapped_files_are_named_but_not_those_of_other_namespaces(
    tmpfs: Path,
) -> None:
    with (
        open(tmpfs / "sub" / "file", "rb") as f,
        process(["sleep", "600"], stdout=f) as here,
        process(in_namespace("--wd", str(tmpfs / "sub"), "sleep", "600")) as there,
    ):
        uses = {use.pid: use for use in mounts.processes_using(str(tmpfs))}
        assert there.pid not in uses  # its working directory is in its own copy
        assert f"open file {tmpfs}/sub/file" in uses[here.pid].uses
        assert f"open file {tmpfs}/sub/file" in uses[os.getpid()].uses
        assert "this command" in uses[os.getpid()].describe()
    library = tmpfs / "libcopy.so"
    library.write_bytes(Path("/bin/sleep").read_bytes())
    with open(library, "rb") as f:
        import mmap

        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        uses = {use.pid: use for use in mounts.processes_using(str(tmpfs))}
        assert f"mapped file {library}" in uses[os.getpid()].uses
    finally:
        mapped.close()


def test_users_that_umount2_cannot_see_are_named_before_anything_is_unmounted(
    tmpfs: Path, tmp_path: Path
) -> None:
    # overlayfs holds private clones of its layers, so umount2 would let the lower go.
    (tmpfs / "other").mkdir()
    merged = tmp_path / "merged"
    merged.mkdir()
    lowers = f"lowerdir={tmpfs}/sub:{tmpfs}/other"
    mounts.mount("overlay", str(merged), "overlay", mounts.MS_RDONLY, lowers)
    error = busy(lambda: mounts.unmount(str(tmpfs)))
    assert error.users == (f"the overlay mounted on {merged} stacks a directory in it",)
    mounts.umount(str(merged))

    bound = tmp_path / "bound"
    bound.mkdir()
    mounts.mount(str(tmpfs / "sub"), str(bound), "", MS_BIND)
    error = busy(lambda: mounts.unmount(str(tmpfs), sole=True))
    assert error.users == (f"the same filesystem is also mounted on {bound}",)
    # Not the mount's alone, the filesystem may be mounted elsewhere too (as / is).
    assert mounts.mount_users(mounts.find_mount(str(tmpfs))) == []  # type: ignore[arg-type]
    mounts.umount(str(bound))

    mounts.mount("tmpfs", str(tmpfs / "sub"), "tmpfs", 0, "size=1m")
    error = busy(lambda: mounts.unmount(str(tmpfs)))
    assert error.users == (f"tmpfs is mounted on {tmpfs}/sub below it",)
    mounts.umount(str(tmpfs / "sub"))

    assert mounts.unmount(str(tmpfs)) is None


def test_a_loop_device_backed_by_a_file_inside_is_named_unless_ignored(tmpfs: Path) -> None:
    image = tmpfs / "disk.img"
    image.write_bytes(bytes(1 << 16))
    loop = mounts.loop_attach_readonly(str(image))
    try:
        error = busy(lambda: mounts.unmount(str(tmpfs)))
        assert error.users == (f"{loop} is backed by {image}",)
        assert mounts.mount_users(mounts.find_mount(str(tmpfs)), ignore_loops=[loop]) == []  # type: ignore[arg-type]
    finally:
        mounts.loop_detach(loop)
    assert mounts.unmount(str(tmpfs)) is None


def test_nothing_mounted_is_nothing_to_do(tmp_path: Path) -> None:
    assert mounts.unmount(str(tmp_path)) is None


def test_many_users_are_cut_short() -> None:
    error = mounts.MountBusyError(
        "/mnt/x", [f"pid {n} (x): working directory /" for n in range(12)]
    )
    assert "pid 7 (x)" in str(error) and "pid 8 (x)" not in str(error)
    assert str(error).endswith("and 4 more")


def test_a_kernel_without_erofs_directio_gets_a_buffered_mount(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mocked: this kernel has the option; one whose EROFS lacks it (EINVAL for an
    # unknown option) cannot exist here. The real mount with it is proven end to end by
    # tests/e2e/test_image_optimize.py (no readahead past the prioritised files).
    from blockfs.host import _attach_common

    calls: list[str | None] = []

    def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None):
        calls.append(data)
        if data == _attach_common.DIRECT_IO:
            raise mounts.MountError(errno.EINVAL, f"cannot mount {source}")

    monkeypatch.setattr(mounts, "mount", mount)
    undo = contextlib.ExitStack()
    _attach_common.mount_erofs("img", "/mnt", export="e", undo=undo, direct_io=True)
    undo.pop_all()  # the unmount it registered is not run: nothing was mounted
    assert calls == [_attach_common.DIRECT_IO, None]
    # Any other refusal is the error, not a reason to try without the option.
    calls.clear()

    def refuse(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None):
        calls.append(data)
        raise mounts.MountError(errno.ENOENT, f"cannot mount {source}")

    monkeypatch.setattr(mounts, "mount", refuse)
    with pytest.raises(_attach_common.ErofsMountError):
        _attach_common.mount_erofs("img", "/mnt", export="e", undo=undo, direct_io=True)
    assert calls == [_attach_common.DIRECT_IO]
