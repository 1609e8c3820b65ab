"""How one registry request is carried out, by parts that each have a module of their own.

Every request goes through three layers, from the outside in:

1. endpoints (:class:`~._failover.Failover`): the namespace's mirrors, then its server,
   as hosts.toml lists them and filtered by the capability needed; one that fails hands
   over to the next, one that was down recently is tried last.
2. retries (:class:`~._retry.Retrier`): connection errors, resets, truncated bodies,
   429 and 5xx are retried with backoff, bounded by the :class:`RetryPolicy`.
3. one exchange (:meth:`Transport.exchange`): the request with its credentials
   (:class:`~._auth.RegistryAuth`: a 401 fetches a fresh token and retries once),
   redirects followed by hand (:mod:`._redirects`: another host gets neither the
   registry's credentials nor the hosts.toml headers, but keeps ``Range``), the redirect
   URL cached per blob and dropped when it expires, and the answer handed to a checker
   that may refuse it. What a failure means is :mod:`._diagnosis`'s to say.

TLS failures that retrying cannot fix (an untrusted certificate, a certificate for
another name, a server that does not speak TLS or speaks only TLS, a refused client
certificate) raise :class:`RegistryTLSError` at once, saying what to set in hosts.toml
(:mod:`._tls`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from blockfs.registry._auth import Authenticator, RegistryAuth
from blockfs.registry._credentials import CredentialStore
from blockfs.registry._diagnosis import status_error, transport_error
from blockfs.registry._errors import RegistryUnavailable
from blockfs.registry._failover import Failover
from blockfs.registry._hosts import Endpoint, HostsConfig
from blockfs.registry._pool import ClientPool
from blockfs.registry._redirects import RedirectCache, follow_redirects
from blockfs.registry._retry import Retrier, RetryPolicy, Transient
from blockfs.registry._target import Kind, Target

T = TypeVar("T")
Handler = Callable[[httpx.Response, Endpoint], T]

# Statuses that mean "this server does not do HEAD here" rather than "no such blob".
HEAD_REJECTED = frozenset({400, 403, 405, 501})


class HeadRejected(Exception):
    """The server will not answer HEAD for this blob; ask with a one-byte GET instead."""


class Transport:
    """Sends registry requests for :class:`RegistryClient`; see the module docstring.

    Thread-safe: each part guards its own state; each endpoint configuration has one
    pooled ``httpx.Client``.
    """

    def __init__(
        self,
        hosts: HostsConfig,
        credentials: CredentialStore,
        *,
        plain_http: bool,
        timeout: float,
        retry: RetryPolicy,
        trust_env: bool,
        user_agent: str,
    ) -> None:
        self._hosts_dir = hosts.directory
        self._pool = ClientPool(
            timeout=timeout, trust_env=trust_env, user_agent=user_agent, hosts_dir=hosts.directory
        )
        self._failover = Failover(hosts, Retrier(retry), plain_http=plain_http)
        self._auth = Authenticator(credentials, hosts.directory)
        self._redirects = RedirectCache()

    def close(self) -> None:
        """Close every pooled connection; later requests fail."""
        self._pool.close()

    def call(self, target: Target, run: Callable[[Endpoint], T]) -> T:
        """``run`` on each endpoint of ``target`` in turn (with retries) until one succeeds."""
        return self._failover.call(target, run)

    def exchange(
        self,
        ep: Endpoint,
        target: Target,
        method: str,
        handle: Handler[T],
        *,
        path: str | None = None,
        url: str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        kind: Kind | None = None,
    ) -> T:
        """One request to ``ep`` (``path`` under its API root, or an absolute ``url``),
        with its auth round and redirects; ``handle`` reads a 2xx answer.

        ``kind`` overrides ``target.kind`` for what a 404 means.
        """
        http = self._pool.client(ep)
        if url is None:
            if path is None:
                raise ValueError("exchange needs a path or a url")
            query = dict(params or {})
            if ep.mirror:
                query["ns"] = ep.namespace
            url = str(httpx.URL(ep.api_root + path, params=query))
        base_headers = dict(headers or {})

        def send(to: str, body: bytes | None = None) -> httpx.Response:
            return self._send(ep, target, http, method, to, base_headers, body)

        cached = self._redirects.replay(ep, target, method, send, kind)
        if cached is not None:
            return self._finish(cached, ep, handle)
        response, foreign_url = follow_redirects(ep, target, method, send(url, content), send)
        if method == "HEAD" and response.status_code in HEAD_REJECTED:
            response.close()
            raise HeadRejected()
        if not response.is_success:
            raise status_error(response, ep, target, foreign=foreign_url is not None, kind=kind)
        if foreign_url is not None:
            self._redirects.remember(ep, target, method, foreign_url)
        return self._finish(response, ep, handle)

    def _send(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
    ) -> httpx.Response:
        """Send one request; to ``ep`` itself with its hosts.toml headers and credentials."""
        auth: RegistryAuth | None = None
        if ep.same_origin(url):
            headers = {**dict(ep.headers), **headers}
            auth = RegistryAuth(self._auth, ep, target, http)
        request = http.build_request(method, url, headers=headers, content=content)
        try:
            return http.send(request, auth=auth, stream=True)
        except httpx.TransportError as e:
            host = urlsplit(url).netloc
            raise transport_error(e, ep, target, host, self._hosts_dir) from e

    @staticmethod
    def _finish(response: httpx.Response, ep: Endpoint, handle: Handler[T]) -> T:
        try:
            return handle(response, ep)
        except httpx.TransportError as e:
            host = urlsplit(str(response.url)).netloc
            raise Transient(
                RegistryUnavailable(
                    f"the connection broke while reading the answer: {e!r}", host=host
                )
            ) from e
        finally:
            response.close()
