"""Occlusion through a split graph (zfserve.engine.occlusion_split): the cut's field against where a pixel's change
really reaches, and split sweeps against brute force (PyTorch, one occluded copy at a time) and against the same
engine's full forward passes, on ONNX models written in the tests (random weights) and their int8 graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import onnx_models as om
from test_onnx_explain import brute_force
from zfserve.engine import occlusion_split
from zfserve.engine.classifier import Classifier
from zfserve.engine.occlusion_runtime import RuntimeOcclusionEngine
from zfserve.engine.occlusion_split import choose, find_cuts, split_graphs
from zfserve.export import ensure_onnx
from zfserve.weights import read_snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (PyTorch model, snapshot of its imported ONNX model)."""
    from zfserve.import_onnx import import_onnx
    root = tmp_path_factory.mktemp("onnx-split")
    out = {}
    for name in ("resnet18", "mobilenet", "small160"):
        spec = om.SPECS[name]
        model, path = om.export_named(name, root, seed=4)
        directory = import_onnx(path, om.classes_file(root, spec.num_classes), root / name, output=spec.output,
                                preprocess={"resize": spec.resize})
        out[name] = model, read_snapshot(directory)
    return out


def _served(snapshot):
    return onnx.load(str(ensure_onnx(snapshot)))


def test_resnet18_cut_is_layer1_with_its_textbook_field(models):
    """torchvision's ResNet-18 at 224, windows of 32: the cut is layer1's output, stride 4, offset 21 (conv1's
    pad 3 + the pool's 1 x 2 + four 3x3 convs' 1 x 4), field 43 (7 + 2 x 2 + 4 x 2 x 4)."""
    cut, (rows, cols) = choose(find_cuts(_served(models["resnet18"][1]), 224), 224, 32, 16)
    assert "layer1.1" in cut.tensor and cut.shape == (64, 56, 56)
    assert (cut.field.stride, cut.field.offset, cut.field.size) == ((4, 4), (21, 21), (43, 43))
    assert rows.length == cols.length < 224 and rows.length % 4 == 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet", "small160"])
