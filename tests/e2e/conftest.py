import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import blockfs
from tests.host.attach_testkit import force_cleanup, leftovers


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A private directory for state and mounts; nothing may be left using it afterwards."""
    yield tmp_path
    left = leftovers(tmp_path)
    force_cleanup(tmp_path)
    assert left == [], f"left behind: {left}"


@pytest.fixture
def mount_layer(workdir: Path):
    """Mount a blob with `blockfs layer mount` and always unmount it afterwards."""
    mounted: list[Path] = []
    root = workdir / "root"

    def mount(blob: Path, *extra: str, name: str = "mnt") -> Path:
        mnt = workdir / name
        mnt.mkdir()
        blockfs("layer", "mount", "--root", str(root), *extra, str(blob), str(mnt))
        mounted.append(mnt)
        return mnt

    mount.root = root  # type: ignore[attr-defined]
    yield mount
    for mnt in mounted:
        if os.path.ismount(mnt):
            blockfs("layer", "umount", "--root", str(root), str(mnt), check=False)
