"""nbdkit plugin: serves blockfs layer images as named, read-only NBD exports.

A thin adapter: every callback delegates to blockfs.image. Run it as

    nbdkit -U SOCKET python plugins/blockfs_nbdkit.py root=LAYERS_DIR cache=CACHE_DIR

Parameters: ``root`` (directory of layer directories; required), ``cache`` (chunk cache
directory; required), ``cache_max`` (bytes on disk, default 10G), ``memory_cache``
(bytes in memory, default 256M), ``control`` (unix socket for stats), ``prefetch``
(1 to prefetch each layer's prioritized files when first opened).
"""

from __future__ import annotations

import errno
import faulthandler
import signal
from typing import Any

import nbdkit  # exists only inside nbdkit's embedded interpreter

from blockfs.image import ServedLayers, ServerConfig

API_VERSION = 2

_params: dict[str, str] = {}
_served: ServedLayers | None = None


def config(key: str, value: str) -> None:
    _params[key] = value


def config_complete() -> None:
    ServerConfig.from_params(_params)  # fail at startup, with the message, if wrong


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def after_fork() -> None:
    # Threads (control socket, prefetch) must start after nbdkit has forked.
    global _served
    _served = ServedLayers(ServerConfig.from_params(_params))
    # kill -USR1 writes every Python thread's stack to nbdkit's log: what a hung read waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def cleanup() -> None:
    if _served is not None:
        _served.close()


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    assert _served is not None
    return _served.exports.names()


def default_export(readonly: bool, is_tls: bool) -> str:
    assert _served is not None
    names = _served.exports.names()
    return names[0] if len(names) == 1 else ""


def open(readonly: bool) -> Any:
    assert _served is not None
    try:
        return _served.exports.open(nbdkit.export_name())
    except Exception:
        nbdkit.set_error(errno.ENOENT)
        raise


def get_size(h: Any) -> int:
    return int(h.size)


def can_write(h: Any) -> bool:
    return False


def can_multi_conn(h: Any) -> bool:
    return True  # the image never changes


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_EMULATE)


def block_size(h: Any) -> tuple[int, int, int]:
    return (1, 4096, 32 * 1024 * 1024)


def is_rotational(h: Any) -> bool:
    return False


def pread(h: Any, buf: memoryview, offset: int, flags: int) -> None:
    try:
        h.pread_into(buf, offset)
    except Exception:
        # Fetch and verification failures are I/O errors; never hand back other bytes.
        nbdkit.set_error(errno.EIO)
        raise
