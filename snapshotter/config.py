"""The snapshotter daemon's configuration: a TOML file, with command-line flags on top.

Example ``/etc/blockfs/config.toml`` (every key is optional; these are the defaults)::

    root = "/var/lib/blockfs"
    address = "/var/lib/blockfs/run/snapshotter.sock"   # default: ROOT/run/snapshotter.sock
    hosts_dir = "/etc/containerd/certs.d"               # registry hosts.toml files
    cache_size = "10G"                                  # chunk cache limit on disk
    prefetch = true                                     # fetch prioritised files at mount,
                                                        # and a pulled image's command
    background_fetch = false                            # then fetch the rest of each layer
    attach = "auto"                                     # "auto", "nbd" or "nbdfuse"
    log_level = "info"                                  # "debug", "info", "warning", "error"
    metrics_address = ""                                # "127.0.0.1:9145" serves /metrics
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from blockfs.host.attach import AttachError, parse_mode
from blockfs.image import ServerConfigError, parse_size
from snapshotter.defaults import PULL_SOCKET_NAME, ROOT

DEFAULT_CONFIG_PATH = Path("/etc/blockfs/config.toml")
DEFAULT_ROOT = Path(ROOT)
SOCKET_NAME = "snapshotter.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(BlockfsError):
    """The configuration file or a flag has a wrong key or value; says which and where."""


def _path(key: str, value: object) -> Path:
    """A non-empty path, made absolute."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{key} must be a non-empty path, not {value!r}")
    return Path(value).absolute()


def _bool(key: str, value: object) -> bool:
    """A TOML boolean (not a string such as "yes")."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _size(key: str, value: object) -> int:
    """A number of bytes, or a size such as ``10G``."""
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
    """An attach mode that :func:`blockfs.host.attach.parse_mode` accepts, kept as given."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    try:
        parse_mode(value)
    except AttachError as e:
        raise ConfigError(f"{key}: {e}") from None
    return value


def _log_level(key: str, value: object) -> str:
    """One of :data:`LOG_LEVELS`, in any case."""
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{key} must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value.lower()


def _host_port(key: str, value: object) -> str:
    """``HOST:PORT``, or empty for none."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string such as 127.0.0.1:9145, not {value!r}")
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key} must be HOST:PORT such as 127.0.0.1:9145, not {value!r}")
    return value


def _key(parse: Callable[[str, object], Any], help: str) -> dict[str, Any]:
    """The metadata that makes a field of :class:`SnapshotterConfig` a configuration key
    and a flag: ``parse(key, value)`` checks and converts a value from the file or a flag
    (raising :class:`ConfigError` naming the key); ``help`` is the flag's help."""
    return {"parse": parse, "help": help}


@attrs.frozen
class SnapshotterConfig:
    """Everything the daemon is told, after the file and the flags are merged.

    Each field is a key of the TOML file and a flag of the daemon (``hosts_dir`` is
    ``--hosts-dir``; a boolean ``prefetch`` is ``--prefetch``/``--no-prefetch``).
    """

    root: Path = attrs.field(
        default=DEFAULT_ROOT, metadata=_key(_path, "state directory (default: /var/lib/blockfs)")
    )
    address: Path | None = attrs.field(
        default=None,
        metadata=_key(_path, "unix socket to serve (default: ROOT/run/snapshotter.sock)"),
    )
    hosts_dir: Path = attrs.field(
        default=Path("/etc/containerd/certs.d"),
        metadata=_key(_path, "registry hosts.toml directory (default: /etc/containerd/certs.d)"),
    )
    cache_size: int = attrs.field(
        default=10 << 30, metadata=_key(_size, "chunk cache size limit, e.g. 512M (default: 10G)")
    )
    prefetch: bool = attrs.field(
        default=True,
        metadata=_key(
            _bool,
            "fetch a layer's prioritised files when it is mounted, and the command of an "
            "image pulled through the daemon and what it loads (default: on)",
        ),
    )
    background_fetch: bool = attrs.field(
        default=False,
        metadata=_key(_bool, "fetch the rest of each layer in the background (default: off)"),
    )
    attach: str = attrs.field(
        default="auto",
        metadata=_key(_attach, "how layers are attached: auto, nbd or nbdfuse (default: auto)"),
    )
    log_level: str = attrs.field(
        default="info", metadata=_key(_log_level, f"one of {', '.join(LOG_LEVELS)} (default: info)")
    )
    metrics_address: str = attrs.field(
        default="",
        metadata=_key(_host_port, "HOST:PORT for the Prometheus /metrics endpoint (default: none)"),
    )

    @property
    def run_dir(self) -> Path:
        """``ROOT/run``: sockets and pid files."""
        return self.root / "run"

    @property
    def pull_socket(self) -> Path:
        """Where ``blockfs image pull`` hands pulls to the daemon: ``ROOT/run/pull.sock``."""
        return self.run_dir / PULL_SOCKET_NAME

    @property
    def socket(self) -> Path:
        """The unix socket containerd dials: ``address``, else ``ROOT/run/snapshotter.sock``."""
        return self.address if self.address is not None else self.run_dir / SOCKET_NAME


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per field of :class:`SnapshotterConfig` to ``parser``, each None when
    not given (so that :func:`flag_overrides` leaves the file's value)."""
    for field in attrs.fields(SnapshotterConfig):
        flag = "--" + field.name.replace("_", "-")
        action = argparse.BooleanOptionalAction if isinstance(field.default, bool) else "store"
        parser.add_argument(flag, action=action, help=field.metadata["help"])


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The values of the flags :func:`add_config_flags` added, by configuration key."""
    return {field.name: getattr(args, field.name) for field in attrs.fields(SnapshotterConfig)}


def config_from_mapping(data: Mapping[str, object], *, source: str) -> SnapshotterConfig:
    """Check and convert ``data`` (TOML keys); ``source`` names it in error messages."""
    fields = attrs.fields(SnapshotterConfig)
    known = sorted(field.name for field in fields)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {known}")
    values: dict[str, Any] = {}
    for field in fields:
        if field.name in data:
            try:
                values[field.name] = field.metadata["parse"](field.name, data[field.name])
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
