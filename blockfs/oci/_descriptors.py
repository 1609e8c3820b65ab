"""Descriptors, manifests, indexes, image configs and platforms.

Parsed documents keep the exact bytes they were parsed from, because a manifest's digest
is the digest of those bytes; documents built here are serialised deterministically.
``attrs.evolve`` on a parsed document gives a new document that is serialised afresh.
"""

from __future__ import annotations

import copy
import platform as _platform
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from blockfs.oci import _mediatypes as mt
from blockfs.oci._annotations import DOCKER_REFERENCE_TYPE
from blockfs.oci._digest import sha256_digest, validate_digest
from blockfs.oci._errors import InvalidDigest, InvalidDocument, NoMatchingPlatform
from blockfs.oci._json import (
    as_object,
    canonical_json,
    get_int,
    get_str,
    get_str_list,
    get_str_map,
    load_object,
)


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _descriptor_tuple(value: Iterable[Descriptor]) -> tuple[Descriptor, ...]:
    return tuple(value)


def _check_digest(_: object, __: object, value: str) -> None:
    validate_digest(value)


def _check_size(_: object, __: object, value: int) -> None:
    if value < 0:
        raise ValueError(f"descriptor size must not be negative: {value}")


# platform.machine() values -> (GOARCH, default variant), as Go and containerd name them.
_MACHINE_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}
# Architectures whose variants are ordered, a CPU of one variant running the lower ones.
_ORDERED_VARIANTS = {"arm": ("v5", "v6", "v7", "v8"), "arm64": ("v8", "v9")}
_DEFAULT_VARIANT = {"arm": "v7", "arm64": "v8"}


