"""The HTTP side of the server (``zfserve serve --http-port PORT``): the Open Inference Protocol's REST API under
``/v2`` (so ``tritonclient.http``, ``perf_analyzer -i http``, curl and KServe's REST clients work), the explorer
page's API under ``/api/v1`` (:mod:`.explorer_api`) and the page itself at ``/``. Starlette on zfserve's own
listener (:mod:`.http_listener`), on the gRPC server's own event loop.

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
import math

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from .._proto.inference import grpc_service_pb2 as pb
from ..wire import OIP_DTYPES, encode_bytes_elements
from .http_body import DEFAULT_MAX_VALUES, HttpError, load_json, numbers, read_body
from .status import to_status

log = logging.getLogger("zfserve.server")

HEADER_LENGTH = "inference-header-content-length"
# gRPC status -> HTTP status (KServe's REST mapping: 400 bad request, 404 unknown, 503 overload / not ready; 409 for
# what the model or the server is not set up to do, such as deconv of an ONNX model).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


class HttpContext:
    """What the gRPC servicers ask of their context, for a call that came over HTTP: no deadline (REST has
    none), and ``abort`` raising :class:`HttpError` with the mapped status."""

    def __init__(self, peer: str = "http"):
        self._peer = peer

    @classmethod
    def of(cls, request) -> "HttpContext":
        """The context of a Starlette request: its peer is the client's address, as gRPC writes it (the
        batcher shares its capacity fairly between peers)."""
        client = request.scope.get("client")
        return cls(f"ipv4:{client[0]}:{client[1]}" if client else "http")

    def time_remaining(self):
        return None

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, message: str):
        raise _mapped(code, message)


def _mapped(code: grpc.StatusCode, message: str) -> HttpError:
    status = HTTP_STATUS.get(code, 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    field = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    return HttpError(status, message, field, headers)


def http_error(exc: Exception) -> HttpError:
    """A typed error raised outside a handler (a full parse lane, say) as the HttpError its gRPC status maps to."""
    return _mapped(*to_status(exc))


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
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def _object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise HttpError(400, f"{field}: must be a JSON object", field)
    return value


def _string(value, field: str) -> str:
    if not isinstance(value, str):
        raise HttpError(400, f"{field}: must be a string", field)
    return value


def int64(value, field: str, low: int = _INT64_RANGE[0]) -> int:
    """``value`` when it is a JSON integer within ``low``..2^63-1 (what a protobuf int64 holds), else a 400."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= _INT64_RANGE[1]:
        return value
    raise HttpError(400, f"{field}: {value!r:.40} is not an integer in {low}..{_INT64_RANGE[1]}", field)


