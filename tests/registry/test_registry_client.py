import logging
import os
import random

import pytest

from blockfs.estargz import BlobSource, read_coalesced
from blockfs.oci import Descriptor, Index, Manifest, Platform, Reference, sha256_digest
from blockfs.oci import media_types as mt
from blockfs.registry import (
    BlobNotFound,
    DigestMismatch,
    HostsConfig,
    ManifestNotFound,
    RangeNotSatisfiable,
    RegistryBlobSource,
    RegistryClient,
)
from tests.helpers.registry import FAST_RETRY, HTTPProxy, push_image, unique_repository


@pytest.fixture
def image(registry, client):
    ref = Reference.parse(f"{registry.host}/{unique_repository('client')}:v1")
    layers = [os.urandom(300_000), os.urandom(1000)]
    descriptor, manifest = push_image(client, ref, layers)
    return ref, layers, descriptor, manifest


def test_resolve_by_tag_returns_the_pushed_manifest_bytes_and_digest(client, image):
    ref, _, pushed, manifest = image
    descriptor, data = client.resolve(ref)
    assert data == manifest.to_bytes()
    assert descriptor.digest == pushed.digest == sha256_digest(data)
    assert descriptor.media_type == mt.OCI_MANIFEST
    assert descriptor.size == len(data)


def test_resolve_by_digest_verifies_and_returns_the_same_manifest(client, image):
    ref, _, pushed, manifest = image
    descriptor, _data = client.resolve(
        Reference(ref.registry, ref.repository, digest=pushed.digest)
    )
    assert descriptor.digest == pushed.digest
    assert client.get_manifest(ref.with_digest(pushed.digest)) == manifest


def test_get_blob_returns_the_whole_verified_blob(client, image):
    ref, layers, _, _ = image
    assert client.get_blob(ref, sha256_digest(layers[0])) == layers[0]


def test_read_range_returns_exactly_the_bytes_asked_for(client, image):
    ref, layers, _, _ = image
    blob = layers[0]
    digest = sha256_digest(blob)
    rng = random.Random(7)
    cases = [(0, 1), (0, len(blob)), (len(blob) - 1, 1), (12345, 0)]
    cases += [
        (o, rng.randint(1, len(blob) - o)) for o in (rng.randrange(len(blob)) for _ in range(20))
    ]
    for offset, length in cases:
        assert client.read_range(ref, digest, offset, length) == blob[offset : offset + length]


def test_range_past_the_end_raises_range_not_satisfiable(client, image):
    ref, layers, _, _ = image
    blob = layers[1]
    with pytest.raises(RangeNotSatisfiable):
        client.read_range(ref, sha256_digest(blob), len(blob) - 10, 20)
    with pytest.raises(RangeNotSatisfiable):
        client.read_range(ref, sha256_digest(blob), len(blob) + 10, 5)


def test_blob_size_is_read_with_head(client, image):
    ref, layers, _, _ = image
    assert client.blob_size(ref, sha256_digest(layers[0])) == len(layers[0])


def test_missing_blob_and_manifest_raise_not_found_naming_them(client, image):
    ref, _, _, _ = image
    absent = sha256_digest(b"never pushed")
    with pytest.raises(BlobNotFound) as info:
        client.read_range(ref, absent, 0, 10)
    assert absent in str(info.value) and ref.repository in str(info.value)
    assert info.value.status == 404
    with pytest.raises(ManifestNotFound, match="no such manifest"):
        client.resolve(ref.with_tag("missing"))


