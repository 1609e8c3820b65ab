"""Content digests (``algorithm:hex``): validation, computation and verification."""

from __future__ import annotations

import hashlib
import re

from blockfs.oci._errors import InvalidDigest

# The algorithms the OCI image spec registers, with the length of their hex encoding.
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


def validate_digest(value: str) -> str:
    """Return ``value`` if it is a supported digest, else raise :class:`InvalidDigest`."""
    algorithm, sep, encoded = value.partition(":")
    expected = _HEX_LENGTHS.get(algorithm)
    if not sep or expected is None:
        raise InvalidDigest(f"unsupported digest {value!r}: expected sha256:<hex> or sha512:<hex>")
    if len(encoded) != expected or not _HEX.fullmatch(encoded):
        raise InvalidDigest(
            f"invalid digest {value!r}: {algorithm} needs {expected} lowercase hex digits"
        )
    return value


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def new_hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object of the algorithm that ``digest`` uses (to verify a stream)."""
    return hashlib.new(validate_digest(digest).partition(":")[0])


def compute_digest_like(digest: str, data: bytes) -> str:
    """The digest of ``data`` with the same algorithm as ``digest``."""
    hasher = new_hasher(digest)
    hasher.update(data)
    return f"{hasher.name}:{hasher.hexdigest()}"


def digest_matches(digest: str, data: bytes) -> bool:
    """Whether ``data`` hashes to ``digest``."""
    return compute_digest_like(digest, data) == digest


def digest_hex(digest: str) -> str:
    """The encoded (hex) part of a validated digest."""
    return validate_digest(digest).partition(":")[2]