@attrs.frozen(slots=True)
class Platform:
    """The OS and CPU an image manifest is built for (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_json(cls, value: object) -> Platform:
        """Read a descriptor's ``platform`` object."""
        obj = as_object(value, "platform")
        return cls(
            os=get_str(obj, "os", "platform") or "",
            architecture=get_str(obj, "architecture", "platform") or "",
            variant=get_str(obj, "variant", "platform", required=False) or "",
            os_version=get_str(obj, "os.version", "platform", required=False) or "",
            os_features=get_str_list(obj, "os.features", "platform"),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``platform`` object, fields in the order of the Go image-spec structs."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    def normalized(self) -> Platform:
        """Same platform with architecture aliases resolved and default variants filled in."""
        arch, variant = _MACHINE_ARCH.get(self.architecture, (self.architecture, ""))
        variant = self.variant or variant or _DEFAULT_VARIANT.get(arch, "")
        return attrs.evolve(self, os=self.os.lower(), architecture=arch, variant=variant)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def host_platform() -> Platform:
    """The platform of this machine (``linux/amd64``, ``linux/arm64/v8``, ...)."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


@attrs.frozen(slots=True, hash=False)
class Descriptor:
    """A reference to content: its media type, digest and size, and optional extras."""

    media_type: str
    digest: str = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)
    annotations: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    platform: Platform | None = None
    urls: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, value: object, what: str = "descriptor") -> Descriptor:
        """Read a descriptor object; ``what`` names it in errors."""
        obj = as_object(value, what)
        digest = get_str(obj, "digest", what) or ""
        try:
            validate_digest(digest)
        except InvalidDigest as e:
            raise InvalidDocument(f"{what}: {e}") from None
        platform = obj.get("platform")
        return cls(
            media_type=get_str(obj, "mediaType", what) or "",
            digest=digest,
            size=get_int(obj, "size", what),
            annotations=get_str_map(obj, "annotations", what),
            platform=None if platform is None else Platform.from_json(platform),
            urls=get_str_list(obj, "urls", what),
            artifact_type=get_str(obj, "artifactType", what, required=False),
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor object, fields in Go's order, annotations sorted."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


def _descriptor_list(obj: Mapping[str, Any], key: str, what: str) -> tuple[Descriptor, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidDocument(f"{what}: {key!r} must be a list")
    return tuple(Descriptor.from_json(v, f"{what} {key}[{i}]") for i, v in enumerate(value))


def _check_schema_version(obj: Mapping[str, Any], what: str) -> None:
    version = obj.get("schemaVersion")
    if version == 1:
        raise InvalidDocument(f"{what} is a Docker schema 1 manifest, which is not supported")
    if version != 2:
        raise InvalidDocument(f"{what} has schemaVersion {version!r}, expected 2")


class _Document:
    """What manifests and indexes share: exact bytes, digest, size and descriptor."""

    __slots__ = ()
    _raw: bytes | None
    media_type: str | None

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The exact bytes this was parsed from, or its deterministic serialisation."""
        return self._raw if self._raw is not None else canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        """sha256 digest of :meth:`to_bytes`."""
        return sha256_digest(self.to_bytes())

    @property
    def size(self) -> int:
        """Length of :meth:`to_bytes`."""
        return len(self.to_bytes())

    def descriptor(
        self, *, annotations: Mapping[str, str] | None = None, platform: Platform | None = None
    ) -> Descriptor:
        """A descriptor pointing at this document."""
        data = self.to_bytes()
        return Descriptor(
            media_type=self.media_type or self._default_media_type(),
            digest=sha256_digest(data),
            size=len(data),
            annotations=annotations or {},
            platform=platform,
        )

    def _default_media_type(self) -> str:
        raise NotImplementedError


def _media_type_of(
    obj: Mapping[str, Any], hint: str | None, allowed: frozenset[str], what: str
) -> str | None:
    media_type = get_str(obj, "mediaType", what, required=False)
    if media_type is None and hint is not None and hint in allowed:
        media_type = hint
    if media_type is not None and media_type not in allowed:
        raise InvalidDocument(f"{what} has media type {media_type!r}")
    return media_type


@attrs.frozen(slots=True, hash=False)
class Manifest(_Document):
    """An image manifest (OCI or Docker schema 2): a config and an ordered list of layers."""

    config: Descriptor
    layers: tuple[Descriptor, ...] = attrs.field(converter=_descriptor_tuple)
    media_type: str | None = mt.OCI_MANIFEST
    annotations: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    _raw: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str | None = None) -> Manifest:
        """Parse a manifest; ``media_type`` (a Content-Type) fills in a missing mediaType."""
        what = "image manifest"
        obj = load_object(data, what)
        _check_schema_version(obj, what)
        if "manifests" in obj and "config" not in obj:
            raise InvalidDocument(f"{what} is an image index, not a manifest")
        declared = _media_type_of(obj, media_type, mt.MANIFEST_MEDIA_TYPES, what)
        subject = obj.get("subject")
        manifest = cls(
            config=Descriptor.from_json(obj.get("config"), f"{what} config"),
            layers=_descriptor_list(obj, "layers", what),
            media_type=declared,
            annotations=get_str_map(obj, "annotations", what),
            subject=None if subject is None else Descriptor.from_json(subject, f"{what} subject"),
            artifact_type=get_str(obj, "artifactType", what, required=False),
        )
        object.__setattr__(manifest, "_raw", bytes(data))
        return manifest

    def to_json(self) -> dict[str, Any]:
        """The manifest object, fields in Go's order."""
        out: dict[str, Any] = {"schemaVersion": 2}
        if self.media_type:
            out["mediaType"] = self.media_type
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json()
        out["layers"] = [layer.to_json() for layer in self.layers]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    def _default_media_type(self) -> str:
        return mt.OCI_MANIFEST


