"""Registry authentication: the 401 -> credentials -> retry round as an ``httpx.Auth``,
WWW-Authenticate challenges, bearer tokens and their cache.

The registry answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
(or ``Basic realm=...``). For Bearer, a token is fetched from the realm for the scopes
needed (``repository:NAME:pull[,push]``), with Basic credentials if we have some, or with
an OAuth2 refresh token (docker's identity token). Tokens are cached per registry host,
realm, service and scope until they expire or the registry rejects them. The challenge
each registry origin sent last is remembered, so later requests carry their credentials
from the start; a 401 all the same fetches a fresh token and sends the request once more.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

import attrs
import httpx

from blockfs.registry._credentials import Credential, CredentialStore
from blockfs.registry._errors import RegistryAuthError, RegistryProtocolError, RegistryUnavailable
from blockfs.registry._hosts import Endpoint
from blockfs.registry._target import Target
from blockfs.registry._tls import tls_error

log = logging.getLogger("blockfs.registry")

# Used when a token response has no expires_in (the token spec's default lifetime).
DEFAULT_TOKEN_SECONDS = 60.0
# A token is treated as expired this long before the server says it expires.
_EXPIRY_MARGIN = 5.0


def _frozen_params(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(slots=True)
class Challenge:
    """One authentication challenge from a WWW-Authenticate header (scheme lowercased)."""

    scheme: str
    params: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_params, hash=False)

    @property
    def realm(self) -> str:
        """Where to get a token (Bearer) or the protection space (Basic)."""
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        """The service name to ask the token server for."""
        return self.params.get("service", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes the registry asked for (space-separated in the header)."""
        return tuple(self.params.get("scope", "").split())


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in ' \t,="':
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """A quoted-string starting at text[i] == '"'; returns its unescaped value."""
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError("unterminated quoted string")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value into its challenges (RFC 7235 syntax).

    Raises ValueError when the header is not well formed.
    """
    challenges: list[Challenge] = []
    i = 0
    while True:
        i = _skip_spaces(header, i)
        while i < len(header) and header[i] == ",":
            i = _skip_spaces(header, i + 1)
        if i >= len(header):
            return challenges
        scheme, i = _read_token(header, i)
        if not scheme:
            raise ValueError(f"bad WWW-Authenticate header {header!r}")
        params: dict[str, str] = {}
        while True:
            i = _skip_spaces(header, i)
            start = i
            name, j = _read_token(header, i)
            j = _skip_spaces(header, j)
            if not name or j >= len(header) or header[j] != "=":
                i = start  # not a parameter: the next challenge's scheme (or the end)
                break
            j = _skip_spaces(header, j + 1)
            if j < len(header) and header[j] == '"':
                value, j = _read_quoted(header, j)
            else:
                value, j = _read_token(header, j)
            params[name.lower()] = value
            i = _skip_spaces(header, j)
            if i < len(header) and header[i] == ",":
                i += 1
        challenges.append(Challenge(scheme.lower(), params))


def basic_authorization(username: str, password: str) -> str:
    """The value of an ``Authorization: Basic ...`` header."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def repository_scope(repository: str, actions: Iterable[str]) -> str:
    """``repository:NAME:pull,push`` for the token server."""
    return f"repository:{repository}:{','.join(actions)}"


def merge_scopes(*groups: Iterable[str]) -> tuple[str, ...]:
    """Union of scopes, merging the actions of scopes on the same resource; sorted."""
    merged: dict[str, list[str]] = {}
    for group in groups:
        for scope in group:
            resource, sep, actions = scope.rpartition(":")
            if not sep:
                merged.setdefault(scope, [])
                continue
            known = merged.setdefault(resource, [])
            known.extend(a for a in actions.split(",") if a and a not in known)
    return tuple(
        sorted(
            f"{resource}:{','.join(actions)}" if actions else resource
            for resource, actions in merged.items()
        )
    )


@attrs.frozen(slots=True)
class Token:
    """A bearer token and when (``time.monotonic()``) it stops being usable."""

    value: str = attrs.field(repr=False)
    expires_at: float

    @classmethod
    def lasting(cls, value: str, seconds: float | None) -> Token:
        """A token that the server says lasts ``seconds`` (default 60)."""
        lifetime = DEFAULT_TOKEN_SECONDS if seconds is None or seconds <= 0 else seconds
        margin = min(_EXPIRY_MARGIN, lifetime / 10)
        return cls(value, time.monotonic() + lifetime - margin)

    @property
    def expired(self) -> bool:
        """Whether the token is past (or near) its expiry."""
        return time.monotonic() >= self.expires_at


