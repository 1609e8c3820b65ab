"""What blockfs keeps on a node is private to root: which chunks it caches and which
layers and registries its servers use say which images the node runs.

Run directories, the chunk cache and its shards are 0700, cached chunks and the NBD
server's log and pid file 0600, and state left wider by an older version is tightened.
"""

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.host.nbdserver import NBDServer
from blockfs.image import ServerConfig
from tests.helpers.cli import blockfs
from tests.helpers.testdata import TESTDATA
from tests.host.attach_testkit import force_cleanup, leftovers

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    left = leftovers(tmp_path)
    force_cleanup(tmp_path)
    assert left == [], f"left behind: {left}"


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """The umask most shells have: files 0644 and directories 0755 unless asked."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mount_and_read(root: Path, workdir: Path) -> Path:
    mnt = workdir / "mnt"
    mnt.mkdir()
    blockfs("layer", "mount", "--root", str(root), str(TESTDATA / "gzip-64k.esgz"), str(mnt))
    assert (mnt / "etc/passwd").read_bytes().startswith(b"root:")
    return mnt


def assert_private(root: Path, mnt: Path) -> None:
    (run_dir,) = (root / "mounts").iterdir()
    for directory in (root / "mounts", run_dir, root / "cache", root / "cache" / "chunks"):
        assert mode(directory) == 0o700, directory
    shards = [p for p in (root / "cache" / "chunks").iterdir()]
    assert shards
    for shard in shards:
        assert mode(shard) == 0o700, shard
        for chunk in shard.iterdir():
            try:
                chunk_mode = mode(chunk)
            except FileNotFoundError:
                continue  # the temporary name of a chunk the server was still writing
            assert chunk_mode == 0o600, chunk
    assert mode(run_dir / "nbdkit.log") == 0o600
    assert mode(run_dir / "nbdkit.pid") == 0o600


def test_a_new_root_is_private(workdir, wide_umask):
    root = workdir / "root"
    mnt = mount_and_read(root, workdir)
    try:
        assert mode(root) == 0o700  # made by blockfs
        assert_private(root, mnt)
    finally:
        blockfs("layer", "umount", "--root", str(root), str(mnt))


def test_a_root_left_wide_by_an_older_version_is_tightened(workdir, wide_umask):
    root = workdir / "root"
    chunks = root / "cache" / "chunks"
    data = b"a chunk cached by an older version\n"
    hex_ = hashlib.sha256(data).hexdigest()
    (chunks / hex_[:2]).mkdir(parents=True)
    (chunks / hex_[:2] / hex_).write_bytes(data)
    (root / "mounts").mkdir()
    for path in (root, root / "mounts", root / "cache", chunks, chunks / hex_[:2]):
        path.chmod(0o755)
    (chunks / hex_[:2] / hex_).chmod(0o644)
    mnt = mount_and_read(root, workdir)
    try:
        # --root may name any directory: blockfs leaves the root itself alone.
        assert mode(root) == 0o755
        assert_private(root, mnt)
    finally:
        blockfs("layer", "umount", "--root", str(root), str(mnt))


def test_the_nbd_server_tightens_a_log_an_older_version_left_readable(workdir, wide_umask):
    # The snapshotter's run/nbdkit.log outlives server restarts: an existing 0644 log
    # must not stay readable.
    run_dir = workdir / "run"
    run_dir.mkdir()
    log = run_dir / "nbdkit.log"
    log.write_text("an older server's log\n")
    log.chmod(0o644)
    (workdir / "layers").mkdir()
    config = ServerConfig(root=workdir / "layers", cache_dir=workdir / "cache" / "chunks")
    server = NBDServer(run_dir, config)
    server.start()
    try:
        assert mode(log) == 0o600
        assert log.read_text().startswith("an older server's log\n")  # appended to, kept
        assert mode(server.pidfile) == 0o600
        # The plugin makes the cache once nbdkit has started serving (after_fork), which
        # may come just after the socket and pid file that start() waits for.
        deadline = time.monotonic() + 30
        while not (workdir / "cache" / "chunks").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mode(workdir / "cache") == 0o700
        assert mode(workdir / "cache" / "chunks") == 0o700
    finally:
        server.stop()
    log.unlink()
    server.start()
    try:
        assert mode(log) == 0o600
    finally:
        server.stop()
