"""Coverage-guided fuzzing (atheris) of the request paths: bytes -> a zfserve.v1 or OIP request message (the
first byte picks the kind) -> the wire codec's parser, and for occlusion requests the engine's argument
checks; or bytes -> an HTTP body: a REST infer request (JSON, or a JSON header and binary tensors, the second
byte giving the header's length) and a JSON control body. A protobuf DecodeError, one of our typed errors or
an HTTP 4xx is a refusal; anything else (a 500 included) is a crash.

    python fuzz/requests.py fuzz/corpus/requests -runs=100000    # or: bash fuzz/run.sh 100000
"""

import sys

import atheris

with atheris.instrument_imports(include=["zfserve"]):
    from google.protobuf.message import DecodeError

    from zfserve import wire
    from zfserve._proto.inference import grpc_service_pb2 as oip
    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve.engine.occlusion import OcclusionEngine
    from zfserve.errors import ZFServeError
    from zfserve.model import ZFNet
    from zfserve.server.http import parse_infer
    from zfserve.server.http_body import HttpError, load_json, numbers

KINDS = (pb.ClassifyRequest, pb.DeconvRequest, pb.OcclusionRequest, oip.ModelInferRequest, "rest", "json")
# The engine's own argument checks (no sweep runs), on a tiny model.
ENGINE = OcclusionEngine(ZFNet(num_classes=4, fc_width=8, widths=(8, 8, 8, 8, 8)), backend="torch")


def _occlusion_checks(args) -> None:
    engine = ENGINE
    engine._check(args["window"], args["stride"], args["layer"], args["channel"], args["target"],
                  args["attribution_on"], args.get("outputs", ("probability",)))
    engine._fill(args["fill"], args["fill_units"])


def _http_body(kind: str, data: bytes) -> None:
    """A REST infer body or a JSON control body: parsed, or refused with a 4xx naming the field."""
    try:
        if kind == "rest":
            length = str(data[0]) if data and data[0] < 128 else None
            request, _ = parse_infer(data[1:], length, "m", "", max_json_values=1 << 16)
            request.SerializeToString()
        else:
            doc = load_json(data, max_values=1 << 16)
            if isinstance(doc, dict) and "data" in doc:
                numbers(doc["data"], "f8", "data")
    except HttpError as exc:
        if not 400 <= exc.status < 500 or not exc.field:
            raise


def test_one_input(data: bytes) -> None:
    if not data:
        return
    kind = KINDS[data[0] % len(KINDS)]
    if isinstance(kind, str):
        _http_body(kind, data[1:])
        return
    try:
        request = kind.FromString(data[1:])
    except DecodeError:
        return
    try:
        if kind is pb.ClassifyRequest:
            if request.images.HasField("tensor"):
                wire.check_images(wire.tensor_to_array(request.images.tensor, "t"), "t", 224, 64)
        elif kind is pb.DeconvRequest:
            wire.deconv_arguments(request)
        elif kind is pb.OcclusionRequest:
            _occlusion_checks(wire.sweep_arguments(request))
        else:   # as model NAME (tensor input) or NAME-bytes (encoded images) would read it
            for input_name in (wire.IMAGE_INPUT, wire.BYTES_INPUT):
                try:
                    wire.infer_input(request, input_name, 8, 4)
                except ZFServeError:
                    pass
    except ZFServeError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
