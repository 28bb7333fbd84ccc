"""Property tests (hypothesis, bounded example counts) for everything that parses untrusted input: the image
decoder (arbitrary bytes, damaged real images, arbitrary arrays) and every request parser of the wire codec.
The property everywhere: a result of the promised shape, or one of our typed errors naming a field; never
another exception, never a hang. ``ZFSERVE_PROPERTY_EXAMPLES`` sets the examples per test (default 150; the
coverage-guided harnesses under ``fuzz/`` go much further)."""

from __future__ import annotations

import io
import os

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from zfserve import wire
from zfserve._proto.inference import grpc_service_pb2 as oip
from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve.errors import ImageError, InvalidArgumentError, ZFServeError
from zfserve.preprocess import load_image, read_header

BOUNDED = settings(max_examples=int(os.environ.get("ZFSERVE_PROPERTY_EXAMPLES", "150")), deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out = []
    for fmt, mode, options in (("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "I;16", {}),
                               ("JPEG", "RGB", {"quality": 80}), ("WEBP", "RGB", {"quality": 80}),
                               ("WEBP", "RGBA", {"lossless": True})):
        image = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
            Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).convert("I;16")
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _decodes_or_refuses(data) -> None:
    try:
        x = load_image(data)
    except ImageError as exc:
        assert exc.field == "image" and str(exc).startswith("image:")
        return
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and np.isfinite(x).all()


# ------------------------------------------------------------------------------------------------ the decoder
@BOUNDED
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    _decodes_or_refuses(data)


@BOUNDED
@given(st.sampled_from(range(len(SEEDS))),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_damaged_real_images(seed, flips, cut):
    data = bytearray(SEEDS[seed])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _decodes_or_refuses(bytes(data))
    try:
        header = read_header(bytes(data))
        assert header.width >= 32 and header.height >= 32 and header.pixels <= 40_000_000
    except ImageError:
        pass


@BOUNDED
@given(hnp.arrays(np.uint8, st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=80),
                                      st.tuples(st.integers(1, 80), st.integers(1, 80), st.sampled_from([1, 3, 4])),
                                      hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))))
def test_arbitrary_uint8_arrays(array):
    try:
        x = load_image(array)
    except InvalidArgumentError as exc:   # ImageError is one too
        assert exc.field == "image"
        return
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


# ------------------------------------------------------------------------------------------------ tensors
DTYPES = sorted(wire.DTYPES)
SHAPES = st.lists(st.integers(-2, 1 << 33), max_size=5)


@BOUNDED
@given(st.sampled_from(DTYPES), SHAPES, st.binary(max_size=512))
def test_tensor_bytes(dtype, shape, data):
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        arr = wire.tensor_to_array(tensor, "t")
    except InvalidArgumentError as exc:
        assert exc.field.startswith("t")
        return
    assert list(arr.shape) == shape and arr.nbytes == len(data)


@BOUNDED
@given(st.lists(st.binary(max_size=64), max_size=6), st.binary(max_size=64), st.integers(0, 8))
def test_bytes_elements_round_trip_and_garbage(items, garbage, count):
    assert wire.decode_bytes_elements(wire.encode_bytes_elements(items), len(items), "b") == items
    try:
        got = wire.decode_bytes_elements(garbage, count, "b")
    except InvalidArgumentError:
        return
    assert len(got) == count and wire.encode_bytes_elements(got) == garbage


# ------------------------------------------------------------------------------------------------ requests
@BOUNDED
@given(name=st.sampled_from(["image", "image_bytes", "x", ""]), datatype=st.sampled_from(["FP32", "BYTES", "INT8"]),
       shape=SHAPES, raw=st.lists(st.binary(max_size=256), max_size=2),
       floats=st.lists(st.floats(width=32), max_size=8), items=st.lists(st.binary(max_size=32), max_size=3),
       inputs=st.integers(0, 2), expected=st.sampled_from([wire.IMAGE_INPUT, wire.BYTES_INPUT]))
