"""Issue 13's done-means: under a proxy flipping bits in 30% of range responses, a full
read of a mounted image gives 0 wrong bytes and 0 EIO.

``tools.chaos`` in its quick mode, for real: an image built offline (busybox and a layer of
random files) converted into a ``docker-registry`` on loopback, a fault proxy in front of
it flipping bits in 30% of the blob range responses, ``blockfs image mount --plain-http``
through the proxy (nbdkit, nbdfuse or nbd.ko, EROFS, overlayfs), every file read and
compared with its source, the servers' stats, ``blockfs image umount``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.chaos import QUICK, leftovers, run
from tools.fault_proxy import FaultProxy
from tools.local_registry import registry_available

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
    pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed"),
]


def test_bit_flips_in_30_percent_of_range_responses_give_no_wrong_byte_and_no_eio(
    workdir: Path,
) -> None:
    assert [(s.kind, s.probability) for s in QUICK] == [("flip", 0.30)]
    _spec, results = run(workdir, quick=True)
    (result,) = results
    # Everything was read and compared: the whole image, file by file.
    assert result.files >= 25 and result.bytes > 4_000_000
    assert result.missing == 0 and result.unexpected == 0
    # The faults happened and were seen: flips injected, bad members caught and fetched
    # again (so a proxy that spoils nothing, or a reader that checks nothing, fails here).
    assert result.faults["flip"] > 0
    assert result.faults["flip"] == result.injected
    assert result.verification_failures > 0
    assert result.refetches > 0
    # And yet every byte read is right and no read failed.
    assert result.wrong_bytes == 0 and result.wrong_files == 0
    assert result.eio == 0 and result.other_errors == 0
    assert result.fetch_errors == 0
    # Unmounted, nothing left: no mount under the work directory, no nbdkit or nbdfuse.
    assert result.leftovers == []
    assert leftovers(workdir) == []


def test_fault_proxy_rejects_unknown_kinds_and_probabilities() -> None:
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1:1", probability=0.3, kinds=("melt",))
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1:1", probability=1.5)
