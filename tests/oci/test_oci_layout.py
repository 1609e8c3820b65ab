import json
import os
from pathlib import Path

import pytest

from blockfs.oci import (
    Descriptor,
    ImageConfig,
    ImageLayout,
    InvalidReference,
    LayoutDigestMismatch,
    Manifest,
    OCILayoutError,
    parse_layout_reference,
    sha256_digest,
)
from blockfs.oci import media_types as mt


def write_image(
    layout: ImageLayout, tag: str | None, payload: bytes
) -> tuple[Descriptor, Manifest]:
    layer_digest = layout.write_blob(payload)
    config = ImageConfig.from_json(
        {
            "os": "linux",
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    config_descriptor = layout.write_document(config)
    manifest = Manifest(
        config=config_descriptor, layers=[Descriptor(mt.OCI_LAYER, layer_digest, len(payload))]
    )
    descriptor = layout.write_document(manifest)
    layout.add_manifest(descriptor, tag)
    return descriptor, manifest


def test_written_layout_reads_back_with_standard_files(tmp_path):
    layout = ImageLayout.create(tmp_path / "img")
    payload = os.urandom(5000)
    descriptor, manifest = write_image(layout, "v1", payload)

    reopened = ImageLayout(tmp_path / "img")
    assert json.loads((tmp_path / "img" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index = json.loads((tmp_path / "img" / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    assert (tmp_path / "img" / "blobs" / "sha256" / descriptor.digest.split(":")[1]).is_file()

    resolved = reopened.resolve("v1")
    assert resolved.digest == descriptor.digest
    read = reopened.read_document(resolved)
    assert read == manifest
    assert reopened.read_blob(read.layers[0].digest) == payload
    assert ImageConfig.from_bytes(reopened.read_blob(read.config.digest)).diff_ids == (
        sha256_digest(payload),
    )


def test_retagging_replaces_the_old_entry_and_keeps_others(tmp_path):
    layout = ImageLayout.create(tmp_path)
    first, _ = write_image(layout, "v1", b"one")
    second, _ = write_image(layout, "v1", b"two")
    third, _ = write_image(layout, "v2", b"three")
    assert layout.tags() == ["v1", "v2"]
    assert layout.resolve("v1").digest == second.digest
    assert layout.resolve("v2").digest == third.digest
    assert first.digest != second.digest


def test_resolve_without_tag_needs_a_single_manifest(tmp_path):
    layout = ImageLayout.create(tmp_path)
    only, _ = write_image(layout, None, b"x")
    assert layout.resolve().digest == only.digest
    write_image(layout, "other", b"y")
    with pytest.raises(OCILayoutError, match="holds 2 manifests"):
        layout.resolve()
    with pytest.raises(OCILayoutError, match="no manifest tagged 'nope'"):
        layout.resolve("nope")


def test_tampered_blob_is_detected_on_read(tmp_path):
    layout = ImageLayout.create(tmp_path)
    digest = layout.write_blob(b"original content")
    path = layout.blob_path(digest)
    path.write_bytes(b"original c0ntent")
    with pytest.raises(LayoutDigestMismatch) as info:
        layout.read_blob(digest)
    assert digest in str(info.value) and str(path) in str(info.value)
    with pytest.raises(LayoutDigestMismatch):
        layout.verify_blob(digest)


def test_blob_with_wrong_digest_is_not_stored(tmp_path):
    layout = ImageLayout.create(tmp_path)
    wrong = sha256_digest(b"something else")
    with pytest.raises(LayoutDigestMismatch):
        layout.write_blob(b"content", wrong)
    assert not layout.has_blob(wrong)
    assert [p.name for p in (tmp_path / "blobs" / "sha256").iterdir()] == []  # no temp file left


def test_streamed_blob_is_verified_and_stored(tmp_path):
    layout = ImageLayout.create(tmp_path)
    chunks = [os.urandom(1000) for _ in range(5)]
    digest = sha256_digest(b"".join(chunks))
    assert layout.write_blob_stream(iter(chunks), digest) == digest
    layout.verify_blob(digest)


def test_missing_blob_and_non_layout_directory_are_layout_errors(tmp_path):
    with pytest.raises(OCILayoutError, match="no oci-layout"):
        ImageLayout(tmp_path)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(OCILayoutError, match="unsupported"):
        ImageLayout(tmp_path)
    layout = ImageLayout.create(tmp_path / "ok")
    with pytest.raises(OCILayoutError, match="not in the layout"):
        layout.read_blob(sha256_digest(b"absent"))


@pytest.mark.parametrize(
    ("text", "path", "tag"),
    [
        ("oci:/tmp/img", "/tmp/img", None),
        ("oci:/tmp/img:v1", "/tmp/img", "v1"),
        ("oci:relative/dir:latest", "relative/dir", "latest"),
        ("oci:/tmp/a:b/c", "/tmp/a:b/c", None),
    ],
)
def test_parse_layout_reference(text, path, tag):
    assert parse_layout_reference(text) == (Path(path), tag)


def test_parse_layout_reference_refuses_other_schemes():
    with pytest.raises(InvalidReference):
        parse_layout_reference("docker://busybox")
