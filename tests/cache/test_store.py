import hashlib
import os
import threading

import pytest

from blockfs.cache import ChunkCache


def read_range(cache: ChunkCache, digest: str, offset: int, length: int) -> bytes | None:
    """``ChunkCache.read_into`` into a new buffer: the range, or None if not cached."""
    buf = bytearray(length)
    return bytes(buf) if cache.read_into(digest, offset, memoryview(buf)) else None


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_stored_chunk_is_read_back_from_disk_by_a_new_cache(tmp_path):
    data = os.urandom(10000)
    ChunkCache(tmp_path, max_bytes=1 << 20).put(digest(data), data)
    fresh = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert fresh.get(digest(data)) == data
    assert fresh.stats.disk_hits == 1


def test_missing_chunk_is_a_miss(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert cache.get(digest(b"nope")) is None
    assert cache.stats.misses == 1


def test_memory_lru_serves_hot_chunks_without_disk(tmp_path):
    data = b"hot" * 100
    cache = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=1 << 16)
    cache.put(digest(data), data)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            f.unlink()
    assert cache.get(digest(data)) == data
    assert cache.stats.memory_hits == 1


def test_memory_lru_is_bounded(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=3000)
    chunks = [os.urandom(1000) for _ in range(5)]
    for c in chunks:
        cache.put(digest(c), c)
    assert cache._memory_used <= 3000
    assert len(cache._memory) == 3


def test_size_limit_evicts_least_recently_used(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=3500)
    a, b, c, d = (os.urandom(1000) for _ in range(4))
    for x in (a, b, c):
        cache.put(digest(x), x)
    assert cache.get(digest(a)) == a  # a is now the most recent
    cache.put(digest(d), d)
    assert cache.stats.disk_bytes <= 3500
    assert cache.get(digest(b)) is None
    assert cache.get(digest(a)) == a
    assert cache.get(digest(d)) == d
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 3500


def test_damaged_cache_file_is_a_miss_and_is_removed(tmp_path):
    data = os.urandom(4096)
    ChunkCache(tmp_path, max_bytes=1 << 20).put(digest(data), data)
    path = tmp_path / digest(data)[7:9] / digest(data)[7:]
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 1
    path.write_bytes(bytes(damaged))
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert cache.get(digest(data)) is None
    assert cache.stats.corrupt == 1
    assert not path.exists()


def test_leftover_temporary_files_are_removed_on_open(tmp_path):
    (tmp_path / "ab").mkdir()
    leftover = tmp_path / "ab" / ".tmpxyz"
    leftover.write_bytes(b"partial")
    ChunkCache(tmp_path, max_bytes=1 << 20)
    assert not leftover.exists()


def test_invalid_digest_is_refused(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError):
        cache.get("sha256:../../etc/passwd")


def test_concurrent_puts_of_the_same_chunk_store_it_once(tmp_path):
    data = os.urandom(50000)
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    threads = [threading.Thread(target=cache.put, args=(digest(data), data)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.disk_bytes == len(data)
    assert [f.name for f in tmp_path.rglob("*") if f.is_file()] == [digest(data)[7:]]


def test_containment_is_answered_from_what_the_cache_knows_without_the_disk(tmp_path, monkeypatch):
    # A fetch asks it for every chunk of a directory's window: a stat each would cost
    # more than the rest of the planning.
    kept, other = os.urandom(5000), os.urandom(5000)
    ChunkCache(tmp_path, max_bytes=1 << 20).put(digest(kept), kept)
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)  # found by the scan, not in memory

    def no_disk(*args, **kwargs):
        raise AssertionError("the disk was asked")

    with monkeypatch.context() as m:
        m.setattr(os, "stat", no_disk)
        m.setattr(os, "lstat", no_disk)
        answers = (digest(kept) in cache, digest(other) in cache)
    assert answers == (True, False)
    # A file gone behind its back counts until a read finds it missing.
    (tmp_path / digest(kept)[7:9] / digest(kept)[7:]).unlink()
    assert digest(kept) in cache
    assert cache.get(digest(kept)) is None
    assert digest(kept) not in cache


def test_range_read_returns_the_slice_from_memory_and_from_disk(tmp_path):
    data = os.urandom(20000)
    ChunkCache(tmp_path, max_bytes=1 << 20).put(digest(data), data)
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)  # nothing in memory
    assert read_range(cache, digest(data), 100, 50) == data[100:150]  # verifies the whole file
    assert read_range(cache, digest(data), 19990, 10) == data[19990:]  # then reads just the range
    assert cache.stats.disk_hits == 2
    hot = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=1 << 20)
    hot.get(digest(data))
    assert read_range(hot, digest(data), 5, 5) == data[5:10]
    assert hot.stats.memory_hits == 1


def test_range_read_of_a_damaged_file_is_a_miss(tmp_path):
    data = os.urandom(8192)
    ChunkCache(tmp_path, max_bytes=1 << 20).put(digest(data), data)
    path = tmp_path / digest(data)[7:9] / digest(data)[7:]
    damaged = bytearray(path.read_bytes())
    damaged[0] ^= 1
    path.write_bytes(bytes(damaged))
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert read_range(cache, digest(data), 1000, 10) is None
    assert cache.stats.corrupt == 1


def test_range_read_after_eviction_is_a_miss(tmp_path):
    a, b = os.urandom(3000), os.urandom(3000)
    cache = ChunkCache(tmp_path, max_bytes=4000)
    cache.put(digest(a), a)
    assert read_range(cache, digest(a), 0, 10) == a[:10]
    cache.put(digest(b), b)  # evicts a
    assert read_range(cache, digest(a), 0, 10) is None


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_cache_is_private_to_its_owner(tmp_path):
    # Which chunks a node holds says which images it runs: nobody else may list them.
    root = tmp_path / "root" / "cache" / "chunks"
    cache = ChunkCache(root, max_bytes=1 << 20)
    data = os.urandom(1000)
    cache.put(digest(data), data)
    assert mode(tmp_path / "root") == 0o700  # every directory the cache made
    assert mode(tmp_path / "root" / "cache") == 0o700
    assert mode(root) == 0o700
    (shard,) = root.iterdir()
    assert mode(shard) == 0o700
    (chunk,) = shard.iterdir()
    assert mode(chunk) == 0o600


def test_a_cache_left_open_by_an_older_version_is_tightened_when_opened(tmp_path):
    root = tmp_path / "chunks"
    data = os.urandom(1000)
    hex_ = digest(data).removeprefix("sha256:")
    (root / hex_[:2]).mkdir(parents=True)
    (root / hex_[:2] / hex_).write_bytes(data)
    root.chmod(0o755)
    (root / hex_[:2]).chmod(0o755)
    (root / hex_[:2] / hex_).chmod(0o644)
    cache = ChunkCache(root, max_bytes=1 << 20)
    assert (mode(root), mode(root / hex_[:2]), mode(root / hex_[:2] / hex_)) == (
        0o700,
        0o700,
        0o600,
    )
    assert cache.get(digest(data)) == data


def test_a_shard_made_after_opening_is_private_too(tmp_path):
    old = os.umask(0o022)
    try:
        cache = ChunkCache(tmp_path / "chunks", max_bytes=1 << 20)
        for n in range(20):
            data = n.to_bytes(4, "big") * 10
            cache.put(digest(data), data)
    finally:
        os.umask(old)
    for path in (tmp_path / "chunks").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
