"""The container demo: an image run by containerd, lazily, from a local registry.

``run_demo()`` starts a docker-registry on loopback, builds a base image from Debian
packages (busybox, Python 3.11 and 32 MiB of data nothing reads), converts it to eStargz
and pushes it, then starts a private containerd whose proxy snapshotter is
blockfs-snapshotter, pulls the image with ``blockfs image pull`` (its layers are mounted
lazily, nothing is downloaded), runs Python from it with ``ctr run --snapshotter
blockfs`` and prints the time from the start of the pull to the first line of output,
and the bytes the registry sent against the image's compressed size. Then it removes
the image and stops everything. Needs root.

:func:`first_output` is the measured part; ``tools.ctr_bench`` times it for both
containerd's overlayfs snapshotter and blockfs.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import attrs

from blockfs.errors import BlockfsError
from blockfs.oci import Reference
from blockfs.registry import RegistryClient
from tools.local_containerd import (
    BlockfsContainerd,
    Containerd,
    short_tempdir,
    start_blockfs_containerd,
)
from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import DebError, build_base_image

RANDOM_MB = 32
PROGRAM = (
    "import json, platform, sqlite3; "
    "print(json.dumps({'python': platform.python_version(), 'sqlite': sqlite3.sqlite_version}))"
)
BLOCKFS = [sys.executable, "-m", "blockfs.cli"]


@attrs.frozen
class FirstOutput:
    """One pull, create and run of a container, timed to its first line of output."""

    snapshotter: str
    pull_seconds: float  # the pull command alone
    first_output_seconds: float  # from the start of the pull to the first line printed
    line: str  # that line
    registry_bytes: int  # body bytes the registry sent meanwhile, by its access log


def image_size(ref: str) -> int:
    """The compressed size of the image ``ref`` (its layers), from its manifest."""
    with RegistryClient(plain_http=True) as client:
        _, manifest = client.get_image_manifest(Reference.parse(ref))
    return sum(layer.size for layer in manifest.layers)


def pull_command(stack: BlockfsContainerd, ref: str, snapshotter: str) -> tuple[list[str], str]:
    """How to pull ``ref`` into ``stack``'s containerd for ``snapshotter``, and that
    command as shown.

    ``blockfs`` pulls with ``blockfs image pull`` (lazy layers; the stack's daemon does
    the pull); any other snapshotter with ``ctr images pull`` (every layer downloaded and
    unpacked).
    """
    ctd = stack.containerd
    if snapshotter == "blockfs":
        pull = [*BLOCKFS, "image", "pull", "--plain-http", "--address", str(ctd.address),
                "--namespace", ctd.namespace, "--pull-socket",
                str(stack.snapshotter.pull_socket), ref]  # fmt: skip
        return pull, f"blockfs image pull --plain-http {ref}"
    pull = ctd.ctr_argv("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref)
    return pull, f"ctr images pull --plain-http --snapshotter {snapshotter} {ref}"


def _check(argv: list[str], shown: str, say: Callable[[str], None]) -> str:
    say(f"$ {shown}")
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.stdout:
        say(done.stdout.rstrip("\n"))
    if done.returncode != 0:
        raise BlockfsError(f"`{shown}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def first_output(
    stack: BlockfsContainerd,
    registry: LocalRegistry,
    ref: str,
    argv: list[str],
    *,
    snapshotter: str,
    name: str,
    say: Callable[[str], None] = lambda line: None,
) -> FirstOutput:
    """Pull ``ref`` into ``ctd`` for ``snapshotter`` and run ``argv`` in a container.

    ``blockfs`` pulls with ``blockfs image pull`` (lazy layers); any other snapshotter
    with ``ctr images pull`` (every layer downloaded and unpacked). The container is
    removed when it exits; the image is left for the caller to remove.
    """
    ctd = stack.containerd
    before = registry.bytes_sent()
    started = time.monotonic()
    _check(*pull_command(stack, ref, snapshotter), say)
    pulled = time.monotonic()
    run = ctd.ctr_argv("run", "--rm", "--snapshotter", snapshotter, ref, name, *argv)
    say(f"$ ctr run --rm --snapshotter {snapshotter} {ref} {name} {shlex.join(argv)}")
    with subprocess.Popen(
        run, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        first = time.monotonic()
        rest = proc.stdout.read()
        errors = proc.stderr.read()
    if proc.returncode != 0 or not line:
        raise BlockfsError(f"`ctr run` of {ref} failed ({proc.returncode}): {errors.strip()}")
    say((line + rest).rstrip("\n"))
    return FirstOutput(
        snapshotter=snapshotter,
        pull_seconds=pulled - started,
        first_output_seconds=first - started,
        line=line.rstrip("\n"),
        registry_bytes=registry.bytes_sent() - before,
    )


def remove_image(ctd: Containerd, ref: str) -> None:
    """Remove ``ref`` from ``ctd`` and wait for the garbage collector to drop its content
    and snapshots (for blockfs: unmount its layers and stop serving them)."""
    ctd.ctr("images", "rm", "--sync", ref, check=False)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _report(result: FirstOutput, size: int) -> None:
    say("== 5. what it took")
    say(
        f"  time to first output: {result.first_output_seconds:.2f} s "
        f"(pull {result.pull_seconds:.2f} s, then create and run)"
    )
    say(
        f"  the registry sent {_mib(result.registry_bytes)} for an image of "
        f"{_mib(size)} compressed ({100 * result.registry_bytes / size:.1f}%, "
        "manifest and config included)"
    )


def say(text: str) -> None:
    """Print a line of the demo now."""
    print(text, flush=True)


def run_demo() -> int:
    """Run the demo; its exit status."""
    work = short_tempdir("bfs-demo-")
    try:
        with start_registry(work / "registry", access_log=True) as registry:
            say(f"registry: docker-registry on {registry.url}")
            say("== 1. build a base image from Debian packages (tools/mkimage)")
            try:
                build_base_image(work / "base", python=True, random_mb=RANDOM_MB, report=say)
            except DebError as e:
                say(f"demo: cannot fetch Debian packages for the image: {e}")
                return 1
            ref = f"{registry.host}/demo/app:latest"
            say("== 2. convert every layer to eStargz and push the image")
            _check([*BLOCKFS, "image", "convert", "--plain-http", f"oci:{work / 'base'}:latest",
                    ref], f"blockfs image convert --plain-http oci:base:latest {ref}", say)  # fmt: skip
            size = image_size(ref)
            say("== 3. start a private containerd with blockfs-snapshotter as its proxy plugin")
            with start_blockfs_containerd(work / "ctd") as stack:
                ctd = stack.containerd
                say(f"containerd on {ctd.address}, namespace {ctd.namespace}")
                try:
                    say("== 4. pull lazily (footers and TOCs only), create and run Python")
                    result = first_output(stack, registry, ref, ["/usr/bin/python3", "-c", PROGRAM],
                                          snapshotter="blockfs", name="demo", say=say)  # fmt: skip
                    _report(result, size)
                finally:
                    say("== 6. clean up: image, snapshots, containerd, snapshotter, registry")
                    remove_image(ctd, ref)
    except (BlockfsError, subprocess.CalledProcessError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say("done: nothing left running, nothing left mounted")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
