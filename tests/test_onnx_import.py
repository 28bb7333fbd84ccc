"""ONNX models: ``zfserve import onnx``, the model directory, classification against eager PyTorch, and every
refusal (one line, exit status 2, nothing written). The ONNX files are exported here from PyTorch definitions
(tests/onnx_models.py), random weights, no network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import onnx_models as om
from zfserve.config import ModelConfig
from zfserve.engine.classifier import Classifier
from zfserve.errors import ModelKindError, ModelLoadError
from zfserve.weights import read_snapshot

NAMES = ("resnet18", "mobilenet", "small160", "softmax")


def zfserve(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zfserve.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (PyTorch model, model directory), imported through the library."""
    from zfserve.import_onnx import import_onnx
    root = tmp_path_factory.mktemp("onnx-models")
    out = {}
    for name in NAMES:
        spec = om.SPECS[name]
        model, path = om.export_named(name, root)
        out[name] = model, import_onnx(path, om.classes_file(root, spec.num_classes), root / name,
                                       output=spec.output, preprocess={"resize": spec.resize})
    return out


def reference(model, x: np.ndarray, output: str) -> np.ndarray:
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    return (y if output == "probabilities" else torch.softmax(y, dim=1)).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_library_probabilities_equal_pytorch(imported, name):
    model, directory = imported[name]
    spec = om.SPECS[name]
    clf = Classifier(str(directory), warmup=False)
    x = np.random.default_rng(7).standard_normal((4, 3, spec.crop, spec.crop)).astype(np.float32)
    np.testing.assert_allclose(clf.probabilities(x), reference(model, x, spec.output), atol=1e-5, rtol=0)
    assert clf.ood_detector is None and "zfserve export --model" in clf.ood_note and "--calibration" in clf.ood_note


def test_config_and_directory(imported):
    _, directory = imported["small160"]
    doc = json.loads((directory / "config.json").read_text())
    assert doc["kind"] == "onnx" and doc["onnx"] == {"input": "input", "layout": "NCHW", "output": "logits"}
    assert doc["input_size"] == 160 and doc["preprocess"]["crop"] == 160 and "widths" not in doc
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.onnx", "served.onnx"]
    snap = read_snapshot(directory)
    import hashlib
    assert snap.sha256 == hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match="unknown config keys"):
        ModelConfig.from_json({**doc, "layers": 3})
    with pytest.raises(ModelLoadError, match="onnx.output"):
        ModelConfig.from_json({**doc, "onnx": {**doc["onnx"], "output": "scores"}})
    with pytest.raises(ModelKindError, match="ONNX model"):
        snap.model()


def test_cli_import_and_classify_equal_pytorch(tmp_path):
    model, path = om.export_named("mobilenet", tmp_path)
    classes = om.classes_file(tmp_path, 10)
    done = zfserve("import", "onnx", path, "--classes", classes, "--out", tmp_path / "mob")
    assert done.returncode == 0, done.stderr
    assert "ONNX model" in done.stdout and "zfserve export --model DIR --calibration" in done.stdout
    from PIL import Image
    from zfserve.preprocess import load_image
    rgb = (np.random.default_rng(3).random((240, 300, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    done = zfserve("classify", tmp_path / "a.png", "--model", tmp_path / "mob", "--json", "--top-k", "10")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    snap = read_snapshot(tmp_path / "mob")
    x = load_image(tmp_path / "a.png", snap.config)[None]
    expected = reference(model, x, "logits")[0]
    row = got[0] if isinstance(got, list) else got
    predictions = row.get("predictions") or row.get("top_k")
    for p in predictions:
        assert abs(p["probability"] - expected[p["index"]]) <= 1e-5


def _graph(tmp_path, name, inputs, nodes, outputs, initializers=(), opset=17):
    import onnx
    from onnx import helper
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              ([helper.make_opsetid("example.custom", 1)] if name == "custom" else []))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _refusal_files(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    f = lambda n, t=TensorProto.FLOAT, s=("N", 3, 8, 8): helper.make_tensor_value_info(n, t, list(s))  # noqa
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.ones((4, 192), np.float32), "w")
    flat = helper.make_node("Flatten", ["x"], ["f"])
    gemm = helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)
    files = {
        "two inputs": (_graph(tmp_path, "two", [f("x"), f("x2")], [helper.make_node("Add", ["x", "x2"], ["s"]),
                                                                    helper.make_node("Flatten", ["s"], ["f"]), gemm],
                              [out], [w]), "2 inputs"),
        "integer input": (_graph(tmp_path, "int", [f("xi", TensorProto.INT64)],
                                 [helper.make_node("Cast", ["xi"], ["x"], to=TensorProto.FLOAT), flat, gemm], [out], [w]),
                          "not float32"),
        "3-D input": (_graph(tmp_path, "rank3", [f("x", s=("N", 3, 64))], [flat, gemm], [out], [w]),
                      "3 dimensions"),
        "wrong class count": (_graph(tmp_path, "count", [f("x")], [flat, gemm], [out], [w]), "one value per class"),
        "custom operator": (_graph(tmp_path, "custom", [f("x")],
                                   [helper.make_node("Mystery", ["x"], ["m"], domain="example.custom"),
                                    helper.make_node("Flatten", ["m"], ["f"]), gemm], [out], [w]),
                            "operators ONNX Runtime cannot run"),
    }
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    files["not ONNX"] = (junk, "not an ONNX file")
    return files


def test_refusals_one_line_exit_2_nothing_written(tmp_path):
    classes = om.classes_file(tmp_path, 5)
    for what, (path, message) in _refusal_files(tmp_path).items():
        out = tmp_path / f"out-{path.stem}"
        done = zfserve("import", "onnx", path, "--classes", classes, "--out", out)
        assert done.returncode == 2, (what, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, (what, done.stderr)
        assert not out.exists(), what
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{path.stem}")], what


def test_layers_refused_naming_the_kind(imported, tmp_path):
    _, directory = imported["softmax"]
    from PIL import Image
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(tmp_path / "z.png")
    for args in (("deconv", tmp_path / "z.png", "--model", directory, "--out", tmp_path / "d"),
                 ("index", "--model", directory), ("report", "all", "--model", directory, "--out", tmp_path / "r"),
                 ("occlude", tmp_path / "z.png", "--model", directory, "--layer", "conv5", "--out", tmp_path / "o"),
                 ("info", "--model", directory)):
        done = zfserve(*args)
        if args[0] == "info":
            assert done.returncode == 0 and "ONNX model" in done.stdout, done.stderr
            continue
        assert done.returncode == 2, done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "ONNX model" in done.stderr, done.stderr


def test_readme_table_is_the_capability_table():
    from zfserve.capabilities import table_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table_markdown() in readme
