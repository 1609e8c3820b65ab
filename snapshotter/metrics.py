"""A Prometheus ``/metrics`` endpoint for the snapshotter, served from a thread.

The numbers come from the NBD server's stats socket (per layer: bytes fetched from the
registry, reads the kernel made, chunk fetches and their time, cache hits) and from the
layer manager (layers mounted now). Counters restart from zero when the NBD server
restarts, as Prometheus counters may.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from blockfs.errors import BlockfsError
from snapshotter.layers import LayerManager

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, type, help, key in a layer's stats)
_LAYER_METRICS = (
    ("blockfs_layer_fetched_bytes_total", "counter", "Bytes fetched from the registry.",
     "bytes_fetched"),
    ("blockfs_layer_range_requests_total", "counter", "Range requests sent to the registry.",
     "range_requests"),
    ("blockfs_layer_reads_total", "counter", "Block reads the kernel made.", "reads"),
    ("blockfs_layer_on_demand_reads_total", "counter",
     "Block reads that touched file data (the lazily fetched region).", "data_reads"),
    ("blockfs_layer_chunks_fetched_total", "counter", "Chunks fetched and verified.",
     "chunks_fetched"),
    ("blockfs_layer_fetch_seconds_total", "counter",
     "Time spent fetching chunks; divide by fetches for the mean latency.", "fetch_seconds"),
    ("blockfs_layer_fetches_total", "counter", "Fetches of compressed members.",
     "members_fetched"),
    ("blockfs_layer_cache_hits_total", "counter", "Chunks served from the cache.",
     "cache_hits"),
    ("blockfs_layer_verification_failures_total", "counter",
     "Chunks whose digest did not match the TOC.", "verification_failures"),
    ("blockfs_layer_fetch_errors_total", "counter", "Chunk fetches that failed.",
     "fetch_errors"),
)  # fmt: skip

_CACHE_METRICS = (
    ("blockfs_cache_memory_hits_total", "counter", "Chunk cache hits in memory.", "memory_hits"),
    ("blockfs_cache_disk_hits_total", "counter", "Chunk cache hits on disk.", "disk_hits"),
    ("blockfs_cache_misses_total", "counter", "Chunk cache misses.", "misses"),
    ("blockfs_cache_disk_bytes", "gauge", "Bytes the chunk cache holds on disk.", "disk_bytes"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_metrics(stats: dict[str, Any], mounted_layers: int, server_restarts: int = 0) -> str:
    """The Prometheus text exposition of the NBD server's ``stats``, the mount count and
    how often the daemon restarted a dead NBD server."""
    lines = [
        "# HELP blockfs_layers_mounted Layers attached and mounted now.",
        "# TYPE blockfs_layers_mounted gauge",
        f"blockfs_layers_mounted {mounted_layers}",
        "# HELP blockfs_nbd_server_restarts_total Times the NBD server died under attached "
        "layers and was restarted.",
        "# TYPE blockfs_nbd_server_restarts_total counter",
        f"blockfs_nbd_server_restarts_total {server_restarts}",
    ]
    layers: dict[str, dict[str, Any]] = stats.get("layers", {})
    for metric, kind, text, key in _LAYER_METRICS:
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        for name, values in sorted(layers.items()):
            lines.append(f'{metric}{{layer="{_escape(name)}"}} {_number(values.get(key))}')
    cache: dict[str, Any] = stats.get("cache", {})
    for metric, kind, text, key in _CACHE_METRICS:
        lines += [
            f"# HELP {metric} {text}",
            f"# TYPE {metric} {kind}",
            f"{metric} {_number(cache.get(key))}",
        ]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``GET /metrics`` on ``HOST:PORT`` from a daemon thread until closed."""

    def __init__(self, address: str, layers: LayerManager) -> None:
        host, _, port = address.rpartition(":")
        collect = self._collector(layers)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = collect().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes are frequent; the daemon's log is for events

        self._server = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        """``HOST:PORT`` actually bound (the port is chosen when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @staticmethod
    def _collector(layers: LayerManager) -> Callable[[], str]:
        def collect() -> str:
            try:
                stats = layers.stats()
            except BlockfsError as e:
                log.warning("cannot read the NBD server's stats", extra={"error": str(e)})
                stats = {}
            return render_metrics(stats, len(layers.attached()), layers.server_restarts)

        return collect

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def metric_value(text: str, metric: str, labels: Iterable[tuple[str, str]] = ()) -> float | None:
    """The value of one sample in exposition ``text`` (None if absent); for tests and tools."""
    wanted = metric
    pairs = list(labels)
    if pairs:
        wanted += "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == wanted:
            return float(value)
    return None
