"""The HTTP side of the server (``zfserve serve --http-port PORT``): the Open Inference Protocol's REST API under
``/v2`` (so ``tritonclient.http``, ``perf_analyzer -i http``, curl and KServe's REST clients work), the explorer
page's API under ``/api/v1`` (:mod:`.explorer_api`) and the page itself at ``/``. Starlette on uvicorn, on the
gRPC server's own event loop.

The routes are thin: each turns its HTTP request into the protobuf request of the matching RPC and calls the
gRPC servicer's handler with :class:`HttpContext` in place of a gRPC context, so both sides share every check,
limit, the dynamic batcher, the decode stage, the statistics and the metrics. A handler's error status becomes
the HTTP status below, its message a JSON body ``{"error": "..."}`` (``field`` added on the page's routes).

REST conventions (KServe v2 / Triton): health is 200 (true) or 400 (false); tensors are JSON (``data``, flat or
nested, row-major) or, with the binary tensor extension, raw bytes after the JSON header, whose length is the
``Inference-Header-Content-Length`` header (an input's ``parameters.binary_data_size`` says how many bytes are
its own; ``binary_data_output`` / an output's ``binary_data`` asks for binary outputs).
"""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from .._proto.inference import grpc_service_pb2 as pb
from ..wire import OIP_DTYPES, encode_bytes_elements

log = logging.getLogger("zfserve.server")

HEADER_LENGTH = "inference-header-content-length"
# gRPC status -> HTTP status (KServe's REST mapping: 400 bad request, 404 unknown, 503 overload / not ready).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


