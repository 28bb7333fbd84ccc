"""The ONNX Runtime classifier: agreement with eager PyTorch, top-k, batch splitting, thread safety, input
errors, and the classify CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from zfserve.cli import main
from zfserve.engine.classifier import Classifier, Prediction
from zfserve.errors import InvalidArgumentError, NotFoundError
from zfserve.weights import save_model
from zfserve.preprocess import load_image

CLASS_NAMES = [f"kind {i}" for i in range(10)]


def batch(n, seed) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 3, 224, 224)) * 50).astype(np.float32)


def eager_probabilities(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spread_model):
    model = spread_model()
    directory = save_model(model, tmp_path_factory.mktemp("model") / "tiny", class_names=CLASS_NAMES)
    return model, directory


@pytest.fixture(scope="module")
def classifier(model_dir):
    return Classifier(model_dir[1], max_batch_size=4)


def test_probabilities_and_top_k_match_eager(model_dir, classifier):
    model, _ = model_dir
    assert classifier.num_classes == 10 and classifier.class_names == CLASS_NAMES
    assert classifier.config.class_names == CLASS_NAMES and classifier.providers == ["CPUExecutionProvider"]
    x = batch(3, seed=1)
    probs = classifier.probabilities(x)
    ref = eager_probabilities(model, x)
    assert probs.dtype == np.float32 and probs.shape == (3, 10)
    assert 0.15 < probs.max() < 0.999
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-5)

    top = classifier.classify(x, top_k=3)
    ref_top = torch.topk(torch.from_numpy(ref), 3, dim=1)
    for row, values, indices in zip(top, ref_top.values, ref_top.indices):
        assert [p.index for p in row] == indices.tolist()
        assert [p.name for p in row] == [CLASS_NAMES[i] for i in indices.tolist()]
        np.testing.assert_allclose([p.probability for p in row], values.numpy(), atol=1e-5)
    assert isinstance(top[0][0], Prediction)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's RSS from /proc")
def test_release_memory_gives_back_what_a_large_batch_took(model_dir):
    """ONNX Runtime's arena keeps what a batch of 32 grew it by; release_memory returns most of it, and the
    answers after it are the same (and eager PyTorch's)."""
    model, directory = model_dir
    c = Classifier(directory, max_batch_size=32, ood=False)
    small = batch(1, seed=5)
    before = c.probabilities(small)
    start = _rss_mb()
    c.probabilities(batch(32, seed=6))
    grown = _rss_mb() - start
    c.release_memory()
    kept = _rss_mb() - start
    assert grown > 100, f"the premise: a batch of 32 grows the process by more than 100 MB, got {grown:.0f}"
    assert kept < grown / 3, f"grown {grown:.0f} MB, still {kept:.0f} MB after release_memory"
    np.testing.assert_array_equal(c.probabilities(small), before)
    np.testing.assert_allclose(before, eager_probabilities(model, small), rtol=0, atol=1e-5)


def test_top_k_orders_ties_by_index(classifier):
    probs = np.full((1, 10), 0.05, np.float32)
    probs[0, [7, 2]] = 0.3
    assert [p.index for p in classifier.top_k(probs, 4)[0]] == [2, 7, 0, 1]


def test_batches_above_max_are_split(model_dir, classifier, monkeypatch):
    model, _ = model_dir
    sizes = []
    real_run = classifier._run
    monkeypatch.setattr(classifier, "_run", lambda b: sizes.append(len(b)) or real_run(b))
    x = batch(10, seed=2)
    probs = classifier.probabilities(x)
    assert sizes == [4, 4, 2]
    np.testing.assert_allclose(probs, eager_probabilities(model, x), rtol=0, atol=1e-5)


def test_concurrent_callers_get_serial_results(classifier):
    inputs = [batch(2, seed=10 + i) for i in range(6)]
    serial = [classifier.probabilities(x) for x in inputs]
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def work(i):
        start.wait()
        results[i] = classifier.probabilities(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_non_contiguous_input_is_accepted(classifier):
    x = batch(2, seed=3)
    flipped = x[:, :, :, ::-1]
    np.testing.assert_array_equal(classifier.probabilities(flipped),
                                  classifier.probabilities(np.ascontiguousarray(flipped)))


def _with_value(value, index=(1, 2, 100, 50)):
    x = batch(3, seed=4)
    x[index] = value
    return x


@pytest.mark.parametrize("bad, field", [
    ([[0.0]], "batch"),
    (torch.zeros(1, 3, 224, 224), "batch"),
    (batch(1, 5).astype(np.float64), "batch"),
    (batch(1, 5).astype(np.uint8), "batch"),
    (batch(1, 5)[0], "batch"),                                   # rank 3
    (batch(1, 5)[None], "batch"),                                # rank 5
    (np.ones((1, 1, 224, 224), np.float32), "batch"),             # channels
    (np.ones((2, 3, 225, 224), np.float32), "batch"),             # size
    (np.ones((0, 3, 224, 224), np.float32), "batch"),             # empty
    (_with_value(np.nan), "image"),
    (_with_value(np.inf), "image"),
    (_with_value(-np.inf, (0, 0, 0, 0)), "image"),
])
def test_bad_batches_raise_typed_errors(classifier, bad, field):
    with pytest.raises(InvalidArgumentError) as info:
        classifier.probabilities(bad)
    assert info.value.field == field


def test_non_finite_error_names_the_image(classifier):
    with pytest.raises(InvalidArgumentError, match="index 1"):
        classifier.classify(_with_value(np.nan))


@pytest.mark.parametrize("k", [0, 11, -1, 2.0, True, "3"])
def test_bad_top_k(classifier, k):
    with pytest.raises(InvalidArgumentError) as info:
        classifier.classify(batch(1, 6), top_k=k)
    assert info.value.field == "top_k"


@pytest.mark.parametrize("kwargs, field", [(dict(device="tpu"), "device"), (dict(max_batch_size=0), "max_batch_size"),
                                           (dict(threads=0), "threads"), (dict(max_batch_size=2.5), "max_batch_size")])
def test_bad_constructor_arguments(model_dir, kwargs, field):
    with pytest.raises(InvalidArgumentError) as info:
        Classifier(model_dir[1], **kwargs)
    assert info.value.field == field


def test_unknown_model_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        Classifier(str(tmp_path / "no-such-model"))


def test_from_in_memory_model(tmp_path, monkeypatch, spread_model):
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path))
    model = spread_model(seed=7)
    clf = Classifier(model, threads=1, warmup=False)
    assert clf.onnx_path.is_relative_to(tmp_path) and clf.threads == 1
    x = batch(2, seed=8)
    np.testing.assert_allclose(clf.probabilities(x), eager_probabilities(model, x), rtol=0, atol=1e-5)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present")
