"""Running the ``blockfs`` command line from tests, as a user would."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def blockfs(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``blockfs ARGS``; with ``check``, fail the test (showing stderr) on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"blockfs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
