"""The VM test's snapshotter scenario, inside the guest: containerd runs an image lazily
through blockfs-snapshotter on the kernel NBD path, and survives crashes.

``/init`` starts it as ``python -m tools.vmtest.guest_snapshotter`` in a chroot of the
host's own root filesystem (shared read-only over virtio-9p), so that containerd, runc,
nbdkit, docker-registry and the project's virtualenv are exactly those ``tools/setup``
installed. Everything runs in the guest, on its loopback and unix sockets:

1. docker-registry serves the eStargz image the host pushed into its storage;
2. a private containerd with blockfs-snapshotter as its proxy plugin (the daemon, not a
   library call), attach mode ``auto``, which must pick the kernel NBD driver;
3. ``blockfs image pull`` mounts each layer as EROFS on ``/dev/nbdN``; ``ctr run`` checks
   every file's sha256 from inside a container;
4. nbdkit is killed with SIGKILL: the daemon's watchdog restarts it and reconnects every
   device; a container started meanwhile reads the right bytes, with no remount (the
   seconds from the kill to its output are printed as the recovery time);
5. the daemon and nbdkit are both killed; a new daemon adopts the mounts, starts the
   server and reconnects the devices; a container reads the right bytes again;
6. the image is removed: every layer is unmounted and its ``/dev/nbdN`` released.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from blockfs.host.mounts import MountEntry, read_mountinfo
from tools.local_containerd import (
    BlockfsContainerd,
    short_tempdir,
    start_blockfs_containerd,
    start_snapshotter,
)
from tools.local_registry import start_registry
from tools.vmtest.guest import (
    CheckFailed,
    Control,
    describe,
    drop_caches,
    io_errors,
    kernel_log,
    main,
    read_text,
    say,
)

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]
# How long a container may take, including reads that wait for the NBD server to return.
_RUN_TIMEOUT = 300.0
_RESTART_DEADLINE = 120.0
# Python, containerd and nbdkit start slowly when every instruction is emulated (TCG).
_START_TIMEOUT = 180.0


def _nbd_index(device: str) -> int:
    return int(device.removeprefix("/dev/nbd"))


def layer_mounts(stack: BlockfsContainerd) -> dict[str, MountEntry]:
    """The daemon's layer mounts now: mount point -> mount entry."""
    layers = str(stack.work / "root" / "layers")
    return {
        m.mountpoint: m
        for m in read_mountinfo()
        if m.mountpoint.startswith(layers + "/") and m.mountpoint.endswith("/mnt")
    }


def nbdkit_pid(stack: BlockfsContainerd) -> int:
    pidfile = stack.work / "root" / "run" / "nbdkit.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise CheckFailed(f"the snapshotter's NBD server has no pid file {pidfile}: {e}") from e


