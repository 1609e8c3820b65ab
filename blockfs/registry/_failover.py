"""Endpoint failover: a namespace's mirrors, then its server, as hosts.toml lists them,
each tried in turn (with retries) until one answers; one that failed lately goes last."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from blockfs.registry._errors import RegistryError, RegistryUnavailable
from blockfs.registry._hosts import Endpoint, HostsConfig
from blockfs.registry._retry import Retrier
from blockfs.registry._target import Target

log = logging.getLogger("blockfs.registry")

T = TypeVar("T")

# How long an endpoint that failed is tried after the others.
ENDPOINT_COOLDOWN = 30.0


class Failover:
    """Runs requests on the endpoints of a namespace, filtered by the capability needed.

    An endpoint that fails (down, 5xx after retries, 404 on a mirror) hands over to the
    next one; one that could not be reached or kept failing is tried last for
    :data:`ENDPOINT_COOLDOWN` seconds. Thread-safe.
    """

    def __init__(self, hosts: HostsConfig, retrier: Retrier, *, plain_http: bool) -> None:
        self._hosts = hosts
        self._retrier = retrier
        self._plain_http = plain_http
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}

    def endpoints(self, target: Target) -> list[Endpoint]:
        """The endpoints that may serve ``target``, recently failed ones last."""
        endpoints = [
            e
            for e in self._hosts.endpoints(target.registry, plain_http=self._plain_http)
            if e.can(target.capability)
        ]
        if not endpoints:
            raise target.error(
                RegistryError,
                f"no endpoint of {target.registry} may {target.capability}",
                target.registry,
                hint="check the capabilities in its hosts.toml",
            )
        now = time.monotonic()
        with self._lock:
            down = {e.api_root for e in endpoints if self._down_until.get(e.api_root, 0) > now}
        return sorted(endpoints, key=lambda e: e.api_root in down)  # stable: file order kept

    def call(self, target: Target, run: Callable[[Endpoint], T]) -> T:
        """``run`` on each endpoint in turn (with retries) until one succeeds."""
        endpoints = self.endpoints(target)
        failures: list[str] = []
        for position, endpoint in enumerate(endpoints):
            last = position == len(endpoints) - 1
            try:
                return self._on(endpoint, run, fast_fail=not last)
            except RegistryError as e:
                if last:
                    if failures:
                        e.message += f"; tried before: {'; '.join(failures)}"
                    raise
                failures.append(f"{endpoint.host}: {e.message}")
                log.warning(
                    "%s failed (%s); trying %s", endpoint.host, e, endpoints[position + 1].host
                )
        raise AssertionError("unreachable: the last endpoint returns or raises")

    def _on(self, endpoint: Endpoint, run: Callable[[Endpoint], T], *, fast_fail: bool) -> T:
        """``run`` on ``endpoint`` with retries, noting whether the endpoint is down."""
        try:
            result = self._retrier.run(lambda: run(endpoint), fast_fail=fast_fail)
        except RegistryUnavailable:
            # Unreachable, or still failing when the retries ran out.
            with self._lock:
                self._down_until[endpoint.api_root] = time.monotonic() + ENDPOINT_COOLDOWN
            raise
        with self._lock:
            self._down_until.pop(endpoint.api_root, None)
        return result
