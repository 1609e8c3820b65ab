"""A private containerd (Debian's 1.6) for tests, and OCI image archives to import into it.

:func:`start_containerd` runs containerd with its root, state, sockets and runc root in a
short directory under /tmp (unix socket paths are limited to 107 bytes), the CRI plugin
and the /opt plugin disabled (CRI on request), and blockfs-like snapshotters registered as
``[proxy_plugins.NAME]``. Nothing it starts touches a system containerd: its gRPC, ttrpc
and debug sockets are its own, :meth:`Containerd.ctr` passes ``--runc-root`` and
``--fifo-dir`` for ``run``, and each call gets a namespace of its own. When the block exits, containerd, any shim it left (found by our socket in the
shim's command line) and mounts under its directory are stopped and removed.

:func:`write_image_archive` builds an OCI image layout tar, the format ``ctr images
import`` reads, from layers given as {path: bytes} dictionaries.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import pytest

from blockfs.oci import Descriptor, ImageConfig, ImageLayout, Manifest, host_platform
from blockfs.oci import media_types as mt
from snapshotter._mount import read_mountinfo

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/bin/runc"
_START_TIMEOUT = 30.0
# containerd keeps the image name in this index annotation when it imports an archive.
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"


def short_tempdir(prefix: str) -> Path:
    """A new directory under /tmp, short enough for unix sockets deep inside it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def require_root_tools(*tools: str) -> None:
    """Skip the test unless we are root and every tool exists."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in tools:
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found = [
        m.mountpoint
        for m in read_mountinfo()
        if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")
    ]
    return sorted(found, key=len, reverse=True)


def _pids_with_argument(argument: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            pids.append(int(entry))
    return pids


@attrs.define
class Containerd:
    """A running private containerd."""

    dir: Path
    address: Path
    namespace: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def runc_root(self) -> Path:
        """runc's state directory for this containerd's containers."""
        return self.dir / "runc"

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd in its test namespace."""
        if args[:1] == ("run",):
            # runc's root and ctr's FIFOs default to /run/containerd, which a system
            # containerd uses too. (Shim sockets go to /run/containerd/s whatever we do,
            # named by a hash of our socket path, so they never collide.)
            args = (
                "run", "--runc-root", str(self.runc_root), "--fifo-dir", str(self.dir / "fifo"),
                *args[1:],
            )  # fmt: skip
        argv = [CTR, "--address", str(self.address), "--namespace", self.namespace, *args]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
                f"\n--- containerd log (tail) ---\n{self.log()[-4000:]}"
            )
        return proc

    def log(self) -> str:
        """What containerd logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop containerd and every shim it started; unmount what is left under its dir."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        for pid in _pids_with_argument(str(self.address)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in mounts_under(self.dir):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@attrs.frozen
class CRISettings:
    """The CRI plugin's image service, pulling for ``snapshotter`` with the snapshot
    annotations on (what lazy pulling needs) and registry hosts from ``hosts_dir``."""

    snapshotter: str
    hosts_dir: Path


def _cri_config(dir: Path, cri: CRISettings) -> list[str]:
    # Only PullImage and friends are used: CNI and streaming point at private dirs and
    # loopback, so that nothing of the host's Kubernetes setup is touched.
    section = '[plugins."io.containerd.grpc.v1.cri"'
    return [
        f"{section}]",
        "  disable_tcp_service = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  enable_cdi = false",
        f"{section}.containerd]",
        f'  snapshotter = "{cri.snapshotter}"',
        "  disable_snapshot_annotations = false",
        f"{section}.cni]",
        f'  bin_dir = "{dir / "cni" / "bin"}"',
        f'  conf_dir = "{dir / "cni" / "conf"}"',
        f"{section}.registry]",
        f'  config_path = "{cri.hosts_dir}"',
    ]


def _config(dir: Path, proxies: Mapping[str, Path], cri: CRISettings | None = None) -> str:
    # CRI would start sandboxes and CNI; /opt installs packages under /opt/containerd.
    disabled = ["io.containerd.internal.v1.opt"]
    if cri is None:
        disabled.append("io.containerd.grpc.v1.cri")
    lines = [
        "version = 2",
        f'root = "{dir / "root"}"',
        f'state = "{dir / "state"}"',
        "disabled_plugins = [" + ", ".join(f'"{name}"' for name in disabled) + "]",
        "[grpc]",
        f'  address = "{dir / "c.sock"}"',
        "[ttrpc]",
        f'  address = "{dir / "c.sock.ttrpc"}"',
        "[debug]",
        f'  address = "{dir / "debug.sock"}"',
        '  level = "debug"',
        "[metrics]",
        '  address = ""',
    ]
    for name, socket in proxies.items():
        lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{socket}"']
    if cri is not None:
        lines += _cri_config(dir, cri)
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def start_containerd(
    proxy_snapshotters: Mapping[str, Path] | None = None,
    *,
    namespace: str | None = None,
    cri: CRISettings | None = None,
) -> Iterator[Containerd]:
    """Run a private containerd until the block exits; its namespace is unique per call.

    With ``cri``, the CRI plugin runs too (its images live in namespace ``k8s.io``).
    """
    require_root_tools(CONTAINERD, CTR)
    dir = short_tempdir("bfs-ctd-")
    config = dir / "config.toml"
    config.write_text(_config(dir, proxy_snapshotters or {}, cri))
    log_path = dir / "containerd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [CONTAINERD, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    daemon = Containerd(
        dir=dir,
        address=dir / "c.sock",
        namespace=namespace or f"blockfs-test-{uuid.uuid4().hex[:8]}",
        process=process,
        log_path=log_path,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while daemon.ctr("version", check=False, timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"containerd did not start:\n{daemon.log()[-4000:]}")
            time.sleep(0.1)
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(dir, ignore_errors=True)


# -- OCI image archives ------------------------------------------------------------------


def layer_tar(
    files: Mapping[str, bytes | None], *, modes: Mapping[str, int] | None = None
) -> bytes:
    """An uncompressed layer tar: ``path: bytes`` is a file, ``path: None`` a directory.

    Parent directories are added as needed; ``modes`` overrides a member's mode.
    """
    modes = modes or {}
    members: dict[str, bytes | None] = {}
    for path, data in sorted(files.items()):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            members.setdefault("/".join(parts[:i]), None)
        members["/".join(parts)] = data
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = modes.get(name, 0o755)
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = modes.get(name, 0o644)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class ImageArchive:
    """An OCI archive written by :func:`write_image_archive`."""

    path: Path
    name: str
    diff_ids: tuple[str, ...]

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """The chainID of each layer, bottom first (the names of the committed snapshots)."""
        chain: list[str] = []
        for diff_id in self.diff_ids:
            chain.append(diff_id if not chain else _sha256(f"{chain[-1]} {diff_id}".encode()))
        return tuple(chain)


def write_image_archive(
    path: Path, name: str, layers: Sequence[bytes], *, cmd: Sequence[str]
) -> ImageArchive:
    """Write an OCI layout tar holding one image made of the gzip-compressed ``layers``."""
    with tempfile.TemporaryDirectory(prefix="bfs-oci-") as tmp:
        layout = ImageLayout.create(tmp)
        descriptors = []
        diff_ids = []
        for tar_bytes in layers:
            blob = gzip.compress(tar_bytes, mtime=0)
            digest = layout.write_blob(blob)
            descriptors.append(Descriptor(mt.OCI_LAYER_GZIP, digest, len(blob)))
            diff_ids.append(_sha256(tar_bytes))
        platform = host_platform()
        config = ImageConfig.from_json(
            {
                "architecture": platform.architecture,
                "os": platform.os,
                "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        )
        manifest = Manifest(
            config=layout.write_document(config),
            layers=tuple(descriptors),
        )
        descriptor = attrs.evolve(
            layout.write_document(manifest),
            annotations={IMAGE_NAME_ANNOTATION: name},
            platform=platform,
        )
        layout.add_manifest(descriptor, tag="latest")
        with tarfile.open(path, "w") as tar:
            tar.add(tmp, arcname=".")
    return ImageArchive(path=path, name=name, diff_ids=tuple(diff_ids))
