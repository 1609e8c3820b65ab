"""Inputs the benchmarks run on, made on the fly and the same for the same seed.

Text-like file data that compresses about as well as binaries do (to ~45% with gzip),
layer tars of a real directory or of generated files, and a realistic large TOC.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MTIME = 1_700_000_000
_EXTENSIONS = ("py", "so", "h", "txt", "json", "pyc", "conf", "md")


def _vocabulary(rng: random.Random, size: int = 4096) -> list[str]:
    return ["".join(rng.choices(_LETTERS, k=rng.randint(2, 10))) for _ in range(size)]


def text_bytes(size: int, seed: int) -> bytes:
    """``size`` bytes of random words: compressible, and no two 64 KiB pieces alike.

    Distinct pieces matter: chunks are cached by digest, so repeated data would be
    fetched once and make reads look faster than they are.
    """
    rng = random.Random(seed)
    words = _vocabulary(rng)
    parts, total = [], 0
    while total < size:
        part = " ".join(rng.choices(words, k=12_000)).encode()
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def write_tar(path: str | os.PathLike[str], files: Iterable[tuple[str, bytes]]) -> int:
    """Write a PAX tar of ``(name, data)`` regular files (parents first); its size."""
    seen: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                parent = "/".join(parts[:depth])
                if parent not in seen:
                    seen.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
                    tf.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
            tf.addfile(info, _Reader(data))
    return Path(path).stat().st_size


class _Reader:
    """Just enough of a file object for TarFile.addfile, without copying ``data``."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk


def tar_of_tree(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, limit: int | None = None
) -> tuple[int, int]:
    """Tar the tree at ``src`` (sorted, no sockets) into ``dst``; (tar size, entries).

    With ``limit``, stop once that many bytes of file data are in.
    """
    root = Path(src)
    taken = entries = 0
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in [".", *sorted(filenames)]:
                path = Path(dirpath) / name
                if limit is not None and taken >= limit:
                    break
                arcname = str(path.relative_to(root.parent))
                info = tf.gettarinfo(str(path), arcname)
                if not (info.isfile() or info.isdir() or info.issym()):
                    continue
                if info.isfile():
                    with open(path, "rb") as f:
                        tf.addfile(info, f)
                    taken += info.size
                else:
                    tf.addfile(info)
                entries += 1
    return Path(dst).stat().st_size, entries