def test_every_cut_field_holds_where_a_pixel_change_reaches(models, name):
    """Change one pixel (several places, edges included): every position of every cut tensor that changes lies
    in the field computed for it, and the field's extreme rows are reached (it is not merely large)."""
    proto = _served(models[name][1])
    size = om.SPECS[name].crop
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    cuts = find_cuts(proto, size)
    assert len(cuts) >= 3
    reached = set()
    for cut in cuts:
        prefix = ort.InferenceSession(split_graphs(proto, cut)[0], providers=["CPUExecutionProvider"])
        clean = prefix.run(None, {"image": x})[0]
        s, p, f = cut.field.stride[0], cut.field.offset[0], cut.field.size[0]
        for y, col in ((0, 0), (size // 2 + 1, size // 3), (size - 1, size - 1)):
            bumped = x.copy()
            bumped[0, :, y, col] += 25.0
            changed = np.abs(prefix.run(None, {"image": bumped})[0] - clean).max(axis=(0, 1)) > 0
            rows, cols = np.nonzero(changed)
            assert rows.size, f"{cut.tensor}: a pixel's change reached nothing"
            for axis, (pixel, hits) in enumerate(((y, rows), (col, cols))):
                lo, hi = (pixel + p - f) // s + 1, (pixel + p) // s     # the positions whose field holds it
                assert lo <= hits.min() and hits.max() <= hi, (cut.tensor, axis, pixel, hits.min(), hits.max())
                reached.add((cut.tensor, axis, hits.min() == max(lo, 0), hits.max() == min(hi, changed.shape[axis]
                                                                                          - 1)))
    assert any(lo and hi for _, _, lo, hi in reached)


@pytest.mark.parametrize("name,window,stride", [("resnet18", 48, 32), ("resnet18", 40, 28), ("mobilenet", 32, 24),
                                                ("small160", 24, 20)])
def test_split_sweep_equals_brute_force(models, name, window, stride):
    """The engine splits these graphs (it says where) and its maps equal PyTorch's brute force within 1e-5,
    windows cut at the border (40 at 28 on 224: the last window is 28 wide) included."""
    model, snapshot = models[name]
    size = om.SPECS[name].crop
    x = np.random.default_rng(11).standard_normal((3, size, size)).astype(np.float32)
    engine = RuntimeOcclusionEngine(Classifier(snapshot, threads=1), workers=2, batch_size=8)
    result = engine.sweep(x, window, stride, target=3)
    assert engine.split_notes[(window, stride)].startswith("split at ")
    np.testing.assert_allclose(result.probability, brute_force(model, x, window, stride, 3, "logits"), atol=1e-5,
                               rtol=0)
    # Several images share batches; each keeps its own clean cut tensor.
    y = np.random.default_rng(12).standard_normal((3, size, size)).astype(np.float32)
    both = engine.sweep_many([y, x], [None, 3], window, stride)
    np.testing.assert_array_equal(both[1].probability, result.probability)
    np.testing.assert_allclose(both[0].probability, brute_force(model, y, window, stride, both[0].target, "logits"),
                               atol=1e-5, rtol=0)


def test_int8_split_equals_int8_full_passes(models):
    """The int8 graph (QDQ) splits at a quantized tensor and gives the probabilities of full int8 passes."""
    from zfserve.engine.quantize import Int8Settings
    _, snapshot = models["resnet18"]
    small = Int8Settings(calibration_images=8, accuracy_images=8, method="minmax", max_accuracy_drop=100.0)
    classifier = Classifier(snapshot, precision="int8", int8=small, threads=1)
    x = np.random.default_rng(13).standard_normal((3, 224, 224)).astype(np.float32)
    split = RuntimeOcclusionEngine(classifier, workers=2, batch_size=8)
    full = RuntimeOcclusionEngine(classifier, workers=2, batch_size=8, split=False)
    got, expected = split.sweep(x, 48, 32, target=5), full.sweep(x, 48, 32, target=5)
    assert "QuantizeLinear" in split.split_notes[(48, 32)] and not full.split_notes
    np.testing.assert_allclose(got.probability, expected.probability, atol=1e-5, rtol=0)


def test_onnx_int8_keeps_its_last_linear_layer_float(models):
    """An ONNX model's int8 graph: the Gemm making the logits has float weights (an initializer, not a
    DequantizeLinear output); every Conv's weights are dequantized int8."""
    from zfserve.engine.quantize import ONNX_INT8_FORMAT, Int8Settings, ensure_int8
    from zfserve.export import read_metadata
    _, snapshot = models["resnet18"]
    small = Int8Settings(calibration_images=8, accuracy_images=8, method="minmax", max_accuracy_drop=100.0)
    path = ensure_int8(ensure_onnx(snapshot), snapshot.config, small)
    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 1 and gemms[0].input[1] in {i.name for i in graph.initializer}
    assert len(convs) == 20 and all(made_by.get(n.input[1]) == "DequantizeLinear" for n in convs)
    assert read_metadata(path)["zfserve.int8_format"] == ONNX_INT8_FORMAT


def test_a_split_failing_its_check_runs_full_passes(models, monkeypatch):
    """A wrong split (crops one position too short at each end) is caught by the check against full passes:
    the sweep runs full passes, still equal to brute force, and the engine says why."""
    model, snapshot = models["small160"]
    right = occlusion_split.crops

    def short(*args, **kwargs):
        c = right(*args, **kwargs)
        return occlusion_split.Crops(c.crop_start, np.maximum(0, c.first - 1), c.stop + 1, c.length)
    monkeypatch.setattr(occlusion_split, "crops", short)
    x = np.random.default_rng(14).standard_normal((3, 160, 160)).astype(np.float32)
    engine = RuntimeOcclusionEngine(Classifier(snapshot, threads=1))
    result = engine.sweep(x, 32, 32, target=1)
    assert "differs from full passes" in engine.split_notes[(32, 32)]
    np.testing.assert_allclose(result.probability, brute_force(model, x, 32, 32, 1, "logits"), atol=1e-5, rtol=0)


def test_a_graph_without_a_local_beginning_runs_full_passes(tmp_path):
    """A classifier whose first op mixes every pixel (a linear layer on the flattened image) has no cut."""
    from zfserve.import_onnx import import_onnx
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)).eval()
    path = om.export(model, tmp_path / "linear.onnx", 32)
    snapshot = read_snapshot(import_onnx(path, om.classes_file(tmp_path, 4), tmp_path / "linear",
                                         preprocess={"resize": 32, "crop": 32}))
    assert find_cuts(_served(snapshot), 32) == []
    engine = RuntimeOcclusionEngine(Classifier(snapshot, threads=1))
    x = np.random.default_rng(15).standard_normal((3, 32, 32)).astype(np.float32)
    result = engine.sweep(x, 8, 8, target=2)
    assert engine.split_notes[(8, 8)] == "no cut saves work"
    np.testing.assert_allclose(result.probability, brute_force(model, x, 8, 8, 2, "logits"), atol=1e-5, rtol=0)
