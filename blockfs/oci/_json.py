"""Deterministic JSON encoding and typed field access for OCI documents."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from blockfs.oci._errors import InvalidDocument

# Go's encoding/json (what containerd, docker and the registry use) escapes these in
# strings; doing the same gives the same bytes, hence the same digest, for the same value.
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def canonical_json(value: object) -> bytes:
    """Compact UTF-8 JSON of ``value`` as Go would write it, keys in the order given."""
    # The characters escaped only ever occur inside JSON strings, so translating the
    # whole text is safe.
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.translate(_GO_ESCAPES).encode()


def load_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as a JSON object, or raise :class:`InvalidDocument` naming ``what``."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidDocument(f"{what} is not valid JSON: {e}") from None
    return as_object(value, what)


def as_object(value: object, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else raise :class:`InvalidDocument`."""
    if not isinstance(value, dict):
        raise InvalidDocument(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def get_str(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    """The string at ``key``; None if absent and not required."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidDocument(f"{what} has no {key!r}")
        return None
    if not isinstance(value, str):
        raise InvalidDocument(f"{what}: {key!r} must be a string")
    return value


def get_int(obj: Mapping[str, Any], key: str, what: str) -> int:
    """The non-negative integer at ``key`` (required)."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidDocument(f"{what}: {key!r} must be a non-negative integer")
    return value


def get_str_list(obj: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    """The list of strings at ``key``; empty if absent."""
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDocument(f"{what}: {key!r} must be a list of strings")
    return tuple(value)


def get_str_map(obj: Mapping[str, Any], key: str, what: str) -> dict[str, str]:
    """The string-to-string map at ``key``; empty if absent."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidDocument(f"{what}: {key!r} must be a map of strings")
    return dict(value)
