"""A private containerd with blockfs-snapshotter as its proxy snapshotter, for the demo,
benchmarks and tests.

:func:`start_containerd` runs Debian's containerd (1.6) with its root, state, sockets and
runc root in a short directory under /tmp (unix socket paths are limited to 107 bytes),
the CRI plugin and the /opt plugin disabled (CRI on request), and blockfs-like
snapshotters registered as ``[proxy_plugins.NAME]``. Nothing it starts touches a system
containerd: its gRPC, ttrpc and debug sockets are its own, :meth:`Containerd.ctr` passes
``--runc-root`` and ``--fifo-dir`` for ``run``, and each call gets a namespace of its own.
When the block exits, containerd, any shim it left (found by our socket in the shim's
command line) and mounts under its directory are stopped and removed.

:func:`start_snapshotter` runs ``python -m snapshotter.daemon`` on a private socket until
the block exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc

from blockfs.errors import BlockfsError
from blockfs.host.mounts import read_mountinfo
from snapshotter.defaults import PULL_SOCKET_NAME

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/bin/runc"
PROJECT = Path(__file__).resolve().parents[1]
# How long containerd and the daemon may take to start (callers under emulation give more).
START_TIMEOUT = 30.0


class ContainerdProcessError(BlockfsError):
    """containerd or blockfs-snapshotter did not start, or a ``ctr`` command failed."""


def short_tempdir(prefix: str) -> Path:
    """A new directory under /tmp, short enough for unix sockets deep inside it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


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

    def ctr_argv(self, *args: str) -> list[str]:
        """The ``ctr`` command line for ``args`` against this containerd and namespace."""
        if args[:1] == ("run",):
            # runc's root and ctr's FIFOs default to /run/containerd, which a system
            # containerd uses too. (Shim sockets go to /run/containerd/s whatever we do,
            # named by a hash of our socket path, so they never collide.)
            args = (
                "run", "--runc-root", str(self.runc_root), "--fifo-dir", str(self.dir / "fifo"),
                *args[1:],
            )  # fmt: skip
        return [CTR, "--address", str(self.address), "--namespace", self.namespace, *args]

    def answers(self) -> bool:
        """Whether ``ctr version`` gets an answer within 10 s (a slow machine, an emulated
        one above all, may take longer while containerd starts: not an answer yet)."""
        try:
            return self.ctr("version", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd in its namespace."""
        proc = subprocess.run(
            self.ctr_argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise ContainerdProcessError(
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
    start_timeout: float = START_TIMEOUT,
) -> Iterator[Containerd]:
    """Run a private containerd until the block exits; its namespace is unique per call.

    With ``cri``, the CRI plugin runs too (its images live in namespace ``k8s.io``).
    Raises :class:`ContainerdProcessError` if it does not answer within ``start_timeout``.
    """
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
        namespace=namespace or f"blockfs-{uuid.uuid4().hex[:8]}",
        process=process,
        log_path=log_path,
    )
    try:
        deadline = time.monotonic() + start_timeout
        while not daemon.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ContainerdProcessError(f"containerd did not start:\n{daemon.log()[-4000:]}")
            time.sleep(0.1)
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(dir, ignore_errors=True)


# -- blockfs-snapshotter -------------------------------------------------------------------


@attrs.define
class SnapshotterDaemon:
    """A running ``python -m snapshotter.daemon``."""

    root: Path
    socket: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pull_socket(self) -> Path:
        """Where the daemon takes ``blockfs image pull``'s pulls."""
        return self.root / "run" / PULL_SOCKET_NAME

    def channel(self) -> grpc.Channel:
        """A new gRPC channel to the daemon's socket."""
        return grpc.insecure_channel(f"unix://{self.socket}")

    def log(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The daemon's log lines, each parsed as the JSON object it must be."""
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]

    def wait_settled(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the daemon has started (or adopted) its NBD server and loaded the
        code of a pull, which it does in the background once it serves containerd: as a
        node's daemon has long before a pull."""
        wanted = [
            {"started the NBD server", "adopted the running NBD server"},
            {"loaded the code of a pull"},
        ]
        deadline = time.monotonic() + timeout
        while True:
            messages = {r.get("msg") for r in self.log_records()}
            if all(messages & one for one in wanted):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ContainerdProcessError(
                    f"blockfs-snapshotter did not settle after starting: {self.log()[-3000:]}"
                )
            time.sleep(0.02)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL after 20 s)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@contextlib.contextmanager
def start_snapshotter(
    root: Path,
    socket: Path,
    *extra_args: str,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "debug",
    start_timeout: float = START_TIMEOUT,
) -> Iterator[SnapshotterDaemon]:
    """Run the daemon with ``--root`` and ``--address``; stop it when the block exits.

    ``env`` is added to the daemon's environment. Raises :class:`ContainerdProcessError`
    if it is not serving within ``start_timeout`` seconds.
    """
    log_path = log_path or root.parent / f"{root.name}-snapshotter.log"
    with open(log_path, "ab") as log_file:
        start = log_file.tell()  # a restarted daemon appends to its predecessor's log
        process = subprocess.Popen(
            [
                sys.executable, "-m", "snapshotter.daemon",
                "--root", str(root), "--address", str(socket), "--log-level", log_level,
                *extra_args,
            ],
            cwd=PROJECT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
    daemon = SnapshotterDaemon(root=root, socket=socket, process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while "serving containerd snapshots API" not in daemon.log()[start:]:
            if process.poll() is not None or time.monotonic() > deadline:
                raise ContainerdProcessError(f"blockfs-snapshotter did not start:\n{daemon.log()}")
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.stop()


# -- both together -------------------------------------------------------------------------


@attrs.define
class BlockfsContainerd:
    """A private containerd whose proxy snapshotter ``blockfs`` is a running
    blockfs-snapshotter with its state in ``work / "root"``."""

    work: Path
    containerd: Containerd
    snapshotter: SnapshotterDaemon


def sweep(work: Path) -> None:
    """Kill every process whose command line names ``work`` (an NBD server, a FUSE helper
    left by a crash) and lazily unmount everything below it: the last resort of cleanup."""
    prefix = str(work.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if prefix.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
    for point in mounts_under(work):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@contextlib.contextmanager
def start_blockfs_containerd(
    work: Path,
    *,
    log_level: str = "info",
    start_timeout: float = START_TIMEOUT,
    snapshotter_args: Sequence[str] = (),
    cri_plain_http: Sequence[str] | None = None,
) -> Iterator[BlockfsContainerd]:
    """Run blockfs-snapshotter and a containerd that uses it, with their state under
    ``work`` (keep it short: sockets live there); stop both, and sweep ``work``, on exit.
    ``snapshotter_args`` are more options of the daemon (``--prefetch``, say).

    With ``cri_plain_http`` (registry hosts that speak plain HTTP; may be empty),
    containerd's CRI plugin runs too, pulling for blockfs as on a Kubernetes node, and a
    hosts.toml per host says so to it and to the daemon.

    Images pulled meanwhile should be removed first (``ctr images rm --sync``), so that
    the snapshotter unmounts its layers and stops serving them in order.
    """
    socket = work / "s.sock"
    work.mkdir(parents=True, exist_ok=True)
    cri = None
    if cri_plain_http is not None:
        hosts = work / "hosts"
        for host in cri_plain_http:
            (hosts / host).mkdir(parents=True, exist_ok=True)
            (hosts / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
        hosts.mkdir(exist_ok=True)
        cri = CRISettings(snapshotter="blockfs", hosts_dir=hosts)
        snapshotter_args = (*snapshotter_args, "--hosts-dir", str(hosts))
    try:
        with (
            start_snapshotter(
                work / "root",
                socket,
                *snapshotter_args,
                log_level=log_level,
                start_timeout=start_timeout,
            ) as snapshotter,
            start_containerd(
                {"blockfs": socket},
                namespace=None if cri is None else "k8s.io",
                cri=cri,
                start_timeout=start_timeout,
            ) as containerd,
        ):
            yield BlockfsContainerd(work, containerd, snapshotter)
    finally:
        sweep(work)


# -- a minimal CRI image client ------------------------------------------------------------
#
# Debian has no crictl. PullImageRequest and RemoveImageRequest of runtime.v1 both hold an
# ImageSpec in field 1 whose field 1 is the image reference (and PullImageRequest an
# AuthConfig in field 2); PullImageResponse holds the
# image's id in field 1 (field numbers as containerd 1.6 registers them). That is little
# enough to encode by hand instead of generating the whole CRI API.

CRI_IMAGE_SERVICE = "/runtime.v1.ImageService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _image_spec_request(image: str, auth: tuple[str, str] | None = None) -> bytes:
    request = _string_field(1, _string_field(1, image.encode()))
    if auth is not None:
        # PullImageRequest.auth (field 2) is an AuthConfig: username 1, password 2; what a
        # Kubernetes image pull secret becomes.
        username, password = auth
        request += _string_field(
            2, _string_field(1, username.encode()) + _string_field(2, password.encode())
        )
    return request


def _first_string(message: bytes) -> str:
    if not message:
        return ""
    if message[0] != (1 << 3 | 2):
        raise ValueError(f"not a message whose field 1 is a string: {message[:16]!r}")
    length, shift, pos = 0, 0, 1
    while True:
        byte = message[pos]
        length |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return message[pos : pos + length].decode()


def cri_call(
    address: str,
    method: str,
    image: str,
    timeout: float = 120,
    *,
    auth: tuple[str, str] | None = None,
) -> str:
    """Call ImageService ``method`` (PullImage or RemoveImage) for ``image`` over CRI;
    ``auth`` (user, password) goes with a PullImage as a pull secret would."""
    with grpc.insecure_channel(f"unix://{address}") as channel:
        call = channel.unary_unary(
            CRI_IMAGE_SERVICE + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        reply: bytes = call(_image_spec_request(image, auth), timeout=timeout)
    return _first_string(reply)
