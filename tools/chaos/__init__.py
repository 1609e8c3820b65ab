"""Reliability under a hostile link: full reads of a lazily mounted image through faults.

``python -m tools.chaos [--quick] [--record FILE] [--workdir DIR] [--keep]`` builds an
image offline (``tools.mkimage``'s busybox layer and a layer of random files of mixed
sizes), converts it to eStargz (``blockfs image convert``, small chunks so that a read
makes many range requests) into a ``docker-registry`` on loopback, and puts a
:class:`tools.fault_proxy.FaultProxy` in front of it. For each scenario (a fault kind and
a probability) it then, with a fresh state directory (so every chunk crosses the proxy):

1. mounts the image through the proxy (``blockfs image mount --plain-http``) with the
   proxy's faults off, so that the mount itself (manifest, config, footers, TOCs) goes
   through untouched, then arms the proxy;
2. reads every regular file of the mount (four threads) and compares each one's sha256
   with the file it was built from; a file that differs is compared byte by byte, and a
   read that fails with EIO is counted;
3. asks the mount's servers what they saw (``blockfs image stats --json``: verification
   failures, refetches, fetch errors);
4. unmounts (``blockfs image umount``) and checks that nothing is left: no mount under the
   work directory and no process (nbdkit, nbdfuse) naming it.

``--quick`` runs one scenario (bit flips in 30% of range responses) on a small image, in
seconds; that is what ``tests/e2e/test_chaos.py`` runs. The default runs bit flips at
20%, 30% and 50% and each other kind (stall, cut, error) at 20% and 50%. ``--record``
writes the results, with the machine, the date and the command, to a Markdown file
(``docs/reliability.md``).

The other parts are subcommands (``tools/chaos/_cli.py``): ``fuzz`` (the footer and TOC
parsers), ``cycles`` (container start/stop cycles through containerd), ``recovery``
(crash recovery times), ``hostile`` (hostile inputs to the ``blockfs`` command), and
``long``, the long version: a million fuzz inputs and 200 container cycles. Each records
its own section of the report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout
from tools.chaos._record import command_line, machine, now, record
from tools.fault_proxy import FAULT_KINDS, FaultProxy
from tools.local_registry import LocalRegistry, start_registry
from tools.mkimage import DEFAULT_CACHE, DebCache, add_layer, busybox_tree, write_image

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]
REPOSITORY = "chaos"
PIECE = 1 << 20
COUNTED_STATS = ("verification_failures", "refetches", "fetch_errors")
SUBCOMMANDS = ("fuzz", "cycles", "recovery", "hostile", "long")


@attrs.frozen
class Scenario:
    """One fault kind injected into a share of the blob range responses."""

    kind: str
    probability: float

    @property
    def name(self) -> str:
        return f"{self.kind} {self.probability:.0%}"


QUICK = (Scenario("flip", 0.30),)
DEFAULT = (
    Scenario("flip", 0.20),
    Scenario("flip", 0.30),
    Scenario("flip", 0.50),
    Scenario("stall", 0.20),
    Scenario("stall", 0.50),
    Scenario("cut", 0.20),
    Scenario("cut", 0.50),
    Scenario("error", 0.20),
    Scenario("error", 0.50),
)


@attrs.frozen
class ImageSpec:
    """The random layer's shape and how the image is converted."""

    files: int
    max_kib: int
    chunk_size: int
    stall_seconds: float

    def describe(self) -> str:
        return (
            f"busybox layer + {self.files} random files of 1 KiB to {self.max_kib} KiB; "
            f"eStargz, --chunk-size {self.chunk_size}"
        )


QUICK_IMAGE = ImageSpec(files=24, max_kib=384, chunk_size=64 << 10, stall_seconds=0.5)
DEFAULT_IMAGE = ImageSpec(files=96, max_kib=768, chunk_size=64 << 10, stall_seconds=1.0)


