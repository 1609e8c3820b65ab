"""Cold container starts over a WAN-like link: full pull against blockfs, on images
converted without and with a profile of the workload, beside the ideal transfer of the
workload's read set.

``python -m tools.bench wan`` builds app images offline (``tools.mkimage``: a Python
image whose workload imports a few modules, a gcc image whose workload compiles hello
world), finds each workload's read set (``tools.bench._readset``), pushes each image to a
``docker-registry`` on loopback three ways (as built, gzip; converted to eStargz; optimized
by ``blockfs image optimize`` for the workload) and puts shaping proxies in front of it
(``tools.shaping_proxy``): one shaped like a WAN link (100 Mbit/s, 20 ms per request by
default), one not shaped (loopback). Every image reference names a proxy, so all
registry traffic goes through one and is counted. After checking that the shaped link
delivers what it is set to (``tools.bench._linkcheck``), it starts each image's workload
from a cold state (``tools.bench._coldstart``), ``--runs`` times, for each link and mode:

- ``overlayfs``: containerd's overlayfs snapshotter, ``ctr images pull`` of the gzip image;
- ``blockfs``: blockfs-snapshotter with its defaults, ``blockfs image pull`` of the eStargz
  image;
- ``cri``: the same, the eStargz image pulled by containerd's CRI plugin for blockfs (a
  ``PullImage`` call, as the kubelet makes it);
- ``optimized``: blockfs on the image that ``blockfs image optimize`` made by running the
  workload (its files prioritised in first-read order), the snapshotter's ``prefetch`` on;
- ``optimized-cri``: the same, that image pulled by containerd's CRI plugin.

It reports the median seconds of each phase, the requests and bytes that crossed the
link by the first line of output, and an ideal line computed from the read set
(``tools.bench._ideal``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from blockfs.oci import ImageLayout, Manifest, Reference
from blockfs.registry import RegistryClient
from tools.bench._coldstart import ColdStart, cold_start
from tools.bench._ideal import Ideal, ideal_transfer
from tools.bench._linkcheck import TOLERANCE, LinkCheck, check_link
from tools.bench._readset import ReadSet, trace_read_set, unpack_image
from tools.bench._report import MB, Machine, Report, progress
from tools.local_registry import start_registry
from tools.mkimage import APPS, build_app_image, build_base_image
from tools.mkimage._layers import PATH
from tools.shaping_proxy import ShapingProxy

BLOCKFS = [sys.executable, "-m", "blockfs.cli"]
REPOSITORY = "wan"


class LinkCheckFailed(Exception):
    """The shaped link is not the link it is set to be: the benchmark stops."""


@attrs.frozen
class Workload:
    """An image to build and the command whose cold start is measured."""

    name: str
    argv: tuple[str, ...]
    build: Callable[[Path], object]  # writes the image into an OCI layout, tag latest
    description: str


def workloads(*, unread_mb: int) -> dict[str, Workload]:
    """The benchmark's images by name: ``python`` and ``gcc``, and ``busybox`` (--quick)."""
    return {
        "python": Workload(
            "python",
            APPS["python"].workload,
            lambda out: build_app_image(out, "python", random_mb=unread_mb),
            f"busybox and libc; Python 3.11, byte-compiled; {unread_mb} MiB nothing reads; "
            "/app/hello.py",
        ),
        "gcc": Workload(
            "gcc",
            APPS["gcc"].workload,
            lambda out: build_app_image(out, "gcc"),
            "busybox and libc; gcc-12, cpp-12, binutils, libc6-dev and their libraries "
            "(`gcc` is gcc-12); /hello.c",
        ),
        "busybox": Workload(
            "busybox",
            ("/bin/sh", "-c", "echo hello"),
            lambda out: build_base_image(out, random_mb=1),
            "busybox; 1 MiB nothing reads",
        ),
    }


@attrs.frozen
class Mode:
    """How a cold start pulls: which image variant (tag), which snapshotter, its options."""

    name: str
    label: str
    tag: str
    snapshotter: str
    snapshotter_args: tuple[str, ...] = ()
    cri: bool = False  # pulled by containerd's CRI plugin, as the kubelet has it pull


MODES = (
    Mode("overlayfs", "overlayfs, full pull", "gzip", "overlayfs"),
    Mode("blockfs", "blockfs", "esgz", "blockfs"),
    Mode("cri", "blockfs, pulled through CRI", "esgz", "blockfs", cri=True),
    Mode("optimized", "blockfs, optimized + prefetch", "esgz-opt", "blockfs", ("--prefetch",)),
    Mode(
        "optimized-cri",
        "blockfs, optimized + prefetch, through CRI",
        "esgz-opt",
        "blockfs",
        ("--prefetch",),
        cri=True,
    ),
)


