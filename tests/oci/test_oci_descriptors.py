import hashlib
import json

import attrs
import pytest

from blockfs.oci import (
    Descriptor,
    ImageConfig,
    Index,
    InvalidDocument,
    Manifest,
    NoMatchingPlatform,
    Platform,
    annotations,
    canonical_json,
    host_platform,
    parse_document,
    select_platform,
    sha256_digest,
)
from blockfs.oci import media_types as mt

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def layer(digest=D1, size=10, **kw):
    return Descriptor(mt.OCI_LAYER_GZIP, digest, size, **kw)


def test_parsed_manifest_keeps_its_exact_bytes_and_digest():
    # Indented, with keys in an unusual order: only the original bytes give the right digest.
    raw = json.dumps(
        {
            "layers": [{"size": 10, "digest": D1, "mediaType": mt.OCI_LAYER_GZIP}],
            "config": {"mediaType": mt.OCI_CONFIG, "size": 5, "digest": D2},
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
        },
        indent=3,
    ).encode()
    manifest = Manifest.from_bytes(raw)
    assert manifest.to_bytes() == raw
    assert manifest.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert manifest.layers[0].digest == D1
    assert manifest.config.size == 5


def test_evolved_manifest_is_serialized_afresh():
    raw = Manifest(config=Descriptor(mt.OCI_CONFIG, D2, 5), layers=[layer()]).to_bytes()
    parsed = Manifest.from_bytes(b" " + raw)
    changed = attrs.evolve(parsed, layers=(layer(D3, 7),))
    assert changed.to_bytes() != parsed.to_bytes()
    assert Manifest.from_bytes(changed.to_bytes()).layers[0].digest == D3


def test_created_manifest_serializes_deterministically_in_go_field_order():
    manifest = Manifest(
        config=Descriptor(mt.OCI_CONFIG, D2, 5),
        layers=[layer(annotations={"z": "1", annotations.ESTARGZ_TOC_DIGEST: D3})],
        annotations={"b": "<&>", "a": "x"},
    )
    data = manifest.to_bytes()
    assert data == manifest.to_bytes()
    assert data.startswith(
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":'
    )
    # Go escapes HTML characters and sorts map keys.
    assert b'"annotations":{"a":"x","b":"\\u003c\\u0026\\u003e"}' in data
    assert data.index(b"containerd.io") < data.index(b'"z"')
    assert json.loads(data)["annotations"]["b"] == "<&>"
    assert manifest.descriptor().digest == sha256_digest(data)


def test_descriptor_round_trips_all_fields():
    descriptor = Descriptor(
        mt.OCI_MANIFEST,
        D1,
        42,
        annotations={"k": "v"},
        platform=Platform("linux", "arm64", "v8", os_features=("f",)),
        urls=("https://example.com/x",),
        artifact_type="application/x",
    )
    assert Descriptor.from_json(descriptor.to_json()) == descriptor


def test_descriptor_annotations_cannot_be_modified():
    descriptor = layer(annotations={"k": "v"})
    with pytest.raises(TypeError):
        descriptor.annotations["k"] = "w"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
        (
            b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:12", "size": 1}, "layers": []}',
            "digest",
        ),
        (
            b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "'
            + D1.encode()
            + b'", "size": -1}, "layers": []}',
            "size",
        ),
        (
            b'{"schemaVersion": 2, "mediaType": "text/plain", "config": {}, "layers": []}',
            "media type",
        ),
    ],
)
def test_malformed_manifests_raise_invalid_document(document, message):
    with pytest.raises(InvalidDocument, match=message):
        Manifest.from_bytes(document)


def test_parse_document_tells_index_from_manifest():
    index = Index(
        manifests=[Descriptor(mt.OCI_MANIFEST, D1, 3, platform=Platform("linux", "amd64"))]
    )
    manifest = Manifest(config=Descriptor(mt.OCI_CONFIG, D2, 5), layers=[layer()])
    assert isinstance(parse_document(index.to_bytes()), Index)
    assert isinstance(parse_document(manifest.to_bytes()), Manifest)
    # A Docker manifest list without mediaType in the body, known by its Content-Type.
    body = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    parsed = parse_document(body, mt.DOCKER_MANIFEST_LIST + "; charset=utf-8")
    assert isinstance(parsed, Index) and parsed.media_type == mt.DOCKER_MANIFEST_LIST


