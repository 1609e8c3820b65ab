"""The Makefile's shortcuts: `make test` runs the README's test command, under sudo when
make itself is not root (as in the Vagrant VM)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(*args: str, user: str | None = None) -> list[str]:
    """The commands ``make -n ARGS`` would run in the repository."""
    argv = ["make", "-n", "-C", str(REPO), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if not line.startswith("make")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (tools/setup)")
def test_make_test_runs_the_test_command_with_its_arguments() -> None:
    expected = "tools/run test -m 'not slow'"
    if os.geteuid() != 0:
        expected = "sudo " + expected
    assert dry_run("test", "ARGS=-m 'not slow'") == [expected]
    assert dry_run("vm-test")[0].strip().endswith("tools/vm-test")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the Makefile as another user")
def test_make_test_uses_sudo_when_make_is_not_root() -> None:
    assert dry_run("test", user="nobody") == ["sudo tools/run test "]
