"""The benchmark commands still run end to end, in their tiny ``--quick`` mode.

No figure is judged here (benchmarks are not timed tests); the tests only prove that each
command runs, reports every figure it promises, and cleans up after itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.host.attach_testkit import leftovers

PROJECT = Path(__file__).resolve().parents[2]


def run_quick(bench: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Run ``python -m tools.bench BENCH --quick``; its Markdown and its JSON figures."""
    figures = tmp_path / f"{bench}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", bench, "--quick",
         "--workdir", str(tmp_path / "work"), "--json", str(figures)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(figures.read_text())
    return proc.stdout, report


def test_estargz_bench_quick_run_reports_write_toc_and_read_figures(tmp_path: Path) -> None:
    markdown, report = run_quick("estargz", tmp_path)

    assert markdown.startswith("## eStargz format")
    assert "- Command: `.venv/bin/python -m tools.bench estargz --quick" in markdown
    figures = report["figures"]
    for key in (
        "write.gzip9.workers0_mbps",
        "write.gzip9.baseline_mbps",
        "write.gzip6.workers1_mbps",
        "write.zstd3.baseline_mbps",
        "toc.parse_toc.seconds",
        "toc.parse_toc.peak_bytes",
        "toc.json.peak_bytes",
        "read.gzip.65536.blockfs_mbps",
        "read.zstd.4194304.baseline_mbps",
    ):
        assert figures[key] > 0, key
    assert figures["toc.entries"] == 2_000
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("nbdkit", "nbdcopy")), reason="needs nbdkit and nbdcopy"
)
def test_image_bench_quick_run_reports_every_figure_and_leaves_no_server(tmp_path: Path) -> None:
    markdown, report = run_quick("image", tmp_path)

    assert markdown.startswith("## Block image")
    figures = report["figures"]
    for key in (
        "image.trivial_mbps",
        "image.warm_mbps",
        "image.warm_ratio",
        "image.warm_disk_mbps",
        "image.cold.gzip_mbps",
        "image.cold.zstd_mbps",
        "index.build_seconds",
        "index.total_seconds",
        "memory.rss1_kib",
        "memory.rss3_kib",
    ):
        assert figures[key] > 0, key
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "work").iterdir()) == []


def test_reads_bench_quick_run_compares_coalesced_and_per_member_fetches(tmp_path: Path) -> None:
    markdown, report = run_quick("reads", tmp_path)

    assert markdown.startswith("## Cold reads across small files")
    figures = report["figures"]
    for rtt in ("0", "10"):
        per_member = figures[f"per_member_rtt{rtt}ms_requests"]
        coalesced = figures[f"coalesced_rtt{rtt}ms_requests"]
        # The same members either way; coalescing needs fewer requests for them.
        assert figures[f"per_member_rtt{rtt}ms_members"] == per_member == 50
        assert figures[f"coalesced_rtt{rtt}ms_members"] == 50
        assert 0 < coalesced < per_member
    assert list((tmp_path / "work").iterdir()) == []
