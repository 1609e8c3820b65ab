"""Basic (htpasswd) and Bearer (token server) authentication against a real registry."""

import base64
import json
import os
import time

import pytest

from blockfs.oci import Reference, sha256_digest
from blockfs.registry import Credential, CredentialStore, RegistryAuthError, RegistryClient
from tests.helpers.registry import (
    FAST_RETRY,
    TokenServer,
    make_htpasswd,
    push_image,
    start_registry,
    unique_repository,
)

USER, PASSWORD = "blockfs", "correct horse"


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("basic-registry")
    htpasswd = make_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    with start_registry(workdir / "registry", htpasswd=htpasswd) as running:
        yield running


def write_config(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def client_for(credentials):
    return RegistryClient(
        credentials=credentials, plain_http=True, retry=FAST_RETRY, trust_env=False
    )


def test_basic_auth_with_base64_auths_entry_pushes_and_reads(basic_registry, tmp_path):
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = write_config(
        tmp_path / "config.json", {"auths": {f"http://{basic_registry.host}/v2/": {"auth": auth}}}
    )
    ref = Reference.parse(f"{basic_registry.host}/{unique_repository('basic')}:v1")
    data = os.urandom(5000)
    with client_for(CredentialStore.from_docker_config(config)) as c:
        push_image(c, ref, [data])
        assert c.read_range(ref, sha256_digest(data), 10, 100) == data[10:110]


def test_docker_config_is_found_through_DOCKER_CONFIG(basic_registry, tmp_path):
    write_config(
        tmp_path / "cfg" / "config.json",
        {"auths": {basic_registry.host: {"username": USER, "password": PASSWORD}}},
    )
    store = CredentialStore.from_docker_config(env={"DOCKER_CONFIG": str(tmp_path / "cfg")})
    ref = Reference.parse(f"{basic_registry.host}/{unique_repository('env')}:v1")
    with client_for(store) as c:
        push_image(c, ref, [b"layer"])
        assert c.resolve(ref)[1]


def test_basic_auth_through_a_creds_store_helper(basic_registry, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-blockfstest"
    helper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 2\n'
        "read server\n"
        f'if [ "$server" = "{basic_registry.host}" ]; then\n'
        f'  echo \'{{"ServerURL": "{basic_registry.host}", "Username": "{USER}", "Secret": "{PASSWORD}"}}\'\n'
        "else\n"
        '  echo "credentials not found in native keychain"; exit 1\n'
        "fi\n"
    )
    helper.chmod(0o755)
    config = write_config(
        tmp_path / "config.json", {"credsStore": "blockfstest", "auths": {basic_registry.host: {}}}
    )
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    store = CredentialStore.from_docker_config(config, env=env)
    assert store.get("elsewhere.example.com") is None
    ref = Reference.parse(f"{basic_registry.host}/{unique_repository('helper')}:v1")
    with client_for(store) as c:
        push_image(c, ref, [b"helper layer"])
        assert c.get_blob(ref, sha256_digest(b"helper layer")) == b"helper layer"


def test_missing_credentials_raise_auth_error_saying_how_to_log_in(basic_registry):
    ref = Reference.parse(f"{basic_registry.host}/{unique_repository('nocreds')}:v1")
    with client_for(CredentialStore()) as c, pytest.raises(RegistryAuthError) as info:
        c.resolve(ref)
    message = str(info.value)
    assert basic_registry.host in message
    assert f"docker login {basic_registry.host}" in message
    assert "config.json" in message
    assert info.value.status == 401


def test_wrong_password_is_reported_as_rejected_credentials(basic_registry):
    store = CredentialStore({basic_registry.host: Credential(USER, "wrong")})
    ref = Reference.parse(f"{basic_registry.host}/{unique_repository('wrong')}:v1")
    with (
        client_for(store) as c,
        pytest.raises(RegistryAuthError, match=f"rejected the credentials of user '{USER}'"),
    ):
        c.resolve(ref)


# -- Bearer tokens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("token-registry")
    server = TokenServer(
        workdir / "token",
        users={"alice": "wonderland"},
        refresh_tokens={"alice-refresh-token": "alice"},
        public=["pub/app"],
    )
    try:
        with start_registry(workdir / "registry", token=server.auth()) as running:
            alice = CredentialStore({running.host: Credential("alice", "wonderland")})
            ref = Reference.parse(f"{running.host}/pub/app:v1")
            data = os.urandom(50_000)
            with client_for(alice) as c:
                push_image(c, ref, [data])
            yield running, server, ref, data
    finally:
        server.close()


def test_anonymous_bearer_token_reads_a_public_repository(token_setup):
    _registry, server, ref, data = token_setup
    with client_for(CredentialStore()) as c:
        assert c.read_range(ref, sha256_digest(data), 0, 1000) == data[:1000]
        issued = server.issued
        assert c.read_range(ref, sha256_digest(data), 1000, 1000) == data[1000:2000]
        assert server.issued == issued  # the cached token was reused


def test_credentialed_bearer_flow_sends_the_password_to_the_token_server(token_setup):
    registry, server, _ref, _data = token_setup
    private = Reference.parse(f"{registry.host}/{unique_repository('private')}:v1")
    alice = CredentialStore({registry.host: Credential("alice", "wonderland")})
    with client_for(alice) as c:
        push_image(c, private, [b"secret layer"])
        assert c.get_blob(private, sha256_digest(b"secret layer")) == b"secret layer"
    assert any(
        r["user"] == "alice" and r["scopes"] == [f"repository:{private.repository}:pull"]
        for r in server.requests
    )
    with (
        client_for(CredentialStore()) as anonymous,
        pytest.raises(RegistryAuthError, match="docker login"),
    ):
        anonymous.resolve(private)


def test_identity_token_is_exchanged_with_the_refresh_token_grant(token_setup):
    registry, server, _ref, _data = token_setup
    private = Reference.parse(f"{registry.host}/{unique_repository('identity')}:v1")
    store = CredentialStore({registry.host: Credential(identity_token="alice-refresh-token")})
    with client_for(store) as c:
        push_image(c, private, [b"identity layer"])
        assert c.get_blob(private, sha256_digest(b"identity layer")) == b"identity layer"
    assert server.requests[-1]["user"] == "alice"


def test_wrong_password_at_the_token_server_raises_auth_error(token_setup):
    registry, _, ref, _ = token_setup
    store = CredentialStore({registry.host: Credential("alice", "nope")})
    with (
        client_for(store) as c,
        pytest.raises(RegistryAuthError, match="refused the credentials of user 'alice'"),
    ):
        c.resolve(ref)


def test_token_that_expires_between_reads_is_refreshed_transparently(token_setup):
    _registry, server, ref, data = token_setup
    digest = sha256_digest(data)
    # The registry allows 60 s of clock leeway past exp: the first token stops working about
    # 3 s after it is issued, though the client is told it lasts 300 s.
    first = server.issued + 1
    server.lifetime = lambda n: -57 if n == first else 300
    try:
        with client_for(CredentialStore()) as c:
            assert c.read_range(ref, digest, 0, 100) == data[:100]
            assert server.issued == first  # one token, accepted
            time.sleep(3.5)
            assert c.read_range(ref, digest, 100, 100) == data[100:200]
            assert server.issued == first + 1  # rejected with 401, refreshed, retried
    finally:
        server.lifetime = lambda n: 300
