"""A proxy that resets connections, answers 500 and truncates bodies at random: reads
return the right bytes or raise RegistryError, never wrong bytes, in bounded time."""

import contextlib
import os
import random
import threading

import pytest

from blockfs.estargz import read_coalesced
from blockfs.oci import Reference, sha256_digest
from blockfs.registry import HostsConfig, RegistryBlobSource, RegistryClient, RegistryError
from tests.helpers.registry import FAST_RETRY, HTTPProxy, push_image, unique_repository

BLOB_SIZE = 5 << 20

# How many reads must succeed: without a floor, a client that failed every read would pass
# these tests. The proxy faults each request with probability FAULT_RATE, and FAST_RETRY
# tries a request FAST_RETRY.max_attempts (4) times, every injected fault being a passing
# one (reset, 500, truncated or short body); so a request fails for good only when all
# its attempts are faulted: 0.2 ** 4 = 0.16 %. A read that needs k requests fails with
# probability at most k * 0.16 %. The floors below ask for far less (about 75-90 % of
# reads), which leaves room for reads that take several requests and for changes of the
# retry policy, yet fails at once if retries stop absorbing faults.
FAULT_RATE = 0.2


@pytest.fixture(scope="module")
def big_blob(registry):
    with RegistryClient(plain_http=True, retry=FAST_RETRY, trust_env=False) as c:
        ref = Reference.parse(f"{registry.host}/{unique_repository('faults')}:v1")
        data = random.Random(11).randbytes(BLOB_SIZE)
        push_image(c, ref, [data])
    return ref, data


@pytest.fixture
def faulty_client(registry, tmp_path):
    proxy = HTTPProxy(registry.url, fault_rate=FAULT_RATE, seed=1234)
    directory = tmp_path / registry.host
    directory.mkdir()
    (directory / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
    with RegistryClient(HostsConfig.load(tmp_path), retry=FAST_RETRY, trust_env=False) as c:
        yield c, proxy
    proxy.close()


def test_random_ranges_through_faults_are_right_or_raise(big_blob, faulty_client):
    ref, data = big_blob
    client, proxy = faulty_client
    digest = sha256_digest(data)
    rng = random.Random(99)
    good = failed = 0
    for _ in range(80):
        offset = rng.randrange(BLOB_SIZE)
        length = rng.randint(1, min(256 << 10, BLOB_SIZE - offset))
        try:
            got = client.read_range(ref, digest, offset, length)
        except RegistryError:
            failed += 1
            continue
        assert got == data[offset : offset + length]
        good += 1
    assert set(proxy.injected) == {"reset", "500", "truncate", "short"}
    # One request per read: about 0.13 of the 80 reads are expected to fail (see FAULT_RATE).
    assert good >= 70, f"only {good} of 80 reads got through the faults"
    assert good + failed == 80


def test_concurrent_prefetch_through_faults_is_right_or_raises(big_blob, faulty_client):
    ref, data = big_blob
    client, proxy = faulty_client
    source = RegistryBlobSource(client, ref, sha256_digest(data), size=BLOB_SIZE)
    mistakes: list[str] = []
    good: list[int] = []  # one item per read_coalesced that returned

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(8):
            ranges = [(rng.randrange(BLOB_SIZE - 4096), rng.randint(1, 4096)) for _ in range(6)]
            try:
                pieces = read_coalesced(source, ranges)
            except RegistryError:
                continue
            good.append(1)
            for (offset, length), piece in zip(ranges, pieces, strict=True):
                if piece != data[offset : offset + length]:
                    mistakes.append(f"wrong bytes at {offset}+{length}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert mistakes == []
    assert sum(proxy.injected.values()) > 0
    # 32 calls of up to 6 requests each: each fails with probability at most 1 % (see
    # FAULT_RATE), so about 0.3 are expected to fail; 24 of 32 is a wide margin.
    assert len(good) >= 24, f"only {len(good)} of 32 coalesced reads got through the faults"


def test_whole_blob_downloads_through_faults_are_verified(big_blob, faulty_client, tmp_path):
    ref, data = big_blob
    client, _ = faulty_client
    digest = sha256_digest(data)
    good = 0
    for attempt in range(3):
        dest = tmp_path / f"blob{attempt}"
        try:
            client.stream_blob(ref, digest, dest)
        except RegistryError:
            assert not dest.exists()
            continue
        assert dest.read_bytes() == data
        good += 1
    with contextlib.suppress(RegistryError):
        assert client.get_blob(ref, digest) == data
        good += 1
    assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if not p.startswith(".")]
    # Each download is a request or a few (see FAULT_RATE): two failures out of four would
    # be a chance of well under 1 in 1000.
    assert good >= 3, f"only {good} of 4 whole-blob downloads got through the faults"


@pytest.mark.parametrize(
    ("fault", "message"), [("500", "server error"), ("429", "rate-limiting"), ("reset", "failed")]
)
def test_persistent_failures_give_up_after_the_policy_attempts(
    big_blob, registry, tmp_path, fault, message
):
    ref, data = big_blob
    proxy = HTTPProxy(registry.url, fault_rate=1.0, faults=[fault])
    directory = tmp_path / registry.host
    directory.mkdir()
    (directory / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
    try:
        with (
            RegistryClient(HostsConfig.load(tmp_path), retry=FAST_RETRY, trust_env=False) as c,
            pytest.raises(RegistryError, match=message) as info,
        ):
            c.read_range(ref, sha256_digest(data), 0, 10)
        assert "gave up after 4 attempts" in str(info.value)
        assert len(proxy.requests) == 4
    finally:
        proxy.close()


def test_ranges_handed_out_as_they_arrive_through_faults_are_right_and_once(
    big_blob, faulty_client
):
    # Truncated and short bodies make the client try a request again from its start: a
    # range handed out from the first try must not be handed out again, and every range
    # handed out must be right, whether the call then succeeds or fails.
    ref, data = big_blob
    client, proxy = faulty_client
    source = RegistryBlobSource(client, ref, sha256_digest(data), size=BLOB_SIZE)
    rng = random.Random(5)
    good = 0
    for _ in range(30):
        start = rng.randrange(BLOB_SIZE - (1 << 20))
        ranges = [(start + k * 65536, rng.randint(1, 65536)) for k in range(16)]
        handed: list[int] = []

        def on_range(i: int, got: bytes, ranges=ranges, handed=handed) -> None:
            offset, length = ranges[i]
            assert got == data[offset : offset + length]
            handed.append(i)

        try:
            result = read_coalesced(source, ranges, on_range=on_range)
        except RegistryError:
            assert len(handed) == len(set(handed))
            continue
        assert sorted(handed) == list(range(len(ranges)))
        assert result == [data[o : o + n] for o, n in ranges]
        good += 1
    assert {"truncate", "short"} & set(proxy.injected)
    assert good >= 24, f"only {good} of 30 coalesced reads got through the faults"
