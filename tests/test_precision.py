"""Lower-precision classification: the int8 graph rewrites against dense references, the calibrated int8 file
(metadata, cache, accuracy gate), the int8 / bf16 / OpenVINO classifiers against eager fp32 on held-out images,
config.json's precision, the CLI, and an int8 model served to tritonclient.

The embedded model is quantized once per module from few images (16 calibration, 48 gate), so the whole file
stays within seconds of export and quantization time.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from zfserve.config import ModelConfig
from zfserve.engine import int8_graph
from zfserve.engine.quantize import (INT8_FILE, META_ACCURACY, META_CALIBRATION, META_FP32_SHA256, META_LRN_FIT,
                                     META_PRECISION, HeldOut, Int8Settings, QuantizationRefused, ensure_int8,
                                     held_out_data, is_current_int8, quantize_int8)
from zfserve.errors import InvalidArgumentError, ModelLoadError
from zfserve.export import OnnxGraph, config_hash, ensure_onnx, lrn_to_onnx, read_metadata, tensor_info
from zfserve.weights import EMBEDDED_DIR, read_snapshot

HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed (extra zfserve[openvino])")
# The documented agreement of int8 with fp32: every probability within 0.1 (README; measured on 2,000 held-out
# images, benchmarks/results/cpu-2core-2026-12-02-precision.json: at most 0.038, mean 7e-5) and the same top-1
# on held-out images.
INT8_PROBABILITY_ATOL = 0.1
SMALL = Int8Settings(calibration_images=16, accuracy_images=48)


def held_out(n: int, seed: int = 4):
    """n preprocessed images of a synthetic seed neither the model's training, calibration nor gate used."""
    from zfserve.data import synthetic_arrays
    from zfserve.evaluate import centre_inputs
    images, labels = synthetic_arrays(seed, n)
    return centre_inputs(images, read_snapshot("zfnet-demo").config), labels


def eager(x: np.ndarray) -> np.ndarray:
    model = read_snapshot("zfnet-demo").model()
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A copy of the embedded model (so model.onnx and model.int8.onnx are written beside it), quantized once.
    The user cache is set aside: nothing here may find (or leave) a cached export there."""
    root = tmp_path_factory.mktemp("precision")
    directory = root / "demo"
    directory.mkdir()
    for name in ("config.json", "weights.safetensors", "ood.json", "ood.safetensors"):   # its statistics too
        shutil.copy(EMBEDDED_DIR / "zfnet-demo" / name, directory / name)
    # The embedded model's cached export (other tests use it too) is current for the copy: same weights, config.
    shutil.copy(ensure_onnx("zfnet-demo"), directory / "model.onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZFSERVE_CACHE_DIR", str(root / "cache"))
        snapshot = read_snapshot(directory)
        fp32 = ensure_onnx(snapshot)
        int8 = ensure_int8(fp32, snapshot.config, SMALL)
        yield directory, fp32, int8


@pytest.fixture(scope="module")
def inputs():
    """Held-out images, their labels and eager fp32's probabilities (the reference every engine meets)."""
    x, labels = held_out(12)
    return x, labels, eager(x)


# ------------------------------------------------------------------------------------------- graph rewrites
@pytest.mark.parametrize("s0, s1, beta", [(2.0, 2.07, 0.75), (1.0, 3.0, 0.75), (2.0, 2.5, 0.5)])
def test_linear_fit_is_the_minimax_line(s0, s1, beta):
    slope, intercept, error = int8_graph.linear_fit(s0, s1, beta)
    s = np.linspace(s0, s1, 200_001)
    relative = np.abs(intercept + slope * s - s ** -beta) / s1 ** -beta
    assert relative.max() == pytest.approx(error, rel=1e-4)
    # minimax for a convex function: equal errors at both ends, the opposite one where the line touches
    errors = intercept + slope * s - s ** -beta
    assert errors[0] == pytest.approx(errors[-1], rel=1e-6) and errors[0] < 0
    assert errors.max() == pytest.approx(-errors[0], rel=1e-4)
    assert (np.abs(errors) / s ** -beta).max() <= error * (1 + 1e-9)   # the reported bound holds pointwise


def _lrn_graph(channels: int = 12):
    LRN_PARAMS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)   # ZFNet's
    g = OnnxGraph()
    lrn_to_onnx(g, "x", channels, **LRN_PARAMS, out="y")
    return g.model([tensor_info("x", ["n", channels, "h", "w"])], [tensor_info("y", None)])