def mixed_files(count: int, seed: int, *, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """``count`` files of mixed sizes (median 2 KiB, a few of hundreds of KiB), 40 per dir."""
    rng = random.Random(seed)
    sizes = [min(int(rng.lognormvariate(7.6, 1.4)), 1 << 20) for _ in range(count)]
    data = text_bytes(sum(sizes), seed)
    words = _vocabulary(rng, 64)
    pos = 0
    for i, size in enumerate(sizes):
        directory = f"{prefix}usr/lib/{words[i // 40 % len(words)]}{i // 40}"
        yield (
            f"{directory}/{rng.choice(words)}_{i}.{rng.choice(_EXTENSIONS)}",
            data[pos : pos + size],
        )
        pos += size


# ------------------------------------------------------------------------------------------
# A large TOC


@attrs.frozen
class SyntheticTOC:
    """A TOC JSON as the reference writer formats it, and where its blob's payload would end."""

    json: bytes
    payload_end: int
    kinds: dict[str, int]

    @property
    def entries(self) -> int:
        return sum(self.kinds.values())


def _rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _TOCMaker:
    """Lays out packages of nested directories, the way a distribution image looks."""

    CHUNK = 4 << 20

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.rng = random.Random(seed)
        self.words = _vocabulary(self.rng, 2048)
        self.entries: list[dict[str, Any]] = []
        self.kinds: collections.Counter[str] = collections.Counter()
        self.offset = 512
        self.files: list[str] = []
        self.times = [_rfc3339(_MTIME - self.rng.randrange(3 * 365 * 86400)) for _ in range(800)]

    def digest(self) -> str:
        return f"sha256:{self.rng.getrandbits(256):064x}"

    def emit(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self.kinds[entry["type"]] += 1

    def left(self) -> int:
        return self.count - len(self.entries)

    def owner(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self.rng.random() < 0.05:
            entry["uid"] = entry["gid"] = 1000
        return entry

    def make(self) -> SyntheticTOC:
        for top in ("usr/", "usr/lib/", "usr/lib/python3/", "usr/lib/python3/dist-packages/"):
            self.emit({"name": top, "type": "dir", "modtime": self.times[0], "mode": 0o755})
        package = 0
        while self.left() > 0:
            self.package(f"usr/lib/python3/dist-packages/{self.words[package % 2048]}{package}/")
            package += 1
        return SyntheticTOC(
            json=json.dumps({"version": 1, "entries": self.entries}, indent="\t").encode(),
            payload_end=self.offset + 1024,
            kinds=dict(self.kinds),
        )

    def package(self, root: str) -> None:
        rng = self.rng
        modtime = rng.choice(self.times)
        stack = [(root, 0)]
        while stack and self.left() > 0:
            directory, depth = stack.pop()
            self.emit(
                self.owner({"name": directory, "type": "dir", "modtime": modtime, "mode": 0o755})
            )
            for i in range(rng.randint(4, 20)):
                if self.left() <= 0:
                    return
                self.child(f"{directory}{rng.choice(self.words)}_{i}", modtime)
            if depth < 3:
                for j in range(rng.randint(0, 3)):
                    stack.append((f"{directory}{rng.choice(self.words)}{j}/", depth + 1))

    def child(self, stem: str, modtime: str) -> None:
        rng = self.rng
        roll = rng.random()
        name = f"{stem}.{rng.choice(_EXTENSIONS)}"
        if roll < 0.24 and self.files:
            target = self.files[-1].rsplit("/", 1)[1]
            self.emit(
                {
                    "name": name,
                    "type": "symlink",
                    "modtime": modtime,
                    "linkName": target,
                    "mode": 0o777,
                }
            )
        elif roll < 0.27 and self.files:
            self.emit(
                {
                    "name": name,
                    "type": "hardlink",
                    "linkName": rng.choice(self.files),
                    "mode": 0o644,
                }
            )
        elif roll < 0.30:
            self.emit(self.owner({"name": name, "type": "reg", "modtime": modtime, "mode": 0o644}))
        elif roll < 0.315 and self.left() > 20:
            self.large_file(name, modtime, rng.randint(2, 16))
        else:
            size = max(1, min(int(rng.lognormvariate(8.3, 1.5)), self.CHUNK - 1))
            digest = self.digest()
            entry = self.owner(
                {"name": name, "type": "reg", "size": size, "modtime": modtime,
                 "mode": 0o755 if name.endswith(".so") else 0o644, "offset": self.offset,
                 "digest": digest, "chunkDigest": digest}
            )  # fmt: skip
            if rng.random() < 0.002:
                entry["xattrs"] = {"security.capability": "AQAAAgAgAAAAAAAAAAAAAAAAAAA="}
            self.emit(entry)
            self.files.append(name)
            self.offset += 512 + max(64, size * 45 // 100)

    def large_file(self, name: str, modtime: str, chunks: int) -> None:
        size = (chunks - 1) * self.CHUNK + self.rng.randrange(1, self.CHUNK)
        self.emit(
            {"name": name, "type": "reg", "size": size, "modtime": modtime, "mode": 0o755,
             "offset": self.offset, "digest": self.digest(), "chunkSize": self.CHUNK,
             "chunkDigest": self.digest()}
        )  # fmt: skip
        self.files.append(name)
        for k in range(1, chunks):
            self.offset += self.CHUNK * 45 // 100
            chunk = {"name": name, "type": "chunk", "offset": self.offset,
                     "chunkOffset": k * self.CHUNK, "chunkSize": self.CHUNK,
                     "chunkDigest": self.digest()}  # fmt: skip
            if k == chunks - 1:
                del chunk["chunkSize"]  # the last piece runs to the end of the file
            self.emit(chunk)
        self.offset += self.CHUNK * 45 // 100


def synthetic_toc(count: int, *, seed: int = 0) -> SyntheticTOC:
    """A TOC of exactly ``count`` entries (chunk entries included) for a layer like a distro's.

    About half are small regular files with digest, chunkDigest, modtime and mode; the rest
    are directories, symlinks, hardlinks, empty files and the pieces of multi-chunk files.
    """
    return _TOCMaker(count, seed).make()
