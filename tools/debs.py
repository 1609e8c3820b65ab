"""Debian packages from the host's apt sources: resolve, download, verify, unpack.

Used by the image builder (tools/mkimage) and the VM test (tools/vmtest). Nothing is
installed or configured on the host:

- :func:`resolve` reads the candidate version of each package from the local apt index
  (``apt-cache``, no network);
- :func:`download` keeps the files in a cache directory under their pool names and checks
  each against the SHA256 the index records; only what is missing or does not match is
  fetched, with ``apt-get download``. A cache that holds the candidate versions is used
  offline; when apt has a newer candidate, it is downloaded;
- :func:`dependency_closure` follows Pre-Depends and Depends from the index records,
  except into the packages of :data:`NOT_FOLLOWED`;
- :func:`extract` unpacks a package's files with ``dpkg-deb`` (no maintainer scripts).

Every failure is a :class:`DebError` whose message says what to do about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from blockfs.errors import BlockfsError

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "debs"
# Dependencies never followed: they install or configure packages, which a tree unpacked
# from packages (an image layer, the VM test's initramfs) does not do.
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
KERNEL_METAPACKAGE = "linux-image-amd64"
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]+")
_UPDATE_HINT = "run apt-get update (the packages come from Debian 12 bookworm, main component)"


class DebError(BlockfsError):
    """A Debian package could not be resolved, downloaded, verified or unpacked."""


@attrs.frozen
class Deb:
    """One Debian package file as apt's index describes it."""

    package: str
    version: str
    architecture: str
    filename: str  # the file's name in the pool (its basename is the local file name)
    sha256: str
    depends: str = ""
    pre_depends: str = ""

    @property
    def basename(self) -> str:
        return os.path.basename(self.filename)

    @property
    def key(self) -> str:
        """``package_version_arch``: names this exact build of the package."""
        return self.basename.removesuffix(".deb")

    def dependencies(self) -> list[str]:
        """What to follow from Pre-Depends and Depends: one package per group (see
        :data:`NOT_FOLLOWED`), the first alternative that is followed at all."""
        names = []
        for group in f"{self.pre_depends},{self.depends}".split(","):
            for choice in group.split("|"):
                name = choice.strip().split(" ", 1)[0].split(":", 1)[0].split("(", 1)[0]
                if name and name not in NOT_FOLLOWED:
                    names.append(name)
                    break
        return names


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as e:
        raise DebError(
            f"cannot run {argv[0]}: {e.strerror}; Debian packages need a Debian host with apt"
        ) from None


def _parse_records(text: str) -> list[dict[str, str]]:
    records = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and last:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if fields:
            records.append(fields)
    return records


def resolve(packages: Sequence[str]) -> dict[str, Deb]:
    """The candidate version of each of ``packages`` in the host's apt index, by name.

    One apt-cache call for all of them: each call costs most of a second.
    """
    for package in packages:
        if not _PACKAGE.fullmatch(package):
            raise DebError(f"not a Debian package name: {package!r}")
    if not packages:
        return {}
    result = _run(["apt-cache", "show", "--no-all-versions", *packages])
    found: dict[str, Deb] = {}
    for fields in _parse_records(result.stdout):
        try:
            deb = Deb(
                package=fields["Package"],
                version=fields["Version"],
                architecture=fields["Architecture"],
                filename=fields["Filename"],
                sha256=fields["SHA256"],
                depends=fields.get("Depends", ""),
                pre_depends=fields.get("Pre-Depends", ""),
            )
        except KeyError as e:
            raise DebError(
                f"apt's record of {fields.get('Package')} has no {e.args[0]} field "
                f"(not downloadable from the apt sources); {_UPDATE_HINT}"
            ) from None
        found.setdefault(deb.package, deb)
    missing = [p for p in packages if p not in found]
    if missing:
        raise DebError(
            f"apt knows no package {', '.join(missing)} "
            f"({result.stderr.strip() or 'no record'}); {_UPDATE_HINT}"
        )
    return found


