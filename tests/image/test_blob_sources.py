"""Blob source specs: files and registry blobs named on the command line, opened the same
way by the CLI, standalone mounts and the NBD server, with one client per configuration."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.estargz import BlobReader
from blockfs.image import (
    BlobSourceError,
    BlobSources,
    blob_source_spec,
    docker_config_path,
    open_blob,
)
from blockfs.oci import Reference, sha256_digest
from blockfs.registry import RegistryClient
from tests.helpers.registry import push_image, start_registry, unique_repository
from tests.helpers.testdata import TESTDATA, toc_digest_of
from tools.local_registry import LocalRegistry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def test_an_existing_path_is_a_file_source_even_with_an_at_sign(tmp_path, monkeypatch):
    odd = tmp_path / "blob@sha256:abc"
    odd.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert blob_source_spec("blob@sha256:abc") == {"type": "file", "path": str(odd)}


def test_a_digest_reference_is_a_registry_source_with_absolute_hosts_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digest = "sha256:" + "ab" * 32
    spec = blob_source_spec(f"localhost:5000/a/b@{digest}", plain_http=True, hosts_dir="certs.d")
    assert spec == {
        "type": "registry",
        "ref": f"localhost:5000/a/b@{digest}",
        "plain_http": True,
        "hosts_dir": str(tmp_path / "certs.d"),
        "docker_config": None,
        "size": None,
    }


@pytest.mark.parametrize("text", ["no-such-file", "host/repo:tag", "host/Repo@sha256:12"])
def test_neither_a_file_nor_a_blob_reference_is_refused_naming_both(text):
    with pytest.raises(BlobSourceError, match="no such file"):
        blob_source_spec(text)


def test_one_client_per_registry_configuration(tmp_path):
    with BlobSources() as sources:
        a = sources.client(plain_http=True)
        assert sources.client(plain_http=True) is a
        assert sources.client(plain_http=False) is not a
        assert sources.client(plain_http=True, hosts_dir=str(tmp_path)) is not a


def test_docker_config_path_follows_docker_config_and_needs_the_file(tmp_path):
    assert docker_config_path({"DOCKER_CONFIG": str(tmp_path)}) is None
    (tmp_path / "config.json").write_text("{}")
    assert docker_config_path({"DOCKER_CONFIG": str(tmp_path)}) == str(tmp_path / "config.json")


def test_registry_blob_opens_like_a_file_and_its_spec_records_the_size(registry):
    blob = (TESTDATA / "gzip-64k.esgz").read_bytes()
    ref = Reference.parse(f"{registry.host}/{unique_repository('sources')}:v1")
    with RegistryClient(plain_http=True, trust_env=False) as client:
        push_image(client, ref, [blob, random.Random(3).randbytes(1000)])
    text = f"{ref.name}@{sha256_digest(blob)}"
    with BlobSources() as sources:
        source, spec = open_blob(text, sources, plain_http=True)
        assert spec["size"] == len(blob) == source.size
        reader = BlobReader.open(source, toc_digest=toc_digest_of("gzip-64k.esgz"))
        local = BlobReader.open(
            sources.open({"type": "file", "path": os.fspath(TESTDATA / "gzip-64k.esgz")})
        )
        assert reader.read_file("etc/passwd") == local.read_file("etc/passwd")
        # Opened again from the spec alone (as the NBD server does): the same bytes.
        again = sources.open(spec)
        assert again.read_range(0, 100) == blob[:100]


def test_unknown_or_damaged_specs_are_layer_state_errors(tmp_path):
    with BlobSources() as sources:
        with pytest.raises(BlobSourceError, match="unknown blob source type"):
            sources.open({"type": "s3", "bucket": "x"})
        with pytest.raises(BlobSourceError, match="invalid blob source"):
            sources.open({"type": "registry"})
        with pytest.raises(BlobSourceError, match="gone"):
            sources.open({"type": "file", "path": str(Path(tmp_path) / "missing")})
