"""The Open Inference Protocol's REST routes (``/v2``), each a thin call of the gRPC handler of the same name
(see :mod:`.http`): the same models, names, versions, checks, errors and limits as over gRPC."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._proto.inference import grpc_service_pb2 as pb
from .http import (HEADER_LENGTH, HttpContext, HttpError, copy_parameters, http_error, infer_response, parse_infer,
                   read_body, to_json)
from .http_body import CONTROL_BODY_BYTES, load_json
from .http_guard import with_limit
from .status import ServiceError


def error_endpoint(fn):
    """A route handler whose HttpError becomes KServe's error body ``{"error": message}``."""
    async def endpoint(request):
        try:
            return await fn(request)
        except HttpError as exc:
            return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
    return endpoint


def _truth(value: bool) -> Response:
    """KServe's health and readiness answers: the status says it (200 true, 400 false)."""
    return Response(status_code=200 if value else 400)


async def _json_body(request) -> dict:
    """A control route's JSON object (at most CONTROL_BODY_BYTES, so parsed here, on the loop: < 1 ms)."""
    body = await read_body(request, CONTROL_BODY_BYTES, "the limit of routes without uploads")
    if not body.strip():
        return {}
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise HttpError(400, "request body: must be a JSON object", "body")
    return doc


def _model(request) -> tuple[str, str]:
    return request.path_params.get("name", ""), request.path_params.get("version", "")


class OipRest:
    """The /v2 handlers over ``oip``, the gRPC InferenceServicer: each builds the RPC's request, awaits the
    handler with an :class:`HttpContext` and writes KServe's REST answer."""

    def __init__(self, oip, max_body_bytes: int, parse_pool, max_json_values: int):
        self.oip, self.max_body_bytes = oip, max_body_bytes
        self.parse_pool, self.max_json_values = parse_pool, max_json_values

    async def server_metadata(self, request):
        message = pb.ServerMetadataRequest()
        return JSONResponse(to_json(await self.oip.ServerMetadata(message, HttpContext.of(request))))

    async def live(self, request):
        return _truth((await self.oip.ServerLive(pb.ServerLiveRequest(), HttpContext.of(request))).live)

    async def ready(self, request):
        return _truth((await self.oip.ServerReady(pb.ServerReadyRequest(), HttpContext.of(request))).ready)

    async def model_metadata(self, request):
        name, version = _model(request)
        message = pb.ModelMetadataRequest(name=name, version=version)
        return JSONResponse(to_json(await self.oip.ModelMetadata(message, HttpContext.of(request))))

    async def model_ready(self, request):
        name, version = _model(request)
        message = pb.ModelReadyRequest(name=name, version=version)
        return _truth((await self.oip.ModelReady(message, HttpContext.of(request))).ready)

    async def model_config(self, request):
        name, version = _model(request)
        message = pb.ModelConfigRequest(name=name, version=version)
        response = await self.oip.ModelConfig(message, HttpContext.of(request))
        return JSONResponse(to_json(response.config))

    async def model_stats(self, request):
        name, version = _model(request)
        message = pb.ModelStatisticsRequest(name=name, version=version)
        return JSONResponse(to_json(await self.oip.ModelStatistics(message, HttpContext.of(request))))

    async def infer(self, request):
        name, version = _model(request)
        body = await read_body(request, self.max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)

        def parse(job):
            try:
                return parse_infer(body, header_length, name, version, self.max_json_values)
            except HttpError as exc:   # a refusal, sent without its traceback, which would keep the frames
                raise exc.with_traceback(None)   # (and the body in them) alive
        try:   # JSON and tensor conversion: on the parse lane, off the event loop
            infer_request, binary = await self.parse_pool.run(parse, client=HttpContext.of(request).peer(),
                                                              work=len(body))
        except ServiceError as exc:   # the lane is full: 503
            raise http_error(exc) from None
        del body, parse
        response = await self.oip.ModelInfer(infer_request, HttpContext.of(request))
        data, headers = infer_response(response, binary)
        return Response(data, 200, headers=headers)

    async def repository_index(self, request):
        doc = await _json_body(request)
        message = pb.RepositoryIndexRequest(ready=bool(doc.get("ready")))
        response = await self.oip.RepositoryIndex(message, HttpContext.of(request))
        return JSONResponse([to_json(m) for m in response.models])

    async def load(self, request):
        return await self._control(request, self.oip.RepositoryModelLoad, pb.RepositoryModelLoadRequest)

    async def unload(self, request):
        return await self._control(request, self.oip.RepositoryModelUnload, pb.RepositoryModelUnloadRequest)

    async def _control(self, request, method, message_type):
        doc = await _json_body(request)
        message = message_type(model_name=request.path_params["name"])
        copy_parameters(message, doc.get("parameters") or {})
        await method(message, HttpContext.of(request))
        return JSONResponse({})


def oip_routes(oip, max_body_bytes: int, parse_pool, max_json_values: int) -> list[Route]:
    """The /v2 routes over ``oip``, the gRPC InferenceServicer; ``parse_pool`` parses infer bodies."""
    rest = OipRest(oip, max_body_bytes, parse_pool, max_json_values)

    def route(path, handler, method="GET"):
        made = Route(path, error_endpoint(handler), methods=[method])
        return with_limit(made, max_body_bytes, "--max-message-bytes") if handler == rest.infer else made

    model_handlers = (("", rest.model_metadata, "GET"), ("/ready", rest.model_ready, "GET"),
                      ("/config", rest.model_config, "GET"), ("/stats", rest.model_stats, "GET"),
                      ("/infer", rest.infer, "POST"))
    model_routes = [route(f"{prefix}{suffix}", handler, method)
                    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
                    for suffix, handler, method in model_handlers]
    return [
        route("/v2", rest.server_metadata),
        route("/v2/health/live", rest.live),
        route("/v2/health/ready", rest.ready),
        route("/v2/models/stats", rest.model_stats),
        route("/v2/repository/index", rest.repository_index, "POST"),
        route("/v2/repository/models/{name}/load", rest.load, "POST"),
        route("/v2/repository/models/{name}/unload", rest.unload, "POST"),
        *model_routes,
    ]


__all__ = ["error_endpoint", "oip_routes"]
