"""How one registry request is carried out: endpoints, retries, auth and redirects.

Every request goes through three layers, from the outside in:

1. endpoints (:meth:`Transport.call`): the namespace's mirrors, then its server, as
   hosts.toml lists them and filtered by the capability needed. An endpoint that fails
   (down, 5xx after retries, 404 on a mirror) hands over to the next one; one that was
   down recently is tried last.
2. retries (:meth:`Transport.with_retries`): connection errors, resets, truncated bodies,
   429 and 5xx are retried with backoff, bounded by the :class:`RetryPolicy`.
3. one exchange (:meth:`Transport.exchange`): the request with its credentials (a 401
   fetches a fresh token and retries once), redirects followed by hand (another host gets
   neither the registry's credentials nor the hosts.toml headers, but keeps ``Range``),
   the redirect URL cached per blob and dropped when it expires, and the answer handed
   to a checker that may refuse it.

TLS failures that retrying cannot fix (an untrusted certificate, a certificate for
another name, a server that does not speak TLS or speaks only TLS, a refused client
certificate) raise :class:`RegistryTLSError` at once, saying what to set in hosts.toml.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar
from urllib.parse import urljoin, urlsplit

import attrs
import httpx

from blockfs.registry._auth import (
    Challenge,
    Token,
    TokenCache,
    TokenKey,
    basic_authorization,
    fetch_token,
    login_hint,
    parse_www_authenticate,
)
from blockfs.registry._credentials import Credential, CredentialStore
from blockfs.registry._errors import (
    BlobNotFound,
    DigestMismatch,
    ManifestNotFound,
    RangeNotSatisfiable,
    RegistryAuthError,
    RegistryError,
    RegistryProtocolError,
    RegistryTLSError,
    RegistryUnavailable,
)
from blockfs.registry._hosts import HOSTS_FILE, Endpoint, HostsConfig
from blockfs.registry._retry import RetryPolicy

log = logging.getLogger("blockfs.registry")

T = TypeVar("T")
E = TypeVar("E", bound=RegistryError)
Kind = Literal["manifest", "blob", "upload"]
Handler = Callable[[httpx.Response, Endpoint], T]

_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 << 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Statuses that mean "this server does not do HEAD here" rather than "no such blob".
HEAD_REJECTED = frozenset({400, 403, 405, 501})
# Statuses of a cached redirect URL that mean it expired: ask the registry again.
_REDIRECT_EXPIRED = frozenset({400, 401, 403, 404, 410})
# How long an endpoint that failed is tried after the others.
ENDPOINT_COOLDOWN = 30.0
# OpenSSL reasons for a TLS client that got something other than TLS back.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)
# TLS alerts by which a server refuses the client certificate (or its absence).
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH_CODES = frozenset({62, 64})


@attrs.frozen(slots=True)
class Target:
    """What one logical request is about: for choosing endpoints, auth scope and errors."""

    registry: str
    repository: str
    capability: Literal["pull", "resolve", "push"]
    kind: Kind
    digest: str | None = None
    scopes: tuple[str, ...] = ()

    def error(
        self,
        cls: type[E],
        message: str,
        host: str,
        *,
        status: int | None = None,
        hint: str | None = None,
    ) -> E:
        """A ``cls`` error about this target on ``host``."""
        return cls(
            message,
            host=host,
            repository=self.repository,
            digest=self.digest,
            status=status,
            hint=hint,
        )


class Transient(Exception):
    """A failure worth retrying; ``error`` is raised if the retries run out.

    ``connect`` marks a failure to connect at all, after which a mirror is skipped at once.
    """

    def __init__(
        self, error: RegistryError, *, retry_after: float | None = None, connect: bool = False
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.connect = connect


class HeadRejected(Exception):
    """The server will not answer HEAD for this blob; ask with a one-byte GET instead."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


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


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an httpx error (httpx wraps httpcore wraps ssl)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class Transport:
    """Sends registry requests for :class:`RegistryClient`; see the module docstring.

    Thread-safe: the token cache, challenges, redirect cache and endpoint health are
    guarded by a lock; each endpoint configuration has one pooled ``httpx.Client``.
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
        self._hosts = hosts
        self._credentials = credentials
        self._plain_http = plain_http
        self._timeout = timeout
        self._retry = retry
        self._trust_env = trust_env
        self._user_agent = user_agent
        self._tokens = TokenCache()
        self._lock = threading.Lock()
        self._clients: dict[tuple[object, ...], httpx.Client] = {}
        self._challenges: dict[str, Challenge] = {}
        self._redirects: dict[tuple[str, str, str], str] = {}
        self._down_until: dict[str, float] = {}
        self._rng = random.Random()
        self._closed = False

    def close(self) -> None:
        """Close every pooled connection; later requests fail."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
            self._closed = True
        for client in clients:
            client.close()

    # -- endpoints and retries ---------------------------------------------------------

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
                return self.with_retries(
                    endpoint, functools.partial(run, endpoint), fast_fail=not last
                )
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

    def with_retries(self, endpoint: Endpoint, run: Callable[[], T], *, fast_fail: bool) -> T:
        """``run`` until it succeeds, fails for good, or the retry policy is exhausted.

        With ``fast_fail``, a failure to connect gives up at once (another endpoint waits).
        """
        policy = self._retry
        deadline = time.monotonic() + policy.total_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                result = run()
            except Transient as t:
                failure = t
            except RegistryUnavailable as e:
                failure = Transient(e)
            else:
                with self._lock:
                    self._down_until.pop(endpoint.api_root, None)
                return result
            if failure.connect and fast_fail:
                self._mark_down(endpoint)
                raise failure.error
            if attempt >= policy.max_attempts:
                break
            delay = policy.delay(attempt, failure.retry_after, rng=self._rng)
            if time.monotonic() + delay > deadline:
                break
            log.info("%s (attempt %d); retrying in %.2f s", failure.error, attempt, delay)
            time.sleep(delay)
        error = failure.error
        error.message += f" (gave up after {attempt} attempt{'s' if attempt > 1 else ''})"
        if isinstance(error, RegistryUnavailable):
            self._mark_down(endpoint)
        raise error

    def _mark_down(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._down_until[endpoint.api_root] = time.monotonic() + ENDPOINT_COOLDOWN

    # -- one exchange ------------------------------------------------------------------

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
        http = self._http(ep)
        if url is None:
            if path is None:
                raise ValueError("exchange needs a path or a url")
            query = dict(params or {})
            if ep.mirror:
                query["ns"] = ep.namespace
            url = str(httpx.URL(ep.api_root + path, params=query))
        base_headers = dict(headers or {})
        cache_key = (
            (ep.api_root, target.repository, target.digest)
            if method == "GET" and target.kind == "blob" and target.digest
            else None
        )
        if cache_key is not None:
            with self._lock:
                cached = self._redirects.get(cache_key)
            if cached is not None:
                answer = self._from_cached_redirect(ep, target, http, cached, base_headers, kind)
                if answer is not None:
                    return self._finish(answer, ep, handle)

        response = self._send_authorized(ep, target, http, method, url, base_headers, content)
        response, foreign_url = self._follow_redirects(
            ep, target, http, method, response, base_headers
        )
        if method == "HEAD" and response.status_code in HEAD_REJECTED:
            response.close()
            raise HeadRejected()
        if not response.is_success:
            raise self._status_error(
                response, ep, target, foreign=foreign_url is not None, kind=kind
            )
        if cache_key is not None and foreign_url is not None:
            with self._lock:
                self._redirects[cache_key] = foreign_url
        return self._finish(response, ep, handle)

    def _from_cached_redirect(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
        url: str,
        headers: Mapping[str, str],
        kind: Kind | None,
    ) -> httpx.Response | None:
        """The answer of a cached redirect URL, or None when it expired (ask the registry)."""
        assert target.digest is not None
        key = (ep.api_root, target.repository, target.digest)
        try:
            response = self._send(ep, target, http, "GET", url, headers, None)
        except Transient:
            with self._lock:
                self._redirects.pop(key, None)
            raise
        if response.is_success:
            return response
        with self._lock:
            self._redirects.pop(key, None)
        if response.status_code not in _REDIRECT_EXPIRED:
            raise self._status_error(response, ep, target, foreign=True, kind=kind)
        response.close()
        log.info(
            "the redirect URL for %s expired (HTTP %d); asking %s again",
            target.digest,
            response.status_code,
            ep.host,
        )
        return None

    def _finish(self, response: httpx.Response, ep: Endpoint, handle: Handler[T]) -> T:
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
        request = http.build_request(method, url, headers=headers, content=content)
        host = urlsplit(url).netloc
        try:
            return http.send(request, stream=True)
        except httpx.TransportError as e:
            tls = self._tls_error(e, ep, target, host)
            if tls is not None:
                raise tls from e
            connect = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
            what = f"cannot connect to {host}" if connect else f"request to {host} failed"
            raise Transient(
                RegistryUnavailable(f"{what}: {e!r}", host=host), connect=connect
            ) from e

    def _where(self, ep: Endpoint) -> str:
        """Where the settings of ``ep`` go: its hosts.toml, or the one to create."""
        if ep.hosts_file is not None:
            return f"for {ep.origin} in {ep.hosts_file}"
        directory = self._hosts.directory
        if directory is not None:
            return f"in {directory / ep.namespace / HOSTS_FILE} (a new file)"
        return (
            f"in DIR/{ep.namespace}/{HOSTS_FILE} and use DIR as the hosts directory "
            "(--hosts-dir; containerd's certs.d layout)"
        )

    def _tls_error(
        self, error: httpx.TransportError, ep: Endpoint, target: Target, host: str
    ) -> RegistryTLSError | None:
        """The error to raise at once for a TLS failure that retrying cannot fix, or None
        (not TLS, or a TLS failure that may pass, such as the connection dropping)."""
        cause = _ssl_cause(error)
        if cause is None:
            return None
        where = self._where(ep)
        insecure = "(insecure: then anyone on the way can pose as the registry)"
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or cause.reason or str(cause)
            if cause.verify_code in _NAME_MISMATCH_CODES:
                hostname = urlsplit(f"//{host}").hostname or host
                message = f"the TLS certificate of {host} is not valid for {hostname} ({why})"
                hint = (
                    "Dial the registry by a name its certificate lists, give it a certificate "
                    f"for {hostname}, or set skip_verify = true {where} {insecure}"
                )
            else:
                message = f"the TLS certificate of {host} is not trusted ({why})"
                hint = (
                    'Set ca = "/path/to/ca.pem" (the CA that signed the registry\'s '
                    f"certificate) {where}, or skip_verify = true {insecure}"
                )
        elif cause.reason in _NOT_TLS_REASONS:
            message = f"{host} does not speak TLS (the TLS handshake got {cause.reason})"
            hint = (
                f"If it is a plain-HTTP registry, write http://{host} instead of "
                f"{ep.origin} in {ep.hosts_file}"
                if ep.hosts_file is not None
                else "If it is a plain-HTTP registry, ask for plain HTTP (--plain-http)"
            )
        elif cause.reason in _CLIENT_CERT_ALERTS:
            if not ep.client_certs:
                message = (
                    f"{host} refused the TLS connection ({cause.reason}): it requires a client "
                    "certificate and none is configured for it"
                )
                hint = f'Set client = [["/path/client.pem", "/path/client.key"]] {where}'
            else:
                message = (
                    f"{host} refused our TLS client certificate {ep.client_certs[0][0]} "
                    f"({cause.reason})"
                )
                hint = (
                    "Use a client certificate that the registry trusts (signed by one of its "
                    f"client CAs, not expired) and its key, set as client {where}"
                )
        else:
            return None
        return target.error(RegistryTLSError, message, host, hint=hint)

    def _send_authorized(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
    ) -> httpx.Response:
        """Send with the credentials ``ep`` wants; on 401 authenticate afresh and retry once."""
        if _origin(url) != ep.origin:
            return self._send(ep, target, http, method, url, headers, content)
        authorization = self._authorization(ep, target)
        response = self._send(
            ep, target, http, method, url, self._headers_for(ep, headers, authorization), content
        )
        if response.status_code != 401:
            return response
        challenges = response.headers.get_list("www-authenticate")
        response.close()
        authorization = self._authorize(ep, target, challenges, rejected=authorization)
        response = self._send(
            ep, target, http, method, url, self._headers_for(ep, headers, authorization), content
        )
        if response.status_code != 401:
            return response
        response.close()
        credential = self._credential(ep)
        if credential is None:
            why = f"{ep.host} requires authentication and no credentials are configured for it"
        elif credential.username:
            why = f"{ep.host} rejected the credentials of user {credential.username!r}"
        else:
            why = f"{ep.host} rejected our credentials"
        raise target.error(
            RegistryAuthError, why, ep.host, status=401, hint=login_hint(self._login_host(ep))
        )

    @staticmethod
    def _headers_for(
        ep: Endpoint, headers: Mapping[str, str], authorization: str | None
    ) -> dict[str, str]:
        merged = {**dict(ep.headers), **headers}
        if authorization is not None:
            merged["Authorization"] = authorization
        return merged

    def _follow_redirects(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
        method: str,
        response: httpx.Response,
        headers: Mapping[str, str],
    ) -> tuple[httpx.Response, str | None]:
        """Follow GET/HEAD redirects; returns the final answer and the last foreign URL."""
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
            if _origin(next_url) != ep.origin:
                foreign = next_url
            response = self._send_authorized(ep, target, http, method, next_url, headers, None)
        return response, foreign

    def _status_error(
        self,
        response: httpx.Response,
        ep: Endpoint,
        target: Target,
        *,
        foreign: bool,
        kind: Kind | None,
    ) -> Exception:
        """The error (or :class:`Transient`) that a non-2xx answer means; closes it."""
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
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500 and status not in (501, 505):
            return Transient(
                target.error(
                    RegistryUnavailable, f"server error {detail}".strip(), host, status=status
                )
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
                hint=login_hint(self._login_host(ep)),
            )
        if code in ("DIGEST_INVALID", "SIZE_INVALID"):
            return target.error(
                DigestMismatch, f"the registry refused the content: {detail}", host, status=status
            )
        return target.error(RegistryError, f"unexpected answer: {detail}", host, status=status)

    # -- auth ------------------------------------------------------------------------

    @staticmethod
    def _login_host(ep: Endpoint) -> str:
        return ep.host if ep.mirror else ep.namespace

    def _credential(self, ep: Endpoint) -> Credential | None:
        # Credentials are looked up by the host actually contacted: a mirror never gets the
        # upstream registry's secrets. The upstream server is looked up by its namespace
        # (docker.io, not registry-1.docker.io), as docker stores it.
        return self._credentials.get(self._login_host(ep))

    def _authorization(self, ep: Endpoint, target: Target) -> str | None:
        """The Authorization header for ``ep`` known from an earlier challenge, if any."""
        with self._lock:
            challenge = self._challenges.get(ep.origin)
        if challenge is None:
            return None
        credential = self._credential(ep)
        if challenge.scheme == "basic":
            if credential is not None and credential.has_password:
                return basic_authorization(credential.username, credential.password)
            return None
        return self._bearer(ep, target, challenge, credential, rejected=None)

    def _authorize(
        self, ep: Endpoint, target: Target, headers: list[str], *, rejected: str | None
    ) -> str:
        """The Authorization header that answers the challenges of a 401."""
        challenges: list[Challenge] = []
        for header in headers:
            try:
                challenges.extend(parse_www_authenticate(header))
            except ValueError:
                continue
        by_scheme = {c.scheme: c for c in challenges}
        challenge = by_scheme.get("bearer") or by_scheme.get("basic")
        if challenge is None:
            raise target.error(
                RegistryAuthError,
                f"{ep.host} asks for an authentication scheme we do not support "
                f"({'; '.join(headers) or 'no WWW-Authenticate'})",
                ep.host,
                status=401,
            )
        with self._lock:
            self._challenges[ep.origin] = challenge
        credential = self._credential(ep)
        if challenge.scheme == "basic":
            if credential is None or not credential.has_password:
                raise target.error(
                    RegistryAuthError,
                    f"{ep.host} requires a user name and password and none are configured for it",
                    ep.host,
                    status=401,
                    hint=login_hint(self._login_host(ep)),
                )
            return basic_authorization(credential.username, credential.password)
        stale = (
            rejected.removeprefix("Bearer ")
            if rejected and rejected.startswith("Bearer ")
            else None
        )
        if stale is not None:
            log.info(
                "%s refused our token for %s; getting a new one", ep.host, " ".join(target.scopes)
            )
        return self._bearer(ep, target, challenge, credential, rejected=stale)

    def _bearer(
        self,
        ep: Endpoint,
        target: Target,
        challenge: Challenge,
        credential: Credential | None,
        *,
        rejected: str | None,
    ) -> str:
        if credential is not None and credential.registry_token:
            return f"Bearer {credential.registry_token}"
        key: TokenKey = (ep.origin, challenge.realm, challenge.service, target.scopes)

        def fetch() -> Token:
            try:
                return fetch_token(
                    self._http(ep), challenge, target.scopes, credential, host=ep.host
                )
            except RegistryUnavailable as e:
                # The token server is reached with the registry's TLS settings: a TLS
                # failure there needs the same fix, and retrying does not help either.
                cause = e.__cause__
                if isinstance(cause, httpx.TransportError):
                    realm_host = urlsplit(challenge.realm).netloc
                    tls = self._tls_error(cause, ep, target, realm_host)
                    if tls is not None:
                        tls.message = f"the token server {challenge.realm}: {tls.message}"
                        raise tls from cause
                raise

        token = self._tokens.get(key, fetch, rejected=rejected)
        return f"Bearer {token.value}"

    # -- HTTP clients ------------------------------------------------------------------

    def _http(self, ep: Endpoint) -> httpx.Client:
        key = (ep.skip_verify, ep.ca, ep.client_certs, ep.proxy, ep.dial_timeout)
        with self._lock:
            if self._closed:
                raise RegistryError("the registry client is closed")
            client = self._clients.get(key)
            if client is None:
                client = httpx.Client(
                    verify=_ssl_context(ep, self._where(ep)),
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


def _ssl_context(ep: Endpoint, where: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ep.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for ca in ep.ca:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as e:  # ssl.SSLError is an OSError too
            raise RegistryTLSError(
                f"cannot load the CA certificate {ca} for {ep.origin}: {e}",
                host=ep.host,
                hint=f"Fix the ca setting {where}: a PEM file of CA certificates",
            ) from e
    if ep.client_certs:
        # Like Go's TLS client with one configured pair, offer the first certificate.
        cert, key = ep.client_certs[0]
        try:
            context.load_cert_chain(cert, key)
        except OSError as e:  # ssl.SSLError is an OSError too
            files = cert if key is None else f"{cert} and {key}"
            raise RegistryTLSError(
                f"cannot load the client certificate {files} for {ep.origin}: {e}",
                host=ep.host,
                hint=f"Fix the client setting {where}: a PEM certificate and its key "
                "(one file holding both, or a [certificate, key] pair)",
            ) from e
    return context
