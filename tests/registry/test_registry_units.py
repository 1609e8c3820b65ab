"""Pieces of the registry client that need no server: challenges, scopes, retries,
credentials, the auth flow."""

import base64
import itertools
import json
import random

import httpx
import pytest

from blockfs.registry import (
    Challenge,
    Credential,
    CredentialHelperError,
    CredentialStore,
    Endpoint,
    RegistryAuthError,
    RegistryError,
    RetryPolicy,
    parse_www_authenticate,
)
from blockfs.registry._auth import Authenticator, RegistryAuth, merge_scopes
from blockfs.registry._client import repository_of
from blockfs.registry._hosts import parse_duration
from blockfs.registry._target import Target


def test_bearer_challenge_is_parsed_with_quoted_values():
    header = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"'
    [challenge] = parse_www_authenticate(header)
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.service == "registry.docker.io"
    assert challenge.scopes == ("repository:library/busybox:pull",)


def test_several_challenges_escapes_and_tokens_are_parsed():
    header = 'Basic realm="a \\"quoted\\" realm", Bearer realm=https://x/token, error="invalid_token",scope="a:b:pull c:d:push"'
    basic, bearer = parse_www_authenticate(header)
    assert basic == Challenge("basic", {"realm": 'a "quoted" realm'})
    assert bearer.realm == "https://x/token"
    assert bearer.params["error"] == "invalid_token"
    assert bearer.scopes == ("a:b:pull", "c:d:push")


def test_malformed_challenge_raises_value_error():
    with pytest.raises(ValueError):
        parse_www_authenticate('Bearer realm="unterminated')


def test_scopes_on_the_same_repository_are_merged():
    assert merge_scopes(["repository:a:pull"], ["repository:a:push", "repository:b:pull"]) == (
        "repository:a:pull,push",
        "repository:b:pull",
    )


def test_retry_delays_grow_are_jittered_and_bounded():
    policy = RetryPolicy(base_delay=0.2, max_delay=1.0, max_retry_after=10)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]:
        delays = [policy.delay(attempt, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert policy.delay(1, 3.0, rng=rng) == 3.0
    assert policy.delay(1, 3600.0, rng=rng) == 10  # Retry-After honoured, within bounds


def test_retry_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(total_timeout=0)


def test_go_durations_are_parsed():
    assert parse_duration("1s") == 1.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("10 seconds")


def write(path, config):
    path.write_text(json.dumps(config))
    return path


def test_docker_config_auth_keys_in_any_form_match_the_host(tmp_path):
    def auth(user):
        return {"auth": base64.b64encode(f"{user}:pw-{user}".encode()).decode()}

    config = write(
        tmp_path / "config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": auth("hub"),
                "https://ghcr.io": auth("gh"),
                "registry.example.com:5000": {"username": "plain", "password": "pw"},
                "http://tokens.example.com/v2/": {"identitytoken": "refresh-me"},
                "empty.example.com": {},
            }
        },
    )
    store = CredentialStore.from_docker_config(config)
    assert store.get("docker.io") == Credential("hub", "pw-hub")
    assert store.get("registry-1.docker.io") == Credential("hub", "pw-hub")
    assert store.get("ghcr.io") == Credential("gh", "pw-gh")
    assert store.get("REGISTRY.example.com:5000") == Credential("plain", "pw")
    assert store.get("tokens.example.com") == Credential(identity_token="refresh-me")
    assert store.get("empty.example.com") is None
    assert store.get("other.example.com") is None


def test_credentials_do_not_show_secrets_in_repr():
    assert "pw" not in repr(Credential("user", "pw", identity_token="pw2"))


def test_missing_docker_config_is_an_empty_store(tmp_path):
    assert CredentialStore.from_docker_config(tmp_path / "absent.json").get("docker.io") is None


def test_bad_auth_entry_is_an_auth_error_naming_the_key(tmp_path):
    config = write(tmp_path / "config.json", {"auths": {"r.example.com": {"auth": "!!!"}}})
    with pytest.raises(RegistryAuthError, match=r"r\.example\.com"):
        CredentialStore.from_docker_config(config)