@attrs.define
class Result:
    """What one scenario's full read found."""

    scenario: str
    kind: str
    probability: float
    files: int = 0  # regular files read and compared
    bytes: int = 0  # bytes read and compared
    wrong_files: int = 0
    wrong_bytes: int = 0
    eio: int = 0  # files whose read failed with EIO
    other_errors: int = 0  # files whose read failed otherwise
    missing: int = 0  # expected files not in the mount
    unexpected: int = 0  # files in the mount not expected
    range_gets: int = 0  # blob range GETs while the faults were armed
    faults: dict[str, int] = attrs.field(factory=dict)
    verification_failures: int = 0
    refetches: int = 0
    fetch_errors: int = 0
    seconds: float = 0.0
    leftovers: list[str] = attrs.field(factory=list)
    error: str | None = None  # a mount that failed (faults are off while it mounts)

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    def ok(self) -> bool:
        return (
            self.wrong_bytes == 0
            and self.wrong_files == 0
            and self.eio == 0
            and self.other_errors == 0
            and self.missing == 0
            and self.unexpected == 0
            and not self.leftovers
            and self.error is None
        )


class ChaosError(Exception):
    """A step of the run (build, convert, mount, umount) failed."""


def _run(argv: Sequence[str], what: str, timeout: float = 600) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )
    if done.returncode != 0:
        raise ChaosError(f"{what} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def random_files_tree(dest: Path, files: int, max_kib: int, *, seed: int = 13) -> None:
    """``data/NNN.bin``: ``files`` files of random bytes, 1 KiB to ``max_kib`` KiB each,
    some of them half zeros (so that chunks compress differently)."""
    rng = random.Random(seed)
    (dest / "data").mkdir()
    for i in range(files):
        size = rng.randint(1, max_kib) * 1024 + rng.randint(0, 1023)
        data = rng.randbytes(size)
        if i % 3 == 0:
            data = data[: size // 2] + bytes(size - size // 2)
        (dest / "data" / f"{i:03d}.bin").write_bytes(data)


def regular_files(tree: Path) -> dict[str, Path]:
    """Every regular file below ``tree`` (symlinks not followed), by relative path."""
    found = {}
    for dirpath, _dirnames, filenames in os.walk(tree):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(tree))] = path
    return found


def build_image(workdir: Path, spec: ImageSpec, report: Callable[[str], None]) -> dict[str, Path]:
    """The OCI layout ``workdir/layout`` (tag latest); the source files by image path
    (kept under ``workdir/src``, the upper layer's winning)."""
    layout = ImageLayout.create(workdir / "layout")
    src = workdir / "src"
    busybox, randoms = src / "busybox", src / "random"
    busybox.mkdir(parents=True)
    randoms.mkdir()
    busybox_tree(busybox, DebCache(DEFAULT_CACHE))
    random_files_tree(randoms, spec.files, spec.max_kib)
    layers = [
        add_layer(layout, busybox, "blockfs chaos: busybox"),
        add_layer(layout, randoms, "blockfs chaos: random files"),
    ]
    write_image(layout, layers, "latest")
    expected = {**regular_files(busybox), **regular_files(randoms)}
    report(f"image: {len(expected)} files, {sum(p.stat().st_size for p in expected.values())} B")
    return expected


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            h.update(piece)
    return h.hexdigest()


def _wrong_bytes(got: Path, want: Path) -> int:
    """Bytes of ``got`` that differ from ``want``, a missing or extra byte counting one."""
    wrong = 0
    with open(got, "rb") as a, open(want, "rb") as b:
        while True:
            x, y = a.read(PIECE), b.read(PIECE)
            if not x and not y:
                return wrong
            wrong += sum(1 for i, j in zip(x, y, strict=False) if i != j) + abs(len(x) - len(y))


def read_and_compare(mnt: Path, expected: dict[str, Path], result: Result) -> None:
    """Read every regular file of ``mnt`` (four threads) and compare with ``expected``."""
    found = regular_files(mnt)
    result.missing = len(expected.keys() - found.keys())
    result.unexpected = len(found.keys() - expected.keys())

    def check(rel: str) -> tuple[str, int, int]:
        got = found[rel]
        try:
            digest = _sha256(got)
        except OSError as e:
            return ("eio" if e.errno == errno.EIO else "error", 0, 0)
        size = got.stat().st_size
        if digest == _sha256(expected[rel]):
            return ("ok", size, 0)
        return ("wrong", size, _wrong_bytes(got, expected[rel]))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for outcome, size, wrong in pool.map(check, sorted(found.keys() & expected.keys())):
            result.files += 1
            result.bytes += size
            if outcome == "eio":
                result.eio += 1
            elif outcome == "error":
                result.other_errors += 1
            elif outcome == "wrong":
                result.wrong_files += 1
                result.wrong_bytes += wrong