class HttpError(Exception):
    """An error with its HTTP status; ``field`` names the request field when known."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


class HttpContext:
    """What the gRPC servicers ask of their context, for a call that came over HTTP: no deadline (REST has
    none), and ``abort`` raising :class:`HttpError` with the mapped status."""

    def __init__(self, peer: str = "http"):
        self._peer = peer

    def time_remaining(self):
        return None

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, message: str):
        status = HTTP_STATUS.get(code, 500)
        headers = {"Retry-After": "1"} if status == 503 else None
        field = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
        raise HttpError(status, message, field, headers)


def to_json(message) -> dict:
    """A protobuf message as KServe/Triton REST JSON: proto field names, every field (defaults included), and
    64-bit integers as JSON numbers (protobuf's own JSON mapping writes them as strings)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _numbers(data, message.DESCRIPTOR)


def _numbers(data, descriptor):
    for key, value in list(data.items()):
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                inner = field.message_type.fields_by_name["value"]
                if inner.message_type is not None:
                    data[key] = {k: _numbers(v, inner.message_type) for k, v in value.items()}
            elif isinstance(value, list):
                data[key] = [_numbers(v, field.message_type) for v in value]
            else:
                data[key] = _numbers(value, field.message_type)
        elif field.type in _INT64:
            data[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


# ------------------------------------------------------------------------------------------------- infer
def _input_raw(tensor: dict, index: int, binary: memoryview, offset: int) -> tuple[bytes, int]:
    """The raw bytes of one REST input (from the binary section or its JSON ``data``) and the new offset. The
    gRPC handler then checks them against the shape and datatype as it checks raw_input_contents."""
    field = f"inputs[{index}]"
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise HttpError(400, f"{field}.parameters.binary_data_size: {size!r}; the binary data after the JSON "
                                 f"header holds {len(binary) - offset} more bytes", f"{field}.parameters")
        return bytes(binary[offset:offset + size]), offset + size
    if "data" not in tensor:
        raise HttpError(400, f"{field}.data: missing (give data, or parameters.binary_data_size with the binary "
                             f"tensor extension)", f"{field}.data")
    datatype = tensor.get("datatype")
    values = tensor["data"]
    if datatype == "BYTES":
        flat = list(_flatten(values))
        if not all(isinstance(v, str) for v in flat):
            raise HttpError(400, f"{field}.data: BYTES elements must be strings in JSON (binary images need the "
                                 f"binary tensor extension)", f"{field}.data")
        return encode_bytes_elements([v.encode("utf-8") for v in flat]), offset
    if datatype not in OIP_DTYPES:
        raise HttpError(400, f"{field}.datatype: {datatype!r}; accepted: {', '.join(OIP_DTYPES)}",
                        f"{field}.datatype")
    try:
        array = np.asarray(values, dtype=np.float64 if datatype.startswith("FP") else np.int64)
    except (TypeError, ValueError):
        raise HttpError(400, f"{field}.data: not a (nested) list of numbers", f"{field}.data") from None
    expected = int(np.prod(tensor["shape"], dtype=object)) if tensor["shape"] else 1
    if array.size != expected:
        raise HttpError(400, f"{field}.data: {array.size} values for shape {tensor['shape']} ({expected} expected)",
                        f"{field}.data")
    return array.astype(OIP_DTYPES[datatype]).tobytes(), offset


def _flatten(values):
    if isinstance(values, list):
        for v in values:
            yield from _flatten(v)
    else:
        yield values


def parse_infer(body: bytes, header_length: str | None, model: str,
                version: str) -> tuple[pb.ModelInferRequest, bool]:
    """A REST infer request -> the ModelInferRequest the gRPC handler takes, and whether outputs go binary."""
    if header_length is not None:
        try:
            n = int(header_length)
            if not 0 < n <= len(body):
                raise ValueError
        except ValueError:
            raise HttpError(400, f"Inference-Header-Content-Length: {header_length!r}; must be 1..{len(body)} (the "
                                 f"JSON header's length in bytes)", "Inference-Header-Content-Length") from None
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"request body: not JSON ({exc})", "body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise HttpError(400, 'inputs: missing; the body is {"inputs": [{"name", "shape", "datatype", "data"}]}',
                        "inputs")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    params = doc.get("parameters") or {}
    for key in ("timeout", "priority"):
        if key in params:
            if not isinstance(params[key], int) or isinstance(params[key], bool):
                raise HttpError(400, f"parameters.{key}: must be an integer", f"parameters.{key}")
            request.parameters[key].int64_param = params[key]
    binary_out = bool(params.get("binary_data_output"))
    offset = 0
    for i, tensor in enumerate(doc["inputs"]):
        if not isinstance(tensor, dict):
            raise HttpError(400, f"inputs[{i}]: must be an object", f"inputs[{i}]")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise HttpError(400, f"inputs[{i}].shape: must be a list of integers", f"inputs[{i}].shape")
        request.inputs.add(name=str(tensor.get("name", "")), datatype=str(tensor.get("datatype", "")), shape=shape)
        raw, offset = _input_raw(tensor, i, binary, offset)
        request.raw_input_contents.append(raw)
    for j, out in enumerate(doc.get("outputs") or []):
        if not isinstance(out, dict):
            raise HttpError(400, f"outputs[{j}]: must be an object", f"outputs[{j}]")
        request.outputs.add(name=str(out.get("name", "")))
        binary_out = binary_out or bool((out.get("parameters") or {}).get("binary_data"))
    return request, binary_out


def infer_response(response: pb.ModelInferResponse, binary: bool) -> tuple[bytes, dict]:
    """The REST body and headers of a ModelInferResponse (outputs are raw in it: FP32, and BOOL one byte each)."""
    outputs, tail = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(s) for s in tensor.shape]}
        if tensor.parameters:   # e.g. ood_score's threshold
            entry["parameters"] = {key: getattr(value, value.WhichOneof("parameter_choice"))
                                   for key, value in tensor.parameters.items()}
        if binary:
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=OIP_DTYPES[tensor.datatype]).tolist()
        outputs.append(entry)
    head = json.dumps({"model_name": response.model_name, "model_version": response.model_version,
                       "id": response.id, "outputs": outputs}).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(tail), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (counted as it arrives, not from the header)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, f"body: {length} bytes; at most {limit} are accepted (--max-message-bytes)", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body: more than {limit} bytes; at most {limit} are accepted (--max-message-bytes)",
                            "body")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["HTTP_STATUS", "HEADER_LENGTH", "HttpContext", "HttpError", "infer_response", "parse_infer", "read_body",
           "to_json"]
