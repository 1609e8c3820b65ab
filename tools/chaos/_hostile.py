"""Hostile input to the ``blockfs`` command: bad arguments and hostile blobs, each run as
a user would run it, with its exit code, its last line and its peak memory.

Two tables share :func:`run`:

- :data:`CASES`, every command with one bad input: a missing file, a directory instead of
  a file (or the other way round), an existing output, an unreadable file, a bad digest,
  reference or size, an unknown flag, an unreachable registry, or, as an unprivileged
  user, the default state directory. ``tests/cli/test_cli_errors.py`` checks each: a
  non-zero exit, no traceback, one line saying what is wrong and what to do;
- :data:`BLOBS`, hostile eStargz blobs made by :func:`make_blobs`: a 180 MB xattr, a
  100,000-byte name, 1,000,000 entries, a TOC that inflates past the limit, deep
  nesting, path traversal, a truncated blob, a footer pointing outside, random bytes, a
  wrong TOC digest. ``blockfs layer inspect`` must refuse each (or, for the large but
  valid ones, list it) without a traceback.

Each command runs under a fresh Python process that waits for it and reads
``getrusage(RUSAGE_CHILDREN)``: the peak RSS of the command (and whatever it waited for).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout
from tools.chaos._fuzz import TESTDATA, compress_toc, footer_for
from tools.mkimage import add_layer, write_image

BLOCKFS = Path(sys.executable).parent / "blockfs"
NOBODY = 65534
DIGEST = "sha256:" + "0" * 64  # well formed, matches nothing
REGISTRY_BLOB = "127.0.0.1:9/x@" + DIGEST  # nothing listens on the discard port
REGISTRY_IMAGE = "127.0.0.1:9/x:1"
TIMEOUT = 120


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    says: tuple[str, ...] = ()  # what the error line must contain (what and what to do)
    usage: bool = False  # a syntax error: argparse's usage message
    user: str = "root"  # or "nobody"; with "nobody/docker", an unreadable config.json


def case(
    id: str, *argv: str, says: tuple[str, ...] = (), usage: bool = False, user: str = "root"
) -> Case:
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


def make_workspace(ws: Path) -> None:
    """The inputs every row of :data:`CASES` names, in ``ws``, which nobody can read too
    (so that the rows run as nobody see what they should)."""
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
    layout = ImageLayout.create(ws / "good")
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        (Path(tmp) / "hello").write_text("hello\n")
        write_image(layout, [add_layer(layout, Path(tmp), "hello")], "v1")
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


# Runs the command given after the file name, then writes the peak RSS (KiB) of what it
# waited for into that file, and exits as the command did.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


@attrs.frozen
class Outcome:
    """How one command ended."""

    returncode: int
    stderr: str
    peak_rss_kib: int

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def run(ws: Path, argv: Sequence[str], user: str = "root", timeout: float = TIMEOUT) -> Outcome:
    """``blockfs ARGV`` in ``ws`` as ``user`` (root, nobody, or nobody/docker: nobody
    with an unreadable ``config.json``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "HOME")}
    command = [str(BLOCKFS), *argv]
    if user == "root":
        env["HOME"] = str(ws / "docker")
        env["DOCKER_CONFIG"] = str(ws / "docker")
    else:
        env["HOME"] = str(ws / ("home-docker" if user == "nobody/docker" else "home"))
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    with tempfile.NamedTemporaryFile(prefix="blockfs-rss-") as rss:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, rss.name, *command],
            cwd=ws, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        text = Path(rss.name).read_text().strip()
    return Outcome(done.returncode, done.stderr, int(text) if text.isdigit() else 0)


# -- hostile blobs -------------------------------------------------------------------------

_PAYLOAD = 4096  # bytes before the TOC (no entry's data is read by inspect)


def _reg(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "type": "reg", "size": 0, **fields}


def _blob(path: Path, toc_json: bytes, kind: str = "estargz") -> None:
    frame = compress_toc(kind, toc_json)
    path.write_bytes(bytes(_PAYLOAD) + frame + footer_for(kind, _PAYLOAD, frame, toc_json))


