"""The repository needs nothing beside it: no file names a path outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_SUFFIXES = {".esgz", ".stargz", ".tar"}  # the reference vectors are data, not text


def outside_references() -> list[bytes]:
    """What a file would write to reach outside this clone: the absolute path of the
    folder the clone sits in, and a relative path to anything beside the clone."""
    found = [str(REPO.parent).encode() + b"/"]
    if REPO.parent.is_dir():
        found += [b"../" + entry.name.encode() for entry in REPO.parent.iterdir() if entry != REPO]
    return found


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = (REPO / name.decode() for name in names if name)
    return [p for p in paths if p.is_file() and p.suffix not in SKIP_SUFFIXES]


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    references = outside_references()
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.decode(errors='replace')}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_bytes().splitlines(), 1)
        if any(ref in line for ref in references)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_a_path_to_a_sibling_of_the_clone() -> None:
    # The check must be able to fail: a line naming the clone's folder is caught.
    line = str(REPO.parent).encode() + b"/elsewhere/data"
    assert any(ref in line for ref in outside_references())


def test_the_reference_vectors_are_in_the_repository() -> None:
    data = REPO / "tests" / "data" / "estargz"
    for blob in ["gzip-64k.esgz", "gzip-default.esgz", "gzip-prio.esgz", "zstd-64k.esgz"]:
        assert (data / blob).is_file(), blob
        assert (data / f"{blob}.build.json").is_file(), blob
    assert (data / "layer.tar").is_file()
    assert (data / "README.md").is_file()
