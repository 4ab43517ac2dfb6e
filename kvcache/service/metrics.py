"""Prometheus text exposition of the stats (pool, per-method and per-RPC totals), served over HTTP."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def prometheus_text(stats: dict) -> str:
    """Prometheus exposition of a stats dict {pool, methods, rpcs, batching, bytes_moved} (KVCacheClient.stats):
    each family's TYPE line, then its samples, one family after another."""
    families = [("kvcache_pool_pages", "gauge", "kind", stats.get("pool", {}), None)]
    for field in ("calls", "bytes_read", "seconds"):
        families.append((f"kvcache_method_{field}_total", "counter", "method", stats.get("methods", {}), field))
    for field in ("calls", "errors", "seconds"):
        families.append((f"kvcache_rpc_{field}_total", "counter", "rpc", stats.get("rpcs", {}), field))
    families.append(("kvcache_attend_batching_total", "counter", "kind", stats.get("batching", {}), None))
    families.append(("kvcache_bytes_moved_total", "counter", "direction", stats.get("bytes_moved", {}), None))
    expired = stats.get("pool", {}).get("sequences_expired")
    if expired is not None:  # sequences freed because their lease ran out
        families.append(("kvcache_sequences_expired_total", "counter", "reason", {"lease": expired}, None))
    lines = []
    for name, kind, label, samples, field in families:
        lines.append(f"# TYPE {name} {kind}")
        for key, value in sorted(samples.items()):
            lines.append(f'{name}{{{label}="{key}"}} {value[field] if field else value}')
    return "\n".join(lines) + "\n"


def serve_metrics(host: str, port: int, stats: Callable[[], dict], token: str | None = None) -> ThreadingHTTPServer:
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
            body = prometheus_text(stats()).encode()
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