def _doc(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}).encode()


def _many_entries(count: int) -> bytes:
    entries: list[dict[str, object]] = [
        {"name": f"d{i // 1000:04d}/", "type": "dir"} for i in range(0, count, 1000)
    ]
    entries += [_reg(f"d{i // 1000:04d}/f{i % 1000:03d}") for i in range(count - len(entries))]
    return _doc(entries)


def _inflating(path: Path) -> None:
    """A TOC member whose tar holds 300 MB of spaces: over the 256 MB TOC limit."""
    _blob(path, b'{"version": 1, "entries": [' + b" " * (300 << 20))


def _truncated(path: Path) -> None:
    data = (TESTDATA / "gzip-64k.esgz").read_bytes()
    path.write_bytes(data[: len(data) - 4000])


def _footer_outside(path: Path) -> None:
    data = (TESTDATA / "gzip-64k.esgz").read_bytes()
    path.write_bytes(data[:-51] + footer_for("estargz", len(data) * 2, b"", b""))


@attrs.frozen
class Blob:
    id: str
    what: str
    make: Callable[[Path], object]
    args: tuple[str, ...] = ()  # more arguments of layer inspect
    accepted: bool = False  # large but valid: listed, exit 0


BLOBS: tuple[Blob, ...] = (
    Blob("huge-xattr", "one entry with a 180 MB xattr",
         lambda p: _blob(p, _doc([_reg("f", xattrs={"user.big": "QUFB" * (60 << 20)})]))),
    Blob("many-xattrs", "one entry with 100,000 xattrs",
         lambda p: _blob(p, _doc([_reg("f", xattrs={f"user.{i}": "QQ==" for i in range(100_000)})]))),
    Blob("huge-name", "a name of 100,000 bytes", lambda p: _blob(p, _doc([_reg("a" * 100_000)]))),
    Blob("long-component", "a path component of 256 bytes",
         lambda p: _blob(p, _doc([_reg("d/" + "b" * 256)]))),
    Blob("million-entries", "1,000,000 entries (valid)",
         lambda p: _blob(p, _many_entries(1_000_000)), accepted=True),
    Blob("inflating-toc", "a TOC that inflates to 300 MB", _inflating),
    Blob("deep-nesting", "a value nested 100,000 deep",
         lambda p: _blob(p, b'{"version": 1, "entries": [{"name": "f", "type": "reg", "x": '
                         + b"[" * 100_000 + b"]" * 100_000 + b"}]}")),
    Blob("path-traversal", "names ../../etc/passwd and /abs/../../x",
         lambda p: _blob(p, _doc([_reg("../../etc/passwd"), _reg("/abs/../../x")]))),
    Blob("hardlink-loop", "a hardlink to itself",
         lambda p: _blob(p, _doc([{"name": "h", "type": "hardlink", "linkName": "h"}]))),
    Blob("overlapping-chunks", "two files whose data start at the same offset and past the TOC",
         lambda p: _blob(p, _doc([
             _reg("a", size=10, offset=100, chunkDigest="sha256:" + "1" * 64),
             _reg("b", size=10, offset=_PAYLOAD + 10, chunkDigest="sha256:" + "2" * 64),
         ]))),
    Blob("wrong-types", "size as a string, mode as a list",
         lambda p: _blob(p, _doc([_reg("f", size="12", mode=[1])]))),
    Blob("huge-numbers", "size 2^70, uid -1", lambda p: _blob(p, _doc([_reg("f", size=1 << 70, uid=-1)]))),
    Blob("duplicate-names", "the same name as a file and a directory",
         lambda p: _blob(p, _doc([_reg("x"), {"name": "x/", "type": "dir"}, _reg("x/y")]))),
    Blob("truncated", "a real blob without its last 4,000 bytes", _truncated),
    Blob("footer-outside", "a footer pointing past the end", _footer_outside),
    Blob("random-bytes", "1 MB of random bytes", lambda p: p.write_bytes(os.urandom(1 << 20))),
    Blob("wrong-digest", "a real blob, the TOC digest of another",
         lambda p: shutil.copy(TESTDATA / "gzip-64k.esgz", p), args=("--toc-digest", DIGEST)),
)  # fmt: skip