def leftovers(workdir: Path) -> list[str]:
    """Mounts under ``workdir`` and processes (other than this one) naming it."""
    left = []
    prefix = str(workdir.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            left.append(f"mount {point}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(prefix.encode() in arg for arg in argv):
            left.append(f"pid {entry.name}: {b' '.join(argv).decode(errors='replace')[:200]}")
    return left


def run_scenario(
    registry: LocalRegistry,
    expected: dict[str, Path],
    scenario: Scenario,
    workdir: Path,
    spec: ImageSpec,
    seed: int = 0,
) -> Result:
    """Mount through a fault proxy, read everything, look at the stats, unmount."""
    result = Result(scenario.name, scenario.kind, scenario.probability)
    here = workdir / f"{scenario.kind}-{round(scenario.probability * 100)}"
    root, mnt = here / "root", here / "mnt"
    mnt.mkdir(parents=True)
    started = time.monotonic()
    with FaultProxy(
        registry.host,
        probability=scenario.probability,
        kinds=(scenario.kind,),
        stall_seconds=spec.stall_seconds,
        seed=seed,
    ) as proxy:
        ref = f"{proxy.host}/{REPOSITORY}:latest"
        mount = [*BLOCKFS, "image", "mount", "--plain-http", "--root", str(root), ref, str(mnt)]
        umount = [*BLOCKFS, "image", "umount", "--root", str(root), str(mnt)]
        try:
            _run(mount, "blockfs image mount")
        except ChaosError as e:
            result.error = str(e)
            subprocess.run(umount, capture_output=True, stdin=subprocess.DEVNULL, check=False)
        else:
            try:
                proxy.arm()
                read_and_compare(mnt, expected, result)
                proxy.disarm()
                stats = json.loads(
                    _run(
                        [*BLOCKFS, "image", "stats", "--json", "--root", str(root), str(mnt)],
                        "blockfs image stats",
                    )
                )
                for layer in stats["layers"]:
                    for name in COUNTED_STATS:
                        setattr(result, name, getattr(result, name) + int(layer.get(name, 0)))
            finally:
                proxy.disarm()
                _run(umount, "blockfs image umount")
        result.range_gets = proxy.range_gets
        result.faults = proxy.faults()
    result.seconds = time.monotonic() - started
    result.leftovers = leftovers(here)
    return result


def run(
    workdir: Path,
    *,
    quick: bool,
    scenarios: Sequence[Scenario] | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> tuple[ImageSpec, list[Result]]:
    """Build, push and convert the image, then run each scenario; the results."""
    spec = QUICK_IMAGE if quick else DEFAULT_IMAGE
    scenarios = scenarios or (QUICK if quick else DEFAULT)
    expected = build_image(workdir, spec, report)
    with start_registry(workdir / "registry") as registry:
        _run(
            [
                *BLOCKFS,
                "image",
                "convert",
                "--plain-http",
                "--chunk-size",
                str(spec.chunk_size),
                f"oci:{workdir / 'layout'}:latest",
                f"{registry.host}/{REPOSITORY}:latest",
            ],
            "blockfs image convert",
        )
        results = []
        for i, scenario in enumerate(scenarios):
            result = run_scenario(registry, expected, scenario, workdir, spec, seed=i)
            report(
                f"{scenario.name}: {result.files} files, {result.bytes} B, "
                f"{result.wrong_bytes} wrong bytes, {result.eio} EIO, "
                f"{result.injected}/{result.range_gets} spoiled, "
                f"{result.verification_failures} verification failures, "
                f"{result.refetches} refetches, {result.fetch_errors} fetch errors, "
                f"{result.seconds:.1f} s"
                + (f", LEFT: {result.leftovers}" if result.leftovers else "")
                + (f", MOUNT FAILED: {result.error}" if result.error else "")
            )
            results.append(result)
        return spec, results


# -- the report ------------------------------------------------------------------------

HEADER = """\
## Faults between the registry and the mount

`python -m tools.chaos` mounts an image lazily through an HTTP proxy that spoils blob range
responses (`tools/fault_proxy.py`, a `ShapingProxy` that forwards to a real
`docker-registry`), reads every file of the mount and compares each with the file the
image was built from. What it proves, from the issue: *under a proxy flipping bits in 30%
of range responses, a full read of a mounted image gives 0 wrong bytes and 0 EIO*
(`tests/e2e/test_chaos.py` runs `--quick` and asserts that, and that flips were injected
and refetches happened).

The faults, each applied to a share of the blob range GETs (`GET .../blobs/...` with a
`Range` header) while the mount is read; the mount itself (manifest, config, footers,
TOCs) goes through untouched:

- **flip**: one to eight bits of the body flipped, same length and headers;
- **stall**: the body held for a while (the run's *Image* line says how long), then sent whole;
- **cut**: the headers promise the whole body, half of it comes, the connection closes;
- **error**: 500 or 503 instead of the body.

Columns: *files* and *MB* read and compared, *wrong B* bytes that differ from the
source (a verified read must never return them), *EIO* files whose read failed with an
I/O error, *spoiled* faults injected out of the blob range GETs seen, and the servers' own
counts from `blockfs image stats --json`: *verif. fail.* fetched members whose bytes did
not verify, *refetches* members fetched again after that, *fetch err.* members whose
fetch failed otherwise (and were not retried by the layer). *Clean* means no mount and no
process of the run was left after `blockfs image umount`.

Reading the figures: a response may carry many members, and its one to eight flipped bits
spoil the members they land in; only those fail verification and are fetched again (so
there can be more failures than flips); *verif. fail.* minus
*refetches* is the members that failed all three of their attempts. The NBD server then
fails that read, and yet no file read sees EIO: on the nbdfuse path the relay's retry
filter tries an error of the live server twice more, a second apart
([design.md](design.md), the relay), and each try fetches the member anew. Stalls cost
time only. A cut body or a 500/503 is a failed request, which the registry client
retries itself; a fetch that still fails is a *fetch err.* (not fetched again by the
layer), and the relay's retry filter covers those reads the same way.
"""


def markdown(
    results: Sequence[Result], spec: ImageSpec, *, command: str, quick: bool, seconds: float
) -> str:
    lines = [
        HEADER,
        f"### Run of {now()}",
        "",
        machine(),
        f"- Command: `{command}` ({'quick mode' if quick else 'default mode'}, "
        f"{seconds:.0f} s in all)",
        f"- Image: {spec.describe()}; stalls of {spec.stall_seconds:g} s; reads in 4 threads, "
        "a fresh state directory (empty chunk cache) for each scenario",
        "",
        "| faults | files | MB | wrong B | EIO | spoiled | verif. fail. | refetches "
        "| fetch err. | s | clean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.files} | {r.bytes / 1e6:.1f} | {r.wrong_bytes} | {r.eio} "
            f"| {r.injected}/{r.range_gets} | {r.verification_failures} | {r.refetches} "
            f"| {r.fetch_errors} | {r.seconds:.1f} | {'yes' if not r.leftovers else 'NO'} |"
        )
    for r in results:
        if r.error is not None:
            lines += ["", f"- {r.scenario}: not run, the mount failed: `{r.error[:400]}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        from tools.chaos._cli import main as subcommand

        return subcommand(argv)
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="bit flips at 30%%, small image")
    parser.add_argument("--record", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw results here")
    parser.add_argument("--workdir", type=Path, help="work here (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="KIND:PERCENT",
        help=f"run these instead (KIND among {', '.join(FAULT_KINDS)}), e.g. flip:30",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("mounting needs root")
    scenarios = None
    if args.scenario:
        scenarios = []
        for item in args.scenario:
            kind, _, percent = item.partition(":")
            if kind not in FAULT_KINDS or not percent.isdigit():
                parser.error(f"--scenario {item}: KIND:PERCENT, KIND among {FAULT_KINDS}")
            scenarios.append(Scenario(kind, int(percent) / 100))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blockfs-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        spec, results = run(workdir, quick=args.quick, scenarios=scenarios, report=say)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(
        results,
        spec,
        command=command_line(argv),
        quick=args.quick,
        seconds=time.monotonic() - started,
    )
    print(text)
    if args.record:
        record(args.record, "faults", text)
    if args.json:
        args.json.write_text(json.dumps([attrs.asdict(r) for r in results], indent=2) + "\n")
    return 0 if all(r.ok() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
