"""The VM test inside the guest: attach, mount, verify, survive a server restart, detach.

Started by the initramfs's /init as ``python3 -m tools.vmtest.guest`` once the kernel
modules are loaded. It asks the host for its configuration over the control port, then
uses blockfs's own attach code (``blockfs.host.attach``) with its production defaults,
exactly as the snapshotter does on a host with nbd.ko. Everything it checks is printed
on the console; the last line is ``VM TEST: PASS`` or ``VM TEST: FAIL``, and the same
verdict goes to the host as a ``result`` message.

Runs in the guest: the standard library, attrs and the modules of blockfs that
blockfs.host.attach imports are all it has.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from blockfs.host import attach, mounts
from tools.vmtest import _wire
from tools.vmtest._relay import Relay, find_ports

RELAY_SOCKET = "/run/blockfs/nbd.sock"
STATE_DIR = "/run/blockfs/attachment"
LAYER_MOUNT = "/mnt/layer"
MERGED = "/mnt/merged"
OVERLAY_DIR = "/run/overlay"  # tmpfs: upper and work directories

# How long reads must stay pending while the server is down to count as blocked (not
# failed): well past the time an I/O error would take to come back.
_BLOCKED_FOR = 5.0
_RECONNECT_DEADLINE = 120.0
_RESUME_DEADLINE = 300.0


class CheckFailed(Exception):
    """One of the test's checks failed; the message says which and how."""


def say(message: str) -> None:
    print(f"[guest {time.monotonic():7.1f}] {message}", flush=True)


class Control:
    """The control port: JSON lines to and from the host."""

    def __init__(self, device: str) -> None:
        self._fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        self._reader = _wire.LineReader()
        self._pending: list[bytes] = []

    def send(self, kind: str, **fields: Any) -> None:
        data = _wire.encode(kind, **fields)
        while data:
            data = data[os.write(self._fd, data) :]

    def expect(self, kind: str) -> dict[str, Any]:
        """Wait for the host's next message, which must be of ``kind``."""
        while not self._pending:
            data = os.read(self._fd, 65536)
            if not data:
                time.sleep(0.1)  # the host side is not connected (yet)
                continue
            self._pending += self._reader.feed(data)
        message = _wire.decode(self._pending.pop(0))
        if message["kind"] != kind:
            raise CheckFailed(f"expected {kind!r} from the host, got {message!r}")
        return message


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(root: str, expected: dict[str, str], paths: Iterable[str]) -> int:
    """Check the sha256 of each of ``paths`` under ``root``; returns the bytes read."""
    total = 0
    for path in paths:
        full = os.path.join(root, path)
        digest = sha256_of(full)
        if digest != expected[path]:
            raise CheckFailed(f"{full}: sha256 {digest}, expected {expected[path]}")
        total += os.path.getsize(full)
    return total


def drop_caches() -> None:
    """Forget cached file and block data, so that the next reads go to the NBD server."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError as e:
        return f"({e.strerror})"


def mount_entry(path: str) -> mounts.MountEntry:
    entry = mounts.find_mount(path)
    if entry is None:
        raise CheckFailed(f"nothing is mounted on {path}")
    return entry


def describe(entry: mounts.MountEntry) -> str:
    return (
        f"{entry.source} on {entry.mountpoint} type {entry.fstype} "
        f"({','.join(entry.mount_options)}) [mount id {entry.mount_id}]"
    )


class Reader(threading.Thread):
    """Reads and checks files in the background, to see reads block while the server is down."""

    def __init__(self, root: str, expected: dict[str, str], paths: list[str]) -> None:
        super().__init__(name="blocked-reader", daemon=True)
        self.root = root
        self.expected = expected
        self.paths = paths
        self.done: list[str] = []
        self.error: BaseException | None = None
        self.bytes_read = 0

    def run(self) -> None:
        try:
            for path in self.paths:
                self.bytes_read += verify(self.root, self.expected, [path])
                self.done.append(path)
        except BaseException as e:
            self.error = e


def kernel_log() -> list[str]:
    """The kernel's log lines so far (from /dev/kmsg)."""
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        while True:
            try:
                record = os.read(fd, 8192)  # one record per read
            except BlockingIOError:
                break  # no more records
            except BrokenPipeError:
                continue  # records were overwritten while reading; skip ahead
            if not record:
                break
            # "prefix;message\n KEY=value\n…": keep the message, not the dictionary lines.
            message = record.decode(errors="replace").split(";", 1)[-1]
            lines.append(message.split("\n", 1)[0].strip())
    finally:
        os.close(fd)
    return lines