TokenKey = tuple[str, str, str, tuple[str, ...]]


class TokenCache:
    """Bearer tokens by (registry host, realm, service, scopes). Thread-safe.

    Only one thread fetches a given token at a time; the others wait and share it.
    """

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, Token] = {}
        self._fetch_locks: dict[TokenKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def peek(self, key: TokenKey) -> Token | None:
        """The cached token for ``key`` if it has not expired."""
        with self._lock:
            token = self._tokens.get(key)
        return token if token is not None and not token.expired else None

    def get(
        self, key: TokenKey, fetch: Callable[[], Token], *, rejected: str | None = None
    ) -> Token:
        """The cached token for ``key``, fetched with ``fetch`` when there is none usable.

        ``rejected`` is a token value the registry just refused: it is never returned.
        """
        with self._lock:
            lock = self._fetch_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                token = self._tokens.get(key)
            if token is not None and not token.expired and token.value != rejected:
                return token
            token = fetch()
            with self._lock:
                self._tokens[key] = token
            return token

    def forget(self, key: TokenKey) -> None:
        """Drop the token for ``key``."""
        with self._lock:
            self._tokens.pop(key, None)


def fetch_token(
    http: httpx.Client,
    challenge: Challenge,
    scopes: Iterable[str],
    credential: Credential | None,
    *,
    host: str,
) -> Token:
    """Get a bearer token for ``scopes`` from the challenge's realm.

    With an identity token, uses the OAuth2 refresh-token grant (POST); otherwise a GET,
    with Basic credentials when there are some (anonymous otherwise). Raises
    :class:`RegistryUnavailable` for network failures and 5xx/429 (the caller retries)
    and :class:`RegistryAuthError` when the token server refuses.
    """
    realm = challenge.realm
    if not realm.startswith(("https://", "http://")):
        raise RegistryProtocolError(
            f"the registry's Bearer challenge has no usable realm ({realm!r})", host=host
        )
    scope_list = list(scopes)
    headers = {}
    try:
        if credential is not None and credential.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credential.identity_token,
                "service": challenge.service,
                "scope": " ".join(scope_list),
                "client_id": "blockfs",
            }
            response = http.post(realm, data=form)
        else:
            params: list[tuple[str, str | int | float | bool | None]] = [
                ("scope", s) for s in scope_list
            ]
            if challenge.service:
                params.insert(0, ("service", challenge.service))
            if credential is not None and credential.has_password:
                headers["Authorization"] = basic_authorization(
                    credential.username, credential.password
                )
            response = http.get(realm, params=params, headers=headers)
    except httpx.TransportError as e:
        raise RegistryUnavailable(f"cannot reach the token server {realm}: {e}", host=host) from e
    status = response.status_code
    if status == 429 or status >= 500:
        raise RegistryUnavailable(
            f"the token server {realm} answered HTTP {status}", host=host, status=status
        )
    if status in (401, 403):
        who = (
            f"the credentials of user {credential.username!r}"
            if credential is not None and credential.username
            else "the stored identity token"
            if credential is not None and credential.identity_token
            else "anonymous access"
        )
        raise RegistryAuthError(
            f"the token server {realm} refused {who} for {' '.join(scope_list)}",
            host=host,
            status=status,
            hint=login_hint(host),
        )
    if status != 200:
        raise RegistryAuthError(
            f"the token server {realm} answered HTTP {status}", host=host, status=status
        )
    try:
        answer = response.json()
        value = answer.get("token") or answer.get("access_token")
        expires_in = answer.get("expires_in")
    except (ValueError, AttributeError):
        raise RegistryProtocolError(
            f"the token server {realm} answered something other than a JSON token", host=host
        ) from None
    if not isinstance(value, str) or not value:
        raise RegistryProtocolError(f"the token server {realm} sent no token", host=host)
    seconds = float(expires_in) if isinstance(expires_in, int | float) else None
    return Token.lasting(value, seconds)


def login_hint(host: str) -> str:
    """What to tell a user whose registry wants credentials we lack or that it refused."""
    return (
        f"Run `docker login {host}` or put credentials for {host} in docker's config.json "
        "(auths, credHelpers or credsStore) and make sure they grant access to the repository"
    )


