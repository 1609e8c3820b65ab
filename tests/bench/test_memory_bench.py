"""``python -m tools.bench memory`` runs end to end in its ``--quick`` mode.

No figure is judged here (the targets are for a million entries, measured by the bench
itself); the tests prove that the command runs, reports its figures and cleans up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.host.attach_testkit import leftovers
from tools.bench._memory import MemoryBlob, toc_only_blob

PROJECT = Path(__file__).resolve().parents[2]


def run_quick(tmp_path: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    figures = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "memory", "--quick", *extra,
         "--workdir", str(tmp_path / "work"), "--json", str(figures)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(figures.read_text())
    return proc.stdout, report["figures"]


def test_the_toc_only_blob_opens_as_a_layer_of_that_many_entries(tmp_path: Path) -> None:
    from blockfs.estargz import BlobReader, FileBlobSource

    blob: MemoryBlob = toc_only_blob(tmp_path / "layer.esgz", 3_000)
    reader = BlobReader.open(FileBlobSource(blob.path), toc_digest=blob.toc_digest)
    toc = reader.toc
    chunks = sum(len(e.chunks) for e in toc.entries)
    # Chunk entries are folded into their files; the rest are entries.
    assert len(toc.entries) + blob.kinds["chunk"] == blob.entries == 3_000
    assert chunks > blob.kinds["chunk"]
    assert "symlink" in blob.kinds and "hardlink" in blob.kinds and "dir" in blob.kinds


def test_memory_bench_quick_run_measures_inspect(tmp_path: Path) -> None:
    markdown, figures = run_quick(tmp_path, "--no-mount")
    assert markdown.startswith("## Memory of large layers")
    assert figures["entries"] == 20_000
    assert figures["inspect.peak_bytes"] > 10_000_000
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(not shutil.which("nbdkit"), reason="needs nbdkit")
def test_memory_bench_quick_run_measures_mount_and_leaves_nothing_mounted(
    tmp_path: Path,
) -> None:
    markdown, figures = run_quick(tmp_path)
    for key in (
        "mount.cli_peak_bytes",
        "mount.server_peak_bytes",
        "mount.small_server_peak_bytes",
    ):
        assert figures[key] > 1_000_000, key
    assert figures["mount.total_peak_bytes"] == (
        figures["mount.cli_peak_bytes"] + figures["mount.server_peak_bytes"]
    )
    assert "nbdkit (blockfs server)" in markdown
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "work").iterdir()) == []
