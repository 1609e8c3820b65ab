"""``tools.bench memory``: peak memory of ``blockfs layer inspect`` and ``layer mount``.

The layer is a TOC-only eStargz blob (:func:`toc_only_blob`): a TOC in the reference
writer's format, compressed as a gzip TOC member, behind a sparse payload region of the
size its offsets need. Indexing, inspecting and mounting read only the footer and the TOC,
so the blob behaves like a real layer of that many entries for everything measured here;
its file data is zeros, so reading a file through the mount would fail verification.

Each command runs as it is installed (``.venv/bin/blockfs``), under a small Python
process that forks it and reads its ``ru_maxrss`` (peak RSS) when it exits. The server
processes a mount leaves running (nbdkit with the blockfs plugin; nbdfuse and its relay
where the kernel has no ``nbd.ko``) are measured by their ``VmHWM`` after a walk of the
whole mounted tree, just before ``umount``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from blockfs.estargz._footer import MAX_FOOTER_SIZE, encode_estargz_footer, parse_footer
from tools.bench._report import MB, Machine, Report, progress, verdict

INSPECT_TARGET = 400 * MB
MOUNT_TARGET = 500 * MB
# The layer the server's memory is compared with: the same kind, a thousand entries.
SMALL_LAYER = 1_000

# Runs a command and writes its peak RSS in KiB (ru_maxrss of the reaped child) to a file.
# Linux folds the RSS a process had before exec into its ru_maxrss, so the command is
# forked from this small process rather than from the (larger) benchmark.
_PEAK_WRAPPER = """\
import os, resource, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status = os.waitpid(pid, 0)
with open(out, "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""

_MTIME = 1_700_000_000
_EXTENSIONS = ("py", "so", "h", "txt", "json", "pyc", "conf", "md")
_EMPTY_SHA256 = "sha256:" + hashlib.sha256(b"").hexdigest()
_CHUNK = 4 << 20


@attrs.frozen
class MemoryBlob:
    """A TOC-only blob: where it is, its TOC digest, and what its TOC holds."""

    path: Path
    toc_digest: str
    toc_bytes: int
    kinds: dict[str, int]

    @property
    def entries(self) -> int:
        return sum(self.kinds.values())


def _entries(count: int, seed: int) -> Iterator[dict[str, Any]]:
    """``count`` TOC entries of a layer of many small files, in the writer's key order.

    Directories of 10 to 60 entries, four levels of packages; of the rest about 40% small
    files (up to 8 KiB, one chunk), 25% empty files, 25% symlinks, 3% hardlinks, 1% files
    of several 4 MiB chunks (their chunk entries included), and a file in 500 with a
    ``security.capability`` xattr. Owners are root, and user 1000 for 5% of directories.
    """
    rng = random.Random(seed)
    offset = 512
    made = 0
    files: list[str] = []
    times = [_rfc3339(_MTIME - rng.randrange(3 * 365 * 86400)) for _ in range(200)]
    landmark = "sha256:" + hashlib.sha256(b"\x0f").hexdigest()
    yield {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": 76,
           "digest": landmark, "chunkDigest": landmark}  # fmt: skip
    made += 1
    package = 0
    while made < count:
        stack = [f"usr/lib/p{package:05d}/"]
        package += 1
        modtime = rng.choice(times)
        while stack and made < count:
            directory = stack.pop()
            entry: dict[str, Any] = {"name": directory, "type": "dir", "modtime": modtime,
                                     "mode": 0o755}  # fmt: skip
            if rng.random() < 0.05:
                entry.update(uid=1000, gid=1000, userName="app", groupName="app")
            yield entry
            made += 1
            if directory.count("/") < 5:
                stack.extend(f"{directory}d{j}/" for j in range(rng.randint(1, 4)))
            for i in range(rng.randint(10, 60)):
                if made >= count:
                    break
                name = f"{directory}f_{i:02d}.{rng.choice(_EXTENSIONS)}"
                roll = rng.random()
                if roll < 0.25 and files:
                    yield {"name": name, "type": "symlink", "modtime": modtime,
                           "linkName": files[-1].rsplit("/", 1)[1], "mode": 0o777}  # fmt: skip
                    made += 1
                elif roll < 0.28 and files:
                    yield {"name": name, "type": "hardlink", "linkName": rng.choice(files),
                           "mode": 0o644}  # fmt: skip
                    made += 1
                elif roll < 0.53:
                    yield {"name": name, "type": "reg", "modtime": modtime, "mode": 0o644,
                           "digest": _EMPTY_SHA256}  # fmt: skip
                    made += 1
                elif roll < 0.54 and count - made > 20:
                    pieces = rng.randint(2, 8)
                    size = (pieces - 1) * _CHUNK + rng.randrange(1, _CHUNK)
                    yield {"name": name, "type": "reg", "size": size, "modtime": modtime,
                           "mode": 0o755, "offset": offset, "digest": _digest(rng),
                           "chunkSize": _CHUNK, "chunkDigest": _digest(rng)}  # fmt: skip
                    for k in range(1, pieces):
                        offset += _CHUNK // 2
                        chunk = {"name": name, "type": "chunk", "offset": offset,
                                 "chunkOffset": k * _CHUNK, "chunkSize": _CHUNK,
                                 "chunkDigest": _digest(rng)}  # fmt: skip
                        if k == pieces - 1:
                            del chunk["chunkSize"]
                        yield chunk
                    offset += _CHUNK // 2
                    made += pieces
                    files.append(name)
                else:
                    size = rng.randint(1, 8192)
                    digest = _digest(rng)
                    entry = {"name": name, "type": "reg", "size": size, "modtime": modtime,
                             "mode": 0o644, "offset": offset, "digest": digest,
                             "chunkDigest": digest}  # fmt: skip
                    if rng.random() < 0.002:
                        entry["xattrs"] = {"security.capability": "AQAAAgAgAAAAAAAAAAAAAAAAAAA="}
                    yield entry
                    made += 1
                    files.append(name)
                    offset += 512 + max(64, size // 2)
                if len(files) > 64:
                    del files[:32]
    # Where the payload ends: after the last member, as the writer leaves it.
    yield {"offset": offset + 1024}


def _digest(rng: random.Random) -> str:
    return f"sha256:{rng.getrandbits(256):064x}"


def _rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def toc_only_blob(path: Path, count: int, *, seed: int = 0) -> MemoryBlob:
    """Write a TOC-only eStargz blob of ``count`` TOC entries to ``path``.

    The TOC JSON is formatted as the reference writer formats it (``json`` with a tab
    indent); it is written and compressed in pieces, so making a large blob costs little
    memory. The payload region before the TOC is a hole.
    """
    kinds: Counter[str] = Counter()
    sha = hashlib.sha256()
    payload_end = 0
    with tempfile.TemporaryFile(dir=path.parent) as raw:

        def put(data: bytes) -> None:
            sha.update(data)
            raw.write(data)

        put(b'{\n\t"version": 1,\n\t"entries": [')
        first = True
        for entry in _entries(count, seed):
            if "type" not in entry:
                payload_end = entry["offset"]
                break
            kinds[entry["type"]] += 1
            text = json.dumps(entry, indent="\t").replace("\n", "\n\t\t")
            put((b"\n\t\t" if first else b",\n\t\t") + text.encode())
            first = False
        put(b"\n\t]\n}")
        toc_size = raw.tell()
        raw.seek(0)
        info = tarfile.TarInfo("stargz.index.json")
        info.size, info.mode = toc_size, 0
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        with open(path, "wb") as out:
            out.truncate(payload_end)
            out.seek(payload_end)
            out.write(z.compress(info.tobuf(tarfile.PAX_FORMAT)))
            while block := raw.read(1 << 20):
                out.write(z.compress(block))
            out.write(z.compress(bytes(-toc_size % 512) + bytes(1024)))
            out.write(z.flush())
            out.write(encode_estargz_footer(payload_end))
    return MemoryBlob(
        path=path, toc_digest="sha256:" + sha.hexdigest(), toc_bytes=toc_size, kinds=dict(kinds)
    )


@attrs.frozen
class Measured:
    """One command's run: its wall time and peak RSS, and what it printed."""

    seconds: float
    peak_bytes: int
    stdout: str


def peak_rss(command: Sequence[str], workdir: Path, *, keep_stdout: bool = False) -> Measured:
    """Run ``command`` and measure its peak RSS (that of its reaped children included)."""
    out = workdir / "peak-rss"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, str(out), *command],
        stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}")
    return Measured(seconds, int(out.read_text()) * 1024, proc.stdout or "")


