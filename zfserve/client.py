"""A thin synchronous client for the zfserve.v1 API.

    from zfserve.client import Client
    with Client("127.0.0.1:8001") as client:
        for preds in client.classify(["cat.jpg", "dog.png"], top_k=3):
            print([(p.name, round(p.probability, 3)) for p in preds])

Images are file paths, encoded bytes (JPEG / PNG / WebP; the server decodes and preprocesses them), or one
float32 array (N, 3, 224, 224) already preprocessed (``zfserve.preprocess.load_images``). Server errors raise
:class:`ServerError` with the gRPC status code and the server's message. Results are the local engines' own
types (``zfserve.engine.results``), decoded by ``zfserve.wire``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc

from . import wire
from ._proto.v1 import zfserve_pb2 as pb
from ._proto.v1 import zfserve_pb2_grpc as pb_grpc
from .engine.results import (DEFAULT_STRIDE, DEFAULT_TOP_K, DEFAULT_WINDOW, OcclusionResult, Prediction,
                             UnitProjection)
from .errors import ZFServeError

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class ServerError(ZFServeError):
    """An RPC that ended with a non-OK status. ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"server: {code.name}: {message}", field="server")
        self.code = code
        self.details = message


class Client:
    """``target`` is ``HOST:PORT``. ``token``: bearer token. ``tls_ca`` (PEM path) turns TLS on; ``tls_cert`` +
    ``tls_key`` add a client certificate (mutual TLS). ``timeout``: default per-call deadline in seconds."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca or tls_cert:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ZFServeStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ServerError(exc.code(), exc.details()) from None

    # ------------------------------------------------------------------------------------------ API
    def classify(self, images, *, top_k: int = DEFAULT_TOP_K, model: str = "", timeout: float | None = None,
                 return_probabilities: bool = False):
        """Top-k predictions per image (lists of Prediction, each a :class:`~zfserve.engine.results.TopK` whose
        ``.ood`` is the image's out-of-distribution score, None when the model has no statistics); with
        ``return_probabilities`` also the (N, C) probabilities: ``(predictions, probabilities)``."""
        request = wire.classify_request(images, top_k=top_k, model=model, return_probabilities=return_probabilities)
        response = self._call(self._stub.Classify, request, timeout)
        preds: list[list[Prediction]] = wire.predictions(response)
        return (preds, wire.probabilities(response)) if return_probabilities else preds

    def deconv(self, images, layer: str = "", *, top_k: int | None = None, one_per_map: bool = True,
               units: Sequence[tuple[int, int, int]] | None = None, maps: Sequence[int] | None = None,
               return_png: bool = False, return_patches: bool = False, return_tensor: bool = True,
               model: str = "", timeout: float | None = None) -> list[UnitProjection]:
        """Deconv projections of ``layer`` (as ``DeconvEngine.project``; empty: the model's last conv layer, conv5
        or conv5_3, ...); ``png`` / ``patch_png`` hold the server's renderings when asked for, ``projection`` the
        array with ``return_tensor``, ``model_version`` the served version. A projection is a feature visualisation
        (class-insensitive), not evidence of what the class decision used (``zfserve faithfulness``)."""
        request = wire.deconv_request(images, layer, top_k=top_k, one_per_map=one_per_map, units=units, maps=maps,
                                      return_png=return_png, return_patches=return_patches,
                                      return_tensor=return_tensor, model=model)
        return wire.projections(self._call(self._stub.DeconvProject, request, timeout))

    def occlude(self, image, *, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, fill="mean",
                target: int | None = None, outputs: Iterable[str] | None = None, layer: str | None = None,
                channel: int | None = None, attribution_on_logits: bool = False, return_png: bool = False, model: str = "",
                timeout: float | None = None, fill_in_pixels: bool = False,
                progress: Callable[[int, int], None] | None = None, mode: dict | None = None) -> OcclusionResult:
        """One image's occlusion maps (as ``OcclusionEngine.sweep``; ``png`` holds the server's pictures with
        ``return_png``). The result carries what reproduces it: ``window``, ``stride``, ``fill`` / ``fill_units``,
        ``target``, ``attribution_on`` ("probability" or "logit") and ``model_version`` (the served version), and
        what drew it (``engine``, ``precision``, ``mode``). ``mode``: the occlusion mode's fields (``engine``,
        ``precision``, ``approximation``, ``coarse``, ``refine``, ``margin``; unset: exact), or ``{"gated": True}``
        for the fastest mode that passed the server's stored gate. With ``progress(done, total)`` the streaming
        RPC is used."""
        request = wire.occlusion_request(image, window=window, stride=stride, fill=fill, target=target,
                                         outputs=outputs, layer=layer, channel=channel,
                                         attribution_on_logits=attribution_on_logits, return_png=return_png,
                                         model=model, fill_in_pixels=fill_in_pixels, mode=mode)
        if progress is None:
            return wire.occlusion_result(self._call(self._stub.OcclusionSweep, request, timeout))
        try:
            for event in self._stub.OcclusionSweepStream(request, timeout=timeout or self.timeout,
                                                         metadata=self._metadata):
                if event.WhichOneof("event") == "progress":
                    progress(event.progress.done, event.progress.total)
                else:
                    return wire.occlusion_result(event.result)
        except grpc.RpcError as exc:
            raise ServerError(exc.code(), exc.details()) from None
        raise ServerError(grpc.StatusCode.INTERNAL, "stream ended without a result")

    def list_models(self) -> pb.ListModelsResponse:
        return self._call(self._stub.ListModels, pb.ListModelsRequest(), None)

    def model_info(self, model: str = "") -> pb.ModelInfo:
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model), None)

    def health(self, service: str = "") -> str:
        """The health service's status for ``service`` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        except grpc.RpcError as exc:
            raise ServerError(exc.code(), exc.details()) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteAuditBackend:
    """A running server as the backend of ``zfserve audit --server`` (see :mod:`zfserve.audit.backends`): the
    server decodes the images with the same decoder and runs the same engines, so the rows equal a local audit's.
    A refused image becomes that image's error, worded as the local decoder words it."""

    def __init__(self, client: Client, model: str = ""):
        import json

        from .config import PreprocessConfig
        info = client.model_info(model)
        self.client = client
        self.name, self.version = info.name, info.version
        self.class_names = list(info.class_names)
        self.preprocess = PreprocessConfig(**json.loads(info.preprocess_json))
        self._seconds = {"classify": 0.0}
        self.gated = False     # the audit sets it: sweep in the server's gated fast mode (rows say which)

    def classify(self, images: list[bytes]) -> list:
        import re
        import time
        t0 = time.perf_counter()
        out, pending = [None] * len(images), list(range(len(images)))
        while pending:
            try:
                preds, probs = self.client.classify([images[i] for i in pending], top_k=1, model=self.name,
                                                    return_probabilities=True)
            except ServerError as exc:
                bad = re.match(r"images\.encoded\[(\d+)\]", exc.details or "")
                if exc.code != grpc.StatusCode.INVALID_ARGUMENT or bad is None or int(bad.group(1)) >= len(pending):
                    raise
                index = pending.pop(int(bad.group(1)))   # that image alone fails; the others are sent again
                out[index] = ZFServeError(exc.details.replace(bad.group(0), "image", 1), field="image")
                continue
            for i, p, top in zip(pending, probs, preds):
                out[i] = (p, top.ood)
            break
        self._seconds["classify"] += time.perf_counter() - t0
        return out

    def occlude(self, image: bytes, *, window: int, stride: int, target: int) -> OcclusionResult:
        return self.client.occlude(image, window=window, stride=stride, target=target,
                                   outputs=("probability", "attribution"), model=self.name,
                                   mode={"gated": True} if self.gated else None)

    def take_seconds(self) -> dict:
        seconds, self._seconds = self._seconds, {"classify": 0.0}
        return seconds
