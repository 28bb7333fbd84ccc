"""ZFNet: the paper's shapes and parameter counts, switches, trace vs an eager re-derivation, init, RMS clipping.

Every reference here is written out independently of zfserve (the paper's table, functional PyTorch with the
paper's geometry typed in again, brute-force loops), so a wrong constant in zfserve.model cannot hide.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zfserve.errors import InvalidArgumentError
from zfserve.kernels import indices_from_switches, max_pool_with_switches, switches_from_indices
from zfserve.model import ZFNet

# ZFNet's layer names (the paper's), written out here rather than read from the product.
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
LAYER_NAMES = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")

# The paper's Fig. 3 network, 1000 classes (Zeiler & Fergus 2014, arXiv 1311.2901 v3).
PAPER_PARAMS = {"conv1": 14_208, "pool1": 0, "conv2": 614_656, "pool2": 0, "conv3": 885_120,
                "conv4": 1_327_488, "conv5": 884_992, "pool5": 0, "fc6": 37_752_832, "fc7": 16_781_312,
                "fc8": 4_097_000}
PAPER_TOTAL = 62_357_608
PAPER_SHAPES = {"conv1": (96, 110, 110), "pool1": (96, 55, 55), "conv2": (256, 26, 26), "pool2": (256, 13, 13),
                "conv3": (384, 13, 13), "conv4": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
                "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}
PAPER_RECEPTIVE_FIELDS = {"conv1": 7, "pool1": 11, "conv2": 27, "pool2": 43, "conv3": 75, "conv4": 107,
                          "conv5": 139, "pool5": 171}


class _Uninitialized(ZFNet):
    # normal_ on meta tensors costs seconds of one-time set-up inside torch, for values that do not exist.
    def reset_parameters(self, generator=None):
        pass


def meta_model(**kwargs) -> ZFNet:
    """A ZFNet whose tensors have shapes but no storage: cheap for counting and shape checks."""
    with torch.device("meta"):
        return _Uninitialized(**kwargs)


# ------------------------------------------------------------------------------------------------ shapes
def test_paper_parameter_count_per_layer_and_total():
    model = meta_model()
    infos = {li.name: li for li in model.layer_info()}
    assert [li.name for li in model.layer_info()] == list(LAYER_NAMES)
    assert {name: li.params for name, li in infos.items()} == PAPER_PARAMS
    assert sum(p.numel() for p in model.parameters()) == PAPER_TOTAL


def test_paper_variant_b_parameter_count():
    # Paper variant (b): layers 3/4/5 with 512/1024/512 maps.
    model = meta_model(widths=(96, 256, 512, 1024, 512))
    assert sum(p.numel() for p in model.parameters()) == 107_627_624


def test_layer_info_shapes_and_receptive_fields_match_the_paper():
    infos = {li.name: li for li in meta_model().layer_info()}
    assert {name: li.shape for name, li in infos.items()} == PAPER_SHAPES
    assert {n: infos[n].receptive_field for n in PAPER_RECEPTIVE_FIELDS} == PAPER_RECEPTIVE_FIELDS
    assert [infos[n].jump for n in ("conv3", "conv4", "conv5")] == [16, 16, 16]


def test_spatial_sizes_are_the_papers():
    assert list(meta_model().spatial_sizes().values()) == [110, 55, 26, 13, 13, 13, 13, 6]


@pytest.mark.parametrize("size", [224, 225, 227, 231, 96])
def test_spatial_sizes_match_real_forward_shapes(size, generator):
    # Narrow layers: this checks geometry only, which does not depend on the widths.
    model = ZFNet(num_classes=5, fc_width=8, widths=(4, 4, 4, 4, 4), input_size=size).eval()
    with torch.no_grad():
        trace = model.trace(torch.randn(1, 3, size, size, generator=generator), switches=True)
    got = {name: trace.activations[name].shape[-1] for name in model.spatial_sizes()}
    assert got == model.spatial_sizes(size)
    assert trace.logits.shape == (1, 5)


def test_forward_shapes_of_a_small_classifier(tiny_model, generator):
    x = torch.randn(2, 3, 224, 224, generator=generator) * 60
    with torch.no_grad():
        logits = tiny_model(x)
    assert logits.shape == (2, 10)
    assert tiny_model.fc6.in_features == 256 * 6 * 6
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------ switches
def pooled_len(size: int) -> int:
    """Ceil-mode 3x3/2 output length, with PyTorch's rule that the last window must start inside."""
    out = math.ceil((size - 3) / 2) + 1
    return out - 1 if (out - 1) * 2 >= size else out


