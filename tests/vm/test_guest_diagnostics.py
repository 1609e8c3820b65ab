"""What the VM test's guest shows when a step hangs: C stacks of a stuck server, grouped.

The grouping is checked on a sample of gdb's output, and gdb itself on a real process of
this host (the guest runs the host's own gdb).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tools.vmtest.guest_snapshotter import _same_stacks_once, native_state

# gdb's `thread apply all bt` of three threads: two alike but for addresses and
# arguments, one elsewhere.
SAMPLE = """\
Thread 3 (Thread 0x7fe4207f86c0 (LWP 218) "nbdkit"):
#0  futex_wait (private=0, expected=2, futex_word=0x7fe430124448) at futex-internal.h:146
#1  0x00007fe437ad3482 in ___pthread_mutex_lock (mutex=0x7fe430124448) at pthread_mutex_lock.c:93
#2  0x0000558c0acb472c in ?? ()

Thread 2 (Thread 0x7fe420ff96c0 (LWP 217) "nbdkit"):
#0  futex_wait (private=0, expected=2, futex_word=0x7fe430125548) at futex-internal.h:146
#1  0x00007fe437ad3482 in ___pthread_mutex_lock (mutex=0x7fe430125548) at pthread_mutex_lock.c:93
#2  0x0000558c0acb472c in ?? ()

Thread 1 (Thread 0x7fe437553e80 (LWP 169) "nbdkit"):
#0  0x00007fe437b4326f in __GI___poll (fds=0x558c42d8ac40, nfds=2, timeout=-1) at poll.c:29
#1  0x0000558c0acba5cc in ?? ()
"""


def test_alike_threads_are_shown_once_with_their_numbers() -> None:
    shown = _same_stacks_once(SAMPLE)

    assert shown.count("futex_wait") == 1
    assert shown.count("__GI___poll") == 1
    assert "2 thread(s): Thread 3, Thread 2\n" in shown
    assert "1 thread(s): Thread 1\n" in shown
    assert "0x7fe430124448" not in shown  # arguments differ between alike threads


def test_output_without_stacks_groups_nothing() -> None:
    assert _same_stacks_once("ptrace: Operation not permitted.\n") == ""


@pytest.mark.root
@pytest.mark.skipif(shutil.which("gdb") is None, reason="tools/setup installs gdb")
def test_a_real_process_shows_its_stack_and_gdb_errors_show_as_they_are() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        shown = native_state(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "$ ss -xpe" in shown
    assert "1 thread(s): Thread 1" in shown
    assert "nanosleep" in shown

    # A process that is gone: gdb's own message, not an empty section.
    gone = native_state(sleeper.pid)
    gdb_said = gone.split("$ gdb", 1)[1].split("\n", 1)[1]  # after its command line
    assert "No such process" in gdb_said and "thread(s)" not in gdb_said
