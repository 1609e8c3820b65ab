"""The real-kernel VM test, run as part of the suite: tools/vm-test must print PASS.

It boots Debian's kernel under qemu (KVM when it works, else TCG) twice. The attach
scenario attaches the blockfs export as /dev/nbd0 with blockfs.host.attach, mounts EROFS
and an overlay, verifies file checksums and survives a restart of the NBD server. The
snapshotter scenario runs containerd with blockfs-snapshotter in the guest: an image is
pulled lazily onto /dev/nbdN devices, containers verify its files, and both the NBD
server and the daemon are killed and recovered from. Its log is shown live, so that CI
output records the guest kernel, the attaches, the mounts and the reconnects.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_TEST = REPO / "tools" / "vm-test"
# tools/vm-test gives up by itself before this (its default --timeout is 540 s, for both
# scenarios together).
TIMEOUT = 600

# What the guest must print, in this order: the attach scenario, then the snapshotter one.
GUEST_LINES = [
    r"\[guest .*\] guest kernel: Linux \S+",
    r"/dev/nbd0 attached by blockfs: blockfs\.host\.attach\.attach_and_mount, netlink "
    r"NBD_CMD_CONNECT with 1 connection\(s\), dead-connection timeout \d+ s",
    r"EROFS mounted: /dev/nbd0 on /mnt/layer type erofs \(ro",
    r"overlay mounted: overlay on /mnt/merged type overlay",
    r"checksums verified: \d+ files",
    r"reads blocked while the server is down",
    r"reconnect after restart: blockfs\.host\.attach\.reconnect gave /dev/nbd0",
    r"blocked reads resumed: \d+ files, \d+ bytes, checksums verified",
    r"no remount: still /dev/nbd0 on /mnt/layer",
    r"all \d+ files verified again after the restart",
    r"VM TEST: PASS",
    r"\[guest .*\] guest kernel: Linux \S+",
    r"containerd \S+ with blockfs-snapshotter \(pid \d+, attach mode auto\)",
    r"blockfs image pull: 2 layers pulled lazily",
    r"the layers were mounted [\d.]+ s after the pull began",
    r"layer on the kernel NBD driver: /dev/nbd\d+ on \S+/mnt type erofs \(ro",
    r"ctr run: checksums verified in a container: \d+ files",
    r"NBD server killed: SIGKILL to nbdkit",
    r"watchdog: blockfs-snapshotter restarted nbdkit \(pid \d+\) and reconnected 2 devices",
    r"no remount: every layer is still the same EROFS mount",
    r"blockfs-snapshotter and nbdkit killed together",
    r"new blockfs-snapshotter \(pid \d+\) adopted the mounts, started nbdkit \(pid \d+\) "
    r"and reconnected 2 devices",
    r"containerd reaches the new daemon again",
    r"ctr run after the restart: \d+ files verified",
    r"image removed: every layer unmounted and /dev/nbd\d+, /dev/nbd\d+ released",
    r"VM TEST: PASS",
]
# What the host must print (its lines interleave with the guest's console).
HOST_LINES = [
    r"\[host .*\] NBD server started: nbdkit pid \d+",
    r"\[host .*\] NBD server stopped",
    r"\[host .*\] NBD server restarted: nbdkit pid \d+",
    r"\[host .*\] scenario attach: PASS",
    r"\[host .*\] image: 2 layers converted to eStargz and pushed",
    r"\[host .*\] scenario snapshotter: PASS",
    r"\[host .*\] VM TEST: PASS",
]


def _stop_leftover_server(work: Path) -> None:
    """Kill the NBD server of this run if the harness died without stopping it.

    nbdkit runs in its own session (it must outlive whatever starts it), so killing the
    harness's process group does not reach it; its pid file does.
    """
    pidfile = work / "attach" / "run" / "nbdkit.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"nbdkit" in cmdline and os.fsencode(str(work)) in cmdline:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.root
@pytest.mark.slow
def test_vm_kernel_nbd_attach_and_snapshotter_survive_server_and_daemon_crashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    lines: list[str] = []
    # Its own process group, with qemu in it: killing the group on a timeout takes both.
    proc = subprocess.Popen(
        [str(VM_TEST), "--work-dir", str(work)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    with capsys.disabled():
        print(f"\n--- {VM_TEST.relative_to(REPO)} ---", flush=True)

        def show() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                print(line, end="", flush=True)

        reader = threading.Thread(target=show, daemon=True)
        reader.start()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the harness stop qemu and the server; SIGKILL if it does not.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"tools/vm-test did not finish within {TIMEOUT} s")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the run still alive
            _stop_leftover_server(work)
            reader.join(10)
            print(f"--- end of {VM_TEST.relative_to(REPO)} ---", flush=True)

    log = "\n".join(lines)
    assert proc.returncode == 0, f"tools/vm-test failed (exit {proc.returncode})"
    position = 0
    for pattern in GUEST_LINES:
        match = re.compile(pattern).search(log, position)
        assert match is not None, f"the VM test log lacks /{pattern}/ (after offset {position})"
        position = match.end()
    for pattern in HOST_LINES:
        assert re.search(pattern, log) is not None, f"the VM test log lacks /{pattern}/"
