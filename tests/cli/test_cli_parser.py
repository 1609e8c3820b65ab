"""The ``blockfs`` parser starts light: a cold start pays for every module it loads."""

from __future__ import annotations

import subprocess
import sys

from blockfs.cli._layer import ATTACH_WORDS
from blockfs.host.attach import CHOICE_WORDS

# Loaded only by the commands that use them. `image pull` through the daemon logs nothing,
# and datetime serves `layer inspect` alone.
HEAVY = (
    "blockfs.host.attach", "blockfs.oci", "importlib.metadata", "grpc", "httpx", "logging",
    "datetime",
)  # fmt: skip


def loaded_after(code: str) -> set[str]:
    """The HEAVY modules loaded after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_attach_words_of_the_parser_are_the_attach_choices() -> None:
    assert ATTACH_WORDS == CHOICE_WORDS


def test_building_the_parser_loads_no_heavy_module() -> None:
    assert (
        loaded_after("from blockfs.cli import build_parser; build_parser(['layer', 'inspect'])")
        == set()
    )
    assert (
        loaded_after("from blockfs.cli import build_parser; build_parser(['image', 'mount'])")
        == set()
    )


def test_other_packages_commands_are_looked_up_when_the_command_line_may_name_one() -> None:
    # `image pull` comes from snapshotter through an entry point, found without
    # importlib.metadata (blockfs.cli._plugins).
    assert (
        loaded_after(
            "from blockfs.cli import build_parser\n"
            "p = build_parser(['image', 'pull', 'ref'])\n"
            "assert p.parse_args(['image', 'pull', 'ref']).ref == 'ref'"
        )
        == set()
    )  # importlib.metadata is among HEAVY
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", "image", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "pull" in done.stdout.split()


def test_a_misspelt_command_is_told_the_commands_of_other_packages_too() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", "image", "pul", "ref"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "invalid choice: 'pul'" in done.stderr
    assert "pull" in done.stderr.split("choose from", 1)[1]


def test_a_command_that_skips_the_teardown_still_gives_its_output_and_status(tmp_path) -> None:
    # `image pull` ends its process without the interpreter's teardown: what it printed
    # must still come out, with its exit status.
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", "image", "pull", "--address",
         str(tmp_path / "none.sock"), "registry.invalid/Bad Name:1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("blockfs: error:"), done.stderr


def test_a_pull_socket_given_where_no_daemon_listens_says_what_to_do(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blockfs.cli", "image", "pull", "--pull-socket",
         str(tmp_path / "pull.sock"), "registry.invalid/app:1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no blockfs-snapshotter takes pulls at" in done.stderr
    assert "--local" in done.stderr
