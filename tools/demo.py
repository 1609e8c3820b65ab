"""The README's main job, ``tools/run demo``: a whole image, lazily, from a local registry.

By default it runs :func:`tools.demo_container.run_demo`: build a base image from Debian
packages, convert it to eStargz, push it to a loopback registry, pull it lazily into a
private containerd whose proxy snapshotter is blockfs-snapshotter, run a container from it
and report the time to first output and the bytes fetched. ``tools/run demo --image``
mounts the whole image lazily without containerd instead (:func:`tools.demo_image.run_demo`);
``tools/run demo --layer`` walks through one layer: build, inspect, verify, mount, read a
file. Every step is a command, printed before it runs. Needs root (it mounts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]


def step(*args: str) -> str:
    """Run ``blockfs ARGS`` visibly and return its stdout."""
    print(f"\n$ blockfs {' '.join(args)}", flush=True)
    proc = subprocess.run([*BLOCKFS, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"demo: `blockfs {args[0]} {args[1]}` failed")
    return proc.stdout


def sample_layer(path: Path) -> None:
    """A realistic layer: the Python standard library of this machine (about 40 MB)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add("/usr/lib/python3.11", arcname="usr/lib/python3.11", recursive=True,
               filter=lambda m: None if "__pycache__" in m.name else m)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if os.geteuid() != 0:
        print("demo: run as root (it mounts a filesystem)", file=sys.stderr)
        return 1
    if "--layer" in args:
        return layer_demo()
    if "--image" in args:
        from tools.demo_image import run_demo

        return run_demo()
    from tools.demo_container import run_demo as run_container_demo

    return run_container_demo()


def layer_demo() -> int:
    """Build, inspect, verify and lazily mount one layer made of this machine's stdlib."""
    work = Path(tempfile.mkdtemp(prefix="blockfs-demo-"))
    root, mnt = work / "state", work / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        layer_tar = work / "layer.tar"
        sample_layer(layer_tar)
        print(f"sample layer: {layer_tar} ({layer_tar.stat().st_size / 1e6:.1f} MB of tar)")
        blob = work / "layer.esgz"
        built = json.loads(
            step(
                "layer",
                "build",
                "--prioritize",
                "usr/lib/python3.11/os.py",
                str(layer_tar),
                str(blob),
            )
        )
        print(json.dumps(built, indent=2))
        toc_digest = built["tocDigest"]
        summary = step("layer", "inspect", "--toc-digest", toc_digest, str(blob))
        print("\n".join(summary.splitlines()[:6]) + "\n  …")
        print(step("layer", "verify", "--toc-digest", toc_digest, str(blob)).strip())

        started = time.monotonic()
        print(step("layer", "mount", "--root", str(root), "--toc-digest", toc_digest,
                   str(blob), str(mnt)).strip())  # fmt: skip
        mounted = True
        print(f"mounted in {time.monotonic() - started:.2f} s")
        files = sum(len(f) for _, _, f in os.walk(mnt))
        print(f"\n$ find {mnt} | wc -l   ->  {files} files visible, no file data fetched yet")
        text = (mnt / "usr/lib/python3.11/this.py").read_text().splitlines()[0]
        print(f"$ head -1 {mnt}/usr/lib/python3.11/this.py   ->  {text}")
        stats = json.loads(step("layer", "stats", "--json", "--root", str(root), str(mnt)))
        fetched, size = stats["bytes_fetched"], built["blobSize"]
        print(
            f"fetched {fetched} of {size} blob bytes ({100 * fetched / size:.2f}%): "
            f"{stats['chunks_fetched']} chunk(s), footer and TOC included; "
            f"attach: {stats['attach']}, {stats['mount_method']} mount"
        )
        step("layer", "umount", "--root", str(root), str(mnt))
        mounted = False
        print("unmounted; nothing left running")
        return 0
    finally:
        if mounted:
            subprocess.run(
                [*BLOCKFS, "layer", "umount", "--root", str(root), str(mnt)], check=False
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
