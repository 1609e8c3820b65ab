"""Running the guest under qemu-system-x86_64: accelerator choice, devices, process.

The guest has no network device at all. Its only channels to the host are virtio-serial
ports: one per NBD connection, each a qemu ``socket`` chardev connected to the host's
NBD server socket (``reconnect=1`` makes qemu reconnect after the server restarts), and
one control port connected to the test harness; and, for the snapshotter scenario,
directories shared with virtio-9p. The serial console is qemu's stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs

from tools.vmtest import _wire
from tools.vmtest._errors import VMTestError

Accel = Literal["kvm", "tcg"]

# linux/kvm.h: KVM_GET_API_VERSION = _IO(KVMIO=0xAE, 0x00); the API version is 12.
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
_PR_SET_PDEATHSIG = 1
_KVM_PROBE_TIMEOUT = 10.0

KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off nokaslr"


def kvm_usable() -> tuple[bool, str]:
    """Whether /dev/kvm can run a guest here, and why not when it cannot."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"/dev/kvm does not answer: {e.strerror}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return False, f"/dev/kvm speaks API version {version}, not {_KVM_API_VERSION}"
    return True, "/dev/kvm works"


def kvm_boots(kernel: Path, timeout: float = _KVM_PROBE_TIMEOUT) -> bool:
    """Whether ``kernel`` starts under KVM: its first log line appears within ``timeout``.

    An openable /dev/kvm is not enough: under some nested hypervisors KVM accepts a
    guest but runs it so slowly that the kernel's decompressor alone takes minutes.
    """
    argv = [
        qemu_binary(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "256", "-kernel", str(kernel),
        "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1", "-serial", "stdio",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # only a prctl: safe between fork and exec
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    return False
                seen = (seen + data)[-4096:]
                if b"Linux version" in seen:
                    return True
        return False
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _probe_key(kernel: Path) -> str:
    qemu = os.stat(qemu_binary())
    host = os.uname()
    return f"{host.release} {host.version} | qemu {qemu.st_size} {qemu.st_mtime_ns} | {kernel}"


def kvm_boots_cached(kernel: Path, cache: Path) -> bool:
    """:func:`kvm_boots`, remembered for this host kernel, qemu and guest kernel."""
    record = cache / "kvm-probe.json"
    key = _probe_key(kernel)
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(record.read_text())
        if data.get("key") == key:
            return bool(data["boots"])
    boots = kvm_boots(kernel)
    cache.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "boots": boots}) + "\n")
    return boots


def choose_accel(requested: str, kernel: Path, cache: Path) -> tuple[Accel, str]:
    """``auto`` -> KVM when it boots ``kernel``, else TCG; ``kvm``/``tcg`` as asked."""
    if requested == "tcg":
        return "tcg", "TCG (forced)"
    if requested not in ("auto", "kvm"):
        raise VMTestError(f"unknown accelerator {requested!r}: use auto, kvm or tcg")
    usable, why = kvm_usable()
    if usable and not kvm_boots_cached(kernel, cache):
        usable, why = False, f"a kernel did not start under KVM within {_KVM_PROBE_TIMEOUT:.0f} s"
    if requested == "kvm":
        if not usable:
            raise VMTestError(f"KVM was requested but {why}")
        return "kvm", "KVM (forced)"
    return ("kvm", "KVM") if usable else ("tcg", f"TCG, because {why}")


@attrs.frozen
class Share:
    """A host directory the guest mounts with virtio-9p as ``mount -t 9p TAG``."""

    tag: str
    path: Path
    readonly: bool


@attrs.frozen
class MachineConfig:
    """Everything qemu needs to boot the guest."""

    kernel: Path
    initrd: Path
    accel: Accel
    control_socket: Path  # the harness listens here
    nbd_socket: Path | None = None  # the host NBD server's unix socket, if the guest uses it
    nbd_ports: int = 0  # how many NBD connections the guest can have at once
    shares: tuple[Share, ...] = ()
    append: str = ""  # added to the kernel command line
    memory_mib: int = 1024
    cpus: int = 2


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise VMTestError("qemu-system-x86_64 not found: install qemu-system-x86 (tools/setup)")
    return path


def command(config: MachineConfig) -> list[str]:
    """The qemu command line."""
    argv = [
        qemu_binary(),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-machine", f"pc,accel={config.accel}",
        "-cpu", "host" if config.accel == "kvm" else "max",
        "-smp", str(config.cpus),
        "-m", str(config.memory_mib),
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", f"{KERNEL_CMDLINE} {config.append}".strip(),
        "-serial", "stdio",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=ctl,path={config.control_socket}",
        "-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={_wire.CONTROL_PORT}",
    ]  # fmt: skip
    for share in config.shares:
        # security_model=none: the guest's root acts with qemu's own rights on the files.
        readonly = ",readonly=on" if share.readonly else ""
        argv += [
            "-fsdev",
            f"local,id={share.tag},path={share.path},security_model=none,multidevs=remap{readonly}",
            "-device", f"virtio-9p-pci,fsdev={share.tag},mount_tag={share.tag}",
        ]  # fmt: skip
    if config.nbd_ports and config.nbd_socket is None:
        raise VMTestError("NBD ports need the NBD server's socket")
    for i in range(config.nbd_ports):
        argv += [
            "-chardev", f"socket,id=nbd{i},path={config.nbd_socket},reconnect=1",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=nbd{i},name={_wire.NBD_PORT_PREFIX}{i}",
        ]  # fmt: skip
    return argv


def _die_with_parent() -> None:
    # qemu must not outlive the harness, whatever kills the harness.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Machine:
    """A running qemu; stdout (the guest console) is a pipe to read lines from."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # only a prctl: safe between fork and exec
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """Kill qemu if it still runs and reap it; its exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        return self.proc.returncode
