"""The warm-ups of the long-running processes: a daemon's first pull loads no client code
of its own, and what they loaded stays out of the garbage collector's full passes."""

from __future__ import annotations

import subprocess
import sys


def test_after_the_warm_up_a_client_and_its_first_call_load_no_module(tmp_path) -> None:
    # In a fresh interpreter, as the daemon starts; the call fails (no containerd there),
    # which goes through the same channel code as one that succeeds.
    probe = (
        "import sys\n"
        "from snapshotter import ctrclient\n"
        "ctrclient.warm_up()\n"
        "before = set(sys.modules)\n"
        f"client = ctrclient.ContainerdClient({str(tmp_path / 'none.sock')!r}, 'default', timeout=5)\n"
        "try:\n"
        "    client.snapshot_labels('blockfs', 'key')\n"
        "except ctrclient.ContainerdError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('the call to no containerd succeeded')\n"
        "client.close()\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []


def test_the_warm_ups_keep_what_was_loaded_out_of_the_collectors_full_passes() -> None:
    # A full pass walks every object the process has: 20 to 30 ms with every thread
    # stopped in the daemon after its start, in the middle of a pull.
    for warm_up in ("snapshotter.daemon:_warm_up", "blockfs.image._server:_warm_up"):
        module, name = warm_up.split(":")
        probe = (
            "import gc, importlib\n"
            f"warm_up = getattr(importlib.import_module({module!r}), {name!r})\n"
            "before = len(gc.get_objects())\n"
            "warm_up()\n"
            "print(gc.get_freeze_count(), before)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        frozen, before = map(int, done.stdout.split())
        assert frozen >= before, warm_up