def io_errors(lines: Iterable[str]) -> list[str]:
    """Kernel log lines that mean a read failed."""
    return [line for line in lines if "I/O error" in line or "error -5" in line]


def run_checks(ctl: Control, relay: Relay, config: dict[str, Any]) -> None:
    export: str = config["export"]
    expected: dict[str, str] = config["expected"]
    blocked_paths: list[str] = config["read_while_down"]
    whiteouts: list[str] = config["whiteouts"]
    first_paths = [p for p in sorted(expected) if p not in blocked_paths]

    mode = attach.choose_mode(attach.AUTO)
    say(f"attach mode chosen by blockfs.host.attach.choose_mode(AUTO): {mode.value}")
    if mode is not attach.AttachMode.KERNEL_NBD:
        raise CheckFailed(f"expected the kernel NBD path here, got {mode.value}")

    os.makedirs(LAYER_MOUNT, exist_ok=True)
    att = attach.attach_and_mount(RELAY_SOCKET, export, LAYER_MOUNT, state_dir=STATE_DIR, mode=mode)
    say(
        f"{att.device} attached by blockfs: blockfs.host.attach.attach_and_mount, netlink "
        f"NBD_CMD_CONNECT with {att.connections} connection(s), dead-connection timeout "
        f"{attach.DEFAULT_DEAD_CONN_TIMEOUT} s, request timeout {attach.DEFAULT_REQUEST_TIMEOUT} s"
    )
    if att.device != "/dev/nbd0":
        raise CheckFailed(f"expected /dev/nbd0, the attach code configured {att.device}")
    sysfs = "/sys/block/nbd0"
    say(
        f"/dev/nbd0: backend {read_text(sysfs + '/backend')!r}, "
        f"{int(read_text(sysfs + '/size')) * 512} bytes, "
        f"kernel receive thread pid {read_text(sysfs + '/pid')}"
    )
    layer = mount_entry(LAYER_MOUNT)
    if layer.fstype != "erofs" or layer.source != "/dev/nbd0" or not layer.read_only:
        raise CheckFailed(f"unexpected layer mount: {describe(layer)}")
    say(f"EROFS mounted: {describe(layer)}")

    for sub in ("upper", "work"):
        os.makedirs(os.path.join(OVERLAY_DIR, sub), exist_ok=True)
    os.makedirs(MERGED, exist_ok=True)
    mounts.mount(
        "overlay",
        MERGED,
        "overlay",
        0,
        f"lowerdir={LAYER_MOUNT},upperdir={OVERLAY_DIR}/upper,workdir={OVERLAY_DIR}/work",
    )
    say(f"overlay mounted: {describe(mount_entry(MERGED))}")

    total = verify(MERGED, expected, first_paths)
    say(f"checksums verified: {len(first_paths)} files, {total} bytes read through the overlay")
    for path in whiteouts:
        st = os.lstat(os.path.join(LAYER_MOUNT, path))
        if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            raise CheckFailed(f"{path} in the layer is not a 0/0 whiteout device")
        if os.path.lexists(os.path.join(MERGED, path)):
            raise CheckFailed(f"{path} is whited out in the layer but visible in the overlay")
    say(f"whiteouts hidden by the overlay: {', '.join(whiteouts) or 'none in this layer'}")
    with open(os.path.join(MERGED, "written-in-guest"), "w", encoding="utf-8") as f:
        f.write("upper\n")
    if not os.path.exists(os.path.join(OVERLAY_DIR, "upper", "written-in-guest")):
        raise CheckFailed("a file written to the overlay did not land in the upper directory")
    say("overlay upper directory takes writes; the EROFS lower stays read-only")

    # -- the server goes away ---------------------------------------------------------
    drop_caches()
    ctl.send("stop-server")
    ctl.expect("server-stopped")
    if not relay.wait_idle(60):
        raise CheckFailed("the NBD connections did not close after the server stopped")
    say(f"server stopped: every NBD connection of /dev/nbd0 is closed; reading {blocked_paths}")
    time.sleep(1)  # let the kernel's receive threads mark the connections dead
    reader = Reader(MERGED, expected, blocked_paths)
    reader.start()
    reader.join(_BLOCKED_FOR)
    if reader.error is not None:
        raise CheckFailed(f"a read failed while the server was down: {reader.error!r}")
    if not reader.is_alive():
        raise CheckFailed("reads completed while the server was down: they were not blocked")
    task = f"/proc/self/task/{reader.native_id}"
    say(
        f"reads blocked while the server is down: {len(reader.done)} of {len(blocked_paths)} "
        f"files done after {_BLOCKED_FOR:.0f} s; the reading thread waits in the kernel "
        f"({read_text(task + '/stat').rsplit(')', 1)[-1].split()[0]} state, "
        f"in {read_text(task + '/wchan')})"
    )
    ctl.send("start-server")
    ctl.expect("server-started")

    deadline = time.monotonic() + _RECONNECT_DEADLINE
    attempt = 0
    while True:
        attempt += 1
        try:
            att = attach.reconnect(att, RELAY_SOCKET)
            break
        except attach.AttachError as e:
            if time.monotonic() > deadline:
                raise CheckFailed(f"reconnect failed for {_RECONNECT_DEADLINE:.0f} s: {e}") from e
            say(f"reconnect attempt {attempt} failed ({e}); retrying")
            time.sleep(1)
    say(
        f"reconnect after restart: blockfs.host.attach.reconnect gave {att.device} "
        f"{att.connections} fresh connections with NBD_CMD_RECONFIGURE (attempt {attempt})"
    )
    reader.join(_RESUME_DEADLINE)
    if reader.is_alive():
        raise CheckFailed(f"reads still blocked {_RESUME_DEADLINE:.0f} s after the reconnect")
    if reader.error is not None:
        raise CheckFailed(f"a blocked read failed after the reconnect: {reader.error!r}")
    say(
        f"blocked reads resumed: {len(reader.done)} files, {reader.bytes_read} bytes, "
        "checksums verified"
    )
    after = mount_entry(LAYER_MOUNT)
    if after.mount_id != layer.mount_id or after.source != "/dev/nbd0":
        raise CheckFailed(f"the layer mount changed: {describe(layer)} -> {describe(after)}")
    say(f"no remount: still {describe(after)}")
    drop_caches()
    total = verify(MERGED, expected, sorted(expected))
    say(f"all {len(expected)} files verified again after the restart ({total} bytes)")
    log = kernel_log()
    for line in log:
        if "nbd" in line:
            say(f"kernel: {line}")
    errors = io_errors(log)
    if errors:
        raise CheckFailed("the kernel logged I/O errors: " + " | ".join(errors[:10]))
    say("kernel log: no I/O errors")

    mounts.umount(MERGED)
    attach.unmount_and_detach(att)
    if os.path.exists(sysfs + "/pid"):
        raise CheckFailed("/dev/nbd0 is still configured after unmount_and_detach")
    say("unmounted and detached /dev/nbd0")


