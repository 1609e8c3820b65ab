"""Image references: ``[host[:port]/]path[:tag][@digest]``, normalised like docker does."""

from __future__ import annotations

import re

import attrs

from blockfs.oci._digest import validate_digest
from blockfs.oci._errors import InvalidDigest, InvalidReference

DOCKER_HUB = "docker.io"
# The host that serves the registry API for docker.io references.
DOCKER_HUB_API = "registry-1.docker.io"
# Other names docker accepts for Docker Hub; they normalise to DOCKER_HUB.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"

# Grammar of github.com/distribution/reference, restricted to what we accept.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_MAX_NAME = 255


def _check_registry(_: object, __: object, value: str) -> None:
    if not _DOMAIN.fullmatch(value):
        raise InvalidReference(f"invalid registry host {value!r}")


def _check_repository(_: object, __: object, value: str) -> None:
    if not value or not all(_PATH_COMPONENT.fullmatch(c) for c in value.split("/")):
        raise InvalidReference(
            f"invalid repository {value!r}: path components are lowercase letters and digits "
            "separated by '.', '_', '__' or '-'"
        )


def _check_tag(_: object, __: object, value: str | None) -> None:
    if value is not None and not _TAG.fullmatch(value):
        raise InvalidReference(f"invalid tag {value!r}")


def _check_digest(_: object, __: object, value: str | None) -> None:
    if value is not None:
        try:
            validate_digest(value)
        except InvalidDigest as e:
            raise InvalidReference(str(e)) from None


def _normalise_registry(value: str) -> str:
    return DOCKER_HUB if value.lower() in _DOCKER_HUB_ALIASES else value


@attrs.frozen(slots=True)
class Reference:
    """A parsed image reference.

    ``registry`` is the registry namespace as written (``docker.io`` for Docker Hub, which
    is also the default); ``repository`` the path inside it (``library/`` is added to
    single-component Docker Hub names). A reference has a tag, a digest, or both.
    """

    registry: str = attrs.field(converter=_normalise_registry, validator=_check_registry)
    repository: str = attrs.field(validator=_check_repository)
    tag: str | None = attrs.field(default=None, validator=_check_tag)
    digest: str | None = attrs.field(default=None, validator=_check_digest)

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text`` (``busybox``, ``host:5000/a/b:tag``, ``repo@sha256:…``, …).

        A reference with neither tag nor digest gets the tag ``latest``.
        """
        if not text or text != text.strip():
            raise InvalidReference(f"invalid image reference {text!r}: empty or padded")
        name, at, digest = text.partition("@")
        if at and not digest:
            raise InvalidReference(f"invalid image reference {text!r}: empty digest")
        tag: str | None = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not tag:
                raise InvalidReference(f"invalid image reference {text!r}: empty tag")
        first, sep, rest = name.partition("/")
        # Like docker: the first component is a host only if it looks like one.
        if sep and (
            any(c in first for c in ".:") or first == "localhost" or first != first.lower()
        ):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, name
        registry = _normalise_registry(registry)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if len(repository) > _MAX_NAME:
            raise InvalidReference(f"invalid image reference {text!r}: name longer than 255")
        if tag is None and not at:
            tag = DEFAULT_TAG
        try:
            return cls(registry, repository, tag, digest or None)
        except InvalidReference as e:
            raise InvalidReference(f"invalid image reference {text!r}: {e}") from None

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def tag_or_digest(self) -> str:
        """What to put after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is None:
            raise InvalidReference(
                f"{self.name} names a repository, not an image: no tag or digest"
            )
        return self.tag

    def with_digest(self, digest: str) -> Reference:
        """This reference pinned to ``digest`` (the tag is kept for display)."""
        return attrs.evolve(self, digest=digest)

    def with_tag(self, tag: str) -> Reference:
        """This repository at ``tag``, without a digest."""
        return attrs.evolve(self, tag=tag, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
