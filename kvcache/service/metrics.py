"""Prometheus text exposition of the stats (pool, per-method and per-RPC totals), served over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def prometheus_text(stats: dict) -> str:
    """Prometheus exposition of a stats dict {pool, methods, rpcs, batching} (see KVCacheClient.stats)."""
    lines = ["# TYPE kvcache_pool_pages gauge"]
    for key, value in sorted(stats.get("pool", {}).items()):
        lines.append(f'kvcache_pool_pages{{kind="{key}"}} {value}')
    lines += ["# TYPE kvcache_method_calls_total counter", "# TYPE kvcache_method_bytes_read_total counter",
              "# TYPE kvcache_method_seconds_total counter"]
    for method, t in sorted(stats.get("methods", {}).items()):
        lines.append(f'kvcache_method_calls_total{{method="{method}"}} {t["calls"]}')
        lines.append(f'kvcache_method_bytes_read_total{{method="{method}"}} {t["bytes_read"]}')
        lines.append(f'kvcache_method_seconds_total{{method="{method}"}} {t["seconds"]}')
    lines += ["# TYPE kvcache_rpc_calls_total counter", "# TYPE kvcache_rpc_errors_total counter",
              "# TYPE kvcache_rpc_seconds_total counter"]
    for rpc, t in sorted(stats.get("rpcs", {}).items()):
        lines.append(f'kvcache_rpc_calls_total{{rpc="{rpc}"}} {t["calls"]}')
        lines.append(f'kvcache_rpc_errors_total{{rpc="{rpc}"}} {t["errors"]}')
        lines.append(f'kvcache_rpc_seconds_total{{rpc="{rpc}"}} {t["seconds"]}')
    lines.append("# TYPE kvcache_attend_batching_total counter")
    for key, value in sorted(stats.get("batching", {}).items()):
        lines.append(f'kvcache_attend_batching_total{{kind="{key}"}} {value}')
    return "\n".join(lines) + "\n"


def serve_metrics(host: str, port: int, stats: Callable[[], dict]) -> ThreadingHTTPServer:
    """Serve GET /metrics on (host, port) from a daemon thread; returns the HTTP server (shutdown() stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
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
