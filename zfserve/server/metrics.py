"""Prometheus metrics: requests by RPC and status, latency histograms, batch sizes, queue depth.

Each server owns its own registry (several servers can live in one process, as in the tests). Without
``prometheus_client`` installed the metrics are no-ops, and asking for ``--metrics-port`` is an error.
``/metrics`` is served on ``--metrics-port`` by the HTTP side's listener (same limits and Host check; with
``--auth-token-file`` it answers 401 unless the request carries the same ``Authorization: Bearer <token>`` header
as the RPCs).
"""

from __future__ import annotations

from ..errors import InvalidArgumentError

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

    def record(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.latency.labels(rpc=rpc).observe(seconds)

    def asgi_app(self):
        """The ASGI app of ``--metrics-port``: ``/metrics`` (GET and HEAD; the token and the limits are the
        listener's, see :func:`~.http_server.start_metrics`), 404 elsewhere."""
        if not self.available:
            raise InvalidArgumentError("--metrics-port: needs the prometheus-client package (pip install "
                                       "prometheus-client)", field="metrics_port")
        prom, registry = self._prom, self.registry

        async def app(scope, receive, send):
            if scope["path"] != "/metrics":
                status, body, kind = 404, b"not found: the metrics are at /metrics\n", "text/plain; charset=utf-8"
            elif scope["method"] not in ("GET", "HEAD"):
                status, body, kind = 405, b"method not allowed: GET or HEAD\n", "text/plain; charset=utf-8"
            else:
                status, body, kind = 200, prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
            headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
            if status == 405:
                headers.append((b"allow", b"GET, HEAD"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        return app

    def text(self) -> str:
        return self._prom.generate_latest(self.registry).decode() if self.available else ""