def wait_for_ports(prefix: str, count: int, timeout: float = 60.0) -> list[str]:
    """The /dev nodes of ``count`` virtio-serial ports named ``prefix``…, once they exist.

    virtio_console finds its ports after the module is loaded, and devtmpfs creates their
    nodes a moment later.
    """
    deadline = time.monotonic() + timeout
    while True:
        devices = [dev for _, dev in find_ports(prefix) if os.path.exists(dev)]
        if len(devices) >= count:
            return devices
        if time.monotonic() > deadline:
            raise CheckFailed(f"found {len(devices)} of {count} virtio-serial ports {prefix}*")
        time.sleep(0.1)


def run_attach_scenario(ctl: Control, config: dict[str, Any]) -> None:
    """The attach scenario: blockfs's attach code against the host's NBD server."""
    nbd_ports = wait_for_ports(_wire.NBD_PORT_PREFIX, int(config["nbd_ports"]))
    os.makedirs(os.path.dirname(RELAY_SOCKET), exist_ok=True)
    relay = Relay(RELAY_SOCKET, nbd_ports)
    relay.start()
    try:
        say(f"relay: {RELAY_SOCKET} -> {len(nbd_ports)} virtio-serial ports to the host server")
        run_checks(ctl, relay, config)
    finally:
        relay.stop()


def main(scenario: Callable[[Control, dict[str, Any]], None] = run_attach_scenario) -> int:
    """Greet the host, run ``scenario`` with its configuration, report the verdict."""
    release = os.uname().release
    say(f"guest kernel: Linux {release} ({os.uname().version})")
    ctl: Control | None = None
    try:
        ctl = Control(wait_for_ports(_wire.CONTROL_PORT, 1)[0])
        ctl.send("hello", kernel=release)
        scenario(ctl, ctl.expect("config"))
        verdict, reason = True, ""
    except CheckFailed as e:
        verdict, reason = False, str(e)
    except BaseException as e:
        traceback.print_exc(file=sys.stdout)
        verdict, reason = False, f"{type(e).__name__}: {e}"
    if verdict:
        say(_wire.PASS_LINE)
    else:
        say(f"{_wire.FAIL_LINE}: {reason}")
    if ctl is not None:
        try:
            ctl.send("result", passed=verdict, reason=reason)
        except OSError as e:
            say(f"cannot report the result to the host: {e}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
