"""The OCI distribution client: manifests, blobs, byte ranges and pushes.

Each operation says what it asks for and how to check the answer; :mod:`._transport`
carries it out (endpoints, retries, auth, redirects). A body that is short, content that
does not match its digest, or a range that is not the one asked for is never returned.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar
from urllib.parse import quote, urljoin

import attrs
import httpx

from blockfs.oci import (
    DOCKER_HUB,
    Descriptor,
    Index,
    InvalidDocument,
    Manifest,
    Platform,
    Reference,
    digest_matches,
    new_hasher,
    parse_document,
    select_platform,
    sha256_digest,
    validate_digest,
)
from blockfs.oci import media_types as mt
from blockfs.registry._auth import merge_scopes, repository_scope
from blockfs.registry._credentials import CredentialStore
from blockfs.registry._errors import (
    BlobNotFound,
    DigestMismatch,
    RangeNotSatisfiable,
    RegistryError,
    RegistryProtocolError,
    RegistryUnavailable,
)
from blockfs.registry._hosts import Endpoint, HostsConfig
from blockfs.registry._retry import RetryPolicy, Transient
from blockfs.registry._target import Target
from blockfs.registry._transport import HeadRejected, Transport

T = TypeVar("T")

log = logging.getLogger("blockfs.registry")

RepositoryLike = Reference | tuple[str, str]
PushResult = Literal["exists", "mounted", "uploaded"]

USER_AGENT = "blockfs/0.1"
MAX_MANIFEST_BYTES = 4 << 20
DEFAULT_CHUNK_SIZE = 16 << 20


def repository_of(value: RepositoryLike) -> tuple[str, str]:
    """(registry, repository) of a reference or a pair (validated, docker.io normalised)."""
    if isinstance(value, Reference):
        return value.registry, value.repository
    ref = Reference(value[0], value[1])
    if ref.registry == DOCKER_HUB and "/" not in ref.repository:
        return ref.registry, f"library/{ref.repository}"  # as docker names official images
    return ref.registry, ref.repository


@attrs.frozen(slots=True)
class _ContentRange:
    start: int
    end: int  # inclusive
    total: int | None


# How much of a whole-blob answer to a suffix range request is read to find its end; a
# blob larger than this is read with its size asked first (RegistryBlobSource.read_tail).
MAX_WHOLE_TAIL = 64 << 20


def _parse_content_range(value: str | None) -> _ContentRange | None:
    """``bytes START-END/TOTAL`` (TOTAL may be ``*``), or None if malformed."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    start, _, end = span.partition("-")
    try:
        parsed = _ContentRange(int(start), int(end), None if total == "*" else int(total))
    except ValueError:
        return None
    if unit.lower() != "bytes" or not 0 <= parsed.start <= parsed.end:
        return None
    return parsed


