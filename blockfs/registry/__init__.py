"""OCI distribution client on httpx: resolve manifests, read and push blobs, read byte
ranges; docker credentials, containerd hosts.toml mirrors, bounded retries.

Nothing here knows about eStargz or EROFS; :class:`RegistryBlobSource` merely has the
shape of ``blockfs.estargz.BlobSource``.
"""

from blockfs.registry._auth import Challenge, parse_www_authenticate
from blockfs.registry._client import PushResult, RegistryClient, RepositoryLike
from blockfs.registry._credentials import Credential, CredentialStore
from blockfs.registry._errors import (
    BlobNotFound,
    CredentialHelperError,
    DigestMismatch,
    ManifestNotFound,
    NotFound,
    RangeNotSatisfiable,
    RegistryAuthError,
    RegistryError,
    RegistryProtocolError,
    RegistryTLSError,
    RegistryUnavailable,
)
from blockfs.registry._hosts import Endpoint, HostsConfig, HostsConfigError
from blockfs.registry._pool import warm_up
from blockfs.registry._retry import RetryPolicy
from blockfs.registry._source import RegistryBlobSource

__all__ = [
    "BlobNotFound",
    "Challenge",
    "Credential",
    "CredentialHelperError",
    "CredentialStore",
    "DigestMismatch",
    "Endpoint",
    "HostsConfig",
    "HostsConfigError",
    "ManifestNotFound",
    "NotFound",
    "PushResult",
    "RangeNotSatisfiable",
    "RegistryAuthError",
    "RegistryBlobSource",
    "RegistryClient",
    "RegistryError",
    "RegistryProtocolError",
    "RegistryTLSError",
    "RegistryUnavailable",
    "RepositoryLike",
    "RetryPolicy",
    "parse_www_authenticate",
    "warm_up",
]
