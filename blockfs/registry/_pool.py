"""Pooled HTTP connections: one ``httpx.Client`` per endpoint connection setup (TLS
settings, proxy, dial timeout), shared by every request that needs it."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from blockfs.registry._errors import RegistryError
from blockfs.registry._hosts import Endpoint
from blockfs.registry._tls import default_ssl_context, ssl_context


def warm_up() -> None:
    """Do now what the first request of a process would: load the system's CA
    certificates and the HTTP client's code. A long-running process (the snapshotter's
    daemon, the NBD server) calls it at start, in a thread, so that its first pull does
    not read them from a cold page cache."""
    default_ssl_context()
    httpx.Client(verify=default_ssl_context()).close()


class ClientPool:
    """The ``httpx.Client`` for each endpoint connection setup, made when first needed.

    Clients neither follow redirects nor ask for transfer compression. Thread-safe.
    """

    def __init__(
        self, *, timeout: float, trust_env: bool, user_agent: str, hosts_dir: Path | None
    ) -> None:
        self._timeout = timeout
        self._trust_env = trust_env
        self._user_agent = user_agent
        self._hosts_dir = hosts_dir
        self._lock = threading.Lock()
        self._clients: dict[tuple[object, ...], httpx.Client] = {}
        self._closed = False

    def client(self, ep: Endpoint) -> httpx.Client:
        """The client for ``ep``; raises :class:`RegistryError` once the pool is closed."""
        key = (ep.skip_verify, ep.ca, ep.client_certs, ep.proxy, ep.dial_timeout)
        with self._lock:
            if self._closed:
                raise RegistryError("the registry client is closed")
            client = self._clients.get(key)
            if client is None:
                client = httpx.Client(
                    verify=ssl_context(ep, self._hosts_dir),
                    proxy=ep.proxy,
                    timeout=httpx.Timeout(self._timeout, connect=ep.dial_timeout or self._timeout),
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                    # Byte ranges are of the stored blob: no transfer compression.
                    headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
                    follow_redirects=False,
                    trust_env=self._trust_env,
                )
                self._clients[key] = client
            return client

    def close(self) -> None:
        """Close every pooled connection; later requests fail."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
            self._closed = True
        for client in clients:
            client.close()
