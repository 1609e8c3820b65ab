"""Bad input to the ``blockfs`` command never gives a Python traceback.

Every row runs the installed console script (``.venv/bin/blockfs``) as a user would, with
one bad input: a missing file, a directory instead of a file (or a file instead of a
directory), an existing output, an unreadable file, a bad digest, reference or size, an
unknown flag, an unreachable registry, or, as an unprivileged user, the default state
directory. Each must exit non-zero with no traceback, its last stderr line either
``blockfs: error: …`` saying what is wrong and what to do, or argparse's usage error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.images import make_layout
from tests.helpers.testdata import TESTDATA

BLOCKFS = Path(sys.executable).parent / "blockfs"
NOBODY = 65534
DIGEST = "sha256:" + "0" * 64  # well formed, matches nothing
REGISTRY_BLOB = "127.0.0.1:9/x@" + DIGEST  # nothing listens on the discard port
REGISTRY_IMAGE = "127.0.0.1:9/x:1"
TIMEOUT = 120

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs commands as nobody with setpriv, which needs root",
)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    says: tuple[str, ...] = ()  # what the error line must contain (what and what to do)
    usage: bool = False  # a syntax error: argparse's usage message
    user: str = "root"  # or "nobody"; with "nobody/docker", an unreadable config.json


def case(id: str, *argv: str, says: tuple[str, ...] = (), usage: bool = False, user: str = "root"):
    return Case(id, argv, says, usage, user)


R = ("--root", "state")  # a private state directory for the root rows

CASES = [
    # -- syntax ----------------------------------------------------------------------
    case("no-command", says=("required",), usage=True),
    case("unknown-group", "frob", says=("invalid choice",), usage=True),
    case("unknown-command", "layer", "frob", says=("invalid choice",), usage=True),
    case("unknown-top-flag", "--bogus", "layer", "inspect", "blob.esgz", says=("--bogus",),
         usage=True),
    case("unknown-flag", "layer", "inspect", "--bogus", "blob.esgz", says=("--bogus",), usage=True),
    case("image-unknown-flag", "image", "mount", "--bogus", "oci:good", "m", says=("--bogus",),
         usage=True),
    # -- layer build -------------------------------------------------------------------
    case("build-missing-arg", "layer", "build", "in.tar", says=("OUT",), usage=True),
    case("build-missing-input", "layer", "build", "missing.tar", "out.esgz",
         says=("missing.tar", "no such file", "check the path")),
    case("build-input-is-dir", "layer", "build", "adir", "out.esgz",
         says=("adir is a directory", "give the path of a file")),
    case("build-input-not-tar", "layer", "build", "afile", "out.esgz", says=("not a valid tar",)),
    case("build-output-is-dir", "layer", "build", "in.tar", "adir",
         says=("adir is a directory", "give the path of a file")),
    case("build-output-dir-missing", "layer", "build", "in.tar", "nodir/out.esgz",
         says=("nodir: no such directory", "create it")),
    case("build-chunk-size-word", "layer", "build", "--chunk-size", "abc", "in.tar", "o",
         says=("--chunk-size", "positive number of bytes"), usage=True),
    case("build-chunk-size-zero", "layer", "build", "--chunk-size", "0", "in.tar", "o",
         says=("--chunk-size", "positive number of bytes"), usage=True),
    case("build-min-chunk-size-negative", "layer", "build", "--min-chunk-size", "-1", "in.tar",
         "o", says=("--min-chunk-size", "non-negative number of bytes"), usage=True),
    # -- layer inspect -----------------------------------------------------------------
    case("inspect-missing", "layer", "inspect", "missing.esgz",
         says=("missing.esgz: no such file", "HOST/REPO@sha256")),
    case("inspect-dir", "layer", "inspect", "adir", says=("adir is a directory", "eStargz file")),
    case("inspect-not-estargz", "layer", "inspect", "in.tar", says=("not an eStargz blob",)),
    case("inspect-bad-digest", "layer", "inspect", "--toc-digest", "nope", "blob.esgz",
         says=("--toc-digest", "sha256:<64"), usage=True),
    case("inspect-bad-reference", "layer", "inspect", "host/repo@sha256:abc",
         says=("not a registry blob", "64 lowercase hex")),
    case("inspect-unreachable", "layer", "inspect", "--plain-http", REGISTRY_BLOB,
         says=("127.0.0.1:9",)),
    case("inspect-hosts-dir-is-file", "layer", "inspect", "--hosts-dir", "afile", REGISTRY_BLOB,
         says=("afile", "not a directory")),
    # -- layer cat ---------------------------------------------------------------------
    case("cat-missing-path", "layer", "cat", "blob.esgz", "no/such/path",
         says=("no 'no/such/path' in layer", "layer inspect")),
    case("cat-path-is-dir", "layer", "cat", "blob.esgz", "etc",
         says=("is a dir, not a file", "regular file")),
    case("cat-missing-blob", "layer", "cat", "missing.esgz", "etc/passwd",
         says=("missing.esgz: no such file",)),
    case("cat-blob-is-dir", "layer", "cat", "adir", "etc/passwd", says=("adir is a directory",)),
    case("cat-bad-digest", "layer", "cat", "--toc-digest", "md5:00", "blob.esgz", "etc/passwd",
         says=("--toc-digest",), usage=True),
    case("cat-unreachable", "layer", "cat", "--plain-http", REGISTRY_BLOB, "etc/passwd",
         says=("127.0.0.1:9",)),
    # -- layer verify ------------------------------------------------------------------
    case("verify-no-digest", "layer", "verify", "blob.esgz", says=("--toc-digest",), usage=True),
    case("verify-bad-digest", "layer", "verify", "--toc-digest", "sha256:abc", "blob.esgz",
         says=("--toc-digest", "64 lowercase hex"), usage=True),
    case("verify-wrong-digest", "layer", "verify", "--toc-digest", DIGEST, "blob.esgz",
         says=("TOC digest", "expected " + DIGEST)),
    case("verify-missing", "layer", "verify", "--toc-digest", DIGEST, "missing.esgz",
         says=("missing.esgz: no such file",)),
    case("verify-dir", "layer", "verify", "--toc-digest", DIGEST, "adir",
         says=("adir is a directory",)),
    # -- layer serve -------------------------------------------------------------------
    case("serve-no-socket", "layer", "serve", "blob.esgz", says=("--socket",), usage=True),
    case("serve-missing", "layer", "serve", *R, "--socket", "s.sock", "missing.esgz",
         says=("missing.esgz: no such file",)),
    case("serve-dir", "layer", "serve", *R, "--socket", "s.sock", "adir",
         says=("adir is a directory",)),
    case("serve-bad-digest", "layer", "serve", "--toc-digest", "x", "--socket", "s.sock",
         "blob.esgz", says=("--toc-digest",), usage=True),
    # -- layer mount, stats, umount ----------------------------------------------------
    case("mount-missing", "layer", "mount", *R, "missing.esgz", "m",
         says=("missing.esgz: no such file",)),
    case("mount-blob-is-dir", "layer", "mount", *R, "adir", "m", says=("adir is a directory",)),
    case("mount-point-missing", "layer", "mount", *R, "blob.esgz", "nodir",
         says=("nodir is not a directory", "create it")),
    case("mount-point-is-file", "layer", "mount", *R, "blob.esgz", "afile",
         says=("afile is not a directory",)),
    case("mount-bad-attach", "layer", "mount", "--attach", "bogus", "blob.esgz", "m",
         says=("--attach", "auto, nbd, nbdfuse"), usage=True),
    case("mount-bad-digest", "layer", "mount", "--toc-digest", "x", "blob.esgz", "m",
         says=("--toc-digest",), usage=True),
    case("mount-unreachable", "layer", "mount", *R, "--plain-http", REGISTRY_BLOB, "m",
         says=("127.0.0.1:9",)),
    case("layer-stats-not-mounted", "layer", "stats", *R, "m",
         says=("not a blockfs layer mount",)),
    case("layer-stats-missing", "layer", "stats", *R, "nodir", says=("nodir",)),
    case("layer-umount-not-mounted", "layer", "umount", *R, "m",
         says=("not a blockfs layer mount",)),
    # -- image convert -----------------------------------------------------------------
    case("convert-missing-src", "image", "convert", "oci:missing", "oci:out",
         says=("not an OCI image layout", "missing")),
    case("convert-src-is-file", "image", "convert", "oci:afile", "oci:out",
         says=("afile", "not a directory")),
    case("convert-dst-exists", "image", "convert", "oci:good", "oci:afile",
         says=("afile already exists", "remove it or choose another path")),
    case("convert-missing-tag", "image", "convert", "oci:good:nosuchtag", "oci:out",
         says=("nosuchtag", "tags:")),
    case("convert-bad-reference", "image", "convert", "BAD!!", "oci:out",
         says=("invalid image reference 'BAD!!'",)),
    case("convert-chunk-size-zero", "image", "convert", "--chunk-size", "0", "oci:good", "oci:o",
         says=("--chunk-size", "positive number of bytes"), usage=True),
    case("convert-min-chunk-size-word", "image", "convert", "--min-chunk-size", "x", "oci:good",
         "oci:o", says=("--min-chunk-size",), usage=True),
    case("convert-bad-platform", "image", "convert", "--platform", "nope", "oci:good", "oci:o",
         says=("--platform", "os/arch"), usage=True),
    case("convert-unreachable", "image", "convert", "--plain-http", REGISTRY_IMAGE, "oci:out",
         says=("127.0.0.1:9",)),
    # -- image mount, stats, umount, pull ----------------------------------------------
    case("image-mount-missing-layout", "image", "mount", *R, "oci:missing", "m",
         says=("not an OCI image layout",)),
    case("image-mount-point-missing", "image", "mount", *R, "oci:good", "nodir",
         says=("is not a directory", "create it")),
    case("image-mount-bad-reference", "image", "mount", *R, "BAD!!", "m",
         says=("invalid image reference",)),
    case("image-mount-bad-platform", "image", "mount", "--platform", "a/b/c/d", "oci:good", "m",
         says=("--platform", "os/arch"), usage=True),
    case("image-mount-unreachable", "image", "mount", *R, "--plain-http", REGISTRY_IMAGE, "m",
         says=("127.0.0.1:9",)),
    case("image-stats-not-mounted", "image", "stats", *R, "m", says=("not a blockfs image mount",)),
    case("image-umount-not-mounted", "image", "umount", *R, "nodir",
         says=("not a blockfs image mount",)),
    case("pull-bad-reference", "image", "pull", "BAD!!", says=("invalid image reference",)),
    case("pull-unreachable", "image", "pull", "--plain-http", REGISTRY_IMAGE,
         says=("127.0.0.1:9",)),
    # -- as an unprivileged user -------------------------------------------------------
    case("unreadable-blob", "layer", "inspect", "secret.esgz", user="nobody",
         says=("secret.esgz: permission denied", "user who can read it")),
    case("unreadable-blob-cat", "layer", "cat", "secret.esgz", "etc/passwd", user="nobody",
         says=("secret.esgz: permission denied",)),
    case("unreadable-tar", "layer", "build", "secret.tar", "home/out.esgz", user="nobody",
         says=("secret.tar: permission denied", "run blockfs as a user")),
    case("unwritable-output-dir", "layer", "build", "in.tar", "rootonly/out.esgz", user="nobody",
         says=("rootonly: permission denied", "choose another directory")),
    case("default-root-mount", "layer", "mount", "blob.esgz", "home/m", user="nobody",
         says=("/var/lib/blockfs", "run blockfs as root", "--root")),
    case("default-root-serve", "layer", "serve", "--socket", "home/s.sock", "blob.esgz",
         user="nobody", says=("/var/lib/blockfs", "run blockfs as root", "--root")),
    case("default-root-image-mount", "image", "mount", "oci:good", "home/m", user="nobody",
         says=("/var/lib/blockfs", "run blockfs as root", "--root")),
    case("default-root-layer-stats", "layer", "stats", "home/m", user="nobody",
         says=("/var/lib/blockfs",)),
    case("default-root-image-umount", "image", "umount", "home/m", user="nobody",
         says=("/var/lib/blockfs",)),
    # A command that needs registry credentials refuses a config.json it cannot read.
    case("docker-config-unreadable-inspect", "layer", "inspect", "--plain-http", REGISTRY_BLOB,
         user="nobody/docker", says=("config.json", "make it readable", "DOCKER_CONFIG")),
    case("docker-config-unreadable-cat", "layer", "cat", "--plain-http", REGISTRY_BLOB, "f",
         user="nobody/docker", says=("config.json", "make it readable")),
    case("docker-config-unreadable-convert", "image", "convert", "--plain-http", REGISTRY_IMAGE,
         "oci:home/out", user="nobody/docker", says=("config.json", "make it readable")),
]  # fmt: skip


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """The inputs every row names, in a directory nobody can read too (pytest's own
    temporary directories are private to root)."""
    ws = Path(tempfile.mkdtemp(prefix="blockfs-cli-errors-"))
    ws.chmod(0o755)
    shutil.copy(TESTDATA / "gzip-64k.esgz", ws / "blob.esgz")
    shutil.copy(TESTDATA / "layer.tar", ws / "in.tar")
    for name in ("blob.esgz", "in.tar"):
        (ws / name).chmod(0o644)
        shutil.copy(ws / name, ws / f"secret{Path(name).suffix}")
        (ws / f"secret{Path(name).suffix}").chmod(0o600)
    (ws / "adir").mkdir()
    (ws / "m").mkdir()
    (ws / "rootonly").mkdir(mode=0o755)
    (ws / "afile").write_text("not a tar, not a blob\n")
    (ws / "state").mkdir(mode=0o700)
    (ws / "docker").mkdir()  # root's rows: an empty docker config directory

    def hello(tree: Path) -> None:
        (tree / "hello").write_text("hello\n")

    make_layout(ws / "good", [hello])
    for path in [ws / "good", *(ws / "good").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # nobody converts it too
    for home in ("home", "home-docker"):
        (ws / home / "m").mkdir(parents=True)
    config = ws / "home-docker" / ".docker" / "config.json"
    config.parent.mkdir()
    config.write_text('{"auths": {}}\n')
    for path in [ws / "home", ws / "home-docker", *(ws / "home-docker").rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    config.chmod(0o000)
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def run(ws: Path, argv: tuple[str, ...], user: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "HOME")}
    command = [str(BLOCKFS), *argv]
    if user == "root":
        env["HOME"] = str(ws / "docker")
        env["DOCKER_CONFIG"] = str(ws / "docker")
    else:
        env["HOME"] = str(ws / ("home-docker" if user == "nobody/docker" else "home"))
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(
        command, cwd=ws, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def assert_refused(proc: subprocess.CompletedProcess[str], c: Case) -> None:
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
