"""snapshotter.ctrclient.warm_up: a daemon's first pull loads no client code of its own."""

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