@attrs.frozen(slots=True, hash=False)
class Index(_Document):
    """An image index (or Docker manifest list): manifests for several platforms."""

    manifests: tuple[Descriptor, ...] = attrs.field(converter=_descriptor_tuple)
    media_type: str | None = mt.OCI_INDEX
    annotations: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    _raw: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str | None = None) -> Index:
        """Parse an index; ``media_type`` (a Content-Type) fills in a missing mediaType."""
        what = "image index"
        obj = load_object(data, what)
        _check_schema_version(obj, what)
        if "manifests" not in obj:
            raise InvalidDocument(f"{what} has no 'manifests'")
        declared = _media_type_of(obj, media_type, mt.INDEX_MEDIA_TYPES, what)
        subject = obj.get("subject")
        index = cls(
            manifests=_descriptor_list(obj, "manifests", what),
            media_type=declared,
            annotations=get_str_map(obj, "annotations", what),
            subject=None if subject is None else Descriptor.from_json(subject, f"{what} subject"),
            artifact_type=get_str(obj, "artifactType", what, required=False),
        )
        object.__setattr__(index, "_raw", bytes(data))
        return index

    def to_json(self) -> dict[str, Any]:
        """The index object, fields in Go's order."""
        out: dict[str, Any] = {"schemaVersion": 2}
        if self.media_type:
            out["mediaType"] = self.media_type
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["manifests"] = [m.to_json() for m in self.manifests]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    def _default_media_type(self) -> str:
        return mt.OCI_INDEX


