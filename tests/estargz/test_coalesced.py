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


class PiecesSource(RecordingSource):
    """Streams each request in pieces of ``piece`` bytes; ``restart_after`` pieces into
    the first request, it starts that request again from position 0 (a retry)."""

    def __init__(self, piece: int, restart_after: int | None = None) -> None:
        super().__init__()
        self.piece = piece
        self.restart_after = restart_after
        self.events: list[tuple[str, int]] = []  # ("piece", end position) as they go

    def read_range_streaming(self, offset, length, on_bytes):
        data = self.read_range(offset, length)
        restart = self.restart_after
        self.restart_after = None
        pos = sent = 0
        while pos < length:
            if restart is not None and sent == restart:
                pos, restart = 0, None  # the body starts again
            on_bytes(pos, data[pos : pos + self.piece])
            pos += self.piece
            sent += 1
            self.events.append(("piece", min(pos, length)))
        return data


def test_each_range_is_handed_out_once_as_soon_as_its_bytes_are_in() -> None:
    source = PiecesSource(piece=100)
    ranges = [(0, 150), (150, 30), (180, 500), (900, 60)]
    handed: list[tuple[int, bytes]] = []

    def on_range(i: int, data: bytes) -> None:
        handed.append((i, data))
        source.events.append(("range", i))

    got = read_coalesced(source, ranges, on_range=on_range)
    assert got == [BLOB[o : o + n] for o, n in ranges]
    assert source.requests == [(0, 960)]  # one request
    assert sorted(handed) == [(i, BLOB[o : o + n]) for i, (o, n) in enumerate(ranges)]
    # Ranges 0 and 1 (ending at 150 and 180) went out with the second piece (bytes 100
    # to 200), long before the request's last piece; range 3 with the last.
    assert source.events[:4] == [("piece", 100), ("range", 0), ("range", 1), ("piece", 200)]
    assert source.events[-2:] == [("range", 3), ("piece", 960)]


def test_a_request_that_starts_again_hands_out_no_range_twice() -> None:
    source = PiecesSource(piece=100, restart_after=4)
    ranges = [(0, 150), (150, 250), (400, 200)]
    handed: list[int] = []
    got = read_coalesced(source, ranges, on_range=lambda i, data: handed.append(i))
    assert got == [BLOB[o : o + n] for o, n in ranges]
    assert sorted(handed) == [0, 1, 2]


def test_a_source_that_cannot_stream_hands_out_the_ranges_at_the_end() -> None:
    source = RecordingSource()
    handed: list[tuple[int, bytes]] = []
    ranges = [(0, 10), (20, 10)]
    read_coalesced(source, ranges, on_range=lambda i, data: handed.append((i, data)))
    assert sorted(handed) == [(i, BLOB[o : o + n]) for i, (o, n) in enumerate(ranges)]
