"""ChunkCache: verified chunk plaintext on disk (atomic writes, size limit) plus a memory LRU.

Chunks are keyed by their sha256, so a chunk that appears in many layers or images is
stored once. Only bytes whose digest was verified are put in; a file read back from disk
is verified again the first time this process reads it, so a damaged cache file is a
miss, never wrong data. After that, ranges of it are read without hashing the whole
chunk again (cache files are written once and replaced only by rename).

Which chunks a node holds says which images it runs, so the cache is private to its
owner: directories 0700, files 0600, and a cache left wider by an older version is
tightened when it is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import attrs

_DIGEST_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def _tighten(path: Path, st: os.stat_result, mode: int) -> None:
    """Take group and other permissions off ``path`` if it has any (and is ours)."""
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, mode, follow_symlinks=False)


def private_dir(path: Path, *, tighten: bool = True) -> None:
    """Make ``path`` and any missing parents 0700; with ``tighten``, take group and other
    permissions off ``path`` if it already exists with them (and is ours)."""
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        # mode is masked by the umask, which may only take more away.
        directory.mkdir(mode=_DIR_MODE, exist_ok=True)
    if tighten:
        _tighten(path, path.stat(), _DIR_MODE)


@attrs.define
class CacheStats:
    """Counters of one ChunkCache since it was opened."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    corrupt: int = 0
    disk_bytes: int = 0


def _hex_of(digest: str) -> str:
    hex_ = digest.removeprefix(_DIGEST_PREFIX)
    if len(hex_) != 64 or not digest.startswith(_DIGEST_PREFIX) or not _HEX.issuperset(hex_):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hex_


