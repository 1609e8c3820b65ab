"""Fixtures of the attach tests: a small EROFS image and a real nbdkit serving named exports."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_testkit import (
    LAYER_EXPORT,
    NOT_EROFS_EXPORT,
    ODD_EXPORT,
    TEST_PLUGIN,
    ServedExports,
)


@pytest.fixture(scope="session")
def layer_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small directory tree: nested dirs, an inline-sized file, a 300 KB file, a symlink."""
    root = tmp_path_factory.mktemp("tree")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("blockfs\n")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libfoo.so").write_bytes(os.urandom(300_000))
    (root / "usr" / "lib" / "libfoo.so.1").symlink_to("libfoo.so")
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture(scope="session")
def erofs_image(tmp_path_factory: pytest.TempPathFactory, layer_tree: Path) -> Path:
    """``layer_tree`` as an EROFS image made by mkfs.erofs."""
    image = tmp_path_factory.mktemp("image") / "layer.erofs"
    subprocess.run(["mkfs.erofs", str(image), str(layer_tree)], check=True, capture_output=True)
    return image


@pytest.fixture(scope="session")
def nbd_server(
    tmp_path_factory: pytest.TempPathFactory, erofs_image: Path
) -> Iterator[ServedExports]:
    """nbdkit with the test plugin, serving the image under two names and a non-EROFS file."""
    run = tmp_path_factory.mktemp("nbdkit")
    junk = run / "junk.img"
    junk.write_bytes(os.urandom(64 * 1024))
    images = {LAYER_EXPORT: erofs_image, ODD_EXPORT: erofs_image, NOT_EROFS_EXPORT: junk}
    (run / "exports.json").write_text(json.dumps({k: str(v) for k, v in images.items()}))
    (run / "plugin.py").write_text(TEST_PLUGIN)
    socket, pidfile, log = run / "nbd.sock", run / "nbdkit.pid", run / "nbdkit.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [
                "nbdkit", "-U", str(socket), "-P", str(pidfile), "-f", "--exit-with-parent",
                "-r", "python", str(run / "plugin.py"), f"exports={run / 'exports.json'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdkit did not start: {log.read_text()}")
            time.sleep(0.02)
        yield ServedExports(str(socket), images)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
