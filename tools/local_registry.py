"""A throwaway ``docker-registry`` process on loopback, for the demo, benchmarks and tests.

:func:`start_registry` runs Debian's ``docker-registry`` (distribution 2.8) on a free port
of 127.0.0.1 with its storage in a given directory, optionally behind htpasswd (Basic)
or token (Bearer) auth, and optionally over HTTPS (:class:`RegistryTLS`, with client
certificates required when it names client CAs). With ``access_log`` it logs every
request with its status and the number of body bytes it sent, which
:meth:`LocalRegistry.access_log` parses: that is how much crossed the wire, counted by
the registry itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx

from blockfs.errors import BlockfsError

REGISTRY_BINARY = "/usr/bin/docker-registry"
_START_TIMEOUT = 20.0
# Apache combined log format, as distribution's access log writes it.
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-) "
)


class RegistryProcessError(BlockfsError):
    """The local registry could not be started."""


def registry_available() -> bool:
    """Whether ``docker-registry`` is installed."""
    return os.access(REGISTRY_BINARY, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class TokenAuth:
    """``auth.token`` settings of a registry that trusts a token server."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@attrs.frozen
class RegistryTLS:
    """``http.tls`` settings: serve HTTPS with ``certificate`` (PEM, the chain) and ``key``.

    With ``client_cas`` (PEM files) the registry demands a client certificate signed by
    one of them (mutual TLS) and refuses connections without one.
    """

    certificate: Path
    key: Path
    client_cas: tuple[Path, ...] = ()


@attrs.frozen
class AccessLogEntry:
    """One request as the registry logged it: ``size`` is the body bytes it sent."""

    method: str
    path: str
    status: int
    size: int


@attrs.define
class LocalRegistry:
    """A running docker-registry process."""

    host: str  # 127.0.0.1:PORT
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    tls: RegistryTLS | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, or ``https://`` when it serves TLS."""
        return f"{'https' if self.tls is not None else 'http'}://{self.host}"

    def stop(self) -> None:
        """Stop the registry and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        """What the registry logged so far."""
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[AccessLogEntry]:
        """Every request logged so far (needs ``access_log=True`` at start)."""
        entries = []
        for line in self.log().splitlines():
            match = _ACCESS_LINE.match(line)
            if match is not None:
                size = match["size"]
                entries.append(
                    AccessLogEntry(
                        match["method"],
                        match["path"],
                        int(match["status"]),
                        0 if size == "-" else int(size),
                    )
                )
        return entries

    def bytes_sent(self, *, blobs_only: bool = False) -> int:
        """Body bytes the registry has sent so far (all requests, or blob requests only)."""
        return sum(
            e.size for e in self.access_log() if not blobs_only or "/blobs/sha256:" in e.path
        )


def _registry_config(
    root: Path,
    port: int,
    auth: Mapping[str, Mapping[str, Any]],
    access_log: bool,
    tls: RegistryTLS | None = None,
) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        f"    disabled: {'false' if access_log else 'true'}",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'data'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        # Uploads are signed with this; a random one per process is fine on loopback.
        f"  secret: {os.urandom(16).hex()}",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls.certificate}", f"    key: {tls.key}"]
        if tls.client_cas:
            lines.append("    clientcas:")
            lines.extend(f"      - {ca}" for ca in tls.client_cas)
    if auth:
        lines.append("auth:")
        for kind, settings in auth.items():
            lines.append(f"  {kind}:")
            lines.extend(f"    {key}: {value}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def start_registry(
    workdir: Path,
    *,
    htpasswd: Path | None = None,
    token: TokenAuth | None = None,
    access_log: bool = False,
    tls: RegistryTLS | None = None,
) -> Iterator[LocalRegistry]:
    """Run docker-registry on a free loopback port, storing into ``workdir``, until the
    block exits; over HTTPS with ``tls``."""
    if not registry_available():
        raise RegistryProcessError(
            f"{REGISTRY_BINARY} is not installed (Debian package docker-registry; tools/setup)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    auth: dict[str, dict[str, str]] = {}
    if htpasswd is not None:
        auth["htpasswd"] = {"realm": "blockfs-local", "path": str(htpasswd)}
    if token is not None:
        auth["token"] = {
            "realm": token.realm,
            "service": token.service,
            "issuer": token.issuer,
            "rootcertbundle": str(token.rootcertbundle),
        }
    registry: LocalRegistry | None = None
    for _ in range(3):  # the port may be taken between choosing and binding it
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(_registry_config(workdir, port, auth, access_log, tls))
        log_path = workdir / "registry.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        registry = LocalRegistry(f"127.0.0.1:{port}", workdir, process, log_path, tls)
        try:
            if _wait_until_serving(registry):
                break
        except BaseException:
            registry.stop()
            raise
        registry.stop()
    else:
        log_text = registry.log() if registry is not None else ""
        raise RegistryProcessError(f"docker-registry did not start:\n{log_text}")
    try:
        yield registry
    finally:
        registry.stop()


def _probe_context() -> ssl.SSLContext:
    # The probe only asks whether the registry serves, not whom to trust: no verification.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _speaks_tls(error: BaseException) -> bool:
    """Whether ``error`` came from a TLS exchange (an alert, a handshake failure) rather
    than from a connection that nobody accepted."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _wait_until_serving(registry: LocalRegistry) -> bool:
    verify: ssl.SSLContext | bool = _probe_context() if registry.tls is not None else True
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        try:
            httpx.get(f"{registry.url}/v2/", timeout=1.0, verify=verify)
            return True
        except httpx.TransportError as e:
            # A registry that demands client certificates refuses the probe with a TLS
            # alert, after it loaded its own certificate and spoke TLS: it is serving.
            if registry.tls is not None and registry.tls.client_cas and _speaks_tls(e):
                return True
            time.sleep(0.05)
    return False
