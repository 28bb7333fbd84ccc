"""Occlusion engine: every map against brute force (occlude, full eager PyTorch forward) and Captum Occlusion.

Small sweeps (5 x 5 positions) whose last window is clipped at the border, on a paper-width network with a
tiny classifier whose random weights are scaled so that activations stay in range and the class
probabilities are far from uniform.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from zfserve.engine.occlusion import OUTPUTS, OcclusionEngine, window_starts
from zfserve.errors import InvalidArgumentError

# ZFNet's layer names (the paper's), written out here rather than read from the product.
LAYER_NAMES = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")

WINDOW, STRIDE = 56, 48          # 5 positions per axis; the last window starts at 192 and is cut at 224
FILL = (0.0, 0.0, 0.0)


def _scaled_model(make_model, seed=0):
    """Paper conv widths, fc 64, 10 classes; He-scaled weights (the paper's N(0, 0.01) init makes every
    activation vanish on random weights), small random biases, fc8 scaled for logits of a few units."""
    model = make_model(num_classes=10, fc_width=64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return model


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Smooth-ish structure plus noise, in input units (about -100..100).
    base = torch.nn.functional.interpolate(torch.randn(1, 3, 14, 14, generator=gen), size=224, mode="bilinear")
    return (base[0] * 60 + torch.randn(3, 224, 224, generator=gen) * 20).float()


def _occluded_batch(image, window, stride, fill):
    starts = window_starts(224, window, stride)
    batch = []
    for y in starts:
        for x in starts:
            occluded = image.clone()
            occluded[:, y:y + window, x:x + window] = torch.as_tensor(fill, dtype=torch.float32).view(3, 1, 1)
            batch.append(occluded)
    return torch.stack(batch), len(starts)


@pytest.fixture(scope="module")
def setup():
    from zfserve.model import ZFNet

    def make_model(num_classes, fc_width, seed):
        torch.manual_seed(seed)
        return ZFNet(num_classes=num_classes, fc_width=fc_width).eval()

    model = _scaled_model(make_model)
    # Calibrate fc8 so the logits spread over a few units (non-trivial probabilities, no saturation).
    image = _image()
    with torch.no_grad():
        spread = float(model(image[None]).std())
        model.fc8.weight.mul_(2.0 / spread)
        model.fc8.bias.mul_(2.0 / spread)
        batch, count = _occluded_batch(image, WINDOW, STRIDE, FILL)
        trace = model.trace(batch, layers=LAYER_NAMES)
    return model, image, trace, count


@pytest.fixture(scope="module")
def engine(setup):
    return OcclusionEngine(setup[0], batch_size=7, buckets=3)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_probability_and_argmax_match_brute_force(setup, backend):
    model, image, trace, count = setup
    engine = OcclusionEngine(model, backend=backend, batch_size=7, buckets=3)
    result = engine.sweep(image, WINDOW, STRIDE)
    logits = trace.logits.double()
    with torch.no_grad():
        base = model(image[None]).double()[0]
    target = int(base.argmax())
    assert result.target == target
    expected = torch.softmax(logits, -1)[:, target].reshape(count, count).numpy()
    assert result.probability.shape == (count, count)
    assert expected.max() - expected.min() > 0.05  # occlusion really moves the probability
    np.testing.assert_allclose(result.probability, expected, rtol=0, atol=1e-5)
    argmax = logits.argmax(-1).reshape(count, count).numpy()
    np.testing.assert_array_equal(result.argmax, argmax)
    assert len(np.unique(argmax)) > 1 or len(np.unique(result.argmax)) == 1
    np.testing.assert_allclose(result.base_probability, float(torch.softmax(base, -1)[target]), atol=1e-6)


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_activity_matches_brute_force_every_layer(setup, engine, layer):
    _, image, trace, count = setup
    channels = trace.activations[layer].shape[1]
    totals = trace.activations[layer].double().reshape(count * count, channels, -1).sum(-1)
    channel = int(totals.std(0).argmax())   # the map the occluder changes most
    result = engine.sweep(image, WINDOW, STRIDE, outputs=("activity",), layer=layer, channel=channel)
    expected = totals[:, channel].reshape(count, count).numpy()
    assert np.ptp(expected) > 0
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.activity, expected, rtol=0, atol=1e-5 * scale + 1e-6)
    assert result.probability is None and result.attribution is None


def test_default_activity_channel_is_strongest_conv5_map(setup, engine):
    model, image, trace, count = setup
    with torch.no_grad():
        base = model.trace(image[None], layers=("conv5",)).activations["conv5"][0]
    strongest = int(base.sum(dim=(1, 2)).argmax())
    result = engine.sweep(image, WINDOW, STRIDE, outputs=("activity",))
    assert (result.layer, result.channel) == ("conv5", strongest)
    expected = trace.activations["conv5"].double()[:, strongest].sum(dim=(1, 2)).reshape(count, count).numpy()
    np.testing.assert_allclose(result.activity, expected, rtol=1e-5)
    np.testing.assert_allclose(result.base_activity, float(base[strongest].sum()), rtol=1e-5)


@pytest.mark.parametrize("window,stride,on", [(WINDOW, STRIDE, "probability"), (50, 44, "logit")])
def test_attribution_matches_captum(setup, engine, window, stride, on):
    from captum.attr import Occlusion

    model, image, _, _ = setup
    target = 3
    forward = (lambda x: torch.softmax(model(x), -1)) if on == "probability" else model
    expected = Occlusion(forward).attribute(image[None], sliding_window_shapes=(3, window, window),
                                            strides=(3, stride, stride), baselines=0.0, target=target,
                                            perturbations_per_eval=16)[0]
    assert torch.equal(expected[0], expected[1]) and torch.equal(expected[0], expected[2])
    result = engine.sweep(image, window, stride, target=target, attribution_on=on,
                          outputs=("attribution", "probability"))
    assert result.attribution.shape == (224, 224)
    assert float(expected.abs().max()) > 1e-3
    # Probabilities, or logits of a few units: float32 rounding of the two forwards stays far below 1e-5.
    np.testing.assert_allclose(result.attribution, expected[0].numpy(), rtol=0, atol=1e-5)


def test_constant_and_pixel_fill(setup, engine):
    model, image, trace, count = setup
    fill = (12.5, -30.0, 7.0)
    batch, count = _occluded_batch(image, WINDOW, STRIDE, fill)
    with torch.no_grad():
        logits = model(batch).double()
    result = engine.sweep(image, WINDOW, STRIDE, fill=fill, target=2, outputs=("probability",))
    expected = torch.softmax(logits, -1)[:, 2].reshape(count, count).numpy()
    np.testing.assert_allclose(result.probability, expected, atol=1e-5)
    # Pixel units: the model's mean colour in 0..255 is 0 in input units, i.e. the default fill.
    mean = model.config.preprocess.mean_rgb()
    as_pixels = engine.sweep(image, WINDOW, STRIDE, fill=mean, fill_units="pixel", target=2,
                             outputs=("probability",))
    zero_fill = torch.softmax(trace.logits.double(), -1)[:, 2].reshape(count, count).numpy()
    np.testing.assert_allclose(as_pixels.probability, zero_fill, atol=1e-5)


def test_one_bucket_and_full_batch_agree(setup):
    model, image, _, _ = setup
    a = OcclusionEngine(model, batch_size=64, buckets=1).sweep(image, 50, 44, outputs=("probability", "activity"))
    b = OcclusionEngine(model, batch_size=5, buckets=4).sweep(image, 50, 44, outputs=("probability", "activity"))
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
    np.testing.assert_allclose(a.activity, b.activity, rtol=1e-6)


def test_positions_follow_captum():
    assert window_starts(224, 32, 8).tolist() == list(range(0, 193, 8))            # 25 positions
    assert window_starts(224, 30, 8)[-1] == 200                                   # last window cut at 224
    assert len(window_starts(224, 224, 1)) == 1


def test_progress_reports_increasing_counts(setup, engine):
    _, image, _, count = setup
    calls = []
    engine.sweep(image, WINDOW, STRIDE, outputs=("probability",), progress=lambda done, total: calls.append(
        (done, total)))
    dones = [d for d, _ in calls]
    assert len(calls) >= 2
    assert all(t == count * count for _, t in calls)
    assert dones == sorted(dones) and len(set(dones)) == len(dones) and dones[-1] == count * count


@pytest.mark.parametrize("kwargs,field", [
    (dict(window=0), "window"), (dict(window=225), "window"), (dict(window=32, stride=0), "stride"),
    (dict(window=16, stride=17), "stride"), (dict(layer="conv6"), "layer"), (dict(target=10), "target"),
    (dict(target=-1), "target"), (dict(layer="conv2", channel=256), "channel"), (dict(channel=-1), "channel"),
    (dict(fill="grey"), "fill"), (dict(fill=(1, 2)), "fill"), (dict(fill=300, fill_units="pixel"), "fill"),
    (dict(fill_units="percent"), "fill_units"), (dict(attribution_on="loss"), "attribution_on"),
    (dict(outputs=("heat",)), "outputs"), (dict(window=2.5), "window"),
])
def test_bad_parameters_raise_typed_errors(setup, engine, kwargs, field):
    _, image, _, _ = setup
    with pytest.raises(InvalidArgumentError) as info:
        engine.sweep(image, **kwargs)
    assert info.value.field == field


def test_bad_image_and_engine_arguments(setup):
    model = setup[0]
    engine = OcclusionEngine(model, batch_size=4)
    with pytest.raises(InvalidArgumentError) as info:
        engine.sweep(np.zeros((3, 100, 100), np.float32))
    assert info.value.field == "image"
    for kwargs, field in ((dict(batch_size=0), "batch_size"), (dict(backend="tf"), "backend"),
                          (dict(buckets=0), "buckets"), (dict(device="meta"), "device"),
                          (dict(device="gpu0"), "device")):
        with pytest.raises(InvalidArgumentError) as info:
            OcclusionEngine(model, **kwargs)
        assert info.value.field == field


def test_tensor_glue_matches_numpy_glue():
    """The gather/paste used on GPUs (torch tensors, advanced indexing) against the CPU one (numpy slices),
    including tiles that hang over the edge of their crop."""
    from zfserve.engine import occlusion_tiles as occ

    rng = np.random.default_rng(3)
    padded = rng.standard_normal((5, 13 + 2 * occ.MARGIN, 13 + 2 * occ.MARGIN)).astype(np.float32)
    row0, col0 = np.array([-1, 0, 4, 8]), np.array([3, -1, 8, 0])
    crops = occ.crop(padded, row0, col0, 6, 7)
    np.testing.assert_array_equal(occ.crop(torch.from_numpy(padded), row0, col0, 6, 7).numpy(), crops)
    assert crops[0, 2, 0, 0] == padded[2, occ.MARGIN - 1, occ.MARGIN + 3]
    tile = rng.standard_normal((4, 5, 4, 4)).astype(np.float32)
    tile_row0, tile_col0 = row0 + np.array([0, 3, -2, 4]), col0 + np.array([1, 5, 0, -1])
    expected = occ.paste(crops.copy(), row0, col0, tile, tile_row0, tile_col0)
    got = occ.paste(torch.from_numpy(crops.copy()), row0, col0, torch.from_numpy(tile), tile_row0, tile_col0)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(expected[0, :, 0:4, 1:5], tile[0])


def test_pictures_and_cli(tmp_path, setup, engine):
    from zfserve import cli, render
    from zfserve.preprocess import to_display

    model, image, _, _ = setup
    result = engine.sweep(image, WINDOW, STRIDE)
    pictures = render.occlusion_pictures(result, to_display(image.numpy(), model.config),
                                         model.config.class_names)
    assert set(pictures) == {"probability", "attribution", "argmax", "activity"}
    for picture in pictures.values():
        assert picture.dtype == np.uint8 and picture.shape[0] >= 224 and render.png_bytes(picture)[:4] == b"\x89PNG"
    ramp = render.colorize(np.array([[1.0, 2.0], [3.0, 5.0]]))
    np.testing.assert_array_equal(ramp[0, 0], render.SEQUENTIAL[0])
    np.testing.assert_array_equal(ramp[1, 1], render.SEQUENTIAL[-1])
    assert tuple(render.colorize(np.array([[-2.0, 0.0, 2.0]]), kind="diverging")[0, 1]) == render.DIVERGING[2]

    from PIL import Image
    Image.fromarray(to_display(image.numpy(), model.config)).save(tmp_path / "in.png")
    model_dir = tmp_path / "model"
    from zfserve.weights import save_model
    save_model(model, model_dir)
    out = tmp_path / "out"
    assert cli.main(["occlude", str(tmp_path / "in.png"), "--model", str(model_dir), "--window", "112",
                     "--stride", "56", "--out", str(out)]) == 0
    arrays = np.load(out / "occlusion.npz", allow_pickle=False)
    assert arrays["probability"].shape == (3, 3) and arrays["attribution"].shape == (224, 224)
    from zfserve.weights import read_snapshot
    doc = json.loads((out / "occlusion.json").read_text())     # what reproduces the maps
    assert (doc["window"], doc["stride"], doc["fill"], doc["fill_units"], doc["attribution_on"]) == \
        (112, 56, [0.0, 0.0, 0.0], "input", "probability")
    assert doc["model_version"] == read_snapshot(model_dir).version and isinstance(doc["target"], int)
    assert {p.name for p in out.glob("*.png")} == {"probability.png", "attribution.png", "argmax.png",
                                                    "activity.png"}
    assert cli.main(["occlude", str(tmp_path / "in.png"), "--model", str(model_dir), "--stride", "40",
                     "--out", str(out)]) == 2


def test_gpu_code_path_on_cpu(setup):
    """The tensor glue that runs on GPUs, here on CPU tensors, gives the same maps as the numpy glue."""
    model, image, _, _ = setup
    engine = OcclusionEngine(model, backend="torch", batch_size=6, buckets=2)
    expected = engine.sweep(image, 50, 44, layer="conv2", outputs=OUTPUTS)
    engine.tensor_glue = True
    got = engine.sweep(image, 50, 44, layer="conv2", outputs=OUTPUTS)
    for name in OUTPUTS:
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-6, atol=1e-7)