@attrs.frozen
class Link:
    """A route to the registry: its proxy's shaping."""

    name: str
    rate_bps: float | None
    delay: float

    def describe(self) -> str:
        if self.rate_bps is None and self.delay == 0:
            return "loopback, no shaping"
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} Mbit/s"
        return f"{rate}, {self.delay * 1000:g} ms per request"


@attrs.frozen
class Prepared:
    """An image pushed three ways, with its workload's read set and ideal transfer."""

    workload: Workload
    read_set: ReadSet
    sizes: dict[str, int]  # tag -> compressed size of the layers
    ideal: Ideal
    profiled: int  # files that ``blockfs image optimize`` prioritised


def push_layout(client: RegistryClient, layout_dir: Path, ref: str, tag: str = "latest") -> int:
    """Push the image ``tag`` of an OCI layout to ``ref`` as it is; its layers' size."""
    layout = ImageLayout(layout_dir)
    descriptor = layout.resolve(tag)
    manifest = layout.read_document(descriptor)
    if not isinstance(manifest, Manifest):
        raise TypeError(f"{layout_dir}:{tag} is not an image manifest")
    reference = Reference.parse(ref)
    for blob in (*manifest.layers, manifest.config):
        client.push_blob(reference, blob.digest, blob.size, layout.blob_path(blob.digest))
    client.push_manifest(
        reference,
        reference.tag_or_digest,
        descriptor.media_type,
        layout.read_blob(descriptor.digest),
    )
    return sum(layer.size for layer in manifest.layers)


def _convert(layout_dir: Path, ref: str) -> None:
    argv = [*BLOCKFS, "image", "convert", "--plain-http", f"oci:{layout_dir}:latest", ref]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"blockfs image convert to {ref} failed: {done.stderr.strip()}")


