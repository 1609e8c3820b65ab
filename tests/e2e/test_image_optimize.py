"""`blockfs image optimize` against a real docker-registry, with real mounts: the workload
runs in the sandbox over a lazily mounted staging image, the NBD servers trace its data
reads, and the image is rewritten with those files first in each layer.

The test image: busybox in its own layer, then 1,000 small files across two more layers
(``a/`` in one, ``b/`` in the other), where the top layer also replaces one file of the
middle layer and whites out another.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from blockfs.oci import ImageConfig, ImageLayout, Manifest, Reference
from blockfs.oci import media_types as mt
from blockfs.registry import RegistryClient
from tests.helpers.cli import blockfs
from tests.helpers.images import gunzipped_digest, make_layout, with_busybox
from tests.helpers.registry import start_registry, unique_repository
from tests.host.attach_testkit import force_cleanup, leftovers
from tools.local_registry import LocalRegistry

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]

PER_LAYER = 500
# What the workload of the main test reads, in this order, and what it only looks at.
X, Y, Z, W = "a/f123", "b/f456", "a/f007", "a/f200"
WORKLOAD = f"cat /{X} /{Y} /{Z}; stat /{W}"
# What the sandbox reads before the command starts (the user, as runc resolves it) and
# the command itself: data reads of the busybox layer.
BASE_READS = ["etc/passwd", "etc/group", "bin/busybox"]


def content(name: str) -> bytes:
    return (f"{name}\n" * 400).encode()[: 2000 + sum(map(ord, name)) % 3000]


def middle_layer(tree: Path) -> None:
    (tree / "a").mkdir()
    for i in range(PER_LAYER):
        (tree / "a" / f"f{i:03d}").write_bytes(content(f"a/f{i:03d}"))
    (tree / "a" / "replaced").write_text("the middle layer's copy\n" * 50)
    (tree / "a" / "gone").write_text("whited out above\n" * 50)


def top_layer(tree: Path) -> None:
    (tree / "b").mkdir()
    for i in range(PER_LAYER):
        (tree / "b" / f"f{i:03d}").write_bytes(content(f"b/f{i:03d}"))
    (tree / "a").mkdir()
    (tree / "a" / "replaced").write_text("the top layer's copy\n" * 50)
    (tree / "a" / ".wh.gone").write_bytes(b"")


@attrs.frozen
class Source:
    registry: LocalRegistry
    ref: str
    diff_ids: tuple[str, ...]


def push_layout(root: Path, ref: str) -> None:
    """Push the image ``v1`` of the OCI layout at ``root`` as it is (plain gzip layers)."""
    layout = ImageLayout(root)
    manifest = layout.read_document(layout.resolve("v1"))
    assert isinstance(manifest, Manifest)
    parsed = Reference.parse(ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        for d in [manifest.config, *manifest.layers]:
            client.push_blob(parsed, d.digest, d.size, layout.blob_path(d.digest))
        client.push_manifest(parsed, "v1", mt.OCI_MANIFEST, manifest.to_bytes())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """The plain (not eStargz) three-layer image, pushed to a registry logging requests."""
    base = tmp_path_factory.mktemp("optimize-src")
    make_layout(base / "layout", [with_busybox, middle_layer, top_layer])
    with start_registry(base / "registry", access_log=True) as registry:
        ref = f"{registry.host}/{unique_repository('optimize')}:v1"
        push_layout(base / "layout", ref)
        layout = ImageLayout(base / "layout")
        manifest = layout.read_document(layout.resolve("v1"))
        assert isinstance(manifest, Manifest)
        config = ImageConfig.from_bytes(layout.read_blob(manifest.config.digest))
        yield Source(registry, ref, config.diff_ids)


def optimize(
    source: Source, dst: str, work: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`blockfs image optimize SOURCE DST ARGS` with its temporary files under ``work``;
    nothing may be left running or mounted there afterwards."""
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    try:
        return blockfs(
            "image", "optimize", "--plain-http", "--tmpdir", str(work / "tmp"),
            source.ref, dst, *args, check=check, timeout=300,
        )  # fmt: skip
    finally:
        left = leftovers(work)
        force_cleanup(work)
        assert left == [], f"left behind: {left}"
        assert list((work / "tmp").iterdir()) == [], "the staging directory is left"


@attrs.frozen
class Optimized:
    ref: str
    profile: dict[str, Any]
    stdout: str
    manifest: Manifest
    config: ImageConfig


