"""`blockfs image convert` to a real docker-registry, then `blockfs image mount`: real
nbdkit, nbdfuse (or nbd.ko), EROFS and overlayfs mounts, and a chroot into the result."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from blockfs.oci import ImageConfig, Reference
from blockfs.registry import RegistryClient
from tests.helpers.cli import blockfs
from tests.helpers.images import (
    docker_config,
    expected_tree,
    gunzipped_digest,
    layer_blobs,
    make_layout,
    snapshot,
    with_busybox,
)
from tests.helpers.registry import (
    HTTPProxy,
    TokenServer,
    make_htpasswd,
    start_registry,
    unique_repository,
)
from tools.local_registry import LocalRegistry
from tools.mkimage import random_tree

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def base_layer(tree: Path) -> None:
    with_busybox(tree)
    (tree / "etc" / "gone.txt").write_text("whited out by the next layer\n")
    (tree / "opaque" / "sub").mkdir(parents=True)
    (tree / "opaque" / "a.txt").write_text("hidden by the opaque dir above\n")
    (tree / "opaque" / "sub" / "b.txt").write_text("hidden too\n")
    (tree / "keep").mkdir()
    (tree / "keep" / "x.txt").write_bytes(random.Random(1).randbytes(300_000))
    os.link(tree / "keep" / "x.txt", tree / "keep" / "x-hardlink")
    (tree / "keep" / "private").write_text("secret\n")
    os.chmod(tree / "keep" / "private", 0o600)
    rng = random.Random(2)
    (tree / "usr" / "share" / "data").mkdir(parents=True)
    for i in range(25):
        (tree / "usr" / "share" / "data" / f"f{i:02d}").write_bytes(
            rng.randbytes(rng.randint(0, 200_000))
        )


def top_layer(tree: Path) -> None:
    (tree / "etc").mkdir()
    (tree / "etc" / ".wh.gone.txt").write_bytes(b"")
    (tree / "etc" / "motd").write_text("hello from the top layer\n")
    (tree / "opaque").mkdir()
    (tree / "opaque" / ".wh..wh..opq").write_bytes(b"")
    (tree / "opaque" / "new.txt").write_text("the only entry of the opaque dir\n")
    (tree / "keep").mkdir()
    (tree / "keep" / "y.txt").write_text("added on top\n")


@attrs.frozen
class PushedImage:
    ref: str
    layout: Path
    expected: Path


@pytest.fixture(scope="module")
def access_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry that logs every request with the bytes it sent."""
    with start_registry(tmp_path_factory.mktemp("registry"), access_log=True) as running:
        yield running


@pytest.fixture(scope="module")
def whiteout_image(tmp_path_factory, access_registry) -> PushedImage:
    """The two-layer image, converted and pushed, and the tree its layers extract to."""
    base = tmp_path_factory.mktemp("whiteouts")
    make_layout(base / "layout", [base_layer, top_layer])
    ref = f"{access_registry.host}/{unique_repository('image')}:v1"
    blockfs("image", "convert", "--plain-http", f"oci:{base / 'layout'}:v1", ref)
    expected = expected_tree(layer_blobs(base / "layout"), base / "expected")
    return PushedImage(ref, base / "layout", expected)


@pytest.fixture
def image_mount(workdir: Path) -> Iterator[Any]:
    """`blockfs image mount` into the workdir; always unmounted afterwards."""
    mounted: list[Path] = []
    root = workdir / "root"

    def mount(ref: str, *extra: str, name: str = "mnt", env: dict[str, str] | None = None) -> Path:
        mnt = workdir / name
        mnt.mkdir()
        blockfs("image", "mount", "--root", str(root), *extra, ref, str(mnt), env=env)
        mounted.append(mnt)
        return mnt

    mount.root = root  # type: ignore[attr-defined]
    yield mount
    for mnt in mounted:
        if os.path.ismount(mnt):
            blockfs("image", "umount", "--root", str(root), str(mnt), check=False)


def stats(image_mount, mnt: Path) -> dict[str, Any]:
    out = blockfs("image", "stats", "--json", "--root", str(image_mount.root), str(mnt))
    return json.loads(out.stdout)


