"""read_coalesced: which ranges share a request, and that separate requests overlap in time."""

from __future__ import annotations

import threading

import pytest

from blockfs.estargz import read_coalesced

BLOB = bytes(range(256)) * 4096  # 1 MiB, every offset recognisable


class RecordingSource:
    """An in-memory blob that records each request; ``meet`` makes each request wait until
    that many requests are in progress at once (a barrier), so serial requests fail."""

    def __init__(self, meet: int = 1) -> None:
        self.requests: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(meet, timeout=10) if meet > 1 else None

    @property
    def name(self) -> str:
        return "memory"

    @property
    def size(self) -> int:
        return len(BLOB)

    def read_range(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.requests.append((offset, length))
        if self._barrier is not None:
            self._barrier.wait()
        return BLOB[offset : offset + length]


def test_close_ranges_share_one_request_and_come_back_in_the_order_asked() -> None:
    source = RecordingSource()
    ranges = [(5000, 100), (0, 10), (200, 50)]
    got = read_coalesced(source, ranges)
    assert got == [BLOB[o : o + n] for o, n in ranges]
    assert source.requests == [(0, 5100)]


def test_distant_groups_are_requested_at_the_same_time() -> None:
    # Three groups far apart: each waits until all three requests are in flight, so a
    # reader that sends them one after another breaks the barrier.
    source = RecordingSource(meet=3)
    ranges = [(0, 100), (400_000, 100), (800_000, 100)]
    got = read_coalesced(source, ranges)
    assert got == [BLOB[o : o + n] for o, n in ranges]
    assert sorted(source.requests) == [(0, 100), (400_000, 100), (800_000, 100)]


def test_a_failed_group_fails_the_call() -> None:
    class Failing(RecordingSource):
        def read_range(self, offset: int, length: int) -> bytes:
            if offset >= 400_000:
                raise OSError("registry went away")
            return super().read_range(offset, length)

    with pytest.raises(OSError, match="went away"):
        read_coalesced(Failing(), [(0, 100), (400_000, 100)])
