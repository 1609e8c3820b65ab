"""What an NBD server process holds: its configuration, chunk cache, exports and stats socket.

The nbdkit plugin builds one ServedLayers after nbdkit forks and delegates every
callback to it; nothing here knows about nbdkit.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import attrs

from blockfs.cache import ChunkCache
from blockfs.errors import BlockfsError
from blockfs.image._control import ControlServer, decode_spec
from blockfs.image._exports import ExportTable
from blockfs.image._layer import FetchPolicy
from blockfs.registry import warm_up


class ServerConfigError(BlockfsError):
    """The NBD server was started with missing or invalid parameters."""


def parse_size(text: str) -> int:
    """``10G``, ``256M``, ``4096`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(suffix)]) * units[suffix]
    except ValueError:
        raise ServerConfigError(f"not a size: {text!r} (examples: 4096, 256M, 10G)") from None
    if value < 0:
        raise ServerConfigError(f"size must not be negative: {text!r}")
    return int(value)


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


@attrs.frozen
class ServerConfig:
    """Parameters of one NBD server process."""

    root: Path
    cache_dir: Path
    cache_max: int = 10 << 30
    memory_cache: int = 256 << 20
    control: Path | None = None
    prefetch: bool = False
    background_fetch: bool = False
    fetch: FetchPolicy = FetchPolicy()  # noqa: RUF009 - frozen, shared safely
    # A directory: each export appends the files whose data it serves, at first read.
    trace: Path | None = None

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ServerConfig:
        known = {
            "root", "cache", "cache_max", "memory_cache", "control", "prefetch", "background_fetch",
            "fetch_unit", "whole_file_max", "directory_window", "libraries", "trace",
        }  # fmt: skip
        unknown = sorted(set(params) - known)
        if unknown:
            raise ServerConfigError(f"unknown parameters {unknown}; known: {sorted(known)}")
        for required in ("root", "cache"):
            if required not in params:
                raise ServerConfigError(f"missing parameter {required}=DIR")
        return cls(
            root=Path(params["root"]).absolute(),
            cache_dir=Path(params["cache"]).absolute(),
            cache_max=parse_size(params.get("cache_max", "10G")),
            memory_cache=parse_size(params.get("memory_cache", "256M")),
            control=Path(params["control"]).absolute() if "control" in params else None,
            prefetch=_flag(params.get("prefetch", "0")),
            background_fetch=_flag(params.get("background_fetch", "0")),
            fetch=FetchPolicy(
                unit=parse_size(params.get("fetch_unit", str(FetchPolicy().unit))),
                whole_file_max=parse_size(
                    params.get("whole_file_max", str(FetchPolicy().whole_file_max))
                ),
                directory_window=parse_size(
                    params.get("directory_window", str(FetchPolicy().directory_window))
                ),
                libraries=_flag(params.get("libraries", "1")),
            ),
            trace=Path(params["trace"]).absolute() if "trace" in params else None,
        )

    def to_params(self) -> list[str]:
        """The ``key=value`` arguments that reproduce this configuration."""
        out = [
            f"root={self.root}",
            f"cache={self.cache_dir}",
            f"cache_max={self.cache_max}",
            f"memory_cache={self.memory_cache}",
            f"prefetch={int(self.prefetch)}",
            f"background_fetch={int(self.background_fetch)}",
            f"fetch_unit={self.fetch.unit}",
            f"whole_file_max={self.fetch.whole_file_max}",
            f"directory_window={self.fetch.directory_window}",
            f"libraries={int(self.fetch.libraries)}",
        ]
        if self.control is not None:
            out.append(f"control={self.control}")
        if self.trace is not None:
            out.append(f"trace={self.trace}")
        return out


def _warm_up() -> None:
    """Load the HTTP client's code, so that the first fetch of a new server does not
    wait for it; then keep what the process has made so far (its modules, most of its
    objects) out of the garbage collector's full passes, which would otherwise walk all
    of it, 10 to 20 ms with every read stopped."""
    warm_up()
    gc.freeze()


class ServedLayers:
    """The exports, cache and stats endpoint of one server process."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
        self.cache = ChunkCache(
            config.cache_dir, max_bytes=config.cache_max, memory_bytes=config.memory_cache
        )
        self.exports = ExportTable(
            config.root,
            self.cache,
            prefetch=config.prefetch,
            background_fetch=config.background_fetch,
            fetch=config.fetch,
            trace=config.trace,
        )
        self.control = (
            ControlServer(
                str(config.control),
                {
                    "stats": self.exports.stats,
                    "open": self._open,
                    "ahead": self._ahead,
                    "preload": self._preload,
                    "forget": self._forget,
                },
            )
            if config.control
            else None
        )

    def _open(self, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return {"error": "open needs an export name"}
        self.exports.open(name)
        return {"opened": name}

    def _ahead(self, name: str = "", offset: str = "", around: str = "") -> dict[str, Any]:
        if not (name and offset.isdigit() and around in ("0", "1")):
            return {
                "error": "ahead needs an export name, a blob offset and 0 or 1: "
                "ahead NAME OFFSET AROUND"
            }
        needs = self.exports.fetch_ahead(name, int(offset), around=around == "1")
        return {"ahead": name, "loader": None if needs is None else needs.to_json()}

    def _preload(self, name: str = "", end: str = "", spec: str = "") -> dict[str, Any]:
        if not (name and end.isdigit() and spec):
            return {
                "error": "preload needs an export name, an end and a spec: preload NAME END SPEC"
            }
        return {"preloading": self.exports.preload(name, decode_spec(spec), int(end))}

    def _forget(self, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return {"error": "forget needs an export name"}
        self.exports.forget(name)
        return {"forgotten": name}

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        self.exports.close()
