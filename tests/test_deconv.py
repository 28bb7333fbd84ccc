"""Deconvnet engine vs two independent references, unit selection, boxes, typed errors, and the CLI.

Reference 1: autograd on a functional forward written here from the model's weights, with each ReLU's
backward replaced by relu(grad_output) and LRN's backward by identity, seeded with a one-hot at the unit
(times the unit's activation, which is the engine's paper seed). Reference 2: Captum's NeuronDeconvolution.
Random He-scaled weights (the paper's N(0, 0.01^2) init leaves conv5 nearly dead) and random images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchvision_reference import DeconvReLU
from zfserve.engine.deconv import DeconvEngine, captum_model
from zfserve.errors import InvalidArgumentError
from zfserve.model import ZFNet

# ZFNet's table (the paper's), written out here rather than read from the product.
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
POOL_AFTER = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}
LRN_PARAMS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)

RTOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    net = ZFNet(num_classes=10, fc_width=64).eval()
    with torch.no_grad():
        for name in CONV_LAYERS:
            conv = getattr(net, name)
            conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
            conv.bias.normal_(0.0, 0.1)
    return net


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11)) * 60


@pytest.fixture(scope="module")
def engine(model):
    return DeconvEngine(model)


# ---------------------------------------------------------------------------------------------- reference

def _lrn_identity_backward(x):
    return x + (F.local_response_norm(x, **LRN_PARAMS) - x).detach()


def _reference_forward(model, x, layer, pool_log):
    """The model's forward with deconvnet backward rules; logs (pooled, indices) of each pool."""
    def pool(h, name):
        out, idx = F.max_pool2d(h, 3, 2, ceil_mode=True, return_indices=True)
        pool_log[name] = (out, idx)
        out.retain_grad()
        return out

    acts = {}
    h = x
    for name in CONV_LAYERS:
        conv = getattr(model, name)
        h = DeconvReLU.apply(F.conv2d(h, conv.weight, conv.bias, conv.stride, conv.padding))
        acts[name] = h
        if name in POOL_AFTER:
            if layer == name:
                break
            h = pool(h, POOL_AFTER[name])
            acts[POOL_AFTER[name]] = h
            if layer == POOL_AFTER[name]:
                break
            if name != "conv5":
                h = _lrn_identity_backward(h)
        if layer == name:
            break
    return acts[layer]


def reference_projections(model, images, layer, units):
    """Projections of ``units`` [(image, c, y, x)]: one image copy per unit, one backward for all.

    Also returns how many unit paths had, at some pool, two pooled positions with a non-zero signal whose
    switches point at the same input position (the shared-switch case the sum-unpool must get right)."""
    idx = torch.tensor([u[0] for u in units])
    x = images[idx].clone().requires_grad_(True)
    log = {}
    act = _reference_forward(model, x, layer, log)
    k = torch.arange(len(units))
    chosen = act[k, [u[1] for u in units], [u[2] for u in units], [u[3] for u in units]]
    chosen.sum().backward()
    shared = 0
    for i in range(len(units)):
        for pooled, indices in log.values():
            if pooled.grad is None:
                continue
            live = pooled.grad[i] != 0                   # (C, H, W) positions carrying signal
            flat = indices[i][live] + live.nonzero()[:, 0] * 10 ** 6  # (channel, input position) keys
            if flat.numel() != flat.unique().numel():
                shared += 1
                break
    return x.grad.detach(), chosen.detach(), shared


