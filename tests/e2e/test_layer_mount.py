"""`blockfs layer mount|stats|umount` end to end: real nbdkit, nbdfuse and kernel EROFS mounts."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.erofs.erofs_testkit import assert_tree_matches_tar
from tests.helpers.cli import blockfs
from tests.helpers.testdata import TESTDATA, VERIFIABLE_BLOBS, toc_digest_of

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def stats(mount_layer, mnt: Path) -> dict[str, Any]:
    out = blockfs("layer", "stats", "--json", "--root", str(mount_layer.root), str(mnt))
    return json.loads(out.stdout)


@pytest.mark.parametrize("blob", VERIFIABLE_BLOBS)
def test_mounted_blob_is_the_layer_entry_by_entry(blob, mount_layer):
    mnt = mount_layer(TESTDATA / blob, "--toc-digest", toc_digest_of(blob))
    assert_tree_matches_tar(mnt, TESTDATA / "layer.tar")


def test_mount_is_read_only_erofs_and_reports_its_attach_mode(mount_layer, workdir):
    mnt = workdir / "m"
    mnt.mkdir()
    out = blockfs(
        "layer", "mount", "--root", str(workdir / "root"), str(TESTDATA / "gzip-64k.esgz"), str(mnt)
    )
    try:
        assert "attach: nbdfuse" in out.stdout
        fields = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        (entry,) = [f for f in fields if f[1] == str(mnt)]
        assert entry[2] == "erofs"
        assert "ro" in entry[3].split(",")
        with pytest.raises(OSError):
            (mnt / "new-file").write_text("x")
    finally:
        blockfs("layer", "umount", "--root", str(workdir / "root"), str(mnt))


def test_listing_fetches_no_file_data_and_one_file_costs_one_request(mount_layer):
    mnt = mount_layer(TESTDATA / "gzip-64k.esgz", "--toc-digest", toc_digest_of("gzip-64k.esgz"))
    after_mount = stats(mount_layer, mnt)
    # Footer and TOC were read to build the index; nothing else.
    assert after_mount["bytes_fetched"] > 0
    assert after_mount["chunks_fetched"] == 0
    subprocess.run(["ls", "-lR", str(mnt)], check=True, capture_output=True)
    after_ls = stats(mount_layer, mnt)
    assert after_ls["bytes_fetched"] == after_mount["bytes_fetched"]
    assert after_ls["chunks_fetched"] == 0

    expected = next(
        m for m in __import__("tarfile").open(TESTDATA / "layer.tar") if m.name == "etc/passwd"
    )
    assert (mnt / "etc/passwd").stat().st_size == expected.size
    (mnt / "etc/passwd").read_bytes()
    after_read = stats(mount_layer, mnt)
    # Its member and the neighbours that follow it within the fetch unit: one request.
    assert after_read["range_requests"] - after_ls["range_requests"] == 1
    assert after_read["chunks_fetched"] >= 1
    from blockfs.estargz import BlobReader, FileBlobSource
    from blockfs.image import FetchPolicy

    chunk = (
        BlobReader.open(FileBlobSource(TESTDATA / "gzip-64k.esgz"))
        .toc.lookup("etc/passwd")
        .chunks[0]
    )
    fetched = after_read["bytes_fetched"] - after_ls["bytes_fetched"]
    assert chunk.end - chunk.offset <= fetched <= FetchPolicy().unit


def test_flipped_chunk_byte_reads_as_eio_and_other_files_still_read(mount_layer, workdir):
    blob = workdir / "damaged.esgz"
    shutil.copy(TESTDATA / "gzip-64k.esgz", blob)
    from blockfs.estargz import BlobReader, FileBlobSource

    chunk = BlobReader.open(FileBlobSource(blob)).toc.lookup("usr/share/doc/README").chunks[0]
    data = bytearray(blob.read_bytes())
    data[(chunk.offset + chunk.end) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    mnt = mount_layer(blob, "--toc-digest", toc_digest_of("gzip-64k.esgz"))
    with pytest.raises(OSError) as info:
        (mnt / "usr/share/doc/README").read_bytes()
    assert info.value.errno == 5  # EIO
    assert (mnt / "etc/passwd").read_bytes().startswith(b"root:")
    assert stats(mount_layer, mnt)["verification_failures"] >= 1


def test_wrong_toc_digest_refuses_to_mount_and_leaves_nothing(workdir):
    mnt = workdir / "m"
    mnt.mkdir()
    wrong = "sha256:" + "0" * 64
    proc = blockfs("layer", "mount", "--root", str(workdir / "root"), "--toc-digest", wrong,
                   str(TESTDATA / "gzip-64k.esgz"), str(mnt), check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "TOC" in proc.stderr and "digest" in proc.stderr
    assert not os.path.ismount(mnt)
    assert list((workdir / "root" / "mounts").iterdir()) == []


def test_umount_leaves_no_mount_process_or_state(workdir):
    mnt = workdir / "m"
    mnt.mkdir()
    root = workdir / "root"
    blockfs("layer", "mount", "--root", str(root), str(TESTDATA / "zstd-64k.esgz"), str(mnt))
    assert os.path.ismount(mnt)
    blockfs("layer", "umount", "--root", str(root), str(mnt))
    assert not os.path.ismount(mnt)
    assert list((root / "mounts").iterdir()) == []
    # the workdir fixture also checks that no mount, loop device or process refers to it


def test_prefetch_fetches_the_prioritized_files_without_any_read(mount_layer):
    blob = "gzip-prio.esgz"
    from blockfs.estargz import BlobReader, FileBlobSource

    reader = BlobReader.open(FileBlobSource(TESTDATA / blob))
    prefetch = reader.prefetch_range()
    assert prefetch is not None
    prioritized = {c.offset for e in reader.toc.entries for c in e.chunks if c.offset < prefetch[1]}
    mnt = mount_layer(TESTDATA / blob, "--prefetch", "--toc-digest", toc_digest_of(blob))
    deadline = time.monotonic() + 30
    while stats(mount_layer, mnt)["members_fetched"] < len(prioritized):
        assert time.monotonic() < deadline, stats(mount_layer, mnt)
        time.sleep(0.1)
    after = stats(mount_layer, mnt)
    assert after["members_fetched"] == len(prioritized)  # and nothing past the landmark
    assert (mnt / "etc/passwd").read_bytes().startswith(b"root:")
    assert stats(mount_layer, mnt)["members_fetched"] == len(prioritized)  # served from cache