def login_host(ep: Endpoint) -> str:
    """The name that the credentials for ``ep`` are stored under.

    Credentials go by the host actually contacted: a mirror never gets the upstream
    registry's secrets. The upstream server goes by its namespace (docker.io, not
    registry-1.docker.io), as docker stores it.
    """
    return ep.host if ep.mirror else ep.namespace


class Authenticator:
    """The credentials, the challenge each registry origin sent last and the bearer
    tokens got for them, shared by every request. Thread-safe.

    ``hosts_dir`` is the client's hosts directory, for the hint of a TLS error with a
    token server.
    """

    def __init__(self, credentials: CredentialStore, hosts_dir: Path | None) -> None:
        self._credentials = credentials
        self._hosts_dir = hosts_dir
        self._tokens = TokenCache()
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}

    def credential(self, ep: Endpoint) -> Credential | None:
        """The credential stored for ``ep`` (see :func:`login_host`), if any."""
        return self._credentials.get(login_host(ep))

    def known(self, ep: Endpoint, target: Target, http: httpx.Client) -> str | None:
        """The Authorization header for ``ep`` known from an earlier challenge, if any."""
        with self._lock:
            challenge = self._challenges.get(ep.origin)
        if challenge is None:
            return None
        credential = self.credential(ep)
        if challenge.scheme == "basic":
            if credential is not None and credential.has_password:
                return basic_authorization(credential.username, credential.password)
            return None
        return self._bearer(ep, target, http, challenge, credential, rejected=None)

    def answer(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
        headers: list[str],
        *,
        rejected: str | None,
    ) -> str:
        """The Authorization header that answers the challenges (WWW-Authenticate
        ``headers``) of a 401 to a request that carried ``rejected``."""
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
        credential = self.credential(ep)
        if challenge.scheme == "basic":
            if credential is None or not credential.has_password:
                raise target.error(
                    RegistryAuthError,
                    f"{ep.host} requires a user name and password and none are configured for it",
                    ep.host,
                    status=401,
                    hint=login_hint(login_host(ep)),
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
        return self._bearer(ep, target, http, challenge, credential, rejected=stale)

    def _bearer(
        self,
        ep: Endpoint,
        target: Target,
        http: httpx.Client,
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
                return fetch_token(http, challenge, target.scopes, credential, host=ep.host)
            except RegistryUnavailable as e:
                # The token server is reached with the registry's TLS settings: a TLS
                # failure there needs the same fix, and retrying does not help either.
                cause = e.__cause__
                if isinstance(cause, httpx.TransportError):
                    realm_host = urlsplit(challenge.realm).netloc
                    tls = tls_error(cause, ep, target, realm_host, self._hosts_dir)
                    if tls is not None:
                        tls.message = f"the token server {challenge.realm}: {tls.message}"
                        raise tls from cause
                raise

        token = self._tokens.get(key, fetch, rejected=rejected)
        return f"Bearer {token.value}"


class RegistryAuth(httpx.Auth):
    """The credentials of one request to ``ep`` for ``target``, as an httpx auth flow.

    The request carries what the origin's last challenge calls for; a 401 is answered
    with fresh credentials (a new token) and the request sent once more; a second 401
    raises :class:`RegistryAuthError`. Tokens are fetched with ``http``, the client the
    request goes through: the flow blocks, so it serves a sync ``httpx.Client`` only.
    """

    requires_response_body = False

    def __init__(
        self, authenticator: Authenticator, ep: Endpoint, target: Target, http: httpx.Client
    ) -> None:
        self._authenticator = authenticator
        self._ep = ep
        self._target = target
        self._http = http

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        ep, target, authenticator = self._ep, self._target, self._authenticator
        sent = authenticator.known(ep, target, self._http)
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        request.headers["Authorization"] = authenticator.answer(
            ep, target, self._http, response.headers.get_list("www-authenticate"), rejected=sent
        )
        response = yield request
        if response.status_code != 401:
            return
        credential = authenticator.credential(ep)
        if credential is None:
            why = f"{ep.host} requires authentication and no credentials are configured for it"
        elif credential.username:
            why = f"{ep.host} rejected the credentials of user {credential.username!r}"
        else:
            why = f"{ep.host} rejected our credentials"
        raise target.error(
            RegistryAuthError, why, ep.host, status=401, hint=login_hint(login_host(ep))
        )
