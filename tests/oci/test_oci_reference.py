import pytest

from blockfs.oci import InvalidReference, Reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("index.docker.io/library/alpine:3", "docker.io", "library/alpine", "3", None),
        ("ghcr.io/org/team/app:v1.2", "ghcr.io", "org/team/app", "v1.2", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
        (f"repo@{DIGEST}", "docker.io", "library/repo", None, DIGEST),
        (f"host:443/repo:tag@{DIGEST}", "host:443", "repo", "tag", DIGEST),
        (
            "my-registry.example.com/a__b/c-d.e_f:T_1.x-y",
            "my-registry.example.com",
            "a__b/c-d.e_f",
            "T_1.x-y",
            None,
        ),
    ],
)
def test_parse_normalizes_like_docker(text, registry, repository, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


def test_docker_hub_api_host_is_registry_1():
    assert Reference.parse("busybox").api_host == "registry-1.docker.io"
    assert Reference.parse("quay.io/a/b").api_host == "quay.io"


def test_str_round_trips_the_fully_qualified_form():
    for text in [
        "docker.io/library/busybox:latest",
        f"host:5000/a/b:t@{DIGEST}",
        f"q.io/x@{DIGEST}",
    ]:
        assert str(Reference.parse(text)) == text
    assert str(Reference.parse("busybox")) == "docker.io/library/busybox:latest"


def test_tag_or_digest_prefers_the_digest():
    assert Reference.parse(f"a/b:t@{DIGEST}").tag_or_digest == DIGEST
    assert Reference.parse("a/b:t").tag_or_digest == "t"
    with pytest.raises(InvalidReference, match="no tag or digest"):
        _ = Reference("docker.io", "a/b").tag_or_digest


def test_with_digest_and_with_tag():
    ref = Reference.parse("host:1/a:t")
    assert ref.with_digest(DIGEST).digest == DIGEST
    assert ref.with_digest(DIGEST).with_tag("u") == Reference("host:1", "a", "u")


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "host/Repo",
        "repo:",
        "repo@",
        "repo@sha256:abc",
        "repo@md5:" + "a" * 32,
        "repo:bad/tag",
        "a//b",
        "-leading/dash",
        "repo:" + "t" * 129,
        "host:port:5000/x",
    ],
)
def test_invalid_references_are_refused_with_the_text(text):
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert repr(text) in str(info.value) or "invalid" in str(info.value)


def test_invalid_reference_is_a_value_error():
    with pytest.raises(ValueError):
        Reference.parse("UPPER")