def resolve_kernel(meta: Deb) -> Deb:
    """The kernel package that the metapackage ``meta`` (linux-image-amd64) depends on."""
    for alternative in meta.depends.replace("|", ",").split(","):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith("linux-image-") and name != meta.package:
            return resolve([name])[name]
    raise DebError(f"{meta.package} depends on no linux-image package: {meta.depends!r}")


def dependency_closure(packages: Iterable[str]) -> list[Deb]:
    """``packages`` and what they depend on (see :meth:`Deb.dependencies`), by name.

    One apt-cache call per level of dependencies.
    """
    found: dict[str, Deb] = {}
    wanted = set(packages)
    while wanted:
        level = resolve(sorted(wanted))
        found.update(level)
        wanted = {n for deb in level.values() for n in deb.dependencies() if n not in found}
    return [found[name] for name in sorted(found)]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stamp(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}"


def _verified(path: Path, deb: Deb) -> bool:
    """Whether ``path`` is ``deb``'s file; a file that is not is removed."""
    if not path.exists():
        return False
    # Hashing costs a few hundred ms for the kernel package: a stamp file beside the
    # package records that this file (same size and mtime) was checked once.
    stamp = path.with_suffix(".sha256")
    with contextlib.suppress(OSError):
        if stamp.read_text().strip() == _stamp(path, deb.sha256):
            return True
    if _sha256_file(path) != deb.sha256:
        path.unlink()
        stamp.unlink(missing_ok=True)
        return False
    stamp.write_text(_stamp(path, deb.sha256) + "\n")
    return True


def download(debs: Sequence[Deb], cache: Path) -> dict[str, Path]:
    """The local file of each package (by package name), downloading the missing ones.

    A cached file is used only if it matches the SHA256 of apt's index; one that does not
    is removed and downloaded again.
    """
    cache.mkdir(parents=True, exist_ok=True)
    paths = {d.package: cache / d.basename for d in debs}
    missing = list({d.package: d for d in debs if not _verified(paths[d.package], d)}.values())
    if not missing:
        return paths
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        # apt-get download names files with the version's epoch escaped ("1%3a1.2"),
        # unlike the pool file name: find each by its package name instead.
        result = _run(
            [
                "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                *(f"{d.package}={d.version}" for d in missing),
            ],
            cwd=Path(tmp),
        )  # fmt: skip
        if result.returncode != 0:
            raise DebError(
                "apt-get download failed: "
                + (result.stderr.strip() or result.stdout.strip())[-2000:]
                + f"; check that the apt sources are reachable, and {_UPDATE_HINT}"
            )
        for d in missing:
            found = [
                p
                for p in Path(tmp).iterdir()
                if p.name.startswith(d.package + "_") and p.name.endswith(".deb")
            ]
            if len(found) != 1:
                raise DebError(f"apt-get download left no file for {d.package}; {_UPDATE_HINT}")
            if _sha256_file(found[0]) != d.sha256:
                raise DebError(
                    f"the downloaded {found[0].name} does not match the SHA256 in apt's "
                    f"index ({d.sha256}); {_UPDATE_HINT} and try again"
                )
            os.replace(found[0], paths[d.package])
            paths[d.package].with_suffix(".sha256").write_text(
                _stamp(paths[d.package], d.sha256) + "\n"
            )
    return paths


def extract(path: Path, dest: Path) -> None:
    """Unpack the files of the package ``path`` under ``dest`` (dpkg-deb -x)."""
    result = _run(["dpkg-deb", "-x", str(path), str(dest)])
    if result.returncode != 0:
        raise DebError(
            f"dpkg-deb cannot unpack {path}: {result.stderr.strip()} "
            "(delete the file to have it downloaded again)"
        )


class DebCache:
    """A directory of ``.deb`` files: the candidate versions, downloaded on demand."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_CACHE) -> None:
        self.directory = Path(directory)

    def fetch(self, package: str) -> Path:
        """The verified file of ``package``'s candidate version, downloaded if need be."""
        return download([resolve([package])[package]], self.directory)[package]

    def closure(self, packages: Iterable[str]) -> list[Path]:
        """The files of ``packages`` and their dependencies (see :func:`dependency_closure`),
        ordered by package name."""
        debs = dependency_closure(packages)
        paths = download(debs, self.directory)
        return [paths[d.package] for d in debs]
