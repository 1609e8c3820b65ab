"""The TLS settings of hosts.toml (``ca``, ``skip_verify``, ``client``) against a real
docker-registry that serves HTTPS, with and without client certificates required, and
the errors a user sees when TLS is not set up right."""

from __future__ import annotations

import os
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from blockfs.oci import Manifest, Reference, sha256_digest
from blockfs.registry import (
    Credential,
    CredentialStore,
    HostsConfig,
    RegistryClient,
    RegistryTLSError,
)
from blockfs.registry._tls import default_ssl_context, ssl_context
from tests.helpers.cli import blockfs
from tests.helpers.registry import FAST_RETRY, TokenServer, push_image, unique_repository
from tests.helpers.tls import PKI, CertKey, combined_pem, issue, make_ca, make_pki
from tools.local_registry import (
    REGISTRY_BINARY,
    LocalRegistry,
    RegistryTLS,
    registry_available,
    start_registry,
)

pytestmark = pytest.mark.skipif(
    not registry_available(), reason=f"{REGISTRY_BINARY} is not installed (docker-registry)"
)

LAYER = os.urandom(200_000)
HANDSHAKE_ERROR = "TLS handshake error"


def write_hosts(hosts_dir: Path, namespace: str, text: str) -> Path:
    """``hosts_dir/namespace/hosts.toml`` as containerd's certs.d lays it out; the dir."""
    (hosts_dir / namespace).mkdir(parents=True, exist_ok=True)
    (hosts_dir / namespace / "hosts.toml").write_text(text)
    return hosts_dir


def client_for(hosts_dir: Path | None, *, plain_http: bool = False) -> RegistryClient:
    """A client as the CLI builds one: from a hosts directory (or none)."""
    hosts = HostsConfig.load(hosts_dir) if hosts_dir is not None else None
    return RegistryClient(hosts, plain_http=plain_http, retry=FAST_RETRY, trust_env=False)