def test_model_infer_requests(name, datatype, shape, raw, floats, items, inputs, expected):
    request = oip.ModelInferRequest(model_name="m", raw_input_contents=raw)
    for _ in range(inputs):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if floats:
            tensor.contents.fp32_contents.extend(floats)
        if items:
            tensor.contents.bytes_contents.extend(items)
    try:
        got = wire.infer_input(request, expected, input_size=8, max_images=4)
    except InvalidArgumentError as exc:
        assert exc.field
        return
    assert name == expected and isinstance(got, np.ndarray) == (expected == wire.IMAGE_INPUT)
    if isinstance(got, np.ndarray):
        assert got.dtype == np.float32 and got.shape[1:] == (3, 8, 8)   # taken as sent (non-finite too)
    else:
        assert all(isinstance(b, bytes) for b in got) and 1 <= len(got) <= 4


OPTIONAL_INT = st.one_of(st.none(), st.integers(-(1 << 31), (1 << 31) - 1))


@BOUNDED
@given(window=OPTIONAL_INT, stride=OPTIONAL_INT, target=OPTIONAL_INT, channel=OPTIONAL_INT,
       fill=st.one_of(st.none(), st.floats(), st.lists(st.floats(width=32), max_size=4)),
       outputs=st.lists(st.sampled_from(["probability", "argmax", "heat", ""]), max_size=3),
       layer=st.sampled_from(["", "conv5", "fc8", "conv9"]), pixels=st.booleans())
def test_occlusion_requests(window, stride, target, channel, fill, outputs, layer, pixels):
    request = pb.OcclusionRequest(outputs=outputs, activity_layer=layer, fill_in_pixels=pixels)
    for field, value in (("window", window), ("stride", stride), ("target", target), ("activity_channel", channel)):
        if value is not None:
            setattr(request, field, value)
    if isinstance(fill, float):
        request.fill_value = fill
    elif fill is not None:
        request.fill_per_channel.CopyFrom(wire.array_to_tensor(np.asarray(fill, dtype=np.float32)))
    try:
        args = wire.sweep_arguments(request)
    except InvalidArgumentError:
        return
    assert args["window"] == (window if window is not None else 32)
    _checked_by_the_engine(args)


_ENGINE = []   # built on first use: module import stays light for collection


def _checked_by_the_engine(args) -> None:
    """The engine's own argument checks accept the arguments or refuse them with our error (nothing runs)."""
    if not _ENGINE:
        from zfserve.engine.occlusion import OcclusionEngine
        from zfserve.model import ZFNet
        _ENGINE.append(OcclusionEngine(ZFNet(num_classes=4, fc_width=8, widths=(8, 8, 8, 8, 8)), backend="torch"))
    engine = _ENGINE[0]
    try:
        engine._check(args["window"], args["stride"], args["layer"], args["channel"], args["target"],
                      args["attribution_on"], args.get("outputs", ("probability",)))
        engine._fill(args["fill"], args["fill_units"])
    except InvalidArgumentError as exc:
        assert exc.field


@BOUNDED
@given(top_k=OPTIONAL_INT, units=st.lists(st.tuples(*[st.integers(-5, 300)] * 3), max_size=3),
       maps=st.lists(st.integers(-5, 300), max_size=3), same=st.booleans())
def test_deconv_requests(top_k, units, maps, same):
    request = pb.DeconvRequest(layer="conv5", allow_same_map=same, maps=maps,
                               units=[pb.Unit(channel=c, y=y, x=x) for c, y, x in units])
    if top_k is not None:
        request.top_k = top_k
    try:
        args = wire.deconv_arguments(request)
    except InvalidArgumentError:
        assert units and maps
        return
    assert args["top_k"] == top_k and args["one_per_map"] is not same


@BOUNDED
@given(st.sampled_from([pb.ClassifyRequest, pb.DeconvRequest, pb.OcclusionRequest, oip.ModelInferRequest]),
       st.binary(max_size=512), st.sampled_from([wire.IMAGE_INPUT, wire.BYTES_INPUT]))
def test_arbitrary_request_bytes(kind, data, input_name):
    """Any bytes a client sends: protobuf refuses them, or the parser takes what they mean."""
    try:
        request = kind.FromString(data)
    except DecodeError:
        return
    parse = {pb.OcclusionRequest: wire.sweep_arguments, pb.DeconvRequest: wire.deconv_arguments,
             oip.ModelInferRequest: lambda r: wire.infer_input(r, input_name, 8, 4),
             pb.ClassifyRequest: lambda r: r.images.encoded or wire.tensor_to_array(r.images.tensor, "t")}[kind]
    try:
        parse(request)
    except ZFServeError as exc:
        assert exc.field


# ------------------------------------------------------------------------------------------------ HTTP bodies
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False,
                                                                                                allow_infinity=False),
                         st.text(max_size=12))
