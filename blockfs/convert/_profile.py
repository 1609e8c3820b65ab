"""A workload's profile: the files it read, per layer, in the order it first read them.

The profile is what ``blockfs image optimize`` records from the reads the NBD server
serves, and what it rewrites an image from. Each layer's list is keyed by the layer's
``diff_id`` in the *source* image (the digest of its uncompressed tar), which does not
depend on how the layer is compressed or ordered: the same profile applies to the source
image however often it is converted, and a layer shared by two images carries its list
along. The JSON form::

    {"version": 1,
     "layers": [{"diff_id": "sha256:…", "files": ["usr/bin/python3.11", …]}, …],
     "workload": {…}}

``layers`` is bottom first; ``files`` are clean TOC names (no leading ``/`` or ``./``).
``workload`` says what produced it (command, exit status) and is only informative.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from blockfs.convert._errors import ConvertError
from blockfs.estargz import clean_name
from blockfs.oci import InvalidDigest, validate_digest

PROFILE_VERSION = 1


class ProfileError(ConvertError):
    """A profile file cannot be read or does not make sense."""


def _unique_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` cleaned, first occurrences only, in order; names no layer may hold dropped."""
    seen: dict[str, None] = {}
    for name in names:
        key = clean_name(name)
        if key:
            seen.setdefault(key, None)
    return tuple(seen)


@attrs.frozen
class LayerProfile:
    """The files read from one layer, in first-read order."""

    diff_id: str
    files: tuple[str, ...] = attrs.field(converter=_unique_names)


def _layer_tuple(layers: Iterable[LayerProfile]) -> tuple[LayerProfile, ...]:
    return tuple(layers)


@attrs.frozen
class Profile:
    """The files a workload read, per source layer (bottom first)."""

    layers: tuple[LayerProfile, ...] = attrs.field(converter=_layer_tuple)
    workload: Mapping[str, Any] = attrs.field(factory=dict)

    def files_of(self, diff_id: str) -> tuple[str, ...]:
        """The files to put first in the layer whose source diff_id is ``diff_id``."""
        for layer in self.layers:
            if layer.diff_id == diff_id:
                return layer.files
        return ()

    def by_diff_id(self) -> dict[str, tuple[str, ...]]:
        """Each layer's files by its source diff_id."""
        return {layer.diff_id: layer.files for layer in self.layers}

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "layers": [{"diff_id": lp.diff_id, "files": list(lp.files)} for lp in self.layers],
            "workload": dict(self.workload),
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: not a JSON object")
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{where}: version {data.get('version')!r}; this blockfs reads version "
                f"{PROFILE_VERSION} (record it again with --record-out)"
            )
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise ProfileError(f"{where}: 'layers' must be a list")
        out = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise ProfileError(f"{where}: layers[{i}] is not an object")
            diff_id, files = layer.get("diff_id"), layer.get("files")
            try:
                diff_id = validate_digest(diff_id if isinstance(diff_id, str) else "")
            except InvalidDigest:
                raise ProfileError(
                    f"{where}: layers[{i}].diff_id {diff_id!r} is not a digest"
                ) from None
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ProfileError(f"{where}: layers[{i}].files must be a list of names")
            out.append(LayerProfile(diff_id, files))
        workload = data.get("workload", {})
        return cls(out, workload if isinstance(workload, dict) else {})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON (whole: a temporary file, then renamed)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ProfileError(f"cannot read the profile {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ProfileError(f"{path} is not JSON: {e}") from None
        return cls.from_json(data, where=str(path))


def read_trace(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The file names an NBD server's trace of one export holds, first reads first
    (one JSON string a line, see ServerConfig ``trace``); no file is no reads."""
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        return ()
    names = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            name = json.loads(line)
        except ValueError:
            raise ProfileError(f"{path}:{n}: not a JSON string: {line[:80]!r}") from None
        if isinstance(name, str):
            names.append(name)
    return _unique_names(names)


def profile_from_traces(
    diff_ids: Sequence[str], traces: Sequence[str | os.PathLike[str] | None], **workload: Any
) -> Profile:
    """The profile of layers ``diff_ids`` (bottom first) from each one's trace file (None
    for a layer that was not served lazily, hence not traced)."""
    return Profile(
        [
            LayerProfile(d, read_trace(t) if t is not None else ())
            for d, t in zip(diff_ids, traces, strict=True)
        ],
        workload,
    )
