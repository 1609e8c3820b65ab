"""Stacking mounted layers with overlayfs, refusing hostile blobs, and `blockfs layer serve`."""

import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.estargz.estargz_blobkit import BlobMaker
from tests.helpers.cli import PROJECT, blockfs
from tests.helpers.testdata import TESTDATA, toc_digest_of

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def layer_file(name: str) -> bytes:
    with tarfile.open(TESTDATA / "layer.tar") as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))


def test_overlay_of_two_mounted_layers_applies_whiteouts_and_opaque_dirs(mount_layer, workdir):
    lower_tar = workdir / "lower.tar"
    write_tar(
        lower_tar,
        {
            "etc/removed.conf": b"gone in the upper layer\n",
            "etc/kept.conf": b"still here\n",
            "opaque/old-file": b"hidden by the opaque dir\n",
        },
    )
    lower_blob = workdir / "lower.esgz"
    built = blockfs("layer", "build", str(lower_tar), str(lower_blob))
    assert "tocDigest" in built.stdout
    lower = mount_layer(lower_blob, name="lower")
    upper = mount_layer(
        TESTDATA / "gzip-64k.esgz", "--toc-digest", toc_digest_of("gzip-64k.esgz"), name="upper"
    )
    merged = workdir / "merged"
    merged.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={upper}:{lower}", str(merged)],
        check=True,
    )
    try:
        assert not (merged / "etc/removed.conf").exists()
        assert (merged / "etc/kept.conf").read_bytes() == b"still here\n"
        assert (merged / "etc/passwd").read_bytes().startswith(b"root:")
        assert sorted(os.listdir(merged / "opaque")) == ["kept"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda toc: toc["entries"].append({"name": "../escape", "type": "reg"}), ".."),
        (
            lambda toc: toc["entries"][1].update(size=1 << 50),
            "size",
        ),
        (
            lambda toc: toc["entries"].extend(
                [
                    {"name": "loop-a", "type": "hardlink", "linkName": "loop-b"},
                    {"name": "loop-b", "type": "hardlink", "linkName": "loop-a"},
                ]
            ),
            "hardlink",
        ),
    ],
    ids=["path-outside-tree", "huge-size", "hardlink-loop"],
)
def test_hostile_toc_is_refused_at_index_time_and_nothing_is_mounted(edit, message, workdir):
    blob = BlobMaker().dir("etc").file("etc/hosts", b"127.0.0.1 localhost\n").build(edit)
    path = workdir / "hostile.esgz"
    path.write_bytes(blob.data)
    mnt = workdir / "m"
    mnt.mkdir()
    root = workdir / "root"
    proc = blockfs("layer", "mount", "--root", str(root), "--toc-digest", blob.toc_digest,
                   str(path), str(mnt), check=False)  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "hostile.esgz" in proc.stderr
    assert not os.path.ismount(mnt)
    assert list((root / "mounts").iterdir()) == []


def test_layer_serve_works_with_nbdinfo_nbdcopy_nbdfuse_and_fsck(workdir):
    sock = workdir / "nbd.sock"
    server = subprocess.Popen(
        [PROJECT / ".venv/bin/python", "-m", "blockfs.cli", "layer", "serve", "--root",
         str(workdir / "root"), "--export", "layer", "--socket", str(sock),
         str(TESTDATA / "zstd-64k.esgz")],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    uri = f"nbd+unix:///layer?socket={sock}"
    fuse = workdir / "fuse"
    fuse.mkdir()
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = subprocess.run(["nbdinfo", uri], check=True, capture_output=True, text=True).stdout
        assert "read-only: true" in info or "is_read_only: true" in info
        image = workdir / "image.erofs"
        subprocess.run(["nbdcopy", uri, str(image)], check=True)
        fsck = subprocess.run(["fsck.erofs", "-d3", str(image)], capture_output=True, text=True)
        assert "No errors found" in fsck.stdout + fsck.stderr
        assert "<E>" not in fsck.stdout + fsck.stderr
        # nbdfuse exposes the export as a file that mount(8) can mount.
        pidfile = workdir / "nbdfuse.pid"
        nbdfuse = subprocess.Popen(["nbdfuse", "-r", "-P", str(pidfile), str(fuse / "img"), uri])
        while not pidfile.exists():
            assert nbdfuse.poll() is None, "nbdfuse exited"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        mnt = workdir / "mnt"
        mnt.mkdir()
        subprocess.run(
            ["mount", "-t", "erofs", "-o", "ro", str(fuse / "img"), str(mnt)], check=True
        )
        try:
            assert (mnt / "etc/hostname").read_bytes() == layer_file("etc/hostname")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            subprocess.run(["fusermount3", "-u", str(fuse)], check=True)
            nbdfuse.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not sock.exists()