def brute_force_pool(x: np.ndarray):
    """Max over every (possibly partial) 3x3/2 window; ties go to the first position in row-major order."""
    n, c, h, w = x.shape
    oh, ow = pooled_len(h), pooled_len(w)
    values = np.empty((n, c, oh, ow), x.dtype)
    offsets = np.empty((n, c, oh, ow), np.int8)
    for i in range(oh):
        for j in range(ow):
            best = x[:, :, 2 * i, 2 * j].copy()
            where = np.zeros((n, c), np.int8)
            for dy in range(3):
                for dx in range(3):
                    r, col = 2 * i + dy, 2 * j + dx
                    if r >= h or col >= w:
                        continue
                    better = x[:, :, r, col] > best  # strict: an equal later value never wins
                    best = np.where(better, x[:, :, r, col], best)
                    where = np.where(better, 3 * dy + dx, where)
            values[:, :, i, j] = best
            offsets[:, :, i, j] = where
    return values, offsets


def offsets_from_flat_indices(indices: np.ndarray, in_width: int) -> np.ndarray:
    """Independent conversion: flat argmax index -> offset 3*dy+dx inside the window at (2i, 2j)."""
    oh, ow = indices.shape[-2:]
    rows, cols = np.divmod(indices, in_width)
    dy = rows - 2 * np.arange(oh).reshape(oh, 1)
    dx = cols - 2 * np.arange(ow).reshape(1, ow)
    assert dy.min() >= 0 and dy.max() <= 2 and dx.min() >= 0 and dx.max() <= 2
    return (3 * dy + dx).astype(np.int8)


@pytest.mark.parametrize("shape", [(2, 3, 13, 13), (1, 4, 27, 26), (2, 2, 26, 27), (1, 3, 110, 110),
                                   (1, 2, 7, 4)])
@pytest.mark.parametrize("levels", [2, 4])
def test_switches_equal_max_pool2d_indices_with_ties(shape, levels, generator):
    # Few distinct values -> most windows hold ties, which must go to the first position.
    x = torch.randint(0, levels, shape, generator=generator).to(torch.float32)
    pooled, switches = max_pool_with_switches(x)
    ref_pooled, ref_indices = F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    assert switches.dtype == torch.int8
    assert int(switches.min()) >= 0 and int(switches.max()) <= 8
    assert torch.equal(pooled, ref_pooled)
    expected = offsets_from_flat_indices(ref_indices.numpy(), shape[-1])
    np.testing.assert_array_equal(switches.numpy(), expected)
    bf_values, bf_offsets = brute_force_pool(x.numpy())
    np.testing.assert_array_equal(pooled.numpy(), bf_values)
    np.testing.assert_array_equal(switches.numpy(), bf_offsets)
    # The conversion is lossless.
    assert torch.equal(indices_from_switches(switches, shape[-1]), ref_indices)
    assert torch.equal(switches_from_indices(ref_indices, shape[-1]), switches)


def test_constant_windows_switch_to_offset_zero():
    x = torch.full((1, 1, 9, 9), 3.0)
    _, switches = max_pool_with_switches(x)
    assert torch.count_nonzero(switches) == 0