def copy_parameters(message, params: dict, field: str = "parameters") -> None:
    """A REST ``parameters`` object into a protobuf request's parameter map (JSON booleans, integers, numbers and
    strings: InferParameter's bool, int64, double and string)."""
    for key, value in _object(params, field).items():
        slot = message.parameters[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = int64(value, f"{field}.{key}")
        elif isinstance(value, float) and math.isfinite(value):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise HttpError(400, f"{field}.{key}: must be a boolean, a number or a string", f"{field}.{key}")


def _input_raw(tensor: dict, index: int, binary: memoryview, offset: int) -> tuple[bytes, int]:
    """The raw bytes of one REST input (from the binary section or its JSON ``data``) and the new offset. The
    gRPC handler then checks them against the shape and datatype as it checks raw_input_contents."""
    field = f"inputs[{index}]"
    parameters = _object(tensor.get("parameters") or {}, f"{field}.parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise HttpError(400, f"{field}.parameters.binary_data_size: {size!r:.40}; the binary data after the "
                                 f"JSON header holds {len(binary) - offset} more bytes", f"{field}.parameters")
        return bytes(binary[offset:offset + size]), offset + size
    if "data" not in tensor:
        raise HttpError(400, f"{field}.data: missing (give data, or parameters.binary_data_size with the binary "
                             f"tensor extension)", f"{field}.data")
    datatype = tensor.get("datatype")
    if datatype == "BYTES":
        flat = list(_flatten(tensor["data"]))
        if not all(isinstance(v, str) for v in flat):
            raise HttpError(400, f"{field}.data: BYTES elements must be strings in JSON (binary images need the "
                                 f"binary tensor extension)", f"{field}.data")
        return encode_bytes_elements([v.encode("utf-8") for v in flat]), offset
    if datatype not in OIP_DTYPES:
        raise HttpError(400, f"{field}.datatype: {datatype!r:.40}; accepted: {', '.join(OIP_DTYPES)}",
                        f"{field}.datatype")
    array = numbers(tensor["data"], np.float64 if datatype.startswith("FP") else np.int64, f"{field}.data")
    expected = math.prod(tensor["shape"])
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


def parse_infer(body, header_length: str | None, model: str, version: str,
                max_json_values: int = DEFAULT_MAX_VALUES) -> tuple[pb.ModelInferRequest, bool]:
    """A REST infer request (``body``: bytes, or the listener's memory map of a large one) -> the
    ModelInferRequest the gRPC handler takes, and whether outputs go binary. Blocking (JSON and tensor
    conversion): the route runs it on the HTTP parse pool, off the event loop."""
    if header_length is not None:
        try:
            n = int(header_length)
            if not 0 < n <= len(body):
                raise ValueError
        except ValueError:
            raise HttpError(400, f"Inference-Header-Content-Length: {header_length!r:.40}; must be 1..{len(body)} "
                                 f"(the JSON header's length in bytes)", "Inference-Header-Content-Length") from None
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    doc = load_json(head, max_values=max_json_values)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise HttpError(400, 'inputs: missing; the body is {"inputs": [{"name", "shape", "datatype", "data"}]}',
                        "inputs")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_string(doc.get("id", ""), "id"))
    params = _object(doc.get("parameters") or {}, "parameters")
    # Every parameter travels on (the explanation models' settings among them); the model checks its own.
    copy_parameters(request, {k: v for k, v in params.items() if k != "binary_data_output"})
    binary_out = bool(params.get("binary_data_output"))
    offset = 0
    for i, tensor in enumerate(doc["inputs"]):
        tensor = _object(tensor, f"inputs[{i}]")
        shape = tensor.get("shape")
        if not isinstance(shape, list):
            raise HttpError(400, f"inputs[{i}].shape: must be a list of integers", f"inputs[{i}].shape")
        shape = [int64(s, f"inputs[{i}].shape", low=0) for s in shape]
        request.inputs.add(name=_string(tensor.get("name", ""), f"inputs[{i}].name"),
                           datatype=_string(tensor.get("datatype", ""), f"inputs[{i}].datatype"), shape=shape)
        raw, offset = _input_raw(tensor, i, binary, offset)
        request.raw_input_contents.append(raw)
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise HttpError(400, "outputs: must be a list of objects", "outputs")
    for j, out in enumerate(outputs):
        out = _object(out, f"outputs[{j}]")
        request.outputs.add(name=_string(out.get("name", ""), f"outputs[{j}].name"))
        binary_out = binary_out or bool(_object(out.get("parameters") or {}, f"outputs[{j}].parameters")
                                        .get("binary_data"))
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
    answer = {"model_name": response.model_name, "model_version": response.model_version, "id": response.id}
    if response.parameters:   # e.g. an explanation's settings and zfserve model version
        answer["parameters"] = {key: getattr(value, value.WhichOneof("parameter_choice"))
                                for key, value in response.parameters.items()}
    head = json.dumps({**answer, "outputs": outputs}).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(tail), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


__all__ = ["HTTP_STATUS", "HEADER_LENGTH", "HttpContext", "HttpError", "copy_parameters", "http_error",
           "infer_response", "int64",
           "parse_infer", "read_body", "to_json"]