def helper(tmp_path, name, script):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_cred_helpers_take_precedence_and_receive_the_docker_hub_url(tmp_path):
    env = helper(
        tmp_path,
        "hub",
        'read url\n[ "$url" = "https://index.docker.io/v1/" ] || exit 3\n'
        'echo \'{"Username": "<token>", "Secret": "refresh"}\'\n',
    )
    config = write(
        tmp_path / "config.json",
        {
            "credHelpers": {"docker.io": "hub"},
            "auths": {"docker.io": {"username": "u", "password": "p"}},
        },
    )
    store = CredentialStore.from_docker_config(config, env=env)
    assert store.get("docker.io") == Credential(identity_token="refresh")
    assert store.get("index.docker.io") == Credential(identity_token="refresh")


def test_helper_not_found_answer_falls_back_to_auths(tmp_path):
    env = helper(tmp_path, "none", 'echo "credentials not found in native keychain"\nexit 1\n')
    config = write(
        tmp_path / "config.json",
        {"credsStore": "none", "auths": {"r.io": {"username": "u", "password": "p"}}},
    )
    store = CredentialStore.from_docker_config(config, env=env)
    assert store.get("r.io") == Credential("u", "p")
    assert store.get("s.io") is None


def test_missing_or_broken_helper_is_a_clear_error(tmp_path):
    env = helper(tmp_path, "broken", 'echo "keychain locked" >&2\nexit 5\n')
    config = write(
        tmp_path / "config.json", {"credHelpers": {"a.io": "broken", "b.io": "absent-helper"}}
    )
    store = CredentialStore.from_docker_config(config, env=env)
    with pytest.raises(CredentialHelperError, match="keychain locked"):
        store.get("a.io")
    with pytest.raises(
        CredentialHelperError, match="docker-credential-absent-helper is not installed"
    ):
        store.get("b.io")


def test_registry_error_message_names_host_repository_digest_status_and_hint():
    error = RegistryError(
        "it broke", host="h:1", repository="a/b", digest="sha256:x", status=503, hint="Try later."
    )
    assert (
        str(error) == "it broke (host h:1, repository a/b, digest sha256:x, HTTP 503). Try later."
    )


def test_repository_pairs_are_normalized_like_references():
    assert repository_of(("index.docker.io", "busybox")) == ("docker.io", "library/busybox")
    assert repository_of(("r:5000", "a/b")) == ("r:5000", "a/b")


def test_auth_flow_answers_a_401_with_a_token_then_sends_it_from_the_start():
    """The httpx.Auth flow on its own, against an in-process registry and token server."""
    seen: list[tuple[str, str | None]] = []
    issued = itertools.count(1)
    valid = {"Bearer t1"}

    def answer(request: httpx.Request) -> httpx.Response:
        authorization = request.headers.get("authorization")
        seen.append((request.url.path, authorization))
        if request.url.host == "auth.example.com":
            assert request.url.params["scope"] == "repository:a/b:pull"
            return httpx.Response(200, json={"token": f"t{next(issued)}"})
        if authorization in valid:
            return httpx.Response(200, content=b"manifest")
        challenge = 'Bearer realm="https://auth.example.com/token",service="r.example.com"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    ep = Endpoint("https://r.example.com/v2", "r.example.com")
    target = Target("r.example.com", "a/b", "pull", "manifest", scopes=("repository:a/b:pull",))
    authenticator = Authenticator(CredentialStore(), None)
    url = "https://r.example.com/v2/a/b/manifests/v1"
    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        first = http.get(url, auth=RegistryAuth(authenticator, ep, target, http))
        assert first.content == b"manifest"
        assert seen == [
            ("/v2/a/b/manifests/v1", None),
            ("/token", None),
            ("/v2/a/b/manifests/v1", "Bearer t1"),
        ]
        seen.clear()
        assert http.get(url, auth=RegistryAuth(authenticator, ep, target, http)).is_success
        assert seen == [("/v2/a/b/manifests/v1", "Bearer t1")]  # the cached token, at once

        valid.clear()  # the registry now refuses every token: one new token, then an error
        seen.clear()
        with pytest.raises(RegistryAuthError, match="requires authentication") as info:
            http.get(url, auth=RegistryAuth(authenticator, ep, target, http))
        assert info.value.status == 401
        assert seen == [
            ("/v2/a/b/manifests/v1", "Bearer t1"),
            ("/token", None),
            ("/v2/a/b/manifests/v1", "Bearer t2"),
        ]