def test_mounted_image_is_its_layers_extracted_in_order_and_busybox_runs(
    whiteout_image, image_mount
):
    mnt = image_mount(whiteout_image.ref, "--plain-http")
    assert snapshot(mnt) == snapshot(whiteout_image.expected)
    assert not (mnt / "etc" / "gone.txt").exists()
    assert sorted(p.name for p in (mnt / "opaque").iterdir()) == ["new.txt"]
    run = subprocess.run(
        ["chroot", str(mnt), "/bin/busybox", "echo", "ok"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ok\n"
    with pytest.raises(OSError) as info:
        (mnt / "new-file").write_text("x")
    assert info.value.errno == errno.EROFS
    layers = stats(image_mount, mnt)["layers"]
    assert [layer["kind"] for layer in layers] == ["lazy", "lazy"]


def test_pushed_image_is_plain_oci_each_layer_gunzips_to_its_diff_id(
    whiteout_image, access_registry, tmp_path
):
    ref = Reference.parse(whiteout_image.ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        _, manifest = client.get_image_manifest(ref)
        config = ImageConfig.from_bytes(client.get_blob(ref, manifest.config.digest))
        assert len(config.diff_ids) == len(manifest.layers) == 2
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
            assert "containerd.io/snapshot/stargz/toc.digest" in layer.annotations
            blob = tmp_path / "layer.gz"
            client.stream_blob(ref, layer.digest, blob)
            assert gunzipped_digest(blob) == diff_id
            tar = subprocess.run(["tar", "-tzf", str(blob)], capture_output=True, check=True)
            assert b"stargz.index.json" in tar.stdout


def test_running_one_binary_transfers_under_a_tenth_of_the_image(
    tmp_path_factory, access_registry, image_mount
):
    base = tmp_path_factory.mktemp("lazy")
    make_layout(base / "layout", [with_busybox, lambda tree: random_tree(tree, 50)])
    ref = f"{access_registry.host}/{unique_repository('lazy')}:v1"
    blockfs("image", "convert", "--plain-http", f"oci:{base / 'layout'}:v1", ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        _, manifest = client.get_image_manifest(Reference.parse(ref))
    compressed = sum(layer.size for layer in manifest.layers)
    assert compressed > 50 << 20

    before = access_registry.bytes_sent()
    mnt = image_mount(ref, "--plain-http")
    run = subprocess.run(["chroot", str(mnt), "/bin/busybox", "true"], capture_output=True)
    assert run.returncode == 0, run.stderr
    fetched = stats(image_mount, mnt)["bytes_fetched"]
    # The registry logs a request once it has answered it, maybe just after we got it.
    deadline = time.monotonic() + 10
    while access_registry.bytes_sent() - before < fetched and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = access_registry.bytes_sent() - before

    assert sent < compressed / 10, f"the registry sent {sent} bytes of a {compressed}-byte image"
    assert fetched <= sent
    # The busybox binary itself came through: this is not a mount that read nothing.
    assert sent > (mnt / "bin" / "busybox").stat().st_size / 2


def test_full_read_through_a_proxy_failing_a_fifth_of_requests_is_byte_identical(
    whiteout_image, access_registry, image_mount, workdir
):
    proxy = HTTPProxy(access_registry.url, fault_rate=0.2, seed=7)
    try:
        hosts = workdir / "hosts"
        (hosts / access_registry.host).mkdir(parents=True)
        (hosts / access_registry.host / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
        mnt = image_mount(whiteout_image.ref, "--hosts-dir", str(hosts))
        assert snapshot(mnt) == snapshot(whiteout_image.expected)  # reads every file
        assert sum(proxy.injected.values()) > 0
        data_requests = [r for r in proxy.requests if r[0] == "GET" and "Range" in r[2]]
        assert len(data_requests) > 10
    finally:
        proxy.close()


def test_docker_config_credentials_reach_the_server_and_their_absence_is_explained(
    tmp_path_factory, whiteout_image, image_mount, workdir
):
    base = tmp_path_factory.mktemp("auth")
    htpasswd = make_htpasswd(base / "htpasswd", {"alice": "wonderland"})
    with start_registry(base / "registry", htpasswd=htpasswd) as secured:
        config = docker_config(base / "docker", secured.host, "alice", "wonderland")
        env = {"DOCKER_CONFIG": str(config)}
        ref = f"{secured.host}/private/image:v1"
        blockfs("image", "convert", "--plain-http", f"oci:{whiteout_image.layout}:v1", ref, env=env)
        mnt = image_mount(ref, "--plain-http", env=env)
        # File data is fetched by the NBD server process, with the same credentials.
        assert (mnt / "keep" / "x.txt").read_bytes() == (
            whiteout_image.expected / "keep" / "x.txt"
        ).read_bytes()

        denied = workdir / "denied"
        denied.mkdir()
        nobody = {"DOCKER_CONFIG": str(workdir / "no-docker-config")}
        out = blockfs(
            "image", "mount", "--plain-http", "--root", str(workdir / "root"), ref, str(denied),
            env=nobody, check=False,
        )  # fmt: skip
        assert out.returncode == 1
        assert "401" in out.stderr or "credentials" in out.stderr.lower()
        assert secured.host in out.stderr
        assert not os.path.ismount(denied)


def test_a_bearer_token_that_expires_under_a_mounted_image_is_renewed_by_the_server(
    tmp_path_factory, whiteout_image, image_mount
):
    base = tmp_path_factory.mktemp("token")
    tokens = TokenServer(base / "token", users={"alice": "wonderland"})
    try:
        with start_registry(base / "registry", token=tokens.auth()) as secured:
            config = docker_config(base / "docker", secured.host, "alice", "wonderland")
            env = {"DOCKER_CONFIG": str(config)}
            ref = f"{secured.host}/private/image:v1"
            blockfs("image", "convert", "--plain-http", f"oci:{whiteout_image.layout}:v1", ref,
                    env=env)  # fmt: skip
            # From now on each token stops working about 3 s after it is issued (the
            # registry allows 60 s of clock leeway), though clients are told 300 s.
            tokens.lifetime = lambda n: -57
            mnt = image_mount(ref, "--plain-http", env=env)
            expected = whiteout_image.expected / "usr" / "share" / "data"
            first = (mnt / "usr" / "share" / "data" / "f01").read_bytes()
            assert first == (expected / "f01").read_bytes()
            issued = tokens.issued
            time.sleep(3.5)
            # An unread file: the NBD server's token is refused now, and it must get a
            # new one and retry rather than fail the read.
            assert (mnt / "keep" / "x.txt").read_bytes() == (
                whiteout_image.expected / "keep" / "x.txt"
            ).read_bytes()
            assert tokens.issued > issued
    finally:
        tokens.close()


def test_layers_without_a_toc_digest_are_extracted_with_their_whiteouts(
    whiteout_image, image_mount
):
    # The unconverted layout: plain gzip layers, nothing to mount lazily.
    mnt = image_mount(f"oci:{whiteout_image.layout}:v1")
    assert snapshot(mnt) == snapshot(whiteout_image.expected)
    layers = stats(image_mount, mnt)["layers"]
    assert [layer["kind"] for layer in layers] == ["extracted", "extracted"]
    assert all("no eStargz TOC digest" in layer["reason"] for layer in layers)


def test_writable_mount_keeps_writes_above_the_image_until_umount(
    whiteout_image, image_mount, workdir
):
    mnt = image_mount(whiteout_image.ref, "--plain-http", "--rw")
    (mnt / "etc" / "motd").write_text("changed\n")
    (mnt / "keep" / "x.txt").unlink()
    assert (mnt / "etc" / "motd").read_text() == "changed\n"
    assert not (mnt / "keep" / "x.txt").exists()
    assert (mnt / "keep" / "x-hardlink").exists()
    blockfs("image", "umount", "--root", str(image_mount.root), str(mnt))
    assert not os.path.ismount(mnt)
    assert list((image_mount.root / "mounts").iterdir()) == []


def test_layer_commands_read_a_registry_blob_lazily(whiteout_image, workdir):
    ref = Reference.parse(whiteout_image.ref)
    with RegistryClient(plain_http=True, trust_env=False) as client:
        _, manifest = client.get_image_manifest(ref)
    top = manifest.layers[1]
    blob = f"{ref.name}@{top.digest}"
    toc = top.annotations["containerd.io/snapshot/stargz/toc.digest"]

    out = blockfs("layer", "inspect", "--plain-http", "--toc-digest", toc, blob)
    assert "etc/motd" in out.stdout and "(not verified)" not in out.stdout
    out = blockfs("layer", "cat", "--plain-http", "--toc-digest", toc, blob, "etc/motd")
    assert out.stdout == "hello from the top layer\n"

    mnt = workdir / "layer"
    mnt.mkdir()
    root = str(workdir / "root")
    blockfs("layer", "mount", "--plain-http", "--root", root, "--toc-digest", toc, blob, str(mnt))
    try:
        assert (mnt / "keep" / "y.txt").read_text() == "added on top\n"
        assert (mnt / "etc" / ".wh.gone.txt").exists() is False  # an overlay whiteout now
    finally:
        blockfs("layer", "umount", "--root", root, str(mnt))
