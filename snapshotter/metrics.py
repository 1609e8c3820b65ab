"""A Prometheus ``/metrics`` endpoint for the snapshotter, served by ``prometheus_client``.

The numbers come from the NBD server's stats socket (per layer: bytes fetched from the
registry, reads the kernel made, chunk fetches and their time, cache hits) and from the
layer manager (layers mounted now, NBD server restarts). :class:`LayerCollector` reads
them afresh at each scrape; :class:`MetricsServer` serves a private registry holding only
that collector. Counters restart from zero when the NBD server restarts, as Prometheus
counters may.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from blockfs.errors import BlockfsError
from snapshotter.layers import LayerManager

log = logging.getLogger(__name__)

# (exposed name, help, key in a layer's stats); all counters labelled by layer.
_LAYER_COUNTERS = (
    ("blockfs_layer_fetched_bytes_total", "Bytes fetched from the registry.", "bytes_fetched"),
    ("blockfs_layer_range_requests_total", "Range requests sent to the registry.",
     "range_requests"),
    ("blockfs_layer_reads_total", "Block reads the kernel made.", "reads"),
    ("blockfs_layer_on_demand_reads_total",
     "Block reads that touched file data (the lazily fetched region).", "data_reads"),
    ("blockfs_layer_chunks_fetched_total", "Chunks fetched and verified.", "chunks_fetched"),
    ("blockfs_layer_fetch_seconds_total",
     "Time spent fetching chunks; divide by fetches for the mean latency.", "fetch_seconds"),
    ("blockfs_layer_fetches_total", "Fetches of compressed members.", "members_fetched"),
    ("blockfs_layer_kept_members_total",
     "Members fetched on a guess and kept compressed until a read needs them.",
     "members_kept"),
    ("blockfs_layer_kept_members_read_total",
     "Members kept compressed that a read needed (decoded then).", "kept_members_read"),
    ("blockfs_layer_cache_hits_total", "Chunks served from the cache.", "cache_hits"),
    ("blockfs_layer_verification_failures_total",
     "Fetched members whose bytes did not decompress or match the TOC.",
     "verification_failures"),
    ("blockfs_layer_refetches_total",
     "Members fetched again after their bytes failed verification.", "refetches"),
    ("blockfs_layer_fetch_errors_total", "Member fetches the registry could not deliver.",
     "fetch_errors"),
)  # fmt: skip

# (exposed name, metric family, help, key in the cache's stats); unlabelled.
_CACHE_METRICS = (
    ("blockfs_cache_memory_hits_total", CounterMetricFamily, "Chunk cache hits in memory.",
     "memory_hits"),
    ("blockfs_cache_disk_hits_total", CounterMetricFamily, "Chunk cache hits on disk.",
     "disk_hits"),
    ("blockfs_cache_misses_total", CounterMetricFamily, "Chunk cache misses.", "misses"),
    ("blockfs_cache_disk_bytes", GaugeMetricFamily, "Bytes the chunk cache holds on disk.",
     "disk_bytes"),
)  # fmt: skip


def _number(value: object) -> float:
    """``value`` if the stats gave a number, else 0 (a key missing from older servers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return value


class LayerCollector(Collector):
    """The snapshotter's metrics, read from a :class:`LayerManager` at each scrape.

    A ``CounterMetricFamily`` named ``X_total`` is exposed as ``X_total`` (the library
    takes the suffix off the family name and puts it back on the samples), so the names
    above are the names scraped.
    """

    def __init__(self, layers: LayerManager) -> None:
        self._layers = layers

    def collect(self) -> Iterator[Metric]:
        """One family per metric; the layer metrics hold one sample per layer served."""
        try:
            stats = self._layers.stats()
        except BlockfsError as e:
            log.warning("cannot read the NBD server's stats", extra={"error": str(e)})
            stats = {}
        yield GaugeMetricFamily(
            "blockfs_layers_mounted",
            "Layers attached and mounted now.",
            value=len(self._layers.attached()),
        )
        yield CounterMetricFamily(
            "blockfs_nbd_server_restarts_total",
            "Times the NBD server died under attached layers and was restarted.",
            value=self._layers.server_restarts,
        )
        layers = stats.get("layers", {})
        for name, text, key in _LAYER_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["layer"])
            for layer, values in sorted(layers.items()):
                family.add_metric([layer], _number(values.get(key)))
            yield family
        cache = stats.get("cache", {})
        for name, kind, text, key in _CACHE_METRICS:
            yield kind(name, text, value=_number(cache.get(key)))


class MetricsServer:
    """Serves the :class:`LayerCollector` of ``layers`` over HTTP on ``HOST:PORT`` (any
    path; Prometheus asks for ``/metrics``) from a daemon thread until closed."""

    def __init__(self, address: str, layers: LayerManager) -> None:
        host, _, port = address.rpartition(":")
        registry = CollectorRegistry()
        registry.register(LayerCollector(layers))
        self._server, self._thread = start_http_server(
            int(port), host.strip("[]"), registry=registry
        )

    @property
    def address(self) -> str:
        """``HOST:PORT`` actually bound (the port is chosen when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def metric_value(text: str, metric: str, labels: Iterable[tuple[str, str]] = ()) -> float | None:
    """The value of the sample ``metric`` with exactly ``labels`` in exposition ``text``
    (None if absent); for tests and tools."""
    wanted = dict(labels)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels == wanted:
                return sample.value
    return None
