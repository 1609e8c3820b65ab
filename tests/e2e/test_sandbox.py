"""The sandbox `image optimize` runs a workload in (blockfs.host.sandbox), over a real
writable image mount, and how the workload is taken from the image config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.host.sandbox import SandboxError, SandboxSpec, resolve_user, run_sandboxed
from blockfs.mount.image import mount_image, umount_image
from blockfs.mount.optimize import OptimizeError, Overrides, workload_of
from blockfs.oci import ImageConfig
from tests.helpers.cli import blockfs
from tests.helpers.images import make_layout, with_busybox
from tests.host.attach_testkit import force_cleanup, leftovers

root_only = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def config(**settings: object) -> ImageConfig:
    return ImageConfig.from_json(
        {"architecture": "amd64", "os": "linux", "config": settings,
         "rootfs": {"type": "layers", "diff_ids": []}}
    )  # fmt: skip


def test_the_workload_is_the_image_configs_with_docker_run_overrides():
    image = config(
        Entrypoint=["/bin/app"], Cmd=["--serve"], Env=["PATH=/bin", "A=1"],
        WorkingDir="/srv", User="app",
    )  # fmt: skip
    w = workload_of(image)
    assert (w.argv, w.env, w.cwd, w.user) == (
        ("/bin/app", "--serve"),
        ("PATH=/bin", "A=1"),
        "/srv",
        "app",
    )
    w = workload_of(image, Overrides(cmd=("--check",), env=("A=2", "B=3"), workdir="/", user="0"))
    assert (w.argv, w.env, w.cwd, w.user) == (
        ("/bin/app", "--check"), ("PATH=/bin", "A=2", "B=3"), "/", "0",
    )  # fmt: skip
    # A new entrypoint drops the image's Cmd; "" drops the entrypoint.
    assert workload_of(image, Overrides(entrypoint="/bin/sh")).argv == ("/bin/sh",)
    assert workload_of(image, Overrides(entrypoint="", cmd=("true",))).argv == ("true",)
    with pytest.raises(OptimizeError, match="no Entrypoint or Cmd"):
        workload_of(config())
    with pytest.raises(OptimizeError, match="KEY=VALUE"):
        workload_of(image, Overrides(env=("NOVALUE",)))
    with pytest.raises(OptimizeError, match="absolute"):
        workload_of(image, Overrides(workdir="rel"))


def test_users_resolve_from_the_images_own_tables_as_runc_does():
    passwd = [
        ["root", "x", "0", "0", "root", "/root", "/bin/sh"],
        ["app", "x", "1000", "1000", "", "/home/app", "/bin/sh"],
    ]
    group = [["root", "x", "0", ""], ["app", "x", "1000", ""], ["extra", "x", "2000", "app,x"]]
    assert resolve_user("", passwd, group) == (0, 0, [], "/root")
    assert resolve_user("app", passwd, group) == (1000, 1000, [2000], "/home/app")
    assert resolve_user("1000:extra", passwd, group) == (1000, 2000, [], "/home/app")
    assert resolve_user("4242:17", passwd, group) == (4242, 17, [], "/")
    with pytest.raises(SandboxError, match="not in the image's /etc/passwd"):
        resolve_user("nobody-here", passwd, group)
    with pytest.raises(SandboxError, match="not in the image's /etc/group"):
        resolve_user("app:nogroup", passwd, group)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sandbox") / "layout"
    make_layout(root, [with_busybox])
    return root


@pytest.fixture
def rootfs(layout: Path, tmp_path: Path) -> Iterator[Path]:
    """The busybox image mounted writable (lazily) at a fresh directory."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_image(f"oci:{layout}:v1", str(mnt), root=str(tmp_path / "state"), writable=True)
    try:
        yield mnt
    finally:
        umount_image(str(mnt), root=str(tmp_path / "state"))
        left = leftovers(tmp_path)
        force_cleanup(tmp_path)
        assert left == [], f"left behind: {left}"


# Each check exits with its own status when it fails; 7 means all passed.
CHECKS = r"""
[ "$$" = 1 ] || exit 11                                   # PID 1 of its own PID namespace
[ "$(ls -d /proc/[0-9]* | wc -l)" -le 4 ] || exit 12      # sees only its own processes
[ "$(hostname)" = blockfs-sandbox ] || exit 13
ip link | grep -q UP && exit 14                           # no interface up: no network
ip link | grep -q '^1: lo' || exit 15
[ "$(wc -l < /proc/self/mountinfo)" = 3 ] || exit 16      # /, /proc, /dev: no host tree
[ "$(ls /dev | tr '\n' ' ')" = "fd full null random shm stderr stdin stdout tty urandom zero " ] || exit 17
echo hi > /dev/null || exit 18
[ "$(pwd)" = /srv/app ] || exit 19
[ "$ONLY" = this ] || exit 20
[ "$PATH" = /bin ] || exit 21
[ "$HOME" = / ] || exit 22
[ -z "$LEAK" ] || exit 23                                 # nothing of the host's environment
[ "$(id -u):$(id -g)" = 65534:65534 ] || exit 24
touch /tmp/written || exit 25
exit 7
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_the_workload_runs_isolated_as_the_images_user_with_exactly_its_environment(
    rootfs, tmp_path, monkeypatch
):
    monkeypatch.setenv("LEAK", "host environment")
    spec = SandboxSpec(
        str(rootfs), ["sh", "-c", CHECKS], ["PATH=/bin", "ONLY=this"], "/srv/app", "nobody"
    )
    out = tmp_path / "out"
    with open(out, "w") as f:
        result = run_sandboxed(spec, timeout=60, result_dir=str(tmp_path), stdout=f, stderr=f)
    assert result.exit_code == 7, out.read_text()
    assert not result.timed_out
    assert (rootfs / "tmp" / "written").exists()  # the writable overlay, not the host


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_a_command_that_cannot_run_is_an_error(rootfs, tmp_path):
    spec = SandboxSpec(str(rootfs), ["/no/such/program"], ["PATH=/bin"])
    with pytest.raises(SandboxError, match="cannot run '/no/such/program'"):
        run_sandboxed(spec, timeout=60, result_dir=str(tmp_path))


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_optimize_with_a_command_that_cannot_run_fails_and_leaves_nothing(layout, tmp_path):
    (tmp_path / "tmp").mkdir()
    out = blockfs(
        "image", "optimize", "--tmpdir", str(tmp_path / "tmp"), f"oci:{layout}:v1",
        f"oci:{tmp_path / 'out'}:v1", "--cmd", "/no/such/program", check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "blockfs: error: cannot run '/no/such/program' in the image" in out.stderr
    assert "Traceback" not in out.stderr
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []
