"""The guest's initramfs, built from Debian packages and cached between runs.

It comes in two parts, concatenated into one file (the kernel unpacks each archive in
turn):

- the base: busybox, the dynamic loader and the few libraries Python needs, Python 3.11
  with most of its standard library precompiled, attrs, and the kernel modules. Built
  once per set of package versions and cached under a hash of everything that goes in.
- the code: /init and the blockfs modules the guest imports (blockfs.host.attach and what
  it needs, the guest test), rebuilt on every run because it is what is being tested.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from tools import debs as _debs
from tools.vmtest._cpio import CpioWriter
from tools.vmtest._errors import VMTestError
from tools.vmtest._kernel import GuestKernel, prepare_kernel

# What the guest runs on. Python's own package pulls in libssl, ncurses, sqlite and more
# through Depends; the guest needs none of them (hashlib falls back to its built-in
# sha256), so the list is explicit rather than a dependency closure.
DEB_PACKAGES = (
    "busybox-static",
    "libc6",
    "libgcc-s1",  # glibc loads it to unwind a thread that exits
    "zlib1g",
    "libexpat1",
    "libffi8",  # for ctypes, which snapshotter's mount code uses
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11-minimal",
    "python3-attr",
)

# Kernel modules to load, in this order after their dependencies, with their arguments.
# crc32c_generic is only a soft dependency of erofs's libcrc32c (resolved by modprobe on a
# normal system), so it is named here.
KERNEL_MODULES = (
    ("virtio_pci", ""),
    ("virtio_console", ""),
    ("crc32c_generic", ""),
    ("nbd", "nbds_max=16 max_part=0"),
    ("erofs", ""),
    ("overlay", ""),
    ("9pnet_virtio", ""),  # the snapshotter scenario's view of the host (virtio-9p)
    ("9p", ""),
)

# Parts of the standard library the guest never imports; leaving them out halves the size.
STDLIB_PRUNE = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "distutils",
    "pydoc_data",
    "venv",
    "config-3.11-x86_64-linux-gnu",
    "turtle.py",
    "pydoc.py",
)
# Native modules that are tests or need libraries the guest does not have.
DYNLOAD_PRUNE_PREFIXES = ("_test", "_ctypes_test", "xxlimited", "_codecs_", "_tkinter")

# Only these top-level directories of a package are unpacked into the guest.
_INCLUDED = ("bin/", "lib/", "lib64/", "usr/bin/", "usr/lib/")
_EXCLUDED = ("usr/lib/x86_64-linux-gnu/gconv/", "usr/lib/python3.11/lib-dynload/__pycache__/")

# Bump when the layout of the base archive changes, so that cached ones are rebuilt.
BASE_FORMAT = "blockfs-vm-base-1"
GUEST_MODULE = "tools.vmtest.guest"
SNAPSHOTTER_MODULE = "tools.vmtest.guest_snapshotter"
# 9p tags of the snapshotter scenario's shares (tools/vmtest/_run.py gives them to qemu).
HOST_ROOT_TAG = "hostroot"
WORK_TAG = "work"
_9P = "-t 9p -o trans=virtio,version=9p2000.L,msize=512000"
# The snapshotter scenario's root: /host, a read-only view of the host's root. /hostfs
# keeps a view without the tmpfs mounts, from which the project is mounted back.
HOST_ROOT_MOUNTS = f"""mkdir -p /host /hostfs
  mount {_9P},ro,cache=loose {HOST_ROOT_TAG} /hostfs
  mount --bind /hostfs /host
  mount -t proc proc /host/proc
  mount -t sysfs sysfs /host/sys
  mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
  mount -t devtmpfs devtmpfs /host/dev
  mkdir -p /host/dev/pts /host/dev/shm
  mount -t devpts devpts /host/dev/pts
  mount -t tmpfs tmpfs /host/dev/shm
  for dir in /run /tmp /var/tmp /root; do mount -t tmpfs tmpfs "/host$dir"; done
  mkdir -p "/host$project" && mount --bind "/hostfs$project" "/host$project"
  mkdir -p "/host$work" && mount {_9P} {WORK_TAG} "/host$work"
"""
GUEST_ROOT = "opt/blockfs"

INIT_SCRIPT = """#!/bin/busybox sh
# /init of the blockfs VM test: mount the API filesystems, load the modules, run the test
# that blockfs.scenario= on the kernel command line names.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
while read -r module args; do
  insmod "/lib/modules/$module" $args || echo "init: insmod $module failed"
done < /lib/modules/load.list
scenario=attach
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    blockfs.scenario=*) scenario="${{arg#*=}}" ;;
    blockfs.project=*) project="${{arg#*=}}" ;;
    blockfs.work=*) work="${{arg#*=}}" ;;
  esac
done
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/root
if [ "$scenario" = snapshotter ]; then
  # The host's root filesystem, read-only, with the guest's own API filesystems and
  # tmpfs where programs write; the project and the work directory are mounted again
  # on top, in case a tmpfs hides them (a clone under /tmp, say).
  {share_mounts}  ip link set lo up
  chroot /host /usr/bin/env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    sh -c "cd '$project' && exec .venv/bin/python -m {snapshotter_module}"
else
  export PYTHONPATH=/{guest_root}
  cd /{guest_root}
  python3 -m {guest_module}
fi
echo "init: the guest test exited with status $?"
sync
poweroff -f
"""


@attrs.frozen
class GuestImage:
    """What qemu boots: the kernel and the initramfs (base and code concatenated)."""

    kernel: GuestKernel
    initrd: Path
    base_key: str


def prepare_guest(cache: Path, work: Path, project: Path, say: Callable[[str], None]) -> GuestImage:
    """Download, unpack and assemble the guest, reusing whatever ``cache`` already has."""
    resolved = _debs.resolve([_debs.KERNEL_METAPACKAGE, *DEB_PACKAGES])
    kernel_deb = _debs.resolve_kernel(resolved[_debs.KERNEL_METAPACKAGE])
    debs = [resolved[name] for name in DEB_PACKAGES]
    paths = _debs.download([kernel_deb, *debs], cache / "debs")
    kernel = prepare_kernel(kernel_deb, paths[kernel_deb.package], cache / "kernel", KERNEL_MODULES)
    say(f"guest kernel: {kernel_deb.package} {kernel_deb.version} (Linux {kernel.release})")

    key = _base_key(kernel, [d.key for d in debs])
    base = cache / f"initramfs-base-{key}.cpio.gz"
    if base.exists():
        say(f"guest base image: cached {base.name}")
    else:
        say(f"guest base image: building {base.name} from {len(debs)} Debian packages")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".unpack-") as tmp:
            trees = []
            for d in debs:
                tree = Path(tmp) / d.key
                _debs.extract(paths[d.package], tree)
                trees.append(tree)
            _build_base(trees, kernel, base)
    _prune_cache(cache, base, kernel, [kernel_deb, *debs])

    work.mkdir(parents=True, exist_ok=True)
    initrd = work / "initrd.img"
    with open(initrd, "wb") as out:
        out.write(base.read_bytes())
        out.write(build_code_archive(project))
    return GuestImage(kernel=kernel, initrd=initrd, base_key=key)


def _prune_cache(cache: Path, base: Path, kernel: GuestKernel, debs: list[_debs.Deb]) -> None:
    """Remove what earlier package versions left in the cache (it only ever grows otherwise)."""
    keep_debs = {d.basename for d in debs} | {
        Path(d.basename).with_suffix(".sha256").name for d in debs
    }
    keep = {cache / "debs": keep_debs, cache / "kernel": {kernel.package}}
    for directory, names in keep.items():
        for entry in directory.glob("*") if directory.is_dir() else []:
            if entry.name not in names and not entry.name.startswith("."):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
    for old in cache.glob("initramfs-base-*.cpio.gz"):
        if old != base:
            old.unlink(missing_ok=True)


def _base_key(kernel: GuestKernel, deb_keys: Iterable[str]) -> str:
    inputs = {
        "format": BASE_FORMAT,
        "kernel": kernel.package,
        "modules": [list(m) for m in KERNEL_MODULES],
        "debs": sorted(deb_keys),
        "prune": [STDLIB_PRUNE, DYNLOAD_PRUNE_PREFIXES, _INCLUDED, _EXCLUDED],
        "magic": importlib.util.MAGIC_NUMBER.hex(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def pyc(source: bytes, guest_path: str) -> bytes | None:
    """A hash-based, unchecked .pyc of ``source`` (None if it does not compile).

    Unchecked means the guest's interpreter uses it without looking at the source's
    mtime or hash: the cpio archive carries no useful mtimes and compiling at each boot
    costs seconds under TCG. Layout: magic, flags (1 = hash-based, not checked), the
    source hash, the marshalled code object.
    """
    try:
        code = compile(source, guest_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    return (
        importlib.util.MAGIC_NUMBER
        + (1).to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def _add_python_file(w: CpioWriter, name: str, data: bytes, mode: int) -> None:
    w.file(name, data, mode)
    compiled = pyc(data, "/" + name)
    if compiled is not None:
        w.file(importlib.util.cache_from_source(name), compiled)


def _wanted(rel: str) -> bool:
    if not rel.startswith(_INCLUDED) or rel.startswith(_EXCLUDED) or "/__pycache__/" in rel:
        return False
    stdlib = "usr/lib/python3.11/"
    if rel.startswith(stdlib):
        inner = rel.removeprefix(stdlib)
        if inner.split("/", 1)[0] in STDLIB_PRUNE:
            return False
        if inner.startswith("lib-dynload/"):
            return not os.path.basename(inner).startswith(DYNLOAD_PRUNE_PREFIXES)
    return True


def _add_tree(w: CpioWriter, tree: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, tree)
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not _wanted(rel) or w.has(rel):
                continue
            if os.path.islink(full):
                w.symlink(rel, os.readlink(full))
            elif rel.endswith(".py") and rel.startswith("usr/lib/python3"):
                _add_python_file(w, rel, Path(full).read_bytes(), os.stat(full).st_mode)
            else:
                w.file(rel, Path(full).read_bytes(), os.stat(full).st_mode)


def _build_base(trees: list[Path], kernel: GuestKernel, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # unique: runs may share a cache
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
        w = CpioWriter(gz)
        for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", GUEST_ROOT):
            w.directory(d)
        # The kernel opens /dev/console for init before anything is mounted.
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, mode=0o666)
        for tree in trees:
            _add_tree(w, tree)
        w.symlink("usr/bin/python3", "python3.11")
        listing = []
        for path, args in kernel.modules:
            w.file(f"lib/modules/{path.name}", path.read_bytes())
            listing.append(f"{path.name} {args}".strip())
        w.file("lib/modules/load.list", ("\n".join(listing) + "\n").encode())
        w.close()
    os.replace(tmp, out)


def guest_sources(project: Path) -> list[str]:
    """The project's files the guest test imports, relative to ``project``.

    Found by importing the guest module in a fresh interpreter and listing what came
    from the project, so that a new import in blockfs.host.attach is picked up without
    anyone maintaining a list.
    """
    script = (
        "import sys, importlib\n"
        f"importlib.import_module({GUEST_MODULE!r})\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise VMTestError(f"cannot import {GUEST_MODULE}: {result.stderr.strip()[-2000:]}")
    root = project.resolve()
    found = set()
    for line in result.stdout.splitlines():
        path = Path(line).resolve()
        if path.is_relative_to(root) and not path.is_relative_to(root / ".venv"):
            found.add(str(path.relative_to(root)))
    return sorted(found)


def build_code_archive(project: Path) -> bytes:
    """The per-run archive: /init and the project's guest-side modules, gzip-compressed."""
    buffer = io.BytesIO()
    w = CpioWriter(buffer)
    init = INIT_SCRIPT.format(
        guest_root=GUEST_ROOT,
        guest_module=GUEST_MODULE,
        share_mounts=HOST_ROOT_MOUNTS,
        snapshotter_module=SNAPSHOTTER_MODULE,
    )
    w.file("init", init.encode(), 0o755)
    for rel in guest_sources(project):
        data = (project / rel).read_bytes()
        name = f"{GUEST_ROOT}/{rel}"
        w.file(name, data)
        compiled = pyc(data, "/" + name)
        if compiled is not None:
            w.file(importlib.util.cache_from_source(name), compiled)
    w.close()
    return gzip.compress(buffer.getvalue(), compresslevel=6)
