"""Real registries and misbehaving HTTP servers for tests, all on 127.0.0.1.

- :func:`start_registry` runs Debian's ``docker-registry`` (distribution 2.8) with its
  storage in a temporary directory, optionally behind htpasswd (Basic) or token (Bearer)
  auth (the process management is :mod:`tools.local_registry`, shared with the demo and
  benchmarks); the ``registry`` fixture is one shared anonymous registry for a session.
- :class:`TokenServer` issues RS256 JWTs the registry trusts (key and certificate made
  with the ``openssl`` command).
- :class:`HTTPProxy` sits in front of a registry and misbehaves on purpose: random resets,
  500s and truncated bodies, Range stripped, HEAD refused, blob GETs redirected.
- :class:`BlobStore` is the "object store" such redirects point at; its URLs expire.
- :func:`push_image` pushes layers, a config and a manifest with our own client.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from blockfs.oci import Descriptor, ImageConfig, Manifest, Reference, sha256_digest
from blockfs.oci import media_types as mt
from blockfs.registry import RegistryClient, RetryPolicy
from tests.helpers.tls import CertKey
from tools.local_registry import (
    REGISTRY_BINARY,
    TokenAuth,
    registry_available,
)
from tools.local_registry import LocalRegistry as Registry
from tools.local_registry import (
    free_port as free_port,  # re-exported for tests
)
from tools.local_registry import start_registry as _start_registry

# Short waits keep retry tests fast; the bounds on attempts and time still apply.
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, total_timeout=20)


def unique_repository(prefix: str = "test") -> str:
    """A repository name no other test uses."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


# -- docker-registry ---------------------------------------------------------------------


@contextlib.contextmanager
def start_registry(
    workdir: Path,
    *,
    htpasswd: Path | None = None,
    token: TokenAuth | None = None,
    access_log: bool = False,
) -> Iterator[Registry]:
    """Run docker-registry on a free loopback port until the block exits (the test is
    skipped where docker-registry is not installed)."""
    if not registry_available():
        pytest.skip(f"{REGISTRY_BINARY} is not installed (Debian package docker-registry)")
    with _start_registry(workdir, htpasswd=htpasswd, token=token, access_log=access_log) as r:
        yield r


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous plain-HTTP registry shared by the session (use unique repositories)."""
    with start_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def make_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file with bcrypt entries (made by ``htpasswd -B``)."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd is not installed (Debian package apache2-utils)")
    lines = []
    for user, password in users.items():
        done = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, check=True)
        lines.append(done.stdout.decode().strip())
    path.write_text("\n".join(lines) + "\n")
    return path


# -- pushing test images -------------------------------------------------------------------


def push_image(
    client: RegistryClient,
    ref: Reference,
    layers: Sequence[bytes],
    *,
    layer_media_type: str = mt.OCI_LAYER_GZIP,
    layer_annotations: Sequence[Mapping[str, str]] | None = None,
) -> tuple[Descriptor, Manifest]:
    """Push ``layers``, a minimal config and a manifest to ``ref``'s tag (or digest)."""
    layer_descriptors = []
    for i, data in enumerate(layers):
        digest = sha256_digest(data)
        client.push_blob(ref, digest, len(data), data)
        annotations = layer_annotations[i] if layer_annotations else {}
        layer_descriptors.append(Descriptor(layer_media_type, digest, len(data), annotations))
    config = ImageConfig.from_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layer_descriptors]},
            "config": {},
        }
    )
    config_bytes = config.to_bytes()
    client.push_blob(ref, config.digest, len(config_bytes), config_bytes)
    manifest = Manifest(config=config.descriptor(), layers=tuple(layer_descriptors))
    descriptor = client.push_manifest(ref, ref.tag_or_digest, mt.OCI_MANIFEST, manifest.to_bytes())
    return descriptor, manifest