def test_image_config_keeps_unknown_fields_and_replaces_diff_ids():
    raw = json.dumps(
        {
            "architecture": "arm64",
            "variant": "v8",
            "os": "linux",
            "config": {"Env": ["A=1"]},
            "history": [{"created_by": "x"}],
            "rootfs": {"type": "layers", "diff_ids": [D1]},
        }
    ).encode()
    config = ImageConfig.from_bytes(raw)
    assert config.to_bytes() == raw
    assert config.diff_ids == (D1,)
    assert config.platform == Platform("linux", "arm64", "v8")
    changed = config.with_diff_ids([D2, D3])
    assert changed.diff_ids == (D2, D3)
    assert config.diff_ids == (D1,)  # the original is untouched
    assert changed.to_json()["history"] == [{"created_by": "x"}]
    assert changed.digest == sha256_digest(changed.to_bytes()) != config.digest
    assert changed.descriptor().media_type == mt.OCI_CONFIG


def test_image_config_to_json_is_a_copy():
    config = ImageConfig.from_json({"rootfs": {"type": "layers", "diff_ids": [D1]}})
    config.to_json()["rootfs"]["diff_ids"].append(D2)
    assert config.diff_ids == (D1,)


def test_image_config_with_bad_diff_id_is_refused():
    with pytest.raises(InvalidDocument, match="diff_ids"):
        ImageConfig.from_bytes(b'{"rootfs": {"type": "layers", "diff_ids": ["sha256:zz"]}}')


def platform_index():
    def entry(digest, platform, **kw):
        return Descriptor(mt.OCI_MANIFEST, digest, 1, platform=Platform.parse(platform), **kw)

    return Index(
        manifests=[
            entry("sha256:" + "a" * 64, "linux/amd64"),
            entry("sha256:" + "b" * 64, "linux/arm64/v8"),
            entry("sha256:" + "c" * 64, "linux/arm/v6"),
            entry("sha256:" + "d" * 64, "linux/arm/v7"),
            entry("sha256:" + "e" * 64, "windows/amd64"),
            entry(
                "sha256:" + "f" * 64,
                "unknown/unknown",
                annotations={annotations.DOCKER_REFERENCE_TYPE: "attestation-manifest"},
            ),
        ]
    )


def test_select_platform_picks_os_and_architecture():
    index = platform_index()
    assert select_platform(index, "linux", "amd64").digest.startswith("sha256:a")
    assert select_platform(index, "windows", "amd64").digest.startswith("sha256:e")


def test_select_platform_treats_arm64_without_variant_as_v8():
    assert select_platform(platform_index(), "linux", "aarch64").digest.startswith("sha256:b")


def test_select_platform_prefers_exact_arm_variant_then_lower_ones():
    index = platform_index()
    assert select_platform(index, "linux", "arm", "v7").digest.startswith("sha256:d")
    assert select_platform(index, "linux", "arm", "v8").digest.startswith("sha256:d")
    assert select_platform(index, "linux", "arm", "v6").digest.startswith("sha256:c")
    with pytest.raises(NoMatchingPlatform):
        select_platform(index, "linux", "arm", "v5")


def test_select_platform_defaults_to_this_host():
    host = host_platform()
    index = Index(manifests=[Descriptor(mt.OCI_MANIFEST, D1, 1, platform=host)])
    assert select_platform(index).digest == D1


def test_no_matching_platform_names_what_is_offered():
    with pytest.raises(NoMatchingPlatform, match=r"linux/amd64.*linux/arm64/v8"):
        select_platform(platform_index(), "linux", "s390x")


def test_canonical_json_is_compact_and_keeps_unicode():
    assert canonical_json({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_media_type_helpers():
    assert mt.layer_compression(mt.DOCKER_LAYER_GZIP) == "gzip"
    assert mt.layer_compression(mt.OCI_LAYER_ZSTD) == "zstd"
    assert mt.layer_compression(mt.OCI_LAYER) == "none"
    assert mt.layer_compression(mt.OCI_MANIFEST) is None
    assert mt.is_nondistributable(mt.OCI_LAYER_NONDISTRIBUTABLE_GZIP)
    assert not mt.is_nondistributable(mt.OCI_LAYER_GZIP)
    assert mt.is_index(mt.DOCKER_MANIFEST_LIST) and mt.is_manifest(mt.DOCKER_MANIFEST)
    assert mt.base_media_type("Application/JSON; charset=utf-8") == "application/json"
