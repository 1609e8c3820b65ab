"""Where a layer's blob is read from: source specs, and opening them as BlobSources.

A source spec is the JSON-ready dict a layer record keeps so that the NBD server can find
the blob again:

- ``{"type": "file", "path": ABSPATH}``: a local file;
- ``{"type": "registry", "ref": "HOST/REPO@sha256:…", "plain_http": bool,
  "hosts_dir": DIR | None, "docker_config": CONFIG_JSON | None, "size": N | None}``: a
  registry blob, read with HTTP range requests.

The same specs come from command-line arguments (:func:`blob_source_spec`), so the CLI,
standalone mounts and the server open blobs one way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blockfs.estargz import BlobSource, FileBlobSource
from blockfs.image._record import LayerStateError
from blockfs.oci import InvalidReference, Reference
from blockfs.registry import (
    CredentialStore,
    HostsConfig,
    RegistryBlobSource,
    RegistryClient,
    RetryPolicy,
)
from blockfs.registry._credentials import warn_if_unreadable

SourceSpec = dict[str, Any]


class BlobSourceError(LayerStateError):
    """A BLOB argument or a source spec names no blob that can be opened."""


# (plain_http, hosts_dir, docker_config): what makes two registry clients differ.
_ClientKey = tuple[bool, str | None, str | None]


def docker_config_path(env: Mapping[str, str] | None = None) -> str | None:
    """docker's config.json as docker finds it (``$DOCKER_CONFIG`` or ``~/.docker``), if it
    exists, or if this user cannot even look (reading it will then say why)."""
    environ = os.environ if env is None else env
    directory = environ.get("DOCKER_CONFIG")
    path = (Path(directory) if directory else Path.home() / ".docker") / "config.json"
    try:
        exists = path.is_file()
    except PermissionError:  # a directory on the way is not searchable
        exists = True
    return str(path.absolute()) if exists else None


def file_source_spec(path: str | os.PathLike[str]) -> SourceSpec:
    """The spec of a blob in the local file ``path``."""
    return {"type": "file", "path": os.path.abspath(path)}


def registry_source_spec(
    ref: Reference,
    *,
    plain_http: bool = False,
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | None = None,
    size: int | None = None,
) -> SourceSpec:
    """The spec of the registry blob ``ref`` (which must name a digest)."""
    if ref.digest is None:
        raise InvalidReference(f"{ref} names no blob: expected REPOSITORY@sha256:…")
    return {
        "type": "registry",
        "ref": f"{ref.name}@{ref.digest}",
        "plain_http": plain_http,
        "hosts_dir": os.path.abspath(hosts_dir) if hosts_dir is not None else None,
        "docker_config": docker_config,
        "size": size,
    }


def blob_source_spec(
    text: str,
    *,
    plain_http: bool = False,
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | None = None,
) -> SourceSpec:
    """The spec of a BLOB argument: an existing file, else a registry blob ``REF@sha256:…``."""
    if os.path.exists(text):
        if os.path.isdir(text):
            raise BlobSourceError(
                f"{text} is a directory; BLOB is an eStargz file or a registry blob "
                "HOST/REPO@sha256:…"
            )
        return file_source_spec(text)
    if "@" not in text:
        raise BlobSourceError(
            f"{text}: no such file, and not a registry blob (expected HOST/REPO@sha256:…)"
        )
    try:
        ref = Reference.parse(text)
    except InvalidReference as e:
        raise BlobSourceError(f"{text}: no such file, and not a registry blob: {e}") from None
    return registry_source_spec(
        ref, plain_http=plain_http, hosts_dir=hosts_dir, docker_config=docker_config
    )


class BlobSources:
    """Opens source specs as BlobSources; a callable fit for ``ExportTable(open_source=…)``.

    Registry blobs of the same configuration share one :class:`RegistryClient`, hence
    its pooled connections and tokens. Thread-safe; close it to close the clients.
    """

    def __init__(self, *, retry: RetryPolicy | None = None, trust_env: bool = True) -> None:
        self._retry = retry
        self._trust_env = trust_env
        self._clients: dict[_ClientKey, RegistryClient] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: SourceSpec) -> BlobSource:
        return self.open(spec)

    def open(self, spec: SourceSpec) -> BlobSource:
        """The blob that ``spec`` describes, ready for ranged reads."""
        kind = spec.get("type")
        try:
            if kind == "file":
                try:
                    return FileBlobSource(spec["path"])
                except PermissionError:
                    raise BlobSourceError(
                        f"cannot read the blob file {spec['path']}: permission denied; "
                        "run blockfs as a user who can read it"
                    ) from None
            if kind == "registry":
                ref = Reference.parse(spec["ref"])
                client = self.client(
                    plain_http=bool(spec.get("plain_http")),
                    hosts_dir=spec.get("hosts_dir"),
                    docker_config=spec.get("docker_config"),
                )
                if ref.digest is None:
                    raise BlobSourceError(f"registry blob source {spec!r} names no digest")
                return RegistryBlobSource(client, ref, ref.digest, spec.get("size"))
        except (KeyError, TypeError, InvalidReference) as e:
            raise BlobSourceError(f"invalid blob source {spec!r}: {e}") from None
        except FileNotFoundError as e:
            raise BlobSourceError(f"the blob file is gone: {e}") from None
        raise BlobSourceError(f"unknown blob source type {kind!r} in {spec!r}")

    def client(
        self,
        *,
        plain_http: bool = False,
        hosts_dir: str | os.PathLike[str] | None = None,
        docker_config: str | None = None,
    ) -> RegistryClient:
        """The shared client for this registry configuration (made on first use)."""
        key = (plain_http, os.fspath(hosts_dir) if hosts_dir is not None else None, docker_config)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                credentials = (
                    CredentialStore.from_docker_config(docker_config)
                    if docker_config is not None
                    else CredentialStore()
                )
                client = RegistryClient(
                    HostsConfig(key[1]) if key[1] is not None else None,
                    credentials,
                    plain_http=plain_http,
                    retry=self._retry,
                    trust_env=self._trust_env,
                )
                self._clients[key] = client
            return client

    def close(self) -> None:
        """Close every registry client."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    def __enter__(self) -> BlobSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob(
    text: str,
    sources: BlobSources,
    *,
    plain_http: bool = False,
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | None = None,
) -> tuple[BlobSource, SourceSpec]:
    """Open a BLOB argument (a file or ``REF@sha256:…``): its source and its spec.

    The spec records the blob's size, so that whoever opens it again need not ask.
    ``docker_config`` defaults to docker's own config.json, if there is one. A local blob
    needs no credentials: a config.json that cannot be read only earns a warning then
    (a registry blob's client refuses it, naming the file).
    """
    if docker_config is None:
        docker_config = docker_config_path()
    spec = blob_source_spec(
        text, plain_http=plain_http, hosts_dir=hosts_dir, docker_config=docker_config
    )
    if spec["type"] == "file" and docker_config is not None:
        warn_if_unreadable(docker_config)
    source = sources.open(spec)
    if spec["type"] == "registry":
        spec["size"] = source.size
    return source, spec