@pytest.mark.parametrize("limit", [30.0, 150.0])
def test_linearized_lrn_matches_the_exact_one_within_its_bound(limit):
    proto = _lrn_graph()
    exact = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    [record] = int8_graph.linearize_lrns(proto, {"x": limit}, tolerance=1.0)
    assert record["rewritten"] and [n.op_type for n in proto.graph.node] == ["Mul", "Conv", "Mul"]
    fitted = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).uniform(0, limit, (2, 12, 5, 7)).astype(np.float32)
    x[0, :, 0, 0] = limit          # the corner the bound is about: the whole window at the maximum
    y, ref = fitted.run(None, {"x": x})[0], exact.run(None, {"x": x})[0]
    relative = np.abs(y - ref) / np.maximum(np.abs(ref), 1e-6)
    assert relative[x > 0].max() <= record["max_relative_error"] * (1 + 1e-3) + 1e-6
    assert record["max_relative_error"] > 1e-6          # not a trivial fit: the band term matters at this range


def test_lrn_past_the_tolerance_stays_exact():
    proto = _lrn_graph()
    [record] = int8_graph.linearize_lrns(proto, {"x": 1000.0})
    assert not record["rewritten"] and record["max_relative_error"] > int8_graph.LRN_FIT_TOLERANCE
    assert "Div" in [n.op_type for n in proto.graph.node]


def test_space_to_depth_conv1_is_exact(demo):
    """conv1 7x7/2 (pads 1) folded into SpaceToDepth + 4x4/1 on 12 channels: the same function, in float."""
    proto = onnx.load(str(demo[1]))
    done = int8_graph.space_to_depth_first_conv(proto, "image")
    assert done["folded_kernel"] == [4, 4] and done["channels"] == 3
    conv1 = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv1.input[0] == done["space_to_depth"]
    x = held_out(3)[0] + np.random.default_rng(5).normal(0, 20, (3, 3, 224, 224)).astype(np.float32)
    original = ort.InferenceSession(str(demo[1]), providers=["CPUExecutionProvider"])
    folded = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = original.run(["logits"], {"image": x})[0], folded.run(["logits"], {"image": x})[0]
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_both_lrns_of_an_export_are_found(demo):
    lrns = int8_graph.find_lrns(onnx.load(str(demo[1])))
    assert [lrn.beta for lrn in lrns] == [0.75, 0.75] and [lrn.band.shape[0] for lrn in lrns] == [96, 256]
    assert all(lrn.k == 2.0 and np.isclose(lrn.band.max(), 1e-4 / 5) for lrn in lrns)


def test_a_range_past_the_fit_is_reported(demo):
    proto = onnx.load(str(demo[2]))
    records = json.loads(read_metadata(demo[2])[META_LRN_FIT])
    assert int8_graph.check_lrn_ranges(proto, records) == []
    shrunk = [{**r, "input_max": r["input_max"] / 2} for r in records]
    assert len(int8_graph.check_lrn_ranges(proto, shrunk)) == 2


# ------------------------------------------------------------------------------------------- the int8 file
def test_int8_file_metadata(demo):
    directory, fp32, int8 = demo
    assert int8 == directory / INT8_FILE
    meta, fp32_meta = read_metadata(int8), read_metadata(fp32)
    assert meta[META_PRECISION] == "int8"
    assert meta[META_FP32_SHA256] == hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert {k: v for k, v in fp32_meta.items()} == {k: meta[k] for k in fp32_meta}   # the model's facts carried
    calibration = json.loads(meta[META_CALIBRATION])
    assert calibration["source"] == "synthetic" and calibration["images"] == 16
    assert calibration["data"].startswith("synthetic seed 5")
    accuracy = json.loads(meta[META_ACCURACY])
    assert accuracy["n"] == 48 and accuracy["data"].startswith("synthetic seed 3") and accuracy["agreement"] >= 0.95
    fits = json.loads(meta[META_LRN_FIT])
    assert all(f["rewritten"] and f["max_relative_error"] < 1e-3 for f in fits) and len(fits) == 2
    nodes = onnx.load(str(int8)).graph.node
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops and "Div" not in ops
    # No LRN's square root is left: the one Sqrt is the out-of-distribution features' (conv2's channel std).
    assert sum(n.op_type == "Sqrt" for n in nodes) == 1


def test_int8_agrees_with_eager_fp32_on_held_out_images(demo, inputs):
    x, labels, ref = inputs
    session = ort.InferenceSession(str(demo[2]), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": x})[0]
    assert ref.max(1).min() < 0.999 or ref.argmax(1).tolist() == labels.tolist()   # a trained model, held out
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, atol=INT8_PROBABILITY_ATOL, rtol=0)
    assert np.abs(got - ref).max() > 0      # it is a different graph, not the fp32 one
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)   # the softmax stayed float


