"""The zfserve gRPC server: the zfserve.v1 API and the Open Inference Protocol on one port.

Library use::

    from zfserve.server import ServerOptions, serve
    asyncio.run(serve(ServerOptions(port=8001)))

Names are imported lazily, so light modules of this package (``tensors``, used by the client) do not pull in
the engines.
"""

__all__ = ["BatcherConfig", "ServerOptions", "ZFServer", "serve"]


def __getattr__(name):
    if name == "BatcherConfig":
        from .batcher import BatcherConfig
        return BatcherConfig
    if name in ("ServerOptions", "ZFServer", "serve"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'zfserve.server' has no attribute {name!r}")