def kill_and_reap(pid: int, what: str) -> None:
    """SIGKILL ``pid`` and wait until it is gone (or a zombie nobody waits for)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        state = read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()[:1]
        if not state or state[0] in ("Z", "X"):  # no /proc entry, or a zombie
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} (pid {pid}) did not die after SIGKILL")
        time.sleep(0.05)


def run_and_verify(
    stack: BlockfsContainerd, ref: str, name: str, expected: dict[str, str]
) -> tuple[int, float]:
    """Run ``sha256sum`` over every expected file in a container; (files, seconds)."""
    ctd = stack.containerd
    paths = sorted(expected)
    argv = ctd.ctr_argv(
        "run", "--rm", "--snapshotter", "blockfs", ref, name,
        "/bin/busybox", "sha256sum", *("/" + p for p in paths),
    )  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        show_hang(stack)
        raise CheckFailed(f"container {name} did not finish within {_RUN_TIMEOUT:.0f} s") from e
    took = time.monotonic() - started
    if done.returncode != 0:
        say(f"blockfs-snapshotter's log ends with:\n{stack.snapshotter.log()[-3000:]}")
        raise CheckFailed(f"container {name} failed ({done.returncode}): {done.stderr.strip()}")
    seen: dict[str, str] = {}
    for line in done.stdout.splitlines():
        digest, _, path = line.partition("  ")
        seen[path.removeprefix("/")] = digest
    for path in paths:
        if seen.get(path) != expected[path]:
            raise CheckFailed(
                f"container {name}: /{path} has sha256 {seen.get(path)}, expected {expected[path]}"
            )
    return len(paths), took


def log_messages(stack: BlockfsContainerd) -> list[str]:
    """The messages of every blockfs-snapshotter log record so far (all daemons)."""
    return [str(r.get("msg", "")) for r in stack.snapshotter.log_records()]


def wait_for_message(stack: BlockfsContainerd, text: str, count: int, deadline: float) -> None:
    while sum(text in m for m in log_messages(stack)) < count:
        if time.monotonic() > deadline:
            show_hang(stack)
            raise CheckFailed(f"blockfs-snapshotter did not log {text!r} {count} times")
        time.sleep(0.2)


def show_hang(stack: BlockfsContainerd) -> None:
    """Show what a step that never finished waits on: the daemon's log, then every thread
    of the daemon and of nbdkit (SIGUSR1 makes both write their Python stacks to their
    logs) and the kernel's blocked tasks (sysrq w)."""
    say(f"blockfs-snapshotter's log, one line per record:\n{log_summary(stack)}")
    nbdkit = stack.snapshotter.root / "run" / "nbdkit.log"
    daemon_seen = len(stack.snapshotter.log())
    nbdkit_seen = len(read_text(str(nbdkit)))
    kernel_seen = len(kernel_log())
    with contextlib.suppress(OSError):
        os.kill(stack.snapshotter.process.pid, signal.SIGUSR1)
    with contextlib.suppress(OSError, CheckFailed):
        os.kill(nbdkit_pid(stack), signal.SIGUSR1)
    with contextlib.suppress(OSError), open("/proc/sysrq-trigger", "w") as sysrq:
        sysrq.write("w")
    time.sleep(2)
    say(f"blockfs-snapshotter's threads:\n{stack.snapshotter.log()[daemon_seen:]}")
    say(f"the NBD server's log since:\n{read_text(str(nbdkit))[nbdkit_seen:][-12000:]}")
    say("the kernel's blocked tasks:\n" + "\n".join(kernel_log()[kernel_seen:]))
    say("the NBD devices in the kernel:\n" + nbd_device_state())
    with contextlib.suppress(CheckFailed):
        say(f"nbdkit's sockets and threads:\n{native_state(nbdkit_pid(stack))}")


def nbd_device_state() -> str:
    """What debugfs says of each configured /dev/nbdN: the nbd driver's own entries (its
    receiving task, flags and request timeout) and blk-mq's, which show each request the
    device has started and not completed."""
    debugfs = "/sys/kernel/debug"
    if not os.path.isdir(f"{debugfs}/nbd"):
        subprocess.run(["mount", "-t", "debugfs", "debugfs", debugfs], check=False)
    try:
        names = sorted(os.listdir(f"{debugfs}/nbd"))
    except OSError:
        names = []  # no debugfs, or nbd.ko made no entries
    lines = []
    for name in names:
        for what in ("tasks", "flags", "timeout"):
            lines.append(f"{name}/{what}: {read_text(f'{debugfs}/nbd/{name}/{what}')!r}")
        lines.append(f"{name} scheduler: {read_text(f'/sys/block/{name}/queue/scheduler')}")
        # blk-mq's view: each hardware queue's state, its dispatch list and busy requests,
        # the scheduler's queues and the requeue list; where a request that was never
        # answered waits.
        top = f"{debugfs}/block/{name}"
        for root, _, files in sorted(os.walk(top)):
            for f in sorted(files):
                text = read_text(os.path.join(root, f))
                if text and not text.startswith("(") and f not in ("io_poll", "poll_stat"):
                    lines.append(f"{os.path.relpath(os.path.join(root, f), top)}: {text!r}")
    return "\n".join(lines) or "(no nbd entries in debugfs)"


def native_state(pid: int) -> str:
    """Every unix socket with its queues (``ss``: the kernel's ends of NBD connections
    belong to no process, so all are listed), and every C stack of ``pid``'s threads
    (``gdb``), for a server that answers nothing while no Python code of it runs."""
    out = []
    for argv in (
        ["ss", "-xpe"],
        ["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 30"],
    ):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            text = done.stdout + done.stderr
            if argv[0] == "gdb":
                text = _same_stacks_once(text) or text  # gdb's own words if no stacks
        except (OSError, subprocess.TimeoutExpired) as e:
            text = f"({argv[0]}: {e})"
        out.append(f"$ {' '.join(argv)}\n{text[-20000:]}")
    return "\n".join(out)


