"""Bad input to the ``blockfs`` command never gives a Python traceback.

Every row of the table (``tools.chaos._hostile.CASES``, which ``python -m tools.chaos
hostile`` also reports with each row's peak memory) runs the installed console script
(``.venv/bin/blockfs``) as a user would, with one bad input: a missing file, a directory
instead of a file (or a file instead of a directory), an existing output, an unreadable
file, a bad digest, reference or size, an unknown flag, an unreachable registry, or, as
an unprivileged user, the default state directory. Each must exit non-zero with no
traceback, its last stderr line either ``blockfs: error: …`` saying what is wrong and what
to do, or argparse's usage error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.chaos._hostile import CASES, Case, Outcome, R, case, make_workspace, run

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs commands as nobody with setpriv, which needs root",
)


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """The inputs every row names, in a directory nobody can read too (pytest's own
    temporary directories are private to root)."""
    ws = Path(tempfile.mkdtemp(prefix="blockfs-cli-errors-"))
    make_workspace(ws)
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def assert_refused(proc: Outcome, c: Case) -> None:
    stderr = proc.stderr
    shown = f"blockfs {' '.join(c.argv)} (as {c.user}) -> {proc.returncode}:\n{stderr}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in stderr, shown
    lines = stderr.strip().splitlines()
    assert lines, shown
    last = lines[-1]
    if c.usage:
        assert proc.returncode == 2, shown
        assert stderr.startswith("usage: blockfs"), shown
        assert ": error: " in last, shown
    else:
        assert proc.returncode == 1, shown
        assert last.startswith("blockfs: error: "), shown
        assert sum(line.startswith("blockfs: error:") for line in lines) == 1, shown
    for text in c.says:
        assert text in last, f"{text!r} not in the error line; {shown}"


@pytest.mark.parametrize("c", [c for c in CASES if c.user == "root"], ids=lambda c: c.id)
def test_bad_input_is_one_line_saying_what_to_do(workspace, c):
    if os.geteuid() != 0:
        pytest.skip("the mount rows need root")
    before = {p.name for p in workspace.iterdir()}
    assert_refused(run(workspace, c.argv, c.user), c)
    # A refused command leaves nothing behind: no output file, no mount state. (Except
    # that image convert makes its destination layout before it resolves the source:
    # blockfs/convert's business, not covered here.)
    left = {p.name for p in workspace.iterdir()} - before
    if c.id.startswith("convert-"):
        left.discard("out")
    assert left == set()
    assert list((workspace / "state").glob("mounts/*")) == []
    shutil.rmtree(workspace / "out", ignore_errors=True)


@needs_root
@pytest.mark.parametrize("c", [c for c in CASES if c.user != "root"], ids=lambda c: c.id)
def test_bad_input_as_an_unprivileged_user(workspace, c):
    assert_refused(run(workspace, c.argv, c.user), c)


@needs_root
@pytest.mark.parametrize(
    "argv",
    [
        ("layer", "inspect", "blob.esgz"),
        ("layer", "cat", "blob.esgz", "etc/passwd"),
        ("layer", "build", "in.tar", "home-docker/out.esgz"),
        ("image", "convert", "oci:good", "oci:home-docker/converted"),
    ],
    ids=["inspect", "cat", "build", "convert"],
)
def test_an_unreadable_docker_config_is_at_most_a_warning_for_local_files(workspace, argv):
    # config.json cannot be read (mode 000, and not root): commands on local files need
    # no credentials, so they work, with one warning naming the file, or none at all.
    proc = run(workspace, argv, "nobody/docker")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    config = str(workspace / "home-docker" / ".docker" / "config.json")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("blockfs: warning:")]
    assert len(warnings) <= 1, proc.stderr
    for line in warnings:
        assert config in line and "DOCKER_CONFIG" in line, proc.stderr
    assert "blockfs: error" not in proc.stderr, proc.stderr


@needs_root
def test_a_docker_directory_nobody_may_search_is_a_warning_too(workspace):
    # Not even stat() works on ~/.docker/config.json: this used to crash every command.
    docker_dir = workspace / "home-docker" / ".docker"
    docker_dir.chmod(0o000)
    try:
        proc = run(workspace, ("layer", "inspect", "blob.esgz"), "nobody/docker")
    finally:
        docker_dir.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    (warning,) = proc.stderr.splitlines()
    assert warning.startswith("blockfs: warning: cannot read docker config "), warning
    assert "permission denied" in warning


def test_serve_on_a_socket_in_a_missing_directory(workspace):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = case("serve-socket-dir-missing", "layer", "serve", *R, "--socket", "nodir/s.sock",
             "blob.esgz", says=("nodir",))  # fmt: skip
    assert_refused(run(workspace, c.argv, c.user), c)
