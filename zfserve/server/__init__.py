"""The zfserve gRPC server: the zfserve.v1 API and the Open Inference Protocol on one port.

Library use::

    from zfserve.server import ServerOptions, serve
    asyncio.run(serve(ServerOptions(port=8001)))          # an asyncio program: runs until SIGTERM

    from zfserve.server import BackgroundServer
    with BackgroundServer(ServerOptions(port=0)) as server:   # any program: a thread runs the server
        print(server.target)

Names are imported lazily, so that importing one module of this package does not start all of them.
"""

__all__ = ["BackgroundServer", "BatcherConfig", "HttpLimits", "ServerOptions", "ZFServer", "serve"]


def __getattr__(name):
    if name == "BatcherConfig":
        from .batcher import BatcherConfig
        return BatcherConfig
    if name == "HttpLimits":
        from .http_listener import HttpLimits
        return HttpLimits
    if name == "BackgroundServer":
        from .background import BackgroundServer
        return BackgroundServer
    if name in ("ServerOptions", "ZFServer", "serve"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'zfserve.server' has no attribute {name!r}")
