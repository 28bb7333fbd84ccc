"""Fast occlusion: the batched engine on every classification runtime against brute force (occlude, full eager
PyTorch forward), the approximations on maps whose answer is known, the modes' names and refusals, the stop
conditions a server needs, and the agreement gate (passing an exact-equivalent mode, refusing one that
disagrees, storing its figures as JSON keyed by the weights)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from zfserve.data import CLASSES
from zfserve.engine.occlusion_modes import EXACT_MODE, OcclusionEngines, OcclusionMode, mode_from
from zfserve.engine.occlusion_plans import Approximation
from zfserve.engine.occlusion_runtime import RuntimeOcclusionEngine, SweepStopped
from zfserve.engine.results import window_starts
from zfserve.errors import InvalidArgumentError

WIDTHS = (24, 32, 32, 32, 24)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spread_model):
    from zfserve.weights import save_model
    model = spread_model(seed=7, widths=WIDTHS, num_classes=len(CLASSES), fc_width=32)
    return save_model(model, tmp_path_factory.mktemp("fast") / "fast-tiny", class_names=list(CLASSES),
                      name="fast-tiny")


@pytest.fixture(scope="module")
def snapshot(model_dir):
    from zfserve.weights import read_snapshot
    return read_snapshot(model_dir)


@pytest.fixture(scope="module")
def classifier(snapshot):
    from zfserve.engine.classifier import Classifier
    return Classifier(snapshot, threads=1)


def _image(seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(1, 3, 14, 14, generator=gen), size=224, mode="bilinear")
    return (base[0] * 60 + torch.randn(3, 224, 224, generator=gen) * 20).numpy().astype(np.float32)


def _brute_force(model, image: np.ndarray, window: int, stride: int, fill) -> np.ndarray:
    """Softmax of every occluded copy (``fill``: 3 values in input units), each through the whole eager PyTorch
    model: (n, n, classes)."""
    starts = window_starts(224, window, stride)
    copies = []
    for y in starts:
        for x in starts:
            c = torch.from_numpy(image.copy())
            c[:, y:y + window, x:x + window] = torch.as_tensor(fill, dtype=torch.float32).view(3, 1, 1)
            copies.append(c)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack(copies)).double(), dim=1).numpy()
    return probs.reshape(len(starts), len(starts), -1)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("window,stride,fill,units", [(56, 48, "mean", "input"), (40, 40, (30.0, -20.0, 5.0), "input"),
                                                      (64, 53, (200, 10, 90), "pixel")])
def test_batched_sweep_equals_brute_force(snapshot, classifier, window, stride, fill, units):
    model = snapshot.model()
    image = _image(window)
    engine = RuntimeOcclusionEngine(classifier, batch_size=7)     # batches that split rows and mix positions
    result = engine.sweep(image, window, stride, fill=fill, fill_units=units, target=3)
    values = np.zeros(3) if fill == "mean" else np.asarray(fill, dtype=np.float64)
    occluder = values - np.asarray(snapshot.config.preprocess.mean_rgb()) if units == "pixel" else values
    expected = _brute_force(model, image, window, stride, occluder)
    with torch.no_grad():
        base = torch.softmax(model(torch.from_numpy(image)[None]).double(), dim=1)[0].numpy()
    np.testing.assert_allclose(result.probability, expected[..., 3], atol=1e-5)
    np.testing.assert_array_equal(result.argmax, expected.argmax(-1))
    np.testing.assert_allclose(result.base_probability, base[3], atol=1e-5)
    np.testing.assert_allclose(result.attribution, result.per_pixel(base[3] - expected[..., 3], 224), atol=1e-5)
    assert result.evaluated is None and result.timings["forwards"] == len(result.starts) ** 2 + 1
    assert (result.engine, result.precision, result.mode) == ("onnxruntime", "fp32", "onnxruntime-fp32")


def test_sweeps_of_several_images_share_batches_and_equal_single_sweeps(classifier):
    engine = RuntimeOcclusionEngine(classifier, batch_size=5)
    images = [_image(s) for s in (1, 2, 3)]
    for approximation in (Approximation(), Approximation("drilldown"), Approximation("early-stop")):
        together = engine.sweep_many(images, [None, 2, None], 48, 32, approximation=approximation)
        for image, target, result in zip(images, [None, 2, None], together):
            alone = engine.sweep(image, 48, 32, target=target, approximation=approximation)
            assert result.target == alone.target
            np.testing.assert_allclose(result.probability, alone.probability, atol=1e-6)
            np.testing.assert_array_equal(result.argmax, alone.argmax)
            assert (result.evaluated is None) == (alone.evaluated is None)


@pytest.mark.parametrize("engine,precision,tolerance", [("openvino", "fp32", 1e-4), ("openvino", "bf16", 0.05)])
def test_openvino_engines_sweep_close_to_brute_force(snapshot, engine, precision, tolerance):
    pytest.importorskip("openvino")
    from zfserve.engine.backends import openvino_core
    from zfserve.engine.classifier import Classifier
    if precision == "bf16" and "BF16" not in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 (OpenVINO's capabilities lack BF16)")
    sweep = RuntimeOcclusionEngine(Classifier(snapshot, engine=engine, precision=precision, threads=1))
    image = _image(5)
    result = sweep.sweep(image, 64, 40, target=1)
    expected = _brute_force(snapshot.model(), image, 64, 40, np.zeros(3))
    np.testing.assert_allclose(result.probability, expected[..., 1], atol=tolerance)
    assert (result.engine, result.precision, result.mode) == (engine, precision, f"{engine}-{precision}")


def test_int8_sweep_stays_within_int8_tolerance(snapshot):
    from zfserve.engine.classifier import Classifier
    from zfserve.engine.quantize import Int8Settings
    small = Int8Settings(calibration_images=16, accuracy_images=32, max_accuracy_drop=100.0)
    sweep = RuntimeOcclusionEngine(Classifier(snapshot, precision="int8", int8=small, threads=1))
    image = _image(6)
    result = sweep.sweep(image, 64, 40, target=2)
    expected = _brute_force(snapshot.model(), image, 64, 40, np.zeros(3))
    np.testing.assert_allclose(result.probability, expected[..., 2], atol=0.1)    # README "Precision": within 0.1
    assert (result.engine, result.precision) == ("onnxruntime", "int8")


# ---------------------------------------------------------------------------------------------- approximations
class FakeClassifier:
    """Any classifier will do: two classes, p(class 0) = 1 - the share of a hidden weight map occluded (each
    pixel's input is 0 under the occluder), so the map of the target's probability is known exactly."""

    engine, precision, input_size, num_classes = "fake", "fp32", 224, 2

    def __init__(self, weight: np.ndarray):
        from zfserve.config import PreprocessConfig

        class Config:
            preprocess = PreprocessConfig()
        self.config = Config()
        self.weight = weight / weight.sum()
        self.calls = 0

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        kept = ((batch[:, 0] != 0) * self.weight).sum(axis=(1, 2))
        return np.stack([kept, 1 - kept], axis=1).astype(np.float32)


def _bump(cy: float, cx: float, width: float = 20.0) -> np.ndarray:
    yy, xx = np.mgrid[0:224, 0:224]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2)) + 1e-3


def test_approximations_find_the_largest_drop_with_fewer_forwards():
    image = np.ones((3, 224, 224), np.float32)
    exact_engine = RuntimeOcclusionEngine(FakeClassifier(_bump(150, 70)))
    exact = exact_engine.sweep(image, 32, 8, target=0)                  # 25 x 25 positions
    truth = np.unravel_index(int(np.argmin(exact.probability)), exact.probability.shape)
    for approximation in (Approximation("drilldown"), Approximation("early-stop"),
                          Approximation("drilldown", coarse=4, refine=1), Approximation("early-stop", margin=0.2)):
        fake = FakeClassifier(_bump(150, 70))
        result = RuntimeOcclusionEngine(fake).sweep(image, 32, 8, target=0, approximation=approximation)
        measured = np.where(result.evaluated, result.probability, np.inf)
        assert np.unravel_index(int(np.argmin(measured)), measured.shape) == truth, approximation
        evaluated = int(result.evaluated.sum())
        assert result.timings["forwards"] == evaluated + 1 < 625 // 2, (approximation, evaluated)
        # Evaluated positions hold the measured values; the others lie between their evaluated neighbours.
        np.testing.assert_allclose(result.probability[result.evaluated], exact.probability[result.evaluated],
                                   atol=1e-6)
        assert result.probability[~result.evaluated].min() >= measured.min()
        assert result.mode == f"fake-fp32+{approximation.name}"


def test_drilldown_counts_and_early_stop_margins():
    image = np.ones((3, 224, 224), np.float32)
    drill = RuntimeOcclusionEngine(FakeClassifier(_bump(40, 180))).sweep(
        image, 32, 8, target=0, approximation=Approximation("drilldown", coarse=3, refine=2))
    lattice = np.unique(np.r_[np.arange(0, 25, 3), 24])
    assert drill.evaluated[np.ix_(lattice, lattice)].all()
    assert drill.evaluated.sum() <= len(lattice) ** 2 + 2 * (2 * 2 + 1) ** 2
    stop_now = RuntimeOcclusionEngine(FakeClassifier(_bump(40, 180))).sweep(
        image, 32, 8, target=0, approximation=Approximation("early-stop", margin=0.0))
    # margin 0: the lattice (every 2nd of 25, and the last), then only around the largest drop found so far.
    lattice = np.unique(np.r_[np.arange(0, 25, 2), 24])
    assert stop_now.evaluated[np.ix_(lattice, lattice)].all() and 13 * 13 < stop_now.evaluated.sum() <= 13 * 13 + 40
    everything = RuntimeOcclusionEngine(FakeClassifier(_bump(40, 180, width=200))).sweep(
        image, 32, 8, target=0, approximation=Approximation("early-stop", margin=1.0))
    assert everything.evaluated is None                  # every window drops the broad bump: all evaluated


# ---------------------------------------------------------------------------------------------- stopping
def test_progress_cancel_deadline_and_position_cap(classifier):
    engine = RuntimeOcclusionEngine(classifier, batch_size=16)
    image = _image(9)
    seen = []
    engine.sweep(image, 48, 16, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (144, 144) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 3
    seen.clear()
    engine.sweep(image, 48, 16, progress=lambda d, t: seen.append((d, t)), approximation=Approximation("drilldown"))
    assert seen[-1] == (144, 144)
    cancel = threading.Event()

    def cancel_after_first(done, total):
        cancel.set()
    with pytest.raises(SweepStopped) as stopped:
        engine.sweep(image, 48, 16, progress=cancel_after_first, cancel=cancel)
    assert stopped.value.reason == "cancelled"
    with pytest.raises(SweepStopped) as stopped:
        engine.sweep(image, 48, 16, deadline=time.monotonic() - 1)
    assert stopped.value.reason == "deadline"
    with pytest.raises(InvalidArgumentError, match="at most 100") as refused:
        engine.sweep(image, 48, 16, max_positions=100)
    assert refused.value.field == "stride"
    for kwargs, field in (({"outputs": ("activity",)}, "outputs"), ({"attribution_on": "logit"}, "attribution_on"),
                          ({"window": 0}, "window"), ({"target": 11}, "target"), ({"fill": "grey"}, "fill")):
        with pytest.raises(InvalidArgumentError) as refused:
            engine.sweep(image, **{"window": 48, "stride": 16, **kwargs})
        assert refused.value.field == field


def test_the_exact_engine_gives_the_same_maps_on_parallel_workers(snapshot):
    from zfserve.engine.occlusion import OcclusionEngine
    model = snapshot.model()
    image = _image(10)
    one = OcclusionEngine(model, workers=1, batch_size=16).sweep(image, 56, 24)
    two = OcclusionEngine(model, workers=2, batch_size=16).sweep(image, 56, 24)    # 7 batches, two at a time
    for name in ("probability", "activity", "attribution"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(two.argmax, one.argmax)


def test_the_exact_engine_stops_on_cancel_and_deadline_too(snapshot):
    engines = OcclusionEngines(snapshot, batch_size=8)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SweepStopped):
        engines.sweep(_image(2), EXACT_MODE, window=48, stride=16, cancel=cancel)
    with pytest.raises(SweepStopped):
        engines.sweep(_image(2), EXACT_MODE, window=48, stride=16, deadline=time.monotonic() - 1)


# ---------------------------------------------------------------------------------------------- modes
def test_modes_are_named_as_classification_names_its_engines(snapshot):
    assert mode_from() is EXACT_MODE and EXACT_MODE.name == "exact"
    assert mode_from(precision="int8").name == "onnxruntime-int8"
    assert mode_from(approximation="drilldown", defaults=("openvino", "int8")).name == \
        "openvino-int8+drilldown(coarse 2, refine 3)"
    assert mode_from(engine="onnxruntime", approximation="early-stop", margin=0.25).name == \
        "onnxruntime-fp32+early-stop(coarse 2, margin 0.25)"
    assert OcclusionMode.from_json(mode_from(approximation="drilldown", coarse=3).to_json()) == \
        mode_from(approximation="drilldown", coarse=3)
    for kwargs, field in (({"engine": "onnxruntime", "precision": "bf16"}, "precision"), ({"coarse": 3}, "coarse"),
                          ({"approximation": "sometimes"}, "approximation"), ({"engine": "tvm"}, "engine"),
                          ({"approximation": "drilldown", "coarse": 0}, "coarse"),
                          ({"approximation": "early-stop", "margin": 2.0}, "margin")):
        with pytest.raises(InvalidArgumentError) as refused:
            mode_from(**kwargs)
        assert refused.value.field == field, kwargs
    engines = OcclusionEngines(snapshot)
    exact = engines.sweep(_image(4), EXACT_MODE, window=56, stride=48, outputs=("probability",))
    fast = engines.sweep(_image(4), mode_from(engine="onnxruntime"), window=56, stride=48, outputs=("probability",))
    assert (exact.mode, exact.engine, exact.precision) == ("exact", "onnxruntime", "fp32")
    assert fast.mode == "onnxruntime-fp32"
    np.testing.assert_allclose(exact.probability, fast.probability, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the gate
def test_the_gate_passes_an_exact_equivalent_mode_and_stores_its_figures(snapshot, monkeypatch):
    from zfserve.audit import gate
    settings = gate.GateSettings(56, 48, images=6)
    engines = OcclusionEngines(snapshot)
    batched = mode_from(engine="onnxruntime")       # brute force on ONNX Runtime: agrees to float rounding
    lines = []
    choice = gate.choose(snapshot, settings, engines, modes=[batched], log=lines.append)
    assert choice.mode == batched and "gate passed" in choice.note
    f = choice.figures
    assert f["images"] == 6 and f["location_agreement"] == f["hit_agreement"] == 1.0
    assert f["pointing_game"]["mode"] == f["pointing_game"]["exact"]
    doc = json.loads(gate.gate_path(snapshot).read_text())
    (entry,) = [e for e in doc["entries"] if e["measured_on"] == settings.measured_on()]
    assert entry["weights_sha256"] == snapshot.sha256 and len(entry["exact"]["evidence"]) == 6
    assert entry["modes"][batched.name]["figures"]["location_agreement"] == 1.0
    assert any("exact occlusion on synthetic seed 4, 6 images" in line for line in lines)

    def no_measuring(*args, **kwargs):
        raise AssertionError("the stored figures should have been used")
    monkeypatch.setattr(gate, "_sweep_all", no_measuring)
    assert gate.choose(snapshot, settings, engines, modes=[batched]).mode == batched
    # Other settings are another key: never measured, so the server-side lookup says exact and why.
    other = gate.choose(snapshot, gate.GateSettings(64, 64, images=6), engines, modes=[batched],
                        measure_missing=False)
    assert other.mode == EXACT_MODE and "no gate measured for window 64, stride 64" in other.note


def test_the_gate_refuses_a_mode_that_disagrees(snapshot):
    from zfserve.audit import gate
    settings = gate.GateSettings(48, 32, images=8)
    # An absurd approximation: a lattice of every 16th position on a 7 x 7 grid is its four corners alone.
    corners = mode_from(engine="onnxruntime", approximation="drilldown", coarse=16, refine=0)
    choice = gate.choose(snapshot, settings, OcclusionEngines(snapshot), modes=[corners])
    assert choice.mode == EXACT_MODE and "fallback: no fast mode passed the gate" in choice.note
    assert "location agreement" in choice.note and corners.name in choice.table
    assert gate.verdict(choice.table[corners.name], settings)
    # The figures behind the verdict: a point far away is a disagreement unless its window ties with the largest
    # drop (then rounding decides which of the two wins); a flipped hit always is.
    exact = {"x": 16.0, "y": 16.0, "at": 0, "hit": True, "drop": 0.2, "ties": [0, 5]}
    strict = gate.GateSettings(48, 32, images=8, min_agreement=1.0, max_pointing_delta=0.0)
    assert not gate.verdict(gate.compare([exact], [{**exact, "x": 17.0}], 15), strict)
    tied = gate.compare([exact], [{**exact, "x": 176.0, "at": 5}], 15)
    assert tied["location_agreement"] == 1.0 and tied["strict_location_agreement"] == 0.0
    far = gate.compare([exact], [{**exact, "x": 176.0, "at": 6, "hit": False}], 15)
    assert far["location_agreement"] == far["hit_agreement"] == 0.0 and far["pointing_game"]["mode"] == 0.0
    assert len(gate.verdict(far, strict)) == 4      # location, hit, the flag and the pointing game


def test_gate_settings_and_data_are_checked(snapshot):
    from zfserve.audit import gate
    for kwargs, field in (({"images": 0}, "gate_images"), ({"min_agreement": 1.5}, "min_agreement"),
                          ({"stride": 60}, "stride")):
        with pytest.raises(InvalidArgumentError) as refused:
            gate.GateSettings(**{"window": 56, "stride": 48, **kwargs})
        assert refused.value.field == field
    import dataclasses
    trained_on_4 = dataclasses.replace(snapshot, config=dataclasses.replace(
        snapshot.config, provenance={"data": {"kind": "synthetic", "train_seed": 4}}))
    with pytest.raises(InvalidArgumentError, match="training set"):
        gate.held_out(trained_on_4, gate.GateSettings(56, 48, images=2))
    with pytest.raises(InvalidArgumentError, match="gate-data"):
        gate.held_out(snapshot, gate.GateSettings(56, 48, images=2, data="/nonexistent"))


# ---------------------------------------------------------------------------------------------- over the wire
def test_a_result_crosses_the_wire_with_its_mode():
    from zfserve import wire
    engine = RuntimeOcclusionEngine(FakeClassifier(_bump(100, 60)))
    result = engine.sweep(np.ones((3, 224, 224), np.float32), 48, 16, target=0,
                          approximation=Approximation("drilldown"))
    result.gate = "openvino-int8+drilldown(coarse 2, refine 3) (gate passed: ...)"
    back = wire.occlusion_result(wire.occlusion_response("m", result, version="1+abc"))
    assert (back.engine, back.precision, back.mode, back.gate) == (result.engine, "fp32", result.mode, result.gate)
    np.testing.assert_array_equal(back.evaluated, result.evaluated)
    np.testing.assert_array_equal(back.probability, result.probability)
    request = wire.occlusion_request(b"x", mode={"engine": "openvino", "approximation": "drilldown", "coarse": 3})
    assert wire.sweep_mode(request) == ({"engine": "openvino", "approximation": "drilldown", "coarse": 3}, False)
    with pytest.raises(InvalidArgumentError) as refused:
        wire.sweep_mode(wire.occlusion_request(b"x", mode={"gated": True, "precision": "int8"}))
    assert refused.value.field == "gated"


def test_the_server_sweeps_in_the_mode_asked_for_or_the_gated_one(model_dir, snapshot, classifier):
    import grpc

    from zfserve import wire
    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
    from zfserve.audit import gate
    from zfserve.server import BackgroundServer, ServerOptions
    image = _image(8)
    images = pb.Images(tensor=wire.array_to_tensor(image[None]))
    with BackgroundServer(ServerOptions(port=0, model=str(model_dir))) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ZFServeStub(channel)
        exact = wire.occlusion_result(stub.OcclusionSweep(pb.OcclusionRequest(images=images, window=112, stride=112)))
        assert (exact.mode, exact.engine, exact.gate) == ("exact", "onnxruntime", "")
        asked = wire.occlusion_result(stub.OcclusionSweep(pb.OcclusionRequest(
            images=images, window=48, stride=16, approximation="drilldown", coarse=3, outputs=["probability"])))
        assert asked.mode == "onnxruntime-fp32+drilldown(coarse 3, refine 3)" and asked.evaluated is not None
        local = RuntimeOcclusionEngine(classifier).sweep(image, 48, 16, approximation=Approximation("drilldown",
                                                                                                   coarse=3))
        np.testing.assert_allclose(asked.probability, local.probability, atol=1e-5)
        # gated, nothing measured for these settings: exact, and why.
        request = pb.OcclusionRequest(images=images, window=112, stride=112, gated=True)
        unmeasured = wire.occlusion_result(stub.OcclusionSweep(request))
        assert unmeasured.mode == "exact" and "no gate measured for window 112, stride 112" in unmeasured.gate
        # Once measured (a drill-down on a 2 x 2 grid evaluates every position, so it agrees), the gated mode.
        drill = mode_from(engine="onnxruntime", approximation="drilldown")
        settings = gate.GateSettings(112, 112)
        assert gate.choose(snapshot, settings, OcclusionEngines(snapshot), modes=[drill]).mode == drill
        gated = wire.occlusion_result(stub.OcclusionSweep(request))
        assert gated.mode == drill.name and "gate passed" in gated.gate
        np.testing.assert_allclose(gated.probability, exact.probability, atol=1e-5)
        for bad, field in ((dict(approximation="often"), "approximation"), (dict(precision="bf16"), "precision"),
                           (dict(gated=True, engine="openvino"), "gated"), (dict(coarse=2), "coarse")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.OcclusionSweep(pb.OcclusionRequest(images=images, window=112, stride=112, **bad))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in refused.value.details()


# ---------------------------------------------------------------------------------------------- the commands
def test_occlude_and_occlusion_gate_commands(model_dir, tmp_path, capsys):
    from PIL import Image

    from zfserve.cli import main
    from zfserve.data import render
    photo = tmp_path / "photo.png"
    Image.fromarray(render(9, 2).image).save(photo)
    out = tmp_path / "occ"
    assert main(["occlude", str(photo), "--model", str(model_dir), "--window", "48", "--stride", "16",
                 "--approximation", "drilldown", "--coarse", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "occlusion.json").read_text())
    assert doc["mode"] == "onnxruntime-fp32+drilldown(coarse 4, refine 3)" and doc["engine"] == "onnxruntime"
    assert 0 < doc["evaluated"] < 144 and f"mode: {doc['mode']}" in printed
    assert np.load(out / "occlusion.npz")["evaluated"].sum() == doc["evaluated"]
    assert main(["occlude", str(photo), "--model", str(model_dir), "--out", str(tmp_path / "x"), "--window", "112",
                 "--stride", "112"]) == 0
    assert json.loads((tmp_path / "x" / "occlusion.json").read_text())["mode"] == "exact"
    capsys.readouterr()
    for flags, field in ((["--precision", "bf16"], "bf16"), (["--coarse", "3"], "--approximation"),
                         (["--approximation", "drilldown", "--margin", "3"], "--margin")):
        assert main(["occlude", str(photo), "--model", str(model_dir), "--out", str(tmp_path / "y"), *flags]) == 2
        err = capsys.readouterr().err
        assert field in err and len(err.strip().splitlines()) == 1, err
    assert main(["occlusion-gate", "--model", str(model_dir), "--occlusion", "112,112", "--precisions", "fp32",
                 "--gate-images", "4", "--all"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime-fp32+drilldown(coarse 2, refine 3)" in printed and "passes" in printed
    assert "chosen: onnxruntime-fp32+" in printed and "occlusion-gate.json" in printed
    assert main(["occlusion-gate", "--model", str(model_dir), "--precisions", "fp16"]) == 2


def test_the_gate_of_a_model_of_other_classes_uses_its_int8_calibration_folder(spread_model, tmp_path):
    """No synthetic images for a model of its own classes: the gate takes the folder its int8 graph was
    calibrated on, less the images calibration used."""
    from PIL import Image

    from zfserve.audit import gate
    from zfserve.data import render
    from zfserve.data.folders import folder_entries
    from zfserve.engine.classifier import Classifier
    from zfserve.engine.quantize import Int8Settings
    from zfserve.preprocess import to_input
    from zfserve.weights import read_snapshot, save_model
    folder = tmp_path / "photos"
    for label, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(render(12, 2 * i + label).image).save(folder / name / f"{i}.png")
    model = spread_model(seed=3, widths=WIDTHS, num_classes=2, fc_width=16)
    snapshot = read_snapshot(save_model(model, tmp_path / "pets", class_names=["cat", "dog"], name="pets"))
    settings = gate.GateSettings(112, 112, images=5)
    with pytest.raises(InvalidArgumentError, match="not calibrated on a folder"):
        gate.held_out(snapshot, settings)
    Classifier(snapshot, precision="int8", int8=Int8Settings(calibration=str(folder), calibration_images=4,
                                                               accuracy_images=8, max_accuracy_drop=100.0))
    images = gate.held_out(snapshot, settings)
    assert len(images.inputs) == 5 and images.description.endswith("(not the 4 int8 calibrated on)")
    assert set(images.targets) <= {0, 1} and images.masks == [None] * 5
    calibrated = {0, 4, 7, 11}       # np.linspace(0, 11, 4).round(): the images calibration took
    rest = [i for i in range(12) if i not in calibrated]
    picks = [rest[j] for j in (0, 2, 4, 5, 7)]          # 5 of the 8 others, spread evenly
    entries, _ = folder_entries(folder)
    for x, i in zip(images.inputs, picks):
        np.testing.assert_array_equal(x, to_input(np.asarray(Image.open(entries[i].path).convert("RGB")),
                                                  snapshot.config))


def test_a_gated_int8_mode_waits_for_its_graph_on_a_server(spread_model, tmp_path):
    """The server never calibrates int8 inside a request: while the model's int8 graph is not made, a gated
    sweep uses the fastest other mode that passed (here a drill-down in fp32), and says why."""
    from types import SimpleNamespace

    from zfserve.audit import gate
    from zfserve.server.occlusion import resolve_mode
    from zfserve.weights import read_snapshot, save_model
    model = spread_model(seed=11, widths=WIDTHS, num_classes=len(CLASSES), fc_width=16)
    snapshot = read_snapshot(save_model(model, tmp_path / "m", class_names=list(CLASSES), name="m"))
    engines = OcclusionEngines(snapshot)
    settings = gate.GateSettings(112, 112)           # what a server looks up
    drill = mode_from(engine="onnxruntime", approximation="drilldown")
    gate.choose(snapshot, settings, engines, modes=[drill])
    # An int8 mode's record, written here from the fp32 one (measuring it would make the graph), twice as fast.
    entry = gate.stored(snapshot, settings)
    int8 = mode_from(engine="onnxruntime", precision="int8", approximation="drilldown")
    record = entry["modes"][drill.name]
    entry["modes"][int8.name] = {**record, "mode": int8.to_json(), "runtime": gate.runtime_of(int8), "figures": {
        **record["figures"], "cpu_seconds_per_image": record["figures"]["cpu_seconds_per_image"] / 2}}
    gate._store(snapshot, settings, entry)
    assert gate.choose(snapshot, settings, engines, modes=[drill, int8], measure_missing=False).mode == int8
    runtime = SimpleNamespace(snapshot=snapshot, engine="onnxruntime", precision="fp32", input_size=224,
                              occlusion_engines=lambda: engines)
    mode, why = resolve_mode(runtime, {}, True, 112, 112)
    assert mode == drill and why.startswith("gate passed") and "int8 graph is not made yet" in why
