"""The short versions of ``python -m tools.chaos cycles`` and ``recovery``, for real:
docker-registry on loopback, containerd, runc and blockfs-snapshotter (tools.chaos._stack).

No timing is asserted: the recovery figures are recorded in docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tools.chaos import _cycles, _recovery
from tools.chaos._stack import (
    containerd_stack,
    lazy_image,
    leftovers,
    pull,
    remove_image,
    wait_until,
)
from tools.local_containerd import mounts_under
from tools.local_registry import registry_available

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
]


def test_five_container_cycles_leave_nothing_behind() -> None:
    result = _cycles.cycles(5)
    assert result.failures == []
    assert len(result.seconds) == 5
    assert result.left_with_image == [] and result.left_after_removal == []
    assert 0 < result.fds_after <= result.fds_before
    assert result.ok()


def test_leftovers_sees_a_pulled_image_until_it_is_removed(tmp_path: Path) -> None:
    # What the cycles call clean must be able to see dirt: a pulled image's layer mounts,
    # layer directories and snapshots, gone once the image is removed.
    with lazy_image(tmp_path, print, files=4) as image, containerd_stack(print) as stack:
        pull(stack, image.ref)
        # The layers are mounted in the background once the pull has indexed them.
        assert wait_until(lambda: len(mounts_under(stack.work / "root")) >= 2, timeout=60)
        left = leftovers(stack)
        assert sum(item.startswith("mount ") for item in left) >= 2, left
        assert sum(item.startswith("layer dir ") for item in left) == 2, left
        assert sum(item.startswith("snapshot ") for item in left) == 2, left
        remove_image(stack, image.ref)
        assert leftovers(stack) == []


def test_one_try_of_each_crash_recovers_with_the_right_bytes() -> None:
    result = _recovery.recovery(1)
    for measure in result.measures:
        assert measure.failures == [], measure
        assert len(measure.seconds) == 1, measure
    assert result.ok()
