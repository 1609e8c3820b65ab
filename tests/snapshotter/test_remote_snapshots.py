"""End to end: lazy pulls through containerd 1.6 with blockfs-snapshotter as its proxy
snapshotter, from a real docker-registry behind a proxy that counts every byte served.

``blockfs image pull`` prepares each layer through containerd; the snapshotter mounts
eStargz layers lazily (remote snapshots) and leaves the others to containerd (fallback).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import grpc
import pytest
from remote_testkit import (
    CountingProxy,
    Layer,
    PushedImage,
    byte_ranges,
    estargz_layer,
    gzip_layer,
    push_test_image,
)

from blockfs.estargz import BlobReader, FileBlobSource
from blockfs.oci import Reference
from blockfs.registry import Credential, CredentialStore, RegistryClient
from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.metrics import metric_value
from snapshotter.remote import (
    CRI_IMAGE_LAYERS_LABEL,
    CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST_LABEL,
    CRI_MANIFEST_DIGEST_LABEL,
    PREFETCH_END_LABEL,
    TARGET_LABEL,
    TOC_DIGEST_LABEL,
    TOC_TAIL_LABEL,
)
from tests.helpers.cli import blockfs
from tests.helpers.containerd import (
    RUNC,
    Containerd,
    CRISettings,
    layer_tar,
    mounts_under,
    require_root_tools,
    short_tempdir,
    start_containerd,
)
from tests.helpers.elf import elf_file
from tests.helpers.registry import free_port, make_htpasswd, start_registry
from tests.helpers.snapshotter_daemon import SnapshotterDaemon, snapshots_stub, start_snapshotter
from tests.helpers.waiting import wait_for
from tests.host.attach_testkit import force_cleanup, leftovers
from tools.local_containerd import cri_call

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUSYBOX = Path("/bin/busybox")
BIG_BYTES = 50 << 20
READ_FILES = 16
PRIORITISED = ("etc/a", "etc/b")
FALLBACK_MSG = "remote snapshot not possible; containerd unpacks the layer"
LIB = "usr/lib/x86_64-linux-gnu"


@attrs.frozen
class Images:
    """Images in a registry reached through a counting proxy."""

    proxy: CountingProxy
    lazy: PushedImage  # eStargz: busybox, then 50 MB never read plus files read one by one
    sibling: PushedImage  # eStargz: the same busybox layer, then its own /etc/motd
    plain: PushedImage  # gzip only
    mixed: PushedImage  # gzip busybox, eStargz /etc/motd
    prio: PushedImage  # eStargz: busybox, then PRIORITISED first and 4 MiB not read
    libs: PushedImage  # eStargz: busybox, then a program and two libraries, one it needs
    # eStargz: a shell, a loader and libraries, then a program that needs some of them,
    # which the shell-form Cmd starts.
    start: PushedImage
    start_again: PushedImage  # start's bottom layer, then another program its Cmd names
    data: dict[str, bytes]  # the files of lazy's second layer, by path
    prio_data: dict[str, bytes]  # the files of prio's second layer, by path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    if not BUSYBOX.is_file():
        pytest.skip("needs the static busybox of the busybox-static Debian package")
    busybox = layer_tar({"bin/busybox": BUSYBOX.read_bytes()}, modes={"bin/busybox": 0o755})
    data: dict[str, bytes | None] = {"data/big": os.urandom(BIG_BYTES), "tmp": None}
    data.update({f"data/files/f{i:02}": os.urandom(64 << 10) for i in range(READ_FILES)})
    data_tar = layer_tar(data, modes={"tmp": 0o1777})
    motd = layer_tar({"etc/motd": b"lazy motd\n"})
    prio_data = {"etc/a": os.urandom(100 << 10), "etc/b": os.urandom(100 << 10)}
    prio_data["rest"] = os.urandom(4 << 20)
    prio_tar = layer_tar(dict(prio_data))
    # Libraries larger than the fetch unit: none comes along with a read of the program.
    libs_tar = layer_tar(
        {
            "usr/bin/prog": elf_file(["libfoo.so.1"], body=os.urandom(10_000)),
            f"{LIB}/libfoo.so.1": elf_file([], body=os.urandom(400 << 10)),
            f"{LIB}/libzzz.so.1": elf_file([], body=os.urandom(400 << 10)),
        }
    )
    # The program and the libraries its loader opens, one needing another, in the layer
    # beneath; each larger than the fetch unit, so that none comes along with another.
    start_base = layer_tar(
        {
            "bin/sh": b"#!a shell, never run",
            "etc/prog.conf": b"serve = yes",
            "lib64/ld-test.so.2": elf_file([]),
            f"{LIB}/libfoo.so.1": elf_file(["libbar.so.1"], body=os.urandom(400 << 10)),
            f"{LIB}/libbar.so.1": elf_file([], body=os.urandom(400 << 10)),
            f"{LIB}/libzzz.so.1": elf_file([], body=os.urandom(400 << 10)),
        },
        modes={"bin/sh": 0o755},
    )
    start_app = layer_tar(
        {"bin/prog": elf_file(["libfoo.so.1"], interpreter="/lib64/ld-test.so.2")},
        modes={"bin/prog": 0o755},
    )
    start_again_app = layer_tar(
        # Bytes of its own: the chunk cache, keyed by content, does not have them.
        {
            "bin/other": elf_file(
                ["libfoo.so.1"], interpreter="/lib64/ld-test.so.2", body=os.urandom(1000)
            )
        },
        modes={"bin/other": 0o755},
    )
    busybox_esgz = estargz_layer(busybox)
    start_base_esgz = estargz_layer(start_base)
    with start_registry(tmp_path_factory.mktemp("registry")) as registry:
        proxy = CountingProxy(registry.url)
        try:
            with RegistryClient(plain_http=True) as client:

                def push(name: str, layers: list[Layer], cmd: list[str]) -> PushedImage:
                    # Pushed straight to the registry; pulled through the proxy.
                    pushed = push_test_image(
                        client, Reference.parse(f"{registry.host}/{name}"), layers, cmd=cmd
                    )
                    ref = Reference.parse(f"{proxy.host}/{name}")
                    return attrs.evolve(pushed, ref=ref)

                yield Images(
                    proxy=proxy,
                    lazy=push(
                        "blockfs/lazy:1",
                        [busybox_esgz, estargz_layer(data_tar)],
                        ["/bin/busybox", "echo", "hello"],
                    ),
                    sibling=push(
                        "blockfs/sibling:1",
                        [busybox_esgz, estargz_layer(motd)],
                        ["/bin/busybox", "cat", "/etc/motd"],
                    ),
                    plain=push(
                        "blockfs/plain:1",
                        [gzip_layer(busybox), gzip_layer(motd)],
                        ["/bin/busybox", "cat", "/etc/motd"],
                    ),
                    mixed=push(
                        "blockfs/mixed:1",
                        [gzip_layer(busybox), estargz_layer(motd)],
                        ["/bin/busybox", "cat", "/etc/motd"],
                    ),
                    prio=push(
                        "blockfs/prio:1",
                        [busybox_esgz, estargz_layer(prio_tar, prioritized=PRIORITISED)],
                        ["/bin/busybox", "sha256sum", *(f"/{p}" for p in PRIORITISED)],
                    ),
                    libs=push(
                        "blockfs/libs:1",
                        [busybox_esgz, estargz_layer(libs_tar)],
                        ["/bin/busybox", "head", "-c", "4", "/usr/bin/prog"],
                    ),
                    start=push(
                        "blockfs/start:1",
                        [start_base_esgz, estargz_layer(start_app)],
                        # Docker's shell form
                        ["/bin/sh", "-c", "exec prog --config=/etc/prog.conf"],
                    ),
                    start_again=push(
                        "blockfs/start-again:1",
                        [start_base_esgz, estargz_layer(start_again_app)],
                        ["/bin/other"],
                    ),
                    data={path: body for path, body in data.items() if body is not None},
                    prio_data=prio_data,
                )
        finally:
            proxy.close()


@attrs.define
class Stack:
    """blockfs-snapshotter as containerd's proxy snapshotter ``blockfs``."""

    work: Path
    snapshotter: SnapshotterDaemon
    containerd: Containerd
    metrics_address: str
    exits: contextlib.ExitStack

    @property
    def root(self) -> Path:
        return self.work / "root"

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr(*args).stdout

    def pull(self, image: PushedImage, *, local: bool = False) -> str:
        """``blockfs image pull``: done by the daemon, or with ``local`` by the command."""
        how = ["--local"] if local else ["--pull-socket", str(self.snapshotter.pull_socket)]
        return blockfs(
            "image", "pull", "--plain-http", "--address", str(self.containerd.address),
            "--namespace", self.containerd.namespace, *how, str(image.ref),
        ).stdout  # fmt: skip

    def pulls_requested(self) -> int:
        """How many pulls the daemon took on its pull socket."""
        return sum(1 for r in self.snapshotter.log_records() if r.get("msg") == "pull requested")

    def run(self, image: PushedImage, name: str, *argv: str) -> str:
        return self.ctr("run", "--rm", "--snapshotter", "blockfs", str(image.ref), name, *argv)

    def snapshots(self) -> dict[str, tuple[str, str]]:
        """``ctr snapshots ls``: containerd's name -> (parent, kind)."""
        rows = {}
        for line in self.ctr("snapshots", "--snapshotter", "blockfs", "ls").splitlines()[1:]:
            fields = line.split()
            rows[fields[0]] = (fields[1], fields[2]) if len(fields) == 3 else ("", fields[1])
        return rows

    def backend_snapshots(self) -> list[pb.Info]:
        with self.snapshotter.channel() as channel:
            stub = snapshots_stub(channel)
            return [i for m in stub.List(pb.ListSnapshotsRequest(), timeout=30) for i in m.info]

    def layer_dirs(self) -> list[str]:
        return sorted(os.listdir(self.root / "layers"))

    def exports(self) -> list[str]:
        """The NBD server's export list, asked over NBD."""
        socket = self.root / "run" / "nbd.sock"
        done = subprocess.run(
            ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={socket}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return sorted(e["export-name"] for e in json.loads(done.stdout)["exports"])

    def restart_snapshotter(self, sig: signal.Signals) -> None:
        self.snapshotter.stop(sig)
        self.snapshotter = self.exits.enter_context(
            start_snapshotter(
                self.root, self.work / "s.sock", "--metrics-address", self.metrics_address
            )
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def fallback_records(self) -> list[dict[str, object]]:
        return [r for r in self.snapshotter.log_records() if r.get("msg") == FALLBACK_MSG]

    def fallback_reasons(self) -> str:
        """Each fallback's record in full, one per line (an assertion's repr cuts them)."""
        return "\n".join(json.dumps(r) for r in self.fallback_records())


@pytest.fixture
def stack() -> Iterator[Stack]:
    require_root_tools(RUNC)
    work = short_tempdir("bfs-rs-")
    metrics = f"127.0.0.1:{free_port()}"
    try:
        with contextlib.ExitStack() as exits:
            snapshotter = exits.enter_context(
                start_snapshotter(work / "root", work / "s.sock", "--metrics-address", metrics)
            )
            containerd = exits.enter_context(start_containerd({"blockfs": work / "s.sock"}))
            yield Stack(work, snapshotter, containerd, metrics, exits)
    finally:
        left = leftovers(work)
        force_cleanup(work)
        shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"left behind: {left}"


def remove_image(stack: Stack, image: PushedImage) -> None:
    # --sync waits for containerd's garbage collection, which removes the snapshots.
    stack.ctr("images", "rm", "--sync", str(image.ref))


def assert_clean(stack: Stack) -> None:
    assert stack.backend_snapshots() == []
    assert stack.layer_dirs() == []
    assert stack.exports() == []
    assert os.listdir(stack.root / "snapshots") == []
    assert mounts_under(stack.work) == []
    nbdfuse = [p for p in leftovers(stack.work) if "nbdfuse" in p]
    assert nbdfuse == []


def test_pull_then_run_is_lazy_and_shares_layers(stack: Stack, images: Images) -> None:
    lazy, sibling = images.lazy, images.sibling
    images.proxy.reset()
    out = stack.pull(lazy)  # by the daemon
    assert out.count(": lazy (") == 2, f"{out}\nfallbacks:\n{stack.fallback_reasons()}"
    assert stack.pulls_requested() == 1
    assert stack.ctr("leases", "ls", "-q") == ""  # the pull's lease ended with it
    assert stack.run(lazy, "hello-1", "/bin/busybox", "echo", "hello") == "hello\n"
    # Counted at the registry: manifest, config, each layer's footer and TOC, busybox.
    fetched = images.proxy.total_bytes
    assert fetched < lazy.compressed_size * 0.2, (fetched, lazy.compressed_size)
    assert images.proxy.blob_bytes.get(lazy.layers[1].digest, 0) < 1 << 20

    bottom, top = lazy.chain_ids
    assert stack.snapshots() == {bottom: ("", "Committed"), top: (bottom, "Committed")}
    info = json.loads(stack.ctr("snapshots", "--snapshotter", "blockfs", "info", top))
    assert info["Labels"]["containerd.io/snapshot/remote"] == "true"
    [usage] = stack.ctr("snapshots", "--snapshotter", "blockfs", "usage", top).splitlines()[1:]
    assert usage.split()[1:] == ["0.0", "B", "0"]
    names = [f"sha256-{layer.digest.split(':')[1]}" for layer in lazy.layers]
    assert stack.layer_dirs() == sorted(names)
    assert stack.exports() == sorted(names)

    # The second image shares the busybox layer: it is attached and mounted once. The
    # command pulls it by itself this time.
    assert stack.pull(sibling, local=True).count(": lazy (") == 2
    assert stack.pulls_requested() == 1
    assert stack.run(sibling, "motd-1") == "lazy motd\n"
    sibling_top = f"sha256-{sibling.layers[1].digest.split(':')[1]}"
    assert stack.layer_dirs() == sorted([*names, sibling_top])
    erofs = [m for m in mounts_under(stack.root / "layers") if m.endswith("/mnt")]
    assert len(erofs) == 3

    metrics = stack.metrics()
    assert metric_value(metrics, "blockfs_layers_mounted") == 3
    busybox_fetched = metric_value(
        metrics, "blockfs_layer_fetched_bytes_total", [("layer", names[0])]
    )
    assert busybox_fetched is not None and busybox_fetched > 0

    # Removing one image releases only the layers no other image uses.
    remove_image(stack, lazy)
    assert stack.layer_dirs() == sorted([names[0], sibling_top])
    assert stack.run(sibling, "motd-2") == "lazy motd\n"
    remove_image(stack, sibling)
    assert_clean(stack)


def test_a_pull_the_daemon_cannot_do_fails_with_its_reason(stack: Stack, images: Images) -> None:
    missing = f"{images.lazy.ref.registry}/blockfs/lazy:no-such-tag"
    done = blockfs(
        "image", "pull", "--plain-http", "--address", str(stack.containerd.address),
        "--namespace", stack.containerd.namespace, "--pull-socket",
        str(stack.snapshotter.pull_socket), missing, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("blockfs: error: no such manifest"), line
    assert stack.pulls_requested() == 1
    assert stack.ctr("images", "ls", "-q") == ""
    # The lease the pull took while the registry answered is gone.
    assert stack.ctr("leases", "ls", "-q") == ""


def test_the_daemon_reads_the_layers_tocs_while_the_config_comes(
    stack: Stack, images: Images
) -> None:
    lazy = images.lazy
    layers = {f"/blobs/{layer.digest}" for layer in lazy.layers}
    images.proxy.reset()

    def the_config(method: str, path: str, range_: str) -> bool:
        # The one whole blob GET that is not a layer's.
        return (
            method == "GET"
            and "/blobs/" in path
            and not range_
            and not path.endswith(tuple(layers))
        )

    def every_toc_asked(arrived: list[tuple[str, str, str]]) -> bool:
        asked = {p for m, p, r in arrived if m == "GET" and r}
        return all(any(p.endswith(layer) for p in asked) for layer in layers)

    with images.proxy.holding(the_config, every_toc_asked) as held:
        assert stack.pull(lazy).count(": lazy (") == 2
    assert held == [True]
    # Each footer and TOC came in one request of exactly the size the image gives.
    for layer in lazy.layers:
        tail = int(layer.annotations["containerd.io/snapshot/blockfs/toc.tail"])
        [first, *_] = images.proxy.blob_ranges[layer.digest]
        size = len(layer.blob)
        assert first in (f"bytes=-{tail}", f"bytes={size - tail}-{size - 1}"), first
    assert stack.run(lazy, "toc-ahead", "/bin/busybox", "echo", "hello") == "hello\n"
    remove_image(stack, lazy)
    assert_clean(stack)


def test_a_pull_preloads_the_prioritised_files_in_one_request_without_waiting_for_the_toc(
    stack: Stack, images: Images
) -> None:
    prio = images.prio
    layer = prio.layers[1]
    end = int(layer.annotations["containerd.io/snapshot/blockfs/prefetch.end"])
    size = len(layer.blob)
    images.proxy.reset()

    def its_toc(method: str, path: str, range_: str) -> bool:
        return path.endswith(layer.digest) and range_.endswith(f"-{size - 1}")

    def its_region_asked(arrived: list[tuple[str, str, str]]) -> bool:
        return any(p.endswith(layer.digest) and r.startswith("bytes=0-") for _, p, r in arrived)

    # The layer's footer and TOC read is held until its region has been asked for.
    with images.proxy.holding(its_toc, its_region_asked) as held:
        assert stack.pull(prio).count(": lazy (") == 2
    assert held == [True], [
        r for r in stack.snapshotter.log_records() if "preload" in str(r.get("msg"))
    ]
    out = stack.run(prio, "prio-1")
    assert out.split() == [
        word
        for path in PRIORITISED
        for word in (hashlib.sha256(images.prio_data[path]).hexdigest(), f"/{path}")
    ]
    # One request brought the region: from the blob's start to its landmark (a prefetch
    # made once the layer is indexed would start at the first file's member).
    ranges = byte_ranges(images.proxy.blob_ranges[layer.digest])
    assert [r for r in ranges if r[0] < end] == [(0, end)], ranges
    # The layer that prioritises nothing has no region to preload.
    assert "containerd.io/snapshot/blockfs/prefetch.end" not in prio.layers[0].annotations
    assert not any(
        r.startswith("bytes=0-") for r in images.proxy.blob_ranges[prio.layers[0].digest]
    )
    remove_image(stack, prio)
    assert_clean(stack)


def test_a_pull_fetches_the_image_command_before_a_container_runs(
    stack: Stack, images: Images
) -> None:
    lazy = images.lazy  # Cmd /bin/busybox, the whole of its bottom layer
    busybox_layer = lazy.layers[0].digest
    images.proxy.reset()
    stack.pull(lazy)
    deadline = time.monotonic() + 30
    while not (
        fetched := [
            r
            for r in stack.snapshotter.log_records()
            if r.get("msg") == "fetching ahead" and r.get("why") == "command"
        ]
    ):
        assert time.monotonic() < deadline, "the daemon did not fetch the command"
        time.sleep(0.05)
    [record] = fetched[-1:]
    assert record["file"] == "bin/busybox"
    assert record["layer"] == f"sha256-{busybox_layer.split(':')[1]}"
    # One range request for the whole executable, besides the footer and TOC read.
    while images.proxy.blob_bytes.get(busybox_layer, 0) < record["bytes"]:
        assert time.monotonic() < deadline, images.proxy.blob_ranges
        time.sleep(0.05)
    # (The footer and TOC read is the one that ends at the blob's end.)
    tail = f"-{len(lazy.layers[0].blob) - 1}"
    ranges = images.proxy.blob_ranges[busybox_layer]
    assert len([r for r in ranges if not r.endswith(tail)]) == 1, ranges
    before = images.proxy.blob_bytes[busybox_layer]
    # The container finds it cached: its layer costs no more requests.
    assert stack.run(lazy, "command-ahead", "/bin/busybox", "echo", "hello") == "hello\n"
    assert images.proxy.blob_bytes[busybox_layer] == before
    remove_image(stack, lazy)
    assert_clean(stack)


def asked_for(images: Images, layer: Layer, tmp_path: Path) -> Callable[[str], bool]:
    """Whether a range request for ``layer``'s blob has covered the whole of a file."""
    blob = tmp_path / f"{layer.digest.split(':')[1]}.esgz"
    blob.write_bytes(layer.blob)
    toc = BlobReader.open(FileBlobSource(blob)).toc

    def asked(name: str) -> bool:
        chunks = toc.lookup(name).chunks
        start, end = chunks[0].offset, max(c.end for c in chunks)
        ranges = [
            (int(a), int(b) + 1)
            for header in images.proxy.blob_ranges.get(layer.digest, [])
            for a, _, b in [header.removeprefix("bytes=").partition("-")]
            if a  # not a suffix range (the footer and TOC)
        ]
        return any(a <= start and end <= b for a, b in ranges)

    return asked


def test_a_program_read_fetches_the_library_it_needs(
    stack: Stack, images: Images, tmp_path: Path
) -> None:
    libs = images.libs
    asked = asked_for(images, libs.layers[1], tmp_path)
    stack.pull(libs)
    # Nothing runs the program: the container only reads its first bytes, and the NBD
    # server fetches the library the program names, not the one beside it.
    assert stack.run(libs, "libraries").encode() == b"\x7fELF"
    wait_for(lambda: asked(f"{LIB}/libfoo.so.1"))
    assert not asked(f"{LIB}/libzzz.so.1")
    remove_image(stack, libs)
    assert_clean(stack)


def test_a_pull_fetches_what_the_shell_form_command_loads_from_the_layers_beneath(
    stack: Stack, images: Images, tmp_path: Path
) -> None:
    images.proxy.reset()
    stack.pull(images.start)
    assert_start_fetched_ahead(images, stack.snapshotter, tmp_path)
    remove_image(stack, images.start)
    assert_clean(stack)


def fetched_ahead(daemon: SnapshotterDaemon, image: PushedImage) -> dict[str, str]:
    """The files of ``image``'s layers that ``daemon`` had fetched ahead, and why."""
    layers = {f"sha256-{layer.digest.split(':')[1]}" for layer in image.layers}
    return {
        r["file"]: r["why"]
        for r in daemon.log_records()
        if r.get("msg") == "fetching ahead" and r.get("layer") in layers
    }


def assert_start_fetched_ahead(images: Images, daemon: SnapshotterDaemon, tmp_path: Path) -> None:
    """No container runs: the pull alone has the NBD server fetch the shell, the program
    its script starts (in the layer above) and the file the script names, the loader
    the program names and the library it needs (in the layer beneath), and the library
    that one needs in turn."""
    base, app = (asked_for(images, layer, tmp_path) for layer in images.start.layers)
    wait_for(lambda: app("bin/prog"))
    for name in (
        "bin/sh",
        "etc/prog.conf",
        "lib64/ld-test.so.2",
        f"{LIB}/libfoo.so.1",
        f"{LIB}/libbar.so.1",
    ):
        wait_for(functools.partial(base, name))
    assert not base(f"{LIB}/libzzz.so.1")
    assert fetched_ahead(daemon, images.start) == {
        "bin/sh": "command",
        "bin/prog": "command",
        "etc/prog.conf": "argument",
        "lib64/ld-test.so.2": "loader",
        f"{LIB}/libfoo.so.1": "loader",
        f"{LIB}/libbar.so.1": "loader",
    }


def test_a_pull_fetches_ahead_from_its_new_layers_over_a_layer_it_shares(
    stack: Stack, images: Images, tmp_path: Path
) -> None:
    # start_again shares start's bottom layer, indexed by the first pull: its TOC is not
    # read again, and the command is looked for in the layers above it alone.
    stack.pull(images.start)
    wait_for(lambda: len(fetched_ahead(stack.snapshotter, images.start)) == 6)
    first = len(stack.snapshotter.log_records())
    stack.pull(images.start_again)
    app = asked_for(images, images.start_again.layers[1], tmp_path)
    wait_for(lambda: app("bin/other"))
    top = f"sha256-{images.start_again.layers[1].digest.split(':')[1]}"
    ahead = [
        (r["layer"], r["file"], r["why"])
        for r in stack.snapshotter.log_records()[first:]
        if r.get("msg") == "fetching ahead"
    ]
    assert ahead == [(top, "bin/other", "command")]
    remove_image(stack, images.start_again)
    remove_image(stack, images.start)
    assert_clean(stack)


def test_plain_and_mixed_images_run_through_the_fallback(stack: Stack, images: Images) -> None:
    plain, mixed = images.plain, images.mixed
    assert stack.pull(plain).count(": unpacked (") == 2
    assert stack.run(plain, "plain-1") == "lazy motd\n"
    out = stack.pull(mixed)
    assert out.count(": unpacked (") == 1 and out.count(": lazy (") == 1
    assert stack.run(mixed, "mixed-1") == "lazy motd\n"
    bottom, top = mixed.chain_ids
    rows = stack.snapshots()
    assert rows[bottom] == ("", "Committed") and rows[top] == (bottom, "Committed")
    # Each fallback is logged with the layer and the reason.
    reasons = {r["layer_digest"]: str(r["reason"]) for r in stack.fallback_records()}
    for layer in (*plain.layers, mixed.layers[0]):
        assert "not an eStargz layer" in reasons[layer.digest]
    assert mixed.layers[1].digest not in reasons
    assert stack.layer_dirs() == [f"sha256-{mixed.layers[1].digest.split(':')[1]}"]
    # Pulled again, each layer is found there, and said to be as it was.
    assert stack.pull(mixed) == out
    assert stack.pull(plain).count(": unpacked (") == 2

    remove_image(stack, plain)
    remove_image(stack, mixed)
    assert_clean(stack)


def test_containers_survive_kill_9_of_the_daemon(stack: Stack, images: Images) -> None:
    lazy = images.lazy
    stack.pull(lazy)
    # Reads a file it never read before every quarter second: each read reaches the
    # registry through nbdfuse and the NBD server, never through the daemon.
    script = (
        "for f in /data/files/*; do /bin/busybox cat $f > /dev/null || exit 3; "
        "/bin/busybox sleep 0.25; done; echo read-all"
    )
    result: list[subprocess.CompletedProcess[str]] = []
    reader = threading.Thread(
        target=lambda: result.append(
            stack.containerd.ctr(
                "run", "--rm", "--snapshotter", "blockfs", str(lazy.ref), "reader",
                "/bin/busybox", "sh", "-c", script, check=False,
            )
        )
    )  # fmt: skip
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while "RUNNING" not in stack.ctr("tasks", "ls"):
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.1)
        time.sleep(1)
        stack.restart_snapshotter(signal.SIGKILL)
    finally:
        reader.join(timeout=60)
    [done] = result
    assert (done.returncode, done.stdout) == (0, "read-all\n"), done.stderr
    log = [r["msg"] for r in stack.snapshotter.log_records()]
    assert "adopted the running NBD server" in log
    assert log.count("adopted layer mount") == 2

    # containerd redials the restarted daemon; a second container starts from the image.
    deadline = time.monotonic() + 30
    while True:
        run = stack.containerd.ctr(
            "run", "--rm", "--snapshotter", "blockfs", str(lazy.ref), "after", check=False
        )
        if run.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert run.stdout == "hello\n", run.stderr
    remove_image(stack, lazy)
    assert_clean(stack)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _exec(stack: Stack, container: str, exec_id: str, script: str) -> str:
    """``script`` run by busybox sh in the running ``container``; its output."""
    done = stack.containerd.ctr(
        "tasks", "exec", "--exec-id", exec_id, container, "/bin/busybox", "sh", "-c", script,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{script}: {done.stderr}"
    return done.stdout


def _remove_container(stack: Stack, name: str) -> None:
    stack.containerd.ctr("tasks", "kill", "--signal", "SIGKILL", name, check=False)
    deadline = time.monotonic() + 60
    while stack.containerd.ctr("tasks", "delete", name, check=False).returncode != 0:
        if name not in stack.ctr("tasks", "ls") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stack.containerd.ctr("containers", "delete", name, check=False)


def test_a_running_container_reads_on_and_new_ones_start_when_nbdkit_is_killed(
    stack: Stack, images: Images
) -> None:
    lazy = images.lazy
    stack.pull(lazy)
    # A running container holding a file of the lazy data layer open, having read none
    # of its files.
    stack.ctr(
        "run", "-d", "--snapshotter", "blockfs", str(lazy.ref), "holder",
        "/bin/busybox", "sh", "-c", "exec 3</data/big; exec /bin/busybox sleep 600",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "RUNNING" not in stack.ctr("tasks", "ls"):
            assert time.monotonic() < deadline, stack.ctr("tasks", "ls")
            time.sleep(0.1)
        server = int((stack.root / "run" / "nbdkit.pid").read_text())
        killed = time.monotonic()
        os.kill(server, signal.SIGKILL)

        # A new container from the same image starts and reads a file nobody read.
        run = stack.containerd.ctr(
            "run", "--rm", "--snapshotter", "blockfs", str(lazy.ref), "after",
            "/bin/busybox", "sha256sum", "/data/files/f07", check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - killed
        print(f"new container's output {elapsed:.2f} s after kill -9 of nbdkit")
        assert run.returncode == 0, run.stderr
        assert run.stdout.split()[0] == _sha256(images.data["data/files/f07"])
        assert elapsed < 60  # about 2 to 3 s: the watchdog's restart, then the relay's

        # The running container reads data it never read, through the same mounts.
        for i, name in enumerate(("data/files/f03", "data/files/f12")):
            out = _exec(stack, "holder", f"read-{i}", f"/bin/busybox sha256sum /{name}")
            assert out.split()[0] == _sha256(images.data[name])
        mib = 1 << 20
        out = _exec(
            stack, "holder", "read-big",
            "/bin/busybox dd if=/data/big bs=1048576 skip=20 count=4 2>/dev/null"
            " | /bin/busybox sha256sum",
        )  # fmt: skip
        assert out.split()[0] == _sha256(images.data["data/big"][20 * mib : 24 * mib])
    finally:
        _remove_container(stack, "holder")
    log = [r["msg"] for r in stack.snapshotter.log_records()]
    assert "the NBD server exited while layers are attached; restarting it" in log
    assert log.count("reconnected layer") == 2  # both layers, through their relays
    assert not any(m.startswith("attached layer again") for m in log)
    remove_image(stack, lazy)
    assert_clean(stack)


def test_eight_containers_at_once_fetch_each_chunk_once(stack: Stack, images: Images) -> None:
    lazy = images.lazy
    stack.pull(lazy)
    images.proxy.reset()
    script = "/bin/busybox cat /data/files/* | /bin/busybox md5sum"
    results: list[subprocess.CompletedProcess[str]] = []

    def run(i: int) -> None:
        results.append(
            stack.containerd.ctr(
                "run", "--rm", "--snapshotter", "blockfs", str(lazy.ref), f"many-{i}",
                "/bin/busybox", "sh", "-c", script, check=False,
            )
        )  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1
    # Counted at the registry: no byte of the data layer was asked for twice.
    ranges = byte_ranges(images.proxy.blob_ranges[lazy.layers[1].digest])
    overlaps = [(a, b) for a, b in itertools.pairwise(ranges) if b[0] < a[1]]
    assert overlaps == []
    assert sum(end - start for start, end in ranges) >= READ_FILES * (64 << 10)
    remove_image(stack, lazy)
    assert_clean(stack)


@contextlib.contextmanager
def cri_node(images: Images, work: Path) -> Iterator[tuple[SnapshotterDaemon, Containerd]]:
    """blockfs-snapshotter and containerd with its CRI plugin pulling for blockfs, as on a
    Kubernetes node; the registry speaks plain HTTP, as a hosts.toml says to both."""
    require_root_tools(RUNC)
    hosts = work / "hosts"
    (hosts / images.proxy.host).mkdir(parents=True)
    (hosts / images.proxy.host / "hosts.toml").write_text(
        f'server = "http://{images.proxy.host}"\n'
    )
    cri = CRISettings(snapshotter="blockfs", hosts_dir=hosts)
    try:
        with (
            start_snapshotter(work / "root", work / "s.sock", "--hosts-dir", str(hosts)) as sn,
            start_containerd({"blockfs": work / "s.sock"}, namespace="k8s.io", cri=cri) as ctd,
        ):
            yield sn, ctd
    finally:
        left = leftovers(work)
        force_cleanup(work)
        shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"left behind: {left}"


def wait_collected(daemon: SnapshotterDaemon) -> None:
    """Wait until containerd's garbage collection has removed every snapshot of ``daemon``
    (after CRI's RemoveImage, which does not wait for it)."""

    def collected() -> bool:
        with daemon.channel() as channel:
            return not list(snapshots_stub(channel).List(pb.ListSnapshotsRequest(), timeout=30))

    wait_for(collected)


def test_cri_pull_image_pulls_lazily_and_the_image_runs(images: Images) -> None:
    lazy = images.lazy
    work = short_tempdir("bfs-cri-")
    with cri_node(images, work) as (sn, ctd):
        images.proxy.reset()
        image_id = cri_call(str(ctd.address), "PullImage", str(lazy.ref))
        assert image_id.startswith("sha256:")
        prepared = [r for r in sn.log_records() if r.get("msg") == "remote snapshot prepared"]
        assert [r["labeller"] for r in prepared] == ["cri", "cri"]
        # The second layer was set up while the first was being prepared (the labels
        # of the first Prepare name it): indexed (then mounted in the background), or,
        # if its own Prepare took the layer first, at least its TOC was read ahead.
        # (The first layer's TOC is read in the background too, for the fetch ahead.)
        ahead = {
            r["layer"]
            for r in sn.log_records()
            if r.get("msg") == "layer indexed ahead"
            or str(r.get("msg")).startswith("using the footer")
        }
        first, second = (f"sha256-{layer.digest[7:]}" for layer in lazy.layers)
        assert second in ahead and ahead <= {first, second}, ahead
        fetched = images.proxy.total_bytes
        assert fetched < lazy.compressed_size * 0.2, (fetched, lazy.compressed_size)
        out = ctd.ctr("run", "--rm", "--snapshotter", "blockfs", str(lazy.ref), "cri-1")
        assert out.stdout == "hello\n"

        cri_call(str(ctd.address), "RemoveImage", str(lazy.ref))
        wait_collected(sn)
        assert os.listdir(work / "root" / "layers") == []


def test_a_cri_pull_fetches_ahead_what_a_container_starts_with(
    images: Images, tmp_path: Path
) -> None:
    # Kubernetes pulls through containerd's CRI plugin, not the daemon's pull: the
    # first Prepare's labels name the image's manifest, whose config gives the command.
    with cri_node(images, short_tempdir("bfs-cri-")) as (sn, ctd):
        images.proxy.reset()
        cri_call(str(ctd.address), "PullImage", str(images.start.ref))
        assert_start_fetched_ahead(images, sn, tmp_path)
        # The first layer's footer and TOC came in one range of their size, which its
        # labels give (the later layers' in a range of a guessed size: no label gives it).
        base = images.start.layers[0]
        tail = base.annotations[TOC_TAIL_LABEL]
        assert images.proxy.blob_ranges[base.digest][0] == f"bytes=-{tail}"
        cri_call(str(ctd.address), "RemoveImage", str(images.start.ref))
        wait_collected(sn)


def test_a_cri_pull_preloads_the_prioritised_files_of_the_layers_the_manifest_lists(
    images: Images,
) -> None:
    # No label of a CRI Prepare gives a layer's size; the manifest its first names does.
    layer = images.prio.layers[1]
    region = f"bytes=0-{int(layer.annotations[PREFETCH_END_LABEL]) - 1}"

    def its_toc(method: str, path: str, range_: str) -> bool:
        return path.endswith(layer.digest) and range_.startswith("bytes=-")

    def its_region_asked(arrived: list[tuple[str, str, str]]) -> bool:
        return any(p.endswith(layer.digest) and r == region for _, p, r in arrived)

    with cri_node(images, short_tempdir("bfs-cri-")) as (sn, ctd):
        images.proxy.reset()
        # The layer's footer and TOC read (a suffix range: no label gives their size) is
        # held until its region, from the blob's start, has been asked for: a prefetch
        # made once the layer is open would start at its first file's member.
        with images.proxy.holding(its_toc, its_region_asked) as held:
            cri_call(str(ctd.address), "PullImage", str(images.prio.ref))
        assert held == [True]
        out = ctd.ctr("run", "--rm", "--snapshotter", "blockfs", str(images.prio.ref), "cri-p")
        assert out.stdout.split() == [
            word
            for path in PRIORITISED
            for word in (hashlib.sha256(images.prio_data[path]).hexdigest(), f"/{path}")
        ]
        cri_call(str(ctd.address), "RemoveImage", str(images.prio.ref))
        wait_collected(sn)


def test_a_prepare_whose_manifest_does_not_list_its_layers_fetches_nothing_ahead(
    images: Images,
) -> None:
    # containerd's CRI labels, made by hand: the layers are start's, the manifest named
    # is that of start_again (whose repository has start's bottom layer too).
    start, other = images.start, images.start_again
    base = start.layers[0]
    labels = {
        TARGET_LABEL: start.chain_ids[0],
        TOC_DIGEST_LABEL: base.annotations[TOC_DIGEST_LABEL],
        CRI_IMAGE_REF_LABEL: str(other.ref),
        CRI_LAYER_DIGEST_LABEL: base.digest,
        CRI_IMAGE_LAYERS_LABEL: ",".join(layer.digest for layer in start.layers),
        CRI_MANIFEST_DIGEST_LABEL: other.manifest.digest,
    }
    with cri_node(images, short_tempdir("bfs-cri-")) as (sn, _), sn.channel() as channel:
        stub = snapshots_stub(channel)
        with pytest.raises(grpc.RpcError) as answer:
            stub.Prepare(pb.PrepareSnapshotRequest(key="extract-1", labels=labels), timeout=30)
        assert answer.value.code() is grpc.StatusCode.ALREADY_EXISTS
        wait_for(
            lambda: any(
                str(r.get("msg")).startswith("the image's manifest does not list")
                for r in sn.log_records()
            )
        )
        assert not [r for r in sn.log_records() if r.get("msg") == "fetching ahead"]
        stub.Remove(pb.RemoveSnapshotRequest(key=start.chain_ids[0]), timeout=30)


def test_cri_pull_with_a_pull_secret_the_snapshotter_lacks_falls_back_and_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Kubernetes hands an image pull secret to containerd through CRI, not to the
    # snapshotter, which reads the node's docker config: a layer only the secret can read
    # must be unpacked by containerd the ordinary way, not fail the pull.
    require_root_tools(RUNC)
    if not BUSYBOX.is_file():
        pytest.skip("needs the static busybox of the busybox-static Debian package")
    base = tmp_path_factory.mktemp("private")
    htpasswd = make_htpasswd(base / "htpasswd", {"alice": "wonderland"})
    busybox = layer_tar({"bin/busybox": BUSYBOX.read_bytes()}, modes={"bin/busybox": 0o755})
    work = short_tempdir("bfs-cri-secret-")
    try:
        with start_registry(base / "registry", htpasswd=htpasswd) as registry:
            alice = CredentialStore({registry.host: Credential("alice", "wonderland")})
            ref = Reference.parse(f"{registry.host}/private/app:1")
            with RegistryClient(credentials=alice, plain_http=True) as client:
                push_test_image(
                    client, ref, [estargz_layer(busybox)], cmd=["/bin/busybox", "echo", "private"]
                )
            hosts = work / "hosts"
            (hosts / registry.host).mkdir(parents=True)
            (hosts / registry.host / "hosts.toml").write_text(
                f'server = "http://{registry.host}"\n'
            )
            cri = CRISettings(snapshotter="blockfs", hosts_dir=hosts)
            no_config = {"DOCKER_CONFIG": str(work / "no-docker-config")}
            with (
                start_snapshotter(
                    work / "root", work / "s.sock", "--hosts-dir", str(hosts), env=no_config
                ) as sn,
                start_containerd({"blockfs": work / "s.sock"}, namespace="k8s.io", cri=cri) as ctd,
            ):
                image_id = cri_call(
                    str(ctd.address), "PullImage", str(ref), auth=("alice", "wonderland")
                )
                assert image_id.startswith("sha256:")
                fallbacks = [
                    r for r in sn.log_records()
                    if r.get("msg") == "remote snapshot not possible; containerd unpacks the layer"
                ]  # fmt: skip
                assert len(fallbacks) == 1, fallbacks
                assert "401" in fallbacks[0]["reason"] or "credentials" in fallbacks[0]["reason"], (
                    fallbacks[0]["reason"]
                )
                assert not any(r.get("msg") == "remote snapshot prepared" for r in sn.log_records())
                out = ctd.ctr("run", "--rm", "--snapshotter", "blockfs", str(ref), "secret-1")
                assert out.stdout == "private\n"
                cri_call(str(ctd.address), "RemoveImage", str(ref))
                wait_collected(sn)
    finally:
        left = leftovers(work)
        force_cleanup(work)
        shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"left behind: {left}"
