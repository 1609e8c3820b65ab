"""Registry credentials from docker's config.json and docker credential helpers.

A host's credentials come from, in order: its ``credHelpers`` entry, the ``credsStore``
helper, then its ``auths`` entry. Helpers are run as ``docker-credential-NAME get`` with
the server URL on stdin and answer ``{"Username": ..., "Secret": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from blockfs.oci import DOCKER_HUB
from blockfs.registry._errors import CredentialHelperError, RegistryAuthError

# How docker names Docker Hub in config.json and to credential helpers.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_NAMES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
# A helper answering with this user name returns an identity (refresh) token as Secret.
_TOKEN_USERNAME = "<token>"
# What to do about a docker config.json that cannot be read.
_UNREADABLE_FIX = (
    "make it readable by this user, or set DOCKER_CONFIG to a directory whose config.json is"
)

log = logging.getLogger("blockfs.registry")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def docker_config_problem(path: str | os.PathLike[str]) -> str | None:
    """Why docker's config.json at ``path`` cannot be read (``"permission denied"``), or
    None if it can be or does not exist."""
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return None
    except OSError as e:
        return (e.strerror or str(e)).lower()


def warn_if_unreadable(path: str | os.PathLike[str]) -> None:
    """Warn (once per file and process) that docker's config.json at ``path`` exists but
    cannot be read: for a command that needs no registry credentials it is no error."""
    problem = docker_config_problem(path)
    if problem is None:
        return
    with _warned_lock:
        if os.fspath(path) in _warned:
            return
        _warned.add(os.fspath(path))
    log.warning(
        "cannot read docker config %s (%s), so its registry credentials are not used; %s",
        os.fspath(path),
        problem,
        _UNREADABLE_FIX,
    )


def normalize_host(key: str) -> str:
    """The host[:port] that a config.json key or server URL names (Docker Hub -> docker.io)."""
    host = key.strip()
    for scheme in ("https://", "http://"):
        if host.lower().startswith(scheme):
            host = host[len(scheme) :]
            break
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_NAMES else host


def server_url(host: str) -> str:
    """The server URL docker uses for ``host`` in config.json and with helpers."""
    host = normalize_host(host)
    return DOCKER_HUB_CONFIG_KEY if host == DOCKER_HUB else host


@attrs.frozen(slots=True)
class Credential:
    """What to authenticate with: a user name and password, and/or tokens.

    ``identity_token`` is an OAuth2 refresh token for the token server;
    ``registry_token`` a bearer token to send to the registry as is.
    """

    username: str = ""
    password: str = attrs.field(default="", repr=False)
    identity_token: str = attrs.field(default="", repr=False)
    registry_token: str = attrs.field(default="", repr=False)

    @property
    def has_password(self) -> bool:
        """Whether there is a user name and password for Basic authentication."""
        return bool(self.username and self.password)


def _parse_auth_entry(key: str, entry: object) -> Credential | None:
    if not isinstance(entry, dict):
        return None
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryAuthError(
                f"config.json auths entry {key!r} has an 'auth' that is not base64 of user:password",
                host=normalize_host(key),
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise RegistryAuthError(
                f"config.json auths entry {key!r}: 'auth' decodes to no user:password pair",
                host=normalize_host(key),
            )
    credential = Credential(
        username=username,
        password=password,
        identity_token=str(entry.get("identitytoken") or ""),
        registry_token=str(entry.get("registrytoken") or ""),
    )
    return credential if credential != Credential() else None


class CredentialStore:
    """Credentials per registry host, from static entries and docker credential helpers.

    Thread-safe. Helper answers are cached for ``helper_cache_seconds``.
    """

    def __init__(
        self,
        auths: Mapping[str, Credential] | None = None,
        *,
        cred_helpers: Mapping[str, str] | None = None,
        creds_store: str | None = None,
        helper_timeout: float = 10.0,
        helper_cache_seconds: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._auths = {normalize_host(k): v for k, v in (auths or {}).items()}
        self._helpers = {normalize_host(k): v for k, v in (cred_helpers or {}).items()}
        self._store = creds_store or None
        self._helper_timeout = helper_timeout
        self._cache_seconds = helper_cache_seconds
        self._env = dict(env) if env is not None else None
        self._cache: dict[str, tuple[float, Credential | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_docker_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> CredentialStore:
        """Load docker's config.json: ``path``, else ``$DOCKER_CONFIG/config.json``, else
        ``~/.docker/config.json``. A missing file gives an empty store.

        ``env`` (default: this process's environment) is where ``DOCKER_CONFIG`` is looked
        up and what helpers run with.
        """
        environ = os.environ if env is None else env
        if path is None:
            directory = environ.get("DOCKER_CONFIG")
            config_dir = Path(directory) if directory else Path.home() / ".docker"
            path = config_dir / "config.json"
        path = Path(path)
        try:
            config: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(env=env)
        except OSError as e:
            raise RegistryAuthError(
                f"cannot read docker config {path} ({(e.strerror or str(e)).lower()}), which "
                f"holds the registry credentials; {_UNREADABLE_FIX}"
            ) from None
        except ValueError as e:
            raise RegistryAuthError(
                f"docker config {path} is not valid JSON ({e}); fix it or move it away"
            ) from None
        if not isinstance(config, dict):
            raise RegistryAuthError(
                f"docker config {path} is not a JSON object; fix it or move it away"
            )
        auths: dict[str, Credential] = {}
        raw_auths = config.get("auths") or {}
        if isinstance(raw_auths, dict):
            for key, entry in raw_auths.items():
                credential = _parse_auth_entry(key, entry)
                if credential is not None:
                    auths[key] = credential
        helpers = config.get("credHelpers") or {}
        store = config.get("credsStore")
        return cls(
            auths,
            cred_helpers={k: v for k, v in helpers.items() if isinstance(v, str) and v}
            if isinstance(helpers, dict)
            else {},
            creds_store=store if isinstance(store, str) and store else None,
            env=env,
        )

    def get(self, host: str) -> Credential | None:
        """Credentials for ``host`` (``docker.io``, ``host:port``, or a URL), or None."""
        host = normalize_host(host)
        helper = self._helpers.get(host) or self._store
        if helper is not None:
            credential = self._from_helper(helper, host)
            if credential is not None:
                return credential
        return self._auths.get(host)

    def _from_helper(self, helper: str, host: str) -> Credential | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(host)
            if cached is not None and cached[0] > now:
                return cached[1]
        credential = self._run_helper(helper, host)
        with self._lock:
            self._cache[host] = (now + self._cache_seconds, credential)
        return credential

    def _run_helper(self, helper: str, host: str) -> Credential | None:
        program = f"docker-credential-{helper}"
        try:
            done = subprocess.run(
                [program, "get"],
                input=server_url(host).encode(),
                capture_output=True,
                timeout=self._helper_timeout,
                env=self._env,
                check=False,
            )
        except FileNotFoundError:
            raise CredentialHelperError(
                f"credential helper {program} is not installed",
                host=host,
                hint=f"install {program} or remove '{helper}' from credsStore/credHelpers "
                "in docker's config.json",
            ) from None
        except subprocess.TimeoutExpired:
            raise CredentialHelperError(
                f"credential helper {program} did not answer in {self._helper_timeout} s",
                host=host,
            ) from None
        output = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            if "credentials not found" in output.lower():
                return None
            detail = output or done.stderr.decode(errors="replace").strip()
            raise CredentialHelperError(
                f"credential helper {program} failed (exit {done.returncode}): {detail}", host=host
            )
        try:
            answer = json.loads(output)
            username, secret = str(answer["Username"]), str(answer["Secret"])
        except (ValueError, KeyError, TypeError):
            raise CredentialHelperError(
                f"credential helper {program} answered something other than "
                '{"Username": ..., "Secret": ...}',
                host=host,
            ) from None
        if username == _TOKEN_USERNAME:
            return Credential(identity_token=secret)
        return Credential(username=username, password=secret)
