"""Debian packages for base images: fetched once with ``apt-get download``, then offline.

Packages are kept in a cache directory (``.cache/debs`` by default) and found there by
name on later runs, so an image is built from the cache without the network. Their
dependencies are read from the packages themselves and followed, except into packages a
container tree does not need (package management, debconf, perl).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

from blockfs.errors import BlockfsError

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "debs"
# Dependencies never followed: they install or configure packages, which an image's
# runtime tree does not do.
NOT_FOLLOWED = frozenset(
    {
        "debconf",
        "debconf-2.0",
        "dpkg",
        "init-system-helpers",
        "install-info",
        "perl-base",
        "readline-common",
        "tzdata",
    }
)
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]+")


class DebError(BlockfsError):
    """A Debian package could not be fetched, read or unpacked."""


def _first_choice(alternatives: str) -> str | None:
    """The first package of ``a (>= 1) | b:any`` that is not in NOT_FOLLOWED."""
    for choice in alternatives.split("|"):
        name = choice.strip().split(" ", 1)[0].split(":", 1)[0].split("(", 1)[0].strip()
        if name and name not in NOT_FOLLOWED:
            return name
    return None


class DebCache:
    """A directory of ``.deb`` files, filled with ``apt-get download`` on demand."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_CACHE) -> None:
        self.directory = Path(directory)

    def fetch(self, package: str) -> Path:
        """The cached ``.deb`` of ``package``, downloaded first if it is not cached."""
        if not _PACKAGE.fullmatch(package):
            raise DebError(f"not a Debian package name: {package!r}")
        found = self._cached(package)
        if found is not None:
            return found
        self.directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        found = self._cached(package)
        if done.returncode != 0 or found is None:
            raise DebError(
                f"apt-get download {package} failed: {done.stderr.strip() or done.stdout.strip()}"
                " (on Debian 12 with apt sources configured; run apt-get update once)"
            )
        return found

    def _cached(self, package: str) -> Path | None:
        matches = sorted(self.directory.glob(f"{package}_*.deb"))
        return matches[-1] if matches else None

    def closure(self, packages: Iterable[str]) -> list[Path]:
        """``packages`` and everything they depend on (see NOT_FOLLOWED), fetched."""
        wanted = list(packages)
        seen: dict[str, Path] = {}
        while wanted:
            package = wanted.pop()
            if package in seen:
                continue
            deb = self.fetch(package)
            seen[package] = deb
            wanted.extend(p for p in _depends(deb) if p not in seen)
        return [seen[name] for name in sorted(seen)]


def _depends(deb: Path) -> list[str]:
    done = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Pre-Depends", "Depends"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise DebError(f"cannot read {deb}: {done.stderr.strip()}")
    # One "Field: value" per field; long values continue on lines that start with a space.
    values = "".join(
        line if line.startswith(" ") else "," + line.partition(":")[2]
        for line in done.stdout.splitlines()
    )
    names = []
    for group in values.split(","):
        if group.strip():
            name = _first_choice(group)
            if name is not None:
                names.append(name)
    return names


def unpack(debs: Iterable[Path], dest: Path) -> None:
    """Unpack each package's files into ``dest`` (no maintainer scripts are run)."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        done = subprocess.run(
            ["dpkg-deb", "--extract", str(deb), str(dest)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise DebError(f"cannot unpack {deb}: {done.stderr.strip()}")