def test_int8_is_remade_only_when_needed(demo):
    directory, fp32, int8 = demo
    snapshot = read_snapshot(directory)
    stamp = int8.stat().st_mtime_ns
    assert ensure_int8(fp32, snapshot.config) == int8 and int8.stat().st_mtime_ns == stamp       # any calibration
    assert ensure_int8(fp32, snapshot.config, SMALL) == int8 and int8.stat().st_mtime_ns == stamp  # the same one
    digest = hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert not is_current_int8(int8, "0" * 64)                       # made from other weights' export
    assert not is_current_int8(int8, digest, Int8Settings(calibration_images=17))
    assert is_current_int8(int8, digest, Int8Settings(calibration_images=16))


@pytest.mark.slow
def test_unrepresentative_calibration_is_refused(demo, inputs, tmp_path):
    """Calibrated on blank images, every activation range collapses; the gate sees the accuracy drop, refuses in
    one line, and writes nothing."""
    directory, fp32, _ = demo
    config = read_snapshot(directory).config
    x, labels, _ = inputs
    blank = HeldOut([np.zeros((4, 3, 224, 224), np.float32)], None, "blank images")
    accuracy = HeldOut([x], labels, "synthetic seed 4, 12 images")
    out = tmp_path / INT8_FILE
    with pytest.raises(QuantizationRefused) as info:
        quantize_int8(fp32, out, config, Int8Settings(max_accuracy_drop=0.5), data=(blank, accuracy))
    message = str(info.value)
    assert "\n" not in message and "--max-accuracy-drop 0.5" in message and "synthetic seed 4" in message
    assert not out.exists() and not list(tmp_path.iterdir())


def test_folder_calibration_and_gate_are_disjoint(tmp_path):
    from zfserve.data import write_synthetic
    write_synthetic(tmp_path / "data", 14, seed=7)
    config = read_snapshot("zfnet-demo").config
    calibration, accuracy = held_out_data(Int8Settings(calibration=str(tmp_path / "data"), calibration_images=5,
                                                       accuracy_images=100), config)
    assert calibration.count == 5 and accuracy.count == 9 and accuracy.labels is not None
    seen = {arr.tobytes() for batch in calibration.inputs for arr in batch}
    assert not seen & {arr.tobytes() for batch in accuracy.inputs for arr in batch}
    with pytest.raises(InvalidArgumentError) as info:
        held_out_data(Int8Settings(calibration=str(tmp_path / "data"), calibration_images=14), config)
    assert info.value.field == "calibration_images" and "1..13" in str(info.value)