def handshake_errors(registry: LocalRegistry) -> int:
    """TLS handshakes the registry saw fail (Go's http server logs each one)."""
    return registry.log().count(HANDSHAKE_ERROR)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[LocalRegistry]:
    """An HTTPS registry with a certificate for 127.0.0.1 signed by ``pki``'s CA."""
    tls = RegistryTLS(pki.server.cert, pki.server.key)
    with start_registry(tmp_path_factory.mktemp("tls-registry"), tls=tls) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_registry(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[LocalRegistry]:
    """An HTTPS registry that requires client certificates signed by ``pki``'s CA."""
    tls = RegistryTLS(pki.server.cert, pki.server.key, client_cas=(pki.ca_cert,))
    with start_registry(tmp_path_factory.mktemp("mtls-registry"), tls=tls) as running:
        yield running


def push_with_ca(registry: LocalRegistry, pki: PKI, workdir: Path, prefix: str) -> Reference:
    """Push a one-layer image (``LAYER``) over TLS, trusting the CA (and presenting the
    client certificate when the registry wants one)."""
    text = f'ca = "{pki.ca_cert}"\n'
    if registry.tls is not None and registry.tls.client_cas:
        text += f'client = [["{pki.client.cert}", "{pki.client.key}"]]\n'
    hosts = write_hosts(workdir, registry.host, text)
    ref = Reference.parse(f"{registry.host}/{unique_repository(prefix)}:v1")
    with client_for(hosts) as c:
        push_image(c, ref, [LAYER])
    return ref


@pytest.fixture(scope="module")
def image(
    tls_registry: LocalRegistry, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    return push_with_ca(tls_registry, pki, tmp_path_factory.mktemp("push-hosts"), "tls")


@pytest.fixture(scope="module")
def mtls_image(
    mtls_registry: LocalRegistry, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    return push_with_ca(mtls_registry, pki, tmp_path_factory.mktemp("push-hosts"), "mtls")


def assert_reads(client: RegistryClient, ref: Reference) -> None:
    """Manifest by tag and digest, the blob's size and byte ranges: all over TLS."""
    descriptor, _ = client.resolve(ref)
    manifest = client.get_manifest(ref.with_digest(descriptor.digest))
    assert isinstance(manifest, Manifest)
    digest = sha256_digest(LAYER)
    assert [layer.digest for layer in manifest.layers] == [digest]
    assert client.blob_size(ref, digest) == len(LAYER)
    for offset, length in ((0, 1), (4096, 10_000), (len(LAYER) - 7, 7)):
        assert client.read_range(ref, digest, offset, length) == LAYER[offset : offset + length]


# -- trusting the registry's certificate -------------------------------------------------------


def test_without_a_ca_the_error_names_the_host_and_what_to_set(tls_registry, image, tmp_path):
    before = handshake_errors(tls_registry)
    with client_for(tmp_path) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(image)
    message = str(info.value)
    assert f"the TLS certificate of {tls_registry.host} is not trusted" in message
    # Where to put what: this client's hosts directory, in containerd's layout.
    assert 'Set ca = "/path/to/ca.pem"' in message
    assert str(tmp_path / tls_registry.host / "hosts.toml") in message
    assert "skip_verify = true" in message and "insecure" in message
    assert "_ssl.c" not in message  # no raw OpenSSL text
    # A certificate that is not trusted stays so: one handshake, no retries.
    assert "gave up" not in message
    deadline = time.monotonic() + 5
    while handshake_errors(tls_registry) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert handshake_errors(tls_registry) == before + 1


def test_without_a_hosts_directory_the_hint_says_how_to_make_one(tls_registry, image):
    with client_for(None) as c, pytest.raises(RegistryTLSError) as info:
        c.read_range(image, sha256_digest(LAYER), 0, 10)
    message = str(info.value)
    assert tls_registry.host in message and "not trusted" in message
    assert f"DIR/{tls_registry.host}/hosts.toml" in message and "--hosts-dir" in message
    assert info.value.host == tls_registry.host and info.value.repository == image.repository


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_ca_in_hosts_toml_lets_manifests_and_ranges_through(
    tls_registry, pki, image, tmp_path, where
):
    if where == "absolute":
        hosts = write_hosts(tmp_path, tls_registry.host, f'ca = "{pki.ca_cert}"\n')
    else:  # next to hosts.toml, as containerd's certs.d directories usually hold it
        hosts = write_hosts(tmp_path, tls_registry.host, 'ca = "ca.pem"\n')
        shutil.copy(pki.ca_cert, tmp_path / tls_registry.host / "ca.pem")
    with client_for(hosts) as c:
        assert_reads(c, image)


def test_ca_for_another_authority_is_refused(tls_registry, image, tmp_path):
    other = make_ca(tmp_path / "other", "other-ca")
    hosts = write_hosts(tmp_path / "hosts", tls_registry.host, f'ca = "{other.cert}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError, match="is not trusted"):
        c.resolve(image)


def test_skip_verify_works_without_the_ca(tls_registry, image, tmp_path):
    hosts = write_hosts(tmp_path, tls_registry.host, "skip_verify = true\n")
    with client_for(hosts) as c:
        assert_reads(c, image)


def test_ca_applies_to_an_explicit_https_server_entry(tls_registry, pki, image, tmp_path):
    # The server line names the registry explicitly with https://, as most files do.
    hosts = write_hosts(
        tmp_path,
        tls_registry.host,
        f'server = "{tls_registry.url}"\nca = "{pki.ca_cert}"\n',
    )
    with client_for(hosts) as c:
        assert c.get_blob(image, sha256_digest(LAYER)) == LAYER


def test_unreadable_ca_file_is_named(tls_registry, image, tmp_path):
    missing = tmp_path / "nowhere" / "ca.pem"
    hosts = write_hosts(tmp_path, tls_registry.host, f'ca = "{missing}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(image)
    message = str(info.value)
    assert f"cannot load the CA certificate {missing}" in message
    assert str(tmp_path / tls_registry.host / "hosts.toml") in message


# -- the certificate's name ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def localhost_registry(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[LocalRegistry]:
    """An HTTPS registry whose certificate names only ``localhost``, not 127.0.0.1."""
    cert: CertKey = issue(
        pki.ca,
        tmp_path_factory.mktemp("localhost-cert"),
        "localhost",
        subject_alt_names=["DNS:localhost"],
    )
    with start_registry(
        tmp_path_factory.mktemp("localhost-registry"), tls=RegistryTLS(cert.cert, cert.key)
    ) as running:
        yield running


def test_certificate_for_another_name_is_refused_even_with_the_ca(
    localhost_registry, pki, tmp_path
):
    port = localhost_registry.host.rsplit(":", 1)[1]
    by_ip = Reference.parse(f"{localhost_registry.host}/{unique_repository('name')}:v1")
    by_name = Reference.parse(f"localhost:{port}/{by_ip.repository}:v1")
    write_hosts(tmp_path, by_ip.registry, f'ca = "{pki.ca_cert}"\n')
    write_hosts(tmp_path, by_name.registry, f'ca = "{pki.ca_cert}"\n')
    with client_for(tmp_path) as c:
        with pytest.raises(RegistryTLSError) as info:
            push_image(c, by_ip, [LAYER])
        message = str(info.value)
        assert f"the TLS certificate of {by_ip.registry} is not valid for 127.0.0.1" in message
        assert "skip_verify" in message and "gave up" not in message
        # The same registry and CA, dialled by the name the certificate lists: accepted.
        push_image(c, by_name, [LAYER])
        assert c.read_range(by_name, sha256_digest(LAYER), 100, 50) == LAYER[100:150]


# -- HTTP and HTTPS mixed up -------------------------------------------------------------------


def test_plain_http_to_a_tls_registry_says_it_speaks_https(tls_registry, image, tmp_path):
    with client_for(None, plain_http=True) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(image)
    message = str(info.value)
    assert f"{tls_registry.host} speaks HTTPS only" in message
    assert "--plain-http" in message
    hosts = write_hosts(tmp_path, tls_registry.host, f'server = "http://{tls_registry.host}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(image)
    message = str(info.value)
    assert f"Write https://{tls_registry.host} instead of http://{tls_registry.host}" in message
    assert str(hosts / tls_registry.host / "hosts.toml") in message


def test_tls_to_a_plain_http_registry_says_it_does_not_speak_tls(registry, tmp_path):
    ref = Reference.parse(f"{registry.host}/{unique_repository('plain')}:v1")
    hosts = write_hosts(tmp_path, registry.host, f'server = "https://{registry.host}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(ref)
    message = str(info.value)
    assert f"{registry.host} does not speak TLS" in message
    assert f"write http://{registry.host} instead of https://{registry.host}" in message


# -- client certificates (mutual TLS) ------------------------------------------------------------


def test_registry_requiring_client_certificates_refuses_a_client_without_one(
    mtls_registry, mtls_image, pki, tmp_path
):
    hosts = write_hosts(tmp_path, mtls_registry.host, f'ca = "{pki.ca_cert}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(mtls_image)
    message = str(info.value)
    assert f"{mtls_registry.host} refused the TLS connection" in message
    assert "requires a client certificate and none is configured" in message
    assert 'Set client = [["/path/client.pem", "/path/client.key"]]' in message
    assert str(tmp_path / mtls_registry.host / "hosts.toml") in message
    assert "gave up" not in message


def test_client_certificate_pair_is_accepted(mtls_registry, mtls_image, pki, tmp_path):
    hosts = write_hosts(
        tmp_path,
        mtls_registry.host,
        f'ca = "{pki.ca_cert}"\nclient = [["{pki.client.cert}", "{pki.client.key}"]]\n',
    )
    with client_for(hosts) as c:
        assert_reads(c, mtls_image)


def test_client_certificate_and_key_in_one_file_are_accepted(
    mtls_registry, mtls_image, pki, tmp_path
):
    directory = tmp_path / mtls_registry.host
    directory.mkdir()
    combined_pem(pki.client, directory / "client-both.pem")
    write_hosts(tmp_path, mtls_registry.host, f'ca = "{pki.ca_cert}"\nclient = "client-both.pem"\n')
    with client_for(tmp_path) as c:
        assert_reads(c, mtls_image)


def test_client_certificate_from_an_untrusted_authority_is_refused(
    mtls_registry, mtls_image, pki, tmp_path
):
    stranger_ca = make_ca(tmp_path / "stranger", "stranger-ca")
    stranger = issue(stranger_ca, tmp_path / "stranger", "stranger", usage="clientAuth")
    hosts = write_hosts(
        tmp_path / "hosts",
        mtls_registry.host,
        f'ca = "{pki.ca_cert}"\nclient = [["{stranger.cert}", "{stranger.key}"]]\n',
    )
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(mtls_image)
    message = str(info.value)
    assert f"{mtls_registry.host} refused our TLS client certificate {stranger.cert}" in message
    assert "client CAs" in message


def test_client_certificate_with_the_wrong_key_is_named(mtls_registry, mtls_image, pki, tmp_path):
    hosts = write_hosts(
        tmp_path,
        mtls_registry.host,
        f'ca = "{pki.ca_cert}"\nclient = [["{pki.client.cert}", "{pki.server.key}"]]\n',
    )
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(mtls_image)
    message = str(info.value)
    assert f"cannot load the client certificate {pki.client.cert} and {pki.server.key}" in message


# -- the command line --------------------------------------------------------------------------


def test_cli_converts_to_and_reads_from_a_tls_registry_with_hosts_dir(tls_registry, pki, tmp_path):
    from tests.helpers.images import make_layout

    def tree(root: Path) -> None:
        (root / "etc").mkdir()
        (root / "etc" / "motd").write_text("served over TLS\n")

    make_layout(tmp_path / "layout", [tree])
    hosts = write_hosts(tmp_path / "certs.d", tls_registry.host, f'ca = "{pki.ca_cert}"\n')
    ref = f"{tls_registry.host}/{unique_repository('cli')}:v1"
    # Without the hosts directory the CA is unknown: a one-line error, exit status 1.
    failed = blockfs("image", "convert", f"oci:{tmp_path / 'layout'}:v1", ref, check=False)
    assert failed.returncode == 1
    assert f"blockfs: error: the TLS certificate of {tls_registry.host} is not trusted" in (
        failed.stderr
    )
    assert "Traceback" not in failed.stderr
    out = blockfs(
        "image", "convert", "--hosts-dir", str(hosts), f"oci:{tmp_path / 'layout'}:v1", ref
    )
    converted = [line.split()[5] for line in out.stdout.splitlines() if line.startswith("layer ")]
    assert len(converted) == 1 and out.stdout.count("[uploaded]") == 1
    blob = f"{ref.rsplit(':', 1)[0]}@{converted[0]}"
    cat = blockfs("layer", "cat", "--hosts-dir", str(hosts), blob, "etc/motd")
    assert cat.stdout == "served over TLS\n"


# -- a token server behind TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def token_behind_tls(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[tuple[LocalRegistry, Reference]]:
    """A plain-HTTP registry whose Bearer tokens come from an HTTPS token server with a
    certificate signed by ``pki``'s CA, holding a public image pushed by alice."""
    base = tmp_path_factory.mktemp("tls-token")
    tokens = TokenServer(
        base / "token", users={"alice": "wonderland"}, public=["pub/app"], tls=pki.server
    )
    try:
        with start_registry(base / "registry", token=tokens.auth()) as registry:
            ref = Reference.parse(f"{registry.host}/pub/app:v1")
            hosts = write_hosts(
                base / "push-hosts", registry.host,
                f'server = "http://{registry.host}"\nca = "{pki.ca_cert}"\n',
            )  # fmt: skip
            alice = CredentialStore({registry.host: Credential("alice", "wonderland")})
            with RegistryClient(HostsConfig.load(hosts), alice, retry=FAST_RETRY) as c:
                push_image(c, ref, [LAYER])
            yield registry, ref
    finally:
        tokens.close()


def test_an_untrusted_token_server_is_a_tls_error_that_says_what_to_set(token_behind_tls, tmp_path):
    registry, ref = token_behind_tls
    hosts = write_hosts(tmp_path, registry.host, f'server = "http://{registry.host}"\n')
    with client_for(hosts) as c, pytest.raises(RegistryTLSError) as info:
        c.resolve(ref)
    message = str(info.value)
    assert "the token server https://127.0.0.1:" in message and "is not trusted" in message
    assert 'Set ca = "/path/to/ca.pem"' in message
    assert str(tmp_path / registry.host / "hosts.toml") in message
    assert "gave up" not in message and "_ssl.c" not in message


def test_the_registrys_ca_setting_also_covers_its_token_server(token_behind_tls, pki, tmp_path):
    registry, ref = token_behind_tls
    hosts = write_hosts(
        tmp_path, registry.host, f'server = "http://{registry.host}"\nca = "{pki.ca_cert}"\n'
    )
    with client_for(hosts) as c:
        assert c.read_range(ref, sha256_digest(LAYER), 10, 20) == LAYER[10:30]


def test_endpoints_without_tls_settings_share_one_context_and_the_others_get_their_own(
    pki, tmp_path
):
    # Loading the system's CA certificates costs about 30 ms: done once per process for
    # every endpoint that needs nothing else, never for one with settings of its own.
    plain = HostsConfig(None).endpoints("a.example")[0]
    other = HostsConfig(None).endpoints("b.example:5000")[0]
    assert ssl_context(plain, None) is ssl_context(other, None) is default_ssl_context()
    skip = attrs.evolve(plain, skip_verify=True)
    with_ca = attrs.evolve(plain, ca=(str(pki.ca.cert),))
    assert ssl_context(skip, None) is not default_ssl_context()
    assert ssl_context(skip, None).verify_mode == ssl.CERT_NONE
    assert default_ssl_context().verify_mode == ssl.CERT_REQUIRED
    assert ssl_context(with_ca, None) is not default_ssl_context()
