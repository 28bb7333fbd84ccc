"""The explorer page (``/``) and its API (``/api/v1``), the HTTP contract the page is written against.

Uploads go to a bounded in-memory store keyed by their SHA-256, so a page URL that names an image id restores
the view while the server holds it (least recently used images go first; the bundled examples stay). Every
analysis route is the zfserve.v1 handler of the same name (Classify, DeconvProject, OcclusionSweepStream,
ListModels, GetModelInfo) called through :class:`~.http.HttpContext`: the same decoder, pixel budget, decode
lanes, heavy-work pool, limits and messages as gRPC (field names of the protobuf request, such as
``images.encoded[0]``, read ``image`` here). A sweep streams newline-delimited JSON (progress, then the result);
a client that goes away cancels it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import wire
from .._proto.v1 import zfserve_pb2 as pb
from ..engine.results import DECONV_INTERPRETATION
from ..capabilities import refusal
from ..errors import ModelKindError, NotFoundError, ZFServeError
from ..preprocess import DEFAULT_MAX_BYTES, read_header
from .http import HttpContext, HttpError, read_body
from .http_body import CONTROL_BODY_BYTES, load_json
from .http_guard import with_limit

EXPLORER_DIR = Path(__file__).with_name("explorer")
OCCLUSION_INTERPRETATION = "occlusion sensitivity: drop of the target class's probability"
STORE_BYTES = 256 << 20          # uploads kept for restorable URLs
STORE_IMAGES = 512
_PROTO_FIELD = re.compile(r"^(images\.encoded\[\d+\]|images\.tensor|images)(?=:)")   # a message's field


class ImageStore:
    """Uploaded images by SHA-256, at most ``max_bytes`` and ``max_images`` (least recently used dropped first);
    pinned ones (the bundled examples) are never dropped."""

    def __init__(self, max_bytes: int = STORE_BYTES, max_images: int = STORE_IMAGES):
        self.max_bytes, self.max_images = max_bytes, max_images
        self._items: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()
        self._pinned: set[str] = set()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, data, *, pinned: bool = False) -> dict:
        """Check ``data``'s header with the server's decoder limits and keep it; returns its description."""
        data = bytes(data)   # kept: a copy of a large upload the listener received into a memory map
        try:
            header = read_header(data, field="image")
        except ZFServeError as exc:
            raise HttpError(400, str(exc), "image") from None
        digest = hashlib.sha256(data).hexdigest()
        info = {"id": digest, "width": header.width, "height": header.height, "format": header.format}
        with self._lock:
            if digest not in self._items:
                self._items[digest] = (data, info)
                self._size += len(data)
            self._items.move_to_end(digest)
            if pinned:
                self._pinned.add(digest)
            for key in [k for k in self._items if k not in self._pinned]:
                if self._size <= self.max_bytes and len(self._items) <= self.max_images:
                    break
                self._size -= len(self._items.pop(key)[0])
        return info

    def get(self, digest: str) -> tuple[bytes, dict]:
        with self._lock:
            if digest not in self._items:
                raise HttpError(404, f"image: unknown or expired id {digest[:16]}...; upload the file again", "image")
            self._items.move_to_end(digest)
            return self._items[digest]


def _page_error(exc: HttpError) -> JSONResponse:
    message = _PROTO_FIELD.sub("image", exc.message, count=1)
    field = "image" if exc.field and exc.field.startswith("images") else exc.field
    return JSONResponse({"error": message, "field": field}, exc.status, headers=exc.headers)


def _endpoint(fn):
    async def endpoint(request):
        try:
            return await fn(request)
        except HttpError as exc:
            return _page_error(exc)
        except ZFServeError as exc:   # a check made here, before any handler (e.g. the sweep's arguments)
            status = 404 if isinstance(exc, NotFoundError) else 409 if isinstance(exc, ModelKindError) else 400
            return _page_error(HttpError(status, str(exc), exc.field))
    return endpoint


async def _request_json(request) -> dict:
    """The request's JSON object (at most CONTROL_BODY_BYTES, parsed on the loop: < 1 ms)."""
    body = await read_body(request, CONTROL_BODY_BYTES, "the limit of routes without uploads")
    try:
        doc = load_json(body or b"{}")
    except HttpError as exc:
        raise HttpError(exc.status, f"{exc.message}; send an object such as {{\"image\": \"<id>\"}}",
                        "body") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "body: must be a JSON object", "body")
    return doc


