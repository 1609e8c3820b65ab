"""Registry hosts and mirrors from containerd's ``hosts.toml`` files.

``<hosts_dir>/<namespace>/hosts.toml`` (or ``_default/hosts.toml``) lists, for one
registry namespace such as ``docker.io`` or ``myregistry:5000``, the endpoints to try:
each ``[host."URL"]`` table in file order (mirrors), then ``server`` (the upstream).
The format is containerd's (docs/hosts.md): ``capabilities``, ``skip_verify``, ``ca``,
``client``, ``header``, ``override_path``, ``dial_timeout`` and ``proxy``, at the top
level for ``server`` and inside each host table.
"""

from __future__ import annotations

import os
import re
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from blockfs.oci import DOCKER_HUB, DOCKER_HUB_API
from blockfs.registry._errors import RegistryError

Capability = Literal["pull", "resolve", "push"]
ALL_CAPABILITIES: frozenset[str] = frozenset({"pull", "resolve", "push"})
DEFAULT_NAMESPACE = "_default"
HOSTS_FILE = "hosts.toml"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class HostsConfigError(RegistryError):
    """A hosts.toml file cannot be read or has an invalid field."""


@attrs.frozen(slots=True)
class Endpoint:
    """One place to send registry requests for a namespace: a mirror or the upstream server.

    ``api_root`` is the URL that ``/<repository>/blobs/...`` is appended to (it ends in
    ``/v2`` unless ``override_path`` was set). ``mirror`` is true when the endpoint is not
    the namespace's own registry; such requests carry ``?ns=<namespace>``. ``hosts_file``
    is the hosts.toml it comes from (None for the default server), for error messages.
    """

    api_root: str
    namespace: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    mirror: bool = False
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    # (certificate, key) pairs; key None when the certificate file holds the key too.
    client_certs: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None
    proxy: str | None = None
    hosts_file: str | None = attrs.field(default=None, eq=False)

    @property
    def scheme(self) -> str:
        """``http`` or ``https``."""
        return urlsplit(self.api_root).scheme

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint."""
        return urlsplit(self.api_root).netloc

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``."""
        return _origin(self.api_root)

    def same_origin(self, url: str) -> bool:
        """Whether ``url`` is on this endpoint's scheme, host and port (where the
        endpoint's credentials and headers may go)."""
        return _origin(url) == self.origin

    def can(self, capability: str) -> bool:
        """Whether this endpoint may be used for ``capability`` (pull, resolve or push)."""
        return capability in self.capabilities


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as ``"1s"``, ``"500ms"`` or ``"1m30s"``."""
    position, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


def _default_server(namespace: str, plain_http: bool) -> str:
    host = DOCKER_HUB_API if namespace == DOCKER_HUB else namespace
    return f"{'http' if plain_http else 'https'}://{host}"


def _namespace_dirs(namespace: str) -> list[str]:
    host, sep, port = namespace.rpartition(":")
    if sep and port.isdigit():
        return [f"{host}_{port}_", namespace, DEFAULT_NAMESPACE]
    return [namespace, DEFAULT_NAMESPACE]


class HostsConfig:
    """containerd-style registry host configuration, read from a hosts directory.

    Files are re-read when they change, like containerd does. Thread-safe.
    """

    def __init__(self, hosts_dir: str | os.PathLike[str] | None = None) -> None:
        self._dir = Path(hosts_dir) if hosts_dir is not None else None
        self._cache: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path | None:
        """The hosts directory, or None when there is none (every namespace is its server)."""
        return self._dir

    @classmethod
    def load(cls, hosts_dir: str | os.PathLike[str]) -> HostsConfig:
        """Configuration from ``hosts_dir`` (e.g. ``/etc/containerd/certs.d``)."""
        return cls(hosts_dir)

    def endpoints(self, namespace: str, *, plain_http: bool = False) -> tuple[Endpoint, ...]:
        """The endpoints to try for ``namespace``, in order: mirrors, then the server.

        ``plain_http`` makes the default server (the one used when no file names one)
        speak HTTP instead of HTTPS; URLs in hosts.toml always say their scheme.
        """
        found = self._find(namespace)
        if found is None:
            return (Endpoint(_default_server(namespace, plain_http) + "/v2", namespace),)
        path, config = found
        return _endpoints_from(config, path, namespace, plain_http)

    def _find(self, namespace: str) -> tuple[Path, dict[str, Any]] | None:
        if self._dir is None:
            return None
        for name in _namespace_dirs(namespace):
            path = self._dir / name / HOSTS_FILE
            config = self._read(path)
            if config is not None:
                return path, config
        return None

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            config = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise HostsConfigError(f"cannot read {path}: {e}") from None
        with self._lock:
            self._cache[path] = (stamp, config)
        return config


def _endpoints_from(
    config: Mapping[str, Any], path: Path, namespace: str, plain_http: bool
) -> tuple[Endpoint, ...]:
    endpoints = []
    hosts = config.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{path}: 'host' must be a table of [host.\"URL\"] tables")
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"{path}: [host.{url!r}] must be a table")
        endpoints.append(_endpoint(url, table, path, namespace, plain_http))
    server = config.get("server")
    if server is not None and not isinstance(server, str):
        raise HostsConfigError(f"{path}: 'server' must be a string")
    server_url = server or _default_server(namespace, plain_http)
    endpoints.append(_endpoint(server_url, config, path, namespace, plain_http))
    return tuple(endpoints)


def _endpoint(
    url: str, table: Mapping[str, Any], path: Path, namespace: str, plain_http: bool
) -> Endpoint:
    where = f"{path} [{url}]"
    if "://" not in url:
        url = f"{'http' if plain_http else 'https'}://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(f"{where}: host URL must be http:// or https:// with a host")
    netloc = parts.netloc
    if netloc == DOCKER_HUB:
        netloc = DOCKER_HUB_API
    base = parts.path.rstrip("/")
    if not _bool(table, "override_path", where):
        base += "/v2"
    capabilities = table.get("capabilities")
    if capabilities is None:
        caps = ALL_CAPABILITIES
    elif isinstance(capabilities, list) and set(capabilities) <= ALL_CAPABILITIES:
        caps = frozenset(capabilities)
    else:
        raise HostsConfigError(f"{where}: capabilities must be a list of pull, resolve, push")
    dial_timeout = table.get("dial_timeout")
    if dial_timeout is not None:
        try:
            dial_timeout = parse_duration(str(dial_timeout))
        except ValueError as e:
            raise HostsConfigError(f"{where}: {e}") from None
    proxy = table.get("proxy")
    if proxy is not None and not isinstance(proxy, str):
        raise HostsConfigError(f"{where}: proxy must be a URL string")
    return Endpoint(
        api_root=f"{parts.scheme}://{netloc}{base}",
        namespace=namespace,
        capabilities=caps,
        mirror=netloc not in (namespace, _default_server(namespace, False).split("://")[1]),
        skip_verify=_bool(table, "skip_verify", where),
        ca=tuple(_resolve(path, p) for p in _paths(table.get("ca"), where, "ca")),
        client_certs=_client_certs(table.get("client"), path, where),
        headers=_headers(table.get("header"), where),
        dial_timeout=dial_timeout,
        proxy=proxy,
        hosts_file=str(path),
    )


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise HostsConfigError(f"{where}: {key} must be true or false")
    return value


def _resolve(hosts_file: Path, name: str) -> str:
    """Paths in hosts.toml are absolute or relative to the file's directory."""
    return str(hosts_file.parent / name) if not os.path.isabs(name) else name


def _paths(value: object, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: {key} must be a path or a list of paths")


def _client_certs(value: object, path: Path, where: str) -> tuple[tuple[str, str | None], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: client must be a path, paths, or [cert, key] pairs")
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_resolve(path, item), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            cert, key = item
            pairs.append((_resolve(path, cert), _resolve(path, key) if key else None))
        else:
            raise HostsConfigError(f"{where}: client must be a path, paths, or [cert, key] pairs")
    return tuple(pairs)


def _headers(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: header must be a table")
    headers: list[tuple[str, str]] = []
    for name, values in value.items():
        if isinstance(values, str):
            headers.append((name, values))
        elif isinstance(values, list) and all(isinstance(v, str) for v in values):
            headers.extend((name, v) for v in values)
        else:
            raise HostsConfigError(f"{where}: header {name!r} must be a string or strings")
    return tuple(headers)
