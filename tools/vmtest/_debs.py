"""Debian packages for the VM test: resolve the candidate versions, download, unpack.

Packages come from the host's own apt sources with ``apt-get download`` (nothing is
installed or configured on the host), are kept in a cache directory and checked against
the SHA256 that apt's index records.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from tools.vmtest._errors import VMTestError


@attrs.frozen
class Deb:
    """One Debian package file as apt's index describes it."""

    package: str
    version: str
    architecture: str
    filename: str  # the file's name in the pool (its basename is the local file name)
    sha256: str
    depends: str

    @property
    def basename(self) -> str:
        return os.path.basename(self.filename)

    @property
    def key(self) -> str:
        """``package_version_arch``: names this exact build of the package."""
        return self.basename.removesuffix(".deb")


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

    One apt-cache call for all of them: each call costs about a second.
    """
    result = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *packages],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
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
            )
        except KeyError as e:
            raise VMTestError(f"apt's record {fields.get('Package')} has no {e.args[0]}") from None
        found.setdefault(deb.package, deb)
    missing = [p for p in packages if p not in found]
    if missing:
        raise VMTestError(
            f"apt knows no package {', '.join(missing)} ({result.stderr.strip() or 'no record'}); "
            "run apt-get update, on Debian 12 (bookworm) with the main component"
        )
    return found


KERNEL_METAPACKAGE = "linux-image-amd64"


def resolve_kernel(meta: Deb) -> Deb:
    """The kernel package that the metapackage ``meta`` (linux-image-amd64) depends on."""
    for alternative in meta.depends.replace("|", ",").split(","):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith("linux-image-") and name != meta.package:
            return resolve([name])[name]
    raise VMTestError(f"{meta.package} depends on no linux-image package: {meta.depends!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(debs: Sequence[Deb], cache: Path) -> dict[str, Path]:
    """The local file of each package (by package name), downloading the missing ones."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {d.package: cache / d.basename for d in debs}
    missing = [d for d in debs if not _verified(paths[d.package], d)]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            # apt-get download names files with the version's epoch escaped ("1%3a1.2"),
            # unlike the pool file name: find each by its package name instead.
            result = subprocess.run(
                ["apt-get", "download", "-q", *(f"{d.package}={d.version}" for d in missing)],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise VMTestError(
                    "apt-get download failed (run apt-get update if the index is stale): "
                    + result.stderr.strip()[-2000:]
                )
            for d in missing:
                found = [
                    p
                    for p in Path(tmp).iterdir()
                    if p.name.startswith(d.package + "_") and p.name.endswith(".deb")
                ]
                if len(found) != 1:
                    raise VMTestError(f"apt-get download left no file for {d.package}")
                if _sha256_file(found[0]) != d.sha256:
                    raise VMTestError(f"{found[0].name} does not match apt's SHA256 {d.sha256}")
                os.replace(found[0], paths[d.package])
    return paths


def _verified(path: Path, deb: Deb) -> bool:
    if not path.exists():
        return False
    # A hash per run costs a few hundred ms for the kernel package; a stamp file beside the
    # package records that it was checked once.
    stamp = path.with_suffix(".sha256")
    with contextlib.suppress(OSError):
        if stamp.read_text().strip() == deb.sha256:
            return True
    if _sha256_file(path) != deb.sha256:
        path.unlink()
        return False
    stamp.write_text(deb.sha256 + "\n")
    return True


def extract(path: Path, dest: Path) -> None:
    """Unpack the files of the package ``path`` under ``dest`` (dpkg-deb -x)."""
    result = subprocess.run(
        ["dpkg-deb", "-x", str(path), str(dest)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise VMTestError(f"dpkg-deb cannot unpack {path}: {result.stderr.strip()}")
