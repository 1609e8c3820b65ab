"""Registry behaviours seen in the wild: HEAD refused, Range ignored, redirects to object
stores whose URLs expire."""

import base64
import json
import os
import random

import pytest

from blockfs.estargz import BlobReader, CountingSource
from blockfs.oci import Reference, sha256_digest
from blockfs.registry import CredentialStore, HostsConfig, RegistryBlobSource, RegistryClient
from tests.helpers.registry import (
    FAST_RETRY,
    BlobStore,
    HTTPProxy,
    make_htpasswd,
    push_image,
    start_registry,
    unique_repository,
)
from tests.helpers.testdata import TESTDATA


def hosts_through(tmp_path, namespace, proxy_url):
    directory = tmp_path / "hosts" / namespace
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text(f'server = "{proxy_url}"\n')
    return HostsConfig.load(tmp_path / "hosts")


@pytest.fixture
def blob(registry, client):
    ref = Reference.parse(f"{registry.host}/{unique_repository('quirks')}:v1")
    data = os.urandom(200_000)
    push_image(client, ref, [data])
    return ref, data


def test_blob_size_falls_back_to_a_ranged_get_when_head_is_refused(registry, blob, tmp_path):
    ref, data = blob
    proxy = HTTPProxy(registry.url, reject_head=True)
    try:
        with RegistryClient(
            hosts_through(tmp_path, registry.host, proxy.url), retry=FAST_RETRY
        ) as c:
            assert c.blob_size(ref, sha256_digest(data)) == len(data)
            assert RegistryBlobSource(c, ref, sha256_digest(data)).size == len(data)
        methods = [(m, h.get("Range")) for m, _, h in proxy.requests]
        assert ("HEAD", None) in methods
        assert ("GET", "bytes=0-0") in methods
    finally:
        proxy.close()


def test_whole_body_answer_to_a_range_request_is_sliced(registry, blob, tmp_path):
    ref, data = blob
    proxy = HTTPProxy(registry.url, strip_range=True)
    try:
        with RegistryClient(
            hosts_through(tmp_path, registry.host, proxy.url), retry=FAST_RETRY
        ) as c:
            rng = random.Random(3)
            for _ in range(10):
                offset = rng.randrange(len(data))
                length = rng.randint(1, len(data) - offset)
                assert (
                    c.read_range(ref, sha256_digest(data), offset, length)
                    == data[offset : offset + length]
                )
    finally:
        proxy.close()


def test_redirected_blob_reads_keep_range_drop_credentials_and_survive_expiry(tmp_path):
    users = {"reader": "s3cret"}
    htpasswd = make_htpasswd(tmp_path / "htpasswd", users)
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    with start_registry(tmp_path / "registry", htpasswd=htpasswd) as registry:
        token = base64.b64encode(b"reader:s3cret").decode()
        config.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        credentials = CredentialStore.from_docker_config(config)
        ref = Reference.parse(f"{registry.host}/{unique_repository('redirect')}:v1")
        data = os.urandom(100_000)
        with RegistryClient(credentials=credentials, plain_http=True, retry=FAST_RETRY) as c:
            push_image(c, ref, [data])
        digest = sha256_digest(data)

        store = BlobStore({digest: data}, uses_per_url=3)
        proxy = HTTPProxy(registry.url, redirect_blobs=store.url_for)
        # Credentials go by the host contacted: here the proxy, which hosts.toml names.
        config.write_text(json.dumps({"auths": {proxy.host: {"auth": token}}}))
        credentials = CredentialStore.from_docker_config(config)
        try:
            hosts = hosts_through(tmp_path, registry.host, proxy.url)
            with RegistryClient(hosts, credentials, retry=FAST_RETRY) as c:
                c.resolve(ref)  # learn that the registry wants Basic credentials
                rng = random.Random(5)
                for _ in range(10):
                    offset = rng.randrange(len(data))
                    length = rng.randint(1, min(5000, len(data) - offset))
                    assert (
                        c.read_range(ref, digest, offset, length) == data[offset : offset + length]
                    )
        finally:
            proxy.close()
            store.close()

        blob_gets = [h for m, p, h in proxy.requests if m == "GET" and "/blobs/" in p]
        assert all("Authorization" in h for h in blob_gets)  # the registry got credentials
        assert store.requests and all("Authorization" not in h for _, h in store.requests)
        assert all(h.get("Range", "").startswith("bytes=") for _, h in store.requests)
        # Each URL served 3 reads and then expired: the client went back to the registry.
        assert store.expired_answers >= 2
        assert store.signatures_issued == len(blob_gets) >= 4
        # A cached URL is reused: fewer trips to the registry than reads.
        assert len(blob_gets) < 10


def test_a_tail_read_is_one_suffix_range_request_and_gives_the_size(registry, blob, tmp_path):
    ref, data = blob
    proxy = HTTPProxy(registry.url)
    try:
        with RegistryClient(
            hosts_through(tmp_path, registry.host, proxy.url), retry=FAST_RETRY
        ) as c:
            digest = sha256_digest(data)
            assert c.read_tail(ref, digest, 1000) == (data[-1000:], len(data))
            assert c.read_tail(ref, digest, 10 * len(data)) == (data, len(data))
            source = RegistryBlobSource(c, ref, digest)
            assert source.read_tail(4096) == (data[-4096:], len(data))
            assert source.size == len(data)  # known from the tail read: no HEAD
        assert [(m, h.get("Range")) for m, _, h in proxy.requests] == [
            ("GET", "bytes=-1000"),
            ("GET", f"bytes=-{10 * len(data)}"),
            ("GET", "bytes=-4096"),
        ]
    finally:
        proxy.close()


def test_a_tail_read_from_a_registry_that_ignores_range_reads_to_the_end(registry, blob, tmp_path):
    ref, data = blob
    proxy = HTTPProxy(registry.url, strip_range=True)
    try:
        with RegistryClient(
            hosts_through(tmp_path, registry.host, proxy.url), retry=FAST_RETRY
        ) as c:
            source = RegistryBlobSource(c, ref, sha256_digest(data))
            assert source.read_tail(3000) == (data[-3000:], len(data))
            assert source.size == len(data)
    finally:
        proxy.close()


def test_opening_an_estargz_blob_of_unknown_size_costs_one_request(registry, client, tmp_path):
    # The footer and the TOC come with one suffix range read, counted at the registry's
    # door: no HEAD for the size, which the reader learns from that answer.
    blob = (TESTDATA / "gzip-64k.esgz").read_bytes()
    ref = Reference.parse(f"{registry.host}/{unique_repository('tail')}:v1")
    push_image(client, ref, [blob])
    proxy = HTTPProxy(registry.url)
    try:
        with RegistryClient(
            hosts_through(tmp_path, registry.host, proxy.url), retry=FAST_RETRY
        ) as c:
            source = CountingSource(RegistryBlobSource(c, ref, sha256_digest(blob)))
            reader = BlobReader.open(source)
            assert source.size == len(blob)
            assert reader.toc.lookup("etc/passwd") is not None
        assert [m for m, _, _ in proxy.requests] == ["GET"]
    finally:
        proxy.close()
