"""A thin synchronous client for the zfserve.v1 API.

    from zfserve.client import Client
    with Client("127.0.0.1:8001") as client:
        for preds in client.classify(["cat.jpg", "dog.png"], top_k=3):
            print([(p.name, round(p.probability, 3)) for p in preds])

Images are file paths, encoded bytes (JPEG / PNG / WebP; the server decodes and preprocesses them), or one
float32 array (N, 3, 224, 224) already preprocessed (``zfserve.preprocess.load_images``). Server errors raise
:class:`ServerError` with the gRPC status code and the server's message. Results are plain dataclasses and
numpy arrays, the same shapes the local engines return.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc
import numpy as np

from ._proto.v1 import zfserve_pb2 as pb
from ._proto.v1 import zfserve_pb2_grpc as pb_grpc
from .errors import InvalidArgumentError, ZFServeError
from .server.tensors import array_to_tensor, tensor_to_array

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class ServerError(ZFServeError):
    """An RPC that ended with a non-OK status. ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"server: {code.name}: {message}", field="server")
        self.code = code
        self.details = message


@dataclass(frozen=True)
class Prediction:
    index: int
    name: str
    probability: float


@dataclass
class UnitProjection:
    """One projected unit; ``box`` is (x0, y0, x1, y1) in input pixels, end exclusive (as the local engine)."""

    image_index: int
    layer: str
    channel: int
    y: int
    x: int
    activation: float
    box: tuple[int, int, int, int]
    projection: np.ndarray | None = None     # (3, 224, 224) float32 when asked for
    png: bytes = b""
    patch_png: bytes = b""

    def to_json(self) -> dict:
        """The same record as the local engine's ``UnitProjection.to_json``."""
        return {"image_index": self.image_index, "layer": self.layer, "channel": self.channel, "y": self.y,
                "x": self.x, "activation": self.activation, "box": list(self.box)}


@dataclass
class OcclusionMaps:
    """A sweep's maps; field names follow the local engine's ``OcclusionResult``. ``png``: map name -> PNG."""

    target: int
    layer: str
    channel: int
    probability: np.ndarray | None = None
    argmax: np.ndarray | None = None
    activity: np.ndarray | None = None
    attribution: np.ndarray | None = None
    png: dict = field(default_factory=dict)
    base_probability: float = 0.0
    base_activity: float = 0.0
    starts: np.ndarray | None = None
    window: int = 0
    stride: int = 0
    fill: np.ndarray | None = None
    fill_units: str = "input"
    attribution_on: str = "probability"
    backend: str = ""
    seconds: float = 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("probability", "argmax", "activity", "attribution")
                if getattr(self, k) is not None}


def _images_message(images) -> pb.Images:
    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
        return pb.Images(tensor=array_to_tensor(np.ascontiguousarray(arr, dtype=np.float32), pb.Tensor))
    if isinstance(images, (bytes, bytearray, str, os.PathLike)):
        images = [images]
    encoded = []
    for item in images:
        if isinstance(item, (bytes, bytearray, memoryview)):
            encoded.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise InvalidArgumentError(f"images: no such file: {path}", field="images")
            encoded.append(path.read_bytes())
        else:
            raise InvalidArgumentError(f"images: expected paths, bytes or a float32 array, got "
                                       f"{type(item).__name__}", field="images")
    return pb.Images(encoded=encoded)


