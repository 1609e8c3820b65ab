"""`blockfs image convert`: OCI layouts and a real registry, eStargz layers that verify,
diff_ids that match, kept layers, cross-repository mounts, platform choice."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from blockfs.convert import ConvertOptions, LayoutLocation, convert_image
from blockfs.estargz import BlobReader, FileBlobSource
from blockfs.oci import (
    Descriptor,
    ImageConfig,
    ImageLayout,
    Index,
    Manifest,
    Platform,
    host_platform,
)
from blockfs.oci import annotations as ann
from blockfs.oci import media_types as mt
from tests.helpers.cli import blockfs
from tests.helpers.images import gunzipped_digest, make_layout
from tests.helpers.registry import unique_repository


def files_layer(tree: Path) -> None:
    rng = random.Random(5)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("convert-test\n")
    (tree / "usr" / "lib").mkdir(parents=True)
    for i in range(12):
        (tree / "usr" / "lib" / f"lib{i}.so").write_bytes(rng.randbytes(rng.randint(1, 90_000)))
    (tree / "usr" / "lib" / "libfirst.so").symlink_to("lib0.so")


def second_layer(tree: Path) -> None:
    (tree / "etc").mkdir()
    (tree / "etc" / ".wh.hostname").write_bytes(b"")
    (tree / "app").mkdir()
    (tree / "app" / "main").write_bytes(b"#!/bin/sh\necho main\n" * 500)
    os.chmod(tree / "app" / "main", 0o755)


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "layout"
    make_layout(root, [files_layer, second_layer])
    return root


def actions(stdout: str) -> list[str]:
    """What `image convert` says it did to each layer."""
    return [line.split()[2] for line in stdout.splitlines() if line.startswith("layer ")]


def read_image(root: Path, tag: str) -> tuple[Manifest, ImageConfig, ImageLayout]:
    layout = ImageLayout(root)
    manifest = layout.read_document(layout.resolve(tag))
    assert isinstance(manifest, Manifest)
    return manifest, ImageConfig.from_bytes(layout.read_blob(manifest.config.digest)), layout


def test_converted_layers_verify_and_config_diff_ids_are_their_uncompressed_digests(
    source_layout, tmp_path
):
    out = blockfs("image", "convert", f"oci:{source_layout}:v1", f"oci:{tmp_path / 'out'}:esgz")
    assert actions(out.stdout) == ["converted", "converted"]
    manifest, config, layout = read_image(tmp_path / "out", "esgz")
    assert manifest.media_type == mt.OCI_MANIFEST
    assert len(config.diff_ids) == 2
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        assert layer.media_type == mt.OCI_LAYER_GZIP
        blob = layout.blob_path(layer.digest)
        reader = BlobReader.open(
            FileBlobSource(blob), toc_digest=layer.annotations[ann.ESTARGZ_TOC_DIGEST]
        )
        assert reader.verify().ok
        assert gunzipped_digest(blob) == diff_id
        assert int(layer.annotations[ann.ESTARGZ_UNCOMPRESSED_SIZE]) > 0
        # The bytes that hold the TOC and footer, for a reader to fetch in one go.
        assert int(layer.annotations[ann.ESTARGZ_TOC_TAIL]) == layer.size - reader.toc_offset
        # Nothing is prioritised: no region to preload.
        assert ann.ESTARGZ_PREFETCH_END not in layer.annotations


def test_convert_reports_progress_lines_on_stderr_when_not_a_terminal(source_layout, tmp_path):
    out = blockfs("image", "convert", "--zstd", f"oci:{source_layout}:v1", f"oci:{tmp_path / 'z'}")
    lines = out.stderr.splitlines()
    assert any(line.startswith("layer 1/2") and "convert:" in line for line in lines)
    assert any("store:" in line and "written" in line for line in lines)
    assert not any("\r" in line for line in lines)
    manifest, _, _ = read_image(tmp_path / "z", "latest")
    assert {layer.media_type for layer in manifest.layers} == {mt.OCI_LAYER_ZSTD}


def test_converting_an_estargz_image_again_keeps_every_layer(source_layout, tmp_path):
    first = tmp_path / "first"
    convert_image(
        LayoutLocation(ImageLayout(source_layout), "v1"),
        LayoutLocation(ImageLayout.create(first), "a"),
    )
    result = convert_image(
        LayoutLocation(ImageLayout(first), "a"),
        LayoutLocation(ImageLayout.create(tmp_path / "second"), "b"),
    )
    assert [layer.action for layer in result.layers] == ["kept", "kept"]
    before, config_before, _ = read_image(first, "a")
    after, config_after, _ = read_image(tmp_path / "second", "b")
    assert [d.digest for d in after.layers] == [d.digest for d in before.layers]
    assert config_after.diff_ids == config_before.diff_ids


def test_layer_whose_toc_digest_annotation_is_wrong_is_converted_again(source_layout, tmp_path):
    converted = tmp_path / "converted"
    convert_image(
        LayoutLocation(ImageLayout(source_layout), "v1"),
        LayoutLocation(ImageLayout.create(converted), "a"),
    )
    manifest, _, layout = read_image(converted, "a")
    lying = Descriptor(
        manifest.layers[0].media_type,
        manifest.layers[0].digest,
        manifest.layers[0].size,
        {ann.ESTARGZ_TOC_DIGEST: "sha256:" + "0" * 64},
    )
    tampered = Manifest(config=manifest.config, layers=[lying, manifest.layers[1]])
    layout.add_manifest(layout.write_document(tampered), "tampered")
    result = convert_image(
        LayoutLocation(layout, "tampered"),
        LayoutLocation(ImageLayout.create(tmp_path / "again"), "b"),
    )
    assert [layer.action for layer in result.layers] == ["converted", "kept"]
    assert "does not verify" in result.layers[0].note


def test_index_converts_only_this_hosts_platform_and_says_so(source_layout, tmp_path):
    layout = ImageLayout(source_layout)
    image = layout.resolve("v1")
    here = host_platform()
    other = (
        Platform("linux", "s390x") if here.architecture != "s390x" else Platform("linux", "arm64")
    )
    # The other platform's entry points at a manifest that is not in the layout: touching
    # it would fail the conversion.
    missing = Descriptor(mt.OCI_MANIFEST, "sha256:" + "1" * 64, 100, platform=other)
    index = Index(
        manifests=[missing, Descriptor(image.media_type, image.digest, image.size, platform=here)]
    )
    layout.add_manifest(layout.write_document(index), "multi")
    out = blockfs("image", "convert", f"oci:{source_layout}:multi", f"oci:{tmp_path / 'one'}")
    assert "index of 2 manifests" in out.stderr
    assert str(here) in out.stderr
    manifest, _, _ = read_image(tmp_path / "one", "latest")
    assert len(manifest.layers) == 2


def test_push_to_registry_then_copy_to_another_repository_mounts_the_layers(
    source_layout, registry
):
    first = f"{registry.host}/{unique_repository('convert')}:v1"
    out = blockfs("image", "convert", "--plain-http", f"oci:{source_layout}:v1", first)
    assert out.stdout.count("[uploaded]") == 2
    second = f"{registry.host}/{unique_repository('convert')}:v2"
    out = blockfs("image", "convert", "--plain-http", first, second)
    assert actions(out.stdout) == ["kept", "kept"]
    assert out.stdout.count("[mounted]") == 2
    # The pushed image is a plain OCI image: every layer gunzips to its diff_id.
    from blockfs.oci import Reference
    from blockfs.registry import RegistryClient

    with RegistryClient(plain_http=True, trust_env=False) as client:
        ref = Reference.parse(second)
        _, manifest = client.get_image_manifest(ref)
        config = ImageConfig.from_bytes(client.get_blob(ref, manifest.config.digest))
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            blob = source_layout.parent / "pulled.gz"
            client.stream_blob(ref, layer.digest, blob)
            assert gunzipped_digest(blob) == diff_id
            blob.unlink()


def test_convert_options_reach_the_writer(source_layout, tmp_path):
    result = convert_image(
        LayoutLocation(ImageLayout(source_layout), "v1"),
        LayoutLocation(ImageLayout.create(tmp_path / "o"), "t"),
        # attrs types the argument after its converter, tuple, whose item type mypy cannot solve.
        ConvertOptions(chunk_size=4096, prioritized=("app/main",)),  # type: ignore[arg-type]
    )
    layout = ImageLayout(tmp_path / "o")
    top = result.layers[1].result
    reader = BlobReader.open(FileBlobSource(layout.blob_path(top.digest)))
    prefetch = reader.prefetch_range()
    assert prefetch is not None
    # The descriptor says where the prioritised region ends, for a preload before the TOC.
    assert int(top.annotations[ann.ESTARGZ_PREFETCH_END]) == prefetch[1]
    # The bottom layer holds none of them: no landmark with data before it, no annotation.
    assert ann.ESTARGZ_PREFETCH_END not in result.layers[0].result.annotations
    assert len(reader.toc.lookup("app/main").chunks) > 1
    assert json.loads(layout.read_blob(result.config.digest))["rootfs"]["diff_ids"]


def test_files_are_cut_into_1_mib_chunks_unless_told(tmp_path):
    def big_file(tree: Path) -> None:
        (tree / "big").write_bytes(random.Random(7).randbytes((5 << 20) // 2))

    make_layout(tmp_path / "src", [big_file])
    blockfs("image", "convert", f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'out'}:v1")
    blockfs(
        "image", "convert", "--chunk-size", str(2 << 20),
        f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'two'}:v1",
    )  # fmt: skip
    for out, sizes in (("out", [1 << 20, 1 << 20, 1 << 19]), ("two", [2 << 20, 1 << 19])):
        manifest, _, layout = read_image(tmp_path / out, "v1")
        [layer] = manifest.layers
        toc = BlobReader.open(FileBlobSource(layout.blob_path(layer.digest))).toc
        assert [c.size for c in toc.lookup("big").chunks] == sizes, out
