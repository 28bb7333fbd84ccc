"""KServe's v1 protocol on the HTTP side, so a KServe v1 client (``kserve.InferenceRESTClient`` with
``RESTConfig(protocol="v1")``), or an InferenceService whose explainer points at zfserve, gets predictions and
occlusion heatmaps:

  GET  /v1/models                    {"models": [NAME, ...]}
  GET  /v1/models/NAME               {"name": NAME, "ready": true}; 503 {"error"} while not ready
  POST /v1/models/NAME:predict       {"instances": [...]} -> {"predictions": [probabilities, ...]}
  POST /v1/models/NAME:explain       {"instances": [...], "parameters": {...}} ->
                                     {"predictions": [...], "explanations": [{"heatmap": [[...]], "target": k}]}

An instance is an encoded image ``{"b64": "<base64 JPEG/PNG/WebP>"}`` or a preprocessed image as nested lists
[3][S][S]; one request holds one kind. Each route is the OIP model's ModelInfer (NAME or NAME-bytes for predict,
NAME-occlusion[-bytes] for explain, whose settings ``window``, ``stride``, ``target`` and ``fill`` come from
``parameters``), so the checks, limits, pools, statistics and messages are those of /v2. Errors are KServe's:
the status and ``{"error": "..."}``. Bodies are parsed and answers encoded on the HTTP parse lane, off the event
loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._proto.inference import grpc_service_pb2 as pb
from ..wire import BYTES_INPUT, CLASSIFY, IMAGE_INPUT, OCCLUSION, OIP_DTYPES, encode_bytes_elements, oip_model_name
from .http import HttpContext, HttpError, copy_parameters, http_error, read_body
from .http_body import load_json, numbers
from .http_guard import with_limit
from .oip_explain import HEATMAP, PROBABILITIES, TARGET
from .rest import error_endpoint
from .status import ServiceError


def _instances(doc, field: str = "instances") -> tuple[str, list]:
    """The input kind and values of a v1 body's instances (encoded bytes, or flat float32 arrays)."""
    if not isinstance(doc, dict) or not isinstance(doc.get(field), list) or not doc[field]:
        raise HttpError(400, f'{field}: missing or empty; the body is {{"{field}": [{{"b64": "<base64 image>"}} '
                             f'or [3][S][S] nested lists, ...]}}', field)
    encoded, tensors = [], []
    for i, instance in enumerate(doc[field]):
        where = f"{field}[{i}]"
        if isinstance(instance, dict):
            if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise HttpError(400, f'{where}: an object must be {{"b64": "<base64 image>"}}', where)
            try:
                encoded.append(base64.b64decode(instance["b64"], validate=True))
            except (binascii.Error, ValueError):
                raise HttpError(400, f"{where}.b64: not base64", f"{where}.b64") from None
        else:
            tensors.append(numbers(instance, np.float32, where))
    if encoded and tensors:
        raise HttpError(400, f"{field}: mixes b64 images and nested lists; send one kind per request", field)
    return (BYTES_INPUT, encoded) if encoded else (IMAGE_INPUT, tensors)


def _infer_request(doc, model: str, task: str) -> pb.ModelInferRequest:
    """A v1 body -> the ModelInferRequest of the OIP model of ``task`` and the instances' kind."""
    kind, values = _instances(doc)
    request = pb.ModelInferRequest(model_name=oip_model_name(model, kind, task))
    copy_parameters(request, doc.get("parameters") or {})
    if kind == BYTES_INPUT:
        request.inputs.add(name=kind, datatype="BYTES", shape=[len(values), 1])
        request.raw_input_contents.append(encode_bytes_elements(values))
        return request
    sizes = {v.size for v in values}
    side = math.isqrt(max(sizes) // 3)
    if len(sizes) != 1 or 3 * side * side != values[0].size:
        raise HttpError(400, f"instances: each must hold 3 x S x S numbers (a [3][S][S] image), got "
                             f"{sorted(sizes)[:4]}", "instances")
    request.inputs.add(name=kind, datatype="FP32", shape=[len(values), 3, side, side])
    request.raw_input_contents.append(np.stack(values).astype("<f4").tobytes())
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {tensor.name: np.frombuffer(raw, dtype=OIP_DTYPES[tensor.datatype]).reshape([int(s) for s in tensor.shape])
            for tensor, raw in zip(response.outputs, response.raw_output_contents)}


def _predict_answer(response) -> bytes:
    return json.dumps({"predictions": _outputs(response)[PROBABILITIES].tolist()}).encode()


def _explain_answer(response) -> bytes:
    arrays = _outputs(response)
    settings = {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in response.parameters.items()}
    explanations = [{"heatmap": heatmap.tolist(), "target": int(target[0]), **settings}
                    for heatmap, target in zip(arrays[HEATMAP], arrays[TARGET])]
    return json.dumps({"predictions": arrays[PROBABILITIES].tolist(), "explanations": explanations}).encode()


class KServeV1:
    def __init__(self, oip, max_body_bytes: int, parse_pool, max_json_values: int):
        self.oip, self.state = oip, oip.state
        self.max_body_bytes, self.parse_pool, self.max_json_values = max_body_bytes, parse_pool, max_json_values

    def _served(self, name: str):
        model = self.state.repository.models.get(name)
        if model is None:
            raise HttpError(404, f"model: unknown model {name!r}; served: {sorted(self.state.repository.models)}",
                            "model")
        return model

    async def _lane(self, fn, request, work: int):
        def job(_):
            try:
                return fn()
            except HttpError as exc:   # a refusal, without its traceback (which would keep the body alive)
                raise exc.with_traceback(None)
        try:
            return await self.parse_pool.run(job, client=HttpContext.of(request).peer(), work=work)
        except ServiceError as exc:   # the lane is full: 503
            raise http_error(exc) from None

    async def models(self, request):
        return JSONResponse({"models": sorted(self.state.repository.models)})

    async def ready(self, request):
        name = request.path_params["name"]
        model = self._served(name)
        if not self.state.model_ready(model):
            raise HttpError(503, f"model {name!r} is not ready: {model.reason or 'the server is shutting down'}",
                            headers={"Retry-After": "1"})
        return JSONResponse({"name": name, "ready": True})

    async def predict(self, request):
        return await self._run(request, CLASSIFY, _predict_answer)

    async def explain(self, request):
        return await self._run(request, OCCLUSION, _explain_answer)

    async def _run(self, request, task, answer):
        name = request.path_params["name"]
        self._served(name)
        body = await read_body(request, self.max_body_bytes)
        infer_request = await self._lane(
            lambda: _infer_request(load_json(body, max_values=self.max_json_values), name, task),
            request, len(body))
        del body
        response = await self.oip.ModelInfer(infer_request, HttpContext.of(request))
        data = await self._lane(lambda: answer(response), request, 1)
        return Response(data, 200, media_type="application/json")


def kserve_v1_routes(oip, max_body_bytes: int, parse_pool, max_json_values: int) -> list[Route]:
    """The /v1 routes over ``oip`` (the InferenceServicer); ``parse_pool`` parses bodies and encodes answers."""
    v1 = KServeV1(oip, max_body_bytes, parse_pool, max_json_values)

    def post(path, handler):
        return with_limit(Route(path, error_endpoint(handler), methods=["POST"]), max_body_bytes, "--max-message-bytes")
    return [post("/v1/models/{name}:predict", v1.predict), post("/v1/models/{name}:explain", v1.explain),
            Route("/v1/models", error_endpoint(v1.models), methods=["GET"]),
            Route("/v1/models/{name}", error_endpoint(v1.ready), methods=["GET"])]


__all__ = ["kserve_v1_routes"]
