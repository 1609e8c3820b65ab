"""Registry errors: each says which host, repository and digest, what went wrong and what to do."""

from __future__ import annotations

from blockfs.errors import BlockfsError


class RegistryError(BlockfsError):
    """A registry request failed.

    ``host`` is the registry (or mirror) host, ``repository`` and ``digest`` what was asked
    for, ``status`` the HTTP status when there was one; ``hint`` says what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        repository: str | None = None,
        digest: str | None = None,
        status: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.repository = repository
        self.digest = digest
        self.status = status
        self.hint = hint

    def context(self) -> list[str]:
        where = []
        if self.host is not None:
            where.append(f"host {self.host}")
        if self.repository is not None:
            where.append(f"repository {self.repository}")
        if self.digest is not None:
            where.append(f"digest {self.digest}")
        if self.status is not None:
            where.append(f"HTTP {self.status}")
        return where

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}. {self.hint}" if self.hint else text


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or kept failing (connection errors, 5xx, 429)
    after the retries the policy allows."""


class RegistryTLSError(RegistryError):
    """TLS with the registry failed in a way retrying cannot fix: its certificate is not
    trusted or not for the name dialled, it does not speak TLS (or only TLS), it refused
    our client certificate, or the hosts.toml TLS files cannot be loaded."""


class RegistryAuthError(RegistryError):
    """The registry refused us: no credentials, wrong credentials, or no access to the repository."""


class CredentialHelperError(RegistryAuthError):
    """A docker credential helper is missing or failed."""


class NotFound(RegistryError):
    """The registry has no such manifest or blob."""


class ManifestNotFound(NotFound):
    """The registry has no manifest for this tag or digest."""


class BlobNotFound(NotFound):
    """The registry has no blob with this digest in this repository."""


class RangeNotSatisfiable(RegistryError):
    """A byte range lies outside the blob."""


class DigestMismatch(RegistryError):
    """Content from the registry does not hash to the digest it was asked for."""


class RegistryProtocolError(RegistryError):
    """The registry answered something the distribution spec does not allow
    (a bad Content-Range, an upload without Location, an unparsable challenge)."""
