"""tools/debs.py with the host's real apt: resolve, download, verify, closure, extract.

The packages are small ones of Debian 12 (hostname, ucf, sensible-utils), downloaded into
temporary cache directories.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tools import debs
from tools.debs import Deb, DebCache, DebError

REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def empty_apt(tmp_path: Path) -> dict[str, str]:
    """An environment whose apt has no package lists and nothing installed (APT_CONFIG)."""
    root = tmp_path / "apt"
    (root / "lists").mkdir(parents=True)
    (root / "parts").mkdir()
    (root / "status").write_text("")
    conf = root / "apt.conf"
    conf.write_text(
        f'Dir::State::Lists "{root / "lists"}";\n'
        f'Dir::State::status "{root / "status"}";\n'
        f'Dir::Etc::SourceParts "{root / "parts"}";\n'
    )
    return {**os.environ, "APT_CONFIG": str(conf)}


def test_resolve_gives_apt_candidate_with_pool_name_and_sha256():
    found = debs.resolve(["hostname", "busybox-static"])
    assert set(found) == {"hostname", "busybox-static"}
    for name, deb in found.items():
        policy = subprocess.run(
            ["apt-cache", "policy", name], capture_output=True, text=True, check=True
        ).stdout
        candidate = re.search(r"Candidate: (\S+)", policy)
        assert candidate is not None and deb.version == candidate.group(1)
        assert re.fullmatch(r"[0-9a-f]{64}", deb.sha256)
        assert deb.basename.startswith(f"{name}_") and deb.basename.endswith(".deb")
    # The pool name has no epoch, the version does: files are named after the pool.
    busybox = found["busybox-static"]
    assert ":" in busybox.version and ":" not in busybox.basename


def test_resolve_rejects_unknown_and_invalid_names_saying_what_to_do():
    with pytest.raises(
        DebError, match=r"apt knows no package no-such-package-blockfs.*apt-get update"
    ):
        debs.resolve(["hostname", "no-such-package-blockfs"])
    with pytest.raises(DebError, match="not a Debian package name"):
        debs.resolve(["-oDebug::pkgProblemResolver=1"])


def test_resolve_with_an_empty_apt_index_says_run_apt_get_update(empty_apt, monkeypatch):
    monkeypatch.setenv("APT_CONFIG", empty_apt["APT_CONFIG"])
    with pytest.raises(DebError, match=r"apt knows no package hostname.*run apt-get update"):
        debs.resolve(["hostname"])


def test_download_verifies_and_reuses_the_cached_file_without_apt(tmp_path, monkeypatch):
    deb = debs.resolve(["hostname"])["hostname"]
    cache = tmp_path / "debs"
    path = debs.download([deb], cache)["hostname"]
    assert path == cache / deb.basename
    assert sha256(path) == deb.sha256
    assert path.with_suffix(".sha256").read_text().split()[0] == deb.sha256
    assert not [p for p in cache.iterdir() if p.name.startswith(".download-")]

    # Offline: with no apt-get on PATH, the verified cached file is what comes back.
    before = path.stat()
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    monkeypatch.setenv("PATH", str(no_tools))
    again = debs.download([deb], cache)["hostname"]
    assert again == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_download_rejects_a_corrupted_cached_file_and_downloads_it_again(tmp_path):
    deb = debs.resolve(["hostname"])["hostname"]
    cache = tmp_path / "debs"
    path = debs.download([deb], cache)["hostname"]
    good = path.read_bytes()
    # Same size, other bytes, stamp left in place: the stamp no longer describes the file.
    path.write_bytes(bytes(len(good)))
    assert debs.download([deb], cache)["hostname"] == path
    assert path.read_bytes() == good

    # A stamp of the old format (the hash alone) does not vouch for the file either.
    path.write_bytes(b"corrupted")
    path.with_suffix(".sha256").write_text(deb.sha256 + "\n")
    debs.download([deb], cache)
    assert sha256(path) == deb.sha256


def test_download_of_a_version_apt_cannot_fetch_says_what_to_do(tmp_path):
    real = debs.resolve(["hostname"])["hostname"]
    gone = Deb(
        package="hostname",
        version="0.0-blockfs-gone",
        architecture=real.architecture,
        filename="pool/main/h/hostname/hostname_0.0-blockfs-gone_amd64.deb",
        sha256=real.sha256,
    )
    with pytest.raises(DebError, match=r"apt-get download failed: .*apt-get update"):
        debs.download([gone], tmp_path / "debs")
    assert not (tmp_path / "debs" / gone.basename).exists()


def test_extract_unpacks_the_files_and_reports_a_broken_package(tmp_path):
    deb = debs.resolve(["hostname"])["hostname"]
    path = debs.download([deb], tmp_path / "debs")["hostname"]
    debs.extract(path, tmp_path / "tree")
    assert (tmp_path / "tree" / "bin" / "hostname").read_bytes()[:4] == b"\x7fELF"

    broken = tmp_path / "broken.deb"
    broken.write_bytes(b"not a package")
    with pytest.raises(DebError, match=r"dpkg-deb cannot unpack .*delete the file"):
        debs.extract(broken, tmp_path / "tree2")


def test_dependencies_take_first_alternatives_and_skip_package_managers():
    found = debs.resolve(["ucf", "libpython3.11-stdlib"])
    # ucf: "debconf (>= 0.5) | debconf-2.0, sensible-utils": both alternatives not followed.
    assert "debconf" in found["ucf"].depends
    assert found["ucf"].dependencies() == ["sensible-utils"]
    # "media-types | mime-support": the first one.
    stdlib = found["libpython3.11-stdlib"].dependencies()
    assert "media-types" in stdlib and "mime-support" not in stdlib
    assert "libc6" in stdlib and not set(stdlib) & debs.NOT_FOLLOWED


def test_dependency_closure_follows_pre_depends_transitively():
    # hostname Pre-Depends on libc6, which depends on libgcc-s1, which on gcc-12-base.
    hostname = debs.resolve(["hostname"])["hostname"]
    assert "libc6" in hostname.pre_depends
    closure = [d.package for d in debs.dependency_closure(["hostname"])]
    assert closure == ["gcc-12-base", "hostname", "libc6", "libgcc-s1"]


def test_deb_cache_closure_downloads_and_unpacks_without_not_followed(tmp_path):
    cache = DebCache(tmp_path / "debs")
    paths = cache.closure(["ucf"])
    assert [p.name.split("_")[0] for p in paths] == ["sensible-utils", "ucf"]
    assert cache.fetch("ucf") == paths[1]
    assert not list(cache.directory.glob("debconf*"))
    for path in paths:
        debs.extract(path, tmp_path / "tree")
    assert (tmp_path / "tree" / "usr" / "bin" / "ucf").is_file()
    assert (tmp_path / "tree" / "usr" / "bin" / "sensible-editor").is_file()


def test_kernel_metapackage_resolves_to_a_versioned_kernel_package():
    meta = debs.resolve([debs.KERNEL_METAPACKAGE])[debs.KERNEL_METAPACKAGE]
    kernel = debs.resolve_kernel(meta)
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-amd64", kernel.package)
    assert kernel.package in meta.depends
    with pytest.raises(DebError, match="depends on no linux-image package"):
        debs.resolve_kernel(debs.resolve(["hostname"])["hostname"])


def test_vm_test_reports_a_package_error_as_a_clean_fail(tmp_path, empty_apt):
    done = subprocess.run(
        [str(REPO / "tools" / "vm-test"), "--cache-dir", str(tmp_path / "vm"),
         "--work-dir", str(tmp_path / "work")],
        env=empty_apt, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"VM TEST: FAIL .*apt knows no package .*run apt-get update", done.stdout)
    assert "Traceback" not in done.stdout + done.stderr
