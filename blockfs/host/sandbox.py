"""Run one command in an image's root filesystem, isolated, without a container runtime.

Used to profile a workload (``blockfs image optimize``): the root is a writable
``blockfs image mount`` of the image, and the command is what the image config says to
run. :func:`run_sandboxed` starts this module as a supervisor process (``python -m
blockfs.host.sandbox RESULT SPEC``), which

- unshares the PID, network, IPC and UTS namespaces;
- forks the workload's process, PID 1 of the new PID namespace (killed if the
  supervisor dies), which unshares a mount namespace of its own and makes every mount
  in it private, so that nothing mounted inside reaches the host, mounts a fresh
  ``/proc`` and a minimal ``/dev`` (a tmpfs with
  null, zero, full, random, urandom, tty, the ``fd`` links and ``shm``) inside the root,
  makes the root its ``/`` with ``pivot_root`` and detaches the host's tree, resolves the
  user from the image's own ``/etc/passwd`` and ``/etc/group`` (as runc does), changes to
  the working directory and executes the command with exactly the environment given;
- waits for it and writes ``{"error", "exit_code", "signal"}`` to RESULT as JSON.

The network namespace has only its loopback interface, down: the workload has no network.
When the workload's PID 1 exits or is killed, the kernel kills every other process of its
namespace before the supervisor's wait returns, so once the supervisor has exited nothing
of the workload runs and its mount namespace (and with it its references to the image's
mounts) is gone. SIGTERM to the supervisor kills the workload that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import attrs

from blockfs.errors import BlockfsError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
# pivot_root(2) has no glibc wrapper: its system call number by machine.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# /dev of the sandbox: character devices by name, (major, minor), as in an OCI runtime.
_DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
# How long the supervisor may take to stop once asked, before it is killed outright.
_STOP_TIMEOUT = 10.0


class SandboxError(BlockfsError):
    """The sandbox could not be set up, or the command could not be started in it."""


def _words(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


@attrs.frozen
class SandboxSpec:
    """What to run and where: ``root`` (a mount point: it becomes ``/``), the command
    ``argv`` (looked up in ``env``'s PATH), ``env`` (``K=V``, exactly the environment),
    ``cwd`` (created if missing) and ``user`` as an image config says it (``""`` for root,
    ``uid``, ``uid:gid``, ``name`` or ``name:group``)."""

    root: str
    argv: tuple[str, ...] = attrs.field(converter=_words)
    env: tuple[str, ...] = attrs.field(converter=_words, default=())
    cwd: str = "/"
    user: str = ""
    hostname: str = "blockfs-sandbox"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxSpec:
        return cls(**data)


@attrs.frozen
class SandboxResult:
    """How the command ended: ``exit_code``, or the ``signal`` that killed it (SIGKILL when
    it ran out of time: ``timed_out``)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    seconds: float

    def describe(self) -> str:
        """``exited with status 3``, ``still running after 2 s: killed``, …"""
        if self.timed_out:
            return f"still running after {self.seconds:.0f} s: killed"
        if self.exit_code is not None:
            return f"exited with status {self.exit_code}"
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        return f"killed by {name}"


def run_sandboxed(
    spec: SandboxSpec,
    *,
    timeout: float,
    result_dir: str,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> SandboxResult:
    """Run ``spec`` in the sandbox until it exits or ``timeout`` seconds have passed (then
    it is killed, with every process it started). Returns once none of them is left.

    Raises SandboxError if the command could not be started (not found, a bad user, a
    root that is not a mount point). ``result_dir`` holds the supervisor's result file.
    """
    result_path = os.path.join(result_dir, "sandbox-result.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result_path)
    command = [sys.executable, "-m", __name__, result_path, json.dumps(spec.to_json())]
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
    )
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Its workload dies with it (parent-death signal); kill the whole group anyway.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    seconds = time.monotonic() - started
    try:
        with open(result_path, encoding="utf-8") as f:
            outcome = json.load(f)
    except (FileNotFoundError, ValueError):
        raise SandboxError(
            f"the sandbox supervisor ended without a result (status {proc.returncode})"
        ) from None
    if outcome.get("error"):
        raise SandboxError(str(outcome["error"]))
    return SandboxResult(
        exit_code=None if timed_out else outcome.get("exit_code"),
        signal=outcome.get("signal"),
        timed_out=timed_out,
        seconds=timeout if timed_out else seconds,
    )


# -- the supervisor and the workload's PID 1 (run as python -m blockfs.host.sandbox) -------

_LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _LIBC.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or source} on {target}",
    )


