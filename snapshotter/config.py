"""The snapshotter daemon's configuration: a TOML file, with command-line flags on top.

Example ``/etc/blockfs/config.toml`` (every key is optional; these are the defaults)::

    root = "/var/lib/blockfs"
    address = "/var/lib/blockfs/run/snapshotter.sock"   # default: ROOT/run/snapshotter.sock
    hosts_dir = "/etc/containerd/certs.d"               # registry hosts.toml files
    cache_size = "10G"                                  # chunk cache limit on disk
    prefetch = true                                     # fetch prioritised files at mount
    background_fetch = false                            # then fetch the rest of each layer
    attach = "auto"                                     # "auto", "nbd" or "nbdfuse"
    log_level = "info"                                  # "debug", "info", "warning", "error"
    metrics_address = ""                                # "127.0.0.1:9145" serves /metrics
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from blockfs.host.attach import AttachError, parse_mode
from blockfs.image import ServerConfigError, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/blockfs/config.toml")
DEFAULT_ROOT = Path("/var/lib/blockfs")
SOCKET_NAME = "snapshotter.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(BlockfsError):
    """The configuration file or a flag has a wrong key or value; says which and where."""


@attrs.frozen
class SnapshotterConfig:
    """Everything the daemon is told, after the file and the flags are merged."""

    root: Path = DEFAULT_ROOT
    address: Path | None = None
    hosts_dir: Path = Path("/etc/containerd/certs.d")
    cache_size: int = 10 << 30
    prefetch: bool = True
    background_fetch: bool = False
    attach: str = "auto"
    log_level: str = "info"
    metrics_address: str = ""

    @property
    def run_dir(self) -> Path:
        """``ROOT/run``: sockets and pid files."""
        return self.root / "run"

    @property
    def socket(self) -> Path:
        """The unix socket containerd dials: ``address``, else ``ROOT/run/snapshotter.sock``."""
        return self.address if self.address is not None else self.run_dir / SOCKET_NAME


def _path(key: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{key} must be a non-empty path, not {value!r}")
    return Path(value).absolute()


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _size(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} must be a size such as 10G or a number of bytes, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
        return value
    try:
        return parse_size(value)
    except ServerConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def _attach(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    try:
        parse_mode(value)
    except AttachError as e:
        raise ConfigError(f"{key}: {e}") from None
    return value


def _log_level(key: str, value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{key} must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value.lower()


def _host_port(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string such as 127.0.0.1:9145, not {value!r}")
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key} must be HOST:PORT such as 127.0.0.1:9145, not {value!r}")
    return value


_KEYS: dict[str, Callable[[str, object], Any]] = {
    "root": _path,
    "address": _path,
    "hosts_dir": _path,
    "cache_size": _size,
    "prefetch": _bool,
    "background_fetch": _bool,
    "attach": _attach,
    "log_level": _log_level,
    "metrics_address": _host_port,
}


def config_from_mapping(data: Mapping[str, object], *, source: str) -> SnapshotterConfig:
    """Check and convert ``data`` (TOML keys); ``source`` names it in error messages."""
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {sorted(_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            values[key] = _KEYS[key](key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return SnapshotterConfig(**values)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> SnapshotterConfig:
    """Read the TOML file at ``path`` and apply ``overrides`` (flags; None values skipped).

    Without ``path``, ``/etc/blockfs/config.toml`` is read when it exists.
    """
    data: dict[str, object] = {}
    source = "configuration"
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {source} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}") from None
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        data.update(flags)
        source = f"{source} with flags {sorted(flags)}"
    return config_from_mapping(data, source=source)