def _optional_int(doc: dict, key: str):
    """An optional integer of the request (the handler checks its own range; here only that it fits the
    message's int32 field)."""
    value = doc.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                              not -(1 << 31) <= value < (1 << 31)):
        raise HttpError(400, f"{key}: must be an integer, got {value!r:.40}", key)
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ExplorerApi:
    """The page's /api/v1 handlers over ``zfserve``, the ZFServeServicer: uploads in a bounded store, the
    bundled examples pinned in it."""

    def __init__(self, state, zfserve, max_body_bytes: int):
        self.state, self.zfserve = state, zfserve
        self.store = ImageStore()
        self.examples = [{"name": path.stem, "id": self.store.put(path.read_bytes(), pinned=True)["id"]}
                         for path in sorted((EXPLORER_DIR / "examples").glob("*.jpg"))]
        self.upload_limit = min(max_body_bytes, DEFAULT_MAX_BYTES)

    def images(self, doc) -> pb.Images:
        image = doc.get("image")
        if not isinstance(image, str):
            raise HttpError(400, "image: give the id of an uploaded image (POST /api/v1/images)", "image")
        return pb.Images(encoded=[self.store.get(image)[0]])

    async def models(self, request):
        listed = await self.zfserve.ListModels(pb.ListModelsRequest(), HttpContext.of(request))
        out = []
        for m in listed.models:
            entry = {"name": m.name, "version": m.version, "oip_version": m.oip_version, "ready": m.ready,
                     "reason": m.reason, "num_classes": m.num_classes, "index": None,
                     "labels": {"deconv": DECONV_INTERPRETATION, "occlusion": OCCLUSION_INTERPRETATION}}
            if m.ready:
                info = await self.zfserve.GetModelInfo(pb.GetModelInfoRequest(model=m.name), HttpContext.of(request))
                entry.update(class_names=list(info.class_names), input_size=int(info.input_shape[-1]),
                             training_data=info.training_data,
                             ood={"available": info.ood.available, "threshold": info.ood.threshold,
                                  "acceptance": info.ood.acceptance, "method": info.ood.method,
                                  "note": info.ood.note},
                             layers=[{"name": layer.name, "shape": list(layer.shape),
                                      "receptive_field": layer.receptive_field, "stride": layer.stride}
                                     for layer in info.layers])
                runtime = self.state.repository.get(m.name).runtime
                # The page's layer tabs: the model's conv layers, by its own names (conv1.., conv1_1.., ...).
                entry["conv_layers"] = list(runtime.config.conv_layers) if runtime is not None else []
                # What replaces the units panel when the model's layers are unknown (an ONNX model).
                entry["layers_note"] = "" if runtime is None or runtime.has_layers else \
                    refusal(runtime.config.kind, "Strongest units per layer (deconv)")
                index = _unit_index(self.state, m.name)
                entry["index"] = index.describe() if index is not None else None
            out.append(entry)
        return JSONResponse({"default": listed.default_model, "models": out})

    async def upload(self, request):
        data = await read_body(request, self.upload_limit)
        if not data:
            raise HttpError(400, "image: empty upload (0 bytes); send a JPEG, PNG or WebP file", "image")
        return JSONResponse(await asyncio.to_thread(self.store.put, data))

    async def image(self, request):
        data, info = self.store.get(request.path_params["id"])
        return Response(data, media_type=f"image/{info['format'].lower()}")

    async def example_list(self, request):
        return JSONResponse(self.examples)

    async def classify(self, request):
        doc = await _request_json(request)
        req = pb.ClassifyRequest(images=self.images(doc), model=str(doc.get("model") or ""))
        if _optional_int(doc, "top_k") is not None:
            req.top_k = doc["top_k"]
        response = await self.zfserve.Classify(req, HttpContext.of(request))
        top = wire.predictions(response)[0]
        predictions = [{"index": p.index, "name": p.name, "probability": p.probability} for p in top]
        return JSONResponse({"model": response.model, "version": response.model_version,
                             "predictions": predictions, "ood": top.ood.to_json() if top.ood else None,
                             "ood_note": response.ood_note})

    async def deconv(self, request):
        doc = await _request_json(request)
        req = pb.DeconvRequest(images=self.images(doc), model=str(doc.get("model") or ""),
                               layer=str(doc.get("layer") or ""), return_png=True, return_patches=True)
        if _optional_int(doc, "top_k") is not None:
            req.top_k = doc["top_k"]
        response = await self.zfserve.DeconvProject(req, HttpContext.of(request))
        units = [{"channel": u.channel, "y": u.y, "x": u.x, "activation": u.activation, "box": list(u.box),
                  "projection_png": _b64(u.png), "patch_png": _b64(u.patch_png)} for u in wire.projections(response)]
        return JSONResponse({"model": response.model, "version": response.model_version, "layer": req.layer,
                             "label": response.interpretation or DECONV_INTERPRETATION, "units": units})

    async def occlusion(self, request):
        doc = await _request_json(request)
        # gated: the fastest mode that passed the model's agreement gate for these settings, else exact.
        req = pb.OcclusionRequest(images=self.images(doc), model=str(doc.get("model") or ""),
                                  outputs=["probability", "attribution"], gated=True)
        for key in ("window", "stride", "target"):
            if _optional_int(doc, key) is not None:
                setattr(req, key, doc[key])
        # The class names of the runtime the sweep is about to take (nothing awaits in between), so a reload
        # during the sweep cannot name its target from another version.
        runtime = self.state.repository.get(req.model).runtime
        names = list(runtime.config.class_names) if runtime is not None else []
        stream = self.zfserve.OcclusionSweepStream(req, HttpContext.of(request))
        try:   # the first event (or the error) comes before the status: a bad request is a plain 4xx
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return StreamingResponse(_sweep_lines(first, stream, names), media_type="application/x-ndjson")

    async def unit_index(self, request):
        p = request.path_params
        index = _unit_index(self.state, p["model"])
        if index is None:
            raise HttpError(404, f"index: model {p['model']} has no unit index; build it with zfserve index --model "
                                 f"{p['model']} --data synthetic", "index")
        # A strip's decode and nine PNG encodes: off the event loop, which the gRPC side shares.
        units = await asyncio.to_thread(index.units, p["layer"], int(p["channel"]))
        return JSONResponse({"model": p["model"], "layer": p["layer"], "channel": int(p["channel"]),
                             "data": index.describe().get("data"),
                             "units": [{**{k: v for k, v in u.items() if k != "patch_png"},
                                        "patch_png": _b64(u["patch_png"])} for u in units]})


