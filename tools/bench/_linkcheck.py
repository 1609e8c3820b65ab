"""The WAN benchmark's self-check: does the shaped link deliver what it is set to?

:func:`check_link` pushes a blob of random bytes to the registry (through an unshaped
route), then fetches it whole through the shaping proxy and times the fetch, from the
request to its last byte. On a link of ``rate_bps`` bits per second that holds each
request ``delay`` seconds, that should take ``size * 8 / rate_bps + delay``: 4.02 s for
50 MB at 100 Mbit/s and 20 ms. The benchmark refuses to go on when the measured time is
more than :data:`TOLERANCE` away from it, since every figure it then reports would
describe another link (a busy machine can slow the proxy below its rate).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time

import attrs

from blockfs.oci import Reference
from blockfs.registry import RegistryClient
from tools.shaping_proxy import ShapingProxy

TOLERANCE = 0.05
REPOSITORY = "wan/link-check"


@attrs.frozen
class LinkCheck:
    """One timed fetch of a blob through the shaped link."""

    size: int
    seconds: float
    expected: float

    @property
    def error(self) -> float:
        """How far the fetch was from the expected time, as a fraction of it."""
        return self.seconds / self.expected - 1

    @property
    def ok(self) -> bool:
        return abs(self.error) <= TOLERANCE

    def describe(self) -> str:
        return (
            f"a {self.size / 1e6:g} MB blob through the shaped link took {self.seconds:.2f} s "
            f"(expected {self.expected:.2f} s ± {TOLERANCE:.0%}: {self.error:+.1%})"
        )


def check_link(shaped: ShapingProxy, push_host: str, size: int) -> LinkCheck:
    """Push ``size`` random bytes through ``push_host`` (the registry, or an unshaped
    proxy in front of it) and time their fetch through ``shaped``."""
    if shaped.rate_bps is None:
        raise ValueError("the link check needs a proxy with a rate")
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(plain_http=True) as client:
        client.push_blob(Reference.parse(f"{push_host}/{REPOSITORY}:1"), digest, size, data)
    del data
    conn = http.client.HTTPConnection(shaped.host, timeout=600)
    try:
        started = time.monotonic()
        conn.request("GET", f"/v2/{REPOSITORY}/blobs/{digest}")
        response = conn.getresponse()
        received = 0
        check = hashlib.sha256()
        while piece := response.read(1 << 20):
            received += len(piece)
            check.update(piece)
        seconds = time.monotonic() - started
    finally:
        conn.close()
    if response.status != 200 or "sha256:" + check.hexdigest() != digest:
        raise RuntimeError(
            f"the link check fetched {received} bytes with status {response.status}, "
            f"not the {size} bytes pushed"
        )
    return LinkCheck(size, seconds, size * 8 / shaped.rate_bps + shaped.delay)
