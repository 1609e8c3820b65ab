"""Attaching an export served by real nbdkit and mounting its EROFS image, and undoing it.

This host has no nbd.ko, so the end-to-end tests use nbdfuse with file-backed and loop
mounts; the kernel NBD path is proven by the VM test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from attach_testkit import (
    LAYER_EXPORT,
    NOT_EROFS_EXPORT,
    ODD_EXPORT,
    ServedExports,
    force_cleanup,
    leftovers,
    nbd_ko_present,
    tree_listing,
)

from blockfs.host import kernel_nbd, mounts
from blockfs.host._attach_common import push_undo
from blockfs.host.attach import (
    ATTACHMENT_FILE,
    AUTO,
    AttachError,
    Attachment,
    AttachMode,
    attach_and_mount,
    choose_mode,
    is_mounted,
    parse_choice,
    read_attachment,
    reconnect,
    unmount_and_detach,
)

PROJECT = Path(__file__).resolve().parents[2]


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """Marked ``root`` (so ``-m "not root"`` leaves it out) and skipped unless run as root."""
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
    return pytest.mark.root(skip(test))


without_nbd_ko = pytest.mark.skipif(nbd_ko_present(), reason="this host has nbd.ko")


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A mountpoint and a state dir; whatever a test leaves mounted or running is undone."""
    # Spaces exercise the octal escapes of /proc/self/mountinfo.
    mountpoint, state_dir = tmp_path / "mnt point", tmp_path / "state dir"
    mountpoint.mkdir()
    yield mountpoint, state_dir
    try:
        att = read_attachment(str(state_dir)) if state_dir.exists() else None
        if att is not None:
            unmount_and_detach(att)
    finally:
        force_cleanup(tmp_path)


def _file_backed_expected() -> bool:
    # EROFS mounts regular files since Linux 6.12 (CONFIG_EROFS_FS_BACKED_BY_FILE).
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 12)


def test_parse_choice_accepts_auto_nbd_and_nbdfuse_only() -> None:
    assert parse_choice("auto") is AUTO
    assert parse_choice("nbd") is AttachMode.KERNEL_NBD
    assert parse_choice("nbdfuse") is AttachMode.NBDFUSE
    with pytest.raises(AttachError, match="unknown attach mode 'nbd-client'"):
        parse_choice("nbd-client")
    with pytest.raises(AttachError, match="unknown attach mode 'NBD'"):
        parse_choice("NBD")


@without_nbd_ko
def test_without_nbd_ko_kernel_mode_is_unavailable_and_auto_picks_nbdfuse() -> None:
    assert kernel_nbd.available() is False
    assert choose_mode() is choose_mode(AUTO) is AttachMode.NBDFUSE
    assert choose_mode(AttachMode.NBDFUSE) is AttachMode.NBDFUSE


@without_nbd_ko
def test_forcing_nbd_mode_without_nbd_ko_says_to_use_nbdfuse() -> None:
    with pytest.raises(AttachError) as caught:
        choose_mode(AttachMode.KERNEL_NBD)

    assert "nbd.ko is not available" in str(caught.value)
    assert "use attach mode nbdfuse" in str(caught.value)


