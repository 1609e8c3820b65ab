"""``tools.bench estargz``: how fast blockfs writes eStargz, parses TOCs and reads chunks.

Every figure has its baseline measured in the same run on the same input: the system's
``gzip``/``zstd`` for writing, ``json.loads`` for the TOC, plain decompression for reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from blockfs.estargz import BlobReader, BuildOptions, FileBlobSource, build_file
from tools.bench._data import synthetic_toc, tar_of_tree, text_bytes, write_tar
from tools.bench._plain import decompress_members
from tools.bench._report import (
    MB,
    Machine,
    MiB,
    Report,
    best_time,
    progress,
    rate,
    verdict,
)

PROJECT = Path(__file__).resolve().parents[2]
TOC_SECONDS_TARGET = 1.5
TOC_PEAK_TARGET = 300 * MB


@attrs.frozen
class EstargzBench:
    """What to run: full size, or ``quick`` (tiny inputs, one repetition) for the smoke test."""

    workdir: Path
    tree: Path = Path("/usr/lib/python3.11")
    quick: bool = False
    repeat: int = 3
    toc_entries: int = 100_000
    read_size: int = 64 * MiB

    def run(self, command: str) -> Report:
        report = Report(
            "eStargz format",
            command,
            Machine.describe([("gzip", ["gzip", "--version"]), ("zstd", ["zstd", "--version"])]),
        )
        self.write_throughput(report)
        self.toc_parse(report)
        self.read_throughput(report)
        return report

    # ------------------------------------------------------------------------------------
    # Writing

    def write_throughput(self, report: Report) -> None:
        tar = self.workdir / "layer.tar"
        limit = 2 * MB if self.quick else None
        progress(f"tar of {self.tree}")
        tar_size, entries = tar_of_tree(self.tree, tar, limit=limit)
        table = report.table(
            f"Write: `build` of a {tar_size / MB:.1f} MB tar of `{self.tree}` "
            f"({entries} entries), MB/s of input tar",
            "compression",
            "blockfs, workers=0 (auto)",
            "blockfs, workers=1",
            "baseline",
            "baseline MB/s",
            "output MB: blockfs / baseline",
        )
        table.notes.append(
            "Baselines compress the same tar in one thread, in the same run: the system's "
            "`gzip`/`zstd` reading the tar and writing a file. blockfs also cuts the tar into "
            "members, hashes every chunk, writes the TOC and computes the DiffID. `workers=0` "
            f"uses one thread per core (up to 4). Best of {self.repeats} runs."
        )
        cases: list[tuple[str, BuildOptions, list[str]]] = [
            ("gzip level 9 (default)", BuildOptions(gzip_level=9), ["gzip", "-9", "-c"]),
            ("gzip level 6", BuildOptions(gzip_level=6), ["gzip", "-6", "-c"]),
            ("zstd level 3", BuildOptions(compression="zstd", zstd_level=3), ["zstd", "-3", "-c", "-q"]),
        ]  # fmt: skip
        for label, options, baseline in cases:
            speeds = []
            blob = self.workdir / "layer.esgz"
            for workers in (0, 1):
                progress(f"build {label}, workers={workers}")
                opts = attrs.evolve(options, workers=workers)
                speeds.append(rate(tar_size, best_time(self.repeats, build_file, tar, blob, opts)))
                key = f"write.{options.compression}{_level(options)}.workers{workers}_mbps"
                report.figures[key] = speeds[-1]
            progress(f"baseline {' '.join(baseline)}")
            base_out = self.workdir / "baseline.out"
            base_speed = rate(tar_size, best_time(self.repeats, _compress, baseline, tar, base_out))
            report.figures[f"write.{options.compression}{_level(options)}.baseline_mbps"] = (
                base_speed
            )
            table.add(
                label,
                speeds[0],
                speeds[1],
                f"`{' '.join(baseline)}`",
                base_speed,
                f"{blob.stat().st_size / MB:.2f} / {base_out.stat().st_size / MB:.2f}",
            )
            base_out.unlink()

    # ------------------------------------------------------------------------------------
    # The TOC

    def toc_parse(self, report: Report) -> None:
        count = 2_000 if self.quick else self.toc_entries
        progress(f"TOC of {count} entries")
        toc = synthetic_toc(count)
        path = self.workdir / "toc.json"
        path.write_bytes(toc.json)
        runs: dict[str, list[dict[str, Any]]] = {"json": [], "parse_toc": []}
        for i in range(self.repeats):
            for mode in runs:
                progress(f"TOC parse in a fresh process: {mode} ({i + 1}/{self.repeats})")
                runs[mode].append(_probe(mode, path, toc.payload_end))
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(toc.kinds.items(), key=lambda kv: -kv[1]))
        table = report.table(
            f"TOC parse: {toc.entries:,} entries ({kinds}), {len(toc.json) / MB:.1f} MB of JSON",
            "fresh subprocess",
            "wall s (best)",
            "peak RSS MB (max)",
            "peak RSS after imports MB",
            "target",
        )
        table.notes.append(
            f"Each row: {self.repeats} fresh `python -m tools.bench._probe` processes, each "
            "reading the TOC file and then timing one call. Peak RSS is that process's `VmHWM` "
            "(not `ru_maxrss`, which Linux carries over `exec` from the forking parent). The "
            "baseline process imports the same modules and only runs `json.loads` on the same "
            "bytes; the last row is the difference, i.e. what `parse_toc` adds over decoding "
            "the JSON. The memory target is checked against the whole `parse_toc` process."
        )
        summary = {}
        for mode, results in runs.items():
            seconds = min(r["seconds"] for r in results)
            peak = max(r["peak_kib"] for r in results) * 1024
            start = max(r["after_imports_kib"] for r in results) * 1024
            summary[mode] = (seconds, peak, start)
            report.figures[f"toc.{mode}.seconds"] = seconds
            report.figures[f"toc.{mode}.peak_bytes"] = peak
        j_s, j_peak, j_start = summary["json"]
        p_s, p_peak, p_start = summary["parse_toc"]
        table.add("`json.loads` only (baseline)", j_s, j_peak / MB, j_start / MB, "")
        target = (
            f"< {TOC_SECONDS_TARGET} s: {verdict(p_s, TOC_SECONDS_TARGET)}; "
            f"< 300 MB: {verdict(p_peak, TOC_PEAK_TARGET)}"
        )
        table.add(
            "`parse_toc`", p_s, p_peak / MB, p_start / MB, target if not self.quick else "(quick)"
        )
        table.add("`parse_toc` - baseline", p_s - j_s, (p_peak - j_peak) / MB, "", "")
        report.figures["toc.entries"] = toc.entries

    # ------------------------------------------------------------------------------------
    # Reading

    def read_throughput(self, report: Report) -> None:
        size = 2 * MiB if self.quick else self.read_size
        progress(f"{size / MiB:.0f} MiB of file data")
        data = text_bytes(size, seed=7)
        tar = self.workdir / "big.tar"
        write_tar(tar, [("data/big.bin", data)])
        table = report.table(
            f"Read: `BlobReader.read_file` of one {size / MiB:.0f} MiB file from a local blob, "
            "MB/s of file data",
            "blob",
            "blockfs `read_file` (verified)",
            "baseline: decompress only",
            "decompress + sha256",
            "blockfs / baseline",
        )
        table.notes.append(
            "Baselines read the same members from the same blob file with `os.pread` and "
            "decompress them with ISA-L's inflate (as blockfs does) / zstandard, without "
            "verification; the third column adds a sha256 of each chunk. Best of "
            f"{self.repeats} runs, page cache warm."
        )
        for compression in ("gzip", "zstd"):
            for chunk_size in (4 * MiB, 64 * 1024):
                label = f"{compression}, {_size_label(chunk_size)} chunks"
                progress(f"read {label}")
                blob = self.workdir / f"big-{compression}-{chunk_size}.esgz"
                options = BuildOptions(compression=compression, chunk_size=chunk_size)
                result = build_file(tar, blob, options)
                reader = BlobReader.open(FileBlobSource(blob), toc_digest=result.toc_digest)
                if reader.read_file("data/big.bin") != data:
                    raise RuntimeError(f"{blob}: read_file returned other bytes than were written")
                chunks = reader.toc.lookup("data/big.bin").chunks
                n = self.repeats
                ours = best_time(n, reader.read_file, "data/big.bin")
                plain = best_time(
                    n, decompress_members, blob, compression, chunks, hash_chunks=False
                )
                hashed = best_time(
                    n, decompress_members, blob, compression, chunks, hash_chunks=True
                )
                key = f"read.{compression}.{chunk_size}"
                report.figures[f"{key}.blockfs_mbps"] = rate(size, ours)
                report.figures[f"{key}.baseline_mbps"] = rate(size, plain)
                table.add(
                    label,
                    rate(size, ours),
                    rate(size, plain),
                    rate(size, hashed),
                    f"{plain / ours:.0%}",
                )
                blob.unlink()

    @property
    def repeats(self) -> int:
        return 1 if self.quick else self.repeat


def _level(options: BuildOptions) -> int:
    return options.gzip_level if options.compression == "gzip" else options.zstd_level


def _size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def _compress(command: list[str], src: Path, dst: Path) -> None:
    with open(src, "rb") as i, open(dst, "wb") as o:
        subprocess.run(command, stdin=i, stdout=o, check=True)


def _probe(mode: str, toc: Path, payload_end: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench._probe", mode, str(toc), str(payload_end)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"TOC probe {mode} failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result
