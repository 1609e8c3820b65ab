import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.image import LayerImage
from tests.helpers.testdata import TESTDATA


@pytest.fixture(autouse=True)
def _close_layer_images(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every LayerImage a test opens, once its fetches have ended (up to 30 s): a
    test's background fetches must not run on into the next test."""
    opened: list[LayerImage] = []
    init = LayerImage.__init__

    def register(self: LayerImage, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(self)

    monkeypatch.setattr(LayerImage, "__init__", register)
    yield
    for image in opened:
        image.wait_idle()
        image.close()


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