def parse_document(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or an index, deciding by ``media_type``, then by the JSON itself."""
    if media_type is not None:
        media_type = mt.base_media_type(media_type)
        if mt.is_index(media_type):
            return Index.from_bytes(data, media_type)
        if mt.is_manifest(media_type):
            return Manifest.from_bytes(data, media_type)
    obj = load_object(data, "manifest or index")
    declared = obj.get("mediaType")
    if declared in mt.INDEX_MEDIA_TYPES or (declared is None and "manifests" in obj):
        return Index.from_bytes(data)
    return Manifest.from_bytes(data)


def _check_config(obj: Mapping[str, Any]) -> None:
    rootfs = obj.get("rootfs")
    if rootfs is None:
        return
    rootfs = as_object(rootfs, "image config rootfs")
    for diff_id in get_str_list(rootfs, "diff_ids", "image config rootfs"):
        try:
            validate_digest(diff_id)
        except InvalidDigest as e:
            raise InvalidDocument(f"image config rootfs.diff_ids: {e}") from None


def _deep_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(value))


def _strings(value: Any) -> tuple[str, ...]:
    # Lenient, as runtimes are: a bare string is one item.
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    raise InvalidDocument(f"image config: expected a list of strings, not {value!r}")


@attrs.frozen
class ProcessConfig:
    """What an image config says to run: the Entrypoint, Cmd, Env, WorkingDir and User of
    its ``config`` object (empty where it says nothing)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    @property
    def argv(self) -> tuple[str, ...]:
        """The command a container runs unless told otherwise: Entrypoint, then Cmd."""
        return (*self.entrypoint, *self.cmd)

    def env_value(self, key: str) -> str | None:
        """The value of ``key`` in Env (the last entry for it), or None."""
        value = None
        for item in self.env:
            name, sep, rest = item.partition("=")
            if sep and name == key:
                value = rest
        return value


@attrs.frozen(slots=True, hash=False)
class ImageConfig:
    """An image config: the whole JSON object is kept, with accessors for what we use."""

    _data: Mapping[str, Any] = attrs.field(converter=_deep_copy, alias="data")
    _raw: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageConfig:
        """Parse an image config, keeping its exact bytes."""
        obj = load_object(data, "image config")
        _check_config(obj)
        config = cls(obj)
        object.__setattr__(config, "_raw", bytes(data))
        return config

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ImageConfig:
        """An image config from a JSON object (deep-copied)."""
        _check_config(value)
        return cls(value)

    def to_json(self) -> dict[str, Any]:
        """A deep copy of the whole config object."""
        return _deep_copy(self._data)

    def to_bytes(self) -> bytes:
        """The exact parsed bytes, or the deterministic serialisation."""
        return self._raw if self._raw is not None else canonical_json(self._data)

    @property
    def digest(self) -> str:
        """sha256 digest of :meth:`to_bytes` (the config's descriptor digest)."""
        return sha256_digest(self.to_bytes())

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """``rootfs.diff_ids``: the digest of each uncompressed layer, bottom first."""
        rootfs = self._data.get("rootfs")
        if rootfs is None:
            return ()
        return get_str_list(as_object(rootfs, "image config rootfs"), "diff_ids", "rootfs")

    @property
    def process(self) -> ProcessConfig:
        """What the config says to run."""
        settings = self._data.get("config") or {}
        if not isinstance(settings, Mapping):
            raise InvalidDocument("image config: 'config' must be an object")
        return ProcessConfig(
            entrypoint=_strings(settings.get("Entrypoint")),
            cmd=_strings(settings.get("Cmd")),
            env=_strings(settings.get("Env")),
            working_dir=str(settings.get("WorkingDir") or ""),
            user=str(settings.get("User") or ""),
        )

    @property
    def platform(self) -> Platform:
        """The platform the config declares."""
        return Platform(
            os=str(self._data.get("os", "")),
            architecture=str(self._data.get("architecture", "")),
            variant=str(self._data.get("variant", "")),
        )

    def with_diff_ids(self, diff_ids: Iterable[str]) -> ImageConfig:
        """A copy of this config whose ``rootfs.diff_ids`` is ``diff_ids``."""
        data = _deep_copy(self._data)
        rootfs = dict(as_object(data.get("rootfs", {}), "image config rootfs"))
        rootfs["type"] = "layers"
        rootfs["diff_ids"] = [validate_digest(d) for d in diff_ids]
        data["rootfs"] = rootfs
        return ImageConfig(data)

    def descriptor(self, media_type: str = mt.OCI_CONFIG) -> Descriptor:
        """A descriptor pointing at this config."""
        data = self.to_bytes()
        return Descriptor(media_type, sha256_digest(data), len(data))


def _variant_rank(arch: str, want: str, have: str) -> int | None:
    """How well a manifest variant ``have`` serves a wanted ``want`` (0 best, None never)."""
    if have == want:
        return 0
    order = _ORDERED_VARIANTS.get(arch)
    if order is not None and want in order and have in order:
        distance = order.index(want) - order.index(have)
        return distance if distance > 0 else None
    if not want:
        return 1  # no preference: anything, exact ("" == "") first
    if not have:
        return len(order or ()) + 1  # an unspecified variant, after every known-good one
    return None


def _is_attestation(descriptor: Descriptor) -> bool:
    return DOCKER_REFERENCE_TYPE in descriptor.annotations


def select_platform(
    index: Index,
    os: str = "linux",
    architecture: str | None = None,
    variant: str | None = None,
) -> Descriptor:
    """The manifest of ``index`` that best runs on the given platform (default: this host).

    An exact variant wins; for arm, lower variants are accepted (v7 runs v6); among equals
    the first listed wins. Raises :class:`NoMatchingPlatform` naming what the index offers.
    """
    host = host_platform()
    if architecture is None:
        architecture = host.architecture
        variant = host.variant if variant is None else variant
    want = Platform(os, architecture, variant or "").normalized()
    best: tuple[int, int, Descriptor] | None = None
    for position, descriptor in enumerate(index.manifests):
        if descriptor.platform is None or _is_attestation(descriptor):
            continue
        have = descriptor.platform.normalized()
        if have.os != want.os or have.architecture != want.architecture:
            continue
        rank = _variant_rank(want.architecture, want.variant, have.variant)
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, descriptor)
    if best is None:
        offered = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
        raise NoMatchingPlatform(
            f"the image has no manifest for {want}; it offers: {', '.join(offered) or 'none'}"
        )
    return best[2]