async def _page(request):
    if not (EXPLORER_DIR / "index.html").is_file():
        return JSONResponse({"error": "the explorer page is not installed with this package"}, 404)
    return FileResponse(EXPLORER_DIR / "index.html", media_type="text/html")


def explorer_routes(state, zfserve, max_body_bytes: int) -> list:
    """The page and /api/v1 over ``zfserve``, the ZFServeServicer."""
    api = ExplorerApi(state, zfserve, max_body_bytes)

    def route(path, handler, method):
        made = Route(path, _endpoint(handler), methods=[method])
        return with_limit(made, api.upload_limit, "--max-message-bytes") if handler == api.upload else made

    routes = [Route("/", _page, methods=["GET"]),
              route("/api/v1/models", api.models, "GET"),
              route("/api/v1/images", api.upload, "POST"),
              route("/api/v1/images/{id}", api.image, "GET"),
              route("/api/v1/examples", api.example_list, "GET"),
              route("/api/v1/classify", api.classify, "POST"),
              route("/api/v1/deconv", api.deconv, "POST"),
              route("/api/v1/occlusion", api.occlusion, "POST"),
              route("/api/v1/index/{model}/{layer}/{channel:int}", api.unit_index, "GET")]
    if EXPLORER_DIR.is_dir():
        routes.append(Mount("/explorer", StaticFiles(directory=EXPLORER_DIR), name="explorer"))
    return routes


async def _events(first, stream):
    yield first
    async for event in stream:
        yield event


async def _sweep_lines(first, stream, names: list[str]):
    """The NDJSON lines of a streaming sweep; an error after the stream started is its last line."""
    try:
        async for event in _events(first, stream):
            if event.WhichOneof("event") == "progress":
                yield json.dumps({"progress": {"done": event.progress.done, "total": event.progress.total}}) + "\n"
            else:
                # 50,176 attribution values as JSON text take ~20 ms: off the event loop the gRPC side shares.
                yield await asyncio.to_thread(_result_line, event.result, names)
    except HttpError as exc:
        body = json.loads(_page_error(exc).body)
        yield json.dumps({"error": body}) + "\n"
    finally:
        await stream.aclose()   # the page went away (or the sweep ended): stop the computation


def _sweep_result(response: pb.OcclusionResponse, names: list[str]) -> dict:
    result = wire.occlusion_result(response)
    return {"model": response.model, "version": response.model_version, "label": OCCLUSION_INTERPRETATION,
            "settings": {"window": result.window, "stride": result.stride, "fill": "mean", "target": result.target,
                         "target_name": names[result.target], "attribution_on": result.attribution_on},
            "positions": list(result.shape), "starts": [int(s) for s in result.starts],
            "probability": np.round(result.probability.astype(np.float64), 6).tolist(),
            "base_probability": result.base_probability, "min_probability": float(result.probability.min()),
            "mode": {"name": result.mode, "engine": result.engine, "precision": result.precision,
                     "gate": result.gate, "evaluated": None if result.evaluated is None else
                     int(np.count_nonzero(result.evaluated))},
            "attribution": np.round(result.attribution.astype(np.float64), 6).tolist()}


def _result_line(result, names: list[str]) -> str:
    return json.dumps({"result": _sweep_result(result, names)}) + "\n"


def _unit_index(state, name: str):
    """The model's unit index (``zfserve index``), or None."""
    from ..paper.unit_index import find_index   # lazy: the page's other routes need no paper module
    model = state.repository.get(name)
    runtime = model.runtime
    return find_index(runtime.snapshot) if runtime is not None else None


__all__ = ["EXPLORER_DIR", "ImageStore", "OCCLUSION_INTERPRETATION", "explorer_routes"]