# -- a token server ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Signer:
    """An RSA key and self-signed certificate made with openssl; signs RS256."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("the openssl command is not installed")
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-days", "2", "-subj", "/CN=blockfs-test-token-issuer",
                "-keyout", str(self.key), "-out", str(self.cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self.x5c = base64.b64encode(der).decode()

    def sign(self, data: bytes) -> bytes:
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=data,
            check=True,
            capture_output=True,
        ).stdout


class TokenServer:
    """A Docker token server: ``GET /token?service=...&scope=...`` with optional Basic auth.

    ``users`` may do anything; so may the holders of ``refresh_tokens`` (token -> user),
    sent with the OAuth2 refresh-token grant (``POST /token``). Anonymous clients get pull
    on ``public`` repositories only. ``lifetime`` (seconds, may be negative) sets each token's ``exp``; the client is
    always told ``expires_in`` = ``advertised_lifetime``. ``issued`` counts tokens.
    """

    SERVICE = "blockfs-test-registry"
    ISSUER = "blockfs-test-issuer"

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        refresh_tokens: Mapping[str, str] | None = None,
        public: Sequence[str] = (),
        advertised_lifetime: int = 300,
        tls: CertKey | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self._signer = _Signer(workdir)
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.public = set(public)
        self.advertised_lifetime = advertised_lifetime
        self.lifetime: Callable[[int], float] = lambda n: 300.0
        self.issued = 0
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = _serve(self._handle, tls)

    @property
    def url(self) -> str:
        """Base URL of the server (HTTPS with ``tls``, the certificate and key to serve)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def auth(self) -> TokenAuth:
        """Registry settings that trust this server."""
        return TokenAuth(f"{self.url}/token", self.SERVICE, self.ISSUER, self._signer.cert)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: _Request) -> _Reply:
        parsed = urllib.parse.urlsplit(request.path)
        if parsed.path != "/token":
            return _Reply(404)
        query = urllib.parse.parse_qs(parsed.query)
        if request.method == "POST":
            form = urllib.parse.parse_qs(request.body.decode())
            refresh = form.get("refresh_token", [""])[0]
            if form.get("grant_type") != ["refresh_token"] or refresh not in self.refresh_tokens:
                return _Reply(401, b'{"details":"bad refresh token"}')
            user: str | bool | None = self.refresh_tokens[refresh]
            query = {
                "service": form.get("service", [""]),
                "scope": form.get("scope", [""])[0].split(),
            }
        else:
            user = self._user(request.headers.get("Authorization", ""))
        if user is False:
            return _Reply(401, b'{"details":"bad credentials"}')
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            allowed = actions.split(",") if user else (["pull"] if name in self.public else [])
            granted = [a for a in actions.split(",") if a in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        with self._lock:
            self.issued += 1
            number = self.issued
            self.requests.append({"user": user, "scopes": query.get("scope", [])})
        now = int(time.time())
        claims = {
            "iss": self.ISSUER,
            "sub": user or "",
            "aud": query.get("service", [""])[0],
            "exp": now + int(self.lifetime(number)),
            "nbf": now - 120,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._signer.x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self._signer.sign(signing_input.encode())
        token = f"{signing_input}.{_b64url(signature)}"
        body = {"token": token, "expires_in": self.advertised_lifetime}
        return _Reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _user(self, authorization: str) -> str | bool | None:
        """The authenticated user, None when anonymous, False when the password is wrong."""
        if not authorization.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        return user if self.users.get(user) == password else False


# -- small HTTP servers ----------------------------------------------------------------------


@attrs.define
class _Request:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@attrs.define
class _Reply:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = attrs.field(factory=dict)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    app: Callable[[_Request], _Reply | None]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = _Request(self.command, self.path, dict(self.headers.items()), body)
        reply = type(self).app(request)
        if reply is None:
            return  # the app wrote (or refused to write) the answer itself
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in reply.headers:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


def _serve(app: Callable[[_Request], _Reply | None], tls: CertKey | None = None) -> _Server:
    handler = type("Handler", (_Handler,), {"app": staticmethod(app)})
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        # The handshake happens in accept(); one that fails is dropped like a bad request.
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


class HTTPProxy:
    """A reverse proxy in front of ``upstream`` that misbehaves as configured.

    - ``fault_rate``/``seed``/``faults``: each request, with that probability, gets one of
      ``reset`` (connection reset, no answer), ``500``, ``429`` (with ``Retry-After: 0``),
      ``truncate`` (headers promise the whole body, half is sent, then the connection
      closes) or ``short`` (a consistent answer whose body and Content-Length are cut short);
    - ``strip_range``: the Range header is dropped, so blobs come back whole with 200;
    - ``reject_head``: HEAD is answered 405;
    - ``redirect_blobs``: blob GETs are answered 307 to ``redirect_blobs(digest)``.
    ``requests`` records (method, path, headers) of everything received.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.0,
        seed: int = 0,
        faults: Sequence[str] = ("reset", "500", "truncate", "short"),
        strip_range: bool = False,
        reject_head: bool = False,
        redirect_blobs: Callable[[str], str] | None = None,
    ) -> None:
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.fault_rate = fault_rate
        self.faults = list(faults)
        self.strip_range = strip_range
        self.reject_head = reject_head
        self.redirect_blobs = redirect_blobs
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.injected: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _serve_raw(self)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def handle(self, handler: _Handler) -> None:
        headers = {k: v for k, v in handler.headers.items()}
        length = int(headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((handler.command, handler.path, headers))
            fault = self._rng.choice(self.faults) if self._rng.random() < self.fault_rate else None
            if fault is not None:
                self.injected[fault] = self.injected.get(fault, 0) + 1
        if fault == "reset":
            _reset(handler)
            return
        if fault == "500":
            _reply(handler, 500, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}', {})
            return
        if fault == "429":
            _reply(handler, 429, b"", {"Retry-After": "0"})
            return
        if handler.command == "HEAD" and self.reject_head:
            _reply(handler, 405, b"", {})
            return
        path = urllib.parse.urlsplit(handler.path).path
        if (
            self.redirect_blobs is not None
            and handler.command == "GET"
            and "/blobs/sha256:" in path
        ):
            location = self.redirect_blobs(path.rsplit("/", 1)[1])
            _reply(handler, 307, b"", {"Location": location})
            return
        forward = {
            k: v for k, v in headers.items() if k.lower() not in ("connection", "keep-alive")
        }
        if self.strip_range:
            forward = {k: v for k, v in forward.items() if k.lower() != "range"}
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            upstream.request(handler.command, handler.path, body=body or None, headers=forward)
            answer = upstream.getresponse()
            data = answer.read() if handler.command != "HEAD" else b""
            answer_headers = [
                (k, v)
                for k, v in answer.getheaders()
                if k.lower()
                not in ("connection", "keep-alive", "transfer-encoding", "content-length")
            ]
            status = answer.status
            declared = answer.getheader("Content-Length")
        finally:
            upstream.close()
        if fault == "truncate" and len(data) > 1:
            _send_head(handler, status, answer_headers, str(len(data)))
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            _reset(handler)
            return
        if fault == "short" and len(data) > 1:
            data = data[: len(data) // 2]
        length_header = declared if handler.command == "HEAD" and declared else str(len(data))
        _send_head(handler, status, answer_headers, length_header)
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _send_head(
    handler: _Handler, status: int, headers: Sequence[tuple[str, str]], content_length: str
) -> None:
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", content_length)
    handler.end_headers()


def _reply(handler: _Handler, status: int, body: bytes, headers: Mapping[str, str]) -> None:
    _send_head(handler, status, list(headers.items()), str(len(body)))
    if handler.command != "HEAD":
        handler.wfile.write(body)


def _reset(handler: _Handler) -> None:
    """Close the connection with a TCP reset."""
    handler.wfile.flush()
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.close()


class _RawHandler(_Handler):
    proxy: HTTPProxy

    def _dispatch(self) -> None:
        type(self).proxy.handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()


def _serve_raw(proxy: HTTPProxy) -> _Server:
    handler = type("ProxyHandler", (_RawHandler,), {"proxy": proxy})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


class BlobStore:
    """An "object store" serving blobs at expiring signed URLs, with single-range support.

    :meth:`url_for` hands out a new signature each time; a signature serves
    ``uses_per_url`` requests, then answers 403 like an expired presigned URL.
    ``requests`` records (path, headers) of every request.
    """

    def __init__(self, blobs: Mapping[str, bytes], *, uses_per_url: int = 3) -> None:
        self.blobs = dict(blobs)
        self.uses_per_url = uses_per_url
        self.signatures_issued = 0
        self.expired_answers = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._uses: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = _serve(self._handle)

    @property
    def url(self) -> str:
        """Base URL of the store."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url_for(self, digest: str) -> str:
        """A fresh signed URL for ``digest``."""
        with self._lock:
            self.signatures_issued += 1
            signature = f"sig{self.signatures_issued}"
            self._uses[signature] = 0
        return f"{self.url}/store/{digest}?signature={signature}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: _Request) -> _Reply:
        parsed = urllib.parse.urlsplit(request.path)
        signature = urllib.parse.parse_qs(parsed.query).get("signature", [""])[0]
        digest = parsed.path.rsplit("/", 1)[1]
        with self._lock:
            self.requests.append((request.path, dict(request.headers)))
            uses = self._uses.get(signature)
            if uses is None or uses >= self.uses_per_url:
                self.expired_answers += 1
                return _Reply(403, b"<Error><Code>AccessDenied</Code>Request has expired</Error>")
            self._uses[signature] = uses + 1
        data = self.blobs.get(digest)
        if data is None:
            return _Reply(404)
        spec = request.headers.get("Range") or request.headers.get("range")
        if not spec:
            return _Reply(200, data)
        first, _, last = spec.removeprefix("bytes=").partition("-")
        start = int(first)
        end = min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data):
            return _Reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        return _Reply(206, data[start : end + 1], headers)
