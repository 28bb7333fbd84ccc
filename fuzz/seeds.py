"""Seed corpora for the fuzz harnesses: small valid images of every accepted kind, and valid request messages.

    python fuzz/seeds.py fuzz/corpus        # writes fuzz/corpus/decoder/* and fuzz/corpus/requests/*
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = {}
    for name, mode, fmt, options in (("rgb.png", "RGB", "PNG", {}), ("rgba.png", "RGBA", "PNG", {}),
                                     ("palette.png", "P", "PNG", {}), ("gray.png", "L", "PNG", {}),
                                     ("q80.jpg", "RGB", "JPEG", {"quality": 80}),
                                     ("progressive.jpg", "RGB", "JPEG", {"progressive": True}),
                                     ("cmyk.jpg", "CMYK", "JPEG", {}), ("lossy.webp", "RGB", "WEBP", {}),
                                     ("lossless.webp", "RGBA", "WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, fmt, **options)
        out[name] = buf.getvalue()
    frames = [Image.fromarray(np.roll(rgb, i, axis=1)) for i in range(3)]
    for name, fmt in (("animated.png", "PNG"), ("animated.webp", "WEBP")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        out[name] = buf.getvalue()
    gray16 = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16").save(gray16, "PNG")
    out["gray16.png"] = gray16.getvalue()
    return out


def requests() -> dict[str, bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zfserve import wire
    from zfserve._proto.inference import grpc_service_pb2 as oip
    from zfserve._proto.v1 import zfserve_pb2 as pb
    x = np.zeros((1, 3, 8, 8), np.float32)
    occlusion = wire.occlusion_request(x, window=4, stride=2, fill=(1.0, 2.0, 3.0), target=1, layer="conv5")
    deconv = wire.deconv_request(x, "conv5", top_k=2, units=[(1, 2, 3)])
    infer = oip.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes()])
    infer.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])
    infer_bytes = oip.ModelInferRequest(model_name="m-bytes", raw_input_contents=[wire.encode_bytes_elements([b"ab"])])
    infer_bytes.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    # REST infer bodies (kind 4: the next byte, when below 128, is the JSON header's length) and a JSON body.
    flat = json.dumps({"id": "a", "parameters": {"timeout": 5}, "inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": x.ravel().tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    nested = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                     "data": x.tolist()}]}).encode()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    rest = {"rest_json": b"\x04\xff" + flat, "rest_nested": b"\x04\xff" + nested,
            "rest_binary": b"\x04" + bytes([len(header)]) + header + x.tobytes(),
            "json_control": b"\x05" + json.dumps({"parameters": {"unload_dependents": False},
                                                  "data": list(range(40))}).encode()}
    # The first byte picks the message kind in fuzz/requests.py (index into its KINDS).
    return {**rest, "classify": b"\x00" + wire.classify_request(x, top_k=3).SerializeToString(),
            "deconv": b"\x01" + deconv.SerializeToString(), "occlusion": b"\x02" + occlusion.SerializeToString(),
            "infer": b"\x03" + infer.SerializeToString(), "infer_bytes": b"\x03" + infer_bytes.SerializeToString(),
            "empty_occlusion": b"\x02" + pb.OcclusionRequest().SerializeToString()}


def main(root: str) -> None:
    for kind, seeds in (("decoder", images()), ("requests", requests())):
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(seeds)} seeds")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