def _same_stacks_once(gdb_output: str) -> str:
    """gdb's ``thread apply all bt``, each distinct stack once with the threads that share
    it (a server of many connections has many idle workers alike)."""
    groups: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=Thread \d+ )", gdb_output):
        head, _, frames = block.partition("\n")
        if not head.startswith("Thread "):
            continue
        # Frame numbers and arguments differ between alike threads; the calls do not.
        calls = re.sub(r"\(.*?\) at ", "() at ", re.sub(r"0x[0-9a-f]+ in ", "", frames))
        groups.setdefault(calls, []).append(head.split(" (")[0])
    return "\n".join(
        f"{len(heads)} thread(s): {', '.join(heads[:40])}\n{calls}"
        for calls, heads in groups.items()
    )


def log_summary(stack: BlockfsContainerd) -> str:
    """Every record of the daemon's log, shortened to its time, message and layer (the
    whole log of a slow guest is too long to show, and its tail too short to explain)."""
    lines = []
    for r in stack.snapshotter.log_records():
        where = r.get("layer") or r.get("target") or r.get("error") or ""
        lines.append(f"{str(r.get('time', ''))[11:23]} {r.get('msg', '')} {str(where)[:80]}")
    return "\n".join(lines)


def reachable(stack: BlockfsContainerd, deadline: float) -> float:
    """Wait until containerd's calls reach the snapshotter again; the seconds it took.

    containerd's gRPC connection to a proxy snapshotter backs off after the daemon went
    away, and fails calls until its next attempt finds the new one.
    """
    started = time.monotonic()
    while True:
        listed = stack.containerd.ctr("snapshots", "--snapshotter", "blockfs", "ls", check=False)
        if listed.returncode == 0:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise CheckFailed(f"containerd cannot reach the new daemon: {listed.stderr.strip()}")
        time.sleep(0.5)


def same_mounts(before: dict[str, MountEntry], after: dict[str, MountEntry]) -> None:
    if {p: (m.mount_id, m.source) for p, m in before.items()} != {
        p: (m.mount_id, m.source) for p, m in after.items()
    }:
        raise CheckFailed(
            "the layer mounts changed: "
            + "; ".join(describe(m) for m in before.values())
            + " -> "
            + "; ".join(describe(m) for m in after.values())
        )


def run_checks(ctl: Control, config: dict[str, Any]) -> None:
    expected: dict[str, str] = config["expected"]
    registry_dir = Path(config["registry_dir"])
    with start_registry(registry_dir) as registry:
        ref = f"{registry.host}/{config['repository']}"
        say(f"registry: docker-registry on {registry.url} (in the guest), image {ref}")
        stack_dir = short_tempdir("bfs-vm-")
        with start_blockfs_containerd(stack_dir, start_timeout=_START_TIMEOUT) as stack:
            say(
                f"containerd {stack.containerd.address} with blockfs-snapshotter "
                f"(pid {stack.snapshotter.process.pid}, attach mode auto) as proxy plugin"
            )
            try:
                check_stack(stack, ref, expected, int(config["layers"]))
            finally:
                stack.containerd.ctr("images", "rm", "--sync", ref, check=False)
            released(stack)