def make_blobs(ws: Path, blobs: Sequence[Blob] = BLOBS) -> None:
    for blob in blobs:
        blob.make(ws / f"{blob.id}.esgz")


# -- the report ----------------------------------------------------------------------------


@attrs.frozen
class Row:
    table: str  # "blob" or "cli"
    id: str
    command: str
    user: str
    returncode: int
    message: str
    peak_rss_kib: int
    traceback: bool
    expected_exit: str  # "0" or "non-zero"

    @property
    def ok(self) -> bool:
        exit_ok = self.returncode == 0 if self.expected_exit == "0" else self.returncode != 0
        return exit_ok and not self.traceback


def _row(
    ws: Path, table: str, id: str, argv: Sequence[str], user: str, out: Outcome, accepted: bool
) -> Row:
    message = out.last_line.replace(str(ws) + "/", "") if out.returncode else ""
    return Row(
        table=table, id=id, command="blockfs " + " ".join(argv), user=user,
        returncode=out.returncode, message=message,
        peak_rss_kib=out.peak_rss_kib, traceback="Traceback" in out.stderr,
        expected_exit="0" if accepted else "non-zero",
    )  # fmt: skip


def hostile(*, report: Callable[[str], None] = lambda line: None) -> list[Row]:
    """Run every blob through ``layer inspect`` and every row of :data:`CASES`."""
    rows = []
    ws = Path(tempfile.mkdtemp(prefix="blockfs-hostile-"))
    try:
        make_workspace(ws)
        make_blobs(ws)
        report(f"hostile blobs made in {ws}")
        for blob in BLOBS:
            argv = ("layer", "inspect", *blob.args, f"{blob.id}.esgz")
            rows.append(_row(ws, "blob", blob.id, argv, "root", run(ws, argv), blob.accepted))
            report(f"{blob.id}: exit {rows[-1].returncode}, {rows[-1].peak_rss_kib >> 10} MB")
        for c in CASES:
            rows.append(_row(ws, "cli", c.id, c.argv, c.user, run(ws, c.argv, c.user), False))
        report(f"{len(CASES)} bad command lines run")
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return rows


def markdown(rows: Sequence[Row], *, machine: str, date: str, command: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("`", "'")[:220]

    lines = [
        "## Hostile input",
        "",
        "`python -m tools.chaos hostile` (`tools/chaos/_hostile.py`) runs the installed "
        "`blockfs` command once per hostile input, under a fresh Python process that reads "
        "`getrusage(RUSAGE_CHILDREN)` for its peak RSS. First hostile blobs given to "
        "`blockfs layer inspect` (made by the tool: TOC members and footers written by "
        "hand, or reference blobs spoiled), then every bad command line of "
        "`tests/cli/test_cli_errors.py` (which checks the same rows in CI: non-zero exit, "
        "no traceback, one line naming the fix). *Exit* is the exit code (2: a usage "
        "error), *message* the last line of stderr.",
        "",
        f"### Run of {date}",
        "",
        machine,
        f"- Command: `{command}`",
        f"- {sum(r.ok for r in rows)} of {len(rows)} as expected (exit code, no traceback); "
        f"{sum(r.traceback for r in rows)} tracebacks",
        "",
        "| input | command | exit | message | peak RSS MB |",
        "|---|---|---:|---|---:|",
    ]
    for r in rows:
        what = next((b.what for b in BLOBS if b.id == r.id), "") if r.table == "blob" else ""
        name = (
            f"{r.id}"
            + (f" ({what})" if what else "")
            + ("" if r.user == "root" else f", as {r.user}")
        )
        flag = "" if r.ok else " **(unexpected)**"
        lines.append(
            f"| {cell(name)} | `{cell(r.command)}` | {r.returncode}{flag} "
            f"| {cell(r.message) or '(listed)'} | {r.peak_rss_kib / 1024:.0f} |"
        )
    return "\n".join(lines) + "\n"
