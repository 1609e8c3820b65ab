"""What gets installed: the wheel holds blockfs and snapshotter and nothing else of the tree,
its console scripts work outside the repository, ``blockfs image pull`` arrives through the
``blockfs.image_commands`` entry point, and nbdkit loads the plugin from where it is
installed (the package data ``blockfs.host.plugin``).

The wheel is built from a copy of the working tree (a build writes ``build/`` and
``*.egg-info`` next to the sources) without build isolation, and installed with
``--no-deps --no-index`` into a fresh virtualenv made from /usr/bin/python3 with system
site-packages, so the test needs no network. The dependencies come from this interpreter's
site-packages through a ``.pth`` in the fresh environment naming a directory of links to
them, without blockfs itself: without its (editable) distribution, nothing in the fresh
environment can resolve ``blockfs`` or its entry points to the repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
BASE_PYTHON = Path("/usr/bin/python3")

# What a copy of the working tree leaves out: VCS, environments, caches, build output.
_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", ".cache", ".hypothesis", ".mypy_cache", ".pytest_cache",
    ".ruff_cache", ".vagrant", "__pycache__", "*.egg-info",
)  # fmt: skip


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    dist_info: Path
    added: frozenset[str]  # top-level names the install added to site-packages
    wheel: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the repository (or this
    virtualenv) on the fresh interpreter's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(
    cmd: list[str], cwd: Path, *, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def _build_isolation_args() -> list[str]:
    """Build with this interpreter's setuptools when it is recent enough (no network)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