def test_stream_blob_writes_the_verified_file_and_no_temporary(client, image, tmp_path):
    ref, layers, _, _ = image
    dest = tmp_path / "blob"
    assert client.stream_blob(ref, sha256_digest(layers[0]), dest) == len(layers[0])
    assert dest.read_bytes() == layers[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_pushing_an_existing_blob_is_skipped(client, image):
    ref, layers, _, _ = image
    assert client.push_blob(ref, sha256_digest(layers[0]), len(layers[0]), layers[0]) == "exists"


def test_cross_repository_mount_and_its_upload_fallback(client, image, registry):
    ref, layers, _, _ = image
    other = Reference.parse(f"{registry.host}/{unique_repository('mount')}")
    digest = sha256_digest(layers[1])
    assert client.push_blob(other, digest, None, layers[1], mount_from=ref.repository) == "mounted"
    assert client.get_blob(other, digest) == layers[1]
    # The source repository lacks this blob: the registry answers 202 and we upload.
    fresh = os.urandom(777)
    assert (
        client.push_blob(other, sha256_digest(fresh), 777, fresh, mount_from=ref.repository)
        == "uploaded"
    )
    assert client.get_blob(other, sha256_digest(fresh)) == fresh


def test_big_blob_is_pushed_in_patch_chunks(registry, tmp_path):
    proxy = HTTPProxy(registry.url)
    try:
        hosts = tmp_path / "hosts" / registry.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
        data = os.urandom(2_500_000)
        path = tmp_path / "blob"
        path.write_bytes(data)
        ref = Reference.parse(f"{registry.host}/{unique_repository('chunked')}")
        with RegistryClient(
            HostsConfig.load(tmp_path / "hosts"), chunk_size=1 << 20, retry=FAST_RETRY
        ) as c:
            assert c.push_blob(ref, sha256_digest(data), len(data), path) == "uploaded"
            assert c.get_blob(ref, sha256_digest(data)) == data
        methods = [m for m, _, _ in proxy.requests]
        assert methods.count("PATCH") == 3
        assert methods.count("PUT") == 1
    finally:
        proxy.close()


def test_pushing_wrong_content_for_a_digest_raises_digest_mismatch(client, registry):
    ref = Reference.parse(f"{registry.host}/{unique_repository('wrong')}")
    with pytest.raises(DigestMismatch):
        client.push_blob(ref, sha256_digest(b"claimed"), 6, b"actual")
    with pytest.raises(DigestMismatch):
        client.push_manifest(ref, sha256_digest(b"{}"), mt.OCI_MANIFEST, b"{ }")


def test_image_manifest_is_chosen_from_an_index_by_platform(client, registry):
    ref = Reference.parse(f"{registry.host}/{unique_repository('multi')}:latest")
    amd, _amd_manifest = push_image(client, ref.with_tag("amd64"), [os.urandom(100)])
    arm, arm_manifest = push_image(client, ref.with_tag("arm64"), [os.urandom(100)])
    index = Index(
        manifests=[
            Descriptor(amd.media_type, amd.digest, amd.size, platform=Platform("linux", "amd64")),
            Descriptor(
                arm.media_type, arm.digest, arm.size, platform=Platform("linux", "arm64", "v8")
            ),
        ]
    )
    client.push_manifest(ref, "latest", mt.OCI_INDEX, index.to_bytes())
    assert isinstance(client.get_manifest(ref), Index)
    descriptor, manifest = client.get_image_manifest(ref, Platform("linux", "arm64"))
    assert descriptor.digest == arm.digest and manifest == arm_manifest
    descriptor, manifest = client.get_image_manifest(ref, Platform("linux", "amd64"))
    assert isinstance(manifest, Manifest) and descriptor.digest == amd.digest


def test_blob_source_reads_ranges_and_has_the_blob_source_shape(client, image):
    ref, layers, _, _ = image
    digest = sha256_digest(layers[0])
    source = RegistryBlobSource(client, ref, digest)
    assert isinstance(source, BlobSource)
    assert source.name == f"{ref.registry}/{ref.repository}@{digest}"
    assert source.size == len(layers[0])
    assert source.read_range(100, 50) == layers[0][100:150]
    with pytest.raises(RangeNotSatisfiable):
        source.read_range(len(layers[0]) - 1, 2)


def test_coalesced_reads_of_near_ranges_are_one_request(registry, client, image, tmp_path):
    ref, layers, _, _ = image
    blob = layers[0]
    proxy = HTTPProxy(registry.url)
    try:
        hosts = tmp_path / registry.host
        hosts.mkdir()
        (hosts / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
        with RegistryClient(HostsConfig.load(tmp_path), retry=FAST_RETRY) as c:
            source = RegistryBlobSource(c, ref, sha256_digest(blob), size=len(blob))
            ranges = [(5000, 100), (0, 10), (10, 0), (70_000, 10), (200_000, 50), (200_010, 20)]
            got = read_coalesced(source, ranges)
        assert got == [blob[o : o + n] for o, n in ranges]
        gets = [h.get("Range", "") for m, _, h in proxy.requests if m == "GET"]
        # 0..10 and 5000..5100 and 70000..70010 are within 64 KiB of each other; 200000.. is not.
        assert sorted(gets) == ["bytes=0-70009", "bytes=200000-200049"]  # sent at once
    finally:
        proxy.close()


def test_full_body_warning_is_logged_once_per_host(registry, client, image, tmp_path, caplog):
    ref, layers, _, _ = image
    blob = layers[0]
    proxy = HTTPProxy(registry.url, strip_range=True)
    try:
        hosts = tmp_path / registry.host
        hosts.mkdir()
        (hosts / "hosts.toml").write_text(f'server = "{proxy.url}"\n')
        with (
            caplog.at_level(logging.WARNING, "blockfs.registry"),
            RegistryClient(HostsConfig.load(tmp_path), retry=FAST_RETRY) as c,
        ):
            for offset in (0, 1000, len(blob) - 7):
                assert (
                    c.read_range(ref, sha256_digest(blob), offset, 7) == blob[offset : offset + 7]
                )
        warnings = [r for r in caplog.records if "ignores Range" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        proxy.close()


def test_push_blob_refuses_a_size_that_does_not_match_the_data(client, registry):
    ref = Reference.parse(f"{registry.host}/{unique_repository('size')}")
    with pytest.raises(ValueError, match="size 5"):
        client.push_blob(ref, sha256_digest(b"abc"), 5, b"abc")
