"""The server's options (``zfserve serve``'s flags; README "Limits and hardening" lists every limit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import _checks as checks
from ..config import ENGINES, PRECISIONS
from ..errors import InvalidArgumentError
from .batcher import BatcherConfig
from .decode import DEFAULT_MAX_REQUEST_PIXELS
from .http_listener import HttpLimits
from .explain import DEFAULT_MAX_OCCLUSION_POSITIONS

DEFAULT_PORT = 8001                      # Triton's gRPC port, which tritonclient users expect
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20     # 64 MiB: ~100 preprocessed 224x224 images, or 96 deconv projections
# Triton's --model-control-mode values that zfserve has: "none" (the models of the start, reloaded on SIGHUP)
# and "explicit" (clients may also unload and load them).
MODEL_CONTROL_MODES = ("none", "explicit")


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model_repository: str | None = None
    model: str | None = None
    device: str = "cpu"
    threads: int | None = None           # ONNX Runtime intra-op threads (None: its default)
    precision: str | None = None         # classification precision of models whose config.json names none
    engine: str | None = None            # ... and engine (None: fp32 on onnxruntime)
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    max_images_per_request: int = 64
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    heavy_workers: int = 1
    heavy_queue_size: int = 4
    heavy_threads: int | None = 1        # PyTorch intra-op threads for deconv/occlusion (None: unchanged)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    metrics_port: int | None = None
    http_port: int | None = None         # the HTTP side: OIP REST, the explorer page and its API (None: off)
    http: HttpLimits = field(default_factory=HttpLimits)   # its limits (and /metrics'), its allowed Host names
    shutdown_grace_s: float = 30.0
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS   # decoded pixels of one request's images, summed
    decode_workers: int = 1              # threads decoding requests with large images
    decode_queue_size: int = 2           # more such requests that may wait; beyond, UNAVAILABLE
    max_occlusion_positions: int = DEFAULT_MAX_OCCLUSION_POSITIONS
    strict: bool = False                 # a model that fails to load stops the start (else: listed not ready)
    model_control: str = "none"          # "explicit": clients may load/unload models (OIP repository extension)

    def validate(self) -> None:
        def bounded(name, value, lo, hi):
            checks.integer(value, name, lo, hi, label="--" + name.replace("_", "-"))

        b = self.batching
        bounded("port", self.port, 0, 65535)
        bounded("max_batch_size", b.max_batch_size, 1, 4096)
        bounded("max_queue_delay_us", b.max_queue_delay_us, 0, 10_000_000)
        bounded("max_queue_size", b.max_queue_size, 0, 1_000_000)
        bounded("max_queue_images", b.max_queue_images, 0, 100_000_000)
        bounded("default_timeout_us", b.default_timeout_us, 0, 3_600_000_000)
        bounded("max_images_per_request", self.max_images_per_request, 1, 4096)
        bounded("max_message_bytes", self.max_message_bytes, 1 << 20, 2**31 - 1)
        bounded("heavy_workers", self.heavy_workers, 1, 64)
        bounded("heavy_queue_size", self.heavy_queue_size, 0, 1024)
        if self.heavy_threads is not None:
            bounded("heavy_threads", self.heavy_threads, 1, 1024)
        if self.threads is not None:
            bounded("threads", self.threads, 1, 1024)
        if self.metrics_port is not None:
            bounded("metrics_port", self.metrics_port, 0, 65535)
        if self.http_port is not None:
            bounded("http_port", self.http_port, 0, 65535)
        bounded("max_request_pixels", self.max_request_pixels, 1, 10**12)
        bounded("decode_workers", self.decode_workers, 1, 64)
        bounded("decode_queue_size", self.decode_queue_size, 0, 1024)
        bounded("max_occlusion_positions", self.max_occlusion_positions, 1, 224 * 224)
        if self.precision is not None:
            checks.choice(self.precision, "precision", PRECISIONS, label="--precision")
        if self.engine is not None:
            checks.choice(self.engine, "engine", ENGINES, label="--engine")
        self.http.validate()
        if self.model_control not in MODEL_CONTROL_MODES:
            raise InvalidArgumentError(f"--model-control: {self.model_control!r}; accepted: "
                                       f"{', '.join(MODEL_CONTROL_MODES)}", field="model_control")
        if not self.shutdown_grace_s >= 0:
            raise InvalidArgumentError("--shutdown-grace-s: must be >= 0", field="shutdown_grace_s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgumentError("--tls-cert and --tls-key: give both or neither", field="tls_cert")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgumentError("--tls-client-ca: needs --tls-cert and --tls-key (mutual TLS)",
                                       field="tls_client_ca")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise InvalidArgumentError(f"--{name.replace('_', '-')}: no such file: {path}", field=name)


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_PORT", "MODEL_CONTROL_MODES", "ServerOptions"]
