"""ONNX export: parity with eager PyTorch, checker, metadata, the model.onnx cache, the export CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from zfserve import export as zexport
from zfserve.cli import main
from zfserve.errors import InvalidArgumentError
from zfserve.export import ExportError, check_parity, ensure_onnx, export_onnx, read_metadata
from zfserve.model import ZFNet
from zfserve.weights import ONNX_FILE, save_model, state_dict_hash, weights_hash

NARROW_WIDTHS = (8, 16, 16, 16, 16)  # for the cache and CLI tests, which are about files, not numerics
EXTRA = ("pool2", "conv5", "fc6")


def images(n, seed) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 50


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spread_model):
    model = spread_model()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", extra_outputs=EXTRA)
    return model, path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("batch", [1, 33])
def test_parity_with_pytorch_dynamic_batch(exported, batch):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(batch, seed=100 + batch)
    logits, probs, pool2, conv5, fc6 = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        trace = model.trace(x, layers=EXTRA)
        ref_probs = torch.softmax(trace.logits, dim=1).numpy()
    assert probs.shape == (batch, 10)
    # not a trivial comparison: neither uniform nor one-hot
    assert 0.15 < probs.max() < 0.999
    np.testing.assert_allclose(probs, ref_probs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), ref_probs.argmax(1))
    scale = np.abs(trace.logits.numpy()).max()
    np.testing.assert_allclose(logits, trace.logits.numpy(), rtol=0, atol=1e-4 * scale)
    for got, name in ((pool2, "pool2"), (conv5, "conv5"), (fc6, "fc6")):
        ref = trace.activations[name].numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_checker_and_graph_interface(exported):
    _, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims == ["batch", 3, 224, 224]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", *EXTRA]
    ops = {n.op_type for n in proto.graph.node}
    assert "Softmax" in ops and "If" not in ops  # softmax inside the graph; LRN without shape arithmetic


def test_metadata(exported):
    model, path = exported
    meta = read_metadata(path)
    assert json.loads(meta["zfserve.class_names"]) == model.config.class_names
    assert json.loads(meta["zfserve.preprocess"]) == model.config.preprocess.to_json()
    assert meta["zfserve.model_version"] == model.config.version
    assert meta["zfserve.model_name"] == model.config.name
    assert meta["zfserve.weights_sha256"] == state_dict_hash(model)
    assert json.loads(meta["zfserve.outputs"]) == ["logits", "probabilities", *EXTRA]


def test_parity_check_detects_a_different_model(exported, spread_model):
    model, path = exported
    assert check_parity(path, model, batch=1) <= 1e-5
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(path, spread_model(seed=1), batch=1)


def test_failed_parity_is_an_error_and_writes_nothing(tmp_path, monkeypatch, spread_model):
    model = spread_model(widths=NARROW_WIDTHS)
    real_copy = zexport._export_copy

    def perturbed_copy(m):  # an exporter bug: the graph no longer computes the model
        clone = real_copy(m)
        with torch.no_grad():
            clone.fc8.bias.add_(0.5)
        return clone

    monkeypatch.setattr(zexport, "_export_copy", perturbed_copy)
    with pytest.raises(ExportError):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [dict(extra_outputs=("conv9",)), dict(extra_outputs=("conv5", "conv5")),
                                    dict(extra_outputs=("fc8",)), dict(opset=11), dict(opset="17")])
def test_bad_export_arguments(tmp_path, kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        export_onnx(ZFNet(num_classes=10, fc_width=64, widths=NARROW_WIDTHS), tmp_path / "m.onnx", **kwargs)
    assert info.value.field in ("extra_outputs", "opset")


def test_model_dir_cache_reexports_when_weights_change(tmp_path, cache_dir, monkeypatch, spread_model):
    directory = save_model(spread_model(seed=2, widths=NARROW_WIDTHS), tmp_path / "model")
    path = ensure_onnx(directory)
    assert path == directory / ONNX_FILE
    assert read_metadata(path)["zfserve.weights_sha256"] == weights_hash(directory)
    stamp = path.stat().st_mtime_ns

    calls = []
    real_export = zexport.export_onnx
    monkeypatch.setattr(zexport, "export_onnx", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    assert ensure_onnx(str(directory)) == path and calls == [] and path.stat().st_mtime_ns == stamp

    new_model = spread_model(seed=3, widths=NARROW_WIDTHS)
    save_model(new_model, directory)
    assert ensure_onnx(directory) == path and calls == [1]
    assert read_metadata(path)["zfserve.weights_sha256"] == weights_hash(directory)
    assert check_parity(path, new_model) <= 1e-5
    assert not cache_dir.exists()


def test_read_only_model_dir_falls_back_to_cache(tmp_path, cache_dir, monkeypatch, spread_model):
    directory = save_model(spread_model(seed=4, widths=NARROW_WIDTHS), tmp_path / "model")
    real_writable = zexport._writable
    # Tests run as root here, which ignores permission bits: simulate a read-only installed package.
    monkeypatch.setattr(zexport, "_writable", lambda folder: folder != directory and real_writable(folder))
    path = ensure_onnx(directory)
    digest = weights_hash(directory)
    assert path.parent.parent == cache_dir and path.parent.name.endswith(digest[:16])
    assert not (directory / ONNX_FILE).exists()
    assert read_metadata(path)["zfserve.weights_sha256"] == digest


def test_embedded_model_exports_to_the_cache_not_the_package(tmp_path, cache_dir, monkeypatch, spread_model):
    embedded = tmp_path / "models"
    directory = save_model(spread_model(seed=8, widths=NARROW_WIDTHS), embedded / "zfnet-demo")
    monkeypatch.setattr(zexport, "EMBEDDED_DIR", embedded.resolve())
    path = ensure_onnx(directory)
    assert path.parent.parent == cache_dir and not (directory / ONNX_FILE).exists()


def test_in_memory_model_is_cached_by_state_hash(cache_dir, spread_model):
    model = spread_model(seed=5, widths=NARROW_WIDTHS)
    first = ensure_onnx(model)
    assert first.is_relative_to(cache_dir) and ensure_onnx(model) == first
    with torch.no_grad():
        model.conv1.weight.mul_(1.5)
    second = ensure_onnx(model)
    assert second != first
    assert read_metadata(second)["zfserve.weights_sha256"] == state_dict_hash(model)


def test_export_cli(tmp_path, cache_dir, capsys, spread_model):
    directory = save_model(spread_model(seed=6, widths=NARROW_WIDTHS), tmp_path / "model")
    out = tmp_path / "out" / "exported.onnx"
    assert main(["export", "--model", str(directory), "--out", str(out), "--extra-outputs", "conv5"]) == 0
    assert str(out) in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["zfserve.weights_sha256"] == weights_hash(directory)
    assert json.loads(meta["zfserve.outputs"]) == ["logits", "probabilities", "conv5"]

    assert main(["export", "--model", str(directory)]) == 0
    assert (directory / ONNX_FILE).is_file()

    assert main(["export", "--model", str(directory), "--out", str(tmp_path)]) == 2
    assert main(["export", "--model", str(directory), "--out", str(out), "--opset", "9"]) == 2
    assert main(["export", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("zfserve export: error:") for line in err)
