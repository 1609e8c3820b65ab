"""Redirects followed by hand, and the URL each blob's download was last redirected to.

A registry may send a blob GET on to a storage host with a signed URL that works for a
while. Redirects are followed here rather than by httpx so that the caller decides what
each hop carries (another host gets neither the registry's credentials nor the hosts.toml
headers, but keeps ``Range``); the last such URL is reused for later reads of the blob
until it stops working.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urljoin

import httpx

from blockfs.registry._diagnosis import status_error
from blockfs.registry._errors import RegistryProtocolError
from blockfs.registry._hosts import Endpoint
from blockfs.registry._retry import Transient
from blockfs.registry._target import Kind, Target

log = logging.getLogger("blockfs.registry")

_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Statuses of a cached redirect URL that mean it expired: ask the registry again.
_REDIRECT_EXPIRED = frozenset({400, 401, 403, 404, 410})

Send = Callable[[str], httpx.Response]
_Key = tuple[str, str, str]


def follow_redirects(
    ep: Endpoint, target: Target, method: str, response: httpx.Response, send: Send
) -> tuple[httpx.Response, str | None]:
    """Follow the redirects of a GET or HEAD to ``ep``, sending each hop with ``send``.

    Returns the final answer and the last URL on another host than ``ep``, if any.
    """
    foreign: str | None = None
    hops = 0
    while response.status_code in _REDIRECT_STATUSES and method in ("GET", "HEAD"):
        location = response.headers.get("location")
        response.close()
        if not location:
            raise target.error(
                RegistryProtocolError,
                f"HTTP {response.status_code} without a Location",
                ep.host,
            )
        hops += 1
        if hops > _MAX_REDIRECTS:
            raise target.error(
                RegistryProtocolError, f"more than {_MAX_REDIRECTS} redirects", ep.host
            )
        next_url = urljoin(str(response.url), location)
        if not ep.same_origin(next_url):
            foreign = next_url
        response = send(next_url)
    return response, foreign


class RedirectCache:
    """The URL that each blob's GET was last redirected to, per endpoint and repository.

    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._urls: dict[_Key, str] = {}

    @staticmethod
    def _key(ep: Endpoint, target: Target, method: str) -> _Key | None:
        if method == "GET" and target.kind == "blob" and target.digest:
            return (ep.api_root, target.repository, target.digest)
        return None

    def remember(self, ep: Endpoint, target: Target, method: str, url: str) -> None:
        """Note that ``method`` for ``target`` on ``ep`` ended at ``url`` (kept for blob GETs)."""
        key = self._key(ep, target, method)
        if key is not None:
            with self._lock:
                self._urls[key] = url

    def replay(
        self, ep: Endpoint, target: Target, method: str, send: Send, kind: Kind | None
    ) -> httpx.Response | None:
        """The 2xx answer of the cached URL for this request, sent with ``send``; None when
        there is none or it expired (then ask the registry). A failure that may pass, or
        another status (an error as :func:`status_error` says, with ``kind``), forgets the
        URL and raises."""
        key = self._key(ep, target, method)
        if key is None:
            return None
        with self._lock:
            url = self._urls.get(key)
        if url is None:
            return None
        try:
            response = send(url)
        except Transient:
            self._forget(key)
            raise
        if response.is_success:
            return response
        self._forget(key)
        if response.status_code not in _REDIRECT_EXPIRED:
            raise status_error(response, ep, target, foreign=True, kind=kind)
        response.close()
        log.info(
            "the redirect URL for %s expired (HTTP %d); asking %s again",
            target.digest,
            response.status_code,
            ep.host,
        )
        return None

    def _forget(self, key: _Key) -> None:
        with self._lock:
            self._urls.pop(key, None)
