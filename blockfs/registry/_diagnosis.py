"""What a failed registry exchange means: the error to raise at once, or the
:class:`Transient` failure to retry, for a request that got no answer or not a 2xx one."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from blockfs.registry._auth import login_hint, login_host
from blockfs.registry._errors import (
    BlobNotFound,
    DigestMismatch,
    ManifestNotFound,
    RangeNotSatisfiable,
    RegistryAuthError,
    RegistryError,
    RegistryTLSError,
    RegistryUnavailable,
)
from blockfs.registry._hosts import Endpoint
from blockfs.registry._retry import Transient, parse_retry_after
from blockfs.registry._target import Kind, Target
from blockfs.registry._tls import tls_error

_MAX_ERROR_BODY = 64 << 10


def transport_error(
    error: httpx.TransportError, ep: Endpoint, target: Target, host: str, hosts_dir: Path | None
) -> Exception:
    """The error for a request to ``host`` that got no answer: a TLS failure that
    retrying cannot fix, else a :class:`Transient` (``connect`` if it never connected)."""
    tls = tls_error(error, ep, target, host, hosts_dir)
    if tls is not None:
        return tls
    connect = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
    what = f"cannot connect to {host}" if connect else f"request to {host} failed"
    return Transient(RegistryUnavailable(f"{what}: {error!r}", host=host), connect=connect)


def _error_body(response: httpx.Response) -> bytes:
    """The first 64 KiB or so of an error answer's body (what arrived, if it broke off)."""
    body = b""
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    return body


def _error_detail(response: httpx.Response, body: bytes) -> tuple[str, str]:
    """(first error code, a short description) from a registry error body."""
    try:
        first = json.loads(body)["errors"][0]
        code = str(first.get("code", ""))
        message = str(first.get("message", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", response.reason_phrase or ""
    return code, f"{code}: {message}" if message else code


def _https_only_answer(response: httpx.Response, body: bytes) -> bool:
    """Whether a 400 says that plain HTTP reached a port that speaks only HTTPS (Go's
    "Client sent an HTTP request to an HTTPS server", nginx's "The plain HTTP request
    was sent to HTTPS port")."""
    text = body[:1024].decode("utf-8", "replace").lower()
    return (
        response.status_code == 400
        and response.url.scheme == "http"
        and "http request" in text
        and "https" in text
    )


def status_error(
    response: httpx.Response,
    ep: Endpoint,
    target: Target,
    *,
    foreign: bool,
    kind: Kind | None,
) -> Exception:
    """The error (or :class:`Transient`) that a non-2xx answer means; closes it.

    ``foreign`` says the answer came from another host that ``ep`` redirected to;
    ``kind`` overrides ``target.kind`` for what a 404 means.
    """
    status = response.status_code
    try:
        body = _error_body(response)
    finally:
        response.close()
    code, detail = _error_detail(response, body)
    host = urlsplit(str(response.url)).netloc if foreign else ep.host
    kind = kind or target.kind
    if not foreign and _https_only_answer(response, body):
        return target.error(
            RegistryTLSError,
            f"{host} speaks HTTPS only, and was asked in plain HTTP",
            host,
            status=status,
            hint=(
                f"Write https://{host} instead of {ep.origin} in {ep.hosts_file}"
                if ep.hosts_file is not None
                else "Do not ask for plain HTTP (--plain-http) for it"
            ),
        )
    if status == 429:
        return Transient(
            target.error(
                RegistryUnavailable, "the registry is rate-limiting us", host, status=status
            ),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    if status >= 500 and status not in (501, 505):
        return Transient(
            target.error(RegistryUnavailable, f"server error {detail}".strip(), host, status=status)
        )
    if foreign and status in (401, 403):
        return Transient(
            target.error(
                RegistryUnavailable,
                f"the storage host refused the redirected URL ({detail})",
                host,
                status=status,
            )
        )
    if status == 404:
        if kind == "manifest":
            return target.error(ManifestNotFound, "no such manifest", host, status=status)
        if kind == "blob":
            return target.error(BlobNotFound, "no such blob", host, status=status)
        return Transient(
            target.error(
                RegistryError, f"the upload session was lost ({detail})", host, status=status
            )
        )
    if status == 416:
        return target.error(
            RangeNotSatisfiable, "the range is outside the blob", host, status=status
        )
    if status in (401, 403):
        return target.error(
            RegistryAuthError,
            f"access denied ({detail})",
            host,
            status=status,
            hint=login_hint(login_host(ep)),
        )
    if code in ("DIGEST_INVALID", "SIZE_INVALID"):
        return target.error(
            DigestMismatch, f"the registry refused the content: {detail}", host, status=status
        )
    return target.error(RegistryError, f"unexpected answer: {detail}", host, status=status)
