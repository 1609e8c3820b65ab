"""A standalone mount's NBD server killed with SIGKILL: its supervising shell starts it
again, nbdfuse's relay reconnects, and reads of data nobody read before get the right
bytes. Real nbdkit, nbdfuse and kernel mounts, through the ``blockfs`` command."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest

from blockfs.estargz import BuildOptions, build_file
from blockfs.mount._rundir import run_dir_of
from tests.helpers.cli import blockfs
from tests.helpers.images import make_layout

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]

FILES = {f"data/f{i}": os.urandom(256 << 10) for i in range(6)}


def _layer(workdir: Path) -> tuple[Path, str]:
    """FILES as an eStargz blob; its path and TOC digest."""
    tar = workdir / "layer.tar"
    with tarfile.open(tar, "w") as out:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    blob = workdir / "layer.esgz"
    result = build_file(tar, blob, BuildOptions())
    return blob, result.toc_digest


def _nbdkit_pid(run_dir: Path) -> int | None:
    try:
        pid = int((run_dir / "nbdkit.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"nbdkit" in cmdline and b"python" in cmdline else None


def test_a_layer_mount_reads_on_after_its_server_is_killed(workdir: Path) -> None:
    blob, toc_digest = _layer(workdir)
    root, mnt = workdir / "root", workdir / "mnt"
    mnt.mkdir()
    out = blockfs("layer", "mount", "--root", str(root), "--toc-digest", toc_digest,
                  "--attach", "nbdfuse", str(blob), str(mnt)).stdout  # fmt: skip
    try:
        assert "attach: nbdfuse" in out
        assert (mnt / "data" / "f0").read_bytes() == FILES["data/f0"]
        run_dir = run_dir_of(root, mnt)
        first = _nbdkit_pid(run_dir)
        assert first is not None

        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        # Files never read: each read needs the server, which its shell starts again.
        data = (mnt / "data" / "f1").read_bytes()
        print(f"first read after kill -9 of nbdkit: {time.monotonic() - killed:.2f} s")
        assert hashlib.sha256(data).digest() == hashlib.sha256(FILES["data/f1"]).digest()
        for name in ("data/f2", "data/f3"):
            assert (mnt / name).read_bytes() == FILES[name]
        second = _nbdkit_pid(run_dir)
        assert second not in (None, first)
        # The new server answers the stats socket too.
        blockfs("layer", "stats", "--json", "--root", str(root), str(mnt))

        # Killed again and again: still served, the shell waiting a little longer each time.
        for name in ("data/f4", "data/f5"):
            pid = _nbdkit_pid(run_dir)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert (mnt / name).read_bytes() == FILES[name]
    finally:
        blockfs("layer", "umount", "--root", str(root), str(mnt), check=False)
    assert not os.path.ismount(mnt)
    assert list((root / "mounts").iterdir()) == []
    # the workdir fixture checks that no mount, loop device or process refers to it


def test_an_image_mount_reads_on_after_its_server_is_killed(workdir: Path) -> None:
    def tree(dest: Path) -> None:
        for name, data in FILES.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)

    make_layout(workdir / "plain", [tree])
    image = f"oci:{workdir / 'esgz'}:v1"
    blockfs("image", "convert", f"oci:{workdir / 'plain'}:v1", image)
    root, mnt = workdir / "root", workdir / "mnt"
    mnt.mkdir()
    blockfs("image", "mount", "--root", str(root), "--attach", "nbdfuse", image, str(mnt))
    try:
        assert (mnt / "data" / "f0").read_bytes() == FILES["data/f0"]
        run_dir = run_dir_of(root, mnt)
        first = _nbdkit_pid(run_dir)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for name in ("data/f1", "data/f2"):
            assert (mnt / name).read_bytes() == FILES[name]
        assert _nbdkit_pid(run_dir) not in (None, first)
    finally:
        blockfs("image", "umount", "--root", str(root), str(mnt), check=False)
    assert not os.path.ismount(mnt)
    assert list((root / "mounts").iterdir()) == []