@pytest.mark.parametrize("settings, field", [
    (Int8Settings(calibration_images=0), "calibration_images"),
    (Int8Settings(method="kl"), "calibration_method"),
    (Int8Settings(max_accuracy_drop=-1), "max_accuracy_drop"),
    (Int8Settings(calibration="synthetic:x"), "calibration"),
    (Int8Settings(calibration="/no/such/dir"), "calibration"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(InvalidArgumentError) as info:
        settings.validate()
    assert info.value.field == field


# ------------------------------------------------------------------------------------------- classifiers
def test_classifier_int8_and_refusals(demo, inputs):
    from zfserve.engine.classifier import Classifier
    clf = Classifier(demo[0], precision="int8", warmup=False)
    assert clf.onnx_path == demo[2] and (clf.precision, clf.engine) == ("int8", "onnxruntime")
    x, _, ref = inputs
    np.testing.assert_allclose(clf.probabilities(x), ref, atol=INT8_PROBABILITY_ATOL, rtol=0)
    with pytest.raises(InvalidArgumentError, match="bf16 kernels") as info:
        Classifier(demo[0], precision="bf16", warmup=False)
    assert info.value.field == "precision"
    with pytest.raises(InvalidArgumentError) as info:
        Classifier(demo[0], precision="fp16", warmup=False)
    assert info.value.field == "precision"


@needs_openvino
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("bf16", 0.05), ("int8", INT8_PROBABILITY_ATOL)])
def test_openvino_agrees_with_eager_fp32(demo, inputs, precision, atol):
    from zfserve.engine.backends import openvino_core
    from zfserve.engine.classifier import Classifier
    if precision == "bf16" and "BF16" not in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        # A CPU without bf16 (e.g. AVX2 only): refused with one line naming the field, never emulated silently.
        with pytest.raises(InvalidArgumentError, match="this CPU has no bf16 support") as info:
            Classifier(demo[0], precision=precision, engine="openvino", threads=2, warmup=False)
        assert info.value.field == "precision"
        return
    clf = Classifier(demo[0], precision=precision, engine="openvino", threads=2, warmup=False)
    x, _, ref = inputs
    got = clf.probabilities(x)
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    if precision != "fp32":    # really another precision (OpenVINO would silently run bf16 if not pinned)
        assert np.abs(got - ref).max() > 1e-5
    else:
        assert clf.probabilities(x[:1]).shape == (1, 11)    # another batch size of the dynamic graph


def test_config_json_precision(tmp_path):
    data = json.loads((EMBEDDED_DIR / "zfnet-demo" / "config.json").read_text())
    plain = ModelConfig.from_json(data)
    chosen = ModelConfig.from_json({**data, "precision": "int8", "engine": "openvino"})
    assert (chosen.precision, chosen.engine) == ("int8", "openvino") and plain.precision is None
    assert "precision" not in plain.to_json() and chosen.to_json()["precision"] == "int8"
    assert config_hash(chosen) == config_hash(plain)        # serving choices do not change the exported graph
    with pytest.raises(ModelLoadError, match="precision must be one of"):
        ModelConfig.from_json({**data, "precision": "int4"})


# ------------------------------------------------------------------------------------------- CLI
def test_cli_export_classify_and_eval(demo, tmp_path, capsys):
    from zfserve.cli import main
    from zfserve.data import render
    from PIL import Image
    directory = str(demo[0])
    assert main(["export", "--model", directory, "--precision", "int8"]) == 0     # the current file: not re-made
    out = capsys.readouterr().out
    assert str(demo[2]) in out and "int8 (entropy calibration on synthetic seed 5, 16 images" in out
    path = tmp_path / "star.png"
    Image.fromarray(render(4, 3).image).save(path)     # index 3: a star, from a held-out seed
    assert main(["classify", str(path), "--model", directory, "--precision", "int8", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: star (")
    assert main(["classify", str(path), "--model", directory, "--precision", "bf16"]) == 2
    assert "bf16 kernels" in capsys.readouterr().err
    assert main(["eval", "--model", directory, "--precision", "int8", "--n", "11", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "int8" and report["n"] == 11 and report["agreement"] >= 10 / 11
    assert report["reference"]["top1"] >= 10 / 11 and abs(report["top1_drop_pt"]) <= 100 / 11 + 1e-9


# ------------------------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def repository(demo, tmp_path_factory):
    """demo8 (config.json: precision int8, its int8 file made above) beside demo (fp32), one server."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(demo[0], root / "demo8")
    config = json.loads((root / "demo8" / "config.json").read_text())
    (root / "demo8" / "config.json").write_text(json.dumps({**config, "precision": "int8"}))
    shutil.copytree(demo[0], root / "demo", ignore=shutil.ignore_patterns(INT8_FILE))
    return root


@pytest.fixture(scope="module")
def int8_server(repository):
    from zfserve.server import BackgroundServer, ServerOptions
    with BackgroundServer(ServerOptions(port=0, model_repository=str(repository))) as server:
        yield server


def test_served_precision_is_listed(int8_server):
    from zfserve.client import Client
    with Client(int8_server.target) as client:
        models = {m.name: m for m in client.list_models().models}
        info = client.model_info("demo8")
    assert (models["demo8"].precision, models["demo8"].engine) == ("int8", "onnxruntime")
    assert (models["demo"].precision, models["demo"].engine) == ("fp32", "onnxruntime")
    assert (info.precision, info.engine) == ("int8", "onnxruntime")


def test_tritonclient_gets_int8_probabilities_within_tolerance(int8_server, inputs):
    import tritonclient.grpc as tc
    x, _, ref = inputs
    triton = tc.InferenceServerClient(int8_server.target)
    try:
        assert triton.get_model_metadata("demo8").platform == "onnxruntime_onnx_int8"
        assert triton.get_model_metadata("demo").platform == "onnxruntime_onnx"
        parameters = triton.get_model_config("demo8-bytes").config.parameters
        assert (parameters["precision"].string_value, parameters["engine"].string_value) == ("int8", "onnxruntime")
        got = {}
        for name in ("demo8", "demo"):
            tensor = tc.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            got[name] = triton.infer(name, [tensor]).as_numpy("probabilities")
    finally:
        triton.close()
    np.testing.assert_allclose(got["demo"], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["demo8"], ref, atol=INT8_PROBABILITY_ATOL, rtol=0)
    np.testing.assert_array_equal(got["demo8"].argmax(1), ref.argmax(1))
    assert np.abs(got["demo8"] - ref).max() > 1e-5
