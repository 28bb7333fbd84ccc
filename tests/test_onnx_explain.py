"""ONNX models: occlusion (exact = brute force, progress, deadline, cancel, the position cap; the fast modes),
and faithfulness by forward passes with the model-randomisation check done on the graph's initializers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import onnx_models as om
from zfserve.engine.occlusion_modes import EXACT_MODE, OcclusionEngines, mode_from
from zfserve.engine.occlusion_runtime import SweepStopped
from zfserve.engine.results import window_starts
from zfserve.errors import InvalidArgumentError, ModelKindError
from zfserve.weights import read_snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from zfserve.import_onnx import import_onnx
    root = tmp_path_factory.mktemp("onnx-explain")
    out = {}
    for name in ("small160", "softmax", "mobilenet"):
        spec = om.SPECS[name]
        model, path = om.export_named(name, root)
        out[name] = model, import_onnx(path, om.classes_file(root, spec.num_classes), root / name,
                                       output=spec.output, preprocess={"resize": spec.resize})
    return out


def brute_force(model, x: np.ndarray, window: int, stride: int, target: int, output: str) -> np.ndarray:
    """The target's probability with each window filled with 0 (the mean in input units), one copy at a time."""
    size = x.shape[-1]
    starts = window_starts(size, window, stride)
    out = np.empty((len(starts), len(starts)))
    with torch.no_grad():
        for r, y0 in enumerate(starts):
            for c, x0 in enumerate(starts):
                copy = x.copy()
                copy[:, y0:y0 + window, x0:x0 + window] = 0.0
                y = model(torch.from_numpy(copy[None]))
                p = y if output == "probabilities" else torch.softmax(y, dim=1)
                out[r, c] = float(p[0, target])
    return out


@pytest.mark.parametrize("name", ["small160", "softmax", "mobilenet"])
def test_exact_occlusion_equals_brute_force(models, name):
    model, directory = models[name]
    spec = om.SPECS[name]
    x = np.random.default_rng(5).standard_normal((3, spec.crop, spec.crop)).astype(np.float32)
    engines = OcclusionEngines(read_snapshot(directory), threads=1)
    seen = []
    result = engines.sweep(x, EXACT_MODE, window=32, stride=24, target=1, progress=lambda d, t: seen.append((d, t)))
    assert result.mode == "exact" and result.engine == "onnxruntime" and result.precision == "fp32"
    np.testing.assert_allclose(result.probability, brute_force(model, x, 32, 24, 1, spec.output), atol=1e-5, rtol=0)
    assert seen[-1][0] == seen[-1][1] == result.probability.size
    with pytest.raises(ModelKindError, match="ONNX model"):
        engines.sweep(x, EXACT_MODE, window=32, stride=24, outputs=("activity",))
    with pytest.raises(ModelKindError, match="ONNX model"):
        engines.sweep(x, EXACT_MODE, window=32, stride=24, layer="conv5")


def test_occlusion_cancel_deadline_cap_and_fast_modes(models):
    _, directory = models["small160"]
    engines = OcclusionEngines(read_snapshot(directory), threads=1, batch_size=4)
    x = np.random.default_rng(6).standard_normal((3, 160, 160)).astype(np.float32)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SweepStopped, match="cancelled"):
        engines.sweep(x, EXACT_MODE, window=16, stride=4, cancel=cancel)
    with pytest.raises(SweepStopped, match="deadline"):
        engines.sweep(x, EXACT_MODE, window=16, stride=4, deadline=time.monotonic() - 1)
    with pytest.raises(InvalidArgumentError, match="at most 100"):
        engines.sweep(x, EXACT_MODE, window=16, stride=4, max_positions=100)
    exact = engines.sweep(x, EXACT_MODE, window=32, stride=16, target=2)
    drill = engines.sweep(x, mode_from(approximation="drilldown"), window=32, stride=16, target=2)
    assert drill.mode.startswith("onnxruntime-fp32+drilldown")
    done = drill.evaluated if drill.evaluated is not None else np.ones_like(drill.probability, bool)
    np.testing.assert_allclose(drill.probability[done], exact.probability[done], atol=1e-5)


def test_faithfulness_runs_and_flags_a_map_independent_of_the_model(models):
    from zfserve.paper.dataset import AnalysisData
    from zfserve.paper.faithfulness_graph import faithfulness_graph
    from zfserve.paper.report import Settings
    _, directory = models["small160"]
    snap = read_snapshot(directory)

    def edges(x, target, index):   # the image's own edges: the same whatever the weights
        gray = np.abs(x).sum(0)
        return np.abs(np.diff(gray, axis=0, append=gray[-1:])) + np.abs(np.diff(gray, axis=1, append=gray[:, -1:]))

    s = Settings(n=4, seed=3, window=32, faithfulness_images=4, sanity_images=2, faithfulness_stride=16,
                 deletion_steps=4)
    result = faithfulness_graph(snap, AnalysisData("synthetic", seed=3, n=4), s, extra_methods={"edges": edges},
                                progress=lambda line: None)
    table = result["table"]
    assert set(table) == {"occlusion", "random", "centre", "edges"}
    assert table["edges"]["insensitive_to_model"] and "MPRT" in table["edges"]["failed"]
    assert not table["occlusion"]["insensitive_to_model"]
    assert len(result["mprt"]["layers"]) >= 3 and result["mprt"]["layers"][-1].startswith("last 5 of 5")
