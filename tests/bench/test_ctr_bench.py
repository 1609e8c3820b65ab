"""``tools.ctr_bench --quick`` runs end to end: both snapshotters pull, create and run the
container through a private containerd, and the figures it promises are all there.

No time is judged (benchmarks are not timed tests); bytes are, since they are the point
of the comparison and do not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.local_containerd import CONTAINERD, CTR, RUNC
from tools.local_registry import registry_available

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_quick_ctr_bench_full_pull_fetches_the_whole_image_and_blockfs_less(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not registry_available() or not all(os.access(t, os.X_OK) for t in (CONTAINERD, CTR, RUNC)):
        pytest.skip("needs docker-registry, containerd, ctr and runc")
    figures = tmp_path / "ctr.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.ctr_bench", "--quick", "--json", str(figures)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## containerd: overlayfs full pull vs blockfs" in proc.stdout
    [image] = json.loads(figures.read_text())["images"]
    size = image["image_bytes"]
    overlay, lazy = image["overlayfs"], image["blockfs"]
    for run in (overlay, lazy):
        assert run["first_output_seconds"] >= run["pull_seconds"] > 0
    # A full pull downloads every layer; blockfs skips the 1 MiB layer nothing reads.
    assert overlay["registry_bytes"] >= size
    assert lazy["registry_bytes"] < overlay["registry_bytes"] - (512 << 10)