def check_stack(stack: BlockfsContainerd, ref: str, expected: dict[str, str], layers: int) -> None:
    ctd = stack.containerd
    pull = [*BLOCKFS, "image", "pull", "--plain-http", "--address", str(ctd.address),
            "--namespace", ctd.namespace, ref]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(pull, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckFailed(f"blockfs image pull failed: {done.stderr.strip()[-2000:]}")
    say(f"blockfs image pull: {layers} layers pulled lazily in {time.monotonic() - started:.1f} s")
    # The snapshotter attaches and mounts the layers in the background once the pull has
    # indexed them (a container's Prepare would wait for them).
    wait_for_message(stack, "mounted layer", layers, time.monotonic() + 120)
    say(f"the layers were mounted {time.monotonic() - started:.1f} s after the pull began")
    if not any("attached with nbd" in m for m in log_messages(stack)):
        raise CheckFailed("blockfs-snapshotter did not choose the kernel NBD path")
    mounts = layer_mounts(stack)
    if len(mounts) != layers:
        raise CheckFailed(f"{len(mounts)} layer mounts, expected {layers}")
    for entry in mounts.values():
        if entry.fstype != "erofs" or not entry.source.startswith("/dev/nbd"):
            raise CheckFailed(f"a layer is not EROFS on /dev/nbdN: {describe(entry)}")
        sysfs = f"/sys/block/nbd{_nbd_index(entry.source)}"
        say(
            f"layer on the kernel NBD driver: {describe(entry)}; backend "
            f"{read_text(sysfs + '/backend')!r}, receive thread pid {read_text(sysfs + '/pid')}"
        )
    files, took = run_and_verify(stack, ref, "vmtest-first", expected)
    say(f"ctr run: checksums verified in a container: {files} files, {took:.1f} s")

    # -- the NBD server crashes ------------------------------------------------------
    server = nbdkit_pid(stack)
    drop_caches()
    killed = time.monotonic()
    kill_and_reap(server, "nbdkit")
    say(f"NBD server killed: SIGKILL to nbdkit pid {server}; a container reads meanwhile")
    files, took = run_and_verify(stack, ref, "vmtest-crash", expected)
    say(
        f"recovery: a new container printed its output {time.monotonic() - killed:.1f} s "
        "after kill -9 of nbdkit"
    )
    restarted = nbdkit_pid(stack)
    if restarted == server:
        raise CheckFailed("the NBD server's pid did not change after it was killed")
    wait_for_message(stack, "reconnected layer", layers, time.monotonic() + 10)
    say(
        f"watchdog: blockfs-snapshotter restarted nbdkit (pid {restarted}) and reconnected "
        f"{layers} devices; the container read {files} files with the right checksums "
        f"({took:.1f} s)"
    )
    same_mounts(mounts, layer_mounts(stack))
    say("no remount: every layer is still the same EROFS mount on the same /dev/nbdN")

    # -- the daemon and the server crash together --------------------------------------
    daemon = stack.snapshotter
    drop_caches()
    kill_and_reap(daemon.process.pid, "blockfs-snapshotter")
    daemon.process.wait()
    kill_and_reap(nbdkit_pid(stack), "nbdkit")
    say("blockfs-snapshotter and nbdkit killed together (SIGKILL)")
    before = len([m for m in log_messages(stack) if "reconnected layer" in m])
    with start_snapshotter(
        daemon.root, daemon.socket, log_path=daemon.log_path, start_timeout=_START_TIMEOUT
    ) as again:
        stack.snapshotter = again
        wait_for_message(stack, "reconnected layer", before + layers, time.monotonic() + 10)
        say(
            f"new blockfs-snapshotter (pid {again.process.pid}) adopted the mounts, started "
            f"nbdkit (pid {nbdkit_pid(stack)}) and reconnected {layers} devices"
        )
        took = reachable(stack, time.monotonic() + _RESTART_DEADLINE)
        say(f"containerd reaches the new daemon again ({took:.1f} s after it started serving)")
        files, took = run_and_verify(stack, ref, "vmtest-adopted", expected)
        say(f"ctr run after the restart: {files} files verified ({took:.1f} s)")
        same_mounts(mounts, layer_mounts(stack))
        errors = io_errors(kernel_log())
        if errors:
            raise CheckFailed("the kernel logged I/O errors: " + " | ".join(errors[:10]))
        say("kernel log: no I/O errors")
        stack.containerd.ctr("images", "rm", "--sync", ref)
        released(stack, mounts)


def released(stack: BlockfsContainerd, mounts: dict[str, MountEntry] | None = None) -> None:
    """Check that no layer is mounted and the devices of ``mounts`` are free."""
    left = layer_mounts(stack)
    if left:
        raise CheckFailed("layers still mounted: " + "; ".join(map(describe, left.values())))
    if mounts is None:
        return
    for entry in mounts.values():
        if os.path.exists(f"/sys/block/nbd{_nbd_index(entry.source)}/pid"):
            raise CheckFailed(f"{entry.source} is still connected after the image was removed")
    devices = ", ".join(sorted(m.source for m in mounts.values()))
    say(f"image removed: every layer unmounted and {devices} released")


if __name__ == "__main__":
    sys.exit(main(run_checks))