JSON = st.recursive(JSON_SCALARS | st.lists(st.floats(-1e6, 1e6), min_size=20, max_size=60),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=40)


def _same(got, expected) -> None:
    """``got`` (load_json's, long number arrays kept as text) equals ``expected`` (json.loads')."""
    from zfserve.server.http_body import NumberArray
    if isinstance(got, NumberArray):
        np.testing.assert_array_equal(got.to_array(np.float64, "x"), np.array(expected, np.float64))
    elif isinstance(got, dict):
        assert isinstance(expected, dict) and got.keys() == expected.keys()
        for key in got:
            _same(got[key], expected[key])
    elif isinstance(got, list):
        assert isinstance(expected, list) and len(got) == len(expected)
        for a, b in zip(got, expected):
            _same(a, b)
    else:
        assert type(got) is type(expected) and got == expected


@BOUNDED
@given(JSON, st.sampled_from([None, 2]))
def test_json_bodies_read_as_json_loads_reads_them(value, indent):
    """Within the limits, load_json gives what json.loads gives (long number arrays kept as text and converted
    piece by piece to the same float64 values)."""
    import json

    from zfserve.server.http_body import load_json
    text = json.dumps(value, indent=indent).encode()
    _same(load_json(text), json.loads(text))


def _refused_or_parsed(body: bytes, header_length):
    from zfserve.server.http import parse_infer
    from zfserve.server.http_body import HttpError
    try:
        request, _ = parse_infer(body, header_length, "m", "", max_json_values=4096)
    except HttpError as exc:
        assert 400 <= exc.status < 500 and exc.field, (exc.status, exc.message)
        return None
    request.SerializeToString()   # every value fits its protobuf field
    return request


@BOUNDED
@given(JSON, st.sampled_from(["image", "image_bytes"]), st.sampled_from(["FP32", "INT64", "BYTES", "UINT8", 7]),
       st.one_of(st.lists(st.integers(-(1 << 65), 1 << 65), max_size=4), JSON), st.booleans())
def test_rest_infer_bodies_of_any_shape(data, name, datatype, shape, nested):
    """Any JSON a client sends as an infer body: a request the gRPC handler takes, or a 4xx naming the field
    (values beyond int64, lists where objects go, strings where numbers go ...), never another exception."""
    import json
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": [data] if nested else data}
    for doc in ({"inputs": [tensor]}, {"inputs": [tensor], "parameters": data, "outputs": data},
                {"inputs": data, "id": data}, data):
        _refused_or_parsed(json.dumps(doc).encode(), None)


@BOUNDED
@given(st.binary(max_size=600), st.one_of(st.none(), st.integers(-5, 700).map(str), st.text(max_size=4)))
def test_rest_infer_arbitrary_bytes(body, header_length):
    _refused_or_parsed(body, header_length)


@BOUNDED
@given(st.integers(1, 200), st.sampled_from([b"[", b'{"a":', b'[{"a":']))
def test_nesting_is_limited_before_parsing(depth, opener):
    from zfserve.server.http_body import MAX_DEPTH, HttpError, load_json
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"a":': b"}]"}[opener]
    levels = len(opener.replace(b'"a":', b""))
    body = opener * depth + b"1" + closer * depth
    try:
        load_json(body)
        assert depth * levels <= MAX_DEPTH
    except HttpError as exc:
        assert depth * levels > MAX_DEPTH and exc.status == 400 and "nested deeper" in exc.message


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from([b"host", b"origin", b"authorization", b"content-type",
                                           b"sec-fetch-site", b"x-other"]), st.binary(max_size=40)), max_size=6),
       st.sampled_from(["GET", "POST", "HEAD", "PUT"]), st.text(max_size=20))
def test_any_request_head_is_admitted_or_refused_with_a_4xx(headers, method, path):
    from zfserve.server.http_body import HttpError
    from zfserve.server.http_guard import HttpPolicy
    policy = HttpPolicy(b"t" * 20, ("named.example",), protected=lambda p: p.startswith("/v2"))
    verdict = policy.admit({"type": "http", "method": method, "path": "/" + path, "scheme": "http",
                            "headers": headers})
    if isinstance(verdict, HttpError):
        assert verdict.status in (401, 403, 415) and verdict.field
    else:
        limit, flag = verdict
        assert limit >= 0 and flag
