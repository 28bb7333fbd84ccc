"""Mapping of errors to gRPC statuses, in one place for every servicer.

- zfserve's typed errors: NotFoundError -> NOT_FOUND, every other input error -> INVALID_ARGUMENT, with the
  error's own message (it names the field and the accepted range);
- :class:`ServiceError` subclasses carry their own code (UNAVAILABLE for overload and shutdown,
  DEADLINE_EXCEEDED, CANCELLED, FAILED_PRECONDITION for a feature the server was started without); a
  capability the model's kind lacks (ModelKindError) is FAILED_PRECONDITION too;
- anything else is a bug: INTERNAL with a generic message (the traceback goes to the log, never to a client).
No message to a client carries a server path: directories are cut from any path in it (the file name stays).
"""

from __future__ import annotations

import logging
import re

import grpc

from ..errors import ModelKindError, ModelLoadError, NotFoundError, ZFServeError

log = logging.getLogger("zfserve.server")


class ServiceError(Exception):
    """An error with a fixed gRPC status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(ServiceError):
    """The server is not set up for this request (not worth retrying as is)."""
    code = grpc.StatusCode.FAILED_PRECONDITION


_DIRECTORIES = re.compile(r"(?:/[^/\s:'\"()]+)+/")   # POSIX absolute paths, up to their last "/"


def without_paths(message: str) -> str:
    """``message`` with the directory part of every absolute path removed (``/srv/m/w.bin`` -> ``w.bin``)."""
    return _DIRECTORIES.sub("", message)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = _status(exc)
    return code, without_paths(message)


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelKindError):   # the model cannot do this (deconv of an ONNX graph): not worth a retry
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ModelLoadError):
        log.error("model error: %s", exc)
        return grpc.StatusCode.INTERNAL, f"model error: {exc}"
    if isinstance(exc, ZFServeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