@attrs.frozen
class Served:
    """A running process's peak RSS, and how much of its RSS is its own (anonymous)."""

    peak_bytes: int
    anon_bytes: int


def served(pid: int) -> Served:
    """``VmHWM`` and ``RssAnon`` of a running process (/proc/PID/status), in bytes.

    RSS counts the pages of mapped files too (shared page cache: libraries, and a
    server's ``extents.bin``); ``RssAnon`` is what the process holds of its own.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return Served(fields["VmHWM"], fields["RssAnon"])


def blockfs_command() -> list[str]:
    """The ``blockfs`` command as installed beside this Python, or its module."""
    script = Path(sys.executable).parent / "blockfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blockfs.cli"]


@attrs.frozen
class MemoryBench:
    """What to run: ``entries`` TOC entries, or ``quick`` (a small layer) for a smoke run."""

    workdir: Path
    entries: int = 1_000_000
    quick: bool = False
    mount: bool = True

    def run(self, command: str) -> Report:
        report = Report("Memory of large layers", command, Machine.describe())
        count = 20_000 if self.quick else self.entries
        progress(f"TOC-only blob of {count:,} entries")
        blob = toc_only_blob(self.workdir / "layer.esgz", count)
        kinds = ", ".join(
            f"{n:,} {k}" for k, n in sorted(blob.kinds.items(), key=lambda kv: -kv[1])
        )
        report.facts.append(
            f"Layer: {blob.entries:,} TOC entries ({kinds}); {blob.toc_bytes / MB:.1f} MB of TOC "
            f"JSON, {_compressed_toc(blob.path) / MB:.1f} MB compressed; a TOC-only blob "
            "(`tools/bench/_memory.py`) whose file data is a hole"
        )
        report.figures["entries"] = blob.entries
        report.figures["toc_bytes"] = blob.toc_bytes
        table = report.table(
            f"Peak RSS with a layer of {blob.entries:,} entries",
            "command",
            "process",
            "wall s",
            "peak RSS MB",
            "RssAnon MB at the end",
            "target",
        )
        table.notes.append(
            "Peak RSS of a command is its `ru_maxrss` as its parent reaps it (it is forked "
            "from a small Python process, whose RSS before `exec` Linux folds into it: about "
            "10 MB). Server processes are measured by `VmHWM` after `os.walk` of the whole "
            "mounted tree (every directory and inode read through the export), before "
            "`umount`; their `RssAnon` then is the memory of their own, the rest of their "
            "RSS being pages of mapped files (libraries, the layer's `extents.bin`), shared "
            "page cache. MB are 10^6 bytes. `CLI + server` is the sum of the two peaks, "
            "though they do not peak at the same time (the CLI peaks while indexing, "
            "before it starts the server)."
        )
        self.inspect(report, table, blob)
        if not self.mount:
            table.notes.append("`layer mount` was not measured (--no-mount).")
        elif os.geteuid() != 0:
            table.notes.append("`layer mount` was not measured: it needs root.")
        else:
            self.mount_layer(report, table, blob)
        return report

    def inspect(self, report: Report, table: Any, blob: MemoryBlob) -> None:
        progress(f"blockfs layer inspect of {blob.entries:,} entries")
        command = [*blockfs_command(), "layer", "inspect", "--toc-digest", blob.toc_digest]
        m = peak_rss([*command, str(blob.path)], self.workdir)
        report.figures["inspect.peak_bytes"] = m.peak_bytes
        report.figures["inspect.seconds"] = m.seconds
        target = (
            "(quick)"
            if self.quick
            else (f"<= {INSPECT_TARGET // MB} MB: {verdict(m.peak_bytes, INSPECT_TARGET + 1)}")
        )
        table.add("`blockfs layer inspect --toc-digest D BLOB`", "blockfs", m.seconds,
                  m.peak_bytes / MB, "", target)  # fmt: skip

    def mount_layer(self, report: Report, table: Any, blob: MemoryBlob) -> None:
        small = toc_only_blob(self.workdir / "small.esgz", SMALL_LAYER, seed=1)
        root = self.workdir / "root"
        measured = self._mounted(blob, root, "mnt")
        progress(f"the same with a layer of {small.entries:,} entries, for the server")
        small_measured = self._mounted(small, root, "mnt-small")
        cli, processes, walked = measured
        blockfs_server = "nbdkit (blockfs server)"
        server = processes[blockfs_server].peak_bytes if blockfs_server in processes else 0
        total = cli.peak_bytes + server
        report.figures["mount.cli_peak_bytes"] = cli.peak_bytes
        report.figures["mount.server_peak_bytes"] = server
        report.figures["mount.total_peak_bytes"] = total
        report.figures["mount.seconds"] = cli.seconds
        if blockfs_server in processes:
            report.figures["mount.server_anon_bytes"] = processes[blockfs_server].anon_bytes
        if blockfs_server in small_measured[1]:
            small_server = small_measured[1][blockfs_server]
            report.figures["mount.small_server_peak_bytes"] = small_server.peak_bytes
            report.figures["mount.small_server_anon_bytes"] = small_server.anon_bytes
        command = "`blockfs layer mount --toc-digest D BLOB DIR`"
        table.add(command, "blockfs (CLI)", cli.seconds, cli.peak_bytes / MB, "", "")
        for name, p in processes.items():
            table.add("", name, "", p.peak_bytes / MB, p.anon_bytes / MB, "")
        target = (
            "(quick)"
            if self.quick
            else f"<= {MOUNT_TARGET // MB} MB: {verdict(total, MOUNT_TARGET + 1)}"
        )
        table.add("", "CLI + server", "", total / MB, "", target)
        for name, p in small_measured[1].items():
            table.add(
                f"the same, a layer of {small.entries:,} entries",
                name,
                "",
                p.peak_bytes / MB,
                p.anon_bytes / MB,
                "",
            )
        table.notes.append(
            f"The walk of the mounted tree found {walked:,} names (directories, files and "
            "links, the root and hidden landmarks aside). The server's memory does not grow "
            "with the layer: it maps `extents.bin` and reads `index.erofs` with `pread`, "
            "and never sees the TOC (the plugin loads only those two files). The few reads the "
            "kernel's readahead makes past the metadata region find the blob's hole where "
            "file data should be and fail verification (and are retried), where a real blob "
            "would have its chunks fetched and cached."
        )

    def _mounted(
        self, blob: MemoryBlob, root: Path, name: str
    ) -> tuple[Measured, dict[str, Served], int]:
        """Mount ``blob``, walk the tree, measure the processes that serve it, unmount."""
        mountpoint = self.workdir / name
        mountpoint.mkdir()
        blockfs = blockfs_command()
        progress(f"blockfs layer mount of {blob.entries:,} entries")
        cli = peak_rss(
            [*blockfs, "layer", "mount", "--root", str(root), "--toc-digest", blob.toc_digest,
             str(blob.path), str(mountpoint)],
            self.workdir,
        )  # fmt: skip
        try:
            progress("walking the mounted tree")
            walked = sum(len(dirs) + len(files) for _, dirs, files in os.walk(mountpoint))
            processes = _serving_processes(root)
        finally:
            subprocess.run(
                [*blockfs, "layer", "umount", "--root", str(root), str(mountpoint)], check=True
            )
        return cli, processes, walked


def _serving_processes(root: Path) -> dict[str, Served]:
    """The memory of each process serving the mounts under ``root``, by its pid file."""
    names = {
        "nbdkit.pid": "nbdkit (blockfs server)",
        "relay.pid": "nbdkit (nbdfuse's relay)",
        "nbdfuse.pid": "nbdfuse",
    }
    out: dict[str, Served] = {}
    for pidname, label in names.items():
        for pidfile in sorted((root / "mounts").glob(f"**/{pidname}")):
            try:
                out[label] = served(int(pidfile.read_text().split()[0]))
            except (OSError, ValueError, KeyError):
                continue
    return out


def _compressed_toc(path: Path) -> int:
    """Bytes of the TOC member of a blob (what opening the layer fetches)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(size - MAX_FOOTER_SIZE)
        footer = parse_footer(f.read(), size)
    return size - footer.size - footer.toc_offset


if __name__ == "__main__":  # pragma: no cover - a manual check
    made = toc_only_blob(Path(sys.argv[1]), int(sys.argv[2]))
    print(made.toc_digest, made.toc_bytes, made.kinds, os.path.getsize(made.path))