def _pivot_root(root: str) -> None:
    """Make ``root`` (a mount point) this mount namespace's ``/`` and detach the old one."""
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    os.chdir(root)
    if number is None:  # an unknown machine: a chroot, without detaching the host's tree
        os.chroot(".")
    else:
        # pivot_root(".", "."): the old root ends up on top of the new one, where it is
        # detached (the way runc does it, with no directory for the old root needed).
        _check(_LIBC.syscall(number, b".", b"."), f"pivot_root to {root}")
        _check(_LIBC.umount2(b".", MNT_DETACH), "detaching the host's root")
    os.chdir("/")


def _prepare_root(root: str) -> None:
    """A fresh /proc and a minimal /dev inside ``root``."""
    proc = os.path.join(root, "proc")
    os.makedirs(proc, exist_ok=True)
    _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name, (major, minor) in _DEVICES.items():
        os.mknod(os.path.join(dev, name), stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(os.path.join(dev, name), 0o666)  # whatever the umask
    for name, target in _DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)


def _table(path: str) -> list[list[str]]:
    """The colon-separated lines of ``path`` (/etc/passwd, /etc/group); none if missing."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def resolve_user(
    user: str, passwd: list[list[str]], group: list[list[str]]
) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) for an image config ``User``, from the image's
    own passwd and group tables, as runc resolves it."""
    name, _, group_name = user.partition(":")
    uid, gid, home, login = 0, 0, "/", ""
    entry = None
    if name:
        entry = next((e for e in passwd if len(e) >= 7 and e[0] == name), None)
        if entry is None and name.isdigit():
            entry = next((e for e in passwd if len(e) >= 7 and e[2] == name), None)
        if entry is None and not name.isdigit():
            raise SandboxError(f"user {name!r} is not in the image's /etc/passwd")
    else:
        entry = next((e for e in passwd if len(e) >= 7 and e[2] == "0"), None)
    if entry is not None:
        login, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
    else:
        uid = int(name)
    if group_name:
        found = next((g for g in group if len(g) >= 3 and group_name in (g[0], g[2])), None)
        if found is not None:
            gid = int(found[2])
        elif group_name.isdigit():
            gid = int(group_name)
        else:
            raise SandboxError(f"group {group_name!r} is not in the image's /etc/group")
    extra = sorted(
        {int(g[2]) for g in group if len(g) >= 4 and login and login in g[3].split(",")} - {gid}
    )
    return uid, gid, extra, home


def _start_workload(spec: SandboxSpec, errors: int) -> None:
    """PID 1 of the new namespace: set up, then exec the command (never returns)."""
    try:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # A mount namespace of its own: pivot_root moves the root of every process of
        # the namespace it is done in, and the supervisor must keep the host's.
        _check(_LIBC.unshare(CLONE_NEWNS), "unshare")
        _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        _prepare_root(spec.root)
        _pivot_root(spec.root)
        uid, gid, groups, home = resolve_user(
            spec.user, _table("/etc/passwd"), _table("/etc/group")
        )
        env = dict(item.partition("=")[::2] for item in spec.env)
        env.setdefault("PATH", _DEFAULT_PATH)
        env.setdefault("HOME", home)
        env.setdefault("HOSTNAME", spec.hostname)
        os.makedirs(spec.cwd, exist_ok=True)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        os.chdir(spec.cwd)
        if not spec.argv:
            raise SandboxError("no command to run: the image has no Entrypoint or Cmd")
        try:
            os.execvpe(spec.argv[0], list(spec.argv), env)
        except OSError as e:
            raise SandboxError(
                f"cannot run {spec.argv[0]!r} in the image: {e.strerror} "
                f"(PATH {env['PATH']}, working directory {spec.cwd})"
            ) from None
    except BaseException as e:
        text = e.message if isinstance(e, SandboxError) else f"cannot set up the sandbox: {e}"
        with contextlib.suppress(OSError):
            os.write(errors, text.encode(errors="replace"))
        os._exit(127)


def _supervise(result_path: str, spec: SandboxSpec) -> int:
    _check(_LIBC.unshare(CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    hostname = spec.hostname.encode()
    _check(_LIBC.sethostname(hostname, len(hostname)), "sethostname")
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _start_workload(spec, write_end)
    os.close(write_end)

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    error = b""
    while piece := os.read(read_end, 4096):  # empty once the command is executing
        error += piece
    _, status = os.waitpid(pid, 0)
    outcome: dict[str, Any] = {"error": error.decode(errors="replace") or None}
    if os.WIFEXITED(status):
        outcome["exit_code"] = os.WEXITSTATUS(status)
    else:
        outcome["signal"] = os.WTERMSIG(status)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(outcome, f)
    os.replace(tmp, result_path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m blockfs.host.sandbox RESULT SPEC_JSON", file=sys.stderr)
        return 2
    result_path, spec = args
    try:
        return _supervise(result_path, SandboxSpec.from_json(json.loads(spec)))
    except OSError as e:
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump({"error": f"cannot set up the sandbox: {e}"}, f)
        return 1


if __name__ == "__main__":
    sys.exit(main())
