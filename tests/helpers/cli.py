"""Running the ``blockfs`` command line from tests, as a user would."""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def blockfs(
    *args: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``blockfs ARGS``; with ``check``, fail the test (showing stderr) on a non-zero exit.

    ``env`` adds to (or overrides) this process's environment.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT,
        env={**os.environ, **env} if env is not None else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"blockfs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