def pushed(ref: str) -> tuple[Manifest, ImageConfig]:
    parsed = Reference.parse(ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        _, manifest = client.get_image_manifest(parsed)
        config = ImageConfig.from_bytes(client.get_blob(parsed, manifest.config.digest))
    return manifest, config


@pytest.fixture(scope="module")
def optimized(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Optimized:
    """The image optimized for WORKLOAD, pushed, with the profile it recorded."""
    work = tmp_path_factory.mktemp("optimize-run")
    dst = f"{source.registry.host}/{unique_repository('optimized')}:v1"
    profile = work / "profile.json"
    out = optimize(source, dst, work, "--record-out", str(profile), "--cmd", "sh", "-c", WORKLOAD)
    manifest, config = pushed(dst)
    return Optimized(dst, json.loads(profile.read_text()), out.stdout, manifest, config)


def files_of(profile: dict[str, Any]) -> list[list[str]]:
    return [layer["files"] for layer in profile["layers"]]


def inspect(ref: str, digest: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return blockfs(
        "layer", "inspect", "--plain-http", *extra, f"{Reference.parse(ref).name}@{digest}"
    )


def test_only_the_files_read_are_prioritised_in_read_order_each_in_its_own_layer(source, optimized):
    assert "exited with status 0" in optimized.stdout
    # Keyed by the source layers' diff_ids, bottom first.
    assert [layer["diff_id"] for layer in optimized.profile["layers"]] == list(source.diff_ids)
    # Read order, not blob order: a/f123 before a/f007. The stat'ed a/f200 is not there.
    assert files_of(optimized.profile) == [BASE_READS, [X, Z], [Y]]
    for layer, expected in zip(optimized.manifest.layers, [BASE_READS, [X, Z], [Y]], strict=True):
        shown = json.loads(inspect(optimized.ref, layer.digest, "--json").stdout)
        assert shown["landmark"] == ".prefetch.landmark"
        assert shown["prioritized"] == expected
        regular = [e["name"] for e in shown["entries"] if e["type"] == "reg"]
        assert regular[: len(expected) + 1] == [*expected, ".prefetch.landmark"]
        assert len(regular) > (PER_LAYER if expected != BASE_READS else 2)
    human = inspect(optimized.ref, optimized.manifest.layers[1].digest).stdout
    assert "landmark:    .prefetch.landmark" in human
    assert f"prioritized: 2 file(s)\n  {X}\n  {Z}\n" in human


def test_the_optimized_image_is_plain_oci_and_every_layer_verifies(optimized, tmp_path):
    manifest, config = optimized.manifest, optimized.config
    assert manifest.media_type == mt.OCI_MANIFEST
    assert len(config.diff_ids) == len(manifest.layers) == 3
    parsed = Reference.parse(optimized.ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            assert layer.media_type == mt.OCI_LAYER_GZIP
            blob = tmp_path / "layer.gz"
            client.stream_blob(parsed, layer.digest, blob)
            assert gunzipped_digest(blob) == diff_id
            toc = layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
            assert "io.containers.estargz.uncompressed-size" in layer.annotations
            out = blockfs("layer", "verify", "--plain-http", "--toc-digest", toc,
                          f"{parsed.name}@{layer.digest}")  # fmt: skip
            assert out.stdout.startswith("OK:")


def test_a_file_an_upper_layer_replaces_or_whites_out_is_attributed_to_the_upper_layer(
    source, tmp_path
):
    dst = f"{source.registry.host}/{unique_repository('attribution')}:v1"
    profile = tmp_path / "profile.json"
    # a/replaced: both layers have it, the top one's is read. a/gone: whited out, cat
    # fails (and so the workload, with status 1). a/f001: only in the middle layer.
    script = "cat /a/replaced /a/gone /a/f001"
    out = optimize(source, dst, tmp_path, "--record-out", str(profile), "--cmd", "sh", "-c", script)
    assert "exited with status 1" in out.stdout
    assert files_of(json.loads(profile.read_text()))[1:] == [["a/f001"], ["a/replaced"]]


def test_a_failing_workload_is_reported_and_what_it_read_is_used(source, tmp_path):
    dst = f"{source.registry.host}/{unique_repository('failing')}:v1"
    profile = tmp_path / "profile.json"
    script = "cat /b/f010 /a/f300; exit 3"
    out = optimize(source, dst, tmp_path, "--record-out", str(profile), "--cmd", "sh", "-c", script)
    assert "exited with status 3" in out.stdout
    recorded = json.loads(profile.read_text())
    assert recorded["workload"]["exit_code"] == 3
    assert files_of(recorded)[1:] == [["a/f300"], ["b/f010"]]


def test_a_workload_that_never_exits_is_stopped_after_the_period_and_leaves_nothing(
    source, tmp_path
):
    dst = f"{source.registry.host}/{unique_repository('forever')}:v1"
    profile = tmp_path / "profile.json"
    # A child in the background and one in a session of its own: all must go.
    script = "cat /a/f042; sleep 1357 & setsid sleep 1358 & sleep 1000"
    out = optimize(
        source, dst, tmp_path, "--period", "2", "--record-out", str(profile),
        "--cmd", "sh", "-c", script,
    )  # fmt: skip
    assert "still running after 2 s: killed" in out.stdout
    recorded = json.loads(profile.read_text())
    assert recorded["workload"]["timed_out"] is True
    assert files_of(recorded)[1:] == [["a/f042"], []]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert cmdline not in (b"sleep\x001357\x00", b"sleep\x001358\x00", b"sleep\x001000\x00")
    # The layer nothing was read from has the no-prefetch landmark.
    top = pushed(dst)[0].layers[2]
    shown = json.loads(inspect(dst, top.digest, "--json").stdout)
    assert shown["landmark"] == ".no.prefetch.landmark"
    assert shown["prioritized"] == []


def test_record_in_gives_byte_identical_layers_and_runs_nothing(source, optimized, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(optimized.profile))
    dst = f"{source.registry.host}/{unique_repository('replayed')}:v1"
    # A command that cannot run: running anything would fail the optimize.
    out = optimize(source, dst, tmp_path, "--record-in", str(profile), "--cmd", "/no/such")
    assert "(nothing run)" in out.stdout
    manifest, config = pushed(dst)
    assert [d.digest for d in manifest.layers] == [d.digest for d in optimized.manifest.layers]
    assert manifest.layers == optimized.manifest.layers
    assert config.digest == optimized.config.digest


def test_with_prefetch_a_cold_start_fetches_each_prioritised_region_in_one_request(
    source, optimized, tmp_path
):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    root = str(tmp_path / "root")
    blockfs("image", "mount", "--plain-http", "--prefetch", "--root", root, optimized.ref, str(mnt))
    try:

        def layers() -> list[dict[str, Any]]:
            out = blockfs("image", "stats", "--json", "--root", root, str(mnt))
            return list(json.loads(out.stdout)["layers"])

        # Each layer's prefetch starts as it is attached, before anything reads.
        deadline = time.monotonic() + 60
        while not all(layer.get("members_fetched", 0) > 0 for layer in layers()):
            assert time.monotonic() < deadline, layers()
            time.sleep(0.1)
        for layer in layers():
            assert layer["range_requests"] == 1, layer
            assert layer["data_reads"] == 0, layer
        # The workload then reads only what is cached: no readahead past the last
        # prioritised file into the rest of the layer (over nbdfuse, the mount reads
        # the FUSE file with direct I/O; a kernel NBD device reads ahead within a file).
        run = subprocess.run(
            ["chroot", str(mnt), "/bin/busybox", "sh", "-c", WORKLOAD], capture_output=True
        )
        assert run.returncode == 0, run.stderr
        for name in (X, Y, Z):
            assert (mnt / name).read_bytes() == content(name)
        for layer in layers():
            assert layer["data_reads"] > 0, layer
            assert layer["range_requests"] == 1, layer
    finally:
        blockfs("image", "umount", "--root", root, str(mnt), check=False)
        left = leftovers(tmp_path)
        force_cleanup(tmp_path)
        assert left == [], f"left behind: {left}"


def test_containerd_pulls_and_runs_the_optimized_image_with_overlayfs(optimized):
    """A full pull by containerd's own overlayfs snapshotter: every layer downloaded,
    checked against its diff_id and unpacked; the container sees the files."""
    from tests.helpers.containerd import start_containerd

    with start_containerd() as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", optimized.ref)
        run = ctd.ctr(
            "run", "--rm", "--snapshotter", "overlayfs", optimized.ref, "optimized-check",
            "/bin/busybox", "sh", "-c", f"cat /{X} /{Y} /{Z} /a/replaced; ls /a | wc -l",
        )  # fmt: skip
        expected = b"".join(content(name) for name in (X, Y, Z))
        expected += b"the top layer's copy\n" * 50
        assert run.stdout.encode() == expected + f"{PER_LAYER + 1}\n".encode()