@needs_root
@without_nbd_ko
def test_kernel_attach_without_nbd_ko_fails_cleanly(
    nbd_server: ServedExports, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs

    with pytest.raises(AttachError, match=r"nbd.ko not available.*use attach mode nbdfuse"):
        attach_and_mount(
            nbd_server.socket,
            LAYER_EXPORT,
            str(mountpoint),
            state_dir=str(state_dir),
            mode=AttachMode.KERNEL_NBD,
        )

    assert not is_mounted(str(mountpoint))
    assert list(state_dir.iterdir()) == []


@needs_root
def test_nbdfuse_attach_mounts_the_tree_read_only_and_detach_leaves_nothing(
    nbd_server: ServedExports, layer_tree: Path, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs

    att = attach_and_mount(
        nbd_server.socket,
        LAYER_EXPORT,
        str(mountpoint),
        state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )

    assert tree_listing(mountpoint) == tree_listing(layer_tree)
    entry = mounts.find_mount(str(mountpoint))
    assert entry is not None
    assert entry.fstype == "erofs"
    assert entry.read_only
    assert entry.source == att.mount_source
    assert att.mode is AttachMode.NBDFUSE
    assert att.device == str(state_dir / "fuse" / "image")
    assert att.mount_method == ("file-backed" if _file_backed_expected() else "loop")
    if att.mount_method == "file-backed":
        assert att.mount_source == att.device
        assert att.loop_device is None
    assert att.nbdfuse_pid is not None
    assert (state_dir / "nbdfuse.pid").read_text().strip() == str(att.nbdfuse_pid)
    # nbdfuse reaches the server through its relay.
    relay = att.relay
    assert relay is not None and att.relay_socket == str(relay.socket)
    assert relay.is_running() and relay.supervisor_pid() is not None
    nbdfuse_argv = Path(f"/proc/{att.nbdfuse_pid}/cmdline").read_text()
    assert f"socket={quote(str(relay.socket), safe='/')}" in nbdfuse_argv
    assert read_attachment(str(state_dir)) == att
    assert leftovers(state_dir)  # nbdfuse and its FUSE mount are in use

    unmount_and_detach(att)

    assert not is_mounted(str(mountpoint))
    assert leftovers(state_dir) == []
    assert list(mountpoint.iterdir()) == []
    state_dir.rmdir()  # empty: nothing of the attachment is left in it


@needs_root
def test_forced_loop_mount_of_an_odd_export_name_works_and_detaches_the_loop(
    nbd_server: ServedExports, layer_tree: Path, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs

    att = attach_and_mount(
        nbd_server.socket,
        ODD_EXPORT,
        str(mountpoint),
        state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
        mount_method="loop",
    )

    assert att.mount_method == "loop"
    assert att.loop_device is not None
    assert att.loop_device.startswith("/dev/loop")
    assert att.mount_source == att.loop_device
    assert mounts.loop_backing_file(att.loop_device) == att.device
    entry = mounts.find_mount(str(mountpoint))
    assert entry is not None
    assert (entry.fstype, entry.source, entry.read_only) == ("erofs", att.loop_device, True)
    assert tree_listing(mountpoint) == tree_listing(layer_tree)

    unmount_and_detach(att)

    assert mounts.loop_backing_file(att.loop_device) is None
    assert not is_mounted(str(mountpoint))
    assert leftovers(state_dir) == []


@needs_root
def test_unmount_and_detach_twice_is_harmless(
    nbd_server: ServedExports, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs
    att = attach_and_mount(
        nbd_server.socket,
        LAYER_EXPORT,
        str(mountpoint),
        state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )

    unmount_and_detach(att)
    unmount_and_detach(att)

    assert not is_mounted(str(mountpoint))
    assert leftovers(state_dir) == []


@needs_root
def test_attach_onto_a_mounted_mountpoint_is_refused(
    nbd_server: ServedExports, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    mountpoint, state_dir = dirs
    attach_and_mount(
        nbd_server.socket,
        LAYER_EXPORT,
        str(mountpoint),
        state_dir=str(state_dir),
        mode=AttachMode.NBDFUSE,
    )

    with pytest.raises(AttachError, match="already mounted"):
        attach_and_mount(
            nbd_server.socket,
            LAYER_EXPORT,
            str(mountpoint),
            state_dir=str(tmp_path / "other-state"),
            mode=AttachMode.NBDFUSE,
        )


@needs_root
def test_unknown_export_fails_with_clear_error_and_leaves_nothing_behind(
    nbd_server: ServedExports, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs

    with pytest.raises(AttachError) as caught:
        attach_and_mount(
            nbd_server.socket,
            "sha256:missing",
            str(mountpoint),
            state_dir=str(state_dir),
            mode=AttachMode.NBDFUSE,
        )

    assert "export not found" in str(caught.value)
    assert "sha256:missing" in str(caught.value)
    assert not is_mounted(str(mountpoint))
    assert leftovers(state_dir) == []
    assert list(state_dir.iterdir()) == []


@needs_root
@pytest.mark.parametrize("mount_method", ["file-backed", "loop"])
def test_non_erofs_export_fails_after_nbdfuse_started_and_undoes_everything(
    nbd_server: ServedExports, dirs: tuple[Path, Path], mount_method: str
) -> None:
    mountpoint, state_dir = dirs
    if mount_method == "file-backed" and not _file_backed_expected():
        pytest.skip("this kernel has no file-backed EROFS mounts")

    with pytest.raises(AttachError, match=r"cannot mount .* as EROFS"):
        attach_and_mount(
            nbd_server.socket,
            NOT_EROFS_EXPORT,
            str(mountpoint),
            state_dir=str(state_dir),
            mode=AttachMode.NBDFUSE,
            mount_method="loop" if mount_method == "loop" else "file-backed",
        )

    assert not is_mounted(str(mountpoint))
    assert leftovers(state_dir) == []
    assert list(state_dir.iterdir()) == []


def test_unreachable_server_is_reported_with_its_socket(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    mountpoint, state_dir = dirs
    socket = str(tmp_path / "nobody-listens.sock")

    with pytest.raises(AttachError, match=r"cannot connect to the NBD server at .*nobody-listens"):
        attach_and_mount(
            socket, LAYER_EXPORT, str(mountpoint), state_dir=str(state_dir), mode=AttachMode.NBDFUSE
        )


def test_undo_runs_every_step_last_first_and_keeps_the_error_that_caused_it() -> None:
    ran: list[str] = []

    def fails() -> None:
        ran.append("fails")
        raise OSError("cleanup failed too")

    with pytest.raises(AttachError, match="the attach failed"), contextlib.ExitStack() as undo:
        push_undo(undo, ran.append, "first")
        push_undo(undo, fails)
        push_undo(undo, ran.append, "last")
        raise AttachError("the attach failed")

    assert ran == ["last", "fails", "first"]


def test_mountinfo_lines_are_parsed_with_escapes_and_optional_fields() -> None:
    text = (
        "36 35 98:0 / /mnt/with\\040space rw,noatime shared:1 master:2 - erofs "
        "/var/lib/x/fuse/im\\134age ro,user_xattr\n"
        "37 36 0:40 / /proc rw - proc proc rw\n"
    )

    first, second = mounts.parse_mountinfo(text)

    assert first.mountpoint == "/mnt/with space"
    assert first.source == "/var/lib/x/fuse/im\\age"
    assert (first.fstype, first.mount_options, first.read_only) == (
        "erofs",
        ("rw", "noatime"),
        False,
    )
    assert first.super_options == ("ro", "user_xattr")
    assert (second.mountpoint, second.fstype) == ("/proc", "proc")


def _sample_attachment(tmp_path: Path) -> Attachment:
    return Attachment(
        mode=AttachMode.NBDFUSE,
        export=LAYER_EXPORT,
        socket="/run/blockfs/nbd.sock",
        device=str(tmp_path / "state" / "fuse" / "image"),
        state_dir=str(tmp_path / "state"),
        mount_source="/dev/loop3",
        mount_method="loop",
        mountpoint=str(tmp_path / "mnt"),
        nbdfuse_pid=1234,
        loop_device="/dev/loop3",
        connections=4,
    )


def test_attachment_json_round_trips(tmp_path: Path) -> None:
    att = _sample_attachment(tmp_path)

    data = json.loads(json.dumps(att.to_json()))

    assert data["mode"] == "nbdfuse"
    assert Attachment.from_json(data) == att


def test_a_record_written_by_an_earlier_version_still_loads(tmp_path: Path) -> None:
    # attachment.json as blockfs wrote it before the attach backends were split: running
    # mounts must survive an upgrade.
    record = {
        "connections": 4,
        "device": "/dev/nbd3",
        "export": "sha256-0123",
        "loop_device": None,
        "mode": "nbd",
        "mount_method": "block",
        "mount_source": "/dev/nbd3",
        "mountpoint": "/var/lib/blockfs/layers/sha256-0123/mnt",
        "nbdfuse_pid": None,
        "socket": "/var/lib/blockfs/run/nbd.sock",
        "state_dir": "/var/lib/blockfs/layers/sha256-0123/attach",
    }
    (tmp_path / ATTACHMENT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))

    att = read_attachment(str(tmp_path))

    assert att is not None
    assert (att.mode, att.device, att.nbd_index, att.connections) == (
        AttachMode.KERNEL_NBD,
        "/dev/nbd3",
        3,
        4,
    )
    assert att.backend_identifier == "blockfs:sha256-0123"
    assert att.to_json() == record | {"relay_socket": None}


def test_a_record_never_holds_the_auto_choice(tmp_path: Path) -> None:
    record = _sample_attachment(tmp_path).to_json() | {"mode": "auto"}

    with pytest.raises(AttachError, match="unreadable attachment record"):
        Attachment.from_json(record)


def test_unreadable_attachment_record_raises_attach_error(tmp_path: Path) -> None:
    (tmp_path / ATTACHMENT_FILE).write_text('{"mode": "nbd"}')

    with pytest.raises(AttachError, match="unreadable attachment record"):
        read_attachment(str(tmp_path))


def test_reconnect_of_an_nbdfuse_attachment_without_a_relay_explains_it_must_be_remounted(
    tmp_path: Path,
) -> None:
    # As an earlier version recorded it: nbdfuse connected to the server itself.
    with pytest.raises(
        AttachError, match=r"cannot be reconnected: .*without a relay; unmount and attach it again"
    ):
        reconnect(_sample_attachment(tmp_path), "/run/blockfs/nbd.sock")


def test_the_attach_code_imports_nothing_but_the_standard_library_and_attrs() -> None:
    # The VM test's guest runs it with nothing else (tools/vmtest/_initramfs.py): the
    # nbdfuse relay must not pull in the NBD server's code (blockfs.image and its packages).
    script = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import blockfs.host.attach\n"
        "for name in sorted(set(sys.modules) - before):\n"
        "    print(name, getattr(sys.modules[name], '__file__', None) or '')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PROJECT
    )
    loaded = [line.split(" ", 1) for line in done.stdout.splitlines()]
    assert not [name for name, _ in loaded if name.startswith("blockfs.image")]
    third_party = [
        name
        for name, path in loaded
        if "-packages" in path and name.split(".")[0] not in ("attr", "attrs")
    ]
    assert third_party == []
