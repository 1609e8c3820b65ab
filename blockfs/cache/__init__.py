"""A store of verified chunk plaintext keyed by chunk digest, shared by every layer."""

from blockfs.cache._store import CacheStats, ChunkCache, private_dir

__all__ = ["CacheStats", "ChunkCache", "private_dir"]
