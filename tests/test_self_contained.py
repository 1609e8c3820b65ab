"""The repository needs nothing beside it: no file names a path outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A path that climbs out of the repository to a sibling, or an absolute path of a
# development machine's checkout.
OUTSIDE = re.compile(rb"\.\./shared|/work/(?:main|shared)\b|\.\./\.\./shared")


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    offenders = []
    for name in filter(None, files):
        path = REPO / name.decode()
        if path.suffix in {".esgz", ".stargz", ".tar"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE.search(line) and path.name != "test_self_contained.py":
                offenders.append(f"{name.decode()}:{number}: {line.decode(errors='replace')}")
    assert not offenders, "\n".join(offenders)


def test_the_reference_vectors_are_in_the_repository() -> None:
    data = REPO / "tests" / "data" / "estargz"
    for blob in ["gzip-64k.esgz", "gzip-default.esgz", "gzip-prio.esgz", "zstd-64k.esgz"]:
        assert (data / blob).is_file(), blob
        assert (data / f"{blob}.build.json").is_file(), blob
    assert (data / "layer.tar").is_file()
    assert (data / "README.md").is_file()
