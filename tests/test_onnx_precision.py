"""ONNX models on every classification engine: int8 calibrated on the user's images with the accuracy gate,
OpenVINO fp32, and the out-of-distribution score fitted at import (``--calibration DIR``) from the served graph's
penultimate features."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import onnx_models as om
from zfserve.engine.classifier import Classifier

CLASSES = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The softmax test model, and an ImageFolder of held-out images (smooth random blobs, 8 per class)."""
    root = tmp_path_factory.mktemp("onnx-precision")
    model, path = om.export_named("softmax", root)
    folder = root / "held-out"
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(8):
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(small).resize((120, 120), Image.BILINEAR).save(folder / f"class{c}" / f"{i}.png")
    return model, path, folder, root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "zfserve.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_import_with_calibration_fits_the_ood_score(setup):
    _, path, folder, root = setup
    out = root / "fitted"
    done = cli("import", "onnx", path, "--classes", om.classes_file(root, CLASSES), "--out", out, "--output",
               "probabilities", "--calibration", folder)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "ood.json", "ood.safetensors",
                                                      "served.onnx"]
    clf = Classifier(str(out), warmup=False)
    assert clf.ood_detector is not None and clf.ood_note == ""
    assert "knn(features)" in clf.ood_detector.method and "vim(features)" in clf.ood_detector.method
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 96)).astype(np.float32)
    assert all(v is not None for v in clf.scored(x).ood)


def test_int8_with_the_gate_and_openvino(setup):
    _, path, folder, root = setup
    out = root / "plain"
    assert cli("import", "onnx", path, "--classes", om.classes_file(root, CLASSES), "--out", out, "--output",
               "probabilities").returncode == 0
    done = cli("export", "--model", out, "--precision", "int8", "--calibration", folder, "--calibration-images", "16",
               "--max-accuracy-drop", "100", "--no-ood")
    assert done.returncode == 0, done.stderr
    assert (out / "model.int8.onnx").is_file() and "agreement with fp32" in done.stdout
    x = np.random.default_rng(2).standard_normal((6, 3, 96, 96)).astype(np.float32)
    fp32 = Classifier(str(out), warmup=False).probabilities(x)
    int8 = Classifier(str(out), precision="int8", warmup=False).probabilities(x)
    assert np.abs(int8 - fp32).max() < 0.1
    pytest.importorskip("openvino")
    openvino = Classifier(str(out), engine="openvino", warmup=False).probabilities(x)
    np.testing.assert_allclose(openvino, fp32, atol=1e-4)
