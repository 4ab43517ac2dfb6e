"""Prometheus metrics of a server (prometheus_client): call latency histograms per RPC and attention method, calls
per status code, and the stats snapshot (pool, per-method totals, bytes moved between tiers, batching, sequences
expired, coverage estimates and dense fallbacks per method and layer), served over HTTP."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# Seconds: a decode layer call takes tens of microseconds to milliseconds; a long prefill chunk, seconds.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class CallMetrics:
    """One server's registry: every call observed by RPC, attention method ("" for other calls) and status."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("kvcache_rpc_duration_seconds", "Call latency", ["rpc", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.status = Counter("kvcache_rpc_status", "Calls by status code", ["rpc", "code"], registry=self.registry)
        self.registry.register(_StatsCollector(stats))
        # Each labels() lookup takes the metric's lock and builds its key: a layer call's few labels are kept here.
        self._series: dict[tuple[str, str, str], tuple] = {}

    def observe(self, rpc: str, code: str, seconds: float, method: str = "") -> None:
        """Count one call (or one AttendStream request) of `rpc` that ended with `code` after `seconds`."""
        key = (rpc, code, method)
        series = self._series.get(key)
        if series is None:
            series = self._series.setdefault(key, (self.latency.labels(rpc, method), self.status.labels(rpc, code)))
        series[0].observe(seconds)
        series[1].inc()

    def text(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _StatsCollector:
    """The stats snapshot (KVCacheClient.stats plus the server's) as metric families, read at each scrape."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from stats_families(self._stats())


def stats_families(stats: dict) -> list[Metric]:
    """Metric families of a stats dict {pool, methods, rpcs, batching, bytes_moved} (see KVCacheClient.stats)."""
    pool = dict(stats.get("pool", {}))
    expired = pool.pop("sequences_expired", None)
    families: list[Metric] = []
    gauge = GaugeMetricFamily("kvcache_pool_pages", "Pages and sequences of the store", labels=["kind"])
    for key, value in sorted(pool.items()):
        gauge.add_metric([key], value)
    families.append(gauge)
    for field, doc in (("calls", "Attention calls"), ("bytes_read", "K/V bytes read"), ("seconds", "Seconds")):
        family = CounterMetricFamily(f"kvcache_method_{field}", f"{doc} per method", labels=["method"])
        for method, totals in sorted(stats.get("methods", {}).items()):
            family.add_metric([method], totals[field])
        families.append(family)
    for field, doc in (("calls", "Calls"), ("errors", "Calls that did not end OK"), ("seconds", "Seconds")):
        family = CounterMetricFamily(f"kvcache_rpc_{field}", f"{doc} per RPC", labels=["rpc"])
        for rpc, totals in sorted(stats.get("rpcs", {}).items()):
            family.add_metric([rpc], totals[field])
        families.append(family)
    for name, doc, label, samples in (
            ("kvcache_attend_batching", "Attend-stream requests and how they were batched", "kind",
             stats.get("batching", {})),
            ("kvcache_bytes_moved", "Bytes moved between tiers", "direction", stats.get("bytes_moved", {}))):
        family = CounterMetricFamily(name, doc, labels=[label])
        for key, value in sorted(samples.items()):
            family.add_metric([key], value)
        families.append(family)
    if expired is not None:
        family = CounterMetricFamily("kvcache_sequences_expired", "Sequences freed when their lease ran out",
                                     labels=["reason"])
        family.add_metric(["lease"], expired)
        families.append(family)
    families.extend(coverage_families(stats.get("coverage", {})))
    return families


def coverage_families(coverage: dict[str, dict[int, dict]]) -> list[Metric]:
    """The coverage snapshot (kvcache.stats.CoverageTotals.snapshot) as a histogram of the per-sequence estimates and
    a counter of dense fallbacks, per method and layer."""
    histogram = HistogramMetricFamily("kvcache_attention_coverage", "Estimated share of attention mass the rows read "
                                      "cover, one observation per sequence and call", labels=["method", "layer"])
    fallbacks = CounterMetricFamily("kvcache_attention_fallbacks", "Sequences attended densely because their "
                                    "coverage estimate was below min_coverage", labels=["method", "layer"])
    for method, layers in sorted(coverage.items()):
        for layer, e in sorted(layers.items()):
            buckets = [*e["buckets"].items(), ("+Inf", e["count"])]
            histogram.add_metric([method, str(layer)], buckets, sum_value=e["sum"])
            fallbacks.add_metric([method, str(layer)], e["fallbacks"])
    return [histogram, fallbacks]


def prometheus_text(stats: dict) -> str:
    """The Prometheus text exposition of a stats dict alone (no call histograms)."""
    registry = CollectorRegistry()
    registry.register(_StatsCollector(lambda: stats))
    return generate_latest(registry).decode()


def serve_metrics(host: str, port: int, text: Callable[[], bytes], token: str | None = None) -> ThreadingHTTPServer:
    """Serve GET /metrics on (host, port) from a daemon thread; returns the HTTP server (shutdown() stops it). With a
    token, a request must carry `Authorization: Bearer <token>` (401 otherwise), as gRPC calls must."""
    expected = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if expected is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), expected):
                self.send_error(401, "missing or wrong bearer token")
                return
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = text()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # the gRPC log is the server's log
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return httpd