def _relative_error(ours, ref):
    return float((ours - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------- acceptance
# Every conv layer, and pool2 for a walk that starts with an unpool (pool5 is checked against Captum).
@pytest.mark.parametrize("layer", ["conv1", "conv2", "pool2", "conv3", "conv4", "conv5"])
def test_matches_autograd_reference(engine, model, images, layer):
    # The strongest unit of each image, plus units at a corner and an edge (windows cut by the border).
    top = engine.project(images, layer, top_k=1)
    h = model.spatial_sizes()[layer]
    best = [(u.image_index, u.channel) for u in top]
    edges = engine.project(images, layer, units=[(best[0][0], best[0][1], 0, 0),
                                                  (best[1][0], best[1][1], h - 1, h // 2)])
    results = top + edges
    units = [(u.image_index, u.channel, u.y, u.x) for u in results]
    ref, ref_act, shared = reference_projections(model, images, layer, units)
    live = 0
    for i, unit in enumerate(results):
        assert unit.activation == pytest.approx(float(ref_act[i]), rel=1e-5, abs=1e-6)
        expected = ref[i] * unit.activation
        ours = torch.from_numpy(unit.projection)
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
        if unit.activation == 0:
            assert not ours.any()
            continue
        live += 1
        assert _relative_error(ours, expected) < RTOL, (layer, unit.channel, unit.y, unit.x)
        # The projection is zero outside the receptive-field box.
        x0, y0, x1, y1 = unit.box
        outside = ours.clone()
        outside[:, y0:y1, x0:x1] = 0
        assert not outside.any()
        assert unit.patch.shape == (3, y1 - y0, x1 - x0)
        assert np.array_equal(unit.patch, images[unit.image_index, :, y0:y1, x0:x1].numpy())
    assert live >= 2
    if layer != "conv1":
        assert shared > 0, "no unit exercised shared switches"


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv4", "conv5", "pool5"])
def test_matches_captum_neuron_deconvolution(engine, model, images, layer):
    captum_attr = pytest.importorskip("captum.attr")
    twin = captum_model(model)
    deconv = captum_attr.NeuronDeconvolution(twin, getattr(twin, layer))
    for unit in engine.project(images[1:], layer, top_k=1, seed="one"):
        theirs = deconv.attribute(images[1:2], neuron_selector=(unit.channel, unit.y, unit.x))[0]
        assert _relative_error(torch.from_numpy(unit.projection), theirs) < RTOL


def test_chunked_passes_equal_one_pass(engine, model, images):
    _, acts, switches = engine.forward(images, "conv3")
    units = engine.select(acts, top_k=3)
    one = engine.project_units("conv3", acts, switches, units)
    chunked = DeconvEngine(model, max_units_per_pass=2).project_units("conv3", acts, switches, units)
    assert one.shape == (6, 3, 224, 224)
    torch.testing.assert_close(chunked, one, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- selection
def test_top_k_one_per_map_is_brute_force(engine, images):
    _, acts, _ = engine.forward(images, "conv3")
    a = acts.numpy()
    got = engine.select(acts, top_k=5)
    for n in range(2):
        per_map = a[n].reshape(a.shape[1], -1)
        best = per_map.max(axis=1)
        channels = sorted(range(len(best)), key=lambda c: (-best[c], c))[:5]
        rows = (got.image_index == n).nonzero()[:, 0]
        assert got.channel[rows].tolist() == channels
        for r, c in zip(rows.tolist(), channels):
            pos = int(per_map[c].argmax())
            assert (got.y[r].item(), got.x[r].item()) == divmod(pos, a.shape[3])


def test_top_k_any_position_and_maps(engine, images):
    _, acts, _ = engine.forward(images, "conv2")
    got = engine.select(acts, top_k=4, one_per_map=False)
    values = acts[got.image_index, got.channel, got.y, got.x]
    for n in range(2):
        expected = np.sort(acts[n].numpy().ravel())[::-1][:4]
        np.testing.assert_array_equal(values[got.image_index == n].numpy(), expected)
    maps = engine.select(acts, maps=[7, 2])
    assert maps.channel.tolist() == [7, 2, 7, 2] and maps.image_index.tolist() == [0, 0, 1, 1]
    for n, c, y, x in zip(maps.image_index, maps.channel, maps.y, maps.x):
        assert acts[n, c, y, x] == acts[n, c].max()


def test_units_for_every_image_and_numpy_input(engine, images):
    result = engine.project(images.numpy(), "conv3", units=[(4, 6, 6), (1, 2, 3, 4)])
    assert [(u.image_index, u.channel, u.y, u.x) for u in result] == [(0, 4, 6, 6), (1, 4, 6, 6), (1, 2, 3, 4)]
    # Explicit (image, c, y, x) units keep the caller's order, whatever the images.
    mixed = engine.project(images, "conv3", units=[(1, 2, 3, 4), (0, 4, 6, 6)])
    assert [(u.image_index, u.channel) for u in mixed] == [(1, 2), (0, 4)]
    np.testing.assert_array_equal(mixed[0].projection, result[2].projection)
    np.testing.assert_array_equal(mixed[1].projection, result[0].projection)
    # top_k and units together: the top-k first, then the units, from one forward pass.
    single = engine.project(images[1], "conv3", top_k=2, units=[(2, 3, 4)])
    assert len(single) == 3 and single[0].activation >= single[1].activation
    assert (single[2].channel, single[2].y, single[2].x) == (2, 3, 4)
    np.testing.assert_array_equal(single[2].projection, result[2].projection)


def test_boxes_follow_layer_geometry(engine):
    assert engine.box("conv1", 0, 0) == (0, 0, 6, 6)        # 7x7 window at -1 (padding), clipped
    assert engine.box("conv5", 6, 6) == (47, 47, 186, 186)  # 139 px, the paper's conv5 receptive field
    assert engine.box("pool5", 5, 5) == (111, 111, 224, 224)  # clipped at the far edge


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, field", [
    (dict(layer="fc6"), "layer"),
    (dict(layer="conv9"), "layer"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(top_k=257), "top_k"),               # conv5 has 256 maps
    (dict(top_k=256 * 169 + 1, one_per_map=False), "top_k"),
    (dict(units=[(256, 0, 0)]), "units"),
    (dict(units=[(0, 13, 0)]), "units"),
    (dict(units=[(0, 0, -1)]), "units"),
    (dict(units=[(2, 0, 0, 0)]), "units"),    # image_index out of range (2 images)
    (dict(units=[(1, 2)]), "units"),
    (dict(units=[]), "units"),
    (dict(maps=[300]), "maps"),
    (dict(units=[(0, 0, 0)], maps=[1]), "units"),
    (dict(seed="two"), "seed"),
])
def test_bad_requests_raise_typed_errors(engine, images, kwargs, field):
    kwargs = {"layer": "conv5", **kwargs}
    with pytest.raises(InvalidArgumentError) as info:
        engine.project(images, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("bad", [
    torch.zeros(2, 3, 100, 100), torch.zeros(1, 1, 224, 224), torch.zeros(0, 3, 224, 224),
    torch.zeros(3, 224, 224, dtype=torch.int64), np.zeros((3, 224, 224), np.uint8),
    torch.full((1, 3, 224, 224), float("nan")), [[0.0]],
])
def test_bad_images_raise_typed_errors(engine, bad):
    with pytest.raises(InvalidArgumentError) as info:
        engine.project(bad, "conv1")
    assert info.value.field == "images"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_device_is_a_typed_error(model):
    with pytest.raises(InvalidArgumentError) as info:
        DeconvEngine(model, "cuda")
    assert info.value.field == "device"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_pngs_json_and_npz(tmp_path, model, capsys):
    from PIL import Image

    from zfserve import cli
    from zfserve.weights import save_model
    from zfserve.preprocess import load_image

    model_dir = save_model(model, tmp_path / "model")
    picture = np.random.default_rng(3).integers(0, 256, (240, 260, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    out = tmp_path / "out"
    rc = cli.main(["deconv", str(tmp_path / "in.png"), "--layer", "conv2", "--top-k", "2", "--units", "5,1,2",
                   "--model", str(model_dir), "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "deconv.json").read_text())
    assert printed == written
    assert written["interpretation"] == "feature visualisation (class-insensitive)" and "+" in written["model_version"]
    assert cli.main(["deconv", str(tmp_path / "in.png"), "--layer", "conv2", "--top-k", "1", "--model",
                     str(model_dir), "--out", str(tmp_path / "plain")]) == 0
    assert "feature visualisation (class-insensitive)" in capsys.readouterr().out
    units = written["units"]
    assert [(u["channel"], u["y"], u["x"]) for u in units][2] == (5, 1, 2) and len(units) == 3
    assert set(units[0]) >= {"layer", "channel", "y", "x", "activation", "box"}
    with np.load(out / "projections.npz", allow_pickle=False) as npz:
        projections = npz["projections"]
    assert projections.shape == (3, 3, 224, 224) and projections.dtype == np.float32
    # Same numbers as the library on the same preprocessed image.
    x = load_image(tmp_path / "in.png", model.config)
    direct = DeconvEngine(model).project(x, "conv2", units=[(u["channel"], u["y"], u["x"]) for u in units])
    for u, d, p in zip(units, direct, projections):
        assert u["activation"] == pytest.approx(d.activation, rel=1e-6)
        np.testing.assert_allclose(p, d.projection, rtol=1e-5, atol=1e-5 * float(np.abs(d.projection).max()))
    for name in [u["file"] for u in units] + [written["grid"]]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"


def test_cli_bad_layer_exits_2(tmp_path, capsys):
    from zfserve import cli

    rc = cli.main(["deconv", str(tmp_path / "missing.png"), "--layer", "conv9", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "layer" in err and "\n" not in err