class ChunkCache:
    """Chunk store under ``root`` (``root/ab/<sha256 hex>``), at most ``max_bytes`` on disk.

    ``memory_bytes`` bounds the in-memory LRU of hot chunks (0 disables it). Safe to use
    from many threads; several processes may share one directory (``in`` knows only the
    chunks this one found when it opened, stored or read back; reads find the others).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int, memory_bytes: int = 0):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        # Files on disk in least-recently-used order, with their sizes.
        self._disk: OrderedDict[str, int] = OrderedDict()
        # Files this process has read back and verified since they were last written.
        self._verified: set[str] = set()
        private_dir(self.root)
        self._root = str(self.root)
        self._scan()

    def _path(self, hex_: str) -> str:
        return f"{self._root}/{hex_[:2]}/{hex_}"

    def _scan(self) -> None:
        found = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            _tighten(sub, sub.stat(), _DIR_MODE)
            for f in sub.iterdir():
                if f.name.startswith("."):
                    # A temporary file left by a process that died mid-write.
                    with contextlib.suppress(OSError):
                        f.unlink()
                    continue
                with contextlib.suppress(OSError):
                    st = f.stat()
                    _tighten(f, st, _FILE_MODE)
                    found.append((st.st_atime, f.name, st.st_size))
        found.sort()
        for _, name, size in found:
            self._disk[name] = size
            self.stats.disk_bytes += size
        with self._lock:
            self._evict_locked()

    def get(self, digest: str) -> bytes | None:
        """The verified plaintext of the chunk with ``digest``, or None if not cached."""
        hex_ = _hex_of(digest)
        data = self._from_memory(hex_)
        if data is not None:
            return data
        try:
            with open(self._path(hex_), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self.stats.misses += 1
                self._forget_locked(hex_)
            return None
        if hashlib.sha256(data).hexdigest() != hex_:
            with self._lock:
                self.stats.corrupt += 1
                self.stats.misses += 1
                self._forget_locked(hex_)
            with contextlib.suppress(OSError):
                os.unlink(self._path(hex_))
            return None
        with self._lock:
            self.stats.disk_hits += 1
            self._verified.add(hex_)
            if hex_ in self._disk:
                self._disk.move_to_end(hex_)
            else:  # stored by another process sharing the directory
                self._disk[hex_] = len(data)
                self.stats.disk_bytes += len(data)
            self._remember_locked(hex_, data)
        return data

    def read_into(self, digest: str, offset: int, dest: memoryview) -> bool:
        """Copy ``len(dest)`` bytes at ``offset`` of the cached chunk ``digest`` into
        ``dest``; False (and ``dest`` untouched or partly written) if it is not cached."""
        hex_ = _hex_of(digest)
        length = len(dest)
        data = self._from_memory(hex_)
        if data is not None:
            dest[:] = memoryview(data)[offset : offset + length]
            return True
        with self._lock:
            trusted = hex_ in self._verified
        if trusted:
            try:
                with open(self._path(hex_), "rb") as f:
                    got = os.preadv(f.fileno(), [dest], offset)
            except FileNotFoundError:
                got = 0
            if got == length:
                with self._lock:
                    self.stats.disk_hits += 1
                    if hex_ in self._disk:
                        self._disk.move_to_end(hex_)
                return True
            with self._lock:
                self._verified.discard(hex_)
        data = self.get(digest)
        if data is None:
            return False
        dest[:] = memoryview(data)[offset : offset + length]
        return True

    def put(self, digest: str, data: bytes) -> None:
        """Store ``data``, whose sha256 the caller has verified equals ``digest``."""
        hex_ = _hex_of(digest)
        with self._lock:
            self._remember_locked(hex_, data)
            if hex_ in self._disk:
                self._disk.move_to_end(hex_)
                return
        if len(data) > self.max_bytes:
            return
        # A fetch stores every chunk it brings, most of them small files: plain os calls
        # and a temporary name of this thread's, not pathlib and tempfile (a third of
        # the cost). The rename makes the file appear whole; O_EXCL and the mode keep
        # it private; a temporary file left by a crash is swept when a cache opens.
        path = self._path(hex_)
        tmp = f"{self._root}/{hex_[:2]}/.{hex_}.{os.getpid()}.{threading.get_ident()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, _FILE_MODE)
        except FileNotFoundError:  # the shard's first chunk
            os.makedirs(os.path.dirname(tmp), mode=_DIR_MODE, exist_ok=True)
            fd = os.open(tmp, flags, _FILE_MODE)
        except FileExistsError:  # left by a process of the same pid that died mid-write
            os.unlink(tmp)
            fd = os.open(tmp, flags, _FILE_MODE)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._lock:
            if hex_ not in self._disk:
                self._disk[hex_] = len(data)
                self.stats.disk_bytes += len(data)
                self.stats.stores += 1
            self._evict_locked()

    def __contains__(self, digest: str) -> bool:
        """Whether the chunk is in memory or on disk as far as this cache knows, without
        asking the disk (a file removed behind its back counts until a read misses it)."""
        hex_ = _hex_of(digest)
        with self._lock:
            return hex_ in self._memory or hex_ in self._disk

    def _from_memory(self, hex_: str) -> bytes | None:
        with self._lock:
            data = self._memory.get(hex_)
            if data is not None:
                self._memory.move_to_end(hex_)
                self.stats.memory_hits += 1
            return data

    def _remember_locked(self, hex_: str, data: bytes) -> None:
        if self.memory_bytes <= 0 or len(data) > self.memory_bytes:
            return
        if hex_ in self._memory:
            self._memory.move_to_end(hex_)
            return
        self._memory[hex_] = data
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= len(old)

    def _forget_locked(self, hex_: str) -> None:
        self._verified.discard(hex_)
        size = self._disk.pop(hex_, None)
        if size is not None:
            self.stats.disk_bytes -= size

    def _evict_locked(self) -> None:
        while self.stats.disk_bytes > self.max_bytes and self._disk:
            hex_, size = self._disk.popitem(last=False)
            self._verified.discard(hex_)
            self.stats.disk_bytes -= size
            self.stats.evictions += 1
            with contextlib.suppress(OSError):
                os.unlink(self._path(hex_))

    def clear(self) -> None:
        """Remove every cached chunk, on disk and in memory."""
        with self._lock:
            for hex_ in list(self._disk):
                with contextlib.suppress(OSError):
                    os.unlink(self._path(hex_))
            self._disk.clear()
            self._verified.clear()
            self._memory.clear()
            self._memory_used = 0
            self.stats.disk_bytes = 0