# ------------------------------------------------------------------------------------------------ trace
def eager_forward(m: ZFNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's forward pass written out with functional ops and its geometry typed in again."""
    acts = {}
    h = F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, stride=2, padding=1))
    acts["conv1"] = h
    h = acts["pool1"] = F.max_pool2d(h, 3, 2, ceil_mode=True)
    h = F.local_response_norm(h, 5, alpha=1e-4, beta=0.75, k=2.0)
    h = acts["conv2"] = F.relu(F.conv2d(h, m.conv2.weight, m.conv2.bias, stride=2, padding=0))
    h = acts["pool2"] = F.max_pool2d(h, 3, 2, ceil_mode=True)
    h = F.local_response_norm(h, 5, alpha=1e-4, beta=0.75, k=2.0)
    h = acts["conv3"] = F.relu(F.conv2d(h, m.conv3.weight, m.conv3.bias, padding=1))
    h = acts["conv4"] = F.relu(F.conv2d(h, m.conv4.weight, m.conv4.bias, padding=1))
    h = acts["conv5"] = F.relu(F.conv2d(h, m.conv5.weight, m.conv5.bias, padding=1))
    h = acts["pool5"] = F.max_pool2d(h, 3, 2, ceil_mode=True)
    h = acts["fc6"] = F.relu(F.linear(h.flatten(1), m.fc6.weight, m.fc6.bias))
    h = acts["fc7"] = F.relu(F.linear(h, m.fc7.weight, m.fc7.bias))
    acts["fc8"] = F.linear(h, m.fc8.weight, m.fc8.bias)
    return acts


@pytest.fixture(scope="module")
def traced():
    """One small model with non-zero biases (so a dropped bias would show), an input and all the results."""
    torch.manual_seed(7)
    model = ZFNet(num_classes=10, fc_width=64).eval()
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.conv3, model.conv4, model.conv5, model.fc6, model.fc7,
                       model.fc8):
            module.bias.uniform_(-0.5, 0.5, generator=gen)
        model.conv1.weight.mul_(3)  # livelier activations: fewer all-zero maps downstream
        x = torch.randn(2, 3, 224, 224, generator=gen) * 60
        return model, x, eager_forward(model, x), model(x), model.trace(x, switches=True), \
            model.trace(x, switches=False)


def test_trace_activations_equal_eager_forward(traced):
    model, x, ref, _, with_switches, without = traced
    for trace in (with_switches, without):
        assert set(trace.activations) == set(LAYER_NAMES)
        for name in LAYER_NAMES:
            torch.testing.assert_close(trace.activations[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)
    assert without.switches == {}


def test_trace_logits_equal_forward(traced):
    model, x, ref, logits, with_switches, without = traced
    torch.testing.assert_close(logits, ref["fc8"], rtol=1e-4, atol=1e-4)
    assert torch.equal(with_switches.logits, logits)
    assert torch.equal(without.logits, logits)
    assert logits.abs().max() > 0


def test_trace_switches_equal_max_pool2d_indices(traced):
    model, x, ref, _, trace, _ = traced
    assert set(trace.switches) == {"pool1", "pool2", "pool5"}
    for pool, conv in (("pool1", "conv1"), ("pool2", "conv2"), ("pool5", "conv5")):
        _, indices = F.max_pool2d(ref[conv], 3, 2, ceil_mode=True, return_indices=True)
        expected = offsets_from_flat_indices(indices.numpy(), ref[conv].shape[-1])
        assert trace.switches[pool].dtype == torch.int8
        np.testing.assert_array_equal(trace.switches[pool].numpy(), expected, err_msg=pool)


def test_trace_subset_and_stop_after(traced):
    model, x, ref, _, _, _ = traced
    with torch.no_grad():
        trace = model.trace(x, layers=("conv2",), switches=True, stop_after="conv2")
    assert list(trace.activations) == ["conv2"]
    assert trace.logits.numel() == 0
    assert set(trace.switches) == {"pool1"}  # pool2 was never reached
    torch.testing.assert_close(trace.activations["conv2"], ref["conv2"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"layers": ("conv6",)}, {"layers": "relu1"}, {"stop_after": "pool3"}])