def _dependency_links(target: Path) -> Path:
    """A directory of links to this interpreter's installed packages, except blockfs's own
    (its distribution, editable finder and .pth files)."""
    target.mkdir()
    dirs = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib"))
    for site in dirs:
        for entry in sorted(site.iterdir()):
            name = entry.name
            if (
                name.startswith(("blockfs", "snapshotter", "__editable__", "_blockfs"))
                or name.endswith(".pth")
                or name == "__pycache__"
                or (target / name).exists()
            ):
                continue
            (target / name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if not BASE_PYTHON.exists():
        pytest.skip(f"{BASE_PYTHON} is missing")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(PROJECT, src, ignore=_NOT_COPIED, symlinks=True)

    wheels = tmp / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index"]
    _run([*pip_wheel, *_build_isolation_args(), "--wheel-dir", str(wheels), str(src)], cwd=tmp)
    (wheel,) = wheels.glob("blockfs-*.whl")

    venv = tmp / "venv"
    _run([str(BASE_PYTHON), "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp)
    python = str(venv / "bin" / "python")
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp
        ).stdout.strip()
    )
    before = {p.name for p in site.iterdir()}
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    added = frozenset({p.name for p in site.iterdir()} - before)

    deps = _dependency_links(tmp / "deps")
    (site / "zz_blockfs_test_deps.pth").write_text(f"{deps}\n")

    (dist_info,) = site.glob("blockfs-*.dist-info")
    return Installed(venv, site, dist_info, added, wheel)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the repository."""
    assert not tmp_path.resolve().is_relative_to(PROJECT)
    return tmp_path


def test_pyproject_lists_every_package_of_the_tree() -> None:
    """The explicit package list in pyproject.toml is the package directories of blockfs/
    and snapshotter/, plus blockfs.host.plugin mapped to plugins/."""
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = config["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"

    in_tree = {
        ".".join(init.parent.relative_to(PROJECT).parts)
        for top in ("blockfs", "snapshotter")
        for init in (PROJECT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(listed) == in_tree | {"blockfs.host.plugin"}, (
        f"missing from pyproject: {sorted(in_tree - set(listed))}; "
        f"listed but not in the tree: {sorted(set(listed) - in_tree - {'blockfs.host.plugin'})}"
    )

    assert config["package-dir"] == {"blockfs.host.plugin": "plugins"}
    assert (PROJECT / "plugins" / "__init__.py").is_file()
    assert (PROJECT / "plugins" / "blockfs_nbdkit.py").is_file()
    # The name must not be taken by a real directory, or the two would be merged.
    assert not (PROJECT / "blockfs" / "host" / "plugin").exists()


@pytest.mark.slow
def test_only_blockfs_and_snapshotter_are_installed(installed: Installed) -> None:
    top_level = (installed.dist_info / "top_level.txt").read_text().split()
    assert sorted(top_level) == ["blockfs", "snapshotter"]

    assert installed.added == {"blockfs", "snapshotter", installed.dist_info.name}
    for name in ("tools", "plugins", "tests"):
        assert not (installed.site_packages / name).exists()

    with zipfile.ZipFile(installed.wheel) as wheel:
        tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"blockfs", "snapshotter", installed.dist_info.name}

    plugin = installed.site_packages / "blockfs" / "host" / "plugin"
    assert (plugin / "__init__.py").is_file()
    assert (plugin / "blockfs_nbdkit.py").is_file()
    # the generated gRPC code comes along
    assert (installed.site_packages / "snapshotter" / "_gen" / "containerd" / "types").is_dir()


@pytest.mark.slow
def test_entry_point_group_is_in_the_wheel(installed: Installed) -> None:
    entry_points = (installed.dist_info / "entry_points.txt").read_text()
    assert "[blockfs.image_commands]" in entry_points
    assert "pull = snapshotter.pullcmd:add_pull_command" in entry_points
    assert "blockfs = blockfs.cli:main" in entry_points
    assert "blockfs-snapshotter = snapshotter.daemon:main" in entry_points


@pytest.mark.slow
def test_installed_modules_come_from_site_packages(installed: Installed, outside: Path) -> None:
    probe = (
        "import json, sys, blockfs, snapshotter, blockfs.host.nbdserver as s\n"
        "from importlib.metadata import distribution\n"
        "print(json.dumps({'path': sys.path, 'blockfs': blockfs.__file__,\n"
        "  'snapshotter': snapshotter.__file__, 'plugin': str(s.PLUGIN),\n"
        "  'dist': str(distribution('blockfs').locate_file('')),\n"
        "  'pythonpath': s.plugin_pythonpath()}))\n"
    )
    seen = json.loads(_run([installed.bin("python"), "-c", probe], cwd=outside).stdout)
    site = installed.site_packages
    repo = str(PROJECT)
    assert not [p for p in seen["path"] if p and Path(p).resolve().is_relative_to(PROJECT)]
    assert Path(seen["blockfs"]).is_relative_to(site)
    assert Path(seen["snapshotter"]).is_relative_to(site)
    assert Path(seen["dist"]) == site
    assert Path(seen["plugin"]) == site / "blockfs" / "host" / "plugin" / "blockfs_nbdkit.py"
    assert repo not in seen["pythonpath"].split(os.pathsep)
    assert seen["pythonpath"].split(os.pathsep)[0] == str(site)


@pytest.mark.slow
def test_console_scripts_run_outside_the_repository(installed: Installed, outside: Path) -> None:
    out = _run([installed.bin("blockfs"), "--help"], cwd=outside).stdout
    assert "layer" in out and "image" in out

    out = _run([installed.bin("blockfs"), "image", "--help"], cwd=outside).stdout
    for command in ("convert", "mount", "stats", "umount", "pull"):
        assert command in out, f"`blockfs image {command}` is missing:\n{out}"

    out = _run([installed.bin("blockfs"), "image", "pull", "--help"], cwd=outside).stdout
    assert "usage: blockfs image pull" in out

    out = _run([installed.bin("blockfs-snapshotter"), "--help"], cwd=outside).stdout
    assert "usage: blockfs-snapshotter" in out


def _nbdkit_serving(socket: Path) -> int | None:
    """Pid of the nbdkit listening on ``socket``, if there is one."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and os.fsencode(socket) in argv:
            return int(proc.name)
    return None


@pytest.fixture
def layer_blob(installed: Installed, outside: Path) -> Path:
    tree = outside / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello from the installed plugin\n")
    with tarfile.open(outside / "layer.tar", "w") as tar:
        tar.add(tree, arcname=".")
    blob = outside / "layer.esgz"
    _run([installed.bin("blockfs"), "layer", "build", "layer.tar", str(blob)], cwd=outside)
    return blob


@pytest.fixture
def serving(installed: Installed, outside: Path, layer_blob: Path) -> Iterator[Path]:
    """``blockfs layer serve`` of the installed package: nbdkit with the installed plugin,
    started with NBDServer's command line and environment."""
    for tool in ("nbdkit", "nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    # Sockets deep in pytest's temporary directory would not fit in a socket address.
    state = Path(tempfile.mkdtemp(prefix="bfs-pkg-", dir="/tmp"))
    socket = state / "nbd.sock"
    log = outside / "serve.log"
    serve = [installed.bin("blockfs"), "layer", "serve", str(layer_blob), "--socket", str(socket)]
    serve += ["--export", "layer", "--root", str(state / "root")]
    with log.open("w") as out:
        proc = subprocess.Popen(
            serve,
            cwd=outside,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"blockfs layer serve did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield socket
    finally:
        proc.send_signal(signal.SIGTERM)  # passed on to nbdkit
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if (pid := _nbdkit_serving(socket)) is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow
def test_nbdkit_loads_the_installed_plugin(
    installed: Installed, outside: Path, serving: Path
) -> None:
    pid = _nbdkit_serving(serving)
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    plugin = installed.site_packages / "blockfs" / "host" / "plugin" / "blockfs_nbdkit.py"
    assert argv[argv.index(b"python") + 1] == os.fsencode(plugin)
    environ = dict(
        item.split(b"=", 1)
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in item
    )
    pythonpath = environ[b"PYTHONPATH"].decode().split(os.pathsep)
    assert str(PROJECT) not in pythonpath
    assert pythonpath[0] == str(installed.site_packages)

    uri = f"nbd+unix:///layer?socket={serving}"
    listing = _run(["nbdinfo", "--list", "--json", uri], cwd=outside).stdout
    exports = [e["export-name"] for e in json.loads(listing)["exports"]]
    assert exports == ["layer"]

    # Reading the export runs the plugin's pread: the EROFS image it builds.
    image = outside / "layer.erofs"
    _run(["nbdcopy", uri, str(image)], cwd=outside)
    data = image.read_bytes()
    assert len(data) > 1028
    assert data[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little"), "no EROFS superblock"
