"""Bearer-token authentication: every RPC except the health service must carry ``authorization: Bearer <token>``.

The token is compared with ``hmac.compare_digest`` (constant time). Health is exempt so that load balancers
and Kubernetes probes work without the secret; reflection is not exempt (it describes the API).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from ..errors import InvalidArgumentError

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"--auth-token-file: no such file: {path}", field="auth_token_file")
    token = path.read_bytes().strip()
    if not token or len(token) < 16:
        raise InvalidArgumentError(f"--auth-token-file: {path} must hold a token of at least 16 characters",
                                   field="auth_token_file")
    return token


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

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
        self._expected = b"Bearer " + token
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        values = [value for key, value in (handler_call_details.invocation_metadata or ())
                  if key == "authorization"]
        given = values[0] if values else None
        if isinstance(given, str):
            given = given.encode()
        handler = await continuation(handler_call_details)
        if given is not None and hmac.compare_digest(given, self._expected):
            return handler
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        reason = "missing authorization metadata" if given is None else "wrong token"
        return _denied(handler, f"authorization: {reason}; send 'authorization: Bearer <token>'")
