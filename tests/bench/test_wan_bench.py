"""``python -m tools.bench wan --quick`` runs end to end: the link check, the five modes on
both links through a private containerd, and the report has every figure it promises.

No time is judged (benchmarks are not timed tests); requests and bytes are, since they
do not depend on the machine's speed.
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
LINKS = ("shaped", "loopback")
MODES = ("overlayfs", "blockfs", "cri", "optimized", "optimized-cri")
FIELDS = (
    "pull_seconds",
    "create_seconds",
    "run_seconds",
    "total_seconds",
    "ratio",
    "requests_at_ready",
    "bytes_at_ready",
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_quick_wan_bench_reports_every_mode_on_both_links(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tools = (CONTAINERD, CTR, RUNC, "/usr/bin/strace")
    if not registry_available() or not all(os.access(t, os.X_OK) for t in tools):
        pytest.skip("needs docker-registry, containerd, ctr, runc and strace")
    figures_file = tmp_path / "wan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "wan", "--quick",
         "--workdir", str(tmp_path / "work"), "--json", str(figures_file)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    markdown = proc.stdout
    assert markdown.startswith("## WAN: cold container starts over a shaped link")
    assert "- Link self-check: a 4 MB blob through the shaped link took" in markdown
    for title in ("### Shaped: 100 Mbit/s, 20 ms per request", "### Loopback: loopback"):
        assert title in markdown
    report = json.loads(figures_file.read_text())
    figures = report["figures"]
    assert figures["check.seconds"] > 0
    assert figures["busybox.read_set_files"] >= 1
    assert "/bin/busybox" in report["details"]["busybox.read_set"]  # /bin/sh links to it
    image = figures["busybox.gzip_bytes"]
    for link in LINKS:
        for mode in MODES:
            for field in FIELDS:
                assert f"{link}.busybox.{mode}.{field}" in figures, (link, mode, field)
            key = f"{link}.busybox.{mode}"
            assert figures[f"{key}.requests_at_ready"] > 0
            assert figures[f"{key}.total_seconds"] > 0
            assert report["details"][f"{key}.requests"], "the proxy logged the run's requests"
        full = figures[f"{link}.busybox.overlayfs.bytes_at_ready"]
        # A full pull has every layer by the first output; blockfs skips the 1 MiB layer
        # nothing reads (its footer and TOC aside).
        assert full >= image
        for lazy in MODES[1:]:
            assert figures[f"{link}.busybox.{lazy}.bytes_at_ready"] < full - (512 << 10)
        assert figures[f"{link}.busybox.overlayfs.ratio"] == 1
        # manifest, config and one request per layer (two layers)
        assert figures[f"{link}.busybox.ideal.requests"] == 4
        assert 0 < figures[f"{link}.busybox.ideal.bytes"] < image
    assert list((tmp_path / "work").iterdir()) == []
