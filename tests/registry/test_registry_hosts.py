"""containerd hosts.toml: parsing, and mirrors that are down or lack the content."""

import os
import urllib.parse

import pytest

from blockfs.oci import Reference, sha256_digest
from blockfs.registry import HostsConfig, HostsConfigError, RegistryClient, RegistryUnavailable
from tests.helpers.registry import (
    FAST_RETRY,
    HTTPProxy,
    free_port,
    push_image,
    start_registry,
    unique_repository,
)


def write_hosts(root, namespace, text):
    directory = root / namespace
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return HostsConfig.load(root)


def test_hosts_toml_lists_mirrors_in_file_order_then_the_server(tmp_path):
    hosts = write_hosts(
        tmp_path,
        "docker.io",
        """
server = "https://docker.io"

[host."https://mirror-b.example.com"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "b.crt"
  [host."https://mirror-b.example.com".header]
    x-token = "abc"
    x-multi = ["1", "2"]

[host."http://10.0.0.1:5000/prefix"]
  capabilities = ["pull", "resolve"]
  override_path = true
  dial_timeout = "1.5s"
  client = [["/etc/c.cert", "/etc/c.key"], "both.pem"]

[host."mirror-a.example.com/base"]
  ca = ["/abs/a.crt", "rel/a2.crt"]
""",
    )
    endpoints = hosts.endpoints("docker.io")
    assert [e.api_root for e in endpoints] == [
        "https://mirror-b.example.com/v2",
        "http://10.0.0.1:5000/prefix",
        "https://mirror-a.example.com/base/v2",
        "https://registry-1.docker.io/v2",
    ]
    b, plain, a, server = endpoints
    assert b.capabilities == {"pull"} and b.skip_verify and b.mirror
    assert b.ca == (str(tmp_path / "docker.io" / "b.crt"),)
    assert b.headers == (("x-token", "abc"), ("x-multi", "1"), ("x-multi", "2"))
    assert plain.scheme == "http" and plain.capabilities == {"pull", "resolve"}
    assert plain.dial_timeout == 1.5
    assert plain.client_certs == (
        ("/etc/c.cert", "/etc/c.key"),
        (str(tmp_path / "docker.io" / "both.pem"), None),
    )
    assert a.ca == ("/abs/a.crt", str(tmp_path / "docker.io" / "rel/a2.crt"))
    assert server.capabilities == {"pull", "resolve", "push"} and not server.mirror


def test_namespace_with_port_prefers_the_underscore_directory_then_default(tmp_path):
    write_hosts(tmp_path, "_default", 'server = "https://fallback.example.com"\n')
    hosts = write_hosts(
        tmp_path, "reg.example.com_5000_", 'server = "https://chosen.example.com"\n'
    )
    assert hosts.endpoints("reg.example.com:5000")[0].api_root == "https://chosen.example.com/v2"
    assert hosts.endpoints("other.example.com")[0].api_root == "https://fallback.example.com/v2"


def test_without_a_hosts_file_the_namespace_itself_is_the_server(tmp_path):
    hosts = HostsConfig.load(tmp_path)
    assert [e.api_root for e in hosts.endpoints("docker.io")] == ["https://registry-1.docker.io/v2"]
    assert [e.api_root for e in hosts.endpoints("r:5000", plain_http=True)] == ["http://r:5000/v2"]
    assert [e.api_root for e in HostsConfig().endpoints("quay.io")] == ["https://quay.io/v2"]


def test_hosts_file_changes_are_picked_up(tmp_path):
    hosts = write_hosts(tmp_path, "r.example.com", 'server = "https://one.example.com"\n')
    assert hosts.endpoints("r.example.com")[0].host == "one.example.com"
    path = tmp_path / "r.example.com" / "hosts.toml"
    path.write_text('server = "https://two.example.com"\n')
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert hosts.endpoints("r.example.com")[0].host == "two.example.com"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [", "cannot read"),
        ('[host."ftp://x"]\n', "http:// or https://"),
        ('[host."https://x"]\ncapabilities = ["fly"]\n', "capabilities"),
        ('[host."https://x"]\nskip_verify = "yes"\n', "skip_verify"),
        ('[host."https://x"]\ndial_timeout = "soon"\n', "invalid duration"),
        ('[host."https://x"]\nclient = [["a", "b", "c"]]\n', "client"),
    ],
)
def test_invalid_hosts_files_are_refused_naming_the_file(tmp_path, text, message):
    hosts = write_hosts(tmp_path, "r.example.com", text)
    with pytest.raises(HostsConfigError, match=message) as info:
        hosts.endpoints("r.example.com")
    assert "hosts.toml" in str(info.value)


@pytest.fixture
def image(registry, client):
    ref = Reference.parse(f"{registry.host}/{unique_repository('mirrors')}:v1")
    data = os.urandom(100_000)
    push_image(client, ref, [data])
    return ref, data


def test_reads_go_past_a_mirror_that_is_down(registry, image, tmp_path):
    ref, data = image
    dead = free_port()
    hosts = write_hosts(
        tmp_path,
        registry.host,
        f'server = "http://{registry.host}"\n\n[host."http://127.0.0.1:{dead}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    with RegistryClient(hosts, retry=FAST_RETRY) as c:
        assert c.resolve(ref)[0].size > 0
        for offset in (0, 5000, 99_000):
            assert (
                c.read_range(ref, sha256_digest(data), offset, 1000) == data[offset : offset + 1000]
            )


def test_a_mirror_without_the_content_falls_back_to_upstream(registry, image, tmp_path):
    ref, data = image
    with start_registry(tmp_path / "empty-mirror") as mirror:
        proxy = HTTPProxy(mirror.url)  # to see what the mirror was asked
        try:
            hosts = write_hosts(
                tmp_path / "hosts",
                registry.host,
                f'server = "http://{registry.host}"\n\n[host."{proxy.url}"]\n  capabilities = ["pull"]\n',
            )
            with RegistryClient(hosts, retry=FAST_RETRY) as c:
                descriptor, _ = c.resolve(ref)
                assert c.read_range(ref, sha256_digest(data), 10, 10) == data[10:20]
                assert c.get_manifest(ref.with_digest(descriptor.digest))
        finally:
            proxy.close()
    asked = [(m, urllib.parse.unquote(p)) for m, p, _ in proxy.requests]
    # A pull-only mirror is never asked to resolve a tag, but is tried for content by digest,
    # with the namespace it mirrors.
    assert not any("/manifests/v1" in p for _, p in asked)
    assert any(f"/blobs/{sha256_digest(data)}?ns={registry.host}" in p for _, p in asked)
    assert any(f"/manifests/{descriptor.digest}" in p for _, p in asked)


def test_when_every_endpoint_is_down_the_error_names_them_all(tmp_path):
    dead_mirror, dead_server = free_port(), free_port()
    namespace = f"127.0.0.1:{dead_server}"
    hosts = write_hosts(
        tmp_path,
        namespace,
        f'server = "http://{namespace}"\n[host."http://127.0.0.1:{dead_mirror}"]\n',
    )
    ref = Reference.parse(f"{namespace}/a/b:v1")
    with RegistryClient(hosts, retry=FAST_RETRY) as c, pytest.raises(RegistryUnavailable) as info:
        c.resolve(ref)
    message = str(info.value)
    assert f"127.0.0.1:{dead_mirror}" in message and namespace in message
    assert "gave up after 4 attempts" in message
