"""Prometheus metrics: requests by RPC and status, latency histograms, batch sizes, queue depth.

Each server owns its own registry (several servers can live in one process, as in the tests). Without
``prometheus_client`` installed the metrics are no-ops, and asking for ``--metrics-port`` is an error.
``/metrics`` is served by a small HTTP server of our own: with ``--auth-token-file`` it answers 401 unless the
request carries the same ``Authorization: Bearer <token>`` header as the RPCs.
"""

from __future__ import annotations

import http.server
import threading

from ..errors import InvalidArgumentError
from .auth import authorized

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Noop:
    def labels(self, *args, **kwargs):
        return self

    def inc(self, *args):
        pass

    def observe(self, *args):
        pass

    def set(self, *args):
        pass


class Metrics:
    def __init__(self):
        try:
            import prometheus_client as prom
        except ImportError:  # metrics are optional
            self.available = False
            self.requests = self.latency = self.batch_size = self.queue_depth = self.heavy_in_flight = _Noop()
            return
        self.available = True
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("zfserve_requests", "Finished RPCs by method and status code",
                                     ["rpc", "code"], registry=self.registry)
        self.latency = prom.Histogram("zfserve_request_duration_seconds", "RPC latency by method", ["rpc"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = prom.Histogram("zfserve_batch_size", "Images per engine call of the dynamic batcher",
                                         ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = prom.Gauge("zfserve_queue_depth", "Requests waiting in the batcher queue", ["model"],
                                      registry=self.registry)
        self.heavy_in_flight = prom.Gauge("zfserve_heavy_requests", "Deconv and occlusion requests admitted "
                                          "(running or waiting)", registry=self.registry)
        self._http = None

    def record(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.latency.labels(rpc=rpc).observe(seconds)

    def start_http(self, host: str, port: int, token: bytes | None = None) -> int:
        """Serve ``/metrics`` (requiring ``Authorization: Bearer <token>`` when ``token`` is given); returns the
        bound port."""
        if not self.available:
            raise RuntimeError("--metrics-port needs the prometheus-client package (pip install prometheus-client)")
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self._reply(404, b"not found: the metrics are at /metrics\n")
                elif token is not None and not authorized(self.headers.get("Authorization"), token):
                    self._reply(401, b"authorization: send 'Authorization: Bearer <token>'\n",
                                {"WWW-Authenticate": "Bearer"})
                else:
                    self._reply(200, metrics._prom.generate_latest(metrics.registry),
                                {"Content-Type": metrics._prom.CONTENT_TYPE_LATEST})

            def _reply(self, code, body, headers=None):
                self.send_response(code)
                for key, value in {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # no line per scrape on stderr
                pass

        try:
            server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise InvalidArgumentError(f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                       f"choose another port", field="metrics_port") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        return server.server_address[1]

    def text(self) -> str:
        return self._prom.generate_latest(self.registry).decode() if self.available else ""

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