def test_trace_rejects_unknown_layers(tiny_model, kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        tiny_model.trace(torch.zeros(1, 3, 224, 224), **kwargs)
    assert info.value.field == "layer"
    bad = kwargs.get("layers", kwargs.get("stop_after"))
    bad = bad if isinstance(bad, str) else bad[0]
    assert bad in str(info.value) and "conv1" in str(info.value)


def test_trace_accepts_a_single_layer_name(traced):
    model, x, ref, _, _, _ = traced
    with torch.no_grad():
        trace = model.trace(x[:1], layers="pool1", stop_after="pool1")
    assert list(trace.activations) == ["pool1"]
    torch.testing.assert_close(trace.activations["pool1"], ref["pool1"][:1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ init
@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(3)
    return ZFNet()


def test_paper_init_statistics(paper_model):
    for name in (*CONV_LAYERS, "fc6", "fc7", "fc8"):
        module = getattr(paper_model, name)
        w = module.weight.detach().double()
        n = w.numel()
        # Sample mean within 5 standard errors of 0; sample std within 5 standard errors of 0.01.
        assert abs(float(w.mean())) < 5 * 0.01 / math.sqrt(n), name
        assert abs(float(w.std()) - 0.01) < 5 * 0.01 / math.sqrt(2 * n), name
        assert torch.count_nonzero(module.bias) == 0, name


def test_reset_parameters_is_deterministic_with_a_generator(make_model):
    a, b = make_model(seed=1), make_model(seed=2)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    a.reset_parameters(torch.Generator().manual_seed(5))
    b.reset_parameters(torch.Generator().manual_seed(5))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


# ------------------------------------------------------------------------------------------------ clipping
def clip_reference(weight: np.ndarray, radius: float) -> np.ndarray:
    """The paper's rule, one filter at a time: RMS above the radius is scaled back to the radius."""
    out = weight.astype(np.float64).copy()
    for f in range(out.shape[0]):
        flat = out[f].ravel()
        rms = math.sqrt(float(np.dot(flat, flat)) / flat.size)
        if rms > radius:
            out[f] *= radius / rms
    return out


@pytest.mark.parametrize("radius", [0.1, 0.03])
def test_clip_filter_rms_matches_a_hand_written_loop(make_model, radius, generator):
    model = make_model()
    with torch.no_grad():
        for name in CONV_LAYERS:
            w = getattr(model, name).weight
            # Per-filter scales spread RMS from ~0.002 to ~0.6, so filters sit on both sides of the radius.
            scale = torch.exp(torch.empty(w.shape[0], 1, 1, 1).uniform_(-1.5, 4.1, generator=generator))
            w.mul_(scale)
            getattr(model, name).bias.uniform_(-2, 2, generator=generator)
        model.fc6.weight.mul_(50)  # fc layers are never clipped, however large
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.clip_filter_rms_(radius)
    after = model.state_dict()
    for name in CONV_LAYERS:
        w0 = before[f"{name}.weight"].numpy()
        rms0 = np.sqrt((w0.astype(np.float64) ** 2).reshape(w0.shape[0], -1).mean(axis=1))
        assert (rms0 > radius).any() and (rms0 < radius).any(), name  # the test covers both sides
        expected = clip_reference(w0, radius)
        np.testing.assert_allclose(after[f"{name}.weight"].numpy(), expected, rtol=1e-5, atol=1e-8,
                                   err_msg=name)
        # Filters under the radius are untouched bit for bit.
        untouched = rms0 <= radius
        assert torch.equal(after[f"{name}.weight"][untouched], before[f"{name}.weight"][untouched]), name
    for key in before:
        if key.endswith(".bias") or key.startswith("fc"):
            assert torch.equal(after[key], before[key]), key