def _read_limited(response: httpx.Response, limit: int, target: Target, host: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise target.error(RegistryProtocolError, f"the answer exceeds {limit} bytes", host)
        parts.append(chunk)
    return b"".join(parts)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


class RegistryClient:
    """A thread-safe OCI distribution client for one or more registries.

    ``hosts`` gives mirrors and TLS settings per registry namespace (containerd's
    hosts.toml); ``credentials`` user names, passwords and tokens; ``plain_http`` makes
    registries without a hosts.toml speak HTTP. ``timeout`` bounds each network wait,
    ``retry`` the retries of passing failures. Blobs larger than ``chunk_size`` are
    pushed in chunks. Close the client (or use it as a context manager) when done.
    """

    def __init__(
        self,
        hosts: HostsConfig | None = None,
        credentials: CredentialStore | None = None,
        *,
        plain_http: bool = False,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        trust_env: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._transport = Transport(
            hosts if hosts is not None else HostsConfig(),
            credentials if credentials is not None else CredentialStore(),
            plain_http=plain_http,
            timeout=timeout,
            retry=retry if retry is not None else RetryPolicy(),
            trust_env=trust_env,
            user_agent=user_agent,
        )
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._warned_full_body: set[str] = set()

    def close(self) -> None:
        """Close every pooled connection."""
        self._transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifests -------------------------------------------------------------------

    def resolve(self, ref: Reference) -> tuple[Descriptor, bytes]:
        """The manifest or index that ``ref`` names, with its exact bytes.

        A digest reference is verified against the bytes. For a tag, the digest is the
        sha256 of the bytes, which must agree with ``Docker-Content-Digest`` if present.
        """
        target = Target(
            ref.registry,
            ref.repository,
            "pull" if ref.digest else "resolve",
            "manifest",
            ref.digest,
            (repository_scope(ref.repository, ["pull"]),),
        )
        path = f"/{ref.repository}/manifests/{quote(ref.tag_or_digest, safe=':')}"
        headers = {"Accept": ", ".join(mt.MANIFEST_ACCEPT)}

        def check(response: httpx.Response, ep: Endpoint) -> tuple[Descriptor, bytes]:
            data = _read_limited(response, MAX_MANIFEST_BYTES, target, ep.host)
            actual = sha256_digest(data)
            if ref.digest is not None and not digest_matches(ref.digest, data):
                raise Transient(
                    target.error(DigestMismatch, f"the manifest served hashes to {actual}", ep.host)
                )
            claimed = response.headers.get("docker-content-digest", "")
            if ref.digest is None and claimed.startswith("sha256:") and claimed != actual:
                raise Transient(
                    target.error(
                        DigestMismatch,
                        f"the manifest of {ref} hashes to {actual}, the registry says {claimed}",
                        ep.host,
                    )
                )
            content_type = mt.base_media_type(response.headers.get("content-type", ""))
            known = mt.is_manifest(content_type) or mt.is_index(content_type)
            hint = content_type if known else None
            try:
                document = parse_document(data, hint)
            except InvalidDocument as e:
                raise target.error(
                    RegistryProtocolError, f"invalid manifest for {ref}: {e}", ep.host
                ) from None
            media_type = document.media_type or hint or _default_media_type(document)
            return Descriptor(media_type, ref.digest or actual, len(data)), data

        return self._transport.call(
            target,
            lambda ep: self._transport.exchange(
                ep, target, "GET", check, path=path, headers=headers
            ),
        )

    def get_manifest(self, ref: Reference) -> Manifest | Index:
        """The parsed manifest or index that ``ref`` names (its exact bytes are kept)."""
        descriptor, data = self.resolve(ref)
        return parse_document(data, descriptor.media_type)

    def get_image_manifest(
        self, ref: Reference, platform: Platform | None = None
    ) -> tuple[Descriptor, Manifest]:
        """The image manifest for ``platform`` (default: this host), following an index."""
        descriptor, data = self.resolve(ref)
        document = parse_document(data, descriptor.media_type)
        if isinstance(document, Index):
            if platform is None:
                chosen = select_platform(document)
            else:
                chosen = select_platform(
                    document, platform.os, platform.architecture, platform.variant or None
                )
            descriptor, data = self.resolve(ref.with_digest(chosen.digest))
            document = parse_document(data, descriptor.media_type)
        if not isinstance(document, Manifest):
            raise RegistryProtocolError(
                f"{ref} is an index whose chosen entry is another index",
                host=ref.registry,
                repository=ref.repository,
            )
        return descriptor, document

    def push_manifest(
        self, repository: RepositoryLike, tag_or_digest: str, media_type: str, data: bytes
    ) -> Descriptor:
        """Store a manifest or index under a tag or its digest; returns its descriptor."""
        registry, repo = repository_of(repository)
        digest = sha256_digest(data)
        if ":" in tag_or_digest:
            validate_digest(tag_or_digest)
            if not digest_matches(tag_or_digest, data):
                raise DigestMismatch(
                    f"refusing to push a manifest under {tag_or_digest}: it hashes to {digest}",
                    host=registry,
                    repository=repo,
                    digest=tag_or_digest,
                )
        scopes = (repository_scope(repo, ["pull", "push"]),)
        target = Target(registry, repo, "push", "manifest", digest, scopes)
        path = f"/{repo}/manifests/{quote(tag_or_digest, safe=':')}"
        headers = {"Content-Type": media_type}
        self._transport.call(
            target,
            lambda ep: self._transport.exchange(
                ep, target, "PUT", _ignore, path=path, headers=headers, content=data
            ),
        )
        return Descriptor(media_type, digest, len(data))

    # -- blobs -----------------------------------------------------------------------

    def get_blob(self, repository: RepositoryLike, digest: str) -> bytes:
        """The whole blob ``digest``, verified against it."""
        target = self._blob_target(repository, digest)

        def check(response: httpx.Response, ep: Endpoint) -> bytes:
            data = response.read()
            if not digest_matches(digest, data):
                raise Transient(
                    target.error(
                        DigestMismatch, f"the blob served hashes to {sha256_digest(data)}", ep.host
                    )
                )
            return data

        path = f"/{target.repository}/blobs/{digest}"
        return self._transport.call(
            target, lambda ep: self._transport.exchange(ep, target, "GET", check, path=path)
        )

    def stream_blob(
        self,
        repository: RepositoryLike,
        digest: str,
        dest: str | os.PathLike[str],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Download blob ``digest`` into the file ``dest`` and return its size.

        ``dest`` appears only once the blob is complete and verified. A broken download
        resumes with a Range request where the server allows it. ``progress`` is called
        with the number of bytes written so far (which drops if a download starts over).
        """
        target = self._blob_target(repository, digest)
        dest_path = Path(dest)
        path = f"/{target.repository}/blobs/{digest}"
        fd, tmp_name = tempfile.mkstemp(dir=dest_path.parent, prefix=f".{dest_path.name}.")
        try:
            with os.fdopen(fd, "w+b") as out:
                download = _Download(out, digest, target, progress)
                size = self._transport.call(
                    target,
                    lambda ep: self._transport.exchange(
                        ep, target, "GET", download.save, path=path, headers=download.headers()
                    ),
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, dest_path)
        except BaseException:
            os.unlink(tmp_name)
            raise
        return size

    def blob_size(self, repository: RepositoryLike, digest: str) -> int:
        """The size of blob ``digest``: HEAD, or a one-byte ranged GET where HEAD is refused."""
        target = self._blob_target(repository, digest)
        path = f"/{target.repository}/blobs/{digest}"

        def from_head(response: httpx.Response, ep: Endpoint) -> int:
            length = _content_length(response)
            if length is None:
                raise HeadRejected()
            return length

        def from_get(response: httpx.Response, ep: Endpoint) -> int:
            if response.status_code == 206:
                got = _parse_content_range(response.headers.get("content-range"))
                if got is None or got.total is None:
                    raise Transient(
                        target.error(
                            RegistryProtocolError, "a 206 without a usable Content-Range", ep.host
                        )
                    )
                return got.total
            length = _content_length(response)
            if length is None:
                raise target.error(
                    RegistryProtocolError,
                    "the registry gives neither Content-Length nor Content-Range for the blob",
                    ep.host,
                )
            return length

        def attempt(ep: Endpoint) -> int:
            try:
                return self._transport.exchange(ep, target, "HEAD", from_head, path=path)
            except HeadRejected:
                log.info("%s refused HEAD for %s; asking with a ranged GET", ep.host, digest)
            return self._transport.exchange(
                ep, target, "GET", from_get, path=path, headers={"Range": "bytes=0-0"}
            )

        return self._transport.call(target, attempt)

    def read_range(
        self,
        repository: RepositoryLike,
        digest: str,
        offset: int,
        length: int,
        *,
        on_bytes: Callable[[int, bytes], None] | None = None,
    ) -> bytes:
        """Exactly ``length`` bytes of blob ``digest`` at ``offset``, or an error.

        Sends one ``Range`` header. A 206 must carry the Content-Range asked for; a 200
        (a server that ignores Range) is sliced, with a warning once per host.
        ``on_bytes(position, piece)`` sees the body as it arrives, ``position`` counted
        from ``offset``; a request tried again starts again from position 0.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range: offset {offset}, length {length}")
        if length == 0:
            return b""
        last = offset + length - 1
        beyond = f"range [{offset}, {offset + length}) ends past the end of the blob"

        def partial(
            response: httpx.Response, got: _ContentRange | None, target: Target, host: str
        ) -> bytes:
            if got is None:
                raise Transient(
                    target.error(RegistryProtocolError, "206 without a Content-Range", host)
                )
            if (got.start, got.end) != (offset, last):
                if got.start == offset and got.total is not None and got.end == got.total - 1:
                    raise target.error(RangeNotSatisfiable, f"{beyond} ({got.total} bytes)", host)
                raise Transient(
                    target.error(
                        RegistryProtocolError,
                        f"asked for bytes {offset}-{last}, got {got.start}-{got.end}",
                        host,
                    )
                )
            return _exact_body(response, length, target, host, on_bytes)

        def whole(response: httpx.Response, target: Target, host: str) -> bytes:
            total = _content_length(response)
            if total is not None and total < offset + length:
                raise target.error(RangeNotSatisfiable, f"{beyond} ({total} bytes)", host)
            data = _slice_body(response, offset, length, target, host)
            if on_bytes is not None:
                on_bytes(0, data)
            return data

        return self._ranged_get(
            repository, digest, f"bytes={offset}-{last}", "a range request", partial, whole
        )

    def read_tail(self, repository: RepositoryLike, digest: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of blob ``digest`` (all of it if shorter) and the
        blob's size, in one request: a suffix ``Range`` (``bytes=-LENGTH``), which needs
        no size, so no ``HEAD`` first.

        A 206 must say where its bytes sit and the whole size (Content-Range); a 200 (a
        server that ignores Range) is read to its end, with a warning once per host. A
        registry whose answer gives no size raises :class:`RegistryProtocolError`.
        """
        if length <= 0:
            raise ValueError(f"invalid tail length {length}")

        def partial(
            response: httpx.Response, got: _ContentRange | None, target: Target, host: str
        ) -> tuple[bytes, int]:
            if got is None or got.total is None:
                raise target.error(
                    RegistryProtocolError,
                    "a 206 to a suffix range without the blob's size in Content-Range",
                    host,
                )
            if got.end != got.total - 1 or got.end - got.start + 1 != min(length, got.total):
                raise Transient(
                    target.error(
                        RegistryProtocolError,
                        f"asked for the last {length} bytes, got {got.start}-{got.end} "
                        f"of {got.total}",
                        host,
                    )
                )
            return _exact_body(response, got.end - got.start + 1, target, host), got.total

        def whole(response: httpx.Response, target: Target, host: str) -> tuple[bytes, int]:
            data = _read_limited(response, MAX_WHOLE_TAIL, target, host)
            return data[-length:], len(data)

        return self._ranged_get(
            repository, digest, f"bytes=-{length}", "a suffix range request", partial, whole
        )

    def _ranged_get(
        self,
        repository: RepositoryLike,
        digest: str,
        range_value: str,
        what: str,
        partial: Callable[[httpx.Response, _ContentRange | None, Target, str], T],
        whole: Callable[[httpx.Response, Target, str], T],
    ) -> T:
        """GET blob ``digest`` with ``Range: range_value``: a 206 goes to ``partial`` with
        its parsed Content-Range, a 200 (a server that ignores Range; warned about once
        per host) to ``whole``; any other status is an error about ``what``."""
        target = self._blob_target(repository, digest)

        def take(response: httpx.Response, ep: Endpoint) -> T:
            if response.status_code == 206:
                got = _parse_content_range(response.headers.get("content-range"))
                return partial(response, got, target, ep.host)
            if response.status_code == 200:
                self._warn_full_body(ep.host)
                return whole(response, target, ep.host)
            raise target.error(
                RegistryProtocolError,
                f"HTTP {response.status_code} to {what}",
                ep.host,
                status=response.status_code,
            )

        path = f"/{target.repository}/blobs/{digest}"
        return self._transport.call(
            target,
            lambda ep: self._transport.exchange(
                ep, target, "GET", take, path=path, headers={"Range": range_value}
            ),
        )

    def push_blob(
        self,
        repository: RepositoryLike,
        digest: str,
        size: int | None,
        data: bytes | BinaryIO | str | os.PathLike[str],
        *,
        mount_from: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PushResult:
        """Upload a blob unless the registry already has it; says what happened.

        ``data`` is the bytes, a seekable binary file positioned at the blob's start, or a
        path; ``size`` (None: all of ``data``) must match it. With ``mount_from`` (another repository of the same registry), a
        cross-repository mount is tried first, falling back to an upload. ``progress`` is
        called with the number of bytes sent so far, after each piece.
        """
        registry, repo = repository_of(repository)
        validate_digest(digest)
        scopes = [repository_scope(repo, ["pull", "push"])]
        if mount_from is not None and mount_from != repo:
            scopes.append(repository_scope(mount_from, ["pull"]))
        else:
            mount_from = None
        target = Target(registry, repo, "push", "upload", digest, merge_scopes(scopes))
        with _BlobBody(data, size) as body:
            return self._transport.call(
                target, lambda ep: self._push(ep, target, body, mount_from, progress)
            )

    def mount_blob(
        self, repository: RepositoryLike, digest: str, mount_from: str
    ) -> PushResult | None:
        """Make blob ``digest`` present in ``repository`` without sending it.

        Says ``"exists"`` if the repository has it, ``"mounted"`` if the registry mounted
        it from ``mount_from`` (another repository of the same registry), and None when
        neither worked: then the blob must be uploaded with :meth:`push_blob`. With
        ``mount_from`` the repository itself, this only asks whether the blob is there.
        """
        registry, repo = repository_of(repository)
        validate_digest(digest)
        scopes = [repository_scope(repo, ["pull", "push"])]
        source: str | None = None
        if mount_from != repo:
            source = mount_from
            scopes.append(repository_scope(mount_from, ["pull"]))
        target = Target(registry, repo, "push", "upload", digest, merge_scopes(scopes))

        def attempt(ep: Endpoint) -> PushResult | None:
            if source is None:
                return "exists" if self._has_blob(ep, target) else None
            done, upload_url = self._start_push(ep, target, source)
            if done is None:
                self._cancel_upload(ep, target, upload_url)
            return done

        return self._transport.call(target, attempt)

    def _has_blob(self, ep: Endpoint, target: Target) -> bool:
        try:
            self._transport.exchange(
                ep,
                target,
                "HEAD",
                _ignore,
                path=f"/{target.repository}/blobs/{target.digest}",
                kind="blob",
            )
        except (BlobNotFound, HeadRejected):
            return False
        return True

    def _start_push(
        self, ep: Endpoint, target: Target, mount_from: str | None
    ) -> tuple[PushResult | None, str]:
        """HEAD the blob, then open an upload (a mount, with ``mount_from``).

        Returns ``("exists", "")`` or ``("mounted", "")`` when nothing is left to send,
        else ``(None, upload URL)``.
        """
        transport = self._transport
        digest = target.digest
        assert digest is not None
        if self._has_blob(ep, target):
            return "exists", ""
        uploads = f"/{target.repository}/blobs/uploads/"
        params = {"mount": digest, "from": mount_from} if mount_from is not None else None
        url = transport.exchange(
            ep, target, "POST", _upload_location(target), path=uploads, params=params
        )
        if not url:
            return "mounted", ""
        return None, url

    def _cancel_upload(self, ep: Endpoint, target: Target, url: str) -> None:
        """Cancel an upload session that will not be used (the registry would expire it)."""
        try:
            self._transport.exchange(ep, target, "DELETE", _ignore, url=url)
        except RegistryError as e:
            log.info("could not cancel an unused upload on %s: %s", ep.host, e)

    def _push(
        self,
        ep: Endpoint,
        target: Target,
        body: _BlobBody,
        mount_from: str | None,
        progress: Callable[[int], None] | None = None,
    ) -> PushResult:
        transport = self._transport
        digest = target.digest
        assert digest is not None
        done, url = self._start_push(ep, target, mount_from)
        if done is not None:
            return done

        body.rewind()
        final_body = b""
        if body.size > self._chunk_size:
            offset = 0
            while offset < body.size:
                piece = body.read(min(self._chunk_size, body.size - offset))
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                }
                url = transport.exchange(
                    ep,
                    target,
                    "PATCH",
                    _upload_location(target),
                    url=url,
                    headers=headers,
                    content=piece,
                )
                offset += len(piece)
                if progress is not None:
                    progress(offset)
        else:
            final_body = body.read(body.size)
        put_url = str(httpx.URL(url).copy_merge_params({"digest": digest}))
        headers = {"Content-Type": "application/octet-stream"}
        transport.exchange(
            ep, target, "PUT", _ignore, url=put_url, headers=headers, content=final_body
        )
        if progress is not None:
            progress(body.size)
        return "uploaded"

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _blob_target(repository: RepositoryLike, digest: str) -> Target:
        registry, repo = repository_of(repository)
        validate_digest(digest)
        return Target(registry, repo, "pull", "blob", digest, (repository_scope(repo, ["pull"]),))

    def _warn_full_body(self, host: str) -> None:
        with self._lock:
            if host in self._warned_full_body:
                return
            self._warned_full_body.add(host)
        log.warning(
            "%s ignores Range requests and sends whole blobs: reads will be slow and costly", host
        )


def _ignore(response: httpx.Response, ep: Endpoint) -> None:
    return None


def _upload_location(target: Target) -> Callable[[httpx.Response, Endpoint], str]:
    """Reads where an upload continues from an answer; "" for a 201 (a finished mount)."""

    def location(response: httpx.Response, ep: Endpoint) -> str:
        if response.status_code == 201:
            return ""  # mounted
        value: str | None = response.headers.get("location")
        if not value:
            raise target.error(RegistryProtocolError, "an upload without a Location", ep.host)
        return urljoin(str(response.url), value)

    return location


def _default_media_type(document: Manifest | Index) -> str:
    return mt.OCI_INDEX if isinstance(document, Index) else mt.OCI_MANIFEST


def _exact_body(
    response: httpx.Response,
    length: int,
    target: Target,
    host: str,
    on_bytes: Callable[[int, bytes], None] | None = None,
) -> bytes:
    """The whole body of a 206, which must be exactly ``length`` bytes; ``on_bytes`` sees
    each piece within that length as it arrives."""
    declared = _content_length(response)
    if declared is not None and declared != length:
        raise Transient(
            target.error(
                RegistryProtocolError,
                f"a 206 of {declared} bytes for a range of {length}",
                host,
            )
        )
    parts: list[bytes] = []
    got = 0
    for chunk in response.iter_bytes():
        if got + len(chunk) > length:
            got += len(chunk)
            break
        if on_bytes is not None:
            on_bytes(got, chunk)
        got += len(chunk)
        parts.append(chunk)
    if got != length:
        raise Transient(
            target.error(
                RegistryUnavailable,
                f"the body of a range of {length} bytes had {got if got < length else 'more'}",
                host,
            )
        )
    return b"".join(parts)


def _slice_body(
    response: httpx.Response, offset: int, length: int, target: Target, host: str
) -> bytes:
    """``length`` bytes at ``offset`` of a whole-blob body; stops reading once it has them."""
    parts: list[bytes] = []
    got = 0
    seen = 0
    for chunk in response.iter_bytes():
        start = max(0, offset - seen)
        seen += len(chunk)
        if start >= len(chunk):
            continue
        piece = chunk[start : start + length - got]
        parts.append(piece)
        got += len(piece)
        if got == length:
            return b"".join(parts)
    raise Transient(
        target.error(
            RegistryUnavailable,
            f"the whole-blob body ended after {seen} bytes, before offset {offset + length}",
            host,
        )
    )


class _Download:
    """A blob being written to a file; resumes at what is written, restarts if it must."""

    def __init__(
        self,
        out: BinaryIO,
        digest: str,
        target: Target,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._out = out
        self._digest = digest
        self._target = target
        self._progress = progress
        self._hasher = new_hasher(digest)
        self._written = 0

    def headers(self) -> dict[str, str]:
        return {"Range": f"bytes={self._written}-"} if self._written else {}

    def _restart(self) -> None:
        self._out.seek(0)
        self._out.truncate()
        self._hasher = new_hasher(self._digest)
        self._written = 0

    def save(self, response: httpx.Response, ep: Endpoint) -> int:
        if self._written:
            got = _parse_content_range(response.headers.get("content-range"))
            if response.status_code != 206 or got is None or got.start != self._written:
                self._restart()  # the server did not resume where we are: start over
        for chunk in response.iter_bytes():
            self._out.write(chunk)
            self._hasher.update(chunk)
            self._written += len(chunk)
            if self._progress is not None:
                self._progress(self._written)
        actual = f"{self._hasher.name}:{self._hasher.hexdigest()}"
        if actual != self._digest:
            self._restart()
            raise Transient(
                self._target.error(
                    DigestMismatch, f"the blob downloaded hashes to {actual}", ep.host
                )
            )
        return self._written


class _BlobBody:
    """A blob to upload, readable again from its start for each attempt."""

    def __init__(self, data: bytes | BinaryIO | str | os.PathLike[str], size: int | None) -> None:
        self._owned: BinaryIO | None = None
        self._bytes: bytes | None = None
        self._file: BinaryIO | None = None
        self._start = 0
        if isinstance(data, bytes | bytearray | memoryview):
            self._bytes = bytes(data)
            actual = len(self._bytes)
        else:
            if isinstance(data, str | os.PathLike):
                self._owned = open(data, "rb")  # noqa: SIM115 - closed by __exit__
                self._file = self._owned
            else:
                self._file = data
            self._start = self._file.tell()
            actual = os.fstat(self._file.fileno()).st_size - self._start
            if size is not None and size <= actual:
                actual = size  # a file may hold more than the blob
        if size is not None and size != actual:
            raise ValueError(f"blob size {size} given, but the data has {actual} bytes")
        self.size = actual
        self._position = 0

    def __enter__(self) -> _BlobBody:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()

    def rewind(self) -> None:
        self._position = 0
        if self._file is not None:
            self._file.seek(self._start)

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes; raises if the source ends before ``size``."""
        n = min(n, self.size - self._position)
        if self._bytes is not None:
            piece = self._bytes[self._position : self._position + n]
        else:
            assert self._file is not None
            piece = self._file.read(n)
        if len(piece) != n:
            raise RegistryError(
                f"the blob source ended at {self._position + len(piece)} of {self.size} bytes"
            )
        self._position += n
        return piece