def _optimize(src: str, dst: str, argv: Sequence[str], profile: Path) -> int:
    """``blockfs image optimize`` of ``src`` into ``dst`` for the command ``argv``; how many
    files it prioritised."""
    done = subprocess.run(
        [*BLOCKFS, "image", "optimize", "--plain-http", "--record-out", str(profile), src, dst,
         "--cmd", *argv],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"blockfs image optimize of {src} failed: {done.stderr.strip()}")
    layers = json.loads(profile.read_text())["layers"]
    return sum(len(layer["files"]) for layer in layers)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class WanBench:
    """Prepares the images, checks the link, runs every mode on every link, reports."""

    def __init__(
        self,
        workdir: Path,
        *,
        images: Sequence[str],
        links: Sequence[str],
        runs: int,
        rate_bps: float,
        delay: float,
        check_bytes: int,
        enforce_check: bool = True,
        unread_mb: int = 40,
    ) -> None:
        self.workdir = workdir
        known = workloads(unread_mb=unread_mb)
        unknown = [name for name in images if name not in known]
        if unknown:
            raise ValueError(f"unknown image {', '.join(unknown)}; known: {', '.join(known)}")
        self.workloads = [known[name] for name in images]
        all_links = {
            "shaped": Link("shaped", rate_bps, delay),
            "loopback": Link("loopback", None, 0),
        }
        unknown = [name for name in links if name not in all_links]
        if unknown:
            raise ValueError(f"unknown link {', '.join(unknown)}; known: shaped, loopback")
        self.links = [all_links[name] for name in links]
        self.runs = runs
        self.check_bytes = check_bytes
        self.enforce_check = enforce_check

    def run(self, command: str) -> Report:
        report = Report(
            "WAN: cold container starts over a shaped link",
            command,
            Machine.describe(
                [("containerd", ["containerd", "--version"]), ("runc", ["runc", "--version"])]
            ),
        )
        with (
            start_registry(self.workdir / "registry") as registry,
            ShapingProxy(registry.host, rate_bps=None, delay=0) as loopback,
            contextlib.ExitStack() as stack,
        ):
            # The unshaped proxy is the loopback link, and the route of every push.
            proxies = {"loopback": loopback}
            for link in self.links:
                if link.name != "loopback":
                    proxies[link.name] = stack.enter_context(
                        ShapingProxy(registry.host, rate_bps=link.rate_bps, delay=link.delay)
                    )
            prepared = [self._prepare(w, loopback) for w in self.workloads]
            check = self._check(proxies, loopback)
            results = self._measure(prepared, proxies)
        self._report(report, prepared, results, check)
        return report

    # -- preparation -------------------------------------------------------------------

    def _prepare(self, workload: Workload, loopback: ShapingProxy) -> Prepared:
        layout = self.workdir / workload.name
        progress(f"{workload.name}: building the image")
        workload.build(layout)
        root = self.workdir / f"{workload.name}-root"
        unpack_image(layout, root)
        read_set = trace_read_set(root, workload.argv, env={"PATH": PATH})
        shutil.rmtree(root)
        progress(f"{workload.name}: the workload read {len(read_set.paths)} files")
        base = f"{loopback.host}/{REPOSITORY}/{workload.name}"
        with RegistryClient(plain_http=True) as client:
            sizes = {"gzip": push_layout(client, layout, f"{base}:gzip")}
            progress(f"{workload.name}: converting to eStargz, then optimizing")
            _convert(layout, f"{base}:esgz")
            profiled = _optimize(
                f"{base}:gzip", f"{base}:esgz-opt", workload.argv,
                self.workdir / f"{workload.name}-profile.json",
            )  # fmt: skip
            for tag in ("esgz", "esgz-opt"):
                _, manifest = client.get_image_manifest(Reference.parse(f"{base}:{tag}"))
                sizes[tag] = sum(layer.size for layer in manifest.layers)
            ideal = ideal_transfer(client, f"{base}:esgz-opt", read_set.paths)
        shutil.rmtree(layout)
        return Prepared(workload, read_set, sizes, ideal, profiled)

    def _check(self, proxies: dict[str, ShapingProxy], loopback: ShapingProxy) -> LinkCheck | None:
        shaped = proxies.get("shaped")
        if shaped is None:
            return None
        check = check_link(shaped, loopback.host, self.check_bytes)
        progress(f"link check: {check.describe()}")
        if not check.ok and self.enforce_check:
            raise LinkCheckFailed(
                f"the shaped link is off by more than {TOLERANCE:.0%}: {check.describe()}. "
                "Its figures would describe another link; is the machine too busy?"
            )
        return check

    # -- the runs ----------------------------------------------------------------------

    def _measure(
        self, prepared: Sequence[Prepared], proxies: dict[str, ShapingProxy]
    ) -> dict[tuple[str, str, str], list[ColdStart]]:
        results: dict[tuple[str, str, str], list[ColdStart]] = {}
        for i in range(self.runs):
            for link in self.links:
                proxy = proxies[link.name]
                for image in prepared:
                    name = image.workload.name
                    for mode in MODES:
                        ref = f"{proxy.host}/{REPOSITORY}/{name}:{mode.tag}"
                        run = cold_start(
                            proxy, ref, image.workload.argv, snapshotter=mode.snapshotter,
                            snapshotter_args=mode.snapshotter_args, name=f"wan-{i}-{mode.name}",
                            cri=mode.cri,
                        )  # fmt: skip
                        results.setdefault((link.name, name, mode.name), []).append(run)
                        progress(
                            f"run {i + 1} {link.name} {name} {mode.name}: pull "
                            f"{run.pull_seconds:.2f} s, create {run.create_seconds:.2f} s, run "
                            f"{run.run_seconds:.2f} s; at ready {run.at_ready.requests} requests, "
                            f"{run.at_ready.bytes / MB:.1f} MB ({run.line!r})"
                        )
        return results

    # -- the report --------------------------------------------------------------------

    def _report(
        self,
        report: Report,
        prepared: Sequence[Prepared],
        results: dict[tuple[str, str, str], list[ColdStart]],
        check: LinkCheck | None,
    ) -> None:
        report.facts.append(
            "Links: " + "; ".join(f"{link.name}: {link.describe()}" for link in self.links)
            + " (shaping proxy `tools/shaping_proxy.py` in front of a docker-registry on "
            "127.0.0.1; one token bucket for all connections, each request held for the delay)"
        )  # fmt: skip
        if check is not None:
            report.facts.append(
                f"Link self-check: {check.describe()}"
                + ("" if self.enforce_check else " (not enforced with --quick)")
            )
            report.figures["check.seconds"] = round(check.seconds, 3)
            report.figures["check.expected_seconds"] = round(check.expected, 3)
        for image in prepared:
            name = image.workload.name
            report.facts.append(
                f"Image `{name}`: {image.workload.description}; "
                f"{image.sizes['gzip'] / MB:.1f} MB gzip, {image.sizes['esgz'] / MB:.1f} MB "
                f"eStargz; workload `{' '.join(image.workload.argv)}` reads "
                f"{len(image.read_set.paths)} files of it (strace); `blockfs image optimize` "
                f"prioritised {image.profiled}"
            )
            for tag, size in image.sizes.items():
                report.figures[f"{name}.{tag}_bytes"] = size
            report.figures[f"{name}.read_set_files"] = len(image.read_set.paths)
            report.figures[f"{name}.profiled_files"] = image.profiled
            report.details[f"{name}.read_set"] = list(image.read_set.paths)
        for link in self.links:
            self._link_tables(report, link, prepared, results)
        report.tables[0].notes.append(_TIMES_NOTE)
        report.tables[1].notes.append(_PHASES_NOTE)

    def _link_tables(
        self,
        report: Report,
        link: Link,
        prepared: Sequence[Prepared],
        results: dict[tuple[str, str, str], list[ColdStart]],
    ) -> None:
        times = report.table(
            f"{link.name.capitalize()}: {link.describe()} (median of {self.runs})",
            "image", "mode", "pull", "create", "run to first output", "total",
            "vs full pull", "requests at ready", "MB at ready",
        )  # fmt: skip
        phases = report.table(
            f"{link.name.capitalize()}: requests / MB by phase (median of {self.runs})",
            "image", "mode", "pull", "create", "run to first output", "after first output",
        )  # fmt: skip
        for image in prepared:
            name = image.workload.name
            full_total = _median([r.total_seconds for r in results[(link.name, name, "overlayfs")]])
            for n, mode in enumerate(MODES):
                runs = results[(link.name, name, mode.name)]
                total = _median([r.total_seconds for r in runs])
                figures = {
                    "pull_seconds": _median([r.pull_seconds for r in runs]),
                    "create_seconds": _median([r.create_seconds for r in runs]),
                    "run_seconds": _median([r.run_seconds for r in runs]),
                    "total_seconds": total,
                    "ratio": total / full_total,
                    "requests_at_ready": _median([r.at_ready.requests for r in runs]),
                    "bytes_at_ready": _median([r.at_ready.bytes for r in runs]),
                }
                for key, value in figures.items():
                    report.figures[f"{link.name}.{name}.{mode.name}.{key}"] = round(value, 4)
                times.add(
                    name if n == 0 else "", mode.label,
                    *(f"{figures[k]:.2f} s" for k in
                      ("pull_seconds", "create_seconds", "run_seconds", "total_seconds")),
                    f"{figures['ratio']:.2f}", f"{figures['requests_at_ready']:g}",
                    f"{figures['bytes_at_ready'] / MB:.1f}",
                )  # fmt: skip
                phases.add(
                    name if n == 0 else "", mode.label,
                    *(_phase(runs, phase) for phase in ("pull", "create", "run", "after")),
                )  # fmt: skip
                report.details[f"{link.name}.{name}.{mode.name}.requests"] = runs[-1].requests
            ideal = image.ideal
            ideal_seconds = ideal.seconds(link.rate_bps, link.delay)
            report.figures[f"{link.name}.{name}.ideal.seconds"] = round(ideal_seconds, 4)
            report.figures[f"{link.name}.{name}.ideal.bytes"] = ideal.bytes
            report.figures[f"{link.name}.{name}.ideal.requests"] = ideal.requests
            times.add(
                "", "ideal (read set)", "", "", "",
                f"{ideal_seconds:.2f} s" if link.rate_bps else "—",
                f"{ideal_seconds / full_total:.2f}" if link.rate_bps else "—",
                ideal.requests, f"{ideal.bytes / MB:.1f}",
            )  # fmt: skip


