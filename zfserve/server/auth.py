"""Bearer-token authentication: every RPC and HTTP route except the health checks must carry exactly one
``authorization: Bearer <token>``.

The scheme is case-insensitive (RFC 7235: ``bearer`` works too); the token is compared with
``hmac.compare_digest`` (constant time); two authorization values in one request are refused on both sides
(a proxy and the server could otherwise each read a different one). The health checks are exempt, the same
ones over gRPC and HTTP, so that load balancers and Kubernetes probes work without the secret: gRPC health,
and the Open Inference Protocol's server liveness and readiness (ServerLive / ServerReady, over REST
``/v2/health/live`` and ``/v2/health/ready``). Reflection is not exempt (it describes the API). An
unauthenticated call to a method that does not exist gets UNAUTHENTICATED too, exactly as a real one does, so
a caller without the token cannot tell which methods exist. ``/metrics`` takes the same header.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from ..errors import InvalidArgumentError

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                   "/inference.GRPCInferenceService/ServerReady")
EXEMPT_PATHS = ("/v2/health/live", "/v2/health/ready")     # the same checks over HTTP


def read_token(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"--auth-token-file: no such file: {path}", field="auth_token_file")
    token = path.read_bytes().strip()
    if not token or len(token) < 16:
        raise InvalidArgumentError(f"--auth-token-file: {path} must hold a token of at least 16 characters",
                                   field="auth_token_file")
    return token


def authorized(header, token: bytes) -> bool:
    """Whether an ``authorization`` header value (str or bytes, or None) is ``Bearer <token>``, the scheme in
    any case."""
    if header is None:
        return False
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, given = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def refusal(values: list, token: bytes) -> str | None:
    """Why one request's authorization values are refused, in words (None: exactly one, and it is
    ``Bearer <token>``)."""
    if not values:
        return "missing"
    if len(values) > 1:
        return f"{len(values)} values; send exactly one"
    return None if authorized(values[0], token) else "wrong token or scheme"


def _denied(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:   # an unknown method: refused like a known one (raw bytes in, nothing out)
        return grpc.unary_unary_rpc_method_handler(deny)
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: bytes, exempt_prefixes=EXEMPT_PREFIXES):
        self._token = token
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        values = [value for key, value in (handler_call_details.invocation_metadata or ())
                  if key == "authorization"]
        handler = await continuation(handler_call_details)
        reason = refusal(values, self._token)
        if reason is None:
            return handler   # None for an unknown method: gRPC answers UNIMPLEMENTED, to an authorized caller
        return _denied(handler, f"authorization: {reason}; send 'authorization: Bearer <token>'")
