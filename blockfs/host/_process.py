"""The processes blockfs starts detached (nbdkit, the shell that supervises it, nbdfuse):
they are never our children, so they are known by a pid and a string that their command
line holds (pids get reused), and waited for by watching /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import time

_POLL = 0.01


# PF_KTHREAD in the flags of /proc/PID/stat: a kernel thread, whose command line is empty.
_PF_KTHREAD = 0x00200000


def running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line holds ``marker``.

    A zombie has exited: whoever its parent is will reap it. A command line that reads
    empty is not taken for another process: execve installs the new program's memory
    before its arguments (and exit frees it before the zombie), so a process we just
    started reads empty for a moment while it execs, and is still ours.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        state, flags = fields[0], int(fields[6])
    except (OSError, IndexError, ValueError):
        return False
    if state in (b"Z", b"X"):
        return False
    if not cmdline:
        return not flags & _PF_KTHREAD
    return os.fsencode(marker) in cmdline


def wait_exit(pid: int, marker: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while running(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def end(pid: int, marker: str, signals: tuple[signal.Signals | None, ...], timeout: float) -> bool:
    """Send ``pid`` each of ``signals`` in turn (None: none, only wait) until it has
    exited, waiting up to ``timeout`` after each; whether it exited."""
    for sig in signals:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_exit(pid, marker, timeout):
            return True
    return False