def test_cuda_without_provider_falls_back_to_cpu(model_dir):
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        clf = Classifier(model_dir[1], device="cuda", warmup=False)
    assert clf.device == "cpu" and clf.providers == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(9)
    paths = []
    for i, (size, fmt) in enumerate([((240, 300), "PNG"), ((256, 256), "JPEG"), ((300, 260), "WEBP")]):
        path = folder / f"img{i}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, fmt)
        paths.append(str(path))
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(Path(paths[0]).read_bytes()[:200])  # a truncated PNG
    return paths, str(corrupt)


def test_classify_cli_lines(model_dir, classifier, image_files, capsys):
    paths, _ = image_files
    assert main(["classify", *paths, "--model", str(model_dir[1]), "--top-k", "2", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    expected = classifier.classify(np.stack([load_image(p, classifier.config) for p in paths]), top_k=2)
    for line, path, preds in zip(lines, paths, expected):
        assert line.startswith(f"{path}: {preds[0].name} ({preds[0].probability:.4f}); {preds[1].name}")


def test_classify_cli_json_with_a_bad_image(model_dir, image_files, capsys):
    paths, corrupt = image_files
    missing = str(model_dir[1] / "missing.png")
    argv = ["classify", paths[0], corrupt, paths[1], missing, "--model", str(model_dir[1]), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert [r["image"] for r in records] == [paths[0], corrupt, paths[1], missing]
    assert len(records[0]["predictions"]) == 5 and len(records[2]["predictions"]) == 5
    assert "error" in records[1] and "no such file" in records[3]["error"]
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and corrupt in err[0] and missing in err[1]
    assert all(line.startswith("zfserve classify: error:") for line in err)


@pytest.mark.parametrize("extra", [["--top-k", "0"], ["--top-k", "11"], ["--batch-size", "0"]])
def test_classify_cli_bad_arguments(model_dir, image_files, capsys, extra):
    assert main(["classify", image_files[0][0], "--model", str(model_dir[1]), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zfserve classify: error: --")