def _opt_array(tensor) -> np.ndarray | None:
    return tensor_to_array(tensor, "response") if tensor.dtype else None


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
    def classify(self, images, *, top_k: int = 5, model: str = "", timeout: float | None = None,
                 return_probabilities: bool = False):
        """Top-k predictions per image (list of lists of Prediction); with ``return_probabilities`` also the
        (N, C) probabilities: ``(predictions, probabilities)``."""
        request = pb.ClassifyRequest(model=model, images=_images_message(images), top_k=top_k,
                                     return_probabilities=return_probabilities)
        response = self._call(self._stub.Classify, request, timeout)
        preds = [[Prediction(c.index, c.name, c.probability) for c in p.classes] for p in response.predictions]
        if return_probabilities:
            return preds, _opt_array(response.probabilities)
        return preds

    def deconv(self, images, layer: str, *, top_k: int = 0, one_per_map: bool = True,
               units: Sequence[tuple[int, int, int]] | None = None, maps: Sequence[int] | None = None,
               return_png: bool = False, return_patches: bool = False, return_tensor: bool = True,
               model: str = "", timeout: float | None = None) -> list[UnitProjection]:
        request = pb.DeconvRequest(model=model, images=_images_message(images), layer=layer, top_k=top_k,
                                   allow_same_map=not one_per_map, return_png=return_png,
                                   return_patches=return_patches, return_tensor=return_tensor,
                                   units=[pb.Unit(channel=c, y=y, x=x) for c, y, x in (units or ())],
                                   maps=list(maps or ()))
        response = self._call(self._stub.DeconvProject, request, timeout)
        stack = _opt_array(response.tensor)
        out = []
        for i, p in enumerate(response.projections):
            out.append(UnitProjection(p.image_index, p.layer, p.unit.channel, p.unit.y, p.unit.x, p.activation,
                                      (p.box.x0, p.box.y0, p.box.x1, p.box.y1),
                                      None if stack is None else stack[i], p.png, p.patch_png))
        return out

    def _occlusion_request(self, image, window, stride, fill, target, outputs, layer, channel,
                           attribution_on_logits, return_png, model, fill_in_pixels):
        request = pb.OcclusionRequest(model=model, images=_images_message(image), window=window, stride=stride,
                                      outputs=list(outputs or ()), activity_layer=layer or "",
                                      attribution_on_logits=attribution_on_logits, return_png=return_png,
                                      fill_in_pixels=fill_in_pixels)
        if target is not None:
            request.target = int(target)
        if channel is not None:
            request.activity_channel = int(channel)
        if fill is not None and not (isinstance(fill, str) and fill == "mean"):
            values = np.asarray(fill, dtype=np.float64).reshape(-1)
            if values.size == 1:
                request.fill_value = float(values[0])
            else:
                request.fill_per_channel.CopyFrom(array_to_tensor(values, pb.Tensor))
        return request

    @staticmethod
    def _maps(r: pb.OcclusionResponse) -> OcclusionMaps:
        return OcclusionMaps(r.target, r.activity_layer, r.activity_channel, _opt_array(r.probability),
                             _opt_array(r.argmax), _opt_array(r.activity), _opt_array(r.attribution), dict(r.png),
                             r.base_probability, r.base_activity, np.asarray(r.starts, dtype=np.int64), r.window,
                             r.stride, np.asarray(r.fill, dtype=np.float64), r.fill_units, r.attribution_on,
                             r.backend, r.seconds)

    def occlude(self, image, *, window: int = 32, stride: int = 8, fill="mean", target: int | None = None,
                outputs: Iterable[str] | None = None, layer: str | None = None, channel: int | None = None,
                attribution_on_logits: bool = False, return_png: bool = False, model: str = "",
                timeout: float | None = None, fill_in_pixels: bool = False,
                progress: Callable[[int, int], None] | None = None) -> OcclusionMaps:
        """One image's occlusion maps. With ``progress(done, total)`` the streaming RPC is used."""
        request = self._occlusion_request(image, window, stride, fill, target, outputs, layer, channel,
                                          attribution_on_logits, return_png, model, fill_in_pixels)
        if progress is None:
            return self._maps(self._call(self._stub.OcclusionSweep, request, timeout))
        try:
            for event in self._stub.OcclusionSweepStream(request, timeout=timeout or self.timeout,
                                                         metadata=self._metadata):
                if event.WhichOneof("event") == "progress":
                    progress(event.progress.done, event.progress.total)
                else:
                    return self._maps(event.result)
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