def _phase(runs: Sequence[ColdStart], phase: str) -> str:
    requests = _median([getattr(r, phase).requests for r in runs])
    mb = _median([getattr(r, phase).bytes for r in runs]) / MB
    return f"{requests:g} / {mb:.1f}"


_TIMES_NOTE = (
    "Each run starts cold: a new containerd and blockfs-snapshotter (empty content store, "
    "snapshots and chunk cache) and `echo 3 > /proc/sys/vm/drop_caches`. Pull is `ctr images "
    "pull` of the gzip image (overlayfs), `blockfs image pull` of the eStargz image "
    "(blockfs) or a CRI `PullImage` call to containerd pulling it for blockfs (through CRI; "
    "containerd runs its CRI plugin then), create is `ctr containers create`, run is `ctr tasks start` until the first "
    "line of output. Total and every column are medians of their own, so a total is not "
    "always the sum of the phases. Requests and MB at ready are what the proxy had received "
    "and sent (response bodies) when that line appeared. The ideal line is the read set's "
    "compressed members plus every layer's footer and TOC plus manifest and config, at the "
    "link's bandwidth, plus one round trip each for the manifest, the config and each layer."
)
_PHASES_NOTE = (
    "Requests / MB (response bodies) that crossed the link in each phase; after first "
    "output runs until the container exited and its image was removed (with prefetch, "
    "what the snapshotter was still fetching)."
)
