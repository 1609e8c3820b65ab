import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers.testdata import TESTDATA


@pytest.fixture(scope="session")
def layer_files() -> dict[str, bytes]:
    """Regular file contents of the reference layer.tar, by name."""
    out = {}
    with tarfile.open(TESTDATA / "layer.tar") as tf:
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name.strip("/").removeprefix("./")] = f.read()
    return out


@pytest.fixture
def blob_copy(tmp_path):
    """Copy a reference blob somewhere writable (to damage it)."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copy(TESTDATA / name, dst)
        dst.chmod(0o644)
        return dst

    return copy
